//! Small path helpers shared by the chain, the merge and the journal.

use std::path::{Path, PathBuf};

/// The folder holding `p` ("." for a bare file name).
pub fn folder_of(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `p` with links resolved, or `p` itself when it cannot be (missing).
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
