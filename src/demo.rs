//! `vhdmerge demo`: builds a small chain in a temporary folder, writes
//! into it, and shows what the library sees, step by step.

use vhdmerge::disk::create::{self, VhdxOptions};
use vhdmerge::{Chain, ChainOptions, Error, verify};

fn step(n: usize, what: &str) {
    println!("[{n}] {what}");
}

pub fn run() -> Result<(), Error> {
    let dir = tempfile::tempdir()
        .map_err(|e| Error::Invalid(format!("cannot create a temporary folder: {e}")))?;
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("checkpoint.avhdx");
    let grandchild = dir.path().join("checkpoint2.avhdx");
    println!("vhdmerge demo in {}", dir.path().display());

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
    chain.close()?;
    drop(chain);

    step(
        4,
        "open the chain read-only, resolve parents by locator and identity",
    );
    let chain = Chain::open(&grandchild, &ChainOptions::default())?;
    for l in &chain.links {
        println!(
            "    {} -> {} (found by {}, {})",
            name(&l.child),
            name(&l.parent),
            l.found_by,
            l.identity
        );
    }
    let mut probe = vec![0u8; 16];
    chain.read(1_000_000, &mut probe)?;
    println!("    bytes at 1000000: {probe:02x?}");
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
    println!("    chain  BLAKE3 {flat}");
    println!("    export BLAKE3 {exported}");
    if flat != exported {
        return Err(Error::Invalid(
            "demo: the export does not match the chain".into(),
        ));
    }
    println!("demo finished: the chain reads back as written and the export matches");
    Ok(())
}

fn name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}
