//! An MLflow tracking server over its REST API (`/api/2.0/mlflow/…`; artefacts through the
//! server's proxy, `/api/2.0/mlflow-artifacts/artifacts/…`, which `mlflow server` serves by
//! default), and [`RunLogger`], which logs one run in the background.
//!
//! Credentials come from MLflow's own variables: `MLFLOW_TRACKING_TOKEN` (bearer) or
//! `MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD` (basic). Errors and logs name the
//! server's host only, never a token, a password or a URL's user part.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where a run is tracked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlflowSettings {
    /// The tracking server, `http(s)://host:port[/prefix]`.
    pub uri: String,
    /// The experiment (created when missing).
    pub experiment: String,
}

/// The experiment a run goes to when none is named.
pub const DEFAULT_EXPERIMENT: &str = "brats-segresnet";

/// What went wrong talking to the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MlflowError {
    /// Not an http(s) URL.
    #[error("mlflow uri {0:?}: expected http://HOST:PORT or https://HOST:PORT (an MLflow tracking server)")]
    BadUri(String),
    /// No answer, a timeout, or a server error (5xx, 429): worth retrying.
    #[error("MLflow server {host} unreachable: {reason}")]
    Unreachable {
        /// The server's host:port.
        host: String,
        /// What happened.
        reason: String,
    },
    /// The server refused the request (4xx): retrying the same request will not help.
    #[error("MLflow server {host} refused {what}: HTTP {status} {message}")]
    Rejected {
        /// The server's host:port.
        host: String,
        /// The request.
        what: String,
        /// HTTP status.
        status: u16,
        /// MLflow's error code and message.
        message: String,
    },
}

impl MlflowError {
    /// Whether the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, MlflowError::Unreachable { .. })
    }
}

/// A run as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// The run id.
    pub run_id: String,
    /// Its experiment.
    pub experiment_id: String,
    /// `RUNNING`, `FINISHED`, `FAILED`, `KILLED`, `SCHEDULED`.
    pub status: String,
    /// Where its artefacts live (`mlflow-artifacts:/…` behind the proxy).
    pub artifact_uri: String,
}

/// One metric value.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Its key (`loss`, `dice/tc`, …).
    pub key: String,
    /// The value.
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The step.
    pub step: u64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Completed.
    Finished,
    /// Failed.
    Failed,
    /// Cancelled.
    Killed,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The longest parameter value MLflow stores.
const MAX_PARAM_VALUE: usize = 6000;
/// Per `log-batch` request (MLflow's limits).
const MAX_PARAMS_PER_BATCH: usize = 100;
const MAX_METRICS_PER_BATCH: usize = 1000;

/// A tracking server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    host: String,
    http: reqwest::Client,
    authorization: Option<String>,
}

impl Client {
    /// A client for the server at `uri`, with credentials from MLflow's variables.
    pub fn new(uri: &str) -> Result<Client, MlflowError> {
        let url = reqwest::Url::parse(uri.trim()).map_err(|_| MlflowError::BadUri(redact(uri)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(MlflowError::BadUri(redact(uri)));
        }
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let mut authorization = None;
        let mut clean = url.clone();
        if !url.username().is_empty() {
            use base64::Engine;
            let pair = format!("{}:{}", url.username(), url.password().unwrap_or_default());
            authorization = Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)));
            let _ = clean.set_username("");
            let _ = clean.set_password(None);
        }
        if let Ok(token) = std::env::var("MLFLOW_TRACKING_TOKEN") {
            authorization = Some(format!("Bearer {token}"));
        } else if let (Ok(user), Ok(password)) =
            (std::env::var("MLFLOW_TRACKING_USERNAME"), std::env::var("MLFLOW_TRACKING_PASSWORD"))
        {
            use base64::Engine;
            authorization = Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| MlflowError::Unreachable { host: host.clone(), reason: e.to_string() })?;
        Ok(Client { base: clean.as_str().trim_end_matches('/').to_string(), host, http, authorization })
    }

    /// The server's host:port (for messages).
    pub fn host(&self) -> &str {
        &self.host
    }

    async fn call(&self, what: &str, request: reqwest::RequestBuilder) -> Result<Value, MlflowError> {
        let request = match &self.authorization {
            Some(a) => request.header("Authorization", a),
            None => request,
        };
        let unreachable = |reason: String| MlflowError::Unreachable { host: self.host.clone(), reason };
        let response = request.send().await.map_err(|e| unreachable(without_url(e)))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| unreachable(without_url(e)))?;
        if status.is_success() {
            return Ok(serde_json::from_slice(&body).unwrap_or(Value::Null));
        }
        let detail: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let message = match (detail["error_code"].as_str(), detail["message"].as_str()) {
            (Some(code), Some(m)) => format!("{code}: {}", m.chars().take(300).collect::<String>()),
            _ => String::from_utf8_lossy(&body).chars().take(300).collect(),
        };
        if status.is_server_error() || status.as_u16() == 429 {
            Err(unreachable(format!("HTTP {} {message}", status.as_u16())))
        } else {
            Err(MlflowError::Rejected { host: self.host.clone(), what: what.into(), status: status.as_u16(), message })
        }
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/2.0/mlflow/{path}", self.base)
    }

    /// The id of experiment `name`, created when missing.
    pub async fn experiment_id(&self, name: &str) -> Result<String, MlflowError> {
        let get = || self.http.get(self.api("experiments/get-by-name")).query(&[("experiment_name", name)]);
        match self.call("experiments/get-by-name", get()).await {
            Ok(v) => return Ok(v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string()),
            Err(MlflowError::Rejected { status: 404, .. }) => {}
            Err(e) => return Err(e),
        }
        let create = self.http.post(self.api("experiments/create")).json(&json!({ "name": name }));
        match self.call("experiments/create", create).await {
            Ok(v) => Ok(v["experiment_id"].as_str().unwrap_or_default().to_string()),
            // Another run created it meanwhile.
            Err(MlflowError::Rejected { status: 400, message, .. }) if message.contains("RESOURCE_ALREADY_EXISTS") => {
                let v = self.call("experiments/get-by-name", get()).await?;
                Ok(v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string())
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a run in `experiment_id`.
    pub async fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        tags: &[(String, String)],
    ) -> Result<RunInfo, MlflowError> {
        let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        let body =
            json!({ "experiment_id": experiment_id, "run_name": run_name, "start_time": now_ms(), "tags": tags });
        let v = self.call("runs/create", self.http.post(self.api("runs/create")).json(&body)).await?;
        Ok(run_info(&v["run"]["info"]))
    }

    /// Reads a run.
    pub async fn get_run(&self, run_id: &str) -> Result<RunInfo, MlflowError> {
        let v = self.call("runs/get", self.http.get(self.api("runs/get")).query(&[("run_id", run_id)])).await?;
        Ok(run_info(&v["run"]["info"]))
    }

    /// Logs metrics and parameters (MLflow's per-request limits are the caller's: see
    /// [`RunLogger`]).
    pub async fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
    ) -> Result<(), MlflowError> {
        let metrics: Vec<Value> = metrics
            .iter()
            .map(|m| json!({ "key": m.key, "value": m.value, "timestamp": m.timestamp_ms, "step": m.step }))
            .collect();
        let params: Vec<Value> = params.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        let body = json!({ "run_id": run_id, "metrics": metrics, "params": params });
        self.call("runs/log-batch", self.http.post(self.api("runs/log-batch")).json(&body)).await.map(|_| ())
    }

    /// Uploads `bytes` as the run's artefact `path` (`model/model.onnx`) through the server's
    /// artifact proxy.
    pub async fn upload_artifact(&self, run: &RunInfo, path: &str, bytes: Vec<u8>) -> Result<(), MlflowError> {
        let Some(root) = run.artifact_uri.strip_prefix("mlflow-artifacts:") else {
            return Err(MlflowError::Rejected {
                host: self.host.clone(),
                what: format!("artifact {path}"),
                status: 0,
                message: format!(
                    "the run's artifact store is {:?}, not the server's proxy; start the server with \
                     --serve-artifacts (the default) so clients upload through it",
                    run.artifact_uri.split(':').next().unwrap_or_default()
                ),
            });
        };
        let root = root.trim_start_matches('/').trim_end_matches('/');
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{root}/{}", self.base, path.trim_start_matches('/'));
        self.call(&format!("artifact {path}"), self.http.put(url).body(bytes)).await.map(|_| ())
    }

    /// Sets the run's status (and end time when it ended).
    pub async fn set_status(&self, run_id: &str, status: &str) -> Result<(), MlflowError> {
        let mut body = json!({ "run_id": run_id, "status": status });
        if status != "RUNNING" {
            body["end_time"] = json!(now_ms());
        }
        self.call("runs/update", self.http.post(self.api("runs/update")).json(&body)).await.map(|_| ())
    }
}

fn run_info(v: &Value) -> RunInfo {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    RunInfo {
        run_id: s("run_id"),
        experiment_id: s("experiment_id"),
        status: s("status"),
        artifact_uri: s("artifact_uri"),
    }
}

/// reqwest's message without the URL (which could carry credentials).
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The URI without a user part, for messages.
fn redact(uri: &str) -> String {
    match uri.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => uri.to_string(),
        },
        None => uri.to_string(),
    }
}

/// What a run logs, handed to the background task.
enum Message {
    Metrics(Vec<Metric>),
    Artifact(String, Vec<u8>),
    Finish(RunStatus, Duration, oneshot::Sender<LoggerReport>),
}

/// How a run's logging went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoggerReport {
    /// The run's id, when the server created it.
    pub run_id: Option<String>,
    /// Metric values the server took.
    pub metrics_sent: usize,
    /// Metric values dropped (the queue was full during an outage, or the server refused them).
    pub metrics_dropped: usize,
    /// Artefacts uploaded.
    pub artifacts_sent: usize,
    /// Artefacts not uploaded.
    pub artifacts_dropped: usize,
    /// Times the server became unreachable.
    pub outages: usize,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// How a run starts.
#[derive(Debug, Clone)]
pub struct RunStart {
    /// Server and experiment.
    pub settings: MlflowSettings,
    /// The run's name.
    pub run_name: String,
    /// Parameters, logged once (values longer than MLflow's limit are shortened).
    pub params: Vec<(String, String)>,
    /// Tags of a new run.
    pub tags: Vec<(String, String)>,
    /// Continue this run (a resumed job) instead of creating one.
    pub resume_run_id: Option<String>,
}

/// Metric values kept while the server is unreachable; older ones are dropped beyond this.
const MAX_QUEUED_METRICS: usize = 200_000;

/// Logs one run in the background: calls return at once, the values are sent in batches, and
/// while the server is unreachable they are kept (up to a bound) and retried with backoff. A
/// failure is reported through `tracing` and the final [`LoggerReport`], never to the caller.
pub struct RunLogger {
    tx: mpsc::UnboundedSender<Message>,
    run_id: Arc<Mutex<Option<String>>>,
}

impl RunLogger {
    /// Starts the background task on `runtime`. A bad URI is the only error (it cannot get better).
    pub fn start(runtime: &tokio::runtime::Handle, start: RunStart) -> Result<RunLogger, MlflowError> {
        let client = Client::new(&start.settings.uri)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let run_id = Arc::new(Mutex::new(None));
        runtime.spawn(background(client, start, rx, run_id.clone()));
        Ok(RunLogger { tx, run_id })
    }

    /// The run's id once the server has created (or resumed) it.
    pub fn run_id(&self) -> Option<String> {
        self.run_id.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Logs `values` (key, value) at `step`.
    pub fn log(&self, step: u64, values: &[(&str, f64)]) {
        let timestamp_ms = now_ms();
        let metrics = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| Metric { key: (*k).to_string(), value: *v, timestamp_ms, step })
            .collect();
        let _ = self.tx.send(Message::Metrics(metrics));
    }

    /// Uploads an artefact (`path` inside the run's artefacts).
    pub fn artifact(&self, path: &str, bytes: Vec<u8>) {
        let _ = self.tx.send(Message::Artifact(path.to_string(), bytes));
    }

    /// Sends what is queued (waiting at most `flush_timeout`), sets the run's status and
    /// reports. Blocks the calling thread, which must not be one of the runtime's.
    pub fn finish(self, status: RunStatus, flush_timeout: Duration) -> LoggerReport {
        let (done, report) = oneshot::channel();
        if self.tx.send(Message::Finish(status, flush_timeout, done)).is_err() {
            return LoggerReport { last_error: Some("the logging task ended early".into()), ..Default::default() };
        }
        report.blocking_recv().unwrap_or_else(|_| LoggerReport {
            last_error: Some("the logging task ended early".into()),
            ..Default::default()
        })
    }
}

fn shorten(value: &str) -> String {
    if value.chars().count() <= MAX_PARAM_VALUE {
        value.to_string()
    } else {
        value.chars().take(MAX_PARAM_VALUE - 1).collect::<String>() + "…"
    }
}

/// What the background task has been asked to finish with.
struct Finishing {
    status: RunStatus,
    deadline: Instant,
    /// `None` when the logger was dropped without [`RunLogger::finish`].
    reply: Option<oneshot::Sender<LoggerReport>>,
}

/// How long a logger dropped without `finish` still tries to send what it holds.
const DROPPED_FLUSH: Duration = Duration::from_secs(5);

/// The background task: create (or resume) the run, then send params, metrics and artefacts
/// as they come, retrying through outages (the next attempt is due at a fixed time, so values
/// arriving meanwhile do not postpone it) until `Finish`.
async fn background(
    client: Client,
    start: RunStart,
    mut rx: mpsc::UnboundedReceiver<Message>,
    run_id: Arc<Mutex<Option<String>>>,
) {
    let mut report = LoggerReport::default();
    let mut run: Option<RunInfo> = None;
    let mut params: VecDeque<(String, String)> =
        start.params.iter().map(|(k, v)| (k.chars().take(250).collect(), shorten(v))).collect();
    let mut metrics: VecDeque<Metric> = VecDeque::new();
    let mut artifacts: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    let mut finishing: Option<Finishing> = None;
    let mut backoff = Duration::ZERO;
    let mut retry_at = Instant::now();
    let mut down = false;
    let mut closed = false;
    let host = client.host().to_string();
    loop {
        let pending = run.is_none() || !params.is_empty() || !metrics.is_empty() || !artifacts.is_empty();
        let now = Instant::now();
        let mut until = if pending { retry_at } else { now + Duration::from_secs(3600) };
        if let Some(f) = &finishing {
            until = if pending { until.min(f.deadline) } else { now };
        }
        // Wait for the next value until something is due; a value never postpones a retry.
        if until > now {
            if closed {
                tokio::time::sleep(until - now).await;
            } else {
                match tokio::time::timeout(until - now, rx.recv()).await {
                    Ok(Some(message)) => {
                        take(message, &mut metrics, &mut artifacts, &mut finishing, &mut report);
                        continue;
                    }
                    Ok(None) => {
                        closed = true;
                        if finishing.is_none() {
                            // Dropped without finish (the run's thread panicked): a last short try.
                            finishing = Some(Finishing {
                                status: RunStatus::Failed,
                                deadline: Instant::now() + DROPPED_FLUSH,
                                reply: None,
                            });
                        }
                        continue;
                    }
                    Err(_) => {}
                }
            }
        }
        while let Ok(message) = rx.try_recv() {
            take(message, &mut metrics, &mut artifacts, &mut finishing, &mut report);
        }
        if pending && Instant::now() >= retry_at {
            match send_some(&client, &start, &mut run, &mut params, &mut metrics, &mut artifacts, &mut report).await {
                Ok(()) => {
                    if down {
                        tracing::info!(server = %host, "MLflow server reachable again; queued values sent");
                        down = false;
                    }
                    backoff = Duration::ZERO;
                    retry_at = Instant::now();
                    if let (Some(r), Ok(mut slot)) = (&run, run_id.lock())
                        && slot.is_none()
                    {
                        *slot = Some(r.run_id.clone());
                    }
                }
                Err(e) => {
                    report.last_error = Some(e.to_string());
                    if !down {
                        report.outages += 1;
                        tracing::warn!(error = %e, "MLflow tracking failed; training goes on, the values are kept and retried");
                        down = true;
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
                    retry_at = Instant::now() + backoff;
                }
            }
        }
        let idle = run.is_some() && params.is_empty() && metrics.is_empty() && artifacts.is_empty();
        if let Some(f) = finishing.take_if(|f| idle || Instant::now() >= f.deadline) {
            if let Some(r) = &run
                && let Err(e) = client.set_status(&r.run_id, f.status.as_str()).await
            {
                report.last_error = Some(e.to_string());
            }
            report.metrics_dropped += metrics.len();
            report.artifacts_dropped += artifacts.len();
            report.run_id = run.map(|r| r.run_id);
            if let Some(reply) = f.reply {
                let _ = reply.send(report);
            }
            return;
        }
    }
}

/// Queues one message's values (dropping the oldest metrics beyond the bound).
fn take(
    message: Message,
    metrics: &mut VecDeque<Metric>,
    artifacts: &mut VecDeque<(String, Vec<u8>)>,
    finishing: &mut Option<Finishing>,
    report: &mut LoggerReport,
) {
    match message {
        Message::Metrics(m) => {
            metrics.extend(m);
            while metrics.len() > MAX_QUEUED_METRICS {
                metrics.pop_front();
                report.metrics_dropped += 1;
            }
        }
        Message::Artifact(path, bytes) => artifacts.push_back((path, bytes)),
        Message::Finish(status, timeout, reply) => {
            *finishing = Some(Finishing { status, deadline: Instant::now() + timeout, reply: Some(reply) })
        }
    }
}

/// One round of sending: the run first, then parameters, a batch of metrics, one artefact.
async fn send_some(
    client: &Client,
    start: &RunStart,
    run: &mut Option<RunInfo>,
    params: &mut VecDeque<(String, String)>,
    metrics: &mut VecDeque<Metric>,
    artifacts: &mut VecDeque<(String, Vec<u8>)>,
    report: &mut LoggerReport,
) -> Result<(), MlflowError> {
    if run.is_none() {
        let info = match &start.resume_run_id {
            Some(id) => {
                let info = client.get_run(id).await?;
                client.set_status(id, "RUNNING").await?;
                info
            }
            None => {
                let experiment = client.experiment_id(&start.settings.experiment).await?;
                client.create_run(&experiment, &start.run_name, &start.tags).await?
            }
        };
        tracing::info!(run_id = %info.run_id, experiment_id = %info.experiment_id, "MLflow run");
        *run = Some(info);
    }
    let info = run.as_ref().expect("created above");
    if !params.is_empty() {
        let batch: Vec<_> = params.iter().take(MAX_PARAMS_PER_BATCH).cloned().collect();
        match client.log_batch(&info.run_id, &[], &batch).await {
            Ok(()) => {}
            // A resumed run already has its parameters (MLflow refuses to change them).
            Err(MlflowError::Rejected { .. }) if start.resume_run_id.is_some() => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "MLflow refused the run's parameters; dropped"),
        }
        params.drain(..batch.len());
    }
    while !metrics.is_empty() {
        let batch: Vec<_> = metrics.iter().take(MAX_METRICS_PER_BATCH).cloned().collect();
        match client.log_batch(&info.run_id, &batch, &[]).await {
            Ok(()) => report.metrics_sent += batch.len(),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "MLflow refused a batch of metrics; dropped");
                report.metrics_dropped += batch.len();
            }
        }
        metrics.drain(..batch.len());
    }
    if let Some((path, bytes)) = artifacts.front() {
        match client.upload_artifact(info, path, bytes.clone()).await {
            Ok(()) => report.artifacts_sent += 1,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "MLflow refused an artefact; dropped");
                report.artifacts_dropped += 1;
            }
        }
        artifacts.pop_front();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked_and_credentials_never_shown() {
        assert!(matches!(Client::new("ftp://x"), Err(MlflowError::BadUri(_))));
        let e = Client::new("nonsense://user:secret@").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let c = Client::new("http://user:secret@mlflow.example:5000/prefix/").unwrap();
        assert_eq!(c.host(), "mlflow.example:5000");
        assert_eq!(c.base, "http://mlflow.example:5000/prefix");
        assert!(c.authorization.as_deref().is_some_and(|a| a.starts_with("Basic ")));
        assert_eq!(shorten(&"x".repeat(7000)).chars().count(), MAX_PARAM_VALUE);
    }

    /// A server that never answers: the logger keeps the values, the caller never waits past
    /// the flush timeout, and the report says what was lost.
    #[test]
    fn an_unreachable_server_never_blocks_the_run() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let logger = RunLogger::start(
            rt.handle(),
            RunStart {
                settings: MlflowSettings { uri: format!("http://127.0.0.1:{port}"), experiment: "x".into() },
                run_name: "r".into(),
                params: vec![("lr".into(), "1e-4".into())],
                tags: Vec::new(),
                resume_run_id: None,
            },
        )
        .unwrap();
        let started = Instant::now();
        for step in 1..=100 {
            logger.log(step, &[("loss", 1.0 / step as f64)]);
        }
        assert!(started.elapsed() < Duration::from_millis(100), "logging blocked");
        let report = logger.finish(RunStatus::Finished, Duration::from_secs(2));
        assert!(started.elapsed() < Duration::from_secs(5), "finish waited {:?}", started.elapsed());
        assert_eq!(report.run_id, None);
        assert_eq!(report.metrics_dropped, 100);
        assert_eq!(report.outages, 1);
        assert!(report.last_error.unwrap().contains("unreachable"));
    }
}
