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

/// Whether the merge was started finish-only: its overwritten guest data
/// has no before-images, so it can only be finished (version 5).
pub fn finish_only(records: &[Record]) -> bool {
    records.iter().any(|r| matches!(r, Record::FinishOnly))
}

/// What a message says `recover --rollback` would do for a journal.
pub fn undo_hint(finish_only: bool) -> &'static str {
    match finish_only {
        true => "it was started with --finish-only, so it can only be finished",
        false => "`--rollback` undoes it",
    }
}

/// The merge's Plan record (version 2 journals).
pub fn plan(records: &[Record]) -> Option<&PlanRecord> {
    records.iter().find_map(|r| match r {
        Record::Plan(p) => Some(p),
        _ => None,
    })
}

/// Whether `found` is the identity Begin recorded for file `i`: as a
/// typed value from the Plan (version 2), or as Begin's text (version 1).
pub fn same_identity(records: &[Record], i: usize, found: &crate::disk::Identity) -> bool {
    match plan(records).and_then(|p| p.identities.get(i)) {
        Some(recorded) => recorded == found,
        None => match records.first() {
            Some(Record::Begin(b)) => b
                .files
                .get(i)
                .is_some_and(|f| f.identity == found.describe()),
            _ => false,
        },
    }
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
    let mode = match finish_only(&loaded.records) {
        true => ", finish-only",
        false => "",
    };
    format!(
        "merge of {child} into {ancestor} ({}{mode}{progress})",
        state.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Identity;
    use crate::journal::{Begin, FileEntry};

    fn begin(identity: &Identity) -> Record {
        Record::Begin(Begin {
            tool_version: "t".into(),
            files: vec![FileEntry {
                role: Role::Ancestor,
                path: "a.vhdx".into(),
                length: 0,
                identity: identity.describe(),
                fingerprint: String::new(),
            }],
            merged_levels: 1,
            data_write_guid: None,
            expected_digest: None,
            keep: false,
        })
    }

    /// Version 2 compares the typed value from the Plan, version 1 the text.
    #[test]
    fn identities_are_compared_as_recorded() {
        let a = Identity::VhdUniqueId(uuid::Uuid::from_u128(1));
        let b = Identity::VhdUniqueId(uuid::Uuid::from_u128(2));
        let v1 = vec![begin(&a)];
        assert!(same_identity(&v1, 0, &a) && !same_identity(&v1, 0, &b));
        let plan = Record::Plan(PlanRecord {
            digest: [0; 32],
            bytes: 0,
            identities: vec![a],
        });
        let v2 = vec![begin(&b), plan];
        assert!(same_identity(&v2, 0, &a) && !same_identity(&v2, 0, &b));
        // The typed value survives the journal's encoding.
        let enc = crate::journal::encode(1, &v2[1]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut all = crate::journal::encode(0, &v2[0]);
        all.extend_from_slice(&enc);
        std::fs::write(&p, &all).unwrap();
        assert_eq!(crate::journal::load(&p).unwrap().records, v2);
    }
}
