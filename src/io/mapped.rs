//! Reading file data in place, through a read-only mapping of the page
//! cache, instead of copying it into a buffer.
//!
//! A merge hashes each byte it reads, and writes it into the ancestor;
//! neither needs a private copy. The copy a `pread` makes was an eighth
//! of a VHD merge's CPU time on the 2-vCPU benchmark machine
//! (`_copy_to_iter` on the reader thread, BENCHMARKS.md), and that
//! machine's merges are bound by CPU.
//!
//! The pages are faulted in with `MADV_POPULATE_READ` (Linux 5.14), which
//! reports a range past the end of the file or an I/O error as an error
//! instead of a `SIGBUS`; every failure here (an older kernel, a file
//! system that cannot map, a range past the end) is returned, and the
//! caller reads the same bytes the ordinary way, which reports what is
//! wrong in the format's words. Once populated, a page can still go: if
//! the kernel reclaims it and reading it again fails, or another program
//! truncates the file while it is mapped, the access raises `SIGBUS` and
//! the process ends as in a power cut, which the journal is built for
//! (`recover` continues or rolls back). The files are locked against
//! other vhdmerge runs for the whole merge.

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{Advice, MapFlags, ProtFlags};

/// A read-only mapping of part of a file, unmapped on drop.
pub struct Mapped {
    base: NonNull<u8>,
    /// The whole mapping, from a page boundary.
    map_len: usize,
    /// Where the bytes asked for start in it.
    skip: usize,
    len: usize,
}

// The mapping is read-only and owned by this value alone.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Bytes a mapping of `len` bytes at `offset` takes in memory: the
    /// range widened to whole pages.
    pub fn footprint(offset: u64, len: u64) -> u64 {
        let page = rustix::param::page_size() as u64;
        (offset + len).next_multiple_of(page) - offset / page * page
    }

    /// Maps the `len` bytes at `offset` of `fd` and faults them in.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Mapped> {
        let file_len = rustix::fs::fstat(fd)?.st_size as u64;
        if len == 0 || offset + len as u64 > file_len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let page = rustix::param::page_size() as u64;
        let start = offset / page * page;
        let map_len = Mapped::footprint(offset, len as u64) as usize;
        // SAFETY: a new shared read-only mapping at an address the kernel
        // picks; no Rust object lives there before.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                ProtFlags::READ,
                MapFlags::SHARED,
                fd,
                start,
            )?
        };
        let mapped = Mapped {
            base: NonNull::new(ptr.cast()).expect("mmap returns a mapping"),
            map_len,
            skip: (offset - start) as usize,
            len,
        };
        // SAFETY: the range is the mapping just made; the advice only
        // faults its pages in.
        unsafe { rustix::mm::madvise(ptr, map_len, Advice::LinuxPopulateRead)? };
        Ok(mapped)
    }

    /// The bytes the mapping takes in memory, whole pages.
    pub fn mapped_len(&self) -> usize {
        self.map_len
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `map_len` readable bytes, populated above,
        // and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(self.skip), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no slice of
        // it outlives `self` (`bytes` borrows it).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    /// Unaligned ranges up to the file's unaligned end map to exactly the
    /// bytes a read gives; a range past the end is an error, not a signal.
    #[test]
    fn mapped_ranges_hold_what_reads_give_and_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let len = (3 << 20) + 512 + 77;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let ranges = [
            (0, 4096),
            (512, 2 << 20),
            (4095, 1),
            (1_000_003, 1_234_567),
            (len as u64 - 589, 589),
        ];
        for (offset, n) in ranges {
            let m = Mapped::map(file.as_fd(), offset, n).unwrap();
            let mut expected = vec![0u8; n];
            file.read_exact_at(&mut expected, offset).unwrap();
            assert!(m.bytes() == expected, "range {offset}+{n}");
            assert!(Mapped::footprint(offset, n as u64) < n as u64 + 8192);
        }
        for (offset, n) in [(len as u64 - 100, 101), (len as u64 + 4096, 10)] {
            let err = Mapped::map(file.as_fd(), offset, n).err().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }
}
