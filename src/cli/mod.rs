//! The `vhdmerge` command line over the library: `args` holds every
//! command and option, one `cmd_*` function per command turns them into
//! library calls, and this file holds the output helpers they share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use indicatif::{ProgressBar, ProgressStyle};

use vhdmerge::{Chain, ChainOptions, Error, recover};

/// println! that ends quietly when stdout is closed (e.g. piped into `head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

pub mod args;
pub mod demo;
pub mod disk;
pub mod merge;
pub mod scan;

/// What a command ends with: its exit code (errors are `Err`).
pub type Exit = Result<u8, Error>;

/// Prints a value as pretty JSON.
fn print_json(v: &impl serde::Serialize) {
    out!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn chain_options(parent: Option<PathBuf>) -> ChainOptions {
    ChainOptions {
        parent,
        ..Default::default()
    }
}

fn open_chain(disk: &Path, parent: Option<PathBuf>) -> Result<Chain, Error> {
    Chain::open(disk, &chain_options(parent))
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
                "{} ({}); `vhdmerge recover` continues it, {}",
                vhdmerge::journal::state::summary(&l),
                j.display(),
                vhdmerge::journal::state::undo_hint(vhdmerge::journal::state::finish_only(
                    &l.records
                ))
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

/// A page of a merged file that the merge maps to read it (`io::mapped`)
/// and that then cannot be read (another program truncated the file, or
/// the disk failed) raises SIGBUS where it is touched, and that access
/// cannot go on. The process ends there as in a power cut, which the
/// journal is made for: it says how to go on and exits 135 (128 + SIGBUS,
/// what a shell shows for a process the signal killed).
fn exit_on_bus_error(ancestor: &Path) {
    let msg = format!(
        "\nvhdmerge: error: stopped by SIGBUS: a file the merge reads could not be read \
         (truncated by another program, or a disk error). The merge is interrupted as in \
         a power cut: `vhdmerge recover {}` goes on from its last checkpoint (or rolls it \
         back, if the merged files changed)\n",
        ancestor.display()
    );
    let msg: &'static [u8] = Box::leak(msg.into_bytes().into_boxed_slice());
    let action = move || {
        // SAFETY: write(2) of a buffer that lives for the whole process.
        let _ = unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        signal_hook::low_level::exit(135);
    };
    // SAFETY: the action only calls write(2) and _exit(2), both
    // async-signal-safe; it neither allocates nor takes a lock.
    let _ = unsafe { signal_hook::low_level::register(signal_hook::consts::SIGBUS, action) };
}

/// A byte count in IEC units ("1.5 GiB", "512 B").
pub fn iec(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn iec_units() {
        assert_eq!(super::iec(0), "0 B");
        assert_eq!(super::iec(1023), "1023 B");
        assert_eq!(super::iec(1024), "1 KiB");
        assert_eq!(super::iec(1536 << 20), "1.5 GiB");
        assert_eq!(super::iec(8 << 30), "8 GiB");
        assert_eq!(super::iec(200 << 20), "200 MiB");
    }

    #[test]
    fn sizes_parse_with_iec_suffixes() {
        use super::args::parse_size;
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("3X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
