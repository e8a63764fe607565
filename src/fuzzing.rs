//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the bounded
//! structured fuzz that runs on stable in CI (`tests/fuzz.rs`). Each takes
//! arbitrary bytes and must return without panicking, hanging or allocating
//! more than the input justifies; a wrong answer that can be detected (data
//! written and committed but read back differently) panics on purpose so
//! the fuzzer reports it. Not a stable API.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::disk::{Extent, Layer, open_layer_with};
use crate::format::vhdx::{HEADER_OFFSETS, REGION_OFFSETS, crc_with_zeroed};
use crate::io::{MemStorage, Storage};

/// Writes beyond this many bytes past the input's end are refused by the
/// in-memory file: a hostile offset must not make the harness allocate.
const GROWTH: u64 = 64 << 20;
/// Map calls per walk: a 64 TiB disk of 1 MiB blocks must not take minutes.
const MAX_MAPS: usize = 4096;
/// Bytes read per walk.
const MAX_READ: u64 = 16 << 20;

/// An in-memory file shared between the layer that writes it and the
/// harness that reads it back, refusing growth past a cap.
#[derive(Clone)]
struct Mem {
    inner: Arc<MemStorage>,
    cap: u64,
}

impl Mem {
    fn new(data: &[u8]) -> Mem {
        Mem {
            inner: Arc::new(MemStorage::new(data.to_vec())),
            cap: data.len() as u64 + GROWTH,
        }
    }
    fn bytes(&self) -> Vec<u8> {
        let len = self.inner.len().unwrap_or(0) as usize;
        let mut b = vec![0u8; len];
        let _ = self.inner.read_at(&mut b, 0);
        b
    }
    fn within(&self, end: Option<u64>) -> std::io::Result<()> {
        match end {
            Some(e) if e <= self.cap => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "fuzz harness: file would grow past its cap",
            )),
        }
    }
}

impl Storage for Mem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.within(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.within(Some(len))?;
        self.inner.set_len(len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

fn open(mem: &Mem, writable: bool) -> crate::Result<Box<dyn Layer>> {
    open_layer_with(Path::new("fuzz-input"), Box::new(mem.clone()), writable)
}

/// Reads a layer the way `info` and `export` do: its description, then a
/// bounded walk over the map from the start and at spread-out offsets.
fn walk(layer: &dyn Layer) {
    let _ = layer.info();
    let _ = layer.parent_ref();
    let size = layer.virtual_size();
    let mut read = 0u64;
    let visit = |offset: u64, read: &mut u64| -> Option<u64> {
        let (extent, len) = layer.map(offset, size - offset).ok()?;
        assert!(
            len > 0 && len <= size - offset,
            "map({offset}) returned a run of {len} bytes in a disk of {size}"
        );
        if let Extent::Data(at) = extent {
            let n = len.min(1 << 20).min(MAX_READ - *read);
            let mut buf = vec![0u8; n as usize];
            let _ = layer.read_data(at, &mut buf);
            *read += n;
        }
        Some(len)
    };
    let mut offset = 0u64;
    for _ in 0..MAX_MAPS / 2 {
        if offset >= size || read >= MAX_READ {
            break;
        }
        match visit(offset, &mut read) {
            Some(len) => offset += len,
            None => break,
        }
    }
    for i in 0..(MAX_MAPS / 2) as u64 {
        let at = (size / (MAX_MAPS / 2) as u64).saturating_mul(i) & !511;
        if at >= size || read >= MAX_READ || visit(at, &mut read).is_none() {
            break;
        }
    }
}

/// One whole file, VHDX or VHD, as read-only and as writable: open, walk;
/// then write one sector, commit, close, reopen and read it back.
pub fn image(data: &[u8]) {
    let mem = Mem::new(data);
    if let Ok(layer) = open(&mem, false) {
        walk(layer.as_ref());
    }
    let Ok(mut layer) = open(&mem, true) else {
        return;
    };
    let sector = layer.logical_sector_size();
    let size = layer.virtual_size();
    if sector == 0 || size < sector {
        return;
    }
    // The last sector: far from the metadata at the front, and it makes
    // the writer allocate the last block.
    let at = (size / sector - 1) * sector;
    let pattern = vec![0xA5u8; sector as usize];
    let written = layer.write(at, &pattern).is_ok() && layer.commit().is_ok();
    let closed = layer.close().is_ok();
    drop(layer);
    if !(written && closed) {
        return;
    }
    let after = Mem::new(&mem.bytes());
    let layer = open(&after, false).expect("a file this library just wrote and committed opens");
    let (extent, _) = layer.map(at, sector).expect("the written sector maps");
    let Extent::Data(file_at) = extent else {
        panic!("the written sector maps to {extent:?}, not to data");
    };
    let mut back = vec![0u8; sector as usize];
    layer
        .read_data(file_at, &mut back)
        .expect("the written sector reads");
    assert_eq!(back, pattern, "committed sector read back differently");
    walk(layer.as_ref());
}

/// Like [`image`], after making every VHDX checksum right, so that the
/// fuzzer's changes reach the fields behind the checksums.
pub fn vhdx(data: &[u8]) {
    let mut b = data.to_vec();
    fix_vhdx_checksums(&mut b);
    image(&b);
}

/// Like [`image`], after making the VHD footer (and its copy) and the
/// dynamic header checksums right.
pub fn vhd(data: &[u8]) {
    let mut b = data.to_vec();
    fix_vhd_checksums(&mut b);
    image(&b);
}

/// The VHDX log: `data` replaces the log region of a small valid VHDX whose
/// header names a live log, with entry checksums and the log GUID made
/// right, then the file is opened (replay in memory, and on disk).
pub fn log(data: &[u8]) {
    let (template, offset, length, guid) = log_template();
    let (offset, length, guid) = (*offset, *length, *guid);
    let mut b = template.clone();
    let region = &mut b[offset..offset + length];
    let n = data.len().min(length);
    region[..n].copy_from_slice(&data[..n]);
    fix_log_entries(region, guid);
    image(&b);
}

/// The journal decoder, on arbitrary bytes.
pub fn journal(data: &[u8]) {
    if let Ok(loaded) = crate::journal::decode(Path::new("fuzz-journal"), data) {
        assert!(loaded.valid_len as usize <= data.len());
        for r in &loaded.records {
            // Re-encoding a decoded record must decode to the same record.
            let again = crate::journal::encode(0, r);
            let back = crate::journal::decode(Path::new("fuzz-journal"), &again);
            if matches!(r, crate::journal::Record::Begin(_)) {
                let back = back.expect("a re-encoded Begin decodes");
                assert_eq!(&back.records[0], r);
            }
        }
    }
}

/// Recomputes both headers' and both region tables' CRC-32C.
pub fn fix_vhdx_checksums(b: &mut [u8]) {
    for (at, len) in HEADER_OFFSETS
        .iter()
        .map(|&o| (o as usize, 4096))
        .chain(REGION_OFFSETS.iter().map(|&o| (o as usize, 64 << 10)))
    {
        if let Some(s) = b.get_mut(at..at + len) {
            let crc = crc_with_zeroed(s, 4);
            s[4..8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Recomputes the VHD footer checksums (at the end and at 0) and the
/// dynamic header's, where its offset points inside the input.
pub fn fix_vhd_checksums(b: &mut [u8]) {
    use crate::format::vhd::checksum;
    let len = b.len();
    for at in [len.saturating_sub(512), 0] {
        if len >= 512 && &b[at..at + 8] == b"conectix" {
            let c = checksum(&b[at..at + 512], 64);
            b[at + 64..at + 68].copy_from_slice(&c.to_be_bytes());
        }
    }
    if len >= 512 {
        let dyn_at = u64::from_be_bytes(b[len - 512 + 16..len - 512 + 24].try_into().expect("8"));
        if let Some(h) = usize::try_from(dyn_at)
            .ok()
            .and_then(|d| b.get_mut(d..d.checked_add(1024)?))
        {
            let c = checksum(h, 36);
            h[36..40].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// Stamps the log GUID into, and recomputes the checksum of, every 4 KiB
/// sector that starts like a log entry.
fn fix_log_entries(log: &mut [u8], guid: uuid::Uuid) {
    let mut at = 0;
    while at + 4096 <= log.len() {
        if &log[at..at + 4] == b"loge" {
            log[at + 32..at + 48].copy_from_slice(&guid.to_bytes_le());
            let len = u32::from_le_bytes(log[at + 8..at + 12].try_into().expect("4")) as usize;
            if len >= 4096 && len.is_multiple_of(4096) && at + len <= log.len() {
                let crc = crc_with_zeroed(&log[at..at + len], 4);
                log[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            }
        }
        at += 4096;
    }
}

type LogTemplate = (Vec<u8>, usize, usize, uuid::Uuid);

/// A 64 MiB dynamic VHDX with a 1 MiB log, its header's LogGuid set: built
/// once per process.
fn log_template() -> &'static LogTemplate {
    static T: OnceLock<LogTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("template.vhdx");
        let o = crate::disk::create::VhdxOptions {
            virtual_size: 64 << 20,
            block_size: 1 << 20,
            ..Default::default()
        };
        crate::disk::create::create_vhdx(&path, &o).expect("the template is created");
        let mut b = std::fs::read(&path).expect("the template reads");
        let guid = uuid::Uuid::from_u128(0x5eed_1095_0000_4000_8000_0000_0000_0001);
        let (mut offset, mut length) = (0usize, 0usize);
        for h in HEADER_OFFSETS {
            let h = h as usize;
            b[h + 48..h + 64].copy_from_slice(&guid.to_bytes_le());
            length = u32::from_le_bytes(b[h + 68..h + 72].try_into().expect("4")) as usize;
            offset = u64::from_le_bytes(b[h + 72..h + 80].try_into().expect("8")) as usize;
        }
        fix_vhdx_checksums(&mut b);
        (b, offset, length, guid)
    })
}
