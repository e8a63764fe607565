//! Merges on the file systems that can share blocks between files (XFS
//! with reflink, btrfs), each on an image made for the test and
//! loop-mounted: VHDX and VHD, whole and partial blocks, overwrites of the
//! base's data, 512-byte and 4 KiB sectors. Each result must read as the
//! child did, by our reader and by qemu-img, and pass `qemu-img check`;
//! the merge must have cloned its aligned runs, and the base must share
//! those blocks with the kept child (FIEMAP) while the file system's used
//! space grows by far less than the merged bytes. `--copy` must share none.
//!
//! Needs root, loop devices and mkfs.xfs / mkfs.btrfs (`scripts/test.sh`
//! installs xfsprogs and btrfs-progs). Without them the tests say so
//! loudly and are skipped; under CI missing tools are a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, digest_of, ok, qemu_digest};
use vhdmerge::disk::create::{self, CreateOptions};

/// A file system image mounted on a folder; unmounted (and its loop
/// device released) when dropped.
struct Mounted {
    at: tempfile::TempDir,
    _image: tempfile::TempDir,
}

impl Mounted {
    fn path(&self) -> &Path {
        self.at.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let o = Command::new("umount").arg(self.at.path()).output();
        if !o.is_ok_and(|o| o.status.success()) {
            // Busy (a test failed with files open): detach lazily.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.at.path())
                .output();
        }
    }
}

/// Makes and mounts a 1 GiB file system of `kind` ("xfs" or "btrfs"), or
/// says why it cannot.
fn mount(kind: &str) -> Option<Mounted> {
    let mkfs = format!("mkfs.{kind}");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let have_mkfs = Command::new(&mkfs).arg("-V").output().is_ok();
    if !is_root || !have_mkfs {
        let why = format!("needs root and {mkfs} (root: {is_root}, {mkfs}: {have_mkfs})");
        if std::env::var_os("CI").is_some() {
            panic!("{why}; scripts/test.sh installs xfsprogs and btrfs-progs");
        }
        eprintln!("\n*** SKIPPING the {kind} tests: {why} ***\n");
        return None;
    }
    let image = tempfile::tempdir().unwrap();
    let file = image.path().join("fs.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let args: &[&str] = match kind {
        "xfs" => &["-q", "-m", "reflink=1"],
        _ => &["-q"],
    };
    let o = Command::new(&mkfs).args(args).arg(&file).output().unwrap();
    assert!(
        o.status.success(),
        "{mkfs}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let at = tempfile::tempdir().unwrap();
    let o = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&file)
        .arg(at.path())
        .output()
        .unwrap();
    if !o.status.success() {
        // No loop device here (a container without them): say it loudly.
        eprintln!(
            "\n*** SKIPPING the {kind} tests: cannot loop-mount ({}) ***\n",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return None;
    }
    Some(Mounted { at, _image: image })
}

/// One merge case: the format (by extension), the logical sector, and the
/// child's writes as (offset, length).
struct Case {
    ext: (&'static str, &'static str),
    logical_sector: u64,
    writes: Vec<(u64, usize)>,
}

fn cases() -> Vec<Case> {
    // Whole blocks, a partial block, a write straddling two blocks, and
    // overwrites of what the base holds (its first 8 MiB).
    let writes = vec![
        (0, 1 << 20),
        (2 << 20, 2 << 20),
        ((5 << 20) + 4096, 12_288),
        ((12 << 20) - 2048, 8192),
        (20 << 20, 8 << 20),
        (40 << 20, 512),
    ];
    vec![
        Case {
            ext: ("vhdx", "avhdx"),
            logical_sector: 512,
            writes: writes.clone(),
        },
        Case {
            ext: ("vhdx", "avhdx"),
            logical_sector: 4096,
            writes: writes.clone(),
        },
        Case {
            ext: ("vhd", "avhd"),
            logical_sector: 512,
            writes,
        },
    ]
}

/// Builds base and child in `dir`, returns (base, child).
fn build(dir: &Path, c: &Case, rng: &mut Rng) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("base.{}", c.ext.0));
    let child = dir.join(format!("child.{}", c.ext.1));
    let o = CreateOptions {
        size: Some(64 << 20),
        block_size: Some(if c.ext.0 == "vhdx" { 2 << 20 } else { 1 << 20 }),
        logical_sector: c.logical_sector,
        ..Default::default()
    };
    create::create(&base, &o).unwrap();
    let mut w = common::open_writable(&base);
    w.write(0, &rng.bytes(8 << 20)).unwrap();
    w.close().unwrap();
    drop(w);
    create::create_child(&child, &base, Some(1 << 20)).unwrap();
    let mut w = common::open_writable(&child);
    for &(at, n) in &c.writes {
        w.write(at, &rng.bytes(n)).unwrap();
    }
    w.close().unwrap();
    (base, child)
}

/// Bytes of `path` whose extents FIEMAP flags as shared.
fn shared_bytes(path: &Path) -> u64 {
    use std::os::fd::AsFd;
    use vhdmerge::io::share::{FIEMAP_EXTENT_SHARED, extents};
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    extents(f.as_fd(), 0, len)
        .unwrap()
        .iter()
        .filter(|e| e.flags & FIEMAP_EXTENT_SHARED != 0)
        .map(|e| e.length)
        .sum()
}

/// The file system's used bytes, once settled: after a sync (delayed
/// allocations count) and once deleted files' blocks are freed, which XFS
/// does in the background.
fn used_bytes(dir: &Path) -> u64 {
    let now = || {
        let _ = Command::new("sync").arg("-f").arg(dir).status();
        let s = rustix::fs::statvfs(dir).unwrap();
        (s.f_blocks - s.f_bfree) * s.f_frsize
    };
    let mut last = now();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        match now() {
            n if n == last => break,
            n => last = n,
        }
    }
    last
}

fn merge_on(kind: &str) {
    let Some(fs) = mount(kind) else { return };
    if !common::need("qemu-img") {
        return;
    }
    let mut rng = Rng(21);
    for (k, c) in cases().iter().enumerate() {
        for copy in [false, true] {
            let dir = fs.path().join(format!("case{k}-{copy}"));
            std::fs::create_dir(&dir).unwrap();
            let (base, child) = build(&dir, c, &mut rng);
            let want = digest_of(&child);
            let used = used_bytes(&dir);
            let mut args = vec!["merge", "--keep", "--json", child.to_str().unwrap()];
            if copy {
                args.push("--copy");
            }
            let report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
            let grown = used_bytes(&dir).saturating_sub(used);
            assert!(
                !child.exists(),
                "{kind} case {k}: the child was not renamed"
            );
            check_result(kind, k, c, &base, &dir, &want);
            let merged = report["plan"]["bytes"].as_u64().unwrap();
            // The preflight's trial clone, which sizes the space asked for.
            assert_eq!(report["plan"]["cloning"], !copy, "{kind} case {k}");
            let cloned = report["sharing"]["cloned_bytes"].as_u64().unwrap();
            let shared = shared_bytes(&base);
            let journal = report["journal_bytes"].as_u64().unwrap();
            let overwritten = report["plan"]["overwrite_bytes"].as_u64().unwrap();
            eprintln!(
                "{kind} case {k} copy={copy}: merged {merged}, cloned {cloned}, copied {}, base shares {shared}, used space grew {grown}, journal {journal} bytes for {overwritten} overwritten",
                report["sharing"]["copied_bytes"]
            );
            if copy {
                assert_eq!(
                    (cloned, shared),
                    (0, 0),
                    "{kind} case {k}: --copy shared blocks"
                );
                // The measure tells a copy from a clone: a copy's new
                // blocks (all but the overwrites) take new space.
                assert!(
                    grown * 2 > merged,
                    "{kind} case {k}: a copy grew by {grown}"
                );
                continue;
            }
            // Every whole 4 KiB page of the child's writes is cloned: all
            // but the few unaligned heads and tails.
            assert!(
                cloned * 10 >= merged * 9,
                "{kind} case {k}: cloned only {cloned} of {merged} bytes"
            );
            assert!(
                shared >= cloned,
                "{kind} case {k}: the base shares {shared} bytes, {cloned} were cloned"
            );
            // The before-images of the overwrites went to the image file,
            // cloned: the journal keeps only small ones.
            assert!(
                journal * 8 < overwritten,
                "{kind} case {k}: journal of {journal} bytes for {overwritten} overwritten"
            );
            assert!(
                grown * 4 < merged,
                "{kind} case {k}: used space grew by {grown} bytes for {merged} merged"
            );
        }
    }
}

/// The merged base reads as the child did, for us and an independent
/// reader, and passes `qemu-img check` where qemu has one.
fn check_result(kind: &str, k: usize, c: &Case, base: &Path, dir: &Path, want: &str) {
    assert_eq!(digest_of(base), want, "{kind} case {k}: our reader");
    let fmt = if c.ext.0 == "vhdx" { "vhdx" } else { "vpc" };
    // qemu refuses 4 KiB logical sectors; dissect reads them.
    let other = match c.logical_sector {
        512 => qemu_digest(fmt, base, dir),
        _ => match common::python() {
            Some(py) => common::oracle(&py, "dissect", &[base], dir),
            None => want.to_string(),
        },
    };
    assert_eq!(other, want, "{kind} case {k}: the independent reader");
    if fmt == "vhdx" && c.logical_sector == 512 {
        // qemu-img checks VHDX (with 512-byte sectors); it has no
        // check for VHD (vpc).
        let o = Command::new("qemu-img")
            .args(["check", "-f", fmt])
            .arg(base)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{kind} case {k}: qemu-img check: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn merges_on_xfs_with_reflink() {
    merge_on("xfs");
}

#[test]
fn merges_on_btrfs() {
    merge_on("btrfs");
}

/// Bytes of every file in `dir`, by name.
fn files_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// A merge that clones its runs and its before-images, aborted after its
/// second batch: `recover --rollback` restores every file byte for byte
/// (cloning the images back), and `recover` finishes it.
#[test]
fn interrupted_cloning_merges_on_xfs_roll_back_and_resume() {
    let Some(fs) = mount("xfs") else { return };
    let mut rng = Rng(22);
    let c = &cases()[0];
    for rollback in [true, false] {
        let dir = fs.path().join(format!("interrupted-{rollback}"));
        std::fs::create_dir(&dir).unwrap();
        let (base, child) = build(&dir, c, &mut rng);
        let want = digest_of(&child);
        let start = files_of(&dir);
        let o = Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
            .args([
                "--quiet",
                "merge",
                "--batch",
                "1M",
                "--checkpoint-every",
                "2M",
            ])
            .arg(&child)
            .env("VHDMERGE_FAIL_AT", "after-batch-2")
            .output()
            .unwrap();
        assert!(!o.status.success(), "the failpoint did not stop the merge");
        let jpath = vhdmerge::journal::path_for(&base);
        let images = vhdmerge::journal::images::path_for(&jpath);
        assert!(
            images.exists(),
            "the before-images were not cloned into {}",
            images.display()
        );
        let mut args = vec!["recover", base.to_str().unwrap()];
        if rollback {
            args.push("--rollback");
        }
        ok(&args);
        assert!(!jpath.exists() && !images.exists(), "journal files left");
        if rollback {
            assert!(files_of(&dir) == start, "rollback is not byte-identical");
        } else {
            assert_eq!(digest_of(&base), want, "the resumed merge");
            check_result("xfs", 0, c, &base, &dir, &want);
        }
    }
}
