//! Recovery of an interrupted merge. Every decision comes from the journal:
//! no Committed record → roll back; Committed → verify and finish; an
//! explicit rollback is possible until cleanup started. Recovery is
//! idempotent, and a crash during it is recovered by the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::failpoint::{Failpoint, failpoint};
use crate::journal::{self, Begin, Record, Role, State, Writer};
use crate::merge::preflight::{self, Locks};
use crate::merge::{self, MergeOptions};
use crate::transaction::{self, Transaction, mark_rollback, redo, restore, rollback_all};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The merge was completed (cleanup finished).
    Finished,
    /// Every file is back to its state when the merge began.
    RolledBack,
    /// No journal covers the disk: there was nothing to do.
    NothingToRecover,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    pub journal: Option<PathBuf>,
    pub outcome: Outcome,
    /// What the journal said when recovery began.
    pub state: String,
    pub torn_tail: bool,
    pub before_images: u64,
    pub redone_runs: u64,
    /// A resumed merge: guest bytes already durable at its last checkpoint.
    pub resumed_from: Option<u64>,
    /// A resumed merge: guest bytes that were left to copy.
    pub remaining: Option<u64>,
    /// A resumed merge: the same report `merge` gives.
    pub merge: Option<merge::Report>,
}

impl RecoverReport {
    fn new(journal: Option<PathBuf>, outcome: Outcome, state: &str) -> RecoverReport {
        RecoverReport {
            journal,
            outcome,
            state: state.into(),
            torn_tail: false,
            before_images: 0,
            redone_runs: 0,
            resumed_from: None,
            remaining: None,
            merge: None,
        }
    }
}

/// What recovery does, decided from the journal's state alone
/// (`journal-format.md` §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restore every file to the start; `mark` first makes RollbackStarted
    /// durable, so that a crash during the rollback is not resumed.
    Rollback { mark: bool },
    /// Undo what followed the last checkpoint, then copy the rest.
    Resume,
    /// Check every copied run (redo lost ones) and clean up.
    Finish,
    /// `--rollback` after cleanup began (the merged files are going), or
    /// of a finish-only merge that may have written (no data images).
    RefuseRollback,
}

/// `finish_only`: the journal holds FinishOnly. Such a merge is rolled
/// back only before its first Checkpoint is durable, when it has written
/// nothing; from there on it is resumed or finished.
pub fn decide(state: &State, finish_only: bool, rollback: bool) -> Action {
    let action = decide_undoable(state, rollback);
    match action {
        Action::Rollback { mark: true } if finish_only => Action::RefuseRollback,
        _ => action,
    }
}

fn decide_undoable(state: &State, rollback: bool) -> Action {
    match (state, rollback) {
        (State::Applying { checkpoint: None }, _) => Action::Rollback { mark: false },
        (
            State::Applying {
                checkpoint: Some(_),
            },
            false,
        ) => Action::Resume,
        (
            State::Applying {
                checkpoint: Some(_),
            },
            true,
        ) => Action::Rollback { mark: true },
        (State::Committed, false) => Action::Finish,
        (State::Committed, true) => Action::Rollback { mark: true },
        (State::RollingBack, _) => Action::Rollback { mark: false },
        (State::CleaningUp, false) => Action::Finish,
        (State::CleaningUp, true) => Action::RefuseRollback,
    }
}

/// Finds the journal that covers `disk`: beside it, or in its folder naming it.
pub fn find(disk: &Path) -> Result<Option<PathBuf>> {
    transaction::pending_journal(disk)
}

/// Recovers with default options (no progress, default checkpoints).
pub fn recover(disk: &Path, rollback: bool) -> Result<RecoverReport> {
    recover_with(disk, rollback, &MergeOptions::default(), &mut |_, _| {})
}

/// Recovers the merge pending on `disk`. A resumed merge copies with
/// `opts`' batch and checkpoint sizes and stop flag, reporting `progress`.
pub fn recover_with(
    disk: &Path,
    rollback: bool,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RecoverReport> {
    match find(disk)? {
        Some(jpath) => recover_journal(&jpath, rollback, opts, progress),
        None => {
            // A merge that ended between deleting its journal and the
            // journal's image file leaves the latter, which nothing needs.
            let jpath = journal::path_for(disk);
            if journal::images::path_for(&jpath).exists() {
                journal::images::remove(&jpath)?;
                journal::sync_dir(&jpath)?;
            }
            Ok(RecoverReport::new(
                None,
                Outcome::NothingToRecover,
                "nothing to recover",
            ))
        }
    }
}

pub fn recover_journal(
    jpath: &Path,
    rollback: bool,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RecoverReport> {
    let mut report = RecoverReport::new(
        Some(jpath.to_path_buf()),
        Outcome::RolledBack,
        "begin not durable",
    );
    report.torn_tail = true;
    let Some(loaded) = journal::load_if_begun(jpath)? else {
        journal::remove(jpath)?;
        return Ok(report);
    };
    let Some(Record::Begin(begin)) = loaded.records.first().cloned() else {
        unreachable!("load checks Begin")
    };
    // Paths are relative to the journal's folder unless absolute.
    let jdir = crate::paths::folder_of(jpath);
    let paths: Vec<PathBuf> = begin.files.iter().map(|f| jdir.join(&f.path)).collect();
    let state = State::of(&loaded.records);
    let finish_only = journal::state::finish_only(&loaded.records);
    let action = decide(&state, finish_only, rollback);
    if action == Action::RefuseRollback {
        return Err(rollback_refused(jpath, &state));
    }
    // Only finishing reads the merged files (to redo a lost copy); a
    // rollback never touches them, so one that another program changed
    // after the merge began does not stand in the way of undoing it. A
    // resume checks them itself and rolls back if they changed.
    check_files(jpath, &loaded.records, &paths, &state, action)?;
    let present: Vec<&Path> = paths
        .iter()
        .map(PathBuf::as_path)
        .filter(|p| p.exists())
        .collect();
    let locks = preflight::lock_all(&present)?;
    report.state = state.name().into();
    report.torn_tail = loaded.torn_tail;
    report.before_images = (loaded.records.iter())
        .filter(|r| matches!(r.kind(), 2 | 9))
        .count() as u64;
    let writer = Arc::new(Mutex::new(Writer::reopen(jpath, &loaded)?));
    let pending = Pending {
        jpath,
        begin: &begin,
        paths: &paths,
        records: &loaded.records,
    };
    pending.carry_out(action, &state, (writer, locks), opts, progress, &mut report)?;
    Ok(report)
}

/// Why `--rollback` is refused: cleanup began, or a finish-only merge.
fn rollback_refused(jpath: &Path, state: &State) -> Error {
    let why = match state {
        State::CleaningUp => "the merge had already committed and begun deleting the merged files",
        _ => {
            "the merge was started with --finish-only, so the ancestor's overwritten data has no before-images"
        }
    };
    Error::WriteRefused {
        path: jpath.to_path_buf(),
        reason: format!(
            "{why}; it can only be finished. Run `vhdmerge recover` without --rollback"
        ),
    }
}

/// A journal being recovered: its Begin, the files it names (resolved
/// from its folder) and its records.
struct Pending<'a> {
    jpath: &'a Path,
    begin: &'a Begin,
    paths: &'a [PathBuf],
    records: &'a [Record],
}

impl Pending<'_> {
    /// Rolls back, finishes or resumes, as `action` says.
    fn carry_out(
        &self,
        action: Action,
        state: &State,
        (writer, locks): (Arc<Mutex<Writer>>, Locks),
        opts: &MergeOptions,
        progress: &mut dyn FnMut(u64, u64),
        report: &mut RecoverReport,
    ) -> Result<()> {
        match action {
            Action::Rollback { mark } => {
                if mark {
                    mark_rollback(&writer)?;
                }
                rollback_all(self.jpath, self.begin, self.paths, self.records)
            }
            Action::Finish => self.finish(&writer, report),
            Action::Resume => {
                let mut tx = self.transaction(writer, locks);
                resume(
                    &mut tx,
                    self.begin,
                    self.records,
                    state,
                    opts,
                    progress,
                    report,
                )
            }
            Action::RefuseRollback => unreachable!("refused before the files were locked"),
        }
    }

    /// A committed merge: copies whose write was lost are made again,
    /// then the merged files and the journal go.
    fn finish(&self, writer: &Arc<Mutex<Writer>>, report: &mut RecoverReport) -> Result<()> {
        report.redone_runs = redo(writer, self.begin, self.paths, self.records)?;
        let merged: Vec<PathBuf> = transaction::merged_sources(self.begin, self.paths)
            .into_values()
            .cloned()
            .collect();
        transaction::cleanup(writer, self.jpath, &merged, self.begin.keep)?;
        report.outcome = Outcome::Finished;
        Ok(())
    }

    /// The transaction a resume continues.
    fn transaction(&self, journal: Arc<Mutex<Writer>>, locks: Locks) -> Transaction {
        Transaction {
            journal,
            jpath: self.jpath.to_path_buf(),
            files: self.paths.to_vec(),
            ancestor: self.paths[0].clone(),
            relinked: transaction::relinked_of(self.begin, self.paths),
            locks,
            keep: self.begin.keep,
        }
    }
}

/// Continues a merge from its last checkpoint: checks that the merged
/// files still hold the planned runs (if not, rolls back and says why),
/// undoes what followed the checkpoint, copies the rest and finishes.
fn resume(
    tx: &mut transaction::Transaction,
    begin: &Begin,
    records: &[Record],
    state: &State,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64),
    report: &mut RecoverReport,
) -> Result<()> {
    let State::Applying {
        checkpoint: Some((at, cp)),
    } = state
    else {
        unreachable!("decide resumes only a checkpointed merge")
    };
    let plan = journal::state::plan(records).ok_or_else(|| {
        Error::corrupt(
            &tx.jpath,
            "journal",
            0,
            "a Checkpoint record without the merge's Plan record",
        )
    })?;
    let sources = match sources_unchanged(records, begin, &tx.files) {
        Some(why) => Err(why),
        None => merge::reopen_sources(begin, &tx.files, plan)?,
    };
    let sources = match sources {
        Ok(s) => s,
        Err(why) if journal::state::finish_only(records) => {
            return Err(Error::WriteRefused {
                path: tx.jpath.clone(),
                reason: format!(
                    "{why}, so the interrupted merge cannot be resumed, and it was started with --finish-only, so it cannot be rolled back either; recovery wrote nothing. Put the merged files back as they were when the merge began (from a backup) and run `vhdmerge recover` again"
                ),
            });
        }
        Err(why) => {
            mark_rollback(&tx.journal)?;
            rollback_all(&tx.jpath, begin, &tx.files, records)?;
            return Err(Error::WriteRefused {
                path: tx.jpath.clone(),
                reason: format!(
                    "{why}, so the interrupted merge cannot be resumed; it was rolled back instead and every file is as it was before the merge"
                ),
            });
        }
    };
    restore(&tx.jpath, begin, &tx.files, &records[at + 1..], &cp.lengths)?;
    tx.locks.refresh()?;
    failpoint(Failpoint::AfterPartialUndo);
    let (copied_before, shared_before) = runs_before(&records[..*at], cp.next_offset);
    report.resumed_from = Some(cp.bytes_done);
    report.remaining = Some(plan.bytes.saturating_sub(cp.bytes_done));
    let r = merge::Resume {
        tx,
        begin,
        sources,
        checkpoint: cp,
        total: plan.bytes,
        copied_before,
        shared_before,
    }
    .run(opts, progress)?;
    report.merge = Some(r);
    report.outcome = Outcome::Finished;
    Ok(())
}

/// The runs copied and shared before guest offset `next_offset` by
/// `records` (those before the checkpoint), each offset's last, for the
/// final verification (a run an abandoned attempt copied after it is
/// copied again).
fn runs_before(
    records: &[Record],
    next_offset: u64,
) -> (Vec<merge::Copied>, Vec<merge::SharedRun>) {
    let mut before: BTreeMap<u64, (u64, u64, [u8; 32])> = BTreeMap::new();
    let mut shared: BTreeMap<u64, merge::SharedRun> = BTreeMap::new();
    for r in records {
        match r {
            Record::Copy {
                offset,
                length,
                blake3,
                ..
            } if *offset < next_offset => {
                shared.remove(offset);
                before.insert(*offset, (*offset, *length, *blake3));
            }
            Record::Share {
                offset,
                length,
                source_level,
                source_offset,
            } if *offset < next_offset => {
                before.remove(offset);
                let run = merge::SharedRun {
                    offset: *offset,
                    len: *length,
                    level: *source_level as usize,
                    source: *source_offset,
                };
                shared.insert(*offset, run);
            }
            _ => {}
        }
    }
    (
        before.into_values().collect(),
        shared.into_values().collect(),
    )
}

/// Why the merged files differ from what Begin recorded (missing, another
/// identity, length or the fingerprint of their first 4 KiB), if they do.
fn sources_unchanged(records: &[Record], begin: &Begin, paths: &[PathBuf]) -> Option<String> {
    for (i, (f, p)) in begin.files.iter().zip(paths).enumerate() {
        if !matches!(f.role, Role::Merged { .. }) {
            continue;
        }
        if !p.exists() {
            return Some(format!("{} is missing", p.display()));
        }
        match crate::disk::identity_of(p) {
            Ok(id) if journal::state::same_identity(records, i, &id) => {}
            Ok(id) => {
                return Some(format!(
                    "{} was written to since the merge began (its identity is {}, the journal recorded {})",
                    p.display(),
                    id.describe(),
                    f.identity
                ));
            }
            Err(e) => return Some(format!("{} cannot be read ({e})", p.display())),
        }
        let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        if len != f.length {
            return Some(format!(
                "{} changed size since the merge began ({} → {len} bytes)",
                p.display(),
                f.length
            ));
        }
        if transaction::fingerprint(p).ok().as_deref() != Some(f.fingerprint.as_str()) {
            return Some(format!(
                "{} changed since the merge began (its first 4 KiB differ)",
                p.display()
            ));
        }
    }
    None
}

/// Whether a VHDX ancestor already carries the DataWriteGuid the merge
/// chose for it (it is set with the first write).
fn carries_new_guid(begin: &Begin, id: &crate::disk::Identity) -> bool {
    let new = begin
        .data_write_guid
        .as_deref()
        .and_then(|g| uuid::Uuid::parse_str(g).ok());
    matches!(id, crate::disk::Identity::VhdxLinkage { linkage, .. } if Some(*linkage) == new)
}

/// The files must be the ones the journal names: same identity (the
/// ancestor may already carry the merge's new DataWriteGuid), and the merged
/// files unchanged in length when the merge is to be finished.
fn check_files(
    jpath: &Path,
    records: &[Record],
    paths: &[PathBuf],
    state: &State,
    action: Action,
) -> Result<()> {
    let Some(Record::Begin(begin)) = records.first() else {
        unreachable!("load checks Begin")
    };
    let finishing = action == Action::Finish;
    for (i, (f, p)) in begin.files.iter().zip(paths).enumerate() {
        let merged = matches!(f.role, Role::Merged { .. });
        // A resume checks the merged files itself, and rolls back if
        // they changed (`sources_unchanged`).
        if merged && action == Action::Resume {
            continue;
        }
        if !p.exists() {
            if merged && *state == State::CleaningUp {
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
        let id = crate::disk::identity_of(p)?;
        let ok = journal::state::same_identity(records, i, &id)
            || (f.role == Role::Ancestor && carries_new_guid(begin, &id));
        if !ok {
            return Err(Error::WriteRefused {
                path: jpath.to_path_buf(),
                reason: format!(
                    "the journal belongs to other files: it expects {} with {}, found {}",
                    p.display(),
                    f.identity,
                    id.describe()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Checkpoint, Record};

    fn checkpoint() -> Record {
        Record::Checkpoint(Checkpoint {
            next_offset: 1 << 20,
            bytes_done: 1 << 20,
            lengths: vec![],
        })
    }

    /// `decide` is the table of journal-format.md §4, row by row.
    #[test]
    fn decisions_follow_the_table() {
        let cases = [
            (
                vec![],
                Action::Rollback { mark: false },
                Action::Rollback { mark: false },
            ),
            (
                vec![checkpoint()],
                Action::Resume,
                Action::Rollback { mark: true },
            ),
            (
                vec![checkpoint(), Record::Committed],
                Action::Finish,
                Action::Rollback { mark: true },
            ),
            (
                vec![Record::Committed, Record::RollbackStarted],
                Action::Rollback { mark: false },
                Action::Rollback { mark: false },
            ),
            (
                vec![checkpoint(), Record::RollbackStarted],
                Action::Rollback { mark: false },
                Action::Rollback { mark: false },
            ),
            (
                vec![Record::Committed, Record::CleanupStarted],
                Action::Finish,
                Action::RefuseRollback,
            ),
        ];
        for (records, default, rollback) in cases {
            let state = State::of(&records);
            assert_eq!(decide(&state, false, false), default, "{records:?}");
            assert_eq!(decide(&state, false, true), rollback, "{records:?}");
        }
    }

    /// A finish-only merge is rolled back only before its first durable
    /// Checkpoint (nothing written yet); afterwards `--rollback` is refused.
    #[test]
    fn finish_only_merges_are_never_undone_once_begun() {
        let cases = [
            (
                vec![Record::FinishOnly],
                Action::Rollback { mark: false },
                Action::Rollback { mark: false },
            ),
            (
                vec![Record::FinishOnly, checkpoint()],
                Action::Resume,
                Action::RefuseRollback,
            ),
            (
                vec![Record::FinishOnly, checkpoint(), Record::Committed],
                Action::Finish,
                Action::RefuseRollback,
            ),
            (
                vec![
                    Record::FinishOnly,
                    checkpoint(),
                    Record::Committed,
                    Record::CleanupStarted,
                ],
                Action::Finish,
                Action::RefuseRollback,
            ),
        ];
        for (records, default, rollback) in cases {
            let state = State::of(&records);
            let finish_only = crate::journal::state::finish_only(&records);
            assert!(finish_only);
            assert_eq!(decide(&state, true, false), default, "{records:?}");
            assert_eq!(decide(&state, true, true), rollback, "{records:?}");
        }
    }

    /// The last Checkpoint is the one a resume starts from.
    #[test]
    fn the_last_checkpoint_counts() {
        let later = Record::Checkpoint(Checkpoint {
            next_offset: 2 << 20,
            bytes_done: 2 << 20,
            lengths: vec![],
        });
        let records = vec![checkpoint(), Record::Committed];
        assert_eq!(State::of(&records), State::Committed);
        let records = vec![checkpoint(), later.clone()];
        match State::of(&records) {
            State::Applying {
                checkpoint: Some((1, c)),
            } => assert_eq!(c.next_offset, 2 << 20),
            other => panic!("{other:?}"),
        }
    }
}
