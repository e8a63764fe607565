//! Regenerates the fuzz seed corpus `fuzz/seeds/<target>/*.gz` from the
//! committed `recovery-fixtures/` (real merge states: dirty VHDX logs, half
//! merged files, journals with torn tails) plus a few freshly made images:
//!
//!     cargo run --example make_fuzz_seeds
//!
//! Seeds are kept gzip'd (a 4 MiB VHDX is mostly zeros); `fuzz/run.sh`
//! unpacks them into `fuzz/corpus/<target>/` before fuzzing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};
use vhdmerge::{Chain, ChainOptions};

fn gunzip(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn put(root: &Path, target: &str, name: &str, data: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap();
}

fn target_of(name: &str, data: &[u8]) -> &'static str {
    if name.ends_with(".vhdmerge-journal") {
        "journal"
    } else if data.starts_with(b"vhdxfile") {
        "vhdx"
    } else {
        "vhd"
    }
}

/// The log region of a VHDX whose header names a live log.
fn live_log(data: &[u8]) -> Option<Vec<u8>> {
    let f = vhdmerge::format::vhdx::header::Header::decode;
    let h = [64usize << 10, 128 << 10]
        .iter()
        .filter_map(|&o| f(&data[o..o + 4096]).ok())
        .max_by_key(|h| h.sequence)?;
    if h.log_guid.is_nil() {
        return None;
    }
    let at = h.log_offset as usize;
    Some(data[at..at + h.log_length as usize].to_vec())
}

fn fixtures(root: &Path) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("recovery-fixtures")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let fixture = d.file_name().unwrap().to_string_lossy().to_string();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "gz"))
            .collect();
        files.sort();
        for f in files {
            let name = f.file_stem().unwrap().to_string_lossy().to_string();
            let data = gunzip(&f);
            let seed = format!("{fixture}-{name}");
            let target = target_of(&name, &data);
            put(root, target, &seed, &data);
            if target != "vhdx" {
                continue;
            }
            if let Some(log) = live_log(&data) {
                put(root, "log", &seed, &log);
            }
        }
    }
}

fn fresh(root: &Path) {
    vhdmerge::guid::set_seed(Some(7));
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let vhdx = |path: &Path, size, block, sector, fixed| {
        let o = VhdxOptions {
            virtual_size: size,
            block_size: block,
            logical_sector: sector,
            physical_sector: 4096,
            fixed,
        };
        create::create_vhdx(path, &o).unwrap();
    };
    vhdx(&p("fixed.vhdx"), 1 << 20, 1 << 20, 512, true);
    vhdx(&p("sector4k.vhdx"), 8 << 20, 2 << 20, 4096, false);
    create::create_vhd(
        &p("dynamic.vhd"),
        &VhdOptions {
            size: 8 << 20,
            block_size: 512 << 10,
            fixed: false,
        },
    )
    .unwrap();
    create::create_child(&p("child.avhd"), &p("dynamic.vhd"), None).unwrap();
    create::create_child(&p("child.avhdx"), &p("sector4k.vhdx"), None).unwrap();
    for (name, at) in [("child.avhd", 3u64 << 20), ("child.avhdx", 5 << 20)] {
        let o = ChainOptions {
            writable: true,
            ..Default::default()
        };
        let mut c = Chain::open(&p(name), &o).unwrap();
        c.top_mut().write(at, &[0x5a; 4096]).unwrap();
        c.top_mut().commit().unwrap();
        c.top_mut().close().unwrap();
    }
    for name in [
        "fixed.vhdx",
        "sector4k.vhdx",
        "dynamic.vhd",
        "child.avhd",
        "child.avhdx",
    ] {
        let data = std::fs::read(p(name)).unwrap();
        put(
            root,
            target_of(name, &data),
            &format!("fresh-{name}"),
            &data,
        );
    }
    vhdmerge::guid::set_seed(None);
}

fn main() {
    let root = Path::new("fuzz/seeds");
    let _ = std::fs::remove_dir_all(root);
    fixtures(root);
    fresh(root);
    for t in ["vhdx", "vhd", "log", "journal"] {
        let n = std::fs::read_dir(root.join(t)).map_or(0, |d| d.count());
        println!("fuzz/seeds/{t}: {n} seeds");
    }
}
