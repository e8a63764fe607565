//! The forest of a scan: every disk file opened read-only, each child's
//! parent resolved with the same locators and identity proof as `merge`,
//! and the tree shape (roots, branches, leaves) that follows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::disk::chain::{check_link, locate_parent};
use crate::disk::{Chain, Kind, Layer, LayerInfo, open_layer};
use crate::error::Error;
use crate::paths::canonical;

/// How a child's link to its parent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkStatus {
    /// A locator led to the parent and the identity proof holds.
    Ok,
    /// As `Ok`, but only a fallback by file name in the child's folder
    /// found it: the locator paths themselves are stale.
    ByFileName,
    /// No locator leads to an existing file.
    Missing,
    /// The file found has another identity than the child expects.
    WrongIdentity,
    /// The file found cannot be this child's parent (another format,
    /// virtual size or sector size).
    Mismatch,
    /// The file found cannot be opened.
    Unreadable,
    /// Following parents leads back to this file.
    Loop,
}

impl LinkStatus {
    pub fn usable(self) -> bool {
        matches!(self, LinkStatus::Ok | LinkStatus::ByFileName)
    }
    pub fn describe(self) -> &'static str {
        match self {
            LinkStatus::Ok => "linked",
            LinkStatus::ByFileName => "parent found by file name only",
            LinkStatus::Missing => "parent missing",
            LinkStatus::WrongIdentity => "parent has the wrong identity",
            LinkStatus::Mismatch => "parent does not fit",
            LinkStatus::Unreadable => "parent unreadable",
            LinkStatus::Loop => "parents loop",
        }
    }
}

/// A child's link to its parent, as found.
#[derive(Debug, Clone, Serialize)]
pub struct ParentLink {
    pub status: LinkStatus,
    /// The file the locators led to (absent when none exists).
    pub parent: Option<PathBuf>,
    /// Which locator found it.
    pub found_by: Option<String>,
    /// Every path the locators name, in the order tried.
    pub tried: Vec<PathBuf>,
    /// The identity the child expects of its parent.
    pub expected: String,
    /// The identity the found file has, when it is not the expected one.
    pub found: Option<String>,
    pub detail: Option<String>,
    /// For a broken link: a scanned file that passes the identity proof,
    /// to name with `--parent`.
    pub use_parent: Option<PathBuf>,
}

pub struct Node {
    pub path: PathBuf,
    pub layer: Option<Box<dyn Layer>>,
    /// Why the file could not be opened.
    pub error: Option<String>,
    pub info: Option<LayerInfo>,
    /// (length, modification time) when first opened.
    pub stat: Option<(u64, Option<SystemTime>)>,
    /// Not in a scanned folder: reached only as some child's parent.
    pub outside: bool,
    pub link: Option<ParentLink>,
    /// The parent in the tree: the linked file, or `use_parent`.
    pub parent: Option<usize>,
    pub children: Vec<usize>,
    /// The journal of an interrupted merge that names this file.
    pub pending: Option<usize>,
}

impl Node {
    pub fn differencing(&self) -> bool {
        self.layer
            .as_ref()
            .is_some_and(|l| l.kind() == Kind::Differencing)
    }
    /// Whether the tree link needs `--parent` (it is not the file the
    /// locators lead to, or that file fails the proof).
    pub fn via_override(&self) -> bool {
        self.parent.is_some()
            && self.pending.is_none()
            && self.link.as_ref().is_some_and(|l| !l.status.usable())
    }
}

pub fn stat(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

#[derive(Default)]
pub struct Forest {
    pub nodes: Vec<Node>,
    pub index: HashMap<PathBuf, usize>,
}

impl Forest {
    /// Adds a file (opened read-only; a dirty VHDX log is replayed in
    /// memory) and returns its index and, when it cannot be opened, why.
    pub fn add(&mut self, path: &Path, outside: bool) -> (usize, Option<Error>) {
        let key = canonical(path);
        if let Some(&i) = self.index.get(&key) {
            return (i, None);
        }
        let stat = stat(path);
        let (layer, err) = match open_layer(path, false) {
            Ok(l) => (Some(l), None),
            Err(e) => (None, Some(e)),
        };
        let info = layer.as_ref().and_then(|l| l.info().ok());
        self.nodes.push(Node {
            path: path.to_path_buf(),
            error: err.as_ref().map(|e| e.to_string()),
            layer,
            info,
            stat,
            outside,
            link: None,
            parent: None,
            children: Vec::new(),
            pending: None,
        });
        self.index.insert(key, self.nodes.len() - 1);
        (self.nodes.len() - 1, err)
    }

    pub fn find(&self, path: &Path) -> Option<usize> {
        self.index.get(&canonical(path)).copied()
    }

    /// Resolves every child's parent. A parent outside the scanned folders
    /// is added (and resolved in turn). Returns the open errors of the
    /// parents it added.
    pub fn link_all(&mut self) -> Vec<(usize, Error)> {
        let mut errors = Vec::new();
        let mut i = 0;
        while i < self.nodes.len() {
            if let Some((link, parent)) = self.resolve(i, &mut errors) {
                self.nodes[i].link = Some(link);
                self.nodes[i].parent = parent;
            }
            i += 1;
        }
        self.suggest_parents();
        self.break_loops();
        for i in 0..self.nodes.len() {
            if let Some(p) = self.nodes[i].parent {
                self.nodes[p].children.push(i);
            }
        }
        errors
    }

    fn resolve(
        &mut self,
        i: usize,
        errors: &mut Vec<(usize, Error)>,
    ) -> Option<(ParentLink, Option<usize>)> {
        let child = self.nodes[i].layer.as_ref()?;
        let pref = child.parent_ref()?;
        let child_path = child.path().to_path_buf();
        let mut link = ParentLink {
            status: LinkStatus::Missing,
            parent: None,
            found_by: None,
            tried: pref.candidates.iter().map(|(_, p)| p.clone()).collect(),
            expected: pref.expected.describe(),
            found: None,
            detail: None,
            use_parent: None,
        };
        let Ok((ppath, how)) = locate_parent(&child_path, &pref.candidates) else {
            return Some((link, None));
        };
        let by_name = how.contains("file name") || how == "parent name";
        link.found_by = Some(how);
        let (p, err) = self.add(&ppath, self.find(&ppath).is_none());
        link.parent = Some(self.nodes[p].path.clone());
        if let Some(e) = err {
            link.status = LinkStatus::Unreadable;
            link.detail = Some(e.to_string());
            errors.push((p, e));
            return Some((link, None));
        }
        let (child, parent) = (self.layer(i), self.layer(p));
        match check_link(child, parent, &pref.expected) {
            Ok(()) => {
                link.status = match by_name {
                    true => LinkStatus::ByFileName,
                    false => LinkStatus::Ok,
                };
                Some((link, Some(p)))
            }
            Err(Error::ParentMismatch { found, .. }) => {
                link.status = LinkStatus::WrongIdentity;
                link.found = Some(found);
                Some((link, None))
            }
            Err(e) => {
                link.status = LinkStatus::Mismatch;
                link.detail = Some(match e {
                    Error::ChainMismatch { detail, .. } => detail,
                    other => other.to_string(),
                });
                Some((link, None))
            }
        }
    }

    fn layer(&self, i: usize) -> &dyn Layer {
        self.nodes[i].layer.as_deref().expect("an opened node")
    }

    /// For every broken link: a scanned file that passes the child's
    /// identity proof becomes its tree parent, named with `--parent`.
    fn suggest_parents(&mut self) {
        for i in 0..self.nodes.len() {
            let broken = self.nodes[i]
                .link
                .as_ref()
                .is_some_and(|l| !l.status.usable());
            if !broken {
                continue;
            }
            let child = self.layer(i);
            let expected = child.parent_ref().expect("a linked child").expected;
            let pick = (0..self.nodes.len()).find(|&j| {
                j != i
                    && self.nodes[j].layer.as_ref().is_some_and(|p| {
                        expected.accepts(&p.identity())
                            && check_link(child, p.as_ref(), &expected).is_ok()
                    })
            });
            if let Some(j) = pick {
                let path = self.nodes[j].path.clone();
                let node = &mut self.nodes[i];
                node.link.as_mut().expect("checked").use_parent = Some(path);
                node.parent = Some(j);
            }
        }
    }

    /// Cuts the link that closes a loop of parents, so every walk up ends.
    fn break_loops(&mut self) {
        for start in 0..self.nodes.len() {
            let mut seen = vec![start];
            let mut at = start;
            while let Some(p) = self.nodes[at].parent {
                if seen.contains(&p) {
                    let back = self.nodes[p].path.display().to_string();
                    let node = &mut self.nodes[at];
                    node.parent = None;
                    if let Some(l) = node.link.as_mut() {
                        l.status = LinkStatus::Loop;
                        l.use_parent = None;
                        l.detail =
                            Some(format!("following parents from here leads back to {back}"));
                    }
                    break;
                }
                seen.push(p);
                at = p;
            }
        }
    }

    /// A child whose link an interrupted merge broke (the merge changed
    /// its parent's identity) hangs in the tree from the file its
    /// locators lead to, when the same journal names both.
    pub fn attach_pending(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let (Some(j), Some(link)) = (n.pending, n.link.as_ref()) else {
                continue;
            };
            if link.status.usable() || n.parent.is_some() {
                continue;
            }
            let Some(p) = link.parent.as_deref().and_then(|p| self.find(p)) else {
                continue;
            };
            if self.nodes[p].pending == Some(j) && !self.path_up(p).contains(&i) {
                self.nodes[i].parent = Some(p);
                self.nodes[p].children.push(i);
            }
        }
    }

    /// Top of each tree: files without a tree parent.
    pub fn roots(&self) -> Vec<usize> {
        let mut r: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].parent.is_none())
            .collect();
        r.sort_by(|&a, &b| self.nodes[a].path.cmp(&self.nodes[b].path));
        r
    }

    /// The tree parents from `i` up: `i` first, its root last.
    pub fn path_up(&self, i: usize) -> Vec<usize> {
        let mut v = vec![i];
        while let Some(p) = self.nodes[*v.last().expect("non-empty")].parent {
            v.push(p);
        }
        v
    }

    /// Every file of the tree below and including `i`.
    pub fn subtree(&self, i: usize) -> Vec<usize> {
        let mut out = vec![i];
        let mut k = 0;
        while k < out.len() {
            out.extend(self.nodes[out[k]].children.iter().copied());
            k += 1;
        }
        out
    }

    /// Lends the layers of `levels` (top first) to a chain for `f`, then
    /// takes them back: nodes own their layers, a scan opens each file once.
    pub fn with_chain<T>(&mut self, levels: &[usize], f: impl FnOnce(&Chain) -> T) -> Option<T> {
        if levels.iter().any(|&i| self.nodes[i].layer.is_none()) {
            return None;
        }
        let layers = levels
            .iter()
            .map(|&i| self.nodes[i].layer.take().expect("checked"))
            .collect();
        let chain = Chain {
            layers,
            links: vec![],
        };
        let out = f(&chain);
        for (&i, l) in levels.iter().zip(chain.layers) {
            self.nodes[i].layer = Some(l);
        }
        Some(out)
    }
}
