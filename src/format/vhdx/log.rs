//! The VHDX log (MS-VHDX 2.3): entries, the active-sequence search, replay,
//! and encoding of new entries. Replay writes through the `Storage` trait,
//! so the same code replays on disk or into an in-memory overlay.

use uuid::Uuid;

use super::{crc_with_zeroed, guid, put_guid};
use crate::format::{le_u32, le_u64};
use crate::io::Storage;

pub const SECTOR: u64 = 4096;
const ENTRY_SIG: &[u8; 4] = b"loge";
const DESC_SIG: &[u8; 4] = b"desc";
const ZERO_SIG: &[u8; 4] = b"zero";
const DATA_SIG: &[u8; 4] = b"data";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Descriptor {
    /// Write `data` (a full 4 KiB sector) at `file_offset`.
    Data { file_offset: u64, data: Vec<u8> },
    /// Write `length` zero bytes at `file_offset`.
    Zero { file_offset: u64, length: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Log-relative offset of this entry.
    pub position: u64,
    pub length: u32,
    pub tail: u32,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub descriptors: Vec<Descriptor>,
}

/// Descriptor sectors for `count` descriptors: the first sector holds the
/// 64-byte header and 126 descriptors, later ones 128 each.
pub fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(128)
}

/// Parses and validates the entry at `pos` of `log`. `None` if invalid.
pub fn parse_entry(log: &[u8], pos: u64, log_guid: &Uuid) -> Option<Entry> {
    let p = pos as usize;
    let head = log.get(p..p + SECTOR as usize)?;
    if &head[..4] != ENTRY_SIG {
        return None;
    }
    let length = le_u32(head, 8);
    let tail = le_u32(head, 12);
    let sequence = le_u64(head, 16);
    let count = u64::from(le_u32(head, 24));
    if length == 0
        || length as usize > log.len() / 2
        || u64::from(length) % SECTOR != 0
        || !(tail as u64).is_multiple_of(SECTOR)
    {
        return None;
    }
    if guid(&head[32..]) != *log_guid || sequence == 0 {
        return None;
    }
    let desc_sectors = descriptor_sectors(count);
    let whole = log.get(p..p + length as usize)?;
    if crc_with_zeroed(whole, 4) != le_u32(head, 4) {
        return None;
    }
    let mut data_sector = desc_sectors;
    let mut descriptors = Vec::new();
    for i in 0..count {
        let at = (64 + 32 * i) as usize;
        let d = &whole[at..at + 32];
        if le_u64(d, 24) != sequence {
            return None;
        }
        let file_offset = le_u64(d, 16);
        if &d[..4] == ZERO_SIG {
            let length = le_u64(d, 8);
            if !length.is_multiple_of(SECTOR) || !file_offset.is_multiple_of(SECTOR) {
                return None;
            }
            descriptors.push(Descriptor::Zero {
                file_offset,
                length,
            });
        } else if &d[..4] == DESC_SIG {
            let at = (data_sector * SECTOR) as usize;
            let s = whole.get(at..at + SECTOR as usize)?;
            if &s[..4] != DATA_SIG
                || le_u32(s, 4) != (sequence >> 32) as u32
                || le_u32(s, 4092) != sequence as u32
                || !file_offset.is_multiple_of(SECTOR)
            {
                return None;
            }
            let mut data = s.to_vec();
            data[..8].copy_from_slice(&d[8..16]);
            data[4092..].copy_from_slice(&d[4..8]);
            descriptors.push(Descriptor::Data { file_offset, data });
            data_sector += 1;
        } else {
            return None;
        }
    }
    if data_sector * SECTOR > u64::from(length) {
        return None;
    }
    Some(Entry {
        position: pos,
        length,
        tail,
        sequence,
        flushed_file_offset: le_u64(head, 48),
        last_file_offset: le_u64(head, 56),
        descriptors,
    })
}

/// Finds the active sequence (MS-VHDX 2.3.3): the complete sequence whose
/// head has the highest sequence number. Returns its entries, tail first.
pub fn active_sequence(log: &[u8], log_guid: &Uuid) -> Option<Vec<Entry>> {
    let len = log.len() as u64;
    // Entries may wrap around the end of the ring: parse from a doubled copy.
    let ring = log.repeat(2);
    let log = ring.as_slice();
    let mut best: Option<Vec<Entry>> = None;
    let mut start = 0u64;
    while start < len {
        let mut seq: Vec<Entry> = Vec::new();
        let mut pos = start;
        while let Some(e) = parse_entry(log, pos, log_guid) {
            if let Some(prev) = seq.last()
                && prev.sequence.checked_add(1) != Some(e.sequence)
            {
                break;
            }
            pos = (pos + u64::from(e.length)) % len;
            seq.push(e);
            if pos == start || seq.len() as u64 > len / SECTOR {
                break;
            }
        }
        if seq.is_empty() {
            start += SECTOR;
            continue;
        }
        // Every prefix whose head's tail points at an entry of the prefix is
        // a complete sequence; keep the one with the highest head.
        for h in 0..seq.len() {
            let head = &seq[h];
            let Some(t) = seq[..=h]
                .iter()
                .position(|e| e.position == u64::from(head.tail))
            else {
                continue;
            };
            let better = best
                .as_ref()
                .is_none_or(|b| b.last().expect("non-empty").sequence < head.sequence);
            if better {
                best = Some(seq[t..=h].to_vec());
            }
        }
        let end: u64 = seq.iter().map(|e| u64::from(e.length)).sum();
        if start + end >= len {
            break;
        }
        start += end;
    }
    best
}

/// Applies a sequence's descriptors to `io`, then extends the file to the
/// head's LastFileOffset. The caller flushes.
pub fn replay(io: &dyn Storage, entries: &[Entry]) -> std::io::Result<()> {
    for e in entries {
        for d in &e.descriptors {
            match d {
                Descriptor::Data { file_offset, data } => io.write_at(data, *file_offset)?,
                Descriptor::Zero {
                    file_offset,
                    length,
                } => {
                    let zeros = vec![0u8; SECTOR as usize * 256];
                    let mut done = 0;
                    while done < *length {
                        let n = (*length - done).min(zeros.len() as u64) as usize;
                        io.write_at(&zeros[..n], file_offset + done)?;
                        done += n as u64;
                    }
                }
            }
        }
    }
    if let Some(head) = entries.last()
        && io.len()? < head.last_file_offset
    {
        io.set_len(head.last_file_offset)?;
    }
    Ok(())
}

/// Encodes one entry holding 4 KiB data sectors. `tail` is the log-relative
/// offset of the sequence's first entry (the entry's own position when each
/// entry is applied before the next is written).
pub fn encode_entry(
    log_guid: &Uuid,
    sequence: u64,
    tail: u32,
    file_size: u64,
    writes: &[(u64, &[u8])],
) -> Vec<u8> {
    let count = writes.len() as u64;
    let desc_sectors = descriptor_sectors(count);
    let length = (desc_sectors + count) * SECTOR;
    let mut b = vec![0u8; length as usize];
    b[..4].copy_from_slice(ENTRY_SIG);
    b[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    put_guid(&mut b[32..], log_guid);
    b[48..56].copy_from_slice(&file_size.to_le_bytes());
    b[56..64].copy_from_slice(&file_size.to_le_bytes());
    for (i, (file_offset, data)) in writes.iter().enumerate() {
        assert_eq!(data.len(), SECTOR as usize, "log data sectors are 4 KiB");
        let d = 64 + 32 * i;
        b[d..d + 4].copy_from_slice(DESC_SIG);
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[..8]);
        b[d + 16..d + 24].copy_from_slice(&file_offset.to_le_bytes());
        b[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        let s = ((desc_sectors + i as u64) * SECTOR) as usize;
        b[s..s + 4].copy_from_slice(DATA_SIG);
        b[s + 4..s + 8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        b[s + 4092..s + 4096].copy_from_slice(&(sequence as u32).to_le_bytes());
    }
    let crc = crc_with_zeroed(&b, 4);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; 4096];
        p[0] = 0xAA;
        p[4095] = 0xBB;
        p
    }

    #[test]
    fn encode_then_parse_restores_leading_and_trailing_bytes() {
        let g = Uuid::from_u128(5);
        let p = page(3);
        let e = encode_entry(&g, 9, 0, 4 << 20, &[(2 << 20, &p)]);
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let seq = active_sequence(&log, &g).unwrap();
        assert_eq!(seq.len(), 1);
        assert_eq!(
            seq[0].descriptors,
            vec![Descriptor::Data {
                file_offset: 2 << 20,
                data: p
            }]
        );
        // A different LogGuid makes the entry invisible.
        assert!(active_sequence(&log, &Uuid::from_u128(6)).is_none());
    }

    #[test]
    fn highest_complete_sequence_wins_and_tail_rule_holds() {
        let g = Uuid::from_u128(5);
        let mut log = vec![0u8; 1 << 20];
        let a = encode_entry(&g, 10, 0, 4 << 20, &[(0x200000, &page(1))]);
        log[..a.len()].copy_from_slice(&a);
        let at = a.len();
        // Entry 11 whose tail points at entry 10: the sequence is 10..11.
        let b = encode_entry(&g, 11, 0, 4 << 20, &[(0x201000, &page(2))]);
        log[at..at + b.len()].copy_from_slice(&b);
        let seq = active_sequence(&log, &g).unwrap();
        assert_eq!(
            seq.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![10, 11]
        );
        // Entry 12 whose tail points nowhere valid is incomplete: ignored.
        let at2 = at + b.len();
        let c = encode_entry(&g, 12, 0x80000, 4 << 20, &[(0x202000, &page(3))]);
        log[at2..at2 + c.len()].copy_from_slice(&c);
        let seq = active_sequence(&log, &g).unwrap();
        assert_eq!(seq.last().unwrap().sequence, 11);
    }

    #[test]
    fn torn_data_sector_invalidates_entry() {
        let g = Uuid::from_u128(5);
        let mut e = encode_entry(&g, 9, 0, 4 << 20, &[(0, &page(1))]);
        e[4096 + 100] ^= 1;
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        assert!(active_sequence(&log, &g).is_none());
    }
}
