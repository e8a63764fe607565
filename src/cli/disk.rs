//! The commands that read or make one disk: info, create, export, hash,
//! verify and check.

use std::path::{Path, PathBuf};

use vhdmerge::disk::create::{self, CreateOptions};
use vhdmerge::disk::{Format, LayerInfo, open_any};
use vhdmerge::verify::{self, check, manifest};
use vhdmerge::{Chain, Error};

use super::args::{CheckArgs, CreateArgs, ExportArgs, FormatArg, HashArgs, InfoArgs, VerifyArgs};
use super::{Exit, bar, chain_options, open_chain, pending_merges, print_json, warn_all};

pub fn cmd_info(a: InfoArgs) -> Exit {
    let (disk, all, json) = (a.disk.as_path(), a.chain, a.json);
    let chain = match open_chain(disk, a.parent) {
        Ok(c) => c,
        Err(e) => {
            // A pending merge changes the ancestor's identity, which
            // breaks the chain until it is recovered: say so.
            for p in pending_merges(&[disk]) {
                eprintln!("vhdmerge: PENDING: {p}");
            }
            return Err(e);
        }
    };
    warn_all(&chain);
    let paths: Vec<&Path> = chain.layers.iter().map(|l| l.path()).collect();
    let pending = pending_merges(&paths);
    let infos = chain.infos()?;
    let shown = if all { &infos[..] } else { &infos[..1] };
    if json {
        print_json(
            &serde_json::json!({ "levels": shown, "links": chain.links, "chain_depth": infos.len(), "pending_merges": pending }),
        );
        return Ok(0);
    }
    for (i, inf) in shown.iter().enumerate() {
        print_info(i, inf);
    }
    for l in &chain.links {
        out!(
            "link: {} -> {} (found by {}, identity {})",
            l.child.display(),
            l.parent.display(),
            l.found_by,
            l.identity
        );
    }
    for p in &pending {
        out!("PENDING: {p}");
    }
    Ok(0)
}

fn print_info(level: usize, i: &LayerInfo) {
    out!("level {level}: {}", i.path.display());
    out!("  format: {:?} {:?}", i.format, i.kind);
    out!("  virtual size: {} bytes", i.virtual_size);
    out!(
        "  block size: {} bytes, logical sector {}, physical sector {}",
        i.block_size,
        i.logical_sector_size,
        i.physical_sector_size
    );
    out!(
        "  file size: {} bytes, allocated: {} blocks ({} bytes)",
        i.file_size,
        i.allocated_blocks,
        i.allocated_bytes
    );
    if let Some(obj) = i.details.as_object() {
        for (k, v) in obj {
            if !v.is_null() {
                out!("  {k}: {v}");
            }
        }
    }
    for w in &i.warnings {
        out!("  WARNING: {w}");
    }
}

pub fn cmd_create(a: CreateArgs) -> Exit {
    let o = CreateOptions {
        size: a.size,
        format: a.format.map(|f| match f {
            FormatArg::Vhd => Format::Vhd,
            FormatArg::Vhdx => Format::Vhdx,
        }),
        block_size: a.block_size,
        logical_sector: a.logical_sector,
        physical_sector: a.physical_sector,
        fixed: a.fixed,
        parent: a.parent,
    };
    create::create(&a.path, &o)?;
    out!("created {}", a.path.display());
    Ok(0)
}

pub fn cmd_export(a: ExportArgs, quiet: bool) -> Exit {
    let (disk, out) = (a.disk.as_path(), a.out.as_path());
    let chain = open_chain(disk, a.parent)?;
    warn_all(&chain);
    let pb = bar(quiet, chain.virtual_size(), "export");
    verify::export_raw(&chain, out, |p| pb.set_position(p))?;
    pb.finish_and_clear();
    out!(
        "exported {} bytes to {}",
        chain.virtual_size(),
        out.display()
    );
    Ok(0)
}

/// How `hash` hashes.
enum HashKind {
    Content,
    Flat,
    Manifest(PathBuf),
}

pub fn cmd_hash(a: HashArgs, quiet: bool) -> Exit {
    let kind = match (a.flat, a.manifest) {
        (true, _) => HashKind::Flat,
        (false, Some(m)) => HashKind::Manifest(m),
        (false, None) => HashKind::Content,
    };
    let (disk, json) = (a.disk.as_path(), a.json);
    let chain = open_any(disk, &chain_options(a.parent))?;
    warn_all(&chain);
    let pb = bar(quiet, chain.virtual_size(), "hash");
    let mut progress = |p| pb.set_position(p);
    let (name, digest) = match &kind {
        HashKind::Flat => (
            "flat",
            verify::flat_digest(&chain, progress)?.to_hex().to_string(),
        ),
        HashKind::Manifest(out) => {
            let m = manifest::build(&chain, &mut progress)?;
            let text = serde_json::to_string_pretty(&m).expect("serializable");
            std::fs::write(out, text).map_err(|e| Error::io(out, "writing the manifest", e))?;
            ("content", m.root)
        }
        HashKind::Content => (
            "content",
            verify::content_digest(&chain, progress)?
                .root
                .to_hex()
                .to_string(),
        ),
    };
    pb.finish_and_clear();
    if json {
        out!(
            "{}",
            serde_json::json!({ "disk": disk, "kind": name, "virtual_size": chain.virtual_size(), "blake3": digest })
        );
    } else {
        out!("{digest}  {}", disk.display());
    }
    Ok(0)
}

/// What `verify` compares with.
enum Expected {
    Digest(String),
    Manifest(PathBuf),
}

pub fn cmd_verify(a: VerifyArgs, quiet: bool) -> Exit {
    let expected = match (a.manifest, a.expect) {
        (Some(m), _) => Expected::Manifest(m),
        (None, Some(d)) => Expected::Digest(d),
        (None, None) => unreachable!("clap requires one"),
    };
    let (disk, json) = (a.disk.as_path(), a.json);
    let chain: Chain = open_any(disk, &chain_options(a.parent))?;
    warn_all(&chain);
    let pb = bar(quiet || json, chain.virtual_size(), "verify");
    let actual = manifest::build(&chain, &mut |p| pb.set_position(p))?;
    pb.finish_and_clear();
    let (expected_root, ranges) = match &expected {
        Expected::Manifest(m) => {
            let m = manifest::load(m)?;
            let ranges = manifest::diff(&m, &actual);
            (m.root, ranges)
        }
        Expected::Digest(e) => (e.trim().to_ascii_lowercase(), Vec::new()),
    };
    let same = expected_root == actual.root;
    if json {
        out!(
            "{}",
            serde_json::json!({ "disk": disk, "match": same, "expected": expected_root, "actual": actual.root, "differing_ranges": ranges })
        );
    } else if same {
        out!("OK {} matches {expected_root}", disk.display());
    } else {
        out!(
            "MISMATCH {}: content digest {} (expected {expected_root})",
            disk.display(),
            actual.root
        );
        for r in &ranges {
            out!(
                "  bytes {}..{} ({:#x}..{:#x}) differ",
                r.start,
                r.end,
                r.start,
                r.end
            );
        }
    }
    if !same {
        return Err(Error::ContentMismatch {
            path: disk.to_path_buf(),
        });
    }
    Ok(0)
}

pub fn cmd_check(a: CheckArgs) -> Exit {
    let (disk, json) = (a.disk.as_path(), a.json);
    let r = check::check(disk, a.parent);
    if json {
        print_json(&r);
    } else {
        out!("{}: {:?}", disk.display(), r.status);
        out!("  checked: {}", r.checked.join(", "));
        for f in &r.findings {
            match f.offset {
                Some(o) => out!("  {} at {o:#x}: {}", f.structure, f.problem),
                None => out!("  {}: {}", f.structure, f.problem),
            }
        }
    }
    Ok(match r.status {
        check::Status::Clean => 0,
        check::Status::Corrupt => 2,
        check::Status::Incomplete => 1,
    })
}
