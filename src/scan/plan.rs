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

/// The merge steps of every tree that reaches a full disk and whose files
/// no pending merge names.
pub fn build(f: &mut Forest, speed: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    for root in f.roots() {
        let tree = f.subtree(root);
        let complete = f.nodes[root].layer.is_some() && !f.nodes[root].differencing();
        if complete && tree.iter().all(|&i| f.nodes[i].pending.is_none()) {
            steps.extend(tree_steps(f, &tree, speed));
        }
    }
    // Runnable steps first, in order; the blocked ones after them.
    steps.sort_by_key(|s| !s.blocked_by.is_empty());
    steps
}

/// `merge` opens a child's whole chain, and only the child's own parent
/// can be named with `--parent`: so links that need `--parent` are merged
/// away first, nearest the root first (`tree` is in that order), each on
/// its own. Then every remaining chain of single children folds into its
/// top with one `merge --into`, deepest first.
fn tree_steps(f: &mut Forest, tree: &[usize], speed: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut removed = vec![false; f.nodes.len()];
    let mut stuck = false;
    for &i in tree {
        if !f.nodes[i].via_override() {
            continue;
        }
        let p = f.nodes[i].parent.expect("an override has a parent");
        let path = |k: usize| arg(&f.nodes[k].path);
        let args = vec!["merge".into(), path(i), "--parent".into(), path(p)];
        let siblings = siblings(f, p, i);
        if f.nodes[p].via_override() {
            stuck = true;
            let note = "its parent's own link is broken too: merge the parent first (by hand, naming its parent with --parent), then scan again";
            steps.push(step(
                f,
                &[i, p],
                args,
                vec![f.nodes[p].path.clone()],
                speed,
                note,
            ));
        } else if !siblings.is_empty() {
            stuck = true;
            steps.push(step(f, &[i, p], args, siblings, speed, BLOCKED));
        } else {
            removed[i] = true;
            steps.push(step(f, &[i, p], args, vec![], speed, ""));
        }
    }
    if stuck {
        return steps; // the merges below would open a chain that is broken
    }
    let view = View::new(f, tree, &removed);
    for head in view.heads(f) {
        let seg = view.segment(head);
        let top = *seg.last().expect("non-empty");
        if seg.len() > 1 {
            let mut args = vec!["merge".to_string(), arg(&f.nodes[head].path)];
            if seg.len() > 2 {
                args.extend(["--into".into(), arg(&f.nodes[top].path)]);
            }
            let levels = original_levels(f, head, top);
            steps.push(step(f, &levels, args, vec![], speed, ""));
        }
        if let Some(p) = view.parent[top] {
            let siblings: Vec<PathBuf> = view.children[p]
                .iter()
                .filter(|&&c| c != top && blocks(f, c))
                .map(|&c| f.nodes[c].path.clone())
                .collect();
            if !siblings.is_empty() {
                let args = vec!["merge".to_string(), arg(&f.nodes[top].path)];
                let levels = original_levels(f, top, p);
                steps.push(step(f, &levels, args, siblings, speed, BLOCKED));
            }
        }
    }
    steps
}

const BLOCKED: &str = "`merge` refuses while other disks depend on the target: keep one branch (merge or delete the others) first";

/// The files from `from` up to `to` in the tree as found (with files that
/// earlier steps merge away): what a merge's size is measured on.
fn original_levels(f: &Forest, from: usize, to: usize) -> Vec<usize> {
    let up = f.path_up(from);
    let end = up.iter().position(|&k| k == to).expect("an ancestor");
    up[..=end].to_vec()
}

/// Whether `merge` counts child `c` as depending on its parent: it links
/// by locator and identity, and has a disk image's name.
fn blocks(f: &Forest, c: usize) -> bool {
    !f.nodes[c].via_override() && is_disk_name(&f.nodes[c].path)
}

/// The children of `p` other than `i` that block a merge into `p`.
fn siblings(f: &Forest, p: usize, i: usize) -> Vec<PathBuf> {
    f.nodes[p]
        .children
        .iter()
        .filter(|&&c| c != i && blocks(f, c))
        .map(|&c| f.nodes[c].path.clone())
        .collect()
}

/// A tree as it is once the `--parent` merges have run: their files are
/// gone and their children hang from the file they merged into.
struct View {
    parent: Vec<Option<usize>>,
    children: Vec<Vec<usize>>,
    /// The tree's files that remain, in tree order (nearest the root first).
    live: Vec<usize>,
}

impl View {
    fn new(f: &Forest, tree: &[usize], removed: &[bool]) -> View {
        let n = f.nodes.len();
        let mut v = View {
            parent: vec![None; n],
            children: vec![Vec::new(); n],
            live: tree.iter().copied().filter(|&i| !removed[i]).collect(),
        };
        for &i in &v.live {
            let mut p = f.nodes[i].parent;
            while let Some(q) = p.filter(|&q| removed[q]) {
                p = f.nodes[q].parent;
            }
            v.parent[i] = p;
        }
        for &i in &v.live {
            if let Some(p) = v.parent[i] {
                v.children[p].push(i);
            }
        }
        v
    }

    /// Where a chain of merges starts: a leaf, or a file that several
    /// children share (merging it re-links all of them). Deepest first:
    /// a merge lower in a tree never changes the files a merge higher up
    /// names.
    fn heads(&self, f: &Forest) -> Vec<usize> {
        let mut h: Vec<usize> = (self.live.iter().copied())
            .filter(|&i| self.children[i].len() != 1)
            .collect();
        h.sort_by_key(|&i| (std::cmp::Reverse(self.depth(i)), f.nodes[i].path.clone()));
        h
    }

    fn depth(&self, mut i: usize) -> usize {
        let mut d = 0;
        while let Some(p) = self.parent[i] {
            (i, d) = (p, d + 1);
        }
        d
    }

    /// `head` and its parents while each parent has no other child.
    fn segment(&self, head: usize) -> Vec<usize> {
        let mut seg = vec![head];
        let mut at = head;
        while let Some(p) = self.parent[at].filter(|&p| self.children[p].len() == 1) {
            seg.push(p);
            at = p;
        }
        seg
    }
}

fn step(
    f: &mut Forest,
    levels: &[usize],
    args: Vec<String>,
    blocked_by: Vec<PathBuf>,
    speed: u64,
    note: &str,
) -> Step {
    let into = f.nodes[*levels.last().expect("two levels")].path.clone();
    let merges = levels[..levels.len() - 1]
        .iter()
        .map(|&i| f.nodes[i].path.clone())
        .collect();
    let sizing: Option<Sizing> = f
        .with_chain(levels, |c| measure(c, levels.len() - 1).ok())
        .flatten();
    let note = match sizing {
        None => "could not be sized: a file of it cannot be read".to_string(),
        Some(_) => note.to_string(),
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
