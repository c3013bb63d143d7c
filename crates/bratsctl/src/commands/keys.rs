//! `bratsctl keys new`: mints an API key for a caller. The key goes to a file of its own (mode
//! 0600, never overwritten, never printed); stdout gets the `[[keys]]` entry, holding only the
//! key's hash, to append to the services' `api_keys_file`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use brats_cli::api_key::{hash_api_key, new_api_key};

/// `bratsctl keys` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum KeysCmd {
    /// Mint an API key: write it to --out and print its keys-file entry.
    New {
        /// The key's id: 1–64 letters, digits or '-' (appears in the key and in audit records).
        #[arg(long)]
        id: String,
        /// A role it grants (segment, train, viewer, preprocess, admin); repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// The tenant whose objects and jobs it may touch.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// When it stops working, RFC 3339 UTC, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires: Option<String>,
        /// File to write the key to (created with mode 0600; an existing file is refused).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `keys` subcommand.
pub(crate) fn run(command: KeysCmd) -> anyhow::Result<()> {
    let KeysCmd::New { id, roles, tenant, expires, out } = command;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("--id '{id}': use 1–64 letters, digits or '-'");
    }
    let quoted = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let key = new_api_key(&id);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&out).with_context(|| {
            format!("--out {}: cannot create it (an existing key file is never overwritten)", out.display())
        })?
    };
    file.write_all(key.as_bytes())?;
    println!("[[keys]]");
    println!("id = {}", quoted(&id));
    println!("sha256 = \"{}\"", hash_api_key(&key));
    println!("roles = [{}]", roles.iter().map(|r| quoted(r)).collect::<Vec<_>>().join(", "));
    println!("tenant = {}", quoted(&tenant));
    if let Some(e) = expires {
        println!("expires = {}", quoted(&e));
    }
    eprintln!("key written to {} (mode 0600); append the entry above to the services' api_keys_file", out.display());
    Ok(())
}
