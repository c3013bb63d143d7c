//! A small, strict reader and writer for the zip container `torch.save` uses.
//!
//! PyTorch (≥ 1.6) writes uncompressed ("stored") entries through miniz, zip64 only for
//! archives beyond 4 GiB. We read the central directory (with zip64 extensions), check every
//! offset against the buffer, refuse compressed entries, and verify each entry's CRC-32 on read.

use crate::error::CheckpointError;

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LFH_SIG: u32 = 0x0403_4b50;
const MAX_ENTRIES: u64 = 1 << 20;

/// One member of the archive.
#[derive(Debug, Clone)]
pub struct ZipEntry {
    /// The member's path inside the archive.
    pub name: String,
    method: u16,
    crc32: u32,
    size: u64,
    data_offset: u64,
}

/// A parsed archive over a borrowed buffer.
#[derive(Debug)]
pub struct ZipArchive<'a> {
    data: &'a [u8],
    entries: Vec<ZipEntry>,
}

fn err(msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Zip(msg.into())
}

fn slice<'a>(data: &'a [u8], off: u64, len: u64, what: &str) -> Result<&'a [u8], CheckpointError> {
    let end = off.checked_add(len).ok_or_else(|| err(format!("{what}: offset overflow")))?;
    if end > data.len() as u64 {
        return Err(err(format!(
            "{what} at byte {off} (+{len}) runs past the end of the file ({} bytes): truncated?",
            data.len()
        )));
    }
    Ok(&data[off as usize..end as usize])
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

impl<'a> ZipArchive<'a> {
    /// Parses the central directory of `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self, CheckpointError> {
        if data.len() < 22 {
            return Err(err("file too short for a zip archive"));
        }
        // The end-of-central-directory record is within the last 22 + 65535 bytes.
        let lowest = data.len().saturating_sub(22 + 0xFFFF);
        let eocd = (lowest..=data.len() - 22)
            .rev()
            .find(|&i| u32_at(data, i) == EOCD_SIG)
            .ok_or_else(|| err("no end-of-central-directory record: truncated or not a zip"))?;
        let e = &data[eocd..];
        let mut n_entries = u16_at(e, 10) as u64;
        let mut cd_size = u32_at(e, 12) as u64;
        let mut cd_offset = u32_at(e, 16) as u64;
        if n_entries == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            let loc = eocd.checked_sub(20).ok_or_else(|| err("zip64 locator missing"))?;
            let l = &data[loc..loc + 20];
            if u32_at(l, 0) != ZIP64_LOCATOR_SIG {
                return Err(err("zip64 locator missing"));
            }
            let z = slice(data, u64_at(l, 8), 56, "zip64 end of central directory")?;
            if u32_at(z, 0) != ZIP64_EOCD_SIG {
                return Err(err("bad zip64 end-of-central-directory signature"));
            }
            n_entries = u64_at(z, 32);
            cd_size = u64_at(z, 40);
            cd_offset = u64_at(z, 48);
        }
        if n_entries > MAX_ENTRIES {
            return Err(err(format!("implausible number of entries: {n_entries}")));
        }
        let cd = slice(data, cd_offset, cd_size, "central directory")?;
        let mut entries = Vec::with_capacity(n_entries as usize);
        let mut p = 0usize;
        for k in 0..n_entries {
            let h = cd.get(p..p + 46).ok_or_else(|| err(format!("central directory entry {k} truncated")))?;
            if u32_at(h, 0) != CDH_SIG {
                return Err(err(format!("bad central directory signature at entry {k}")));
            }
            let method = u16_at(h, 10);
            let crc32 = u32_at(h, 16);
            let mut csize = u32_at(h, 20) as u64;
            let mut usize_ = u32_at(h, 24) as u64;
            let name_len = u16_at(h, 28) as usize;
            let extra_len = u16_at(h, 30) as usize;
            let comment_len = u16_at(h, 32) as usize;
            let mut lho = u32_at(h, 42) as u64;
            let var = cd
                .get(p + 46..p + 46 + name_len + extra_len + comment_len)
                .ok_or_else(|| err(format!("central directory entry {k} truncated")))?;
            let name = std::str::from_utf8(&var[..name_len])
                .map_err(|_| err(format!("entry {k} has a non-UTF-8 name")))?
                .to_string();
            // zip64 extended information: present fields follow in a fixed order.
            let mut extra = &var[name_len..name_len + extra_len];
            while extra.len() >= 4 {
                let id = u16_at(extra, 0);
                let len = u16_at(extra, 2) as usize;
                let body = extra.get(4..4 + len).ok_or_else(|| err(format!("entry {name}: truncated extra field")))?;
                if id == 0x0001 {
                    let mut q = 0;
                    let mut next = |v: &mut u64| -> Result<(), CheckpointError> {
                        if *v == 0xFFFF_FFFF {
                            let b = body
                                .get(q..q + 8)
                                .ok_or_else(|| err(format!("entry {name}: truncated zip64 field")))?;
                            *v = u64_at(b, 0);
                            q += 8;
                        }
                        Ok(())
                    };
                    next(&mut usize_)?;
                    next(&mut csize)?;
                    next(&mut lho)?;
                }
                extra = &extra[4 + len..];
            }
            if method != 0 {
                return Err(err(format!(
                    "entry {name} is compressed (method {method}); torch.save writes stored entries"
                )));
            }
            if csize != usize_ {
                return Err(err(format!("entry {name}: stored entry with compressed size {csize} != size {usize_}")));
            }
            let lh = slice(data, lho, 30, &format!("local header of {name}"))?;
            if u32_at(lh, 0) != LFH_SIG {
                return Err(err(format!("bad local header signature for {name}")));
            }
            let data_offset = lho + 30 + u16_at(lh, 26) as u64 + u16_at(lh, 28) as u64;
            slice(data, data_offset, usize_, &format!("data of {name}"))?;
            entries.push(ZipEntry { name, method, crc32, size: usize_, data_offset });
            p += 46 + name_len + extra_len + comment_len;
        }
        Ok(Self { data, entries })
    }

    /// The members in central-directory order.
    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// The bytes of member `name`, after checking its CRC-32.
    pub fn read(&self, name: &str) -> Result<&'a [u8], CheckpointError> {
        let e = self.entries.iter().find(|e| e.name == name).ok_or_else(|| err(format!("missing entry {name}")))?;
        debug_assert_eq!(e.method, 0);
        let b = slice(self.data, e.data_offset, e.size, &e.name)?;
        if crc32fast::hash(b) != e.crc32 {
            return Err(err(format!("CRC-32 mismatch in entry {name}: corrupted")));
        }
        Ok(b)
    }
}

/// Writes a zip archive of stored entries, each member's data aligned to 64 bytes like
/// PyTorch's writer (so the result can be memory-mapped by `torch.load(mmap=True)`).
pub fn write_stored(entries: &[(String, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32fast::hash(data);
        // Padding in an extra field so that data starts at a multiple of 64.
        let header_len = 30 + name.len() + 4;
        let pad = (64 - (out.len() + header_len) % 64) % 64;
        let extra_len = 4 + pad;
        let mut local = Vec::new();
        local.extend_from_slice(&LFH_SIG.to_le_bytes());
        local.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&(data.len() as u32).to_le_bytes());
        local.extend_from_slice(&(data.len() as u32).to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&(extra_len as u16).to_le_bytes());
        local.extend_from_slice(name.as_bytes());
        local.extend_from_slice(&0x4b46u16.to_le_bytes()); // "FK", PyTorch's padding id
        local.extend_from_slice(&(pad as u16).to_le_bytes());
        local.extend(std::iter::repeat_n(b'Z', pad));
        out.extend_from_slice(&local);
        out.extend_from_slice(data);

        central.extend_from_slice(&CDH_SIG.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // made by, needed, flags, method, time, date
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]); // extra, comment, disk, internal attr, external attr
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&EOCD_SIG.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        write_stored(&[
            ("archive/data.pkl".into(), b"hello".as_slice()),
            ("archive/data/0".into(), &[1u8, 2, 3, 4, 5, 6, 7, 8]),
        ])
    }

    #[test]
    fn round_trip_and_alignment() {
        let z = sample();
        let a = ZipArchive::parse(&z).unwrap();
        assert_eq!(a.entries().len(), 2);
        assert_eq!(a.read("archive/data.pkl").unwrap(), b"hello");
        let e = &a.entries()[1];
        assert_eq!(e.data_offset % 64, 0);
        assert_eq!(a.read("archive/data/0").unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(a.read("nope").is_err());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let z = sample();
        for n in 0..z.len() {
            if let Ok(a) = ZipArchive::parse(&z[..n]) {
                // A truncation that still parses must not yield data past the end.
                for e in a.entries() {
                    let _ = a.read(&e.name);
                }
            }
        }
    }

    #[test]
    fn corrupted_data_fails_the_crc() {
        let mut z = sample();
        let a = ZipArchive::parse(&z).unwrap();
        let off = a.entries()[1].data_offset as usize;
        z[off] ^= 0xFF;
        let a = ZipArchive::parse(&z).unwrap();
        assert!(a.read("archive/data/0").unwrap_err().to_string().contains("CRC"));
    }

    #[test]
    fn every_single_byte_flip_is_handled() {
        let z = sample();
        for i in 0..z.len() {
            let mut c = z.clone();
            c[i] = c[i].wrapping_add(0x55);
            if let Ok(a) = ZipArchive::parse(&c) {
                for e in a.entries() {
                    let _ = a.read(&e.name);
                }
            }
        }
    }
}
