//! Journal records. Their payloads are bincode 2 (legacy configuration:
//! fixed-width little-endian integers, u64 lengths) of these types.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The disk that receives the merged data.
    Ancestor,
    /// A disk merged into the ancestor (level 0 = the child named on the command line).
    Merged { level: u32 },
    /// A child of the merged child, re-linked to the ancestor.
    Relinked,
}

/// One file of the transaction, with what proves it is the same file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub role: Role,
    pub path: String,
    /// Length when the merge began; rollback truncates back to it.
    pub length: u64,
    /// VHDX DataWriteGuid or VHD unique id at the start, as text.
    pub identity: String,
    /// BLAKE3 of the first 4 KiB and last 4 KiB at the start: a cheap check
    /// that recovery is looking at the same files.
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    pub tool_version: String,
    pub files: Vec<FileEntry>,
    /// How many disks are merged (levels 0..merged_levels).
    pub merged_levels: u32,
    /// VHDX: the ancestor's DataWriteGuid after the merge, chosen up front.
    pub data_write_guid: Option<String>,
    /// Content digest (docs/digest.md) of the child's view before the merge:
    /// what the ancestor must hash to afterwards.
    pub expected_digest: Option<String>,
    /// Rename merged files instead of deleting them.
    pub keep: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Always record 0.
    Begin(Begin),
    /// Bytes of `files[file]` at `offset` before the merge overwrote them
    /// for the first time since Begin or since the last Checkpoint. Durable
    /// before the bytes are overwritten. Only bytes below the file's length
    /// at that point are imaged; growth is undone by truncation.
    BeforeImage {
        file: u32,
        offset: u64,
        /// As bytes, not a sequence of u8: the same encoding in bincode's
        /// legacy configuration (u64 length, then the bytes), but decoded
        /// in one copy instead of a call per byte.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Redo information for one run of guest data copied into the ancestor:
    /// where it comes from and the BLAKE3 of the bytes.
    Copy {
        offset: u64,
        length: u64,
        source_level: u32,
        source_offset: Option<u64>,
        blake3: [u8; 32],
    },
    /// Every write of the merge is durable in the ancestor and re-linked
    /// children: from here recovery finishes instead of rolling back.
    Committed,
    /// Deleting (or renaming) the merged files has begun: rollback is no
    /// longer possible.
    CleanupStarted,
    /// An explicit rollback has begun: a later recovery must finish the
    /// rollback, not the merge.
    RollbackStarted,
    /// Version 2: what the merge will do, written right after Begin (in
    /// the same sync) so that a resume can prove it follows the same plan.
    Plan(PlanRecord),
    /// Version 2: every run before `next_offset` is durable in the
    /// ancestor; a crash from here on costs only the work after it.
    Checkpoint(Checkpoint),
    /// Version 3: a before-image of `length` bytes of zeros at `offset`
    /// (whole pages, or up to the file's length): holes of the file, or
    /// pages that read as zeros. Same rules as `BeforeImage`, without the
    /// bytes.
    ZeroImage { file: u32, offset: u64, length: u64 },
    /// Version 4: redo information for a run of guest data put into the
    /// ancestor from a merged file without being read: cloned (sharing
    /// the file system's blocks) where the file system could, copied
    /// otherwise. It carries no hash: the run is proven by comparing the
    /// ancestor's view with the source (same physical blocks, or the same
    /// bytes read from both).
    Share {
        offset: u64,
        length: u64,
        source_level: u32,
        source_offset: u64,
    },
    /// Version 4: a before-image of `length` bytes of `files[file]` at
    /// `offset`, kept in the journal's image file at `image_offset`
    /// (cloned there where the file system can). Same rules as
    /// `BeforeImage`; the image file is durable before this record is.
    CloneImage {
        file: u32,
        offset: u64,
        length: u64,
        image_offset: u64,
    },
    /// Version 5: the merge was started finish-only (`merge
    /// --finish-only`): overwritten guest data has no before-images, so an
    /// interrupted merge can only be finished, never rolled back. Always
    /// record 2 when present, made durable with Begin, the Plan and a
    /// first Checkpoint at the start.
    FinishOnly,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// BLAKE3 over every run the merged levels hold (offset, length,
    /// level, source offset), in guest order: what a resume must find
    /// again in the unchanged merged files.
    pub digest: [u8; 32],
    /// Guest bytes the merge copies (progress is counted against it).
    pub bytes: u64,
    /// The identity of every file of Begin (same order) at the start, as a
    /// typed value; Begin keeps the same as text for version-1 readers.
    pub identities: Vec<crate::disk::Identity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The guest offset where the runs still to copy begin.
    pub next_offset: u64,
    /// Guest bytes copied before it.
    pub bytes_done: u64,
    /// Length of every file of Begin (same order) at this point: a partial
    /// undo truncates back to them.
    pub lengths: Vec<u64>,
}

impl Record {
    pub fn kind(&self) -> u16 {
        match self {
            Record::Begin(_) => 1,
            Record::BeforeImage { .. } => 2,
            Record::Copy { .. } => 3,
            Record::Committed => 4,
            Record::CleanupStarted => 5,
            Record::RollbackStarted => 6,
            Record::Plan(_) => 7,
            Record::Checkpoint(_) => 8,
            Record::ZeroImage { .. } => 9,
            Record::Share { .. } => 10,
            Record::CloneImage { .. } => 11,
            Record::FinishOnly => 12,
        }
    }
}
