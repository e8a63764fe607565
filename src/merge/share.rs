//! Runs put into the ancestor without reading them: cloned where the
//! file system shares blocks between the merged files and the ancestor
//! (XFS, btrfs), copied otherwise; and their proof after the commit.
//! docs/reflink.md has the design.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::disk::{Chain, Extent};
use crate::error::{Error, Result};
use crate::io::SharedFile;
use crate::io::share::{same_blocks, trial_clone};

/// A run put from a merged file (a `Share` record): guest offset and
/// length, the merged level and the file offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SharedRun {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) level: usize,
    pub(crate) source: u64,
}

/// The merged files' descriptors, by level, and whether their runs are
/// shared. A level is shared only when its file lies on the ancestor's
/// file system; the first clone the file system refuses turns sharing off
/// for that file (it is copied from then on, as the reader reads it).
pub(crate) struct Sharing {
    files: Vec<Option<Arc<SharedFile>>>,
}

/// Bytes cloned (blocks shared with a merged file) and bytes copied.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ShareCounts {
    pub cloned_bytes: u64,
    pub copied_bytes: u64,
}

impl Sharing {
    /// `enabled`: the merge may clone at all (`--copy` turns it off).
    pub(crate) fn new(merged: &Chain, ancestor: &Path, enabled: bool) -> Result<Sharing> {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| Error::io(ancestor, "reading the metadata", e))?;
        let files = merged
            .layers
            .iter()
            .map(|l| -> Result<Option<Arc<SharedFile>>> {
                let Some(fd) = l.file() else { return Ok(None) };
                let io = |e| Error::io(l.path(), "opening for sharing", e);
                let f = SharedFile::new(l.path(), fd, meta.blksize()).map_err(io)?;
                let dev = rustix::fs::fstat(f.fd().as_fd())
                    .map_err(|e| io(e.into()))?
                    .st_dev;
                // A trial clone first: where the file system cannot share,
                // the reader reads from the start, as it always did.
                let dir = crate::paths::folder_of(ancestor);
                if !enabled || dev != meta.dev() || !trial_clone(dir, f.fd(), meta.blksize()) {
                    f.disable();
                }
                Ok(Some(Arc::new(f)))
            })
            .collect::<Result<_>>()?;
        Ok(Sharing { files })
    }

    /// Whether any level shares its blocks (then the before-images can be
    /// cloned too: the ancestor's file system reflinks).
    pub(crate) fn any_active(&self) -> bool {
        self.files.iter().flatten().any(|f| f.enabled())
    }

    /// The file to share a run of `level` from, while sharing is on for it.
    pub(crate) fn active(&self, level: usize) -> Option<&Arc<SharedFile>> {
        self.file(level).filter(|f| f.enabled())
    }

    fn file(&self, level: usize) -> Option<&Arc<SharedFile>> {
        self.files.get(level).and_then(Option::as_ref)
    }

    pub(crate) fn counts(&self) -> ShareCounts {
        let mut c = ShareCounts::default();
        for f in self.files.iter().flatten() {
            let (shared, copied) = f.counts();
            c.cloned_bytes += shared;
            c.copied_bytes += copied;
        }
        c
    }

    /// Proves every shared run after the commit: the ancestor's view,
    /// resolved afresh through its BAT and bitmaps, must put each piece of
    /// the run on the very blocks the source range has (FIEMAP), or, where
    /// that cannot be shown (a copied head or tail, a file system without
    /// FIEMAP), read the same bytes as the source.
    pub(crate) fn verify(&self, after: &Chain, a_path: &Path, runs: &[SharedRun]) -> Result<()> {
        for r in runs {
            let from = self.file(r.level).ok_or_else(|| {
                Error::corrupt(
                    a_path,
                    "merge source",
                    r.offset,
                    format!("no open merged file for level {}", r.level),
                )
            })?;
            let mut pos = r.offset;
            while pos < r.offset + r.len {
                let (level, ext, n) = after.resolve(0, pos, r.offset + r.len - pos)?;
                let src = r.source + (pos - r.offset);
                let proven = match (level, ext, after.layers[0].file()) {
                    (0, Extent::Data(fo), Some(fd)) => same_blocks(fd, fo, from.fd(), src, n),
                    _ => false,
                };
                if !proven {
                    compare_bytes(after, a_path, from, pos, src, n)?;
                }
                pos += n;
            }
        }
        Ok(())
    }
}

/// Reads `len` guest bytes at `offset` through `after` and the same from
/// `from` at `src`, a MiB at a time, and requires them equal.
fn compare_bytes(
    after: &Chain,
    a_path: &Path,
    from: &SharedFile,
    offset: u64,
    src: u64,
    len: u64,
) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let mut a = vec![0u8; len.min(PIECE) as usize];
    let mut b = a.clone();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PIECE) as usize;
        after.read(offset + done, &mut a[..n])?;
        from.read_at(&mut b[..n], src + done)
            .map_err(|e| Error::io(&from.path, "reading merged data", e))?;
        if a[..n] != b[..n] {
            return Err(Error::corrupt(
                a_path,
                "merged data",
                offset + done,
                format!(
                    "the bytes put here from {} do not read back; the merge is committed but unverified: run `vhdmerge recover`",
                    from.path.display()
                ),
            ));
        }
        done += n as u64;
    }
    Ok(())
}
