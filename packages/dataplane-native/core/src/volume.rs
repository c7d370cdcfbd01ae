//! STUB API — being implemented; signatures are stable.
use crate::error::Result;
use crate::stats::Stats;
use std::sync::Arc;

/// One run of a block-status answer: `length` bytes with NBD state `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u64,
    pub flags: u32,
}

/// Which dirty bitmap a `qemu:dirty-bitmap:<name>` context refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapRef {
    /// Changes since the last cut (`qemu:dirty-bitmap:open`).
    Open,
    /// The changes of closed generation N (`qemu:dirty-bitmap:gen-N`).
    Generation(u64),
}

impl BitmapRef {
    pub fn parse(name: &str) -> Option<BitmapRef> { todo!() }
    pub fn name(&self) -> String { todo!() }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroFlags {
    /// The client allows the range to be deallocated (no NBD_CMD_FLAG_NO_HOLE).
    pub may_trim: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with `Error::NotSupported` rather than write zeroes slowly.
    pub fast: bool,
    pub fua: bool,
}

pub struct Volume {}

impl Volume {
    pub fn name(&self) -> &str { todo!() }
    pub fn size(&self) -> u64 { todo!() }
    pub fn granularity(&self) -> u64 { todo!() }
    pub fn read_only(&self) -> bool { todo!() }
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> { todo!() }
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> { todo!() }
    pub fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<()> { todo!() }
    pub fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> { todo!() }
    pub fn flush(&self) -> Result<()> { todo!() }
    /// `base:allocation` for [offset, offset+length): runs covering at least the first byte,
    /// at most `length` bytes in total, flags from `STATE_HOLE | STATE_ZERO`.
    pub fn allocation(&self, offset: u64, length: u64) -> Result<Vec<StatusExtent>> { todo!() }
    /// `qemu:dirty-bitmap:*` for [offset, offset+length); flags `STATE_DIRTY` or 0.
    pub fn dirty_status(&self, which: BitmapRef, offset: u64, length: u64) -> Result<Vec<StatusExtent>> { todo!() }
    /// Bitmaps this volume offers now: `open` and `gen-N` for every kept closed generation.
    pub fn bitmaps(&self) -> Vec<BitmapRef> { todo!() }
    pub fn stats(&self) -> &Stats { todo!() }
}

pub type SharedVolume = Arc<Volume>;
