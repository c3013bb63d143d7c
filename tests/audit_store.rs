//! The audit log in an object store and `/metrics` over HTTPS, on a real secured service over
//! loopback (the preprocessing service; every service runs the same shell): a real moto S3
//! server holds the audit segments, which are read back and verified; an edited or removed
//! segment is found; a store that goes away makes `on_failure = "deny"` answer UNAVAILABLE;
//! `openssl s_client` scrapes `/metrics` with and without a client certificate.

mod common;

use brats_core::{StoreUri, Stores};
use brats_service::security::audit::{AuditConfig, OnFailure};
use brats_service::security::tls::MetricsTlsConfig;
use common::secured::*;
use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

const BUCKET: &str = "audit";
const PREFIX: &str = "s3://audit/brats";

/// The audit section of `setup`'s service, writing to moto every `segment_records` records
/// or `flush_interval_s` seconds.
fn audit_to(moto: &Moto, setup: &Setup, segment_records: usize, flush_interval_s: u64) -> AuditConfig {
    AuditConfig {
        file: setup.audit.display().to_string(),
        store_uri: PREFIX.into(),
        store: moto.store_config(),
        segment_records,
        flush_interval_s,
        on_failure: OnFailure::Deny,
        ..AuditConfig::default()
    }
}

/// Copies every object under [`PREFIX`] into `dir`, keeping the paths below the prefix (as
/// `aws s3 sync` would).
async fn download(moto: &Moto, dir: &Path) {
    let stores = Stores::new(moto.store_config());
    let root = StoreUri::parse(PREFIX).unwrap();
    let StoreUri::S3 { key: root_key, .. } = &root else { unreachable!() };
    for object in stores.list(&root).await.unwrap() {
        let StoreUri::S3 { key, .. } = &object else { unreachable!() };
        let local = dir.join(key.strip_prefix(&format!("{root_key}/")).unwrap());
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, stores.get(&object).await.unwrap()).unwrap();
    }
}

/// The one folder of segments under `dir` (one service process).
fn instance_folder(dir: &Path) -> std::path::PathBuf {
    let folders = brats_cli::audit_chain::segment_folders(dir).unwrap();
    assert_eq!(folders.len(), 1, "{folders:?}");
    folders.into_iter().next().unwrap()
}

/// A secured service writes its decisions to S3 as segments; read back they verify as one
/// chain with the codes answered; an edited and a removed segment are each found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_segments_in_s3_verify_and_an_edited_or_removed_segment_is_found() {
    let moto = Moto::start(BUCKET).await;
    let s = setup();
    let mut cfg = s.config();
    // Full segments only while serving (no timer flush within the test), the rest at stop.
    cfg.server.audit = audit_to(&moto, &s, 2, 3600);
    let svc = Service::start(cfg).await;
    let url = svc.url();
    assert_eq!(preprocess_case(&url, &s.client()).await, Code::Unauthenticated);
    assert_eq!(preprocess_case(&url, &s.with_key("segment")).await, Code::PermissionDenied);
    for _ in 0..3 {
        assert_eq!(preprocess_case(&url, &s.with_key("preprocess")).await, Code::InvalidArgument);
    }
    svc.stop().await.unwrap();

    // 2 refusals, then 3 × (allowed + refused by the service): 8 records, 4 segments, all
    // written by the stop at the latest.
    let copy = tempfile::tempdir().unwrap();
    download(&moto, copy.path()).await;
    let folder = instance_folder(copy.path());
    assert!(folder.starts_with(copy.path().join("brats.v1.Preprocessor")), "{}", folder.display());
    let report = brats_service::security::audit::verify_segments(&folder).unwrap();
    assert_eq!((report.segments, report.chain.records), (4, 8), "{report:?}");
    let mut codes = Vec::new();
    for entry in std::fs::read_dir(&folder).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            codes.push(record["grpc_code"].as_str().unwrap().to_string());
        }
    }
    for expected in ["UNAUTHENTICATED", "PERMISSION_DENIED", "OK", "INVALID_ARGUMENT"] {
        assert!(codes.iter().any(|c| c == expected), "{expected} not in the store: {codes:?}");
    }
    let (ok, out) = bratsctl(&["audit", "verify", &format!("file://{}", copy.path().display())]);
    assert!(ok && out.contains("OK, 8 records (seq 1..8) in 4 segments"), "{out}");

    // Someone with write access to the bucket rewrites segment 3 (records 3 and 4), then
    // removes it: each shows in the copy read back.
    let stores = Stores::new(moto.store_config());
    let segment_3 = StoreUri::parse(PREFIX)
        .unwrap()
        .join(&folder.strip_prefix(copy.path()).unwrap().join("000000000003.jsonl").display().to_string());
    let original = String::from_utf8(stores.get(&segment_3).await.unwrap().to_vec()).unwrap();
    let edited = original.replacen("\"grpc_code\":\"OK\"", "\"grpc_code\":\"PERMISSION_DENIED\"", 1);
    assert_ne!(edited, original, "segment 3 holds no allowed call");
    stores.put(&segment_3, edited.into_bytes().into()).await.unwrap();
    let tampered = tempfile::tempdir().unwrap();
    download(&moto, tampered.path()).await;
    let (ok, out) = bratsctl(&["audit", "verify", tampered.path().to_str().unwrap()]);
    assert!(!ok && out.contains("000000000003.jsonl: line") && out.contains("hash mismatch"), "{out}");

    stores.delete(&segment_3).await.unwrap();
    let cut = tempfile::tempdir().unwrap();
    download(&moto, cut.path()).await;
    let (ok, out) = bratsctl(&["audit", "verify", cut.path().to_str().unwrap()]);
    assert!(!ok && out.contains("000000000005.jsonl: segments are missing"), "{out}");
}

/// With `on_failure = "deny"`, once the audit store stops taking segments the service answers
/// UNAVAILABLE instead of serving unaudited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_store_with_deny_answers_unavailable() {
    let moto = Moto::start(BUCKET).await;
    let s = setup();
    let mut cfg = s.config();
    cfg.server.audit = audit_to(&moto, &s, 1, 1);
    let svc = Service::start(cfg).await;
    let url = svc.url();
    let key = s.with_key("preprocess");
    assert_eq!(preprocess_case(&url, &key).await, Code::InvalidArgument);
    drop(moto);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match preprocess_case(&url, &key).await {
            Code::Unavailable => break,
            Code::InvalidArgument => {}
            other => panic!("{other:?} while the audit store is down"),
        }
        assert!(Instant::now() < deadline, "requests were still served 30 s after the audit store stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(preprocess_case(&url, &key).await, Code::Unavailable, "refused while the store stays down");
    svc.stop().await.unwrap();
}

/// `openssl s_client` sending one `GET /metrics` to `port`, with `cert` when given; its output.
fn scrape(s: &Setup, port: u16, cert: Option<&common::pki::CertFiles>) -> String {
    let mut c = Command::new("timeout");
    c.args(["20", "openssl", "s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"]);
    c.arg("-CAfile").arg(&s.ca_file).arg("-quiet");
    if let Some(cert) = cert {
        c.arg("-cert").arg(&cert.cert).arg("-key").arg(&cert.key);
    }
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("openssl");
    let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let _ = child.stdin.take().unwrap().write_all(request.as_bytes());
    let o = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// `/metrics` over HTTPS: plaintext refused, no client certificate refused, a certificate
/// from the client CA gets the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_https_to_scrapers_with_a_client_certificate() {
    let s = setup();
    let mut cfg = s.config();
    cfg.server.metrics_tls = MetricsTlsConfig { enabled: true, require_client_cert: true };
    let svc = Service::start(cfg).await;
    assert_eq!(preprocess_case(&svc.url(), &s.with_key("preprocess")).await, Code::InvalidArgument);
    let port = svc.metrics_port;

    let plaintext = http("GET", port, "/metrics").await;
    assert!(!matches!(plaintext, Ok((200, _))), "plaintext /metrics answered: {plaintext:?}");
    let scraper = s.ca.issue(s.dir.path(), "scraper", &["prometheus.brats.internal"], false);
    let out = scrape(&s, port, Some(&scraper));
    assert!(out.contains("HTTP/1.1 200 OK") && out.contains("brats_preprocess_cases_in_flight"), "{out}");
    let out = scrape(&s, port, None);
    assert!(!out.contains("200 OK") && !out.contains("brats_preprocess"), "served without a certificate: {out}");
    svc.stop().await.unwrap();
}
