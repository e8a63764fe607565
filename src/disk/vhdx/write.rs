//! The write path of a VHDX: write sessions (the GUIDs a writer must
//! change, the log made live), block allocation, BAT and sector-bitmap
//! updates, and their way through the VHDX log (entry, flush, apply,
//! flush). Reading and validating live in the parent module.

use super::*;
use crate::failpoint::{Failpoint, failpoint};

impl VhdxDisk {
    /// Begins a write session: new FileWriteGuid and a live LogGuid, and a
    /// new DataWriteGuid when the session will change guest data.
    pub(super) fn start_session(&mut self, data: bool) -> Result<()> {
        if self.session.is_some() {
            return Ok(());
        }
        crate::disk::refuse_write(&self.src.path, self.writable, &self.warnings)?;
        // Keep the file a whole number of MiB so log entries can state its size.
        let aligned = self.file_len.next_multiple_of(MIB);
        if aligned != self.file_len {
            self.src.set_len(aligned)?;
            self.file_len = aligned;
        }
        let mut h = self.header.clone();
        h.file_write_guid = crate::guid::fresh();
        if data {
            h.data_write_guid = self
                .next_data_write_guid
                .take()
                .unwrap_or_else(crate::guid::fresh);
        }
        self.write_header_twice(h)?;
        self.session = Some(Session {
            log_position: 0,
            log_sequence: 1,
            data_guid_changed: data,
        });
        Ok(())
    }

    /// Chooses the DataWriteGuid the next write session will set (the merge
    /// records it in its journal before writing).
    pub fn set_next_data_write_guid(&mut self, g: Uuid) {
        self.next_data_write_guid = Some(g);
    }

    /// MS-VHDX 2.2.2: a new DataWriteGuid before the first change a reader
    /// of the virtual disk could observe (a locator-only session keeps it).
    pub(super) fn change_data_guid(&mut self) -> Result<()> {
        if self.session.as_ref().is_some_and(|s| s.data_guid_changed) {
            return Ok(());
        }
        let mut h = self.header.clone();
        h.data_write_guid = self
            .next_data_write_guid
            .take()
            .unwrap_or_else(crate::guid::fresh);
        self.write_header_twice(h)?;
        if let Some(s) = self.session.as_mut() {
            s.data_guid_changed = true;
        }
        Ok(())
    }

    /// Writes `h` (with the next sequence numbers) into both slots, the
    /// non-current one first, flushing after each (MS-VHDX 2.2.2.1).
    pub(super) fn write_header_twice(&mut self, mut h: Header) -> Result<()> {
        for _ in 0..2 {
            h.sequence = self.header.sequence + 1;
            let slot = 1 - self.header_slot;
            self.src
                .write(&h.encode(), HEADER_OFFSETS[slot], "a header")?;
            self.src.flush()?;
            self.header = h.clone();
            self.header_slot = slot;
        }
        Ok(())
    }

    /// Appends a zeroed, 1 MiB-aligned span at the end of the file.
    pub(super) fn allocate(&mut self, len: u64) -> Result<u64> {
        let at = self.file_len.next_multiple_of(MIB);
        self.file_len = at + len.next_multiple_of(MIB);
        self.src.set_len(self.file_len)?;
        Ok(at)
    }

    pub(super) fn set_bat(&mut self, index: u64, value: u64) {
        self.bat[index as usize] = value;
        self.dirty_bat.insert(index, ());
    }

    pub(super) fn set_bits(&mut self, block: u64, first: u64, count: u64) -> Result<()> {
        let sb = self.sb_offset(block).expect("bitmap allocated");
        let (start, _) = self.geo.bitmap_slice(block);
        for s in first..first + count {
            let byte = sb + start + s / 8;
            let page = byte / 4096 * 4096;
            if !self.dirty_sb.contains_key(&page) {
                let p = self.src.read_vec(4096, page, "a sector bitmap page")?;
                self.dirty_sb.insert(page, p);
            }
            let p = self.dirty_sb.get_mut(&page).expect("inserted");
            p[(byte - page) as usize] |= 1 << (s % 8);
        }
        Ok(())
    }

    pub(super) fn ensure_bitmap(&mut self, block: u64) -> Result<()> {
        if self.sb_offset(block).is_none() {
            let at = self.allocate(MIB)?;
            self.set_bat(self.geo.sb_index(block), bat::entry(bat::SB_PRESENT, at));
        }
        Ok(())
    }

    /// Writes within one block.
    pub(super) fn write_block(&mut self, offset: u64, data: Payload<'_>) -> Result<()> {
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let idx = self.geo.pb_index(block);
        let e = self.bat[idx as usize];
        let st = bat::state(e);
        let whole = in_block == 0 && data.len() == bs.min(self.virtual_size - block * bs);
        let base = match st {
            bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT => bat::offset(e),
            _ => {
                let at = self.allocate(bs)?;
                // A differencing block that was NOT_PRESENT shows the parent
                // outside the written sectors; any other state reads zeros,
                // which the fresh (zeroed) block keeps.
                let partial = self.params.has_parent && st == bat::PAYLOAD_NOT_PRESENT && !whole;
                if partial {
                    self.ensure_bitmap(block)?;
                    self.set_bat(idx, bat::entry(bat::PAYLOAD_PARTIALLY_PRESENT, at));
                } else {
                    self.set_bat(idx, bat::entry(bat::PAYLOAD_FULLY_PRESENT, at));
                }
                at
            }
        };
        self.src.put(data, base + in_block, "payload data")?;
        if bat::state(self.bat[idx as usize]) == bat::PAYLOAD_PARTIALLY_PRESENT {
            let ls = self.logical_sector;
            self.set_bits(block, in_block / ls, data.len() / ls)?;
        }
        Ok(())
    }

    /// Collects the 4 KiB pages that changed (BAT and bitmap) as log writes.
    pub(super) fn dirty_pages(&mut self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let bat_off = self.bat_region.file_offset;
        for &idx in self.dirty_bat.keys() {
            let page = (bat_off + idx * 8) / 4096 * 4096;
            if pages.contains_key(&page) {
                continue;
            }
            let mut p = self.src.read_vec(4096, page, "a BAT page")?;
            let first = (page - bat_off) / 8;
            for (i, chunk) in p.chunks_exact_mut(8).enumerate() {
                if let Some(v) = self.bat.get((first + i as u64) as usize) {
                    chunk.copy_from_slice(&v.to_le_bytes());
                }
            }
            pages.insert(page, p);
        }
        for (off, p) in std::mem::take(&mut self.dirty_sb) {
            pages.insert(off, p);
        }
        self.dirty_bat.clear();
        Ok(pages.into_iter().collect())
    }

    /// Writes `pages` through the log: entry → flush → apply → flush. Entries
    /// are self-contained (tail = own position) since each is applied before
    /// the next one is written.
    pub(super) fn log_and_apply(&mut self, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        let log_len = u64::from(self.header.log_length);
        let log_off = self.header.log_offset;
        let max_per_entry = ((log_len / vlog::SECTOR).saturating_sub(2) as usize).clamp(1, 4000);
        if self.header.log_guid.is_nil() {
            // The log becomes live only now, right before its first entry,
            // with a LogGuid no stale entry in the ring can carry.
            let mut h = self.header.clone();
            h.log_guid = crate::guid::fresh();
            self.write_header_twice(h)?;
        }
        for group in pages.chunks(max_per_entry) {
            let session = self.session.as_mut().expect("session started");
            let count = group.len() as u64;
            let size = (vlog::descriptor_sectors(count) + count) * vlog::SECTOR;
            if size > log_len {
                return Err(Error::unsupported(
                    &self.src.path,
                    "log",
                    format!("log of {log_len} bytes is too small for an entry of {size}"),
                ));
            }
            if session.log_position + size > log_len {
                session.log_position = 0;
            }
            let writes: Vec<(u64, &[u8])> = group.iter().map(|(o, p)| (*o, p.as_slice())).collect();
            let entry = vlog::encode_entry(
                &self.header.log_guid,
                session.log_sequence,
                session.log_position as u32,
                self.file_len,
                &writes,
            );
            let at = log_off + session.log_position;
            session.log_position += size;
            session.log_sequence += 1;
            self.src.write(&entry, at, "a log entry")?;
            self.src.flush()?;
            // The entry is durable, the pages it describes are not yet applied.
            failpoint(Failpoint::VhdxLogWritten);
            for (o, p) in group {
                self.src.write(p, *o, "a metadata page")?;
            }
            self.src.flush()?;
        }
        Ok(())
    }

    /// Marks a whole block ZERO (a trim): it reads as zeros and, in a
    /// differencing disk, hides the parent's data. Committed like any write.
    pub fn set_zero(&mut self, block: u64) -> Result<()> {
        if block >= self.geo.payload_blocks() {
            return Err(Error::BadWrite {
                path: self.src.path.clone(),
                offset: block * self.geo.block_size,
                len: self.geo.block_size,
                rule: format!("(zeroing block {block}) passes the disk's end"),
            });
        }
        self.start_session(true)?;
        self.change_data_guid()?;
        self.set_bat(self.geo.pb_index(block), bat::entry(bat::PAYLOAD_ZERO, 0));
        Ok(())
    }

    /// Replaces the parent locator (used when re-linking a child).
    pub fn set_locator(&mut self, locator: &ParentLocator) -> Result<()> {
        self.start_session(false)?;
        let original = self.src.read_vec(
            self.meta_region.length as usize,
            self.meta_region.file_offset,
            "the metadata region",
        )?;
        let mut region = original.clone();
        let bytes = locator.encode();
        let idx = self
            .meta_entries
            .iter()
            .position(|e| e.item == md::PARENT_LOCATOR && !e.is_user())
            .ok_or_else(|| Error::NotDifferencing {
                path: self.src.path.clone(),
                merging: false,
            })?;
        // Place the new item after every existing item; the old one stays
        // until the table entry that points at it has been replaced.
        let end = self
            .meta_entries
            .iter()
            .map(|e| e.offset + e.length)
            .max()
            .unwrap_or(64 * 1024)
            .next_multiple_of(8);
        if end as usize + bytes.len() > region.len() {
            return Err(Error::unsupported(
                &self.src.path,
                "metadata region",
                "no room for a new parent locator",
            ));
        }
        region[end as usize..end as usize + bytes.len()].copy_from_slice(&bytes);
        self.meta_entries[idx].offset = end;
        self.meta_entries[idx].length = bytes.len() as u32;
        let table = md::encode_table(&self.meta_entries);
        region[..table.len()].copy_from_slice(&table);
        let base = self.meta_region.file_offset;
        let pages: Vec<(u64, Vec<u8>)> = region
            .chunks(4096)
            .zip(original.chunks(4096))
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(i, (new, _))| (base + i as u64 * 4096, new.to_vec()))
            .collect();
        self.log_and_apply(&pages)?;
        self.locator = Some(locator.clone());
        Ok(())
    }
}
