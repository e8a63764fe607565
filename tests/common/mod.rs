//! Helpers shared by the integration tests: the real-image corpus, temp
//! folders, decompression, and running the binary.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The corpus of real images: `VHDMERGE_TESTDATA`, else `../shared/testdata/real`.
/// Under CI a missing corpus fails the test; elsewhere it is skipped.
pub fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("VHDMERGE_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/real"));
    if dir.join("EXPECTED.tsv").is_file() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "the real-image corpus is missing at {} (set VHDMERGE_TESTDATA)",
            dir.display()
        );
    }
    eprintln!("skipping: no corpus at {}", dir.display());
    None
}

pub struct Expected {
    /// Child first, parents after.
    pub chain: Vec<String>,
    pub virtual_size: u64,
    pub blake3: String,
}

pub fn expected(corpus: &Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(corpus.join("EXPECTED.tsv")).expect("EXPECTED.tsv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Expected {
                chain: f[0].split(" <- ").map(|s| s.trim().to_string()).collect(),
                virtual_size: f[1].parse().expect("size"),
                blake3: f[2].to_string(),
            }
        })
        .collect()
}

/// Copies (decompressing .gz/.bz2) a corpus file into `dir`, keeping its
/// base name, since children name their parents by file name.
pub fn materialize(corpus: &Path, rel: &str, dir: &Path) -> PathBuf {
    let src = corpus.join(rel);
    let name = src.file_name().unwrap().to_string_lossy().to_string();
    let (base, kind) = if let Some(b) = name.strip_suffix(".gz") {
        (b.to_string(), 1)
    } else if let Some(b) = name.strip_suffix(".bz2") {
        (b.to_string(), 2)
    } else {
        (name.clone(), 0)
    };
    let out = dir.join(&base);
    let file = std::fs::File::open(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let mut reader: Box<dyn Read> = match kind {
        1 => Box::new(flate2::read::GzDecoder::new(file)),
        2 => Box::new(bzip2::read::BzDecoder::new(file)),
        _ => Box::new(file),
    };
    let mut w = std::fs::File::create(&out).unwrap();
    std::io::copy(&mut reader, &mut w).unwrap();
    out
}

pub fn vhdmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhdmerge"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run vhdmerge")
}

pub fn ok(args: &[&str]) -> String {
    let o = vhdmerge(args);
    assert!(
        o.status.success(),
        "vhdmerge {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A tool the test suite needs: under CI its absence is a failure.
pub fn need(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{tool} is required under CI (see .ci/run)");
    }
    eprintln!("skipping: {tool} not installed");
    false
}

pub fn blake3_file(path: &Path) -> String {
    let layer = vhdmerge::disk::raw::RawDisk::open(path).unwrap();
    let chain = vhdmerge::Chain::single(Box::new(layer));
    vhdmerge::verify::flat_digest(&chain, |_| {})
        .unwrap()
        .to_hex()
        .to_string()
}

/// The Python with the oracle packages (see .ci/run): `VHDMERGE_PYTHON`,
/// else `.venv/bin/python`. Under CI its absence is a failure.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("VHDMERGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import pyvhdi, dissect.hypervisor"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} lacks libvhdi-python / dissect.hypervisor (see .ci/run)",
            p.display()
        );
    }
    eprintln!("skipping: no oracle Python at {}", p.display());
    None
}

/// Reads a disk (and its parents) with an independent reader; returns the
/// BLAKE3 of what it saw.
pub fn oracle(python: &Path, reader: &str, files: &[&Path], dir: &Path) -> String {
    let out = dir.join(format!("oracle-{reader}.raw"));
    let _ = std::fs::remove_file(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle.py");
    let o = Command::new(python)
        .arg(script)
        .arg(reader)
        .arg(&out)
        .args(files)
        .output()
        .unwrap();
    if !o.status.success() && std::env::var_os("VHDMERGE_KEEP_FAILED").is_some() {
        let keep = Path::new("/tmp/dfail");
        let _ = std::fs::create_dir_all(keep);
        for e in std::fs::read_dir(files[0].parent().unwrap()).unwrap() {
            let e = e.unwrap();
            let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
        }
    }
    assert!(
        o.status.success(),
        "{reader} failed on {files:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let h = blake3_file(&out);
    std::fs::remove_file(&out).unwrap();
    h
}

/// BLAKE3 of what `qemu-img convert -O raw` reads.
pub fn qemu_digest(fmt: &str, file: &Path, dir: &Path) -> String {
    let out = dir.join("qemu.raw");
    let _ = std::fs::remove_file(&out);
    let o = Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(file)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img convert {}: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let h = blake3_file(&out);
    std::fs::remove_file(&out).unwrap();
    h
}

pub fn digest_of(top: &Path) -> String {
    let chain = vhdmerge::Chain::open(top, &Default::default()).unwrap();
    vhdmerge::verify::flat_digest(&chain, |_| {})
        .unwrap()
        .to_hex()
        .to_string()
}

/// A small deterministic generator (splitmix64) for test patterns.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        vhdmerge::guid::splitmix64(&mut self.0)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let seed = self.next();
        (0..n)
            .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8 | 1)
            .collect()
    }
}

/// Every regular file in a folder with the BLAKE3 of its bytes, by name:
/// what tests compare to show that nothing was written.
pub fn folder_digests(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// File name → content digest of what each disk in `dir` reads as (its
/// chain), or why it cannot be read. A merge resumed from a checkpoint
/// must read as the uninterrupted one; its VHDX header GUIDs differ.
pub fn folder_views(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut v = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if !vhdmerge::merge::preflight::is_disk_name(&p) {
            continue;
        }
        let d = vhdmerge::Chain::open(&p, &Default::default())
            .and_then(|c| vhdmerge::verify::content_digest(&c, |_| {}))
            .map(|d| d.root.to_hex().to_string())
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        v.insert(p.file_name().unwrap().to_string_lossy().to_string(), d);
    }
    v
}

/// A VHDX file's current header, and the slot a header update writes
/// (the other one), chosen as the library chooses.
pub fn header_to_replace(file: &[u8]) -> (vhdmerge::format::vhdx::header::Header, usize) {
    use vhdmerge::format::vhdx::{HEADER_OFFSETS, header};
    let slots = HEADER_OFFSETS.map(|o| header::Header::decode(&file[o as usize..][..header::SIZE]));
    let cur = header::current(&slots).expect("a current header");
    (slots[cur].clone().unwrap(), 1 - cur)
}

/// A new dynamic VHDX of `size` bytes with `block_size` blocks.
pub fn new_vhdx(path: &Path, size: u64, block_size: u64) {
    let o = vhdmerge::disk::create::VhdxOptions {
        virtual_size: size,
        block_size,
        ..Default::default()
    };
    vhdmerge::disk::create::create_vhdx(path, &o).unwrap();
}

/// A new dynamic VHD of `size` bytes (2 MiB blocks).
pub fn new_vhd(path: &Path, size: u64) {
    let o = vhdmerge::disk::create::VhdOptions {
        size,
        ..Default::default()
    };
    vhdmerge::disk::create::create_vhd(path, &o).unwrap();
}

/// Opens the chain whose top is `path` for writing.
pub fn open_writable(path: impl AsRef<Path>) -> vhdmerge::Chain {
    vhdmerge::Chain::open(
        path.as_ref(),
        &vhdmerge::ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}
