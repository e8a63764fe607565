//! Crash safety, proven by simulation: every mutating operation of a merge
//! (and of a recovery) is recorded, and for every operation index the
//! possible on-disk states after a power loss are rebuilt: everything up to
//! each file's last flush plus any prefix of the later writes, random
//! subsets of them, torn sector writes (old or garbage bytes in the lost
//! part), unsynced growth holding garbage, and unsynced creations and
//! deletions. Each state is recovered and must be exactly the state before
//! the merge or exactly the finished merge, as the journal says.
//!
//! The default run explores a subset (at least 5,000 states); set
//! `VHDMERGE_CRASH_FULL=1` (see README) for the full suite (100,000+).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::Rng;
use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};
use vhdmerge::io::trace::{self, Fault, Op};
use vhdmerge::merge::{self, MergeOptions};
use vhdmerge::recover::{self, Outcome};
use vhdmerge::{Chain, ChainOptions};

type Files = BTreeMap<String, Vec<u8>>;

/// Tracing and the GUID seed are process-wide: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().to_string()
}

fn snapshot(dir: &Path) -> Files {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (name(&p), std::fs::read(&p).unwrap()))
        .collect()
}

/// Writes `files` into `dir` (emptied first), sparsely: the images are mostly zeros.
fn materialize(files: &Files, dir: &Path) {
    use std::os::unix::fs::FileExt;
    for e in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (n, data) in files {
        let f = std::fs::File::create(dir.join(n)).unwrap();
        f.set_len(data.len() as u64).unwrap();
        for (i, page) in data.chunks(64 << 10).enumerate() {
            if !is_zero(page) {
                f.write_all_at(page, (i as u64) << 16).unwrap();
            }
        }
    }
}

/// Whether `b` (at most 64 KiB) is all zeros; a memcmp against a zero page,
/// far faster than a byte loop over images that are mostly zeros.
fn is_zero(b: &[u8]) -> bool {
    static ZERO: [u8; 64 << 10] = [0; 64 << 10];
    b == &ZERO[..b.len()]
}

/// Durable and pending state after a prefix of the operations.
struct Sim {
    durable: BTreeMap<String, Vec<u8>>,
    exists: BTreeSet<String>,
    cur: BTreeMap<String, Vec<u8>>,
    /// Indices of operations not yet made durable (content or folder).
    pending: Vec<usize>,
    /// Changes whenever the durable state does (flush, folder sync, rename).
    epoch: usize,
}

impl Sim {
    fn new(start: &Files) -> Sim {
        Sim {
            durable: start.clone(),
            exists: start.keys().cloned().collect(),
            cur: start.clone(),
            pending: Vec::new(),
            epoch: 0,
        }
    }

    fn step(&mut self, ops: &[Op], i: usize) {
        if matches!(
            &ops[i],
            Op::Flush { .. } | Op::SyncDir { .. } | Op::Rename { .. }
        ) {
            self.epoch += 1;
        }
        match &ops[i] {
            Op::Write { path, offset, data } => {
                let f = self.cur.entry(name(path)).or_default();
                write_into(f, *offset, data);
                self.pending.push(i);
            }
            Op::SetLen { path, len } => {
                self.cur
                    .entry(name(path))
                    .or_default()
                    .resize(*len as usize, 0);
                self.pending.push(i);
            }
            Op::Flush { path } => {
                let n = name(path);
                self.durable
                    .insert(n.clone(), self.cur.get(&n).cloned().unwrap_or_default());
                self.pending.retain(|&j| !matches!(&ops[j], Op::Write { path: p, .. } | Op::SetLen { path: p, .. } if name(p) == n));
            }
            Op::Create { path } => {
                self.cur.insert(name(path), Vec::new());
                self.pending.push(i);
            }
            Op::Remove { path } => {
                self.cur.remove(&name(path));
                self.pending.push(i);
            }
            Op::Rename { from, to } => {
                if let Some(d) = self.cur.remove(&name(from)) {
                    self.cur.insert(name(to), d);
                }
                if let Some(d) = self.durable.remove(&name(from)) {
                    self.durable.insert(name(to), d);
                }
                self.pending.push(i);
            }
            Op::SyncDir { .. } => {
                self.exists = self.cur.keys().cloned().collect();
                self.pending
                    .retain(|&j| matches!(&ops[j], Op::Write { .. } | Op::SetLen { .. }));
            }
        }
    }

    /// The files after a crash in which exactly `chosen` (in order) of the
    /// pending operations reached the disk; `torn` cuts the last chosen
    /// write after that many 512-byte sectors, `garbage` fills lost parts.
    fn crash_state(
        &self,
        ops: &[Op],
        chosen: &[usize],
        torn: Option<usize>,
        garbage: bool,
    ) -> Files {
        let mut files: Files = self
            .exists
            .iter()
            .map(|n| (n.clone(), self.durable.get(n).cloned().unwrap_or_default()))
            .collect();
        for (k, &j) in chosen.iter().enumerate() {
            let last = k + 1 == chosen.len();
            match &ops[j] {
                Op::Write { path, offset, data } => {
                    let Some(f) = files.get_mut(&name(path)) else {
                        continue;
                    };
                    match (last, torn) {
                        (true, Some(sectors)) => {
                            let cut = (sectors * 512).min(data.len());
                            write_into(f, *offset, &data[..cut]);
                            if garbage && cut < data.len() {
                                write_into(f, *offset + cut as u64, &vec![0xA5; data.len() - cut]);
                            }
                        }
                        _ => write_into(f, *offset, data),
                    }
                }
                Op::SetLen { path, len } => {
                    let Some(f) = files.get_mut(&name(path)) else {
                        continue;
                    };
                    let old = f.len();
                    f.resize(*len as usize, if garbage { 0x5A } else { 0 });
                    if !garbage && old > *len as usize {
                        f.truncate(*len as usize);
                    }
                }
                Op::Create { path } => {
                    files.insert(
                        name(path),
                        self.durable.get(&name(path)).cloned().unwrap_or_default(),
                    );
                }
                Op::Remove { path } => {
                    files.remove(&name(path));
                }
                Op::Rename { from, to } => {
                    if let Some(d) = files.remove(&name(from)) {
                        files.insert(name(to), d);
                    }
                }
                _ => {}
            }
        }
        files
    }
}

fn write_into(f: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if f.len() < end {
        f.resize(end, 0);
    }
    f[offset as usize..end].copy_from_slice(data);
}

/// The crash states to try at one operation index.
/// How to build one crash state from a `Sim` (see `Sim::crash_state`):
/// cheap to list and compare, so that states are built one at a time and
/// a recipe already tried on the same durable state is skipped unbuilt.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Recipe {
    chosen: Vec<usize>,
    torn: Option<usize>,
    garbage: bool,
}

impl Recipe {
    fn build(&self, sim: &Sim, ops: &[Op]) -> Files {
        sim.crash_state(ops, &self.chosen, self.torn, self.garbage)
    }
}

fn variants(sim: &Sim, ops: &[Op], rng: &mut Rng, cap: usize, tears: usize) -> Vec<Recipe> {
    let p = &sim.pending;
    let mut out = Vec::new();
    let r = |chosen: &[usize], torn, garbage| Recipe {
        chosen: chosen.to_vec(),
        torn,
        garbage,
    };
    // (a) every prefix of the pending operations (sampled past the cap).
    let prefixes: Vec<usize> = if p.len() < cap {
        (0..=p.len()).collect()
    } else {
        (0..cap)
            .map(|_| rng.below(p.len() as u64 + 1) as usize)
            .chain([0, p.len()])
            .collect()
    };
    for k in prefixes {
        out.push(r(&p[..k], None, false));
        // (c) torn: the next write cut at a sector boundary, old or garbage;
        // one random cut, or (full suite) up to 16 cuts spread over it.
        if k < p.len()
            && let Op::Write { data, .. } = &ops[p[k]]
            && data.len() > 512
        {
            let n = data.len() / 512;
            let cuts: Vec<usize> = if tears > 1 {
                let step = (n - 1).div_ceil(tears).max(1);
                (1..n).step_by(step).collect()
            } else {
                vec![(1 + rng.below(n as u64) as usize).min(n - 1)]
            };
            for sectors in cuts {
                for garbage in [false, true] {
                    out.push(r(&p[..=k], Some(sectors), garbage));
                }
            }
        }
    }
    // (b) random subsets, in order and reversed; (d) growth holding garbage.
    for _ in 0..(cap / 8).max(2) {
        if p.is_empty() {
            break;
        }
        let subset: Vec<usize> = p.iter().copied().filter(|_| rng.below(2) == 0).collect();
        out.push(r(&subset, None, false));
        let mut rev = subset.clone();
        rev.reverse();
        out.push(r(&rev, None, true));
    }
    out
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    vhdx: bool,
    /// Block sizes from base to top; the top is merged into `into`.
    levels: Vec<u64>,
    into: usize,
    /// Merge level 1 while level 2 exists (re-link), instead of the top.
    relink: bool,
    fixed_base: bool,
    /// The base has a live log at the start (VHDX; the preflight replays it).
    dirty_log: bool,
}

fn build(s: &Scenario, dir: &Path) -> PathBuf {
    build_with(s, dir, 0)
}

/// `extra` more writes per level, scattered, of 512 bytes to 256 KiB: more
/// runs, more batches and more pending writes, so more distinct states.
fn build_with(s: &Scenario, dir: &Path, extra: usize) -> PathBuf {
    let size = 6u64 << 20;
    let mut rng = Rng(17);
    let mut paths: Vec<PathBuf> = Vec::new();
    for (i, &bs) in s.levels.iter().enumerate() {
        let p = dir.join(format!(
            "l{i}.{}",
            match (s.vhdx, i) {
                (true, 0) => "vhdx",
                (true, _) => "avhdx",
                (false, 0) => "vhd",
                (false, _) => "avhd",
            }
        ));
        if i == 0 {
            if s.vhdx {
                create::create_vhdx(
                    &p,
                    &VhdxOptions {
                        virtual_size: size,
                        block_size: bs,
                        fixed: s.fixed_base,
                        ..Default::default()
                    },
                )
                .unwrap();
            } else {
                create::create_vhd(
                    &p,
                    &VhdOptions {
                        size,
                        block_size: bs,
                        fixed: s.fixed_base,
                    },
                )
                .unwrap();
            }
        } else {
            create::create_child(&p, &paths[i - 1], Some(bs)).unwrap();
        }
        let mut c = Chain::open(
            &p,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        // Whole blocks and partial sectors, overlapping the parent's data.
        c.write((i as u64) << 20, &rng.bytes(1 << 20)).unwrap();
        c.write(3_000_000 + i as u64 * 5000, &rng.bytes(9000))
            .unwrap();
        for _ in 0..extra {
            let len = 512 * (1 + rng.below(512));
            let at = rng.below(size - len) / 512 * 512;
            c.write(at, &rng.bytes(len as usize)).unwrap();
        }
        c.close().unwrap();
        drop(c);
        paths.push(p);
    }
    if s.dirty_log {
        make_dirty(&paths[0]);
    }
    if s.relink {
        paths[1].clone()
    } else {
        paths[s.levels.len() - 1].clone()
    }
}

/// Leaves a live VHDX log in the file: one entry that rewrites the first
/// BAT page with its own contents, and the header's LogGuid set.
fn make_dirty(path: &Path) {
    use vhdmerge::format::vhdx::{HEADER_OFFSETS, header::Header, log};
    let mut f = std::fs::read(path).unwrap();
    let h0 = Header::decode(&f[HEADER_OFFSETS[0] as usize..][..4096]).unwrap();
    let h1 = Header::decode(&f[HEADER_OFFSETS[1] as usize..][..4096]).unwrap();
    let (mut h, slot) = if h0.sequence > h1.sequence {
        (h0, 1)
    } else {
        (h1, 0)
    };
    let g = uuid::Uuid::from_u128(0x1234);
    let bat = (3u64 << 20) as usize;
    let entry = log::encode_entry(
        &g,
        7,
        0,
        f.len() as u64,
        &[(bat as u64, &f[bat..bat + 4096])],
    );
    let lo = h.log_offset as usize;
    f[lo..lo + entry.len()].copy_from_slice(&entry);
    h.sequence += 1;
    h.log_guid = g;
    f[HEADER_OFFSETS[slot] as usize..][..4096].copy_from_slice(&h.encode());
    std::fs::write(path, f).unwrap();
}

fn opts(s: &Scenario, dir: &Path) -> MergeOptions {
    let into = if s.relink {
        None
    } else {
        Some(dir.join(format!(
            "l{}.{}",
            s.into,
            if s.vhdx {
                if s.into == 0 { "vhdx" } else { "avhdx" }
            } else if s.into == 0 {
                "vhd"
            } else {
                "avhd"
            }
        )))
    };
    MergeOptions {
        into,
        batch_bytes: 256 << 10,
        ..Default::default()
    }
}

fn run_merge(child: &Path, o: &MergeOptions) -> vhdmerge::Result<()> {
    let p = merge::prepare(child, o)?;
    merge::execute(p, o, &mut |_, _| {}).map(|_| ())
}

/// Recovers `dir` (if a journal is there) and checks the invariant.
/// Returns a description of a violation, if any.
fn recover_and_check(
    dir: &Path,
    ancestor: &str,
    start: &Files,
    finished: &Files,
    rollback: bool,
) -> Result<(), String> {
    let a = dir.join(ancestor);
    let jpath = vhdmerge::journal::path_for(&a);
    let committed = if jpath.exists() {
        match vhdmerge::journal::load_if_begun(&jpath) {
            Ok(Some(l)) => l.records.iter().any(|r| r.kind() == 4),
            Ok(None) => false,
            Err(e) => return Err(format!("journal unreadable: {e}")),
        }
    } else {
        false
    };
    let cleanup = jpath.exists()
        && vhdmerge::journal::load_if_begun(&jpath)
            .ok()
            .flatten()
            .is_some_and(|l| l.records.iter().any(|r| r.kind() == 5));
    if jpath.exists() {
        trace::start(dir, false, None, true);
        let r = std::panic::catch_unwind(|| recover::recover(&a, rollback));
        trace::stop();
        match r {
            Err(_) => return Err("recover panicked".into()),
            Ok(Err(e)) if rollback && cleanup => {
                if !e.to_string().contains("only be finished") {
                    return Err(format!("unexpected refusal: {e}"));
                }
                return recover_and_check(dir, ancestor, start, finished, false);
            }
            Ok(Err(e)) => return Err(format!("recover failed: {e}")),
            Ok(Ok(rep)) => {
                let want = if committed && !rollback {
                    Outcome::Finished
                } else {
                    Outcome::RolledBack
                };
                if rep.outcome != want {
                    return Err(format!(
                        "outcome {:?} but the journal said {}",
                        rep.outcome, rep.state
                    ));
                }
            }
        }
    }
    let now = snapshot(dir);
    if &now == start || &now == finished {
        Ok(())
    } else {
        let diff: Vec<String> = now
            .keys()
            .chain(start.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| now.get(*k) != start.get(*k))
            .cloned()
            .collect();
        Err(format!(
            "neither the start nor the finished merge; files differing from the start: {diff:?}"
        ))
    }
}

struct Totals {
    /// Distinct crash states (file sets), each recovered by default and,
    /// for a committed merge, also with `--rollback`.
    states: usize,
    /// Distinct states after a second crash during a recovery.
    recovery_crashes: usize,
}

/// How hard to look: the default run (CI) and the full suite differ here.
#[derive(Clone, Copy)]
struct Params {
    /// Prefixes per operation index before sampling; subsets are cap / 8.
    cap: usize,
    /// Torn cuts per torn write (1: one random cut).
    tears: usize,
    /// A second-crash sweep after every this many states.
    recovery_every: usize,
    /// Bytes per durable batch of the merge: smaller, more flush points.
    batch_bytes: u64,
    /// Extra scattered writes per level (see `build_with`).
    extra_writes: usize,
}

/// Crash states are deduplicated by content: different operation subsets
/// often leave the same bytes, and only distinct states are counted. The
/// images are mostly zeros, so only non-zero 4 KiB pages are hashed, each
/// with its offset (and every file with its name and length).
fn fingerprint(files: &Files) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for (n, d) in files {
        h.update(&(n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
        h.update(&(d.len() as u64).to_le_bytes());
        for (i, page) in d.chunks(4096).enumerate() {
            if !is_zero(page) {
                h.update(&(i as u64).to_le_bytes());
                h.update(page);
            }
        }
    }
    *h.finalize().as_bytes()
}

/// Recovery modes that take different paths for this state: `--rollback`
/// differs from the default only for a committed merge whose cleanup has
/// not begun (before commit both roll back, through the same code).
fn modes(state: &Files, ancestor: &str) -> &'static [bool] {
    let j = state
        .get(&format!("{ancestor}{}", vhdmerge::journal::SUFFIX))
        .and_then(|b| vhdmerge::journal::decode(Path::new("journal"), b).ok());
    match j {
        Some(l)
            if l.records.iter().any(|r| r.kind() == 4)
                && !l.records.iter().any(|r| r.kind() == 5) =>
        {
            &[false, true]
        }
        _ => &[false],
    }
}

/// A scratch folder on tmpfs where there is one: states are written and
/// read back thousands of times.
fn scratch() -> tempfile::TempDir {
    match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap()),
        false => tempfile::tempdir().unwrap(),
    }
}

fn explore(s: &Scenario, p: Params) -> Totals {
    vhdmerge::guid::set_seed(Some(4242));
    let pristine = scratch();
    let child = build_with(s, pristine.path(), p.extra_writes);
    // A dirty log stays dirty in the start state: the merge replays it
    // through the journal, so a rollback brings the dirty log back.
    let start = snapshot(pristine.path());
    let work = scratch();
    materialize(&start, work.path());
    let mut o = opts(s, work.path());
    o.batch_bytes = p.batch_bytes;
    let wchild = work.path().join(name(&child));
    trace::start(work.path(), true, None, true);
    vhdmerge::guid::set_seed(Some(4242));
    let r = run_merge(&wchild, &o);
    let (ops, _) = trace::stop();
    r.unwrap();
    let finished = snapshot(work.path());
    let ancestor =
        name(
            o.into
                .as_deref()
                .unwrap_or(Path::new(if s.vhdx { "l0.vhdx" } else { "l0.vhd" })),
        );
    let mut rng = Rng(99);
    let mut totals = Totals {
        states: 0,
        recovery_crashes: 0,
    };
    let mut seen = std::collections::HashSet::new();
    let mut tried = std::collections::HashSet::new();
    let mut seen_second = std::collections::HashSet::new();
    let mut sim = Sim::new(&start);
    let crash_dir = scratch();
    for i in 0..=ops.len() {
        for recipe in variants(&sim, &ops, &mut rng, p.cap, p.tears) {
            if !tried.insert((sim.epoch, recipe.clone())) {
                continue;
            }
            let state = recipe.build(&sim, &ops);
            if !seen.insert(fingerprint(&state)) {
                continue;
            }
            for &rollback in modes(&state, &ancestor) {
                materialize(&state, crash_dir.path());
                if let Err(e) =
                    recover_and_check(crash_dir.path(), &ancestor, &start, &finished, rollback)
                {
                    panic!(
                        "{}: crash before operation {i} of {} ({:?}), rollback={rollback}: {e}",
                        s.name,
                        ops.len(),
                        ops.get(i).map(short)
                    );
                }
            }
            totals.states += 1;
            if totals.states.is_multiple_of(2000) {
                eprintln!(
                    "  ... {} states, operation {i} of {}",
                    totals.states,
                    ops.len()
                );
            }
            // (e) a second crash during recovery, at every recovery operation.
            if totals.states.is_multiple_of(p.recovery_every) {
                totals.recovery_crashes += crash_during_recovery(
                    &state,
                    crash_dir.path(),
                    &ancestor,
                    (&start, &finished),
                    &mut rng,
                    &mut seen_second,
                    s.name,
                );
            }
        }
        if i < ops.len() {
            sim.step(&ops, i);
        }
    }
    vhdmerge::guid::set_seed(None);
    totals
}

fn short(op: &Op) -> String {
    match op {
        Op::Write { path, offset, data } => {
            format!("write {} @{offset:#x} +{}", name(path), data.len())
        }
        other => format!("{other:?}"),
    }
}

fn crash_during_recovery(
    state: &Files,
    dir: &Path,
    ancestor: &str,
    (start, finished): (&Files, &Files),
    rng: &mut Rng,
    seen: &mut std::collections::HashSet<[u8; 32]>,
    scenario: &str,
) -> usize {
    materialize(state, dir);
    let a = dir.join(ancestor);
    if !vhdmerge::journal::path_for(&a).exists() {
        return 0;
    }
    trace::start(dir, true, None, true);
    let _ = std::panic::catch_unwind(|| recover::recover(&a, false));
    let (ops, _) = trace::stop();
    let mut sim = Sim::new(state);
    let mut n = 0;
    // Every operation index of short recoveries; about 24 spread over long ones.
    let stride = (ops.len() / 24).max(1);
    for i in 0..=ops.len() {
        if i % stride != 0 && i != ops.len() {
            sim.step(&ops, i);
            continue;
        }
        for recipe in variants(&sim, &ops, rng, 2, 1) {
            let second = recipe.build(&sim, &ops);
            if !seen.insert(fingerprint(&second)) {
                continue;
            }
            materialize(&second, dir);
            if let Err(e) = recover_and_check(dir, ancestor, start, finished, false) {
                panic!(
                    "{scenario}: crash during recovery before its operation {i} of {}: {e}",
                    ops.len()
                );
            }
            n += 1;
        }
        if i < ops.len() {
            sim.step(&ops, i);
        }
    }
    n
}

fn scenarios() -> Vec<Scenario> {
    let m = 1u64 << 20;
    let sc = |name, vhdx, levels: Vec<u64>, into, relink, fixed_base, dirty_log| Scenario {
        name,
        vhdx,
        levels,
        into,
        relink,
        fixed_base,
        dirty_log,
    };
    vec![
        sc("vhdx one level", true, vec![m, m], 0, false, false, false),
        sc(
            "vhdx three levels, mixed block sizes, into the base",
            true,
            vec![2 * m, m, 4 * m],
            0,
            false,
            false,
            false,
        ),
        sc(
            "vhdx into a differencing ancestor",
            true,
            vec![m, m, m],
            1,
            false,
            false,
            false,
        ),
        sc(
            "vhdx child with a child to re-link",
            true,
            vec![m, m, m],
            0,
            true,
            false,
            false,
        ),
        sc(
            "vhdx fixed ancestor",
            true,
            vec![m, m],
            0,
            false,
            true,
            false,
        ),
        sc(
            "vhdx dirty log at the start",
            true,
            vec![m, m],
            0,
            false,
            false,
            true,
        ),
        sc(
            "vhd one level",
            false,
            vec![2 * m, 2 * m],
            0,
            false,
            false,
            false,
        ),
        sc(
            "vhd three levels, mixed block sizes",
            false,
            vec![2 * m, m / 2, m],
            0,
            false,
            false,
            false,
        ),
        sc(
            "vhd child with a child to re-link",
            false,
            vec![2 * m, 2 * m, 2 * m],
            0,
            true,
            false,
            false,
        ),
        sc(
            "vhd fixed ancestor",
            false,
            vec![2 * m, 2 * m],
            0,
            false,
            true,
            false,
        ),
    ]
}

#[test]
fn every_crash_state_recovers() {
    let _serial = serial();
    let full = std::env::var_os("VHDMERGE_CRASH_FULL").is_some();
    // The full suite runs every scenario twice: as the default run does,
    // and with 12 more scattered writes per level merged in 64 KiB batches
    // (many more runs, flush points and pending writes).
    let runs: Vec<Params> = if full {
        [(256 << 10, 0), (64 << 10, 12)]
            .map(|(batch_bytes, extra_writes)| Params {
                cap: 32,
                tears: 16,
                recovery_every: 8,
                batch_bytes,
                extra_writes,
            })
            .to_vec()
    } else {
        vec![Params {
            cap: 6,
            tears: 16,
            recovery_every: 61,
            batch_bytes: 256 << 10,
            extra_writes: 0,
        }]
    };
    let only = std::env::var("VHDMERGE_CRASH_ONLY").unwrap_or_default();
    // Work items: (scenario, parameters), in a fixed order.
    let items: Vec<(Scenario, Params)> = scenarios()
        .into_iter()
        .filter(|s| s.name.contains(only.as_str()))
        .flat_map(|s| runs.iter().map(move |p| (s.clone(), *p)))
        .collect();
    let shard = std::env::var("VHDMERGE_CRASH_SHARD").ok();
    let (total, second) = match (&shard, full) {
        // The full suite fans out over one process per core (tracing is
        // process-wide), each taking every n-th item, and adds up.
        (None, true) => run_shards(),
        _ => {
            let (k, n) = shard
                .as_deref()
                .and_then(|v| v.split_once('/'))
                .map(|(k, n)| (k.parse().unwrap(), n.parse().unwrap()))
                .unwrap_or((0usize, 1usize));
            let mut totals = (0, 0);
            // Item i goes to shard (i + i / runs) % n: with two runs per
            // scenario and two shards, each shard gets half of each kind.
            let mine = items
                .iter()
                .enumerate()
                .filter(|(i, _)| (i + i / runs.len()) % n == k)
                .map(|(_, item)| item);
            for (s, p) in mine {
                let t0 = std::time::Instant::now();
                let t = explore(s, *p);
                eprintln!(
                    "crash states: {:>7} distinct, {:>6} distinct second crashes during recovery  [{}, {} KiB batches, {} extra writes; {:.0} s]",
                    t.states,
                    t.recovery_crashes,
                    s.name,
                    p.batch_bytes >> 10,
                    p.extra_writes,
                    t0.elapsed().as_secs_f64()
                );
                totals.0 += t.states;
                totals.1 += t.recovery_crashes;
            }
            // Read back by run_shards.
            if let Some(f) = std::env::var_os("VHDMERGE_CRASH_TOTALS") {
                std::fs::write(f, format!("{} {}", totals.0, totals.1)).unwrap();
            }
            totals
        }
    };
    eprintln!(
        "crash states: {total} distinct (committed ones recovered with and without --rollback), {second} distinct second crashes during recovery, {} in all, all recovered correctly",
        total + second
    );
    let floor = if !only.is_empty() || shard.is_some() {
        0
    } else if full {
        100_000
    } else {
        5_000
    };
    assert!(
        total + second >= floor,
        "only {} crash states explored, want at least {floor}",
        total + second
    );
}

/// Runs this test in one child process per core, each on its share of the
/// scenarios (their lines go straight to stderr), and adds up their totals.
fn run_shards() -> (usize, usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..n)
        .map(|k| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["every_crash_state_recovers", "--exact", "--nocapture"])
                .env("VHDMERGE_CRASH_SHARD", format!("{k}/{n}"))
                .env("VHDMERGE_CRASH_TOTALS", dir.path().join(k.to_string()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut totals = (0, 0);
    for (k, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "shard {k}/{n} failed (see above)");
        let t = std::fs::read_to_string(dir.path().join(k.to_string())).unwrap();
        let mut it = t.split(' ').map(|v| v.parse::<usize>().unwrap());
        totals.0 += it.next().unwrap();
        totals.1 += it.next().unwrap();
    }
    totals
}

#[test]
fn faults_at_every_operation_abort_cleanly() {
    let _serial = serial();
    let mut cases = 0;
    for s in scenarios().into_iter().filter(|s| !s.dirty_log) {
        vhdmerge::guid::set_seed(Some(4242));
        let pristine = tempfile::tempdir().unwrap();
        let child = build(&s, pristine.path());
        let start = snapshot(pristine.path());
        let work = tempfile::tempdir().unwrap();
        materialize(&start, work.path());
        let o = opts(&s, work.path());
        trace::start(work.path(), false, None, true);
        vhdmerge::guid::set_seed(Some(4242));
        run_merge(&work.path().join(name(&child)), &o).unwrap();
        let (_, count) = trace::stop();
        let finished = snapshot(work.path());
        let ancestor =
            name(
                o.into
                    .as_deref()
                    .unwrap_or(Path::new(if s.vhdx { "l0.vhdx" } else { "l0.vhd" })),
            );
        for at in 0..count {
            for fault in [Fault::EioOnce, Fault::EioPersistent, Fault::NoSpace] {
                materialize(&start, work.path());
                trace::start(work.path(), false, Some((at, fault)), true);
                vhdmerge::guid::set_seed(Some(4242));
                let r = std::panic::catch_unwind(|| run_merge(&work.path().join(name(&child)), &o));
                trace::stop();
                assert!(
                    r.is_ok(),
                    "{}: panic with {fault:?} at operation {at}",
                    s.name
                );
                assert!(
                    r.unwrap().is_err(),
                    "{}: {fault:?} at operation {at} went unnoticed",
                    s.name
                );
                if let Err(e) = recover_and_check(work.path(), &ancestor, &start, &finished, false)
                {
                    panic!("{}: {fault:?} at operation {at}: {e}", s.name);
                }
                cases += 1;
            }
        }
    }
    eprintln!(
        "fault injection: {cases} merges failed by EIO/ENOSPC at every operation, all recovered"
    );
}

/// Regression (found by the full suite): a second crash while a committed
/// merge was being rolled back could tear both VHDX headers at once, since
/// both header pages were restored in one unflushed batch; the ancestor
/// then had no valid header and recovery could not recognise it. Header
/// pages are now restored one at a time with a flush between, so in every
/// crash state of the rollback in which each pending header write is torn,
/// one header stays valid and a further recovery restores the start.
#[test]
fn regression_second_crash_during_rollback_tears_at_most_one_header() {
    use vhdmerge::format::vhdx::{HEADER_OFFSETS, header::Header};
    let _serial = serial();
    let s = &scenarios()[0];
    let pristine = tempfile::tempdir().unwrap();
    let child = build(s, pristine.path());
    let start = snapshot(pristine.path());
    let work = tempfile::tempdir().unwrap();
    materialize(&start, work.path());
    let a = work.path().join("l0.vhdx");
    // A committed merge, killed before cleanup, then marked for rollback.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(["--quiet", "merge"])
        .arg(work.path().join(name(&child)))
        .env("VHDMERGE_FAIL_AT", "after-commit")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let committed = snapshot(work.path());
    trace::start(work.path(), true, None, true);
    let r = recover::recover(&a, true);
    let (ops, _) = trace::stop();
    assert_eq!(r.unwrap().outcome, Outcome::RolledBack);
    assert_eq!(snapshot(work.path()), start);

    let is_header = |op: &Op| {
        matches!(op, Op::Write { path, offset, .. }
            if name(path) == "l0.vhdx" && HEADER_OFFSETS.contains(offset))
    };
    assert!(ops.iter().any(is_header), "the rollback restores headers");
    let mut sim = Sim::new(&committed);
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for i in 0..=ops.len() {
        // Every pending write reached the disk, each header page torn
        // after its first sector with garbage behind.
        let mut files = sim.crash_state(&ops, &sim.pending, None, false);
        for &j in &sim.pending {
            if let Op::Write { offset, data, .. } = &ops[j]
                && is_header(&ops[j])
            {
                let f = files.get_mut("l0.vhdx").unwrap();
                write_into(f, *offset + 512, &vec![0xA5; data.len() - 512]);
            }
        }
        let f = &files["l0.vhdx"];
        let valid = HEADER_OFFSETS
            .iter()
            .filter(|&&o| Header::decode(&f[o as usize..][..4096]).is_ok())
            .count();
        assert!(
            valid >= 1,
            "crash before rollback operation {i} of {}: no valid header",
            ops.len()
        );
        materialize(&files, dir.path());
        if let Err(e) = recover_and_check(dir.path(), "l0.vhdx", &start, &start, true) {
            panic!("crash before rollback operation {i}: {e}");
        }
        checked += 1;
        if i < ops.len() {
            sim.step(&ops, i);
        }
    }
    eprintln!("rollback crash states with torn headers: {checked}, all recovered to the start");
}
