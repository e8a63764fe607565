//! `vhdmerge scan` for people: the trees drawn as `cargo tree` draws them,
//! then the findings with their commands, then the plan.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use vhdmerge::scan::{self as lib, FileReport, Finding, Report, ScanOptions, Severity, Step};

use super::args::ScanArgs;
use super::{Exit, iec, print_json};

/// Exit 0 when no finding is an error, 2 when one is.
pub fn cmd_scan(a: ScanArgs) -> Exit {
    let opts = ScanOptions {
        recursive: a.recursive,
        check: a.check,
        hash: a.hash,
        speed: a.speed.max(1),
    };
    let r = lib::scan(&a.dirs, &opts)?;
    match a.json {
        true => print_json(&r),
        false => out!("{}", render(&r).trim_end()),
    }
    Ok(match r.worst() {
        Some(Severity::Error) => 2,
        _ => 0,
    })
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    let by_path: HashMap<&Path, &FileReport> =
        r.files.iter().map(|f| (f.path.as_path(), f)).collect();
    let _ = writeln!(
        s,
        "scanned {}: {}, {}",
        r.scanned
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        count(
            r.files.iter().filter(|f| !f.outside_scan).count(),
            "disk image"
        ),
        count(r.journals.len(), "journal")
    );
    let mut roots: Vec<&FileReport> = r.files.iter().filter(|f| f.parent.is_none()).collect();
    roots.sort_by(|a, b| a.path.cmp(&b.path));
    for root in roots {
        s.push('\n');
        node(&mut s, &by_path, root, "", "", None);
    }
    findings(&mut s, &r.findings);
    plan(&mut s, &r.plan, r.assumed_speed);
    s
}

/// One file's line and its children below it, indented.
fn node(
    s: &mut String,
    by_path: &HashMap<&Path, &FileReport>,
    f: &FileReport,
    lead: &str,
    rest: &str,
    parent: Option<&Path>,
) {
    let name = match (parent, f.path.parent(), f.path.file_name()) {
        (Some(p), Some(dir), Some(n)) if p.parent() == Some(dir) => PathBuf::from(n),
        _ => f.path.clone(),
    };
    let _ = writeln!(s, "{lead}{}  {}", name.display(), describe(f));
    if let Some(d) = &f.content_digest {
        let _ = writeln!(s, "{rest}    content digest {d}");
    }
    let mut kids: Vec<&FileReport> = f
        .children
        .iter()
        .filter_map(|c| by_path.get(c.as_path()).copied())
        .collect();
    kids.sort_by(|a, b| a.path.cmp(&b.path));
    for (k, kid) in kids.iter().enumerate() {
        let last = k + 1 == kids.len();
        let (l, r) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        node(
            s,
            by_path,
            kid,
            &format!("{rest}{l}"),
            &format!("{rest}{r}"),
            Some(&f.path),
        );
    }
}

/// "VHDX differencing, 8 GiB virtual, …  [tags]".
fn describe(f: &FileReport) -> String {
    let mut d = match (f.format, f.kind) {
        (Some(fmt), Some(kind)) => format!(
            "{} {}, {} virtual, {} file, {} allocated",
            format!("{fmt:?}").to_uppercase(),
            format!("{kind:?}").to_lowercase(),
            iec(f.virtual_size.unwrap_or(0)),
            iec(f.file_size.unwrap_or(0)),
            iec(f.allocated_bytes.unwrap_or(0)),
        ),
        _ => format!("unreadable, {} file", iec(f.file_size.unwrap_or(0))),
    };
    if let Some(m) = &f.merge_into_parent {
        let _ = write!(d, "; merging into its parent copies {}", iec(m.bytes));
    }
    let mut tags = Vec::new();
    if f.children.is_empty() && f.format.is_some() {
        tags.push("leaf".to_string());
    }
    if f.outside_scan {
        tags.push("outside the scanned folders".into());
    }
    if let Some(l) = &f.link
        && !l.status.usable()
    {
        let mut t = l.status.describe().to_string();
        if f.pending_journal.is_some() {
            t.push_str(" while a merge is pending");
        } else if f.parent.is_some() {
            t.push_str(", shown under the file with its identity (--parent)");
        }
        tags.push(t);
    }
    if f.pending_journal.is_some() {
        tags.push("in an interrupted merge".into());
    }
    if f.possibly_orphaned.is_some() {
        tags.push("possibly orphaned".into());
    }
    if f.unreplayed_log_entries > 0 {
        tags.push("dirty log".into());
    }
    if !f.warnings.is_empty() {
        tags.push("damaged".into());
    }
    if let Some(c) = &f.check {
        tags.push(format!("check: {:?}", c.status).to_lowercase());
    }
    for t in tags {
        let _ = write!(d, "  [{t}]");
    }
    d
}

/// "1 journal", "2 journals".
fn count(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

fn findings(s: &mut String, list: &[Finding]) {
    if list.is_empty() {
        let _ = writeln!(s, "\nno findings");
        return;
    }
    let count = |sev| list.iter().filter(|f| f.severity == sev).count();
    let _ = writeln!(
        s,
        "\nfindings (errors: {}, warnings: {}):",
        count(Severity::Error),
        count(Severity::Warning)
    );
    for f in list {
        let sev = format!("{:?}", f.severity).to_lowercase();
        let _ = writeln!(s, "  {sev:<7} {} {}", f.kind, f.path.display());
        let _ = writeln!(s, "          {}", f.message);
        for c in &f.commands {
            let _ = writeln!(s, "          $ {c}");
        }
    }
}

fn plan(s: &mut String, steps: &[Step], speed: u64) {
    let runnable: Vec<&Step> = steps.iter().filter(|p| p.blocked_by.is_empty()).collect();
    if steps.is_empty() {
        let _ = writeln!(s, "\nplan: nothing to merge");
        return;
    }
    let _ = writeln!(s, "\nplan (run in this order):");
    for (k, p) in runnable.iter().enumerate() {
        let _ = writeln!(s, "  {}. {}", k + 1, p.command);
        let _ = writeln!(s, "       {}", step_size(p, speed));
    }
    for p in steps.iter().filter(|p| !p.blocked_by.is_empty()) {
        let _ = writeln!(s, "  blocked: {}", p.command);
        let _ = writeln!(
            s,
            "       by {}. {}",
            p.blocked_by
                .iter()
                .map(|b| b.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            p.note
        );
    }
}

fn step_size(p: &Step, speed: u64) -> String {
    if p.action == "recover" {
        return p.note.clone();
    }
    let free = p.free_space.map(iec).unwrap_or_else(|| "unknown".into());
    let mut t = format!(
        "copies {} ({} over data the target holds); needs {} free beside it, {} free now; about {:.0} s at {}/s",
        iec(p.bytes),
        iec(p.overwrite_bytes),
        iec(p.space_needed),
        free,
        p.estimate_seconds.ceil(),
        iec(speed)
    );
    if !p.note.is_empty() {
        let _ = write!(t, "; {}", p.note);
    }
    t
}
