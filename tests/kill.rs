//! The real binary, SIGKILLed at random moments of a merge of a 1 GiB
//! chain (30 times per format), then recovered: the guest sees either the
//! chain as it was (files byte-identical) or the finished merge, and the
//! finished merge whenever a checkpoint was durable. In every other round
//! the resuming `recover` is SIGKILLed too, and `recover` runs again.
//! `merge --finish-only` is killed the same way (10 times per format): it
//! must always end finished, and `recover --rollback` must refuse without
//! writing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Rng;
use vhdmerge::disk::create::{self, VhdOptions};
use vhdmerge::{Chain, ChainOptions};

fn file_digest(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_rayon(&std::fs::read(p).unwrap());
    h.finalize().to_hex().to_string()
}

fn content(p: &Path) -> String {
    let c = Chain::open(p, &ChainOptions::default()).unwrap();
    vhdmerge::verify::content_digest(&c, |_| {})
        .unwrap()
        .root
        .to_hex()
        .to_string()
}

fn build(dir: &Path, vhdx: bool) -> (PathBuf, PathBuf) {
    let size = 1u64 << 30;
    let (base, child) = if vhdx {
        (dir.join("base.vhdx"), dir.join("child.avhdx"))
    } else {
        (dir.join("base.vhd"), dir.join("child.avhd"))
    };
    if vhdx {
        common::new_vhdx(&base, size, 2 << 20);
    } else {
        create::create_vhd(
            &base,
            &VhdOptions {
                size,
                ..Default::default()
            },
        )
        .unwrap();
    }
    let mut rng = Rng(1);
    let chunk = rng.bytes(4 << 20);
    let mut c = common::open_writable(&base);
    for i in 0..64u64 {
        c.write(i * (16 << 20), &chunk).unwrap();
    }
    c.close().unwrap();
    drop(c);
    create::create_child(&child, &base, None).unwrap();
    let mut c = common::open_writable(&child);
    let other = rng.bytes(1 << 20);
    for i in 0..256u64 {
        // Half over the base's data (overwrites), half into new blocks.
        c.write(i * (4 << 20) + 512 * (i % 7), &other).unwrap();
    }
    c.close().unwrap();
    drop(c);
    (base, child)
}

/// Runs `cmd` and SIGKILLs it after `delay` (if it is still running).
fn kill_after(cmd: &mut Command, delay: Duration) {
    let mut proc = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = proc.kill();
    let _ = proc.wait();
}

fn has_checkpoint(journal: &Path) -> bool {
    vhdmerge::journal::load(journal).is_ok_and(|l| {
        l.records
            .iter()
            .any(|r| matches!(r, vhdmerge::journal::Record::Checkpoint(_)))
    })
}

#[test]
fn sigkill_at_random_moments_then_recover() {
    for vhdx in [true, false] {
        kill_rounds(vhdx, false, 30);
    }
}

#[test]
fn sigkill_a_finish_only_merge_then_recover() {
    for vhdx in [true, false] {
        kill_rounds(vhdx, true, 10);
    }
}

fn kill_rounds(vhdx: bool, finish_only: bool, rounds: u64) {
    let mode: &[&str] = if finish_only { &["--finish-only"] } else { &[] };
    let pristine = tempfile::tempdir().unwrap();
    let (base, child) = build(pristine.path(), vhdx);
    let start = [file_digest(&base), file_digest(&child)];
    let (base_view, child_view) = (content(&base), content(&child));
    let bin = env!("CARGO_BIN_EXE_vhdmerge");
    // One uninterrupted run to learn how long a merge takes.
    let work = tempfile::tempdir().unwrap();
    let copy = |to: &Path| {
        for p in [&base, &child] {
            std::fs::copy(p, to.join(p.file_name().unwrap())).unwrap();
        }
    };
    copy(work.path());
    let wb = work.path().join(base.file_name().unwrap());
    let wc = work.path().join(child.file_name().unwrap());
    let t = Instant::now();
    assert!(
        Command::new(bin)
            .args(["--quiet", "merge"])
            .arg(&wc)
            .status()
            .unwrap()
            .success()
    );
    let full = t.elapsed();
    let mut rng = Rng(if vhdx { 11 } else { 12 } + u64::from(finish_only) * 2);
    let (mut rolled, mut finished, mut resumes_killed) = (0, 0, 0);
    for round in 0..rounds {
        for e in std::fs::read_dir(work.path()).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        copy(work.path());
        let delay = Duration::from_micros(rng.below(full.as_micros() as u64 * 11 / 10 + 1));
        kill_after(
            Command::new(bin)
                .args([
                    "--quiet",
                    "merge",
                    "--batch",
                    "8M",
                    "--checkpoint-every",
                    "32M",
                ])
                .args(mode)
                .arg(&wc),
            delay,
        );
        let jpath = vhdmerge::journal::path_for(&wb);
        let checkpointed = jpath.exists() && has_checkpoint(&jpath);
        if finish_only && checkpointed {
            // Begun: no rollback, and the refusal writes nothing.
            let before = [file_digest(&wb), file_digest(&jpath)];
            let o = Command::new(bin)
                .args(["--quiet", "recover", "--rollback"])
                .arg(&wb)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains("only be finished"),
                "round {round}: {err}"
            );
            assert_eq!([file_digest(&wb), file_digest(&jpath)], before);
        }
        if round % 2 == 1 && checkpointed {
            // Kill the resume too, somewhere in its first part.
            let d = Duration::from_micros(rng.below(full.as_micros() as u64 / 2 + 1));
            kill_after(Command::new(bin).args(["--quiet", "recover"]).arg(&wb), d);
            resumes_killed += 1;
        }
        if jpath.exists() {
            let o = Command::new(bin)
                .args(["--quiet", "recover"])
                .arg(&wb)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(
            !(checkpointed && wc.exists()),
            "round {round} (killed after {delay:?}): a checkpoint was durable, yet the merge was rolled back"
        );
        if wc.exists() {
            assert_eq!(
                [file_digest(&wb), file_digest(&wc)],
                start,
                "round {round} (killed after {delay:?}): rolled back but not byte-identical"
            );
            assert_eq!(content(&wb), base_view);
            rolled += 1;
        } else {
            assert_eq!(
                content(&wb),
                child_view,
                "round {round} (killed after {delay:?}): finished merge reads wrong"
            );
            finished += 1;
        }
    }
    eprintln!(
        "{}{}: {rounds} kills over a {:?} merge ({resumes_killed} resumes killed too): {rolled} rolled back byte-identical, {finished} finished",
        if vhdx { "VHDX" } else { "VHD" },
        if finish_only { " finish-only" } else { "" },
        full
    );
}
