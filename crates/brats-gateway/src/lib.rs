//! The PACS gateway: DICOM MR studies in (DIMSE C-STORE), tumour segmentations back as DICOM
//! SEG (C-STORE to the configured destinations), one durable job per study; and the offline
//! paths (`volumes`, `segment`) on the same code.
//!
//! - [`dimse`]: command sets and P-DATA fragments.
//! - [`scp`]: the C-ECHO/C-STORE SCP (AE checks, limits, watermark, store as received).
//! - [`spool`]: per-association staging, committed on release; study stability.
//! - [`jobs`]: the per-study job and its record in the store; export with retries.
//! - [`scu`]: C-ECHO and C-STORE to a peer; [`stow`]: STOW-RS to a DICOMweb archive.
//! - [`offline`]: the in-process DICOM → SEG path.
//! - [`config`]: `serve`'s TOML.

pub mod config;
pub mod dimse;
pub mod jobs;
pub mod offline;
pub mod scp;
pub mod scu;
pub mod spool;
pub mod stow;
