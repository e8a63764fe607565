//! A differencing chain: the top file and its ancestors, resolved from the
//! locators and checked by identity, read as the guest sees it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::paths::canonical;

use serde::Serialize;

use super::{Extent, Layer, LayerInfo, open_layer};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct ChainOptions {
    /// Overrides the top file's parent (`--parent`).
    pub parent: Option<PathBuf>,
    /// Open the top file for writing (ancestors stay read-only).
    pub writable: bool,
    /// Open this many levels writable from the top (the top counts); 0 = by `writable`.
    pub writable_levels: usize,
}

/// How a parent was found, for `info`.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub child: PathBuf,
    pub parent: PathBuf,
    pub found_by: String,
    pub identity: String,
}

pub struct Chain {
    /// Top first, base last.
    pub layers: Vec<Box<dyn Layer>>,
    pub links: Vec<Link>,
}

/// Where a chain range lives: (level, extent, length).
pub type Mapping = (usize, Extent, u64);

impl Chain {
    pub fn open(path: &Path, opts: &ChainOptions) -> Result<Chain> {
        let levels = if opts.writable_levels > 0 {
            opts.writable_levels
        } else {
            usize::from(opts.writable)
        };
        let top = open_layer(path, levels > 0)?;
        let mut seen = HashSet::new();
        seen.insert(canonical(path));
        let mut layers = vec![top];
        let mut links = Vec::new();
        loop {
            let child = layers.last().expect("non-empty");
            let Some(pref) = child.parent_ref() else {
                break;
            };
            let child_path = child.path().to_path_buf();
            let (ppath, how) = match (layers.len(), &opts.parent) {
                (1, Some(p)) => (p.clone(), "--parent".to_string()),
                _ => locate_parent(&child_path, &pref.candidates)?,
            };
            let key = canonical(&ppath);
            if !seen.insert(key.clone()) {
                return Err(Error::ChainLoop {
                    child: child_path,
                    repeated: ppath,
                });
            }
            let parent = open_layer(&ppath, layers.len() < levels)?;
            check_link(child.as_ref(), parent.as_ref(), &pref.expected)?;
            links.push(Link {
                child: child_path,
                parent: ppath,
                found_by: how,
                identity: pref.expected.describe(),
            });
            layers.push(parent);
        }
        Ok(Chain { layers, links })
    }

    /// A chain of a single, already opened layer (raw files, tests).
    pub fn single(layer: Box<dyn Layer>) -> Chain {
        Chain {
            layers: vec![layer],
            links: vec![],
        }
    }

    pub fn top(&self) -> &dyn Layer {
        self.layers[0].as_ref()
    }
    pub fn top_mut(&mut self) -> &mut dyn Layer {
        self.layers[0].as_mut()
    }
    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// Resolves the run at `offset` from `level` down: the level that holds
    /// it and where, or `Extent::Zero`.
    pub fn resolve(&self, level: usize, offset: u64, len: u64) -> Result<Mapping> {
        let mut len = len;
        for l in level..self.layers.len() {
            let (ext, n) = self.layers[l].map(offset, len)?;
            len = n;
            match ext {
                Extent::Parent => continue,
                e => return Ok((l, e, n)),
            }
        }
        Ok((self.layers.len(), Extent::Zero, len))
    }

    /// Reads guest bytes through the chain.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_from(0, offset, buf)
    }

    /// Reads as the disk at `level` sees it (itself and its ancestors).
    pub fn read_from(&self, level: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.virtual_size() {
            return Err(Error::OutOfRange {
                path: self.top().path().to_path_buf(),
                op: "read",
                offset,
                len: buf.len() as u64,
                size: self.virtual_size(),
            });
        }
        let mut pos = offset;
        while pos < end {
            let (l, ext, n) = self.resolve(level, pos, end - pos)?;
            let at = (pos - offset) as usize;
            let dst = &mut buf[at..at + n as usize];
            match ext {
                Extent::Data(fo) => self.layers[l].read_data(fo, dst)?,
                _ => dst.fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes guest bytes into the top file. Unaligned edges are completed
    /// from the current chain contents.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let ls = self.top().logical_sector_size();
        let start = offset / ls * ls;
        let end = (offset + data.len() as u64).next_multiple_of(ls);
        if end > self.virtual_size() {
            return Err(Error::OutOfRange {
                path: self.top().path().to_path_buf(),
                op: "write",
                offset,
                len: data.len() as u64,
                size: self.virtual_size(),
            });
        }
        if start == offset && end == offset + data.len() as u64 {
            return self.layers[0].write(offset, data);
        }
        let mut buf = vec![0u8; (end - start) as usize];
        self.read(start, &mut buf[..ls as usize])?;
        let tail = (end - ls - start) as usize;
        self.read(end - ls, &mut buf[tail..])?;
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.layers[0].write(start, &buf)
    }

    pub fn commit(&mut self) -> Result<()> {
        self.layers[0].commit()
    }

    pub fn close(&mut self) -> Result<()> {
        for l in &mut self.layers {
            l.close()?;
        }
        Ok(())
    }

    pub fn infos(&self) -> Result<Vec<LayerInfo>> {
        self.layers.iter().map(|l| l.info()).collect()
    }
}

/// The first locator candidate that names a regular file, with how it was
/// derived; `ParentMissing` listing every candidate when none does.
pub fn locate_parent(child: &Path, candidates: &[(String, PathBuf)]) -> Result<(PathBuf, String)> {
    for (how, p) in candidates {
        // Only regular files: a locator must never lead into a device or a folder.
        if std::fs::metadata(p).is_ok_and(|m| m.is_file()) {
            return Ok((p.clone(), how.clone()));
        }
    }
    Err(Error::ParentMissing {
        child: child.to_path_buf(),
        tried: candidates.iter().map(|(_, p)| p.clone()).collect(),
    })
}

/// The identity proof of a link: same format, the identity the child
/// expects, same virtual size and logical sector size.
pub fn check_link(child: &dyn Layer, parent: &dyn Layer, expected: &super::Identity) -> Result<()> {
    let mismatch = |detail: String| Error::ChainMismatch {
        child: child.path().to_path_buf(),
        parent: parent.path().to_path_buf(),
        detail,
    };
    if child.format() != parent.format() {
        return Err(mismatch(format!(
            "the child is {:?} but the parent is {:?}; a chain cannot mix VHD and VHDX",
            child.format(),
            parent.format()
        )));
    }
    if !expected.accepts(&parent.identity()) {
        return Err(Error::ParentMismatch {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            expected: expected.describe(),
            found: parent.identity().describe(),
        });
    }
    if child.virtual_size() != parent.virtual_size() {
        return Err(mismatch(format!(
            "virtual sizes differ (child {} bytes, parent {} bytes)",
            child.virtual_size(),
            parent.virtual_size()
        )));
    }
    if child.logical_sector_size() != parent.logical_sector_size() {
        return Err(mismatch(format!(
            "logical sector sizes differ (child {}, parent {})",
            child.logical_sector_size(),
            parent.logical_sector_size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first candidate that is a regular file wins; folders and
    /// missing paths are passed over, and when none is left every path
    /// tried is named.
    #[test]
    fn locators_are_tried_in_order_and_only_files_count() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("folder.vhdx")).unwrap();
        std::fs::write(d.join("base.vhdx"), b"x").unwrap();
        let c = |how: &str, name: &str| (how.to_string(), d.join(name));
        let cands = [
            c("relative_path", "missing.vhdx"),
            c(
                "absolute_win32_path (file name in the child's folder)",
                "folder.vhdx",
            ),
            c("volume_path (file name in the child's folder)", "base.vhdx"),
        ];
        let (p, how) = locate_parent(&d.join("child.avhdx"), &cands).unwrap();
        assert_eq!(p, d.join("base.vhdx"));
        assert!(how.starts_with("volume_path"));
        match locate_parent(&d.join("child.avhdx"), &cands[..2]) {
            Err(Error::ParentMissing { tried, .. }) => {
                assert_eq!(tried, [d.join("missing.vhdx"), d.join("folder.vhdx")])
            }
            other => panic!("{other:?}"),
        }
    }
}
