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

/// Blocks reserved at a time: one footer move per this many new blocks
/// instead of per block. The unused part is given back (the footer
/// moved back) at each commit.
const RESERVE_BLOCKS: u64 = 64;

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

    /// Places a new block in the reserved space before the footer,
    /// reserving more first when it is used up. Its BAT entry is written
    /// at the next commit, once the block's data is durable.
    fn allocate(&mut self, block: u64) -> Result<u64> {
        let start = self.free_at.unwrap_or(self.footer_offset);
        let (at, end) = self.block_place(start);
        if end > self.footer_offset {
            self.reserve(start)?;
        }
        self.free_at = Some(end);
        let sector = u32::try_from(at / SECTOR)
            .map_err(|_| Error::unsupported(&self.src.path, "VHD", "file would exceed 2 TiB"))?;
        self.bat[block as usize] = sector;
        self.dirty_bat.insert(block);
        Ok(at)
    }

    /// Where a block placed at `start` or after begins (its bitmap), and
    /// where it ends. Block data stays 4 KiB aligned, as Hyper-V and Xen
    /// keep it (and a clone needs it).
    fn block_place(&self, start: u64) -> (u64, u64) {
        let h = self.dyn_header();
        let bitmap = h.bitmap_bytes();
        let data_at = (start + bitmap).next_multiple_of(4096);
        (data_at - bitmap, data_at + u64::from(h.block_size))
    }

    /// Reserves room for `RESERVE_BLOCKS` blocks from `start`: the file
    /// grows, the footer goes to the new end and the old one is zeroed.
    ///
    /// No flush of its own: nothing points into the reserved space before
    /// the commit, whose first flush makes the moved footer durable before
    /// any BAT entry is written. A flush here made the copy wait for the
    /// disk once per 64 blocks. A crash before that commit leaves a file
    /// the journal undoes: what lies past the epoch's length by truncation,
    /// an old footer below it (its zeroing held) from its before-image
    /// (`journal-format.md`, "VHD reservations").
    fn reserve(&mut self, start: u64) -> Result<()> {
        let mut end = start;
        for _ in 0..RESERVE_BLOCKS {
            end = self.block_place(end).1;
        }
        self.src.set_len(end + 512)?;
        self.src.write(&self.footer.encode(), end, "the footer")?;
        // The old footer now lies in the reserved space: zero it before a
        // BAT entry can point there.
        self.src
            .write(&[0u8; 512], self.footer_offset, "the old footer")?;
        self.footer_offset = end;
        Ok(())
    }

    /// Writes whole-block writes over allocated blocks into new blocks
    /// from now on (a merge's ancestor; see the module's comment).
    pub fn write_whole_blocks_out_of_place(&mut self) {
        self.out_of_place = true;
    }

    fn write_block(&mut self, offset: u64, data: Payload<'_>) -> Result<()> {
        let h = self.dyn_header().clone();
        let bs = u64::from(h.block_size);
        let block = offset / bs;
        let in_block = offset % bs;
        let whole = in_block == 0 && data.len() == bs;
        let (at, placed) = match self.bat[block as usize] {
            fv::UNALLOCATED => (self.allocate(block)?, true),
            s if whole && self.out_of_place && !self.dirty_bat.contains(&block) => {
                self.released
                    .push((fv::sectors_to_bytes(s), h.bitmap_bytes() + bs));
                (self.allocate(block)?, true)
            }
            s => (fv::sectors_to_bytes(s), false),
        };
        if placed {
            // A newly placed block's bitmap starts empty. Reading it
            // instead would read a hole in the reserved space, which the
            // kernel answers by zero-filling a whole read-ahead window of
            // pages that the block's data then overwrites.
            self.dirty_bitmaps
                .insert(block, vec![0; h.bitmap_bytes() as usize]);
        }
        self.src
            .put(data, at + h.bitmap_bytes() + in_block, "block data")?;
        // The bits that make the data visible are written at the commit,
        // after the data is durable.
        let mut bitmap = self.bitmap(block)?;
        let first = in_block / SECTOR;
        for s in first..first + data.len() / SECTOR {
            fv::set_bit(&mut bitmap, s);
        }
        self.dirty_bitmaps.insert(block, bitmap);
        Ok(())
    }

    /// Data durable (flush) → BAT entries and bitmaps written, the unused
    /// reservation given back (the footer moved back to the end of the
    /// last block) → flush → the file cut after that footer → flush.
    fn commit_blocks(&mut self) -> Result<()> {
        self.src.flush()?;
        let table = self.dyn_header().table_offset;
        let dirty: Vec<u64> = std::mem::take(&mut self.dirty_bat).into_iter().collect();
        for run in dirty.chunk_by(|a, b| a + 1 == *b) {
            let bytes: Vec<u8> = run
                .iter()
                .flat_map(|&b| self.bat[b as usize].to_be_bytes())
                .collect();
            self.src.write(&bytes, table + run[0] * 4, "BAT entries")?;
        }
        for (block, bitmap) in std::mem::take(&mut self.dirty_bitmaps) {
            let at = fv::sectors_to_bytes(self.bat[block as usize]);
            self.src.write(&bitmap, at, "a block bitmap")?;
            self.bitmap_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last = Some((block, bitmap));
        }
        let trim = self.free_at.take().filter(|&f| f < self.footer_offset);
        if let Some(end) = trim {
            self.src.write(&self.footer.encode(), end, "the footer")?;
        }
        self.src.flush()?;
        if let Some(end) = trim {
            self.src.set_len(end + 512)?;
            self.footer_offset = end;
            self.src.flush()?;
        }
        Ok(())
    }
}

impl VhdDisk {
    /// Re-links a differencing disk to a new parent: parent unique id,
    /// parent name and the W2ru/W2ku locator data, rewritten in place.
    pub fn set_parent(
        &mut self,
        parent_uid: Uuid,
        parent_name: &str,
        relative: &str,
    ) -> Result<()> {
        self.refuse_if_damaged()?;
        let path = self.src.path.clone();
        let mut h = self.header.clone().ok_or_else(|| Error::NotDifferencing {
            path: path.clone(),
            merging: false,
        })?;
        for l in h.locators.iter_mut() {
            let text = match &l.code {
                b"W2ru" | b"Wi2r" => relative.to_string(),
                b"W2ku" | b"Wi2k" => format!("C:\\{parent_name}"),
                _ => continue,
            };
            let data: Vec<u8> = if &l.code == b"W2ru" || &l.code == b"W2ku" {
                text.encode_utf16().flat_map(u16::to_le_bytes).collect()
            } else {
                text.into_bytes()
            };
            // Data space is sectors by the spec, bytes in Hyper-V's files.
            let room = if l.data_space >= 512 {
                u64::from(l.data_space)
            } else {
                fv::sectors_to_bytes(l.data_space)
            };
            if data.len() as u64 > room {
                return Err(Error::unsupported(
                    &path,
                    "parent locator",
                    format!(
                        "the new parent path needs {} bytes, the locator has room for {room}",
                        data.len()
                    ),
                ));
            }
            let mut padded = data.clone();
            padded.resize(data.len().max(l.data_length as usize), 0);
            self.src
                .write(&padded, l.data_offset, "parent locator data")?;
            l.data_length = data.len() as u32;
        }
        h.parent_unique_id = parent_uid;
        h.parent_name = parent_name.to_string();
        self.src
            .write(&h.encode(), self.header_offset, "the dynamic header")?;
        self.src.flush()?;
        self.header = Some(h);
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::disk::create::{VhdOptions, create_child, create_vhd};
    use crate::io::MemStorage;

    /// A file in memory that counts the reads and flushes made of it.
    struct Counted(Arc<MemStorage>, Arc<Counts>);

    #[derive(Default)]
    struct Counts {
        reads: AtomicUsize,
        flushes: AtomicUsize,
    }

    impl Counts {
        fn reads(&self) -> usize {
            self.reads.load(Ordering::Relaxed)
        }
        fn flushes(&self) -> usize {
            self.flushes.load(Ordering::Relaxed)
        }
    }

    impl Storage for Counted {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.1.reads.fetch_add(1, Ordering::Relaxed);
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.1.flushes.fetch_add(1, Ordering::Relaxed);
            self.0.flush()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
    }

    /// A new child of a new parent of `size` bytes in `dir`, opened
    /// writable on a counted copy of its file.
    fn counted_child(
        dir: &Path,
        size: u64,
        block_size: u64,
    ) -> (VhdDisk, Arc<MemStorage>, Arc<Counts>) {
        let (parent, child) = (dir.join("p.vhd"), dir.join("c.avhd"));
        let o = VhdOptions {
            size,
            block_size,
            ..VhdOptions::default()
        };
        create_vhd(&parent, &o).unwrap();
        create_child(&child, &parent, None).unwrap();
        let mem = Arc::new(MemStorage::new(std::fs::read(&child).unwrap()));
        let counts = Arc::new(Counts::default());
        let io = Counted(mem.clone(), counts.clone());
        let d = VhdDisk::open_with(&child, Box::new(io), true).unwrap();
        (d, mem, counts)
    }

    /// Where sectors [first, first + n) of the disk come from: this file's
    /// data or the parent, one entry per sector.
    fn sources(d: &VhdDisk, first: u64, n: u64) -> Vec<bool> {
        (first..first + n)
            .map(|s| match d.map(s * SECTOR, SECTOR).unwrap().0 {
                Extent::Data(_) => true,
                Extent::Parent => false,
                Extent::Zero => panic!("a differencing disk maps nothing to zeros"),
            })
            .collect()
    }

    #[test]
    fn new_blocks_start_with_empty_bitmaps_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _, counts) = counted_child(dir.path(), 16 << 20, 2 << 20);
        let bs = d.block_size();
        let data = vec![0x5a; bs as usize];

        let opened = counts.reads();
        // A whole block, then a new block in two pieces.
        d.write(bs, &data).unwrap();
        d.write(2 * bs + 3 * SECTOR, &data[..8 * SECTOR as usize])
            .unwrap();
        d.write(2 * bs + 20 * SECTOR, &data[..SECTOR as usize])
            .unwrap();
        assert_eq!(counts.reads(), opened, "no read before the commit");
        d.commit().unwrap();

        let sectors = bs / SECTOR;
        assert!(sources(&d, sectors, sectors).iter().all(|&x| x));
        let second = sources(&d, 2 * sectors, 24);
        let expected: Vec<bool> = (0..24).map(|s| (3..11).contains(&s) || s == 20).collect();
        assert_eq!(second, expected);
        assert!(
            sources(&d, 0, sectors).iter().all(|&x| !x),
            "block 0 untouched"
        );
    }

    /// Reserving room for new blocks waits for no flush: the copy would
    /// wait for the disk once per reservation. The commit makes it all
    /// durable and leaves a valid file.
    #[test]
    fn new_blocks_are_flushed_by_the_commit_not_per_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, mem, counts) = counted_child(dir.path(), 32 << 20, 64 << 10);
        let bs = d.block_size();
        let blocks = 3 * RESERVE_BLOCKS + 1;
        for b in 0..blocks {
            d.write(b * bs, &vec![b as u8 + 1; bs as usize]).unwrap();
        }
        assert_eq!(counts.flushes(), 0, "no flush before the commit");
        d.commit().unwrap();
        assert!(counts.flushes() > 0);
        drop(d);

        let committed = dir.path().join("committed.avhd");
        let len = mem.len().unwrap();
        let mut bytes = vec![0u8; len as usize];
        mem.read_at(&mut bytes, 0).unwrap();
        std::fs::write(&committed, &bytes).unwrap();
        let r = crate::verify::check::check(&committed, Some(dir.path().join("p.vhd")));
        assert_eq!(r.status, crate::verify::check::Status::Clean, "{:?}", r);
        let d = VhdDisk::open(&committed, false).unwrap();
        for b in [0, RESERVE_BLOCKS, blocks - 1] {
            let mut got = vec![0u8; bs as usize];
            let Extent::Data(at) = d.map(b * bs, bs).unwrap().0 else {
                panic!("block {b} is not mapped to data");
            };
            d.read_data(at, &mut got).unwrap();
            assert!(got.iter().all(|&x| x == b as u8 + 1), "block {b}");
        }
    }
}
