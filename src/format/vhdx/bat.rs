//! BAT geometry and entries (MS-VHDX 2.5): payload-block entries with one
//! sector-bitmap entry interleaved after every `chunk_ratio` of them.

pub const STATE_MASK: u64 = 7;
pub const OFFSET_MASK: u64 = !0xFFFFF;

/// Payload block states.
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
pub const PAYLOAD_UNDEFINED: u8 = 1;
pub const PAYLOAD_ZERO: u8 = 2;
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// VHDX v0.95 wrote UNMAPPED as 5.
pub const PAYLOAD_UNMAPPED_V095: u8 = 5;
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector-bitmap states.
pub const SB_NOT_PRESENT: u8 = 0;
pub const SB_PRESENT: u8 = 6;

pub fn state(entry: u64) -> u8 {
    (entry & STATE_MASK) as u8
}
pub fn offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}
pub fn entry(state: u8, offset: u64) -> u64 {
    (offset & OFFSET_MASK) | u64::from(state)
}

pub fn state_name(s: u8) -> &'static str {
    match s {
        0 => "NOT_PRESENT",
        1 => "UNDEFINED",
        2 => "ZERO",
        3 | 5 => "UNMAPPED",
        6 => "FULLY_PRESENT",
        7 => "PARTIALLY_PRESENT",
        _ => "reserved",
    }
}

/// Sizes that fix the BAT's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector: u64,
}

impl Geometry {
    /// (2^23 × logical sector size) / block size: payload blocks per bitmap block.
    pub fn chunk_ratio(&self) -> u64 {
        ((1u64 << 23) * self.logical_sector) / self.block_size
    }
    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }
    pub fn bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio())
    }
    /// Entries the BAT must hold: differencing files reach the last chunk's
    /// bitmap entry; others end at the last payload entry.
    pub fn entries(&self, differencing: bool) -> u64 {
        let pb = self.payload_blocks();
        let cr = self.chunk_ratio();
        if differencing {
            self.bitmap_blocks() * (cr + 1)
        } else if pb == 0 {
            0
        } else {
            pb + (pb - 1) / cr
        }
    }
    pub fn pb_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio()
    }
    pub fn sb_index(&self, block: u64) -> u64 {
        let cr = self.chunk_ratio();
        (block / cr + 1) * (cr + 1) - 1
    }
    /// Byte offset of a block's slice inside its chunk's 1 MiB bitmap block.
    pub fn bitmap_slice(&self, block: u64) -> (u64, u64) {
        let bytes = self.block_size / (self.logical_sector * 8);
        ((block % self.chunk_ratio()) * bytes, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratios_from_the_spec_table() {
        let g = |bs: u64, ls: u64| Geometry {
            virtual_size: 1 << 40,
            block_size: bs,
            logical_sector: ls,
        };
        assert_eq!(g(1 << 20, 512).chunk_ratio(), 4096);
        assert_eq!(g(32 << 20, 512).chunk_ratio(), 128);
        assert_eq!(g(256 << 20, 512).chunk_ratio(), 16);
        assert_eq!(g(1 << 20, 4096).chunk_ratio(), 32768);
        assert_eq!(g(32 << 20, 4096).chunk_ratio(), 1024);
    }

    #[test]
    fn interleaved_indices() {
        let g = Geometry {
            virtual_size: 300 << 20,
            block_size: 1 << 20,
            logical_sector: 512,
        };
        assert_eq!(g.pb_index(0), 0);
        assert_eq!(g.pb_index(4095), 4095);
        assert_eq!(g.pb_index(4096), 4097);
        assert_eq!(g.sb_index(0), 4096);
        assert_eq!(g.sb_index(4096), 8193);
        assert_eq!(g.entries(false), 300);
        assert_eq!(g.entries(true), 4097);
        let big = Geometry {
            virtual_size: 10 << 30,
            block_size: 1 << 20,
            logical_sector: 512,
        };
        assert_eq!(big.entries(false), 10240 + 2);
    }

    #[test]
    fn entry_encoding() {
        let e = entry(PAYLOAD_FULLY_PRESENT, 5 << 20);
        assert_eq!(state(e), 6);
        assert_eq!(offset(e), 5 << 20);
    }
}
