//! Named bad inputs, each with its message asserted and every file left
//! byte-identical by a refused merge.

mod common;

use vhdmerge::failpoint::Failpoint as F;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use vhdmerge::disk::create::{self};

fn vhdx_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let b = dir.join("b.vhdx");
    let c = dir.join("c.avhdx");
    common::new_vhdx(&b, 8 << 20, 1 << 20);
    create::create_child(&c, &b, None).unwrap();
    let mut ch = common::open_writable(&c);
    ch.write(4096, &[9u8; 8192]).unwrap();
    ch.close().unwrap();
    (b, c)
}

/// `merge` and `info` on `top` fail with `needle`, and nothing in `dir` changes.
fn refused(dir: &Path, top: &Path, needle: &str) {
    let before = folder_digests(dir);
    for cmd in ["info", "merge"] {
        let o = vhdmerge(&[cmd, top.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{cmd} should fail");
        assert!(err.contains(needle), "{cmd}: expected '{needle}' in: {err}");
        assert!(
            err.contains(top.file_name().unwrap().to_str().unwrap()) || err.contains("b.v"),
            "{cmd}: the message names no file: {err}"
        );
    }
    assert_eq!(
        folder_digests(dir),
        before,
        "a refused command changed a file"
    );
}

#[test]
fn parent_missing() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    std::fs::rename(&b, d.path().join("elsewhere.bin")).unwrap();
    refused(d.path(), &c, "parent disk not found; looked at");
}

#[test]
fn parent_with_the_wrong_identity() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    std::fs::remove_file(&b).unwrap();
    common::new_vhdx(&b, 8 << 20, 1 << 20);
    refused(
        d.path(),
        &c,
        "has the wrong identity: the child expects DataWriteGuid",
    );
}

#[test]
fn a_loop_in_the_chain() {
    let d = tempfile::tempdir().unwrap();
    let (_, c) = vhdx_chain(d.path());
    // Point the child at itself, with its own DataWriteGuid as linkage.
    let mut disk = vhdmerge::disk::vhdx::VhdxDisk::open(&c, true).unwrap();
    let mut loc = disk.locator.clone().unwrap();
    loc.set(
        "parent_linkage",
        &vhdmerge::format::vhdx::metadata::braced(&disk.header().data_write_guid),
    );
    loc.set("relative_path", ".\\c.avhdx");
    disk.set_locator(&loc).unwrap();
    vhdmerge::disk::Layer::close(&mut disk).unwrap();
    drop(disk);
    refused(d.path(), &c, "loops back to");
}

#[test]
fn virtual_size_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.vhd");
    let c = d.path().join("c.avhd");
    common::new_vhd(&b, 8 << 20);
    create::create_child(&c, &b, None).unwrap();
    // Shrink the parent's footer size (both copies, checksums fixed).
    let len = std::fs::metadata(&b).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&b)
        .unwrap();
    for at in [0, len - 512] {
        let mut raw = vec![0u8; 512];
        f.read_exact_at(&mut raw, at).unwrap();
        let mut footer = vhdmerge::format::vhd::Footer::decode(&raw).unwrap();
        footer.current_size = 4 << 20;
        f.write_all_at(&footer.encode(), at).unwrap();
    }
    drop(f);
    refused(d.path(), &c, "virtual sizes differ");
}

/// The metadata region of vhdmerge-made VHDX files starts at 2 MiB; items at +64 KiB.
const META: u64 = 2 << 20;

#[test]
fn block_size_not_a_power_of_two() {
    let d = tempfile::tempdir().unwrap();
    let (_, c) = vhdx_chain(d.path());
    let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
    f.write_all_at(&(3u32 << 20).to_le_bytes(), META + (64 << 10))
        .unwrap();
    drop(f);
    refused(d.path(), &c, "block size 3145728 is not a power of two");
}

#[test]
fn unknown_required_metadata() {
    let d = tempfile::tempdir().unwrap();
    let (_, c) = vhdx_chain(d.path());
    // The Physical Sector Size entry (the fifth) gets an unknown GUID; it stays required.
    let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
    f.write_all_at(&[0x42; 16], META + 32 + 32 * 4).unwrap();
    drop(f);
    refused(d.path(), &c, "unknown required item");
}

#[test]
fn a_log_that_does_not_replay() {
    use vhdmerge::format::vhdx::{HEADER_OFFSETS, log};
    let d = tempfile::tempdir().unwrap();
    let (b, _) = vhdx_chain(d.path());
    let mut f = std::fs::read(&b).unwrap();
    let (mut h, slot) = common::header_to_replace(&f);
    let g = uuid::Uuid::from_u128(77);
    // An entry that says the file was larger than it is: it was truncated.
    let page = vec![0u8; 4096];
    let entry = log::encode_entry(&g, 3, 0, f.len() as u64 + (64 << 20), &[(3 << 20, &page)]);
    let lo = h.log_offset as usize;
    f[lo..lo + entry.len()].copy_from_slice(&entry);
    h.sequence += 1;
    h.log_guid = g;
    f[HEADER_OFFSETS[slot] as usize..][..4096].copy_from_slice(&h.encode());
    std::fs::write(&b, f).unwrap();
    let before = folder_digests(d.path());
    let o = vhdmerge(&["info", b.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("the file was truncated") && err.contains("log"),
        "{err}"
    );
    assert_eq!(folder_digests(d.path()), before);
}

/// `b` with a new current header, changed by `change`.
fn new_header(b: &Path, change: impl FnOnce(&mut vhdmerge::format::vhdx::header::Header)) {
    use vhdmerge::format::vhdx::HEADER_OFFSETS;
    let mut f = std::fs::read(b).unwrap();
    let (mut h, slot) = common::header_to_replace(&f);
    assert!(h.log_guid.is_nil());
    h.sequence += 1;
    change(&mut h);
    f[HEADER_OFFSETS[slot] as usize..][..4096].copy_from_slice(&h.encode());
    std::fs::write(b, f).unwrap();
}

/// `info` reads the chain whose top is `c`; `merge` is refused with
/// `needle`, naming b.vhdx, before the first write.
fn readable_not_writable(dir: &Path, c: &Path, needle: &str) {
    let before = folder_digests(dir);
    let o = vhdmerge(&["info", "--chain", c.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vhdmerge(&["merge", c.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("b.vhdx") && err.contains(needle),
        "{err}"
    );
    let after = folder_digests(dir);
    assert_eq!(after, before, "a refused merge wrote: {err}");
}

#[test]
fn a_log_in_the_header_section() {
    // A writer would start its log over the file identifier.
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    new_header(&b, |h| h.log_offset = 0);
    refused(d.path(), &c, "after the 1 MiB header section");
}

#[test]
fn an_ancestor_whose_log_lies_past_its_end() {
    // The log is empty, so the file reads; a merge would log its updates
    // past the end, where the blocks it allocates go.
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    let end = std::fs::metadata(&b)
        .unwrap()
        .len()
        .next_multiple_of(1 << 20);
    new_header(&b, |h| h.log_offset = end + (1 << 20));
    readable_not_writable(d.path(), &c, "can be read but not written");
}

#[test]
fn an_ancestor_whose_header_sequence_is_at_its_end() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    new_header(&b, |h| h.sequence = u64::MAX - 7);
    readable_not_writable(d.path(), &c, "leaves no room for updates");
}

#[test]
fn a_journal_that_belongs_to_other_files() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(["--quiet", "merge"])
        .arg(&c)
        .env("VHDMERGE_FAIL_AT", F::AfterBegin.to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let journal = vhdmerge::journal::path_for(&b);
    // Another pair of disks with the same names gets this journal.
    let other = tempfile::tempdir().unwrap();
    let (b2, _) = vhdx_chain(other.path());
    std::fs::copy(&journal, vhdmerge::journal::path_for(&b2)).unwrap();
    let before = folder_digests(other.path());
    let o = vhdmerge(&["recover", b2.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("the journal belongs to other files"),
        "{err}"
    );
    assert_eq!(folder_digests(other.path()), before);
}

/// Regression (found by tests/crash.rs): a rollback of a committed merge,
/// interrupted after the ancestor was cut back to its old length but before
/// its before-images were written, left a BAT pointing past the end; the
/// next recovery refused to open the file instead of finishing the rollback.
#[test]
fn regression_rollback_interrupted_after_truncation() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    let start = folder_digests(d.path());
    let run = |args: &[&str], fail: F| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
            .arg("--quiet")
            .args(args)
            .env("VHDMERGE_FAIL_AT", fail.to_string())
            .output()
            .unwrap()
    };
    assert!(
        !run(&["merge", c.to_str().unwrap()], F::AfterCommit)
            .status
            .success()
    );
    assert!(
        !run(
            &["recover", "--rollback", b.to_str().unwrap()],
            F::RecoverAfterRollbackMark
        )
        .status
        .success()
    );
    let journal = vhdmerge::journal::load(&vhdmerge::journal::path_for(&b)).unwrap();
    let Some(vhdmerge::journal::Record::Begin(begin)) = journal.records.first() else {
        panic!()
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(begin.files[0].length)
        .unwrap();
    ok(&["recover", b.to_str().unwrap()]);
    assert_eq!(folder_digests(d.path()), start);
}

/// Runs the binary as an unprivileged user when the tests run as root
/// (root ignores permission bits), after giving that user the folder.
fn run_unprivileged(dir: &Path, args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let mut cmd = if root {
        for p in std::iter::once(dir.to_path_buf())
            .chain(std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()))
        {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        }
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_vhdmerge"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
    };
    cmd.args(args).output().unwrap()
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn read_only_ancestor() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    set_mode(&b, 0o444);
    let before = folder_digests(d.path());
    let o = run_unprivileged(d.path(), &["merge", c.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("b.vhdx")
            && err.contains("cannot be opened for writing")
            && err.contains("chmod"),
        "{err}"
    );
    assert_eq!(folder_digests(d.path()), before, "something was written");
}

#[test]
fn folder_without_write_permission() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("disks");
    std::fs::create_dir(&sub).unwrap();
    let (_, c) = vhdx_chain(&sub);
    let before = folder_digests(&sub);
    // The folder belongs to the user but is read-only to it.
    let o = {
        set_mode(&sub, 0o555);
        let o = run_unprivileged(&sub, &["merge", c.to_str().unwrap()]);
        set_mode(&sub, 0o755);
        o
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("disks") && err.contains("folder is not writable"),
        "{err}"
    );
    assert_eq!(folder_digests(&sub), before, "something was written");
}

/// Starts `merge` paused after its first durable batch; `act` plays the
/// other program; the merge must then refuse to commit, naming the file
/// and what happened, and `recover` must roll it back.
fn interfered(act: impl FnOnce(&Path, &Path, &[u8]), needle: &str) -> PathBuf {
    let d = tempfile::tempdir().unwrap().keep();
    let (b, c) = vhdx_chain(&d);
    let b_before = std::fs::read(&b).unwrap();
    let flag = d.join("paused.flag");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(["--quiet", "merge", "--batch", "4K"])
        .arg(&c)
        .env("VHDMERGE_PAUSE_AT", F::MidApply.to_string())
        .env("VHDMERGE_PAUSE_FILE", &flag)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !flag.exists() {
        assert!(t.elapsed().as_secs() < 60, "the merge never paused");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    act(&b, &c, &b_before);
    std::fs::remove_file(&flag).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the merge went on");
    assert!(
        err.contains(needle) && err.contains("vhdmerge recover"),
        "{err}"
    );
    ok(&["recover", b.to_str().unwrap()]);
    d
}

#[test]
fn source_grown_by_another_program_during_a_merge() {
    let start = std::cell::RefCell::new(Vec::new());
    let d = interfered(
        |_, c, _| {
            // As a VM still running on the checkpoint would: the child grows.
            *start.borrow_mut() = folder_digests(c.parent().unwrap());
            let f = std::fs::OpenOptions::new().append(true).open(c).unwrap();
            f.write_all_at(&[1u8; 4096], std::fs::metadata(c).unwrap().len())
                .unwrap();
        },
        "changed size",
    );
    // Rolled back: the ancestor as it was, the child as the other program
    // left it, no journal.
    let now = folder_digests(&d);
    let was = start.borrow();
    let get = |v: &[(String, String)], n: &str| v.iter().find(|(k, _)| k == n).cloned();
    assert!(get(&now, "b.vhdx.vhdmerge-journal").is_none());
    let pristine = tempfile::tempdir().unwrap();
    vhdmerge::guid::set_seed(None);
    assert_eq!(
        digest_of(&d.join("b.vhdx")),
        {
            let (b, _) = vhdx_chain(pristine.path());
            digest_of(&b)
        },
        "the ancestor's contents changed"
    );
    assert_ne!(get(&now, "c.avhdx"), get(&was, "c.avhdx"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn ancestor_replaced_by_another_program_during_a_merge() {
    let copy = std::cell::RefCell::new(Vec::new());
    let d = interfered(
        |b, _, before| {
            // A restore tool puts the ancestor back from a backup taken
            // before the merge: a new file (new inode) at the same path.
            let tmp = b.with_extension("restored");
            std::fs::write(&tmp, before).unwrap();
            *copy.borrow_mut() = before.to_vec();
            std::fs::rename(&tmp, b).unwrap();
        },
        "replaced by another file",
    );
    assert!(!d.join("b.vhdx.vhdmerge-journal").exists());
    // The restored file is as the restore tool left it.
    assert!(std::fs::read(d.join("b.vhdx")).unwrap() == *copy.borrow());
    std::fs::remove_dir_all(&d).unwrap();
}

/// A parent locator can point anywhere; the path it names is only opened
/// when it is a regular file. A device (through a symlink) or a FIFO in the
/// parent's place is passed over (a FIFO opened for reading would block
/// forever), and the error says where the parent was looked for.
#[test]
fn locator_into_a_device_or_a_fifo_is_not_followed() {
    for kind in ["device", "fifo", "folder"] {
        let d = tempfile::tempdir().unwrap();
        let (b, c) = vhdx_chain(d.path());
        std::fs::remove_file(&b).unwrap();
        match kind {
            "device" => std::os::unix::fs::symlink("/dev/zero", &b).unwrap(),
            "fifo" => assert!(
                std::process::Command::new("mkfifo")
                    .arg(&b)
                    .status()
                    .unwrap()
                    .success()
            ),
            _ => std::fs::create_dir(&b).unwrap(),
        }
        let o = std::process::Command::new("timeout")
            .args(["20", env!("CARGO_BIN_EXE_vhdmerge"), "info"])
            .arg(&c)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{kind}: {err}");
        assert!(err.contains("b.vhdx"), "{kind}: {err}");
    }
}

/// A chain whose merge was stopped mid-apply (`--batch 4K`, so the journal
/// holds Begin, before-images and Copy records): (folder, ancestor).
fn interrupted_merge() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = vhdx_chain(d.path());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(["--quiet", "merge", "--batch", "4K"])
        .arg(&c)
        .env("VHDMERGE_FAIL_AT", F::MidApply.to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    (d, b)
}

/// `recover` on the folder fails with `needle` and changes nothing.
fn recover_refused(dir: &Path, b: &Path, needle: &str) {
    let before = folder_digests(dir);
    let o = vhdmerge(&["recover", b.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(needle), "{err}");
    assert_eq!(folder_digests(dir), before, "recover wrote something");
}

/// Journal frames: magic (4), version (2), kind (2), sequence (8),
/// length (4), CRC-32C (4) of the 20 header bytes and the payload.
fn frames(j: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at + 24 <= j.len() {
        let len = u32::from_le_bytes(j[at + 16..at + 20].try_into().unwrap()) as usize;
        v.push((at, 24 + len));
        at += 24 + len;
    }
    v
}

#[test]
fn a_journal_written_by_a_newer_version() {
    let (d, b) = interrupted_merge();
    let jp = vhdmerge::journal::path_for(&b);
    let mut j = std::fs::read(&jp).unwrap();
    // Every frame says the next version, with its checksum made right.
    let newer = vhdmerge::journal::VERSION + 1;
    for (at, n) in frames(&j) {
        j[at + 4..at + 6].copy_from_slice(&newer.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&j[at..at + 20]), &j[at + 24..at + n]);
        j[at + 20..at + 24].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&jp, &j).unwrap();
    recover_refused(d.path(), &b, "newer vhdmerge");
}

#[test]
fn a_journal_corrupt_before_its_tail() {
    let (d, b) = interrupted_merge();
    let jp = vhdmerge::journal::path_for(&b);
    let mut j = std::fs::read(&jp).unwrap();
    let f = frames(&j);
    assert!(f.len() >= 3, "the journal has {} records", f.len());
    // One byte of the second record's payload: valid records follow it.
    let (at, _) = f[1];
    j[at + 30] ^= 0x40;
    std::fs::write(&jp, &j).unwrap();
    recover_refused(d.path(), &b, "corrupted, not torn");
}
