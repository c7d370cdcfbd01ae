//! `CutImage`: a volume's content exactly as it was at a cut, readable while writes go on —
//! what the shipper sends, so the target receives the cut and never a mix of before and after.
//!
//! Copy-before-write: the blocks changed in the closed generation are *pending* until shipped.
//! Before a write (or trim, or zero) touches a pending block that was not yet preserved, the
//! volume calls `preserve`, which copies the block's current content — its content at the cut —
//! into a sparse side file at the same offset. `read` serves preserved blocks from the side file
//! and the others from the volume. Memory stays bounded by two bitmaps whatever the write rate.
//!
//! The side file is not crash-safe and need not be: after an unclean stop the shipper starts a
//! new cut and ships the union of the unshipped generations (a later, equally consistent point).

use crate::bitmap::{DirtyBitmap, Extent};
use crate::error::{IoContext, Result};
use parking_lot::Mutex;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub struct CutImage {
    generation: u64,
    size: u64,
    granularity: u64,
    /// Blocks of the generation not shipped yet.
    pending: DirtyBitmap,
    /// Blocks whose cut-time content is in the side file.
    saved: DirtyBitmap,
    side: File,
    path: PathBuf,
    /// Orders a writer's preserve-then-write against a reader's choice of source, per image.
    lock: Mutex<()>,
}

impl CutImage {
    /// An image of generation `generation`, whose changed blocks are `changed`.
    pub fn create(dir: &Path, generation: u64, changed: &DirtyBitmap) -> Result<CutImage> {
        let path = dir.join(format!("cut-image-{generation}.side"));
        let side = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ctx(|| format!("cannot create {}", path.display()))?;
        side.set_len(changed.size())
            .ctx(|| format!("cannot size {}", path.display()))?;
        Ok(CutImage {
            generation,
            size: changed.size(),
            granularity: changed.granularity(),
            pending: changed.duplicate(),
            saved: DirtyBitmap::new(changed.size(), changed.granularity()),
            side,
            path,
            lock: Mutex::new(()),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What is still to ship.
    pub fn pending_extents(&self) -> Vec<Extent> {
        self.pending.extents()
    }

    /// Is block `block` still to ship?
    pub fn is_pending(&self, block: u64) -> bool {
        self.pending.is_dirty(block)
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending.dirty_bytes()
    }

    fn block_range(&self, block: u64) -> (u64, usize) {
        let start = block * self.granularity;
        (start, (self.granularity.min(self.size - start)) as usize)
    }

    /// Called by the volume before it modifies `[offset, offset+length)` of `data`.
    pub fn preserve(&self, data: &File, offset: u64, length: u64) -> Result<()> {
        if !self.pending.any_in(offset, length) {
            return Ok(());
        }
        let _g = self.lock.lock();
        let end = (offset + length).min(self.size);
        let mut buf = Vec::new();
        for block in offset / self.granularity..=(end - 1) / self.granularity {
            if !self.pending.is_dirty(block) || self.saved.is_dirty(block) {
                continue;
            }
            let (start, len) = self.block_range(block);
            buf.resize(len, 0);
            data.read_exact_at(&mut buf, start)
                .ctx(|| format!("copy-before-write read at {start}"))?;
            self.side
                .write_all_at(&buf, start)
                .ctx(|| format!("copy-before-write to {}", self.path.display()))?;
            self.saved.mark(start, len as u64);
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` as they were at the cut.
    pub fn read(&self, data: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _g = self.lock.lock();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            // One read for each run of blocks kept in the same place.
            let saved = self.saved.is_dirty(pos / self.granularity);
            let mut next = pos;
            while next < end && self.saved.is_dirty(next / self.granularity) == saved {
                next = ((next / self.granularity + 1) * self.granularity).min(end);
            }
            let piece = &mut buf[(pos - offset) as usize..(next - offset) as usize];
            let src = if saved { &self.side } else { data };
            src.read_exact_at(piece, pos)
                .ctx(|| format!("reading generation {} at {pos}", self.generation))?;
            pos = next;
        }
        Ok(())
    }

    /// Was `[offset, offset+length)` a hole at the cut? True when no block of it was preserved
    /// and the volume's file has no data there now: any write since the cut would have
    /// preserved the block first (under this image's lock). Lets the shipper send a hole as a
    /// zero frame without reading it — and without filling the page cache with its zeroes.
    pub fn is_hole(&self, data: &File, offset: u64, length: u64) -> Result<bool> {
        let _g = self.lock.lock();
        if self.saved.any_in(offset, length) {
            return Ok(false);
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(data);
        // SAFETY: lseek on a file descriptor this image's volume keeps open.
        let next = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if next < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `offset`.
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(true),
                _ => Err(e)
                    .ctx(|| format!("SEEK_DATA in generation {} at {offset}", self.generation)),
            };
        }
        Ok(next as u64 >= offset + length)
    }

    /// `[offset, offset+length)` reached the target: stop preserving it.
    pub fn shipped(&self, offset: u64, length: u64) {
        let _g = self.lock.lock();
        self.pending.clear(offset, length);
    }
}

impl Drop for CutImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cut_across_runs_of_preserved_and_unchanged_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (size, g) = (8 * 4096u64, 4096u64);
        let data = tempfile::tempfile().unwrap();
        let at_cut: Vec<u8> = (0..size).map(|i| (i / g) as u8 + 1).collect();
        data.write_all_at(&at_cut, 0).unwrap();
        let changed = DirtyBitmap::new(size, g);
        changed.mark(0, size);
        let image = CutImage::create(dir.path(), 7, &changed).unwrap();
        // Blocks 2, 3 and 6 are preserved, then overwritten; the others keep their cut content.
        for (offset, length) in [(2 * g, 2 * g), (6 * g + 100, 10)] {
            image.preserve(&data, offset, length).unwrap();
            data.write_all_at(&vec![0xee; length as usize], offset)
                .unwrap();
        }
        let mut all = vec![0u8; size as usize];
        image.read(&data, 0, &mut all).unwrap();
        assert!(all == at_cut, "the whole image differs from the cut");
        // Reads that start and end inside blocks, over both kinds of run.
        for (offset, length) in [(g + 10, 2 * g), (3 * g + 4000, 4 * g), (6 * g + 1, 5)] {
            let mut part = vec![0u8; length as usize];
            image.read(&data, offset, &mut part).unwrap();
            assert_eq!(
                part,
                at_cut[offset as usize..(offset + length) as usize],
                "at {offset}"
            );
        }
    }

    #[test]
    fn holes_at_the_cut_are_known_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let (size, g) = (64 * 65536u64, 65536u64);
        let data = tempfile::tempfile().unwrap();
        data.set_len(size).unwrap();
        // Data in block 1 only; the rest of the file is holes.
        data.write_all_at(&vec![7u8; g as usize], g).unwrap();
        let changed = DirtyBitmap::new(size, g);
        changed.mark(0, size);
        let image = CutImage::create(dir.path(), 3, &changed).unwrap();
        assert!(image.is_hole(&data, 0, g).unwrap());
        assert!(!image.is_hole(&data, 0, 2 * g).unwrap(), "reaches the data");
        assert!(!image.is_hole(&data, g, g).unwrap());
        assert!(
            image.is_hole(&data, 8 * g, 56 * g).unwrap(),
            "up to the end"
        );
        // A write after the cut preserves the hole's content first: it is still a hole at the
        // cut (zero frames are right) — but it must be read from the side file now.
        image.preserve(&data, 9 * g, 4096).unwrap();
        data.write_all_at(&[1u8; 4096], 9 * g).unwrap();
        assert!(!image.is_hole(&data, 8 * g, 4 * g).unwrap());
        let mut block = vec![9u8; g as usize];
        image.read(&data, 9 * g, &mut block).unwrap();
        assert!(block.iter().all(|b| *b == 0), "read as it was at the cut");
    }
}
