//! MS-VHDX on-disk structures. All integers little-endian, GUIDs in
//! Microsoft's mixed-endian ("bytes_le") order, CRC-32C checksums.

pub mod bat;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region;

use uuid::Uuid;

pub const MIB: u64 = 1 << 20;
pub const KIB64: u64 = 64 * 1024;
pub const FILE_ID_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
pub const REGION_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";

pub fn guid(b: &[u8]) -> Uuid {
    Uuid::from_bytes_le(b[..16].try_into().expect("16 bytes"))
}

pub fn put_guid(b: &mut [u8], g: &Uuid) {
    b[..16].copy_from_slice(&g.to_bytes_le());
}

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub fn crc_with_zeroed(buf: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[at + 4..])
}

/// The file type identifier (first 64 KiB): signature and creator string.
pub fn encode_file_id(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; KIB64 as usize];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    b
}

pub fn decode_creator(b: &[u8]) -> String {
    let units: Vec<u16> = b[8..8 + 512]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}
