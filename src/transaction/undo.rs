//! Undo: writing before-images back. To the start (the first image of
//! each page in the whole journal, the Begin lengths) or to a checkpoint
//! (the first image of each page after it, its lengths).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{FileStorage, SharedFile, Storage};
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
    restore(jpath, begin, paths, records, &lengths)?;
    journal::remove(jpath)
}

/// For every file the merge writes (the ancestor and re-linked children),
/// writes back the first before-image of each page among `records` that
/// lies below the file's length in `lengths`, then sets that length and
/// flushes. With all records and the Begin lengths this is the start;
/// with the records after a checkpoint and its lengths, that checkpoint.
pub(crate) fn restore(
    jpath: &Path,
    begin: &Begin,
    paths: &[PathBuf],
    records: &[Record],
    lengths: &[u64],
) -> Result<()> {
    let mut images: BTreeMap<u32, Vec<(u64, Image)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in records {
        // Each page's first image: a ZeroImage stands for its pages of
        // zeros, a CloneImage for its pages in the image file.
        let (file, offset, length, image) = match r {
            Record::BeforeImage { file, offset, data } => {
                (*file, *offset, data.len() as u64, Image::Bytes(data))
            }
            Record::ZeroImage {
                file,
                offset,
                length,
            } => (*file, *offset, *length, Image::Bytes(&ZERO_PAGE)),
            Record::CloneImage {
                file,
                offset,
                length,
                image_offset,
            } => (*file, *offset, *length, Image::Kept(*image_offset)),
            _ => continue,
        };
        for k in 0..length.div_ceil(PAGE) {
            let at = offset + k * PAGE;
            let n = PAGE.min(offset + length - at);
            let page = match image {
                Image::Bytes(b) if b.len() as u64 == length => {
                    Image::Bytes(&b[(k * PAGE) as usize..(k * PAGE + n) as usize])
                }
                Image::Bytes(zeros) => Image::Bytes(&zeros[..n as usize]),
                Image::Kept(i) => Image::Kept(i + k * PAGE),
            };
            if seen.insert((file, at)) && lengths.get(file as usize).is_some_and(|l| at < *l) {
                images.entry(file).or_default().push((at, page));
            }
        }
    }
    let kept = match images
        .values()
        .flatten()
        .any(|(_, i)| matches!(i, Image::Kept(_)))
    {
        true => Some(std::sync::Arc::new(journal::images::open(jpath)?)),
        false => None,
    };
    for (i, (f, p)) in begin.files.iter().zip(paths).enumerate() {
        // Merged files are never written before cleanup, so there is
        // nothing to undo in them; leaving them alone also leaves alone
        // what another program may have done to them meanwhile.
        if matches!(f.role, Role::Merged { .. }) {
            continue;
        }
        let list = images.get(&(i as u32)).map(Vec::as_slice).unwrap_or(&[]);
        let length = lengths.get(i).copied().unwrap_or(f.length);
        restore_file(p, list, kept.as_ref(), length)?;
    }
    Ok(())
}

/// A page's before-image: bytes (from the journal, or zeros), or kept in
/// the journal's image file at an offset.
#[derive(Clone, Copy)]
enum Image<'a> {
    Bytes(&'a [u8]),
    Kept(u64),
}

fn restore_file(
    p: &Path,
    list: &[(u64, Image)],
    kept: Option<&std::sync::Arc<SharedFile>>,
    length: u64,
) -> Result<()> {
    let io = FileStorage::open(p, true)?;
    let restore = |off: u64, image: Image, len: u64| -> Result<()> {
        match (image, kept) {
            (Image::Bytes(data), _) => io.write_at(data, off),
            // Cloned back where the file system can: no copy either way.
            (Image::Kept(at), Some(kept)) => io.put_from(kept, at, off, len),
            (Image::Kept(_), None) => unreachable!("opened when any image is kept"),
        }
        .map_err(|e| Error::io(p, "restoring a before-image", e))
    };
    let len_of = |image: Image| match image {
        Image::Bytes(b) => b.len() as u64,
        Image::Kept(_) => PAGE,
    };
    // The header section first, one page at a time with a flush after
    // each: a crash here then tears at most one of the two VHDX headers,
    // so the next recovery can still tell which file this is.
    // Restore a header that is currently torn before the one that is
    // still valid, so that one valid header survives any single crash.
    let mut head: Vec<&(u64, Image)> = list.iter().filter(|(o, _)| *o < HEADER_SECTION).collect();
    head.sort_by_key(|(o, _)| (header_is_valid(&io, *o), *o));
    for &&(off, image) in &head {
        restore(off, image, len_of(image).min(length.saturating_sub(off)))?;
        io.flush().map_err(|e| Error::io(p, "flushing", e))?;
    }
    // The rest in record order, runs of adjacent images as one write or
    // clone (they are journaled a page at a time or in runs).
    let mut run: Option<(u64, Run)> = None;
    for &(off, image) in list.iter().filter(|(o, _)| *o >= HEADER_SECTION) {
        let extends = match (&mut run, image) {
            (Some((start, Run::Bytes(b))), Image::Bytes(d))
                if *start + b.len() as u64 == off && b.len() < 1 << 20 =>
            {
                b.extend_from_slice(d);
                true
            }
            (Some((start, Run::Kept(at, n))), Image::Kept(i))
                if *start + *n == off && *at + *n == i =>
            {
                *n += PAGE;
                true
            }
            _ => false,
        };
        if !extends {
            if let Some((start, r)) = run.take() {
                restore_run(&restore, start, r, length)?;
            }
            run = Some((
                off,
                match image {
                    Image::Bytes(d) => Run::Bytes(d.to_vec()),
                    Image::Kept(i) => Run::Kept(i, PAGE),
                },
            ));
        }
    }
    if let Some((start, r)) = run {
        restore_run(&restore, start, r, length)?;
    }
    failpoint(Failpoint::MidRollback);
    let len = io.len().map_err(|e| Error::io(p, "reading size", e))?;
    if len != length {
        io.set_len(length)
            .map_err(|e| Error::io(p, "restoring the length", e))?;
    }
    io.flush().map_err(|e| Error::io(p, "flushing", e))
}

/// Adjacent page images gathered into one restore.
enum Run {
    Bytes(Vec<u8>),
    /// Image-file offset and length.
    Kept(u64, u64),
}

fn restore_run(
    restore: &impl Fn(u64, Image, u64) -> Result<()>,
    start: u64,
    run: Run,
    length: u64,
) -> Result<()> {
    match run {
        Run::Bytes(b) => restore(start, Image::Bytes(&b), b.len() as u64),
        // A kept run never passes the length it was imaged below.
        Run::Kept(at, n) => restore(start, Image::Kept(at), n.min(length.saturating_sub(start))),
    }
}
