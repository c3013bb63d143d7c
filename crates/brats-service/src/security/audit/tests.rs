//! The audit log against real files: chains that verify, edits, removals and reorderings that
//! do not, reopening, concurrent writers, and failing sinks.
use super::*;
use std::collections::BTreeSet;

fn config(file: &Path) -> AuditConfig {
    AuditConfig { file: file.to_str().unwrap().into(), ..AuditConfig::default() }
}

fn alice() -> Principal {
    Principal {
        subject: "alice".into(),
        issuer: "api-keys".into(),
        method: AuthMethod::ApiKey,
        key_id: "k1".into(),
        tenant: "hospital-a".into(),
        roles: BTreeSet::from(["train".to_string(), "viewer".to_string()]),
    }
}

fn record_n(log: &AuditLog, n: usize, principal: &Principal) {
    for i in 0..n {
        let id = format!("job-{i}");
        let mut event = AuditEvent::new(
            "/brats.v1.Trainer/StartJob",
            Action::Authorize,
            if i % 2 == 0 { Outcome::Allowed } else { Outcome::Denied },
            if i % 2 == 0 { tonic::Code::Ok } else { tonic::Code::PermissionDenied },
        );
        event.reason = if i % 2 == 0 { "role train" } else { "missing role train" };
        event.principal = Some(principal);
        event.source_ip = Some("10.1.2.3".parse().unwrap());
        event.resource = Some(Resource { kind: "job", id: &id });
        event.latency_ms = Some(3);
        log.record(event).unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn five(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&config(&path), "trainer", "trainer-0").unwrap();
    record_n(&log, 5, &alice());
    path
}

#[test]
fn a_chain_of_five_records_verifies_and_has_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    assert_eq!(verify_file(&path).unwrap(), VerifyReport { records: 5, first_seq: 1, last_seq: 5 });
    let lines = lines(&path);
    let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    // serde_json's map is sorted; the line itself keeps the documented order.
    assert_eq!(keys.len(), 16);
    assert!(lines[1].starts_with(r#"{"ts":""#) && lines[1].contains(r#""prev_hash":""#));
    assert_eq!(v["seq"], 2);
    assert_eq!(v["service"], "trainer");
    assert_eq!(v["instance"], "trainer-0");
    assert_eq!(v["action"], "authorize");
    assert_eq!(v["outcome"], "denied");
    assert_eq!(v["grpc_code"], "PERMISSION_DENIED");
    assert_eq!(v["principal"]["method"], "api_key");
    assert_eq!(v["principal"]["roles"], serde_json::json!(["train", "viewer"]));
    assert_eq!(v["source_ip"], "10.1.2.3");
    assert_eq!(v["resource"], serde_json::json!({"type": "job", "id": "job-1"}));
    assert_eq!(v["latency_ms"], 3);
    let ts = v["ts"].as_str().unwrap();
    assert_eq!((ts.len(), &ts[10..11], &ts[19..20], &ts[23..]), (24, "T", ".", "Z"), "{ts}");
    let id = v["event_id"].as_str().unwrap();
    assert_eq!(id.len(), 26);
    let ids: BTreeSet<String> =
        lines.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event_id"].to_string()).collect();
    assert_eq!(ids.len(), 5, "event ids are unique");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["prev_hash"], brats_cli::audit_chain::GENESIS_HASH);
}

#[test]
fn an_edited_field_of_record_3_fails_naming_line_3() {
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    let mut lines = lines(&path);
    assert!(lines[2].contains(r#""subject":"alice""#));
    lines[2] = lines[2].replace(r#""subject":"alice""#, r#""subject":"mallory""#);
    write_lines(&path, &lines);
    let err = verify_file(&path).unwrap_err();
    assert_eq!(err.line(), Some(3), "{err}");
    assert!(matches!(err.problem(), Some(Problem::HashMismatch { .. })), "{err}");
    assert!(err.to_string().starts_with("line 3: hash mismatch"), "{err}");
}

#[test]
fn a_deleted_line_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    let mut lines = lines(&path);
    lines.remove(2);
    write_lines(&path, &lines);
    let err = verify_file(&path).unwrap_err();
    assert_eq!((err.line(), err.problem()), (Some(3), Some(&Problem::Sequence { found: 4, expected: 3 })));
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn swapped_lines_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    let mut lines = lines(&path);
    lines.swap(1, 3);
    write_lines(&path, &lines);
    let err = verify_file(&path).unwrap_err();
    assert_eq!(err.line(), Some(2), "{err}");
    assert!(matches!(err.problem(), Some(Problem::Sequence { found: 4, expected: 2 })), "{err}");
}

#[test]
fn a_truncated_last_line_fails_verify_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 30]).unwrap();
    let err = verify_file(&path).unwrap_err();
    assert_eq!((err.line(), err.problem()), (Some(5), Some(&Problem::Truncated)));
    let err = AuditLog::open(&config(&path), "trainer", "trainer-0").unwrap_err();
    assert!(matches!(err, AuditError::Chain { problem: Problem::Truncated, .. }), "{err}");

    std::fs::write(&path, format!("{}garbage\n", &text)).unwrap();
    let err = AuditLog::open(&config(&path), "trainer", "trainer-0").unwrap_err();
    assert!(matches!(err, AuditError::Chain { problem: Problem::Garbled(_), .. }), "{err}");
}

#[test]
fn reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    let log = AuditLog::open(&config(&path), "trainer", "trainer-1").unwrap();
    record_n(&log, 3, &alice());
    drop(log);
    assert_eq!(verify_file(&path).unwrap(), VerifyReport { records: 8, first_seq: 1, last_seq: 8 });
    // An empty existing file starts a fresh chain.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    record_n(&AuditLog::open(&config(&empty), "trainer", "t").unwrap(), 1, &alice());
    assert_eq!(verify_file(&empty).unwrap(), VerifyReport { records: 1, first_seq: 1, last_seq: 1 });
}

#[test]
fn the_last_line_is_found_across_read_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    let log = AuditLog::open(&config(&path), "trainer", "trainer-0").unwrap();
    let long = "r".repeat(5000); // each record about 5.5 KB: the tail spans 8 KiB chunks
    for _ in 0..4 {
        let mut event = AuditEvent::new("config", Action::ConfigReloaded, Outcome::Succeeded, tonic::Code::Ok);
        event.reason = &long;
        log.record(event).unwrap();
    }
    drop(log);
    let log = AuditLog::open(&config(&path), "trainer", "trainer-0").unwrap();
    record_n(&log, 1, &alice());
    assert_eq!(verify_file(&path).unwrap().records, 5);
}

#[test]
fn concurrent_records_from_8_threads_all_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&config(&path), "inference", "inference-0").unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let log = log.clone();
            s.spawn(move || {
                let mut p = alice();
                p.subject = format!("user-{t}");
                record_n(&log, 50, &p);
            });
        }
    });
    assert_eq!(verify_file(&path).unwrap(), VerifyReport { records: 400, first_seq: 1, last_seq: 400 });
}

#[cfg(unix)]
#[test]
fn a_created_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = five(&dir);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[cfg(unix)]
#[test]
fn keyed_hash_is_stable_for_a_key_and_differs_between_keys() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key_file = |name: &str, key: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, key).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        AuditConfig { hmac_key_file: p.to_str().unwrap().into(), ..AuditConfig::default() }
    };
    let a = key_file("a", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n");
    let b = key_file("b", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n");
    let uri = "s3://bucket/DOE^JOHN/t1.nii.gz";
    let a1 = AuditLog::open(&a, "s", "i").unwrap();
    let a2 = AuditLog::open(&a, "s", "j").unwrap();
    let b1 = AuditLog::open(&b, "s", "i").unwrap();
    let h = a1.keyed_hash(uri);
    assert!(h.starts_with("hmac-sha256:") && h.len() == 12 + 64, "{h}");
    assert!(!h.contains("DOE"));
    assert_eq!(h, a1.keyed_hash(uri));
    assert_eq!(h, a2.keyed_hash(uri), "same key file, same hash");
    assert_ne!(h, b1.keyed_hash(uri));
    assert_ne!(h, a1.keyed_hash("s3://bucket/other"));
    // Random per-process keys differ from each other.
    let r1 = AuditLog::open(&AuditConfig::default(), "s", "i").unwrap();
    let r2 = AuditLog::disabled();
    assert_eq!(r1.keyed_hash(uri), r1.keyed_hash(uri));
    assert_ne!(r1.keyed_hash(uri), r2.keyed_hash(uri));
    assert_ne!(r1.keyed_hash(uri), h);
    // Keys readable by others, or too short, are refused; the error shows no key bytes.
    let open = key_file("open", &"k".repeat(40));
    std::fs::set_permissions(&open.hmac_key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = AuditLog::open(&open, "s", "i").unwrap_err().to_string();
    assert!(err.contains("chmod 600") && !err.contains("kkkk"), "{err}");
    let short = key_file("short", "tooshort\n");
    assert!(matches!(AuditLog::open(&short, "s", "i"), Err(AuditError::Key { .. })));
}

#[test]
fn a_file_in_a_missing_directory_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let err = AuditLog::open(&config(&dir.path().join("no/such/dir/audit.jsonl")), "s", "i").unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err}");
}

#[cfg(unix)]
#[test]
fn a_file_in_a_read_only_directory_fails_to_open() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    // Root ignores permission bits: nothing to show there.
    if std::fs::write(ro.join("probe"), "").is_ok() {
        return;
    }
    let err = AuditLog::open(&config(&ro.join("audit.jsonl")), "s", "i").unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_failed_write_is_an_error_from_record() {
    // /dev/full opens, and every write to it fails (ENOSPC): a full disk.
    let log = AuditLog::open(&config(Path::new("/dev/full")), "s", "i").unwrap();
    assert!(log.fail_closed());
    let err = log.record(AuditEvent::new("config", Action::ConfigReloaded, Outcome::Succeeded, tonic::Code::Ok));
    assert!(matches!(err, Err(AuditError::Write { .. })), "{err:?}");
}

#[test]
fn a_disabled_log_records_nothing_and_never_fails() {
    let log = AuditLog::disabled();
    assert!(!log.fail_closed());
    log.record(AuditEvent::new("config", Action::ConfigReloaded, Outcome::Failed, tonic::Code::Internal)).unwrap();
    assert!(format!("{log:?}").contains("<redacted>"));
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<AuditLog>();
}

#[test]
fn the_config_section_parses() {
    let c: AuditConfig =
        toml::from_str("stdout = true\nfile = \"/var/log/brats/audit.jsonl\"\non_failure = \"log\"\n").unwrap();
    assert_eq!(
        c,
        AuditConfig {
            stdout: true,
            file: "/var/log/brats/audit.jsonl".into(),
            on_failure: OnFailure::Log,
            hmac_key_file: String::new()
        }
    );
    assert_eq!(toml::from_str::<AuditConfig>("").unwrap().on_failure, OnFailure::Deny);
    assert!(toml::from_str::<AuditConfig>("on_failure = \"ignore\"").is_err());
    assert!(toml::from_str::<AuditConfig>("sink = \"s3\"").is_err());
}

#[test]
fn method_names_are_serdes() {
    for m in [AuthMethod::Anonymous, AuthMethod::ApiKey, AuthMethod::Jwt, AuthMethod::MutualTls] {
        assert_eq!(serde_json::to_value(m).unwrap(), method_name(m));
    }
}

#[test]
fn times_and_ids_are_formatted() {
    assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_millis(1_772_368_496_789), "2026-03-01T12:34:56.789Z");
    assert_eq!(ulid(0, 0), "00000000000000000000000000");
    assert_eq!(ulid(u64::MAX, u128::MAX), "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
    assert!(ulid(1, 0) < ulid(2, 0));
}
