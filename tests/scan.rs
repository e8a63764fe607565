//! `vhdmerge scan` on folders laid out as Hyper-V leaves them: the tree,
//! the findings and their commands, and the plan, which run in order must
//! consolidate the folder with every leaf reading as before. Every scan
//! is checked to leave every byte of every file as it was.

mod common;

use vhdmerge::failpoint::Failpoint as F;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, corpus, materialize, ok, vhdmerge};
use serde_json::Value;
use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};

/// SHA-256 of every file under `dir`, by path.
fn sha256_tree(dir: &Path) -> BTreeMap<String, String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find \"$1\" -type f -exec sha256sum {} +")
        .arg("sh")
        .arg(dir)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (h, p) = l.split_once("  ").expect("sha256sum line");
            (p.to_string(), h.to_string())
        })
        .collect()
}

/// Scans `dirs` with `extra` flags, checks that nothing changed, and
/// returns the JSON report and the exit code.
fn scan(dirs: &[&Path], extra: &[&str]) -> (Value, i32) {
    let before: Vec<_> = dirs.iter().map(|d| sha256_tree(d)).collect();
    let mut args = vec!["scan", "--json"];
    args.extend(extra);
    let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let o = vhdmerge(&args);
    let code = o.status.code().expect("exit code");
    assert!(
        code == 0 || code == 2,
        "scan failed ({code}): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (d, b) in dirs.iter().zip(before) {
        assert_eq!(
            sha256_tree(d),
            b,
            "scan changed a file under {}",
            d.display()
        );
    }
    let v = serde_json::from_slice(&o.stdout).expect("scan --json is JSON");
    (v, code)
}

fn name(v: &Value) -> String {
    Path::new(v.as_str().expect("a path"))
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string()
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v.as_array().unwrap().iter().map(name).collect();
    n.sort();
    n
}

/// (kind, file name) of every finding.
fn kinds(v: &Value) -> Vec<(String, String)> {
    let mut k: Vec<_> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["kind"].as_str().unwrap().to_string(), name(&f["path"])))
        .collect();
    k.sort();
    k
}

fn finding<'a>(v: &'a Value, kind: &str) -> &'a Value {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} finding in {v:#}"))
}

fn file<'a>(v: &'a Value, file_name: &str) -> &'a Value {
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| name(&f["path"]) == file_name)
        .unwrap_or_else(|| panic!("no file {file_name} in {v:#}"))
}

fn runnable(v: &Value) -> Vec<&Value> {
    v["plan"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["blocked_by"].as_array().unwrap().is_empty())
        .collect()
}

fn commands(v: &Value) -> Vec<String> {
    runnable(v)
        .iter()
        .map(|s| s["command"].as_str().unwrap().to_string())
        .collect()
}

/// Runs the plan's runnable steps in order, scanning again after each
/// round (a recover changes what the rest of the plan is), until none is
/// left. Returns the last report.
fn consolidate(dir: &Path) -> Value {
    for _ in 0..4 {
        let (v, _) = scan(&[dir], &[]);
        let steps = runnable(&v);
        if steps.is_empty() {
            return v;
        }
        for s in steps {
            let args: Vec<&str> = s["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            ok(&args);
        }
    }
    panic!("the plan did not converge in 4 rounds");
}

/// Leaf file name → content digest, from `scan --hash`.
fn leaf_digests(dir: &Path) -> BTreeMap<String, String> {
    let (v, _) = scan(&[dir], &["--hash"]);
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["leaf"] == true && f["content_digest"].is_string())
        .map(|f| {
            (
                name(&f["path"]),
                f["content_digest"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn new_base(path: &Path, rng: &mut Rng) {
    if path.extension().is_some_and(|e| e == "vhd") {
        let o = VhdOptions {
            size: 64 << 20,
            ..Default::default()
        };
        create::create_vhd(path, &o).unwrap();
    } else {
        let o = VhdxOptions {
            virtual_size: 64 << 20,
            block_size: 4 << 20,
            ..Default::default()
        };
        create::create_vhdx(path, &o).unwrap();
    }
    write(path, rng, &[(0, 8 << 20)]);
}

/// Writes random bytes at (offset, length) pieces through `path`'s chain.
fn write(path: &Path, rng: &mut Rng, pieces: &[(u64, usize)]) {
    let mut w = common::open_writable(path);
    for &(off, len) in pieces {
        w.write(off, &rng.bytes(len)).unwrap();
    }
    w.close().unwrap();
}

/// A child of `parent` holding a few scattered writes.
fn new_child(path: &Path, parent: &Path, rng: &mut Rng) {
    create::create_child(path, parent, Some(1 << 20)).unwrap();
    let at = rng.below(48) << 20;
    write(path, rng, &[(at + 512, 1 << 20), (at + (5 << 20), 4096)]);
}

#[test]
fn a_linear_chain_is_one_tree_and_one_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(1);
    new_base(&d.join("vm.vhdx"), &mut rng);
    let guid = "Snap_6F1C0B2E-2A4B-4C8D-9E0F-1A2B3C4D5E6F";
    new_child(
        &d.join(format!("{guid}.avhdx")),
        &d.join("vm.vhdx"),
        &mut rng,
    );
    new_child(
        &d.join("vm_CUR.avhdx"),
        &d.join(format!("{guid}.avhdx")),
        &mut rng,
    );
    std::fs::write(d.join("notes.txt"), "not a disk").unwrap();
    let views = leaf_digests(d);
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["trees"].as_array().unwrap().len(), 1);
    assert_eq!(name(&v["trees"][0]["root"]), "vm.vhdx");
    assert_eq!(names(&v["trees"][0]["leaves"]), ["vm_CUR.avhdx"]);
    assert!(kinds(&v).is_empty(), "{v:#}");
    let snap = file(&v, &format!("{guid}.avhdx"));
    assert_eq!(snap["link"]["status"], "ok");
    assert!(snap["merge_into_parent"]["bytes"].as_u64().unwrap() > 1 << 20);
    let into = d.join("vm.vhdx");
    let cur = d.join("vm_CUR.avhdx");
    assert_eq!(
        commands(&v),
        [format!(
            "vhdmerge merge {} --into {}",
            cur.display(),
            into.display()
        )]
    );
    let last = consolidate(d);
    assert_eq!(last["files"].as_array().unwrap().len(), 1, "{last:#}");
    assert_eq!(
        leaf_digests(d)["vm.vhdx"],
        views["vm_CUR.avhdx"],
        "the consolidated base must read as the leaf did"
    );
}

#[test]
fn a_branched_tree_merges_what_is_safe_and_marks_the_branch_point() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(2);
    new_base(&d.join("base.vhd"), &mut rng);
    new_child(&d.join("s1.avhd"), &d.join("base.vhd"), &mut rng);
    new_child(&d.join("a.avhd"), &d.join("s1.avhd"), &mut rng);
    new_child(&d.join("b.avhd"), &d.join("s1.avhd"), &mut rng);
    new_child(&d.join("b2.avhd"), &d.join("b.avhd"), &mut rng);
    let before = leaf_digests(d);
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 0);
    assert_eq!(names(&v["trees"][0]["leaves"]), ["a.avhd", "b2.avhd"]);
    assert_eq!(names(&v["trees"][0]["branches"]), ["s1.avhd"]);
    assert_eq!(kinds(&v), [("branches".to_string(), "s1.avhd".to_string())]);
    let mut blocked: Vec<_> = v["plan"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["blocked_by"].as_array().unwrap().is_empty())
        .map(|s| name(&s["merges"][0]))
        .collect();
    blocked.sort();
    assert_eq!(blocked, ["a.avhd", "b.avhd"], "{v:#}");
    let last = consolidate(d);
    // What is left is the decision: the base with its two branches.
    assert_eq!(names(&last["trees"][0]["leaves"]), ["a.avhd", "b.avhd"]);
    assert_eq!(last["files"].as_array().unwrap().len(), 3);
    let after = leaf_digests(d);
    assert_eq!(after["a.avhd"], before["a.avhd"]);
    assert_eq!(after["b.avhd"], before["b2.avhd"]);
    // Text output draws the tree.
    let text = ok(&["scan", d.to_str().unwrap()]);
    assert!(
        text.contains("├── a.avhd") && text.contains("└── b.avhd"),
        "{text}"
    );
    assert!(text.contains("blocked: vhdmerge merge"), "{text}");
}

#[test]
fn an_orphan_left_by_a_merge_is_flagged_with_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(3);
    new_base(&d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("snap.avhdx"), &d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("cur.avhdx"), &d.join("snap.avhdx"), &mut rng);
    let views = leaf_digests(d);
    // A merge of the checkpoint that left its file behind, as a failed
    // Hyper-V merge does.
    ok(&["merge", "--keep", d.join("snap.avhdx").to_str().unwrap()]);
    std::fs::rename(
        d.join("snap.avhdx.merged"),
        d.join("snap_0A1B2C3D-0000-4000-8000-000000000001.avhdx"),
    )
    .unwrap();
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2, "a broken link is an error");
    let orphan = "snap_0A1B2C3D-0000-4000-8000-000000000001.avhdx";
    assert_eq!(
        kinds(&v),
        [
            ("parent_wrong_identity".to_string(), orphan.to_string()),
            ("possibly_orphaned".to_string(), orphan.to_string())
        ]
    );
    let f = finding(&v, "possibly_orphaned");
    assert!(
        f["message"].as_str().unwrap().contains("wrong identity"),
        "{f:#}"
    );
    let rm = f["commands"][1].as_str().unwrap();
    assert!(rm.starts_with("rm ") && rm.contains(orphan), "{rm}");
    assert!(file(&v, orphan)["possibly_orphaned"].is_string());
    assert_eq!(v["trees"].as_array().unwrap().len(), 2);
    consolidate(d);
    std::fs::remove_file(d.join(orphan)).unwrap();
    let (v, code) = scan(&[d], &[]);
    assert_eq!((code, kinds(&v)), (0, vec![]), "{v:#}");
    assert_eq!(leaf_digests(d)["vm.vhdx"], views["cur.avhdx"]);
}

#[test]
fn a_kept_vhd_merge_leaves_a_possible_orphan_named_merged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(4);
    new_base(&d.join("vm.vhd"), &mut rng);
    new_child(&d.join("cur.avhd"), &d.join("vm.vhd"), &mut rng);
    ok(&["merge", "--keep", d.join("cur.avhd").to_str().unwrap()]);
    let (v, _) = scan(&[d], &[]);
    let f = finding(&v, "possibly_orphaned");
    assert_eq!(name(&f["path"]), "cur.avhd.merged");
    assert!(f["message"].as_str().unwrap().contains("--keep"), "{f:#}");
}

#[test]
fn a_renamed_parent_is_found_by_identity_and_named_with_parent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(5);
    new_base(&d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("cur.avhdx"), &d.join("vm.vhdx"), &mut rng);
    let views = leaf_digests(d);
    std::fs::rename(d.join("vm.vhdx"), d.join("vm-renamed.vhdx")).unwrap();
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2);
    assert_eq!(
        kinds(&v),
        [("parent_missing".to_string(), "cur.avhdx".to_string())]
    );
    let f = finding(&v, "parent_missing");
    let cmds: Vec<&str> = f["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let renamed = d.join("vm-renamed.vhdx");
    assert!(
        cmds.iter().any(|c| c.starts_with("vhdmerge merge")
            && c.ends_with(&format!("--parent {}", renamed.display()))),
        "{cmds:?}"
    );
    assert_eq!(
        name(&file(&v, "cur.avhdx")["link"]["use_parent"]),
        "vm-renamed.vhdx"
    );
    assert_eq!(names(&v["trees"][0]["leaves"]), ["cur.avhdx"]);
    consolidate(d);
    let after = leaf_digests(d);
    assert_eq!(after.len(), 1);
    assert_eq!(after["vm-renamed.vhdx"], views["cur.avhdx"]);
}

/// `merge` opens the whole chain and `--parent` names only the child's own
/// parent: a broken link in the middle is merged away first, on its own.
#[test]
fn a_renamed_parent_in_the_middle_is_merged_away_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(11);
    new_base(&d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("mid.avhdx"), &d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("snap.avhdx"), &d.join("mid.avhdx"), &mut rng);
    new_child(&d.join("cur.avhdx"), &d.join("snap.avhdx"), &mut rng);
    let views = leaf_digests(d);
    std::fs::rename(d.join("mid.avhdx"), d.join("mid-old.avhdx")).unwrap();
    let (v, _) = scan(&[d], &[]);
    let (snap, mid) = (d.join("snap.avhdx"), d.join("mid-old.avhdx"));
    let (cur, vm) = (d.join("cur.avhdx"), d.join("vm.vhdx"));
    assert_eq!(
        commands(&v),
        [
            format!(
                "vhdmerge merge {} --parent {}",
                snap.display(),
                mid.display()
            ),
            format!("vhdmerge merge {} --into {}", cur.display(), vm.display()),
        ]
    );
    let last = consolidate(d);
    assert_eq!(last["files"].as_array().unwrap().len(), 1, "{last:#}");
    assert_eq!(leaf_digests(d)["vm.vhdx"], views["cur.avhdx"]);
}

#[test]
fn a_parent_found_only_by_file_name_is_a_warning_and_still_merges() {
    let dir = tempfile::tempdir().unwrap();
    let (made, d) = (dir.path().join("made"), dir.path().join("moved"));
    std::fs::create_dir_all(made.join("sub")).unwrap();
    std::fs::create_dir_all(&d).unwrap();
    let mut rng = Rng(6);
    new_base(&made.join("vm.vhdx"), &mut rng);
    new_child(&made.join("sub/cur.avhdx"), &made.join("vm.vhdx"), &mut rng);
    std::fs::rename(made.join("vm.vhdx"), d.join("vm.vhdx")).unwrap();
    std::fs::rename(made.join("sub/cur.avhdx"), d.join("cur.avhdx")).unwrap();
    let views = leaf_digests(&d);
    let (v, code) = scan(&[&d], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        kinds(&v),
        [("parent_by_file_name".to_string(), "cur.avhdx".to_string())]
    );
    assert_eq!(file(&v, "cur.avhdx")["link"]["status"], "by_file_name");
    consolidate(&d);
    assert_eq!(leaf_digests(&d)["vm.vhdx"], views["cur.avhdx"]);
}

#[test]
fn a_parent_with_the_wrong_identity_points_at_the_right_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(7);
    new_base(&d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("cur.avhdx"), &d.join("vm.vhdx"), &mut rng);
    let views = leaf_digests(d);
    std::fs::copy(d.join("vm.vhdx"), d.join("vm-backup.vhdx")).unwrap();
    // Someone started a VM on the parent: it is another disk now.
    write(&d.join("vm.vhdx"), &mut rng, &[(0, 4096)]);
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2);
    let f = finding(&v, "parent_wrong_identity");
    assert_eq!(name(&f["path"]), "cur.avhdx");
    let msg = f["message"].as_str().unwrap();
    assert!(
        msg.contains("vm-backup.vhdx") && msg.contains("--parent"),
        "{msg}"
    );
    let plan = commands(&v);
    assert_eq!(plan.len(), 1, "{plan:?}");
    assert!(plan[0].contains("--parent") && plan[0].contains("vm-backup.vhdx"));
    consolidate(d);
    let after = leaf_digests(d);
    assert_eq!(after["vm-backup.vhdx"], views["cur.avhdx"]);
    assert!(after.contains_key("vm.vhdx"));
}

#[test]
fn an_interrupted_merge_is_pending_and_recover_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(8);
    new_base(&d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("snap.avhdx"), &d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("cur.avhdx"), &d.join("snap.avhdx"), &mut rng);
    write(
        &d.join("cur.avhdx"),
        &mut rng,
        &[(20 << 20, 2 << 20), (40 << 20, 1 << 20)],
    );
    let views = leaf_digests(d);
    let o = Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .args(["--quiet", "merge", "--checkpoint-every", "256K"])
        .arg(d.join("cur.avhdx"))
        .env("VHDMERGE_FAIL_AT", F::MidApply.to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2);
    let j = &v["journals"][0];
    assert_eq!(name(&j["path"]), "snap.avhdx.vhdmerge-journal");
    assert_eq!(name(&j["ancestor"]), "snap.avhdx");
    assert!(
        j["state"].as_str().unwrap().starts_with("applying"),
        "{j:#}"
    );
    let f = finding(&v, "pending_merge");
    assert!(
        f["commands"][0]
            .as_str()
            .unwrap()
            .starts_with("vhdmerge recover ")
    );
    assert_eq!(v["plan"][0]["action"], "recover");
    assert!(
        file(&v, "cur.avhdx")["pending_journal"].is_string(),
        "{v:#}"
    );
    // Shown where it was, under the file it is being merged into, and
    // never hashed half merged.
    assert_eq!(name(&file(&v, "cur.avhdx")["parent"]), "snap.avhdx");
    let (h, _) = scan(&[d], &["--hash"]);
    assert!(file(&h, "cur.avhdx")["content_digest"].is_null());
    let text = ok_code(&["scan", d.to_str().unwrap()], 2);
    assert!(text.contains("1. vhdmerge recover"), "{text}");
    let last = consolidate(d);
    assert_eq!(last["files"].as_array().unwrap().len(), 1, "{last:#}");
    assert_eq!(leaf_digests(d)["vm.vhdx"], views["cur.avhdx"]);
}

fn ok_code(args: &[&str], want: i32) -> String {
    let o = vhdmerge(args);
    assert_eq!(o.status.code(), Some(want), "{args:?}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn damaged_and_foreign_files_are_findings_and_the_scan_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(9);
    new_base(&d.join("vm.vhdx"), &mut rng);
    std::fs::write(d.join("empty.avhdx"), b"").unwrap();
    // A VHDX signature over garbage: the headers cannot be read.
    let mut junk = b"vhdxfile".to_vec();
    junk.extend(rng.bytes(1 << 20));
    std::fs::write(d.join("junk.vhdx"), junk).unwrap();
    // A VHD by content with another extension is still found.
    new_base(&d.join("disk.vhd"), &mut rng);
    std::fs::rename(d.join("disk.vhd"), d.join("disk.img")).unwrap();
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2);
    let k = kinds(&v);
    assert!(
        k.contains(&("not_a_disk".into(), "empty.avhdx".into())),
        "{k:?}"
    );
    assert!(k.contains(&("corrupt".into(), "junk.vhdx".into())), "{k:?}");
    assert_eq!(file(&v, "disk.img")["format"], "vhd");
    assert_eq!(file(&v, "vm.vhdx")["format"], "vhdx");
}

#[test]
fn a_chain_that_mixes_vhd_and_vhdx_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(12);
    new_base(&d.join("vm.vhdx"), &mut rng);
    new_child(&d.join("cur.avhdx"), &d.join("vm.vhdx"), &mut rng);
    // A VHD put in the parent's place under its name.
    std::fs::remove_file(d.join("vm.vhdx")).unwrap();
    new_base(&d.join("other.vhd"), &mut rng);
    std::fs::rename(d.join("other.vhd"), d.join("vm.vhdx")).unwrap();
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2);
    let f = finding(&v, "mixed_formats");
    assert!(
        f["message"].as_str().unwrap().contains("mix VHD and VHDX"),
        "{f:#}"
    );
    finding(&v, "possibly_orphaned");
    assert_eq!(file(&v, "cur.avhdx")["link"]["status"], "mismatch");
}

#[test]
fn a_loop_of_parents_is_named_and_the_scan_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(13);
    new_base(&d.join("vm.vhdx"), &mut rng);
    let c = d.join("cur.avhdx");
    new_child(&c, &d.join("vm.vhdx"), &mut rng);
    // Point the child at itself, with its own DataWriteGuid as linkage.
    let mut disk = vhdmerge::disk::vhdx::VhdxDisk::open(&c, true).unwrap();
    let mut loc = disk.locator.clone().unwrap();
    let own = vhdmerge::format::vhdx::metadata::braced(&disk.header().data_write_guid);
    loc.set("parent_linkage", &own);
    loc.set("relative_path", ".\\cur.avhdx");
    disk.set_locator(&loc).unwrap();
    vhdmerge::disk::Layer::close(&mut disk).unwrap();
    drop(disk);
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 2);
    let f = finding(&v, "loop");
    assert_eq!(name(&f["path"]), "cur.avhdx");
    assert_eq!(file(&v, "cur.avhdx")["link"]["status"], "loop");
    assert!(runnable(&v).is_empty(), "{v:#}");
}

#[test]
fn subfolders_are_scanned_with_recursive() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let snaps = d.join("Snapshots/3C1B1A4E-0000-4000-8000-00000000000A");
    std::fs::create_dir_all(&snaps).unwrap();
    let mut rng = Rng(10);
    new_base(&d.join("vm.vhd"), &mut rng);
    new_child(&snaps.join("vm_1.avhd"), &d.join("vm.vhd"), &mut rng);
    let (flat, _) = scan(&[d], &[]);
    assert_eq!(flat["files"].as_array().unwrap().len(), 1);
    let (v, code) = scan(&[d], &["--recursive"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(names(&v["trees"][0]["leaves"]), ["vm_1.avhd"]);
    assert_eq!(commands(&v).len(), 1);
}

#[test]
fn a_dirty_log_is_reported_and_left_alone() {
    let Some(corpus) = corpus() else { return };
    let dir = tempfile::tempdir().unwrap();
    materialize(&corpus, "DiscUtils/vhdx-log-replay.vhdx.gz", dir.path());
    let (v, _) = scan(&[dir.path()], &["--check"]);
    let f = finding(&v, "dirty_log");
    assert_eq!(name(&f["path"]), "vhdx-log-replay.vhdx");
    assert!(file(&v, "vhdx-log-replay.vhdx")["unreplayed_log_entries"].as_u64() > Some(0));
}

/// The real images: in place (read-only, nothing changes) and all
/// decompressed into one folder, with `--check` and `--hash`. Every
/// chain of EXPECTED.tsv is linked, and each leaf's digest is what
/// `vhdmerge hash` says of it.
#[test]
fn the_real_images_scan_as_their_chains() {
    let Some(corpus) = corpus() else { return };
    let (v, _) = scan(&[&corpus.join("dfvfs")], &["--hash"]);
    // Its locators name a Windows path; the file name finds the parent.
    assert_eq!(
        file(&v, "image-differential.vhd")["link"]["status"],
        "by_file_name"
    );
    assert!(file(&v, "image-differential.vhd")["content_digest"].is_string());
    assert_eq!(
        file(&v, "fat-differential.vhd")["link"]["status"],
        "missing"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut leaves = Vec::new();
    for e in common::expected(&corpus) {
        let paths: Vec<PathBuf> = e
            .chain
            .iter()
            .map(|r| materialize(&corpus, r, dir.path()))
            .collect();
        leaves.push(paths[0].clone());
    }
    let (v, _) = scan(&[dir.path()], &["--hash", "--check"]);
    for e in common::expected(&corpus) {
        let top = Path::new(&e.chain[0])
            .file_name()
            .unwrap()
            .to_string_lossy();
        let top = top.trim_end_matches(".gz").trim_end_matches(".bz2");
        let f = file(&v, top);
        if e.chain.len() > 1 {
            assert!(
                f["link"]["status"] == "ok" || f["link"]["status"] == "by_file_name",
                "{top}: {f:#}"
            );
        }
    }
    for leaf in leaves {
        let n = leaf.file_name().unwrap().to_string_lossy().to_string();
        if file(&v, &n)["leaf"] != true {
            continue; // also the parent of another chain
        }
        let want = ok(&["hash", leaf.to_str().unwrap()]);
        let want = want.split_whitespace().next().unwrap();
        assert_eq!(file(&v, &n)["content_digest"], want, "{n}");
    }
}

/// An image file left without its journal (a crash between deleting the
/// two) is named, not taken for a disk even when it starts like one, and
/// the `recover` the finding names deletes it.
#[test]
fn a_leftover_image_file_is_a_warning_that_recover_clears() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(10);
    new_base(&d.join("vm.vhdx"), &mut rng);
    let images = d.join("vm.vhdx.vhdmerge-journal.images");
    // Cloned pages of the base, its file identifier among them.
    std::fs::copy(d.join("vm.vhdx"), &images).unwrap();
    let (v, code) = scan(&[d], &[]);
    assert_eq!(code, 0, "{v:#}");
    let f = finding(&v, "stale_journal_images");
    assert_eq!(name(&f["path"]), "vm.vhdx.vhdmerge-journal.images");
    let files: Vec<String> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| name(&f["path"]))
        .collect();
    assert_eq!(files, vec!["vm.vhdx".to_string()]);
    let cmd = f["commands"][0].as_str().unwrap().to_string();
    assert!(cmd.starts_with("vhdmerge recover "), "{cmd}");
    ok_code(&["recover", d.join("vm.vhdx").to_str().unwrap()], 0);
    assert!(!images.exists());
    let (v, _) = scan(&[d], &[]);
    assert!(kinds(&v).is_empty(), "{v:#}");
}
