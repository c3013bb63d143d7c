//! `bratsctl health`: whether a server's services are SERVING (`grpc.health.v1`), usable as a
//! container healthcheck.
//!
//! Without `--service` it checks what the server serves, as reflection (`grpc.reflection.v1`)
//! lists it: every `brats.v1.*` service. A server whose reflection lists services it does not
//! serve (every service's descriptors share one set) answers NOT_FOUND for those; they are
//! skipped, with a note, as long as another listed service is SERVING. Without reflection the
//! server's overall status (service "") is checked.

use std::time::Duration;

use anyhow::bail;
use brats_cli::AuthChannel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use super::status_line;

/// The package whose services `bratsctl health` checks by default.
const PACKAGE: &str = "brats.v1.";

/// Arguments of `bratsctl health`.
#[derive(clap::Args)]
pub(crate) struct HealthArgs {
    /// Service address, e.g. http://127.0.0.1:50051 (a container image sets its own port
    /// through the environment, so its HEALTHCHECK needs no argument).
    #[arg(long, env = "BRATS_HEALTH_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The service to check, e.g. brats.v1.Inference (default: every brats.v1 service the
    /// server lists through reflection).
    #[arg(long)]
    service: Option<String>,
}

/// What the health service said about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// A status (SERVING, NOT_SERVING, …).
    Status(ServingStatus),
    /// NOT_FOUND: the server's health service does not know the service.
    NotServedHere,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Status(s) => f.write_str(s.as_str_name()),
            Answer::NotServedHere => f.write_str("NOT_FOUND (not served here)"),
        }
    }
}

/// Checks the services, prints one line each, and fails unless every checked one is SERVING.
pub(crate) async fn run(a: HealthArgs) -> anyhow::Result<()> {
    let channel = connect(&a.server).await?;
    let checked = match a.service {
        Some(name) => vec![(name.clone(), check(&channel, &name).await?)],
        None => check_served(&channel).await?,
    };
    for (name, answer) in &checked {
        println!("{} {}: {answer}", a.server, if name.is_empty() { "(server)" } else { name });
    }
    let failing: Vec<String> = checked
        .iter()
        .filter(|(_, answer)| *answer != Answer::Status(ServingStatus::Serving))
        .map(|(name, answer)| match answer {
            Answer::NotServedHere => format!("{name} is not served at {}", a.server),
            _ => format!("{name} is {answer}"),
        })
        .collect();
    if !failing.is_empty() {
        bail!("not healthy: {}", failing.join("; "));
    }
    Ok(())
}

/// Whether `service` at `server` is SERVING; false while the server cannot be reached.
pub(crate) async fn serving(server: &str, service: &str) -> bool {
    match connect(server).await {
        Ok(channel) => matches!(check(&channel, service).await, Ok(Answer::Status(ServingStatus::Serving))),
        Err(_) => false,
    }
}

async fn connect(server: &str) -> anyhow::Result<AuthChannel> {
    let security = super::security();
    let channel = security.endpoint(server)?.connect_timeout(Duration::from_secs(2)).connect().await?;
    Ok(AuthChannel::new(channel, security.credentials()?))
}

async fn check(channel: &AuthChannel, service: &str) -> anyhow::Result<Answer> {
    let mut client = HealthClient::new(channel.clone());
    match client.check(HealthCheckRequest { service: service.to_string() }).await {
        Ok(r) => Ok(Answer::Status(r.into_inner().status())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(Answer::NotServedHere),
        Err(s) => Err(status_line(&s)),
    }
}

/// The default: every `brats.v1` service reflection lists, those the server does not serve
/// left out (said on stderr) when another is SERVING; the overall status without reflection.
async fn check_served(channel: &AuthChannel) -> anyhow::Result<Vec<(String, Answer)>> {
    let listed: Vec<String> = match list_services(channel).await {
        Ok(names) => names.into_iter().filter(|n| n.starts_with(PACKAGE)).collect(),
        Err(e) => {
            eprintln!("note: no reflection ({e}); checking the server's overall status");
            Vec::new()
        }
    };
    if listed.is_empty() {
        return Ok(vec![(String::new(), check(channel, "").await?)]);
    }
    let mut answers = Vec::new();
    for name in listed {
        let answer = check(channel, &name).await?;
        answers.push((name, answer));
    }
    Ok(served(answers))
}

/// Drops the listed services the server does not serve, if another listed one is SERVING.
fn served(answers: Vec<(String, Answer)>) -> Vec<(String, Answer)> {
    let any_serving = answers.iter().any(|(_, a)| *a == Answer::Status(ServingStatus::Serving));
    if !any_serving {
        return answers;
    }
    answers
        .into_iter()
        .filter(|(name, answer)| {
            let skip = *answer == Answer::NotServedHere;
            if skip {
                eprintln!("note: {name} is listed by reflection but not served here; skipped");
            }
            !skip
        })
        .collect()
}

/// The services the server lists through `grpc.reflection.v1`.
async fn list_services(channel: &AuthChannel) -> anyhow::Result<Vec<String>> {
    let mut client = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        client.server_reflection_info(tokio_stream::once(request)).await.map_err(|s| status_line(&s))?.into_inner();
    match responses.message().await.map_err(|s| status_line(&s))?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        Some(MessageResponse::ErrorResponse(e)) => bail!("reflection error {}: {}", e.error_code, e.error_message),
        _ => bail!("reflection sent no service list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVING: Answer = Answer::Status(ServingStatus::Serving);
    const NOT_SERVING: Answer = Answer::Status(ServingStatus::NotServing);

    fn named(list: &[(&str, Answer)]) -> Vec<(String, Answer)> {
        list.iter().map(|(n, a)| (n.to_string(), a.clone())).collect()
    }

    #[test]
    fn services_listed_but_not_served_are_skipped_only_beside_a_serving_one() {
        let listed = named(&[
            ("brats.v1.Inference", Answer::NotServedHere),
            ("brats.v1.Preprocessor", SERVING),
            ("brats.v1.Trainer", Answer::NotServedHere),
        ]);
        assert_eq!(served(listed), named(&[("brats.v1.Preprocessor", SERVING)]));
        let warming = named(&[("brats.v1.Inference", NOT_SERVING), ("brats.v1.Preprocessor", Answer::NotServedHere)]);
        assert_eq!(served(warming.clone()), warming, "nothing SERVING: every answer stays, so the check fails");
        let both = named(&[("brats.v1.Inference", NOT_SERVING), ("brats.v1.Trainer", SERVING)]);
        assert_eq!(served(both.clone()), both, "a served service that is not SERVING is never skipped");
    }
}
