//! What a journal says: the transaction's state, computed from its records
//! alone (`journal-format.md` §3), and a one-line summary for messages.

use super::{Checkpoint, Loaded, PlanRecord, Record, Role};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Copying or re-linking; `checkpoint` is the last durable Checkpoint
    /// record with its index among the records.
    Applying {
        checkpoint: Option<(usize, Checkpoint)>,
    },
    /// Every write of the merge is durable; cleanup has not begun.
    Committed,
    /// The merged files are being deleted: only finishing is possible.
    CleaningUp,
    /// An explicit rollback began: only rolling back is possible.
    RollingBack,
}

impl State {
    pub fn of(records: &[Record]) -> State {
        let has = |f: fn(&Record) -> bool| records.iter().any(f);
        if has(|r| matches!(r, Record::RollbackStarted)) {
            State::RollingBack
        } else if has(|r| matches!(r, Record::CleanupStarted)) {
            State::CleaningUp
        } else if has(|r| matches!(r, Record::Committed)) {
            State::Committed
        } else {
            let checkpoint = records.iter().enumerate().rev().find_map(|(i, r)| match r {
                Record::Checkpoint(c) => Some((i, c.clone())),
                _ => None,
            });
            State::Applying { checkpoint }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            State::Applying { checkpoint: None } => "applying",
            State::Applying {
                checkpoint: Some(_),
            } => "applying, checkpointed",
            State::Committed => "committed",
            State::CleaningUp => "cleaning up",
            State::RollingBack => "rolling back",
        }
    }
}

/// The merge's Plan record (version 2 journals).
pub fn plan(records: &[Record]) -> Option<&PlanRecord> {
    records.iter().find_map(|r| match r {
        Record::Plan(p) => Some(p),
        _ => None,
    })
}

/// "merge of A into B (applying, checkpointed: 40.0 % durable)": what a
/// refusal or `info` says of a pending journal.
pub fn summary(loaded: &Loaded) -> String {
    let Some(Record::Begin(b)) = loaded.records.first() else {
        return "a journal without Begin".into();
    };
    let name = |role: fn(&Role) -> bool| {
        b.files
            .iter()
            .find(|f| role(&f.role))
            .map(|f| f.path.clone())
            .unwrap_or_default()
    };
    let child = name(|r| *r == Role::Merged { level: 0 });
    let ancestor = name(|r| *r == Role::Ancestor);
    let state = State::of(&loaded.records);
    let progress = match (&state, plan(&loaded.records)) {
        (
            State::Applying {
                checkpoint: Some((_, c)),
            },
            Some(p),
        ) if p.bytes > 0 => format!(
            ": {:.1} % durable ({} of {} bytes)",
            c.bytes_done as f64 * 100.0 / p.bytes as f64,
            c.bytes_done,
            p.bytes
        ),
        (State::Applying { checkpoint: None }, _) => ": no checkpoint yet".into(),
        _ => String::new(),
    };
    format!(
        "merge of {child} into {ancestor} ({}{progress})",
        state.name()
    )
}
