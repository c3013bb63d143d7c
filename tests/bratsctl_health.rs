//! `bratsctl health` (the real binary) against real servers on loopback: by default it checks
//! whatever the server serves, so the same command is every container's healthcheck; with
//! `--service` it checks that one and says when the server does not serve it. The servers run
//! secured, so bratsctl connects as a user would: `--ca`, `--tls-domain` and `--api-key-file`.

mod common;

use brats_cli::ClientSecurity;
use brats_inference::config::InferenceConfig;
use brats_model::SegResNetConfig;
use brats_model::onnx::{ExportOptions, to_onnx_bytes};
use brats_model::reference::det_state_dict;
use brats_preprocessor::config::ServiceConfig;
use common::secured::bratsctl_flags;
use common::*;
use std::time::{Duration, Instant};

/// Runs `bratsctl SECURITY health --server URL ARGS…`: (success, stdout, stderr).
async fn health(security: &ClientSecurity, url: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bratsctl_exe())
        .args(bratsctl_flags(security))
        .args(["health", "--server", url])
        .args(args)
        .output()
        .await
        .expect("run bratsctl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_what_the_preprocessing_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(ServiceConfig { output_root: file_uri(dir.path()), ..ServiceConfig::default() }).await;
    let (url, admin) = (svc.url(), svc.admin());

    let (ok, out, err) = health(&admin, &url, &[]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains(&format!("{url} brats.v1.Preprocessor: SERVING")), "{out}");
    assert!(!out.contains("Trainer") && !out.contains("Inference"), "only what it serves: {out}");

    let (ok, out, err) = health(&admin, &url, &["--service", "brats.v1.Preprocessor"]).await;
    assert!(ok && out.trim_end() == format!("{url} brats.v1.Preprocessor: SERVING"), "{out}\n{err}");

    let (ok, out, err) = health(&admin, &url, &["--service", "brats.v1.Trainer"]).await;
    assert!(!ok, "{out}\n{err}");
    assert!(out.contains("brats.v1.Trainer: NOT_FOUND (not served here)"), "{out}");
    assert!(err.contains(&format!("error: not healthy: brats.v1.Trainer is not served at {url}")), "{err}");
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_what_the_inference_server_serves() {
    let server = InferenceServer::start(|_| {}).await;
    let defaults = InferenceConfig::default();
    let (model, alias) = (defaults.model, defaults.alias);
    let (url, admin) = (server.url(), server.security.admin());

    // No model yet: up, but not SERVING, and the healthcheck says so.
    let (ok, out, err) = health(&admin, &url, &[]).await;
    assert!(!ok, "{out}\n{err}");
    assert!(out.contains("brats.v1.Inference: NOT_SERVING"), "{out}");

    let small =
        SegResNetConfig { init_filters: 8, blocks_down: vec![1, 1, 1], blocks_up: vec![1, 1], ..Default::default() };
    let onnx = to_onnx_bytes(&small, &det_state_dict(&small), ExportOptions::default()).unwrap();
    server.registry.register(&model, "1", onnx.into(), None, Some(&alias)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (out, err) = loop {
        let (ok, out, err) = health(&admin, &url, &[]).await;
        if ok {
            break (out, err);
        }
        assert!(Instant::now() < deadline, "never healthy: {out}\n{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(out.contains(&format!("{url} brats.v1.Inference: SERVING")), "{out}");
    assert!(!out.contains("Preprocessor"), "{out}\n{err}");
    let (ok, out, err) = health(&admin, &url, &["--service", "brats.v1.Inference"]).await;
    assert!(ok, "{out}\n{err}");

    server.stop().await;
}
