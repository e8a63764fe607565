//! Finding the files of a scan: disk images by content, journals by name.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{Finding, Severity};
use crate::disk::{Format, sniff};
use crate::journal::SUFFIX;
use crate::merge::preflight::is_disk_name;
use crate::paths::canonical;

/// What a walk of the scanned folders found.
#[derive(Default)]
pub struct Found {
    /// Disk images (VHD or VHDX by content), in walk order, each once.
    pub disks: Vec<(PathBuf, Format)>,
    pub journals: Vec<PathBuf>,
    pub findings: Vec<Finding>,
}

/// Walks `dirs` (and their subfolders with `recursive`, without following
/// links to folders out of the tree twice) in name order.
pub fn walk(dirs: &[PathBuf], recursive: bool) -> Found {
    let mut found = Found::default();
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    for d in dirs {
        walk_dir(d, recursive, &mut seen_dirs, &mut seen_files, &mut found);
    }
    found
}

fn walk_dir(
    dir: &Path,
    recursive: bool,
    seen_dirs: &mut HashSet<PathBuf>,
    seen_files: &mut HashSet<PathBuf>,
    found: &mut Found,
) {
    // A folder reached twice (a link back up the tree, or two arguments
    // naming the same folder) is scanned once.
    if !seen_dirs.insert(canonical(dir)) {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            found.findings.push(Finding::new(
                Severity::Error,
                "unreadable",
                dir,
                format!("cannot list the folder: {e}"),
                vec![],
            ));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue; // a dangling link: nothing to read
        };
        if meta.is_dir() {
            if recursive {
                walk_dir(&p, recursive, seen_dirs, seen_files, found);
            }
            continue;
        }
        if !meta.is_file() || !seen_files.insert(canonical(&p)) {
            continue;
        }
        if p.to_string_lossy().ends_with(SUFFIX) {
            found.journals.push(p);
            continue;
        }
        if let Some(journal) = image_file_journal(&p) {
            // Part of a pending merge, reported with its journal; alone,
            // a leftover (journal-format.md §3.5).
            if !journal.exists() {
                found.findings.push(stale_images(&p, &journal));
            }
            continue;
        }
        classify(p, found);
    }
}

/// The journal whose image file `p` is, by name.
fn image_file_journal(p: &Path) -> Option<PathBuf> {
    let name = p.to_string_lossy();
    let journal = name.strip_suffix(".images")?;
    journal.ends_with(SUFFIX).then(|| PathBuf::from(journal))
}

fn stale_images(p: &Path, journal: &Path) -> Finding {
    let ancestor = PathBuf::from(
        journal
            .to_string_lossy()
            .trim_end_matches(SUFFIX)
            .to_string(),
    );
    Finding::new(
        Severity::Warning,
        "stale_journal_images",
        p,
        "before-images of a merge that has ended (its journal is gone, a crash fell between deleting the two); nothing needs them".into(),
        vec![format!("vhdmerge recover {}", super::quote(&ancestor))],
    )
}

fn classify(p: PathBuf, found: &mut Found) {
    match sniff(&p) {
        Ok(Some(format)) => found.disks.push((p, format)),
        Ok(None) if is_disk_name(&p) => found.findings.push(Finding::new(
            Severity::Error,
            "not_a_disk",
            &p,
            "named like a disk image but holds neither a VHDX signature nor a VHD footer: it was truncated, overwritten or is another kind of file".into(),
            vec![format!("vhdmerge check {}", super::quote(&p))],
        )),
        Ok(None) => {}
        Err(e) => found.findings.push(Finding::new(
            Severity::Warning,
            "unreadable",
            &p,
            format!("cannot read the file to tell whether it is a disk image: {e}"),
            vec![],
        )),
    }
}
