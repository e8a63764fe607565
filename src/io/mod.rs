//! Positioned I/O behind one small trait, so that tests can record, crash or
//! fault-inject every operation. Formats never touch `std::fs::File` directly.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};

/// The I/O seam. All methods take `&self`: positioned I/O needs no cursor.
// A file length is not a collection size: `is_empty` would mean nothing here.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes; past the end of the file is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes guest data of a merge: bytes that a recovery can write again
    /// from the merged files, which a finish-only merge's write-ahead
    /// storage therefore does not image. Default: as `write_at`.
    fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Where data may be (for sparse raw files): the next data offset at or
    /// after `offset`, or `None` if only a hole follows. Default: no holes known.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// The end of the data run that starts at `offset` (the next hole).
    fn next_hole(&self, _offset: u64) -> io::Result<u64> {
        self.len()
    }
    /// The open file behind this storage, if it is one and nothing stands
    /// between (an overlay with replayed log pages has none).
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Puts `len` bytes of `from` at `src_offset` at `offset`: shared
    /// (cloned) where the file system can, copied otherwise. Default: copied.
    fn put_from(
        &self,
        from: &Arc<SharedFile>,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        share::copy_into(self, from, src_offset, offset, len)
    }
}

pub mod mapped;
pub mod share;
pub use share::SharedFile;

/// Whether the `len` bytes at `offset` start with stored data (`true`)
/// or with a hole of the file, which reads as zeros (`false`), and how
/// many of them are alike (at least one).
pub fn stored_run(io: &dyn Storage, offset: u64, len: u64) -> io::Result<(bool, u64)> {
    match io.next_data(offset)? {
        Some(d) if d <= offset => {
            let hole = io.next_hole(offset)?;
            Ok((true, len.min(hole.saturating_sub(offset)).max(1)))
        }
        Some(d) => Ok((false, len.min(d - offset))),
        None => Ok((false, len)),
    }
}

/// Asks the kernel to start reading [offset, offset + len) of a file now
/// (`POSIX_FADV_WILLNEED`): reads of scattered pieces issued one at a time
/// wait for the disk one at a time; announced together, the disk gets
/// them all at once. Only advice: a refusal changes nothing.
pub fn will_need(fd: BorrowedFd<'_>, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(fd, offset, Some(len), rustix::fs::Advice::WillNeed);
    }
}

/// Boxed and shared storages delegate to what they hold.
macro_rules! delegate_storage {
    ($t:ty) => {
        impl Storage for $t {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_data_at(buf, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
                (**self).next_data(offset)
            }
            fn next_hole(&self, offset: u64) -> io::Result<u64> {
                (**self).next_hole(offset)
            }
            fn fd(&self) -> Option<BorrowedFd<'_>> {
                (**self).fd()
            }
            fn put_from(
                &self,
                from: &Arc<SharedFile>,
                src_offset: u64,
                offset: u64,
                len: u64,
            ) -> io::Result<()> {
                (**self).put_from(from, src_offset, offset, len)
            }
        }
    };
}
delegate_storage!(Box<dyn Storage>);
delegate_storage!(std::sync::Arc<dyn Storage>);

#[cfg(feature = "testing")]
pub mod trace;

/// Hands a mutating operation to the test tracer, which may fail it;
/// nothing at all without the `testing` feature.
macro_rules! traced {
    ($op:expr) => {{
        #[cfg(feature = "testing")]
        trace::op($op)?;
    }};
}

/// Whether the tests simulate durability (flushes are then no-ops).
fn skip_sync() -> bool {
    #[cfg(feature = "testing")]
    return trace::skip_sync();
    #[cfg(not(feature = "testing"))]
    false
}

/// A real file. Every mutating operation passes through `traced!`, which
/// tests (the `testing` feature) use to record operations, to build crash
/// states, or to inject faults.
pub struct FileStorage {
    file: File,
    /// The tracer names operations by it.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    path: PathBuf,
    /// Bytes written since write-back was last started.
    unsent: AtomicU64,
    /// A clone changed the file's extent map since the last flush: the
    /// next flush is a full fsync, so that the remapping is durable too.
    remapped: AtomicBool,
}

impl FileStorage {
    pub fn open(path: &Path, writable: bool) -> Result<FileStorage> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "opening", e))?;
        if !meta.is_file() {
            return Err(Error::NotARegularFile {
                path: path.to_path_buf(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "opening", e))?;
        Ok(FileStorage::from_file(file, path))
    }

    pub fn from_file(file: File, path: &Path) -> FileStorage {
        FileStorage {
            file,
            path: path.to_path_buf(),
            unsent: AtomicU64::new(0),
            remapped: AtomicBool::new(false),
        }
    }

    /// Creates a new file (never replacing one); recorded as a create.
    pub fn create_new(path: &Path) -> io::Result<FileStorage> {
        traced!(trace::Op::Create {
            path: path.to_path_buf(),
        });
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(FileStorage::from_file(file, path))
    }

    /// Frees the file's blocks in [offset, offset + len), which then read
    /// as zeros; the length stays. A file system that cannot punch holes
    /// keeps the bytes (only space is lost). For crash purposes this is a
    /// write of zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        traced!(trace::Op::Write {
            path: self.path.clone(),
            offset,
            data: trace::capture_with(len, |_| Ok(()))?,
        });
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            r => Ok(r?),
        }
    }

    /// lseek(SEEK_DATA / SEEK_HOLE); `None` when only a hole follows (ENXIO).
    fn seek(&self, whence: rustix::fs::SeekFrom) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, whence) {
            Ok(v) => Ok(Some(v)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Clones `len` aligned bytes of `from` at `src_offset` to `offset`.
    /// For crash purposes a clone is a write of the source's bytes, and
    /// the tracer records it as one, once it happened (a refused clone
    /// changed nothing).
    fn clone_from(
        &self,
        from: &SharedFile,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        #[cfg(feature = "testing")]
        if trace::emulate_clones() {
            let mut b = vec![0u8; len as usize];
            from.read_at(&mut b, src_offset)?;
            traced!(trace::Op::Write {
                path: self.path.clone(),
                offset,
                data: trace::capture(&b),
            });
            self.file.write_all_at(&b, offset)?;
            self.remapped.store(true, Ordering::Relaxed);
            return Ok(());
        }
        share::clone_range(self.file.as_fd(), offset, from.fd(), src_offset, len)?;
        self.remapped.store(true, Ordering::Relaxed);
        traced!(trace::Op::Write {
            path: self.path.clone(),
            offset,
            data: trace::capture_with(len, |b| from.read_at(b, src_offset))?,
        });
        Ok(())
    }
}

/// Bytes written between two calls of [`start_writeback`].
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writing the file's dirty pages back to the storage now, without
/// waiting (`sync_file_range(WRITE)` over the whole file). A merge writes gigabytes and makes
/// them durable with one fdatasync per batch; left alone, the kernel keeps
/// them in the page cache until a tenth of memory is dirty, so the copy runs
/// at memory speed and then stalls for seconds in fdatasync while the disk,
/// idle until then, catches up. Started at once, write-back overlaps the
/// copy: the disk is busy from the first percent, the copy follows its
/// speed, and the batch's fdatasync finds little left to write (measured
/// in BENCHMARKS.md).
///
/// This is pacing, never ordering: it neither flushes metadata nor the
/// device cache, so what is durable when is still decided by fdatasync
/// alone (journal-format.md §5), and writes not yet issued (held
/// overwrites) are untouched. Without a WAIT flag it does not consume a
/// write-back error either: the next fdatasync still reports it.
fn start_writeback(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a system call on an open descriptor; no memory is passed.
    // Offset 0 and length 0 mean the whole file.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Not every file system or kernel has it: then it is simply not paced.
        Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::ESPIPE) => Ok(()),
        _ => Err(e),
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(feature = "testing")]
        if !trace::carried_out(trace::Op::Write {
            path: self.path.clone(),
            offset,
            data: trace::capture(buf),
        })? {
            return Ok(());
        }
        self.file.write_all_at(buf, offset)?;
        let unsent = self.unsent.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64;
        if unsent >= WRITEBACK_EVERY && !skip_sync() {
            self.unsent.store(0, Ordering::Relaxed);
            start_writeback(&self.file)?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        traced!(trace::Op::Flush {
            path: self.path.clone(),
        });
        if skip_sync() {
            return Ok(());
        }
        if self.remapped.swap(false, Ordering::Relaxed) {
            return self.file.sync_all();
        }
        self.file.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        traced!(trace::Op::SetLen {
            path: self.path.clone(),
            len,
        });
        self.file.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.seek(rustix::fs::SeekFrom::Data(offset)) {
            Ok(v) => Ok(v),
            // File systems without SEEK_DATA: treat everything as data.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok((offset < self.len()?).then_some(offset))
            }
            Err(e) => Err(e),
        }
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match self.seek(rustix::fs::SeekFrom::Hole(offset)) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => self.len(),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.len()
            }
            Err(e) => Err(e),
        }
    }
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
    fn put_from(
        &self,
        from: &Arc<SharedFile>,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let (head, middle) = from.split(src_offset, offset, len);
        if middle == 0 {
            return share::copy_into(self, from, src_offset, offset, len);
        }
        share::copy_into(self, from, src_offset, offset, head)?;
        let (s, o) = (src_offset + head, offset + head);
        match self.clone_from(from, s, o, middle) {
            Ok(()) => from.count(middle, 0),
            // The pair cannot share blocks: copy this and everything after.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                from.disable();
                share::copy_into(self, from, s, o, middle)?;
            }
            Err(e) => return Err(e),
        }
        let done = head + middle;
        share::copy_into(self, from, src_offset + done, offset + done, len - done)
    }
}

/// An in-memory file, for tests and for building images before writing them.
#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> MemStorage {
        MemStorage {
            data: RwLock::new(data),
        }
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the file",
    )
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(data.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        let end = start + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data.resize(len as usize, 0);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
}

/// A copy-on-write view over a read-only storage. VHDX log replay for a
/// read-only open writes here, so `info` and `export` of a file with a
/// pending log show the replayed contents without modifying the file.
pub struct Overlay<S: Storage> {
    base: S,
    pages: RwLock<BTreeMap<u64, Box<[u8]>>>,
    len: RwLock<u64>,
}

const PAGE: u64 = 4096;

impl<S: Storage> Overlay<S> {
    pub fn new(base: S) -> io::Result<Overlay<S>> {
        let len = base.len()?;
        Ok(Overlay {
            base,
            pages: RwLock::new(BTreeMap::new()),
            len: RwLock::new(len),
        })
    }

    fn read_page(&self, page: u64, out: &mut [u8]) -> io::Result<()> {
        if let Some(p) = self
            .pages
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&page)
        {
            out.copy_from_slice(p);
            return Ok(());
        }
        out.fill(0);
        let base_len = self.base.len()?;
        let start = page * PAGE;
        if start < base_len {
            let n = (base_len - start).min(PAGE) as usize;
            self.base.read_at(&mut out[..n], start)?;
        }
        Ok(())
    }
}

impl<S: Storage> Storage for Overlay<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > self.len()? {
            return Err(eof());
        }
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let first = offset / PAGE;
        let last = (end.max(1) - 1) / PAGE;
        let touched = pages.range(first..=last).next().is_some();
        drop(pages);
        if !touched && end <= self.base.len()? {
            return self.base.read_at(buf, offset);
        }
        let mut page = vec![0u8; PAGE as usize];
        let mut pos = offset;
        while pos < end {
            let p = pos / PAGE;
            self.read_page(p, &mut page)?;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE as usize) - in_page).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&page[in_page..in_page + n]);
            pos += n as u64;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let p = pos / PAGE;
            let mut page = vec![0u8; PAGE as usize];
            self.read_page(p, &mut page)?;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE as usize) - in_page).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            page[in_page..in_page + n].copy_from_slice(&buf[at..at + n]);
            self.pages
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p, page.into_boxed_slice());
            pos += n as u64;
        }
        let mut len = self.len.write().unwrap_or_else(|e| e.into_inner());
        *len = (*len).max(end);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&self, new_len: u64) -> io::Result<()> {
        let mut len = self.len.write().unwrap_or_else(|e| e.into_inner());
        if new_len < *len {
            return Err(io::Error::other("an overlay cannot shrink its base"));
        }
        *len = new_len;
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(*self.len.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A storage together with the path it came from, so that every error names
/// the file. Format code reads and writes through this.
pub struct Src {
    pub path: PathBuf,
    pub io: Box<dyn Storage>,
}

impl Src {
    pub fn new(path: &Path, io: Box<dyn Storage>) -> Src {
        Src {
            path: path.to_path_buf(),
            io,
        }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.io.read_at(buf, offset).map_err(|e| {
            Error::io(
                &self.path,
                format!("reading {what} ({} bytes at {offset:#x})", buf.len()),
                e,
            )
        })
    }

    pub fn read_vec(&self, len: usize, offset: u64, what: &str) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(&mut v, offset, what)?;
        Ok(v)
    }

    pub fn write(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        (self.io.write_at(buf, offset)).map_err(|e| self.write_error(e, what, buf.len(), offset))
    }

    fn write_error(&self, e: io::Error, what: &str, len: usize, offset: u64) -> Error {
        Error::io(
            &self.path,
            format!("writing {what} ({len} bytes at {offset:#x})"),
            e,
        )
    }

    /// Writes a payload of guest data: bytes, or a run of another file
    /// shared or copied.
    pub fn put(&self, payload: crate::disk::Payload<'_>, offset: u64, what: &str) -> Result<()> {
        match payload {
            crate::disk::Payload::Bytes(b) => (self.io.write_data_at(b, offset))
                .map_err(|e| self.write_error(e, what, b.len(), offset)),
            crate::disk::Payload::File {
                from,
                offset: src,
                len,
            } => self.io.put_from(from, src, offset, len).map_err(|e| {
                Error::io(
                    &self.path,
                    format!(
                        "putting {what} ({len} bytes at {offset:#x}) from {}",
                        from.path.display()
                    ),
                    e,
                )
            }),
        }
    }

    pub fn flush(&self) -> Result<()> {
        self.io
            .flush()
            .map_err(|e| Error::io(&self.path, "flushing", e))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.io
            .set_len(len)
            .map_err(|e| Error::io(&self.path, format!("resizing to {len} bytes"), e))
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Result<u64> {
        self.io
            .len()
            .map_err(|e| Error::io(&self.path, "reading the file size", e))
    }
}

/// File-system operations other than positioned I/O, recorded like it.
pub mod fsops {
    use std::io;
    use std::path::Path;

    #[cfg(feature = "testing")]
    use super::trace::{self, Op};

    pub fn remove_file(path: &Path) -> io::Result<()> {
        traced!(Op::Remove {
            path: path.to_path_buf(),
        });
        std::fs::remove_file(path)
    }

    pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
        traced!(Op::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
        std::fs::rename(from, to)
    }

    /// fsync the folder holding `path` (after creating, renaming or deleting in it).
    pub fn sync_dir_of(path: &Path) -> io::Result<()> {
        let dir = crate::paths::folder_of(path);
        traced!(Op::SyncDir {
            dir: dir.to_path_buf(),
        });
        if super::skip_sync() {
            return Ok(());
        }
        std::fs::File::open(dir).and_then(|d| d.sync_all())
    }
}
