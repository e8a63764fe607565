//! The bounded fuzz that runs on stable in CI. The cargo-fuzz targets in
//! `fuzz/` call the same entry points (`vhdmerge::fuzzing`) under
//! libFuzzer; here they get (1) every seed of `fuzz/seeds/`, (2) every input
//! a fuzzer once crashed on, kept in `fuzz/regressions/<target>/` (raw or
//! gzip'd), and
//! (3) proptest-chosen corruptions of the fields of every structure of the
//! seeds, with the checksums made right (so the change reaches the parser
//! behind them) or left wrong. Cases per target: `VHDMERGE_FUZZ_CASES`
//! (default 256).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vhdmerge::fuzzing;

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A file's bytes, gunzipped if its name ends in `.gz`.
fn load(p: &Path) -> Vec<u8> {
    if p.extension().is_some_and(|e| e == "gz") {
        let mut data = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
            .read_to_end(&mut data)
            .unwrap();
        data
    } else {
        std::fs::read(p).unwrap()
    }
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let v: Vec<_> = files(&format!("fuzz/seeds/{target}"))
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                load(&p),
            )
        })
        .collect();
    assert!(!v.is_empty(), "no seeds for {target}");
    v
}

fn entry(target: &str) -> fn(&[u8]) {
    match target {
        "vhdx" => fuzzing::vhdx,
        "vhd" => fuzzing::vhd,
        "log" => fuzzing::log,
        "journal" => fuzzing::journal,
        _ => unreachable!(),
    }
}

#[test]
fn every_seed_and_regression_input_is_handled() {
    let mut n = 0;
    for target in ["vhdx", "vhd", "log", "journal"] {
        let f = entry(target);
        for (name, data) in seeds(target) {
            eprintln!("{target}: seed {name}");
            f(&data);
            fuzzing::image(&data);
            n += 1;
        }
        for p in files(&format!("fuzz/regressions/{target}")) {
            eprintln!("{target}: regression {}", p.display());
            f(&load(&p));
            n += 1;
        }
    }
    eprintln!("fuzz inputs replayed: {n}");
}

/// Byte ranges worth corrupting in a VHDX: header fields, region table
/// entries, the metadata table and its items, BAT entries, log sectors.
fn vhdx_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for h in [64usize << 10, 128 << 10] {
        for (o, w) in vhdmerge::format::vhdx::header::FIELDS {
            v.push((h + o as usize, w));
        }
    }
    for r in [192usize << 10, 256 << 10] {
        v.push((r, 4));
        v.push((r + 8, 4));
        let count = u32::from_le_bytes(b[r + 8..r + 12].try_into().unwrap()).min(8) as usize;
        for i in 0..count {
            let e = r + 16 + 32 * i;
            for (o, w) in [(0, 16), (16, 8), (24, 4), (28, 4)] {
                v.push((e + o, w));
            }
            let guid = &b[e..e + 16];
            let offset = u64::from_le_bytes(b[e + 16..e + 24].try_into().unwrap()) as usize;
            let length = u32::from_le_bytes(b[e + 24..e + 28].try_into().unwrap()) as usize;
            if offset + length > b.len() {
                continue;
            }
            // Metadata region (8B7CA206-...): table, entries, item values.
            if guid[..4] == [0x06, 0xa2, 0x7c, 0x8b] {
                v.push((offset, 8));
                v.push((offset + 10, 2));
                let n = u16::from_le_bytes(b[offset + 10..offset + 12].try_into().unwrap());
                for j in 0..n.min(16) as usize {
                    let m = offset + 32 + 32 * j;
                    for (o, w) in [(0, 16), (16, 4), (20, 4), (24, 4)] {
                        v.push((m + o, w));
                    }
                    let item = u32::from_le_bytes(b[m + 16..m + 20].try_into().unwrap()) as usize;
                    if item >= 0x10000 && item + 8 <= length {
                        v.push((offset + item, 8));
                        v.push((offset + item + 4, 4));
                    }
                }
            } else {
                // BAT: its first entries; log: its first sectors' headers.
                for k in 0..64 {
                    v.push((offset + 8 * k, 8));
                }
                for k in 0..4 {
                    for o in [0, 8, 12, 16, 24, 48, 56, 64, 72] {
                        v.push((offset + 4096 * k + o, 8));
                    }
                }
            }
        }
    }
    v.retain(|&(o, w)| o + w <= b.len());
    v
}

/// VHD: footer fields (at the end and the copy at 0), dynamic header
/// fields and its parent locators, the first BAT entries, block bitmaps.
fn vhd_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let f = b.len() - 512;
    for base in [f, 0] {
        for (o, w) in [
            (0, 8),
            (8, 4),
            (12, 4),
            (16, 8),
            (24, 4),
            (40, 8),
            (48, 8),
            (56, 4),
            (60, 4),
            (68, 16),
        ] {
            v.push((base + o, w));
        }
    }
    let d = u64::from_be_bytes(b[f + 16..f + 24].try_into().unwrap()) as usize;
    if d + 1024 <= b.len() {
        for (o, w) in vhdmerge::format::vhd::DYN_HEADER_FIELDS {
            v.push((d + o as usize, w));
        }
        for k in 0..8 {
            for (o, w) in [(0, 4), (4, 4), (8, 4), (16, 8)] {
                v.push((d + 576 + 24 * k + o, w));
            }
        }
        let bat = u64::from_be_bytes(b[d + 16..d + 24].try_into().unwrap()) as usize;
        for k in 0..64 {
            v.push((bat + 4 * k, 4));
        }
    }
    v.retain(|&(o, w)| o + w <= b.len());
    v
}

/// Values that break parsers: zero, all ones, one more or less than the
/// old value, a high bit, powers of two, the file's length, random bits.
fn value(kind: u8, old: u64, rand: u64, file_len: u64) -> u64 {
    match kind % 9 {
        0 => 0,
        1 => u64::MAX,
        2 => old.wrapping_add(1),
        3 => old.wrapping_sub(1),
        4 => old ^ (1 << (rand % 64)),
        5 => 1 << (rand % 64),
        6 => file_len.wrapping_add(rand % 3).wrapping_sub(1),
        7 => old.wrapping_mul(2),
        _ => rand,
    }
}

fn mutate(b: &mut [u8], at: usize, width: usize, kind: u8, rand: u64, big_endian: bool) {
    let len = b.len() as u64;
    let field = &mut b[at..at + width];
    if width > 8 {
        // GUIDs and signatures: random bytes or all zero.
        for (i, x) in field.iter_mut().enumerate() {
            *x = if kind.is_multiple_of(2) {
                0
            } else {
                (rand >> (i % 8 * 8)) as u8
            };
        }
        return;
    }
    let mut raw = [0u8; 8];
    if big_endian {
        raw[8 - width..].copy_from_slice(field);
    } else {
        raw[..width].copy_from_slice(field);
    }
    let old = if big_endian {
        u64::from_be_bytes(raw)
    } else {
        u64::from_le_bytes(raw)
    };
    let new = value(kind, old, rand, len);
    if big_endian {
        field.copy_from_slice(&new.to_be_bytes()[8 - width..]);
    } else {
        field.copy_from_slice(&new.to_le_bytes()[..width]);
    }
}

fn cases() -> u32 {
    std::env::var("VHDMERGE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn structured(target: &str, fields: fn(&[u8]) -> Vec<(usize, usize)>, big_endian: bool) {
    let seeds = seeds(target);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(
            (any::<prop::sample::Index>(), any::<u8>(), any::<u64>()),
            1..4,
        ),
        any::<bool>(),
    );
    let tried = std::cell::Cell::new(0u32);
    runner
        .run(&strategy, |(seed, changes, fix)| {
            let mut b = seeds[seed].1.clone();
            let f = fields(&b);
            for (pick, kind, rand) in &changes {
                let (at, width) = f[pick.index(f.len())];
                mutate(&mut b, at, width, *kind, *rand, big_endian);
            }
            // Half the time the checksums stay wrong: that path must be
            // refused cleanly too.
            if fix {
                entry(target)(&b);
            } else {
                fuzzing::image(&b);
            }
            tried.set(tried.get() + 1);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "structured fuzz [{target}]: {} corrupted images, no panic",
        tried.get()
    );
}

#[test]
fn structured_vhdx_corruptions_never_panic() {
    structured("vhdx", vhdx_fields, false);
}

#[test]
fn structured_vhd_corruptions_never_panic() {
    structured("vhd", vhd_fields, true);
}

#[test]
fn arbitrary_journals_never_panic() {
    let seeds = seeds("journal");
    let mut runner = TestRunner::new(Config {
        cases: cases() * 4,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
    );
    runner
        .run(&strategy, |(seed, flips, cut)| {
            let mut b = seeds[seed].1.clone();
            for (at, x) in &flips {
                let i = at.index(b.len());
                b[i] ^= x | 1;
            }
            b.truncate(cut.index(b.len() + 1));
            fuzzing::journal(&b);
            Ok(())
        })
        .unwrap();
}

/// Regression (found by the structured fuzz above): a VHDX with a live log
/// and a header sequence number near 2^64 overflowed while the writable
/// open bumped it to replay the log; and the log was replayed on disk before
/// the rest of the file had been validated. The file is now validated with
/// the log replayed in memory first, and such a header is refused, before
/// the first write.
#[test]
fn regression_header_sequence_at_max_is_refused_before_any_write() {
    let (_, mut b) = seeds("vhdx")
        .into_iter()
        .find(|(n, _)| n.starts_with("05-") && n.contains("-l0."))
        .expect("a seed with a live log");
    for h in [64usize << 10, 128 << 10] {
        b[h + 8..h + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    }
    fuzzing::fix_vhdx_checksums(&mut b);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("max.vhdx");
    std::fs::write(&p, &b).unwrap();
    let e = vhdmerge::disk::open_layer(&p, true).err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("max.vhdx") && msg.contains("sequence number"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), b, "the file was written");
    // A read-only open still shows the contents (log replayed in memory).
    vhdmerge::disk::open_layer(&p, false).expect("readable");
}

/// A log whose replay would be refused later (its region table is broken)
/// is not replayed on disk: the writable open fails and the file is as it was.
#[test]
fn writable_open_of_a_broken_file_with_a_live_log_writes_nothing() {
    let (_, mut b) = seeds("vhdx")
        .into_iter()
        .find(|(n, _)| n.starts_with("05-") && n.contains("-l0."))
        .expect("a seed with a live log");
    // Both region tables lose their signature.
    for r in [192usize << 10, 256 << 10] {
        b[r..r + 4].copy_from_slice(b"xxxx");
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("broken.vhdx");
    std::fs::write(&p, &b).unwrap();
    let e = vhdmerge::disk::open_layer(&p, true).err().expect("refused");
    assert!(e.to_string().contains("region"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b, "the file was written");
}
