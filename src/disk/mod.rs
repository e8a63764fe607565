//! The guest's view of a disk: one trait over both formats (and raw files),
//! parent resolution, and reads and writes through a differencing chain.

pub mod chain;
pub mod create;
pub mod raw;
pub mod vhd;
pub mod vhdx;

use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};

pub use chain::{Chain, ChainOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Vhdx,
    Vhd,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Fixed,
    Dynamic,
    Differencing,
}

/// Where a run of a layer's virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// In this file, starting at this file offset.
    Data(u64),
    /// Reads as zeros without looking further.
    Zero,
    /// Not in this layer: ask the parent (zeros when there is none).
    Parent,
}

/// What a child says about its parent: where to look and what identity the
/// parent must have.
#[derive(Debug, Clone, Serialize)]
pub struct ParentRef {
    /// (how the candidate was derived, path) in the order to try them.
    pub candidates: Vec<(String, PathBuf)>,
    pub expected: Identity,
}

/// The identity a child links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// VHDX: the parent's DataWriteGuid must equal one of these.
    VhdxLinkage {
        linkage: Uuid,
        linkage2: Option<Uuid>,
    },
    /// VHD: the parent's footer unique id.
    VhdUniqueId(Uuid),
    None,
}

impl Identity {
    pub fn accepts(&self, parent: &Identity) -> bool {
        match (self, parent) {
            (
                Identity::VhdxLinkage { linkage, linkage2 },
                Identity::VhdxLinkage { linkage: p, .. },
            ) => linkage == p || linkage2.as_ref() == Some(p),
            (Identity::VhdUniqueId(a), Identity::VhdUniqueId(b)) => a == b,
            _ => false,
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Identity::VhdxLinkage { linkage, linkage2 } => match linkage2 {
                Some(l2) => format!("DataWriteGuid {{{linkage}}} (or parent_linkage2 {{{l2}}})"),
                None => format!("DataWriteGuid {{{linkage}}}"),
            },
            Identity::VhdUniqueId(u) => format!("unique id {{{u}}}"),
            Identity::None => "no identity".into(),
        }
    }
}

/// A problem that allows reading but forbids writing: a damaged copy of a
/// structure that has a good one, or a checksum that does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// The structure, as `check` names it ("header", "region table",
    /// "footer", "dynamic header").
    pub structure: &'static str,
    pub offset: u64,
    /// The whole sentence users see.
    pub detail: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl Warning {
    pub fn new(structure: &'static str, offset: u64, detail: String) -> Warning {
        Warning {
            structure,
            offset,
            detail,
        }
    }
}

/// A summary of one file, for `info`.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub path: PathBuf,
    pub format: Format,
    pub kind: Kind,
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector_size: u64,
    pub physical_sector_size: u64,
    pub file_size: u64,
    pub allocated_blocks: u64,
    pub allocated_bytes: u64,
    /// VHDX: the four GUIDs and log state; VHD: unique id, creator, geometry.
    pub details: serde_json::Value,
    pub warnings: Vec<String>,
}

/// One file of a chain.
pub trait Layer: Send + Sync {
    fn path(&self) -> &Path;
    fn format(&self) -> Format;
    fn kind(&self) -> Kind;
    fn virtual_size(&self) -> u64;
    /// The allocation unit: runs returned by `map` never cross it.
    fn block_size(&self) -> u64;
    fn logical_sector_size(&self) -> u64;
    /// The run at `offset` (at most `len` bytes, within one block).
    fn map(&self, offset: u64, len: u64) -> Result<(Extent, u64)>;
    /// Reads file bytes at a file offset returned by `map`.
    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes guest data, aligned to the logical sector size. Allocates
    /// blocks and maintains bitmaps; `commit` makes metadata durable.
    fn put(&mut self, offset: u64, payload: Payload<'_>) -> Result<()>;
    /// `put` of bytes in memory.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.put(offset, Payload::Bytes(data))
    }
    /// The open file the layer reads its data from, when it reads it
    /// straight from one (a merge may then share its blocks).
    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Flushes data, then makes pending metadata durable (through the VHDX
    /// log for VHDX files).
    fn commit(&mut self) -> Result<()>;
    /// Ends a write session (clears a live VHDX LogGuid). Idempotent.
    fn close(&mut self) -> Result<()>;
    fn parent_ref(&self) -> Option<ParentRef>;
    /// The identity children link to.
    fn identity(&self) -> Identity;
    fn info(&self) -> Result<LayerInfo>;
    /// Problems that allow reading but forbid writing (bad checksums).
    fn warnings(&self) -> &[Warning];
    /// Refuses, with its reason, what a writable open of this file would
    /// refuse: a merge asks before its first write. Default: nothing.
    fn check_open_for_writing(&self) -> Result<()> {
        Ok(())
    }
    /// Bytes of metadata changed and not yet committed (VHDX BAT and
    /// bitmap pages, which a commit writes to the log and then in place).
    /// Writers commit early when this grows, to bound memory.
    fn pending_metadata(&self) -> u64 {
        0
    }
    /// File ranges (offset, length) the layer no longer refers to: blocks
    /// it replaced by writing them out of place. They hold the data a
    /// rollback restores, so they are free only once the merge commits.
    fn released(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Whether the file bytes at `file_offset` (where `map` put data) are
    /// stored, or a hole of the file that reads as zeros, and for how many
    /// of `len` bytes (at least one). Readers skip the holes a block keeps
    /// for sectors never written. Default: all stored.
    fn stored(&self, _file_offset: u64, len: u64) -> Result<(bool, u64)> {
        Ok((true, len))
    }
    /// VHDX log entries that a read-only open replayed in memory only: the
    /// file on disk still needs them (it was not closed cleanly).
    fn unreplayed_log_entries(&self) -> usize {
        0
    }
}

/// What a file is by its content, whatever its name: VHDX by the file
/// signature, VHD by the `conectix` cookie of its footer (at the end, the
/// 511-byte footer of old files, or the copy at offset 0). `None` for
/// anything else. Reads at most three small pieces of the file.
pub fn sniff(path: &Path) -> Result<Option<Format>> {
    sniff_storage(path, &crate::io::FileStorage::open(path, false)?)
}

fn sniff_storage(path: &Path, file: &dyn crate::io::Storage) -> Result<Option<Format>> {
    let len = file
        .len()
        .map_err(|e| Error::io(path, "reading the size", e))?;
    let has = |offset: u64, magic: &[u8]| -> Result<bool> {
        if offset + magic.len() as u64 > len {
            return Ok(false);
        }
        let mut buf = vec![0u8; magic.len()];
        file.read_at(&mut buf, offset)
            .map_err(|e| Error::io(path, "reading the signature", e))?;
        Ok(buf == magic)
    };
    if has(0, crate::format::vhdx::FILE_SIGNATURE)? {
        return Ok(Some(Format::Vhdx));
    }
    let cookie = crate::format::vhd::COOKIE;
    let tails = [len.checked_sub(512), len.checked_sub(511), Some(0)];
    for at in tails.into_iter().flatten() {
        if len >= 512 && has(at, cookie)? {
            return Ok(Some(Format::Vhd));
        }
    }
    Ok(None)
}

/// The identity a file offers its children, read from its headers alone
/// (VHDX current header, VHD footer) without validating the rest: recovery
/// must recognise a file even while it is half rolled back.
pub fn identity_of(path: &Path) -> Result<Identity> {
    let src = crate::io::Src::new(path, Box::new(crate::io::FileStorage::open(path, false)?));
    if sniff(path)? == Some(Format::Vhdx) {
        let (h, _, _) = vhdx::read_headers(&src)?;
        return Ok(Identity::VhdxLinkage {
            linkage: h.data_write_guid,
            linkage2: None,
        });
    }
    let len = src.len()?;
    for off in [len.saturating_sub(512), 0] {
        let b = src.read_vec(512, off, "the footer")?;
        if let Ok(f) = crate::format::vhd::Footer::decode(&b) {
            return Ok(Identity::VhdUniqueId(f.unique_id));
        }
    }
    Err(Error::corrupt(
        path,
        "footer",
        len.saturating_sub(512),
        "no VHD footer",
    ))
}

/// Opens one file by its content through a given storage.
pub fn open_layer_with(
    path: &Path,
    io: Box<dyn crate::io::Storage>,
    writable: bool,
) -> Result<Box<dyn Layer>> {
    Ok(match sniff_storage(path, io.as_ref())? {
        Some(Format::Vhdx) => Box::new(vhdx::VhdxDisk::open_with(path, io, writable)?),
        _ => Box::new(vhd::VhdDisk::open_with(path, io, writable)?),
    })
}

/// Opens one file by its content (not its name): VHDX by its signature,
/// VHD by its footer, anything else is refused (raw only on request).
pub fn open_layer(path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
    let io = crate::io::FileStorage::open(path, writable)?;
    open_layer_with(path, Box::new(io), writable)
}

/// The folder relative locators start from: the child's own ("" for a
/// bare file name, so that candidates keep the spelling they were given).
fn locator_folder(child: &Path) -> PathBuf {
    child.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Calls `f` with each piece of `data` (written at guest `offset`) that
/// lies in one block of `block_size` bytes, in order.
fn by_block(
    offset: u64,
    data: Payload<'_>,
    block_size: u64,
    mut f: impl FnMut(u64, Payload<'_>) -> Result<()>,
) -> Result<()> {
    let mut done = 0;
    while done < data.len() {
        let off = offset + done;
        let n = (block_size - off % block_size).min(data.len() - done);
        f(off, data.slice(done, n))?;
        done += n;
    }
    Ok(())
}

/// The bytes of a write: in memory, or `len` bytes of a merged file at a
/// file offset, which the file system may share instead of copying.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    Bytes(&'a [u8]),
    File {
        from: &'a std::sync::Arc<crate::io::SharedFile>,
        offset: u64,
        len: u64,
    },
}

impl Payload<'_> {
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    /// `n` bytes from `start` on.
    pub fn slice(&self, start: u64, n: u64) -> Self {
        match *self {
            Payload::Bytes(b) => Payload::Bytes(&b[start as usize..(start + n) as usize]),
            Payload::File { from, offset, .. } => Payload::File {
                from,
                offset: offset + start,
                len: n,
            },
        }
    }
}

/// Opens `path`'s chain, or the file alone as a raw disk when its content
/// is neither VHD nor VHDX (`hash` and `verify` accept raw exports).
pub fn open_any(path: &Path, opts: &ChainOptions) -> Result<Chain> {
    match sniff(path)? {
        None => Ok(Chain::single(Box::new(raw::RawDisk::open(path)?))),
        Some(_) => Chain::open(path, opts),
    }
}

/// Refuses a write to a layer opened read-only or found damaged (a
/// checksum that did not match, say): writing would spread the damage.
fn refuse_write(path: &Path, writable: bool, warnings: &[Warning]) -> Result<()> {
    if !writable {
        return Err(Error::WriteRefused {
            path: path.to_path_buf(),
            reason: "opened read-only".into(),
        });
    }
    if let Some(w) = warnings.first() {
        return Err(Error::WriteRefused {
            path: path.to_path_buf(),
            reason: format!("the file is damaged ({w}); repair or restore it first"),
        });
    }
    Ok(())
}
