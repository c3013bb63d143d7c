//! The PACS gateway: DICOM MR studies in (DIMSE C-STORE, or pulled from a DICOMweb archive),
//! tumour segmentations back as DICOM SEG (C-STORE or STOW-RS to the configured destinations),
//! one durable job per study, watched over gRPC; and the offline
//! paths (`volumes`, `segment`) on the same code.
//!
//! - [`dimse`]: command sets and P-DATA fragments.
//! - [`scp`]: the C-ECHO/C-STORE SCP (AE checks, limits, watermark, store as received).
//! - [`spool`]: per-association staging, committed on release; study stability.
//! - [`jobs`]: the per-study job and its record in the store; export with retries.
//! - [`scu`]: C-ECHO and C-STORE to a peer; [`stow`]: STOW-RS to a DICOMweb archive.
//! - [`dicomweb`]: pull mode's QIDO-RS/WADO-RS client.
//! - [`offline`]: the in-process DICOM → SEG path; [`remote`]: the model on an inference
//!   service instead, through the store.
//! - [`service`]: the `brats.v1.Gateway` gRPC API; [`server`]: `serve` (SCP, runner, API,
//!   webhook); [`metrics`]: what `/metrics` shows.
//! - [`config`]: `serve`'s TOML.

pub mod config;
pub mod dicomweb;
pub mod dimse;
pub mod jobs;
pub mod metrics;
pub mod offline;
pub mod remote;
pub mod scp;
pub mod scu;
pub mod server;
pub mod service;
pub mod spool;
pub mod stow;
