//! `bratsctl audit verify PATH...`: checks audit logs with the record format and hash chain
//! of [`brats_cli::audit_chain`]: every record's hash, `seq` counting 1, 2, 3, … and each
//! `prev_hash` matching the line before, so an edited, removed, inserted or reordered record,
//! or a truncated or garbled line, fails and is named by its line number.
//!
//! A PATH is a log file (the services' `[server.audit] file`) or a folder (`DIR` or
//! `file:///DIR`) holding the segments the services write under `[server.audit] store_uri`:
//! every folder at or below it that holds segments is one log, verified in `seq` order, and
//! a missing segment is named. The client links no S3 client: copy an `s3://` prefix to a
//! folder first (`aws s3 sync s3://bucket/audit/ ./audit/`).

use std::path::{Path, PathBuf};

use anyhow::bail;
use brats_cli::audit_chain::{segment_folders, verify_file, verify_segments};

/// `bratsctl audit` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum AuditCmd {
    /// Verify audit logs: prints `PATH: OK, N records (seq A..B)` for each log that holds an
    /// unbroken chain (a file, or a folder of segments: `…, in K segments`), else
    /// `error: PATH: [SEGMENT: ]line L: <what is wrong>`. Exits 0 only when every log verifies.
    Verify {
        /// Audit log files (JSON Lines), or folders (`DIR`, `file:///DIR`) of segments written
        /// under `[server.audit] store_uri`; an `s3://` prefix must be copied to a folder first.
        #[arg(required = true)]
        paths: Vec<String>,
    },
}

/// One log to verify: a file, or a folder of segments.
enum Log {
    File(PathBuf),
    Segments(PathBuf),
}

/// The logs `path` names, or why it names none.
fn logs_at(path: &str) -> Result<Vec<Log>, String> {
    if path.starts_with("s3://") {
        return Err(format!(
            "{path}: bratsctl reads no object store; copy the prefix to a folder (aws s3 sync {path} DIR) and verify DIR"
        ));
    }
    let local = Path::new(path.strip_prefix("file://").unwrap_or(path));
    if !local.is_dir() {
        return Ok(vec![Log::File(local.to_path_buf())]);
    }
    let folders = segment_folders(local).map_err(|e| format!("{path}: cannot list: {e}"))?;
    if folders.is_empty() {
        return Err(format!("{path}: holds no audit segments (files named like 000000000001.jsonl)"));
    }
    Ok(folders.into_iter().map(Log::Segments).collect())
}

/// Verifies one log: its line of success, or its error line.
fn verify_log(log: &Log) -> Result<String, String> {
    match log {
        Log::File(file) => match verify_file(file) {
            Ok(r) if r.records == 0 => Ok(format!("{}: OK, 0 records", file.display())),
            Ok(r) => Ok(format!("{}: OK, {} records (seq {}..{})", file.display(), r.records, r.first_seq, r.last_seq)),
            Err(e) => Err(format!("{}: {e}", file.display())),
        },
        Log::Segments(dir) => match verify_segments(dir) {
            Ok(r) => Ok(format!(
                "{}: OK, {} records (seq {}..{}) in {} segments",
                dir.display(),
                r.chain.records,
                r.chain.first_seq,
                r.chain.last_seq,
                r.segments
            )),
            Err(e) => Err(format!("{}: {e}", dir.display())),
        },
    }
}

/// Runs an `audit` subcommand.
pub(crate) fn run(command: AuditCmd) -> anyhow::Result<()> {
    let AuditCmd::Verify { paths } = command;
    let mut failures = Vec::new();
    let mut checked = 0usize;
    for path in &paths {
        let results: Vec<Result<String, String>> = match logs_at(path) {
            Ok(logs) => logs.iter().map(verify_log).collect(),
            Err(e) => vec![Err(e)],
        };
        for result in results {
            checked += 1;
            match result {
                Ok(line) => println!("{line}"),
                Err(line) => failures.push(line),
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        // One log: its error is the command's, printed once as `error: PATH: line L: …`.
        _ if checked == 1 => bail!(failures.remove(0)),
        n => {
            for line in &failures {
                eprintln!("error: {line}");
            }
            bail!("{n} of {checked} audit logs failed verification")
        }
    }
}
