//! `DirtyBitmap`: one bit per granularity block, set lock-free on the write path, and its
//! crash-safe on-disk form (header with the generation id, payload, xxh3 checksum).
//!
//! A bitmap on disk is only ever trusted together with the generation id stored in it; the
//! caller decides what a mismatch means (see `volume.rs`).

use crate::error::{Error, IoContext, Result};
use crate::nbd::proto::STATE_DIRTY;
use crate::volume::StatusExtent;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"FERRYBM1";
const HEADER_LEN: usize = 8 + 8 + 8 + 8 + 8 + 8;

/// A byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// Identifies which generation a bitmap describes: `(epoch, generation)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationId {
    pub epoch: u64,
    pub generation: u64,
}

pub struct DirtyBitmap {
    size: u64,
    granularity: u64,
    words: Vec<AtomicU64>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity)
            .field("dirty_blocks", &self.dirty_blocks())
            .finish()
    }
}

impl DirtyBitmap {
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two());
        let nbits = size.div_ceil(granularity);
        let words = (0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DirtyBitmap {
            size,
            granularity,
            words,
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    fn nbits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Mark every block that overlaps `[offset, offset+length)`.
    pub fn mark(&self, offset: u64, length: u64) {
        if length == 0 || offset >= self.size {
            return;
        }
        let end = (offset + length).min(self.size);
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        self.mark_blocks(first, last);
    }

    /// Mark blocks `first..=last`.
    pub fn mark_blocks(&self, first: u64, last: u64) {
        let last = last.min(self.nbits().saturating_sub(1));
        let mut b = first;
        while b <= last {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (last - (b - lo)).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            // Skip the atomic RMW when already set: the common case for hot blocks.
            if self.words[w].load(Ordering::Relaxed) & mask != mask {
                self.words[w].fetch_or(mask, Ordering::Relaxed);
            }
            b = b - lo + 64;
        }
    }

    /// Blocks lying wholly inside `[offset, offset+length)`; the last block may be partial at the
    /// volume's end and counts as whole there.
    fn covered_blocks(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        let end = (offset + length).min(self.size);
        let first = offset.div_ceil(self.granularity);
        let last_excl = if end == self.size {
            self.nbits()
        } else {
            end / self.granularity
        };
        first..last_excl.max(first)
    }

    /// Clear every block that lies wholly inside `[offset, offset+length)` (a partial block at
    /// either edge stays set: clearing must never lose a change).
    pub fn clear(&self, offset: u64, length: u64) {
        for b in self.covered_blocks(offset, length) {
            let w = (b / 64) as usize;
            self.words[w].fetch_and(!(1u64 << (b % 64)), Ordering::Relaxed);
        }
    }

    /// Mark every block that lies wholly inside `[offset, offset+length)` (the last block of the
    /// volume counts as whole when the range reaches the end): for maps of blocks known complete.
    pub fn mark_covered(&self, offset: u64, length: u64) {
        let blocks = self.covered_blocks(offset, length);
        if !blocks.is_empty() {
            self.mark_blocks(blocks.start, blocks.end - 1);
        }
    }

    /// Clear in `self` every block set in `other` (same geometry).
    pub fn subtract(&self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter().zip(other.words.iter()) {
            let v = b.load(Ordering::Relaxed);
            if v != 0 {
                a.fetch_and(!v, Ordering::Relaxed);
            }
        }
    }

    /// Is any block overlapping `[offset, offset+length)` set?
    pub fn any_in(&self, offset: u64, length: u64) -> bool {
        if length == 0 || offset >= self.size {
            return false;
        }
        let end = (offset + length).min(self.size);
        (offset / self.granularity..=(end - 1) / self.granularity).any(|b| self.is_dirty(b))
    }

    /// A copy with the same bits.
    pub fn duplicate(&self) -> DirtyBitmap {
        let copy = DirtyBitmap::new(self.size, self.granularity);
        copy.union_with(self);
        copy
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_dirty(&self, block: u64) -> bool {
        let w = (block / 64) as usize;
        w < self.words.len() && self.words[w].load(Ordering::Relaxed) & (1 << (block % 64)) != 0
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Bytes covered by dirty blocks (the last block clipped to the volume size).
    pub fn dirty_bytes(&self) -> u64 {
        self.extents().iter().map(|e| e.length).sum()
    }

    /// Merge `other` into `self` (same geometry).
    pub fn union_with(&self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter().zip(other.words.iter()) {
            let v = b.load(Ordering::Relaxed);
            if v != 0 {
                a.fetch_or(v, Ordering::Relaxed);
            }
        }
    }

    pub fn mark_all(&self) {
        if self.nbits() > 0 {
            self.mark_blocks(0, self.nbits() - 1);
        }
    }

    /// Runs of dirty blocks, merged, clipped to the volume size.
    pub fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (wi, w) in self.words.iter().enumerate() {
            let mut v = w.load(Ordering::Relaxed);
            while v != 0 {
                let bit = v.trailing_zeros() as u64;
                let run = (v >> bit).trailing_ones() as u64;
                let start = (wi as u64 * 64 + bit) * self.granularity;
                let end = ((wi as u64 * 64 + bit + run) * self.granularity).min(self.size);
                match out.last_mut() {
                    Some(last) if last.offset + last.length == start => {
                        last.length = end - last.offset
                    }
                    _ => out.push(Extent {
                        offset: start,
                        length: end - start,
                    }),
                }
                if bit + run >= 64 {
                    break;
                }
                v &= !(((1u64 << run) - 1) << bit);
            }
        }
        out
    }

    /// Block-status answer for `[offset, offset+length)`: alternating runs of dirty / clean.
    /// At most `max_runs` runs; always at least one covering `offset`.
    pub fn status(&self, offset: u64, length: u64, max_runs: usize) -> Vec<StatusExtent> {
        let end = (offset + length).min(self.size);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_runs.max(1) {
            let block = pos / self.granularity;
            let dirty = self.is_dirty(block);
            let mut next = ((block + 1) * self.granularity).min(end);
            while next < end && self.is_dirty(next / self.granularity) == dirty {
                next = ((next / self.granularity + 1) * self.granularity).min(end);
            }
            out.push(StatusExtent {
                length: next - pos,
                flags: if dirty { STATE_DIRTY } else { 0 },
            });
            pos = next;
        }
        out
    }

    pub fn encode(&self, id: GenerationId) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HEADER_LEN + self.words.len() * 8 + 8);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&id.epoch.to_le_bytes());
        buf.extend_from_slice(&id.generation.to_le_bytes());
        buf.extend_from_slice(&self.size.to_le_bytes());
        buf.extend_from_slice(&self.granularity.to_le_bytes());
        buf.extend_from_slice(&(self.words.len() as u64).to_le_bytes());
        for w in &self.words {
            buf.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&buf);
        buf.extend_from_slice(&sum.to_le_bytes());
        buf
    }

    /// Decode a bitmap written by `encode`. Errors on any corruption or geometry mismatch.
    pub fn decode(
        bytes: &[u8],
        size: u64,
        granularity: u64,
    ) -> std::result::Result<(GenerationId, DirtyBitmap), String> {
        if bytes.len() < HEADER_LEN + 8 || &bytes[0..8] != MAGIC {
            return Err("not a Ferry bitmap (bad magic or truncated)".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum.try_into().unwrap()) {
            return Err("checksum mismatch".into());
        }
        let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        let id = GenerationId {
            epoch: u(8),
            generation: u(16),
        };
        if u(24) != size || u(32) != granularity {
            return Err(format!(
                "geometry {}:{} does not match volume {}:{}",
                u(24),
                u(32),
                size,
                granularity
            ));
        }
        let bm = DirtyBitmap::new(size, granularity);
        let n = u(40) as usize;
        if n != bm.words.len() || body.len() != HEADER_LEN + n * 8 {
            return Err("word count mismatch".into());
        }
        for (i, w) in bm.words.iter().enumerate() {
            w.store(u(HEADER_LEN + i * 8), Ordering::Relaxed);
        }
        Ok((id, bm))
    }

    /// Write crash-safely: temp file, fsync, rename, fsync the directory.
    pub fn save(&self, path: &Path, id: GenerationId) -> Result<()> {
        write_atomic(path, &self.encode(id))
    }
}

/// Replace `path` with `bytes` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("path has a parent");
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).ctx(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .ctx(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all()
        .ctx(|| format!("cannot fsync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .ctx(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    let d = std::fs::File::open(dir).ctx(|| format!("cannot open directory {}", dir.display()))?;
    d.sync_all()
        .map_err(|e| Error::io(format!("cannot fsync directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_merges_extents() {
        let bm = DirtyBitmap::new(1 << 20, 65536);
        bm.mark(0, 1);
        bm.mark(65536 * 3 - 1, 2);
        bm.mark(65536 * 15, 100);
        assert_eq!(
            bm.extents(),
            vec![
                Extent {
                    offset: 0,
                    length: 65536
                },
                Extent {
                    offset: 65536 * 2,
                    length: 65536 * 2
                },
                Extent {
                    offset: 65536 * 15,
                    length: 65536
                }
            ]
        );
        assert_eq!(bm.dirty_blocks(), 4);
    }

    #[test]
    fn covered_marks_only_whole_blocks_and_subtract_clears() {
        let g = 65536;
        let bm = DirtyBitmap::new(10 * g + 100, g);
        bm.mark_covered(g / 2, 2 * g); // blocks 0 and 2 are partial: only 1
        bm.mark_covered(9 * g, g + 100); // the short last block counts as whole
        let blocks = |b: &DirtyBitmap| (0..11).filter(|i| b.is_dirty(*i)).collect::<Vec<_>>();
        assert_eq!(blocks(&bm), vec![1, 9, 10]);
        let other = DirtyBitmap::new(10 * g + 100, g);
        other.mark(9 * g, 1);
        bm.subtract(&other);
        assert_eq!(blocks(&bm), vec![1, 10]);
    }

    #[test]
    fn extents_span_words_and_clip_to_size() {
        let size = 65536 * 130 + 4096;
        let bm = DirtyBitmap::new(size, 65536);
        bm.mark(65536 * 60, 65536 * 71);
        assert_eq!(
            bm.extents(),
            vec![Extent {
                offset: 65536 * 60,
                length: size - 65536 * 60
            }]
        );
        bm.mark_all();
        assert_eq!(bm.dirty_bytes(), size);
    }

    #[test]
    fn status_alternates_and_respects_limits() {
        let bm = DirtyBitmap::new(65536 * 8, 65536);
        bm.mark(65536, 65536);
        let s = bm.status(4096, 65536 * 3, 10);
        assert_eq!(
            s,
            vec![
                StatusExtent {
                    length: 65536 - 4096,
                    flags: 0
                },
                StatusExtent {
                    length: 65536,
                    flags: STATE_DIRTY
                },
                StatusExtent {
                    length: 65536 + 4096,
                    flags: 0
                }
            ]
        );
        assert_eq!(bm.status(0, 65536 * 8, 1).len(), 1);
    }

    #[test]
    fn clear_keeps_partial_edges() {
        let bm = DirtyBitmap::new(65536 * 4 + 4096, 65536);
        bm.mark_all();
        bm.clear(4096, 65536 * 2);
        assert!(bm.is_dirty(0) && !bm.is_dirty(1) && bm.is_dirty(2));
        bm.clear(65536 * 4, 4096);
        assert!(
            !bm.is_dirty(4),
            "the partial last block is whole at the volume's end"
        );
        assert!(bm.any_in(0, 1) && !bm.any_in(65536, 65536) && !bm.any_in(1 << 30, 1));
        assert_eq!(bm.duplicate().extents(), bm.extents());
    }

    #[test]
    fn encode_decode_round_trip_and_detects_corruption() {
        let bm = DirtyBitmap::new(1 << 30, 65536);
        bm.mark(12345678, 999999);
        let id = GenerationId {
            epoch: 1,
            generation: 7,
        };
        let mut bytes = bm.encode(id);
        let (id2, bm2) = DirtyBitmap::decode(&bytes, 1 << 30, 65536).unwrap();
        assert_eq!(id2, id);
        assert_eq!(bm2.extents(), bm.extents());
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        assert!(DirtyBitmap::decode(&bytes, 1 << 30, 65536)
            .unwrap_err()
            .contains("checksum"));
        assert!(DirtyBitmap::decode(&bm.encode(id), 1 << 29, 65536).is_err());
    }
}
