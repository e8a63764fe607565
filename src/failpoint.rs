//! Named points where tests (and the demo) stop a real process:
//! `VHDMERGE_FAIL_AT=<name>` aborts the process when it reaches that point,
//! leaving the files exactly as a kill at that instant would.
//!
//! `VHDMERGE_PAUSE_AT=<name>` with `VHDMERGE_PAUSE_FILE=<path>` instead
//! creates that file at the point and waits until it is removed, so that a
//! test can act on the disks mid-merge as another program would (replace a
//! file, append to it) and then let the merge go on.

use std::path::PathBuf;

pub fn failpoint(name: &str) {
    pause(name);
    if std::env::var("VHDMERGE_FAIL_AT").is_ok_and(|s| s == name) {
        eprintln!("vhdmerge: failpoint {name}: aborting");
        std::process::abort();
    }
}

fn pause(name: &str) {
    if !std::env::var("VHDMERGE_PAUSE_AT").is_ok_and(|s| s == name) {
        return;
    }
    let Some(flag) = std::env::var_os("VHDMERGE_PAUSE_FILE").map(PathBuf::from) else {
        return;
    };
    if std::fs::write(&flag, name).is_err() {
        return;
    }
    while flag.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
