//! Opening a VHDX file: headers, the log, the region table and the
//! metadata items, each checked against the spec and the file's size
//! before anything is trusted. Used by `VhdxDisk::open_with`.

use std::path::Path;

use uuid::Uuid;

use crate::disk::Warning;
use crate::error::{Error, Result};
use crate::format::vhdx::header::{self, Header};
use crate::format::vhdx::log as vlog;
use crate::format::vhdx::metadata::{self as md, FileParameters, MetadataEntry, ParentLocator};
use crate::format::vhdx::region::{RegionEntry, RegionTable};
use crate::format::vhdx::{self as fx, HEADER_OFFSETS, MIB, REGION_OFFSETS};
use crate::io::Src;

const MAX_TB: u64 = 64 << 40;

pub(super) struct Meta {
    pub(super) entries: Vec<MetadataEntry>,
    pub(super) params: FileParameters,
    pub(super) virtual_size: u64,
    pub(super) disk_id: Uuid,
    pub(super) logical_sector: u64,
    pub(super) physical_sector: u64,
    pub(super) locator: Option<ParentLocator>,
}

pub(crate) fn read_headers(src: &Src) -> Result<(Header, usize, Vec<Warning>)> {
    let mut slots = [
        Err(header::HeaderFault::Signature),
        Err(header::HeaderFault::Signature),
    ];
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let b = src.read_vec(header::SIZE, *off, "a header")?;
        slots[i] = Header::decode(&b);
    }
    let mut warnings = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        if let Err(f) = s {
            warnings.push(Warning::new(
                "header",
                HEADER_OFFSETS[i],
                format!(
                    "header {} at {:#x} is not valid: {f}; the other copy is used",
                    i + 1,
                    HEADER_OFFSETS[i]
                ),
            ));
        }
    }
    let Some(cur) = header::current(&slots) else {
        let detail = match (&slots[0], &slots[1]) {
            (Err(a), Err(b)) => format!("neither header is valid (header 1: {a}; header 2: {b})"),
            _ => {
                "both headers are valid with the same sequence number but different contents".into()
            }
        };
        return Err(Error::corrupt(
            &src.path,
            "headers",
            HEADER_OFFSETS[0],
            detail,
        ));
    };
    // A torn update of the non-current header is normal after a crash.
    if warnings.len() == 1 {
        warnings.clear();
    }
    let h = slots[cur].clone().expect("current is valid");
    Ok((h, cur, warnings))
}

/// `at`: where the header was read.
pub(super) fn check_header(path: &Path, h: &Header, at: u64, file_len: u64) -> Result<()> {
    if h.version != 1 {
        return Err(Error::unsupported(
            path,
            "header",
            format!("version {} (only 1 is defined)", h.version),
        ));
    }
    // The first MiB is the header section (MS-VHDX 2.1), even for a log
    // that is empty now: a writer starts its log there.
    if !h.log_offset.is_multiple_of(MIB) || u64::from(h.log_length) % MIB != 0 || h.log_offset < MIB
    {
        return Err(Error::corrupt(
            path,
            "header",
            at,
            format!(
                "log at {:#x} length {:#x}: both must be multiples of 1 MiB, and the log must start after the 1 MiB header section",
                h.log_offset, h.log_length
            ),
        ));
    }
    if !h.log_guid.is_nil() {
        if h.log_version != 0 {
            return Err(Error::unsupported(
                path,
                "log",
                format!("log version {}", h.log_version),
            ));
        }
        if !log_inside(h, file_len) {
            return Err(Error::corrupt(
                path,
                "header",
                at,
                format!(
                    "log at {:#x} length {:#x} lies outside the file ({file_len} bytes)",
                    h.log_offset, h.log_length
                ),
            ));
        }
    }
    Ok(())
}

/// Whether the header's log has a length and lies inside the file.
fn log_inside(h: &Header, file_len: u64) -> bool {
    h.log_length > 0
        && h.log_offset
            .checked_add(u64::from(h.log_length))
            .is_some_and(|e| e <= file_len)
}

/// What a file needs before it can be written, read from its current
/// header (at `at`): room for the header updates a writer makes, and a log
/// of its own inside the file, since every metadata change goes through
/// the log (an empty log's place is otherwise never used).
pub(super) fn check_header_writable(path: &Path, h: &Header, at: u64, file_len: u64) -> Result<()> {
    if h.sequence > u64::MAX - (1 << 32) {
        return Err(Error::corrupt(
            path,
            "header",
            at,
            format!(
                "sequence number {:#x} leaves no room for updates; the file cannot be written (convert it to a new file)",
                h.sequence
            ),
        ));
    }
    if !log_inside(h, file_len) {
        return Err(Error::corrupt(
            path,
            "header",
            at,
            format!(
                "log at {:#x} length {:#x} is not a place inside the file ({file_len} bytes) where updates can be logged; the file can be read but not written (convert it to a new file)",
                h.log_offset, h.log_length
            ),
        ));
    }
    Ok(())
}

/// The active sequence, tail first; empty when there is nothing to replay.
pub(super) fn find_log(src: &Src, h: &Header, file_len: u64) -> Result<Vec<vlog::Entry>> {
    let log = src.read_vec(h.log_length as usize, h.log_offset, "the log")?;
    // No complete sequence means no entry was ever made durable under this
    // LogGuid; since entries are flushed before they are applied, nothing of
    // the log reached the file and there is nothing to replay (QEMU reads
    // such files the same way).
    let Some(entries) = vlog::active_sequence(&log, &h.log_guid) else {
        return Ok(Vec::new());
    };
    let head = entries.last().expect("active sequences are non-empty");
    if file_len < head.flushed_file_offset {
        return Err(Error::corrupt(
            &src.path,
            "log",
            h.log_offset.saturating_add(head.position),
            format!(
                "file is {file_len} bytes but the log says {} bytes were flushed; the file was truncated",
                head.flushed_file_offset
            ),
        ));
    }
    Ok(entries)
}

/// MS-VHDX 2.3.3 for a writable open: new FileWriteGuid first, replay, then
/// clear LogGuid.
pub(super) fn replay_on_disk(
    src: &Src,
    h: &Header,
    slot: usize,
    entries: &[vlog::Entry],
) -> Result<()> {
    let mut h2 = h.clone();
    h2.sequence += 1;
    h2.file_write_guid = crate::guid::fresh();
    src.write(&h2.encode(), HEADER_OFFSETS[1 - slot], "a header")?;
    src.flush()?;
    vlog::replay(src.io.as_ref(), entries)
        .map_err(|e| Error::io(&src.path, "replaying the log", e))?;
    src.flush()?;
    let mut h3 = h2.clone();
    h3.sequence += 1;
    h3.log_guid = Uuid::nil();
    src.write(&h3.encode(), HEADER_OFFSETS[slot], "a header")?;
    src.flush()?;
    let mut h4 = h3.clone();
    h4.sequence += 1;
    src.write(&h4.encode(), HEADER_OFFSETS[1 - slot], "a header")?;
    src.flush()?;
    Ok(())
}

pub(super) fn read_regions(src: &Src, warnings: &mut Vec<Warning>) -> Result<RegionTable> {
    let mut errs = Vec::new();
    let mut tables = Vec::new();
    for (i, off) in REGION_OFFSETS.iter().enumerate() {
        let b = src.read_vec(64 * 1024, *off, "a region table")?;
        match RegionTable::decode(&b) {
            Ok(t) => tables.push(t),
            Err(e) => errs.push(Warning::new(
                "region table",
                *off,
                format!("region table copy {} at {off:#x}: {e}", i + 1),
            )),
        }
    }
    if tables.is_empty() {
        return Err(Error::corrupt(
            &src.path,
            "region table",
            REGION_OFFSETS[0],
            errs.iter()
                .map(|w| w.detail.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    warnings.extend(errs);
    Ok(tables.swap_remove(0))
}

pub(super) fn check_region(path: &Path, r: &RegionEntry, file_len: u64) -> Result<()> {
    if r.file_offset < MIB
        || !r.file_offset.is_multiple_of(MIB)
        || u64::from(r.length) % MIB != 0
        || r.length == 0
    {
        return Err(Error::corrupt(
            path,
            "region table",
            REGION_OFFSETS[0],
            format!(
                "region {{{}}} at {:#x} length {:#x} is not a 1 MiB aligned span after the header section",
                r.guid, r.file_offset, r.length
            ),
        ));
    }
    if r.file_offset
        .checked_add(u64::from(r.length))
        .is_none_or(|e| e > file_len)
    {
        return Err(Error::corrupt(
            path,
            "region table",
            REGION_OFFSETS[0],
            format!(
                "region {{{}}} at {:#x} length {:#x} ends past the end of the file ({file_len} bytes)",
                r.guid, r.file_offset, r.length
            ),
        ));
    }
    Ok(())
}

pub(super) fn read_metadata(src: &Src, region: &RegionEntry) -> Result<Meta> {
    let base = region.file_offset;
    let table = src.read_vec(64 * 1024, base, "the metadata table")?;
    let entries = md::decode_table(&table)
        .map_err(|e| Error::corrupt(&src.path, "metadata table", base, e))?;
    check_table(&src.path, base, u64::from(region.length), &entries)?;
    let items = Items {
        src,
        base,
        entries: &entries,
    };
    let params = FileParameters::decode(&items.need(md::FILE_PARAMETERS, "File Parameters", 8)?);
    let virtual_size =
        md::decode_u64(&items.need(md::VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8)?);
    let disk_id = fx::guid(&items.need(md::VIRTUAL_DISK_ID, "Virtual Disk ID", 16)?);
    let sector =
        |g, name| -> Result<u64> { Ok(u64::from(md::decode_u32(&items.need(g, name, 4)?))) };
    let logical_sector = sector(md::LOGICAL_SECTOR_SIZE, "Logical Sector Size")?;
    let physical_sector = sector(md::PHYSICAL_SECTOR_SIZE, "Physical Sector Size")?;
    let mut meta = Meta {
        entries: entries.clone(),
        params,
        virtual_size,
        disk_id,
        logical_sector,
        physical_sector,
        locator: None,
    };
    check_values(&items, &meta)?;
    meta.locator = match items.get(md::PARENT_LOCATOR, 20)? {
        Some(b) => Some(ParentLocator::decode(&b).map_err(|e| {
            Error::corrupt(&src.path, "parent locator", items.at(md::PARENT_LOCATOR), e)
        })?),
        None => None,
    };
    if meta.params.has_parent && meta.locator.is_none() {
        return Err(Error::corrupt(
            &src.path,
            "File Parameters",
            items.at(md::FILE_PARAMETERS),
            "HasParent is set but there is no parent locator",
        ));
    }
    Ok(meta)
}

/// The table's own rules: every item inside the region and apart from the
/// others, and no unknown item that is required.
fn check_table(path: &Path, base: u64, region_len: u64, entries: &[MetadataEntry]) -> Result<()> {
    let mut spans = Vec::new();
    for e in entries.iter().filter(|e| e.length > 0) {
        if u64::from(e.offset) < 64 * 1024
            || u64::from(e.offset) + u64::from(e.length) > region_len
            || e.length > 1 << 20
        {
            return Err(Error::corrupt(
                path,
                "metadata table",
                base,
                format!(
                    "item {{{}}} at offset {:#x} length {:#x} lies outside the metadata region",
                    e.item, e.offset, e.length
                ),
            ));
        }
        spans.push((e.offset, e.length));
        if (!md::KNOWN_ITEMS.contains(&e.item) || e.is_user()) && e.is_required() && !e.is_user() {
            return Err(Error::unsupported(
                path,
                "metadata item",
                format!("unknown required item {{{}}}", e.item),
            ));
        }
    }
    spans.sort();
    if spans
        .windows(2)
        .any(|w| u64::from(w[0].0) + u64::from(w[0].1) > u64::from(w[1].0))
    {
        return Err(Error::corrupt(
            path,
            "metadata table",
            base,
            "items overlap",
        ));
    }
    Ok(())
}

/// The system items of a metadata table, read from the file on demand.
struct Items<'a> {
    src: &'a Src,
    base: u64,
    entries: &'a [MetadataEntry],
}

impl Items<'_> {
    /// An item's bytes (at least `min`), or `None` when the table lacks it.
    fn get(&self, g: Uuid, min: usize) -> Result<Option<Vec<u8>>> {
        let Some(e) = self.entries.iter().find(|e| e.item == g && !e.is_user()) else {
            return Ok(None);
        };
        let at = self.base + u64::from(e.offset);
        if (e.length as usize) < min {
            return Err(Error::corrupt(
                &self.src.path,
                "metadata item",
                at,
                format!(
                    "item {{{g}}} is {} bytes, at least {min} expected",
                    e.length
                ),
            ));
        }
        Ok(Some(self.src.read_vec(
            e.length as usize,
            at,
            "a metadata item",
        )?))
    }

    /// A required item's bytes.
    fn need(&self, g: Uuid, name: &str, min: usize) -> Result<Vec<u8>> {
        self.get(g, min)?.ok_or_else(|| {
            Error::corrupt(
                &self.src.path,
                "metadata table",
                self.base,
                format!("required item {name} is missing"),
            )
        })
    }

    /// Where an item starts in the file (the table's start if absent).
    fn at(&self, g: Uuid) -> u64 {
        self.base
            + self
                .entries
                .iter()
                .find(|e| e.item == g)
                .map_or(0, |e| u64::from(e.offset))
    }
}

/// The values MS-VHDX allows: block size, sector sizes, virtual size.
fn check_values(items: &Items, m: &Meta) -> Result<()> {
    let path = &items.src.path;
    let bs = m.params.block_size;
    if !bs.is_power_of_two() || !(1 << 20..=256 << 20).contains(&bs) {
        return Err(Error::corrupt(
            path,
            "File Parameters",
            items.at(md::FILE_PARAMETERS),
            format!("block size {bs} is not a power of two between 1 MiB and 256 MiB"),
        ));
    }
    for (size, name, g) in [
        (
            m.logical_sector,
            "Logical Sector Size",
            md::LOGICAL_SECTOR_SIZE,
        ),
        (
            m.physical_sector,
            "Physical Sector Size",
            md::PHYSICAL_SECTOR_SIZE,
        ),
    ] {
        if size != 512 && size != 4096 {
            return Err(Error::corrupt(
                path,
                name,
                items.at(g),
                format!("{size} is neither 512 nor 4096"),
            ));
        }
    }
    let (size, ls) = (m.virtual_size, m.logical_sector);
    if size == 0 || size > MAX_TB || !size.is_multiple_of(ls) {
        return Err(Error::corrupt(
            path,
            "Virtual Disk Size",
            items.at(md::VIRTUAL_DISK_SIZE),
            format!("{size} is not a non-zero multiple of {ls} up to 64 TiB"),
        ));
    }
    Ok(())
}
