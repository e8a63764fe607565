//! The crash-state simulator: sparse in-memory file images, the durable
//! and pending state after a prefix of the recorded operations, the recipes
//! that build a crash state from it, and a scratch folder that holds one
//! state at a time.
//!
//! The images of the scenarios are mostly zeros, and consecutive crash
//! states differ in a few pages. So an image keeps only its non-zero 4 KiB
//! pages, shared between states (`Arc`) and hashed once when made; cloning a
//! state, comparing two states and fingerprinting one cost a walk over page
//! hashes instead of copying and scanning tens of MiB, and the scratch
//! folder is brought to a new state by writing only the pages that differ.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vhdmerge::io::trace::Op;

use crate::common::Rng;

pub const PAGE: u64 = 4096;

/// A non-zero page and a hash of it (equality is by hash: 128 bits of
/// BLAKE3, so a false match is out of reach).
#[derive(Clone)]
pub struct Page {
    bytes: Arc<[u8]>,
    hash: [u8; 16],
}

impl PartialEq for Page {
    fn eq(&self, other: &Page) -> bool {
        self.hash == other.hash
    }
}

impl Eq for Page {}

impl Page {
    /// None for an all-zero page: zero pages are not stored.
    fn new(bytes: &[u8]) -> Option<Page> {
        debug_assert_eq!(bytes.len() as u64, PAGE);
        if is_zero(bytes) {
            return None;
        }
        let mut hash = [0; 16];
        hash.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
        Some(Page {
            bytes: bytes.into(),
            hash,
        })
    }
}

/// Whether `b` (at most 64 KiB) is all zeros; a memcmp against a zero page.
pub fn is_zero(b: &[u8]) -> bool {
    static ZERO: [u8; 64 << 10] = [0; 64 << 10];
    b.chunks(64 << 10).all(|c| c == &ZERO[..c.len()])
}

/// A file's contents: its length and its non-zero pages (bytes past the
/// length are zero).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Image {
    len: u64,
    pages: BTreeMap<u64, Page>,
}

impl Image {
    fn page_or_zero(&self, idx: u64) -> Vec<u8> {
        match self.pages.get(&idx) {
            Some(p) => p.bytes.to_vec(),
            None => vec![0; PAGE as usize],
        }
    }

    fn put(&mut self, idx: u64, bytes: &[u8]) {
        match Page::new(bytes) {
            Some(p) => self.pages.insert(idx, p),
            None => self.pages.remove(&idx),
        };
    }

    /// Writes `data` at `offset`, growing the file as a write does.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        self.len = self.len.max(end);
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE;
            let at = (pos % PAGE) as usize;
            let n = (PAGE as usize - at).min((end - pos) as usize);
            let src = &data[(pos - offset) as usize..][..n];
            if n == PAGE as usize {
                self.put(idx, src);
            } else {
                let mut buf = self.page_or_zero(idx);
                buf[at..at + n].copy_from_slice(src);
                self.put(idx, &buf);
            }
            pos += n as u64;
        }
    }

    /// Truncates or extends to `len`; an extension holds `fill` bytes
    /// (0 as a file system gives, other values for unsynced garbage).
    pub fn set_len(&mut self, len: u64, fill: u8) {
        if len < self.len {
            self.pages.split_off(&len.div_ceil(PAGE));
            if !len.is_multiple_of(PAGE) && self.pages.contains_key(&(len / PAGE)) {
                let mut buf = self.page_or_zero(len / PAGE);
                buf[(len % PAGE) as usize..].fill(0);
                self.put(len / PAGE, &buf);
            }
            self.len = len;
        } else if len > self.len {
            let old = self.len;
            self.len = len;
            if fill != 0 {
                self.write(old, &vec![fill; (len - old) as usize]);
            }
        }
    }

    /// `len` bytes at `offset`, zeros past the end.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        let end = offset + len as u64;
        for (&idx, p) in self.pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let (ps, pe) = (idx * PAGE, idx * PAGE + PAGE);
            let (s, e) = (ps.max(offset), pe.min(end));
            out[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&p.bytes[(s - ps) as usize..(e - ps) as usize]);
        }
        out
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.read(0, self.len as usize)
    }

    pub fn len(&self) -> u64 {
        self.len
    }
}

pub type Files = BTreeMap<String, Image>;

pub fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().to_string()
}

/// A fingerprint of a whole state: names, lengths and page hashes.
pub fn fingerprint(files: &Files) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for (n, img) in files {
        h.update(&(n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
        h.update(&img.len.to_le_bytes());
        for (idx, p) in &img.pages {
            h.update(&idx.to_le_bytes());
            h.update(&p.hash);
        }
    }
    *h.finalize().as_bytes()
}

/// Reads every file of `dir`. Only the data extents are read (the folder
/// holds sparse files), and a page equal to the one in `known` is shared
/// with it instead of hashed again.
pub fn snapshot_with(dir: &Path, known: Option<&Files>) -> Files {
    let mut out = Files::new();
    let mut buf = vec![0u8; 1 << 20];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let n = name(&p);
        let f = std::fs::File::open(&p).unwrap();
        let len = f.metadata().unwrap().len();
        let old = known.and_then(|k| k.get(&n));
        let mut img = Image {
            len,
            pages: BTreeMap::new(),
        };
        for (start, end) in extents(&f, len) {
            let mut pos = start / PAGE * PAGE;
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                let chunk = &mut buf[..n.div_ceil(PAGE as usize) * PAGE as usize];
                chunk.fill(0);
                f.read_exact_at(&mut chunk[..n], pos).unwrap();
                for (k, page) in chunk.chunks(PAGE as usize).enumerate() {
                    let idx = pos / PAGE + k as u64;
                    if is_zero(page) {
                        continue;
                    }
                    let p = match old.and_then(|o| o.pages.get(&idx)) {
                        Some(q) if *q.bytes == *page => q.clone(),
                        _ => Page::new(page).unwrap(),
                    };
                    img.pages.insert(idx, p);
                }
                pos += n as u64;
            }
        }
        out.insert(n, img);
    }
    out
}

pub fn snapshot(dir: &Path) -> Files {
    snapshot_with(dir, None)
}

/// The data extents of `f` (SEEK_DATA/SEEK_HOLE; the whole file where the
/// file system does not tell).
fn extents(f: &std::fs::File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, len)];
        }
        out.push((data as u64, (hole as u64).min(len)));
        pos = hole;
    }
    out
}

/// A scratch folder (on tmpfs where there is one) that holds one state at a
/// time and remembers which, so that the next state is written as a diff.
pub struct Scratch {
    dir: tempfile::TempDir,
    held: Option<Files>,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = match Path::new("/dev/shm").is_dir() {
            true => {
                tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
            }
            false => tempfile::tempdir().unwrap(),
        };
        Scratch { dir, held: None }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Something other than `set` changed the folder.
    pub fn forget(&mut self) {
        self.held = None;
    }

    /// Reads the folder back (and remembers it).
    pub fn read(&mut self) -> Files {
        let files = snapshot_with(self.path(), self.held.as_ref());
        self.held = Some(files.clone());
        files
    }

    /// Makes the folder hold exactly `files`.
    pub fn set(&mut self, files: &Files) {
        let held = match self.held.take() {
            Some(h) => h,
            None => {
                for e in std::fs::read_dir(self.path()).unwrap() {
                    std::fs::remove_file(e.unwrap().path()).unwrap();
                }
                Files::new()
            }
        };
        for n in held.keys().filter(|n| !files.contains_key(*n)) {
            std::fs::remove_file(self.path().join(n)).unwrap();
        }
        for (n, img) in files {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.path().join(n))
                .unwrap();
            let mut base = held.get(n).cloned().unwrap_or_default();
            if base.len != img.len {
                f.set_len(img.len).unwrap();
                base.set_len(img.len, 0);
            }
            // Runs of consecutive changed pages go out as one write.
            let mut run: Vec<u8> = Vec::new();
            let mut run_at = 0;
            let flush = |run: &mut Vec<u8>, at: u64| {
                let n = run.len().min((img.len - at) as usize);
                f.write_all_at(&run[..n], at).unwrap();
                run.clear();
            };
            for (&idx, p) in &img.pages {
                if base.pages.get(&idx) == Some(p) {
                    continue;
                }
                if !run.is_empty()
                    && (run_at + run.len() as u64 != idx * PAGE || run.len() >= 1 << 20)
                {
                    flush(&mut run, run_at);
                }
                if run.is_empty() {
                    run_at = idx * PAGE;
                }
                run.extend_from_slice(&p.bytes);
            }
            if !run.is_empty() {
                flush(&mut run, run_at);
            }
            let clip = |idx: u64| (PAGE.min(img.len - idx * PAGE)) as usize;
            for &idx in base.pages.keys().filter(|i| !img.pages.contains_key(i)) {
                punch(&f, idx * PAGE, clip(idx));
            }
        }
        self.held = Some(files.clone());
    }
}

/// Zeros `len` bytes at `offset`, as a hole where the file system can.
fn punch(f: &std::fs::File, offset: u64, len: usize) {
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if r != 0 {
        f.write_all_at(&vec![0; len], offset).unwrap();
    }
}

/// Durable and pending state after a prefix of the operations.
pub struct Sim {
    durable: Files,
    exists: BTreeSet<String>,
    cur: Files,
    /// Indices of operations not yet made durable (content or folder).
    pub pending: Vec<usize>,
    /// Changes whenever the durable state does (flush, folder sync, rename).
    pub epoch: usize,
}

impl Sim {
    pub fn new(start: &Files) -> Sim {
        Sim {
            durable: start.clone(),
            exists: start.keys().cloned().collect(),
            cur: start.clone(),
            pending: Vec::new(),
            epoch: 0,
        }
    }

    pub fn step(&mut self, ops: &[Op], i: usize) {
        if matches!(
            &ops[i],
            Op::Flush { .. } | Op::SyncDir { .. } | Op::Rename { .. }
        ) {
            self.epoch += 1;
        }
        match &ops[i] {
            Op::Write { path, offset, data } => {
                self.cur.entry(name(path)).or_default().write(*offset, data);
                self.pending.push(i);
            }
            Op::SetLen { path, len } => {
                self.cur.entry(name(path)).or_default().set_len(*len, 0);
                self.pending.push(i);
            }
            Op::Flush { path } => {
                let n = name(path);
                self.durable
                    .insert(n.clone(), self.cur.get(&n).cloned().unwrap_or_default());
                self.pending.retain(|&j| !matches!(&ops[j], Op::Write { path: p, .. } | Op::SetLen { path: p, .. } if name(p) == n));
            }
            Op::Create { path } => {
                self.cur.insert(name(path), Image::default());
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
    pub fn crash_state(
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
                            f.write(*offset, &data[..cut]);
                            if garbage && cut < data.len() {
                                f.write(*offset + cut as u64, &vec![0xA5; data.len() - cut]);
                            }
                        }
                        _ => f.write(*offset, data),
                    }
                }
                Op::SetLen { path, len } => {
                    if let Some(f) = files.get_mut(&name(path)) {
                        f.set_len(*len, if garbage { 0x5A } else { 0 });
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

/// How to build one crash state from a `Sim` (see `Sim::crash_state`):
/// cheap to list and compare, so that states are built one at a time and
/// a recipe already tried on the same durable state is skipped unbuilt.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Recipe {
    chosen: Vec<usize>,
    torn: Option<usize>,
    garbage: bool,
}

impl Recipe {
    pub fn build(&self, sim: &Sim, ops: &[Op]) -> Files {
        sim.crash_state(ops, &self.chosen, self.torn, self.garbage)
    }
}

/// The crash states to try at one operation index.
pub fn variants(sim: &Sim, ops: &[Op], rng: &mut Rng, cap: usize, tears: usize) -> Vec<Recipe> {
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
