//! One merge's transaction, from its journal's Begin to its deletion:
//! the Begin record and the files it names, checkpoints, Committed,
//! cleanup, finding a pending journal, and the two ways back: undo (to
//! the start or to a checkpoint) and redo (of lost copies after Commit).
//! The merge (`merge`) plans and copies; recovery (`recover`) decides
//! from the journal's state which of these to run. See
//! `journal-format.md`.

mod redo;
mod undo;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::disk::{Chain, Format, Layer};
use crate::error::{Error, Result};
use crate::failpoint::{Failpoint, failpoint};
use crate::journal::{self, Begin, FileEntry, Record, Role, Writer};
use crate::merge::preflight::{self, Dependent};
use crate::paths::{canonical, folder_of};

pub(crate) use redo::redo;
pub(crate) use undo::{restore, rollback_all};

/// Journal paths are relative to the ancestor's (the journal's) folder
/// unless absolute.
fn resolve(ancestor: &Path, recorded: &Path) -> PathBuf {
    folder_of(&canonical(ancestor)).join(recorded)
}

/// The merged files by level (0 = the child named on the command line).
pub(crate) fn merged_sources<'a>(
    begin: &Begin,
    paths: &'a [PathBuf],
) -> std::collections::BTreeMap<u32, &'a PathBuf> {
    begin
        .files
        .iter()
        .zip(paths)
        .filter_map(|(f, p)| match f.role {
            Role::Merged { level } => Some((level, p)),
            _ => None,
        })
        .collect()
}

/// The children to re-link, with their journal file numbers, by role.
pub(crate) fn relinked_of(begin: &Begin, paths: &[PathBuf]) -> Vec<(PathBuf, u32)> {
    begin
        .files
        .iter()
        .zip(paths)
        .enumerate()
        .filter(|(_, (f, _))| f.role == Role::Relinked)
        .map(|(i, (_, p))| (p.clone(), i as u32))
        .collect()
}

/// The Begin record: every file of the merge with what proves its
/// identity, the new DataWriteGuid (VHDX) and the expected digest.
pub(crate) fn begin_record(
    chain: &Chain,
    ancestor: usize,
    relink: &[Dependent],
    expected: Option<blake3::Hash>,
    keep: bool,
) -> Result<(Begin, Vec<crate::disk::Identity>, Option<Uuid>)> {
    let a_layer = chain.layers[ancestor].as_ref();
    let new_guid = (a_layer.format() == Format::Vhdx).then(crate::guid::fresh);
    let jdir = canonical(a_layer.path())
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut files = vec![file_entry(Role::Ancestor, a_layer, &jdir)?];
    for (i, l) in chain.layers[..ancestor].iter().enumerate() {
        files.push(file_entry(
            Role::Merged { level: i as u32 },
            l.as_ref(),
            &jdir,
        )?);
    }
    for d in relink {
        let l = crate::disk::open_layer(&d.path, false)?;
        files.push(file_entry(Role::Relinked, l.as_ref(), &jdir)?);
    }
    let mut identities = vec![a_layer.identity()];
    identities.extend(chain.layers[..ancestor].iter().map(|l| l.identity()));
    for d in relink {
        identities.push(crate::disk::open_layer(&d.path, false)?.identity());
    }
    let begin = Begin {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        files,
        merged_levels: ancestor as u32,
        data_write_guid: new_guid.map(|g| g.to_string()),
        expected_digest: expected.map(|e| e.to_hex().to_string()),
        keep,
    };
    Ok((begin, identities, new_guid))
}

/// The files of one merge and its journal, from Begin to cleanup.
pub(crate) struct Transaction {
    pub(crate) journal: Arc<Mutex<Writer>>,
    pub(crate) jpath: PathBuf,
    /// Every file of Begin, in its order (index = journal file number).
    pub(crate) files: Vec<PathBuf>,
    pub(crate) ancestor: PathBuf,
    /// Children to re-link, with their journal file numbers.
    pub(crate) relinked: Vec<(PathBuf, u32)>,
    pub(crate) locks: preflight::Locks,
    pub(crate) keep: bool,
}

impl Transaction {
    /// Creates the journal beside `ancestor` with Begin and the Plan,
    /// durable (file and folder) before this returns. A finish-only merge
    /// adds FinishOnly and a Checkpoint of the start, so that from its
    /// first write on, recovery resumes it (journal-format.md §3).
    pub(crate) fn begin(
        ancestor: &Path,
        begin: Begin,
        plan: journal::PlanRecord,
        locks: preflight::Locks,
        finish_only: bool,
    ) -> Result<Transaction> {
        let jpath = journal::path_for(ancestor);
        let files: Vec<PathBuf> = begin
            .files
            .iter()
            .map(|f| resolve(ancestor, Path::new(&f.path)))
            .collect();
        let relinked = relinked_of(&begin, &files);
        let keep = begin.keep;
        let mut records = vec![Record::Plan(plan)];
        if finish_only {
            records.push(Record::FinishOnly);
            records.push(Record::Checkpoint(journal::Checkpoint {
                next_offset: 0,
                bytes_done: 0,
                lengths: begin.files.iter().map(|f| f.length).collect(),
            }));
        }
        let writer = Writer::create_with(&jpath, begin, &records)?;
        Ok(Transaction {
            journal: Arc::new(Mutex::new(writer)),
            jpath,
            files,
            ancestor: ancestor.to_path_buf(),
            relinked,
            locks,
            keep,
        })
    }

    /// What `recover --rollback` would do, for messages.
    pub(crate) fn undo_hint(&self) -> &'static str {
        let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal::state::undo_hint(j.finish_only())
    }

    pub(crate) fn append_sync(&self, rec: &Record) -> Result<()> {
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        j.append(rec);
        j.sync()
    }

    /// Makes everything written so far durable and records that point:
    /// the runs before `next_offset` survive any later crash.
    pub(crate) fn checkpoint(
        &self,
        a: &mut Box<dyn Layer>,
        next_offset: u64,
        done: u64,
    ) -> Result<()> {
        self.locks.check_unchanged(&[self.ancestor.as_path()])?;
        a.commit()?;
        self.append_checkpoint(next_offset, done)
    }

    pub(crate) fn append_checkpoint(&self, next_offset: u64, bytes_done: u64) -> Result<()> {
        let lengths = self
            .files
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()))
            .collect::<std::io::Result<Vec<u64>>>()
            .map_err(|e| Error::io(&self.ancestor, "reading the merge's file sizes", e))?;
        self.append_sync(&Record::Checkpoint(journal::Checkpoint {
            next_offset,
            bytes_done,
            lengths,
        }))
    }

    /// Every write of the merge is durable: from here recovery finishes.
    pub(crate) fn commit(&self) -> Result<()> {
        self.append_sync(&Record::Committed)
    }

    /// After Committed: mark cleanup, delete (or rename) the merged files,
    /// and delete the journal. Every step is idempotent.
    pub(crate) fn cleanup(&self, merged: &[PathBuf]) -> Result<()> {
        cleanup(&self.journal, &self.jpath, merged, self.keep)
    }
}

/// Makes RollbackStarted durable: a crash during the rollback that follows
/// is rolled back again, never resumed or finished.
pub(crate) fn mark_rollback(writer: &Arc<Mutex<Writer>>) -> Result<()> {
    {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        w.append(&Record::RollbackStarted);
        w.sync()?;
    }
    failpoint(Failpoint::RecoverAfterRollbackMark);
    Ok(())
}

/// After Committed: mark cleanup, delete (or rename) the merged files, and
/// delete the journal. Every step is idempotent.
pub fn cleanup(
    journal: &Arc<Mutex<Writer>>,
    jpath: &Path,
    merged: &[PathBuf],
    keep: bool,
) -> Result<()> {
    {
        let mut j = journal.lock().unwrap_or_else(|e| e.into_inner());
        j.append(&Record::CleanupStarted);
        j.sync()?;
    }
    failpoint(Failpoint::MidCleanup);
    remove_merged(merged, keep)?;
    journal::remove(jpath)
}

pub fn remove_merged(merged: &[PathBuf], keep: bool) -> Result<()> {
    for m in merged {
        if !m.exists() {
            continue;
        }
        if keep {
            let mut name = m.file_name().unwrap_or_default().to_os_string();
            name.push(".merged");
            let to = m.with_file_name(name);
            crate::io::fsops::rename(m, &to)
                .map_err(|e| Error::io(m, "renaming the merged file", e))?;
        } else {
            crate::io::fsops::remove_file(m)
                .map_err(|e| Error::io(m, "deleting the merged file", e))?;
        }
        journal::sync_dir(m)?;
    }
    Ok(())
}

pub(crate) fn fingerprint(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, "reading", e))?;
    let mut b = vec![0u8; 4096];
    let n = std::os::unix::fs::FileExt::read_at(&f, &mut b, 0)
        .map_err(|e| Error::io(path, "reading", e))?;
    Ok(blake3::hash(&b[..n]).to_hex().to_string())
}

/// Files beside the journal are named by file name alone, so a folder that
/// is moved or mounted elsewhere after a crash can still be recovered.
fn journal_path_of(file: &Path, journal_dir: &Path) -> String {
    let c = canonical(file);
    match (c.parent(), c.file_name()) {
        (Some(dir), Some(n)) if dir == journal_dir => n.to_string_lossy().to_string(),
        _ => c.to_string_lossy().to_string(),
    }
}

fn file_entry(role: Role, l: &dyn Layer, journal_dir: &Path) -> Result<FileEntry> {
    let length = std::fs::metadata(l.path())
        .map_err(|e| Error::io(l.path(), "reading size", e))?
        .len();
    Ok(FileEntry {
        role,
        path: journal_path_of(l.path(), journal_dir),
        length,
        identity: l.identity().describe(),
        fingerprint: fingerprint(l.path())?,
    })
}

/// A pending journal in the folder of `path` that names `path`.
pub fn pending_journal(path: &Path) -> Result<Option<PathBuf>> {
    let own = journal::path_for(path);
    if own.exists() {
        return Ok(Some(own));
    }
    let dir = folder_of(path);
    let me = canonical(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.to_string_lossy().ends_with(journal::SUFFIX) {
            continue;
        }
        match journal::load(&p) {
            Ok(l) => {
                if let Some(journal::Record::Begin(b)) = l.records.first()
                    && b.files.iter().any(|f| canonical(&dir.join(&f.path)) == me)
                {
                    return Ok(Some(p));
                }
            }
            // A journal we cannot read may still cover this file: be safe.
            Err(_) => return Ok(Some(p)),
        }
    }
    Ok(None)
}
