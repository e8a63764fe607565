//! The two 4 KiB headers at 64 KiB and 128 KiB.

use uuid::Uuid;

use super::{crc_with_zeroed, guid, put_guid};
use crate::format::{le_u16, le_u32, le_u64};

pub const SIZE: usize = 4096;
pub const SIGNATURE: &[u8; 4] = b"head";

/// Every field (MS-VHDX 2.2.2) as (offset, width): signature, checksum,
/// SequenceNumber, FileWriteGuid, DataWriteGuid, LogGuid, LogVersion,
/// Version, LogLength, LogOffset. `decode` and `encode` use these offsets;
/// a test proves each field is read.
pub const FIELDS: [(u64, usize); 10] = [
    (0, 4),
    (4, 4),
    (8, 8),
    (16, 16),
    (32, 16),
    (48, 16),
    (64, 2),
    (66, 2),
    (68, 4),
    (72, 8),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

/// Why one header slot is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderFault {
    Signature,
    Checksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::Signature => write!(f, "signature is not 'head'"),
            HeaderFault::Checksum { stored, computed } => write!(
                f,
                "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
        }
    }
}

impl Header {
    pub fn decode(b: &[u8]) -> Result<Header, HeaderFault> {
        if &b[..4] != SIGNATURE {
            return Err(HeaderFault::Signature);
        }
        let stored = le_u32(b, 4);
        let computed = crc_with_zeroed(&b[..SIZE], 4);
        if stored != computed {
            return Err(HeaderFault::Checksum { stored, computed });
        }
        Ok(Header {
            sequence: le_u64(b, 8),
            file_write_guid: guid(&b[16..]),
            data_write_guid: guid(&b[32..]),
            log_guid: guid(&b[48..]),
            log_version: le_u16(b, 64),
            version: le_u16(b, 66),
            log_length: le_u32(b, 68),
            log_offset: le_u64(b, 72),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SIZE];
        b[..4].copy_from_slice(SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        put_guid(&mut b[16..], &self.file_write_guid);
        put_guid(&mut b[32..], &self.data_write_guid);
        put_guid(&mut b[48..], &self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc_with_zeroed(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Picks the current header per MS-VHDX 2.2.2: the only valid one, or the
/// valid one with the greater sequence number. Equal sequence numbers are
/// accepted only when the two headers are identical (Disk2VHD writes such
/// pairs); slot 0 is used then. Returns the slot index.
pub fn current(slots: &[Result<Header, HeaderFault>; 2]) -> Option<usize> {
    match (&slots[0], &slots[1]) {
        (Ok(a), Ok(b)) if a.sequence > b.sequence => Some(0),
        (Ok(a), Ok(b)) if b.sequence > a.sequence => Some(1),
        (Ok(a), Ok(b)) if a == b => Some(0),
        (Ok(_), Ok(_)) => None,
        (Ok(_), Err(_)) => Some(0),
        (Err(_), Ok(_)) => Some(1),
        (Err(_), Err(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Header {
        Header {
            sequence: seq,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    /// Changing any field of `FIELDS` (the checksum made right again)
    /// changes what `decode` returns: the table is where the fields are.
    #[test]
    fn every_field_of_the_table_is_read() {
        let h = sample(7);
        for &(off, _) in &FIELDS[2..] {
            let mut b = h.encode();
            b[off as usize] ^= 0x5a;
            let crc = crc_with_zeroed(&b, 4);
            b[4..8].copy_from_slice(&crc.to_le_bytes());
            assert_ne!(Header::decode(&b).unwrap(), h, "field at {off}");
        }
        let mut b = h.encode();
        b[FIELDS[1].0 as usize] ^= 1;
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderFault::Checksum { .. })
        ));
    }

    #[test]
    fn round_trip_at_exact_offsets() {
        let h = sample(7);
        let b = h.encode();
        assert_eq!(&b[0..4], b"head");
        assert_eq!(le_u64(&b, 8), 7);
        assert_eq!(le_u16(&b, 66), 1);
        assert_eq!(le_u32(&b, 68), 1 << 20);
        assert_eq!(le_u64(&b, 72), 1 << 20);
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn checksum_covers_reserved_bytes() {
        let mut b = sample(1).encode();
        b[4000] ^= 1;
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderFault::Checksum { .. })
        ));
    }

    #[test]
    fn current_header_rules() {
        assert_eq!(current(&[Ok(sample(2)), Ok(sample(3))]), Some(1));
        assert_eq!(current(&[Ok(sample(4)), Ok(sample(3))]), Some(0));
        assert_eq!(current(&[Ok(sample(3)), Ok(sample(3))]), Some(0));
        let mut other = sample(3);
        other.data_write_guid = Uuid::from_u128(9);
        assert_eq!(current(&[Ok(sample(3)), Ok(other)]), None);
        assert_eq!(
            current(&[Err(HeaderFault::Signature), Ok(sample(1))]),
            Some(1)
        );
        assert_eq!(
            current(&[Err(HeaderFault::Signature), Err(HeaderFault::Signature)]),
            None
        );
    }
}
