//! `ActivityLog`: the crash-safety net for changed-block tracking, after DRBD's activity log.
//!
//! The in-memory dirty bitmap is not written on every write. Instead, before a write touches an
//! *extent* (a 4 MiB region) that is not yet "hot", the set of hot extents is persisted. After an
//! unclean stop every hot extent counts as dirty, so an acknowledged write is never missing from
//! the bitmap (false positives are fine; misses never are). Once extents are hot, writes cost no
//! extra I/O. When the set is full, the caller persists the whole bitmap and the set starts over.
//! The invariant: before a write to an extent returns, that extent is durably recorded as hot (or
//! the bitmap covering it was durably flushed).
//!
//! Persisting costs a write and an fdatasync (milliseconds), so two things keep it off the path
//! of most first touches:
//! - *Group commit*: callers queue their extents and wait for one persist that covers everything
//!   queued so far. One caller at a time (the leader) writes, without holding the lock; callers
//!   that arrive meanwhile are all covered by the next persist.
//! - *Read-ahead*: when an extent goes hot right after the one before it (a sequential writer),
//!   the next `AHEAD` extents go hot with it, so a sequential stream persists once per
//!   `AHEAD + 1` extents. They may never be written: after a crash they count as dirty, so each
//!   such first touch adds at most `AHEAD` extents (12 MiB) of false positives. They only take
//!   room the set has free: they can bring the next bitmap flush closer, never force one.
//!
//! On disk: two fixed slots written alternately with a sequence number and an xxh3 checksum, so a
//! torn write of one slot leaves the other intact. This module must never decide what a hot extent
//! means for a generation — it only remembers which extents are hot, for which generation.

use crate::bitmap::GenerationId;
use crate::error::{IoContext, Result};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const MAGIC: &[u8; 8] = b"FERRYAL1";
/// Size of one hot region. Must be a multiple of the volume's CBT granularity.
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Hot extents remembered before the bitmap is flushed and the set starts over (4 GiB hot).
pub const CAPACITY: usize = 1024;
/// Extents made hot ahead of a sequential writer (see the module doc).
pub const AHEAD: u32 = 3;
const SLOT_LEN: u64 = 8192;
const HEADER_LEN: usize = 8 + 8 + 8 + 8 + 4;

struct State {
    id: GenerationId,
    seq: u64,
    /// The log's extents in the order they joined: the first `durable_len` are on disk, the rest
    /// wait for the next persist. Only ever appended to while a persist runs.
    hot: Vec<u32>,
    durable_len: usize,
    /// `queued[e]`: `e` is in `hot`.
    queued: Vec<bool>,
    /// Bumped on every change of `hot` or `id`; `durable` is the version on disk.
    version: u64,
    durable: u64,
    /// A leader is writing the log with the lock released.
    persisting: bool,
    persists: u64,
}

pub struct ActivityLog {
    path: PathBuf,
    file: File,
    extent_size: u64,
    /// `hot[e]`: `e` is durably recorded as hot — the lock-free fast path of every write.
    hot: Vec<AtomicBool>,
    state: Mutex<State>,
    /// Signalled when a persist ends.
    persisted: Condvar,
    /// Tests: hold the next persist, with the lock released, until this many extents are queued.
    #[cfg(test)]
    hold_until_queued: std::sync::atomic::AtomicUsize,
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
                durable_len: 0,
                queued: vec![false; n],
                version: 0,
                durable: 0,
                persisting: false,
                persists: 0,
            }),
            persisted: Condvar::new(),
            #[cfg(test)]
            hold_until_queued: Default::default(),
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
        let missing = (first..=last).filter(|e| !st.queued[*e as usize]).count();
        st.hot.len() + missing <= CAPACITY
    }

    /// Persists attempted since the log was opened (tests, diagnostics).
    pub fn persists(&self) -> u64 {
        self.state.lock().persists
    }

    /// Persist `first..=last` as hot for generation `id`. When `start_over` is set (the caller has
    /// just persisted the whole bitmap), the previous hot set is dropped first.
    /// Returns false when there is no room and `start_over` was not set.
    ///
    /// Returning true means a persist covering the request has completed; the extents may have
    /// been dropped again since by a concurrent start-over or `reset`, so callers re-check
    /// `is_hot` before relying on them.
    pub fn make_hot(
        &self,
        id: GenerationId,
        first: u32,
        last: u32,
        start_over: bool,
    ) -> Result<bool> {
        let mut st = self.state.lock();
        if start_over {
            self.wait_idle(&mut st);
            Self::clear(&mut st, &self.hot);
        }
        let missing = (first..=last).filter(|e| !st.queued[*e as usize]).count();
        if st.hot.len() + missing > CAPACITY {
            return Ok(false);
        }
        let mut changed = start_over || st.id != id;
        if !changed && missing == 0 && self.is_hot(first, last) {
            return Ok(true);
        }
        st.id = id;
        if missing > 0 {
            changed = true;
            for e in first..=last {
                Self::queue(&mut st, e);
            }
            let sequential = first > 0 && st.queued[first as usize - 1];
            if sequential {
                let end = (last as usize + 1 + AHEAD as usize).min(st.queued.len());
                for e in last + 1..end as u32 {
                    if st.hot.len() == CAPACITY {
                        break;
                    }
                    Self::queue(&mut st, e);
                }
            }
        }
        if changed {
            st.version += 1;
        }
        // Everything this caller needs is in the log once `version` is on disk.
        let target = st.version;
        loop {
            if st.durable >= target {
                return Ok(true);
            }
            if !st.persisting {
                self.persist(&mut st)?;
                return Ok(true);
            }
            self.persisted.wait(&mut st);
        }
    }

    /// Forget every hot extent and record generation `id` (after the bitmap was persisted, on a
    /// cut or a clean shutdown).
    pub fn reset(&self, id: GenerationId) -> Result<()> {
        let mut st = self.state.lock();
        self.wait_idle(&mut st);
        Self::clear(&mut st, &self.hot);
        st.id = id;
        st.version += 1;
        self.persist(&mut st)
    }

    fn queue(st: &mut State, e: u32) {
        if !st.queued[e as usize] {
            st.queued[e as usize] = true;
            st.hot.push(e);
        }
    }

    /// Drop the whole set. Only with no persist running: a leader marks what it wrote as hot.
    fn clear(st: &mut State, hot: &[AtomicBool]) {
        debug_assert!(!st.persisting);
        for e in st.hot.drain(..) {
            st.queued[e as usize] = false;
            hot[e as usize].store(false, Ordering::Release);
        }
        st.durable_len = 0;
        st.version += 1;
    }

    fn wait_idle(&self, st: &mut MutexGuard<'_, State>) {
        while st.persisting {
            self.persisted.wait(st);
        }
    }

    /// Write the whole set as it is now, as the leader: the lock is released during the I/O so
    /// other callers can queue for the next persist. Callers ensure no persist is running.
    fn persist(&self, st: &mut MutexGuard<'_, State>) -> Result<()> {
        debug_assert!(!st.persisting);
        st.persisting = true;
        st.seq += 1;
        let (version, covered, seq) = (st.version, st.hot.len(), st.seq);
        let buf = encode_slot(st);
        let written = MutexGuard::unlocked(st, || {
            #[cfg(test)]
            self.hold_for_test();
            self.write_slot(&buf, seq)
        });
        st.persisting = false;
        st.persists += 1;
        match &written {
            Ok(()) => {
                // The set only grew while unlocked (clearing waits for idle), so the first
                // `covered` extents are exactly the ones just written.
                for &e in &st.hot[st.durable_len..covered] {
                    self.hot[e as usize].store(true, Ordering::Release);
                }
                st.durable_len = covered;
                st.durable = version;
            }
            // The next attempt rewrites the same slot, never the other one, which holds the
            // last good copy.
            Err(_) => st.seq -= 1,
        }
        self.persisted.notify_all();
        written
    }

    fn write_slot(&self, buf: &[u8], seq: u64) -> Result<()> {
        self.file
            .write_all_at(buf, (seq % 2) * SLOT_LEN)
            .ctx(|| format!("cannot write activity log {}", self.path.display()))?;
        self.file
            .sync_data()
            .ctx(|| format!("cannot fsync activity log {}", self.path.display()))
    }

    #[cfg(test)]
    fn hold_for_test(&self) {
        let want = self.hold_until_queued.swap(0, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.state.lock().hot.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "{want} extents never queued"
            );
            std::thread::yield_now();
        }
    }
}

fn encode_slot(st: &State) -> Vec<u8> {
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
    buf
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

    /// What a writer does: persist only when the extent is not hot yet.
    fn touch(al: &ActivityLog, e: u32) {
        if !al.is_hot(e, e) {
            assert!(al.make_hot(G1, e, e, false).unwrap());
        }
        assert!(al.is_hot(e, e));
    }

    fn recovered_after_crash(al: ActivityLog, p: &Path, size: u64) -> Vec<u32> {
        // Like kill -9: nothing runs on the way out.
        std::mem::forget(al);
        let (_, rec) = ActivityLog::open(p, size, 65536).unwrap();
        let mut extents = rec.unwrap().extents;
        extents.sort_unstable();
        extents
    }

    #[test]
    fn concurrent_first_touches_share_a_persist() {
        const N: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let (al, _) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        // The first persist stays in flight until every thread has queued its extent, as a slow
        // disk would keep it.
        al.hold_until_queued.store(N, Ordering::SeqCst);
        let extents: Vec<u32> = (0..N as u32).map(|i| 10 + 7 * i).collect();
        let start = std::sync::Barrier::new(N);
        std::thread::scope(|s| {
            for &e in &extents {
                let (al, start) = (&al, &start);
                s.spawn(move || {
                    start.wait();
                    touch(al, e);
                });
            }
        });
        // The first caller's own persist, then one for the other N - 1 together.
        assert_eq!(al.persists(), 2);
        assert_eq!(recovered_after_crash(al, &p, 1 << 30), extents);
    }

    #[test]
    fn sequential_writer_goes_hot_ahead_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let (al, _) = ActivityLog::open(&p, 1 << 30, 65536).unwrap();
        for e in 0..18 {
            touch(&al, e);
        }
        // 0 alone (nothing before it), then 1-4, 5-8, 9-12, 13-16 and 17-20.
        assert_eq!(al.persists(), 6);
        assert!(al.is_hot(18, 20) && !al.is_hot(21, 21));
        // Every touched extent survives a crash; the false positives are the AHEAD after the last.
        let rec = recovered_after_crash(al, &p, 1 << 30);
        assert_eq!(rec, (0..18 + AHEAD).collect::<Vec<_>>());
    }

    #[test]
    fn scattered_touches_and_the_volume_end_bound_the_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let size = 6 * EXTENT_SIZE;
        let (al, _) = ActivityLog::open(&p, size, 65536).unwrap();
        touch(&al, 0);
        touch(&al, 2);
        touch(&al, 4);
        // Extent 3 is not in the log, so 4 does not look sequential: nothing ahead of it.
        assert!(!al.is_hot(5, 5));
        touch(&al, 5);
        assert_eq!(al.persists(), 4);
        assert_eq!(recovered_after_crash(al, &p, size), vec![0, 2, 4, 5]);
    }
}
