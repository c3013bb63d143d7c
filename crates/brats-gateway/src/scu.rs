//! The DIMSE SCU: C-ECHO to check a destination, C-STORE to send results back; over DICOM TLS
//! (PS3.15 B.1) when the peer has a `tls` section (its CA, and our certificate for mutual TLS).

use crate::dimse;
use dicom_dictionary_std::uids;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::Pdu;
use dicom_ul::association::client::{AsyncClientAssociation, ClientAssociationOptions};
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// DICOM TLS towards a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTls {
    /// The CA that signs the peer's certificate (PEM).
    pub ca_file: String,
    /// Our certificate (PEM), for peers that require mutual TLS; with `key_file`.
    #[serde(default)]
    pub cert_file: String,
    /// Our private key (PEM, readable by this account only).
    #[serde(default)]
    pub key_file: String,
    /// The name the peer's certificate must carry (default: the peer's host).
    #[serde(default)]
    pub server_name: String,
}

/// A DIMSE peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimsePeer {
    /// Its AE title.
    pub ae_title: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// DICOM TLS (none: plain TCP).
    #[serde(default)]
    pub tls: Option<PeerTls>,
}

impl DimsePeer {
    fn address(&self) -> String {
        format!("{}@{}:{}", self.ae_title, self.host, self.port)
    }
}

/// Why a DIMSE exchange failed (no patient data: AE titles, statuses and network errors).
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// The association could not be made.
    #[error("association with {peer} failed: {reason}")]
    Association {
        /// The peer, `AE@host:port`.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer accepted no presentation context for the SOP class.
    #[error("{peer} accepts no transfer syntax we can send for SOP class {sop_class}")]
    NoContext {
        /// The peer.
        peer: String,
        /// The SOP class.
        sop_class: String,
    },
    /// The peer answered with a failure status.
    #[error("{peer} answered status 0x{status:04X}")]
    Status {
        /// The peer.
        peer: String,
        /// The DIMSE status.
        status: u16,
    },
    /// The exchange broke off.
    #[error("{peer}: {reason}")]
    Protocol {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
}

fn options(calling_ae: &str, peer: &DimsePeer, contexts: &[(&str, Vec<&str>)]) -> ClientAssociationOptions<'static> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling_ae.to_string())
        .called_ae_title(peer.ae_title.clone())
        .max_pdu_length(131_072)
        .connection_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60));
    for (class, ts) in contexts {
        options = options.with_presentation_context(class.to_string(), ts.iter().map(|t| t.to_string()).collect());
    }
    options
}

/// Runs `$body` with `$association` bound to a new association with `$peer` (TLS or not).
macro_rules! with_association {
    ($peer:expr, $calling:expr, $contexts:expr, |$association:ident| $body:expr) => {{
        let peer: &DimsePeer = $peer;
        let failed = |reason: String| ScuError::Association { peer: peer.address(), reason };
        let options = options($calling, peer, $contexts);
        let address = format!("{}:{}", peer.host, peer.port);
        match &peer.tls {
            None => {
                let $association = options.establish_with_async(&address).await.map_err(|e| failed(e.to_string()))?;
                $body
            }
            Some(tls) => {
                let config = brats_service::security::tls::client_config(&tls.ca_file, &tls.cert_file, &tls.key_file)
                    .map_err(|e| failed(format!("tls: {e}")))?;
                let name = if tls.server_name.is_empty() { peer.host.as_str() } else { tls.server_name.as_str() };
                let $association = options
                    .tls_config(config)
                    .server_name(name)
                    .establish_with_async_tls(&address)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                $body
            }
        }
    }};
}

async fn exchange<S>(association: &mut AsyncClientAssociation<S>, peer: &DimsePeer) -> Result<u16, ScuError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let protocol = |reason: String| ScuError::Protocol { peer: peer.address(), reason };
    let mut command = Vec::new();
    loop {
        match association.receive().await.map_err(|e| protocol(e.to_string()))? {
            Pdu::PData { data } => {
                for v in data {
                    if v.value_type == PDataValueType::Command {
                        command.extend_from_slice(&v.data);
                        if v.is_last {
                            return dimse::parse(&command)
                                .map(|c| c.status)
                                .ok_or_else(|| protocol("unparsable response".into()));
                        }
                    }
                }
            }
            Pdu::AbortRQ { .. } => return Err(protocol("aborted by the peer".into())),
            other => return Err(protocol(format!("unexpected {other:?}").chars().take(80).collect())),
        }
    }
}

/// C-ECHO: whether `peer` answers as `calling_ae`.
pub async fn echo(peer: &DimsePeer, calling_ae: &str) -> Result<(), ScuError> {
    let contexts = [(dimse::VERIFICATION, vec![uids::IMPLICIT_VR_LITTLE_ENDIAN])];
    with_association!(peer, calling_ae, &contexts, |association| echo_on(association, peer).await)
}

async fn echo_on<S>(mut association: AsyncClientAssociation<S>, peer: &DimsePeer) -> Result<(), ScuError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let context = association.presentation_contexts()[0].id;
    let pdu = Pdu::PData { data: dimse::fragments(context, PDataValueType::Command, &dimse::echo_request(1), 0) };
    association.send(&pdu).await.map_err(|e| ScuError::Protocol { peer: peer.address(), reason: e.to_string() })?;
    let status = exchange(&mut association, peer).await?;
    let _ = association.release().await;
    if status == dimse::SUCCESS { Ok(()) } else { Err(ScuError::Status { peer: peer.address(), status }) }
}

/// C-STORE of one Part 10 file (`bytes`) to `peer`, re-encoded into whichever of Explicit or
/// Implicit VR Little Endian the peer accepts. Warnings (0xB…) count as stored.
pub async fn store(peer: &DimsePeer, calling_ae: &str, bytes: &[u8]) -> Result<(), ScuError> {
    let protocol = |reason: String| ScuError::Protocol { peer: peer.address(), reason };
    let file = dicom_object::from_reader(bytes.get(128..).unwrap_or_default())
        .map_err(|e| protocol(format!("the object to send is unreadable: {e}")))?;
    let sop_class = dimse::trim_uid(file.meta().media_storage_sop_class_uid()).to_string();
    let contexts = [(sop_class.as_str(), vec![uids::EXPLICIT_VR_LITTLE_ENDIAN, uids::IMPLICIT_VR_LITTLE_ENDIAN])];
    with_association!(peer, calling_ae, &contexts, |association| store_on(association, peer, &file).await)
}

async fn store_on<S>(
    mut association: AsyncClientAssociation<S>,
    peer: &DimsePeer,
    file: &dicom_object::FileDicomObject<dicom_object::InMemDicomObject>,
) -> Result<(), ScuError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let protocol = |reason: String| ScuError::Protocol { peer: peer.address(), reason };
    let sop_class = dimse::trim_uid(file.meta().media_storage_sop_class_uid()).to_string();
    let sop_instance = dimse::trim_uid(file.meta().media_storage_sop_instance_uid()).to_string();
    let Some(pc) = association
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .cloned()
    else {
        let _ = association.abort().await;
        return Err(ScuError::NoContext { peer: peer.address(), sop_class });
    };
    let ts = TransferSyntaxRegistry
        .get(dimse::trim_uid(&pc.transfer_syntax))
        .ok_or_else(|| protocol("the negotiated transfer syntax is unknown".into()))?;
    let mut data = Vec::new();
    file.write_dataset_with_ts(&mut data, ts).map_err(|e| protocol(format!("encoding: {e}")))?;
    let max = association.acceptor_max_pdu_length();
    let mut values =
        dimse::fragments(pc.id, PDataValueType::Command, &dimse::store_request(1, &sop_class, &sop_instance), max);
    values.extend(dimse::fragments(pc.id, PDataValueType::Data, &data, max));
    for v in values {
        association.send(&Pdu::PData { data: vec![v] }).await.map_err(|e| protocol(e.to_string()))?;
    }
    let status = exchange(&mut association, peer).await?;
    let _ = association.release().await;
    if status == dimse::SUCCESS || status & 0xF000 == 0xB000 {
        Ok(())
    } else {
        Err(ScuError::Status { peer: peer.address(), status })
    }
}
