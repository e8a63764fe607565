//! Proving the copied runs: each one read back through a view of the
//! ancestor opened from its file, and matched to the BLAKE3 recorded when
//! it was copied.
//!
//! Most of it happens behind the copy: at each checkpoint the ancestor's
//! file is whole (its metadata written, every run before the checkpoint in
//! place), so a view opened there maps those runs as the finished disk
//! will. A thread reads them back through that view while the copy goes
//! on, from the page cache the copy just filled, instead of re-reading the
//! whole merge from the disk after the commit. Runs copied after the last
//! checkpoint are verified after the commit, as before.
//!
//! What a view reads cannot change under it: runs never overlap and a
//! later run never rewrites an earlier one's bytes, nor moves the block
//! holding them (a VHD block goes out of place only when one write covers
//! it whole). The bits and entries that map an earlier run stay set while
//! later runs set others beside them.
//!
//! A mismatch found behind the copy is reported where a mismatch after the
//! commit is: once the merge is committed, so that `recover` redoes the
//! runs from the merged files, which are still there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use super::Copied;
use super::read::{Buffers, GROUP_BYTES, verify_group};
use crate::disk::{Chain, ChainOptions, Extent};
use crate::error::{Error, Result};

/// Re-reads every copied run from the ancestor's view and matches it to
/// its BLAKE3, in groups of at most GROUP_BYTES (so memory stays bounded)
/// checked on every core (each reads and hashes its own).
pub(super) fn verify_runs(after: &Chain, a_path: &Path, copied: &[Copied]) -> Result<()> {
    let groups = groups(copied);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let buffers = Buffers::default();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (groups, buffers) = (&groups, &buffers);
                scope.spawn(move || {
                    groups
                        .iter()
                        .skip(w)
                        .step_by(workers)
                        .try_for_each(|chunk| verify_group(after, a_path, chunk, buffers))
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a verifier thread panicked")?;
        }
        Ok(())
    })
}

/// `copied` cut into groups of at most GROUP_BYTES (or one run).
fn groups(copied: &[Copied]) -> Vec<&[Copied]> {
    let mut groups: Vec<&[Copied]> = Vec::new();
    let (mut from, mut bytes) = (0usize, 0u64);
    for (i, &(_, len, _)) in copied.iter().enumerate() {
        if bytes > 0 && bytes + len > GROUP_BYTES {
            groups.push(&copied[from..i]);
            from = i;
            bytes = 0;
        }
        bytes += len;
    }
    groups.push(&copied[from..]);
    groups
}

/// Runs to verify behind the copy, with the view that maps them.
pub(super) struct Job {
    view: Chain,
    runs: Vec<Copied>,
}

/// The copy's side of the verification behind it: hands the runs of each
/// checkpoint to the verifying thread, one job at a time.
pub(super) struct Behind<'a> {
    ancestor: PathBuf,
    jobs: Option<Sender<Job>>,
    /// A job is being verified; runs of later checkpoints wait for the
    /// next checkpoint after it (any later view maps them too).
    busy: &'a AtomicBool,
}

impl<'a> Behind<'a> {
    pub(super) fn new(ancestor: &Path, jobs: Sender<Job>, busy: &'a AtomicBool) -> Self {
        Behind {
            ancestor: ancestor.to_path_buf(),
            jobs: Some(jobs),
            busy,
        }
    }

    /// Right after a checkpoint, before the next write: unless a job is
    /// still running, opens a view of the ancestor and hands it the runs
    /// copied since the last job (taken out of `copied`, which keeps the
    /// ones left for after the commit).
    pub(super) fn hand_off(&mut self, copied: &mut Vec<Copied>) {
        if copied.is_empty() || self.busy.load(Ordering::Acquire) {
            return;
        }
        let Some(jobs) = &self.jobs else { return };
        let view = match Chain::open(&self.ancestor, &ChainOptions::default()) {
            Ok(view) => view,
            // Not verified behind: then after the commit, where an open
            // that fails again is reported.
            Err(_) => return,
        };
        let runs = std::mem::take(copied);
        self.busy.store(true, Ordering::Release);
        if let Err(e) = jobs.send(Job { view, runs }) {
            // The thread has stopped on an error of its own: these runs
            // are verified after the commit.
            self.busy.store(false, Ordering::Release);
            *copied = e.0.runs;
            self.jobs = None;
        }
    }
}

/// What was verified behind the copy.
pub(super) struct Verified {
    /// Runs matched to their BLAKE3.
    pub(super) runs: u64,
    /// The first mismatch (or read error), reported after the commit.
    pub(super) failed: Option<crate::error::Error>,
}

/// The verifying thread: reads each job's runs back one after the other
/// through one buffer of `memory::VERIFY_BEHIND` bytes, allocated once
/// (the copy has the other core, and the data is in the page cache).
pub(super) fn verify_behind(a_path: &Path, jobs: Receiver<Job>, busy: &AtomicBool) -> Verified {
    let mut done = Verified {
        runs: 0,
        failed: None,
    };
    let mut buf = vec![0u8; super::memory::VERIFY_BEHIND];
    for job in jobs {
        let checked = job
            .runs
            .iter()
            .try_for_each(|run| check_run(&job.view, a_path, run, &mut buf));
        match checked {
            Ok(()) => done.runs += job.runs.len() as u64,
            Err(e) => {
                done.failed = Some(e);
                return done;
            }
        }
        drop(job);
        busy.store(false, Ordering::Release);
    }
    done
}

/// Reads one run back through `view`, `buf` at a time, and matches it to
/// its BLAKE3. What the view does not map to data reads as zeros.
fn check_run(view: &Chain, a_path: &Path, run: &Copied, buf: &mut [u8]) -> Result<()> {
    let &(offset, len, hash) = run;
    let mut hasher = blake3::Hasher::new();
    let mut pos = offset;
    while pos < offset + len {
        let (level, ext, n) = view.resolve(0, pos, offset + len - pos)?;
        let n = n.min(buf.len() as u64) as usize;
        let piece = &mut buf[..n];
        match ext {
            Extent::Data(fo) => view.layers[level].read_data(fo, piece)?,
            _ => piece.fill(0),
        }
        hasher.update(piece);
        pos += piece.len() as u64;
    }
    match *hasher.finalize().as_bytes() == hash {
        true => Ok(()),
        false => Err(mismatch(a_path, offset, len)),
    }
}

/// A copied run that does not read back with its BLAKE3.
pub(super) fn mismatch(a_path: &Path, offset: u64, len: u64) -> Error {
    Error::corrupt(
        a_path,
        "merged data",
        offset,
        format!(
            "the {len} bytes copied here do not read back; the merge is committed but unverified: run `vhdmerge recover`"
        ),
    )
}
