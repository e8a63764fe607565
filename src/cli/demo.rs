//! `vhdmerge demo`: builds a small chain in a temporary folder, writes
//! into it, and shows what the library sees, step by step, checking the
//! guest's disk after each.

use std::path::{Path, PathBuf};

use vhdmerge::disk::create::{self, VhdxOptions};
use vhdmerge::failpoint::Failpoint;
use vhdmerge::merge::{self, MergeOptions};
use vhdmerge::{Chain, ChainOptions, Error, recover, verify};

use super::Exit;

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error(transparent)]
    Vhdmerge(#[from] Error),
    #[error("demo: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A step's check failed: what the guest sees changed.
    #[error("demo: {0}")]
    Check(&'static str),
}

type Result<T> = std::result::Result<T, DemoError>;

pub fn cmd_demo() -> Exit {
    match run() {
        Ok(()) => Ok(0),
        Err(DemoError::Vhdmerge(e)) => Err(e),
        Err(e) => {
            eprintln!("vhdmerge: error: {e}");
            Ok(1)
        }
    }
}

/// The demo's three files.
struct Files {
    base: PathBuf,
    child: PathBuf,
    grandchild: PathBuf,
}

fn run() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|source| DemoError::Io {
        what: "cannot create a temporary folder",
        source,
    })?;
    let f = Files {
        base: dir.path().join("base.vhdx"),
        child: dir.path().join("checkpoint.avhdx"),
        grandchild: dir.path().join("checkpoint2.avhdx"),
    };
    out!("vhdmerge demo in {}", dir.path().display());
    build(&f)?;
    let flat = read_and_export(&f, &dir.path().join("disk.raw"))?;
    merge_checkpoint(&f, &flat)?;
    kill_and_recover(&f, &flat)?;
    out!("demo finished: every step kept the guest-visible disk intact");
    Ok(())
}

fn step(n: usize, what: &str) {
    out!("[{n}] {what}");
}

fn check(ok: bool, what: &'static str) -> Result<()> {
    match ok {
        true => Ok(()),
        false => Err(DemoError::Check(what)),
    }
}

/// Writes `pieces` (offset, bytes) into the top of `top`'s chain.
fn write(top: &Path, pieces: &[(u64, &[u8])]) -> Result<()> {
    let opts = ChainOptions {
        writable: true,
        ..Default::default()
    };
    let mut chain = Chain::open(top, &opts)?;
    for (offset, data) in pieces {
        chain.write(*offset, data)?;
    }
    chain.close()?;
    Ok(())
}

/// Steps 1 to 3: a base and two checkpoints, each written to.
fn build(f: &Files) -> Result<()> {
    step(
        1,
        "create a 64 MiB dynamic VHDX base (1 MiB blocks) and write two patterns",
    );
    let o = VhdxOptions {
        virtual_size: 64 << 20,
        block_size: 1 << 20,
        ..Default::default()
    };
    create::create_vhdx(&f.base, &o)?;
    write(
        &f.base,
        &[(0, &[0x11; 3 << 20]), (40 << 20, &[0x22; 1 << 20])],
    )?;
    step(
        2,
        "create a differencing child (a checkpoint) and overwrite 5000 bytes at an odd offset",
    );
    create::create_child(&f.child, &f.base, None)?;
    write(&f.child, &[(1_000_003, &[0x33; 5000])])?;
    step(
        3,
        "create a second checkpoint on top and write into a block nobody wrote before",
    );
    create::create_child(&f.grandchild, &f.child, None)?;
    write(
        &f.grandchild,
        &[
            (60 << 20, b"hello from the newest checkpoint"),
            (20 << 20, &[0x44; 1 << 20]),
        ],
    )
}

/// Steps 4 and 5: the chain read through its links, hashed and exported;
/// returns the BLAKE3 of what the guest sees.
fn read_and_export(f: &Files, raw: &Path) -> Result<blake3::Hash> {
    step(
        4,
        "open the chain read-only, resolve parents by locator and identity",
    );
    let chain = Chain::open(&f.grandchild, &ChainOptions::default())?;
    for l in &chain.links {
        out!(
            "    {} -> {} (found by {}, {})",
            name(&l.child),
            name(&l.parent),
            l.found_by,
            l.identity
        );
    }
    let mut probe = vec![0u8; 16];
    chain.read(1_000_000, &mut probe)?;
    out!("    bytes at 1000000: {probe:02x?}");
    let expect: Vec<u8> = [vec![0x11; 3], vec![0x33; 13]].concat();
    check(probe == expect, "the chain read back wrong bytes")?;

    step(
        5,
        "hash the guest-visible disk and export it as a sparse raw file",
    );
    let flat = verify::flat_digest(&chain, |_| {})?;
    verify::export_raw(&chain, raw, |_| {})?;
    let exported = verify::flat_digest(
        &Chain::single(Box::new(vhdmerge::disk::raw::RawDisk::open(raw)?)),
        |_| {},
    )?;
    out!("    chain  BLAKE3 {flat}");
    out!("    export BLAKE3 {exported}");
    check(flat == exported, "the export does not match the chain")?;
    Ok(flat)
}

fn digest_of(top: &Path) -> Result<blake3::Hash> {
    let chain = Chain::open(top, &ChainOptions::default())?;
    Ok(verify::flat_digest(&chain, |_| {})?)
}

/// Step 6: the middle checkpoint merged, the top one re-linked.
fn merge_checkpoint(f: &Files, flat: &blake3::Hash) -> Result<()> {
    step(
        6,
        "merge checkpoint.avhdx into base.vhdx; checkpoint2.avhdx is re-linked to base.vhdx",
    );
    let opts = MergeOptions {
        batch_bytes: 1 << 20,
        ..Default::default()
    };
    let report = merge::execute(merge::prepare(&f.child, &opts)?, &opts, &mut |_, _| {})?;
    out!(
        "    copied {} bytes in {} runs, journal {} bytes, re-linked {}",
        report.plan.bytes,
        report.plan.runs,
        report.journal_bytes,
        report.plan.relink.len()
    );
    let after = digest_of(&f.grandchild)?;
    out!("    chain BLAKE3 after the merge {after}");
    check(after == *flat, "the merge changed what the guest sees")
}

/// Steps 7 and 8: a merge in a child process killed at a random point,
/// then recovered.
fn kill_and_recover(f: &Files, flat: &blake3::Hash) -> Result<()> {
    step(
        7,
        "merge checkpoint2.avhdx into base.vhdx in a child process, killed at a random point",
    );
    let points: Vec<Failpoint> = Failpoint::ALL
        .into_iter()
        .filter(|p| p.in_every_merge())
        .collect();
    let pick = blake3::hash(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    let point = points[pick.as_bytes()[0] as usize % points.len()];
    let exe = std::env::current_exe().map_err(|source| DemoError::Io {
        what: "cannot find this program",
        source,
    })?;
    let status = std::process::Command::new(exe)
        .args(["--quiet", "merge", "--batch", "64K"])
        .args(["--checkpoint-every", "256K"])
        .arg(&f.grandchild)
        .env("VHDMERGE_FAIL_AT", point.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|source| DemoError::Io {
            what: "cannot start the merge",
            source,
        })?;
    out!("    the merge was killed at '{point}' (exit status {status})");

    step(
        8,
        "recover: the journal decides whether to resume from the last checkpoint, finish or roll back",
    );
    let r = recover::recover(&f.base, false)?;
    out!(
        "    {:?} (journal said: {}, {} before-images{})",
        r.outcome,
        r.state,
        r.before_images,
        r.resumed_from
            .map(|b| format!(", resumed with {b} bytes already merged"))
            .unwrap_or_default()
    );
    let top = match f.grandchild.exists() {
        true => &f.grandchild,
        false => &f.base,
    };
    let recovered = digest_of(top)?;
    out!("    {} BLAKE3 {recovered}", name(top));
    check(
        recovered == *flat,
        "recovery did not give back the guest's disk",
    )
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}
