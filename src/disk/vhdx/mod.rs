//! A VHDX file as a chain layer: open (with log replay), map reads through
//! the BAT and sector bitmaps, and write with BAT/bitmap updates that go
//! through the VHDX log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

use super::{Extent, Format, Identity, Kind, Layer, LayerInfo, ParentRef, Payload, Warning};
use crate::error::{Error, Result};
use crate::format::vhdx::bat::{self, Geometry};
use crate::format::vhdx::header::Header;
use crate::format::vhdx::log as vlog;
use crate::format::vhdx::metadata::{self as md, FileParameters, MetadataEntry, ParentLocator};
use crate::format::vhdx::region::{self, RegionEntry, RegionTable};
use crate::format::vhdx::{self as fx, HEADER_OFFSETS, MIB, REGION_OFFSETS};
use crate::io::{FileStorage, Overlay, Src, Storage};
pub(crate) use open::read_headers;
use open::{
    check_header, check_header_writable, check_region, find_log, read_metadata, read_regions,
    replay_on_disk,
};

mod open;
mod write;

/// How the log looked at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogState {
    Empty,
    /// A live log was replayed in memory; the file is unchanged.
    ReplayedInMemory {
        entries: usize,
    },
    /// A live log was replayed into the file (writable open).
    ReplayedOnDisk {
        entries: usize,
    },
    /// LogGuid is set but no complete entry carries it: nothing to replay.
    LiveWithoutEntries,
}

/// Open-time state of a write session.
struct Session {
    log_position: u64,
    log_sequence: u64,
    /// DataWriteGuid is replaced once, before the first guest-visible write.
    data_guid_changed: bool,
}

pub struct VhdxDisk {
    src: Src,
    writable: bool,
    header: Header,
    header_slot: usize,
    regions: RegionTable,
    bat_region: RegionEntry,
    meta_region: RegionEntry,
    meta_entries: Vec<MetadataEntry>,
    pub params: FileParameters,
    pub virtual_size: u64,
    pub disk_id: Uuid,
    pub logical_sector: u64,
    pub physical_sector: u64,
    pub locator: Option<ParentLocator>,
    pub creator: String,
    geo: Geometry,
    bat: Vec<u64>,
    log_state: LogState,
    warnings: Vec<Warning>,
    session: Option<Session>,
    /// Changed BAT entries not yet committed.
    dirty_bat: BTreeMap<u64, ()>,
    /// Changed 4 KiB sector-bitmap pages (file offset → page), not yet committed.
    dirty_sb: BTreeMap<u64, Vec<u8>>,
    /// One cached 64 KiB window of a sector bitmap block: (file offset,
    /// bytes). A window, not the whole 1 MiB block: on a large sparse disk
    /// each bitmap block may serve a single partly written block, and
    /// reading 1 MiB for it made a scattered merge read 16 GiB of bitmaps.
    sb_cache: Mutex<Option<(u64, Vec<u8>)>>,
    file_len: u64,
    next_data_write_guid: Option<Uuid>,
}

/// The file type identifier: the signature, and the creator it names.
fn read_identifier(src: &Src, file_len: u64) -> Result<String> {
    if file_len < 1 << 20 {
        return Err(Error::corrupt(
            &src.path,
            "VHDX file",
            0,
            format!("file is {file_len} bytes, smaller than the 1 MiB header section"),
        ));
    }
    let id = src.read_vec(64 * 1024, 0, "the file type identifier")?;
    if &id[..8] != fx::FILE_SIGNATURE {
        return Err(Error::corrupt(
            &src.path,
            "file type identifier",
            0,
            "signature is not 'vhdxfile'",
        ));
    }
    Ok(fx::decode_creator(&id))
}

/// A live log (non-nil LogGuid) is replayed: into the file when it is
/// opened for writing, else into an overlay that reads return, leaving
/// the file as it is.
fn open_log(
    src: Src,
    header: &Header,
    slot: usize,
    file_len: u64,
    writable: bool,
) -> Result<(Src, LogState)> {
    if header.log_guid.is_nil() {
        return Ok((src, LogState::Empty));
    }
    let entries = find_log(&src, header, file_len)?;
    let n = entries.len();
    if writable {
        replay_on_disk(&src, header, slot, &entries)?;
        return Ok((src, LogState::ReplayedOnDisk { entries: n }));
    }
    if n == 0 {
        return Ok((src, LogState::LiveWithoutEntries));
    }
    let path = src.path.clone();
    let overlay = Overlay::new(src.io).map_err(|e| Error::io(&path, "opening", e))?;
    vlog::replay(&overlay, &entries)
        .map_err(|e| Error::io(&path, "replaying the log in memory", e))?;
    Ok((
        Src::new(&path, Box::new(overlay)),
        LogState::ReplayedInMemory { entries: n },
    ))
}

/// The BAT and metadata regions, each checked, and no unknown required
/// region.
fn required_regions(
    path: &Path,
    regions: &RegionTable,
    file_len: u64,
) -> Result<(RegionEntry, RegionEntry)> {
    let find = |g, what| {
        regions.find(g).cloned().ok_or_else(|| {
            Error::corrupt(
                path,
                "region table",
                REGION_OFFSETS[0],
                format!("no {what} region"),
            )
        })
    };
    let bat = find(region::BAT_GUID, "BAT")?;
    let meta = find(region::METADATA_GUID, "metadata")?;
    for r in &regions.entries {
        check_region(path, r, file_len)?;
        if r.guid != region::BAT_GUID && r.guid != region::METADATA_GUID && r.required {
            return Err(Error::unsupported(
                path,
                "region",
                format!("unknown required region {{{}}}", r.guid),
            ));
        }
    }
    Ok((bat, meta))
}

impl VhdxDisk {
    pub fn open(path: &Path, writable: bool) -> Result<VhdxDisk> {
        Self::open_with(path, Box::new(FileStorage::open(path, writable)?), writable)
    }

    /// Opens through a given storage (the merge passes a journaled one).
    ///
    /// A writable open of a file with a live log must replay it on disk,
    /// which is a write; so the whole file is first opened and validated
    /// with the log replayed in memory, and only a file that passes is
    /// touched. Bad input is refused before the first write.
    pub fn open_with(path: &Path, io: Box<dyn Storage>, writable: bool) -> Result<VhdxDisk> {
        if !writable {
            return Self::parse(path, io, false);
        }
        let shared: std::sync::Arc<dyn Storage> = std::sync::Arc::from(io);
        let peek = Src::new(path, Box::new(shared.clone()));
        let len = peek.len()?;
        if len >= 1 << 20 {
            let (h, slot, _) = read_headers(&peek)?;
            check_header_writable(path, &h, HEADER_OFFSETS[slot], len)?;
            if !h.log_guid.is_nil() {
                let probe =
                    Overlay::new(shared.clone()).map_err(|e| Error::io(path, "opening", e))?;
                Self::parse(path, Box::new(probe), false)?;
            }
        }
        drop(peek);
        Self::parse(path, Box::new(shared), true)
    }

    fn parse(path: &Path, io: Box<dyn Storage>, writable: bool) -> Result<VhdxDisk> {
        let src = Src::new(path, io);
        let file_len = src.len()?;
        let creator = read_identifier(&src, file_len)?;
        let (header, header_slot, mut warnings) = read_headers(&src)?;
        check_header(path, &header, HEADER_OFFSETS[header_slot], file_len)?;
        let (src, log_state) = open_log(src, &header, header_slot, file_len, writable)?;
        // A replay on disk updated the headers.
        let (header, header_slot) = if matches!(log_state, LogState::ReplayedOnDisk { .. }) {
            let (h, s, _) = read_headers(&src)?;
            (h, s)
        } else {
            (header, header_slot)
        };
        let file_len = src.len()?;
        let regions = read_regions(&src, &mut warnings)?;
        let (bat_region, meta_region) = required_regions(path, &regions, file_len)?;
        let meta = read_metadata(&src, &meta_region)?;
        let geo = Geometry {
            virtual_size: meta.virtual_size,
            block_size: u64::from(meta.params.block_size),
            logical_sector: meta.logical_sector,
        };
        let mut disk = VhdxDisk {
            writable,
            header,
            header_slot,
            regions,
            bat_region,
            meta_region,
            meta_entries: meta.entries,
            params: meta.params,
            virtual_size: meta.virtual_size,
            disk_id: meta.disk_id,
            logical_sector: meta.logical_sector,
            physical_sector: meta.physical_sector,
            locator: meta.locator,
            creator,
            geo,
            bat: Vec::new(),
            log_state,
            warnings,
            session: None,
            dirty_bat: BTreeMap::new(),
            dirty_sb: BTreeMap::new(),
            sb_cache: Mutex::new(None),
            file_len,
            next_data_write_guid: None,
            src,
        };
        disk.bat = disk.read_bat()?;
        disk.check_layout()?;
        Ok(disk)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn log_state(&self) -> LogState {
        self.log_state
    }
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    pub fn bat_entry(&self, block: u64) -> u64 {
        self.bat[self.geo.pb_index(block) as usize]
    }
    pub fn has_parent(&self) -> bool {
        self.params.has_parent
    }
    pub fn regions(&self) -> &RegionTable {
        &self.regions
    }
    pub fn metadata_entries(&self) -> &[MetadataEntry] {
        &self.meta_entries
    }

    fn read_bat(&self) -> Result<Vec<u64>> {
        let path = &self.src.path;
        let n = self.geo.entries(self.params.has_parent);
        let need = n * 8;
        if need > u64::from(self.bat_region.length) {
            return Err(Error::corrupt(
                path,
                "BAT region",
                self.bat_region.file_offset,
                format!(
                    "{n} entries are needed for a {} byte disk with {} byte blocks, the region holds {}",
                    self.virtual_size,
                    self.geo.block_size,
                    self.bat_region.length / 8
                ),
            ));
        }
        let raw = self
            .src
            .read_vec(need as usize, self.bat_region.file_offset, "the BAT")?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect())
    }

    /// Nothing the file holds overlaps anything else: the log, the
    /// regions, and every block and sector bitmap the BAT points at.
    fn check_layout(&self) -> Result<()> {
        let mut spans: Vec<(u64, u64, String)> = Vec::new();
        if self.header.log_length > 0 {
            let log = u64::from(self.header.log_length);
            spans.push((self.header.log_offset, log, "log".into()));
        }
        for r in &self.regions.entries {
            let name = if r.guid == region::BAT_GUID {
                "BAT region".to_string()
            } else if r.guid == region::METADATA_GUID {
                "metadata region".into()
            } else {
                format!("region {{{}}}", r.guid)
            };
            spans.push((r.file_offset, u64::from(r.length), name));
        }
        for i in 0..self.bat.len() as u64 {
            if let Some((off, len, what)) = self.bat_span(i)? {
                spans.push((off, len, format!("{what} (BAT entry {i})")));
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[0].0.saturating_add(w[0].1) > w[1].0 {
                return Err(Error::corrupt(
                    &self.src.path,
                    "file layout",
                    w[1].0,
                    format!(
                        "{} at {:#x} overlaps {} at {:#x}",
                        w[1].2, w[1].0, w[0].2, w[0].0
                    ),
                ));
            }
        }
        Ok(())
    }

    /// BAT entry `i` checked on its own: a state its kind allows, and a
    /// place inside the file. Returns what it occupies, if anything.
    fn bat_span(&self, i: u64) -> Result<Option<(u64, u64, &'static str)>> {
        let cr = self.geo.chunk_ratio();
        let is_sb = (i + 1).is_multiple_of(cr + 1);
        let e = self.bat[i as usize];
        let Some((len, what)) = self.entry_extent(i, is_sb)? else {
            return Ok(None);
        };
        let bad = |detail: String| Err(self.bat_fault(i, detail));
        let off = bat::offset(e);
        if off < MIB {
            return bad(format!(
                "{what} entry {i} points at {off:#x}, inside the header section"
            ));
        }
        // A partial last block may end past EOF only by its unused part.
        let block = i - i / (cr + 1);
        if !is_sb && block >= self.geo.payload_blocks() {
            return bad(format!(
                "payload entry {i} is allocated but lies past the disk's last block"
            ));
        }
        let used = match is_sb {
            true => len,
            false => len.min(self.virtual_size - block * self.geo.block_size),
        };
        if off.checked_add(used).is_none_or(|end| end > self.file_len) {
            return bad(format!(
                "{what} entry {i} at {off:#x} (+{used:#x}) ends past the end of the file ({:#x}); the file was truncated",
                self.file_len
            ));
        }
        Ok(Some((off, len, what)))
    }

    /// BAT entry `i` is wrong in the way `detail` says.
    fn bat_fault(&self, i: u64, detail: String) -> Error {
        Error::corrupt(
            &self.src.path,
            "BAT entry",
            self.bat_region.file_offset + i * 8,
            detail,
        )
    }

    /// The bytes an entry's state says it holds in the file (`None` when
    /// it holds none), or why the state is not allowed there.
    fn entry_extent(&self, i: u64, is_sb: bool) -> Result<Option<(u64, &'static str)>> {
        let st = bat::state(self.bat[i as usize]);
        let bad = |detail: String| Err(self.bat_fault(i, detail));
        if is_sb {
            return match st {
                bat::SB_NOT_PRESENT => Ok(None),
                bat::SB_PRESENT if self.params.has_parent => Ok(Some((MIB, "sector bitmap"))),
                _ => bad(format!("sector bitmap entry {i} has invalid state {st}")),
            };
        }
        let payload = Ok(Some((self.geo.block_size, "payload block")));
        match st {
            0..=3 | bat::PAYLOAD_UNMAPPED_V095 => Ok(None),
            bat::PAYLOAD_FULLY_PRESENT => payload,
            bat::PAYLOAD_PARTIALLY_PRESENT if self.params.has_parent => {
                let cr = self.geo.chunk_ratio();
                let sb = self.bat[self.geo.sb_index(i / (cr + 1) * cr) as usize];
                if bat::state(sb) != bat::SB_PRESENT {
                    return bad(format!(
                        "payload entry {i} is PARTIALLY_PRESENT but its chunk's sector bitmap is not present"
                    ));
                }
                payload
            }
            _ => bad(format!(
                "payload entry {i} has invalid state {st} ({})",
                bat::state_name(st)
            )),
        }
    }

    fn sb_offset(&self, block: u64) -> Option<u64> {
        let e = self.bat[self.geo.sb_index(block) as usize];
        (bat::state(e) == bat::SB_PRESENT).then(|| bat::offset(e))
    }

    /// The sector bitmap slice of `block`, from the dirty pages, the cache or the file.
    fn bitmap_slice(&self, block: u64) -> Result<Vec<u8>> {
        let sb = self.sb_offset(block).expect("partial blocks have a bitmap");
        let (start, len) = self.geo.bitmap_slice(block);
        // Slices are aligned powers of two of at most 64 KiB (a 256 MiB
        // block of 512-byte sectors), so one window always holds a slice.
        const WINDOW: u64 = 64 << 10;
        let window = sb + start / WINDOW * WINDOW;
        let mut cache = self.sb_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_none_or(|(o, _)| *o != window) {
            let v = self
                .src
                .read_vec(WINDOW as usize, window, "a sector bitmap block")?;
            *cache = Some((window, v));
        }
        let (_, bytes) = cache.as_ref().expect("filled");
        let at = (start % WINDOW) as usize;
        let mut out = bytes[at..at + len as usize].to_vec();
        for (page_off, page) in self
            .dirty_sb
            .range(sb + start / 4096 * 4096..sb + start + len)
        {
            let page_start = page_off - sb;
            for (i, b) in page.iter().enumerate() {
                let pos = page_start + i as u64;
                if pos >= start && pos < start + len {
                    out[(pos - start) as usize] = *b;
                }
            }
        }
        Ok(out)
    }
}

/// Maps a Windows path in a locator to a file name in the child's folder.
fn file_name_of(win: &str) -> Option<String> {
    let name = win.rsplit(['\\', '/']).next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

impl Layer for VhdxDisk {
    fn path(&self) -> &Path {
        &self.src.path
    }
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn kind(&self) -> Kind {
        if self.params.has_parent {
            Kind::Differencing
        } else if self.params.leave_block_allocated {
            Kind::Fixed
        } else {
            Kind::Dynamic
        }
    }
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    fn block_size(&self) -> u64 {
        self.geo.block_size
    }
    fn logical_sector_size(&self) -> u64 {
        self.logical_sector
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let n = len
            .min(bs - in_block)
            .min(self.virtual_size.saturating_sub(offset));
        let e = self.bat[self.geo.pb_index(block) as usize];
        Ok(match bat::state(e) {
            bat::PAYLOAD_FULLY_PRESENT => (Extent::Data(bat::offset(e) + in_block), n),
            bat::PAYLOAD_PARTIALLY_PRESENT => {
                let bits = self.bitmap_slice(block)?;
                let ls = self.logical_sector;
                let first = in_block / ls;
                let bit = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1 == 1;
                let set = bit(first);
                let last = (in_block + n).div_ceil(ls);
                let mut s = first + 1;
                while s < last && bit(s) == set {
                    s += 1;
                }
                let run = (s * ls - in_block).min(n);
                if set {
                    (Extent::Data(bat::offset(e) + in_block), run)
                } else {
                    (Extent::Parent, run)
                }
            }
            bat::PAYLOAD_NOT_PRESENT if self.params.has_parent => (Extent::Parent, n),
            _ => (Extent::Zero, n),
        })
    }

    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.src.read(buf, file_offset, "payload data")
    }

    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.src.io.fd()
    }

    fn put(&mut self, offset: u64, data: Payload<'_>) -> Result<()> {
        let ls = self.logical_sector;
        if !offset.is_multiple_of(ls)
            || !data.len().is_multiple_of(ls)
            || offset + data.len() > self.virtual_size
        {
            return Err(Error::BadWrite {
                path: self.src.path.clone(),
                offset,
                len: data.len(),
                rule: format!("is not aligned to {ls}-byte sectors or passes the disk's end"),
            });
        }
        self.start_session(true)?;
        self.change_data_guid()?;
        let bs = self.geo.block_size;
        super::by_block(offset, data, bs, |off, piece| self.write_block(off, piece))
    }

    fn commit(&mut self) -> Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        self.src.flush()?;
        let pages = self.dirty_pages()?;
        if !pages.is_empty() {
            self.log_and_apply(&pages)?;
        }
        *self.sb_cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        self.commit()?;
        if !self.header.log_guid.is_nil() {
            let mut h = self.header.clone();
            h.log_guid = Uuid::nil();
            self.write_header_twice(h)?;
        }
        self.session = None;
        Ok(())
    }

    fn parent_ref(&self) -> Option<ParentRef> {
        if !self.params.has_parent {
            return None;
        }
        let loc = self.locator.as_ref()?;
        let dir = super::locator_folder(&self.src.path);
        let mut candidates: Vec<(String, PathBuf)> = Vec::new();
        if let Some(rel) = loc.get("relative_path") {
            candidates.push(("relative_path".into(), dir.join(rel.replace('\\', "/"))));
        }
        for key in ["absolute_win32_path", "volume_path"] {
            if let Some(name) = loc.get(key).and_then(file_name_of) {
                candidates.push((
                    format!("{key} (file name in the child's folder)"),
                    dir.join(name),
                ));
            }
        }
        let linkage = loc
            .get("parent_linkage")
            .and_then(md::parse_braced)
            .unwrap_or_default();
        let linkage2 = loc
            .get("parent_linkage2")
            .and_then(md::parse_braced)
            .filter(|g| !g.is_nil());
        Some(ParentRef {
            candidates,
            expected: Identity::VhdxLinkage { linkage, linkage2 },
        })
    }

    fn identity(&self) -> Identity {
        Identity::VhdxLinkage {
            linkage: self.header.data_write_guid,
            linkage2: None,
        }
    }

    fn stored(&self, file_offset: u64, len: u64) -> Result<(bool, u64)> {
        crate::io::stored_run(self.src.io.as_ref(), file_offset, len)
            .map_err(|e| Error::io(&self.src.path, "looking for holes", e))
    }

    fn unreplayed_log_entries(&self) -> usize {
        match self.log_state {
            LogState::ReplayedInMemory { entries } => entries,
            _ => 0,
        }
    }

    fn info(&self) -> Result<LayerInfo> {
        let cr = self.geo.chunk_ratio();
        let mut blocks = 0;
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (i, &e) in self.bat.iter().enumerate() {
            if (i as u64 + 1).is_multiple_of(cr + 1) {
                continue;
            }
            let st = bat::state(e);
            *counts.entry(bat::state_name(st)).or_default() += 1;
            if st == bat::PAYLOAD_FULLY_PRESENT || st == bat::PAYLOAD_PARTIALLY_PRESENT {
                blocks += 1;
            }
        }
        let details = serde_json::json!({
            "creator": self.creator,
            "header_sequence": self.header.sequence,
            "current_header": self.header_slot + 1,
            "file_write_guid": self.header.file_write_guid.to_string(),
            "data_write_guid": self.header.data_write_guid.to_string(),
            "log_guid": self.header.log_guid.to_string(),
            "log": self.log_state,
            "log_offset": self.header.log_offset,
            "log_length": self.header.log_length,
            "virtual_disk_id": self.disk_id.to_string(),
            "leave_block_allocated": self.params.leave_block_allocated,
            "has_parent": self.params.has_parent,
            "chunk_ratio": cr,
            "block_states": counts,
            "parent_locator": self.locator.as_ref().map(|l| l.entries.iter().cloned().collect::<BTreeMap<_, _>>()),
        });
        Ok(LayerInfo {
            path: self.src.path.clone(),
            format: Format::Vhdx,
            kind: self.kind(),
            virtual_size: self.virtual_size,
            block_size: self.geo.block_size,
            logical_sector_size: self.logical_sector,
            physical_sector_size: self.physical_sector,
            file_size: self.src.len()?,
            allocated_blocks: blocks,
            allocated_bytes: blocks * self.geo.block_size,
            details,
            warnings: self.warnings.iter().map(|w| w.to_string()).collect(),
        })
    }

    fn pending_metadata(&self) -> u64 {
        // Distinct 4 KiB BAT pages (512 entries each), counted only when
        // the number of entries alone could reach a caller's threshold.
        let entries = self.dirty_bat.len() as u64;
        let bat_pages = if entries < 1024 {
            entries
        } else {
            let mut pages: Vec<u64> = self.dirty_bat.keys().map(|i| i / 512).collect();
            pages.dedup();
            pages.len() as u64
        };
        (bat_pages + self.dirty_sb.len() as u64) * 4096
    }
    fn warnings(&self) -> &[Warning] {
        &self.warnings
    }
    fn check_open_for_writing(&self) -> Result<()> {
        let at = HEADER_OFFSETS[self.header_slot];
        check_header_writable(&self.src.path, &self.header, at, self.file_len)
    }
}

impl Drop for VhdxDisk {
    fn drop(&mut self) {
        // Best effort: an explicit close() reports errors; a crash or a
        // failed close leaves a live log that any reader replays.
        let _ = self.close();
    }
}
