//! `bratsctl pacs`: the PACS gateway's study jobs: submit a study from a DICOMweb archive,
//! watch, get and list jobs, check a destination.

use brats_proto::v1 as pb;
use brats_proto::v1::gateway_client::GatewayClient;
use tokio_stream::StreamExt;

use super::status_line;

/// The gateway's address, shared by every `pacs` command.
#[derive(clap::Args)]
pub(crate) struct GatewayAddress {
    /// Gateway gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50054", global = true)]
    server: String,
}

/// `bratsctl pacs …`.
#[derive(clap::Subcommand)]
pub(crate) enum PacsCmd {
    /// Pull a study from a DICOMweb source the gateway knows and segment it; prints the job
    /// (with --watch, follows it to the end; exit 0 only when DONE).
    Submit {
        /// StudyInstanceUID.
        #[arg(long)]
        study: String,
        /// The gateway's source name (empty: its only source).
        #[arg(long, default_value = "")]
        source: String,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job until it ends (exit 0 only when DONE).
    Watch {
        /// Job id.
        job_id: String,
    },
    /// Print one job as JSON.
    Get {
        /// Job id.
        job_id: String,
    },
    /// List jobs, most recent first.
    List {
        /// Only these states (selected, seg-written, exporting, done, rejected, failed), comma-separated.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Most jobs to print.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Check that a configured destination answers (C-ECHO or QIDO-RS); exit 0 when it does.
    Echo {
        /// Destination name.
        destination: String,
    },
}

fn state_name(state: i32) -> &'static str {
    match pb::StudyJobState::try_from(state).unwrap_or(pb::StudyJobState::Unspecified) {
        pb::StudyJobState::Unspecified => "?",
        pb::StudyJobState::Selected => "SELECTED",
        pb::StudyJobState::SegWritten => "SEG_WRITTEN",
        pb::StudyJobState::Exporting => "EXPORTING",
        pb::StudyJobState::Done => "DONE",
        pb::StudyJobState::Rejected => "REJECTED",
        pb::StudyJobState::Failed => "FAILED",
    }
}

fn parse_state(s: &str) -> anyhow::Result<pb::StudyJobState> {
    let name = format!("STUDY_JOB_STATE_{}", s.trim().to_ascii_uppercase().replace('-', "_"));
    pb::StudyJobState::from_str_name(&name)
        .ok_or_else(|| anyhow::anyhow!("--state {s}: use selected, seg-written, exporting, done, rejected or failed"))
}

/// One line: id, state, origin, volumes or the error.
fn line(job: &pb::StudyJob) -> String {
    let detail = if !job.error_code.is_empty() {
        format!("{}: {}", job.error_code, job.error_message)
    } else if let [tc, wt, et] = job.volumes_ml[..] {
        format!("TC {tc:.2} mL, WT {wt:.2} mL, ET {et:.2} mL")
    } else {
        String::new()
    };
    format!("{}  {:<11}  {:<18} {detail}", job.job_id, state_name(job.state), job.origin)
}

fn json(job: &pb::StudyJob) -> serde_json::Value {
    serde_json::json!({
        "job_id": job.job_id,
        "study": job.study,
        "state": state_name(job.state),
        "origin": job.origin,
        "series": job.series.iter().map(|s| (s.role.clone(), s.series.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "grid": job.grid,
        "warnings": job.warnings,
        "seg_series_uid": job.seg_series_uid,
        "seg_frames": job.seg_frames,
        "volumes_ml": job.volumes_ml,
        "timings": job.timings.iter().map(|t| (t.stage.clone(), t.seconds)).collect::<Vec<_>>(),
        "exports": job.exports.iter().map(|e| serde_json::json!({
            "destination": e.destination, "stored": e.stored, "attempts": e.attempts, "error": e.error,
        })).collect::<Vec<_>>(),
        "error_code": job.error_code,
        "error_message": job.error_message,
    })
}

async fn watch(client: &mut GatewayClient<brats_cli::AuthChannel>, job_id: &str) -> anyhow::Result<()> {
    let mut stream = client
        .watch_job(pb::WatchStudyJobRequest { job_id: job_id.to_string() })
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    let mut last = None;
    while let Some(job) = stream.next().await {
        let job = job.map_err(|s| status_line(&s))?;
        println!("{}", line(&job));
        last = Some(job);
    }
    let job = last.ok_or_else(|| anyhow::anyhow!("the watch ended without a job"))?;
    let stages: Vec<String> = job.timings.iter().map(|t| format!("{} {:.2}s", t.stage, t.seconds)).collect();
    println!("  timing  {}", stages.join(", "));
    for e in &job.exports {
        println!(
            "  export  {} {} after {} attempt(s){}",
            e.destination,
            if e.stored { "stored" } else { "NOT stored" },
            e.attempts,
            if e.error.is_empty() { String::new() } else { format!(": {}", e.error) }
        );
    }
    anyhow::ensure!(job.state == pb::StudyJobState::Done as i32, "job {} ended {}", job.job_id, state_name(job.state));
    Ok(())
}

/// Runs one `pacs` command against the gateway at `address`.
pub(crate) async fn run(address: GatewayAddress, command: PacsCmd) -> anyhow::Result<()> {
    let mut client = GatewayClient::new(super::connect(&address.server).await?);
    match command {
        PacsCmd::Submit { study, source, watch: follow } => {
            let job = client
                .submit_study(pb::SubmitStudyRequest { source, study_instance_uid: study })
                .await
                .map_err(|s| status_line(&s))?
                .into_inner();
            println!("{}", line(&job));
            if follow {
                watch(&mut client, &job.job_id).await?;
            } else if job.state == pb::StudyJobState::Rejected as i32 {
                anyhow::bail!("study rejected: {}", job.error_message);
            }
        }
        PacsCmd::Watch { job_id } => watch(&mut client, &job_id).await?,
        PacsCmd::Get { job_id } => {
            let job =
                client.get_job(pb::GetStudyJobRequest { job_id }).await.map_err(|s| status_line(&s))?.into_inner();
            println!("{}", serde_json::to_string_pretty(&json(&job))?);
        }
        PacsCmd::List { state, limit } => {
            let states = state.iter().map(|s| parse_state(s).map(|s| s as i32)).collect::<anyhow::Result<Vec<_>>>()?;
            let mut token = String::new();
            let mut printed = 0;
            loop {
                let page = client
                    .list_jobs(pb::ListStudyJobsRequest {
                        page_size: (limit - printed).min(1000),
                        page_token: token,
                        states: states.clone(),
                    })
                    .await
                    .map_err(|s| status_line(&s))?
                    .into_inner();
                for job in &page.jobs {
                    println!("{}", line(job));
                }
                printed += page.jobs.len() as u32;
                token = page.next_page_token;
                if token.is_empty() || printed >= limit {
                    break;
                }
            }
        }
        PacsCmd::Echo { destination } => {
            let r = client
                .echo_destination(pb::EchoDestinationRequest { destination: destination.clone() })
                .await
                .map_err(|s| status_line(&s))?
                .into_inner();
            if r.ok {
                println!("{destination} ({}) answers in {:.3} s", r.kind, r.seconds);
            } else {
                anyhow::bail!("{destination} ({}) does not answer: {}", r.kind, r.error);
            }
        }
    }
    Ok(())
}
