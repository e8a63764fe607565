//! Checks made before the first write: damaged inputs, pending journals,
//! siblings and children, exclusive locks, free space.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::disk::{Chain, Layer, open_layer};
use crate::error::{Error, Result};
use crate::journal;

/// Disk images by extension: the files a chain can consist of.
pub fn is_disk_name(p: &Path) -> bool {
    let ext = p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    matches!(ext.as_str(), "vhd" | "avhd" | "vhdx" | "avhdx")
}

pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Refuses inputs that are only readable with a warning (bad checksums).
pub fn refuse_damaged(chain: &Chain, levels: usize) -> Result<()> {
    for l in chain.layers.iter().take(levels) {
        if let Some(w) = l.warnings().first() {
            return Err(Error::WriteRefused {
                path: l.path().to_path_buf(),
                reason: format!(
                    "the file is damaged ({w}); a merge reads every level and writes the ancestor, so it must be repaired or restored first"
                ),
            });
        }
    }
    Ok(())
}

/// A pending journal in the folder of `path` that names `path`.
pub fn pending_journal(path: &Path) -> Result<Option<PathBuf>> {
    let own = journal::path_for(path);
    if own.exists() {
        return Ok(Some(own));
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
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

pub fn refuse_pending(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if let Some(j) = pending_journal(p)? {
            return Err(Error::WriteRefused {
                path: p.to_path_buf(),
                reason: format!(
                    "an interrupted merge left the journal {}; run `vhdmerge recover {}` first",
                    j.display(),
                    p.display()
                ),
            });
        }
    }
    Ok(())
}

/// A differencing disk found beside the chain whose parent is a chain member.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dependent {
    pub path: PathBuf,
    /// The chain level it depends on (0 = the merged child).
    pub parent_level: usize,
}

/// Looks in the folders of the chain for other disks whose parent (by
/// locator and identity) is one of `chain.layers[..=ancestor]`.
pub fn dependents(chain: &Chain, ancestor: usize) -> Vec<Dependent> {
    let members: Vec<PathBuf> = chain.layers.iter().map(|l| canonical(l.path())).collect();
    let mut dirs: Vec<PathBuf> = members
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = canonical(&e.path());
            if !is_disk_name(&p) || members.contains(&p) || !seen.insert(p.clone()) || !p.is_file()
            {
                continue;
            }
            let Ok(layer) = open_layer(&p, false) else {
                continue;
            };
            let Some(pref) = layer.parent_ref() else {
                continue;
            };
            for (level, m) in members.iter().enumerate().take(ancestor + 1) {
                let points = pref.candidates.iter().any(|(_, c)| canonical(c) == *m);
                if points && pref.expected.accepts(&chain.layers[level].identity()) {
                    found.push(Dependent {
                        path: p.clone(),
                        parent_level: level,
                    });
                    break;
                }
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Exclusive locks held for the whole merge or recovery.
pub struct Locks {
    _files: Vec<File>,
}

pub fn lock_all(paths: &[&Path]) -> Result<Locks> {
    let mut files = Vec::new();
    for p in paths {
        let f = File::open(p).map_err(|e| Error::io(p, "opening to lock", e))?;
        // UFCS: std's inherent File::try_lock would shadow fs2's method names.
        if fs2::FileExt::try_lock_exclusive(&f).is_err() {
            return Err(Error::WriteRefused {
                path: p.to_path_buf(),
                reason: "another vhdmerge merge or recover holds this file; wait for it to finish"
                    .into(),
            });
        }
        files.push(f);
    }
    Ok(Locks { _files: files })
}

/// Refuses when the folder of `path` has less than `needed` bytes free.
pub fn check_space(path: &Path, needed: u64) -> Result<u64> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let free = fs2::available_space(dir).map_err(|e| Error::io(dir, "reading free space", e))?;
    if free < needed {
        return Err(Error::WriteRefused {
            path: path.to_path_buf(),
            reason: format!(
                "the merge needs {needed} bytes (new blocks and the journal) but only {free} bytes are free in {}; free space or merge elsewhere",
                dir.display()
            ),
        });
    }
    Ok(free)
}

pub fn layer_paths(chain: &Chain) -> Vec<&Path> {
    chain.layers.iter().map(|l| l.path()).collect()
}

pub fn identity_text(l: &dyn Layer) -> String {
    l.identity().describe()
}
