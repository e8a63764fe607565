//! A storage that keeps the write-ahead rule for one file of a merge.
//!
//! A write that overwrites bytes the file had at the start of the current
//! epoch (when the merge began, or at its last checkpoint) is held back,
//! and the 4 KiB pages it touches, as they were at that start, are
//! appended to the journal as before-images. At the next `flush` (the
//! barrier every caller already issues between dependent writes) the
//! journal is made durable first, then the held writes are issued, then
//! the file is flushed. Writes past the epoch's starting length go straight
//! through: truncation undoes them. So no overwrite ever reaches the disk
//! before its undo information, and the journal is synced once per
//! barrier, not once per block.
//!
//! Held bytes are bounded by `MAX_HELD`: past it, the journal is synced
//! and what is held is issued, without flushing the file (nothing needs
//! those writes durable yet, only their images).
//!
//! A Checkpoint record (appended by the merge after a barrier, so nothing
//! is held) starts a new epoch: the first image of each page after it is
//! the page as it was at the checkpoint, which is what a partial undo
//! restores; the first image of a page in the whole journal is still its
//! original, which is what a full rollback restores.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{Record, Writer};
use crate::io::{SharedFile, Storage};

const PAGE: u64 = 4096;

struct State {
    /// The writer's checkpoint count when this epoch began.
    epoch: u64,
    /// The file's length when this epoch began.
    start_len: u64,
    /// Pages (below `start_len`) imaged in this epoch: a word of 64 page
    /// bits per 256 KiB of the file that holds any, so that the set grows
    /// with what the epoch overwrote, not with the file (a bitmap of a
    /// 2 TiB file would take 64 MiB).
    saved: HashMap<u64, u64>,
    /// Overwrites waiting for the journal, by offset.
    held: BTreeMap<u64, Held>,
    /// The bytes of the held overwrites, one after the other. Its capacity
    /// is kept from barrier to barrier, so holding costs a copy but no
    /// fresh memory (and no page faults).
    arena: Vec<u8>,
    /// Stored pages read to be imaged (kept for the same reason).
    image_buf: Vec<u8>,
    /// Set after any failure: no further I/O (an fsync error is never retried).
    poisoned: bool,
}

impl State {
    fn is_saved(&self, page: u64) -> bool {
        self.saved
            .get(&(page / 64))
            .is_some_and(|w| w >> (page % 64) & 1 == 1)
    }

    /// Marks pages [from, to), a word (64 pages) at a time.
    fn mark_saved(&mut self, from: u64, to: u64) {
        let mut p = from;
        while p < to {
            let n = (64 - p % 64).min(to - p);
            let bits = (u64::MAX >> (64 - n)) << (p % 64);
            *self.saved.entry(p / 64).or_default() |= bits;
            p += n;
        }
    }
}

/// An overwrite waiting for its before-images to be durable.
enum Held {
    /// `len` bytes at `at` in the arena.
    Bytes { at: usize, len: u64 },
    /// `len` bytes of a merged file, to be cloned (or copied) there.
    From(Arc<SharedFile>, u64, u64),
}

impl Held {
    fn len(&self) -> u64 {
        match self {
            Held::Bytes { len, .. } => *len,
            Held::From(_, _, len) => *len,
        }
    }
}

/// The most bytes of overwrites held in memory (the arena's size): when
/// an overwrite would go past it, what is held is issued first. This is
/// where the memory of held writes is bounded (see merge/memory.rs).
pub const MAX_HELD: usize = 16 << 20;

pub struct Journaled<S: Storage> {
    inner: S,
    file: u32,
    journal: Arc<Mutex<Writer>>,
    state: Mutex<State>,
    /// The file itself as a clone source, for before-images cloned into
    /// the journal's image file (None when it is not a plain file).
    own: Option<Arc<SharedFile>>,
    /// A finish-only merge's journal: guest data is written through
    /// unimaged (a recovery writes it again from the merged files).
    data_unimaged: bool,
}

/// Runs of at least this many bytes of stored pages are imaged by cloning
/// them into the journal's image file (when the journal has one), not by
/// copying their bytes into the journal.
const CLONE_IMAGE_MIN: u64 = 64 << 10;

/// Stored pages to be imaged are read in runs of at most this many bytes.
pub(crate) const IMAGE_READ: u64 = 1 << 20;

fn poisoned() -> io::Error {
    io::Error::other("an earlier I/O error aborted the merge; run `vhdmerge recover`")
}

impl<S: Storage> Journaled<S> {
    pub fn new(inner: S, file: u32, journal: Arc<Mutex<Writer>>) -> io::Result<Journaled<S>> {
        let start_len = inner.len()?;
        let (epoch, data_unimaged) = {
            let j = journal.lock().unwrap_or_else(|e| e.into_inner());
            (j.checkpoints(), j.finish_only())
        };
        let own = match inner.fd() {
            Some(fd) => {
                let block = rustix::fs::fstat(fd)?.st_blksize as u64;
                let path = Path::new("the file being merged into");
                Some(Arc::new(SharedFile::new(path, fd, block)?))
            }
            None => None,
        };
        Ok(Journaled {
            inner,
            file,
            journal,
            own,
            data_unimaged,
            state: Mutex::new(State {
                epoch,
                start_len,
                saved: HashMap::new(),
                held: BTreeMap::new(),
                arena: Vec::new(),
                image_buf: Vec::new(),
                poisoned: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new epoch if a Checkpoint was appended since the last
    /// write: its starting length is the length now (nothing has been
    /// written since the checkpoint's barrier), and no page is imaged yet.
    fn follow_checkpoints(&self, st: &mut State) -> io::Result<()> {
        let epoch = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checkpoints();
        if epoch != st.epoch {
            debug_assert!(st.held.is_empty(), "a checkpoint follows a barrier");
            st.epoch = epoch;
            st.start_len = self.inner.len()?;
            st.saved = HashMap::new();
        }
        Ok(())
    }

    /// Appends before-images of the pages in [start, end) not yet imaged
    /// in this epoch. Pages of zeros (holes of the file, which are not
    /// read, or pages read as zeros) become one ZeroImage per run: a
    /// checkpoint over a full base's blocks would otherwise journal the
    /// blocks' unwritten sectors byte for byte. Stored pages are read in
    /// runs of up to `IMAGE_READ` bytes, not a page at a time.
    fn image(&self, st: &mut State, start: u64, end: u64) -> io::Result<()> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        self.clone_images(st, &mut journal, start, end)?;
        if end - start > IMAGE_READ
            && let Some(fd) = self.inner.fd()
        {
            // Every read below then finds its pages on the way.
            crate::io::will_need(fd, start, end - start);
        }
        let mut zeros: Option<(u64, u64)> = None;
        let mut buf = std::mem::take(&mut st.image_buf);
        let (mut page, last) = (start / PAGE, end.div_ceil(PAGE));
        while page < last {
            if st.is_saved(page) {
                flush_zeros(&mut journal, self.file, &mut zeros);
                page += 1;
                continue;
            }
            let mut run_end = page + 1;
            while run_end < last && !st.is_saved(run_end) && run_end - page < IMAGE_READ / PAGE {
                run_end += 1;
            }
            let off = page * PAGE;
            let len = (run_end * PAGE).min(st.start_len) - off;
            let (data, n) = crate::io::stored_run(&self.inner, off, len)?;
            // Whole pages inside a hole are zeros without reading them
            // (the file's last page counts as whole).
            let hole_pages = match data {
                true => 0,
                false if off + n == st.start_len => n.div_ceil(PAGE),
                false => n / PAGE,
            };
            if hole_pages > 0 {
                add_zeros(
                    &mut journal,
                    self.file,
                    &mut zeros,
                    off,
                    n.min(hole_pages * PAGE),
                );
                st.mark_saved(page, page + hole_pages);
                page += hole_pages;
                continue;
            }
            let read_len = match data {
                true => len.min(n.div_ceil(PAGE) * PAGE),
                false => len.min(PAGE),
            };
            buf.resize(read_len as usize, 0);
            self.inner.read_at(&mut buf, off)?;
            for (i, bytes) in buf.chunks(PAGE as usize).enumerate() {
                let at = off + i as u64 * PAGE;
                if bytes.iter().all(|&x| x == 0) {
                    add_zeros(&mut journal, self.file, &mut zeros, at, bytes.len() as u64);
                } else {
                    flush_zeros(&mut journal, self.file, &mut zeros);
                    journal.append(&Record::BeforeImage {
                        file: self.file,
                        offset: at,
                        data: bytes.to_vec(),
                    });
                }
            }
            let pages = read_len.div_ceil(PAGE);
            st.mark_saved(page, page + pages);
            page += pages;
        }
        flush_zeros(&mut journal, self.file, &mut zeros);
        st.image_buf = buf;
        Ok(())
    }

    /// Clones runs of at least `CLONE_IMAGE_MIN` of whole stored pages in
    /// [start, end) not yet imaged into the journal's image file, one
    /// CloneImage record each, and marks them imaged. Holes and shorter
    /// runs are left to `image`. Nothing when the journal has no image
    /// file or the file system refused a clone (the file was copied then,
    /// which is as correct, and the rest goes into the journal).
    fn clone_images(
        &self,
        st: &mut State,
        journal: &mut Writer,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let Some(own) = self.own.as_ref().filter(|o| o.enabled()) else {
            return Ok(());
        };
        if journal.images().is_none() {
            return Ok(());
        }
        let end = end.min(st.start_len / PAGE * PAGE);
        let mut page = start / PAGE;
        while page * PAGE < end {
            if st.is_saved(page) {
                page += 1;
                continue;
            }
            let off = page * PAGE;
            let (data, n) = crate::io::stored_run(&self.inner, off, end - off)?;
            if !data {
                page = ((off + n) / PAGE).max(page + 1);
                continue;
            }
            let mut last = page;
            while last < (off + n) / PAGE && !st.is_saved(last) {
                last += 1;
            }
            let len = (last - page) * PAGE;
            if len >= CLONE_IMAGE_MIN {
                let images = journal.images().expect("checked above");
                let image_offset = images.put(own, off, len)?;
                st.mark_saved(page, last);
                journal.append(&Record::CloneImage {
                    file: self.file,
                    offset: off,
                    length: len,
                    image_offset,
                });
            }
            page = last.max(page + 1);
        }
        Ok(())
    }

    /// Journal durable → held writes issued. The writes are not flushed:
    /// the write-ahead rule needs only their images durable first, and the
    /// caller's own flush makes them durable when it needs them to be.
    fn issue(&self, st: &mut State) -> io::Result<()> {
        if st.held.is_empty() {
            return Ok(());
        }
        self.sync_journal()?;
        self.write_held(st)
    }

    fn sync_journal(&self) -> io::Result<()> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal.sync().map_err(io::Error::other)
    }

    fn write_held(&self, st: &mut State) -> io::Result<()> {
        for (off, held) in std::mem::take(&mut st.held) {
            match held {
                Held::Bytes { at, len } => {
                    self.inner.write_at(&st.arena[at..at + len as usize], off)?
                }
                Held::From(from, src, len) => self.inner.put_from(&from, src, off, len)?,
            }
        }
        st.arena.clear();
        Ok(())
    }

    /// Journal durable → held writes issued → file flushed.
    fn barrier(&self, st: &mut State) -> io::Result<()> {
        self.sync_journal()?;
        self.write_held(st)?;
        self.inner.flush()
    }

    /// Where the part of a write at [offset, offset + len) that overwrites
    /// the epoch's starting bytes ends (`offset` when none does); those
    /// bytes' pages are imaged first.
    fn overwritten(&self, st: &mut State, offset: u64, len: u64) -> io::Result<u64> {
        self.follow_checkpoints(st)?;
        let split = (offset + len).min(st.start_len).max(offset);
        if split > offset {
            self.image(st, offset, split)?;
        }
        Ok(split)
    }

    /// Whether anything held overlaps [offset, end).
    fn holds(st: &State, offset: u64, end: u64) -> bool {
        st.held.range(offset..end).next().is_some()
            || st
                .held
                .range(..offset)
                .next_back()
                .is_some_and(|(o, d)| o + d.len() > offset)
    }

    /// Holds an overwrite of `data` at `offset` until the next barrier, in
    /// pieces of at most the arena's size. What is held and overlaps it is
    /// issued first, so the held writes never overlap and their order does
    /// not matter.
    fn hold_bytes(&self, st: &mut State, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        if Self::holds(st, offset, offset + data.len() as u64) {
            self.issue(st)?;
        }
        while !data.is_empty() {
            if st.arena.len() == MAX_HELD {
                self.issue(st)?;
            }
            if st.arena.capacity() < MAX_HELD {
                st.arena.reserve_exact(MAX_HELD - st.arena.len());
            }
            let n = data.len().min(MAX_HELD - st.arena.len());
            let at = st.arena.len();
            st.arena.extend_from_slice(&data[..n]);
            st.held.insert(offset, Held::Bytes { at, len: n as u64 });
            (offset, data) = (offset + n as u64, &data[n..]);
        }
        Ok(())
    }

    /// Holds an overwrite by `len` bytes of `from` (no memory).
    fn hold_from(&self, st: &mut State, offset: u64, held: Held) -> io::Result<()> {
        if Self::holds(st, offset, offset + held.len()) {
            self.issue(st)?;
        }
        st.held.insert(offset, held);
        Ok(())
    }

    /// Before guest data goes through unimaged: a held write it overlaps
    /// is issued first, so the later write wins as it was meant to.
    fn before_data(&self, st: &mut State, offset: u64, len: u64) -> io::Result<()> {
        self.follow_checkpoints(st)?;
        if Self::holds(st, offset, offset + len) {
            self.issue(st)?;
        }
        Ok(())
    }

    fn guarded<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.lock();
        if st.poisoned {
            return Err(poisoned());
        }
        let r = f(&mut st);
        if r.is_err() {
            st.poisoned = true;
        }
        r
    }
}

impl<S: Storage> Storage for Journaled<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.guarded(|st| {
            let end = offset + buf.len() as u64;
            if Self::holds(st, offset, end) {
                self.issue(st)?;
            }
            self.inner.read_at(buf, offset)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.guarded(|st| {
            let split = self.overwritten(st, offset, buf.len() as u64)?;
            if split > offset {
                self.hold_bytes(st, offset, &buf[..(split - offset) as usize])?;
            }
            if offset + buf.len() as u64 > split {
                self.inner
                    .write_at(&buf[(split - offset) as usize..], split)?;
            }
            Ok(())
        })
    }

    /// A finish-only merge writes guest data through, unimaged and
    /// unheld (journal-format.md §6, "Finish-only"); otherwise as any write.
    fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.data_unimaged {
            return self.write_at(buf, offset);
        }
        self.guarded(|st| {
            self.before_data(st, offset, buf.len() as u64)?;
            self.inner.write_at(buf, offset)
        })
    }

    /// Overwrites are held like written bytes (a held clone keeps no data
    /// in memory); growth is cloned straight away, as it is written. A
    /// finish-only merge puts guest data through, as `write_data_at`.
    fn put_from(
        &self,
        from: &Arc<SharedFile>,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.guarded(|st| {
            if self.data_unimaged {
                self.before_data(st, offset, len)?;
                return self.inner.put_from(from, src_offset, offset, len);
            }
            let split = self.overwritten(st, offset, len)?;
            if split > offset {
                let held = Held::From(from.clone(), src_offset, split - offset);
                self.hold_from(st, offset, held)?;
            }
            if offset + len > split {
                let n = split - offset;
                self.inner.put_from(from, src_offset + n, split, len - n)?;
            }
            Ok(())
        })
    }

    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    fn flush(&self) -> io::Result<()> {
        self.guarded(|st| self.barrier(st))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.guarded(|st| {
            self.follow_checkpoints(st)?;
            if len < st.start_len {
                return Err(io::Error::other(
                    "a merge never shrinks a file below its length at the last checkpoint",
                ));
            }
            self.inner.set_len(len)
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

/// Appends the pending run of zero pages, if any, as one ZeroImage.
fn flush_zeros(journal: &mut Writer, file: u32, zeros: &mut Option<(u64, u64)>) {
    if let Some((offset, length)) = zeros.take() {
        journal.append(&Record::ZeroImage {
            file,
            offset,
            length,
        });
    }
}

/// Extends the pending run of zero pages by [offset, offset + len), or
/// starts a new one after appending the pending run if they do not meet.
fn add_zeros(
    journal: &mut Writer,
    file: u32,
    zeros: &mut Option<(u64, u64)>,
    offset: u64,
    len: u64,
) {
    match zeros {
        Some((s, l)) if *s + *l == offset => *l += len,
        _ => {
            flush_zeros(journal, file, zeros);
            *zeros = Some((offset, len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;
    use crate::journal::tests::begin;

    #[test]
    fn overwrites_wait_for_their_before_images() {
        let dir = tempfile::tempdir().unwrap();
        let jp = dir.path().join("j");
        let w = Arc::new(Mutex::new(Writer::create(&jp, begin()).unwrap()));
        let s = Journaled::new(MemStorage::new(vec![1u8; 10000]), 0, w.clone()).unwrap();
        s.write_at(&[9u8; 100], 5000).unwrap();
        s.write_at(&[8u8; 100], 20000).unwrap();
        // The overwrite is held, the growth is not.
        let mut b = [0u8; 1];
        s.inner.read_at(&mut b, 5000).unwrap();
        assert_eq!(b[0], 1);
        s.inner.read_at(&mut b, 20000).unwrap();
        assert_eq!(b[0], 8);
        s.flush().unwrap();
        s.inner.read_at(&mut b, 5000).unwrap();
        assert_eq!(b[0], 9);
        let l = super::super::load(&jp).unwrap();
        // Begin plus one before-image of page 1 (bytes 4096..8192).
        assert_eq!(l.records.len(), 2);
        assert!(
            matches!(&l.records[1], Record::BeforeImage { file: 0, offset: 4096, data } if data.len() == 4096 && data.iter().all(|&x| x == 1))
        );
    }

    /// After a checkpoint a page is imaged again, as it was at the
    /// checkpoint, and growth before the checkpoint is imaged too.
    #[test]
    fn a_checkpoint_starts_a_new_epoch_of_images() {
        let dir = tempfile::tempdir().unwrap();
        let jp = dir.path().join("j");
        let w = Arc::new(Mutex::new(Writer::create(&jp, begin()).unwrap()));
        let s = Journaled::new(MemStorage::new(vec![1u8; 8192]), 0, w.clone()).unwrap();
        s.write_at(&[2u8; 4096], 0).unwrap();
        s.write_at(&[3u8; 4096], 8192).unwrap();
        s.flush().unwrap();
        w.lock()
            .unwrap()
            .append(&Record::Checkpoint(super::super::Checkpoint {
                next_offset: 0,
                bytes_done: 0,
                lengths: vec![12288],
            }));
        s.write_at(&[4u8; 4096], 0).unwrap();
        s.write_at(&[5u8; 4096], 8192).unwrap();
        s.flush().unwrap();
        let l = super::super::load(&jp).unwrap();
        let images: Vec<(u64, u8)> = l
            .records
            .iter()
            .filter_map(|r| match r {
                Record::BeforeImage { offset, data, .. } => Some((*offset, data[0])),
                _ => None,
            })
            .collect();
        // Epoch 0: the original page 0; epoch 1: page 0 and page 2 as the
        // checkpoint left them.
        assert_eq!(images, vec![(0, 1), (0, 2), (8192, 3)]);
        let mut b = [0u8; 1];
        s.inner.read_at(&mut b, 8192).unwrap();
        assert_eq!(b[0], 5);
    }

    /// Overwrites larger than the arena are held in pieces: memory stays
    /// at `MAX_HELD` bytes, each piece is issued only after the journal
    /// holds its images, and the file ends up with every byte written.
    #[test]
    fn held_bytes_stay_within_the_arena() {
        let dir = tempfile::tempdir().unwrap();
        let jp = dir.path().join("j");
        let w = Arc::new(Mutex::new(Writer::create(&jp, begin()).unwrap()));
        let size = 2 * MAX_HELD + 3 * PAGE as usize;
        let s = Journaled::new(MemStorage::new(vec![1u8; size]), 0, w.clone()).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        s.write_at(&data[..size - 5000], 5000).unwrap();
        {
            let st = s.lock();
            assert!(st.arena.capacity() <= MAX_HELD, "{}", st.arena.capacity());
            assert!(st.held.values().map(Held::len).sum::<u64>() <= MAX_HELD as u64);
        }
        // What reached the file is covered by durable images.
        let images = super::super::load(&jp).unwrap().records.len() - 1;
        let mut got = vec![0u8; size];
        s.inner.read_at(&mut got, 0).unwrap();
        let changed = got[5000..]
            .iter()
            .zip(&data[..size - 5000])
            .filter(|(a, b)| a == b && **a != 1)
            .count();
        assert!(changed > 0, "full arenas were issued before any flush");
        assert!(
            changed as u64 <= images as u64 * PAGE,
            "{changed} bytes out, {images} images"
        );
        s.flush().unwrap();
        s.inner.read_at(&mut got, 0).unwrap();
        assert!(got[..5000].iter().all(|&b| b == 1));
        assert_eq!(&got[5000..], &data[..size - 5000]);
    }

    /// Pages of zeros, read or holes of the file, are journaled as one
    /// ZeroImage per run instead of their bytes.
    #[test]
    fn zero_pages_and_holes_become_zero_images() {
        let dir = tempfile::tempdir().unwrap();
        let jp = dir.path().join("j");
        let w = Arc::new(Mutex::new(Writer::create(&jp, begin()).unwrap()));
        let mut bytes = vec![0u8; 16384];
        bytes[..4096].fill(1);
        bytes[12288..].fill(1);
        let s = Journaled::new(MemStorage::new(bytes), 0, w.clone()).unwrap();
        s.write_at(&[7u8; 16384], 0).unwrap();
        s.flush().unwrap();
        // A sparse file: data in its first page only, the rest a hole.
        let fp = dir.path().join("f");
        let f = std::fs::File::create(&fp).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[3u8; 4096], 0).unwrap();
        drop(f);
        let file = crate::io::FileStorage::open(&fp, true).unwrap();
        let s = Journaled::new(file, 1, w.clone()).unwrap();
        s.write_at(&[9u8; 65536], 0).unwrap();
        s.flush().unwrap();
        let l = super::super::load(&jp).unwrap();
        let got: Vec<(u32, u64, u64, bool)> = l.records[1..]
            .iter()
            .map(|r| match r {
                Record::BeforeImage { file, offset, data } => {
                    (*file, *offset, data.len() as u64, true)
                }
                Record::ZeroImage {
                    file,
                    offset,
                    length,
                } => (*file, *offset, *length, false),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0, 4096, true),
                (0, 4096, 8192, false),
                (0, 12288, 4096, true),
                (1, 0, 4096, true),
                (1, 4096, 61440, false),
            ]
        );
    }

    /// A finish-only merge's journal: guest data goes straight to the
    /// file, unimaged and unheld; other writes (metadata) are imaged and
    /// held as always, and a held write the data overlaps is issued first.
    #[test]
    fn finish_only_writes_data_through_unimaged() {
        let dir = tempfile::tempdir().unwrap();
        let jp = dir.path().join("j");
        let w = Writer::create_with(&jp, begin(), &[Record::FinishOnly]).unwrap();
        assert!(w.finish_only());
        let w = Arc::new(Mutex::new(w));
        let s = Journaled::new(MemStorage::new(vec![1u8; 16384]), 0, w.clone()).unwrap();
        s.write_data_at(&[2u8; 4096], 0).unwrap();
        s.write_at(&[3u8; 512], 8192).unwrap();
        s.write_data_at(&[4u8; 100], 8192 + 256).unwrap();
        let mut b = [0u8; 1];
        s.inner.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 2, "data is not held");
        s.inner.read_at(&mut b, 8192 + 256).unwrap();
        assert_eq!(b[0], 4, "the held metadata was issued first");
        s.inner.read_at(&mut b, 8192).unwrap();
        assert_eq!(b[0], 3);
        s.flush().unwrap();
        let l = super::super::load(&jp).unwrap();
        let images: Vec<u64> = l
            .records
            .iter()
            .filter_map(|r| match r {
                Record::BeforeImage { offset, .. } => Some(*offset),
                _ => None,
            })
            .collect();
        assert_eq!(images, vec![8192], "only the metadata page is imaged");
        // Without FinishOnly the same data write is imaged.
        let jp2 = dir.path().join("j2");
        let w2 = Arc::new(Mutex::new(Writer::create(&jp2, begin()).unwrap()));
        let s2 = Journaled::new(MemStorage::new(vec![1u8; 16384]), 0, w2).unwrap();
        s2.write_data_at(&[2u8; 4096], 0).unwrap();
        s2.flush().unwrap();
        assert_eq!(super::super::load(&jp2).unwrap().records.len(), 2);
    }
}
