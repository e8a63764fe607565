//! Writing a VHD: new blocks placed in space reserved at the end, their
//! BAT entries and bitmaps written at the commit after their data, and a
//! differencing disk re-linked to a new parent.

use uuid::Uuid;

use super::VhdDisk;
use crate::disk::Payload;
use crate::error::{Error, Result};
use crate::format::vhd::{self as fv, SECTOR};

/// Blocks reserved at a time: one footer move per this many new blocks
/// instead of per block. The unused part is given back (the footer
/// moved back) at each commit.
const RESERVE_BLOCKS: u64 = 64;

impl VhdDisk {
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

    pub(super) fn write_block(&mut self, offset: u64, data: Payload<'_>) -> Result<()> {
        let (bs, bitmap_bytes) = {
            let h = self.dyn_header();
            (u64::from(h.block_size), h.bitmap_bytes())
        };
        let block = offset / bs;
        let in_block = offset % bs;
        let whole = in_block == 0 && data.len() == bs;
        let (at, placed) = match self.bat[block as usize] {
            fv::UNALLOCATED => (self.allocate(block)?, true),
            s if whole && self.out_of_place && !self.dirty_bat.contains(&block) => {
                self.released
                    .push((fv::sectors_to_bytes(s), bitmap_bytes + bs));
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
                .insert(block, vec![0; bitmap_bytes as usize]);
        }
        self.src
            .put(data, at + bitmap_bytes + in_block, "block data")?;
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
    pub(super) fn commit_blocks(&mut self) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::disk::create::{VhdOptions, create_child, create_vhd};
    use crate::disk::{Extent, Layer};
    use crate::io::MemStorage;
    use crate::io::Storage;

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
