//! Manifests: the content digest with its chunk list, saved as JSON, and
//! the comparison that names the byte ranges that differ.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CHUNK, content_digest_with};
use crate::disk::Chain;
use crate::error::{Error, Result};

/// `docs/digest.md`, "Manifest".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub virtual_size: u64,
    pub chunk_size: u64,
    pub root: String,
    /// Hash of a chunk that is all zeros (every chunk not listed below).
    pub zero_chunk: String,
    /// Chunk index → BLAKE3, for every chunk whose hash is not `zero_chunk`.
    pub chunks: BTreeMap<u64, String>,
}

pub const FORMAT: &str = "vhdmerge-manifest-v1";

pub fn build(chain: &Chain, progress: &mut dyn FnMut(u64)) -> Result<Manifest> {
    let zero = blake3::hash(&vec![0u8; CHUNK as usize]);
    let mut chunks = BTreeMap::new();
    let d = content_digest_with(
        chain,
        |i, h| {
            if *h != zero {
                chunks.insert(i, h.to_hex().to_string());
            }
        },
        progress,
    )?;
    Ok(Manifest {
        format: FORMAT.into(),
        virtual_size: chain.virtual_size(),
        chunk_size: CHUNK,
        root: d.root.to_hex().to_string(),
        zero_chunk: zero.to_hex().to_string(),
        chunks,
    })
}

pub fn load(path: &Path) -> Result<Manifest> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading the manifest", e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::BadManifest {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if m.format != FORMAT || m.chunk_size != CHUNK {
        return Err(Error::BadManifest {
            path: path.to_path_buf(),
            detail: format!(
                "format {} with chunk size {} is not {FORMAT} with {CHUNK}",
                m.format, m.chunk_size
            ),
        });
    }
    Ok(m)
}

/// A byte range that differs, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// Ranges of chunks whose hashes differ (adjacent chunks merged).
pub fn diff(expected: &Manifest, actual: &Manifest) -> Vec<Range> {
    let size = expected.virtual_size.max(actual.virtual_size);
    let hash_of = |m: &Manifest, i: u64| -> Option<String> {
        if i * CHUNK >= m.virtual_size {
            return None;
        }
        Some(
            m.chunks
                .get(&i)
                .cloned()
                .unwrap_or_else(|| m.zero_chunk.clone()),
        )
    };
    let mut out: Vec<Range> = Vec::new();
    let indices: std::collections::BTreeSet<u64> = expected
        .chunks
        .keys()
        .chain(actual.chunks.keys())
        .copied()
        .collect();
    // Chunks listed in neither manifest are zero chunks in both, except for a
    // partial last chunk or a size change; check those explicitly.
    let last = size.div_ceil(CHUNK).saturating_sub(1);
    let mut candidates: Vec<u64> = indices.into_iter().collect();
    candidates.push(last);
    if expected.virtual_size != actual.virtual_size {
        let from = expected.virtual_size.min(actual.virtual_size) / CHUNK;
        candidates.extend(from..=last);
    }
    candidates.sort();
    candidates.dedup();
    for i in candidates {
        if hash_of(expected, i) != hash_of(actual, i) {
            let (start, end) = (i * CHUNK, ((i + 1) * CHUNK).min(size));
            match out.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => out.push(Range { start, end }),
            }
        }
    }
    out
}
