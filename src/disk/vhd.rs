//! A VHD file as a chain layer: fixed, dynamic and differencing. New blocks
//! go into space reserved at the end a batch at a time, and their BAT
//! entries and bitmaps are written at the commit, after their data: one
//! footer move per 64 blocks and a few flushes per commit instead of per
//! block, and every crash point still leaves a valid file once the merge's
//! journal is recovered.
//!
//! A merge also writes a block it covers whole out of place: into a new
//! block, with the BAT entry switched at the commit. The old block's bytes
//! are never overwritten, so they need no before-images (the journal
//! images only the BAT sector), and once the merge has committed they are
//! free; `released` lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

use super::{Extent, Format, Identity, Kind, Layer, LayerInfo, ParentRef, Payload, Warning};
use crate::error::{Error, Result};
use crate::format::vhd::{self as fv, DynHeader, Footer, SECTOR};
use crate::io::{FileStorage, Src, Storage};

mod write;

pub struct VhdDisk {
    src: Src,
    writable: bool,
    pub footer: Footer,
    /// Where the trailing footer sits (EOF−512, or EOF−511 for old files).
    footer_offset: u64,
    pub header: Option<DynHeader>,
    header_offset: u64,
    bat: Vec<u32>,
    size: u64,
    warnings: Vec<Warning>,
    /// The last block bitmap read, and how far ahead bitmaps are announced.
    bitmap_cache: Mutex<BitmapCache>,
    /// Where the next new block goes, while space before the footer is
    /// reserved for new blocks (between here and `footer_offset`).
    free_at: Option<u64>,
    /// Bitmaps and BAT entries changed since the last commit, which
    /// writes them after the data they show is durable.
    dirty_bitmaps: BTreeMap<u64, Vec<u8>>,
    dirty_bat: BTreeSet<u64>,
    /// Whole-block writes over allocated blocks go to new blocks.
    out_of_place: bool,
    /// File ranges of blocks replaced out of place: (offset, length).
    released: Vec<(u64, u64)>,
}

/// Bitmaps announced at a time (`io::will_need`), in guest order, when a
/// walk moves forward past the ones announced before: a walk over a whole
/// disk (a merge's plan, a hash) reads one 512-byte bitmap per block, 2 MiB
/// apart in the file, and read one at a time each waits for the disk.
const BITMAP_READ_AHEAD: u64 = 256;

#[derive(Default)]
struct BitmapCache {
    /// One block's bitmap: (block, bytes).
    last: Option<(u64, Vec<u8>)>,
    /// Where the window of announced bitmaps ends.
    announced_to: u64,
}

impl VhdDisk {
    pub fn open(path: &Path, writable: bool) -> Result<VhdDisk> {
        Self::open_with(path, Box::new(FileStorage::open(path, writable)?), writable)
    }

    /// Opens through a given storage (the merge passes a journaled one).
    pub fn open_with(path: &Path, io: Box<dyn Storage>, writable: bool) -> Result<VhdDisk> {
        let src = Src::new(path, io);
        let len = src.len()?;
        let mut warnings = Vec::new();
        let (footer, footer_offset) = read_footer(&src, len, &mut warnings)?;
        let size = footer.disk_size();
        let mut disk = VhdDisk {
            src,
            writable,
            footer_offset,
            header: None,
            header_offset: 0,
            bat: Vec::new(),
            size,
            warnings,
            bitmap_cache: Mutex::new(BitmapCache::default()),
            free_at: None,
            dirty_bitmaps: BTreeMap::new(),
            dirty_bat: BTreeSet::new(),
            out_of_place: false,
            released: Vec::new(),
            footer,
        };
        match disk.footer.disk_type {
            fv::TYPE_FIXED => {
                if size > footer_offset {
                    return Err(Error::corrupt(
                        path,
                        "footer",
                        footer_offset,
                        format!(
                            "fixed disk of {size} bytes but only {footer_offset} bytes of data precede the footer; the file was truncated"
                        ),
                    ));
                }
            }
            fv::TYPE_DYNAMIC | fv::TYPE_DIFFERENCING => disk.read_dynamic()?,
            t => {
                return Err(Error::unsupported(
                    path,
                    "footer",
                    format!("disk type {t} (only 2 fixed, 3 dynamic, 4 differencing exist)"),
                ));
            }
        }
        if size % SECTOR != 0 || size / SECTOR > fv::MAX_SECTORS {
            return Err(Error::corrupt(
                path,
                "footer",
                footer_offset,
                format!("disk size {size} is not a multiple of 512 up to 2040 GiB"),
            ));
        }
        Ok(disk)
    }

    /// The dynamic header, its BAT, and where the blocks lie.
    fn read_dynamic(&mut self) -> Result<()> {
        let off = self.footer.data_offset;
        let h = self.read_dyn_header(off)?;
        let bs = u64::from(h.block_size);
        let needed = self.size.div_ceil(bs);
        let raw = self
            .src
            .read_vec((needed * 4) as usize, h.table_offset, "the BAT")?;
        self.bat = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4")))
            .collect();
        self.check_blocks(&h, off)?;
        self.header_offset = off;
        self.header = Some(h);
        Ok(())
    }

    /// Reads the dynamic header at `off` and checks that its block size and
    /// BAT fit the disk and the file.
    fn read_dyn_header(&mut self, off: u64) -> Result<DynHeader> {
        let path = self.src.path.clone();
        if off < 512 || off.checked_add(1024).is_none_or(|e| e > self.footer_offset) {
            return Err(Error::corrupt(
                &path,
                "footer",
                self.footer_offset,
                format!("dynamic header offset {off:#x} lies outside the file"),
            ));
        }
        let raw = self
            .src
            .read_vec(fv::HEADER_SIZE, off, "the dynamic header")?;
        let h =
            DynHeader::decode(&raw).map_err(|e| Error::corrupt(&path, "dynamic header", off, e))?;
        if !DynHeader::checksum_ok(&raw) {
            self.warnings.push(Warning::new(
                "dynamic header",
                off,
                format!("dynamic header at {off:#x} has a wrong checksum"),
            ));
        }
        let bs = u64::from(h.block_size);
        if bs < SECTOR || !bs.is_power_of_two() || bs > 256 << 20 {
            return Err(Error::corrupt(
                &path,
                "dynamic header",
                off + 32,
                format!("block size {bs} is not a power of two between 512 bytes and 256 MiB"),
            ));
        }
        let entries = u64::from(h.max_table_entries);
        if entries * bs < self.size {
            return Err(Error::corrupt(
                &path,
                "dynamic header",
                off + 28,
                format!(
                    "{entries} BAT entries of {bs} bytes cannot hold a {} byte disk",
                    self.size
                ),
            ));
        }
        let needed = self.size.div_ceil(bs);
        if h.table_offset
            .checked_add(needed * 4)
            .is_none_or(|e| e > self.footer_offset)
        {
            return Err(Error::corrupt(
                &path,
                "dynamic header",
                off + 16,
                format!(
                    "BAT at {:#x} with {needed} entries lies outside the file",
                    h.table_offset
                ),
            ));
        }
        Ok(h)
    }

    /// Every allocated block lies in the data area (after the dynamic
    /// header at `off`, before the footer), apart from the others and
    /// from the BAT.
    fn check_blocks(&self, h: &DynHeader, off: u64) -> Result<()> {
        let bs = u64::from(h.block_size);
        let block_bytes = h.bitmap_bytes() + bs;
        let bad = |entry: usize, detail: String| {
            Err(Error::corrupt(
                &self.src.path,
                "BAT entry",
                h.table_offset + 4 * entry as u64,
                detail,
            ))
        };
        // The last block may be cut where the disk ends.
        let used = |i: usize| h.bitmap_bytes() + bs.min(self.size - i as u64 * bs);
        let mut spans: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in self.bat.iter().enumerate() {
            if e == fv::UNALLOCATED {
                continue;
            }
            let at = fv::sectors_to_bytes(e);
            if at < off + 1024 || at + used(i) > self.footer_offset {
                return bad(
                    i,
                    format!(
                        "block {i} at {at:#x} (+{block_bytes:#x}) lies outside the data area; the file was truncated or the BAT is damaged"
                    ),
                );
            }
            spans.push((at, i));
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[0].0 + used(w[0].1) > w[1].0 {
                return bad(
                    w[1].1,
                    format!(
                        "block {} at {:#x} overlaps block {} at {:#x}",
                        w[1].1, w[1].0, w[0].1, w[0].0
                    ),
                );
            }
        }
        let bat_end = h.table_offset + self.bat.len() as u64 * 4;
        if let Some(&(first, i)) = spans.first()
            && first < bat_end
            && first + block_bytes > h.table_offset
        {
            return bad(i, format!("block {i} at {first:#x} overlaps the BAT"));
        }
        Ok(())
    }

    fn dyn_header(&self) -> &DynHeader {
        self.header.as_ref().expect("dynamic or differencing")
    }

    fn bitmap(&self, block: u64) -> Result<Vec<u8>> {
        if let Some(b) = self.dirty_bitmaps.get(&block) {
            return Ok(b.clone());
        }
        let mut cache = self.bitmap_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((b, bytes)) = cache.last.as_ref()
            && *b == block
        {
            return Ok(bytes.clone());
        }
        // Outside the window announced last (past it, or a walk that
        // started over): announce the next one.
        if block >= cache.announced_to || block + BITMAP_READ_AHEAD < cache.announced_to {
            cache.announced_to = self.announce_bitmaps(block + 1);
        }
        let at = fv::sectors_to_bytes(self.bat[block as usize]);
        let v = self.src.read_vec(
            self.dyn_header().bitmap_bytes() as usize,
            at,
            "a block bitmap",
        )?;
        cache.last = Some((block, v.clone()));
        Ok(v)
    }

    /// Announces the bitmaps of the allocated blocks among the next
    /// `BITMAP_READ_AHEAD` from `from` on; returns where that window ends.
    fn announce_bitmaps(&self, from: u64) -> u64 {
        let end = (from + BITMAP_READ_AHEAD).min(self.bat.len() as u64);
        if let Some(fd) = self.src.io.fd() {
            let bytes = self.dyn_header().bitmap_bytes();
            for block in from..end {
                match self.bat[block as usize] {
                    fv::UNALLOCATED => {}
                    e => crate::io::will_need(fd, fv::sectors_to_bytes(e), bytes),
                }
            }
        }
        end
    }

    fn is_differencing(&self) -> bool {
        self.footer.disk_type == fv::TYPE_DIFFERENCING
    }

    fn refuse_if_damaged(&self) -> Result<()> {
        super::refuse_write(&self.src.path, self.writable, &self.warnings)
    }
}

fn read_footer(src: &Src, len: u64, warnings: &mut Vec<Warning>) -> Result<(Footer, u64)> {
    let path = &src.path;
    if len < 512 {
        return Err(Error::corrupt(
            path,
            "footer",
            0,
            format!("file is {len} bytes, too small for a VHD footer"),
        ));
    }
    let tail = src.read_vec(512, len - 512, "the footer")?;
    let mut found = None;
    if &tail[..8] == fv::COOKIE {
        found = Some((tail, len - 512));
    } else if len >= 511 + 512 {
        // Files from before Virtual PC 2004 have a 511-byte footer.
        let mut short = src.read_vec(511, len - 511, "the footer")?;
        if &short[..8] == fv::COOKIE {
            short.push(0);
            found = Some((short, len - 511));
        }
    }
    let (raw, at) = match found {
        Some(f) => f,
        None => {
            let head = src.read_vec(512, 0, "the footer copy")?;
            if &head[..8] != fv::COOKIE {
                return Err(Error::NotADiskImage {
                    path: path.to_path_buf(),
                });
            }
            let f = Footer::decode(&head).map_err(|e| Error::corrupt(path, "footer", 0, e))?;
            if f.disk_type == fv::TYPE_FIXED {
                return Err(Error::corrupt(
                    path,
                    "footer",
                    len - 512,
                    "the footer at the end is missing and a fixed disk has no copy",
                ));
            }
            warnings.push(Warning::new(
                "footer",
                len - 512,
                format!(
                    "the footer at {:#x} is missing; the copy at offset 0 is used",
                    len - 512
                ),
            ));
            // The data area ends where the footer should be.
            return Ok((f, len - 512));
        }
    };
    let f = Footer::decode(&raw).map_err(|e| Error::corrupt(path, "footer", at, e))?;
    if !Footer::checksum_ok(&raw) {
        warnings.push(Warning::new(
            "footer",
            at,
            format!(
                "footer at {at:#x} has a wrong checksum (stored {:#010x}, computed {:#010x})",
                f.checksum,
                fv::checksum(&raw, 64)
            ),
        ));
    }
    Ok((f, at))
}

impl Layer for VhdDisk {
    fn path(&self) -> &Path {
        &self.src.path
    }
    fn format(&self) -> Format {
        Format::Vhd
    }
    fn kind(&self) -> Kind {
        match self.footer.disk_type {
            fv::TYPE_FIXED => Kind::Fixed,
            fv::TYPE_DIFFERENCING => Kind::Differencing,
            _ => Kind::Dynamic,
        }
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u64 {
        match &self.header {
            Some(h) => u64::from(h.block_size),
            None => 2 << 20,
        }
    }
    fn logical_sector_size(&self) -> u64 {
        SECTOR
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        let bs = self.block_size();
        let in_block = offset % bs;
        let n = len.min(bs - in_block).min(self.size.saturating_sub(offset));
        let Some(h) = &self.header else {
            return Ok((Extent::Data(offset), n));
        };
        let block = offset / bs;
        let e = self.bat[block as usize];
        if e == fv::UNALLOCATED {
            return Ok((
                if self.is_differencing() {
                    Extent::Parent
                } else {
                    Extent::Zero
                },
                n,
            ));
        }
        let data = fv::sectors_to_bytes(e) + h.bitmap_bytes() + in_block;
        if !self.is_differencing() {
            return Ok((Extent::Data(data), n));
        }
        let bitmap = self.bitmap(block)?;
        let first = in_block / SECTOR;
        let set = fv::bit(&bitmap, first);
        let last = (in_block + n).div_ceil(SECTOR);
        let mut s = first + 1;
        while s < last && fv::bit(&bitmap, s) == set {
            s += 1;
        }
        let run = (s * SECTOR - in_block).min(n);
        Ok((
            if set {
                Extent::Data(data)
            } else {
                Extent::Parent
            },
            run,
        ))
    }

    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.src.read(buf, file_offset, "block data")
    }

    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.src.io.fd()
    }

    fn put(&mut self, offset: u64, data: Payload<'_>) -> Result<()> {
        self.refuse_if_damaged()?;
        if !offset.is_multiple_of(SECTOR)
            || !data.len().is_multiple_of(SECTOR)
            || offset + data.len() > self.size
        {
            return Err(Error::BadWrite {
                path: self.src.path.clone(),
                offset,
                len: data.len(),
                rule: "is not sector aligned or passes the disk's end".into(),
            });
        }
        if self.header.is_none() {
            return self.src.put(data, offset, "disk data");
        }
        let bs = self.block_size();
        super::by_block(offset, data, bs, |off, piece| self.write_block(off, piece))
    }

    fn commit(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        match self.header.is_some() {
            true => self.commit_blocks(),
            false => self.src.flush(),
        }
    }

    fn pending_metadata(&self) -> u64 {
        let bitmaps: u64 = self.dirty_bitmaps.values().map(|b| b.len() as u64).sum();
        bitmaps + self.dirty_bat.len() as u64 * 4
    }

    fn released(&self) -> Vec<(u64, u64)> {
        self.released.clone()
    }

    fn close(&mut self) -> Result<()> {
        self.commit()
    }

    fn parent_ref(&self) -> Option<ParentRef> {
        if !self.is_differencing() {
            return None;
        }
        let h = self.header.as_ref()?;
        let dir = super::locator_folder(&self.src.path);
        let mut candidates: Vec<(String, PathBuf)> = Vec::new();
        let mut by_code: Vec<(&[u8; 4], String)> = Vec::new();
        for l in &h.locators {
            if l.data_length == 0 || l.data_length > 64 * 1024 {
                continue;
            }
            let Ok(raw) =
                self.src
                    .read_vec(l.data_length as usize, l.data_offset, "a parent locator")
            else {
                continue;
            };
            if let Some(text) = fv::decode_locator_text(&l.code, &raw) {
                by_code.push((&l.code, text));
            }
        }
        for code in [b"W2ru", b"Wi2r", b"W2ku", b"Wi2k"] {
            for (c, text) in &by_code {
                if *c != code {
                    continue;
                }
                let label = String::from_utf8_lossy(code.as_slice()).to_string();
                if code == b"W2ru" || code == b"Wi2r" {
                    candidates.push((label, dir.join(text.replace('\\', "/"))));
                } else if let Some(name) = text.rsplit(['\\', '/']).next().filter(|n| !n.is_empty())
                {
                    candidates.push((
                        format!("{label} (file name in the child's folder)"),
                        dir.join(name),
                    ));
                }
            }
        }
        if let Some(name) = h
            .parent_name
            .rsplit(['\\', '/'])
            .next()
            .filter(|n| !n.is_empty())
        {
            candidates.push(("parent name".into(), dir.join(name)));
        }
        Some(ParentRef {
            candidates,
            expected: Identity::VhdUniqueId(h.parent_unique_id),
        })
    }

    fn identity(&self) -> Identity {
        Identity::VhdUniqueId(self.footer.unique_id)
    }

    fn info(&self) -> Result<LayerInfo> {
        let allocated = self.bat.iter().filter(|&&e| e != fv::UNALLOCATED).count() as u64;
        let (blocks, bytes) = match &self.header {
            Some(h) => (allocated, allocated * u64::from(h.block_size)),
            None => (self.size.div_ceil(2 << 20), self.size),
        };
        let f = &self.footer;
        let details = serde_json::json!({
            "unique_id": f.unique_id.to_string(),
            "creator_app": String::from_utf8_lossy(&f.creator_app),
            "creator_os": String::from_utf8_lossy(&f.creator_os),
            "creator_version": format!("{:#x}", f.creator_version),
            "timestamp": u64::from(f.timestamp) + fv::TIMESTAMP_BASE,
            "current_size": f.current_size,
            "chs": [f.cylinders, u16::from(f.heads), u16::from(f.sectors_per_track)],
            "chs_size": f.chs_size(),
            "footer_offset": self.footer_offset,
            "parent_unique_id": self.header.as_ref().filter(|_| self.is_differencing()).map(|h| h.parent_unique_id.to_string()),
            "parent_name": self.header.as_ref().filter(|_| self.is_differencing()).map(|h| h.parent_name.clone()),
        });
        Ok(LayerInfo {
            path: self.src.path.clone(),
            format: Format::Vhd,
            kind: self.kind(),
            virtual_size: self.size,
            block_size: self.block_size(),
            logical_sector_size: SECTOR,
            physical_sector_size: SECTOR,
            file_size: self.src.len()?,
            allocated_blocks: blocks,
            allocated_bytes: bytes,
            details,
            warnings: self.warnings.iter().map(|w| w.to_string()).collect(),
        })
    }

    fn stored(&self, file_offset: u64, len: u64) -> Result<(bool, u64)> {
        crate::io::stored_run(self.src.io.as_ref(), file_offset, len)
            .map_err(|e| Error::io(&self.src.path, "looking for holes", e))
    }

    fn warnings(&self) -> &[Warning] {
        &self.warnings
    }
}

/// A fresh unique id for new disks.
pub fn new_unique_id() -> Uuid {
    crate::guid::fresh()
}
