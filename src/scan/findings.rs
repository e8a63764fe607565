//! What a scan reports as wrong, each with the command that deals with it.

use std::path::Path;
use std::time::Duration;

use super::forest::{Forest, LinkStatus, ParentLink, stat};
use super::{FileReport, Finding, JournalReport, Severity, quote};
use crate::error::{Error, list};
use crate::verify::check::Status;

/// A parent written this much later than its child is taken as written
/// after the child was made (file times of copies differ by less).
const NEWER_SLACK: Duration = Duration::from_secs(2);

/// A file that cannot be opened at all.
pub fn unopenable(path: &Path, e: &Error) -> Finding {
    let kind = match e {
        Error::Corrupt { .. } => "corrupt",
        Error::Unsupported { .. } => "unsupported",
        _ => "unreadable",
    };
    Finding::new(
        Severity::Error,
        kind,
        path,
        format!("cannot be opened: {e}"),
        vec![format!("vhdmerge check {}", quote(path))],
    )
}

/// Marks differencing files that nothing uses and that look left behind.
pub fn orphans(f: &Forest, files: &mut [FileReport]) {
    for (i, n) in f.nodes.iter().enumerate() {
        if !n.children.is_empty() || !n.differencing() || n.pending.is_some() {
            continue;
        }
        let name = n.path.to_string_lossy();
        let link = n.link.as_ref().expect("differencing files have a link");
        let reason = if name.ends_with(".merged") {
            Some("`vhdmerge merge --keep` renamed it after merging it: its data is in its parent now".to_string())
        } else if n.parent.is_none() {
            Some(format!(
                "no file uses it, its parent link is broken ({}) and no scanned file has the identity it expects: a merge that finished without deleting it, or a parent replaced since, leaves such files",
                link.status.describe()
            ))
        } else if let Some(p) = n.parent
            && f.nodes[p].children.len() > 1
            && newer(f, p, i)
        {
            Some(format!(
                "no file uses it, and its parent {} was written after it and has other children: the other branch is probably the one in use",
                f.nodes[p].path.display()
            ))
        } else {
            None
        };
        files[i].possibly_orphaned = reason;
    }
}

/// Whether file `a` was modified clearly after file `b`.
fn newer(f: &Forest, a: usize, b: usize) -> bool {
    match (f.nodes[a].stat, f.nodes[b].stat) {
        (Some((_, Some(ta))), Some((_, Some(tb)))) => ta > tb + NEWER_SLACK,
        _ => false,
    }
}

/// Every finding about the files and journals, apart from open errors.
pub fn of_files(f: &Forest, files: &[FileReport], journals: &[JournalReport]) -> Vec<Finding> {
    let mut out = Vec::new();
    for j in journals {
        out.push(journal(j));
    }
    for (i, n) in f.nodes.iter().enumerate() {
        let r = &files[i];
        let pending = n.pending.map(|j| &journals[j]);
        let broken = n.link.as_ref().and_then(|l| link_finding(f, i, l, pending));
        out.extend(broken);
        if let Some(why) = &r.possibly_orphaned {
            out.push(orphan(&n.path, why));
        }
        if let Some(p) = n.parent
            && n.link.as_ref().is_some_and(|l| l.status.usable())
            && newer(f, p, i)
            && r.possibly_orphaned.is_none()
        {
            out.push(Finding::new(
                Severity::Warning,
                "parent_newer",
                &n.path,
                format!(
                    "its parent {} was modified after it: a parent must not change while a child uses it. If something wrote into the parent, this disk no longer reads as it did",
                    f.nodes[p].path.display()
                ),
                vec![format!("vhdmerge check {}", quote(&n.path))],
            ));
        }
        out.extend(file_state(n.path.as_path(), r));
        if n.children.len() > 1 {
            out.push(Finding::new(
                Severity::Warning,
                "branches",
                &n.path,
                format!(
                    "{} disks depend on it ({}): each is a branch of the checkpoint tree, and `merge` refuses to write into it while more than one exists",
                    n.children.len(),
                    n.children
                        .iter()
                        .map(|&c| f.nodes[c].path.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                vec![],
            ));
        }
    }
    out
}

/// A file that looks left behind. A warning: only its owner can tell.
fn orphan(path: &Path, why: &str) -> Finding {
    Finding::new(
        Severity::Warning,
        "possibly_orphaned",
        path,
        format!("possibly orphaned: {why}"),
        vec![
            format!("vhdmerge info {}", quote(path)),
            format!("rm {}  # once nothing needs it", quote(path)),
        ],
    )
}

/// The log, checksum and `check` state of one file.
fn file_state(path: &Path, r: &FileReport) -> Vec<Finding> {
    let mut out = Vec::new();
    let check_cmd = vec![format!("vhdmerge check {}", quote(path))];
    // A file an interrupted merge was writing has a live log; recover
    // deals with it.
    if r.unreplayed_log_entries > 0 && r.pending_journal.is_none() {
        out.push(Finding::new(
            Severity::Warning,
            "dirty_log",
            path,
            format!(
                "its VHDX log holds entries not yet written into the file ({}; it was not closed cleanly). Readers, this scan included, replay them in memory; the first writer replays them into the file (a merge into it does, Hyper-V does when the VM starts)",
                r.unreplayed_log_entries
            ),
            check_cmd.clone(),
        ));
    }
    for w in &r.warnings {
        out.push(Finding::new(
            Severity::Error,
            "damaged",
            path,
            format!("{w}; it can be read, but `merge` refuses to write it or merge it: restore it from a backup"),
            check_cmd.clone(),
        ));
    }
    if let Some(c) = &r.check
        && c.status != Status::Clean
    {
        let first = c
            .findings
            .first()
            .map(|x| format!("{}: {}", x.structure, x.problem))
            .unwrap_or_default();
        out.push(Finding::new(
            Severity::Error,
            "check_failed",
            path,
            format!(
                "check: {:?} with {} findings; the first: {first}",
                c.status,
                c.findings.len()
            ),
            check_cmd,
        ));
    }
    out
}

fn journal(j: &JournalReport) -> Finding {
    match (&j.error, &j.ancestor) {
        (None, Some(a)) => Finding::new(
            Severity::Error,
            "pending_merge",
            &j.path,
            format!(
                "an interrupted {}; until it is recovered its files do not read as either the old or the new chain",
                j.summary
            ),
            vec![
                format!("vhdmerge recover {}", quote(a)),
                format!(
                    "vhdmerge recover --rollback {}  # to undo it instead",
                    quote(a)
                ),
            ],
        ),
        _ => Finding::new(
            Severity::Error,
            "unreadable_journal",
            &j.path,
            format!(
                "a vhdmerge journal that cannot be read ({}); `recover` on the disk it covers says what to do",
                j.error.as_deref().unwrap_or("no Begin record")
            ),
            vec![],
        ),
    }
}

/// The finding for a link that is not plainly fine.
fn link_finding(
    f: &Forest,
    i: usize,
    link: &ParentLink,
    pending: Option<&JournalReport>,
) -> Option<Finding> {
    let child = &f.nodes[i].path;
    let (kind, mut message) = describe_link(link)?;
    if link.status == LinkStatus::ByFileName {
        return Some(Finding::new(
            Severity::Warning,
            kind,
            child,
            message,
            vec![],
        ));
    }
    let mut commands = vec![];
    if let Some(j) = pending {
        message.push_str(&format!(
            ". The interrupted merge of {} changed the files it names: recover it first",
            j.path.display()
        ));
        if let Some(a) = &j.ancestor {
            commands.push(format!("vhdmerge recover {}", quote(a)));
        }
    } else if let Some(p) = &link.use_parent {
        message.push_str(&format!(
            ". {} has the identity it expects: name it with --parent",
            p.display()
        ));
        let (c, p) = (quote(child), quote(p));
        commands.push(format!("vhdmerge info {c} --parent {p} --chain"));
        commands.push(format!("vhdmerge merge {c} --parent {p}"));
    } else {
        message.push_str(
            ". No scanned file has that identity: restore the parent from a backup or name it with --parent",
        );
    }
    Some(Finding::new(
        Severity::Error,
        kind,
        child,
        message,
        commands,
    ))
}

/// A finding's kind and what it says of a link, or `None` for a link that
/// is fine.
fn describe_link(link: &ParentLink) -> Option<(&'static str, String)> {
    let found = link.parent.as_deref().map(|p| p.display().to_string());
    let found = found.unwrap_or_default();
    let how = link.found_by.as_deref().unwrap_or_default();
    let detail = link.detail.as_deref().unwrap_or_default();
    Some(match link.status {
        LinkStatus::Ok => return None,
        LinkStatus::ByFileName => (
            "parent_by_file_name",
            format!(
                "its parent {found} was found only by file name ({how}); the locator paths {} do not lead to it. `merge` follows the same fallback, other tools may not",
                list(&link.tried)
            ),
        ),
        LinkStatus::Missing => (
            "parent_missing",
            format!(
                "its parent is missing: no locator leads to a file (looked at {}); it expects {}",
                list(&link.tried),
                link.expected
            ),
        ),
        LinkStatus::WrongIdentity => (
            "parent_wrong_identity",
            format!(
                "the locator ({how}) leads to {found}, which has {} but the child expects {}: the parent was written after the child was made (merged into, or started as a VM), or it is another disk of the same name",
                link.found.as_deref().unwrap_or_default(),
                link.expected
            ),
        ),
        LinkStatus::Mismatch => (
            match detail.contains("mix") {
                true => "mixed_formats",
                false => "parent_mismatch",
            },
            format!("cannot chain to {found}: {detail}"),
        ),
        LinkStatus::Unreadable => (
            "parent_unreadable",
            format!("its parent {found} cannot be opened: {detail}"),
        ),
        LinkStatus::Loop => ("loop", detail.to_string()),
    })
}

/// Files whose size or modification time changed while the scan ran.
pub fn changed_during_scan(f: &Forest) -> Vec<Finding> {
    f.nodes
        .iter()
        .filter(|n| n.stat.is_some() && stat(&n.path) != n.stat)
        .map(|n| {
            Finding::new(
                Severity::Warning,
                "changed_during_scan",
                &n.path,
                "the file changed while it was scanned: something is using the disks. Stop the VM (or the program) and scan again".into(),
                vec![],
            )
        })
        .collect()
}
