//! `vhdmerge`: parses the command line and hands each command to its
//! function in `cli`; the exit code says how it ended.

use std::process::ExitCode;

use clap::Parser;

use vhdmerge::Error;

#[macro_use]
mod cli;

use cli::args::{Cli, Cmd};

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
        Cmd::Info(a) => cli::disk::cmd_info(a),
        Cmd::Create(a) => cli::disk::cmd_create(a),
        Cmd::Export(a) => cli::disk::cmd_export(a, quiet),
        Cmd::Hash(a) => cli::disk::cmd_hash(a, quiet),
        Cmd::Merge(a) => cli::merge::cmd_merge(a, quiet),
        Cmd::Recover(a) => cli::merge::cmd_recover(a, quiet),
        Cmd::Verify(a) => cli::disk::cmd_verify(a, quiet),
        Cmd::Check(a) => cli::disk::cmd_check(a),
        Cmd::Scan(a) => cli::scan::cmd_scan(a),
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
