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

/// Calls `f(offset, Some(bytes))` for data and `f(offset, None)`+len for
/// zero runs, in order, in pieces of at most `BUF` bytes.
pub fn stream(
    chain: &Chain,
    mut f: impl FnMut(u64, Option<&[u8]>, u64) -> Result<()>,
) -> Result<()> {
    let size = chain.virtual_size();
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(BUF as u64);
        // Gather consecutive runs of the same kind (data or zero) up to BUF.
        let (_, first, _) = chain.resolve(0, pos, want)?;
        let zero = matches!(first, Extent::Zero);
        let mut filled = 0u64;
        while filled < want {
            let (l, ext, n) = chain.resolve(0, pos + filled, want - filled)?;
            match ext {
                Extent::Data(fo) if !zero => chain.layers[l]
                    .read_data(fo, &mut buf[filled as usize..(filled + n) as usize])?,
                Extent::Zero if zero => {}
                _ => break,
            }
            filled += n;
        }
        if zero {
            f(pos, None, filled)?;
        } else {
            f(pos, Some(&buf[..filled as usize]), filled)?;
        }
        pos += filled;
    }
    Ok(())
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
    // Read a batch of chunks sequentially, then hash the allocated ones on
    // every core: reading stays sequential, hashing keeps up with it.
    const BATCH: usize = 32;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; CHUNK as usize]).collect();
    let (mut chunks, mut read_chunks) = (0u64, 0u64);
    let mut pos = 0u64;
    while pos < size {
        // (length, known zero) per chunk of this batch.
        let mut batch: Vec<(usize, bool)> = Vec::with_capacity(BATCH);
        let batch_start = pos;
        while batch.len() < BATCH && pos < size {
            let len = (size - pos).min(CHUNK);
            let buf = &mut bufs[batch.len()];
            let mut all_zero = true;
            let mut off = 0u64;
            while off < len {
                let (l, ext, n) = chain.resolve(0, pos + off, len - off)?;
                let dst = &mut buf[off as usize..(off + n) as usize];
                match ext {
                    Extent::Data(fo) => {
                        chain.layers[l].read_data(fo, dst)?;
                        all_zero = false;
                    }
                    _ => dst.fill(0),
                }
                off += n;
            }
            batch.push((len as usize, all_zero && len == CHUNK));
            read_chunks += u64::from(!all_zero);
            pos += len;
        }
        let mut hashes = vec![zero_chunk; batch.len()];
        let per = batch.len().div_ceil(threads);
        std::thread::scope(|s| {
            for ((hs, bs), bt) in hashes
                .chunks_mut(per)
                .zip(bufs.chunks(per))
                .zip(batch.chunks(per))
            {
                s.spawn(move || {
                    for ((h, b), &(len, zero)) in hs.iter_mut().zip(bs).zip(bt) {
                        if !zero {
                            *h = blake3::hash(&b[..len]);
                        }
                    }
                });
            }
        });
        for (i, h) in hashes.iter().enumerate() {
            on_chunk(batch_start / CHUNK + i as u64, h);
            root.update(h.as_bytes());
        }
        chunks += batch.len() as u64;
        progress(pos);
    }
    Ok(ContentDigest {
        root: root.finalize(),
        chunks,
        read_chunks,
    })
}
