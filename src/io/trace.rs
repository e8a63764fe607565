//! Recording and fault injection for tests, compiled only with the
//! `testing` feature (the integration tests turn it on; a release build
//! has no trace and takes no lock for it). Off unless a test starts it;
//! then every mutating operation on a file below `root` is appended to
//! the log (crash-state generation), and the operation with a chosen
//! index can fail (fault injection).
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        path: PathBuf,
        offset: u64,
        data: Vec<u8>,
    },
    Flush {
        path: PathBuf,
    },
    SetLen {
        path: PathBuf,
        len: u64,
    },
    Create {
        path: PathBuf,
    },
    Remove {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    SyncDir {
        dir: PathBuf,
    },
}

impl Op {
    pub fn path(&self) -> &Path {
        match self {
            Op::Write { path, .. }
            | Op::Flush { path }
            | Op::SetLen { path, .. }
            | Op::Create { path }
            | Op::Remove { path } => path,
            Op::Rename { from, .. } => from,
            Op::SyncDir { dir } => dir,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// EIO at the chosen operation only.
    EioOnce,
    /// EIO at the chosen operation and every one after it.
    EioPersistent,
    /// ENOSPC at the chosen operation and every one after it.
    NoSpace,
    /// The chosen operation, a write, is reported done and not carried
    /// out: the lost write of a faulty disk, which only reading back finds.
    LostWrite,
}

struct State {
    root: PathBuf,
    record: bool,
    ops: Vec<Op>,
    count: usize,
    fault: Option<(usize, Fault)>,
    skip_sync: bool,
    /// Clones are carried out as a read and a write (tmpfs has no reflink).
    emulate_clones: bool,
    /// Canonical form of each folder seen: resolving a path costs a
    /// readlink per component, and the crash tests trace millions of
    /// operations in a handful of folders.
    folders: std::collections::HashMap<PathBuf, PathBuf>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts tracing operations on files below `root`. `skip_sync` makes
/// flushes no-ops at the OS level (the tests simulate durability).
pub fn start(root: &Path, record: bool, fault: Option<(usize, Fault)>, skip_sync: bool) {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    *lock() = Some(State {
        root,
        record,
        ops: Vec::new(),
        count: 0,
        fault,
        skip_sync,
        emulate_clones: false,
        folders: Default::default(),
    });
}

/// Makes clones succeed on any file system, carried out as a read of the
/// source and a write, while tracing lasts: the merge's clone path (and
/// its crash states, a clone being a write of the source's bytes) can
/// then be explored where no file system reflinks.
pub fn set_emulate_clones(on: bool) {
    if let Some(s) = lock().as_mut() {
        s.emulate_clones = on;
    }
}

pub fn emulate_clones() -> bool {
    lock().as_ref().is_some_and(|s| s.emulate_clones)
}

/// Stops tracing; returns the recorded operations and how many were seen.
pub fn stop() -> (Vec<Op>, usize) {
    match lock().take() {
        Some(s) => (s.ops, s.count),
        None => (Vec::new(), 0),
    }
}

pub fn skip_sync() -> bool {
    lock().as_ref().is_some_and(|s| s.skip_sync)
}

/// Copies written data only while recording.
pub fn capture(buf: &[u8]) -> Vec<u8> {
    if lock().as_ref().is_some_and(|s| s.record) {
        buf.to_vec()
    } else {
        Vec::new()
    }
}

/// Like `capture` for `len` bytes that `fill` produces (read only while recording).
pub fn capture_with(
    len: u64,
    fill: impl FnOnce(&mut [u8]) -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    if !lock().as_ref().is_some_and(|s| s.record) {
        return Ok(Vec::new());
    }
    let mut b = vec![0u8; len as usize];
    fill(&mut b)?;
    Ok(b)
}

pub(crate) fn op(op: Op) -> io::Result<()> {
    carried_out(op).map(|_| ())
}

/// Like `op`; false when the write is to be lost (`Fault::LostWrite`).
pub(crate) fn carried_out(op: Op) -> io::Result<bool> {
    let mut guard = lock();
    let Some(s) = guard.as_mut() else {
        return Ok(true);
    };
    let p = op.path();
    let folder = match p.parent() {
        Some(f) if !f.as_os_str().is_empty() => f,
        _ => Path::new("."),
    };
    let canon = match s.folders.get(folder) {
        Some(c) => c.clone(),
        None => {
            let c = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
            s.folders.insert(folder.to_path_buf(), c.clone());
            c
        }
    };
    if !canon
        .join(p.file_name().unwrap_or_default())
        .starts_with(&s.root)
    {
        return Ok(true);
    }
    let index = s.count;
    s.count += 1;
    if let Some((at, fault)) = s.fault {
        let hit = match fault {
            Fault::EioOnce => index == at,
            Fault::EioPersistent | Fault::NoSpace => index >= at,
            Fault::LostWrite => index == at && matches!(op, Op::Write { .. }),
        };
        if hit && fault == Fault::LostWrite {
            return Ok(false);
        }
        if hit {
            return Err(match fault {
                Fault::NoSpace => io::Error::from_raw_os_error(28),
                _ => io::Error::from_raw_os_error(5),
            });
        }
    }
    if s.record {
        s.ops.push(op);
    }
    Ok(true)
}
