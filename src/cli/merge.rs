//! The commands that write: merge and recover.

use std::path::Path;

use vhdmerge::merge::{self, MergeOptions, Plan};
use vhdmerge::recover::{self, Outcome, RecoverReport};

use super::args::{MergeArgs, RecoverArgs, VerifyArg};
use super::{Exit, bar, exit_on_bus_error, print_json, stop_on_signals};

/// What `merge` shows besides doing it.
struct Show {
    dry_run: bool,
    json: bool,
    quiet: bool,
}

pub fn cmd_merge(a: MergeArgs, quiet: bool) -> Exit {
    let opts = MergeOptions {
        into: a.into,
        parent: a.parent,
        keep: a.keep,
        force: a.force,
        batch_bytes: a.batch,
        verify_full: a.verify == VerifyArg::Full,
        checkpoint_bytes: a.checkpoint_every.max(1),
        stop: Some(stop_on_signals()),
        share: !a.copy,
        finish_only: a.finish_only,
    };
    let show = Show {
        dry_run: a.dry_run,
        json: a.json,
        quiet,
    };
    let prepared = merge::prepare(&a.child, &opts)?;
    if show.dry_run {
        match show.json {
            true => print_json(&prepared.plan),
            false => print_plan(&prepared.plan),
        }
        return Ok(0);
    }
    if opts.stop_requested() {
        eprintln!("vhdmerge: interrupted before the merge began; nothing was written");
        return Ok(130);
    }
    exit_on_bus_error(&prepared.plan.ancestor);
    let pb = bar(show.quiet || show.json, prepared.plan.bytes, "merge");
    let report = merge::execute(prepared, &opts, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    if show.json {
        print_json(&report);
        return Ok(0);
    }
    out!(
        "merged {} bytes in {} runs into {} ({:.1} s, journal {} bytes)",
        report.plan.bytes,
        report.plan.runs,
        report.plan.ancestor.display(),
        report.seconds,
        report.journal_bytes
    );
    let s = &report.sharing;
    if s.cloned_bytes > 0 {
        out!(
            "cloned {} bytes (blocks shared with the merged files), copied {} bytes",
            s.cloned_bytes,
            s.copied_bytes
        );
    }
    for c in &report.plan.relink {
        out!(
            "re-linked {} to {}",
            c.display(),
            report.plan.ancestor.display()
        );
    }
    match &report.result_digest {
        Some(d) => out!("verified: content digest {d} equals the child's view before the merge"),
        None if s.cloned_bytes > 0 => out!(
            "verified: all {} runs read back from the ancestor as they read in the child (cloned ones proven on the same blocks)",
            report.runs_verified
        ),
        None => out!(
            "verified: all {} copied runs read back from the ancestor with their BLAKE3",
            report.runs_verified
        ),
    }
    Ok(0)
}

fn print_plan(p: &Plan) {
    out!("merge plan ({:?}):", p.format);
    for m in &p.merged {
        out!("  merge {}", m.display());
    }
    out!("  into  {}", p.ancestor.display());
    for c in &p.relink {
        out!("  re-link child {}", c.display());
    }
    for s in &p.siblings {
        out!(
            "  WARNING: sibling {} depends on the ancestor or an intermediate disk",
            s.display()
        );
    }
    out!(
        "  {} runs, {} bytes to copy; {} bytes overwritten in place",
        p.runs,
        p.bytes,
        p.overwrite_bytes
    );
    out!(
        "  {} new blocks ({} bytes); journal about {} bytes at {}",
        p.new_blocks,
        p.new_bytes,
        p.journal_estimate,
        p.journal.display()
    );
    out!(
        "  space needed {} bytes, free {} bytes{}",
        p.space_needed,
        p.free_space,
        match p.cloning {
            true => " (data and before-images will be cloned: the file system shares blocks)",
            false => "",
        }
    );
}

pub fn cmd_recover(a: RecoverArgs, quiet: bool) -> Exit {
    let opts = MergeOptions {
        batch_bytes: a.batch,
        checkpoint_bytes: a.checkpoint_every.max(1),
        stop: Some(stop_on_signals()),
        ..Default::default()
    };
    let (disk, json) = (a.disk.as_path(), a.json);
    exit_on_bus_error(disk);
    let pb = bar(quiet || json, 0, "resume");
    let r = recover::recover_with(disk, a.rollback, &opts, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    match json {
        true => print_json(&r),
        false => print_recovery(disk, &r),
    }
    Ok(0)
}

fn print_recovery(disk: &Path, r: &RecoverReport) {
    let what = match r.outcome {
        Outcome::NothingToRecover => {
            out!("{}: nothing to recover", disk.display());
            return;
        }
        Outcome::Finished => "finished the merge",
        Outcome::RolledBack => "rolled back to the state before the merge",
    };
    out!(
        "{what} (journal said: {}; {} before-images; {} runs redone{})",
        r.state,
        r.before_images,
        r.redone_runs,
        if r.torn_tail {
            "; torn tail ignored"
        } else {
            ""
        }
    );
    if let (Some(from), Some(left)) = (r.resumed_from, r.remaining) {
        out!(
            "resumed from the last checkpoint: {from} bytes were already merged, {left} copied now"
        );
    }
    if let Some(m) = &r.merge {
        out!(
            "verified: all {} copied runs read back from the ancestor with their BLAKE3",
            m.runs_verified
        );
    }
}
