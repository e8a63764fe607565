//! Merging a differencing chain into an ancestor, crash-safely.
//!
//! plan (read-only: runs, space, siblings) → journal Begin (durable) →
//! apply (copy runs into the ancestor through the write-ahead storage,
//! batch by batch) → re-link children → Committed (durable) → cleanup
//! (delete or rename the merged files, delete the journal). See
//! `journal-format.md` for the crash argument.

mod memory;
mod plan;
pub mod preflight;
mod read;
mod share;
mod verify;

pub use plan::{Plan, Prepared, Run, Sizing, for_each_run, measure, prepare};
use plan::{ancestor_reads_zero, plan_digest};
pub use share::ShareCounts;
pub(crate) use share::SharedRun;
use share::Sharing;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use crate::disk::vhd::VhdDisk;
use crate::disk::vhdx::VhdxDisk;
use crate::disk::{Chain, ChainOptions, Format, Layer, Payload};
use crate::error::{Error, Result};
use crate::failpoint::{Failpoint, failpoint};
use crate::io::FileStorage;
use crate::journal::storage::Journaled;
use crate::journal::{self, Begin, Record, Writer};
use crate::transaction::{Transaction, begin_record};
use read::{Buffers, Loaded, ReadGroup, read_groups};
use verify::{Behind, verify_behind, verify_runs};

#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The ancestor to merge into (default: the child's direct parent).
    pub into: Option<PathBuf>,
    /// Overrides the child's parent, as `--parent` does elsewhere.
    pub parent: Option<PathBuf>,
    /// Rename the merged files to NAME.merged instead of deleting them.
    pub keep: bool,
    /// Merge even though other disks (siblings) depend on the ancestor or an
    /// intermediate disk; they will no longer read correctly.
    pub force: bool,
    /// Bytes copied between two commits. A commit's fdatasync waits for
    /// the storage to drain its cache, about a second on a virtual disk
    /// whatever the batch, while a merge that is not committed is rolled
    /// back whole anyway: so batches are large (4 GiB), and memory is
    /// bounded by the metadata and held-write limits instead.
    pub batch_bytes: u64,
    /// Verify the whole ancestor against the child's content digest (reads
    /// the whole disk twice) instead of every copied run (reads them once).
    pub verify_full: bool,
    /// Bytes copied between two checkpoints (durable points a crash or a
    /// pause resumes from); checkpoints are also at most
    /// `CHECKPOINT_SECONDS` of copying apart.
    pub checkpoint_bytes: u64,
    /// Set (by a signal handler) to stop at the next run: the merge makes a
    /// checkpoint there and returns `Error::Paused`.
    pub stop: Option<Arc<AtomicBool>>,
    /// Clone runs instead of copying them where the file system shares
    /// blocks between the merged files and the ancestor (reflink).
    pub share: bool,
    /// Write no before-images of overwritten guest data: an interrupted
    /// merge can then only be finished, never rolled back
    /// (journal-format.md, `FinishOnly`).
    pub finish_only: bool,
}

/// The longest a merge copies between two checkpoints.
pub const CHECKPOINT_SECONDS: f64 = 30.0;

impl MergeOptions {
    /// Whether a stop was requested (see `stop`).
    pub fn stop_requested(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            into: None,
            parent: None,
            keep: false,
            force: false,
            batch_bytes: 4 << 30,
            verify_full: false,
            checkpoint_bytes: 1 << 30,
            stop: None,
            share: true,
            finish_only: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub plan: Plan,
    pub journal_bytes: u64,
    /// "runs": every copied run re-read from the ancestor and matched to
    /// its BLAKE3; "full": content digests of the whole disk before and after.
    pub verify: &'static str,
    pub runs_verified: u64,
    /// Content digests (full verification only).
    pub expected_digest: Option<String>,
    pub result_digest: Option<String>,
    pub verified: bool,
    pub seconds: f64,
    /// Seconds from the start at which each tenth of the bytes was copied.
    pub decile_seconds: Vec<f64>,
    /// Of the runs put from the merged files unread: bytes cloned (blocks
    /// shared with the merged file) and bytes copied.
    pub sharing: ShareCounts,
}

impl Report {
    fn new(
        plan: Plan,
        verified: Verified,
        expected: Option<blake3::Hash>,
        started: Instant,
        decile_seconds: Vec<f64>,
    ) -> Report {
        Report {
            sharing: verified.sharing,
            plan,
            journal_bytes: verified.journal_bytes,
            verify: if expected.is_some() { "full" } else { "runs" },
            runs_verified: verified.runs,
            expected_digest: expected.map(|e| e.to_hex().to_string()),
            result_digest: verified.digest.map(|e| e.to_hex().to_string()),
            verified: true,
            seconds: started.elapsed().as_secs_f64(),
            decile_seconds,
        }
    }
}

/// Opens a file for writing through the journal. `out_of_place`: a VHD
/// writes the blocks a write covers whole into new blocks (the copy phase
/// of a merge; a redo after the commit writes in place).
pub fn open_journaled(
    path: &Path,
    index: u32,
    journal: &Arc<Mutex<Writer>>,
    format: Format,
    guid: Option<Uuid>,
    out_of_place: bool,
) -> Result<Box<dyn Layer>> {
    let file = FileStorage::open(path, true)?;
    let io = Box::new(
        Journaled::new(file, index, journal.clone()).map_err(|e| Error::io(path, "opening", e))?,
    );
    Ok(match format {
        Format::Vhdx => {
            let mut d = VhdxDisk::open_with(path, io, true)?;
            if let Some(g) = guid {
                d.set_next_data_write_guid(g);
            }
            Box::new(d)
        }
        _ => {
            let mut d = VhdDisk::open_with(path, io, true)?;
            if out_of_place {
                d.write_whole_blocks_out_of_place();
            }
            Box::new(d)
        }
    })
}

/// A run copied into the ancestor: offset, length, BLAKE3 of its bytes.
pub(crate) type Copied = (u64, u64, [u8; 32]);

/// Runs a prepared merge to the end.
pub fn execute(
    p: Prepared,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report> {
    let started = Instant::now();
    let Prepared {
        mut chain,
        ancestor,
        plan,
        relink,
    } = p;
    let mut lock_paths: Vec<&Path> = preflight::layer_paths(&chain)[..=ancestor].to_vec();
    lock_paths.extend(relink.iter().map(|d| d.path.as_path()));
    let locks = preflight::lock_all(&lock_paths)?;

    // The expected result: the child's view, as a content digest.
    let expected = match opts.verify_full {
        true => Some(crate::verify::content_digest(&chain, |_| {})?.root),
        false => None,
    };
    let (begin, identities, new_guid) =
        begin_record(&chain, ancestor, &relink, expected, opts.keep)?;
    let a_layer = chain.layers[ancestor].as_ref();
    let format = a_layer.format();
    let plan_record = journal::PlanRecord {
        digest: plan.digest,
        bytes: plan.bytes,
        identities,
    };
    let tx = Transaction::begin(a_layer.path(), begin, plan_record, locks, opts.finish_only)?;
    failpoint(Failpoint::AfterBegin);

    let a = open_journaled(&tx.ancestor, 0, &tx.journal, format, new_guid, true)?;
    // From here the merge reads only the merged levels; the read-only
    // ancestor and what lies below it go (on a 64 TiB disk each open layer
    // holds a 16 MiB BAT).
    chain.layers.truncate(ancestor);
    let mut applied = Apply {
        chain: &chain,
        tx: &tx,
        opts,
        total: plan.bytes,
        started,
    }
    .run(a, 0, 0, progress)?;
    drop(chain);
    let deciles = std::mem::take(&mut applied.deciles);
    let verified = finish(&tx, applied, expected)?;
    Ok(Report::new(plan, verified, expected, started, deciles))
}

/// What verification found after the commit.
struct Verified {
    runs: u64,
    digest: Option<blake3::Hash>,
    journal_bytes: u64,
    sharing: ShareCounts,
}

/// The runs a merge put into the ancestor, to verify after the commit.
#[derive(Default)]
struct PutRuns {
    /// Read, hashed and written.
    copied: Vec<Copied>,
    /// Put from the merged files unread.
    shared: Vec<SharedRun>,
}

impl PutRuns {
    /// Journals the redo record of run `r` and keeps it for verification;
    /// returns what to write (`zeros` holds a Zeros run's bytes).
    fn record<'a>(
        &mut self,
        journal: &Mutex<Writer>,
        r: &Run,
        loaded: &'a Loaded,
        pieces: &'a read::Pieces,
        zeros: &'a [u8],
    ) -> Payload<'a> {
        let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        let (payload, hash) = match loaded {
            Loaded::Shared(from, source) => {
                journal.append(&Record::Share {
                    offset: r.offset,
                    length: r.len,
                    source_level: r.level as u32,
                    source_offset: *source,
                });
                self.shared.push(SharedRun {
                    offset: r.offset,
                    len: r.len,
                    level: r.level,
                    source: *source,
                });
                let len = r.len;
                return Payload::File {
                    from,
                    offset: *source,
                    len,
                };
            }
            Loaded::Read(k, hash) => (pieces.get(*k), *hash),
            Loaded::Zeros => (zeros, *blake3::hash(zeros).as_bytes()),
        };
        journal.append(&copy_record(r, hash));
        self.copied.push((r.offset, r.len, hash));
        Payload::Bytes(payload)
    }
}

/// After the last run: close the ancestor, re-link the children,
/// commit, verify every copied run and clean up.
fn finish(tx: &Transaction, applied: Applied, expected: Option<blake3::Hash>) -> Result<Verified> {
    let (runs, sharing) = (&applied.runs, &applied.sharing);
    let ancestor = tx.ancestor.as_path();
    for (child, index) in &tx.relinked {
        let a_identity = crate::disk::open_layer(ancestor, false)?.identity();
        relink_child(child, *index, &tx.journal, ancestor, &a_identity)?;
        failpoint(Failpoint::MidRelink);
    }
    // Last look before the point of no return: the re-linked children were
    // written by us just now, the ancestor throughout.
    let mut ours: Vec<&Path> = vec![ancestor];
    ours.extend(tx.relinked.iter().map(|(p, _)| p.as_path()));
    tx.locks.check_unchanged(&ours)?;
    tx.commit()?;
    failpoint(Failpoint::AfterCommit);
    let journal_bytes = tx
        .journal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .bytes_written();
    // Prove it before the merged files go: every copied run reads back from
    // the ancestor with its BLAKE3 (and, with --verify full, the whole disk
    // has the child's content digest); most were read back behind the copy
    // (verify.rs). A failure leaves the journal for `recover`, which redoes
    // the runs from the still-present sources.
    if let Some(e) = applied.behind.failed {
        return Err(e);
    }
    let after = Chain::open(ancestor, &ChainOptions::default())?;
    verify_runs(&after, ancestor, &runs.copied)?;
    sharing.verify(&after, ancestor, &runs.shared)?;
    let digest = match expected {
        Some(_) => Some(crate::verify::content_digest(&after, |_| {})?.root),
        None => None,
    };
    drop(after);
    if digest != expected {
        return Err(Error::corrupt(
            ancestor,
            "merged disk",
            0,
            "the ancestor's content digest differs from the child's before the merge; the merge is committed but unverified: run `vhdmerge recover`",
        ));
    }
    let merged: Vec<PathBuf> = tx
        .files
        .iter()
        .skip(1)
        .take(tx.files.len() - 1 - tx.relinked.len())
        .cloned()
        .collect();
    tx.cleanup(&merged)?;
    release(ancestor, &applied.released)?;
    let counts = sharing.counts();
    Ok(Verified {
        runs: applied.behind.runs + (runs.copied.len() + runs.shared.len()) as u64,
        digest,
        journal_bytes,
        sharing: ShareCounts {
            copied_bytes: counts.copied_bytes + runs.copied.iter().map(|c| c.1).sum::<u64>(),
            ..counts
        },
    })
}

/// Gives the file system back the blocks the ancestor replaced out of
/// place. Only once the journal is gone: until then they hold what a
/// rollback restores (even a committed merge rolls back until its cleanup
/// starts). A crash before this only leaves them allocated.
fn release(ancestor: &Path, ranges: &[(u64, u64)]) -> Result<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    let file = FileStorage::open(ancestor, true)?;
    for (offset, len) in ranges.iter().filter_map(|&(o, n)| whole_pages(o, n)) {
        file.punch_hole(offset, len).map_err(|e| {
            let doing = "freeing replaced blocks (the merge is complete; their space stays in use)";
            Error::io(ancestor, doing, e)
        })?;
    }
    Ok(())
}

/// The 4 KiB pages wholly inside [offset, offset + len), if any. A punch
/// that starts or ends inside a file-system block makes the file system
/// zero part of that block, reading it first when it is not cached (ext4:
/// a synchronous read per range, for no space back); a VHD block's range
/// starts at its 512-byte bitmap, just before its page-aligned data.
fn whole_pages(offset: u64, len: u64) -> Option<(u64, u64)> {
    const PAGE: u64 = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    (end > start).then(|| (start, end - start))
}

/// The copy phase: runs read on a second thread, written into the
/// ancestor through the journal, with commits and checkpoints.
struct Apply<'a> {
    /// The merged levels only.
    chain: &'a Chain,
    tx: &'a Transaction,
    opts: &'a MergeOptions,
    /// Guest bytes the whole merge copies.
    total: u64,
    started: Instant,
}

/// What the copy phase did.
struct Applied {
    runs: PutRuns,
    /// The merged files shared from (shared runs are proven against them).
    sharing: Sharing,
    /// Seconds from the start at which each tenth of the bytes was copied.
    deciles: Vec<f64>,
    /// The ancestor's blocks replaced out of place, free after the commit.
    released: Vec<(u64, u64)>,
    /// Runs verified behind the copy (not in `runs` any more).
    behind: verify::Verified,
}

impl Apply<'_> {
    /// Copies the runs from guest offset `from` on (`done` bytes were
    /// copied before it), closes the ancestor and records the last
    /// checkpoint. A stop request ends it at a checkpoint with `Paused`.
    fn run(
        &self,
        mut a: Box<dyn Layer>,
        from: u64,
        done: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Applied> {
        let tx = self.tx;
        let sharing = Sharing::new(self.chain, &tx.ancestor, self.opts.share)?;
        if sharing.any_active() {
            // Before-images of large runs are cloned too (journal/images.rs).
            tx.journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enable_images();
        }
        let mut copier = Copier {
            points: DurablePoints::new(self.opts, tx, self.total),
            runs: PutRuns::default(),
            done,
            started: self.started,
            deciles: Vec::new(),
            progress,
        };
        // A reader thread walks the runs, reads them in groups of up to 8 MiB
        // (so that their source reads can be merged, see read_pieces) and
        // hashes them, while this thread journals and writes the group before:
        // reading, hashing and writing overlap. At most one read group waits.
        let buffers = Buffers::default();
        let busy = AtomicBool::new(false);
        let behind = std::thread::scope(|scope| -> Result<verify::Verified> {
            let (send, rx) = std::sync::mpsc::sync_channel::<Result<ReadGroup>>(1);
            let (chain, levels, buffers) = (self.chain, self.chain.layers.len(), &buffers);
            let sharing = &sharing;
            scope.spawn(move || read_groups(chain, levels, from, sharing, buffers, &send));
            let (jobs, todo) = std::sync::mpsc::channel();
            let (a_path, busy) = (tx.ancestor.as_path(), &busy);
            let verifier = scope.spawn(move || verify_behind(a_path, todo, busy));
            let mut behind = Behind::new(a_path, jobs, busy);
            // Returning early drops the receiver, which stops the reader,
            // and the job sender, which ends the verifier.
            for g in rx {
                copier.apply(g?, &mut a, &mut behind)?;
            }
            drop(behind);
            Ok(verifier.join().expect("the verifying thread panicked"))
        })?;
        // The copy's buffers go before verification takes its own.
        drop(buffers);
        let released = self.close(a, copier.done)?;
        Ok(Applied {
            runs: copier.runs,
            sharing,
            deciles: copier.deciles,
            released,
            behind,
        })
    }

    /// Commits and closes the ancestor and records that every run is
    /// durable; returns the ranges it replaced out of place.
    fn close(&self, mut a: Box<dyn Layer>, done: u64) -> Result<Vec<(u64, u64)>> {
        let tx = self.tx;
        tx.locks.check_unchanged(&[tx.ancestor.as_path()])?;
        a.commit()?;
        failpoint(Failpoint::BeforeClose);
        a.close()?;
        let released = a.released();
        drop(a);
        // A crash while re-linking resumes here.
        tx.append_checkpoint(self.chain.virtual_size(), done)?;
        failpoint(Failpoint::AfterApply);
        Ok(released)
    }
}

/// The apply loop's state: what was written, and when to make it durable.
struct Copier<'a, 'p> {
    /// Also holds the transaction and the bytes to copy in all.
    points: DurablePoints<'a>,
    runs: PutRuns,
    /// Guest bytes copied so far.
    done: u64,
    started: Instant,
    /// Seconds from the start at which each tenth of the bytes was copied.
    deciles: Vec<f64>,
    progress: &'p mut dyn FnMut(u64, u64),
}

impl Copier<'_, '_> {
    /// Journals and writes one read group's runs into the ancestor,
    /// committing and checkpointing as they fall due.
    fn apply(&mut self, g: ReadGroup, a: &mut Box<dyn Layer>, behind: &mut Behind) -> Result<()> {
        for (r, loaded) in g.runs.iter().zip(&g.datas) {
            let zeros = match loaded {
                Loaded::Zeros if ancestor_reads_zero(a.as_ref(), r.offset, r.len)? => continue,
                Loaded::Zeros => vec![0u8; r.len as usize],
                _ => Vec::new(),
            };
            let payload = self
                .runs
                .record(&self.points.tx.journal, r, loaded, &g.pieces, &zeros);
            a.put(r.offset, payload)?;
            self.done += r.len;
            if self
                .points
                .after_copy(a, r.offset + r.len, r.len, self.done)?
            {
                behind.hand_off(&mut self.runs.copied);
            }
            self.count();
        }
        Ok(())
    }

    /// Records the deciles passed and reports progress.
    fn count(&mut self) {
        let total = self.points.total;
        while self.deciles.len() < 10 && self.done * 10 >= total * (self.deciles.len() as u64 + 1) {
            self.deciles.push(self.started.elapsed().as_secs_f64());
        }
        (self.progress)(self.done, total);
    }
}

/// The redo record of a run read and written: its source and BLAKE3.
fn copy_record(r: &Run, hash: [u8; 32]) -> Record {
    Record::Copy {
        offset: r.offset,
        length: r.len,
        source_level: r.level as u32,
        source_offset: r.source,
        blake3: hash,
    }
}

/// When the copy phase commits and checkpoints: per batch of data (or
/// sooner when the metadata to log grows: scattered writes on a large disk
/// touch a BAT page each), and per checkpoint interval, 30 s, or a stop.
struct DurablePoints<'a> {
    opts: &'a MergeOptions,
    tx: &'a Transaction,
    total: u64,
    since_commit: u64,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    batches: u64,
}

impl<'a> DurablePoints<'a> {
    fn new(opts: &'a MergeOptions, tx: &'a Transaction, total: u64) -> Self {
        DurablePoints {
            opts,
            tx,
            total,
            since_commit: 0,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            batches: 0,
        }
    }

    /// After a run of `len` bytes ending at guest offset `end` was written
    /// (`done` bytes in all): commit or checkpoint if one is due, and say
    /// whether it checkpointed; a stop request ends the copy at a
    /// checkpoint with `Paused`.
    fn after_copy(
        &mut self,
        a: &mut Box<dyn Layer>,
        end: u64,
        len: u64,
        done: u64,
    ) -> Result<bool> {
        let (opts, tx) = (self.opts, self.tx);
        self.since_commit += len;
        self.since_checkpoint += len;
        let stop = opts.stop_requested();
        if self.since_checkpoint >= opts.checkpoint_bytes
            || self.last_checkpoint.elapsed().as_secs_f64() >= CHECKPOINT_SECONDS
            || self.closing(done)
            || stop
        {
            tx.checkpoint(a, end, done)?;
            (self.since_commit, self.since_checkpoint) = (0, 0);
            self.last_checkpoint = Instant::now();
            self.batches += 1;
            batch_failpoints(self.batches);
            if stop {
                return Err(Error::Paused {
                    ancestor: tx.ancestor.clone(),
                    percent: percent(done, self.total),
                    undo: tx.undo_hint(),
                });
            }
            return Ok(true);
        } else if self.since_commit >= opts.batch_bytes
            || a.pending_metadata() >= MAX_PENDING_METADATA
        {
            tx.locks.check_unchanged(&[tx.ancestor.as_path()])?;
            a.commit()?;
            self.since_commit = 0;
            self.batches += 1;
            batch_failpoints(self.batches);
        }
        Ok(false)
    }
}

impl DurablePoints<'_> {
    /// Checkpoints near the end, so that the verification behind the copy
    /// ends with it. The runs since the last checkpoint go to the
    /// verifying thread (verify.rs), which reads them from the page cache
    /// about `VERIFY_PACE` times as fast as the copy writes: handed off
    /// when a `VERIFY_PACE`th of their size is left to copy, they are done
    /// about when the copy is. That happens a few times at most (what is
    /// left shrinks fivefold each time; twice with the default interval),
    /// and not for jobs too small to be worth a checkpoint's flush: their
    /// runs are verified after the commit.
    fn closing(&self, done: u64) -> bool {
        let min_job = (self.opts.checkpoint_bytes / 8).min(MIN_CLOSING_JOB);
        let left = self.total.saturating_sub(done);
        left > 0 && self.since_checkpoint >= min_job && left * VERIFY_PACE <= self.since_checkpoint
    }
}

/// How much faster the verifying thread reads back than the copy writes,
/// at least (4.5-5x on this project's machines, BENCHMARKS.md session 19).
const VERIFY_PACE: u64 = 4;
/// The smallest job a closing checkpoint is made for.
const MIN_CLOSING_JOB: u64 = 64 << 20;

/// `mid-apply` after the first commit of a copy phase, `after-batch-N`
/// after the Nth (a commit or a checkpoint).
fn batch_failpoints(batches: u64) {
    if batches == 1 {
        failpoint(Failpoint::MidApply);
    }
    failpoint(Failpoint::AfterBatch(batches));
}

fn percent(done: u64, total: u64) -> f64 {
    match total {
        0 => 100.0,
        t => done as f64 * 100.0 / t as f64,
    }
}

/// Continues an interrupted merge from its last checkpoint: the ancestor
/// and re-linked children are exactly as that checkpoint left them (the
/// caller undid what came after), the merged files are unchanged.
pub(crate) struct Resume<'a> {
    pub(crate) tx: &'a Transaction,
    pub(crate) begin: &'a Begin,
    /// The merged levels, top first.
    pub(crate) sources: Chain,
    pub(crate) checkpoint: &'a journal::Checkpoint,
    pub(crate) total: u64,
    /// Runs copied before the checkpoint, from the journal's Copy records.
    pub(crate) copied_before: Vec<Copied>,
    /// Runs shared before the checkpoint, from its Share records.
    pub(crate) shared_before: Vec<SharedRun>,
}

/// Opens the merged files a journal names, top first, and checks that they
/// still hold the runs the merge planned. `Ok(Err(why))` when they do not.
pub(crate) fn reopen_sources(
    begin: &Begin,
    paths: &[PathBuf],
    plan: &journal::PlanRecord,
) -> Result<std::result::Result<Chain, String>> {
    let mut layers = Vec::new();
    for p in crate::transaction::merged_sources(begin, paths).values() {
        layers.push(crate::disk::open_layer(p, false)?);
    }
    let chain = Chain {
        layers,
        links: vec![],
    };
    let levels = chain.layers.len();
    if plan_digest(&chain, levels)? != plan.digest {
        return Ok(Err(
            "the merged files no longer hold the runs the merge planned (their data map changed)"
                .into(),
        ));
    }
    Ok(Ok(chain))
}

impl Resume<'_> {
    pub(crate) fn run(
        self,
        opts: &MergeOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Report> {
        let started = Instant::now();
        let a_path = &self.tx.ancestor;
        let format = crate::disk::open_layer(a_path, false)?.format();
        let guid = self
            .begin
            .data_write_guid
            .as_deref()
            .and_then(|g| Uuid::parse_str(g).ok());
        let a = open_journaled(a_path, 0, &self.tx.journal, format, guid, true)?;
        let cp = self.checkpoint;
        let applied = Apply {
            chain: &self.sources,
            tx: self.tx,
            opts,
            total: self.total,
            started,
        }
        .run(a, cp.next_offset, cp.bytes_done, progress)?;
        drop(self.sources);
        let expected = self
            .begin
            .expected_digest
            .as_deref()
            .and_then(|h| blake3::Hash::from_hex(h).ok());
        let mut applied = applied;
        applied.runs.copied.extend(self.copied_before);
        applied.runs.shared.extend(self.shared_before);
        let deciles = std::mem::take(&mut applied.deciles);
        let verified = finish(self.tx, applied, expected)?;
        let plan = Plan {
            child: self.tx.files.get(1).cloned().unwrap_or_default(),
            ancestor: a_path.clone(),
            format,
            merged: self.tx.files[1..self.tx.files.len() - self.tx.relinked.len()].to_vec(),
            relink: self.tx.relinked.iter().map(|(p, _)| p.clone()).collect(),
            siblings: vec![],
            runs: verified.runs,
            bytes: self.total,
            overwrite_bytes: 0,
            new_blocks: 0,
            new_bytes: 0,
            journal_estimate: 0,
            space_needed: 0,
            free_space: 0,
            journal: self.tx.jpath.clone(),
            digest: [0; 32],
            cloning: verified.sharing.cloned_bytes > 0,
        };
        Ok(Report::new(plan, verified, expected, started, deciles))
    }
}

/// Changed metadata (BAT and bitmap pages) held before an early commit.
pub(crate) const MAX_PENDING_METADATA: u64 = 4 << 20;

/// Points a child of the merged child at the ancestor: new identity and
/// paths, through the journal (VHDX: through the child's own log).
pub fn relink_child(
    child: &Path,
    index: u32,
    journal: &Arc<Mutex<Writer>>,
    ancestor: &Path,
    identity: &crate::disk::Identity,
) -> Result<()> {
    let layer = crate::disk::open_layer(child, false)?;
    let format = layer.format();
    drop(layer);
    let file = FileStorage::open(child, true)?;
    let io = Box::new(
        Journaled::new(file, index, journal.clone()).map_err(|e| Error::io(child, "opening", e))?,
    );
    let rel = crate::disk::create::relative_win_path(child, ancestor);
    let name = ancestor
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    match (format, identity) {
        (Format::Vhdx, crate::disk::Identity::VhdxLinkage { linkage, .. }) => {
            let mut d = VhdxDisk::open_with(child, io, true)?;
            let mut loc = crate::format::vhdx::metadata::ParentLocator::default();
            loc.set(
                "parent_linkage",
                &crate::format::vhdx::metadata::braced(linkage),
            );
            loc.set("relative_path", &rel);
            loc.set("absolute_win32_path", &format!("\\\\?\\C:\\{name}"));
            d.set_locator(&loc)?;
            d.close()
        }
        (Format::Vhd, crate::disk::Identity::VhdUniqueId(uid)) => {
            let mut d = VhdDisk::open_with(child, io, true)?;
            d.set_parent(*uid, &name, &rel)?;
            d.close()
        }
        _ => Err(Error::ChainMismatch {
            child: child.to_path_buf(),
            parent: ancestor.to_path_buf(),
            detail: "cannot re-link across formats".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::whole_pages;

    #[test]
    fn punches_only_whole_pages() {
        // A VHD block's range: its bitmap sector, then 2 MiB of aligned data.
        assert_eq!(whole_pages(0x205E00, 0x200200), Some((0x206000, 0x200000)));
        assert_eq!(whole_pages(4096, 8192), Some((4096, 8192)));
        assert_eq!(whole_pages(100, 4000), None);
        assert_eq!(whole_pages(4000, 4100), None);
        assert_eq!(whole_pages(4000, 8288), Some((4096, 8192)));
    }
}
