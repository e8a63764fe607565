//! Named points where tests (and the demo) stop a real process:
//! `VHDMERGE_FAIL_AT=<name>` aborts the process when it reaches that point,
//! leaving the files exactly as a kill at that instant would.

pub fn failpoint(name: &str) {
    if std::env::var("VHDMERGE_FAIL_AT").is_ok_and(|s| s == name) {
        eprintln!("vhdmerge: failpoint {name}: aborting");
        std::process::abort();
    }
}
