//! Redo after Commit: every copied run must read back with its BLAKE3;
//! a lost one is copied again from its still-present source.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::disk::{Chain, ChainOptions, open_layer};
use crate::error::{Error, Result};
use crate::journal::{Begin, Record, Writer};

/// After commit: every recorded run must read back from the ancestor with
/// its recorded hash; a run that does not (a lost write) is copied again
/// from its source, whose hash must match. Returns how many were redone.
pub(crate) fn redo(
    writer: &Arc<Mutex<Writer>>,
    begin: &Begin,
    paths: &[PathBuf],
    records: &[Record],
) -> Result<u64> {
    let a_path = paths[0].as_path();
    let sources = super::merged_sources(begin, paths);
    let view = Chain::open(a_path, &ChainOptions::default())?;
    let mut bad = Vec::new();
    let cleanup_started = records.contains(&Record::CleanupStarted);
    for r in records {
        match r {
            Record::Copy {
                offset,
                length,
                source_level,
                source_offset,
                blake3: h,
            } => {
                let mut buf = vec![0u8; *length as usize];
                view.read(*offset, &mut buf)?;
                if blake3::hash(&buf).as_bytes() != h {
                    bad.push((*offset, *length, *source_level, *source_offset, *h));
                }
            }
            // A shared run has no hash: it must read as its source does.
            // Once cleanup has begun the sources may be gone, but then
            // the merge had verified every run before cleanup began.
            Record::Share {
                offset,
                length,
                source_level,
                source_offset,
            } if !cleanup_started => {
                let src = source_file(a_path, &sources, *source_level)?;
                let mut want = vec![0u8; *length as usize];
                open_layer(src, false)?.read_data(*source_offset, &mut want)?;
                let mut buf = vec![0u8; *length as usize];
                view.read(*offset, &mut buf)?;
                if buf != want {
                    let h = *blake3::hash(&want).as_bytes();
                    bad.push((*offset, *length, *source_level, Some(*source_offset), h));
                }
            }
            _ => {}
        }
    }
    drop(view);
    if bad.is_empty() {
        return Ok(0);
    }
    let format = open_layer(a_path, false)?.format();
    let mut layer = crate::merge::open_journaled(a_path, 0, writer, format, None, false)?;
    for (offset, length, level, source_offset, h) in &bad {
        let mut buf = vec![0u8; *length as usize];
        if let Some(fo) = source_offset {
            let l = open_layer(source_file(a_path, &sources, *level)?, false)?;
            l.read_data(*fo, &mut buf)?;
        }
        if blake3::hash(&buf).as_bytes() != h {
            return Err(Error::corrupt(
                a_path,
                "merge source",
                *offset,
                "neither the ancestor nor the merged source holds the bytes the journal recorded; the files were modified after the merge. Restore from a backup",
            ));
        }
        layer.write(*offset, &buf)?;
    }
    layer.close()?;
    Ok(bad.len() as u64)
}

/// The merged file of `level`, as the journal names it.
fn source_file<'a>(
    a_path: &std::path::Path,
    sources: &std::collections::BTreeMap<u32, &'a PathBuf>,
    level: u32,
) -> Result<&'a PathBuf> {
    sources.get(&level).copied().ok_or_else(|| {
        Error::corrupt(
            a_path,
            "merge source",
            0,
            format!("the journal names no source file for level {level}"),
        )
    })
}
