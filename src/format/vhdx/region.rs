//! The region table (two 64 KiB copies at 192 KiB and 256 KiB).

use uuid::Uuid;

use super::{KIB64, crc_with_zeroed, guid, put_guid};
use crate::format::le_u32;
use crate::format::le_u64;

pub const SIGNATURE: &[u8; 4] = b"regi";
pub const MAX_ENTRIES: u32 = 2047;
pub const BAT_GUID: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_GUID: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Decodes one copy; the error text says which rule failed.
    pub fn decode(b: &[u8]) -> Result<RegionTable, String> {
        if &b[..4] != SIGNATURE {
            return Err("signature is not 'regi'".into());
        }
        let stored = le_u32(b, 4);
        let computed = crc_with_zeroed(&b[..KIB64 as usize], 4);
        if stored != computed {
            return Err(format!(
                "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let count = le_u32(b, 8);
        if count > MAX_ENTRIES {
            return Err(format!("entry count {count} exceeds {MAX_ENTRIES}"));
        }
        let entries = (0..count as usize)
            .map(|i| {
                let e = &b[16 + 32 * i..48 + 32 * i];
                RegionEntry {
                    guid: guid(e),
                    file_offset: le_u64(e, 16),
                    length: le_u32(e, 24),
                    required: le_u32(e, 28) & 1 == 1,
                }
            })
            .collect();
        Ok(RegionTable { entries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; KIB64 as usize];
        b[..4].copy_from_slice(SIGNATURE);
        b[8..12].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = 16 + 32 * i;
            put_guid(&mut b[at..], &e.guid);
            b[at + 16..at + 24].copy_from_slice(&e.file_offset.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
            b[at + 28..at + 32].copy_from_slice(&u32::from(e.required).to_le_bytes());
        }
        let crc = crc_with_zeroed(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn find(&self, g: Uuid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| e.guid == g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_guid_bytes() {
        let t = RegionTable {
            entries: vec![RegionEntry {
                guid: BAT_GUID,
                file_offset: 2 << 20,
                length: 1 << 20,
                required: true,
            }],
        };
        let b = t.encode();
        // The BAT GUID as Hyper-V stores it (formats.md 1.1).
        assert_eq!(
            &b[16..32],
            &[
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(RegionTable::decode(&b).unwrap(), t);
    }
}
