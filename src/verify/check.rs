//! `vhdmerge check`: every structural rule of one file (and its link to its
//! parent), read-only, reported as findings rather than stopping at the first.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::disk::{Chain, ChainOptions, Format, open_layer};
use crate::error::Error;
use crate::format::vhd::{self as fv, Footer};
use crate::format::vhdx::header::Header;
use crate::format::vhdx::region::RegionTable;
use crate::format::vhdx::{FILE_SIGNATURE, HEADER_OFFSETS, REGION_OFFSETS};
use crate::io::{FileStorage, Src};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Clean,
    Corrupt,
    /// The check itself could not run to the end (I/O error, unsupported
    /// feature, missing parent).
    Incomplete,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub structure: String,
    pub offset: Option<u64>,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    pub format: Option<Format>,
    pub status: Status,
    pub checked: Vec<&'static str>,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    fn find(
        &mut self,
        structure: impl Into<String>,
        offset: Option<u64>,
        problem: impl Into<String>,
    ) {
        self.findings.push(Finding {
            structure: structure.into(),
            offset,
            problem: problem.into(),
        });
        if self.status == Status::Clean {
            self.status = Status::Corrupt;
        }
    }

    fn record_error(&mut self, e: Error) {
        match e {
            Error::Corrupt {
                structure,
                offset,
                detail,
                ..
            } => self.find(structure, Some(offset), detail),
            Error::ParentMismatch {
                expected,
                found,
                parent,
                ..
            } => self.find(
                "parent identity",
                None,
                format!(
                    "{} has {found}, the child expects {expected}",
                    parent.display()
                ),
            ),
            Error::ChainLoop { repeated, .. } => self.find(
                "parent locator",
                None,
                format!("the chain loops back to {}", repeated.display()),
            ),
            Error::ChainMismatch { detail, .. } => self.find("parent link", None, detail),
            other => {
                self.findings.push(Finding {
                    structure: "check".into(),
                    offset: None,
                    problem: other.to_string(),
                });
                self.status = Status::Incomplete;
            }
        }
    }
}

pub fn check(path: &Path, parent: Option<PathBuf>) -> CheckReport {
    let mut r = CheckReport {
        path: path.to_path_buf(),
        format: None,
        status: Status::Clean,
        checked: Vec::new(),
        findings: Vec::new(),
    };
    let layer = match open_layer(path, false) {
        Ok(l) => l,
        Err(e) => {
            r.record_error(e);
            return r;
        }
    };
    r.format = Some(layer.format());
    for w in layer.warnings() {
        r.find(w.structure, Some(w.offset), w.detail.clone());
    }
    let src = match FileStorage::open(path, false) {
        Ok(f) => Src::new(path, Box::new(f)),
        Err(e) => {
            r.record_error(e);
            return r;
        }
    };
    match layer.format() {
        Format::Vhdx => {
            r.checked.extend([
                "file identifier",
                "headers (both, CRC-32C)",
                "region tables (both, CRC-32C)",
                "log",
                "metadata items",
                "BAT entries (state, bounds, alignment, overlap)",
                "sector bitmap entries",
            ]);
            vhdx_extras(&src, &mut r);
        }
        Format::Vhd => {
            r.checked.extend([
                "footer (checksum)",
                "footer copy at offset 0",
                "dynamic header (checksum)",
                "BAT entries (bounds, overlap)",
            ]);
            vhd_extras(&src, &mut r);
        }
        Format::Raw => {}
    }
    drop(layer);
    r.checked.push("parent locator and identity");
    if let Err(e) = Chain::open(
        path,
        &ChainOptions {
            parent,
            ..Default::default()
        },
    ) {
        r.record_error(e);
    }
    r
}

fn vhdx_extras(src: &Src, r: &mut CheckReport) {
    let Ok(id) = src.read_vec(8, 0, "the file identifier") else {
        return;
    };
    if id != FILE_SIGNATURE {
        r.find("file identifier", Some(0), "signature is not 'vhdxfile'");
    }
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        if let Ok(b) = src.read_vec(4096, *off, "a header")
            && let Err(f) = Header::decode(&b)
        {
            r.find(format!("header {}", i + 1), Some(*off), f.to_string());
        }
    }
    let mut tables = Vec::new();
    for (i, off) in REGION_OFFSETS.iter().enumerate() {
        if let Ok(b) = src.read_vec(64 * 1024, *off, "a region table") {
            match RegionTable::decode(&b) {
                Ok(t) => tables.push(t),
                Err(e) => r.find(format!("region table copy {}", i + 1), Some(*off), e),
            }
        }
    }
    if tables.len() == 2 && tables[0] != tables[1] {
        r.find(
            "region table copy 2",
            Some(REGION_OFFSETS[1]),
            "differs from copy 1",
        );
    }
}

fn vhd_extras(src: &Src, r: &mut CheckReport) {
    let Ok(len) = src.len() else { return };
    let (Ok(tail), Ok(head)) = (
        src.read_vec(512, len.saturating_sub(512), "the footer"),
        src.read_vec(512, 0, "the footer copy"),
    ) else {
        return;
    };
    let Ok(f) = Footer::decode(&tail) else { return };
    if f.disk_type != fv::TYPE_FIXED && head != tail {
        r.find(
            "footer copy",
            Some(0),
            "the footer copy at offset 0 differs from the footer at the end of the file",
        );
    }
}
