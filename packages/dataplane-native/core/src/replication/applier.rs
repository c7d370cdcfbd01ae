//! `Applier`: applies the verified frames of one replica's running generation on a thread of its
//! own, so that the receiver can acknowledge a frame as soon as it is verified and queued instead
//! of after its before-image is journaled and synced. What waits is applied as one batch (one
//! journal fsync for all of it), while the next frames keep arriving.
//!
//! It owns the promise the acknowledgement makes: every queued change is applied, or the first
//! failure is kept and [`Applier::finish`] returns it, so that the generation is never committed
//! without every acknowledged frame (a commit that does not wait for the queue stages what
//! [`Applier::unapplied`] returns instead: see `staged_tail`). It never applies anything but the changes queued for its
//! transaction (`Volume::apply_batch` refuses a transaction that is no longer the running one),
//! and it never holds more than `MAX_QUEUED_BYTES`: a full queue makes the receiver wait, which
//! holds back the acknowledgements and so the source's window.

use crate::apply_txn::ApplyTxn;
use crate::error::{Error, Result};
use crate::volume::{ApplyOp, Volume};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

/// Most bytes of changes queued and not yet applied (data frames count their data; zero frames
/// nothing).
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

pub use crate::staged_tail::Change;

#[derive(Default)]
struct State {
    queue: Vec<Change>,
    queued_bytes: usize,
    /// The batch the worker is applying, taken from the queue.
    in_flight: Option<Arc<Vec<Change>>>,
    /// No new batch is started (a commit is staging what is left; see `unapplied`).
    held: bool,
    closing: bool,
    /// The first failure; later changes are dropped, not applied.
    failed: Option<(String, String)>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when changes are queued, when a batch is done, and at close.
    changed: Condvar,
}

pub struct Applier {
    volume: Arc<Volume>,
    txn: Arc<ApplyTxn>,
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Applier {
    /// Start applying changes of `txn`, the running transaction of `volume`.
    pub fn start(volume: Arc<Volume>, txn: Arc<ApplyTxn>) -> Result<Applier> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let worker = {
            let (volume, txn, shared) = (volume.clone(), txn.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("ferry-apply-{}", volume.name()))
                .spawn(move || work(&volume, &txn, &shared))
                .map_err(|e| Error::io("cannot start the replica's apply thread", e))?
        };
        Ok(Applier {
            volume,
            txn,
            shared,
            worker: Some(worker),
        })
    }

    /// Whether this applier applies `txn`.
    pub fn applies(&self, txn: &Arc<ApplyTxn>) -> bool {
        Arc::ptr_eq(&self.txn, txn)
    }

    /// Queue changes, waiting while the queue is full. Fails, queuing nothing, once an earlier
    /// change failed to apply: the generation cannot be committed any more. The disk is asked
    /// for the changes' before-images at once, before they wait in the queue (unless all of
    /// them were asked for at the generation's `begin`).
    pub fn push(&self, changes: Vec<Change>) -> Result<()> {
        if !self.txn.read_ahead() {
            for change in &changes {
                let op = change.op();
                self.volume
                    .prefetch_before_images(&self.txn, op.offset(), op.length());
            }
        }
        let bytes: usize = changes.iter().map(Change::data_len).sum();
        let mut st = self.shared.state.lock();
        while st.failed.is_none()
            && st.queued_bytes > 0
            && st.queued_bytes + bytes > MAX_QUEUED_BYTES
        {
            self.shared.changed.wait(&mut st);
        }
        if let Some(e) = failure(&st) {
            return Err(e);
        }
        st.queued_bytes += bytes;
        st.queue.extend(changes);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The changes not yet applied in place, in order (the batch being applied, then the
    /// queue): what a commit that does not wait for them stages (see `staged_tail`). Fails once
    /// a change failed to apply.
    ///
    /// No new batch starts until the next `drain` (or `finish`): the commit's fdatasync of the
    /// data then waits only for what was written before, not for writes it does not need.
    pub fn unapplied(&self) -> Result<Vec<Change>> {
        let mut st = self.shared.state.lock();
        if let Some(e) = failure(&st) {
            return Err(e);
        }
        st.held = true;
        let mut out: Vec<Change> = st.in_flight.as_deref().cloned().unwrap_or_default();
        out.extend(st.queue.iter().cloned());
        Ok(out)
    }

    /// Wait until every queued change is applied; the first failure if one was not.
    pub fn drain(&self) -> Result<()> {
        let mut st = self.shared.state.lock();
        st.held = false;
        self.shared.changed.notify_all();
        while st.failed.is_none() && (st.in_flight.is_some() || !st.queue.is_empty()) {
            self.shared.changed.wait(&mut st);
        }
        match failure(&st) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Apply what is queued, stop the thread, and say whether everything was applied.
    pub fn finish(mut self) -> Result<()> {
        let r = self.drain();
        self.stop();
        r.map_err(|e| match e {
            Error::Remote { code, message } => Error::Remote {
                code,
                message: format!(
                    "generation {} of '{}' cannot be committed: {message}",
                    self.txn.id().target,
                    self.volume.name()
                ),
            },
            e => e,
        })
    }

    fn stop(&mut self) {
        self.shared.state.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Applier {
    /// Whatever is still queued is applied first (at most `MAX_QUEUED_BYTES`).
    fn drop(&mut self) {
        self.stop();
    }
}

/// The failure as an error the receiver can answer with, as often as asked.
fn failure(st: &State) -> Option<Error> {
    st.failed.as_ref().map(|(code, message)| Error::Remote {
        code: code.clone(),
        message: message.clone(),
    })
}

fn work(volume: &Volume, txn: &ApplyTxn, shared: &Shared) {
    loop {
        let batch = {
            let mut st = shared.state.lock();
            while (st.queue.is_empty() || st.held) && !st.closing {
                shared.changed.wait(&mut st);
            }
            if st.queue.is_empty() {
                return;
            }
            let batch = Arc::new(std::mem::take(&mut st.queue));
            st.in_flight = Some(batch.clone());
            batch
        };
        let bytes: usize = batch.iter().map(Change::data_len).sum();
        let ops: Vec<ApplyOp<'_>> = batch.iter().map(Change::op).collect();
        // Nothing more is applied after a failure: the generation is lost either way.
        let failed = shared.state.lock().failed.is_some();
        let started = std::time::Instant::now();
        let r = if failed {
            Ok(())
        } else {
            volume.apply_batch(txn, &ops)
        };
        log::debug!(
            "replica '{}': applied {} changes ({bytes} bytes) in {:.1} ms",
            volume.name(),
            ops.len(),
            crate::ms(started.elapsed())
        );
        let mut st = shared.state.lock();
        st.in_flight = None;
        st.queued_bytes -= bytes;
        if let Err(e) = r {
            log::warn!("applying to replica '{}' failed: {e}", volume.name());
            st.failed
                .get_or_insert((e.code().to_string(), e.to_string()));
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::DEFAULT_GRANULARITY;

    fn replica(size: u64) -> (tempfile::TempDir, Arc<Volume>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        Volume::create(&dir, "r", size, DEFAULT_GRANULARITY).unwrap();
        let v = Volume::open(&dir, "r").unwrap();
        v.make_replica("site-a", 1).unwrap();
        (tmp, Arc::new(v))
    }

    fn read(v: &Volume, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        v.read_at(offset, &mut buf).unwrap();
        buf
    }

    /// `len` bytes of `byte` at `offset`.
    fn filled(offset: u64, byte: u8, len: usize) -> Change {
        Change::Data {
            offset,
            data: vec![byte; len].into(),
        }
    }

    /// Apply and commit `generation`, its changes queued one at a time.
    fn apply_generation(v: &Arc<Volume>, generation: u64, changes: Vec<Change>) {
        let txn = v.begin_apply(1, generation, None).unwrap();
        let a = Applier::start(v.clone(), txn.clone()).unwrap();
        assert!(a.applies(&txn));
        for c in changes {
            a.push(vec![c]).unwrap();
        }
        a.finish().unwrap();
        v.commit_apply(&txn).unwrap();
    }

    #[test]
    fn queued_changes_are_all_applied_before_finish_returns() {
        let (_t, v) = replica(4 << 20);
        // A first generation, then a second one over it: the second journals before-images.
        for (generation, byte) in [(1u64, 1u8), (2, 2)] {
            let mut changes: Vec<Change> = (0..40u64)
                .map(|i| Change::Data {
                    offset: i * 65536,
                    data: vec![byte.wrapping_add(i as u8); 65536].into(),
                })
                .collect();
            changes.push(Change::Zero {
                offset: 3 << 20,
                length: 65536,
            });
            apply_generation(&v, generation, changes);
        }
        for i in 0..40u64 {
            assert_eq!(
                read(&v, i * 65536, 65536),
                vec![2u8.wrapping_add(i as u8); 65536]
            );
        }
        assert_eq!(read(&v, 3 << 20, 65536), vec![0u8; 65536]);
        assert_eq!(v.replica().unwrap().last_complete_generation, 2);
    }

    /// Generation 2 of a 4 MiB replica over generation 1 (every 64 KiB block `1`): blocks
    /// 0..40 rewritten, each with its own byte, and a zero run at 3 MiB.
    fn second_generation() -> Vec<Change> {
        let mut changes: Vec<Change> = (0..40u64)
            .map(|i| filled(i * 65536, 10 + i as u8, 65536))
            .collect();
        changes.push(Change::Zero {
            offset: 3 << 20,
            length: 65536,
        });
        changes
    }

    /// Generation 1 (every byte `1`) applied, generation 2 begun with its first ten changes
    /// in place: the rest is what an applier would still hold at the commit.
    fn second_generation_begun(v: &Arc<Volume>) -> (Arc<ApplyTxn>, Vec<Change>) {
        apply_generation(v, 1, vec![filled(0, 1, 4 << 20)]);
        let txn = v.begin_apply(1, 2, None).unwrap();
        let changes = second_generation();
        let ops: Vec<_> = changes[..10].iter().map(Change::op).collect();
        v.apply_batch(&txn, &ops).unwrap();
        (txn, changes)
    }

    /// Settled at generation 2: no staged tail left, and the journal (tail included) kept as
    /// the way back to generation 1.
    fn assert_settled_at_second_generation(v: &Volume) {
        v.settle().unwrap();
        assert_eq!(v.replica().unwrap().last_complete_generation, 2);
        assert_second_generation(v);
        assert!(crate::staged_tail::read(v.dir()).unwrap().is_none());
        assert_eq!(v.promote_to(Some(1)).unwrap(), 1);
        assert_eq!(read(v, 0, 4 << 20), vec![1u8; 4 << 20]);
    }

    fn assert_second_generation(v: &Volume) {
        for i in 0..40u64 {
            assert_eq!(
                read(v, i * 65536, 65536),
                vec![10 + i as u8; 65536],
                "block {i}"
            );
        }
        assert_eq!(read(v, 3 << 20, 65536), vec![0u8; 65536]);
        assert_eq!(read(v, (3 << 20) + 65536, 65536), vec![1u8; 65536]);
    }

    #[test]
    fn a_commit_that_stages_its_tail_serves_the_generation_at_once_and_keeps_its_point() {
        let (_t, v) = replica(4 << 20);
        let (txn, changes) = second_generation_begun(&v);
        let tail = changes[10..].to_vec();
        v.commit_apply_staged(&txn, tail.clone()).unwrap();
        // Committed: recorded, and read as generation 2 although most of it is not in place.
        assert_eq!(v.replica().unwrap().last_complete_generation, 2);
        assert!(v.applying().is_none());
        assert_second_generation(&v);
        assert!(crate::staged_tail::read(v.dir()).unwrap().is_some());
        // The applier writes the tail in place; the volume settles.
        let a = Applier::start(v.clone(), txn.clone()).unwrap();
        a.push(tail).unwrap();
        v.finish_settle(&txn, a.finish());
        assert_settled_at_second_generation(&v);
    }

    #[test]
    fn a_staged_tail_left_by_a_stop_is_written_at_the_next_open() {
        let (t, v) = replica(4 << 20);
        let (txn, changes) = second_generation_begun(&v);
        // Half of the tail reaches the file before the stop; the rest never does.
        let half: Vec<_> = changes[10..25].iter().map(Change::op).collect();
        v.commit_apply_staged(&txn, changes[10..].to_vec()).unwrap();
        v.apply_batch(&txn, &half).unwrap();
        drop((txn, v));
        let v = Volume::open(&t.path().join("r"), "r").unwrap();
        assert!(v.applying().is_none());
        assert_settled_at_second_generation(&v);
    }

    #[test]
    fn staged_commits_keep_points_and_drop_the_oldest_once_settled() {
        let (_t, v) = replica(1 << 20);
        for generation in 1..=6u64 {
            let txn = v.begin_apply(1, generation, None).unwrap();
            let a = Applier::start(v.clone(), txn.clone()).unwrap();
            // Everything queued at the commit: the whole generation is the tail.
            let tail = vec![filled(0, generation as u8, 1 << 20)];
            v.commit_apply_staged(&txn, tail.clone()).unwrap();
            assert_eq!(read(&v, 0, 1 << 20), vec![generation as u8; 1 << 20]);
            a.push(tail).unwrap();
            v.finish_settle(&txn, a.finish());
        }
        v.settle().unwrap();
        let rep = v.replica().unwrap();
        let kept: Vec<u64> = rep.points.iter().map(|p| p.generation).collect();
        assert_eq!(kept, vec![5, 4], "the default keeps three generations");
        let files = std::fs::read_dir(v.dir().join("points")).unwrap().count();
        assert_eq!(
            files, 2,
            "one undo journal per point, the dropped ones deleted"
        );
        assert_eq!(v.promote_to(Some(4)).unwrap(), 4);
        assert_eq!(read(&v, 0, 1 << 20), vec![4u8; 1 << 20]);
    }

    #[test]
    fn the_next_generation_waits_for_the_staged_tail() {
        let (_t, v) = replica(1 << 20);
        apply_generation(&v, 1, vec![filled(0, 1, 1 << 20)]);
        let txn = v.begin_apply(1, 2, None).unwrap();
        let a = Applier::start(v.clone(), txn.clone()).unwrap();
        let tail = vec![filled(0, 2, 1 << 20)];
        v.commit_apply_staged(&txn, tail.clone()).unwrap();
        let settler = {
            let (v, txn) = (v.clone(), txn.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                a.push(tail).unwrap();
                v.finish_settle(&txn, a.finish());
            })
        };
        // Begun only once generation 2 is in place, whatever the order of the threads.
        let next = v.begin_apply(1, 3, None).unwrap();
        assert!(crate::staged_tail::read(v.dir()).unwrap().is_none());
        assert_eq!(next.id().base, 2);
        settler.join().unwrap();
        assert_eq!(read(&v, 0, 1 << 20), vec![2u8; 1 << 20]);
    }

    #[test]
    fn later_changes_to_the_same_bytes_win_across_batches() {
        let (_t, v) = replica(1 << 20);
        apply_generation(&v, 1, vec![filled(0, 1, 131072)]);
        // Many small pushes over the same two blocks (one straddling them): they are journaled
        // and written in several batches, and the last one pushed must be what the replica holds.
        let changes = (0..200u32)
            .map(|i| filled(4096 * u64::from(i % 3), (i % 251) as u8, 65536 + 4096))
            .collect();
        apply_generation(&v, 2, changes);
        let mut want = vec![1u8; 131072];
        for i in 0..200usize {
            let at = 4096 * (i % 3);
            want[at..at + 65536 + 4096].fill((i % 251) as u8);
        }
        assert_eq!(read(&v, 0, 131072), want);
    }

    #[test]
    fn changes_queued_for_an_ended_generation_are_refused_not_written() {
        let (_t, v) = replica(4 << 20);
        apply_generation(&v, 1, vec![filled(0, 7, 65536)]);

        let txn = v.begin_apply(1, 2, None).unwrap();
        let a = Applier::start(v.clone(), txn.clone()).unwrap();
        // The generation ends (aborted, as a promotion would) with the applier still holding it.
        v.abort_apply().unwrap();
        a.push(vec![Change::Data {
            offset: 0,
            data: vec![9u8; 65536].into(),
        }])
        .unwrap();
        let e = a.drain().unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
        assert!(e.to_string().contains("no longer being applied"), "{e}");
        // Once failed, nothing more is queued, and finishing says why.
        let again = a.push(vec![Change::Zero {
            offset: 0,
            length: 65536,
        }]);
        assert!(again.is_err());
        let e = a.finish().unwrap_err();
        assert!(e.to_string().contains("cannot be committed"), "{e}");
        assert_eq!(read(&v, 0, 65536), vec![7u8; 65536]);
    }
}
