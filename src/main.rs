//! `vhdmerge`: parses the command line and hands each command to its
//! function in `cli`; the exit code says how it ended.

use std::process::ExitCode;

use clap::Parser;

use vhdmerge::Error;
use vhdmerge::disk::create::CreateOptions;
use vhdmerge::merge::MergeOptions;
use vhdmerge::scan::ScanOptions;

#[macro_use]
mod cli;

use cli::args::{Cli, Cmd, VerifyArg};
use cli::disk::{Expected, HashKind};
use cli::merge::Show;

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

fn run(cli: Cli) -> cli::Exit {
    let quiet = cli.quiet;
    match cli.cmd {
        Cmd::Info {
            disk,
            chain,
            json,
            parent,
        } => cli::disk::cmd_info(&disk, chain, json, parent),
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
            let o = CreateOptions {
                size,
                format: None,
                block_size,
                logical_sector,
                physical_sector,
                fixed,
                parent,
            };
            cli::disk::cmd_create(&path, format, o)
        }
        Cmd::Export { disk, out, parent } => cli::disk::cmd_export(&disk, &out, parent, quiet),
        Cmd::Hash {
            disk,
            flat,
            manifest,
            json,
            parent,
        } => {
            let kind = match (flat, manifest) {
                (true, _) => HashKind::Flat,
                (false, Some(m)) => HashKind::Manifest(m),
                (false, None) => HashKind::Content,
            };
            cli::disk::cmd_hash(&disk, kind, json, parent, quiet)
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
                stop: None,
            };
            let show = Show {
                dry_run,
                json,
                quiet,
            };
            cli::merge::cmd_merge(&child, opts, show)
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
                ..Default::default()
            };
            let show = Show {
                dry_run: false,
                json,
                quiet,
            };
            cli::merge::cmd_recover(&disk, rollback, opts, show)
        }
        Cmd::Verify {
            disk,
            expect,
            manifest,
            json,
            parent,
        } => {
            let expected = match (manifest, expect) {
                (Some(m), _) => Expected::Manifest(m),
                (None, Some(d)) => Expected::Digest(d),
                (None, None) => unreachable!("clap requires one"),
            };
            cli::disk::cmd_verify(&disk, expected, json, parent, quiet)
        }
        Cmd::Check { disk, json, parent } => cli::disk::cmd_check(&disk, json, parent),
        Cmd::Scan {
            dirs,
            recursive,
            check,
            hash,
            speed,
            json,
        } => {
            let opts = ScanOptions {
                recursive,
                check,
                hash,
                speed: speed.max(1),
            };
            cli::scan::cmd_scan(&dirs, &opts, json)
        }
        Cmd::Demo => cli::demo::cmd_demo(),
    }
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
