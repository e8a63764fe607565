//! The journal's image file, `NAME.vhdmerge-journal.images`: before-images
//! of large runs of the ancestor, cloned there from the ancestor (reflink)
//! instead of copied into the journal, so that on XFS or btrfs an
//! overwrite's undo information costs no data copy. A `CloneImage` record
//! names the range; the rules are those of `BeforeImage`
//! (journal-format.md §4), plus one: the image file is made durable
//! before any journal bytes are (`Writer::sync` flushes it first), so a
//! durable record never names image bytes that a crash lost.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{FileStorage, SharedFile, Storage, fsops};

/// Images start at this alignment plus their source offset's remainder,
/// so that source and image are equally aligned for any file-system block
/// up to it (a clone needs that).
const ALIGN: u64 = 64 << 10;

pub struct ImageFile {
    path: PathBuf,
    file: Option<FileStorage>,
    end: u64,
    /// Cloned or copied since the last flush.
    dirty: bool,
}

/// The image file beside a journal.
pub fn path_for(journal: &Path) -> PathBuf {
    let mut name = journal.as_os_str().to_os_string();
    name.push(".images");
    PathBuf::from(name)
}

impl ImageFile {
    /// The image file of `journal`, created at the first image (or
    /// continued, for a resumed merge).
    pub fn new(journal: &Path) -> ImageFile {
        ImageFile {
            path: path_for(journal),
            file: None,
            end: 0,
            dirty: false,
        }
    }

    fn file(&mut self) -> io::Result<&FileStorage> {
        if self.file.is_none() {
            let f = match self.path.exists() {
                true => {
                    let f = FileStorage::open(&self.path, true).map_err(io::Error::other)?;
                    self.end = f.len()?;
                    f
                }
                false => {
                    let f = FileStorage::create_new(&self.path)?;
                    fsops::sync_dir_of(&self.path)?;
                    f
                }
            };
            self.file = Some(f);
        }
        Ok(self.file.as_ref().expect("opened above"))
    }

    /// Puts `len` bytes of `from` at `offset` at the end of the image
    /// file (cloned where the file system can) and returns where.
    pub fn put(&mut self, from: &Arc<SharedFile>, offset: u64, len: u64) -> io::Result<u64> {
        self.file()?;
        let at = self.end.next_multiple_of(ALIGN) + offset % ALIGN;
        self.file()?.put_from(from, offset, at, len)?;
        self.end = at + len;
        self.dirty = true;
        Ok(at)
    }

    /// Makes every image put so far durable.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file()?.flush()?;
            self.dirty = false;
        }
        Ok(())
    }
}

/// Opens the image file of `journal` to restore from it.
pub fn open(journal: &Path) -> Result<SharedFile> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let path = path_for(journal);
    let f = std::fs::File::open(&path).map_err(|e| {
        Error::io(
            &path,
            "opening the journal's image file, which holds before-images the journal names",
            e,
        )
    })?;
    let block = f.metadata().map_or(4096, |m| m.blksize());
    SharedFile::new(&path, f.as_fd(), block)
        .map_err(|e| Error::io(&path, "opening the journal's image file", e))
}

/// Deletes the image file of `journal`, if there is one (the caller syncs
/// the folder).
pub fn remove(journal: &Path) -> Result<()> {
    let path = path_for(journal);
    match fsops::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, "deleting the journal's image file", e)),
    }
}
