//! Kubernetes: a job becomes a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1)
//! that names the shipped `ClusterTrainingRuntime` `brats-torch` (deploy/k8s/training/). The
//! runtime holds the pod template (non-root, read-only root, `/dev/shm`); the TrainJob says how
//! many nodes, the image, the command (`brats-trainer node -- worker …`), the resources and
//! the environment. Kubeflow sets `PET_NNODES`, `PET_NODE_RANK`, `PET_MASTER_ADDR`,… on each
//! node, which the node launcher reads; those names must not be set by us (Kubeflow rejects
//! them).
//!
//! Two modes: `api` applies the TrainJob through the Kubernetes API with the trainer's service
//! account (RBAC: create/get/delete on `trainjobs` in one namespace) and follows its
//! conditions; `manifests` only writes it, for teams that deploy through git, and the trainer
//! follows the job through its store alone. Credentials never enter a manifest: they come from
//! a Secret by reference.

use std::time::Duration;

use serde_json::{Value, json};

use super::{BackendKind, ClusterBackend, ClusterError, EngineStatus, Phase, SubmitRequest, node_command};
use crate::config::KubernetesConfig;

/// Kubeflow Trainer's API group and version.
pub const API_VERSION: &str = "trainer.kubeflow.org/v1alpha1";
/// Environment names Kubeflow Trainer sets itself and rejects in a TrainJob.
pub const RESERVED_ENV: &[&str] = &[
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
];
/// Longest TrainJob name: JobSet derives pod host names `<name>-node-0-<i>` that must stay
/// DNS labels (63 characters).
const MAX_NAME: usize = 40;

/// The Kubernetes backend of `[cluster.kubernetes]`.
#[derive(Debug, Clone)]
pub struct Kubernetes {
    config: KubernetesConfig,
    /// The API client with the service account's CA, built on first use and kept (its
    /// connections are reused); the token is read per request, as projected tokens rotate.
    client: std::sync::OnceLock<reqwest::Client>,
}

impl Kubernetes {
    /// The backend of a configuration.
    pub fn new(config: KubernetesConfig) -> Self {
        Kubernetes { config, client: std::sync::OnceLock::new() }
    }

    /// The TrainJob's name for a job's submission: `brats-<job id>-<attempt>`, shortened with a
    /// hash when the job id is long.
    pub fn trainjob_name(job_id: &str, outbox_uri: &str) -> String {
        let attempt = outbox_uri.trim_end_matches('/').rsplit('/').next().unwrap_or("0");
        let full = format!("brats-{job_id}-{attempt}");
        if full.len() <= MAX_NAME {
            return full;
        }
        let hash = super::job_hash(job_id);
        let keep = MAX_NAME - format!("brats--{hash:06x}-{attempt}").len().min(MAX_NAME);
        let head = job_id[..keep.min(job_id.len())].trim_end_matches('-');
        format!("brats-{head}-{:06x}-{attempt}", hash & 0xff_ffff)
    }

    /// The TrainJob as JSON (which YAML tools and `kubectl` read as it is).
    pub fn trainjob(&self, r: &SubmitRequest) -> Value {
        let c = &self.config;
        let mut env: Vec<Value> = r
            .env
            .iter()
            .filter(|(k, _)| !RESERVED_ENV.contains(&k.as_str()))
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        if !c.credentials_secret.is_empty() {
            for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                env.push(
                    json!({"name": key, "valueFrom": {"secretKeyRef": {"name": c.credentials_secret, "key": key}}}),
                );
            }
        }
        let mut resources = json!({"cpu": c.cpu_per_node, "memory": c.memory_per_node});
        if !r.cpu {
            resources["nvidia.com/gpu"] = json!(r.placement.devices_per_node.max(1).to_string());
        }
        let command = node_command("brats-trainer", r, &[]);
        json!({
            "apiVersion": API_VERSION,
            "kind": "TrainJob",
            "metadata": {
                "name": Self::trainjob_name(&r.job_id, &r.outbox_uri),
                "namespace": c.namespace,
                "labels": {
                    "app.kubernetes.io/name": "brats-trainer",
                    "app.kubernetes.io/component": "training-job",
                    "brats.io/job-id": r.job_id,
                },
            },
            "spec": {
                "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": c.runtime},
                "trainer": {
                    "image": c.image,
                    "command": command,
                    "numNodes": r.placement.nodes,
                    "resourcesPerNode": {"requests": resources.clone(), "limits": resources},
                    "env": env,
                },
            },
        })
    }

    fn api_base(&self) -> Result<String, ClusterError> {
        if !self.config.api_server.is_empty() {
            return Ok(self.config.api_server.trim_end_matches('/').to_string());
        }
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            ClusterError::Unexpected(
                "cluster.kubernetes.api_server is empty and KUBERNETES_SERVICE_HOST is unset: the trainer is not in a \
                 cluster; set api_server or mode = \"manifests\""
                    .into(),
            )
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        Ok(format!("https://{host}:{port}"))
    }

    fn trainjobs_url(&self) -> Result<String, ClusterError> {
        Ok(format!("{}/apis/{API_VERSION}/namespaces/{}/trainjobs", self.api_base()?, self.config.namespace))
    }

    /// The client with the service account's CA (when the file exists), built once.
    fn client(&self) -> Result<&reqwest::Client, ClusterError> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Ok(pem) = std::fs::read(&self.config.ca_file) {
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ClusterError::Unexpected(format!("cluster.kubernetes.ca_file {}: {e}", self.config.ca_file))
            })?;
            builder = builder.add_root_certificate(ca);
        }
        let client = builder.build().map_err(|e| ClusterError::Unexpected(format!("HTTP client: {e}")))?;
        Ok(self.client.get_or_init(|| client))
    }

    /// The service account's token, read afresh (the kubelet rotates projected tokens).
    fn token(&self) -> Option<String> {
        std::fs::read_to_string(&self.config.token_file).ok().map(|t| t.trim().to_string())
    }

    async fn request(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<&Value>,
        what: &str,
    ) -> Result<(u16, Value), ClusterError> {
        let mut req = self.client()?.request(method, &url).header("Accept", "application/json");
        if let Some(t) = self.token() {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b.to_string());
        }
        let resp =
            req.send().await.map_err(|e| ClusterError::Command { command: what.into(), message: e.to_string() })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

fn api_error(status: u16, what: &str, body: &Value) -> ClusterError {
    let message = body.get("message").and_then(Value::as_str).unwrap_or("no message").to_string();
    ClusterError::Api { status, what: what.into(), message }
}

/// Our reading of a TrainJob's status conditions (`Complete`, `Failed`, `Suspended`).
pub fn status_of(trainjob: &Value) -> EngineStatus {
    let conditions = trainjob.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
    let holds = |kind: &str| {
        conditions.iter().find(|c| c["type"] == kind && c["status"] == "True").map(|c| {
            let text = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            (text("reason"), text("message"))
        })
    };
    let status = |phase, state: &str, (reason, message): (String, String)| EngineStatus {
        phase,
        state: state.into(),
        reason: [reason, message].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(": "),
        exit_code: String::new(),
    };
    if let Some(c) = holds("Failed") {
        return status(Phase::Ended, "Failed", c);
    }
    if let Some(c) = holds("Complete") {
        return status(Phase::Succeeded, "Complete", c);
    }
    if let Some(c) = holds("Suspended") {
        return status(Phase::Pending, "Suspended", c);
    }
    status(Phase::Running, "Created", (String::new(), String::new()))
}

impl ClusterBackend for Kubernetes {
    fn kind(&self) -> BackendKind {
        BackendKind::Kubernetes
    }

    fn max_nodes(&self) -> u32 {
        self.config.max_nodes
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.config.poll_s)
    }

    fn observes(&self) -> bool {
        self.config.mode == "api"
    }

    fn render(&self, r: &SubmitRequest) -> String {
        serde_json::to_string_pretty(&self.trainjob(r)).expect("manifests serialise") + "\n"
    }

    async fn submit(&self, r: &SubmitRequest) -> Result<String, ClusterError> {
        let manifest = self.trainjob(r);
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if self.config.mode == "manifests" {
            if !self.config.manifest_dir.is_empty() {
                let path = std::path::Path::new(&self.config.manifest_dir).join(format!("{name}.json"));
                std::fs::write(&path, self.render(r)).map_err(|e| ClusterError::Command {
                    command: format!("writing {}", path.display()),
                    message: e.to_string(),
                })?;
            }
            return Ok(name);
        }
        let (status, body) = self
            .request(reqwest::Method::POST, self.trainjobs_url()?, Some(&manifest), "creating the TrainJob")
            .await?;
        match status {
            200..=299 => Ok(name),
            // Created by an earlier try of this submission (the name holds the attempt).
            409 => Ok(name),
            _ => Err(api_error(status, "creating the TrainJob", &body)),
        }
    }

    async fn status(&self, name: &str) -> Result<EngineStatus, ClusterError> {
        if self.config.mode == "manifests" {
            return Ok(EngineStatus {
                phase: Phase::Running,
                state: "Unobserved".into(),
                reason: "mode = \"manifests\": the trainer follows the job through its store".into(),
                exit_code: String::new(),
            });
        }
        let url = format!("{}/{name}", self.trainjobs_url()?);
        let (status, body) = self.request(reqwest::Method::GET, url, None, "reading the TrainJob").await?;
        match status {
            200..=299 => Ok(status_of(&body)),
            404 => Ok(EngineStatus {
                phase: Phase::Ended,
                state: "Deleted".into(),
                reason: "the TrainJob no longer exists".into(),
                exit_code: String::new(),
            }),
            _ => Err(api_error(status, "reading the TrainJob", &body)),
        }
    }

    async fn cancel(&self, name: &str) -> Result<(), ClusterError> {
        if self.config.mode == "manifests" {
            return Err(ClusterError::Unexpected(format!(
                "mode = \"manifests\": delete TrainJob {name} through your deployment pipeline"
            )));
        }
        // Foreground deletion: pods get SIGTERM and their grace period, and the workers
        // checkpoint at a step boundary.
        let url = format!("{}/{name}?propagationPolicy=Foreground", self.trainjobs_url()?);
        let (status, body) = self.request(reqwest::Method::DELETE, url, None, "deleting the TrainJob").await?;
        match status {
            200..=299 | 404 => Ok(()),
            _ => Err(api_error(status, "deleting the TrainJob", &body)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_dns_labels() {
        assert_eq!(
            Kubernetes::trainjob_name("job-20261203-abcdef", "s3://b/jobs/job-20261203-abcdef/cluster/1/"),
            "brats-job-20261203-abcdef-1"
        );
        let long = "a".repeat(63);
        let name = Kubernetes::trainjob_name(&long, "file:///x/cluster/12/");
        assert!(name.len() <= MAX_NAME && name.ends_with("-12") && name.starts_with("brats-aaa"), "{name}");
    }

    #[test]
    fn conditions_map_to_phases() {
        let with = |kind: &str| json!({"status": {"conditions": [{"type": kind, "status": "True", "reason": "R", "message": "m"}]}});
        assert_eq!(status_of(&with("Failed")).phase, Phase::Ended);
        assert_eq!(status_of(&with("Failed")).reason, "R: m");
        assert_eq!(status_of(&with("Complete")).phase, Phase::Succeeded);
        assert_eq!(status_of(&with("Suspended")).phase, Phase::Pending);
        assert_eq!(status_of(&json!({})).phase, Phase::Running);
    }

    /// A locally served stand-in for the API server's TrainJob endpoints (no cluster runs
    /// here): it records every request, stores what is POSTed, answers GET with the stored
    /// object plus the conditions the test sets, and DELETE with 200.
    /// One request the local API received: method, path, Authorization header, body.
    type Recorded = (String, String, String, String);

    struct LocalApi {
        url: String,
        requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
        conditions: std::sync::Arc<std::sync::Mutex<Value>>,
    }

    async fn local_api() -> LocalApi {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let conditions = std::sync::Arc::new(std::sync::Mutex::new(json!([])));
        let (log, conds) = (requests.clone(), conditions.clone());
        tokio::spawn(async move {
            let stored = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let (log, conds, stored) = (log.clone(), conds.clone(), stored.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(head_end) = text.find("\r\n\r\n") else { continue };
                        let head = &text[..head_end];
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() < head_end + 4 + length {
                            continue;
                        }
                        let body = text[head_end + 4..head_end + 4 + length].to_string();
                        let mut first = head.lines().next().unwrap_or("").split_whitespace();
                        let (method, path) =
                            (first.next().unwrap_or("").to_string(), first.next().unwrap_or("").to_string());
                        let auth = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("authorization: ").or_else(|| l.strip_prefix("Authorization: "))
                            })
                            .unwrap_or("")
                            .to_string();
                        log.lock().unwrap().push((method.clone(), path, auth, body.clone()));
                        let (status, answer) = match method.as_str() {
                            "POST" => {
                                *stored.lock().unwrap() = serde_json::from_str(&body).unwrap_or(Value::Null);
                                ("201 Created", stored.lock().unwrap().clone())
                            }
                            "GET" => {
                                let mut o = stored.lock().unwrap().clone();
                                o["status"] = json!({"conditions": conds.lock().unwrap().clone()});
                                ("200 OK", o)
                            }
                            _ => ("200 OK", json!({"kind": "Status", "status": "Success"})),
                        };
                        let answer = answer.to_string();
                        let reply = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                            answer.len()
                        );
                        let _ = sock.write_all(reply.as_bytes()).await;
                        return;
                    }
                });
            }
        });
        LocalApi { url, requests, conditions }
    }

    #[tokio::test]
    async fn the_api_mode_creates_follows_and_deletes_the_trainjob() {
        let api = local_api().await;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "test-token\n").unwrap();
        let k = Kubernetes::new(KubernetesConfig {
            api_server: api.url.clone(),
            token_file: token.display().to_string(),
            ca_file: dir.path().join("absent-ca.crt").display().to_string(),
            ..Default::default()
        });
        let request = SubmitRequest {
            job_id: "job-1".into(),
            job_uri: "s3://b/jobs/job-1/".into(),
            manifest_uri: "s3://b/datasets/d/manifest.json".into(),
            outbox_uri: "s3://b/jobs/job-1/cluster/0/".into(),
            placement: super::super::Placement { backend: BackendKind::Kubernetes, nodes: 2, devices_per_node: 4 },
            cpu: false,
            env: vec![
                ("BRATS_WORKER_OUTBOX".into(), "s3://b/jobs/job-1/cluster/0/".into()),
                ("RANK".into(), "9".into()),
            ],
            secret_env: vec![("BRATS_TRAINER_STORE".into(), "{\"s3_secret_access_key\":\"x\"}".into())],
        };
        let name = k.submit(&request).await.unwrap();
        assert_eq!(name, "brats-job-1-0");
        assert_eq!(k.status(&name).await.unwrap().phase, Phase::Running);
        *api.conditions.lock().unwrap() =
            json!([{"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "node-1 exited 1"}]);
        let failed = k.status(&name).await.unwrap();
        assert_eq!((failed.phase, failed.reason.as_str()), (Phase::Ended, "JobSetFailed: node-1 exited 1"));
        k.cancel(&name).await.unwrap();
        let requests = api.requests.lock().unwrap().clone();
        let calls: Vec<(&str, &str)> = requests.iter().map(|(m, p, _, _)| (m.as_str(), p.as_str())).collect();
        let base = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/brats/trainjobs";
        assert_eq!(
            calls,
            [
                ("POST", base.to_string()),
                ("GET", format!("{base}/brats-job-1-0")),
                ("GET", format!("{base}/brats-job-1-0")),
                ("DELETE", format!("{base}/brats-job-1-0?propagationPolicy=Foreground")),
            ]
            .iter()
            .map(|(m, p)| (*m, p.as_str()))
            .collect::<Vec<_>>()
        );
        assert!(requests.iter().all(|r| r.2 == "Bearer test-token"), "every call carries the service account token");
        let posted: Value = serde_json::from_str(&requests[0].3).unwrap();
        assert_eq!(posted["spec"]["trainer"]["numNodes"], 2);
        assert_eq!(posted["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"], "4");
        let env = posted["spec"]["trainer"]["env"].to_string();
        assert!(
            !env.contains("RANK") && !env.contains("s3_secret_access_key"),
            "reserved names and secrets stay out: {env}"
        );
    }
}
