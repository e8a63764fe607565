//! Every image and chain of the real-image corpus exports to exactly the
//! virtual size and BLAKE3 that independent readers determined.

mod common;

use common::*;

#[test]
fn real_images_export_to_expected_digests() {
    let Some(corpus) = corpus() else { return };
    let rows = expected(&corpus);
    assert!(rows.len() >= 21, "EXPECTED.tsv has {} rows", rows.len());
    let mut checked = 0;
    for row in &rows {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = row
            .chain
            .iter()
            .map(|r| materialize(&corpus, r, dir.path()))
            .collect();
        let top = paths[0].to_str().unwrap();
        let info = ok(&["info", "--chain", "--json", top]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            v["chain_depth"].as_u64().unwrap() as usize,
            row.chain.len(),
            "{}",
            row.chain[0]
        );
        assert_eq!(
            v["levels"][0]["virtual_size"].as_u64().unwrap(),
            row.virtual_size,
            "{}",
            row.chain[0]
        );
        let out = dir.path().join("export.raw");
        ok(&["export", top, out.to_str().unwrap()]);
        assert_eq!(
            std::fs::metadata(&out).unwrap().len(),
            row.virtual_size,
            "{}",
            row.chain[0]
        );
        assert_eq!(blake3_file(&out), row.blake3, "export of {}", row.chain[0]);
        let flat = ok(&["hash", "--flat", top]);
        assert!(
            flat.starts_with(&row.blake3),
            "hash --flat of {}: {flat}",
            row.chain[0]
        );
        eprintln!("ok {}", row.chain.join(" <- "));
        checked += 1;
    }
    eprintln!("{checked} images and chains matched EXPECTED.tsv");
}

#[test]
fn bad_checksums_warn_on_read_and_refuse_writes() {
    let Some(corpus) = corpus() else { return };
    let dir = tempfile::tempdir().unwrap();
    for name in ["dfvfs/image.vhd", "dfvfs/image-differential.vhd"] {
        materialize(&corpus, name, dir.path());
    }
    for name in ["image.vhd", "image-differential.vhd"] {
        let p = dir.path().join(name);
        let o = vhdmerge(&["info", p.to_str().unwrap()]);
        assert!(o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("wrong checksum"), "{name}: {err}");
        let before = std::fs::read(&p).unwrap();
        let mut layer = vhdmerge::disk::open_layer(&p, true).unwrap();
        let e = layer.write(0, &[1u8; 512]).unwrap_err();
        assert!(
            e.to_string().contains("refusing to write") && e.to_string().contains("checksum"),
            "{e}"
        );
        drop(layer);
        assert_eq!(std::fs::read(&p).unwrap(), before, "{name} was modified");
    }
}

#[test]
fn dirty_log_is_replayed_in_memory_without_touching_the_file() {
    let Some(corpus) = corpus() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = materialize(&corpus, "DiscUtils/vhdx-log-replay.vhdx.gz", dir.path());
    let before = std::fs::read(&p).unwrap();
    let info = ok(&["info", "--json", p.to_str().unwrap()]);
    assert!(info.contains("replayed_in_memory"), "{info}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // A writable open replays on disk and clears the LogGuid.
    drop(vhdmerge::disk::open_layer(&p, true).unwrap());
    let info = ok(&["info", "--json", p.to_str().unwrap()]);
    assert!(info.contains("\"log\": \"empty\""), "{info}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["levels"][0]["details"]["log_guid"],
        "00000000-0000-0000-0000-000000000000"
    );
    let out = dir.path().join("x.raw");
    ok(&["export", p.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(
        blake3_file(&out),
        "de5d8b204406e2f9f98ced60dd26eed31c3aefef00d1803c3a133ff6fc2f7ec2"
    );
}
