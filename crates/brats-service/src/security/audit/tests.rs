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

#[cfg(unix)]
#[test]
fn a_missing_directory_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/audit/audit.jsonl");
    let log = AuditLog::open(&config(&path), "s", "i").unwrap();
    log.record(AuditEvent::new("config", Action::ConfigReloaded, Outcome::Succeeded, tonic::Code::Ok)).unwrap();
    assert!(path.exists());
    let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn a_path_under_a_file_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let err = AuditLog::open(&config(&dir.path().join("file/audit.jsonl")), "s", "i").unwrap_err();
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
            ..AuditConfig::default()
        }
    );
    let c: AuditConfig = toml::from_str(
        "store_uri = \"s3://audit/brats/\"\nsegment_records = 10\nflush_interval_s = 2\nmax_unflushed_records = 50\n[store]\ns3_endpoint = \"http://127.0.0.1:9000\"\n",
    )
    .unwrap();
    assert_eq!((c.store_uri.as_str(), c.segment_records, c.flush_interval_s), ("s3://audit/brats/", 10, 2));
    assert_eq!((c.max_unflushed_records, c.store.s3_endpoint.as_deref()), (50, Some("http://127.0.0.1:9000")));
    let d = AuditConfig::default();
    assert_eq!((d.segment_records, d.flush_interval_s, d.max_unflushed_records), (100, 5, 1000));
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

/// A store sink writing to `root` (a `file://` folder), with `segment_records` per segment and
/// a flush interval long enough that only full segments and explicit flushes write.
fn store_config(root: &Path, segment_records: usize, on_failure: OnFailure) -> AuditConfig {
    AuditConfig {
        store_uri: format!("file://{}", root.display()),
        segment_records,
        flush_interval_s: 3600,
        on_failure,
        ..AuditConfig::default()
    }
}

/// The folder of one service instance's segments under `root`.
fn instance_folder(root: &Path) -> PathBuf {
    root.join("brats.v1.Trainer").join("trainer-0")
}

fn segment_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_sink_writes_segments_of_one_chain_that_continue_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path(), 2, OnFailure::Deny);
    let log = AuditLog::open(&config, "brats.v1.Trainer", "trainer-0").unwrap();
    log.flush().await.unwrap();
    record_n(&log, 5, &alice());
    log.flush().await.unwrap();
    assert_eq!(log.unflushed(), 0);
    let folder = instance_folder(dir.path());
    assert_eq!(segment_names(&folder), ["000000000001.jsonl", "000000000003.jsonl", "000000000005.jsonl"]);
    let report = verify_segments(&folder).unwrap();
    assert_eq!((report.segments, report.chain.records, report.chain.last_seq), (3, 5, 5));

    // A restart under the same instance name continues the folder's chain.
    drop(log);
    let log = AuditLog::open(&config, "brats.v1.Trainer", "trainer-0").unwrap();
    log.flush().await.unwrap();
    record_n(&log, 3, &alice());
    log.flush().await.unwrap();
    let report = verify_segments(&folder).unwrap();
    assert_eq!((report.segments, report.chain.records, report.chain.last_seq), (5, 8, 8));
    assert!(folder.join("000000000006.jsonl").exists() && folder.join("000000000008.jsonl").exists());

    // An edited record and a removed segment are both found.
    let second = folder.join("000000000003.jsonl");
    let original = std::fs::read_to_string(&second).unwrap();
    std::fs::write(&second, original.replacen("\"subject\":\"alice\"", "\"subject\":\"mallory\"", 1)).unwrap();
    let err = verify_segments(&folder).unwrap_err();
    assert!(err.to_string().starts_with("000000000003.jsonl: line 1: hash mismatch"), "{err}");
    std::fs::remove_file(&second).unwrap();
    let err = verify_segments(&folder).unwrap_err();
    assert!(matches!(err, SegmentsError::Missing { named: 5, expected: 3, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_segment_is_written_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&store_config(dir.path(), 3, OnFailure::Deny), "brats.v1.Trainer", "trainer-0").unwrap();
    record_n(&log, 3, &alice());
    let segment = instance_folder(dir.path()).join("000000000001.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !segment.exists() {
        assert!(std::time::Instant::now() < deadline, "the full segment was never written");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(verify_segments(&instance_folder(dir.path())).unwrap().chain.records, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_deny_an_unwritable_store_refuses_records_and_with_log_they_wait_up_to_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    // A folder under a regular file: no segment can ever be created there, even by root.
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "").unwrap();
    let event = || AuditEvent::new("config", Action::ConfigReloaded, Outcome::Succeeded, tonic::Code::Ok);

    let deny = AuditLog::open(&store_config(&blocker, 2, OnFailure::Deny), "brats.v1.Trainer", "trainer-0").unwrap();
    let err = deny.flush().await.unwrap_err();
    assert!(matches!(err, AuditError::Store { operation: "list", .. }), "{err}");
    assert!(!err.to_string().contains("not-a-folder"), "the store URI is in the error: {err}");
    let err = deny.record(event()).unwrap_err();
    assert!(matches!(err, AuditError::StoreFailing { .. }), "{err}");
    assert_eq!(deny.unflushed(), 0, "a refused record is not held");

    let mut config = store_config(&blocker, 2, OnFailure::Log);
    config.max_unflushed_records = 3;
    let log = AuditLog::open(&config, "brats.v1.Trainer", "trainer-0").unwrap();
    assert!(log.flush().await.is_err());
    for _ in 0..3 {
        log.record(event()).unwrap();
    }
    assert!(matches!(log.record(event()), Err(AuditError::StoreBacklog { records: 3 })));
    assert_eq!(log.unflushed(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_deny_records_are_refused_once_the_backlog_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = store_config(dir.path(), 100, OnFailure::Deny);
    config.max_unflushed_records = 3;
    let log = AuditLog::open(&config, "brats.v1.Trainer", "trainer-0").unwrap();
    record_n(&log, 3, &alice());
    let event = AuditEvent::new("config", Action::ConfigReloaded, Outcome::Succeeded, tonic::Code::Ok);
    assert!(matches!(log.record(event.clone()), Err(AuditError::StoreBacklog { records: 3 })));
    log.flush().await.unwrap();
    log.record(event).unwrap();
    log.flush().await.unwrap();
    assert_eq!(verify_segments(&instance_folder(dir.path())).unwrap().chain.records, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_instance_folder_conflict_instead_of_overwriting() {
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path(), 100, OnFailure::Deny);
    let first = AuditLog::open(&config, "brats.v1.Trainer", "trainer-0").unwrap();
    let second = AuditLog::open(&config, "brats.v1.Trainer", "trainer-0").unwrap();
    first.flush().await.unwrap();
    second.flush().await.unwrap();
    record_n(&first, 2, &alice());
    record_n(&second, 1, &alice());
    first.flush().await.unwrap();
    let err = second.flush().await.unwrap_err();
    assert!(matches!(err, AuditError::StoreConflict { first_seq: 1 }), "{err}");
    assert_eq!(
        verify_segments(&instance_folder(dir.path())).unwrap().chain.records,
        2,
        "the first writer's segment kept"
    );
}

#[test]
fn a_store_sink_needs_a_runtime_and_a_valid_uri() {
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path(), 2, OnFailure::Deny);
    assert!(matches!(AuditLog::open(&config, "s", "i"), Err(AuditError::NoRuntime)));
    let bad = AuditConfig { store_uri: "ftp://host/audit".into(), ..AuditConfig::default() };
    assert!(matches!(AuditLog::open(&bad, "s", "i"), Err(AuditError::StoreUri)));
}
