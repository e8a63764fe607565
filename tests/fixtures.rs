//! recovery-fixtures/: journals frozen at distinct crash points. They are
//! the compatibility contract of journal formats 1 (01-15) and 2 (16 on):
//! every version of vhdmerge must recover them to the recorded files, or,
//! for a resumed merge, to disks that read as recorded (add fixtures with
//! `cargo build && cargo run --example make_recovery_fixtures`).

mod common;

use std::path::Path;

fn digests(dir: &Path) -> serde_json::Value {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let mut m = serde_json::Map::new();
    for p in names {
        m.insert(
            p.file_name().unwrap().to_string_lossy().to_string(),
            blake3::hash(&std::fs::read(&p).unwrap())
                .to_hex()
                .to_string()
                .into(),
        );
    }
    m.into()
}

fn unpack(fixture: &Path, to: &Path) {
    for e in std::fs::read_dir(fixture).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        if let Some(base) = n.strip_suffix(".gz") {
            let mut r = flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap());
            let mut w = std::fs::File::create(to.join(base)).unwrap();
            std::io::copy(&mut r, &mut w).unwrap();
        }
    }
}

#[test]
fn every_recovery_fixture_recovers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recovery-fixtures");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 12, "only {} fixtures", dirs.len());
    for d in &dirs {
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap())
                .unwrap();
        let ancestor = expected["ancestor"].as_str().unwrap();
        for (key, rollback) in [("after_recover", false), ("after_rollback", true)] {
            let want = &expected[key];
            let t = tempfile::tempdir().unwrap();
            unpack(d, t.path());
            let a = t.path().join(ancestor);
            let mut args = vec!["recover", "--json", a.to_str().unwrap()];
            if rollback {
                args.push("--rollback");
            }
            let o = common::vhdmerge(&args);
            if want.get("refused").is_some() {
                assert!(
                    !o.status.success(),
                    "{}: {key} should be refused",
                    d.display()
                );
                continue;
            }
            assert!(
                o.status.success(),
                "{}: {key}: {}",
                d.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(r["outcome"], want["outcome"], "{}: {key}", d.display());
            if want.get("resumed").is_some() {
                let got = serde_json::to_value(common::folder_views(t.path())).unwrap();
                assert_eq!(&got, &want["views"], "{}: {key}", d.display());
                assert_eq!(&got, &expected["uninterrupted_views"], "{}", d.display());
                let names: Vec<&String> = expected["uninterrupted_merge"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .collect();
                let now = digests(t.path());
                let have: Vec<&String> = now.as_object().unwrap().keys().collect();
                assert_eq!(have, names, "{}: {key}: files", d.display());
                continue;
            }
            let got = digests(t.path());
            assert_eq!(&got, &want["files"], "{}: {key}", d.display());
            assert!(
                got == expected["before_merge"] || got == expected["uninterrupted_merge"],
                "{}: {key} is neither the start nor the finished merge",
                d.display()
            );
        }
        eprintln!("ok {}", d.file_name().unwrap().to_string_lossy());
    }
}
