//! The consolidation plan: `merge` commands that fold each tree into its
//! base in a safe order, and the merges that siblings block.

use std::path::PathBuf;

use serde::Serialize;

use super::forest::Forest;
use super::shell_line;
use crate::merge::preflight::{is_disk_name, sparse_files};
use crate::merge::{Sizing, measure};
use crate::paths::folder_of;

/// One command of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// "recover" or "merge".
    pub action: &'static str,
    /// The command line, quoted for a POSIX shell.
    pub command: String,
    /// The same as separate arguments (without the program name).
    pub args: Vec<String>,
    /// The files merged away (top first) and the file they merge into.
    pub merges: Vec<PathBuf>,
    pub into: PathBuf,
    /// Guest bytes the merge copies, of which `overwrite_bytes` replace
    /// data the target holds (their before-images go to the journal).
    pub bytes: u64,
    pub overwrite_bytes: u64,
    /// Free space the merge needs beside `into`, and the space free now.
    pub space_needed: u64,
    pub free_space: Option<u64>,
    /// `bytes` at the scan's assumed speed.
    pub estimate_seconds: f64,
    /// Disks that depend on the target or an intermediate file: `merge`
    /// refuses this step while they exist. Empty for a runnable step.
    pub blocked_by: Vec<PathBuf>,
    pub note: String,
}

/// Where a chain of merges starts: a leaf, or a file that several
/// children share (merging it re-links all of them).
fn heads(f: &Forest) -> Vec<usize> {
    let mut h: Vec<usize> = (0..f.nodes.len())
        .filter(|&i| f.nodes[i].children.len() != 1 && f.nodes[i].layer.is_some())
        .collect();
    // Deepest first: a merge lower in a tree never changes the files a
    // merge higher up names.
    h.sort_by_key(|&i| {
        (
            std::cmp::Reverse(f.path_up(i).len()),
            f.nodes[i].path.clone(),
        )
    });
    h
}

/// The files from `head` up to the segment's top: the last file whose
/// parent is missing or shared with other children.
fn segment(f: &Forest, head: usize) -> Vec<usize> {
    let mut seg = vec![head];
    let mut at = head;
    while let Some(p) = f.nodes[at].parent {
        if f.nodes[p].children.len() != 1 || f.nodes[p].layer.is_none() {
            break;
        }
        seg.push(p);
        at = p;
    }
    seg
}

/// The merge steps of every tree whose files no pending merge names.
pub fn build(f: &mut Forest, speed: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    for head in heads(f) {
        if f.subtree(*f.path_up(head).last().expect("non-empty"))
            .iter()
            .any(|&i| f.nodes[i].pending.is_some())
        {
            continue;
        }
        let seg = segment(f, head);
        steps.extend(segment_steps(f, &seg, speed));
        if let Some(blocked) = blocked_step(f, *seg.last().expect("non-empty"), speed) {
            steps.push(blocked);
        }
    }
    // Runnable steps first, in order; the blocked ones after them.
    steps.sort_by_key(|s| !s.blocked_by.is_empty());
    steps
}

/// Merges that fold `seg` (bottom first) into its top. A link that needs
/// `--parent` must be the top link of its command, so the segment splits
/// there: each command merges into the file above the next such link.
fn segment_steps(f: &mut Forest, seg: &[usize], speed: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut cur = 0;
    while cur + 1 < seg.len() {
        let target = (cur + 1..seg.len() - 1)
            .find(|&k| f.nodes[seg[k]].via_override())
            .unwrap_or(seg.len() - 1);
        let mut args = vec!["merge".to_string(), arg(&f.nodes[seg[cur]].path)];
        if f.nodes[seg[cur]].via_override() {
            args.extend(["--parent".into(), arg(&f.nodes[seg[cur + 1]].path)]);
        }
        if target > cur + 1 {
            args.extend(["--into".into(), arg(&f.nodes[seg[target]].path)]);
        }
        steps.push(step(f, &seg[cur..=target], args, vec![], speed));
        cur = target;
    }
    steps
}

/// The merge of a segment's top into a parent it shares with siblings:
/// listed so the user sees what must be decided, marked as blocked.
fn blocked_step(f: &mut Forest, top: usize, speed: u64) -> Option<Step> {
    let parent = f.nodes[top].parent?;
    f.nodes[parent].layer.as_ref()?;
    // As `merge` counts them: children that link by locator and identity,
    // with a disk image's name.
    let siblings: Vec<PathBuf> = f.nodes[parent]
        .children
        .iter()
        .filter(|&&c| c != top)
        .map(|&c| &f.nodes[c])
        .filter(|n| !n.via_override() && is_disk_name(&n.path))
        .map(|n| n.path.clone())
        .collect();
    if siblings.is_empty() {
        return None;
    }
    let mut args = vec!["merge".to_string(), arg(&f.nodes[top].path)];
    if f.nodes[top].via_override() {
        args.extend(["--parent".into(), arg(&f.nodes[parent].path)]);
    }
    Some(step(f, &[top, parent], args, siblings, speed))
}

fn step(
    f: &mut Forest,
    levels: &[usize],
    args: Vec<String>,
    blocked_by: Vec<PathBuf>,
    speed: u64,
) -> Step {
    let into = f.nodes[*levels.last().expect("two levels")].path.clone();
    let merges = levels[..levels.len() - 1]
        .iter()
        .map(|&i| f.nodes[i].path.clone())
        .collect();
    let sizing: Option<Sizing> = f
        .with_chain(levels, |c| measure(c, levels.len() - 1).ok())
        .flatten();
    let note = match (&sizing, blocked_by.is_empty()) {
        (None, _) => "could not be sized: a file of it cannot be read".into(),
        (_, false) => "`merge` refuses while other disks depend on the target: keep one branch (merge or delete the others) first".into(),
        _ => String::new(),
    };
    let s = sizing.unwrap_or_default();
    let space_needed = s.space_needed(sparse_files(&into));
    Step {
        action: "merge",
        command: shell_line(&args),
        args,
        merges,
        free_space: fs2::available_space(folder_of(&into)).ok(),
        into,
        bytes: s.bytes,
        overwrite_bytes: s.overwrite_bytes,
        space_needed,
        estimate_seconds: s.bytes as f64 / speed.max(1) as f64,
        blocked_by,
        note,
    }
}

fn arg(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}
