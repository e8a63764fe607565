//! Creating disks: dynamic and fixed VHDX and VHD, and differencing
//! children of either. New files are written completely, flushed, and only
//! then given their final name, so a crash never leaves a half-made disk.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::vhd::VhdDisk;
use super::vhdx::VhdxDisk;
use super::{Format, Kind, Layer};
use crate::error::{Error, Result};
use crate::format::vhd::{self as fv, DynHeader, Footer, Locator};
use crate::format::vhdx::bat::{self, Geometry};
use crate::format::vhdx::header::Header;
use crate::format::vhdx::metadata::{self as md, FileParameters, MetadataEntry, ParentLocator};
use crate::format::vhdx::region::{self, RegionEntry, RegionTable};
use crate::format::vhdx::{self as fx, HEADER_OFFSETS, MIB, REGION_OFFSETS};
use crate::io::{FileStorage, Storage};

#[derive(Debug, Clone)]
pub struct VhdxOptions {
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector: u64,
    pub physical_sector: u64,
    pub fixed: bool,
}

impl Default for VhdxOptions {
    fn default() -> Self {
        VhdxOptions {
            virtual_size: 1 << 30,
            block_size: 32 << 20,
            logical_sector: 512,
            physical_sector: 4096,
            fixed: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VhdOptions {
    pub size: u64,
    pub block_size: u64,
    pub fixed: bool,
}

impl Default for VhdOptions {
    fn default() -> Self {
        VhdOptions {
            size: 1 << 30,
            block_size: 2 << 20,
            fixed: false,
        }
    }
}

/// What `vhdmerge create` makes: a dynamic or fixed disk of `size`, or a
/// differencing child of `parent`. The defaults are the ones Hyper-V
/// uses (see `VhdxOptions` and `VhdOptions`).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The virtual size; a child takes its parent's.
    pub size: Option<u64>,
    /// By default from the file name: `.vhd` and `.avhd` make a VHD,
    /// anything else a VHDX.
    pub format: Option<Format>,
    pub block_size: Option<u64>,
    pub logical_sector: u64,
    pub physical_sector: u64,
    pub fixed: bool,
    pub parent: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        let v = VhdxOptions::default();
        CreateOptions {
            size: None,
            format: None,
            block_size: None,
            logical_sector: v.logical_sector,
            physical_sector: v.physical_sector,
            fixed: false,
            parent: None,
        }
    }
}

/// The format a new file of this name gets when none is asked for.
pub fn format_for_name(path: &Path) -> Format {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "vhd" | "avhd" => Format::Vhd,
        _ => Format::Vhdx,
    }
}

/// Creates the disk `o` describes.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    if let Some(parent) = &o.parent {
        return create_child(path, parent, o.block_size);
    }
    let size = o.size.ok_or_else(|| {
        invalid(
            path,
            "a size is needed (or a parent, for a differencing child)".into(),
        )
    })?;
    match o.format.unwrap_or_else(|| format_for_name(path)) {
        Format::Vhd => create_vhd(
            path,
            &VhdOptions {
                size,
                block_size: o.block_size.unwrap_or(VhdOptions::default().block_size),
                fixed: o.fixed,
            },
        ),
        _ => create_vhdx(
            path,
            &VhdxOptions {
                virtual_size: size,
                block_size: o.block_size.unwrap_or(VhdxOptions::default().block_size),
                logical_sector: o.logical_sector,
                physical_sector: o.physical_sector,
                fixed: o.fixed,
            },
        ),
    }
}

fn invalid(path: &Path, detail: String) -> Error {
    Error::CannotCreate {
        path: path.to_path_buf(),
        detail,
    }
}

/// Writes a new file at a temporary name beside `path`, flushes it, and
/// renames it into place without replacing an existing file.
fn write_new(path: &Path, fill: impl FnOnce(&FileStorage) -> Result<()>) -> Result<()> {
    if path.exists() {
        return Err(invalid(path, "the file already exists".into()));
    }
    let dir = crate::paths::folder_of(path);
    let tmp = tempfile::Builder::new()
        .prefix(".vhdmerge-new-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, "creating a temporary file", e))?;
    let (file, tmp_path) = tmp.into_parts();
    let storage = FileStorage::from_file(file, path);
    fill(&storage)?;
    storage
        .flush()
        .map_err(|e| Error::io(path, "flushing", e))?;
    tmp_path
        .persist_noclobber(path)
        .map_err(|e| Error::io(path, "renaming into place", e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "syncing the folder", e))?;
    Ok(())
}

fn check_vhdx(path: &Path, o: &VhdxOptions) -> Result<()> {
    if !o.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&o.block_size) {
        return Err(invalid(
            path,
            format!(
                "block size {} is not a power of two from 1 MiB to 256 MiB",
                o.block_size
            ),
        ));
    }
    for s in [o.logical_sector, o.physical_sector] {
        if s != 512 && s != 4096 {
            return Err(invalid(
                path,
                format!("sector size {s} is neither 512 nor 4096"),
            ));
        }
    }
    if o.virtual_size == 0
        || !o.virtual_size.is_multiple_of(o.logical_sector)
        || o.virtual_size > 64 << 40
    {
        return Err(invalid(
            path,
            format!(
                "virtual size {} is not a non-zero multiple of {} up to 64 TiB",
                o.virtual_size, o.logical_sector
            ),
        ));
    }
    Ok(())
}

struct VhdxLayout {
    params: FileParameters,
    opts: VhdxOptions,
    disk_id: Uuid,
    data_write_guid: Uuid,
    locator: Option<ParentLocator>,
}

/// Layout: headers, log at 1 MiB (1 MiB), metadata at 2 MiB (1 MiB), BAT at
/// 3 MiB, payload after the BAT (the same order qemu-img uses).
fn write_vhdx(io: &FileStorage, path: &Path, l: &VhdxLayout) -> Result<()> {
    let w = |buf: &[u8], off: u64| {
        io.write_at(buf, off)
            .map_err(|e| Error::io(path, "writing", e))
    };
    let o = &l.opts;
    let geo = Geometry {
        virtual_size: o.virtual_size,
        block_size: o.block_size,
        logical_sector: o.logical_sector,
    };
    let entries = geo.entries(l.params.has_parent).max(geo.entries(true));
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let (log_off, meta_off, bat_off) = (MIB, 2 * MIB, 3 * MIB);
    let data_off = bat_off + bat_len;
    w(&fx::encode_file_id("vhdmerge"), 0)?;
    let mut h = Header {
        sequence: 1,
        file_write_guid: crate::guid::fresh(),
        data_write_guid: l.data_write_guid,
        log_guid: Uuid::nil(),
        log_version: 0,
        version: 1,
        log_length: MIB as u32,
        log_offset: log_off,
    };
    w(&h.encode(), HEADER_OFFSETS[0])?;
    h.sequence = 2;
    w(&h.encode(), HEADER_OFFSETS[1])?;
    let regions = RegionTable {
        entries: vec![
            RegionEntry {
                guid: region::BAT_GUID,
                file_offset: bat_off,
                length: bat_len as u32,
                required: true,
            },
            RegionEntry {
                guid: region::METADATA_GUID,
                file_offset: meta_off,
                length: MIB as u32,
                required: true,
            },
        ],
    };
    let rt = regions.encode();
    w(&rt, REGION_OFFSETS[0])?;
    w(&rt, REGION_OFFSETS[1])?;
    w(&metadata_region(l), meta_off)?;
    let mut end = data_off;
    if o.fixed {
        let mut table = vec![0u8; (entries * 8) as usize];
        for b in 0..geo.payload_blocks() {
            let e = bat::entry(bat::PAYLOAD_FULLY_PRESENT, data_off + b * o.block_size);
            let i = geo.pb_index(b) as usize * 8;
            table[i..i + 8].copy_from_slice(&e.to_le_bytes());
        }
        w(&table, bat_off)?;
        end = data_off + geo.payload_blocks() * o.block_size;
    }
    io.set_len(end).map_err(|e| Error::io(path, "sizing", e))
}

fn metadata_region(l: &VhdxLayout) -> Vec<u8> {
    let o = &l.opts;
    let mut items: Vec<(Uuid, u32, Vec<u8>)> = vec![
        (md::FILE_PARAMETERS, md::FLAG_REQUIRED, l.params.encode()),
        (
            md::VIRTUAL_DISK_SIZE,
            md::FLAG_REQUIRED | md::FLAG_VIRTUAL_DISK,
            o.virtual_size.to_le_bytes().to_vec(),
        ),
        (
            md::VIRTUAL_DISK_ID,
            md::FLAG_REQUIRED | md::FLAG_VIRTUAL_DISK,
            l.disk_id.to_bytes_le().to_vec(),
        ),
        (
            md::LOGICAL_SECTOR_SIZE,
            md::FLAG_REQUIRED | md::FLAG_VIRTUAL_DISK,
            (o.logical_sector as u32).to_le_bytes().to_vec(),
        ),
        (
            md::PHYSICAL_SECTOR_SIZE,
            md::FLAG_REQUIRED | md::FLAG_VIRTUAL_DISK,
            (o.physical_sector as u32).to_le_bytes().to_vec(),
        ),
    ];
    if let Some(loc) = &l.locator {
        items.push((md::PARENT_LOCATOR, md::FLAG_REQUIRED, loc.encode()));
    }
    let mut region = vec![0u8; MIB as usize];
    let mut entries = Vec::new();
    let mut at = 64 * 1024u32;
    for (item, flags, body) in items {
        region[at as usize..at as usize + body.len()].copy_from_slice(&body);
        entries.push(MetadataEntry {
            item,
            offset: at,
            length: body.len() as u32,
            flags,
        });
        at = (at + body.len() as u32).next_multiple_of(8);
    }
    let table = md::encode_table(&entries);
    region[..table.len()].copy_from_slice(&table);
    region
}

pub fn create_vhdx(path: &Path, o: &VhdxOptions) -> Result<()> {
    check_vhdx(path, o)?;
    let layout = VhdxLayout {
        params: FileParameters {
            block_size: o.block_size as u32,
            leave_block_allocated: o.fixed,
            has_parent: false,
        },
        opts: o.clone(),
        disk_id: crate::guid::fresh(),
        data_write_guid: crate::guid::fresh(),
        locator: None,
    };
    write_new(path, |io| write_vhdx(io, path, &layout))
}

/// A relative path from `child`'s folder to `parent`, Windows style.
pub fn relative_win_path(child: &Path, parent: &Path) -> String {
    let cdir = std::fs::canonicalize(crate::paths::folder_of(child)).unwrap_or_default();
    let p = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    match p.strip_prefix(&cdir) {
        Ok(rest) => format!(".\\{}", rest.to_string_lossy().replace('/', "\\")),
        Err(_) => {
            let common = cdir
                .ancestors()
                .find(|a| p.starts_with(a))
                .unwrap_or(Path::new("/"));
            let ups = cdir
                .strip_prefix(common)
                .map(|r| r.components().count())
                .unwrap_or(0);
            let rest = p
                .strip_prefix(common)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('/', "\\");
            format!("{}{}", "..\\".repeat(ups), rest)
        }
    }
}

/// Creates a differencing child of `parent` (VHDX or VHD, like the parent).
pub fn create_child(path: &Path, parent: &Path, block_size: Option<u64>) -> Result<()> {
    let layer = super::open_layer(parent, false)?;
    match layer.format() {
        super::Format::Vhdx => {
            let p = layer_as_vhdx(parent)?;
            let o = VhdxOptions {
                virtual_size: p.virtual_size,
                block_size: block_size.unwrap_or(p.geometry().block_size),
                logical_sector: p.logical_sector,
                physical_sector: p.physical_sector,
                fixed: false,
            };
            check_vhdx(path, &o)?;
            let mut loc = ParentLocator::default();
            loc.set("parent_linkage", &md::braced(&p.header().data_write_guid));
            loc.set("relative_path", &relative_win_path(path, parent));
            if let Some(name) = parent.file_name() {
                // No Windows drive exists here; the file name lets Windows
                // tools (and our own lookup by name) find the parent.
                loc.set(
                    "absolute_win32_path",
                    &format!("\\\\?\\C:\\{}", name.to_string_lossy()),
                );
            }
            let layout = VhdxLayout {
                params: FileParameters {
                    block_size: o.block_size as u32,
                    leave_block_allocated: false,
                    has_parent: true,
                },
                opts: o,
                disk_id: p.disk_id,
                data_write_guid: crate::guid::fresh(),
                locator: Some(loc),
            };
            write_new(path, |io| write_vhdx(io, path, &layout))
        }
        super::Format::Vhd => {
            let p = VhdDisk::open(parent, false)?;
            let bs = block_size.unwrap_or_else(|| p.block_size());
            write_new(path, |io| {
                write_vhd(
                    io,
                    path,
                    p.virtual_size(),
                    bs,
                    fv::TYPE_DIFFERENCING,
                    Some((&p, parent)),
                )
            })
        }
        super::Format::Raw => Err(invalid(path, "a raw file cannot be a parent".into())),
    }
}

fn layer_as_vhdx(path: &Path) -> Result<VhdxDisk> {
    VhdxDisk::open(path, false)
}

pub fn create_vhd(path: &Path, o: &VhdOptions) -> Result<()> {
    if o.size == 0 || !o.size.is_multiple_of(512) || o.size / 512 > fv::MAX_SECTORS {
        return Err(invalid(
            path,
            format!(
                "size {} is not a non-zero multiple of 512 up to 2040 GiB",
                o.size
            ),
        ));
    }
    let kind = if o.fixed {
        fv::TYPE_FIXED
    } else {
        fv::TYPE_DYNAMIC
    };
    write_new(path, |io| {
        write_vhd(io, path, o.size, o.block_size, kind, None)
    })
}

fn timestamp_now() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_sub(fv::TIMESTAMP_BASE) as u32
}

/// Layout of dynamic/differencing files: footer copy at 0, dynamic header
/// at 512, parent locator data, BAT, blocks, footer.
fn write_vhd(
    io: &FileStorage,
    path: &Path,
    size: u64,
    bs: u64,
    kind: u32,
    parent: Option<(&VhdDisk, &Path)>,
) -> Result<()> {
    let w = |buf: &[u8], off: u64| {
        io.write_at(buf, off)
            .map_err(|e| Error::io(path, "writing", e))
    };
    if !bs.is_power_of_two() || !(512..=256 * MIB).contains(&bs) {
        return Err(invalid(
            path,
            format!("VHD block size {bs} is not a power of two from 512 bytes to 256 MiB"),
        ));
    }
    let footer = new_footer(size, kind);
    if kind == fv::TYPE_FIXED {
        return w(&footer.encode(), size);
    }
    let entries = size.div_ceil(bs);
    let mut header = DynHeader {
        data_offset: u64::MAX,
        table_offset: 512 + 1024,
        version: 0x0001_0000,
        max_table_entries: entries as u32,
        block_size: bs as u32,
        checksum: 0,
        parent_unique_id: Uuid::nil(),
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Vec::new(),
    };
    if let Some((p, ppath)) = parent {
        header.table_offset = write_locators(&w, &mut header, path, p, ppath)?;
    }
    let table_len = (entries * 4).next_multiple_of(512);
    w(&vec![0xFF; table_len as usize], header.table_offset)?;
    let fb = footer.encode();
    w(&fb, 0)?;
    w(&header.encode(), 512)?;
    w(&fb, header.table_offset + table_len)
}

/// A footer for a new disk of `size` bytes and type `kind`.
fn new_footer(size: u64, kind: u32) -> Footer {
    let (c, h, s) = fv::geometry(size);
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: match kind == fv::TYPE_FIXED {
            true => u64::MAX,
            false => 512,
        },
        timestamp: timestamp_now(),
        creator_app: *b"vhdm",
        creator_version: 0x0001_0000,
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        cylinders: c,
        heads: h,
        sectors_per_track: s,
        disk_type: kind,
        checksum: 0,
        unique_id: crate::guid::fresh(),
        saved_state: 0,
    }
}

/// Names the parent in a new child's header (unique id, name) and writes
/// its W2ku and W2ru locators after the header; returns where the BAT
/// goes, after them.
fn write_locators(
    w: &dyn Fn(&[u8], u64) -> Result<()>,
    header: &mut DynHeader,
    path: &Path,
    parent: &VhdDisk,
    ppath: &Path,
) -> Result<u64> {
    header.parent_unique_id = parent.footer.unique_id;
    header.parent_name = ppath
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let rel = relative_win_path(path, ppath);
    let abs = format!("C:\\{}", header.parent_name);
    let mut pos = header.table_offset;
    for (code, text) in [(*b"W2ku", abs), (*b"W2ru", rel)] {
        let data: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let space = (data.len() as u64).next_multiple_of(512);
        w(&data, pos)?;
        header.locators.push(Locator {
            code,
            data_space: (space / 512) as u32,
            data_length: data.len() as u32,
            data_offset: pos,
        });
        pos += space;
    }
    Ok(pos)
}

/// The kind a new disk will have, for messages.
pub fn describe(kind: Kind) -> &'static str {
    match kind {
        Kind::Fixed => "fixed",
        Kind::Dynamic => "dynamic",
        Kind::Differencing => "differencing",
    }
}
