//! `ActivityLog`: the crash-safety net for changed-block tracking, after DRBD's activity log.
//!
//! The in-memory dirty bitmap is not written on every write. Instead, before a write touches an
//! *extent* (a 4 MiB region) that is not yet "hot", the set of hot extents is persisted. After an
//! unclean stop every hot extent counts as dirty, so an acknowledged write is never missing from
//! the bitmap (false positives are fine; misses never are). Once extents are hot, writes cost no
//! extra I/O. When the set is full, the caller persists the whole bitmap and the set starts over.
//!
//! On disk: two fixed slots written alternately with a sequence number and an xxh3 checksum, so a
//! torn write of one slot leaves the other intact. This module must never decide what a hot extent
//! means for a generation — it only remembers which extents are hot, for which generation.

use crate::bitmap::GenerationId;
use crate::error::{IoContext, Result};
use parking_lot::Mutex;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const MAGIC: &[u8; 8] = b"FERRYAL1";
/// Size of one hot region. Must be a multiple of the volume's CBT granularity.
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Hot extents remembered before the bitmap is flushed and the set starts over (4 GiB hot).
pub const CAPACITY: usize = 1024;
const SLOT_LEN: u64 = 8192;
const HEADER_LEN: usize = 8 + 8 + 8 + 8 + 4;

struct State {
    id: GenerationId,
    seq: u64,
    hot: Vec<u32>,
}

pub struct ActivityLog {
    path: PathBuf,
    file: File,
    extent_size: u64,
    hot: Vec<AtomicBool>,
    state: Mutex<State>,
}

/// What `open` found from the previous run.
pub struct Recovered {
    pub id: GenerationId,
    /// Extents that were hot when the log was last written: treat their blocks as dirty.
    pub extents: Vec<u32>,
}

impl ActivityLog {
    pub fn extent_size_for(granularity: u64) -> u64 {
        EXTENT_SIZE.max(granularity)
    }

    /// Open (or create) the log of a volume of `size` bytes; returns what the last run left hot.
    pub fn open(
        path: &Path,
        size: u64,
        granularity: u64,
    ) -> Result<(ActivityLog, Option<Recovered>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx(|| format!("cannot open activity log {}", path.display()))?;
        let extent_size = Self::extent_size_for(granularity);
        let n = size.div_ceil(extent_size) as usize;
        let recovered = Self::read_newest(&file, n);
        let (seq, id) = match &recovered {
            Some((seq, r)) => (*seq, r.id),
            None => (
                0,
                GenerationId {
                    epoch: 0,
                    generation: 0,
                },
            ),
        };
        let log = ActivityLog {
            path: path.to_path_buf(),
            file,
            extent_size,
            hot: (0..n).map(|_| AtomicBool::new(false)).collect(),
            state: Mutex::new(State {
                id,
                seq,
                hot: Vec::new(),
            }),
        };
        Ok((log, recovered.map(|(_, r)| r)))
    }

    fn read_newest(file: &File, n_extents: usize) -> Option<(u64, Recovered)> {
        let mut best: Option<(u64, Recovered)> = None;
        for slot in 0..2u64 {
            let mut buf = vec![0u8; SLOT_LEN as usize];
            if file.read_exact_at(&mut buf, slot * SLOT_LEN).is_err() {
                continue;
            }
            if let Some((seq, rec)) = decode_slot(&buf, n_extents) {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, rec));
                }
            }
        }
        best
    }

    /// Extent index range touched by `[offset, offset+length)`.
    pub fn extents_of(&self, offset: u64, length: u64) -> (u32, u32) {
        let first = offset / self.extent_size;
        let last = (offset + length.max(1) - 1) / self.extent_size;
        (first as u32, last as u32)
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// Fast path: are all extents `first..=last` already hot (persisted)?
    pub fn is_hot(&self, first: u32, last: u32) -> bool {
        (first..=last).all(|e| self.hot[e as usize].load(Ordering::Acquire))
    }

    /// Is there room to add `first..=last` without flushing the bitmap first?
    pub fn has_room(&self, first: u32, last: u32) -> bool {
        let st = self.state.lock();
        let missing = (first..=last)
            .filter(|e| !self.hot[*e as usize].load(Ordering::Acquire))
            .count();
        st.hot.len() + missing <= CAPACITY
    }

    /// Persist `first..=last` as hot for generation `id`. When `start_over` is set (the caller has
    /// just persisted the whole bitmap), the previous hot set is dropped first.
    /// Returns false when there is no room and `start_over` was not set.
    pub fn make_hot(
        &self,
        id: GenerationId,
        first: u32,
        last: u32,
        start_over: bool,
    ) -> Result<bool> {
        let mut st = self.state.lock();
        if start_over {
            for e in st.hot.drain(..) {
                self.hot[e as usize].store(false, Ordering::Release);
            }
        }
        let missing: Vec<u32> = (first..=last)
            .filter(|e| !self.hot[*e as usize].load(Ordering::Acquire))
            .collect();
        if missing.is_empty() && st.id == id && !start_over {
            return Ok(true);
        }
        if st.hot.len() + missing.len() > CAPACITY {
            return Ok(false);
        }
        st.id = id;
        st.hot.extend_from_slice(&missing);
        self.persist(&mut st)?;
        for e in missing {
            self.hot[e as usize].store(true, Ordering::Release);
        }
        Ok(true)
    }

    /// Forget every hot extent and record generation `id` (after the bitmap was persisted, on a
    /// cut or a clean shutdown).
    pub fn reset(&self, id: GenerationId) -> Result<()> {
        let mut st = self.state.lock();
        for e in st.hot.drain(..) {
            self.hot[e as usize].store(false, Ordering::Release);
        }
        st.id = id;
        self.persist(&mut st)
    }

    fn persist(&self, st: &mut State) -> Result<()> {
        st.seq += 1;
        let mut buf = Vec::with_capacity(SLOT_LEN as usize);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&st.id.epoch.to_le_bytes());
        buf.extend_from_slice(&st.id.generation.to_le_bytes());
        buf.extend_from_slice(&st.seq.to_le_bytes());
        buf.extend_from_slice(&(st.hot.len() as u32).to_le_bytes());
        for e in &st.hot {
            buf.extend_from_slice(&e.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&buf);
        buf.extend_from_slice(&sum.to_le_bytes());
        buf.resize(SLOT_LEN as usize, 0);
        let slot = st.seq % 2;
        self.file
            .write_all_at(&buf, slot * SLOT_LEN)
            .ctx(|| format!("cannot write activity log {}", self.path.display()))?;
        self.file
            .sync_data()
            .ctx(|| format!("cannot fsync activity log {}", self.path.display()))
    }
}

fn decode_slot(buf: &[u8], n_extents: usize) -> Option<(u64, Recovered)> {
    if &buf[0..8] != MAGIC {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
    let count = u32::from_le_bytes(buf[32..36].try_into().unwrap()) as usize;
    if count > CAPACITY {
        return None;
    }
    let end = HEADER_LEN + count * 4;
    if xxhash_rust::xxh3::xxh3_64(&buf[..end]) != u64_at(end) {
        return None;
    }
    let extents: Vec<u32> = (0..count)
        .map(|i| {
            u32::from_le_bytes(
                buf[HEADER_LEN + i * 4..HEADER_LEN + i * 4 + 4]
                    .try_into()
                    .unwrap(),
            )
        })
        .filter(|e| (*e as usize) < n_extents)
        .collect();
    let id = GenerationId {
        epoch: u64_at(8),
        generation: u64_at(16),
    };
    Some((u64_at(24), Recovered { id, extents }))
}

// CAPACITY extents must fit one slot.
const _: () = assert!(HEADER_LEN + CAPACITY * 4 + 8 <= SLOT_LEN as usize);

#[cfg(test)]
mod tests {
    use super::*;

    const G1: GenerationId = GenerationId {
        epoch: 1,
        generation: 1,
    };

    #[test]
    fn hot_extents_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let (al, rec) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        assert!(rec.is_none());
        let (a, b) = al.extents_of(5 << 20, 8 << 20);
        assert_eq!((a, b), (1, 3));
        assert!(!al.is_hot(a, b));
        assert!(al.make_hot(G1, a, b, false).unwrap());
        assert!(al.is_hot(a, b));
        drop(al);
        let (_, rec) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.id, G1);
        assert_eq!(rec.extents, vec![1, 2, 3]);
    }

    #[test]
    fn reset_forgets_and_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let (al, _) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        al.make_hot(G1, 0, 0, false).unwrap(); // seq 1 -> slot 1
        al.make_hot(G1, 7, 7, false).unwrap(); // seq 2 -> slot 0
        drop(al);
        // Tear the newest slot: the older one must be used.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 16], 40).unwrap();
        let (al, rec) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        assert_eq!(rec.unwrap().extents, vec![0]);
        al.reset(GenerationId {
            epoch: 1,
            generation: 2,
        })
        .unwrap();
        drop(al);
        let (_, rec) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        let rec = rec.unwrap();
        assert!(rec.extents.is_empty());
        assert_eq!(rec.id.generation, 2);
    }

    #[test]
    fn refuses_when_full_until_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let (al, _) = ActivityLog::open(&dir.path().join("al"), 8 << 30, 65536).unwrap();
        for e in 0..CAPACITY as u32 {
            assert!(al.make_hot(G1, e, e, false).unwrap());
        }
        let last = CAPACITY as u32;
        assert!(!al.has_room(last, last));
        assert!(!al.make_hot(G1, last, last, false).unwrap());
        assert!(al.make_hot(G1, last, last, true).unwrap());
        assert!(al.is_hot(last, last) && !al.is_hot(0, 0));
    }
}
