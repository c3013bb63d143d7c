//! DIMSE command sets (PS3.7 §9, §E): the C-ECHO and C-STORE requests and responses the
//! gateway sends and answers, encoded in Implicit VR Little Endian with their group length,
//! and P-DATA fragmentation.

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType};

/// The Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = uids::VERIFICATION;
/// C-STORE-RQ.
pub const C_STORE_RQ: u16 = 0x0001;
/// C-STORE-RSP.
pub const C_STORE_RSP: u16 = 0x8001;
/// C-ECHO-RQ.
pub const C_ECHO_RQ: u16 = 0x0030;
/// C-ECHO-RSP.
pub const C_ECHO_RSP: u16 = 0x8030;
/// CommandDataSetType when no data set follows.
const NO_DATA_SET: u16 = 0x0101;

/// Status: success.
pub const SUCCESS: u16 = 0x0000;
/// Status: refused, out of resources (disk watermark, write failure).
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Status: error, data set does not match SOP class (unparsable data set).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Status: warning, coercion of data elements (still stored).
pub const WARNING_COERCION: u16 = 0xB000;

/// A parsed command set.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// CommandField.
    pub field: u16,
    /// MessageID (requests) or MessageIDBeingRespondedTo (responses).
    pub message_id: u16,
    /// AffectedSOPClassUID.
    pub sop_class: String,
    /// AffectedSOPInstanceUID (C-STORE).
    pub sop_instance: String,
    /// Whether a data set follows.
    pub has_data_set: bool,
    /// Status (responses).
    pub status: u16,
}

fn implicit_le() -> &'static dicom_encoding::TransferSyntax {
    TransferSyntaxRegistry.get(uids::IMPLICIT_VR_LITTLE_ENDIAN).expect("implicit VR little endian is built in")
}

/// A UID (or other UI/AE value) without the NUL or space padding DICOM adds to even lengths.
pub fn trim_uid(value: &str) -> &str {
    value.trim_end_matches(['\0', ' '])
}

/// Parses a command set; `None` when it is not one.
pub fn parse(bytes: &[u8]) -> Option<Command> {
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, implicit_le()).ok()?;
    let int = |tag| obj.element_opt(tag).ok().flatten().and_then(|e| e.to_int::<u16>().ok());
    let text = |tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| trim_uid(&s).to_string()))
            .unwrap_or_default()
    };
    let field = int(tags::COMMAND_FIELD)?;
    Some(Command {
        field,
        message_id: int(tags::MESSAGE_ID).or_else(|| int(tags::MESSAGE_ID_BEING_RESPONDED_TO)).unwrap_or(0),
        sop_class: text(tags::AFFECTED_SOP_CLASS_UID),
        sop_instance: text(tags::AFFECTED_SOP_INSTANCE_UID),
        has_data_set: int(tags::COMMAND_DATA_SET_TYPE).is_some_and(|t| t != NO_DATA_SET),
        status: int(tags::STATUS).unwrap_or(0),
    })
}

/// Encodes a command set: elements in Implicit VR LE after a computed CommandGroupLength.
fn encode(elements: Vec<(Tag, VR, PrimitiveValue)>) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr, value) in elements {
        obj.put(DataElement::new(tag, vr, value));
    }
    let mut body = Vec::new();
    obj.write_dataset_with_ts(&mut body, implicit_le()).expect("writing to memory cannot fail");
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn ui(v: &str) -> PrimitiveValue {
    // UIDs are padded to even length with NUL.
    let mut s = v.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

/// C-ECHO-RQ.
pub fn echo_request(message_id: u16) -> Vec<u8> {
    encode(vec![
        (tags::AFFECTED_SOP_CLASS_UID, VR::UI, ui(VERIFICATION)),
        (tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_ECHO_RQ)),
        (tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        (tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(NO_DATA_SET)),
    ])
}

/// C-ECHO-RSP (success) to `rq`.
pub fn echo_response(rq: &Command) -> Vec<u8> {
    encode(vec![
        (tags::AFFECTED_SOP_CLASS_UID, VR::UI, ui(VERIFICATION)),
        (tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_ECHO_RSP)),
        (tags::MESSAGE_ID_BEING_RESPONDED_TO, VR::US, PrimitiveValue::from(rq.message_id)),
        (tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(NO_DATA_SET)),
        (tags::STATUS, VR::US, PrimitiveValue::from(SUCCESS)),
    ])
}

/// C-STORE-RQ for one instance.
pub fn store_request(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    encode(vec![
        (tags::AFFECTED_SOP_CLASS_UID, VR::UI, ui(sop_class)),
        (tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_STORE_RQ)),
        (tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        (tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
        (tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(0u16)),
        (tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, ui(sop_instance)),
    ])
}

/// C-STORE-RSP to `rq` with `status`.
pub fn store_response(rq: &Command, status: u16) -> Vec<u8> {
    encode(vec![
        (tags::AFFECTED_SOP_CLASS_UID, VR::UI, ui(&rq.sop_class)),
        (tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_STORE_RSP)),
        (tags::MESSAGE_ID_BEING_RESPONDED_TO, VR::US, PrimitiveValue::from(rq.message_id)),
        (tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(NO_DATA_SET)),
        (tags::STATUS, VR::US, PrimitiveValue::from(status)),
        (tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, ui(&rq.sop_instance)),
    ])
}

/// Splits `bytes` into P-DATA values of at most `max_pdu` bytes per PDU (0: 16 KiB), the last
/// one flagged.
pub fn fragments(context: u8, kind: PDataValueType, bytes: &[u8], max_pdu: u32) -> Vec<PDataValue> {
    let max = if max_pdu == 0 { 16 * 1024 } else { max_pdu as usize };
    // PDU header (6) + PDV item header (6).
    let chunk = max.saturating_sub(12).max(1024);
    let pieces: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(chunk).collect() };
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, data)| PDataValue {
            presentation_context_id: context,
            value_type: kind.clone(),
            is_last: i + 1 == n,
            data: data.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_with_group_length() {
        let rq = store_request(7, uids::MR_IMAGE_STORAGE, "1.2.3");
        let group_length = u32::from_le_bytes(rq[8..12].try_into().unwrap()) as usize;
        assert_eq!(group_length, rq.len() - 12);
        let parsed = parse(&rq).unwrap();
        assert_eq!(parsed.field, C_STORE_RQ);
        assert_eq!(parsed.message_id, 7);
        assert_eq!(parsed.sop_class, uids::MR_IMAGE_STORAGE);
        assert_eq!(parsed.sop_instance, "1.2.3");
        assert!(parsed.has_data_set);
        let rsp = parse(&store_response(&parsed, OUT_OF_RESOURCES)).unwrap();
        assert_eq!(
            (rsp.field, rsp.message_id, rsp.status, rsp.has_data_set),
            (C_STORE_RSP, 7, OUT_OF_RESOURCES, false)
        );
        let echo = parse(&echo_request(3)).unwrap();
        assert_eq!((echo.field, echo.has_data_set), (C_ECHO_RQ, false));
    }

    #[test]
    fn fragments_fit_the_pdu_and_flag_the_last() {
        let data = vec![1u8; 40_000];
        let f = fragments(1, PDataValueType::Data, &data, 16_384);
        assert!(f.iter().all(|p| p.data.len() <= 16_384 - 12));
        assert_eq!(f.iter().map(|p| p.data.len()).sum::<usize>(), 40_000);
        assert!(f.last().unwrap().is_last && f.iter().filter(|p| p.is_last).count() == 1);
    }
}
