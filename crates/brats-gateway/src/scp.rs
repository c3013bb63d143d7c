//! The DIMSE SCP: C-ECHO and C-STORE over DICOM upper-layer associations (dicom-ul).
//!
//! Associations are accepted only for our AE title and, when an allow-list is configured,
//! from the listed calling AE titles; beyond `max_associations` open at once new ones are
//! rejected. Any storage SOP class is accepted (so a PACS can send a whole study), in the
//! transfer syntaxes this build decodes, Explicit VR Little Endian preferred; MR image
//! instances are stored exactly as received (the negotiated transfer syntax, a Part 10 header
//! added), other classes are acknowledged and dropped. A store is refused with 0xA700 (out of
//! resources) when the spool's file system is below its free-space watermark or the write
//! fails; nothing half-written is kept. With TLS configured every association is DICOM TLS
//! (PS3.15 B.1), client certificates verified against the configured CA. Logs carry AE titles, counts and hashed UIDs only.

use crate::dimse::{self, Command};
use crate::metrics::ScpCounters;
use crate::spool::{Spool, Staging};
use brats_dicom::instance::MR_CLASSES;
use brats_service::security::tls::ServerTls;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::Association;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{AssociationRJServiceUserReason, PDataValue, PDataValueType, UserIdentity};
use dicom_ul::{Pdu, association::AsyncServerAssociation};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Transfer syntaxes offered, in order of preference (all decodable by `brats-dicom`).
pub const TRANSFER_SYNTAXES: [&str; 7] = [
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    uids::JPEG_LOSSLESS_SV1,
    uids::JPEG_LOSSLESS,
    uids::JPEG2000_LOSSLESS,
    uids::JPEG2000,
    uids::RLE_LOSSLESS,
];

/// How the SCP behaves.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Our AE title (the called AE must match).
    pub ae_title: String,
    /// Calling AE titles allowed; empty allows any.
    pub allowed_calling_aes: Vec<String>,
    /// Associations open at once.
    pub max_associations: usize,
    /// Largest PDU we receive.
    pub max_pdu: u32,
    /// Free bytes the spool's file system must keep; below it stores are refused.
    pub min_free_bytes: u64,
    /// Largest instance accepted, bytes.
    pub max_instance_bytes: usize,
    /// Idle time after which an association is dropped.
    pub timeout: Duration,
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            ae_title: "BRATS".into(),
            allowed_calling_aes: Vec::new(),
            max_associations: 16,
            max_pdu: 131_072,
            min_free_bytes: 1 << 30,
            max_instance_bytes: 1 << 30,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The SCP's shared state.
#[derive(Debug)]
pub struct Scp {
    config: ScpConfig,
    spool: Arc<Spool>,
    tls: Option<Arc<ServerTls>>,
    permits: Arc<Semaphore>,
    /// Counters (`/metrics`).
    pub counters: ScpCounters,
}

/// The access rule of one association attempt.
struct Gate<'a> {
    config: &'a ScpConfig,
    over_limit: bool,
}

impl AccessControl for Gate<'_> {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let calling = calling_ae_title.trim();
        if !self.config.allowed_calling_aes.is_empty() && !self.config.allowed_calling_aes.iter().any(|a| a == calling)
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        if self.over_limit {
            return Err(AssociationRJServiceUserReason::NoReasonGiven);
        }
        Ok(())
    }
}

impl Scp {
    /// An SCP storing into `spool`; with `tls`, every association must complete a TLS
    /// handshake first (DICOM TLS; client certificates as the TLS configuration says).
    pub fn new(config: ScpConfig, spool: Arc<Spool>, tls: Option<Arc<ServerTls>>, counters: ScpCounters) -> Scp {
        let permits = Arc::new(Semaphore::new(config.max_associations));
        Scp { config, spool, tls, permits, counters }
    }

    /// Accepts associations on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            let scp = self.clone();
            tokio::spawn(async move { scp.handle(socket).await });
        }
    }

    async fn handle(&self, socket: TcpStream) {
        // Responses are small and each waits for the next request: never hold them back.
        let _ = socket.set_nodelay(true);
        let permit = self.permits.clone().try_acquire_owned().ok();
        let gate = Gate { config: &self.config, over_limit: permit.is_none() };
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(gate)
            .ae_title(self.config.ae_title.as_str())
            .max_pdu_length(self.config.max_pdu)
            .promiscuous(true)
            .read_timeout(self.config.timeout)
            .write_timeout(self.config.timeout)
            .with_abstract_syntax(dimse::VERIFICATION);
        for class in MR_CLASSES {
            options = options.with_abstract_syntax(class);
        }
        for ts in TRANSFER_SYNTAXES {
            options = options.with_transfer_syntax(ts);
        }
        let refused = match &self.tls {
            Some(tls) => match options.tls_config(tls.current()).establish_tls_async(socket).await {
                Ok(association) => {
                    self.serve_association(association).await;
                    None
                }
                Err(e) => Some(e),
            },
            None => match options.establish_async(socket).await {
                Ok(association) => {
                    self.serve_association(association).await;
                    None
                }
                Err(e) => Some(e),
            },
        };
        if let Some(e) = refused {
            self.counters.rejected.inc();
            tracing::info!(error = %e, "association refused");
        }
        drop(permit);
    }

    async fn serve_association<S>(&self, association: AsyncServerAssociation<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.counters.associations.inc();
        let calling = association.peer_ae_title().to_string();
        match self.receive(association).await {
            Ok(n) => tracing::info!(calling_ae = %calling, instances = n, "association released"),
            Err(reason) => {
                self.counters.aborted.inc();
                tracing::warn!(calling_ae = %calling, reason, "association ended without release; its instances were dropped");
            }
        }
    }

    /// Serves one association; `Ok(instances)` when it was released normally.
    async fn receive<S>(&self, mut association: AsyncServerAssociation<S>) -> Result<usize, &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut staging = self.spool.staging().map_err(|_| "cannot create a staging folder")?;
        let mut studies: Vec<String> = Vec::new();
        let mut command = Vec::new();
        let mut data = Vec::new();
        let mut pending: Option<Command> = None;
        loop {
            let pdu = match association.receive().await {
                Ok(p) => p,
                Err(_) => {
                    self.spool.discard(staging, &studies);
                    return Err("network error or timeout");
                }
            };
            match pdu {
                Pdu::PData { data: values } => {
                    for value in values {
                        let context = value.presentation_context_id;
                        match value.value_type {
                            PDataValueType::Command => {
                                command.extend_from_slice(&value.data);
                                if !value.is_last {
                                    continue;
                                }
                                let Some(cmd) = dimse::parse(&command) else {
                                    self.spool.discard(staging, &studies);
                                    let _ = association.abort().await;
                                    return Err("unparsable command set");
                                };
                                command.clear();
                                match cmd.field {
                                    dimse::C_ECHO_RQ => {
                                        let rsp = dimse::echo_response(&cmd);
                                        if send(&mut association, context, rsp).await.is_err() {
                                            self.spool.discard(staging, &studies);
                                            return Err("network error");
                                        }
                                    }
                                    dimse::C_STORE_RQ if cmd.has_data_set => pending = Some(cmd),
                                    _ => {
                                        self.spool.discard(staging, &studies);
                                        let _ = association.abort().await;
                                        return Err("unsupported DIMSE command");
                                    }
                                }
                            }
                            PDataValueType::Data => {
                                data.extend_from_slice(&value.data);
                                if data.len() > self.config.max_instance_bytes {
                                    self.spool.discard(staging, &studies);
                                    let _ = association.abort().await;
                                    return Err("instance larger than max_instance_bytes");
                                }
                                if !value.is_last {
                                    continue;
                                }
                                let Some(cmd) = pending.take() else {
                                    self.spool.discard(staging, &studies);
                                    let _ = association.abort().await;
                                    return Err("data set without a C-STORE request");
                                };
                                let ts = association
                                    .presentation_contexts()
                                    .iter()
                                    .find(|pc| pc.id == context)
                                    .map(|pc| dimse::trim_uid(&pc.transfer_syntax).to_string())
                                    .unwrap_or_default();
                                let status = self.store(&cmd, &ts, &data, &mut staging, &mut studies);
                                data.clear();
                                if send(&mut association, context, dimse::store_response(&cmd, status)).await.is_err() {
                                    self.spool.discard(staging, &studies);
                                    return Err("network error");
                                }
                            }
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    let _ = association.send(&Pdu::ReleaseRP).await;
                    let n = staging.len();
                    if self.spool.commit(staging, &studies).is_err() {
                        return Err("moving the received instances into the spool failed");
                    }
                    return Ok(n);
                }
                Pdu::AbortRQ { .. } => {
                    self.spool.discard(staging, &studies);
                    return Err("aborted by the peer");
                }
                _ => {}
            }
        }
    }

    /// Stores one instance into the association's staging folder; returns the DIMSE status.
    fn store(&self, cmd: &Command, ts_uid: &str, data: &[u8], staging: &mut Staging, studies: &mut Vec<String>) -> u16 {
        if !MR_CLASSES.contains(&cmd.sop_class.as_str()) {
            self.counters.ignored.inc();
            return dimse::SUCCESS;
        }
        let refuse = |status| {
            self.counters.refused.inc();
            status
        };
        if self.spool.free_bytes().is_some_and(|free| free < self.config.min_free_bytes + data.len() as u64) {
            tracing::warn!("store refused: the spool's file system is below its free-space watermark");
            return refuse(dimse::OUT_OF_RESOURCES);
        }
        let Some(ts) = TransferSyntaxRegistry.get(ts_uid) else { return refuse(dimse::CANNOT_UNDERSTAND) };
        let Ok(obj) = InMemDicomObject::read_dataset_with_ts(data, ts) else { return refuse(dimse::CANNOT_UNDERSTAND) };
        let Some(study) = obj.element_opt(tags::STUDY_INSTANCE_UID).ok().flatten().and_then(|e| e.to_str().ok()) else {
            return refuse(dimse::CANNOT_UNDERSTAND);
        };
        let study = self.spool.study_hash(dimse::trim_uid(&study));
        if !studies.contains(&study) {
            self.spool.opened(&study);
            studies.push(study.clone());
        }
        let name = format!("{}.dcm", self.spool.study_hash(&cmd.sop_instance));
        let path = staging.dir().join(&name);
        match write_part10(&path, cmd, ts_uid, data) {
            Ok(()) => {
                staging.add(study, path);
                self.counters.stored.inc();
                dimse::SUCCESS
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(error = %e.kind(), "store refused: writing the instance failed");
                refuse(dimse::OUT_OF_RESOURCES)
            }
        }
    }
}

/// The data set as received, behind a Part 10 preamble and file meta group.
fn write_part10(path: &std::path::Path, cmd: &Command, ts: &str, data: &[u8]) -> std::io::Result<()> {
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(ts)
        .media_storage_sop_class_uid(cmd.sop_class.as_str())
        .media_storage_sop_instance_uid(cmd.sop_instance.as_str())
        .build()
        .map_err(std::io::Error::other)?;
    let mut bytes = Vec::with_capacity(data.len() + 512);
    bytes.extend_from_slice(&[0u8; 128]);
    bytes.extend_from_slice(b"DICM");
    meta.write(&mut bytes).map_err(std::io::Error::other)?;
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes)
}

async fn send<S>(association: &mut AsyncServerAssociation<S>, context: u8, command: Vec<u8>) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context,
            value_type: PDataValueType::Command,
            is_last: true,
            data: command,
        }],
    };
    association.send(&pdu).await.map_err(|_| ())
}
