//! Merges: random chains into every ancestor, the real chains, interrupted
//! merges recovered at every phase, and every refusal leaving inputs intact.

mod common;

use vhdmerge::failpoint::Failpoint as F;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use proptest::prelude::*;
use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};
use vhdmerge::disk::vhdx::VhdxDisk;
use vhdmerge::merge::{self, MergeOptions};
use vhdmerge::{Chain, ChainOptions};

#[derive(Debug, Clone)]
struct Level {
    block_shift: u32,
    writes: Vec<(u64, u64, u8)>,
    zero_block: Option<u64>,
}

fn level() -> impl Strategy<Value = Level> {
    (
        0u32..3,
        prop::collection::vec((0u64..1_000_000, 1u64..300_000, 1u8..255), 0..5),
        prop::option::of(0u64..8),
    )
        .prop_map(|(block_shift, writes, zero_block)| Level {
            block_shift,
            writes,
            zero_block,
        })
}

/// Builds a chain (base first) and returns the paths and each level's view.
fn build(
    dir: &Path,
    vhdx: bool,
    sector4k: bool,
    size: u64,
    levels: &[Level],
) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let ls = if vhdx && sector4k { 4096 } else { 512 };
    let mut model = vec![0u8; size as usize];
    let mut views = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    for (i, lv) in levels.iter().enumerate() {
        let ext = match (vhdx, i) {
            (true, 0) => "vhdx",
            (true, _) => "avhdx",
            (false, 0) => "vhd",
            (false, _) => "avhd",
        };
        let path = dir.join(format!("l{i}.{ext}"));
        let bs = if vhdx {
            1u64 << (20 + lv.block_shift)
        } else {
            1u64 << (19 + lv.block_shift)
        };
        if i == 0 {
            if vhdx {
                create::create_vhdx(
                    &path,
                    &VhdxOptions {
                        virtual_size: size,
                        block_size: bs,
                        logical_sector: ls,
                        ..Default::default()
                    },
                )
                .unwrap();
            } else {
                create::create_vhd(
                    &path,
                    &VhdOptions {
                        size,
                        block_size: bs,
                        fixed: false,
                    },
                )
                .unwrap();
            }
        } else {
            create::create_child(&path, &paths[i - 1], Some(bs)).unwrap();
        }
        let mut chain = common::open_writable(&path);
        for &(off, len, fill) in &lv.writes {
            let off = (off * 37) % size;
            let len = len.min(size - off);
            chain.write(off, &vec![fill; len as usize]).unwrap();
            model[off as usize..(off + len) as usize].fill(fill);
        }
        chain.close().unwrap();
        drop(chain);
        if let (true, Some(b)) = (vhdx, lv.zero_block)
            && b * bs < size
        {
            let mut d = VhdxDisk::open(&path, true).unwrap();
            d.set_zero(b).unwrap();
            vhdmerge::disk::Layer::close(&mut d).unwrap();
            let end = ((b + 1) * bs).min(size);
            model[(b * bs) as usize..end as usize].fill(0);
        }
        views.push(model.clone());
        paths.push(path);
    }
    (paths, views)
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, &ChainOptions::default()).unwrap();
    let mut v = vec![0u8; chain.virtual_size() as usize];
    chain.read(0, &mut v).unwrap();
    v
}

fn small_batches() -> MergeOptions {
    MergeOptions {
        batch_bytes: 1 << 20,
        ..Default::default()
    }
}

fn merge_every_ancestor(
    vhdx: bool,
    sector4k: bool,
    size_mib: u64,
    levels: &[Level],
) -> Result<(), TestCaseError> {
    let src = tempfile::tempdir().unwrap();
    let size = size_mib << 20;
    let (paths, views) = build(src.path(), vhdx, sector4k, size, levels);
    let top = paths.len() - 1;
    let py = python();
    for k in 0..top {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let child = dir.path().join(paths[top].file_name().unwrap());
        let ancestor = dir.path().join(paths[k].file_name().unwrap());
        let opts = MergeOptions {
            into: Some(ancestor.clone()),
            verify_full: k % 2 == 0,
            ..small_batches()
        };
        let p = merge::prepare(&child, &opts).unwrap();
        let report = merge::execute(p, &opts, &mut |_, _| {}).unwrap();
        prop_assert!(
            report.verified,
            "digest mismatch merging level {} into {}",
            top,
            k
        );
        prop_assert!(
            read_all(&ancestor) == views[top],
            "ancestor {} does not read as the child did",
            k
        );
        for merged in &paths[k + 1..] {
            prop_assert!(!dir.path().join(merged.file_name().unwrap()).exists());
        }
        if vhdx && k == 0 && !sector4k && have("qemu-img") {
            let o = Command::new("qemu-img")
                .args(["check", "-f", "vhdx"])
                .arg(&ancestor)
                .output()
                .unwrap();
            prop_assert!(
                o.status.success(),
                "qemu-img check: {}",
                String::from_utf8_lossy(&o.stdout)
            );
            prop_assert_eq!(
                qemu_digest("vhdx", &ancestor, dir.path()),
                digest_of(&ancestor)
            );
        }
        if vhdx && let Some(py) = &py {
            prop_assert_eq!(
                oracle(py, "dissect", &[&ancestor], dir.path()),
                digest_of(&ancestor)
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn vhdx_chains_merge_into_every_ancestor(sector4k in any::<bool>(), size_mib in 3u64..24, levels in prop::collection::vec(level(), 2..6)) {
        merge_every_ancestor(true, sector4k, size_mib, &levels)?;
    }

    #[test]
    fn vhd_chains_merge_into_every_ancestor(size_mib in 3u64..24, levels in prop::collection::vec(level(), 2..6)) {
        merge_every_ancestor(false, false, size_mib, &levels)?;
    }
}

#[test]
fn fixed_and_differencing_ancestors() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    // Fixed VHDX and fixed VHD ancestors are written in place.
    for (name, fixed_vhdx) in [("fixed.vhdx", true), ("fixed.vhd", false)] {
        let base = dir.path().join(name);
        if fixed_vhdx {
            create::create_vhdx(
                &base,
                &VhdxOptions {
                    virtual_size: 20 << 20,
                    block_size: 1 << 20,
                    fixed: true,
                    ..Default::default()
                },
            )
            .unwrap();
        } else {
            create::create_vhd(
                &base,
                &VhdOptions {
                    size: 20 << 20,
                    fixed: true,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let child = dir.path().join(format!(
            "{name}.child.a{}",
            if fixed_vhdx { "vhdx" } else { "vhd" }
        ));
        create::create_child(&child, &base, None).unwrap();
        let mut c = common::open_writable(&child);
        c.write(3 << 20, &rng.bytes(2 << 20)).unwrap();
        c.write(12345, &rng.bytes(5000)).unwrap();
        c.close().unwrap();
        drop(c);
        let want = read_all(&child);
        let len = std::fs::metadata(&base).unwrap().len();
        let p = merge::prepare(&child, &small_batches()).unwrap();
        assert!(
            merge::execute(p, &small_batches(), &mut |_, _| {})
                .unwrap()
                .verified
        );
        assert_eq!(read_all(&base), want);
        assert_eq!(
            std::fs::metadata(&base).unwrap().len(),
            len,
            "a fixed ancestor keeps its size"
        );
        assert_eq!(
            vhdmerge::disk::open_layer(&base, false).unwrap().kind(),
            vhdmerge::disk::Kind::Fixed
        );
    }
    // A differencing ancestor stays differencing and keeps showing its parent.
    let base = dir.path().join("b.vhdx");
    common::new_vhdx(&base, 16 << 20, 1 << 20);
    let mut c = common::open_writable(&base);
    c.write(0, &vec![0x55; 16 << 20]).unwrap();
    c.close().unwrap();
    drop(c);
    let mid = dir.path().join("mid.avhdx");
    let top = dir.path().join("top.avhdx");
    create::create_child(&mid, &base, None).unwrap();
    create::create_child(&top, &mid, None).unwrap();
    let mut c = common::open_writable(&top);
    c.write(1000 * 512, &vec![0x66; 512 * 3]).unwrap();
    c.close().unwrap();
    drop(c);
    let want = read_all(&top);
    let p = merge::prepare(&top, &small_batches()).unwrap();
    assert!(
        merge::execute(p, &small_batches(), &mut |_, _| {})
            .unwrap()
            .verified
    );
    assert_eq!(
        vhdmerge::disk::open_layer(&mid, false).unwrap().kind(),
        vhdmerge::disk::Kind::Differencing
    );
    assert_eq!(read_all(&mid), want);
}

#[test]
fn children_of_the_merged_child_are_relinked() {
    for vhdx in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let lv = |w: Vec<(u64, u64, u8)>| Level {
            block_shift: 0,
            writes: w,
            zero_block: None,
        };
        let (paths, views) = build(
            dir.path(),
            vhdx,
            false,
            8 << 20,
            &[
                lv(vec![(0, 900_000, 1)]),
                lv(vec![(1000, 70_000, 2)]),
                lv(vec![(50_000, 3000, 3)]),
            ],
        );
        let out = ok(&["merge", paths[1].to_str().unwrap()]);
        assert!(out.contains("re-linked"), "{out}");
        assert!(!paths[1].exists());
        // The grandchild now reads through the ancestor exactly as before.
        let chain = Chain::open(&paths[2], &ChainOptions::default()).unwrap();
        assert_eq!(chain.layers.len(), 2);
        assert_eq!(read_all(&paths[2]), views[2]);
        assert_eq!(read_all(&paths[0]), views[1]);
    }
}

#[test]
fn real_chains_merge_to_expected_digests() {
    let Some(corpus) = corpus() else { return };
    let rows = expected(&corpus);
    for name in [
        "dissect.hypervisor/differencing.avhdx.gz",
        "dfvfs/fat-differential.vhd",
    ] {
        let row = rows
            .iter()
            .find(|r| r.chain[0] == name)
            .expect("row in EXPECTED.tsv");
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = row
            .chain
            .iter()
            .map(|r| materialize(&corpus, r, dir.path()))
            .collect();
        let out = ok(&[
            "merge",
            "--json",
            "--verify",
            "full",
            paths[0].to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["verified"], true, "{out}");
        assert!(!paths[0].exists());
        assert_eq!(
            digest_of(&paths[1]),
            row.blake3,
            "{name} merged into its parent"
        );
        if name.ends_with("avhdx.gz") && have("qemu-img") {
            let o = Command::new("qemu-img")
                .args(["check", "-f", "vhdx"])
                .arg(&paths[1])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        }
    }
    // The hand-edited chain with wrong checksums is refused before any write.
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = ["dfvfs/image-differential.vhd", "dfvfs/image.vhd"]
        .iter()
        .map(|r| materialize(&corpus, r, dir.path()))
        .collect();
    let before = folder_digests(dir.path());
    let o = vhdmerge(&["merge", files[0].to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(folder_digests(dir.path()), before);
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vhdmerge"));
    c.arg("--quiet").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A chain base <- c1 <- c2; c1 is merged into base and c2 re-linked.
fn recovery_fixture(dir: &Path, vhdx: bool) -> PathBuf {
    let lv = |w: Vec<(u64, u64, u8)>| Level {
        block_shift: 0,
        writes: w,
        zero_block: None,
    };
    let (paths, _) = build(
        dir,
        vhdx,
        false,
        8 << 20,
        &[
            lv(vec![(0, 2_500_000, 1)]),
            lv(vec![(1000, 700_000, 2), (150_000, 900_000, 4)]),
            lv(vec![(50_000, 3000, 3)]),
        ],
    );
    paths[1].clone()
}

#[test]
fn interrupted_merges_recover_at_every_phase() {
    let seed = [("VHDMERGE_GUID_SEED", "42")];
    for vhdx in [true, false] {
        let pristine = tempfile::tempdir().unwrap();
        let child = recovery_fixture(pristine.path(), vhdx);
        let child_name = child.file_name().unwrap().to_str().unwrap().to_string();
        let start = folder_digests(pristine.path());
        // The uninterrupted merge, for byte-for-byte comparison.
        let clean = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), clean.path());
        let o = run_env(
            &[
                "merge",
                "--batch",
                "256K",
                clean.path().join(&child_name).to_str().unwrap(),
            ],
            &seed,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let finished = folder_digests(clean.path());
        let finished_views = common::folder_views(clean.path());
        let base = if vhdx { "l0.vhdx" } else { "l0.vhd" };
        let phases = [
            F::AfterBegin,
            F::MidApply,
            F::BeforeClose,
            F::AfterApply,
            F::MidRelink,
            F::AfterCommit,
            F::MidCleanup,
        ];
        let committed = [F::AfterCommit, F::MidCleanup];
        // After the last run's checkpoint: recover resumes there.
        let checkpointed = [F::AfterApply, F::MidRelink];
        let mut checked = 0;
        for phase in phases {
            for rollback in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                copy_dir(pristine.path(), dir.path());
                let o = run_env(
                    &[
                        "merge",
                        "--batch",
                        "256K",
                        dir.path().join(&child_name).to_str().unwrap(),
                    ],
                    &[seed[0], ("VHDMERGE_FAIL_AT", &phase.to_string())],
                );
                assert!(
                    !o.status.success(),
                    "{phase}: the merge should have been interrupted"
                );
                let b = dir.path().join(base);
                let mut args = vec!["recover", b.to_str().unwrap()];
                if rollback {
                    args.push("--rollback");
                }
                let r = run_env(&args, &seed);
                let after = folder_digests(dir.path());
                if phase == F::MidCleanup && rollback {
                    assert!(
                        !r.status.success(),
                        "rollback after cleanup began must be refused"
                    );
                    let r = run_env(&["recover", b.to_str().unwrap()], &seed);
                    assert!(r.status.success());
                    assert_eq!(
                        folder_digests(dir.path()),
                        finished,
                        "{phase}: finished result"
                    );
                } else if checkpointed.contains(&phase) && !rollback {
                    assert!(
                        r.status.success(),
                        "{phase}: {}",
                        String::from_utf8_lossy(&r.stderr)
                    );
                    let names = |d: &[(String, String)]| -> Vec<String> {
                        d.iter().map(|(n, _)| n.clone()).collect()
                    };
                    assert_eq!(names(&after), names(&finished), "{phase}: files");
                    assert_eq!(
                        common::folder_views(dir.path()),
                        finished_views,
                        "{phase}: a resumed merge must read as the uninterrupted one"
                    );
                } else if committed.contains(&phase) && !rollback {
                    assert!(
                        r.status.success(),
                        "{phase}: {}",
                        String::from_utf8_lossy(&r.stderr)
                    );
                    assert_eq!(
                        after, finished,
                        "{phase}: recover must give the uninterrupted result byte for byte"
                    );
                } else {
                    assert!(
                        r.status.success(),
                        "{phase}: {}",
                        String::from_utf8_lossy(&r.stderr)
                    );
                    assert_eq!(
                        after, start,
                        "{phase} rollback={rollback}: must be the byte-identical start"
                    );
                }
                checked += 1;
            }
        }
        // A crash during recovery is recovered by the next run.
        for (merge_at, recover_at, rollback) in [
            (F::MidApply, F::MidRollback, false),
            (F::AfterCommit, F::RecoverAfterRollbackMark, true),
            (F::AfterCommit, F::MidRollback, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(pristine.path(), dir.path());
            let b = dir.path().join(base);
            run_env(
                &[
                    "merge",
                    "--batch",
                    "256K",
                    dir.path().join(&child_name).to_str().unwrap(),
                ],
                &[seed[0], ("VHDMERGE_FAIL_AT", &merge_at.to_string())],
            );
            let mut args = vec!["recover", b.to_str().unwrap()];
            if rollback {
                args.push("--rollback");
            }
            let r = run_env(&args, &[("VHDMERGE_FAIL_AT", &recover_at.to_string())]);
            assert!(
                !r.status.success(),
                "recovery should have been interrupted at {recover_at}"
            );
            let r = run_env(&["recover", b.to_str().unwrap()], &[]);
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
            assert_eq!(
                folder_digests(dir.path()),
                start,
                "{merge_at}/{recover_at}: second recovery must finish the rollback"
            );
            checked += 1;
        }
        eprintln!(
            "{} interrupted-merge cases recovered ({})",
            checked,
            if vhdx { "VHDX" } else { "VHD" }
        );
    }
}

#[test]
fn refusals_leave_every_byte_alone() {
    let dir = tempfile::tempdir().unwrap();
    let lv = |w: Vec<(u64, u64, u8)>| Level {
        block_shift: 0,
        writes: w,
        zero_block: None,
    };
    let (paths, _) = build(
        dir.path(),
        true,
        false,
        8 << 20,
        &[lv(vec![(0, 100_000, 1)]), lv(vec![(1000, 7000, 2)])],
    );
    let child = paths[1].to_str().unwrap().to_string();

    // A sibling: another child of the ancestor.
    let sib = dir.path().join("sibling.avhdx");
    create::create_child(&sib, &paths[0], None).unwrap();
    let before = folder_digests(dir.path());
    let o = vhdmerge(&["merge", &child]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("sibling.avhdx") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(folder_digests(dir.path()), before);
    std::fs::remove_file(&sib).unwrap();

    // A lock held by someone else.
    let before = folder_digests(dir.path());
    let f = std::fs::File::open(&paths[0]).unwrap();
    fs2::FileExt::try_lock_exclusive(&f).unwrap();
    let o = vhdmerge(&["merge", &child]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("holds this file"),
        "{err}"
    );
    drop(f);
    assert_eq!(folder_digests(dir.path()), before);

    // A pending journal from an interrupted merge.
    let o = run_env(
        &["merge", &child],
        &[("VHDMERGE_FAIL_AT", &F::AfterBegin.to_string())],
    );
    assert!(!o.status.success());
    let before = folder_digests(dir.path());
    let o = vhdmerge(&["merge", &child]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("vhdmerge recover"),
        "{err}"
    );
    assert_eq!(folder_digests(dir.path()), before);
    ok(&["recover", paths[0].to_str().unwrap()]);

    // Not enough free space: a child whose blocks, once merged, need more
    // than the file system has. The child's blocks are marked fully present
    // while the file holds them as holes, so the child itself takes no room.
    let free = fs2::available_space(dir.path()).unwrap();
    let bs = 256u64 << 20;
    let blocks = (free / bs + 2).min((64u64 << 40) / bs);
    let big = dir.path().join("big.vhdx");
    common::new_vhdx(&big, blocks * bs, bs);
    let bigc = dir.path().join("big.avhdx");
    create::create_child(&bigc, &big, None).unwrap();
    let mut c = common::open_writable(&bigc);
    for b in 0..blocks {
        c.write(b * bs, &[7u8; 512]).unwrap();
    }
    c.close().unwrap();
    drop(c);
    {
        use std::os::unix::fs::FileExt;
        let d = vhdmerge::disk::vhdx::VhdxDisk::open(&bigc, false).unwrap();
        let bat = d
            .regions()
            .find(vhdmerge::format::vhdx::region::BAT_GUID)
            .unwrap()
            .file_offset;
        let f = std::fs::OpenOptions::new().write(true).open(&bigc).unwrap();
        for b in 0..blocks {
            // PARTIALLY_PRESENT (7) becomes FULLY_PRESENT (6).
            let e = (d.bat_entry(b) & !7) | 6;
            let at = bat + 8 * d.geometry().pb_index(b);
            f.write_all_at(&e.to_le_bytes(), at).unwrap();
        }
    }
    let before: Vec<_> = [&big, &bigc]
        .iter()
        .map(|p| (std::fs::metadata(p).unwrap().len(), blake3_file(p)))
        .collect();
    let o = vhdmerge(&["merge", bigc.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("free"), "{err}");
    let after: Vec<_> = [&big, &bigc]
        .iter()
        .map(|p| (std::fs::metadata(p).unwrap().len(), blake3_file(p)))
        .collect();
    assert_eq!(before, after);
}

/// A VHD merge allocates new blocks in batches: 64 new 2 MiB blocks cost
/// the ancestor a handful of flushes (a reservation, the commit's), not
/// two per block; the unused reservation is given back, so the file ends
/// with its footer right after its last block; and qemu-img reads it as
/// the child was.
#[test]
fn vhd_blocks_are_allocated_in_batches() {
    use vhdmerge::io::trace::{self, Op};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, child) = (d.join("base.vhd"), d.join("child.avhd"));
    create::create_vhd(
        &base,
        &VhdOptions {
            size: 512 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let base_len = std::fs::metadata(&base).unwrap().len();
    create::create_child(&child, &base, None).unwrap();
    let mut c = open_writable(&child);
    let mut rng = Rng(5);
    // 100 new blocks of the base: more than one reservation.
    c.write(0, &rng.bytes(200 << 20)).unwrap();
    c.close().unwrap();
    drop(c);
    let want = digest_of(&child);
    trace::start(d, true, None, false);
    let p = merge::prepare(&child, &MergeOptions::default()).unwrap();
    merge::execute(p, &MergeOptions::default(), &mut |_, _| {}).unwrap();
    let (ops, _) = trace::stop();
    let flushes = ops
        .iter()
        .filter(|op| matches!(op, Op::Flush { path } if path.ends_with("base.vhd")))
        .count();
    assert!(
        flushes <= 16,
        "{flushes} flushes of the base for 100 new blocks"
    );
    assert_eq!(digest_of(&base), want);
    // 100 blocks of 2 MiB and a 512-byte bitmap (data 4 KiB aligned),
    // then the footer: nothing reserved is left.
    let len = std::fs::metadata(&base).unwrap().len();
    assert!(
        len <= base_len + 100 * ((2 << 20) + 4096) + 4096,
        "the base is {len} bytes"
    );
    if need("qemu-img") {
        assert_eq!(qemu_digest("vpc", &base, d), want);
    }
}

/// A data write the disk loses (reported done, never carried out) is
/// found by reading the runs back: behind the copy for a run before a
/// checkpoint, after the commit for one after the last. Either way the
/// merge is committed, says so, and `recover` copies the run again.
#[test]
fn lost_writes_are_found_by_reading_back() {
    use vhdmerge::io::trace::{self, Fault, Op};
    for (vhdx, finish_only) in [(true, false), (true, true), (false, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let lv = |w: Vec<(u64, u64, u8)>| Level {
            block_shift: 0,
            writes: w,
            zero_block: None,
        };
        let levels = [lv(vec![(0, 5 << 20, 1)]), lv(vec![(0, 12 << 20, 2)])];
        let (paths, views) = build(dir.path(), vhdx, false, 16 << 20, &levels);
        let opts = MergeOptions {
            checkpoint_bytes: 2 << 20,
            finish_only,
            ..Default::default()
        };
        let base_name = paths[0].file_name().unwrap().to_owned();
        // Which operations write the child's data (all 2s) into the
        // ancestor (not the holes punched after the cleanup).
        let record = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), record.path());
        trace::start(record.path(), true, None, true);
        let child = record.path().join(paths[1].file_name().unwrap());
        let p = merge::prepare(&child, &opts).unwrap();
        merge::execute(p, &opts, &mut |_, _| {}).unwrap();
        let (ops, _) = trace::stop();
        let data_writes: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, op)| {
                matches!(op, Op::Write { path, data, .. }
                if path.ends_with(&base_name) && data.len() >= 256 << 10 && data[0] == 2)
            })
            .map(|(i, _)| i)
            .collect();
        assert!(data_writes.len() >= 8, "{} data writes", data_writes.len());
        for at in [data_writes[0], *data_writes.last().unwrap()] {
            let work = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), work.path());
            let (base, child) = (
                work.path().join(&base_name),
                work.path().join(paths[1].file_name().unwrap()),
            );
            trace::start(work.path(), false, Some((at, Fault::LostWrite)), true);
            let p = merge::prepare(&child, &opts).unwrap();
            let r = merge::execute(p, &opts, &mut |_, _| {});
            trace::stop();
            let e = r
                .expect_err(&format!("a lost write (operation {at}) went unnoticed"))
                .to_string();
            assert!(
                e.contains("do not read back") && e.contains("committed"),
                "{e}"
            );
            vhdmerge::recover::recover(&base, false).unwrap();
            assert_eq!(
                read_all(&base),
                views[1],
                "vhdx {vhdx}, finish-only {finish_only}, op {at}"
            );
        }
    }
}
