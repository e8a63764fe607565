//! `vhdmerge demo`: builds a small chain in a temporary folder, writes
//! into it, and shows what the library sees, step by step.

use vhdmerge::disk::create::{self, VhdxOptions};
use vhdmerge::merge::{self, MergeOptions};
use vhdmerge::{Chain, ChainOptions, Error, recover, verify};

fn step(n: usize, what: &str) {
    out!("[{n}] {what}");
}

pub fn run() -> Result<(), Error> {
    let dir = tempfile::tempdir()
        .map_err(|e| Error::Invalid(format!("cannot create a temporary folder: {e}")))?;
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("checkpoint.avhdx");
    let grandchild = dir.path().join("checkpoint2.avhdx");
    out!("vhdmerge demo in {}", dir.path().display());

    step(
        1,
        "create a 64 MiB dynamic VHDX base (1 MiB blocks) and write two patterns",
    );
    create::create_vhdx(
        &base,
        &VhdxOptions {
            virtual_size: 64 << 20,
            block_size: 1 << 20,
            ..Default::default()
        },
    )?;
    let mut chain = Chain::open(
        &base,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )?;
    chain.write(0, &vec![0x11; 3 << 20])?;
    chain.write(40 << 20, &vec![0x22; 1 << 20])?;
    chain.close()?;
    drop(chain);

    step(
        2,
        "create a differencing child (a checkpoint) and overwrite 5000 bytes at an odd offset",
    );
    create::create_child(&child, &base, None)?;
    let mut chain = Chain::open(
        &child,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )?;
    chain.write(1_000_003, &vec![0x33; 5000])?;
    chain.close()?;
    drop(chain);

    step(
        3,
        "create a second checkpoint on top and write into a block nobody wrote before",
    );
    create::create_child(&grandchild, &child, None)?;
    let mut chain = Chain::open(
        &grandchild,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )?;
    chain.write(60 << 20, b"hello from the newest checkpoint")?;
    chain.write(20 << 20, &vec![0x44; 1 << 20])?;
    chain.close()?;
    drop(chain);

    step(
        4,
        "open the chain read-only, resolve parents by locator and identity",
    );
    let chain = Chain::open(&grandchild, &ChainOptions::default())?;
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
    if probe != expect {
        return Err(Error::Invalid(
            "demo: the chain read back wrong bytes".into(),
        ));
    }

    step(
        5,
        "hash the guest-visible disk and export it as a sparse raw file",
    );
    let flat = verify::flat_digest(&chain, |_| {})?;
    let raw = dir.path().join("disk.raw");
    verify::export_raw(&chain, &raw, |_| {})?;
    let exported = verify::flat_digest(
        &Chain::single(Box::new(vhdmerge::disk::raw::RawDisk::open(&raw)?)),
        |_| {},
    )?;
    out!("    chain  BLAKE3 {flat}");
    out!("    export BLAKE3 {exported}");
    if flat != exported {
        return Err(Error::Invalid(
            "demo: the export does not match the chain".into(),
        ));
    }
    drop(chain);

    step(
        6,
        "merge checkpoint.avhdx into base.vhdx; checkpoint2.avhdx is re-linked to base.vhdx",
    );
    let opts = MergeOptions {
        batch_bytes: 1 << 20,
        ..Default::default()
    };
    let report = merge::execute(merge::prepare(&child, &opts)?, &opts, &mut |_, _| {})?;
    out!(
        "    copied {} bytes in {} runs, journal {} bytes, re-linked {}",
        report.plan.bytes,
        report.plan.runs,
        report.journal_bytes,
        report.plan.relink.len()
    );
    let after = verify::flat_digest(&Chain::open(&grandchild, &ChainOptions::default())?, |_| {})?;
    out!("    chain BLAKE3 after the merge {after}");
    if after != flat {
        return Err(Error::Invalid(
            "demo: the merge changed what the guest sees".into(),
        ));
    }

    step(
        7,
        "merge checkpoint2.avhdx into base.vhdx in a child process, killed at a random point",
    );
    let points = [
        "after-begin",
        "mid-apply",
        "before-close",
        "after-apply",
        "after-commit",
        "mid-cleanup",
    ];
    let point = points[blake3::hash(format!("{:?}", std::time::SystemTime::now()).as_bytes())
        .as_bytes()[0] as usize
        % points.len()];
    let exe = std::env::current_exe()
        .map_err(|e| Error::Invalid(format!("cannot find this program: {e}")))?;
    let status = std::process::Command::new(exe)
        .args([
            "--quiet",
            "merge",
            "--batch",
            "64K",
            "--checkpoint-every",
            "256K",
        ])
        .arg(&grandchild)
        .env("VHDMERGE_FAIL_AT", point)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| Error::Invalid(format!("cannot start the merge: {e}")))?;
    out!("    the merge was killed at '{point}' (exit status {status})");

    step(
        8,
        "recover: the journal decides whether to resume from the last checkpoint, finish or roll back",
    );
    let r = recover::recover(&base, false)?;
    out!(
        "    {:?} (journal said: {}, {} before-images{})",
        r.outcome,
        r.state,
        r.before_images,
        r.resumed_from
            .map(|b| format!(", resumed with {b} bytes already merged"))
            .unwrap_or_default()
    );
    let top = if grandchild.exists() {
        &grandchild
    } else {
        &base
    };
    let recovered = verify::flat_digest(&Chain::open(top, &ChainOptions::default())?, |_| {})?;
    out!("    {} BLAKE3 {recovered}", name(top));
    if recovered != flat {
        return Err(Error::Invalid(
            "demo: recovery did not give back the guest's disk".into(),
        ));
    }
    out!("demo finished: every step kept the guest-visible disk intact");
    Ok(())
}

fn name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}
