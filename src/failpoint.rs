//! Named points where tests (and the demo) stop a real process:
//! `VHDMERGE_FAIL_AT=<name>` aborts the process when it reaches that point,
//! leaving the files exactly as a kill at that instant would.
//!
//! `VHDMERGE_PAUSE_AT=<name>` with `VHDMERGE_PAUSE_FILE=<path>` instead
//! creates that file at the point and waits until it is removed, so that a
//! test can act on the disks mid-merge as another program would (replace a
//! file, append to it) and then let the merge go on.

use std::fmt;
use std::path::PathBuf;

/// The points, in the order a merge and a recovery meet them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// Begin and Plan are durable; nothing else is written.
    AfterBegin,
    /// After the first commit of a copy phase.
    MidApply,
    /// After the Nth commit of a copy phase (1 = the first).
    AfterBatch(u64),
    /// The copy is done; the ancestor's write session is still open.
    BeforeClose,
    /// The copy is done and closed.
    AfterApply,
    /// One child re-linked, the others not.
    MidRelink,
    /// Committed is durable; nothing is deleted yet.
    AfterCommit,
    /// One merged file removed, the others not.
    MidCleanup,
    /// A rollback restored some before-images.
    MidRollback,
    /// RollbackStarted is durable; nothing is restored yet.
    RecoverAfterRollbackMark,
    /// A resume undid what followed its checkpoint; it copies next.
    AfterPartialUndo,
    /// A VHDX log entry is written and flushed, not yet applied.
    VhdxLogWritten,
}

impl Failpoint {
    /// Every point once (`AfterBatch` with its first batch).
    pub const ALL: [Failpoint; 12] = [
        Failpoint::AfterBegin,
        Failpoint::MidApply,
        Failpoint::AfterBatch(1),
        Failpoint::BeforeClose,
        Failpoint::AfterApply,
        Failpoint::MidRelink,
        Failpoint::AfterCommit,
        Failpoint::MidCleanup,
        Failpoint::MidRollback,
        Failpoint::RecoverAfterRollbackMark,
        Failpoint::AfterPartialUndo,
        Failpoint::VhdxLogWritten,
    ];

    /// Whether every merge of a VHDX chain passes this point (re-linking
    /// needs a child to re-link; the others belong to recovery).
    pub fn in_every_merge(self) -> bool {
        !matches!(
            self,
            Failpoint::MidRelink
                | Failpoint::MidRollback
                | Failpoint::RecoverAfterRollbackMark
                | Failpoint::AfterPartialUndo
        )
    }
}

/// The name `VHDMERGE_FAIL_AT` and `VHDMERGE_PAUSE_AT` take.
impl fmt::Display for Failpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Failpoint::AfterBegin => "after-begin",
            Failpoint::MidApply => "mid-apply",
            Failpoint::AfterBatch(n) => return write!(f, "after-batch-{n}"),
            Failpoint::BeforeClose => "before-close",
            Failpoint::AfterApply => "after-apply",
            Failpoint::MidRelink => "mid-relink",
            Failpoint::AfterCommit => "after-commit",
            Failpoint::MidCleanup => "mid-cleanup",
            Failpoint::MidRollback => "mid-rollback",
            Failpoint::RecoverAfterRollbackMark => "recover-after-rollback-mark",
            Failpoint::AfterPartialUndo => "after-partial-undo",
            Failpoint::VhdxLogWritten => "vhdx-log-written",
        };
        f.write_str(name)
    }
}

/// Aborts or pauses here when the environment names this point.
pub fn failpoint(point: Failpoint) {
    let asks = |var: &str| std::env::var(var).is_ok_and(|s| s == point.to_string());
    if asks("VHDMERGE_PAUSE_AT") {
        pause(&point.to_string());
    }
    if asks("VHDMERGE_FAIL_AT") {
        eprintln!("vhdmerge: failpoint {point}: aborting");
        std::process::abort();
    }
}

fn pause(name: &str) {
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

#[cfg(test)]
mod tests {
    use super::Failpoint;

    #[test]
    fn names_are_distinct_and_stable() {
        let names: Vec<String> = Failpoint::ALL.iter().map(|p| p.to_string()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(Failpoint::AfterBatch(7).to_string(), "after-batch-7");
        assert_eq!(Failpoint::MidApply.to_string(), "mid-apply");
    }
}
