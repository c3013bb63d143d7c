//! `brats-gateway serve` against dcmtk, on loopback: `echoscu` from an allowed and an unknown
//! AE; `storescu` sends a study generated from a real BraTS case; the study becomes a job whose
//! SEG arrives at a dcmtk `storescp` standing in for the PACS, valid (dciodvfy) and equal to the
//! job's label map in world space (highdicom). The same study sent again is the same job and
//! sends nothing new; an aborted association starts no job; a study with a missing slice is
//! REJECTED with its code while the gateway keeps serving; below the free-space watermark
//! stores are refused with 0xA700. No planted patient marker appears in the gateway's log or
//! job records.
//!
//! Skips (printing SKIP) when no real case is found (`common::real_data_dir`).

mod common;

use common::{free_port, workspace_exe};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CROP: &str = "60:124,70:134,30:100";
const MARKERS: [&str; 2] = ["PHIMARKER", "PHIMRK"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn make_study(dir: &Path, variant: &str) -> Value {
    let case = common::real_data_dir("gateway").expect("checked by the test").join("BraTS-GLI-00001-000");
    let out = Command::new(root().join(".deps/venv/bin/python"))
        .arg(root().join("scripts/dicom/make_study.py"))
        .arg("--case")
        .arg(case)
        .arg("--out")
        .arg(dir)
        .args(["--variant", variant, "--crop", CROP])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// A running process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Gateway {
    _process: Running,
    port: u16,
    log: PathBuf,
    jobs: PathBuf,
}

fn start_gateway(dir: &Path, pacs_port: u16, min_free_mb: u64) -> Gateway {
    start_gateway_with(dir, pacs_port, min_free_mb, "")
}

/// Starts the gateway; `extra` is appended to its TOML.
fn start_gateway_with(dir: &Path, pacs_port: u16, min_free_mb: u64, extra: &str) -> Gateway {
    let port = free_port();
    let jobs = dir.join("jobs");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"spool_dir = "{spool}"
jobs_root = "file:{jobs}"
salt = "test-salt"
[dimse]
listen = "127.0.0.1:{port}"
ae_title = "BRATS"
allowed_calling_aes = ["STORESCU", "ECHOSCU", "ORTHANC"]
min_free_mb = {min_free_mb}
[study]
stable_after_s = 1.0
[model]
onnx = "{model}"
roi = [64, 64, 64]
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
{extra}
"#,
            spool = dir.join("spool").display(),
            jobs = jobs.display(),
            model = root().join("tests/fixtures/onnx/pointwise_head.onnx").display(),
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let child = Command::new(workspace_exe("brats-gateway", "brats-gateway"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug,ort=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let process = Running(child);
    wait_port(port);
    Gateway { _process: process, port, log, jobs }
}

fn dcmtk(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("run {tool}: {e} (make bootstrap installs dcmtk)"))
}

fn echo(port: u16, calling: &str, called: &str) -> bool {
    dcmtk("echoscu", &["-aet", calling, "-aec", called, "127.0.0.1", &port.to_string()]).status.success()
}

fn store(port: u16, study: &Path, extra: &[&str]) -> Output {
    let port = port.to_string();
    let dir = study.join("dicom");
    let mut args = vec!["-aet", "STORESCU", "-aec", "BRATS", "+sd", "+r"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["127.0.0.1", &port, dir.to_str().unwrap()]);
    dcmtk("storescu", &args)
}

fn jobs(dir: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<Value> = entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("job.json")).ok())
        .map(|b| serde_json::from_slice(&b).unwrap())
        .collect();
    out.sort_by_key(|j| j["id"].as_str().unwrap().to_string());
    out
}

/// Waits until `count` jobs are in a final state.
fn wait_jobs(dir: &Path, count: usize, log: &Path) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = jobs(dir);
        let finished =
            j.iter().filter(|j| ["DONE", "REJECTED", "FAILED"].contains(&j["state"].as_str().unwrap())).count();
        if finished >= count {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "{count} jobs did not finish: {j:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn gateway_receives_a_study_and_sends_a_valid_seg_back() {
    if common::real_data_dir("gateway").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The PACS stand-in.
    let pacs_port = free_port();
    let received = tmp.path().join("pacs");
    std::fs::create_dir_all(&received).unwrap();
    let _pacs = Running(
        Command::new("storescp")
            .args(["-aet", "PACS", "-od"])
            .arg(&received)
            .arg(pacs_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("storescp (make bootstrap installs dcmtk)"),
    );
    wait_port(pacs_port);
    let gw = start_gateway(tmp.path(), pacs_port, 1);

    // Echo: allowed, unknown calling AE, wrong called AE.
    assert!(echo(gw.port, "ECHOSCU", "BRATS"));
    assert!(!echo(gw.port, "INTRUDER", "BRATS"), "an unknown calling AE was accepted");
    assert!(!echo(gw.port, "ECHOSCU", "OTHER"), "a wrong called AE was accepted");

    // A study → one job → a SEG at the PACS.
    let study = tmp.path().join("plain");
    make_study(&study, "plain");
    let t = Instant::now();
    let o = store(gw.port, &study, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sent = t.elapsed();
    let j = wait_jobs(&gw.jobs, 1, &gw.log);
    println!("study sent in {:.2} s; job: {}", sent.as_secs_f64(), serde_json::to_string(&j[0]).unwrap());
    assert_eq!(j[0]["state"], "DONE", "{:?}", j[0]);
    assert_eq!(j[0]["exports"][0]["stored"], true);
    // The SEG and the quick-look Secondary Capture.
    let objects = files_under(&received);
    assert_eq!(objects.len(), 2, "{objects:?}");
    let is_seg =
        |p: &PathBuf| String::from_utf8_lossy(&std::fs::read(p).unwrap()).contains("1.2.840.10008.5.1.4.1.1.66.4");
    let seg = objects.iter().find(|p| is_seg(p)).expect("a SEG at the PACS").clone();
    let capture = objects.iter().find(|p| !is_seg(p)).unwrap().clone();
    let verify = dcmtk("dciodvfy", &["-new", capture.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&verify.stderr).to_string() + &String::from_utf8_lossy(&verify.stdout);
    assert!(!report.contains("Error"), "the quick-look Secondary Capture is not valid:\n{report}");
    let job_dir = gw.jobs.join(j[0]["id"].as_str().unwrap());
    let check = Command::new(root().join(".deps/venv/bin/python"))
        .arg(root().join("scripts/dicom/check_seg.py"))
        .arg("--seg")
        .arg(&seg)
        .arg("--label")
        .arg(job_dir.join("label.nii.gz"))
        .arg("--dciodvfy")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // The same study again: the same job, nothing new sent.
    assert!(store(gw.port, &study, &[]).status.success());
    std::thread::sleep(Duration::from_secs(3));
    let j = wait_jobs(&gw.jobs, 1, &gw.log);
    assert_eq!(j.len(), 1, "a re-sent study made a second job: {j:?}");
    assert_eq!(files_under(&received).len(), 2, "the SEG was sent twice");

    // An aborted association starts no job.
    let other = tmp.path().join("shuffled");
    make_study(&other, "shuffled");
    let _ = store(gw.port, &other, &["--abort"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(jobs(&gw.jobs).len(), 1, "instances of an aborted association made a job");

    // A study with a missing slice: REJECTED with its code; the gateway keeps serving.
    let bad = tmp.path().join("gap");
    make_study(&bad, "gap");
    assert!(store(gw.port, &bad, &[]).status.success());
    let j = wait_jobs(&gw.jobs, 2, &gw.log);
    let rejected = j.iter().find(|j| j["state"] == "REJECTED").expect("a REJECTED job");
    assert_eq!(rejected["error"][0], "gap", "{rejected:?}");
    assert!(echo(gw.port, "ECHOSCU", "BRATS"));
    assert_eq!(files_under(&received).len(), 2, "a rejected study sent something");

    // No patient data in the log or the job records.
    let mut text = std::fs::read_to_string(&gw.log).unwrap();
    for f in files_under(&gw.jobs).iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    for m in MARKERS {
        assert!(!text.contains(m), "patient data ({m}) in the gateway's log or job records");
    }
    assert!(text.contains("association released"), "the log says nothing useful:\n{text}");
}

#[test]
fn below_the_free_space_watermark_stores_are_refused_and_no_job_starts() {
    if common::real_data_dir("gateway").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A watermark no disk meets: 1 EiB free.
    let gw = start_gateway(tmp.path(), free_port(), 1 << 40);
    let study = tmp.path().join("plain");
    make_study(&study, "plain");
    let o = store(gw.port, &study, &["-v"]);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("0xa700") || text.contains("Out of Resources") || text.contains("OutOfResources"), "{text}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(jobs(&gw.jobs).is_empty());
    assert!(files_under(&tmp.path().join("spool")).is_empty(), "refused instances were kept");
    assert!(echo(gw.port, "ECHOSCU", "BRATS"), "the gateway stopped serving");
}

#[test]
fn dicom_tls_needs_a_client_certificate_from_the_configured_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new("test CA");
    let ca_file = ca.write(tmp.path(), "ca.pem");
    let server = ca.issue(tmp.path(), "gateway", &["localhost", "127.0.0.1"], false);
    let client = ca.issue(tmp.path(), "client", &["ECHOSCU"], false);
    let stranger = common::pki::Ca::new("another CA").issue(tmp.path(), "stranger", &["ECHOSCU"], false);
    let gw = start_gateway_with(
        tmp.path(),
        free_port(),
        1,
        &format!(
            "[dimse.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\nclient_auth = \"required\"\n",
            server.cert.display(),
            server.key.display(),
            ca_file.display()
        ),
    );
    let port = gw.port.to_string();
    let tls_echo = |files: Option<&common::pki::CertFiles>| {
        let mut args: Vec<String> = Vec::new();
        match files {
            Some(f) => args.extend(["+tls".into(), f.key.display().to_string(), f.cert.display().to_string()]),
            None => args.push("+tla".into()),
        }
        args.extend([
            "+cf".into(),
            ca_file.display().to_string(),
            "-aet".into(),
            "ECHOSCU".into(),
            "-aec".into(),
            "BRATS".into(),
        ]);
        args.extend(["127.0.0.1".into(), port.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dcmtk("echoscu", &args).status.success()
    };
    assert!(tls_echo(Some(&client)), "mutual TLS echo failed:\n{}", std::fs::read_to_string(&gw.log).unwrap());
    assert!(!tls_echo(None), "a TLS association without a client certificate was accepted");
    assert!(!tls_echo(Some(&stranger)), "a client certificate from another CA was accepted");
    assert!(!echo(gw.port, "ECHOSCU", "BRATS"), "plain TCP was accepted on the TLS port");
    assert!(tls_echo(Some(&client)), "the gateway stopped serving after refusals");
}

/// Orthanc (Debian) run by scripts/dicom/orthanc.py; stopped on drop.
struct Orthanc {
    dir: PathBuf,
    http_port: u16,
}

impl Orthanc {
    fn start(dir: &Path, dicom_port: u16, http_port: u16, gateway: &str) -> Orthanc {
        let out = Command::new(root().join(".deps/venv/bin/python"))
            .arg(root().join("scripts/dicom/orthanc.py"))
            .args(["start", "--dir"])
            .arg(dir)
            .args(["--http-port", &http_port.to_string(), "--dicom-port", &dicom_port.to_string()])
            .args(["--aet", "ORTHANC", "--gateway", gateway, "--stable-age", "1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "orthanc.py start: {}", String::from_utf8_lossy(&out.stderr));
        Orthanc { dir: dir.to_path_buf(), http_port }
    }

    /// GET on Orthanc's REST API (loopback, no authentication), the body as JSON.
    fn get(&self, path: &str) -> Value {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    /// SEG series of a study, found by QIDO-RS.
    fn seg_series(&self, study_uid: &str) -> usize {
        match self.get(&format!("/dicom-web/studies/{study_uid}/series?Modality=SEG")) {
            Value::Array(a) => a.len(),
            _ => 0,
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = Command::new(root().join(".deps/venv/bin/python"))
            .arg(root().join("scripts/dicom/orthanc.py"))
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

#[test]
fn orthanc_routes_a_study_to_the_gateway_and_gets_the_seg_back_without_a_loop() {
    if common::real_data_dir("gateway").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (orthanc_dicom, orthanc_http) = (free_port(), free_port());
    let gw_dir = tmp.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let gw = start_gateway_with(&gw_dir, orthanc_dicom, 1, "");
    // The gateway's destinations are Orthanc by C-STORE (AE ORTHANC) and by STOW-RS; Orthanc
    // routes stable MR studies to the gateway (BRATS).
    let stow =
        format!("[[destinations]]\nname = \"archive\"\nstow_url = \"http://127.0.0.1:{orthanc_http}/dicom-web\"\n");
    std::fs::write(
        gw_dir.join("gateway.toml"),
        std::fs::read_to_string(gw_dir.join("gateway.toml"))
            .unwrap()
            .replace("ae_title = \"PACS\"", "ae_title = \"ORTHANC\"")
            + &stow,
    )
    .unwrap();
    drop(gw);
    let gw = {
        let child = Command::new(workspace_exe("brats-gateway", "brats-gateway"))
            .args(["serve", "--config"])
            .arg(gw_dir.join("gateway.toml"))
            .env("RUST_LOG", "info,ort=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(gw_dir.join("gateway.log")).unwrap())
            .spawn()
            .unwrap();
        let text = std::fs::read_to_string(gw_dir.join("gateway.toml")).unwrap();
        let port: u16 = text.split("listen = \"127.0.0.1:").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
        wait_port(port);
        Gateway { _process: Running(child), port, log: gw_dir.join("gateway.log"), jobs: gw_dir.join("jobs") }
    };
    // Orthanc calls us as ORTHANC: allow it.
    let orthanc = Orthanc::start(
        &tmp.path().join("orthanc"),
        orthanc_dicom,
        orthanc_http,
        &format!("BRATS@127.0.0.1:{}", gw.port),
    );
    let study = tmp.path().join("plain");
    let manifest = make_study(&study, "plain");
    let study_uid = manifest["study_instance_uid"].as_str().unwrap();
    let o = dcmtk(
        "storescu",
        &[
            "-aet",
            "STORESCU",
            "-aec",
            "ORTHANC",
            "+sd",
            "+r",
            "127.0.0.1",
            &orthanc_dicom.to_string(),
            study.join("dicom").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sent = Instant::now();
    let j = wait_jobs(&gw.jobs, 1, &gw.log);
    assert_eq!(j[0]["state"], "DONE", "{:?}", j[0]);
    let exports = j[0]["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2);
    assert!(exports.iter().all(|e| e["stored"] == true), "{exports:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while orthanc.seg_series(study_uid) == 0 {
        assert!(Instant::now() < deadline, "no SEG series in Orthanc: {:?}", orthanc.get("/studies"));
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "last instance in Orthanc → SEG in Orthanc: {:.2} s (Orthanc StableAge 1 s + routing + gateway stability 1 s + job); job timings {}",
        sent.elapsed().as_secs_f64(),
        j[0]["timings"]
    );
    // The SEG re-fires Orthanc's stable-study event; the route skips a study with a SEG, and
    // the gateway would recognise the same selection anyway: still one job, one SEG series.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(jobs(&gw.jobs).len(), 1, "routing loop: {:?}", jobs(&gw.jobs));
    assert_eq!(orthanc.seg_series(study_uid), 1);
    let log = std::fs::read_to_string(orthanc.dir.join("orthanc.log")).unwrap_or_default()
        + &std::fs::read_to_string(&gw.log).unwrap();
    for m in MARKERS {
        assert!(!log.contains(m), "patient data ({m}) in a log");
    }
}
