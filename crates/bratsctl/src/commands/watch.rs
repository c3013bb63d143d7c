//! Following and showing training jobs: `bratsctl train watch`, `train start --watch` and the
//! demo share this.

use std::time::{Duration, Instant};

use anyhow::bail;
use brats_proto::v1 as pb;
use brats_proto::v1::trainer_client::TrainerClient;

use super::status_line;

/// A client of the trainer service at `server`.
pub(crate) async fn trainer(server: &str) -> anyhow::Result<TrainerClient<brats_cli::AuthChannel>> {
    Ok(TrainerClient::new(super::connect(server).await?))
}

/// A job state's name without its prefix: `RUNNING`.
pub(crate) fn job_state(v: i32) -> &'static str {
    pb::JobState::try_from(v).map(|s| s.as_str_name().trim_start_matches("JOB_STATE_")).unwrap_or("UNKNOWN")
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS` (UTC).
pub(crate) fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (y, m, d) = brats_volume::time::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn dice(d: &pb::DiceScores) -> String {
    format!("TC {:.4}  WT {:.4}  ET {:.4}  mean {:.4}", d.tc, d.wt, d.et, d.mean)
}

/// A job's state, progress, best Dice, times and locations.
pub(crate) fn print_job(j: &pb::Job) {
    println!("job {}  {}", j.id, job_state(j.state));
    if !j.failure_reason.is_empty() {
        let code = if j.failure_code.is_empty() { String::new() } else { format!(" [{}]", j.failure_code) };
        println!("  reason     {}{code}", j.failure_reason);
    }
    println!("  progress   epoch {}/{}, step {}", j.epoch, j.total_epochs, j.global_step);
    if j.samples_per_second > 0.0 {
        println!("  speed      {:.2} samples/s, ETA {}", j.samples_per_second, duration(j.eta_seconds));
    }
    if let Some(b) = &j.best_metrics {
        println!("  best       {} (epoch {})", dice(b), j.best_epoch);
    }
    let when = |seconds: Option<i64>| seconds.map(utc).unwrap_or_else(|| "-".into());
    println!(
        "  created    {} UTC; started {}; finished {}",
        when(j.created_at.as_ref().map(|t| t.seconds)),
        when(j.started_at.as_ref().map(|t| t.seconds)),
        when(j.finished_at.as_ref().map(|t| t.seconds))
    );
    println!("  seed       {}; resumed {} time(s); last event {}", j.seed, j.resume_count, j.last_sequence);
    if let Some(s) = &j.spec {
        println!("  datalist   {}", s.datalist_uri);
    }
    println!("  folder     {}", j.job_uri);
    if let Some(p) = j.spec.as_ref().and_then(|s| s.placement.as_ref()) {
        let backend = pb::Backend::try_from(p.backend).unwrap_or_default().as_str_name().trim_start_matches("BACKEND_");
        let engine_id =
            if j.cluster_job_id.is_empty() { String::new() } else { format!(", engine job {}", j.cluster_job_id) };
        println!("  placement  {} × {} node(s){engine_id}", backend.to_ascii_lowercase(), p.nodes.max(1));
    }
    if !j.latest_checkpoint_uri.is_empty() {
        println!("  latest     {}", j.latest_checkpoint_uri);
    }
    if !j.best_checkpoint_uri.is_empty() {
        println!("  best ckpt  {}", j.best_checkpoint_uri);
    }
    if let Some(m) = &j.registered_model {
        println!("  model      {} version {}", m.name, m.version);
    }
}

fn duration(s: f64) -> String {
    if !s.is_finite() || s <= 0.0 {
        return "-".into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// Follows a job: a bar over the current epoch's steps, a line per epoch, state changes and
/// logs. Transient errors (the trainer restarting, a dropped connection) reconnect with
/// from_sequence = last seen + 1, for up to two minutes without news.
pub(crate) async fn watch_job(server: &str, job: &str, from: u64) -> anyhow::Result<()> {
    use pb::job_event::Event;
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let say = |line: String| bar.suspend(|| println!("{line}"));
    let mut next = from;
    let mut total_epochs = 0;
    let mut last_news = Instant::now();
    let mut retry_in = Duration::from_millis(250);
    loop {
        let attempt: Result<(), tonic::Status> = async {
            let mut client = TrainerClient::new(
                super::connect(server).await.map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?,
            );
            if total_epochs == 0 {
                total_epochs = client.get_job(pb::GetJobRequest { job_id: job.to_string() }).await?.into_inner().total_epochs;
            }
            let mut stream = client
                .watch_job(pb::WatchJobRequest { job_id: job.to_string(), from_sequence: next })
                .await?
                .into_inner();
            while let Some(e) = stream.message().await? {
                next = e.sequence + 1;
                last_news = Instant::now();
                retry_in = Duration::from_millis(250);
                match e.event {
                    Some(Event::StateChanged(s)) => {
                        let reason = if s.reason.is_empty() { String::new() } else { format!(": {}", s.reason) };
                        say(format!("[{}] {} → {}{reason}", e.sequence, job_state(s.from), job_state(s.to)));
                    }
                    Some(Event::Step(s)) => {
                        bar.set_length(s.steps_per_epoch.max(1) as u64);
                        bar.set_position(s.step as u64);
                        bar.set_prefix(format!("epoch {}/{}", s.epoch, total_epochs));
                        bar.set_message(format!(
                            "loss {:.4}  lr {:.2e}  {:.2} samples/s  ETA {}",
                            s.loss,
                            s.learning_rate,
                            s.samples_per_second,
                            duration(s.eta_seconds)
                        ));
                    }
                    Some(Event::Epoch(m)) => {
                        let val = match &m.validation {
                            Some(d) => format!("  Dice {}{}", dice(d), if m.is_best { " (best)" } else { "" }),
                            None => String::new(),
                        };
                        say(format!(
                            "epoch {}/{}: loss {:.4}  lr {:.2e}{val}  [{:.1}s train, {:.1}s val, {:.2} samples/s, ETA {}]",
                            m.epoch,
                            total_epochs,
                            m.train_loss,
                            m.learning_rate,
                            m.train_seconds,
                            m.validation_seconds,
                            m.samples_per_second,
                            duration(m.eta_seconds)
                        ));
                    }
                    Some(Event::Checkpoint(c)) if c.best => say(format!("  best checkpoint (epoch {}) {}", c.epoch, c.uri)),
                    Some(Event::Checkpoint(_)) => {}
                    Some(Event::ModelRegistered(m)) => {
                        let model = m.model.unwrap_or_default();
                        let aliases =
                            if m.aliases.is_empty() { String::new() } else { format!(" ({})", m.aliases.join(", ")) };
                        say(format!("registered {} version {}{aliases} at {}", model.name, model.version, m.uri));
                    }
                    Some(Event::Log(l)) => say(format!("[{}] {}: {}", e.sequence, l.level, l.message)),
                    None => {}
                }
            }
            Ok(())
        }
        .await;
        match attempt {
            Ok(()) => break,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
                ) && last_news.elapsed() < Duration::from_secs(120) =>
            {
                say(format!("  ({}; reconnecting from event {next})", s.message()));
                tokio::time::sleep(retry_in).await;
                retry_in = (retry_in * 2).min(Duration::from_secs(5));
            }
            Err(s) => {
                bar.finish_and_clear();
                return Err(status_line(&s));
            }
        }
    }
    bar.finish_and_clear();
    let mut client = trainer(server).await?;
    let j =
        client.get_job(pb::GetJobRequest { job_id: job.to_string() }).await.map_err(|s| status_line(&s))?.into_inner();
    print_job(&j);
    if j.state == pb::JobState::Failed as i32 {
        bail!("job {} FAILED: {}", j.id, j.failure_reason);
    }
    Ok(())
}
