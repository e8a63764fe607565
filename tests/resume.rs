//! Resuming interrupted merges through the real binary: a pause by signal,
//! a second signal, a resume that finds its sources changed, and
//! `recover` on a disk with nothing pending.

mod common;

use vhdmerge::failpoint::Failpoint as F;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Rng, folder_digests, folder_views, vhdmerge};
use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};

/// A 64 MiB chain whose child holds 24 runs of 1 MiB over the base's data
/// and beside it: (base, child).
fn chain(dir: &Path, vhdx: bool) -> (PathBuf, PathBuf) {
    let (b, c) = match vhdx {
        true => (dir.join("base.vhdx"), dir.join("child.avhdx")),
        false => (dir.join("base.vhd"), dir.join("child.avhd")),
    };
    if vhdx {
        let o = VhdxOptions {
            virtual_size: 64 << 20,
            block_size: 4 << 20,
            ..Default::default()
        };
        create::create_vhdx(&b, &o).unwrap();
    } else {
        let o = VhdOptions {
            size: 64 << 20,
            ..Default::default()
        };
        create::create_vhd(&b, &o).unwrap();
    }
    let mut rng = Rng(5);
    let mut w = common::open_writable(&b);
    w.write(0, &rng.bytes(16 << 20)).unwrap();
    w.close().unwrap();
    drop(w);
    create::create_child(&c, &b, Some(1 << 20)).unwrap();
    let mut w = common::open_writable(&c);
    for i in 0..24u64 {
        w.write(i * (5 << 19) + 512, &rng.bytes(1 << 20)).unwrap();
    }
    w.close().unwrap();
    drop(w);
    (b, c)
}

/// Waits until `flag` exists (the binary reached its pause point).
fn wait_for(flag: &Path) {
    let t = Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "never paused");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A merge with 2 MiB batches and 4 MiB checkpoints.
const MERGE: [&str; 6] = [
    "--quiet",
    "merge",
    "--batch",
    "2M",
    "--checkpoint-every",
    "4M",
];

/// Starts the merge of `c` (with `extra` options) so that it waits at
/// `at` while `flag` exists.
fn merge_paused_at(c: &Path, extra: &[&str], at: F, flag: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(MERGE)
        .args(extra)
        .arg(c)
        .env("VHDMERGE_PAUSE_AT", at.to_string())
        .env("VHDMERGE_PAUSE_FILE", flag)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Merges `c` with `extra` options, sends SIGINT once it reached the
/// second batch and returns its stderr, checking it paused (exit 130).
fn pause_by_signal(c: &Path, extra: &[&str], flag: &Path) -> String {
    let child = merge_paused_at(c, extra, F::AfterBatch(2), flag);
    wait_for(flag);
    signal(child.id(), libc::SIGINT);
    std::fs::remove_file(flag).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("paused at") && err.contains("vhdmerge recover"),
        "{err}"
    );
    err
}

/// `recover --json` of `b`, which must resume and finish.
fn resume_finishes(b: &Path) -> serde_json::Value {
    let o = vhdmerge(&["recover", "--json", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["outcome"], "finished");
    assert!(r["resumed_from"].as_u64().unwrap() > 0, "{r}");
    r
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn nothing_pending_is_a_successful_no_op() {
    let d = tempfile::tempdir().unwrap();
    let (b, _) = chain(d.path(), true);
    let before = folder_digests(d.path());
    let o = vhdmerge(&["recover", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to recover"));
    let o = vhdmerge(&["recover", "--json", b.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["outcome"], "nothing_to_recover");
    assert_eq!(folder_digests(d.path()), before);
}

/// SIGINT stops at the next checkpoint with exit 130 and the message;
/// `info` and `merge` name the pending merge; `recover` resumes from
/// there and the result reads as the child did.
#[test]
fn a_signal_pauses_at_a_checkpoint_and_recover_continues() {
    for vhdx in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let (b, c) = chain(d.path(), vhdx);
        let want = common::digest_of(&c);
        let flag = d.path().join("paused");
        let err = pause_by_signal(&c, &[], &flag);
        assert!(err.contains("--rollback"), "{err}");
        // `info` names it (on stderr when the changed ancestor identity
        // breaks the VHDX chain, beside the chain otherwise); `merge`
        // refuses and names it.
        for cmd in ["info", "merge"] {
            let o = vhdmerge(&[cmd, c.to_str().unwrap()]);
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(cmd == "info" || !o.status.success(), "{cmd}: {all}");
            assert!(all.contains("% durable"), "{cmd}: {all}");
        }
        let r = resume_finishes(&b);
        let (from, left) = (
            r["resumed_from"].as_u64().unwrap(),
            r["remaining"].as_u64().unwrap(),
        );
        assert!(from > 0 && left > 0, "{r}");
        assert_eq!(from + left, r["merge"]["plan"]["bytes"].as_u64().unwrap());
        assert!(!c.exists());
        assert_eq!(common::digest_of(&b), want);
    }
}

/// A second signal ends the process at once; the journal makes that as
/// safe as a crash, and `recover` finishes the merge.
#[test]
fn a_second_signal_stops_at_once() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = chain(d.path(), true);
    let want = common::digest_of(&c);
    let flag = d.path().join("paused");
    let mut child = merge_paused_at(&c, &[], F::AfterBatch(3), &flag);
    wait_for(&flag);
    signal(child.id(), libc::SIGTERM);
    // Apart, or the kernel folds the two into one pending signal.
    std::thread::sleep(Duration::from_millis(200));
    signal(child.id(), libc::SIGTERM);
    // Still held at the pause point, yet gone.
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(flag.exists());
    let o = vhdmerge(&["recover", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed from the last checkpoint"));
    assert_eq!(common::digest_of(&b), want);
}

/// A mapped page that cannot be read raises SIGBUS (a merged file
/// truncated by another program, a failing disk). The merge ends there as
/// in a power cut, exits 135 and says how to go on; `recover` finishes it.
/// The signal is sent from outside: the handler is the same one a real
/// fault runs (a real one is not deterministic to provoke).
#[test]
fn sigbus_ends_the_merge_and_says_how_to_recover() {
    for vhdx in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let (b, c) = chain(d.path(), vhdx);
        let want = common::digest_of(&c);
        let flag = d.path().join("paused");
        let mut child = merge_paused_at(&c, &[], F::AfterBatch(2), &flag);
        wait_for(&flag);
        signal(child.id(), libc::SIGBUS);
        // Without the handler the merge would not end: Rust's own SIGBUS
        // handler (stack-overflow detection) returns from a signal sent
        // with kill(2), so this fails by the deadline instead of hanging.
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("SIGBUS did not end the merge");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(135), "{err}");
        assert!(err.contains("SIGBUS"), "{err}");
        let ancestor = b.file_name().unwrap().to_str().unwrap();
        assert!(
            err.contains("`vhdmerge recover ") && err.contains(&format!("{ancestor}` goes on")),
            "{err}"
        );
        let r = resume_finishes(&b);
        assert!(r["remaining"].as_u64().unwrap() > 0, "{r}");
        assert!(!c.exists());
        assert_eq!(common::digest_of(&b), want);
    }
}

/// A merged file written to between the crash and the resume: the resume
/// refuses, says which file and why, and rolls back to the exact start.
#[test]
fn a_resume_whose_sources_changed_rolls_back() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = chain(d.path(), true);
    let start = folder_digests(d.path());
    let o = Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(MERGE)
        .arg(&c)
        .env("VHDMERGE_FAIL_AT", F::AfterBatch(4).to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    // Another program writes to the child (a new DataWriteGuid); the
    // child alone opens, since its parent's identity changed mid-merge.
    let mut w = vhdmerge::disk::vhdx::VhdxDisk::open(&c, true).unwrap();
    vhdmerge::disk::Layer::write(&mut w, 0, &[7u8; 4096]).unwrap();
    vhdmerge::disk::Layer::close(&mut w).unwrap();
    drop(w);
    let changed = blake3::hash(&std::fs::read(&c).unwrap());
    let o = vhdmerge(&["recover", b.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("child.avhdx") && err.contains("written to") && err.contains("rolled back"),
        "{err}"
    );
    let now = folder_digests(d.path());
    let base = |v: &[(String, String)]| v.iter().find(|(n, _)| n == "base.vhdx").cloned();
    assert_eq!(
        base(&now),
        base(&start),
        "the ancestor is back to its start"
    );
    assert_eq!(blake3::hash(&std::fs::read(&c).unwrap()), changed);
    assert!(!vhdmerge::journal::path_for(&b).exists());
    let _ = folder_views(d.path());
}

/// A finish-only merge paused by a signal says it can only be finished;
/// `recover --rollback` refuses without writing; `recover` finishes it.
#[test]
fn a_paused_finish_only_merge_can_only_be_finished() {
    for vhdx in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let (b, c) = chain(d.path(), vhdx);
        let want = common::digest_of(&c);
        let flag = d.path().join("paused");
        let err = pause_by_signal(&c, &["--finish-only"], &flag);
        assert!(err.contains("can only be finished"), "{err}");
        let before = folder_digests(d.path());
        let o = vhdmerge(&["recover", "--rollback", b.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("--finish-only") && err.contains("only be finished"),
            "{err}"
        );
        assert_eq!(
            folder_digests(d.path()),
            before,
            "the refusal wrote nothing"
        );
        let o = vhdmerge(&["info", c.to_str().unwrap()]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(all.contains("finish-only"), "{all}");
        resume_finishes(&b);
        assert!(!c.exists());
        assert_eq!(common::digest_of(&b), want);
    }
}

/// A finish-only merge whose merged file changed before the resume can
/// neither resume nor roll back: `recover` says so and writes nothing;
/// with the file put back, it finishes.
#[test]
fn a_finish_only_resume_whose_sources_changed_stops() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = chain(d.path(), true);
    let want = common::digest_of(&c);
    let o = Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(MERGE)
        .arg("--finish-only")
        .arg(&c)
        .env("VHDMERGE_FAIL_AT", F::AfterBatch(4).to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let saved = std::fs::read(&c).unwrap();
    // Another program writes to the child (a new DataWriteGuid).
    let mut w = vhdmerge::disk::vhdx::VhdxDisk::open(&c, true).unwrap();
    vhdmerge::disk::Layer::write(&mut w, 0, &[7u8; 4096]).unwrap();
    vhdmerge::disk::Layer::close(&mut w).unwrap();
    drop(w);
    let before = folder_digests(d.path());
    let o = vhdmerge(&["recover", b.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--finish-only") && err.contains("Put the merged files back"),
        "{err}"
    );
    assert_eq!(folder_digests(d.path()), before, "recover wrote nothing");
    std::fs::write(&c, &saved).unwrap();
    let o = vhdmerge(&["recover", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(common::digest_of(&b), want);
}
