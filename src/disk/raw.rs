//! A raw image as a layer (for `hash`, `verify` and tests). Holes in a
//! sparse file map to zeros, so hashing a sparse export costs no reads.

use std::path::Path;

use super::{Extent, Format, Identity, Kind, Layer, LayerInfo, ParentRef, Warning};
use crate::error::{Error, Result};
use crate::io::{FileStorage, Src};

pub struct RawDisk {
    src: Src,
    size: u64,
}

const UNIT: u64 = 1 << 20;

impl RawDisk {
    pub fn open(path: &Path) -> Result<RawDisk> {
        let src = Src::new(path, Box::new(FileStorage::open(path, false)?));
        let size = src.len()?;
        Ok(RawDisk { src, size })
    }
}

impl Layer for RawDisk {
    fn path(&self) -> &Path {
        &self.src.path
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn kind(&self) -> Kind {
        Kind::Fixed
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u64 {
        UNIT
    }
    fn logical_sector_size(&self) -> u64 {
        512
    }
    fn map(&self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        let n = len
            .min(UNIT - offset % UNIT)
            .min(self.size.saturating_sub(offset));
        let (stored, n) = crate::io::stored_run(self.src.io.as_ref(), offset, n)
            .map_err(|e| Error::io(&self.src.path, "looking for holes", e))?;
        Ok((
            if stored {
                Extent::Data(offset)
            } else {
                Extent::Zero
            },
            n,
        ))
    }
    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.src.read(buf, file_offset, "data")
    }
    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.src.io.fd()
    }
    fn put(&mut self, _offset: u64, _data: super::Payload<'_>) -> Result<()> {
        Err(Error::WriteRefused {
            path: self.src.path.clone(),
            reason: "raw images are opened read-only".into(),
        })
    }
    fn commit(&mut self) -> Result<()> {
        Ok(())
    }
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
    fn parent_ref(&self) -> Option<ParentRef> {
        None
    }
    fn identity(&self) -> Identity {
        Identity::None
    }
    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            path: self.src.path.clone(),
            format: Format::Raw,
            kind: Kind::Fixed,
            virtual_size: self.size,
            block_size: UNIT,
            logical_sector_size: 512,
            physical_sector_size: 512,
            file_size: self.size,
            allocated_blocks: 0,
            allocated_bytes: 0,
            details: serde_json::json!({}),
            warnings: vec![],
        })
    }
    fn warnings(&self) -> &[Warning] {
        &[]
    }
}
