//! The metadata region: its table and the system items.

use uuid::Uuid;

use super::{KIB64, guid, put_guid};
use crate::format::{le_u16, le_u32, le_u64};

pub const SIGNATURE: &[u8; 8] = b"metadata";
pub const MAX_ENTRIES: u16 = 2047;

pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const VIRTUAL_DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
pub const LOCATOR_TYPE_VHDX: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

pub const KNOWN_ITEMS: [Uuid; 6] = [
    FILE_PARAMETERS,
    VIRTUAL_DISK_SIZE,
    VIRTUAL_DISK_ID,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
    PARENT_LOCATOR,
];

pub const FLAG_USER: u32 = 1;
pub const FLAG_VIRTUAL_DISK: u32 = 2;
pub const FLAG_REQUIRED: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item: Uuid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

impl MetadataEntry {
    pub fn is_user(&self) -> bool {
        self.flags & FLAG_USER != 0
    }
    pub fn is_required(&self) -> bool {
        self.flags & FLAG_REQUIRED != 0
    }
}

pub fn decode_table(b: &[u8]) -> Result<Vec<MetadataEntry>, String> {
    if &b[..8] != SIGNATURE {
        return Err("signature is not 'metadata'".into());
    }
    let count = le_u16(b, 10);
    if count > MAX_ENTRIES {
        return Err(format!("entry count {count} exceeds {MAX_ENTRIES}"));
    }
    Ok((0..count as usize)
        .map(|i| {
            let e = &b[32 + 32 * i..64 + 32 * i];
            MetadataEntry {
                item: guid(e),
                offset: le_u32(e, 16),
                length: le_u32(e, 20),
                flags: le_u32(e, 24),
            }
        })
        .collect())
}

pub fn encode_table(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; KIB64 as usize];
    b[..8].copy_from_slice(SIGNATURE);
    b[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = 32 + 32 * i;
        put_guid(&mut b[at..], &e.item);
        b[at + 16..at + 20].copy_from_slice(&e.offset.to_le_bytes());
        b[at + 20..at + 24].copy_from_slice(&e.length.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&e.flags.to_le_bytes());
    }
    b
}

/// File Parameters item (8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileParameters {
    pub block_size: u32,
    pub leave_block_allocated: bool,
    pub has_parent: bool,
}

impl FileParameters {
    pub fn decode(b: &[u8]) -> FileParameters {
        let flags = le_u32(b, 4);
        FileParameters {
            block_size: le_u32(b, 0),
            leave_block_allocated: flags & 1 != 0,
            has_parent: flags & 2 != 0,
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b[..4].copy_from_slice(&self.block_size.to_le_bytes());
        let flags = u32::from(self.leave_block_allocated) | (u32::from(self.has_parent) << 1);
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b
    }
}

pub fn decode_u64(b: &[u8]) -> u64 {
    le_u64(b, 0)
}
pub fn decode_u32(b: &[u8]) -> u32 {
    le_u32(b, 0)
}

/// Parent locator: a type GUID and UTF-16LE key/value pairs, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: &str) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value.to_string(),
            None => self.entries.push((key.to_string(), value.to_string())),
        }
    }

    pub fn decode(b: &[u8]) -> Result<ParentLocator, String> {
        if b.len() < 20 {
            return Err(format!(
                "item is {} bytes, shorter than its 20-byte header",
                b.len()
            ));
        }
        let kind = guid(b);
        if kind != LOCATOR_TYPE_VHDX {
            return Err(format!("unknown locator type {kind}"));
        }
        let count = le_u16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(format!(
                "{count} key/value entries do not fit in {} bytes",
                b.len()
            ));
        }
        let text = |off: u32, len: u16| -> Result<String, String> {
            let (off, len) = (off as usize, len as usize);
            if len == 0 || len % 2 != 0 || off + len > b.len() {
                return Err(format!(
                    "key/value at {off} with length {len} is out of bounds"
                ));
            }
            let units: Vec<u16> = b[off..off + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            Ok(String::from_utf16_lossy(&units))
        };
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = &b[20 + 12 * i..32 + 12 * i];
            let key = text(le_u32(e, 0), le_u16(e, 8))?;
            let value = text(le_u32(e, 4), le_u16(e, 10))?;
            entries.push((key, value));
        }
        Ok(ParentLocator { entries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let count = self.entries.len();
        let mut b = vec![0u8; 20 + 12 * count];
        put_guid(&mut b, &LOCATOR_TYPE_VHDX);
        b[18..20].copy_from_slice(&(count as u16).to_le_bytes());
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut put = |s: &str, field: usize| {
                let off = b.len() as u32;
                let bytes: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
                let at = 20 + 12 * i;
                b[at + 4 * field..at + 4 * field + 4].copy_from_slice(&off.to_le_bytes());
                b[at + 8 + 2 * field..at + 10 + 2 * field]
                    .copy_from_slice(&(bytes.len() as u16).to_le_bytes());
                b.extend_from_slice(&bytes);
            };
            put(k, 0);
            put(v, 1);
        }
        b
    }
}

/// Formats a GUID the way the locator stores it: braced, lower case.
pub fn braced(g: &Uuid) -> String {
    format!("{{{g}}}")
}

pub fn parse_braced(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_round_trip_offsets_from_item_start() {
        let mut l = ParentLocator::default();
        l.set("parent_linkage", "{00000000-0000-0000-0000-000000000001}");
        l.set("relative_path", ".\\base.vhdx");
        let b = l.encode();
        // First key starts right after the header and two 12-byte entries.
        assert_eq!(le_u32(&b, 20), 44);
        assert_eq!(le_u16(&b, 28), 28);
        assert_eq!(ParentLocator::decode(&b).unwrap(), l);
        assert_eq!(
            parse_braced(l.get("parent_linkage").unwrap()),
            Some(Uuid::from_u128(1))
        );
    }

    #[test]
    fn file_parameters_flags() {
        let p = FileParameters {
            block_size: 32 << 20,
            leave_block_allocated: false,
            has_parent: true,
        };
        let b = p.encode();
        assert_eq!(le_u32(&b, 4), 2);
        assert_eq!(FileParameters::decode(&b), p);
    }
}
