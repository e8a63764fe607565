//! The merge's memory, bounded in bytes. What a merge holds does not grow
//! with the disk's size, the block sizes or the share of overwrites:
//! besides the open layers' BATs, and the set of pages imaged since the
//! last checkpoint (a 64-bit word per 256 KiB of the ancestor the epoch
//! overwrote; an epoch is at most 1 GiB or 30 s of copying), each
//! consumer has a bound, enforced where its constant is defined:
//!
//! | consumer | bound | enforced by |
//! |---|---|---|
//! | read buffers and mapped reads: groups read, queued and being written, and buffers kept for reuse | `READ_BUFFERS` | `read::Buffers::reserve` (a group waits for room) |
//! | overwrites held until their before-images are durable | `HELD` | `journal::storage` (issued when the arena is full) |
//! | journal records appended and not yet written | `JOURNAL_PENDING` | `journal::Writer::append` (written to the file past it) |
//! | BAT and bitmap pages changed since the last commit | `METADATA` | `DurablePoints::after_copy` (an early commit) |
//! | stored pages read to be imaged | `IMAGE_READ` | `journal::storage` (reads of at most this) |
//! | a run of zeros written over data | `ZERO_RUN` | `plan::for_each_run` (runs of at most this) |
//! | runs read back behind the copy | `VERIFY_BEHIND` | `verify::verify_behind` (one buffer, each run read through it in pieces) |
//!
//! Verification after the commit reads through a pool of `READ_BUFFERS`,
//! once the copy's buffers are gone. The reads of `read::AHEAD` groups are
//! announced before they are made: the kernel reads them into the page
//! cache, outside the process; the process holds only their runs'
//! descriptions (at most 4096 runs of about 112 bytes a group), out of
//! the program's share below.

/// Read buffers and mapped reads, all groups together. A group holds at
/// most twice its data (a merged read kept whole or mapped is at least
/// half data, a mapping counted in whole pages) plus one
/// transient read of `read::MERGED_READ`; its data is at most
/// `read::GROUP_BYTES` plus one run.
pub(crate) const READ_BUFFERS: usize = 26 << 20;
pub(crate) const HELD: usize = crate::journal::storage::MAX_HELD;
/// One record past the spill threshold at most (the largest a merge
/// appends is a before-image of a page, or a Plan record).
pub(crate) const JOURNAL_PENDING: usize = crate::journal::SPILL_BYTES + (64 << 10);
/// One run past the early-commit threshold at most: a run of `PIECE`
/// bytes changes a few BAT and bitmap pages.
pub(crate) const METADATA: usize = super::MAX_PENDING_METADATA as usize + (64 << 10);
pub(crate) const IMAGE_READ: usize = crate::journal::storage::IMAGE_READ as usize;
pub(crate) const ZERO_RUN: usize = super::plan::PIECE as usize;
/// Pieces of page-cached data: large enough that a read costs little more
/// than its copy.
pub(crate) const VERIFY_BEHIND: usize = 512 << 10;

/// All of the above. With the program itself (code, stacks, allocator:
/// about 8 MiB) a merge stays within 64 MiB plus the BATs.
pub(crate) const TOTAL: usize =
    READ_BUFFERS + HELD + JOURNAL_PENDING + METADATA + IMAGE_READ + ZERO_RUN + VERIFY_BEHIND;

// Checked when the program is built.
const _: () = assert!(
    TOTAL <= 56 << 20,
    "the bounds leave 8 MiB of 64 to the program"
);
// The worst group `read::plan_reads` can make fits the read bound.
const _: () = assert!(
    2 * (super::read::GROUP_BYTES + super::plan::PIECE) + super::read::MERGED_READ
        <= READ_BUFFERS as u64
);
