//! Digests, manifests and the structural check.

mod common;

use std::path::Path;

use common::*;
use vhdmerge::disk::Extent;
use vhdmerge::disk::create::{self};

fn content(path: &Path) -> String {
    let out = ok(&["hash", path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

/// Copies the guest-visible bytes of `raw` into a new disk at `path`.
fn fill_from_raw(raw: &Path, path: &Path) {
    let data = std::fs::read(raw).unwrap();
    let mut c = common::open_writable(path);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            c.write((i as u64) << 20, chunk).unwrap();
        }
    }
    c.close().unwrap();
}

#[test]
fn content_digest_ignores_format_block_size_and_chain_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let size = 40u64 << 20;
    let base = dir.path().join("base.vhdx");
    common::new_vhdx(&base, size, 2 << 20);
    let child = dir.path().join("child.avhdx");
    {
        let mut c = common::open_writable(&base);
        c.write(0, &rng.bytes(3 << 20)).unwrap();
        c.close().unwrap();
    }
    create::create_child(&child, &base, Some(1 << 20)).unwrap();
    {
        let mut c = common::open_writable(&child);
        c.write(1_000_003, &rng.bytes(100_000)).unwrap();
        c.write(30 << 20, &rng.bytes(777_777)).unwrap();
        c.close().unwrap();
    }
    let raw = dir.path().join("export.raw");
    ok(&["export", child.to_str().unwrap(), raw.to_str().unwrap()]);
    let want = content(&child);
    assert_eq!(content(&raw), want, "raw export");
    let copies = [
        ("v1m.vhdx", 1u64 << 20),
        ("v256m.vhdx", 256 << 20),
        ("d2m.vhd", 2 << 20),
        ("d512k.vhd", 512 << 10),
    ];
    for (name, bs) in copies {
        let p = dir.path().join(name);
        let o = create::CreateOptions {
            size: Some(size),
            block_size: Some(bs),
            ..Default::default()
        };
        create::create(&p, &o).unwrap();
        fill_from_raw(&raw, &p);
        assert_eq!(content(&p), want, "{name}");
    }
    // The flat digest of the chain is b3sum of its export.
    let flat = ok(&["hash", "--flat", child.to_str().unwrap()]);
    assert!(flat.starts_with(&blake3_file(&raw)));
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5A;
    f.write_all_at(&b, offset).unwrap();
}

fn put_u64(path: &Path, offset: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), offset).unwrap();
}

#[test]
fn verify_names_the_corrupted_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(8);
    for (name, vhdx) in [("a.vhdx", true), ("a.vhd", false)] {
        let p = dir.path().join(name);
        if vhdx {
            common::new_vhdx(&p, 64 << 20, 4 << 20);
        } else {
            common::new_vhd(&p, 64 << 20);
        }
        {
            let mut c = common::open_writable(&p);
            c.write(0, &rng.bytes(20 << 20)).unwrap();
            c.close().unwrap();
        }
        let manifest = dir.path().join(format!("{name}.json"));
        ok(&[
            "hash",
            "--manifest",
            manifest.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        ok(&[
            "verify",
            p.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ]);
        // Corrupt one byte of guest offset 13 MiB + 12345 in the file.
        let guest = (13u64 << 20) + 12345;
        let layer = vhdmerge::disk::open_layer(&p, false).unwrap();
        let (ext, _) = layer.map(guest, 1).unwrap();
        let Extent::Data(file_off) = ext else {
            panic!("guest offset not allocated")
        };
        drop(layer);
        flip(&p, file_off);
        let o = vhdmerge(&[
            "verify",
            p.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let text = String::from_utf8_lossy(&o.stdout);
        let want = format!("bytes {}..{} ", 13u64 << 20, 14u64 << 20);
        assert!(text.contains(&want), "{name}: {text}");
        assert_eq!(
            text.matches("differ").count(),
            1,
            "{name}: exactly one range: {text}"
        );
    }
}

fn check_fails(path: &Path, needle: &str) {
    let o = vhdmerge(&["check", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}: {text}", path.display());
    assert!(
        text.contains(needle),
        "{}: expected '{needle}' in {text}",
        path.display()
    );
}

#[test]
fn check_names_damaged_structures() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    common::new_vhdx(&base, 32 << 20, 1 << 20);
    {
        let mut c = common::open_writable(&base);
        c.write(0, &[1u8; 3 << 20]).unwrap();
        c.close().unwrap();
    }
    let child = dir.path().join("child.avhdx");
    create::create_child(&child, &base, None).unwrap();
    {
        let mut c = common::open_writable(&child);
        c.write(512, &[2u8; 1024]).unwrap();
        c.close().unwrap();
    }
    assert!(
        vhdmerge(&["check", base.to_str().unwrap()])
            .status
            .success()
    );
    assert!(
        vhdmerge(&["check", child.to_str().unwrap()])
            .status
            .success()
    );
    // Layout written by create: BAT at 3 MiB.
    let bat = 3u64 << 20;
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&base, &p).unwrap();
        p
    };
    let p = copy("crc.vhdx");
    flip(&p, (64 << 10) + 200);
    check_fails(&p, "header 1");
    let p = copy("oob.vhdx");
    put_u64(&p, bat + 8, (1u64 << 40) | 6);
    check_fails(&p, "ends past the end of the file");
    let p = copy("overlap.vhdx");
    let first = {
        let l = vhdmerge::disk::open_layer(&base, false).unwrap();
        match l.map(0, 1).unwrap().0 {
            Extent::Data(o) => o,
            _ => panic!(),
        }
    };
    put_u64(&p, bat + 8, first | 6);
    check_fails(&p, "overlaps");
    let p = copy("reserved.vhdx");
    put_u64(&p, bat + 16, 4);
    check_fails(&p, "invalid state 4");
    // The child's sector bitmap entry (index 4096 for 1 MiB blocks) pointing past EOF.
    let c2 = dir.path().join("sb.avhdx");
    std::fs::copy(&child, &c2).unwrap();
    put_u64(&c2, bat + 4096 * 8, (1u64 << 40) | 6);
    check_fails(&c2, "sector bitmap");
    // A VHD footer with a wrong checksum, and the copy at offset 0 differing.
    let vhd = dir.path().join("d.vhd");
    common::new_vhd(&vhd, 8 << 20);
    let len = std::fs::metadata(&vhd).unwrap().len();
    flip(&vhd, len - 512 + 30);
    check_fails(&vhd, "checksum");
}
