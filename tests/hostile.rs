//! Hostile and broken input: every field of every structure corrupted in
//! turn, and truncation at many offsets; `info`, `check`, `hash`, `export`
//! and `merge` must answer with an error or a correct result, never a
//! panic, a hang or unbounded memory, and a refused merge writes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vhdmerge::disk::create::{self, VhdOptions};
use vhdmerge::format::vhd::DYN_HEADER_FIELDS as VHD_DYNAMIC_HEADER_FIELDS;
use vhdmerge::format::vhdx::header::FIELDS as VHDX_HEADER_FIELDS;
use vhdmerge::{Chain, ChainOptions};

/// A labelled change to a file.
type Case = (String, Box<dyn Fn(&Path)>);

/// A field to corrupt: (structure, file offset, width in bytes).
type Field = (&'static str, u64, usize);

fn vhdx_fields(child: bool) -> Vec<Field> {
    let mut f: Vec<Field> = vec![("file identifier", 0, 8)];
    for (h, base) in [("header 1", 64u64 << 10), ("header 2", 128 << 10)] {
        for (off, w) in VHDX_HEADER_FIELDS {
            f.push((h, base + off, w));
        }
    }
    for (r, base) in [
        ("region table 1", 192u64 << 10),
        ("region table 2", 256 << 10),
    ] {
        for (off, w) in [
            (0, 4),
            (4, 4),
            (8, 4),
            (16, 16),
            (32, 8),
            (40, 4),
            (44, 4),
            (48, 16),
            (64, 8),
            (72, 4),
            (76, 4),
        ] {
            f.push((r, base + off, w));
        }
    }
    // vhdmerge's layout: metadata at 2 MiB, BAT at 3 MiB.
    let m = 2u64 << 20;
    f.extend([("metadata table", m, 8), ("metadata table", m + 10, 2)]);
    for i in 0..6u64 {
        let e = m + 32 + 32 * i;
        f.extend([
            ("metadata entry", e, 16),
            ("metadata entry", e + 16, 4),
            ("metadata entry", e + 20, 4),
            ("metadata entry", e + 24, 4),
        ]);
    }
    let items = m + (64 << 10);
    f.extend([
        ("file parameters", items, 4),
        ("file parameters", items + 4, 4),
        ("virtual disk size", items + 8, 8),
        ("logical sector size", items + 32, 4),
        ("physical sector size", items + 36, 4),
    ]);
    if child {
        let loc = items + 40;
        f.extend([("parent locator", loc, 16), ("parent locator", loc + 18, 2)]);
        for i in 0..3u64 {
            f.extend([
                ("locator entry", loc + 20 + 12 * i, 4),
                ("locator entry", loc + 24 + 12 * i, 4),
                ("locator entry", loc + 28 + 12 * i, 2),
                ("locator entry", loc + 30 + 12 * i, 2),
            ]);
        }
        f.push(("locator value", loc + 120, 8));
        f.push(("sector bitmap entry", (3 << 20) + 4096 * 8, 8));
    }
    let bat = 3u64 << 20;
    for i in 0..4u64 {
        f.push(("BAT entry", bat + 8 * i, 8));
    }
    f
}

fn vhd_fields(len: u64, child: bool) -> Vec<Field> {
    let mut f = Vec::new();
    for (name, base) in [("footer", len - 512), ("footer copy", 0)] {
        for (off, w) in [
            (0, 8),
            (8, 4),
            (12, 4),
            (16, 8),
            (28, 4),
            (40, 8),
            (48, 8),
            (56, 4),
            (60, 4),
            (64, 4),
            (68, 16),
        ] {
            f.push((name, base + off, w));
        }
    }
    for (off, w) in VHD_DYNAMIC_HEADER_FIELDS {
        f.push(("dynamic header", 512 + off, w));
    }
    if child {
        for i in 0..2u64 {
            let e = 512 + 576 + 24 * i;
            f.extend([
                ("parent locator", e, 4),
                ("parent locator", e + 4, 4),
                ("parent locator", e + 8, 4),
                ("parent locator", e + 16, 8),
            ]);
        }
    }
    f
}

/// Values to put into a field.
fn mutations(w: usize) -> Vec<Vec<u8>> {
    let mut v = vec![vec![0u8; w], vec![0xFF; w], vec![0x7F; w]];
    let mut one = vec![0u8; w];
    one[0] = 1;
    v.push(one);
    let mut big = vec![0u8; w];
    big[w - 1] = 0x40;
    v.push(big);
    v
}

struct Totals {
    mutations: usize,
    commands: usize,
    errors: usize,
    panics: Vec<String>,
    hangs: Vec<String>,
    writes_to_refused: Vec<String>,
}

/// Runs vhdmerge under a time limit (20 s) and an address-space limit (2 GiB).
fn bounded(args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args(["-s", "KILL", "20", "prlimit", "--as=2147483648", "--"])
        .arg(env!("CARGO_BIN_EXE_vhdmerge"))
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap()
}

fn sweep_one(dir: &Path, target: &Path, top: &Path, label: &str, t: &mut Totals) {
    t.mutations += 1;
    let top_s = top.to_str().unwrap();
    let out = dir.join("out.raw");
    let _ = std::fs::remove_file(&out);
    let mut cmds: Vec<Vec<&str>> = vec![
        vec!["info", "--chain", "--json", top_s],
        vec!["check", target.to_str().unwrap()],
    ];
    // Exporting or hashing is only bounded for disks of sane size.
    let size = Chain::open(top, &ChainOptions::default())
        .map(|c| c.virtual_size())
        .unwrap_or(0);
    if size > 0 && size <= 4 << 30 {
        cmds.push(vec!["hash", top_s]);
        cmds.push(vec!["export", top_s, out.to_str().unwrap()]);
    }
    for c in &cmds {
        let o = bounded(c);
        t.commands += 1;
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("panicked") || o.status.code() == Some(101) {
            t.panics.push(format!(
                "{label}: {c:?}: {}",
                err.lines().take(3).collect::<Vec<_>>().join(" | ")
            ));
        } else if o.status.code().is_none() {
            t.hangs.push(format!(
                "{label}: {c:?} killed by a signal (time or memory limit)"
            ));
        } else if !o.status.success() {
            t.errors += 1;
        }
    }
    let _ = std::fs::remove_file(&out);
    // A merge: refused (nothing written) or correct.
    let before = folder_digests(dir);
    let view = Chain::open(top, &ChainOptions::default())
        .ok()
        .and_then(|c| {
            vhdmerge::verify::content_digest(&c, |_| {})
                .ok()
                .map(|d| d.root)
        });
    let o = bounded(&["merge", top_s]);
    t.commands += 1;
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("panicked") || o.status.code() == Some(101) {
        t.panics.push(format!(
            "{label}: merge: {}",
            err.lines().take(3).collect::<Vec<_>>().join(" | ")
        ));
    } else if o.status.code().is_none() {
        t.hangs.push(format!("{label}: merge killed by a signal"));
    } else if !o.status.success() {
        t.errors += 1;
        if folder_digests(dir) != before {
            t.writes_to_refused.push(format!("{label}: {}", err.trim()));
        }
    } else if let Some(v) = view {
        // Accepted: the parent must now read as the child did.
        let parent = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "vhdx" || e == "vhd"));
        if let Some(p) = parent {
            let after = Chain::open(&p, &ChainOptions::default())
                .ok()
                .and_then(|c| {
                    vhdmerge::verify::content_digest(&c, |_| {})
                        .ok()
                        .map(|d| d.root)
                });
            assert_eq!(
                after,
                Some(v),
                "{label}: an accepted merge changed the guest's view"
            );
        }
    }
}

fn make_chain(dir: &Path, vhdx: bool) -> (PathBuf, PathBuf) {
    let (b, c) = if vhdx {
        (dir.join("b.vhdx"), dir.join("c.avhdx"))
    } else {
        (dir.join("b.vhd"), dir.join("c.avhd"))
    };
    if vhdx {
        common::new_vhdx(&b, 8 << 20, 1 << 20);
    } else {
        create::create_vhd(
            &b,
            &VhdOptions {
                size: 8 << 20,
                block_size: 1 << 20,
                fixed: false,
            },
        )
        .unwrap();
    }
    let mut ch = common::open_writable(&b);
    ch.write(0, &[1u8; 3 << 20]).unwrap();
    ch.close().unwrap();
    drop(ch);
    create::create_child(&c, &b, None).unwrap();
    let mut ch = common::open_writable(&c);
    ch.write(512, &[2u8; 5000]).unwrap();
    ch.write(5 << 20, &[3u8; 1 << 20]).unwrap();
    ch.close().unwrap();
    (b, c)
}

#[test]
fn mutation_sweep() {
    if !need("prlimit") {
        return;
    }
    let mut t = Totals {
        mutations: 0,
        commands: 0,
        errors: 0,
        panics: vec![],
        hangs: vec![],
        writes_to_refused: vec![],
    };
    let src = tempfile::tempdir().unwrap();
    for vhdx in [true, false] {
        let sub = src.path().join(if vhdx { "x" } else { "d" });
        std::fs::create_dir(&sub).unwrap();
        let (b, c) = make_chain(&sub, vhdx);
        for (target_is_child, target) in [(false, &b), (true, &c)] {
            let len = std::fs::metadata(target).unwrap().len();
            let fields = if vhdx {
                vhdx_fields(target_is_child)
            } else {
                vhd_fields(len, target_is_child)
            };
            let mut cases: Vec<Case> = Vec::new();
            for (name, off, w) in fields {
                // VHDX headers and region tables also with their CRC made
                // right, so that the change gets past the checksum to the
                // code that uses the field.
                let fixes: &[bool] =
                    match vhdx && (name.starts_with("header") || name.starts_with("region")) {
                        true => &[false, true],
                        false => &[false],
                    };
                for m in mutations(w) {
                    for &fix in fixes {
                        let label = format!(
                            "{} {name} at {off:#x} := {:02x?}{}",
                            target.file_name().unwrap().to_string_lossy(),
                            &m[..m.len().min(4)],
                            if fix { " (checksums made right)" } else { "" }
                        );
                        let m = m.clone();
                        cases.push((
                            label,
                            Box::new(move |p: &Path| {
                                let mut b = std::fs::read(p).unwrap();
                                b[off as usize..][..w].copy_from_slice(&m);
                                if fix {
                                    vhdmerge::fuzzing::fix_vhdx_checksums(&mut b);
                                }
                                std::fs::write(p, b).unwrap();
                            }),
                        ));
                    }
                }
            }
            for k in 1..=12u64 {
                let at = len * k / 13 / 512 * 512 + if k % 2 == 0 { 0 } else { 100 };
                cases.push((
                    format!(
                        "{} truncated to {at}",
                        target.file_name().unwrap().to_string_lossy()
                    ),
                    Box::new(move |p: &Path| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(p)
                            .unwrap()
                            .set_len(at)
                            .unwrap();
                    }),
                ));
            }
            for (label, mutate) in cases {
                let dir = tempfile::tempdir().unwrap();
                for f in [&b, &c] {
                    std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
                }
                let tp = dir.path().join(target.file_name().unwrap());
                mutate(&tp);
                sweep_one(
                    dir.path(),
                    &tp,
                    &dir.path().join(c.file_name().unwrap()),
                    &label,
                    &mut t,
                );
            }
        }
    }
    // Real images, truncated at many offsets and with their first sectors damaged.
    if let Some(corpus) = corpus() {
        for name in [
            "dfvfs/fat-differential.vhd",
            "dfvfs/ext2.vhd",
            "DiscUtils/vhdx-log-replay.vhdx.gz",
        ] {
            let pristine = tempfile::tempdir().unwrap();
            let p = materialize(&corpus, name, pristine.path());
            let len = std::fs::metadata(&p).unwrap().len();
            for k in 0..10u64 {
                let dir = tempfile::tempdir().unwrap();
                let tp = dir.path().join(p.file_name().unwrap());
                std::fs::copy(&p, &tp).unwrap();
                if k < 6 {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&tp)
                        .unwrap()
                        .set_len(len * (k + 1) / 7)
                        .unwrap();
                } else {
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::OpenOptions::new().write(true).open(&tp).unwrap();
                    f.write_all_at(&[0xEE; 64], (k - 6) * 0x10040 % len)
                        .unwrap();
                }
                sweep_one(dir.path(), &tp, &tp, &format!("{name} variant {k}"), &mut t);
            }
        }
    }
    eprintln!(
        "hostile input sweep: {} mutations, {} commands run, {} errors, {} panics, {} hangs, {} writes to refused inputs",
        t.mutations,
        t.commands,
        t.errors,
        t.panics.len(),
        t.hangs.len(),
        t.writes_to_refused.len()
    );
    assert!(t.panics.is_empty(), "panics:\n{}", t.panics.join("\n"));
    assert!(t.hangs.is_empty(), "hangs:\n{}", t.hangs.join("\n"));
    assert!(
        t.writes_to_refused.is_empty(),
        "refused merges that wrote:\n{}",
        t.writes_to_refused.join("\n")
    );
}
