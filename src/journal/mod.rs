//! The write-ahead journal: record types, framing, writer and reader.
//! The byte layout is specified in `journal-format.md`; this module knows
//! nothing of VHD or VHDX beyond the fields of its records.

pub mod images;
pub mod record;
pub mod state;
pub mod storage;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{FileStorage, Storage, fsops};
pub use record::{Begin, Checkpoint, FileEntry, PlanRecord, Record, Role};
pub use state::State;

/// "VMJR" little-endian: the first four bytes of every record.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMJR");
/// Frames written by this version; it reads versions 1 to 5 (version 1
/// has no Plan or Checkpoint records, version 2 no ZeroImage, version 3
/// no Share or CloneImage, version 4 no FinishOnly).
pub const VERSION: u16 = 5;
pub const FRAME_HEADER: usize = 24;
/// Records larger than this are refused (a before-image batch is far smaller).
pub const MAX_PAYLOAD: u32 = 64 << 20;
pub const SUFFIX: &str = ".vhdmerge-journal";

/// The journal path for an ancestor: beside it, with a fixed suffix.
pub fn path_for(ancestor: &Path) -> PathBuf {
    let mut name = ancestor
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(SUFFIX);
    ancestor.with_file_name(name)
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::legacy().with_limit::<{ MAX_PAYLOAD as usize }>()
}

/// Frames one record: magic, version, kind, sequence, length, CRC-32C.
pub fn encode(seq: u64, rec: &Record) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(rec, bincode_config()).expect("records serialize");
    let mut b = Vec::with_capacity(FRAME_HEADER + payload.len());
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&rec.kind().to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b), &payload);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&payload);
    b
}

/// Why a frame at some offset is not a valid record.
#[derive(Debug, PartialEq, Eq)]
enum FrameFault {
    /// Ran out of bytes: a torn tail.
    Short,
    Bad(String),
    NewerVersion(u16),
}

fn decode_at(
    buf: &[u8],
    at: usize,
    expect_seq: u64,
) -> std::result::Result<(Record, usize), FrameFault> {
    let h = buf.get(at..at + FRAME_HEADER).ok_or(FrameFault::Short)?;
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4"));
    if word(0) != MAGIC {
        return Err(FrameFault::Bad("no record magic".into()));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    let kind = u16::from_le_bytes([h[6], h[7]]);
    let seq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
    let len = word(16);
    if len > MAX_PAYLOAD {
        return Err(FrameFault::Bad(format!(
            "record length {len} exceeds {MAX_PAYLOAD}"
        )));
    }
    let payload = buf
        .get(at + FRAME_HEADER..at + FRAME_HEADER + len as usize)
        .ok_or(FrameFault::Short)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..20]), payload);
    if crc != word(20) {
        return Err(FrameFault::Bad("checksum mismatch".into()));
    }
    if version > VERSION {
        return Err(FrameFault::NewerVersion(version));
    }
    if seq != expect_seq {
        return Err(FrameFault::Bad(format!(
            "sequence {seq}, expected {expect_seq}"
        )));
    }
    let (rec, used): (Record, usize) = bincode::serde::decode_from_slice(payload, bincode_config())
        .map_err(|e| FrameFault::Bad(format!("payload does not decode: {e}")))?;
    if used != payload.len() || rec.kind() != kind {
        return Err(FrameFault::Bad("payload does not match its frame".into()));
    }
    Ok((rec, FRAME_HEADER + len as usize))
}

/// A journal read back: its records up to the first invalid frame, which
/// must be a torn tail (nothing valid follows it).
pub struct Loaded {
    pub records: Vec<Record>,
    /// Bytes of valid records; a writer continues here.
    pub valid_len: u64,
    pub torn_tail: bool,
}

/// Like [`load`], but `None` for a journal that holds no valid frame at all:
/// its Begin record never became durable, so the merge never wrote to any
/// file (every write waits for Begin) and the journal can simply go.
pub fn load_if_begun(path: &Path) -> Result<Option<Loaded>> {
    let buf = std::fs::read(path).map_err(|e| Error::io(path, "reading the journal", e))?;
    // A frame of a newer version is valid (its checksum matched), not a
    // sign that nothing began: `decode` refuses it with the version.
    if decode_at(&buf, 0, 0).is_err_and(|f| !matches!(f, FrameFault::NewerVersion(_)))
        && find_valid_frame(&buf, 0).is_none()
    {
        return Ok(None);
    }
    load(path).map(Some)
}

pub fn load(path: &Path) -> Result<Loaded> {
    let buf = std::fs::read(path).map_err(|e| Error::io(path, "reading the journal", e))?;
    decode(path, &buf)
}

/// Decodes a whole journal held in memory (`path` names it in errors).
pub fn decode(path: &Path, buf: &[u8]) -> Result<Loaded> {
    let mut records = Vec::new();
    let mut at = 0usize;
    loop {
        if at == buf.len() {
            break;
        }
        match decode_at(buf, at, records.len() as u64) {
            Ok((rec, n)) => {
                records.push(rec);
                at += n;
            }
            Err(FrameFault::NewerVersion(v)) => {
                return Err(Error::corrupt(
                    path,
                    "journal record",
                    at as u64,
                    format!(
                        "written by a newer vhdmerge (journal version {v}, this one reads up to {VERSION}); recover with that version"
                    ),
                ));
            }
            Err(fault) => {
                // Corruption before the tail: some later frame is valid.
                if let Some(later) = find_valid_frame(buf, at + 1) {
                    return Err(Error::corrupt(
                        path,
                        "journal record",
                        at as u64,
                        format!(
                            "record {} is damaged ({fault:?}) but a valid record follows at {later:#x}; the journal was corrupted, not torn by a crash, and recovery cannot trust it. Keep the files as they are and restore the disks from a backup",
                            records.len()
                        ),
                    ));
                }
                break;
            }
        }
    }
    if records.is_empty() || !matches!(records[0], Record::Begin(_)) {
        return Err(Error::corrupt(
            path,
            "journal",
            0,
            "no valid Begin record; the journal was never made durable, so the merge never wrote to any disk. Delete the journal file",
        ));
    }
    let torn_tail = at != buf.len();
    Ok(Loaded {
        records,
        valid_len: at as u64,
        torn_tail,
    })
}

/// The first offset at or after `from` holding a valid frame. Crafted input
/// could put the magic at every offset with a large length; the checksum
/// work is capped at a multiple of the journal's size, past which the scan
/// answers as if a valid frame followed (the caller then refuses the
/// journal instead of hanging, which is the safe answer for such a file).
fn find_valid_frame(buf: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut budget = (buf.len() as u64).saturating_mul(8).max(1 << 24);
    let mut i = from;
    while i + FRAME_HEADER <= buf.len() {
        if buf[i..i + 4] == magic {
            let len = u32::from_le_bytes(buf[i + 16..i + 20].try_into().expect("4")) as u64;
            budget = budget.saturating_sub(FRAME_HEADER as u64 + len);
            if budget == 0 {
                return Some(i);
            }
            let seq = u64::from_le_bytes(buf[i + 8..i + 16].try_into().expect("8"));
            if matches!(
                decode_at(buf, i, seq),
                Ok(_) | Err(FrameFault::NewerVersion(_))
            ) {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// Appends records; `sync` makes everything appended so far durable.
pub struct Writer {
    path: PathBuf,
    file: FileStorage,
    len: u64,
    seq: u64,
    pending: Vec<u8>,
    /// Checkpoint records appended so far (in this process): the
    /// write-ahead storage starts imaging afresh after each.
    checkpoints: u64,
    /// Where large before-images are cloned, once enabled.
    images: Option<images::ImageFile>,
    /// A failed spill, reported by the next sync (nothing is synced after it).
    spill_error: Option<Error>,
    /// The journal holds a FinishOnly record.
    finish_only: bool,
}

/// Appended records held in memory beyond this are written to the file
/// (unsynced): the before-images of 32 MiB of held overwrites would
/// otherwise wait in memory beside them.
pub(crate) const SPILL_BYTES: usize = 4 << 20;

impl Writer {
    /// Creates the journal with its Begin record, durable (file and folder)
    /// before this returns. Refuses to replace an existing journal.
    pub fn create(path: &Path, begin: Begin) -> Result<Writer> {
        Writer::create_with(path, begin, &[])
    }

    /// Like `create`, with more records (the merge's Plan, and for a
    /// finish-only merge FinishOnly and a first Checkpoint) made durable
    /// in the same sync as Begin.
    pub fn create_with(path: &Path, begin: Begin, more: &[Record]) -> Result<Writer> {
        let file = FileStorage::create_new(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::WriteRefused {
                    path: path.to_path_buf(),
                    reason: "a journal already exists: an earlier merge did not finish. Run `vhdmerge recover` first".into(),
                }
            } else {
                Error::io(path, "creating the journal", e)
            }
        })?;
        // An image file without its journal is left from a merge that
        // ended between deleting the two: nothing needs it.
        if images::path_for(path).exists() {
            images::remove(path)?;
        }
        let mut w = Writer {
            path: path.to_path_buf(),
            file,
            len: 0,
            seq: 0,
            pending: Vec::new(),
            checkpoints: 0,
            images: None,
            spill_error: None,
            finish_only: false,
        };
        w.append(&Record::Begin(begin));
        for r in more {
            w.append(r);
        }
        w.sync()?;
        sync_dir(path)?;
        Ok(w)
    }

    /// Continues a journal after its last valid record (cutting a torn tail).
    pub fn reopen(path: &Path, loaded: &Loaded) -> Result<Writer> {
        let file = FileStorage::open(path, true)?;
        if file
            .len()
            .map_err(|e| Error::io(path, "reading the journal size", e))?
            != loaded.valid_len
        {
            file.set_len(loaded.valid_len)
                .map_err(|e| Error::io(path, "cutting the torn tail", e))?;
        }
        Ok(Writer {
            path: path.to_path_buf(),
            file,
            len: loaded.valid_len,
            seq: loaded.records.len() as u64,
            pending: Vec::new(),
            checkpoints: 0,
            images: None,
            spill_error: None,
            finish_only: state::finish_only(&loaded.records),
        })
    }

    /// Whether this journal is a finish-only merge's (see
    /// `Record::FinishOnly`): its write-ahead storage images no guest data.
    pub fn finish_only(&self) -> bool {
        self.finish_only
    }

    /// Lets the write-ahead storage clone large before-images into the
    /// image file (a merge that may share blocks turns it on).
    pub fn enable_images(&mut self) {
        if self.images.is_none() {
            self.images = Some(images::ImageFile::new(&self.path));
        }
    }

    /// The image file, when enabled.
    pub fn images(&mut self) -> Option<&mut images::ImageFile> {
        self.images.as_mut()
    }

    pub fn append(&mut self, rec: &Record) {
        self.pending.extend_from_slice(&encode(self.seq, rec));
        self.seq += 1;
        if matches!(rec, Record::FinishOnly) {
            self.finish_only = true;
        }
        if matches!(rec, Record::Checkpoint(_)) {
            self.checkpoints += 1;
        }
        if self.pending.len() >= SPILL_BYTES && self.spill_error.is_none() {
            self.spill_error = self.spill().err();
        }
    }

    /// Writes the appended records to the file without syncing them, to
    /// bound the memory they hold. Harmless to crash safety: a record only
    /// counts once durable, an unsynced tail may survive a crash in any
    /// prefix, and every record that claims something (Checkpoint,
    /// Committed, ...) is appended when its claim already holds. Images
    /// named by CloneImage records are made durable first, as at a sync.
    fn spill(&mut self) -> Result<()> {
        if let Some(i) = self.images.as_mut() {
            i.flush()
                .map_err(|e| Error::io(&images::path_for(&self.path), "flushing", e))?;
        }
        self.file
            .write_at(&self.pending, self.len)
            .map_err(|e| Error::io(&self.path, "writing the journal", e))?;
        self.len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// How many Checkpoint records this writer appended.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn bytes_written(&self) -> u64 {
        self.len + self.pending.len() as u64
    }

    pub fn sync(&mut self) -> Result<()> {
        if let Some(e) = self.spill_error.take() {
            return Err(e);
        }
        // Images before the records that name them.
        if let Some(i) = self.images.as_mut() {
            i.flush()
                .map_err(|e| Error::io(&images::path_for(&self.path), "flushing", e))?;
        }
        if !self.pending.is_empty() {
            self.file
                .write_at(&self.pending, self.len)
                .map_err(|e| Error::io(&self.path, "writing the journal", e))?;
            self.len += self.pending.len() as u64;
            self.pending.clear();
        }
        self.file
            .flush()
            .map_err(|e| Error::io(&self.path, "flushing the journal", e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// fsync the folder holding `path`, after creating, renaming or deleting in it.
pub fn sync_dir(path: &Path) -> Result<()> {
    fsops::sync_dir_of(path).map_err(|e| Error::io(path, "syncing the folder", e))
}

/// Deletes the journal durably.
pub fn remove(path: &Path) -> Result<()> {
    fsops::remove_file(path).map_err(|e| Error::io(path, "deleting the journal", e))?;
    sync_dir(path)?;
    // Only once the journal is durably gone: while it exists, a recovery
    // may need the images.
    if images::path_for(path).exists() {
        images::remove(path)?;
        sync_dir(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn begin() -> Begin {
        Begin {
            tool_version: "t".into(),
            files: vec![],
            merged_levels: 1,
            data_write_guid: None,
            expected_digest: None,
            keep: false,
        }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = Writer::create(&p, begin()).unwrap();
        w.append(&Record::BeforeImage {
            file: 0,
            offset: 4096,
            data: vec![7; 10],
        });
        w.append(&Record::Committed);
        w.sync().unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.records.len(), 3);
        assert!(!l.torn_tail);
        // Cut inside the last record: a torn tail, the rest survives.
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 3).unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.records.len(), 2);
        assert!(l.torn_tail);
    }

    #[test]
    fn corruption_before_the_tail_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = Writer::create(&p, begin()).unwrap();
        w.append(&Record::BeforeImage {
            file: 0,
            offset: 0,
            data: vec![1; 100],
        });
        w.append(&Record::Committed);
        w.sync().unwrap();
        let mut b = std::fs::read(&p).unwrap();
        let first = encode(0, &Record::Begin(begin())).len();
        b[first + FRAME_HEADER + 20] ^= 0xFF;
        std::fs::write(&p, &b).unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(e.contains("corrupted, not torn"), "{e}");
    }

    /// Records beyond SPILL_BYTES go to the file before the sync (memory
    /// stays bounded); the sync makes them all durable, in order.
    #[test]
    fn large_appends_spill_to_the_file_before_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = Writer::create(&p, begin()).unwrap();
        let synced = std::fs::metadata(&p).unwrap().len();
        for k in 0..2000u64 {
            w.append(&Record::BeforeImage {
                file: 0,
                offset: k * 4096,
                data: vec![k as u8; 4096],
            });
        }
        assert!(w.pending.len() < SPILL_BYTES, "{} pending", w.pending.len());
        assert!(std::fs::metadata(&p).unwrap().len() > synced);
        w.sync().unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.records.len(), 2001);
        assert!(
            matches!(&l.records[2000], Record::BeforeImage { offset, data, .. } if *offset == 1999 * 4096 && data[0] == (1999 % 256) as u8)
        );
    }

    #[test]
    fn newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut b = encode(0, &Record::Begin(begin()));
        b[4] = VERSION as u8 + 1;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..20]), &b[FRAME_HEADER..]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(e.contains("newer vhdmerge"), "{e}");
    }
}
