//! VHD (2006 spec) on-disk structures: footer, dynamic header, parent
//! locators, BAT entries and block bitmaps. All integers big-endian.

use uuid::Uuid;

use crate::format::{be_u16, be_u32, be_u64};

pub const SECTOR: u64 = 512;
pub const FOOTER_SIZE: usize = 512;
pub const HEADER_SIZE: usize = 1024;
pub const COOKIE: &[u8; 8] = b"conectix";
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Seconds from the Unix epoch to 2000-01-01 00:00 UTC.
pub const TIMESTAMP_BASE: u64 = 946_684_800;
/// Largest VHD: 0xFF000000 sectors (about 2040 GiB).
pub const MAX_SECTORS: u64 = 0xFF00_0000;

pub const TYPE_FIXED: u32 = 2;
pub const TYPE_DYNAMIC: u32 = 3;
pub const TYPE_DIFFERENCING: u32 = 4;

/// Ones' complement of the byte sum, with the checksum field taken as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: u32,
    pub checksum: u32,
    pub unique_id: Uuid,
    pub saved_state: u8,
}

impl Footer {
    /// Decodes without judging the checksum; see [`Footer::checksum_ok`].
    pub fn decode(b: &[u8]) -> Result<Footer, String> {
        if &b[..8] != COOKIE {
            return Err("cookie is not 'conectix'".into());
        }
        Ok(Footer {
            features: be_u32(b, 8),
            version: be_u32(b, 12),
            data_offset: be_u64(b, 16),
            timestamp: be_u32(b, 24),
            creator_app: b[28..32].try_into().expect("4"),
            creator_version: be_u32(b, 32),
            creator_os: b[36..40].try_into().expect("4"),
            original_size: be_u64(b, 40),
            current_size: be_u64(b, 48),
            cylinders: be_u16(b, 56),
            heads: b[58],
            sectors_per_track: b[59],
            disk_type: be_u32(b, 60),
            checksum: be_u32(b, 64),
            unique_id: Uuid::from_bytes(b[68..84].try_into().expect("16")),
            saved_state: b[84],
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(self.unique_id.as_bytes());
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn checksum_ok(raw: &[u8]) -> bool {
        be_u32(raw, 64) == checksum(&raw[..FOOTER_SIZE.min(raw.len())], 64)
    }

    pub fn chs_size(&self) -> u64 {
        u64::from(self.cylinders)
            * u64::from(self.heads)
            * u64::from(self.sectors_per_track)
            * SECTOR
    }

    /// The disk size: current_size, as the spec defines it and as Hyper-V,
    /// Disk2vhd, Xen, libvhdi and dissect read it. (QEMU uses the CHS size
    /// for Virtual PC files; `info` shows both.)
    pub fn disk_size(&self) -> u64 {
        self.current_size
    }
}

/// CHS geometry for a size, per the VHD appendix.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut n = (size / SECTOR).min(65535 * 16 * 255);
    let (spt, heads, ch);
    if n >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        ch = n / 255;
    } else {
        let mut s = 17;
        let mut c = n / 17;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = n / 31;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = n / 63;
        }
        spt = s;
        heads = h;
        ch = c;
    }
    n = ch / heads;
    (n as u16, heads as u8, spt as u8)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    pub code: [u8; 4],
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

/// The fields of the dynamic disk header (VHD spec, "Dynamic Disk Header
/// Format") as (offset, width): cookie, data offset, table offset, header
/// version, max table entries, block size, checksum, parent unique id,
/// parent time stamp, parent name (its start). A test proves each is read.
pub const DYN_HEADER_FIELDS: [(u64, usize); 10] = [
    (0, 8),
    (8, 8),
    (16, 8),
    (24, 4),
    (28, 4),
    (32, 4),
    (36, 4),
    (40, 16),
    (56, 4),
    (64, 16),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_unique_id: Uuid,
    pub parent_timestamp: u32,
    pub parent_name: String,
    pub locators: Vec<Locator>,
}

impl DynHeader {
    pub fn decode(b: &[u8]) -> Result<DynHeader, String> {
        if &b[..8] != DYN_COOKIE {
            return Err("cookie is not 'cxsparse'".into());
        }
        let units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let locators = (0..8)
            .map(|i| {
                let e = &b[576 + 24 * i..600 + 24 * i];
                Locator {
                    code: e[..4].try_into().expect("4"),
                    data_space: be_u32(e, 4),
                    data_length: be_u32(e, 8),
                    data_offset: be_u64(e, 16),
                }
            })
            .collect();
        Ok(DynHeader {
            data_offset: be_u64(b, 8),
            table_offset: be_u64(b, 16),
            version: be_u32(b, 24),
            max_table_entries: be_u32(b, 28),
            block_size: be_u32(b, 32),
            checksum: be_u32(b, 36),
            parent_unique_id: Uuid::from_bytes(b[40..56].try_into().expect("16")),
            parent_timestamp: be_u32(b, 56),
            parent_name: String::from_utf16_lossy(&units),
            locators,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..8].copy_from_slice(DYN_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_unique_id.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().take(8).enumerate() {
            let at = 576 + 24 * i;
            b[at..at + 4].copy_from_slice(&l.code);
            b[at + 4..at + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&l.data_length.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn checksum_ok(raw: &[u8]) -> bool {
        be_u32(raw, 36) == checksum(&raw[..HEADER_SIZE], 36)
    }

    /// Bytes of a block's bitmap: one bit per sector, padded to 512 bytes.
    pub fn bitmap_bytes(&self) -> u64 {
        (u64::from(self.block_size) / SECTOR)
            .div_ceil(8)
            .next_multiple_of(SECTOR)
    }
}

/// Decodes locator data: W2ku/W2ru are UTF-16LE (as Hyper-V and Xen write
/// them), the deprecated Wi2k/Wi2r are single-byte text.
pub fn decode_locator_text(code: &[u8; 4], data: &[u8]) -> Option<String> {
    let s = match code {
        b"W2ku" | b"W2ru" => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16_lossy(&units)
        }
        b"Wi2k" | b"Wi2r" => String::from_utf8_lossy(data)
            .trim_end_matches('\0')
            .to_string(),
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// A count of 512-byte sectors (how BAT entries and locators give file
/// positions and sizes), in bytes.
pub fn sectors_to_bytes(sectors: u32) -> u64 {
    u64::from(sectors) * SECTOR
}

/// MSB-first bitmap test: sector i is bit (7 − i%8) of byte i/8.
pub fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
}

pub fn set_bit(bitmap: &mut [u8], i: u64) {
    bitmap[(i / 8) as usize] |= 0x80 >> (i % 8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changing any field of `DYN_HEADER_FIELDS` but the cookie and the
    /// checksum changes what `decode` returns.
    #[test]
    fn every_dynamic_header_field_of_the_table_is_read() {
        let h = DynHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            version: 0x10000,
            max_table_entries: 32,
            block_size: 2 << 20,
            checksum: 0,
            parent_unique_id: Uuid::from_u128(9),
            parent_timestamp: 5,
            parent_name: "parent.vhd".into(),
            locators: (0..8)
                .map(|_| Locator {
                    code: [0; 4],
                    data_space: 0,
                    data_length: 0,
                    data_offset: 0,
                })
                .collect(),
        };
        let base = DynHeader::decode(&h.encode()).unwrap();
        for (i, &(off, _)) in DYN_HEADER_FIELDS.iter().enumerate() {
            let mut b = h.encode();
            b[off as usize] ^= 0x5a;
            match i {
                0 => assert!(DynHeader::decode(&b).is_err()),
                6 => assert!(!DynHeader::checksum_ok(&b)),
                _ => assert_ne!(DynHeader::decode(&b).unwrap(), base, "field at {off}"),
            }
        }
    }

    #[test]
    fn footer_round_trip_and_checksum() {
        let (c, h, s) = geometry(64 << 20);
        let f = Footer {
            features: 2,
            version: 0x10000,
            data_offset: 512,
            timestamp: 1,
            creator_app: *b"vhdm",
            creator_version: 1,
            creator_os: *b"Wi2k",
            original_size: 64 << 20,
            current_size: 64 << 20,
            cylinders: c,
            heads: h,
            sectors_per_track: s,
            disk_type: TYPE_DYNAMIC,
            checksum: 0,
            unique_id: Uuid::from_u128(3),
            saved_state: 0,
        };
        let b = f.encode();
        assert!(Footer::checksum_ok(&b));
        let mut back = Footer::decode(&b).unwrap();
        back.checksum = 0;
        assert_eq!(back, f);
        assert_eq!(&b[60..64], &[0, 0, 0, 3]);
    }

    #[test]
    fn chs_matches_qemu_for_64mib() {
        // 131072 sectors: 17 sectors per track, 8 heads, 963 cylinders.
        let (c, h, s) = geometry(64 << 20);
        assert_eq!((c, h, s), (963, 8, 17));
    }

    #[test]
    fn msb_first_bits() {
        let mut b = vec![0u8; 2];
        set_bit(&mut b, 0);
        set_bit(&mut b, 9);
        assert_eq!(b, vec![0x80, 0x40]);
        assert!(bit(&b, 9) && !bit(&b, 8));
    }
}
