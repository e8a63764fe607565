//! vhdmerge: read, write and merge VHD and VHDX differencing chains.
//!
//! Reading flows one way: `io` (positioned I/O) → `format` (on-disk
//! structures) → `disk` (layers and chains) → `verify` (digests).
//!
//! Merging adds the write side: `merge` plans a merge (runs, space,
//! siblings) and copies it through `journal::storage` (the write-ahead
//! rule) inside a `transaction` (Begin, checkpoints, commit, cleanup,
//! undo, redo), whose records `journal` frames and reads back. `recover`
//! finds a pending journal, decides from its state (`journal::State`,
//! `recover::decide`) and resumes, finishes or rolls back the merge.
//! `journal-format.md` specifies the bytes and the crash argument.
//!
//! `scan` reads whole folders: the files by content, the forest of
//! chains linked as `merge` links them, what is wrong, and a plan of
//! merges (`docs/scan.md`).
//!
//! `failpoint` names the points where tests stop a real process; the
//! `testing` feature adds `io::trace` (recording and fault injection) and
//! `fuzzing`, which only the tests and `fuzz/` use. The `vhdmerge` binary
//! (`src/main.rs`, `src/cli/`) is a thin layer over this library.

pub mod disk;
pub mod error;
pub mod failpoint;
pub mod format;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod guid;
pub mod io;
pub mod journal;
pub mod merge;
pub(crate) mod paths;
pub mod recover;
pub mod scan;
pub(crate) mod transaction;
pub mod verify;

pub use disk::{Chain, ChainOptions};
pub use error::{Error, Result};
