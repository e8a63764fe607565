//! `vhdmerge scan`: the checkpoint trees of whole folders, read-only.
//!
//! `discover` walks the folders (disk images by content, journals by
//! name), `forest` opens every file and resolves each child's parent the
//! way `merge` does, `findings` names what is wrong and what fixes it,
//! and `plan` lists the merges that consolidate each tree. The JSON form
//! of the [`Report`] is specified in `docs/scan.md`.

mod discover;
mod findings;
mod forest;
mod plan;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::disk::{Format, Kind};
use crate::error::{Error, Result};
use crate::journal;
use crate::paths::folder_of;
use crate::verify;
use forest::Forest;
pub use forest::{LinkStatus, ParentLink};
pub use plan::Step;

/// The version of the JSON report (`docs/scan.md`).
pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Scan subfolders too (Hyper-V's older `Snapshots/<GUID>/` layout).
    pub recursive: bool,
    /// Run `check` on every file.
    pub check: bool,
    /// Compute the content digest of every leaf's chain.
    pub hash: bool,
    /// Bytes per second assumed for the plan's time estimates.
    pub speed: u64,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            recursive: false,
            check: false,
            hash: false,
            speed: 200 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something is broken or unfinished: a chain does not read as it did.
    Error,
    /// Works, but needs a decision or attention.
    Warning,
    Info,
}

/// One problem, with the commands that deal with it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// A stable name for tools (`docs/scan.md` lists them).
    pub kind: &'static str,
    pub path: PathBuf,
    pub message: String,
    pub commands: Vec<String>,
}

impl Finding {
    pub fn new(
        severity: Severity,
        kind: &'static str,
        path: &Path,
        message: String,
        commands: Vec<String>,
    ) -> Finding {
        Finding {
            severity,
            kind,
            path: path.to_path_buf(),
            message,
            commands,
        }
    }
}

/// What a merge of a file into its parent would copy.
#[derive(Debug, Clone, Serialize)]
pub struct MergeSize {
    pub bytes: u64,
    pub overwrite_bytes: u64,
}

/// The result of `check` on one file.
#[derive(Debug, Clone, Serialize)]
pub struct CheckSummary {
    pub status: verify::check::Status,
    pub findings: Vec<verify::check::Finding>,
}

/// One disk image.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    /// Absent when the file could not be opened (see `error`).
    pub format: Option<Format>,
    pub kind: Option<Kind>,
    pub virtual_size: Option<u64>,
    pub file_size: Option<u64>,
    pub block_size: Option<u64>,
    pub allocated_bytes: Option<u64>,
    pub error: Option<String>,
    /// Reached only as the parent of a scanned file.
    pub outside_scan: bool,
    /// Differencing files: the link to the parent as found.
    pub link: Option<ParentLink>,
    /// The parent in the tree (the linked file, or a `--parent` candidate).
    pub parent: Option<PathBuf>,
    pub children: Vec<PathBuf>,
    pub leaf: bool,
    pub merge_into_parent: Option<MergeSize>,
    pub unreplayed_log_entries: usize,
    pub warnings: Vec<String>,
    /// Why the file is possibly orphaned, when it is.
    pub possibly_orphaned: Option<String>,
    /// The journal of an interrupted merge that names this file.
    pub pending_journal: Option<PathBuf>,
    pub check: Option<CheckSummary>,
    /// The content digest (docs/digest.md) of a leaf's whole chain.
    pub content_digest: Option<String>,
}

/// One tree: a root and everything below it.
#[derive(Debug, Clone, Serialize)]
pub struct Tree {
    pub root: PathBuf,
    /// The root is a full disk (not a differencing file whose parent is lost).
    pub complete: bool,
    pub files: usize,
    pub leaves: Vec<PathBuf>,
    /// Files with more than one child.
    pub branches: Vec<PathBuf>,
}

/// An interrupted merge's journal.
#[derive(Debug, Clone, Serialize)]
pub struct JournalReport {
    pub path: PathBuf,
    pub ancestor: Option<PathBuf>,
    pub merged: Vec<PathBuf>,
    pub state: Option<&'static str>,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub summary: String,
    /// `--rollback` is refused: the merge was started with --finish-only.
    pub finish_only: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub report_version: u32,
    pub scanned: Vec<PathBuf>,
    pub files: Vec<FileReport>,
    pub trees: Vec<Tree>,
    pub journals: Vec<JournalReport>,
    pub findings: Vec<Finding>,
    /// Runnable steps in order, then the blocked ones.
    pub plan: Vec<Step>,
    /// The speed (bytes per second) behind `plan[].estimate_seconds`.
    pub assumed_speed: u64,
}

impl Report {
    /// The worst severity found, if any.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).min()
    }
}

/// Scans `dirs`. Never writes: every file is opened read-only.
pub fn scan(dirs: &[PathBuf], opts: &ScanOptions) -> Result<Report> {
    for d in dirs {
        if !d.is_dir() {
            return Err(Error::NotAFolder { path: d.clone() });
        }
    }
    let found = discover::walk(dirs, opts.recursive);
    let mut findings = found.findings;
    let mut forest = Forest::default();
    for (path, _) in &found.disks {
        if let (i, Some(e)) = forest.add(path, false) {
            findings.push(findings::unopenable(&forest.nodes[i].path, &e));
        }
    }
    for (i, e) in forest.link_all() {
        findings.push(findings::unopenable(&forest.nodes[i].path, &e));
    }
    let journals: Vec<JournalReport> = (found.journals.iter().enumerate())
        .map(|(k, j)| read_journal(j, k, &mut forest))
        .collect();
    forest.attach_pending();
    let mut files: Vec<FileReport> = (0..forest.nodes.len())
        .map(|i| file_report(&mut forest, i, &journals))
        .collect();
    findings::orphans(&forest, &mut files);
    if opts.check {
        check_all(&forest, &mut files);
    }
    if opts.hash {
        hash_leaves(&mut forest, &mut files, &mut findings);
    }
    findings.extend(findings::of_files(&forest, &files, &journals));
    let mut plan: Vec<Step> = journals.iter().filter_map(recover_step).collect();
    plan.extend(plan::build(&mut forest, opts.speed));
    findings.extend(findings::changed_during_scan(&forest));
    findings.sort_by(|a, b| (a.severity, &a.path).cmp(&(b.severity, &b.path)));
    Ok(Report {
        report_version: REPORT_VERSION,
        scanned: dirs.to_vec(),
        trees: trees(&forest),
        files,
        journals,
        findings,
        plan,
        assumed_speed: opts.speed,
    })
}

fn file_report(f: &mut Forest, i: usize, journals: &[JournalReport]) -> FileReport {
    let size = f.nodes[i]
        .parent
        .and_then(|p| {
            f.with_chain(&[i, p], |c| crate::merge::measure(c, 1).ok())
                .flatten()
        })
        .map(|s| MergeSize {
            bytes: s.bytes,
            overwrite_bytes: s.overwrite_bytes,
        });
    let n = &f.nodes[i];
    let info = n.info.as_ref();
    FileReport {
        path: n.path.clone(),
        format: info.map(|i| i.format),
        kind: info.map(|i| i.kind),
        virtual_size: info.map(|i| i.virtual_size),
        file_size: info.map(|i| i.file_size).or(n.stat.map(|s| s.0)),
        block_size: info.map(|i| i.block_size),
        allocated_bytes: info.map(|i| i.allocated_bytes),
        error: n.error.clone(),
        outside_scan: n.outside,
        link: n.link.clone(),
        parent: n.parent.map(|p| f.nodes[p].path.clone()),
        children: n
            .children
            .iter()
            .map(|&c| f.nodes[c].path.clone())
            .collect(),
        leaf: n.children.is_empty(),
        merge_into_parent: size,
        unreplayed_log_entries: n.layer.as_ref().map_or(0, |l| l.unreplayed_log_entries()),
        warnings: (n.layer.iter())
            .flat_map(|l| l.warnings().iter().map(|w| w.to_string()))
            .collect(),
        possibly_orphaned: None,
        pending_journal: n.pending.map(|j| journals[j].path.clone()),
        check: None,
        content_digest: None,
    }
}

/// Reads a journal and marks the files it names as pending.
fn read_journal(path: &Path, index: usize, forest: &mut Forest) -> JournalReport {
    let mut r = JournalReport {
        path: path.to_path_buf(),
        ancestor: None,
        merged: vec![],
        state: None,
        bytes_done: None,
        bytes_total: None,
        summary: String::new(),
        finish_only: false,
        error: None,
    };
    let loaded = match journal::load(path) {
        Ok(l) => l,
        Err(e) => {
            r.summary = "unreadable journal".into();
            r.error = Some(e.to_string());
            return r;
        }
    };
    r.summary = journal::state::summary(&loaded);
    r.finish_only = journal::state::finish_only(&loaded.records);
    let Some(journal::Record::Begin(b)) = loaded.records.first() else {
        return r;
    };
    let state = journal::State::of(&loaded.records);
    r.state = Some(state.name());
    if let Some(p) = journal::state::plan(&loaded.records) {
        r.bytes_total = Some(p.bytes);
    }
    if let journal::State::Applying {
        checkpoint: Some((_, c)),
    } = &state
    {
        r.bytes_done = Some(c.bytes_done);
    }
    let dir = folder_of(path);
    for f in &b.files {
        let file = dir.join(&f.path);
        match f.role {
            journal::Role::Ancestor => r.ancestor = Some(file.clone()),
            journal::Role::Merged { .. } => r.merged.push(file.clone()),
            journal::Role::Relinked => {}
        }
        if let Some(i) = forest.find(&file) {
            forest.nodes[i].pending = Some(index);
        }
    }
    r
}

fn recover_step(j: &JournalReport) -> Option<Step> {
    let ancestor = j.ancestor.clone()?;
    let args = vec![
        "recover".to_string(),
        ancestor.to_string_lossy().into_owned(),
    ];
    Some(Step {
        action: "recover",
        command: shell_line(&args),
        args,
        merges: j.merged.clone(),
        into: ancestor,
        bytes: j.bytes_total.unwrap_or(0)
            - j.bytes_done.unwrap_or(0).min(j.bytes_total.unwrap_or(0)),
        overwrite_bytes: 0,
        space_needed: 0,
        free_space: None,
        estimate_seconds: 0.0,
        blocked_by: vec![],
        note: format!(
            "{}; {}. Scan again afterwards: the files it names are left out of this plan",
            j.summary,
            journal::state::undo_hint(j.finish_only)
        ),
    })
}

fn check_all(forest: &Forest, files: &mut [FileReport]) {
    for (i, n) in forest.nodes.iter().enumerate() {
        let over = n
            .via_override()
            .then(|| forest.nodes[n.parent.expect("an override")].path.clone());
        let r = verify::check::check(&n.path, over);
        files[i].check = Some(CheckSummary {
            status: r.status,
            findings: r.findings,
        });
    }
}

/// The content digest of every leaf whose chain reaches a full disk.
fn hash_leaves(forest: &mut Forest, files: &mut [FileReport], findings: &mut Vec<Finding>) {
    for (i, file) in files.iter_mut().enumerate() {
        if !forest.nodes[i].children.is_empty() || forest.nodes[i].layer.is_none() {
            continue;
        }
        let levels = forest.path_up(i);
        let root = *levels.last().expect("non-empty");
        // A lost parent, or a merge half done: the chain does not read
        // as any disk did.
        if forest.nodes[root].differencing()
            || levels.iter().any(|&k| forest.nodes[k].pending.is_some())
        {
            continue;
        }
        match forest.with_chain(&levels, |c| verify::content_digest(c, |_| {})) {
            Some(Ok(d)) => file.content_digest = Some(d.root.to_hex().to_string()),
            Some(Err(e)) => findings.push(Finding::new(
                Severity::Error,
                "unreadable",
                &forest.nodes[i].path,
                format!("hashing its chain failed: {e}"),
                vec![format!("vhdmerge check {}", quote(&forest.nodes[i].path))],
            )),
            None => {}
        }
    }
}

fn trees(f: &Forest) -> Vec<Tree> {
    f.roots()
        .into_iter()
        .map(|r| {
            let all = f.subtree(r);
            let pick = |want: fn(usize) -> bool| {
                let mut v: Vec<PathBuf> = all
                    .iter()
                    .filter(|&&i| want(f.nodes[i].children.len()))
                    .map(|&i| f.nodes[i].path.clone())
                    .collect();
                v.sort();
                v
            };
            Tree {
                root: f.nodes[r].path.clone(),
                complete: f.nodes[r].layer.is_some() && !f.nodes[r].differencing(),
                files: all.len(),
                leaves: pick(|n| n == 0),
                branches: pick(|n| n > 1),
            }
        })
        .collect()
}

/// A path as one word of a POSIX shell command.
pub fn quote(p: &Path) -> String {
    quote_word(&p.to_string_lossy())
}

fn quote_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c));
    match plain {
        true => w.to_string(),
        false => format!("'{}'", w.replace('\'', "'\\''")),
    }
}

/// `vhdmerge` and its arguments as one shell line.
fn shell_line(args: &[String]) -> String {
    let mut s = String::from("vhdmerge");
    for a in args {
        s.push(' ');
        s.push_str(&quote_word(a));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_round_trips_through_a_shell_word() {
        assert_eq!(quote_word("vm/base.vhdx"), "vm/base.vhdx");
        assert_eq!(quote_word("Generation 1_X.avhdx"), "'Generation 1_X.avhdx'");
        assert_eq!(quote_word("it's"), "'it'\\''s'");
        assert_eq!(quote_word(""), "''");
    }

    #[test]
    fn stat_of_a_missing_file_is_none() {
        assert!(forest::stat(Path::new("/nonexistent/x.vhdx")).is_none());
    }
}
