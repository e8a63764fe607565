//! Recovery of an interrupted merge. Every decision comes from the journal:
//! no Committed record → roll back; Committed → verify and finish; an
//! explicit rollback is possible until cleanup started. Recovery is
//! idempotent, and a crash during it is recovered by the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::disk::{Chain, ChainOptions, open_layer};
use crate::error::{Error, Result};
use crate::io::{FileStorage, Storage};
use crate::journal::{self, Begin, Record, Role, Writer};
use crate::merge::{self, preflight};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The merge was completed (cleanup finished).
    Finished,
    /// Every file is back to its state when the merge began.
    RolledBack,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    pub journal: PathBuf,
    pub outcome: Outcome,
    /// What the journal said when recovery began.
    pub state: String,
    pub torn_tail: bool,
    pub before_images: u64,
    pub redone_runs: u64,
}

/// Finds the journal that covers `disk`: beside it, or in its folder naming it.
pub fn find(disk: &Path) -> Result<Option<PathBuf>> {
    preflight::pending_journal(disk)
}

fn state_of(records: &[Record]) -> &'static str {
    let has = |k: u16| records.iter().any(|r| r.kind() == k);
    if has(6) {
        "rolling back"
    } else if has(5) {
        "cleaning up"
    } else if has(4) {
        "committed"
    } else {
        "applying"
    }
}

pub fn recover(disk: &Path, rollback: bool) -> Result<RecoverReport> {
    let jpath = find(disk)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{}: no pending merge journal was found beside it; nothing to recover",
            disk.display()
        ))
    })?;
    recover_journal(&jpath, rollback)
}

pub fn recover_journal(jpath: &Path, rollback: bool) -> Result<RecoverReport> {
    let Some(loaded) = journal::load_if_begun(jpath)? else {
        journal::remove(jpath)?;
        return Ok(RecoverReport {
            journal: jpath.to_path_buf(),
            outcome: Outcome::RolledBack,
            state: "begin not durable".into(),
            torn_tail: true,
            before_images: 0,
            redone_runs: 0,
        });
    };
    let Some(Record::Begin(mut begin)) = loaded.records.first().cloned() else {
        unreachable!("load checks Begin")
    };
    // Paths are relative to the journal's folder unless absolute.
    let jdir = jpath
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for f in &mut begin.files {
        f.path = jdir.join(&f.path).to_string_lossy().to_string();
    }
    let state = state_of(&loaded.records);
    // Only finishing reads the merged files (to redo a lost copy); a
    // rollback never touches them, so one that another program changed
    // after the merge began does not stand in the way of undoing it.
    let finishing =
        matches!(state, "committed" | "cleaning up") && !rollback || state == "cleaning up";
    check_files(jpath, &begin, state, finishing)?;
    let present: Vec<&Path> = begin
        .files
        .iter()
        .map(|f| Path::new(f.path.as_str()))
        .filter(|p| p.exists())
        .collect();
    let _locks = preflight::lock_all(&present)?;
    let before_images = loaded.records.iter().filter(|r| r.kind() == 2).count() as u64;
    let mut report = RecoverReport {
        journal: jpath.to_path_buf(),
        outcome: Outcome::RolledBack,
        state: state.into(),
        torn_tail: loaded.torn_tail,
        before_images,
        redone_runs: 0,
    };
    let writer = Arc::new(Mutex::new(Writer::reopen(jpath, &loaded)?));
    match state {
        "rolling back" | "applying" => undo(&writer, jpath, &begin, &loaded.records)?,
        "committed" if rollback => {
            {
                let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                w.append(&Record::RollbackStarted);
                w.sync()?;
            }
            merge::failpoint("recover-after-rollback-mark");
            undo(&writer, jpath, &begin, &loaded.records)?
        }
        "cleaning up" if rollback => {
            return Err(Error::WriteRefused { path: jpath.to_path_buf(), reason: "the merge had already committed and begun deleting the merged files; it can only be finished. Run `vhdmerge recover` without --rollback".into() });
        }
        _ => {
            report.redone_runs = redo(&writer, &begin, &loaded.records)?;
            let merged: Vec<PathBuf> = begin
                .files
                .iter()
                .filter(|f| matches!(f.role, Role::Merged { .. }))
                .map(|f| PathBuf::from(&f.path))
                .collect();
            merge::cleanup(&writer, jpath, &merged, begin.keep)?;
            report.outcome = Outcome::Finished;
        }
    }
    Ok(report)
}

/// The files must be the ones the journal names: same identity (the
/// ancestor may already carry the merge's new DataWriteGuid), and the merged
/// files unchanged in length when the merge is to be finished.
fn check_files(jpath: &Path, begin: &Begin, state: &str, finishing: bool) -> Result<()> {
    for f in &begin.files {
        let p = Path::new(&f.path);
        let merged = matches!(f.role, Role::Merged { .. });
        if !p.exists() {
            if merged && state == "cleaning up" {
                continue;
            }
            return Err(Error::WriteRefused {
                path: jpath.to_path_buf(),
                reason: format!(
                    "the journal names {} but it is missing; put it back (recovery needs every file of the merge)",
                    p.display()
                ),
            });
        }
        let id = crate::disk::identity_of(p)?.describe();
        let new_id = begin
            .data_write_guid
            .as_ref()
            .map(|g| format!("DataWriteGuid {{{g}}}"));
        let ok = id == f.identity
            || (f.role == Role::Ancestor && new_id.as_deref() == Some(id.as_str()));
        if !ok {
            return Err(Error::WriteRefused {
                path: jpath.to_path_buf(),
                reason: format!(
                    "the journal belongs to other files: it expects {} with {}, found {}",
                    p.display(),
                    f.identity,
                    id
                ),
            });
        }
        let len = std::fs::metadata(p)
            .map_err(|e| Error::io(p, "reading size", e))?
            .len();
        if merged && finishing && len != f.length {
            return Err(Error::WriteRefused {
                path: jpath.to_path_buf(),
                reason: format!(
                    "{} changed size since the merge began ({} → {len} bytes); the journal cannot be trusted for it",
                    p.display(),
                    f.length
                ),
            });
        }
    }
    Ok(())
}

/// The VHDX header section (file identifier, both headers, both region tables).
const HEADER_SECTION: u64 = 1 << 20;

/// Whether the 4 KiB at `offset` currently hold a valid VHDX header (false
/// for pages that are not header slots, which are restored after).
fn header_is_valid(io: &FileStorage, offset: u64) -> bool {
    if !crate::format::vhdx::HEADER_OFFSETS.contains(&offset) {
        return true;
    }
    let mut b = vec![0u8; 4096];
    io.read_at(&mut b, offset).is_ok() && crate::format::vhdx::header::Header::decode(&b).is_ok()
}

/// Restores every before-image and the starting lengths, flushes, and
/// deletes the journal. Applying the same originals again is harmless, so
/// a crash here is recovered by running it again.
fn undo(
    writer: &Arc<Mutex<Writer>>,
    jpath: &Path,
    begin: &Begin,
    records: &[Record],
) -> Result<()> {
    let mut images: BTreeMap<u32, Vec<(u64, &[u8])>> = BTreeMap::new();
    for r in records {
        if let Record::BeforeImage { file, offset, data } = r {
            images.entry(*file).or_default().push((*offset, data));
        }
    }
    for (i, f) in begin.files.iter().enumerate() {
        // Merged files are never written before cleanup, so there is
        // nothing to undo in them; leaving them alone also leaves alone
        // what another program may have done to them meanwhile.
        if matches!(f.role, Role::Merged { .. }) {
            continue;
        }
        let p = Path::new(&f.path);
        let io = FileStorage::open(p, true)?;
        let restore = |off: u64, data: &[u8]| {
            io.write_at(data, off)
                .map_err(|e| Error::io(p, "restoring a before-image", e))
        };
        let list = images.get(&(i as u32)).map(Vec::as_slice).unwrap_or(&[]);
        // The header section first, one page at a time with a flush after
        // each: a crash here then tears at most one of the two VHDX headers,
        // so the next recovery can still tell which file this is.
        // Restore a header that is currently torn before the one that is
        // still valid, so that one valid header survives any single crash.
        let mut head: Vec<&(u64, &[u8])> =
            list.iter().filter(|(o, _)| *o < HEADER_SECTION).collect();
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
        merge::failpoint("mid-rollback");
        let len = io.len().map_err(|e| Error::io(p, "reading size", e))?;
        if len != f.length {
            io.set_len(f.length)
                .map_err(|e| Error::io(p, "restoring the length", e))?;
        }
        io.flush().map_err(|e| Error::io(p, "flushing", e))?;
    }
    drop(writer.lock().unwrap_or_else(|e| e.into_inner()));
    journal::remove(jpath)
}

/// After commit: every recorded run must read back from the ancestor with
/// its recorded hash; a run that does not (a lost write) is copied again
/// from its source, whose hash must match. Returns how many were redone.
fn redo(writer: &Arc<Mutex<Writer>>, begin: &Begin, records: &[Record]) -> Result<u64> {
    let a = begin
        .files
        .iter()
        .find(|f| f.role == Role::Ancestor)
        .expect("ancestor recorded");
    let sources: BTreeMap<u32, PathBuf> = begin
        .files
        .iter()
        .filter_map(|f| match f.role {
            Role::Merged { level } => Some((level, PathBuf::from(&f.path))),
            _ => None,
        })
        .collect();
    let view = Chain::open(Path::new(&a.path), &ChainOptions::default())?;
    let mut bad = Vec::new();
    for r in records {
        if let Record::Copy {
            offset,
            length,
            source_level,
            source_offset,
            blake3: h,
        } = r
        {
            let mut buf = vec![0u8; *length as usize];
            view.read(*offset, &mut buf)?;
            if blake3::hash(&buf).as_bytes() != h {
                bad.push((*offset, *length, *source_level, *source_offset, *h));
            }
        }
    }
    drop(view);
    if bad.is_empty() {
        return Ok(0);
    }
    let format = open_layer(Path::new(&a.path), false)?.format();
    let mut layer = merge::open_journaled(Path::new(&a.path), 0, writer, format, None)?;
    for (offset, length, level, source_offset, h) in &bad {
        let mut buf = vec![0u8; *length as usize];
        if let Some(fo) = source_offset {
            let src = sources.get(level).ok_or_else(|| {
                Error::Invalid(format!("journal names no source for level {level}"))
            })?;
            let l = open_layer(src, false)?;
            l.read_data(*fo, &mut buf)?;
        }
        if blake3::hash(&buf).as_bytes() != h {
            return Err(Error::corrupt(
                Path::new(&a.path),
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
