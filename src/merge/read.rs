//! The merge's read side: runs read in groups (nearby pieces merged into
//! one read, see `read_pieces`) and hashed on a reader thread while the
//! writer applies the group before; the same reads verify the copied runs
//! afterwards; and the pool of read buffers both share.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use super::share::Sharing;
use super::{Run, for_each_run};
use crate::disk::{Chain, Extent, Layer};
use crate::error::{Error, Result};
use crate::io::SharedFile;
use crate::io::mapped::Mapped;

/// Runs handled together (their reads merged).
pub(super) const GROUP_BYTES: u64 = 8 << 20;
/// Pieces of one file closer than this are read with one call.
const READ_GAP: u64 = 64 << 10;
/// The longest merged read. A read of mostly gaps is compacted, so its
/// buffer is transient; this bounds it.
pub(super) const MERGED_READ: u64 = 2 << 20;
/// Reads at least this long, of a file the layer reads straight from, are
/// mapped instead of copied (io/mapped.rs); below it the calls that map,
/// fault in and unmap cost more than the copy they save.
const MAP_MIN: u64 = 256 << 10;
/// Groups whose reads are announced before the one being read.
const AHEAD: usize = 2;

/// Reads one group of copied runs back through the ancestor's view and
/// matches each to the BLAKE3 recorded when it was copied.
pub(super) fn verify_group(
    after: &Chain,
    a_path: &Path,
    chunk: &[(u64, u64, [u8; 32])],
    buffers: &Buffers,
) -> Result<()> {
    // Where each run lives in the ancestor's view now.
    let mut reqs: Vec<(usize, u64, u64)> = Vec::new();
    let mut layout: Vec<Vec<Option<u64>>> = Vec::new();
    for &(offset, len, _) in chunk {
        let mut parts = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let (level, ext, n) = after.resolve(0, pos, offset + len - pos)?;
            match ext {
                Extent::Data(fo) => {
                    reqs.push((level, fo, n));
                    parts.push(None);
                }
                _ => parts.push(Some(n)),
            }
            pos += n;
        }
        layout.push(parts);
    }
    // What was just written is in the page cache: reading the gaps
    // between runs would cost more than the calls it saves.
    announce(&after.layers, &reqs, 0);
    let pieces = read_pieces(&after.layers, &reqs, 0, buffers)?;
    let mut next = 0;
    for (&(offset, len, hash), parts) in chunk.iter().zip(layout) {
        let mut hasher = blake3::Hasher::new();
        for p in parts {
            match p {
                None => {
                    hasher.update(pieces.get(next));
                    next += 1;
                }
                Some(zeros) => {
                    let z = vec![0u8; zeros as usize];
                    hasher.update(&z);
                }
            }
        }
        if *hasher.finalize().as_bytes() != hash {
            return Err(super::verify::mismatch(a_path, offset, len));
        }
    }
    drop(pieces);
    Ok(())
}

/// How the writer gets a run's bytes.
pub(super) enum Loaded {
    /// Read: its piece in `pieces` and the piece's BLAKE3.
    Read(usize, [u8; 32]),
    /// Not read: put straight from this merged file at this offset
    /// (cloned where the file system can).
    Shared(Arc<SharedFile>, u64),
    /// No source: zeros.
    Zeros,
}

/// Runs with how to get their bytes.
pub(super) struct ReadGroup<'a> {
    pub(super) runs: Vec<Run>,
    pub(super) pieces: Pieces<'a>,
    pub(super) datas: Vec<Loaded>,
}

/// A group whose runs are walked and whose reads the kernel has been asked
/// to start, not yet read.
struct Announced {
    runs: Vec<Run>,
    datas: Vec<Loaded>,
    /// The pieces to read: (level, file offset, length).
    reqs: Vec<(usize, u64, u64)>,
}

impl Announced {
    fn new(layers: &[Box<dyn Layer>], sharing: &Sharing, runs: Vec<Run>) -> Announced {
        let datas: Vec<Loaded> = runs
            .iter()
            .map(|r| match (r.source, sharing.active(r.level)) {
                (Some(fo), Some(f)) => Loaded::Shared(f.clone(), fo),
                (Some(_), None) => Loaded::Read(0, [0; 32]),
                (None, _) => Loaded::Zeros,
            })
            .collect();
        let reqs: Vec<(usize, u64, u64)> = runs
            .iter()
            .zip(&datas)
            .filter(|(_, d)| matches!(d, Loaded::Read(..)))
            .filter_map(|(r, _)| r.source.map(|fo| (r.level, fo, r.len)))
            .collect();
        announce(layers, &reqs, READ_GAP);
        Announced { runs, datas, reqs }
    }

    /// Reads the group's pieces and hashes each.
    fn read<'a>(self, layers: &[Box<dyn Layer>], buffers: &'a Buffers) -> Result<ReadGroup<'a>> {
        let pieces = read_pieces(layers, &self.reqs, READ_GAP, buffers)?;
        let mut next = 0;
        let datas = (self.datas.into_iter())
            .map(|d| match d {
                Loaded::Read(..) => {
                    let k = next;
                    next += 1;
                    Loaded::Read(k, *blake3::hash(pieces.get(k)).as_bytes())
                }
                other => other,
            })
            .collect();
        Ok(ReadGroup {
            runs: self.runs,
            pieces,
            datas,
        })
    }
}

/// The reader side of the apply pipeline. Sends each group, then the
/// first error if any; stops when the writer has gone.
///
/// Each group's reads are announced to the kernel `AHEAD` groups ahead,
/// so that the disk reads the next groups while the reader maps and
/// hashes this one; announced only when their turn came, the reader would wait
/// for the disk with its CPU idle, and the disk for the reader.
pub(super) fn read_groups<'a>(
    chain: &Chain,
    ancestor: usize,
    from: u64,
    sharing: &Sharing,
    buffers: &'a Buffers,
    tx: &std::sync::mpsc::SyncSender<Result<ReadGroup<'a>>>,
) {
    let layers = &chain.layers;
    let mut ahead: VecDeque<Announced> = VecDeque::new();
    // Reads the oldest group announced and sends it.
    let send_oldest = |ahead: &mut VecDeque<Announced>| -> Result<()> {
        let g = ahead.pop_front().expect("announced");
        let g = g.read(layers, buffers)?;
        tx.send(Ok(g)).map_err(|_| Error::Stopped("writer"))
    };
    // Announces `runs`, then sends the group announced `AHEAD` turns before.
    let turn = |ahead: &mut VecDeque<Announced>, runs: Vec<Run>| -> Result<()> {
        ahead.push_back(Announced::new(layers, sharing, runs));
        match ahead.len() > AHEAD {
            true => send_oldest(ahead),
            false => Ok(()),
        }
    };
    let mut group: Vec<Run> = Vec::new();
    let mut group_bytes = 0u64;
    let walked = for_each_run(chain, ancestor, from, |r| {
        group_bytes += r.len;
        group.push(r);
        if group_bytes >= GROUP_BYTES || group.len() >= 4096 {
            group_bytes = 0;
            turn(&mut ahead, std::mem::take(&mut group))?;
        }
        Ok(())
    });
    // The last group, maybe empty, is the last message.
    let last = walked
        .and_then(|()| turn(&mut ahead, group))
        .and_then(|()| {
            while ahead.len() > 1 {
                send_oldest(&mut ahead)?;
            }
            ahead.pop_front().expect("announced").read(layers, buffers)
        });
    // If the writer has gone its own error is the one reported.
    let _ = tx.send(last);
}

/// One read of `read_pieces`: the requests `order[i..j]`, all of one
/// file, at [start, end), of which `covered` bytes are requested.
struct MergedRead {
    i: usize,
    j: usize,
    start: u64,
    end: u64,
    covered: u64,
    /// Mapped in place rather than read into a buffer.
    mapped: bool,
}

impl MergedRead {
    /// Long enough to map, and mostly data even widened to whole pages
    /// (so that a group still holds at most twice its data; such a read is
    /// never compacted).
    fn suits_mapping(&self) -> bool {
        let len = self.end - self.start;
        len >= MAP_MIN && Mapped::footprint(self.start, len) <= 2 * self.covered
    }

    /// The memory the read holds until its group is written.
    fn held(&self) -> u64 {
        match (self.mapped, self.compacted()) {
            (true, _) => Mapped::footprint(self.start, self.end - self.start),
            (false, true) => self.covered,
            (false, false) => self.end - self.start,
        }
    }

    /// Mostly gaps (scattered small runs): the pieces are copied together,
    /// so that a group holds its data, not the gaps between, which for
    /// 4 KiB runs are most of the read.
    fn compacted(&self) -> bool {
        self.covered * 2 < self.end - self.start
    }
}

/// The reads for `reqs` (in `order`): pieces of one file within `gap`
/// bytes of each other and within `MERGED_READ` bytes are one read.
fn plan_reads(reqs: &[(usize, u64, u64)], order: &[usize], gap: u64) -> Vec<MergedRead> {
    let mut reads = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let (level, start, len) = reqs[order[i]];
        let mut end = start + len;
        let mut j = i + 1;
        while j < order.len() {
            let (l, fo, n) = reqs[order[j]];
            if l != level || fo > end + gap || fo + n - start > MERGED_READ {
                break;
            }
            end = end.max(fo + n);
            j += 1;
        }
        let covered = order[i..j].iter().map(|&k| reqs[k].2).sum();
        reads.push(MergedRead {
            i,
            j,
            start,
            end,
            covered,
            mapped: false,
        });
        i = j;
    }
    reads
}

/// Bytes of buffers `reads` hold at most at once: what they keep (whole
/// reads, or the compacted pieces) and the largest transient read.
fn buffer_bytes(reads: &[MergedRead]) -> usize {
    let kept: u64 = reads.iter().map(MergedRead::held).sum();
    let transient = reads
        .iter()
        .filter(|r| r.compacted())
        .map(|r| r.end - r.start)
        .max()
        .unwrap_or(0);
    (kept + transient) as usize
}

/// Asks the kernel to start reading what `read_pieces` with `gap` will
/// read (`io::will_need`), all at once: for scattered pieces that is one
/// queue of many reads instead of one random read at a time.
fn announce(layers: &[Box<dyn Layer>], reqs: &[(usize, u64, u64)], gap: u64) {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| (reqs[i].0, reqs[i].1));
    for r in plan_reads(reqs, &order, gap) {
        if let Some(fd) = layers[reqs[order[r.i]].0].file() {
            crate::io::will_need(fd, r.start, r.end - r.start);
        }
    }
}

/// Reads (level, file offset, length) pieces, merging the pieces of one
/// file that lie within `gap` bytes into a single read: runs come in guest
/// order, and scattered small runs (4 KiB writes) would otherwise cost a
/// random read each (`announce` them first, so that the disk has them all
/// at once). The buffers' bytes are reserved from `buffers` before the
/// first read (which may wait for other groups to go).
fn read_pieces<'a>(
    layers: &[Box<dyn Layer>],
    reqs: &[(usize, u64, u64)],
    gap: u64,
    buffers: &'a Buffers,
) -> Result<Pieces<'a>> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| (reqs[i].0, reqs[i].1));
    let mut reads = plan_reads(reqs, &order, gap);
    for r in &mut reads {
        r.mapped = r.suits_mapping() && layers[reqs[order[r.i]].0].file().is_some();
    }
    let mut out = Pieces {
        held: Vec::new(),
        at: vec![(0, 0, 0); reqs.len()],
        reserved: buffers.reserve(buffer_bytes(&reads)),
        pool: buffers,
    };
    for r in reads {
        let level = reqs[order[r.i]].0;
        let len = (r.end - r.start) as usize;
        let fd = layers[level].file().filter(|_| r.mapped);
        // A mapping that fails is read the ordinary way, which names what
        // is wrong.
        let held = match fd.map(|fd| Mapped::map(fd, r.start, len)) {
            Some(Ok(m)) => Held::Mapped(m),
            _ => {
                let mut buf = buffers.take(len);
                layers[level].read_data(r.start, &mut buf)?;
                Held::Buffer(buf)
            }
        };
        if !r.compacted() {
            // Each piece is a slice of the merged read, no copy.
            for &k in &order[r.i..r.j] {
                let (_, fo, n) = reqs[k];
                out.at[k] = (out.held.len(), (fo - r.start) as usize, n as usize);
            }
            out.held.push(held);
            continue;
        }
        let Held::Buffer(buf) = held else {
            unreachable!("a compacted read is never mapped");
        };
        let mut compact = buffers.take(r.covered as usize);
        let mut at = 0;
        for &k in &order[r.i..r.j] {
            let (_, fo, n) = reqs[k];
            let (from, n) = ((fo - r.start) as usize, n as usize);
            compact[at..at + n].copy_from_slice(&buf[from..from + n]);
            out.at[k] = (out.held.len(), at, n);
            at += n;
        }
        out.held.push(Held::Buffer(compact));
        buffers.give(buf);
    }
    Ok(out)
}

/// The bytes of one read of `read_pieces`.
enum Held {
    Buffer(Vec<u8>),
    Mapped(Mapped),
}

impl Held {
    fn bytes(&self) -> &[u8] {
        match self {
            Held::Buffer(b) => b,
            Held::Mapped(m) => m.bytes(),
        }
    }

    /// The memory it takes (for tests of the bound).
    #[cfg(test)]
    fn memory(&self) -> usize {
        match self {
            Held::Buffer(b) => b.capacity(),
            Held::Mapped(m) => m.mapped_len(),
        }
    }
}

/// What `read_pieces` read: a few buffers or mappings, and where in them
/// each requested piece lies. Dropping it unmaps the mappings and gives
/// the buffers and their reservation back to the pool.
pub(super) struct Pieces<'a> {
    held: Vec<Held>,
    /// Per request: (buffer, start, length).
    at: Vec<(usize, usize, usize)>,
    reserved: usize,
    pool: &'a Buffers,
}

impl Pieces<'_> {
    pub(super) fn get(&self, k: usize) -> &[u8] {
        let (b, start, len) = self.at[k];
        &self.held[b].bytes()[start..start + len]
    }
}

impl Drop for Pieces<'_> {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.held).into_iter();
        let bufs = bufs.filter_map(|h| match h {
            Held::Buffer(b) => Some(b),
            Held::Mapped(_) => None,
        });
        self.pool.give_back(bufs.collect(), self.reserved);
    }
}

/// The read buffers of a merge, bounded in bytes: a group reserves what
/// its reads will hold before reading, and waits while the groups in
/// flight would pass `memory::READ_BUFFERS` (a group alone never waits; no
/// group needs more, see `buffer_bytes`). Buffers handed back are kept for
/// the next reads within the same bound: a fresh buffer of several MiB
/// costs a page fault and a zeroed page per 4 KiB, about a tenth of a
/// whole-block merge's CPU time.
pub(super) struct Buffers {
    pool: Mutex<Pool>,
    freed: Condvar,
    limit: usize,
}

#[derive(Default)]
struct Pool {
    /// Bytes reserved by the groups in flight.
    reserved: usize,
    kept: Vec<Vec<u8>>,
    /// The most bytes reserved and kept at once (for tests).
    peak: usize,
}

impl Pool {
    fn kept_bytes(&self) -> usize {
        self.kept.iter().map(Vec::capacity).sum()
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers::with_limit(super::memory::READ_BUFFERS)
    }
}

impl Buffers {
    fn with_limit(limit: usize) -> Buffers {
        Buffers {
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `bytes` for a group's buffers, waiting until the groups in
    /// flight leave room; kept buffers beyond the room left are freed.
    fn reserve(&self, bytes: usize) -> usize {
        let mut pool = self.lock();
        while pool.reserved > 0 && pool.reserved + bytes > self.limit {
            pool = self.freed.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
        pool.reserved += bytes;
        while pool.reserved + pool.kept_bytes() > self.limit && !pool.kept.is_empty() {
            pool.kept.swap_remove(0);
        }
        pool.peak = pool.peak.max(pool.reserved + pool.kept_bytes());
        bytes
    }

    /// A buffer of `len` bytes with any contents (the caller overwrites
    /// it): the smallest kept one that fits, cut to about `len`.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut pool = self.lock();
        let fit = (0..pool.kept.len())
            .filter(|&i| pool.kept[i].capacity() >= len)
            .min_by_key(|&i| pool.kept[i].capacity());
        match fit {
            Some(i) => {
                let mut v = pool.kept.swap_remove(i);
                drop(pool);
                if v.capacity() > len + len / 4 {
                    v.clear();
                    v.shrink_to(len);
                }
                v.resize(len, 0);
                v
            }
            None => vec![0; len],
        }
    }

    /// Keeps a buffer a read no longer needs, if the bound leaves room.
    fn give(&self, v: Vec<u8>) {
        let mut pool = self.lock();
        Self::keep(&mut pool, v, self.limit);
    }

    fn keep(pool: &mut Pool, v: Vec<u8>, limit: usize) {
        if v.capacity() < 1 << 20 {
            return;
        }
        let kept = pool.kept_bytes();
        if kept + v.capacity() <= KEEP_BYTES && pool.reserved + kept + v.capacity() <= limit {
            pool.kept.push(v);
        }
    }

    fn give_back(&self, bufs: Vec<Vec<u8>>, reserved: usize) {
        let mut pool = self.lock();
        pool.reserved -= reserved;
        for v in bufs {
            Self::keep(&mut pool, v, self.limit);
        }
        drop(pool);
        self.freed.notify_all();
    }
}

/// Bytes of buffers kept for reuse: about two groups.
const KEEP_BYTES: usize = 2 * GROUP_BYTES as usize;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::raw::RawDisk;

    /// A raw file of `len` patterned bytes, opened as a layer.
    fn layer(dir: &Path, name: &str, len: usize, seed: u8) -> Box<dyn Layer> {
        let bytes: Vec<u8> = (0..len).map(|i| (i / 7) as u8 ^ seed).collect();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        Box::new(RawDisk::open(&p).unwrap())
    }

    fn expected(len: usize, seed: u8, at: u64, n: u64) -> Vec<u8> {
        (at as usize..(at + n) as usize)
            .map(|i| (i / 7) as u8 ^ seed)
            .take(len)
            .collect()
    }

    /// Near pieces are read together, far ones apart, pieces of other
    /// files apart; either way each request gets exactly its bytes.
    #[test]
    fn pieces_are_read_merged_and_handed_out_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let len = 32 << 20;
        let layers = vec![
            layer(dir.path(), "a", len, 1),
            layer(dir.path(), "b", len, 2),
        ];
        let reqs = vec![
            (0, 4096, 4096),
            (0, 8192, 512),
            (1, 4096, 4096),
            (0, 20 << 20, 65536),
            (0, 12288, 1 << 20),
            (0, (20 << 20) + 65536 + 1000, 100),
        ];
        let buffers = Buffers::default();
        let pieces = read_pieces(&layers, &reqs, READ_GAP, &buffers).unwrap();
        for (k, &(level, fo, n)) in reqs.iter().enumerate() {
            let seed = [1, 2][level];
            assert_eq!(pieces.get(k), expected(len, seed, fo, n), "request {k}");
        }
        // a's first three pieces (within READ_GAP) are one read, the far
        // one at 20 MiB another (with its neighbour 1000 bytes on), and b
        // its own.
        assert_eq!(pieces.held.len(), 3);
        // The first read, over 1 MiB of one file, is mapped in place.
        assert!(matches!(pieces.held[0], Held::Mapped(_)));
        let held: usize = pieces.held.iter().map(Held::memory).sum();
        assert!(held <= pieces.reserved, "{held} > {}", pieces.reserved);
    }

    /// Scattered small pieces are copied together, so the group holds
    /// their bytes and not the gaps between them.
    #[test]
    fn scattered_pieces_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let layers = vec![layer(dir.path(), "a", 4 << 20, 3)];
        let reqs: Vec<(usize, u64, u64)> = (0..64).map(|i| (0, i * 60_000, 512)).collect();
        let buffers = Buffers::default();
        let pieces = read_pieces(&layers, &reqs, READ_GAP, &buffers).unwrap();
        let held: usize = pieces.held.iter().map(|h| h.bytes().len()).sum();
        assert_eq!(held, 64 * 512);
        assert!(pieces.held.iter().map(Held::memory).sum::<usize>() <= pieces.reserved);
        for (k, &(_, fo, n)) in reqs.iter().enumerate() {
            assert_eq!(pieces.get(k), expected(4 << 20, 3, fo, n));
        }
    }

    /// Groups wait for room: what is reserved and kept never passes the
    /// limit, however many readers ask at once, and all of it comes back.
    #[test]
    fn reservations_and_kept_buffers_stay_within_the_limit() {
        let b = Buffers::with_limit(6 << 20);
        std::thread::scope(|s| {
            for t in 0..3usize {
                let b = &b;
                s.spawn(move || {
                    for i in 0..40 {
                        let n = ((t + i) % 4 + 1) << 20;
                        let r = b.reserve(n);
                        let v = b.take(n);
                        assert!(v.capacity() <= n + n / 4);
                        std::thread::yield_now();
                        b.give_back(vec![v], r);
                    }
                });
            }
        });
        let pool = b.lock();
        assert!(pool.peak <= 6 << 20, "peak {}", pool.peak);
        assert_eq!(pool.reserved, 0);
    }

    #[test]
    fn the_buffer_pool_keeps_at_most_two_groups() {
        let b = Buffers::default();
        for _ in 0..8 {
            b.give(vec![0u8; 4 << 20]);
        }
        assert!(b.lock().kept_bytes() <= KEEP_BYTES);
        assert_eq!(b.take(1 << 20).len(), 1 << 20);
    }
}
