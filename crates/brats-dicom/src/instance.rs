//! One DICOM file's header, parsed once into typed values: identity, the attributes series
//! selection scores, and per-frame geometry (one frame for classic MR; every frame of an
//! Enhanced or Legacy Converted Enhanced MR instance from its functional groups).

use crate::values::{float, floats, int, item, items, text, texts};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use std::path::PathBuf;

/// SOP classes read as MR images.
pub const MR_CLASSES: [&str; 3] =
    [uids::MR_IMAGE_STORAGE, uids::ENHANCED_MR_IMAGE_STORAGE, uids::LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE];

/// Geometry and value scaling of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Frame index within its instance (0 for single-frame instances).
    pub index: u32,
    /// ImagePositionPatient, mm (LPS).
    pub position: Option<[f64; 3]>,
    /// ImageOrientationPatient: row then column direction cosines.
    pub orientation: Option<[f64; 6]>,
    /// PixelSpacing: between rows, then between columns, mm.
    pub spacing: Option<[f64; 2]>,
    /// RescaleSlope, RescaleIntercept (1, 0 when absent).
    pub rescale: (f64, f64),
}

/// A parsed instance header (pixel data is read later, for the chosen series only).
#[derive(Debug, Clone)]
pub struct Instance {
    /// Where it was read from.
    pub path: PathBuf,
    /// Transfer syntax UID of the file.
    pub transfer_syntax: String,
    /// SOPClassUID.
    pub sop_class: String,
    /// SOPInstanceUID.
    pub sop_instance: String,
    /// StudyInstanceUID.
    pub study: String,
    /// SeriesInstanceUID.
    pub series: String,
    /// PatientID (compared across series; never logged).
    pub patient_id: String,
    /// FrameOfReferenceUID.
    pub frame_of_reference: Option<String>,
    /// Modality.
    pub modality: String,
    /// Manufacturer (to recognise our own objects coming back).
    pub manufacturer: String,
    /// SeriesDescription (scored, never logged).
    pub series_description: String,
    /// ProtocolName (scored, never logged).
    pub protocol_name: String,
    /// ImageType values, upper case.
    pub image_type: Vec<String>,
    /// ContrastBolusAgent present and not "NONE".
    pub contrast: bool,
    /// EchoTime (or EffectiveEchoTime), ms.
    pub echo_time: Option<f64>,
    /// RepetitionTime, ms.
    pub repetition_time: Option<f64>,
    /// InversionTime (or the first InversionTimes), ms.
    pub inversion_time: Option<f64>,
    /// MRAcquisitionType is 3D.
    pub acquisition_3d: bool,
    /// EchoNumbers.
    pub echo_number: Option<i64>,
    /// InstanceNumber (recorded; never used for ordering).
    pub instance_number: Option<i64>,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub columns: u16,
    /// PhotometricInterpretation.
    pub photometric: String,
    /// SamplesPerPixel.
    pub samples_per_pixel: u16,
    /// BitsAllocated.
    pub bits_allocated: u16,
    /// BitsStored.
    pub bits_stored: u16,
    /// PixelRepresentation is 1 (signed).
    pub signed: bool,
    /// The frames (one for classic MR).
    pub frames: Vec<Frame>,
    /// Whether the instance is multi-frame (Enhanced or Legacy Converted Enhanced MR).
    pub enhanced: bool,
}

impl Instance {
    /// Whether the SOP class is one of the MR image classes.
    pub fn is_mr_image(&self) -> bool {
        MR_CLASSES.contains(&self.sop_class.as_str())
    }

    /// Parses the header of `obj` (read up to, not including, the pixel data). `None` when
    /// the identifying UIDs are missing: such a file cannot be placed in any series.
    pub fn parse(path: PathBuf, transfer_syntax: &str, obj: &InMemDicomObject) -> Option<Instance> {
        let sop_class = text(obj, tags::SOP_CLASS_UID)?;
        let sop_instance = text(obj, tags::SOP_INSTANCE_UID)?;
        let study = text(obj, tags::STUDY_INSTANCE_UID)?;
        let series = text(obj, tags::SERIES_INSTANCE_UID)?;
        let enhanced = sop_class != uids::MR_IMAGE_STORAGE && MR_CLASSES.contains(&sop_class.as_str());
        // Enhanced objects keep acquisition attributes in functional groups (and Legacy
        // Converted ones in the unassigned shared group); classic ones at the top level.
        let shared = item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
        let unassigned = item(obj, tags::UNASSIGNED_SHARED_CONVERTED_ATTRIBUTES_SEQUENCE);
        let in_groups = |tag, seq| {
            shared
                .and_then(|s| item(s, seq))
                .and_then(|s| float(s, tag))
                .or_else(|| unassigned.and_then(|u| float(u, tag)))
        };
        let echo_time = float(obj, tags::ECHO_TIME)
            .or_else(|| in_groups(tags::EFFECTIVE_ECHO_TIME, tags::MR_ECHO_SEQUENCE))
            .or_else(|| unassigned.and_then(|u| float(u, tags::ECHO_TIME)));
        let repetition_time = float(obj, tags::REPETITION_TIME)
            .or_else(|| in_groups(tags::REPETITION_TIME, tags::MR_TIMING_AND_RELATED_PARAMETERS_SEQUENCE));
        let inversion_time = float(obj, tags::INVERSION_TIME)
            .or_else(|| in_groups(tags::INVERSION_TIMES, tags::MR_MODIFIER_SEQUENCE))
            .or_else(|| unassigned.and_then(|u| float(u, tags::INVERSION_TIME)));
        let contrast = text(obj, tags::CONTRAST_BOLUS_AGENT)
            .or_else(|| unassigned.and_then(|u| text(u, tags::CONTRAST_BOLUS_AGENT)))
            .is_some_and(|a| !matches!(a.to_ascii_uppercase().as_str(), "NONE" | "NO" | "N/A"));
        let acquisition_3d = text(obj, tags::MR_ACQUISITION_TYPE)
            .or_else(|| unassigned.and_then(|u| text(u, tags::MR_ACQUISITION_TYPE)))
            .is_some_and(|t| t.eq_ignore_ascii_case("3D"));
        let frames = if enhanced { enhanced_frames(obj) } else { vec![classic_frame(obj)] };
        Some(Instance {
            path,
            transfer_syntax: transfer_syntax.to_string(),
            sop_class,
            sop_instance,
            study,
            series,
            patient_id: text(obj, tags::PATIENT_ID).unwrap_or_default(),
            frame_of_reference: text(obj, tags::FRAME_OF_REFERENCE_UID),
            modality: text(obj, tags::MODALITY).unwrap_or_default().to_ascii_uppercase(),
            manufacturer: text(obj, tags::MANUFACTURER).unwrap_or_default(),
            series_description: text(obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
            protocol_name: text(obj, tags::PROTOCOL_NAME).unwrap_or_default(),
            image_type: texts(obj, tags::IMAGE_TYPE),
            contrast,
            echo_time,
            repetition_time,
            inversion_time,
            acquisition_3d,
            echo_number: int(obj, tags::ECHO_NUMBERS),
            instance_number: int(obj, tags::INSTANCE_NUMBER),
            rows: int(obj, tags::ROWS).unwrap_or(0) as u16,
            columns: int(obj, tags::COLUMNS).unwrap_or(0) as u16,
            photometric: text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default().to_ascii_uppercase(),
            samples_per_pixel: int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16,
            bits_allocated: int(obj, tags::BITS_ALLOCATED).unwrap_or(16) as u16,
            bits_stored: int(obj, tags::BITS_STORED).or_else(|| int(obj, tags::BITS_ALLOCATED)).unwrap_or(16) as u16,
            signed: int(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            frames,
            enhanced,
        })
    }
}

fn rescale_of(obj: &InMemDicomObject) -> Option<(f64, f64)> {
    match (float(obj, tags::RESCALE_SLOPE), float(obj, tags::RESCALE_INTERCEPT)) {
        (None, None) => None,
        (s, i) => Some((s.unwrap_or(1.0), i.unwrap_or(0.0))),
    }
}

fn classic_frame(obj: &InMemDicomObject) -> Frame {
    Frame {
        index: 0,
        position: floats(obj, tags::IMAGE_POSITION_PATIENT),
        orientation: floats(obj, tags::IMAGE_ORIENTATION_PATIENT),
        spacing: floats(obj, tags::PIXEL_SPACING),
        rescale: rescale_of(obj).unwrap_or((1.0, 0.0)),
    }
}

/// Per-frame geometry of a multi-frame MR instance: each frame's functional group first, then
/// the shared one (PS3.3 C.7.6.16).
fn enhanced_frames(obj: &InMemDicomObject) -> Vec<Frame> {
    let count = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize;
    let shared = item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let per_frame = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    let lookup = |frame: Option<&InMemDicomObject>, seq, f: &dyn Fn(&InMemDicomObject) -> Option<_>| {
        frame.and_then(|g| item(g, seq)).and_then(f).or_else(|| shared.and_then(|g| item(g, seq)).and_then(f))
    };
    (0..count)
        .map(|i| {
            let group = per_frame.get(i);
            let position = lookup(group, tags::PLANE_POSITION_SEQUENCE, &|s| {
                floats::<3>(s, tags::IMAGE_POSITION_PATIENT).map(Vec::from)
            })
            .map(|v| [v[0], v[1], v[2]]);
            let orientation = lookup(group, tags::PLANE_ORIENTATION_SEQUENCE, &|s| {
                floats::<6>(s, tags::IMAGE_ORIENTATION_PATIENT).map(Vec::from)
            })
            .map(|v| std::array::from_fn(|k| v[k]));
            let spacing =
                lookup(group, tags::PIXEL_MEASURES_SEQUENCE, &|s| floats::<2>(s, tags::PIXEL_SPACING).map(Vec::from))
                    .map(|v| [v[0], v[1]]);
            let rescale =
                lookup(group, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, &|s| rescale_of(s).map(|(a, b)| vec![a, b]))
                    .map(|v| (v[0], v[1]))
                    .or_else(|| rescale_of(obj))
                    .unwrap_or((1.0, 0.0));
            Frame { index: i as u32, position, orientation, spacing, rescale }
        })
        .collect()
}
