//! One error type for the library. Every variant names the file it is about,
//! and format errors also name the structure, its offset and what to do.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: I/O error while {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {structure} at offset {offset:#x} is invalid: {detail}. {hint}", path.display())]
    Corrupt {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        detail: String,
        hint: &'static str,
    },

    #[error("{}: unsupported {structure}: {detail}", path.display())]
    Unsupported {
        path: PathBuf,
        structure: &'static str,
        detail: String,
    },

    #[error("{}: parent disk not found; looked at: {}. Pass --parent PATH to name it", child.display(), list(tried))]
    ParentMissing { child: PathBuf, tried: Vec<PathBuf> },

    #[error("{}: parent {} has the wrong identity: the child expects {expected}, the parent has {found}. The parent was modified after the child was created, or it is another disk", child.display(), parent.display())]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },

    #[error("{}: the differencing chain loops back to {}", child.display(), repeated.display())]
    ChainLoop { child: PathBuf, repeated: PathBuf },

    #[error("{}: cannot chain to parent {}: {detail}", child.display(), parent.display())]
    ChainMismatch {
        child: PathBuf,
        parent: PathBuf,
        detail: String,
    },

    #[error("{}: refusing to write: {reason}", path.display())]
    WriteRefused { path: PathBuf, reason: String },

    /// A stop was requested (SIGINT/SIGTERM): the merge made a checkpoint
    /// and stopped there.
    #[error("paused at {percent:.1} % — `vhdmerge recover {}` continues it, {undo}", ancestor.display())]
    Paused {
        ancestor: PathBuf,
        percent: f64,
        /// What `--rollback` would do (`journal::state::undo_hint`).
        undo: &'static str,
    },

    #[error("{}: neither a VHDX (no file signature) nor a VHD (no 'conectix' footer at the end or at offset 0): not a disk image", path.display())]
    NotADiskImage { path: PathBuf },

    #[error("{}: not a differencing disk{}", path.display(), if *merging { "; there is nothing to merge" } else { "" })]
    NotDifferencing { path: PathBuf, merging: bool },

    #[error("{}: write of {len} bytes at {offset} {rule}", path.display())]
    BadWrite {
        path: PathBuf,
        offset: u64,
        len: u64,
        rule: String,
    },

    #[error("{}: not a regular file; vhdmerge only opens regular files", path.display())]
    NotARegularFile { path: PathBuf },

    /// A worker thread of the merge ended; the error it met is reported
    /// instead (this one is never shown).
    #[error("the merge's {0} thread stopped")]
    Stopped(&'static str),

    #[error("{}: {} is not an ancestor of this disk; its chain is: {chain}", child.display(), named.display())]
    NotAnAncestor {
        child: PathBuf,
        named: PathBuf,
        chain: String,
    },

    #[error("{}: cannot create: {detail}", path.display())]
    CannotCreate { path: PathBuf, detail: String },

    #[error("{}: {op} of {len} bytes at {offset} passes the disk's end ({size})", path.display())]
    OutOfRange {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("{}: not a vhdmerge manifest: {detail}", path.display())]
    BadManifest { path: PathBuf, detail: String },

    #[error("{}: does not match the expected content", path.display())]
    ContentMismatch { path: PathBuf },

    #[error("{}: not a folder; scan takes the folders that hold a VM's disks", path.display())]
    NotAFolder { path: PathBuf },
}

/// Paths for a message, comma-separated.
pub(crate) fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(no locator entries)".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    pub fn io(path: &Path, op: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            op: op.into(),
            source,
        }
    }

    pub fn corrupt(
        path: &Path,
        structure: &'static str,
        offset: u64,
        detail: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            path: path.to_path_buf(),
            structure,
            offset,
            detail: detail.into(),
            hint: "The file is damaged or not what its name says; restore it from a backup or check that the right file was named",
        }
    }

    pub fn unsupported(path: &Path, structure: &'static str, detail: impl Into<String>) -> Error {
        Error::Unsupported {
            path: path.to_path_buf(),
            structure,
            detail: detail.into(),
        }
    }
}
