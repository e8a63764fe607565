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

pub use crate::paths::canonical;

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

/// Refuses what a writable open of the files the merge writes (the
/// ancestor and the re-linked children) would refuse, before the journal
/// exists: a file that can be read but not written.
pub fn refuse_unwritable(ancestor: &dyn Layer, relinked: &[&Path]) -> Result<()> {
    ancestor.check_open_for_writing()?;
    for p in relinked {
        open_layer(p, false)?.check_open_for_writing()?;
    }
    Ok(())
}

pub fn refuse_pending(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if let Some(j) = crate::transaction::pending_journal(p)? {
            let (what, undo) = match journal::load(&j) {
                Ok(l) => (
                    format!("an interrupted {}", journal::state::summary(&l)),
                    journal::state::undo_hint(journal::state::finish_only(&l.records)),
                ),
                Err(_) => ("an interrupted merge".into(), "`--rollback` undoes it"),
            };
            return Err(Error::WriteRefused {
                path: p.to_path_buf(),
                reason: format!(
                    "{what} left the journal {}; run `vhdmerge recover {}` first (it continues that merge; {undo})",
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

/// Exclusive locks held for the whole merge or recovery, with what each
/// file was when it was locked: another program that does not honour the
/// locks (a running VM, a copy or restore tool) can still replace or
/// change a file, and the merge must notice before it commits.
pub struct Locks {
    files: Vec<Locked>,
}

struct Locked {
    path: PathBuf,
    file: File,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

pub fn lock_all(paths: &[&Path]) -> Result<Locks> {
    let mut files = Vec::new();
    for p in paths {
        let f = File::open(p).map_err(|e| Error::io(p, "opening to lock", e))?;
        if !try_lock(&f) {
            return Err(Error::WriteRefused {
                path: p.to_path_buf(),
                reason: "another vhdmerge merge or recover holds this file; wait for it to finish"
                    .into(),
            });
        }
        let m = f
            .metadata()
            .map_err(|e| Error::io(p, "reading metadata", e))?;
        files.push(Locked {
            path: p.to_path_buf(),
            len: m.len(),
            modified: m.modified().ok(),
            file: f,
        });
    }
    Ok(Locks { files })
}

/// Takes `f`'s exclusive lock, trying for up to a second. A lock is held
/// by an open file description: when a program that merged (a test
/// harness, a backup tool) starts another program, the child holds a copy
/// of every descriptor until its exec closes them, so a lock the program
/// has just released can look held for a moment. A real holder, another
/// merge or recover, holds it far longer than that.
fn try_lock(f: &File) -> bool {
    for tried in 1..=LOCK_TRIES {
        // UFCS: std's inherent File::try_lock would shadow fs2's method names.
        if fs2::FileExt::try_lock_exclusive(f).is_ok() {
            return true;
        }
        if tried < LOCK_TRIES {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    false
}

const LOCK_TRIES: u32 = 10;

impl Locks {
    /// Takes the sizes and modification times afresh, after recovery
    /// itself wrote the files (a partial undo before a resume).
    pub fn refresh(&mut self) -> Result<()> {
        for l in &mut self.files {
            let m = l
                .file
                .metadata()
                .map_err(|e| Error::io(&l.path, "reading metadata", e))?;
            (l.len, l.modified) = (m.len(), m.modified().ok());
        }
        Ok(())
    }

    /// Refuses if any locked path now names another file (replaced,
    /// renamed or deleted), or if a file the merge does not write (all but
    /// `written`) changed size or modification time.
    pub fn check_unchanged(&self, written: &[&Path]) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        for l in &self.files {
            let changed = |what: &str| Error::WriteRefused {
                path: l.path.clone(),
                reason: format!(
                    "{what} while the merge was running; some other program is using the disks. Nothing was committed: stop that program, run `vhdmerge recover` on the ancestor to roll the merge back, then merge again"
                ),
            };
            let held = l
                .file
                .metadata()
                .map_err(|e| Error::io(&l.path, "reading metadata", e))?;
            let now = match std::fs::metadata(&l.path) {
                Ok(m) => m,
                Err(_) => return Err(changed("the file was deleted or renamed")),
            };
            if (now.dev(), now.ino()) != (held.dev(), held.ino()) {
                return Err(changed("the file was replaced by another file"));
            }
            // Paths may be spelled differently (relative, or resolved
            // from the journal's folder): compare the files they name.
            if written
                .iter()
                .any(|w| *w == l.path || canonical(w) == canonical(&l.path))
            {
                continue;
            }
            if held.len() != l.len {
                return Err(changed(&format!(
                    "the file changed size from {} to {} bytes",
                    l.len,
                    held.len()
                )));
            }
            if held.modified().ok() != l.modified {
                return Err(changed("the file was written to"));
            }
        }
        Ok(())
    }
}

/// Refuses, before anything is written, when a file the merge must write
/// cannot be opened for writing or the folder that gets the journal (and
/// loses the merged files) cannot be written: read-only files, read-only
/// file systems, missing permissions.
pub fn check_writable(files: &[&Path], folders: &[&Path]) -> Result<()> {
    use rustix::fs::{Access, access};
    for p in files {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(p) {
            return Err(Error::WriteRefused {
                path: p.to_path_buf(),
                reason: format!(
                    "cannot be opened for writing ({e}); the merge writes into this file. Make it writable (chmod u+w, or run as its owner; remount a read-only file system read-write) and merge again"
                ),
            });
        }
    }
    for d in folders {
        if let Err(e) = access(*d, Access::WRITE_OK | Access::EXEC_OK) {
            return Err(Error::WriteRefused {
                path: canonical(d),
                reason: format!(
                    "the folder is not writable ({}); the merge keeps its journal there and removes the merged files from it. Make it writable or run as its owner and merge again",
                    std::io::Error::from(e)
                ),
            });
        }
    }
    Ok(())
}

/// Whether the file system holding `path` keeps unwritten ranges of a file
/// as holes. FAT and exFAT do not (growing a file writes zeros); every
/// Linux-native file system does.
pub fn sparse_files(path: &Path) -> bool {
    const MSDOS: u32 = 0x4d44;
    const EXFAT: u32 = 0x2011_bab0;
    let dir = crate::paths::folder_of(path);
    match rustix::fs::statfs(dir) {
        Ok(st) => !matches!(st.f_type as u32, MSDOS | EXFAT),
        Err(_) => false,
    }
}

/// Whether every merged level (`chain.layers[..ancestor]`) can share its
/// blocks with the ancestor: on the ancestor's file system, and a trial
/// clone succeeds (`io::share::trial_clone`). The merge still falls back
/// to copying if a later clone is refused; this decides how much space
/// to ask for.
pub fn clones_possible(chain: &Chain, ancestor: usize) -> bool {
    use std::os::unix::fs::MetadataExt;
    let a = chain.layers[ancestor].path();
    let Ok(meta) = std::fs::metadata(a) else {
        return false;
    };
    let dir = crate::paths::folder_of(a);
    chain.layers[..ancestor].iter().all(|l| {
        l.file().is_some_and(|fd| {
            rustix::fs::fstat(fd).is_ok_and(|st| st.st_dev == meta.dev())
                && crate::io::share::trial_clone(dir, fd, meta.blksize())
        })
    })
}

/// Refuses when the folder of `path` has less than `needed` bytes free.
pub fn check_space(path: &Path, needed: u64) -> Result<u64> {
    let dir = crate::paths::folder_of(path);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_released_within_the_tries_is_taken_and_a_held_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vhdx");
        std::fs::write(&p, b"x").unwrap();
        let holder = File::open(&p).unwrap();
        fs2::FileExt::try_lock_exclusive(&holder).unwrap();
        let e = lock_all(&[p.as_path()]).err().expect("held: refused");
        assert!(e.to_string().contains("holds this file"), "{e}");
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(holder);
        });
        assert!(lock_all(&[p.as_path()]).is_ok(), "released after 300 ms");
        released.join().unwrap();
    }
}
