//! Transport security, authentication, authorisation and audit on a real service over
//! loopback (the preprocessing service; every service runs the same shell): certificates made
//! here with rcgen, API keys hashed into a keys file, and each refusal checked for its status
//! code and its audit record.

mod common;

use brats_cli::ClientSecurity;
use brats_proto::v1 as pb;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use common::pki::{Ca, write_with_mode};
use common::secured::*;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;

/// The refusal table: every refusal gets its code, a permitted call reaches the service, and
/// each decision is an audit record in a chain `bratsctl audit verify` accepts until one
/// record is edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_get_their_codes_and_every_decision_is_audited() {
    let s = setup();
    let svc = Service::start(s.config()).await;
    let url = svc.url();

    // Health is anonymous (probes), over TLS.
    let (ok, out) = bratsctl(&[
        "--ca",
        s.ca_file.to_str().unwrap(),
        "--tls-domain",
        "localhost",
        "health",
        "--server",
        &url,
        "--service",
        "brats.v1.Preprocessor",
    ]);
    assert!(ok, "{out}");
    // Plaintext to the TLS port: no answer.
    assert_ne!(preprocess_case(&url, &ClientSecurity::default()).await, Code::InvalidArgument);
    let (ok, out) = bratsctl(&["health", "--server", &url, "--service", "brats.v1.Preprocessor"]);
    assert!(!ok, "plaintext health succeeded: {out}");

    // Credentials.
    assert_eq!(preprocess_case(&url, &s.client()).await, Code::Unauthenticated, "no credentials");
    assert_eq!(preprocess_case(&url, &s.with_key("preprocess")).await, Code::InvalidArgument, "a valid key");
    assert_eq!(preprocess_case(&url, &s.with_key("revoked")).await, Code::Unauthenticated, "revoked key");
    assert_eq!(preprocess_case(&url, &s.with_key("expired")).await, Code::Unauthenticated, "expired key");
    let forged = s.dir.path().join("forged.apikey");
    let real = std::fs::read_to_string(&s.keys["preprocess"]).unwrap();
    write_with_mode(&forged, &format!("{}x", &real[..real.len() - 1]), 0o600);
    let forged = ClientSecurity { api_key_file: Some(forged), ..s.client() };
    assert_eq!(preprocess_case(&url, &forged).await, Code::Unauthenticated, "wrong secret");

    // Roles.
    assert_eq!(preprocess_case(&url, &s.with_key("segment")).await, Code::PermissionDenied, "segment role");
    assert_eq!(preprocess_dataset(&url, &s.with_key("segment")).await, Code::PermissionDenied);

    // Service identities over mutual TLS (a TLS 1.3 client certificate failure shows on the
    // first RPC, so each is checked with one).
    let service = s.ca.issue(s.dir.path(), "inference", &[SERVICE_SAN], false);
    assert_eq!(preprocess_case(&url, &s.with_cert(&service)).await, Code::InvalidArgument, "service cert");
    let other = s.ca.issue(s.dir.path(), "other", &["other.brats.internal"], false);
    assert_eq!(preprocess_case(&url, &s.with_cert(&other)).await, Code::Unauthenticated, "wrong SAN");
    let expired = s.ca.issue(s.dir.path(), "expired", &[SERVICE_SAN], true);
    let code = preprocess_case(&url, &s.with_cert(&expired)).await;
    assert!(!matches!(code, Code::Ok | Code::InvalidArgument), "expired client cert got {code:?}");
    let foreign = Ca::new("foreign CA").issue(s.dir.path(), "foreign", &[SERVICE_SAN], false);
    let code = preprocess_case(&url, &s.with_cert(&foreign)).await;
    assert!(!matches!(code, Code::Ok | Code::InvalidArgument), "foreign-CA client cert got {code:?}");

    // A key minted by `bratsctl keys new` and appended to the keys file works without a restart.
    let minted = s.dir.path().join("minted.apikey");
    let mint = ["keys", "new", "--id", "minted", "--role", "preprocess", "--out", minted.to_str().unwrap()];
    let o = Command::new(bratsctl_exe()).args(mint).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let entry = String::from_utf8(o.stdout).unwrap();
    assert!(!entry.contains(&std::fs::read_to_string(&minted).unwrap()), "the key itself was printed");
    let keys_file = s.dir.path().join("api-keys.toml");
    let text = std::fs::read_to_string(&keys_file).unwrap() + &entry;
    write_with_mode(&keys_file, &text, 0o600);
    let with_minted = ClientSecurity { api_key_file: Some(minted.clone()), ..s.client() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while preprocess_case(&url, &with_minted).await != Code::InvalidArgument {
        assert!(Instant::now() < deadline, "the minted key was never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out) = bratsctl(&mint);
    assert!(!ok && out.contains("never overwritten"), "{out}");
    svc.stop().await.unwrap();

    // The audit trail: one record per decision, codes as answered, no secret in it.
    let records = audit_records(&s.audit);
    let codes: Vec<&str> = records.iter().map(|r| r["grpc_code"].as_str().unwrap_or("")).collect();
    for expected in ["UNAUTHENTICATED", "PERMISSION_DENIED", "OK"] {
        assert!(codes.contains(&expected), "{expected} not audited: {codes:?}");
    }
    let denied = records.iter().find(|r| r["grpc_code"] == "PERMISSION_DENIED").unwrap();
    assert_eq!(denied["principal"]["subject"], "segment");
    assert_eq!(denied["rpc"], "/brats.v1.Preprocessor/PreprocessCase");
    let text = std::fs::read_to_string(&s.audit).unwrap();
    for (name, path) in &s.keys {
        let key = std::fs::read_to_string(path).unwrap();
        let secret = key.splitn(3, '_').nth(2).unwrap();
        assert!(!text.contains(secret), "the {name} key's secret is in the audit log");
    }
    let (ok, out) = bratsctl(&["audit", "verify", s.audit.to_str().unwrap()]);
    assert!(ok, "{out}");
    let edited = s.dir.path().join("edited.jsonl");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    // Someone hides which RPC a caller reached.
    lines[1] = lines[1].replacen("\"rpc\":\"/brats.v1.", "\"rpc\":\"/brats.v2.", 1);
    assert_ne!(lines[1], text.lines().nth(1).unwrap(), "record 2 was not edited");
    std::fs::write(&edited, lines.join("\n") + "\n").unwrap();
    let (ok, out) = bratsctl(&["audit", "verify", edited.to_str().unwrap()]);
    assert!(!ok && out.contains("line 2"), "{out}");
}

/// New connections get a new certificate once the files change, without a restart; a
/// connection opened before keeps working, and requests running on it through the rotation
/// are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() {
    let s = setup();
    let svc = Service::start(s.config()).await;
    let url = svc.url();
    let old_client = s.with_key("preprocess");
    let old_channel = old_client.connect(&url).await.unwrap();
    // Load through the rotation: requests on an open connection keep being answered.
    let (stop_load, mut stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn({
        let channel = old_channel.clone();
        async move {
            let (mut answered, mut lost) = (0u32, Vec::new());
            while !*stopped.borrow_and_update() {
                let mut client = PreprocessorClient::new(channel.clone());
                match client.preprocess_case(pb::PreprocessCaseRequest::default()).await {
                    Err(s) if s.code() == Code::InvalidArgument => answered += 1,
                    other => lost.push(format!("{other:?}")),
                }
            }
            (answered, lost)
        }
    });

    // Rotate to a certificate from a new CA (as a CA migration would).
    let new_ca = Ca::new("brats rotated CA");
    let new_ca_file = new_ca.write(s.dir.path(), "new-ca.pem");
    let rotated = new_ca.issue(s.dir.path(), "rotated", &["localhost"], false);
    std::fs::copy(&rotated.cert, &s.server.cert).unwrap();
    std::fs::copy(&rotated.key, &s.server.key).unwrap();
    let new_client = ClientSecurity { ca_file: Some(new_ca_file), ..old_client.clone() };
    let deadline = Instant::now() + Duration::from_secs(15);
    while preprocess_case(&url, &new_client).await != Code::InvalidArgument {
        assert!(Instant::now() < deadline, "the rotated certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A new connection trusting only the old CA is refused; the old connection still works,
    // and no request under load was lost.
    assert_ne!(preprocess_case(&url, &old_client).await, Code::InvalidArgument);
    stop_load.send(true).unwrap();
    let (answered, lost) = load.await.unwrap();
    assert!(lost.is_empty() && answered > 10, "answered {answered}, lost {lost:?}");
    let answer = PreprocessorClient::new(old_channel).preprocess_case(pb::PreprocessCaseRequest::default()).await;
    assert_eq!(answer.unwrap_err().code(), Code::InvalidArgument, "the connection opened before rotation");
    svc.stop().await.unwrap();
    let reloads = audit_records(&s.audit).into_iter().filter(|r| r["action"] == "certificate_reloaded").count();
    assert!(reloads >= 1, "the reload was not audited");
}

/// A connection that never starts its handshake is closed at the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let s = setup();
    let svc = Service::start(s.config()).await;
    let mut tcp = tokio::net::TcpStream::connect(svc.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("still open after 10 s");
    assert_eq!(n.unwrap_or(0), 0, "the server sent data to a silent client");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed after {:?}", started.elapsed());
    svc.stop().await.unwrap();
}

/// OpenSSL's client speaks TLS 1.2 and 1.3 to the port, and is refused TLS 1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_gets_tls_1_2_and_1_3_but_not_1_1() {
    let s = setup();
    let svc = Service::start(s.config()).await;
    let connect = svc.addr.to_string();
    let s_client = |version: &str, cipher: Option<&str>| {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect", &connect, "-servername", "localhost", version, "-CAfile"]);
        c.arg(&s.ca_file).args(["-alpn", "h2"]);
        if let Some(cipher) = cipher {
            c.args(["-cipher", cipher]);
        }
        let o = c.stdin(std::process::Stdio::null()).output().expect("openssl (Debian package openssl)");
        (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr))
    };
    let (ok, out) = s_client("-tls1_3", None);
    assert!(ok && out.contains("TLSv1.3") && out.contains("Verify return code: 0 (ok)"), "{out}");
    let (ok, out) = s_client("-tls1_2", None);
    assert!(ok && out.contains("TLSv1.2"), "{out}");
    let (ok, out) = s_client("-tls1_1", Some("DEFAULT@SECLEVEL=0"));
    assert!(!ok || out.contains("Cipher is (NONE)"), "TLS 1.1 was accepted: {out}");
    svc.stop().await.unwrap();
}

/// A private key others can read is refused at start-up, naming the file and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_readable_by_others_is_refused() {
    let s = setup();
    let cfg = s.config();
    write_with_mode(&s.server.key, &std::fs::read_to_string(&s.server.key).unwrap(), 0o644);
    let e = brats_preprocessor::server::serve(cfg, std::future::pending(), None).await.unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("key_file") && text.contains("chmod 600"), "{text}");
}

/// Nothing secret or patient-identifying reaches the logs (at debug level), the audit trail
/// or the error messages of the real service binary: not an API key's secret, not a bearer
/// token, not a path with a patient's name in it, whether the call is refused or fails inside
/// the service (a missing file: NOT_FOUND; a file that is no NIfTI: a decode error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_patient_name_reaches_the_logs_or_the_audit_trail() {
    const PATIENT: &str = "DOE^JOHN-MARKER";
    const TOKEN: &str = "eyJTOKENMARKER.eyJwYXlsb2FkIn0.c2lnbmF0dXJl";
    let s = setup();
    let root = s.dir.path().join("archive");
    std::fs::create_dir_all(root.join(PATIENT)).unwrap();
    let mut cfg = s.config();
    cfg.server.listen = format!("127.0.0.1:{}", free_port());
    cfg.server.metrics_listen = String::new();
    cfg.server.tenants = [(
        "default".to_string(),
        brats_service::security::tenants::TenantConfig { allowed_prefixes: vec![file_uri(&root)] },
    )]
    .into();
    cfg.server.audit.stdout = true;
    let config = s.dir.path().join("preprocess.toml");
    std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
    let log = s.dir.path().join("preprocess.log");
    let mut child = Command::new(workspace_exe("brats-preprocessor", "brats-preprocess"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(s.dir.path().join("preprocess.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://{}", cfg.server.listen);
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.client().connect(&url).await.is_err() {
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut errors = Vec::new();
    let call = |who: ClientSecurity, images: Vec<String>| {
        let url = url.clone();
        async move {
            let channel = who.connect(&url).await.unwrap();
            let req = pb::PreprocessCaseRequest { image_uris: images, ..Default::default() };
            PreprocessorClient::new(channel).preprocess_case(req).await.unwrap_err()
        }
    };
    let inside = vec![file_uri(&root.join(PATIENT).join("t1c.nii.gz")); 4];
    let outside = vec![format!("file:///srv/{PATIENT}/t1c.nii.gz"); 4];
    let garbled = root.join(PATIENT).join(format!("{PATIENT}-t1c.nii"));
    std::fs::write(&garbled, b"the caller's bytes, not a NIfTI-1 volume").unwrap();
    errors.push(call(s.with_key("preprocess"), inside.clone()).await);
    errors.push(call(s.with_key("preprocess"), vec![file_uri(&garbled); 4]).await);
    errors.push(call(s.with_key("preprocess"), outside).await);
    errors.push(call(s.with_key("segment"), inside.clone()).await);
    let token = s.dir.path().join("token");
    write_with_mode(&token, TOKEN, 0o600);
    errors.push(call(ClientSecurity { token_file: Some(token), ..s.client() }, inside.clone()).await);
    let forged = s.dir.path().join("forged");
    let key = std::fs::read_to_string(&s.keys["preprocess"]).unwrap();
    let forged_key = format!("{}AAAA", &key[..key.len() - 4]);
    write_with_mode(&forged, &forged_key, 0o600);
    errors.push(call(ClientSecurity { api_key_file: Some(forged), ..s.client() }, inside).await);
    let codes: Vec<Code> = errors.iter().map(|e| e.code()).collect();
    assert_eq!(
        codes,
        [
            Code::NotFound,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Unauthenticated
        ]
    );
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    child.wait().unwrap();

    let secret = |k: &str| k.splitn(3, '_').nth(2).unwrap().to_string();
    let mut markers = vec![PATIENT.to_string(), "TOKENMARKER".to_string(), secret(&forged_key)];
    markers.extend(s.keys.values().map(|p| secret(&std::fs::read_to_string(p).unwrap())));
    let logs = [
        ("the log", std::fs::read_to_string(&log).unwrap()),
        ("stdout (audit sink)", std::fs::read_to_string(s.dir.path().join("preprocess.out")).unwrap()),
        ("the audit file", std::fs::read_to_string(&s.audit).unwrap()),
    ];
    assert!(logs[0].1.contains("DEBUG"), "the log was not at debug level: {}", logs[0].1);
    assert!(logs[1].1.contains("\"grpc_code\":\"PERMISSION_DENIED\""), "stdout has no audit records: {}", logs[1].1);
    for (name, text) in &logs {
        for m in &markers {
            assert!(!text.contains(m.as_str()), "{name} contains the marker {m}:\n{text}");
        }
    }
    // Errors and refusals name the field and the fix, not the caller's path or credential.
    for e in &errors[..2] {
        assert!(e.message().contains("image_uris[0]"), "the field is not named: {}", e.message());
    }
    for e in &errors {
        for m in &markers {
            assert!(!e.message().contains(m.as_str()), "{:?}: {}", e.code(), e.message());
        }
    }
}
