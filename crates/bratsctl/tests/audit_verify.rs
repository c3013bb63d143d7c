//! `bratsctl audit verify` on a chain written with the audit record format: an intact log
//! verifies; a copy with one field edited fails, naming the line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use brats_cli::audit_chain::{Action, AuditRecord, ChainHead, Outcome, RecordPrincipal, RecordResource};

/// A fresh directory for this test under Cargo's temporary directory for integration tests.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("audit_verify-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` sealed records as the log's text.
fn chain(n: u64) -> String {
    let mut head = ChainHead::genesis();
    let mut text = String::new();
    for i in 0..n {
        let sealed = head.seal(AuditRecord {
            ts: format!("2026-03-01T12:00:{:02}.000Z", i % 60),
            event_id: format!("01JNQX00000000000000000{i:03}"),
            seq: 0,
            service: "trainer".into(),
            instance: "trainer-0".into(),
            rpc: "/brats.v1.Trainer/StartJob".into(),
            action: Action::Authorize,
            outcome: Outcome::Allowed,
            grpc_code: "OK".into(),
            reason: "role train".into(),
            principal: Some(RecordPrincipal {
                subject: "alice".into(),
                issuer: "api-keys".into(),
                method: "api_key".into(),
                key_id: "k1".into(),
                tenant: "hospital-a".into(),
                roles: vec!["train".into()],
            }),
            source_ip: Some("10.0.0.7".parse().unwrap()),
            resource: Some(RecordResource { kind: "job".into(), id: format!("job-{i}") }),
            latency_ms: Some(2),
            prev_hash: String::new(),
        });
        head = sealed.next;
        text.push_str(&sealed.line);
        text.push('\n');
    }
    text
}

fn bratsctl(files: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bratsctl")).arg("audit").arg("verify").args(files).output().unwrap()
}

#[test]
fn an_intact_log_verifies_and_an_edited_copy_fails_naming_the_line() {
    let dir = scratch("edit");
    let good = dir.join("audit.jsonl");
    std::fs::write(&good, chain(5)).unwrap();

    let out = bratsctl(&[&good]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout.trim(), format!("{}: OK, 5 records (seq 1..5)", good.display()));

    let edited = dir.join("edited.jsonl");
    let text = chain(5);
    let mut lines: Vec<&str> = text.lines().collect();
    let line4 = lines[3].replace(r#""outcome":"allowed""#, r#""outcome":"denied""#);
    assert_ne!(line4, lines[3]);
    lines[3] = &line4;
    std::fs::write(&edited, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();

    let out = bratsctl(&[&edited]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.starts_with(&format!("error: {}: line 4: hash mismatch", edited.display())), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");

    // Several files: each is reported, and one bad file fails the command.
    let out = bratsctl(&[&good, &edited]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{out:?}");
    assert!(stdout.contains(": OK, 5 records (seq 1..5)"), "{stdout}");
    assert!(stderr.contains(&format!("error: {}: line 4: hash mismatch", edited.display())), "{stderr}");
    assert!(stderr.contains("1 of 2 audit logs failed verification"), "{stderr}");
}

#[test]
fn a_removed_record_and_a_missing_file_fail() {
    let dir = scratch("remove");
    let text = chain(4);
    let cut = dir.join("cut.jsonl");
    let kept: String = text.lines().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| format!("{l}\n")).collect();
    std::fs::write(&cut, kept).unwrap();
    let out = bratsctl(&[&cut]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.starts_with(&format!("error: {}: line 2: seq 3 where 2 was expected", cut.display())), "{stderr}");

    let missing = dir.join("missing.jsonl");
    let out = bratsctl(&[&missing]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"), "{out:?}");
}

/// Writes `text`'s records as segments of `per_segment` records each into `dir`.
fn write_segments(dir: &Path, text: &str, per_segment: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, chunk) in lines.chunks(per_segment).enumerate() {
        let name = brats_cli::audit_chain::segment_name((i * per_segment) as u64 + 1);
        std::fs::write(dir.join(name), chunk.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }
}

#[test]
fn a_prefix_of_segments_verifies_per_instance_and_a_missing_segment_is_named() {
    let root = scratch("segments");
    let instance = root.join("brats.v1.Trainer").join("host-1");
    write_segments(&instance, &chain(7), 3);
    let other = root.join("brats.v1.Trainer").join("host-2");
    write_segments(&other, &chain(2), 2);

    let uri = format!("file://{}", root.display());
    let out = Command::new(env!("CARGO_BIN_EXE_bratsctl")).args(["audit", "verify", &uri]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(&format!("{}: OK, 7 records (seq 1..7) in 3 segments", instance.display())), "{stdout}");
    assert!(stdout.contains(&format!("{}: OK, 2 records (seq 1..2) in 1 segments", other.display())), "{stdout}");

    std::fs::remove_file(instance.join("000000000004.jsonl")).unwrap();
    let out = bratsctl(&[&instance]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.starts_with(&format!("error: {}: 000000000007.jsonl: segments are missing", instance.display())),
        "{stderr}"
    );

    let out =
        Command::new(env!("CARGO_BIN_EXE_bratsctl")).args(["audit", "verify", "s3://bucket/audit/"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("aws s3 sync"), "{out:?}");
}
