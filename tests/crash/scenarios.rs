//! The crash suite's scenarios: the chains it builds (levels, block
//! sizes, overlapping writes, a dirty log, clones) and how each is merged.

use std::path::{Path, PathBuf};

use vhdmerge::disk::create;
use vhdmerge::merge::MergeOptions;

use crate::common::{self, Rng};

#[derive(Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub vhdx: bool,
    /// Block sizes from base to top; the top is merged into `into`.
    pub levels: Vec<u64>,
    pub into: usize,
    /// Merge level 1 while level 2 exists (re-link), instead of the top.
    pub relink: bool,
    pub fixed_base: bool,
    /// The base has a live log at the start (VHDX; the preflight replays it).
    pub dirty_log: bool,
    /// The merge clones its runs (emulated: a clone is traced, and
    /// crashes, as the write of the source's bytes it amounts to).
    pub clones: bool,
    /// The top level rewrites a whole block of the base's data, which a
    /// VHD ancestor takes out of place (a new block, the BAT switched).
    pub whole_blocks: bool,
    /// `merge --finish-only`: no before-images of guest data; recovery
    /// must always end at the finished merge.
    pub finish_only: bool,
}

pub fn build(s: &Scenario, dir: &Path) -> PathBuf {
    build_with(s, dir, 0)
}

/// `extra` more writes per level, scattered, of 512 bytes to 256 KiB: more
/// runs, more batches and more pending writes, so more distinct states.
pub fn build_with(s: &Scenario, dir: &Path, extra: usize) -> PathBuf {
    let size = 6u64 << 20;
    let mut rng = Rng(17);
    let mut paths: Vec<PathBuf> = Vec::new();
    for (i, &bs) in s.levels.iter().enumerate() {
        let p = dir.join(format!(
            "l{i}.{}",
            match (s.vhdx, i) {
                (true, 0) => "vhdx",
                (true, _) => "avhdx",
                (false, 0) => "vhd",
                (false, _) => "avhd",
            }
        ));
        if i == 0 {
            let o = create::CreateOptions {
                size: Some(size),
                block_size: Some(bs),
                fixed: s.fixed_base,
                ..Default::default()
            };
            create::create(&p, &o).unwrap();
        } else {
            create::create_child(&p, &paths[i - 1], Some(bs)).unwrap();
        }
        let mut c = common::open_writable(&p);
        if (s.clones || s.whole_blocks) && i == 0 {
            // A full base: the merge overwrites its data in long runs,
            // whose before-images are cloned.
            c.write(0, &rng.bytes(4 << 20)).unwrap();
        }
        if s.whole_blocks && i + 1 == s.levels.len() {
            c.write(2 << 20, &rng.bytes(2 << 20)).unwrap();
        }
        // Whole blocks and partial sectors, overlapping the parent's data.
        c.write((i as u64) << 20, &rng.bytes(1 << 20)).unwrap();
        c.write(3_000_000 + i as u64 * 5000, &rng.bytes(9000))
            .unwrap();
        for _ in 0..extra {
            let len = 512 * (1 + rng.below(512));
            let at = rng.below(size - len) / 512 * 512;
            c.write(at, &rng.bytes(len as usize)).unwrap();
        }
        c.close().unwrap();
        drop(c);
        paths.push(p);
    }
    if s.dirty_log {
        make_dirty(&paths[0]);
    }
    if s.relink {
        paths[1].clone()
    } else {
        paths[s.levels.len() - 1].clone()
    }
}

/// Leaves a live VHDX log in the file: one entry that rewrites the first
/// BAT page with its own contents, and the header's LogGuid set.
pub fn make_dirty(path: &Path) {
    use vhdmerge::format::vhdx::{HEADER_OFFSETS, log};
    let mut f = std::fs::read(path).unwrap();
    let (mut h, slot) = common::header_to_replace(&f);
    let g = uuid::Uuid::from_u128(0x1234);
    let bat = (3u64 << 20) as usize;
    let entry = log::encode_entry(
        &g,
        7,
        0,
        f.len() as u64,
        &[(bat as u64, &f[bat..bat + 4096])],
    );
    let lo = h.log_offset as usize;
    f[lo..lo + entry.len()].copy_from_slice(&entry);
    h.sequence += 1;
    h.log_guid = g;
    f[HEADER_OFFSETS[slot] as usize..][..4096].copy_from_slice(&h.encode());
    std::fs::write(path, f).unwrap();
}

pub fn opts(s: &Scenario, dir: &Path) -> MergeOptions {
    let into = if s.relink {
        None
    } else {
        Some(dir.join(format!(
            "l{}.{}",
            s.into,
            if s.vhdx {
                if s.into == 0 { "vhdx" } else { "avhdx" }
            } else if s.into == 0 {
                "vhd"
            } else {
                "avhd"
            }
        )))
    };
    MergeOptions {
        into,
        batch_bytes: 256 << 10,
        finish_only: s.finish_only,
        ..Default::default()
    }
}

pub fn scenarios() -> Vec<Scenario> {
    let m = 1u64 << 20;
    let sc = |name, vhdx, levels: Vec<u64>, into, relink, fixed_base, dirty_log| Scenario {
        name,
        vhdx,
        levels,
        into,
        relink,
        fixed_base,
        dirty_log,
        clones: false,
        whole_blocks: false,
        finish_only: false,
    };
    let finish_only = |s: Scenario| Scenario {
        finish_only: true,
        ..s
    };
    let cloned = |s: Scenario| Scenario { clones: true, ..s };
    let whole = |s: Scenario| Scenario {
        whole_blocks: true,
        ..s
    };
    vec![
        sc("vhdx one level", true, vec![m, m], 0, false, false, false),
        sc(
            "vhdx three levels, mixed block sizes, into the base",
            true,
            vec![2 * m, m, 4 * m],
            0,
            false,
            false,
            false,
        ),
        sc(
            "vhdx into a differencing ancestor",
            true,
            vec![m, m, m],
            1,
            false,
            false,
            false,
        ),
        sc(
            "vhdx child with a child to re-link",
            true,
            vec![m, m, m],
            0,
            true,
            false,
            false,
        ),
        sc(
            "vhdx fixed ancestor",
            true,
            vec![m, m],
            0,
            false,
            true,
            false,
        ),
        sc(
            "vhdx dirty log at the start",
            true,
            vec![m, m],
            0,
            false,
            false,
            true,
        ),
        sc(
            "vhd one level",
            false,
            vec![2 * m, 2 * m],
            0,
            false,
            false,
            false,
        ),
        sc(
            "vhd three levels, mixed block sizes",
            false,
            vec![2 * m, m / 2, m],
            0,
            false,
            false,
            false,
        ),
        sc(
            "vhd child with a child to re-link",
            false,
            vec![2 * m, 2 * m, 2 * m],
            0,
            true,
            false,
            false,
        ),
        sc(
            "vhd fixed ancestor",
            false,
            vec![2 * m, 2 * m],
            0,
            false,
            true,
            false,
        ),
        cloned(sc(
            "vhdx cloned runs, mixed block sizes",
            true,
            vec![2 * m, m, m],
            0,
            false,
            false,
            false,
        )),
        cloned(sc(
            "vhd cloned runs",
            false,
            vec![2 * m, 2 * m],
            0,
            false,
            false,
            false,
        )),
        whole(sc(
            "vhd whole blocks over base data, three levels",
            false,
            vec![2 * m, m, 2 * m],
            0,
            false,
            false,
            false,
        )),
        cloned(whole(sc(
            "vhd cloned whole blocks over base data",
            false,
            vec![2 * m, 2 * m],
            0,
            false,
            false,
            false,
        ))),
        finish_only(sc(
            "vhdx finish-only, three levels, mixed block sizes",
            true,
            vec![2 * m, m, 4 * m],
            0,
            false,
            false,
            false,
        )),
        finish_only(whole(sc(
            "vhdx finish-only, full base, child with a child to re-link",
            true,
            vec![m, m, m],
            0,
            true,
            false,
            false,
        ))),
        finish_only(sc(
            "vhd finish-only, three levels, mixed block sizes",
            false,
            vec![2 * m, m / 2, m],
            0,
            false,
            false,
            false,
        )),
        finish_only(whole(sc(
            "vhd finish-only, whole blocks over base data",
            false,
            vec![2 * m, m, 2 * m],
            0,
            false,
            false,
            false,
        ))),
        finish_only(cloned(sc(
            "vhdx finish-only, cloned runs",
            true,
            vec![2 * m, m, m],
            0,
            false,
            false,
            false,
        ))),
    ]
}
