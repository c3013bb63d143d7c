//! The quick-look picture as a DICOM Secondary Capture image, for PACS viewers that do not
//! render SEG: one RGB instance (axial, coronal and sagittal panels, labels in the SEG's
//! colours; see `brats_volume::overlay`) in its own series of the T1c's study, patient and
//! study attributes copied from the T1c.

use crate::error::DicomError;
use crate::seg::{Ds, copy_patient_study, derived_uid, now, t1c_header, truncate};
use crate::study::RoleSeries;
use brats_volume::overlay::Rgb;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR, dicom_value};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use sha2::{Digest, Sha256};

/// A written Secondary Capture instance.
#[derive(Debug, Clone)]
pub struct WrittenCapture {
    /// The Part 10 file.
    pub bytes: Vec<u8>,
    /// SeriesInstanceUID.
    pub series_uid: String,
}

/// Writes `picture` as an RGB Secondary Capture in the T1c's study (`t1c` is the chosen T1c
/// series). `series_number` and `manufacturer` as for the SEG; UIDs are a hash of the T1c
/// series and the picture, so the same result gives the same object.
pub fn write_secondary_capture(
    picture: &Rgb,
    t1c: &RoleSeries,
    series_number: i32,
    manufacturer: &str,
) -> Result<WrittenCapture, DicomError> {
    if picture.width == 0 || picture.height == 0 || picture.width > 65535 || picture.height > 65535 {
        return Err(DicomError::Label(format!(
            "a {}×{} picture cannot be a DICOM image",
            picture.width, picture.height
        )));
    }
    let header = t1c_header(t1c)?;
    let key = Sha256::new().chain_update(t1c.series.uid.as_bytes()).chain_update(&picture.pixels).finalize();
    let uid = |purpose: &str| derived_uid(&key, purpose);
    let (series_uid, instance_uid) = (uid("capture-series"), uid("capture-instance"));
    let mut ds = Ds::new();
    copy_patient_study(&header, &mut ds);
    // Secondary Capture has no frame-of-reference module.
    ds.0.remove_element(tags::FRAME_OF_REFERENCE_UID);
    ds.0.remove_element(tags::POSITION_REFERENCE_INDICATOR);
    let (date, time) = now();
    ds.str(tags::SOP_CLASS_UID, VR::UI, uids::SECONDARY_CAPTURE_IMAGE_STORAGE);
    ds.str(tags::SOP_INSTANCE_UID, VR::UI, &instance_uid);
    ds.str(tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    ds.str(tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    ds.str(tags::MODALITY, VR::CS, "OT");
    ds.str(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    ds.is(tags::SERIES_NUMBER, series_number as i64);
    ds.str(tags::SERIES_DESCRIPTION, VR::LO, &truncate("BraTS quick look: labels over T1c (research use)", 64));
    ds.str(tags::MANUFACTURER, VR::LO, manufacturer);
    ds.str(tags::CONVERSION_TYPE, VR::CS, "WSD");
    ds.is(tags::INSTANCE_NUMBER, 1);
    ds.str(tags::CONTENT_DATE, VR::DA, &date);
    ds.str(tags::CONTENT_TIME, VR::TM, &time);
    ds.0.put(DataElement::new(tags::PATIENT_ORIENTATION, VR::CS, PrimitiveValue::Empty));
    // Type 2C in General Series (paired body parts); the panels show both sides: empty.
    ds.0.put(DataElement::new(tags::LATERALITY, VR::CS, PrimitiveValue::Empty));
    ds.0.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, dicom_value!(Strs, ["DERIVED", "SECONDARY"])));
    ds.str(
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        "Axial, coronal and sagittal T1c slices through the tumour; NCR, ED, ET labels blended at half opacity",
    );
    ds.str(tags::BURNED_IN_ANNOTATION, VR::CS, "NO");
    ds.us(tags::SAMPLES_PER_PIXEL, &[3]);
    ds.str(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB");
    ds.us(tags::PLANAR_CONFIGURATION, &[0]);
    ds.us(tags::ROWS, &[picture.height as u16]);
    ds.us(tags::COLUMNS, &[picture.width as u16]);
    ds.us(tags::BITS_ALLOCATED, &[8]);
    ds.us(tags::BITS_STORED, &[8]);
    ds.us(tags::HIGH_BIT, &[7]);
    ds.us(tags::PIXEL_REPRESENTATION, &[0]);
    let mut pixels = picture.pixels.clone();
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    ds.0.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels)));
    let file =
        ds.0.with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
            .map_err(|e| DicomError::Encode(e.to_string()))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).map_err(|e| DicomError::Encode(e.to_string()))?;
    Ok(WrittenCapture { bytes, series_uid })
}
