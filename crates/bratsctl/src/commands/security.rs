//! `bratsctl security init`: a starting set of TLS and API-key files for a deployment, in the
//! layout the compose `tls` variant (deploy/compose/tls.yml) and the Kubernetes `tls` overlay
//! mount at /etc/brats/tls: a private CA, a certificate per service (server and mutual-TLS
//! client identity), an operator API key and the keys file holding only its hash. A hospital
//! with its own CA puts its own files there under the same names instead.

use std::path::PathBuf;

use anyhow::{Context, bail};
use brats_cli::api_key::new_api_key;

use crate::pki::{Pki, api_key_entry, write_file};

/// `bratsctl security` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum SecurityCmd {
    /// Write ca.pem, <service>.pem and <service>.key per service, api-keys.toml and
    /// operator.apikey into --dir (which must not hold them already).
    Init {
        /// Directory to create the files in.
        #[arg(long)]
        dir: PathBuf,
        /// The services, by the host names the others reach them at (also their SANs, with
        /// localhost and <service>.brats.internal, the identity the services' auth maps).
        #[arg(long = "service", default_values = ["preprocess", "trainer", "inference"])]
        services: Vec<String>,
        /// Tenant of the operator key.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Owner (UID:GID) of the files the services read — their keys and the keys file —
        /// so that a container user (65532:65532 in our images) can read them at mode 0600.
        /// Needs root.
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
    },
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("use UID:GID, e.g. 65532:65532")?;
    Ok((
        u.parse().map_err(|_| format!("UID '{u}' is not a number"))?,
        g.parse().map_err(|_| format!("GID '{g}' is not a number"))?,
    ))
}

/// Runs a `security` subcommand.
pub(crate) fn run(command: SecurityCmd) -> anyhow::Result<()> {
    let SecurityCmd::Init { dir, services, tenant, owner } = command;
    std::fs::create_dir_all(&dir).with_context(|| format!("--dir {}", dir.display()))?;
    if dir.join("ca.pem").exists() {
        bail!(
            "--dir {}: ca.pem exists; an existing CA is never overwritten (choose an empty directory)",
            dir.display()
        );
    }
    let chown = |path: &std::path::Path| -> anyhow::Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("--owner {uid}:{gid}: cannot chown {} (run as root)", path.display()))?;
        }
        Ok(())
    };
    let pki = Pki::new("brats deployment CA (bratsctl security init)")?;
    write_file(&dir.join("ca.pem"), &pki.ca_pem, false)?;
    for service in &services {
        let identity = format!("{service}.brats.internal");
        let sans = vec![service.clone(), identity.clone(), "localhost".into(), "127.0.0.1".into()];
        let issued = pki.issue_service(&identity, sans)?;
        write_file(&dir.join(format!("{service}.pem")), &issued.cert_pem, false)?;
        let key = dir.join(format!("{service}.key"));
        write_file(&key, &issued.key_pem, true)?;
        chown(&key)?;
    }
    let key = new_api_key("operator");
    let key_file = dir.join("operator.apikey");
    write_file(&key_file, &key, true)?;
    let keys_file = dir.join("api-keys.toml");
    write_file(
        &keys_file,
        &format!(
            "# Hashes only; mint more with `bratsctl keys new`.\n{}",
            api_key_entry("operator", &key, &["admin", "train", "segment", "preprocess", "viewer"], &tenant)
        ),
        true,
    )?;
    chown(&keys_file)?;
    println!(
        "wrote ca.pem, {} certificates and keys, api-keys.toml and operator.apikey (the operator's key, \
         tenant {tenant}) to {}",
        services.len(),
        dir.display()
    );
    Ok(())
}
