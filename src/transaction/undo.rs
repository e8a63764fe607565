//! Undo: writing before-images back. To the start (the first image of
//! each page in the whole journal, the Begin lengths) or to a checkpoint
//! (the first image of each page after it, its lengths).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{FileStorage, Storage};
use crate::journal::{self, Begin, Record, Role};

use crate::failpoint::{Failpoint, failpoint};

/// The VHDX header section (file identifier, both headers, both region tables).
const HEADER_SECTION: u64 = 1 << 20;

/// The page size of before-images, and a page of zeros for ZeroImages.
const PAGE: u64 = 4096;
static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// Whether the 4 KiB at `offset` currently hold a valid VHDX header (false
/// for pages that are not header slots, which are restored after).
fn header_is_valid(io: &FileStorage, offset: u64) -> bool {
    if !crate::format::vhdx::HEADER_OFFSETS.contains(&offset) {
        return true;
    }
    let mut b = vec![0u8; 4096];
    io.read_at(&mut b, offset).is_ok() && crate::format::vhdx::header::Header::decode(&b).is_ok()
}

/// Restores every file to the start (the first image of each page, the
/// starting lengths), then deletes the journal. Applying the same
/// originals again is harmless, so a crash here is recovered by running
/// it again.
pub(crate) fn rollback_all(
    jpath: &Path,
    begin: &Begin,
    paths: &[PathBuf],
    records: &[Record],
) -> Result<()> {
    let lengths: Vec<u64> = begin.files.iter().map(|f| f.length).collect();
    restore(begin, paths, records, &lengths)?;
    journal::remove(jpath)
}

/// For every file the merge writes (the ancestor and re-linked children),
/// writes back the first before-image of each page among `records` that
/// lies below the file's length in `lengths`, then sets that length and
/// flushes. With all records and the Begin lengths this is the start;
/// with the records after a checkpoint and its lengths, that checkpoint.
pub(crate) fn restore(
    begin: &Begin,
    paths: &[PathBuf],
    records: &[Record],
    lengths: &[u64],
) -> Result<()> {
    let mut images: BTreeMap<u32, Vec<(u64, &[u8])>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in records {
        // Each page's first image, as (offset, bytes): a ZeroImage stands
        // for its pages of zeros.
        let pages: Vec<(u32, u64, &[u8])> = match r {
            Record::BeforeImage { file, offset, data } => vec![(*file, *offset, data.as_slice())],
            Record::ZeroImage {
                file,
                offset,
                length,
            } => (0..length.div_ceil(PAGE))
                .map(|k| {
                    let at = offset + k * PAGE;
                    (
                        *file,
                        at,
                        &ZERO_PAGE[..PAGE.min(offset + length - at) as usize],
                    )
                })
                .collect(),
            _ => continue,
        };
        for (file, offset, data) in pages {
            if seen.insert((file, offset))
                && lengths.get(file as usize).is_some_and(|l| offset < *l)
            {
                images.entry(file).or_default().push((offset, data));
            }
        }
    }
    for (i, (f, p)) in begin.files.iter().zip(paths).enumerate() {
        // Merged files are never written before cleanup, so there is
        // nothing to undo in them; leaving them alone also leaves alone
        // what another program may have done to them meanwhile.
        if matches!(f.role, Role::Merged { .. }) {
            continue;
        }
        let list = images.get(&(i as u32)).map(Vec::as_slice).unwrap_or(&[]);
        restore_file(p, list, lengths.get(i).copied().unwrap_or(f.length))?;
    }
    Ok(())
}

fn restore_file(p: &Path, list: &[(u64, &[u8])], length: u64) -> Result<()> {
    let io = FileStorage::open(p, true)?;
    let restore = |off: u64, data: &[u8]| {
        io.write_at(data, off)
            .map_err(|e| Error::io(p, "restoring a before-image", e))
    };
    // The header section first, one page at a time with a flush after
    // each: a crash here then tears at most one of the two VHDX headers,
    // so the next recovery can still tell which file this is.
    // Restore a header that is currently torn before the one that is
    // still valid, so that one valid header survives any single crash.
    let mut head: Vec<&(u64, &[u8])> = list.iter().filter(|(o, _)| *o < HEADER_SECTION).collect();
    head.sort_by_key(|(o, _)| (header_is_valid(&io, *o), *o));
    for (off, data) in head {
        restore(*off, data)?;
        io.flush().map_err(|e| Error::io(p, "flushing", e))?;
    }
    // The rest in record order, runs of adjacent images as one write
    // (they are journaled a page at a time).
    let mut run: (u64, Vec<u8>) = (0, Vec::new());
    for (off, data) in list.iter().filter(|(o, _)| *o >= HEADER_SECTION) {
        if run.1.is_empty() || run.0 + run.1.len() as u64 != *off || run.1.len() >= 1 << 20 {
            if !run.1.is_empty() {
                restore(run.0, &run.1)?;
            }
            run = (*off, Vec::new());
        }
        run.1.extend_from_slice(data);
    }
    if !run.1.is_empty() {
        restore(run.0, &run.1)?;
    }
    failpoint(Failpoint::MidRollback);
    let len = io.len().map_err(|e| Error::io(p, "reading size", e))?;
    if len != length {
        io.set_len(length)
            .map_err(|e| Error::io(p, "restoring the length", e))?;
    }
    io.flush().map_err(|e| Error::io(p, "flushing", e))
}
