//! TensorBoard event files: `events.out.tfevents.<seconds>.<host>.<pid>`, a sequence of
//! TFRecords (`u64` length, masked CRC-32C of the length, the bytes, masked CRC-32C of the
//! bytes) each holding one `tensorflow.Event` protobuf. The first record carries the file
//! version (`brain.Event:2`); each later one a `Summary` of scalar values (`simple_value`) at a
//! step, the form `torch.utils.tensorboard.SummaryWriter.add_scalar` writes and MONAI's
//! `TensorBoardStatsHandler` uses.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `tensorflow.Event`, the fields scalars need.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// TFRecord's CRC: CRC-32C, rotated and offset so that a CRC of data containing CRCs stays
/// well distributed.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends scalar summaries to one event file, flushed after every write so TensorBoard (and
/// a copy to the object store) sees every step at once.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing) and writes its version record.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let host = hostname();
        let path = dir.join(format!("events.out.tfevents.{seconds}.{host}.{}", std::process::id()));
        let file = File::options().create_new(true).write(true).open(&path)?;
        let mut writer = EventWriter { path, file };
        writer.write(&Event {
            wall_time: wall_time(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `scalars` (tag, value) at `step` as one event.
    pub fn add_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> std::io::Result<()> {
        let value = scalars
            .iter()
            .map(|(tag, v)| SummaryValue { tag: (*tag).to_string(), simple_value: Some(*v as f32) })
            .collect();
        self.write(&Event {
            wall_time: wall_time(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let data = prost::Message::encode_to_vec(event);
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc(&length).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&record)?;
        self.file.flush()
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// This machine's name for the file name (TensorBoard's convention), letters, digits, `-`
/// and `_` only.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).collect();
    if name.is_empty() { "localhost".into() } else { name }
}

/// Reads the scalars back (tag, step, value), checking every record's framing and CRCs.
/// For tests and tools; TensorBoard itself is the reference reader.
pub fn read_scalars(path: &Path) -> std::io::Result<Vec<(String, u64, f32)>> {
    let bytes = std::fs::read(path)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes.get(at..at + 12).ok_or_else(|| bad("truncated record header"))?;
        let length = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc(&header[..8]) != u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) {
            return Err(bad("length CRC mismatch"));
        }
        let data = bytes.get(at + 12..at + 12 + length).ok_or_else(|| bad("truncated record"))?;
        let crc = bytes.get(at + 12 + length..at + 16 + length).ok_or_else(|| bad("truncated record CRC"))?;
        if masked_crc(data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("data CRC mismatch"));
        }
        let event: Event = prost::Message::decode(data).map_err(|e| bad(&e.to_string()))?;
        for v in event.summary.map(|s| s.value).unwrap_or_default() {
            if let Some(x) = v.simple_value {
                out.push((v.tag, event.step as u64, x));
            }
        }
        at += 16 + length;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_with_valid_framing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.add_scalars(1, &[("loss", 0.5), ("lr", 1e-4)]).unwrap();
        w.add_scalars(2, &[("loss", 0.25)]).unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(got, vec![("loss".into(), 1, 0.5), ("lr".into(), 1, 1e-4), ("loss".into(), 2, 0.25)]);
        // The CRC is TFRecord's: the known masked CRC of an empty payload.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        // A flipped byte is caught.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let last = bytes.len() - 5;
        bytes[last] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_scalars(w.path()).is_err());
    }
}
