//! Planning a merge, before anything is written: the runs the merged
//! levels hold, the ancestor and the disks that depend on the chain, the
//! bytes, space and journal the merge needs.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::MergeOptions;
use super::preflight::{self, Dependent, canonical};
use crate::disk::{Chain, ChainOptions, Extent, Format, Layer};
use crate::error::{Error, Result};
use crate::journal;
use crate::paths::folder_of;

/// A run of guest data to copy: from a merged level, or zeros that must
/// hide the ancestor's data.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub level: usize,
    pub source: Option<u64>,
}

/// What a merge will do; printed by `--dry-run` and part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub child: PathBuf,
    pub ancestor: PathBuf,
    pub format: Format,
    /// Top first; all are deleted (or renamed) at the end.
    pub merged: Vec<PathBuf>,
    /// Children of the merged child, re-linked to the ancestor.
    pub relink: Vec<PathBuf>,
    /// Other disks that depend on the ancestor or an intermediate disk.
    pub siblings: Vec<PathBuf>,
    pub runs: u64,
    pub bytes: u64,
    /// Bytes of the ancestor overwritten in place (their before-images go to the journal).
    pub overwrite_bytes: u64,
    /// Ancestor blocks to allocate.
    pub new_blocks: u64,
    pub new_bytes: u64,
    pub journal_estimate: u64,
    pub space_needed: u64,
    pub free_space: u64,
    /// The merged files can share blocks with the ancestor (a trial clone
    /// succeeded): runs and before-images will be cloned, not copied.
    pub cloning: bool,
    pub journal: PathBuf,
    /// BLAKE3 of every run (see `hash_run`): recorded in the journal so
    /// that a resume proves it follows the same plan.
    #[serde(skip)]
    pub digest: [u8; 32],
}

/// Adds one run to a plan digest: offset, length, level, source.
pub(super) fn hash_run(h: &mut blake3::Hasher, r: &Run) {
    h.update(&r.offset.to_le_bytes());
    h.update(&r.len.to_le_bytes());
    h.update(&(r.level as u32).to_le_bytes());
    match r.source {
        Some(fo) => h.update(&[1]).update(&fo.to_le_bytes()),
        None => h.update(&[0]),
    };
}

/// The plan digest of the runs `chain`'s first `levels` levels hold.
pub(super) fn plan_digest(chain: &Chain, levels: usize) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    for_each_run(chain, levels, 0, |r| {
        hash_run(&mut h, &r);
        Ok(())
    })?;
    Ok(*h.finalize().as_bytes())
}

/// Calls `f` for every run the merged levels (0..ancestor) hold, in order,
/// from guest offset `from` (0, or where a checkpoint left off: the walk
/// keeps no state but its position, so it yields the same runs from a run
/// boundary as a walk from 0 does). Only those levels are asked: a range
/// they all leave to their parent is skipped whole (a block at a time, not
/// a piece at a time, which matters on a sparse 64 TiB disk). Runs are at
/// most 4 MiB.
/// The longest run `for_each_run` yields.
pub(crate) const PIECE: u64 = 4 << 20;

pub fn for_each_run(
    chain: &Chain,
    ancestor: usize,
    from: u64,
    mut f: impl FnMut(Run) -> Result<()>,
) -> Result<()> {
    let size = chain.virtual_size();
    let mut pos = from;
    'walk: while pos < size {
        let mut len = size - pos;
        for level in 0..ancestor {
            let (ext, n) = chain.layers[level].map(pos, len)?;
            len = n;
            let source = match ext {
                Extent::Parent => continue,
                Extent::Data(fo) => Some(fo),
                Extent::Zero => None,
            };
            let n = n.min(PIECE);
            f(Run {
                offset: pos,
                len: n,
                level,
                source,
            })?;
            pos += n;
            continue 'walk;
        }
        pos += len;
    }
    Ok(())
}

/// Whether a zero run needs writing: not when the ancestor already reads zeros there.
pub(super) fn ancestor_reads_zero(a: &dyn Layer, offset: u64, len: u64) -> Result<bool> {
    let mut pos = offset;
    while pos < offset + len {
        let (ext, n) = a.map(pos, offset + len - pos)?;
        if ext != Extent::Zero {
            return Ok(false);
        }
        pos += n;
    }
    Ok(true)
}

/// The size of a merge of `chain`'s levels `0..ancestor` into `ancestor`,
/// measured from the BATs and bitmaps alone (no data is read).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sizing {
    pub runs: u64,
    /// Guest bytes to copy.
    pub bytes: u64,
    /// Bytes of the ancestor overwritten in place (before-images).
    pub overwrite_bytes: u64,
    /// Ancestor blocks to allocate, and their bytes.
    pub new_blocks: u64,
    pub new_bytes: u64,
    /// Bytes written into new blocks, by 4 KiB page: all that new blocks
    /// take on a file system with sparse files.
    pub new_pages: u64,
    pub journal_estimate: u64,
    #[serde(skip)]
    pub digest: [u8; 32],
}

impl Sizing {
    /// Free space the merge needs beside the ancestor: new data (whole new
    /// blocks where the file system cannot leave holes), a bitmap page per
    /// new block and 1/64 of slack, and the journal.
    pub fn space_needed(&self, sparse_files: bool) -> u64 {
        let new_data = match sparse_files {
            true => self.new_pages,
            false => self.new_bytes,
        };
        new_data + self.new_blocks * 4096 + new_data / 64 + self.journal_estimate
    }

    /// The same when the merged files' blocks are shared with the
    /// ancestor (docs/reflink.md): new data takes only the copied first
    /// and last page of each run.
    pub fn space_needed_cloning(&self) -> u64 {
        let new_data = self.new_pages.min(self.runs * 8192);
        new_data + self.new_blocks * 4096 + new_data / 64 + self.journal_estimate
    }
}

impl Sizing {
    /// A finish-only merge journals no overwritten data: the estimate
    /// keeps only the metadata images and the redo records.
    fn without_data_images(&mut self) {
        let images = self.overwrite_bytes.next_multiple_of(4096) * 2;
        self.journal_estimate = self.journal_estimate.saturating_sub(images);
    }
}

/// Measures a merge into `chain.layers[ancestor]` (see `Sizing`).
pub fn measure(chain: &Chain, ancestor: usize) -> Result<Sizing> {
    let a = chain.layers[ancestor].as_ref();
    let (mut runs, mut bytes, mut overwrite) = (0u64, 0u64, 0u64);
    let mut new_blocks = std::collections::BTreeSet::new();
    // Bytes written into blocks the ancestor does not have yet, by page:
    // the rest of such a block is a hole in the file (blocks are added by
    // growing the file).
    let mut new_pages = 0u64;
    let mut digest = blake3::Hasher::new();
    for_each_run(chain, ancestor, 0, |r| {
        hash_run(&mut digest, &r);
        if r.source.is_none() && ancestor_reads_zero(a, r.offset, r.len)? {
            return Ok(());
        }
        runs += 1;
        bytes += r.len;
        let mut pos = r.offset;
        while pos < r.offset + r.len {
            let (ext, n) = a.map(pos, r.offset + r.len - pos)?;
            match ext {
                Extent::Data(_) => overwrite += n,
                _ => {
                    new_blocks.insert(pos / a.block_size());
                    new_pages += (pos + n).next_multiple_of(4096) - pos / 4096 * 4096;
                }
            }
            pos += n;
        }
        Ok(())
    })?;
    let new_blocks = new_blocks.len() as u64;
    // Before-images: overwritten bytes (whole pages), metadata pages, the
    // VHDX headers and log region; plus one Copy record per run.
    let meta = (new_blocks + runs / 64 + 16) * 8192 + (2 << 20);
    Ok(Sizing {
        runs,
        bytes,
        overwrite_bytes: overwrite,
        new_blocks,
        new_bytes: new_blocks * a.block_size(),
        new_pages,
        journal_estimate: overwrite.next_multiple_of(4096) * 2 + meta + runs * 96,
        digest: *digest.finalize().as_bytes(),
    })
}

pub struct Prepared {
    pub chain: Chain,
    pub ancestor: usize,
    pub plan: Plan,
    pub relink: Vec<Dependent>,
}

/// Everything before the first write: open and check the chain, find the
/// ancestor, siblings and children, size the work, check space and journals.
pub fn prepare(child: &Path, opts: &MergeOptions) -> Result<Prepared> {
    // First, before the chain is opened: a pending merge has changed the
    // ancestor's identity, so the chain would fail to open with a less
    // helpful message.
    preflight::refuse_pending(&[child])?;
    let chain = Chain::open(
        child,
        &ChainOptions {
            parent: opts.parent.clone(),
            ..Default::default()
        },
    )?;
    let ancestor = find_ancestor(&chain, child, opts.into.as_deref())?;
    preflight::refuse_damaged(&chain, ancestor + 1)?;
    let paths = preflight::layer_paths(&chain);
    preflight::refuse_pending(&paths[..=ancestor])?;
    let (relink, siblings) = dependents(&chain, ancestor, opts.force)?;
    let rel_paths: Vec<&Path> = relink.iter().map(|d| d.path.as_path()).collect();
    preflight::refuse_pending(&rel_paths)?;
    preflight::refuse_unwritable(chain.layers[ancestor].as_ref(), &rel_paths)?;
    let mut writes: Vec<&Path> = vec![chain.layers[ancestor].path()];
    writes.extend(&rel_paths);
    let mut folders: Vec<&Path> = vec![folder_of(chain.layers[ancestor].path())];
    if !opts.keep {
        folders.extend(chain.layers[..ancestor].iter().map(|l| folder_of(l.path())));
    }
    preflight::check_writable(&writes, &folders)?;
    let cloning = opts.share && preflight::clones_possible(&chain, ancestor);
    let plan = plan(
        &chain,
        ancestor,
        child,
        &relink,
        &siblings,
        cloning,
        opts.finish_only,
    )?;
    Ok(Prepared {
        chain,
        ancestor,
        plan,
        relink,
    })
}

/// The level of the ancestor to merge into: the direct parent, or the
/// level `into` names.
pub(super) fn find_ancestor(chain: &Chain, child: &Path, into: Option<&Path>) -> Result<usize> {
    if chain.layers.len() < 2 {
        return Err(Error::NotDifferencing {
            path: child.to_path_buf(),
            merging: true,
        });
    }
    let Some(a) = into else {
        return Ok(1);
    };
    let want = canonical(a);
    (chain.layers.iter())
        .position(|l| canonical(l.path()) == want)
        .filter(|&i| i > 0)
        .ok_or_else(|| Error::NotAnAncestor {
            child: child.to_path_buf(),
            named: a.to_path_buf(),
            chain: (chain.layers.iter())
                .map(|l| l.path().display().to_string())
                .collect::<Vec<_>>()
                .join(" -> "),
        })
}

/// The disks beside the chain that depend on it: children of the merged
/// child (re-linked) and siblings (refused unless `force`).
fn dependents(
    chain: &Chain,
    ancestor: usize,
    force: bool,
) -> Result<(Vec<Dependent>, Vec<Dependent>)> {
    let (relink, siblings): (Vec<Dependent>, Vec<Dependent>) =
        (preflight::dependents(chain, ancestor).into_iter()).partition(|d| d.parent_level == 0);
    if siblings.is_empty() || force {
        return Ok((relink, siblings));
    }
    let list = (siblings.iter())
        .map(|s| {
            format!(
                "{} (child of {})",
                s.path.display(),
                chain.layers[s.parent_level].path().display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::WriteRefused {
        path: chain.layers[ancestor].path().to_path_buf(),
        reason: format!(
            "other disks depend on the ancestor or an intermediate disk and would be corrupted by this merge: {list}. Merge or delete them first, or pass --force to proceed knowingly"
        ),
    })
}

/// Sizes the merge and checks the ancestor's folder has room for it.
fn plan(
    chain: &Chain,
    ancestor: usize,
    child: &Path,
    relink: &[Dependent],
    siblings: &[Dependent],
    cloning: bool,
    finish_only: bool,
) -> Result<Plan> {
    let a = chain.layers[ancestor].as_ref();
    let mut size = measure(chain, ancestor)?;
    if finish_only {
        size.without_data_images();
    }
    let space_needed = match cloning {
        true => size.space_needed_cloning(),
        false => size.space_needed(preflight::sparse_files(a.path())),
    };
    let free_space = preflight::check_space(a.path(), space_needed)?;
    Ok(Plan {
        child: child.to_path_buf(),
        ancestor: a.path().to_path_buf(),
        format: a.format(),
        merged: (chain.layers[..ancestor].iter())
            .map(|l| l.path().to_path_buf())
            .collect(),
        relink: relink.iter().map(|d| d.path.clone()).collect(),
        siblings: siblings.iter().map(|d| d.path.clone()).collect(),
        runs: size.runs,
        bytes: size.bytes,
        overwrite_bytes: size.overwrite_bytes,
        new_blocks: size.new_blocks,
        new_bytes: size.new_bytes,
        journal_estimate: size.journal_estimate,
        space_needed,
        free_space,
        journal: journal::path_for(a.path()),
        digest: size.digest,
        cloning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::create::{self, VhdxOptions};

    /// base.vhdx (64 MiB, 4 MiB blocks) holding 0..8 MiB, and a child
    /// (1 MiB blocks) holding `writes`.
    fn chain(dir: &Path, writes: &[(u64, usize)]) -> Chain {
        let (base, child) = (dir.join("base.vhdx"), dir.join("child.avhdx"));
        let o = VhdxOptions {
            virtual_size: 64 << 20,
            block_size: 4 << 20,
            ..Default::default()
        };
        create::create_vhdx(&base, &o).unwrap();
        let writable = ChainOptions {
            writable: true,
            ..Default::default()
        };
        let mut c = Chain::open(&base, &writable).unwrap();
        c.write(0, &vec![7; 8 << 20]).unwrap();
        c.close().unwrap();
        create::create_child(&child, &base, Some(1 << 20)).unwrap();
        let mut c = Chain::open(&child, &writable).unwrap();
        for &(at, n) in writes {
            c.write(at, &vec![9; n]).unwrap();
        }
        c.close().unwrap();
        Chain::open(&child, &ChainOptions::default()).unwrap()
    }

    /// The plan counts what the child holds: runs split at the child's
    /// block boundaries, bytes over the base's data as overwrites, and a
    /// new base block, sized by its 4 KiB pages, for the rest.
    #[test]
    fn measure_counts_runs_overwrites_and_new_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let c = chain(dir.path(), &[((1 << 20) + 512, 1 << 20), (40 << 20, 4096)]);
        let s = measure(&c, 1).unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(s.bytes, (1 << 20) + 4096);
        assert_eq!(s.overwrite_bytes, 1 << 20);
        assert_eq!((s.new_blocks, s.new_bytes, s.new_pages), (1, 4 << 20, 4096));
        assert!(s.journal_estimate >= 2 * s.overwrite_bytes);
        // Finish-only: the same merge without images of the overwrites.
        let mut f = measure(&c, 1).unwrap();
        f.without_data_images();
        assert_eq!(
            f.journal_estimate,
            s.journal_estimate - 2 * s.overwrite_bytes
        );
        let mut walked = Vec::new();
        for_each_run(&c, 1, 0, |r| {
            walked.push((r.offset, r.len));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            walked,
            [
                ((1 << 20) + 512, (1 << 20) - 512),
                (2 << 20, 512),
                (40 << 20, 4096)
            ]
        );
        // From a run boundary the walk yields the same runs from there.
        let mut from = Vec::new();
        for_each_run(&c, 1, 2 << 20, |r| {
            from.push((r.offset, r.len));
            Ok(())
        })
        .unwrap();
        assert_eq!(from, walked[1..]);
    }

    #[test]
    fn the_ancestor_is_the_parent_or_a_named_level() {
        let dir = tempfile::tempdir().unwrap();
        let c = chain(dir.path(), &[(0, 4096)]);
        let child = dir.path().join("child.avhdx");
        assert_eq!(find_ancestor(&c, &child, None).unwrap(), 1);
        let base = dir.path().join("base.vhdx");
        assert_eq!(find_ancestor(&c, &child, Some(&base)).unwrap(), 1);
        let e = find_ancestor(&c, &child, Some(&child)).unwrap_err();
        assert!(matches!(e, Error::NotAnAncestor { .. }), "{e}");
        let single = Chain::open(&base, &ChainOptions::default()).unwrap();
        let e = find_ancestor(&single, &base, None).unwrap_err();
        assert!(matches!(e, Error::NotDifferencing { .. }), "{e}");
    }
}
