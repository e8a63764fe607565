//! Sharing file-system blocks between files instead of copying them
//! (reflink: `FICLONERANGE` on XFS, btrfs and others), and proving
//! afterwards that two ranges share their blocks (`FS_IOC_FIEMAP`).
//!
//! Both ioctls go through rustix's typed ioctl support: it checks the
//! opcode's direction and size at compile time and maps errors to
//! `Errno`, so the only code here is the two argument structs of
//! `<linux/fs.h>` and `<linux/fiemap.h>`. docs/reflink.md says why a
//! clone-capable path is used and how it is verified.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::ioctl::{self, Opcode};

/// A merged file whose data runs may be shared into the ancestor. It
/// holds its own descriptor (a duplicate of the one the chain opened and
/// proved), so that writes held for a barrier can still reach it.
pub struct SharedFile {
    pub path: PathBuf,
    file: File,
    /// The file system's block size: only runs whose source offset,
    /// destination offset and length are multiples of it are cloned.
    block: u64,
    /// Cleared at the first clone the file system refuses: the rest is copied.
    enabled: AtomicBool,
    shared: AtomicU64,
    copied: AtomicU64,
}

impl SharedFile {
    /// `fd` is the descriptor a layer read and validated the file through.
    pub fn new(path: &Path, fd: BorrowedFd<'_>, block: u64) -> io::Result<SharedFile> {
        Ok(SharedFile {
            path: path.to_path_buf(),
            file: File::from(fd.try_clone_to_owned()?),
            block: block.max(1),
            enabled: AtomicBool::new(true),
            shared: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether clones are still tried (no refusal so far).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Bytes shared (cloned) and copied from this file so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.load(Ordering::Relaxed),
            self.copied.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn count(&self, shared: u64, copied: u64) {
        self.shared.fetch_add(shared, Ordering::Relaxed);
        self.copied.fetch_add(copied, Ordering::Relaxed);
    }

    /// Splits `len` bytes from `src` (in this file) to `dst` into a copied
    /// head, a cloned middle and a copied tail: (head, middle) lengths.
    /// Nothing is cloned when the two offsets are not equally aligned.
    pub fn split(&self, src: u64, dst: u64, len: u64) -> (u64, u64) {
        let b = self.block;
        if !self.enabled() || src % b != dst % b {
            return (len, 0);
        }
        let head = (b - dst % b) % b;
        if head >= len {
            return (len, 0);
        }
        let middle = (len - head) / b * b;
        (head, middle)
    }
}

/// The largest piece `copy_into` holds in memory at once.
const COPY_PIECE: u64 = 1 << 20;

/// Copies `len` bytes of `from` at `src_offset` to `dst` at `offset`, a
/// piece of at most 1 MiB at a time (memory stays bounded whatever `len`).
pub fn copy_into(
    dst: &(impl super::Storage + ?Sized),
    from: &SharedFile,
    src_offset: u64,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_PIECE) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_PIECE) as usize;
        from.read_at(&mut buf[..n], src_offset + done)?;
        dst.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    from.count(0, len);
    Ok(())
}

/// `struct file_clone_range` of `<linux/fs.h>`.
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// FICLONERANGE: `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: Opcode = ioctl::opcode::write::<FileCloneRange>(0x94, 13);

/// Makes `len` bytes of `dst` at `dst_offset` share the blocks of `src`
/// at `src_offset`. All three must be multiples of the file system's
/// block size. Errors meaning "this pair cannot share blocks" come back
/// as `ErrorKind::Unsupported`; anything else is a real I/O error.
pub fn clone_range(
    dst: BorrowedFd<'_>,
    dst_offset: u64,
    src: BorrowedFd<'_>,
    src_offset: u64,
    len: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    // SAFETY: FICLONERANGE reads a `struct file_clone_range`, which
    // `FileCloneRange` is, field for field.
    let r = unsafe { ioctl::ioctl(dst, ioctl::Setter::<FICLONERANGE, FileCloneRange>::new(arg)) };
    r.map_err(|e| match e {
        // No reflink on this file system (EOPNOTSUPP, ENOTTY), two file
        // systems (EXDEV), or a range it will not clone (EINVAL, e.g.
        // XFS without reflink=1, or a snapshot it protects: EPERM/ETXTBSY).
        rustix::io::Errno::OPNOTSUPP
        | rustix::io::Errno::NOTTY
        | rustix::io::Errno::XDEV
        | rustix::io::Errno::INVAL
        | rustix::io::Errno::PERM
        | rustix::io::Errno::TXTBSY
        | rustix::io::Errno::NOSYS => io::Error::new(io::ErrorKind::Unsupported, e),
        e => e.into(),
    })
}

/// Whether the file system will share `src`'s blocks with a file in
/// `dir`: one clone of its first `block` bytes into an unnamed temporary
/// file there (`O_TMPFILE`, gone when closed) is tried. Writes nothing a
/// user sees; any doubt answers `false`.
pub fn trial_clone(dir: &Path, src: BorrowedFd<'_>, block: u64) -> bool {
    use rustix::fs::{Mode, OFlags};
    #[cfg(feature = "testing")]
    if super::trace::emulate_clones() {
        return true;
    }
    let Ok(tmp) = rustix::fs::open(
        dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) else {
        return false;
    };
    match rustix::fs::fstat(src) {
        Ok(st) if st.st_size as u64 >= block => clone_range(tmp.as_fd(), 0, src, 0, block).is_ok(),
        _ => false,
    }
}

/// One mapped extent of a file: logical and physical start, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysicalExtent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// `struct fiemap` of `<linux/fiemap.h>`, with room for `EXTENTS` extents.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// The header of `struct fiemap`, whose size the opcode carries.
#[repr(C)]
struct FiemapHeader {
    _start: u64,
    _length: u64,
    _flags: u32,
    _mapped: u32,
    _count: u32,
    _reserved: u32,
}

const EXTENTS: usize = 64;
/// FS_IOC_FIEMAP: `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: Opcode = ioctl::opcode::read_write::<FiemapHeader>(b'f', 11);
const FIEMAP_FLAG_SYNC: u32 = 1;
pub const FIEMAP_EXTENT_LAST: u32 = 0x1;
pub const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
pub const FIEMAP_EXTENT_MERGED: u32 = 0x1000;

/// The extents of `fd` that overlap [offset, offset + len), in order.
/// Holes are absent. The file's dirty data is written first (FIEMAP's
/// SYNC flag), so delayed allocations have their places.
pub fn extents(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Vec<PhysicalExtent>> {
    let mut out = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let mut m = Fiemap {
            start: pos,
            length: end - pos,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: EXTENTS as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
        // `extent_count` extents after it, all inside `m`.
        unsafe { ioctl::ioctl(fd, ioctl::Updater::<FS_IOC_FIEMAP, Fiemap>::new(&mut m)) }?;
        let n = (m.mapped_extents as usize).min(EXTENTS);
        if n == 0 {
            break;
        }
        for e in &m.extents[..n] {
            out.push(PhysicalExtent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            });
        }
        let last = m.extents[n - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            break;
        }
        pos = last.logical + last.length;
    }
    Ok(out)
}

/// The physical layout of [offset, offset + len): (relative start,
/// physical start, length) per stored piece, clipped to the range, with
/// adjacent pieces joined. `None` when an extent's place is not plain
/// (unknown, delayed, encoded, inline, unwritten): then only reading
/// the bytes can tell.
pub fn layout(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
) -> io::Result<Option<Vec<(u64, u64, u64)>>> {
    const PLAIN: u32 = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_MERGED;
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for e in extents(fd, offset, len)? {
        // A file system that reports no physical places (0) proves nothing.
        if e.flags & !PLAIN != 0 || e.physical == 0 {
            return Ok(None);
        }
        let start = e.logical.max(offset);
        let stop = (e.logical + e.length).min(offset + len);
        if start >= stop {
            continue;
        }
        let (rel, phys, n) = (
            start - offset,
            e.physical + (start - e.logical),
            stop - start,
        );
        match out.last_mut() {
            Some(l) if l.0 + l.2 == rel && l.1 + l.2 == phys => l.2 += n,
            _ => out.push((rel, phys, n)),
        }
    }
    Ok(Some(out))
}

/// Whether `a` at `a_offset` and `b` at `b_offset` provably hold the same
/// `len` bytes without reading them: the same physical blocks in the same
/// order, and holes in the same places. `false` means "not proven", not
/// "different".
pub fn same_blocks(
    a: BorrowedFd<'_>,
    a_offset: u64,
    b: BorrowedFd<'_>,
    b_offset: u64,
    len: u64,
) -> bool {
    match (layout(a, a_offset, len), layout(b, b_offset, len)) {
        (Ok(Some(x)), Ok(Some(y))) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_clones_only_the_aligned_middle() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let f = File::open(&p).unwrap();
        let s = SharedFile::new(&p, f.as_fd(), 4096).unwrap();
        assert_eq!(s.split(0, 8192, 3 * 4096), (0, 3 * 4096));
        assert_eq!(s.split(512, 4096 + 512, 3 * 4096), (3584, 2 * 4096));
        assert_eq!(s.split(512, 1024, 3 * 4096), (3 * 4096, 0));
        assert_eq!(s.split(0, 0, 1000), (0, 0));
        s.disable();
        assert_eq!(s.split(0, 0, 8192), (8192, 0));
    }

    /// On a file system without reflink (tmpfs, ext4) a clone is refused
    /// as Unsupported, never as a hard error, and FIEMAP still answers.
    #[test]
    fn clone_is_refused_cleanly_or_shares() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, vec![7u8; 65536]).unwrap();
        std::fs::write(&b, vec![0u8; 65536]).unwrap();
        let fa = File::open(&a).unwrap();
        let fb = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        match clone_range(fb.as_fd(), 0, fa.as_fd(), 0, 65536) {
            Ok(()) => {
                assert_eq!(std::fs::read(&b).unwrap(), vec![7u8; 65536]);
                assert!(same_blocks(fa.as_fd(), 0, fb.as_fd(), 0, 65536));
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}"),
        }
    }
}
