//! A BINARY DICOM Segmentation of the BraTS labels on the T1c series' own geometry.
//!
//! Three non-overlapping segments — NCR (label 1), ED (label 2), ET (label 4) — coded from
//! DICOM CID 7168 (pacs.md §4); tumour core and whole tumour are unions of these and are
//! reported as volumes, not segments, because viewers long refused overlapping segments.
//! Frames are segment-major, then ascending along the slice normal; empty frames are left out
//! (a segment with no voxel is listed with no frame; an all-empty result keeps every frame so
//! the object still holds pixel data). Each frame's position comes from our geometry, not from
//! list order, and references the T1c slice it lies on plus the same-position slices of the
//! other three series. Patient, study and frame-of-reference attributes are copied verbatim
//! from the T1c. UIDs are `2.25.` + a hash of the inputs and the label map, so writing the
//! same result twice gives the same object.

use crate::error::DicomError;
use crate::geometry::dot;
use crate::study::RoleSeries;
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR, dicom_value};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use sha2::{Digest, Sha256};

/// A coded concept (code value, scheme, meaning).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Code {
    /// CodeValue.
    pub value: &'static str,
    /// CodingSchemeDesignator.
    pub scheme: &'static str,
    /// CodeMeaning.
    pub meaning: &'static str,
}

/// One segment of the output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// SegmentNumber.
    pub number: u16,
    /// The label-map value it holds.
    pub label_value: u8,
    /// SegmentLabel.
    pub label: &'static str,
    /// SegmentDescription.
    pub description: &'static str,
    /// SegmentedPropertyTypeCodeSequence.
    pub property: Code,
    /// Display colour, sRGB.
    pub rgb: [u8; 3],
}

const ABNORMAL: Code = Code { value: "49755003", scheme: "SCT", meaning: "Morphologically Abnormal Structure" };
const BRAIN: Code = Code { value: "12738006", scheme: "SCT", meaning: "Brain" };
const AI: Code = Code { value: "123110", scheme: "DCM", meaning: "Artificial Intelligence" };

/// The BraTS segments (label map 1/2/4), CID 7168 codes and MHub/SegDB colours.
pub const BRATS_SEGMENTS: [Segment; 3] = [
    Segment {
        number: 1,
        label_value: 1,
        label: "NCR",
        description: "Necrotic and non-enhancing tumour core (BraTS label 1)",
        property: Code { value: "6574001", scheme: "SCT", meaning: "Necrosis" },
        rgb: [216, 191, 216],
    },
    Segment {
        number: 2,
        label_value: 2,
        label: "ED",
        description: "Peritumoral edema (BraTS label 2)",
        property: Code { value: "79654002", scheme: "SCT", meaning: "Edema" },
        rgb: [140, 224, 228],
    },
    Segment {
        number: 3,
        label_value: 4,
        label: "ET",
        description: "Enhancing tumour (BraTS label 4)",
        property: Code { value: "C113842", scheme: "NCIt", meaning: "Enhancing Lesion" },
        rgb: [128, 174, 128],
    },
];

/// What the SEG says about its maker.
#[derive(Debug, Clone)]
pub struct SegOptions {
    /// SeriesNumber of the new series.
    pub series_number: i32,
    /// SeriesDescription.
    pub series_description: String,
    /// Manufacturer (also how our own SEGs are recognised when they come back).
    pub manufacturer: String,
    /// AlgorithmName and ManufacturerModelName: the model's name.
    pub algorithm_name: String,
    /// AlgorithmVersion: the model's version.
    pub algorithm_version: String,
    /// SoftwareVersions: this build and the model digest prefix.
    pub software_versions: String,
}

impl Default for SegOptions {
    fn default() -> Self {
        SegOptions {
            series_number: 900,
            series_description: format!("BraTS tumour segmentation ({})", crate::study::PROCESSING_NOTE),
            manufacturer: MANUFACTURER.into(),
            algorithm_name: "SegResNet".into(),
            algorithm_version: "unknown".into(),
            software_versions: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// The Manufacturer our objects carry.
pub const MANUFACTURER: &str = "brats-platform";

/// Patient, study and frame-of-reference attributes copied verbatim from the T1c.
pub(crate) const COPIED: [Tag; 17] = [
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::PATIENT_AGE,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_DESCRIPTION,
    tags::FRAME_OF_REFERENCE_UID,
    tags::POSITION_REFERENCE_INDICATOR,
    tags::CLINICAL_TRIAL_SUBJECT_ID,
];

/// Type 2 attributes that must be present, empty if the source lacks them.
pub(crate) const REQUIRED_EMPTY: [Tag; 9] = [
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
];

/// A written SEG: its bytes and identity.
#[derive(Debug, Clone)]
pub struct WrittenSeg {
    /// The Part 10 file.
    pub bytes: Vec<u8>,
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// SOPInstanceUID.
    pub sop_instance_uid: String,
    /// Frames written.
    pub frames: usize,
    /// Voxels per segment (NCR, ED, ET).
    pub voxels: [usize; 3],
}

/// Writes the label map `label` (C order on the T1c's canonical grid: see
/// [`crate::study::StudyVolumes::t1c_grid`]) as a SEG. `sources` are the four chosen series,
/// T1c first.
pub fn write_seg(label: &[u8], sources: &[RoleSeries], options: &SegOptions) -> Result<WrittenSeg, DicomError> {
    let t1c = &sources[0];
    let stack = &t1c.stack;
    let layout = stack.layout();
    let (rows, columns, slices) = (stack.rows, stack.columns, stack.slices.len());
    let plane = rows * columns;
    if label.len() != plane * slices {
        return Err(DicomError::Label(format!("{} voxels where the T1c grid has {}", label.len(), plane * slices)));
    }
    if let Some(v) = label.iter().find(|v| !matches!(v, 0 | 1 | 2 | 4)) {
        return Err(DicomError::Label(format!("value {v} is not a BraTS label (0, 1, 2, 4)")));
    }
    let native = layout.to_native(label);
    let header = t1c_header(t1c)?;

    // Frames: (segment, slice index) with their masks.
    let mut voxels = [0usize; 3];
    let mut frames: Vec<(usize, usize)> = Vec::new();
    for (si, seg) in BRATS_SEGMENTS.iter().enumerate() {
        for s in 0..slices {
            let n = native[s * plane..(s + 1) * plane].iter().filter(|&&v| v == seg.label_value).count();
            voxels[si] += n;
            if n > 0 {
                frames.push((si, s));
            }
        }
    }
    if frames.is_empty() {
        frames = (0..3).flat_map(|si| (0..slices).map(move |s| (si, s))).collect();
    }

    // Identity: a hash of the sources, the algorithm and the label map.
    let mut h = Sha256::new();
    for src in sources {
        h.update(src.series.uid.as_bytes());
        h.update([0]);
    }
    h.update(options.algorithm_name.as_bytes());
    h.update(options.algorithm_version.as_bytes());
    h.update(label);
    let key = h.finalize();
    let uid = |purpose: &str| derived_uid(&key, purpose);
    let series_uid = uid("series");
    let sop_instance_uid = uid("instance");

    // Same-position slices of the other series, for each T1c slice.
    let sources_at = |s: usize| -> Vec<InMemDicomObject> {
        let p = stack.slices[s].position;
        let mut out = Vec::new();
        for (k, src) in sources.iter().enumerate() {
            let found = if k == 0 {
                Some(&src.stack.slices[s])
            } else {
                src.stack.slices.iter().find(|o| {
                    let d = [o.position[0] - p[0], o.position[1] - p[1], o.position[2] - p[2]];
                    dot(d, d).sqrt() < 1e-3
                })
            };
            if let Some(slice) = found {
                let inst = &src.series.instances[slice.instance];
                let mut item = Ds::new();
                item.str(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &inst.sop_class);
                item.str(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &inst.sop_instance);
                if inst.enhanced {
                    item.is(tags::REFERENCED_FRAME_NUMBER, slice.frame as i64 + 1);
                }
                item.seq(
                    tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                    vec![code(Code {
                        value: "121322",
                        scheme: "DCM",
                        meaning: "Source image for image processing operation",
                    })],
                );
                item.str(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES");
                out.push(item.0);
            }
        }
        out
    };

    let mut referenced: Vec<Vec<(String, String)>> = vec![Vec::new(); sources.len()];
    let mut per_frame = Vec::with_capacity(frames.len());
    let mut pixel_bits = vec![0u8; (frames.len() * plane).div_ceil(8)];
    for (f, &(si, s)) in frames.iter().enumerate() {
        let mask = &native[s * plane..(s + 1) * plane];
        let value = BRATS_SEGMENTS[si].label_value;
        for (i, &v) in mask.iter().enumerate() {
            if v == value {
                let bit = f * plane + i;
                pixel_bits[bit / 8] |= 1 << (bit % 8);
            }
        }
        let source_items = sources_at(s);
        for item in &source_items {
            let class = crate::values::text(item, tags::REFERENCED_SOP_CLASS_UID).unwrap_or_default();
            let inst = crate::values::text(item, tags::REFERENCED_SOP_INSTANCE_UID).unwrap_or_default();
            if let Some(k) = sources.iter().position(|src| src.series.instances.iter().any(|i| i.sop_instance == inst))
                && !referenced[k].iter().any(|(_, i)| *i == inst)
            {
                referenced[k].push((class, inst));
            }
        }
        let mut derivation = Ds::new();
        derivation.seq(
            tags::DERIVATION_CODE_SEQUENCE,
            vec![code(Code { value: "113076", scheme: "DCM", meaning: "Segmentation" })],
        );
        derivation.seq(tags::SOURCE_IMAGE_SEQUENCE, source_items);
        let mut content = Ds::new();
        content.ul(tags::DIMENSION_INDEX_VALUES, &[BRATS_SEGMENTS[si].number as u32, s as u32 + 1]);
        let mut position = Ds::new();
        position.ds(tags::IMAGE_POSITION_PATIENT, &stack.slices[s].position);
        let mut ident = Ds::new();
        ident.us(tags::REFERENCED_SEGMENT_NUMBER, &[BRATS_SEGMENTS[si].number]);
        let mut group = Ds::new();
        group.seq(tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation.0]);
        group.seq(tags::FRAME_CONTENT_SEQUENCE, vec![content.0]);
        group.seq(tags::PLANE_POSITION_SEQUENCE, vec![position.0]);
        group.seq(tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![ident.0]);
        per_frame.push(group.0);
    }
    if pixel_bits.len() % 2 == 1 {
        pixel_bits.push(0);
    }

    let mut ds = Ds::new();
    copy_patient_study(&header, &mut ds);
    let (date, time) = now();
    ds.str(tags::SOP_CLASS_UID, VR::UI, uids::SEGMENTATION_STORAGE);
    ds.str(tags::SOP_INSTANCE_UID, VR::UI, &sop_instance_uid);
    ds.str(tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    ds.str(tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    ds.str(tags::MODALITY, VR::CS, "SEG");
    ds.str(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    ds.is(tags::SERIES_NUMBER, options.series_number as i64);
    ds.str(tags::SERIES_DESCRIPTION, VR::LO, &truncate(&options.series_description, 64));
    ds.str(tags::SERIES_DATE, VR::DA, &date);
    ds.str(tags::SERIES_TIME, VR::TM, &time);
    ds.str(tags::MANUFACTURER, VR::LO, &options.manufacturer);
    ds.str(tags::MANUFACTURER_MODEL_NAME, VR::LO, &truncate(&options.algorithm_name, 64));
    ds.str(tags::DEVICE_SERIAL_NUMBER, VR::LO, "1");
    ds.str(tags::SOFTWARE_VERSIONS, VR::LO, &truncate(&options.software_versions, 64));
    ds.is(tags::INSTANCE_NUMBER, 1);
    ds.str(tags::CONTENT_DATE, VR::DA, &date);
    ds.str(tags::CONTENT_TIME, VR::TM, &time);
    ds.str(tags::CONTENT_LABEL, VR::CS, "BRATS");
    ds.str(tags::CONTENT_DESCRIPTION, VR::LO, "BraTS tumour sub-regions");
    ds.0.put(DataElement::new(tags::CONTENT_CREATOR_NAME, VR::PN, PrimitiveValue::Empty));
    ds.0.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, dicom_value!(Strs, ["DERIVED", "PRIMARY"])));
    ds.us(tags::SAMPLES_PER_PIXEL, &[1]);
    ds.str(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    ds.us(tags::ROWS, &[rows as u16]);
    ds.us(tags::COLUMNS, &[columns as u16]);
    ds.us(tags::BITS_ALLOCATED, &[1]);
    ds.us(tags::BITS_STORED, &[1]);
    ds.us(tags::HIGH_BIT, &[0]);
    ds.us(tags::PIXEL_REPRESENTATION, &[0]);
    ds.str(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    ds.str(tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
    ds.str(tags::SEGMENTS_OVERLAP, VR::CS, "NO");
    ds.is(tags::NUMBER_OF_FRAMES, frames.len() as i64);

    let mut equipment = Ds::new();
    equipment.seq(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code(Code { value: "109102", scheme: "DCM", meaning: "Processing Equipment" })],
    );
    equipment.str(tags::MANUFACTURER, VR::LO, &options.manufacturer);
    equipment.str(tags::MANUFACTURER_MODEL_NAME, VR::LO, &truncate(&options.algorithm_name, 64));
    equipment.str(tags::SOFTWARE_VERSIONS, VR::LO, &truncate(&options.software_versions, 64));
    ds.seq(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, vec![equipment.0]);

    let segments = BRATS_SEGMENTS
        .iter()
        .map(|seg| {
            let mut item = Ds::new();
            item.us(tags::SEGMENT_NUMBER, &[seg.number]);
            item.str(tags::SEGMENT_LABEL, VR::LO, seg.label);
            item.str(tags::SEGMENT_DESCRIPTION, VR::ST, seg.description);
            item.str(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC");
            item.str(tags::SEGMENT_ALGORITHM_NAME, VR::LO, &truncate(&options.algorithm_name, 64));
            let mut algorithm = Ds::new();
            algorithm.seq(tags::ALGORITHM_FAMILY_CODE_SEQUENCE, vec![code(AI)]);
            algorithm.str(tags::ALGORITHM_NAME, VR::LO, &truncate(&options.algorithm_name, 64));
            algorithm.str(tags::ALGORITHM_VERSION, VR::LO, &truncate(&options.algorithm_version, 64));
            item.seq(tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE, vec![algorithm.0]);
            item.seq(tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE, vec![code(ABNORMAL)]);
            item.seq(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![code(seg.property)]);
            item.seq(tags::ANATOMIC_REGION_SEQUENCE, vec![code(BRAIN)]);
            item.us(tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE, &cie_lab(seg.rgb));
            item.0
        })
        .collect();
    ds.seq(tags::SEGMENT_SEQUENCE, segments);

    let organisation = uid("dimensions");
    let mut org = Ds::new();
    org.str(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &organisation);
    ds.seq(tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org.0]);
    ds.str(tags::DIMENSION_ORGANIZATION_TYPE, VR::CS, "3D");
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        let mut d = Ds::new();
        d.str(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &organisation);
        d.at(tags::DIMENSION_INDEX_POINTER, pointer);
        d.at(tags::FUNCTIONAL_GROUP_POINTER, group);
        d.str(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label);
        d.0
    };
    ds.seq(
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dimension(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "ReferencedSegmentNumber",
            ),
            dimension(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE, "ImagePositionPatient"),
        ],
    );

    let mut shared = Ds::new();
    let mut orientation = Ds::new();
    orientation.ds(tags::IMAGE_ORIENTATION_PATIENT, &stack.orientation);
    shared.seq(tags::PLANE_ORIENTATION_SEQUENCE, vec![orientation.0]);
    let mut measures = Ds::new();
    measures.ds(tags::PIXEL_SPACING, &stack.spacing);
    measures.ds(tags::SLICE_THICKNESS, &[stack.step_mm]);
    measures.ds(tags::SPACING_BETWEEN_SLICES, &[stack.step_mm]);
    shared.seq(tags::PIXEL_MEASURES_SEQUENCE, vec![measures.0]);
    ds.seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared.0]);
    ds.seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame);

    let series_refs = sources
        .iter()
        .zip(&referenced)
        .filter(|(_, refs)| !refs.is_empty())
        .map(|(src, refs)| {
            let mut item = Ds::new();
            item.str(tags::SERIES_INSTANCE_UID, VR::UI, &src.series.uid);
            let instances = refs
                .iter()
                .map(|(class, inst)| {
                    let mut r = Ds::new();
                    r.str(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class);
                    r.str(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, inst);
                    r.0
                })
                .collect();
            item.seq(tags::REFERENCED_INSTANCE_SEQUENCE, instances);
            item.0
        })
        .collect();
    ds.seq(tags::REFERENCED_SERIES_SEQUENCE, series_refs);
    ds.0.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixel_bits)));

    let file =
        ds.0.with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
            .map_err(|e| DicomError::Encode(e.to_string()))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).map_err(|e| DicomError::Encode(e.to_string()))?;
    Ok(WrittenSeg { bytes, series_uid, sop_instance_uid, frames: frames.len(), voxels })
}

/// Copies the patient, study and frame-of-reference attributes of `header` (the T1c's) into
/// `ds`, and puts the type 2 ones it lacks, empty.
pub(crate) fn copy_patient_study(header: &InMemDicomObject, ds: &mut Ds) {
    for tag in COPIED {
        if let Some(e) = header.element_opt(tag).ok().flatten() {
            ds.0.put(e.clone());
        }
    }
    for tag in REQUIRED_EMPTY.iter().chain([&tags::POSITION_REFERENCE_INDICATOR]) {
        if ds.0.element_opt(*tag).ok().flatten().is_none() {
            let vr = match *tag {
                tags::PATIENT_NAME | tags::REFERRING_PHYSICIAN_NAME => VR::PN,
                tags::PATIENT_BIRTH_DATE | tags::STUDY_DATE => VR::DA,
                tags::STUDY_TIME => VR::TM,
                tags::PATIENT_SEX => VR::CS,
                tags::STUDY_ID | tags::ACCESSION_NUMBER => VR::SH,
                _ => VR::LO,
            };
            ds.0.put(DataElement::new(*tag, vr, PrimitiveValue::Empty));
        }
    }
}

/// The header (up to the pixel data) of the T1c's first slice: where the copied patient and
/// study attributes come from.
pub(crate) fn t1c_header(t1c: &RoleSeries) -> Result<InMemDicomObject, DicomError> {
    OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(&t1c.series.instances[t1c.stack.slices[0].instance].path)
        .map(|file| file.into_inner())
        .map_err(|e| DicomError::Encode(format!("re-reading the T1c header: {e}")))
}

/// A `2.25.` UID derived from `key` and `purpose`: the same inputs give the same UID.
pub(crate) fn derived_uid(key: &[u8], purpose: &str) -> String {
    let d = Sha256::new().chain_update(key).chain_update(purpose.as_bytes()).finalize();
    format!("2.25.{}", u128::from_be_bytes(d[..16].try_into().expect("16 bytes")) >> 1)
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

pub(crate) fn code(c: Code) -> InMemDicomObject {
    let mut item = Ds::new();
    item.str(tags::CODE_VALUE, VR::SH, c.value);
    item.str(tags::CODING_SCHEME_DESIGNATOR, VR::SH, c.scheme);
    item.str(tags::CODE_MEANING, VR::LO, c.meaning);
    item.0
}

/// Today's date and the time (UTC) in DICOM DA/TM form.
pub(crate) fn now() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = brats_volume::time::civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    (format!("{y:04}{m:02}{d:02}"), format!("{:02}{:02}{:02}", t / 3600, t / 60 % 60, t % 60))
}

/// sRGB (0–255) → DICOM's scaled CIELab (PS3.3 C.10.7.1.1): L* 0–100 → 0–65535,
/// a*, b* −128–127 → 0–65535; D65 white.
pub fn cie_lab(rgb: [u8; 3]) -> [u16; 3] {
    let lin = rgb.map(|c| {
        let c = c as f64 / 255.0;
        if c <= 0.04045 { c / 12.92 } else { ((c + 0.055) / 1.055).powf(2.4) }
    });
    let x = 0.4124564 * lin[0] + 0.3575761 * lin[1] + 0.1804375 * lin[2];
    let y = 0.2126729 * lin[0] + 0.7151522 * lin[1] + 0.0721750 * lin[2];
    let z = 0.0193339 * lin[0] + 0.1191920 * lin[1] + 0.9503041 * lin[2];
    let f = |t: f64| if t > 0.008856 { t.cbrt() } else { 7.787 * t + 16.0 / 116.0 };
    let (fx, fy, fz) = (f(x / 0.95047), f(y), f(z / 1.08883));
    let (l, a, b) = (116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz));
    [
        (l / 100.0 * 65535.0).round().clamp(0.0, 65535.0) as u16,
        ((a + 128.0) / 255.0 * 65535.0).round().clamp(0.0, 65535.0) as u16,
        ((b + 128.0) / 255.0 * 65535.0).round().clamp(0.0, 65535.0) as u16,
    ]
}

/// A data set under construction, with typed setters.
pub(crate) struct Ds(pub(crate) InMemDicomObject);

impl Ds {
    pub(crate) fn new() -> Self {
        Ds(InMemDicomObject::new_empty())
    }
    pub(crate) fn str(&mut self, tag: Tag, vr: VR, v: &str) {
        self.0.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }
    pub(crate) fn is(&mut self, tag: Tag, v: i64) {
        self.0.put(DataElement::new(tag, VR::IS, PrimitiveValue::from(v.to_string())));
    }
    pub(crate) fn ds(&mut self, tag: Tag, v: &[f64]) {
        let s: Vec<String> = v.iter().map(|&x| decimal_string(x)).collect();
        self.0.put(DataElement::new(tag, VR::DS, PrimitiveValue::Strs(s.into())));
    }
    pub(crate) fn us(&mut self, tag: Tag, v: &[u16]) {
        self.0.put(DataElement::new(tag, VR::US, PrimitiveValue::U16(v.iter().copied().collect())));
    }
    pub(crate) fn ul(&mut self, tag: Tag, v: &[u32]) {
        self.0.put(DataElement::new(tag, VR::UL, PrimitiveValue::U32(v.iter().copied().collect())));
    }
    pub(crate) fn at(&mut self, tag: Tag, v: Tag) {
        self.0.put(DataElement::new(tag, VR::AT, PrimitiveValue::Tags([v].into_iter().collect())));
    }
    pub(crate) fn seq(&mut self, tag: Tag, items: Vec<InMemDicomObject>) {
        self.0.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
    }
}

/// A DS value in at most 16 characters, as precise as fits.
pub fn decimal_string(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v }; // no "-0"
    for precision in (0..=10).rev() {
        let mut s = format!("{v:.precision$}");
        if s.contains('.') {
            s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        }
        if s == "-0" {
            s = "0".into();
        }
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{v:.6e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        assert_eq!(decimal_string(1.0), "1");
        assert_eq!(decimal_string(-0.0), "0");
        assert_eq!(decimal_string(0.5), "0.5");
        assert_eq!(decimal_string(-119.123456789012), "-119.123456789");
        assert!(decimal_string(-1234567.123456789).len() <= 16);
        assert_eq!(decimal_string(1e-12), "0");
    }

    #[test]
    fn cie_lab_of_white_and_black() {
        assert_eq!(cie_lab([255, 255, 255]), [65535, 32896, 32896]);
        assert_eq!(cie_lab([0, 0, 0])[0], 0);
    }
}
