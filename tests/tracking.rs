//! Experiment tracking against the real readers and server: `brats-trainer train --tensorboard
//! --mlflow-uri …` on synthetic data and a trainer-service job with `[tracking]`, with `mlflow
//! server` (PyPI, `.deps/venv`) as the tracking server; the event files are read back with
//! TensorBoard's own reader and the run with MLflow's client (`scripts/tracking/read_back.py`),
//! and both must say what `metrics.csv` says; the registered version names the run. A server
//! that is not up when training starts gets everything once it is (retried), and the run
//! succeeds either way.

mod common;
mod trainer_harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use brats_proto::v1 as pb;
use serde_json::Value;
use trainer_harness::{Trainer, get, real_worker, start_req, watch_all};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv(tool: &str) -> PathBuf {
    root().join(".deps/venv/bin").join(tool)
}

use common::free_port;

/// `mlflow server` on loopback with a SQLite store and the artifact proxy; killed on drop.
struct MlflowServer {
    child: Child,
    uri: String,
}

impl MlflowServer {
    /// Starts the server; does not wait for it (see [`MlflowServer::wait`]).
    fn spawn(dir: &Path, port: u16) -> MlflowServer {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(venv("mlflow"))
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("mlflow server (make bootstrap installs it into .deps/venv)");
        MlflowServer { child, uri: format!("http://127.0.0.1:{port}") }
    }

    /// Waits until `/health` answers.
    fn wait(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let port: u16 = self.uri.rsplit(':').next().unwrap().parse().unwrap();
        loop {
            use std::io::{Read, Write};
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(s, "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "mlflow server did not come up");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        // The server forks workers: stop its whole process group.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
    }
}

use std::os::unix::process::CommandExt;

fn train(datalist: &Path, out: &Path, epochs: &str, mlflow_uri: &str) -> Command {
    let mut c = Command::new(common::workspace_exe("brats-trainer", "brats-trainer"));
    c.env_remove("WORLD_SIZE").env_remove("LOCAL_WORLD_SIZE").env_remove("MLFLOW_TRACKING_URI");
    c.args(["train", "--datalist"]).arg(datalist).args(["--epochs", epochs, "--val-interval", "1"]);
    c.args(["--crop", "16,16,16", "--val-roi", "16,16,16", "--devices", "cpu", "--seed", "1"]);
    c.args(["--model", r#"{"init_filters":8,"blocks_down":[1,1,1],"blocks_up":[1,1]}"#]);
    c.args(["--tensorboard", "--mlflow-uri", mlflow_uri, "--mlflow-experiment", "e2e", "--out"]).arg(out);
    c.env("OMP_NUM_THREADS", "1");
    c
}

/// The run read back by TensorBoard's and MLflow's own readers; `artifacts` holds `tensorboard/`.
fn read_back(artifacts: &Path, mlflow_uri: &str) -> Value {
    let o = Command::new(venv("python"))
        .arg(root().join("scripts/tracking/read_back.py"))
        .arg("--tensorboard")
        .arg(artifacts.join("tensorboard"))
        .args(["--mlflow-uri", mlflow_uri, "--experiment", "e2e"])
        .output()
        .unwrap();
    assert!(o.status.success(), "read_back.py: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// metrics.csv's per-epoch mean validation Dice: (epoch, value).
fn csv_mean_dice(artifacts: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(artifacts.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let epoch = header.iter().position(|h| *h == "epoch").unwrap();
    let mean = header.iter().position(|h| h.contains("mean")).expect("a mean Dice column");
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter_map(|r| Some((r[epoch].parse().ok()?, r[mean].parse().ok()?)))
        .collect()
}

/// Checks one finished run (its `artifacts` and `checkpoints` folders): TensorBoard and MLflow
/// agree with metrics.csv, the parameters are the resolved configuration, the artefacts are
/// there, the run id is kept beside the checkpoints. Returns the run id.
fn check_run(artifacts: &Path, checkpoints: &Path, got: &Value, epochs: u64) -> String {
    let tb = &got["tensorboard"];
    for tag in ["loss", "lr", "throughput", "epoch/loss", "dice/tc", "dice/wt", "dice/et", "dice/mean", "loader_wait"] {
        assert!(tb.get(tag).is_some(), "no TensorBoard scalar {tag}: {tb}");
    }
    let expected = csv_mean_dice(artifacts);
    assert_eq!(expected.len() as u64, epochs, "{expected:?}");
    let tb_dice: Vec<(u64, f64)> =
        tb["dice/mean"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect();
    assert_eq!(tb_dice.len(), expected.len(), "{tb_dice:?} against {expected:?}");
    for ((e1, a), (e2, b)) in tb_dice.iter().zip(&expected) {
        assert_eq!(e1, e2);
        assert!((a - b).abs() < 1e-4, "TensorBoard dice/mean {a} against metrics.csv {b} at epoch {e1}");
    }
    let steps = tb["loss"].as_array().unwrap().len();
    assert!(steps as u64 >= epochs, "{steps} loss points for {epochs} epochs");

    let runs = got["mlflow"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run["status"], "FINISHED", "{run}");
    assert_eq!(run["params"]["epochs"], epochs.to_string().as_str(), "{}", run["params"]);
    assert_eq!(run["params"]["model.init_filters"], "8");
    // MLflow keeps doubles, TensorBoard's simple_value is a float.
    let ml_dice = run["metrics"]["dice/mean"].as_array().unwrap();
    assert_eq!(ml_dice.len(), tb_dice.len(), "{ml_dice:?}");
    for (m, (epoch, t)) in ml_dice.iter().zip(&tb_dice) {
        assert_eq!(m[0].as_u64(), Some(*epoch));
        assert!((m[1].as_f64().unwrap() - t).abs() < 1e-6, "MLflow {m} against TensorBoard {t}");
    }
    assert_eq!(run["metrics"]["loss"].as_array().unwrap().len(), steps);
    for artifact in ["model/model.onnx", "model/best.safetensors", "model/metadata.json", "metrics.csv", "curves.png"] {
        assert!(run["artifacts"].as_array().unwrap().iter().any(|a| a == artifact), "no {artifact}: {run}");
    }
    let recorded: Value = serde_json::from_slice(&std::fs::read(checkpoints.join("mlflow-run.json")).unwrap()).unwrap();
    assert_eq!(recorded["run_id"], run["run_id"]);
    run["run_id"].as_str().unwrap().to_string()
}

#[test]
fn a_run_is_tracked_in_tensorboard_and_mlflow_as_metrics_csv_says() {
    let dir = tempfile::tempdir().unwrap();
    let datalist =
        brats_preprocess::synthetic::write_dataset(&dir.path().join("data"), [16, 16, 16], 100, 2, 1).unwrap();
    let server = MlflowServer::spawn(&dir.path().join("mlflow"), free_port());
    server.wait();
    let out = dir.path().join("run");
    let o = train(&datalist, &out, "3", &server.uri).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("MLflow"), "tracking complained with the server up:\n{err}");
    let run_id = check_run(&out, &out.join("checkpoints"), &read_back(&out, &server.uri), 3);
    eprintln!("MLflow run {run_id}");
}

/// The tracking server is down when training starts and comes up while it runs (or while the
/// run's last values wait): training never fails or waits on it, and every value arrives.
#[test]
fn a_late_tracking_server_gets_every_value_and_never_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let datalist =
        brats_preprocess::synthetic::write_dataset(&dir.path().join("data"), [16, 16, 16], 100, 2, 1).unwrap();
    let port = free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let out = dir.path().join("run");
    // The server may take longer to start on a loaded machine than the run to finish: the run's
    // end waits for it up to BRATS_MLFLOW_FLUSH_S.
    let training = train(&datalist, &out, "3", &uri)
        .env("BRATS_MLFLOW_FLUSH_S", "180")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Started after the trainer, so its first calls find nothing listening.
    std::thread::sleep(Duration::from_secs(1));
    let server = MlflowServer::spawn(&dir.path().join("mlflow"), port);
    let o = training.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("MLflow tracking failed; training goes on"), "the outage was not reported:\n{err}");
    server.wait();
    check_run(&out, &out.join("checkpoints"), &read_back(&out, &server.uri), 3);
}

/// A trainer-service job with `[tracking]`: the worker logs to MLflow and TensorBoard like the
/// offline command, and the registered model version records the MLflow run id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_job_is_tracked_and_its_registered_version_names_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = MlflowServer::spawn(&dir.path().join("mlflow"), free_port());
    let datalist = trainer_harness::dataset(&dir.path().join("data"), 1, 1);
    let store = dir.path().join("store");
    let tracking =
        format!("[tracking]\ntensorboard = true\nmlflow_uri = \"{}\"\nmlflow_experiment = \"e2e\"\n", server.uri);
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), &tracking).await;
    server.wait();
    let mut client = t.client().await;
    let mut spec = trainer_harness::spec(&datalist, 2);
    spec.registration = Some(pb::ModelRegistration { model_name: "tracked".into(), ..Default::default() });
    let job = client.start_job(start_req(spec)).await.unwrap().into_inner();
    watch_all(&mut client, &job.id, 0, 300).await;
    let done = get(&mut client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{}\n{}", done.failure_reason, t.log_text());
    let job_dir = store.join("jobs").join(&job.id);
    let got = read_back(&job_dir.join("artifacts"), &server.uri);
    let run_id = check_run(&job_dir.join("artifacts"), &job_dir.join("checkpoints"), &got, 2);
    assert_eq!(got["mlflow"][0]["run_name"], job.id.as_str(), "the run is named after the job");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(store.join("models/tracked/1/metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["mlflow_run_id"], run_id.as_str(), "{meta}");
    t.stop();
}
