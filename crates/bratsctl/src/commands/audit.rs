//! `bratsctl audit verify FILE...`: checks audit logs (the services' `[server.audit] file`)
//! with the record format and hash chain of [`brats_cli::audit_chain`]: every record's hash,
//! `seq` counting 1, 2, 3, … and each `prev_hash` matching the line before, so an edited,
//! removed, inserted or reordered record, or a truncated or garbled line, fails and is named
//! by its line number.

use std::path::PathBuf;

use anyhow::bail;
use brats_cli::audit_chain::verify_file;

/// `bratsctl audit` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum AuditCmd {
    /// Verify audit log files: prints `FILE: OK, N records (seq A..B)` for each one that holds
    /// an unbroken chain, else `error: FILE: line L: <what is wrong>`. Exits 0 only when every
    /// file verifies.
    Verify {
        /// The audit log files (JSON Lines).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Runs an `audit` subcommand.
pub(crate) fn run(command: AuditCmd) -> anyhow::Result<()> {
    let AuditCmd::Verify { files } = command;
    let mut failures = Vec::new();
    for file in &files {
        match verify_file(file) {
            Ok(r) if r.records == 0 => println!("{}: OK, 0 records", file.display()),
            Ok(r) => println!("{}: OK, {} records (seq {}..{})", file.display(), r.records, r.first_seq, r.last_seq),
            Err(e) => {
                let line = format!("{}: {e}", file.display());
                if files.len() > 1 {
                    eprintln!("error: {line}");
                }
                failures.push(line);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        // One file: its error is the command's, printed once as `error: FILE: line L: …`.
        _ if files.len() == 1 => bail!(failures.remove(0)),
        n => bail!("{n} of {} audit logs failed verification", files.len()),
    }
}
