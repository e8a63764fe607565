//! vhdmerge: read, write and merge VHD and VHDX differencing chains.
//!
//! Data flows one way: `io` (positioned I/O) → `format` (on-disk
//! structures) → `disk` (layers and chains) → `verify` (digests).

pub mod disk;
pub mod error;
pub mod failpoint;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod guid;
pub mod io;
pub mod journal;
pub mod merge;
pub mod paths;
pub mod recover;
pub mod transaction;
pub mod verify;

pub use disk::{Chain, ChainOptions};
pub use error::{Error, Result};
