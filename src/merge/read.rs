//! The merge's read side: runs read in groups (nearby pieces merged into
//! one read, see `read_pieces`) and hashed on a reader thread while the
//! writer applies the group before; the same reads verify the copied runs
//! afterwards; and the pool of read buffers both share.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::share::Sharing;
use super::{Run, for_each_run};
use crate::disk::{Chain, Extent, Layer};
use crate::error::{Error, Result};
use crate::io::SharedFile;

/// Runs handled together (their reads merged).
pub(super) const GROUP_BYTES: u64 = 8 << 20;
/// Pieces of one file closer than this are read with one call.
const READ_GAP: u64 = 64 << 10;

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
    let pieces = read_pieces(&after.layers, &reqs, buffers)?;
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
            return Err(Error::corrupt(
                a_path,
                "merged data",
                offset,
                format!(
                    "the {len} bytes copied here do not read back; the merge is committed but unverified: run `vhdmerge recover`"
                ),
            ));
        }
    }
    pieces.give_back(buffers);
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
pub(super) struct ReadGroup {
    pub(super) runs: Vec<Run>,
    pub(super) pieces: Pieces,
    pub(super) datas: Vec<Loaded>,
}

fn read_group(
    layers: &[Box<dyn Layer>],
    sharing: &Sharing,
    runs: Vec<Run>,
    buffers: &Buffers,
) -> Result<ReadGroup> {
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
    let pieces = read_pieces(layers, &reqs, buffers)?;
    let mut next = 0;
    let datas = datas
        .into_iter()
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
        runs,
        pieces,
        datas,
    })
}

/// The reader side of the apply pipeline. Sends each group, then the
/// first error if any; stops when the writer has gone.
pub(super) fn read_groups(
    chain: &Chain,
    ancestor: usize,
    from: u64,
    sharing: &Sharing,
    buffers: &Buffers,
    tx: &std::sync::mpsc::SyncSender<Result<ReadGroup>>,
) {
    let mut group: Vec<Run> = Vec::new();
    let mut group_bytes = 0u64;
    let walked = for_each_run(chain, ancestor, from, |r| {
        group_bytes += r.len;
        group.push(r);
        if group_bytes >= GROUP_BYTES || group.len() >= 4096 {
            group_bytes = 0;
            let g = read_group(&chain.layers, sharing, std::mem::take(&mut group), buffers)?;
            tx.send(Ok(g)).map_err(|_| Error::Stopped("writer"))?;
        }
        Ok(())
    });
    let last = walked.and_then(|()| read_group(&chain.layers, sharing, group, buffers));
    // If the writer has gone its own error is the one reported.
    let _ = tx.send(last);
}

/// Reads (level, file offset, length) pieces, merging the pieces of one
/// file that lie within `READ_GAP` of each other into a single read: runs
/// come in guest order, and scattered small runs (4 KiB writes) would
/// otherwise cost a random read each.
fn read_pieces(
    layers: &[Box<dyn Layer>],
    reqs: &[(usize, u64, u64)],
    buffers: &Buffers,
) -> Result<Pieces> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| (reqs[i].0, reqs[i].1));
    let mut out = Pieces {
        bufs: Vec::new(),
        at: vec![(0, 0, 0); reqs.len()],
    };
    let mut i = 0;
    while i < order.len() {
        let (level, start, len) = reqs[order[i]];
        let mut end = start + len;
        let mut j = i + 1;
        while j < order.len() {
            let (l, fo, n) = reqs[order[j]];
            if l != level || fo > end + READ_GAP || fo + n - start > 2 * GROUP_BYTES {
                break;
            }
            end = end.max(fo + n);
            j += 1;
        }
        let mut buf = buffers.take((end - start) as usize);
        if let Err(e) = layers[level].read_data(start, &mut buf) {
            out.give_back(buffers);
            return Err(e);
        }
        let covered: u64 = order[i..j].iter().map(|&k| reqs[k].2).sum();
        if covered * 2 >= end - start {
            // Mostly data (runs side by side): each piece is a slice of
            // the merged read, no copy.
            for &k in &order[i..j] {
                let (_, fo, n) = reqs[k];
                out.at[k] = (out.bufs.len(), (fo - start) as usize, n as usize);
            }
            out.bufs.push(buf);
        } else {
            // Mostly gaps (scattered small runs): the pieces are copied
            // together, so that a group holds its data, not the gaps
            // between, which for 4 KiB runs are most of the read.
            let mut compact = buffers.take(covered as usize);
            let mut at = 0;
            for &k in &order[i..j] {
                let (_, fo, n) = reqs[k];
                let (from, n) = ((fo - start) as usize, n as usize);
                compact[at..at + n].copy_from_slice(&buf[from..from + n]);
                out.at[k] = (out.bufs.len(), at, n);
                at += n;
            }
            out.bufs.push(compact);
            buffers.give(buf);
        }
        i = j;
    }
    Ok(out)
}

/// What `read_pieces` read: a few buffers, and where in them each
/// requested piece lies.
pub(super) struct Pieces {
    bufs: Vec<Vec<u8>>,
    /// Per request: (buffer, start, length).
    at: Vec<(usize, usize, usize)>,
}

impl Pieces {
    pub(super) fn get(&self, k: usize) -> &[u8] {
        let (b, start, len) = self.at[k];
        &self.bufs[b][start..start + len]
    }

    pub(super) fn give_back(self, buffers: &Buffers) {
        for b in self.bufs {
            buffers.give(b);
        }
    }
}

/// Read buffers handed back once written or hashed, for the next read: a
/// fresh buffer of several MiB costs a page fault and a zeroed page per
/// 4 KiB, about a tenth of a whole-block merge's CPU time.
#[derive(Default)]
pub(super) struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// Bytes kept: about two groups. Enough to serve the groups in flight,
    /// little enough that peak memory stays what the groups themselves
    /// take (a cap on the count alone let a 5-level merge, whose merged
    /// reads reach 16 MiB, keep 64 MiB).
    const KEEP_BYTES: usize = 2 * GROUP_BYTES as usize;

    /// A buffer of `len` bytes with any contents (the caller overwrites it).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match kept.iter().position(|v| v.capacity() >= len) {
            Some(i) => {
                let mut v = kept.swap_remove(i);
                v.resize(len, 0);
                v
            }
            None => vec![0; len],
        }
    }

    fn give(&self, v: Vec<u8>) {
        if v.capacity() < 1 << 20 {
            return;
        }
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = kept.iter().map(Vec::capacity).sum();
        if held + v.capacity() <= Self::KEEP_BYTES {
            kept.push(v);
        }
    }
}

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
        let pieces = read_pieces(&layers, &reqs, &buffers).unwrap();
        for (k, &(level, fo, n)) in reqs.iter().enumerate() {
            let seed = [1, 2][level];
            assert_eq!(pieces.get(k), expected(len, seed, fo, n), "request {k}");
        }
        // a's first three pieces (within READ_GAP) are one read, the far
        // one at 20 MiB another (with its neighbour 1000 bytes on), and b
        // its own.
        assert_eq!(pieces.bufs.len(), 3);
        pieces.give_back(&buffers);
    }

    /// Scattered small pieces are copied together, so the group holds
    /// their bytes and not the gaps between them.
    #[test]
    fn scattered_pieces_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let layers = vec![layer(dir.path(), "a", 4 << 20, 3)];
        let reqs: Vec<(usize, u64, u64)> = (0..64).map(|i| (0, i * 60_000, 512)).collect();
        let pieces = read_pieces(&layers, &reqs, &Buffers::default()).unwrap();
        let held: usize = pieces.bufs.iter().map(Vec::len).sum();
        assert_eq!(held, 64 * 512);
        for (k, &(_, fo, n)) in reqs.iter().enumerate() {
            assert_eq!(pieces.get(k), expected(4 << 20, 3, fo, n));
        }
    }

    #[test]
    fn the_buffer_pool_keeps_at_most_two_groups() {
        let b = Buffers::default();
        for _ in 0..8 {
            b.give(vec![0u8; 4 << 20]);
        }
        let held: usize = b.0.lock().unwrap().iter().map(Vec::capacity).sum();
        assert!(held <= Buffers::KEEP_BYTES, "{held}");
        assert_eq!(b.take(1 << 20).len(), 1 << 20);
    }
}
