//! Regenerates `recovery-fixtures/`: small chains with a merge journal
//! frozen at distinct crash points, and what recovery must produce.
//!
//!     cargo build && cargo run --example make_recovery_fixtures
//!
//! Each fixture is made by running the real `vhdmerge` binary and stopping
//! it at a named failpoint (`VHDMERGE_FAIL_AT`), so the files are exactly
//! what a kill at that instant leaves; two more cut the journal's last
//! record (a torn tail). GUIDs are seeded, so the fixtures are repeatable.
//!
//! Fixtures 01-15 hold version-1 journals and 16 on version-2 ones
//! (checkpoints, resumes). A fixture folder that exists is left alone:
//! the frozen journals are the compatibility contract. Set
//! `VHDMERGE_REGENERATE=1` to rewrite them all.

use std::path::{Path, PathBuf};
use std::process::Command;

use vhdmerge::disk::create::{self};
use vhdmerge::{Chain, ChainOptions};

struct Fixture {
    name: &'static str,
    vhdx: bool,
    /// A grandchild exists (re-link), merge level 1 into the base.
    relink: bool,
    merge_at: &'static str,
    /// Merge with a checkpoint every 256 KiB (version 2 only).
    checkpoints: bool,
    /// Optional: start `recover` (a resume) and stop it here.
    recover_at: Option<&'static str>,
    /// Optional: start `recover --rollback` and stop it here.
    rollback_at: Option<&'static str>,
    /// Cut this many bytes off the journal's end.
    tear: u64,
    what: &'static str,
}

fn fixtures() -> Vec<Fixture> {
    let f = |name, vhdx, relink, merge_at, rollback_at, tear, what| Fixture {
        name,
        vhdx,
        relink,
        merge_at,
        checkpoints: false,
        recover_at: None,
        rollback_at,
        tear,
        what,
    };
    // Version 2: checkpoints at 256 KiB with 64 KiB batches over about 20
    // runs, so that batch 6 lies after the second checkpoint (batches 1 and 4).
    let v2 = |name, vhdx, relink, merge_at, recover_at, rollback_at, what| Fixture {
        name,
        vhdx,
        relink,
        merge_at,
        checkpoints: true,
        recover_at,
        rollback_at,
        tear: 0,
        what,
    };
    let mut all = vec![
        f(
            "01-vhdx-after-planning",
            true,
            false,
            "after-begin",
            None,
            0,
            "the journal's Begin record is durable; nothing else was written",
        ),
        f(
            "02-vhdx-mid-apply",
            true,
            false,
            "mid-apply",
            None,
            0,
            "after the first batch of copies into the ancestor was made durable",
        ),
        f(
            "03-vhdx-mid-bat-update-through-log",
            true,
            false,
            "vhdx-log-written",
            None,
            0,
            "a VHDX log entry with new BAT pages is durable but not yet applied",
        ),
        f(
            "04-vhdx-torn-journal-tail",
            true,
            false,
            "mid-apply",
            None,
            37,
            "mid-apply, and a record being appended to the journal torn off",
        ),
        f(
            "05-vhdx-before-log-close",
            true,
            false,
            "before-close",
            None,
            0,
            "every copy applied, the ancestor's log still live",
        ),
        f(
            "06-vhdx-after-apply",
            true,
            false,
            "after-apply",
            None,
            0,
            "the ancestor is complete, the commit record not yet written",
        ),
        f(
            "07-vhdx-mid-relink",
            true,
            true,
            "mid-relink",
            None,
            0,
            "the grandchild was re-linked to the ancestor, the commit not yet written",
        ),
        f(
            "08-vhdx-after-commit",
            true,
            true,
            "after-commit",
            None,
            0,
            "committed; the merged file still exists",
        ),
        f(
            "09-vhdx-mid-cleanup",
            true,
            false,
            "mid-cleanup",
            None,
            0,
            "cleanup started: from here the merge can only be finished",
        ),
        f(
            "10-vhdx-mid-rollback",
            true,
            false,
            "after-commit",
            Some("mid-rollback"),
            0,
            "a committed merge being rolled back (--rollback) was interrupted",
        ),
        f(
            "11-vhd-mid-apply",
            false,
            false,
            "mid-apply",
            None,
            0,
            "VHD: blocks appended (footer moved) and copied, not committed",
        ),
        f(
            "12-vhd-torn-journal-tail",
            false,
            false,
            "mid-apply",
            None,
            11,
            "VHD: mid-apply, and a record being appended to the journal torn off",
        ),
        f(
            "13-vhd-mid-relink",
            false,
            true,
            "mid-relink",
            None,
            0,
            "VHD: the grandchild re-linked, not committed",
        ),
        f(
            "14-vhd-after-commit",
            false,
            false,
            "after-commit",
            None,
            0,
            "VHD: committed; the merged file still exists",
        ),
        f(
            "15-vhd-mid-rollback",
            false,
            true,
            "after-commit",
            Some("recover-after-rollback-mark"),
            0,
            "VHD: rollback of a committed merge marked, nothing restored yet",
        ),
    ];
    for vhdx in [true, false] {
        let name = |n: &'static str, vhd: &'static str| if vhdx { n } else { vhd };
        let fmt = if vhdx { "" } else { "VHD: " };
        let what = |s: &str| -> &'static str { format!("{fmt}{s}").leak() };
        all.extend([
            v2(
                name("16-vhdx-after-checkpoint", "21-vhd-after-checkpoint"),
                vhdx,
                false,
                "after-batch-6",
                None,
                None,
                what("two checkpoints durable, copies after the second not yet checkpointed: recover resumes"),
            ),
            v2(
                name("17-vhdx-mid-partial-undo", "22-vhd-mid-partial-undo"),
                vhdx,
                false,
                "after-batch-6",
                Some("mid-rollback"),
                None,
                what("a resume undoing the writes after the last checkpoint was interrupted"),
            ),
            v2(
                name("18-vhdx-mid-resume", "23-vhd-mid-resume"),
                vhdx,
                false,
                "after-batch-6",
                Some("after-batch-2"),
                None,
                what("a resume was interrupted while copying the remaining runs"),
            ),
            v2(
                name(
                    "19-vhdx-resume-then-rollback-interrupted",
                    "24-vhd-resume-then-rollback-interrupted",
                ),
                vhdx,
                false,
                "after-batch-6",
                Some("after-batch-2"),
                Some("mid-rollback"),
                what("an interrupted resume, then an interrupted --rollback of it"),
            ),
            v2(
                name("20-vhdx-checkpointed-mid-relink", "25-vhd-checkpointed-mid-relink"),
                vhdx,
                true,
                "mid-relink",
                None,
                None,
                what("every copy checkpointed, the grandchild re-linked, not committed: recover resumes at the re-link"),
            ),
        ]);
    }
    all
}

/// `runs`: eight more writes of 96 KiB per level, apart, so that a merge
/// makes several commits and checkpoints (version-2 fixtures).
fn build(dir: &Path, vhdx: bool, relink: bool, runs: bool) -> PathBuf {
    let size = 4u64 << 20;
    let ext = |i: usize| match (vhdx, i) {
        (true, 0) => "vhdx",
        (true, _) => "avhdx",
        (false, 0) => "vhd",
        (false, _) => "avhd",
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    let levels = if relink { 3 } else { 2 };
    for i in 0..levels {
        let p = dir.join(format!("l{i}.{}", ext(i)));
        if i == 0 {
            let o = create::CreateOptions {
                size: Some(size),
                block_size: Some(1 << 20),
                ..Default::default()
            };
            create::create(&p, &o).unwrap();
        } else {
            create::create_child(&p, &paths[i - 1], None).unwrap();
        }
        let mut c = Chain::open(
            &p,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let fill = 0x10 * (i as u8 + 1);
        c.write((i as u64) << 20, &vec![fill; 1 << 20]).unwrap();
        c.write(2_500_000 + i as u64 * 1000, &vec![fill + 1; 3000])
            .unwrap();
        for k in 0..8u64 * u64::from(runs) {
            c.write(
                (2 << 20) + k * (256 << 10) + i as u64 * 4096,
                &vec![fill + 2; 96 << 10],
            )
            .unwrap();
        }
        c.close().unwrap();
        drop(c);
        paths.push(p);
    }
    paths[1].clone()
}

fn vhdmerge() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("vhdmerge")
}

fn run(args: &[&str], fail_at: Option<&str>) -> bool {
    let mut c = Command::new(vhdmerge());
    c.arg("--quiet").args(args).env("VHDMERGE_GUID_SEED", "7");
    if let Some(f) = fail_at {
        c.env("VHDMERGE_FAIL_AT", f);
    }
    c.output().unwrap().status.success()
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// File name → BLAKE3 of its bytes, for every file in `dir`.
fn digests(dir: &Path) -> serde_json::Value {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let mut files = serde_json::Map::new();
    for p in names {
        files.insert(
            p.file_name().unwrap().to_string_lossy().to_string(),
            blake3::hash(&std::fs::read(&p).unwrap())
                .to_hex()
                .to_string()
                .into(),
        );
    }
    files.into()
}

/// File name → content digest of what it reads as (its chain), for every
/// disk in `dir`.
fn views(dir: &Path) -> serde_json::Value {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| vhdmerge::merge::preflight::is_disk_name(p))
        .collect();
    names.sort();
    let mut out = serde_json::Map::new();
    for p in names {
        let c = Chain::open(&p, &ChainOptions::default()).unwrap();
        let d = vhdmerge::verify::content_digest(&c, |_| {}).unwrap();
        out.insert(
            p.file_name().unwrap().to_string_lossy().to_string(),
            d.root.to_hex().to_string().into(),
        );
    }
    out.into()
}

fn gzip(from: &Path, to: &Path) {
    let data = std::fs::read(from).unwrap();
    let out = std::fs::File::create(to).unwrap();
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::best());
    std::io::Write::write_all(&mut enc, &data).unwrap();
    enc.finish().unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recovery-fixtures");
    assert!(
        vhdmerge().exists(),
        "build the vhdmerge binary first: cargo build"
    );
    let regenerate = std::env::var_os("VHDMERGE_REGENERATE").is_some();
    for fx in fixtures() {
        if root.join(fx.name).exists() && !regenerate {
            continue;
        }
        vhdmerge::guid::set_seed(Some(7));
        let pristine = tempfile::tempdir().unwrap();
        let child = build(pristine.path(), fx.vhdx, fx.relink, fx.checkpoints);
        let start = digests(pristine.path());
        // The uninterrupted merge of the same files, for comparison.
        let clean = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), clean.path());
        assert!(run(
            &[
                "merge",
                "--batch",
                "64K",
                clean
                    .path()
                    .join(child.file_name().unwrap())
                    .to_str()
                    .unwrap()
            ],
            None
        ));
        let finished = digests(clean.path());
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), tmp.path());
        let child = tmp.path().join(child.file_name().unwrap());
        let base = tmp.path().join(if fx.vhdx { "l0.vhdx" } else { "l0.vhd" });
        let mut args = vec!["merge", "--batch", "64K", child.to_str().unwrap()];
        if fx.checkpoints {
            args.extend(["--checkpoint-every", "256K"]);
        }
        let ok = run(&args, Some(fx.merge_at));
        assert!(
            !ok,
            "{}: the merge was not stopped at {}",
            fx.name, fx.merge_at
        );
        if let Some(at) = fx.recover_at {
            let args = ["recover", "--batch", "64K", "--checkpoint-every", "256K"];
            let ok = run(&[&args[..], &[base.to_str().unwrap()]].concat(), Some(at));
            assert!(!ok, "{}: the resume was not stopped at {at}", fx.name);
        }
        if let Some(at) = fx.rollback_at {
            let ok = run(&["recover", "--rollback", base.to_str().unwrap()], Some(at));
            assert!(!ok, "{}: the rollback was not stopped at {at}", fx.name);
        }
        let journal = vhdmerge::journal::path_for(&base);
        assert!(journal.exists(), "{}: no journal", fx.name);
        if fx.tear > 0 {
            // A torn append: the next record (a before-image that was being
            // written when the power went) reached the disk only in part.
            let loaded = vhdmerge::journal::load(&journal).unwrap();
            let next = vhdmerge::journal::Record::BeforeImage {
                file: 0,
                offset: 1 << 20,
                data: vec![0xEE; 4096],
            };
            let frame = vhdmerge::journal::encode(loaded.records.len() as u64, &next);
            let mut j = std::fs::OpenOptions::new()
                .append(true)
                .open(&journal)
                .unwrap();
            std::io::Write::write_all(&mut j, &frame[..frame.len() - fx.tear as usize * 97])
                .unwrap();
        }
        let dir = root.join(fx.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(tmp.path()).unwrap() {
            let p = e.unwrap().path();
            gzip(
                &p,
                &dir.join(format!("{}.gz", p.file_name().unwrap().to_string_lossy())),
            );
        }
        // What recovery must produce, on copies.
        let outcome = |rollback: bool| -> serde_json::Value {
            let t = tempfile::tempdir().unwrap();
            copy_dir(tmp.path(), t.path());
            let b = t.path().join(base.file_name().unwrap());
            let mut args = vec!["recover", "--json", b.to_str().unwrap()];
            if rollback {
                args.push("--rollback");
            }
            let o = Command::new(vhdmerge()).args(&args).output().unwrap();
            if !o.status.success() {
                return serde_json::json!({ "refused": String::from_utf8_lossy(&o.stderr).trim() });
            }
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if r["resumed_from"].is_null() {
                serde_json::json!({ "outcome": r["outcome"], "files": digests(t.path()) })
            } else {
                // A resumed session writes its own VHDX header GUIDs: what
                // must match is what every disk reads as.
                serde_json::json!({ "outcome": r["outcome"], "resumed": true, "views": views(t.path()) })
            }
        };
        let expected = serde_json::json!({
            "crash_point": fx.what,
            "merge_stopped_at": fx.merge_at,
            "rollback_stopped_at": fx.rollback_at,
            "torn_append": fx.tear > 0,
            "ancestor": base.file_name().unwrap().to_string_lossy(),
            "before_merge": start,
            "uninterrupted_merge": finished,
            "uninterrupted_views": views(clean.path()),
            "after_recover": outcome(false),
            "after_rollback": outcome(true),
        });
        std::fs::write(
            dir.join("expected.json"),
            serde_json::to_string_pretty(&expected).unwrap() + "\n",
        )
        .unwrap();
        std::fs::write(dir.join("README"), format!("{}\n", fx.what)).unwrap();
        println!("{}: {}", fx.name, fx.what);
    }
}
