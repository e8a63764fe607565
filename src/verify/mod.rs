//! Digests of the guest-visible disk and the sparse raw export.
//!
//! * Flat digest: BLAKE3 of the whole byte stream (equal to `b3sum` of a raw
//!   export).
//! * Content digest: see `docs/digest.md`: BLAKE3 per 1 MiB chunk, and a
//!   root over the virtual size and the chunk list. Chunks no level
//!   allocates hash to a constant without any I/O.

pub mod check;
pub mod manifest;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::disk::{Chain, Extent};
use crate::error::{Error, Result};

pub const CHUNK: u64 = 1 << 20;
const BUF: usize = 8 << 20;
/// Zeros to hash holes from; large enough for blake3 to spread over all cores.
static ZEROS: [u8; 16 << 20] = [0u8; 16 << 20];

/// Where the guest bytes at `pos` come from, like `Chain::resolve`, with
/// the holes a file keeps inside its allocated blocks (sectors never
/// written) turned into zero runs: they read as zeros, so readers skip
/// them instead of reading and hashing them.
fn resolve_stored(chain: &Chain, pos: u64, len: u64) -> Result<(usize, Extent, u64)> {
    let (l, ext, n) = chain.resolve(0, pos, len)?;
    let Extent::Data(fo) = ext else {
        return Ok((l, ext, n));
    };
    let (stored, n) = chain.layers[l].stored(fo, n)?;
    Ok((l, if stored { ext } else { Extent::Zero }, n))
}

/// One piece of the guest disk: data (in a buffer of at least `len`
/// bytes) or `len` zeros.
struct Piece {
    pos: u64,
    len: u64,
    data: Option<Vec<u8>>,
}

/// Zero runs handed on at once: large, since they cost no reading.
const ZERO_PIECE: u64 = 1 << 30;

/// Calls `f(offset, Some(bytes), len)` for data and `f(offset, None, len)`
/// for zero runs, in order: data in pieces of at most `BUF` bytes, read
/// ahead on a thread of its own while `f` works on the piece before.
pub fn stream(
    chain: &Chain,
    mut f: impl FnMut(u64, Option<&[u8]>, u64) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|s| {
        // Two pieces ahead: the reader stays busy while `f` hashes or
        // writes, and memory stays a few buffers.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Piece>>(2);
        let (back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        s.spawn(move || read_ahead(chain, &tx, &spare));
        for piece in rx {
            let p = piece?;
            f(
                p.pos,
                p.data.as_deref().map(|d| &d[..p.len as usize]),
                p.len,
            )?;
            if let Some(buf) = p.data {
                let _ = back.send(buf);
            }
        }
        Ok(())
    })
}

/// The reader side of `stream`: sends every piece in order, or the first
/// error; stops when the receiver has gone.
fn read_ahead(
    chain: &Chain,
    tx: &std::sync::mpsc::SyncSender<Result<Piece>>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let size = chain.virtual_size();
    let mut pos = 0u64;
    while pos < size {
        let piece = next_piece(chain, pos, spare);
        let len = piece.as_ref().map_or(0, |p| p.len);
        if tx.send(piece).is_err() || len == 0 {
            return;
        }
        pos += len;
    }
}

/// The piece at `pos`: consecutive runs of one kind (data or zeros).
fn next_piece(
    chain: &Chain,
    pos: u64,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<Piece> {
    let size = chain.virtual_size();
    let (_, first, _) = resolve_stored(chain, pos, (size - pos).min(BUF as u64))?;
    if !matches!(first, Extent::Data(_)) {
        let want = (size - pos).min(ZERO_PIECE);
        let mut len = 0u64;
        while len < want {
            let (_, ext, n) = resolve_stored(chain, pos + len, want - len)?;
            if matches!(ext, Extent::Data(_)) {
                break;
            }
            len += n;
        }
        return Ok(Piece {
            pos,
            len,
            data: None,
        });
    }
    let want = (size - pos).min(BUF as u64);
    let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0u8; BUF]);
    let mut len = 0u64;
    while len < want {
        let (l, ext, n) = resolve_stored(chain, pos + len, want - len)?;
        let Extent::Data(fo) = ext else { break };
        chain.layers[l].read_data(fo, &mut buf[len as usize..(len + n) as usize])?;
        len += n;
    }
    Ok(Piece {
        pos,
        len,
        data: Some(buf),
    })
}

fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        if k >= 1 << 20 {
            h.update_rayon(&ZEROS[..k]);
        } else {
            h.update(&ZEROS[..k]);
        }
        n -= k as u64;
    }
}

/// BLAKE3 of the whole guest-visible disk.
pub fn flat_digest(chain: &Chain, mut progress: impl FnMut(u64)) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    stream(chain, |pos, data, n| {
        match data {
            Some(d) if d.len() >= 256 * 1024 => {
                h.update_rayon(d);
            }
            Some(d) => {
                h.update(d);
            }
            None => hash_zeros(&mut h, n),
        }
        progress(pos + n);
        Ok(())
    })?;
    Ok(h.finalize())
}

/// Writes the guest-visible disk as a sparse raw file: zero runs (and data
/// that happens to be zeros) become holes.
pub fn export_raw(chain: &Chain, out: &Path, mut progress: impl FnMut(u64)) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| Error::io(out, "creating", e))?;
    file.set_len(chain.virtual_size())
        .map_err(|e| Error::io(out, "sizing", e))?;
    stream(chain, |pos, data, n| {
        if let Some(d) = data {
            let mut at = 0usize;
            for piece in d.chunks(64 * 1024) {
                if piece.iter().any(|&b| b != 0) {
                    file.write_all_at(piece, pos + at as u64)
                        .map_err(|e| Error::io(out, "writing", e))?;
                }
                at += piece.len();
            }
        }
        progress(pos + n);
        Ok(())
    })?;
    file.sync_all().map_err(|e| Error::io(out, "flushing", e))
}

/// Domain separation for the content digest root (docs/digest.md).
pub const CONTENT_TAG: &[u8] = b"vhdmerge content digest v1\0";

pub struct ContentDigest {
    pub root: blake3::Hash,
    pub chunks: u64,
    /// Chunks that needed reading (the rest were known zeros).
    pub read_chunks: u64,
}

/// The content digest: BLAKE3 of each 1 MiB chunk, then a root over the
/// tag, the virtual size, the chunk size and the chunk hashes in order.
pub fn content_digest(chain: &Chain, mut progress: impl FnMut(u64)) -> Result<ContentDigest> {
    content_digest_with(chain, |_, _| {}, &mut progress)
}

/// Chunks read and hashed together.
const BATCH: usize = 32;

/// A batch of chunks from `start`, read into one buffer at their guest
/// offsets: (length, known zero) per chunk (the known-zero ones unread).
struct Batch {
    start: u64,
    chunks: Vec<(usize, bool)>,
    buf: Vec<u8>,
}

/// Like [`content_digest`], also handing each chunk's hash to `on_chunk`.
pub fn content_digest_with(
    chain: &Chain,
    mut on_chunk: impl FnMut(u64, &blake3::Hash),
    progress: &mut dyn FnMut(u64),
) -> Result<ContentDigest> {
    let size = chain.virtual_size();
    let zero_chunk = blake3::hash(&ZEROS[..CHUNK as usize]);
    let mut root = blake3::Hasher::new();
    root.update(CONTENT_TAG);
    root.update(&size.to_le_bytes());
    root.update(&CHUNK.to_le_bytes());
    let (mut chunks, mut read_chunks) = (0u64, 0u64);
    // One thread reads the next batch sequentially while the others hash
    // the allocated chunks of this one on every core.
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(1);
        let (back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        s.spawn(move || read_batches(chain, &tx, &spare));
        for batch in rx {
            let b = batch?;
            let hashes = hash_batch(&b, zero_chunk);
            for (i, h) in hashes.iter().enumerate() {
                on_chunk(b.start / CHUNK + i as u64, h);
                root.update(h.as_bytes());
            }
            chunks += b.chunks.len() as u64;
            read_chunks += b.chunks.iter().filter(|c| !c.1).count() as u64;
            progress((b.start + b.chunks.len() as u64 * CHUNK).min(size));
            let _ = back.send(b.buf);
        }
        Ok(())
    })?;
    Ok(ContentDigest {
        root: root.finalize(),
        chunks,
        read_chunks,
    })
}

/// The reader side of `content_digest_with`: every batch in order, or the
/// first error; stops when the receiver has gone.
fn read_batches(
    chain: &Chain,
    tx: &std::sync::mpsc::SyncSender<Result<Batch>>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let size = chain.virtual_size();
    let mut pos = 0u64;
    while pos < size {
        let buf = (spare.try_recv()).unwrap_or_else(|_| vec![0u8; BATCH * CHUNK as usize]);
        let batch = read_batch(chain, pos, buf);
        let next = (batch.as_ref().ok())
            .map(|b| b.start + b.chunks.iter().map(|c| c.0 as u64).sum::<u64>());
        if tx.send(batch).is_err() {
            return;
        }
        match next {
            Some(n) => pos = n,
            None => return,
        }
    }
}

/// Reads up to `BATCH` chunks from `pos` into `buf`, each data run with
/// one read; chunks that are only zero runs and holes are known zeros and
/// left unread (and unfilled).
fn read_batch(chain: &Chain, start: u64, mut buf: Vec<u8>) -> Result<Batch> {
    let end = chain.virtual_size().min(start + BATCH as u64 * CHUNK);
    let count = (end - start).div_ceil(CHUNK) as usize;
    let mut has_data = vec![false; count];
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let mut pos = start;
    while pos < end {
        let (l, ext, n) = resolve_stored(chain, pos, end - pos)?;
        let at = pos - start;
        match ext {
            Extent::Data(fo) => {
                chain.layers[l].read_data(fo, &mut buf[at as usize..(at + n) as usize])?;
                for c in (at / CHUNK)..=((at + n - 1) / CHUNK) {
                    has_data[c as usize] = true;
                }
            }
            _ => zeros.push((at, n)),
        }
        pos += n;
    }
    // Zero runs inside chunks that also hold data are filled; the others
    // are never looked at.
    for (at, n) in zeros {
        for c in (at / CHUNK)..=((at + n - 1) / CHUNK) {
            if has_data[c as usize] {
                let lo = at.max(c * CHUNK);
                let hi = (at + n).min((c + 1) * CHUNK);
                buf[lo as usize..hi as usize].fill(0);
            }
        }
    }
    let chunks = (0..count)
        .map(|c| {
            let len = (end - start - c as u64 * CHUNK).min(CHUNK) as usize;
            // A short last chunk of zeros is hashed: the constant is for
            // a whole chunk.
            if !has_data[c] && len < CHUNK as usize {
                let at = c * CHUNK as usize;
                buf[at..at + len].fill(0);
                return (len, false);
            }
            (len, !has_data[c])
        })
        .collect();
    Ok(Batch { start, chunks, buf })
}

/// The hash of every chunk of a batch, the allocated ones hashed on every
/// core, the known-zero ones the constant.
fn hash_batch(b: &Batch, zero_chunk: blake3::Hash) -> Vec<blake3::Hash> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let mut hashes = vec![zero_chunk; b.chunks.len()];
    let per = b.chunks.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for ((hs, bs), bt) in hashes
            .chunks_mut(per)
            .zip(b.buf.chunks(per * CHUNK as usize))
            .zip(b.chunks.chunks(per))
        {
            s.spawn(move || {
                for ((h, buf), &(len, zero)) in hs.iter_mut().zip(bs.chunks(CHUNK as usize)).zip(bt)
                {
                    if !zero {
                        *h = blake3::hash(&buf[..len]);
                    }
                }
            });
        }
    });
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::raw::RawDisk;

    /// The content digest as docs/digest.md defines it, from the bytes.
    fn reference(bytes: &[u8]) -> blake3::Hash {
        let mut root = blake3::Hasher::new();
        root.update(CONTENT_TAG);
        root.update(&(bytes.len() as u64).to_le_bytes());
        root.update(&CHUNK.to_le_bytes());
        for c in bytes.chunks(CHUNK as usize) {
            root.update(blake3::hash(c).as_bytes());
        }
        root.finalize()
    }

    /// Sparse files of awkward sizes (holes, data at the end, a short last
    /// chunk of zeros or of data): both digests equal the definitions.
    #[test]
    fn digests_skip_holes_without_changing() {
        let dir = tempfile::tempdir().unwrap();
        let sizes: [(u64, &[(u64, usize)]); 4] = [
            ((40 << 20) + 4096, &[(0, 512), (3 << 20, 2 << 20)]),
            ((33 << 20) + 512, &[((33 << 20) + 100, 412)]),
            (5 << 20, &[]),
            (
                (7 << 20) + 1000,
                &[((1 << 20) + 7, 70_000), (6 << 20, 1 << 20)],
            ),
        ];
        for (k, (size, writes)) in sizes.iter().enumerate() {
            let p = dir.path().join(format!("f{k}.raw"));
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(*size).unwrap();
            let mut bytes = vec![0u8; *size as usize];
            for &(at, n) in writes.iter() {
                let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 + 1).collect();
                f.write_all_at(&data, at).unwrap();
                bytes[at as usize..at as usize + n].copy_from_slice(&data);
            }
            drop(f);
            let chain = Chain::single(Box::new(RawDisk::open(&p).unwrap()));
            let got = content_digest(&chain, |_| {}).unwrap();
            assert_eq!(got.root, reference(&bytes), "content, file {k}");
            let flat = flat_digest(&chain, |_| {}).unwrap();
            assert_eq!(flat, blake3::hash(&bytes), "flat, file {k}");
        }
    }
}
