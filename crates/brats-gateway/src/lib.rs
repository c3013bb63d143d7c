//! The PACS gateway's in-process paths, shared by the offline CLI and (later) the service:
//! a DICOM study → the four volumes → segmentation → a DICOM SEG on the T1c's geometry.

pub mod offline;
