//! The command line: every command, argument and default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes: 0 success; 1 the operation failed or was refused (the
/// message says why), or `check` could not finish; 2 `check` found
/// corruption, or `scan` an error; 64 wrong usage; 130 paused.
#[derive(Parser)]
#[command(
    name = "vhdmerge",
    version,
    about = "Read, check and merge VHD/VHDX differencing chains"
)]
pub struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Show a disk and every level of its chain.
    Info(InfoArgs),
    /// Create a dynamic or fixed disk, or a differencing child (--parent).
    Create(CreateArgs),
    /// Write the guest-visible disk of the whole chain to a sparse raw file.
    Export(ExportArgs),
    /// BLAKE3 of the guest-visible disk (VHD, VHDX chain, or raw file).
    Hash(HashArgs),
    /// Merge a differencing disk (and every disk up to ANCESTOR) into ANCESTOR, crash-safely.
    Merge(MergeArgs),
    /// Finish (resume from the last checkpoint) or roll back an interrupted merge.
    Recover(RecoverArgs),
    /// Compare a disk with an expected content digest or a manifest; name the ranges that differ.
    Verify(VerifyArgs),
    /// Check every structural rule of a file, read-only. Exit 0 clean, 2 corrupt, 1 could not check.
    Check(CheckArgs),
    /// Show the checkpoint trees of whole folders: chains, orphans, broken
    /// links, interrupted merges, and the merges that consolidate them.
    /// Read-only. Exit 0 when nothing is wrong, 2 when an error was found
    /// (broken link, pending merge, unreadable or damaged file), 1 when
    /// the scan could not run.
    Scan(ScanArgs),
    /// Build a small chain in a temporary folder and show what vhdmerge does.
    Demo,
}

#[derive(Args)]
pub struct InfoArgs {
    pub disk: PathBuf,
    /// Show every level of the chain (default: the top file and the links).
    #[arg(long)]
    pub chain: bool,
    #[arg(long)]
    pub json: bool,
    /// Use this file as the top file's parent instead of its locators.
    #[arg(long)]
    pub parent: Option<PathBuf>,
}

#[derive(Args)]
pub struct CreateArgs {
    pub path: PathBuf,
    /// Virtual size, e.g. 10G, 512M (not with --parent).
    #[arg(long, value_parser = parse_size, required_unless_present = "parent")]
    pub size: Option<u64>,
    /// Format; by default from the file extension (.vhdx/.avhdx or .vhd/.avhd).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Block size (VHDX 1M..256M, default 32M; VHD default 2M).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// VHDX logical sector size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub logical_sector: u64,
    /// VHDX physical sector size: 512 or 4096.
    #[arg(long, default_value_t = 4096)]
    pub physical_sector: u64,
    /// Fully allocated (fixed) disk.
    #[arg(long)]
    pub fixed: bool,
    /// Create a differencing child of this disk.
    #[arg(long)]
    pub parent: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    pub disk: PathBuf,
    pub out: PathBuf,
    #[arg(long)]
    pub parent: Option<PathBuf>,
}

#[derive(Args)]
pub struct HashArgs {
    pub disk: PathBuf,
    /// Plain BLAKE3 of the byte stream, equal to b3sum of a raw export.
    #[arg(long)]
    pub flat: bool,
    /// Also write the chunk manifest (docs/digest.md) to this file.
    #[arg(long, conflicts_with = "flat")]
    pub manifest: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub parent: Option<PathBuf>,
}

#[derive(Args)]
pub struct MergeArgs {
    pub child: PathBuf,
    /// The ancestor to merge into (default: the direct parent).
    #[arg(long)]
    pub into: Option<PathBuf>,
    /// Use this file as the child's parent instead of its locators.
    #[arg(long)]
    pub parent: Option<PathBuf>,
    /// Rename the merged files to NAME.merged instead of deleting them.
    #[arg(long)]
    pub keep: bool,
    /// Merge even though other disks depend on the ancestor or an intermediate disk.
    #[arg(long)]
    pub force: bool,
    /// Print the plan (runs, bytes, journal size, space needed) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Verify the whole merged disk (reads it twice) instead of every copied run.
    #[arg(long, value_enum, default_value = "runs")]
    pub verify: VerifyArg,
    /// Bytes copied between durability points.
    #[arg(long, value_parser = parse_size, default_value = "4G", hide = true)]
    pub batch: u64,
    /// Copied bytes between checkpoints (a crash or Ctrl-C loses at most
    /// this much work; checkpoints are also at most 30 s apart).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub checkpoint_every: u64,
    /// Copy every byte, even where the file system could share the merged
    /// files' blocks with the ancestor (XFS, btrfs reflink).
    #[arg(long)]
    pub copy: bool,
    /// Write no before-images of the ancestor's data the merge overwrites:
    /// faster when the child rewrites data the ancestor holds, but an
    /// interrupted merge can then only be finished (`recover`), never
    /// rolled back, and the merged files must stay unchanged until it is.
    #[arg(long)]
    pub finish_only: bool,
}

#[derive(Args)]
pub struct RecoverArgs {
    /// The ancestor of the interrupted merge (or any file it names).
    pub disk: PathBuf,
    /// Restore every file to its state when the merge began.
    #[arg(long)]
    pub rollback: bool,
    #[arg(long)]
    pub json: bool,
    /// Copied bytes between checkpoints while resuming.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub checkpoint_every: u64,
    #[arg(long, value_parser = parse_size, default_value = "4G", hide = true)]
    pub batch: u64,
}

#[derive(Args)]
pub struct VerifyArgs {
    pub disk: PathBuf,
    /// The expected content digest (from `vhdmerge hash`).
    #[arg(long, required_unless_present = "manifest")]
    pub expect: Option<String>,
    /// A manifest written by `vhdmerge hash --manifest`.
    #[arg(long, conflicts_with = "expect")]
    pub manifest: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub parent: Option<PathBuf>,
}

#[derive(Args)]
pub struct CheckArgs {
    pub disk: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub parent: Option<PathBuf>,
}

#[derive(Args)]
pub struct ScanArgs {
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Scan subfolders too (e.g. Snapshots/<GUID>/ of older hosts).
    #[arg(long, short)]
    pub recursive: bool,
    /// Run `check` on every file.
    #[arg(long)]
    pub check: bool,
    /// Compute the content digest of every leaf's chain.
    #[arg(long)]
    pub hash: bool,
    /// The merge speed the plan's time estimates assume, per second.
    #[arg(long, value_parser = parse_size, default_value = "200M")]
    pub speed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyArg {
    Runs,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Vhdx,
    Vhd,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
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
