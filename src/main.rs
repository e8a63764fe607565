//! The `vhdmerge` command line: argument parsing, progress and output only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};
use vhdmerge::disk::raw::RawDisk;
use vhdmerge::merge::{self, MergeOptions};
use vhdmerge::{Chain, ChainOptions, Error, recover, verify};

/// println! that ends quietly when stdout is closed (e.g. piped into `head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod cli;
mod demo;

/// Exit codes: 0 success; 1 the operation failed or was refused (the
/// message says why), or `check` could not finish; 2 `check` found
/// corruption; 64 wrong usage.
#[derive(Parser)]
#[command(
    name = "vhdmerge",
    version,
    about = "Read, check and merge VHD/VHDX differencing chains"
)]
struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a disk and every level of its chain.
    Info {
        disk: PathBuf,
        /// Show every level of the chain (default: the top file and the links).
        #[arg(long)]
        chain: bool,
        #[arg(long)]
        json: bool,
        /// Use this file as the top file's parent instead of its locators.
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Create a dynamic or fixed disk, or a differencing child (--parent).
    Create {
        path: PathBuf,
        /// Virtual size, e.g. 10G, 512M (not with --parent).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Format; by default from the file extension (.vhdx/.avhdx or .vhd/.avhd).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Block size (VHDX 1M..256M, default 32M; VHD default 2M).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// VHDX logical sector size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        logical_sector: u64,
        /// VHDX physical sector size: 512 or 4096.
        #[arg(long, default_value_t = 4096)]
        physical_sector: u64,
        /// Fully allocated (fixed) disk.
        #[arg(long)]
        fixed: bool,
        /// Create a differencing child of this disk.
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Write the guest-visible disk of the whole chain to a sparse raw file.
    Export {
        disk: PathBuf,
        out: PathBuf,
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// BLAKE3 of the guest-visible disk (VHD, VHDX chain, or raw file).
    Hash {
        disk: PathBuf,
        /// Plain BLAKE3 of the byte stream, equal to b3sum of a raw export.
        #[arg(long)]
        flat: bool,
        /// Also write the chunk manifest (docs/digest.md) to this file.
        #[arg(long, conflicts_with = "flat")]
        manifest: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Merge a differencing disk (and every disk up to ANCESTOR) into ANCESTOR, crash-safely.
    Merge {
        child: PathBuf,
        /// The ancestor to merge into (default: the direct parent).
        #[arg(long)]
        into: Option<PathBuf>,
        /// Use this file as the child's parent instead of its locators.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Rename the merged files to NAME.merged instead of deleting them.
        #[arg(long)]
        keep: bool,
        /// Merge even though other disks depend on the ancestor or an intermediate disk.
        #[arg(long)]
        force: bool,
        /// Print the plan (runs, bytes, journal size, space needed) and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
        /// Verify the whole merged disk (reads it twice) instead of every copied run.
        #[arg(long, value_enum, default_value = "runs")]
        verify: VerifyArg,
        /// Bytes copied between durability points.
        #[arg(long, value_parser = parse_size, default_value = "4G", hide = true)]
        batch: u64,
        /// Copied bytes between checkpoints (a crash or Ctrl-C loses at most
        /// this much work; checkpoints are also at most 30 s apart).
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        checkpoint_every: u64,
    },
    /// Finish (resume from the last checkpoint) or roll back an interrupted merge.
    Recover {
        /// The ancestor of the interrupted merge (or any file it names).
        disk: PathBuf,
        /// Restore every file to its state when the merge began.
        #[arg(long)]
        rollback: bool,
        #[arg(long)]
        json: bool,
        /// Copied bytes between checkpoints while resuming.
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        checkpoint_every: u64,
        #[arg(long, value_parser = parse_size, default_value = "4G", hide = true)]
        batch: u64,
    },
    /// Compare a disk with an expected content digest or a manifest; name the ranges that differ.
    Verify {
        disk: PathBuf,
        /// The expected content digest (from `vhdmerge hash`).
        #[arg(long, required_unless_present = "manifest")]
        expect: Option<String>,
        /// A manifest written by `vhdmerge hash --manifest`.
        #[arg(long, conflicts_with = "expect")]
        manifest: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Check every structural rule of a file, read-only. Exit 0 clean, 2 corrupt, 1 could not check.
    Check {
        disk: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Show the checkpoint trees of whole folders: chains, orphans, broken
    /// links, interrupted merges, and the merges that consolidate them.
    /// Read-only. Exit 0 when nothing is wrong, 2 when an error was found
    /// (broken link, pending merge, unreadable or damaged file), 1 when
    /// the scan could not run.
    Scan {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Scan subfolders too (e.g. Snapshots/<GUID>/ of older hosts).
        #[arg(long, short)]
        recursive: bool,
        /// Run `check` on every file.
        #[arg(long)]
        check: bool,
        /// Compute the content digest of every leaf's chain.
        #[arg(long)]
        hash: bool,
        /// The merge speed the plan's time estimates assume, per second.
        #[arg(long, value_parser = parse_size, default_value = "200M")]
        speed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Build a small chain in a temporary folder and show what vhdmerge does.
    Demo,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VerifyArg {
    Runs,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Vhdx,
    Vhd,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (
            &s[..i],
            match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                other => return Err(format!("unknown size suffix '{other}' (use K, M, G or T)")),
            },
        ),
        None => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// glibc raises its mmap threshold each time a large block is freed, after
/// which the merge's multi-MiB read buffers (allocated on the reader thread,
/// freed on the writer) stay cached in malloc arenas instead of going back
/// to the system: peak RSS of the 64 TiB benchmark merge was 103 MiB with
/// the dynamic threshold and 71 MiB with a fixed one.
fn fix_malloc_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it is called first thing in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    fix_malloc_threshold();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; wrong usage is 64 (EX_USAGE).
            return ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e @ Error::Paused { .. }) => {
            eprintln!("vhdmerge: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("vhdmerge: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn open_chain(disk: &Path, parent: Option<PathBuf>) -> Result<Chain, Error> {
    Chain::open(
        disk,
        &ChainOptions {
            parent,
            ..Default::default()
        },
    )
}

/// Opens a disk image, or a raw file when it is neither VHD nor VHDX.
fn open_any(disk: &Path, parent: Option<PathBuf>) -> Result<Chain, Error> {
    match open_chain(disk, parent) {
        Ok(c) => Ok(c),
        Err(Error::Corrupt {
            structure: "footer",
            detail,
            ..
        }) if detail.contains("not a VHD file") => {
            Ok(Chain::single(Box::new(RawDisk::open(disk)?)))
        }
        Err(e) => Err(e),
    }
}

fn preflight_paths(chain: &Chain) -> Vec<&Path> {
    chain.layers.iter().map(|l| l.path()).collect()
}

/// Interrupted merges whose journal names one of `paths`.
fn pending_merges(paths: &[&Path]) -> Vec<String> {
    let mut found: Vec<PathBuf> = Vec::new();
    for p in paths {
        if let Ok(Some(j)) = recover::find(p)
            && !found.contains(&j)
        {
            found.push(j);
        }
    }
    found
        .iter()
        .map(|j| match vhdmerge::journal::load(j) {
            Ok(l) => format!(
                "{} ({}); `vhdmerge recover` continues it, `--rollback` undoes it",
                vhdmerge::journal::state::summary(&l),
                j.display()
            ),
            Err(e) => format!("{}: unreadable journal: {e}", j.display()),
        })
        .collect()
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn warn_all(chain: &Chain) {
    for l in &chain.layers {
        for w in l.warnings() {
            eprintln!("vhdmerge: warning: {}: {w}", l.path().display());
        }
    }
}

fn run(cli: Cli) -> Result<u8, Error> {
    match cli.cmd {
        Cmd::Info {
            disk,
            chain: all,
            json,
            parent,
        } => {
            let chain = match open_chain(&disk, parent) {
                Ok(c) => c,
                Err(e) => {
                    // A pending merge changes the ancestor's identity, which
                    // breaks the chain until it is recovered: say so.
                    for p in pending_merges(&[disk.as_path()]) {
                        eprintln!("vhdmerge: PENDING: {p}");
                    }
                    return Err(e);
                }
            };
            warn_all(&chain);
            let pending = pending_merges(&preflight_paths(&chain));
            let infos = chain.infos()?;
            let shown = if all { &infos[..] } else { &infos[..1] };
            if json {
                let v = serde_json::json!({ "levels": shown, "links": chain.links, "chain_depth": infos.len(), "pending_merges": pending });
                out!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else {
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
            }
        }
        Cmd::Create {
            path,
            size,
            format,
            block_size,
            logical_sector,
            physical_sector,
            fixed,
            parent,
        } => {
            if let Some(p) = parent {
                create::create_child(&path, &p, block_size)?;
            } else {
                let size = size.ok_or_else(|| {
                    Error::Invalid(
                        "create needs --size (or --parent for a differencing child)".into(),
                    )
                })?;
                let ext = path
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase())
                    .unwrap_or_default();
                let vhd = match format {
                    Some(FormatArg::Vhd) => true,
                    Some(FormatArg::Vhdx) => false,
                    None => ext == "vhd" || ext == "avhd",
                };
                if vhd {
                    create::create_vhd(
                        &path,
                        &VhdOptions {
                            size,
                            block_size: block_size.unwrap_or(2 << 20),
                            fixed,
                        },
                    )?;
                } else {
                    create::create_vhdx(
                        &path,
                        &VhdxOptions {
                            virtual_size: size,
                            block_size: block_size.unwrap_or(32 << 20),
                            logical_sector,
                            physical_sector,
                            fixed,
                        },
                    )?;
                }
            }
            out!("created {}", path.display());
        }
        Cmd::Export { disk, out, parent } => {
            let chain = open_chain(&disk, parent)?;
            warn_all(&chain);
            let pb = bar(cli.quiet, chain.virtual_size(), "export");
            verify::export_raw(&chain, &out, |p| pb.set_position(p))?;
            pb.finish_and_clear();
            out!(
                "exported {} bytes to {}",
                chain.virtual_size(),
                out.display()
            );
        }
        Cmd::Hash {
            disk,
            flat,
            manifest,
            json,
            parent,
        } => {
            let chain = open_any(&disk, parent)?;
            warn_all(&chain);
            let pb = bar(cli.quiet, chain.virtual_size(), "hash");
            let (kind, digest) = if flat {
                (
                    "flat",
                    verify::flat_digest(&chain, |p| pb.set_position(p))?
                        .to_hex()
                        .to_string(),
                )
            } else if let Some(out) = &manifest {
                let m = verify::manifest::build(&chain, &mut |p| pb.set_position(p))?;
                let text = serde_json::to_string_pretty(&m).expect("serializable");
                std::fs::write(out, text).map_err(|e| Error::io(out, "writing the manifest", e))?;
                ("content", m.root)
            } else {
                (
                    "content",
                    verify::content_digest(&chain, |p| pb.set_position(p))?
                        .root
                        .to_hex()
                        .to_string(),
                )
            };
            pb.finish_and_clear();
            if json {
                out!(
                    "{}",
                    serde_json::json!({ "disk": disk, "kind": kind, "virtual_size": chain.virtual_size(), "blake3": digest })
                );
            } else {
                out!("{digest}  {}", disk.display());
            }
        }
        Cmd::Merge {
            child,
            into,
            parent,
            keep,
            force,
            dry_run,
            json,
            verify,
            batch,
            checkpoint_every,
        } => {
            let opts = MergeOptions {
                into,
                parent,
                keep,
                force,
                batch_bytes: batch,
                verify_full: verify == VerifyArg::Full,
                checkpoint_bytes: checkpoint_every.max(1),
                stop: Some(stop_on_signals()),
            };
            let prepared = merge::prepare(&child, &opts)?;
            if dry_run {
                if json {
                    out!(
                        "{}",
                        serde_json::to_string_pretty(&prepared.plan).expect("serializable")
                    );
                } else {
                    print_plan(&prepared.plan);
                }
                return Ok(0);
            }
            if opts.stop_requested() {
                eprintln!("vhdmerge: interrupted before the merge began; nothing was written");
                return Ok(130);
            }
            let pb = bar(cli.quiet || json, prepared.plan.bytes, "merge");
            let report = merge::execute(prepared, &opts, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                out!(
                    "merged {} bytes in {} runs into {} ({:.1} s, journal {} bytes)",
                    report.plan.bytes,
                    report.plan.runs,
                    report.plan.ancestor.display(),
                    report.seconds,
                    report.journal_bytes
                );
                for c in &report.plan.relink {
                    out!(
                        "re-linked {} to {}",
                        c.display(),
                        report.plan.ancestor.display()
                    );
                }
                match &report.result_digest {
                    Some(d) => out!(
                        "verified: content digest {d} equals the child's view before the merge"
                    ),
                    None => out!(
                        "verified: all {} copied runs read back from the ancestor with their BLAKE3",
                        report.runs_verified
                    ),
                }
            }
        }
        Cmd::Recover {
            disk,
            rollback,
            json,
            checkpoint_every,
            batch,
        } => {
            let opts = MergeOptions {
                batch_bytes: batch,
                checkpoint_bytes: checkpoint_every.max(1),
                stop: Some(stop_on_signals()),
                ..Default::default()
            };
            let pb = bar(cli.quiet || json, 0, "resume");
            let r = recover::recover_with(&disk, rollback, &opts, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("serializable")
                );
            } else {
                print_recovery(&disk, &r);
            }
        }
        Cmd::Verify {
            disk,
            expect,
            manifest,
            json,
            parent,
        } => {
            let chain = open_any(&disk, parent)?;
            warn_all(&chain);
            let pb = bar(cli.quiet || json, chain.virtual_size(), "verify");
            let actual = verify::manifest::build(&chain, &mut |p| pb.set_position(p))?;
            pb.finish_and_clear();
            let (expected_root, ranges) = match (&expect, &manifest) {
                (_, Some(m)) => {
                    let m = verify::manifest::load(m)?;
                    let ranges = verify::manifest::diff(&m, &actual);
                    (m.root, ranges)
                }
                (Some(e), None) => (e.trim().to_ascii_lowercase(), Vec::new()),
                (None, None) => unreachable!("clap requires one"),
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
                return Err(Error::Invalid(format!(
                    "{} does not match the expected content",
                    disk.display()
                )));
            }
        }
        Cmd::Check { disk, json, parent } => {
            let r = verify::check::check(&disk, parent);
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("serializable")
                );
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
            return Ok(match r.status {
                verify::check::Status::Clean => 0,
                verify::check::Status::Corrupt => 2,
                verify::check::Status::Incomplete => 1,
            });
        }
        Cmd::Scan {
            dirs,
            recursive,
            check,
            hash,
            speed,
            json,
        } => {
            let opts = vhdmerge::scan::ScanOptions {
                recursive,
                check,
                hash,
                speed: speed.max(1),
            };
            let r = vhdmerge::scan::scan(&dirs, &opts)?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("serializable")
                );
            } else {
                out!("{}", cli::scan::render(&r).trim_end());
            }
            return Ok(match r.worst() {
                Some(vhdmerge::scan::Severity::Error) => 2,
                _ => 0,
            });
        }
        Cmd::Demo => demo::run()?,
    }
    Ok(0)
}

/// SIGINT and SIGTERM ask a merge to stop at its next checkpoint (it
/// then exits 130); a second signal exits at once, which the journal
/// makes as safe as a crash.
fn stop_on_signals() -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // The conditional exit is registered first, so it sees the flag as
        // it was before this signal set it.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

fn print_recovery(disk: &Path, r: &recover::RecoverReport) {
    let what = match r.outcome {
        recover::Outcome::NothingToRecover => {
            out!("{}: nothing to recover", disk.display());
            return;
        }
        recover::Outcome::Finished => "finished the merge",
        recover::Outcome::RolledBack => "rolled back to the state before the merge",
    };
    out!(
        "{what} (journal said: {}; {} before-images; {} runs redone{})",
        r.state,
        r.before_images,
        r.redone_runs,
        if r.torn_tail {
            "; torn tail ignored"
        } else {
            ""
        }
    );
    if let (Some(from), Some(left)) = (r.resumed_from, r.remaining) {
        out!(
            "resumed from the last checkpoint: {from} bytes were already merged, {left} copied now"
        );
    }
    if let Some(m) = &r.merge {
        out!(
            "verified: all {} copied runs read back from the ancestor with their BLAKE3",
            m.runs_verified
        );
    }
}

fn print_info(level: usize, i: &vhdmerge::disk::LayerInfo) {
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

fn print_plan(p: &merge::Plan) {
    out!("merge plan ({:?}):", p.format);
    for m in &p.merged {
        out!("  merge {}", m.display());
    }
    out!("  into  {}", p.ancestor.display());
    for c in &p.relink {
        out!("  re-link child {}", c.display());
    }
    for s in &p.siblings {
        out!(
            "  WARNING: sibling {} depends on the ancestor or an intermediate disk",
            s.display()
        );
    }
    out!(
        "  {} runs, {} bytes to copy; {} bytes overwritten in place",
        p.runs,
        p.bytes,
        p.overwrite_bytes
    );
    out!(
        "  {} new blocks ({} bytes); journal about {} bytes at {}",
        p.new_blocks,
        p.new_bytes,
        p.journal_estimate,
        p.journal.display()
    );
    out!(
        "  space needed {} bytes, free {} bytes",
        p.space_needed,
        p.free_space
    );
}
