//! Synchronous replication: `SyncLink` is the `Mirror` a volume in a sync pair sends every change
//! through before the change is acknowledged to its client (DRBD protocol C): the write is done
//! locally, then sent to the target as a data frame on `ferry.dp.<site>.sync`, and the client's
//! acknowledgement waits for the target's. A FLUSH, or a write with FUA, is also flushed at the
//! target before it is acknowledged here.
//!
//! Every change carries `(epoch, seq)`; the target applies each sequence number once (a resend
//! after a lost acknowledgement is recognised and not applied again) and refuses a stale epoch.
//!
//! When the target cannot be reached the pair's `on_loss` decides: `block` retries until a
//! timeout and then fails the write (the client sees EIO; the local write is kept and tracked),
//! `suspend` turns the link off — writes go on locally, tracked in the dirty bitmap — and tells the
//! shipper, which resyncs only what changed and comes back to sync.
//!
//! A link starts `Pending`: it is installed at the cut that starts sync, and writes after that cut
//! wait until the target holds the cut (then the link is `Active`). Never used for reading.

use super::frame;
use super::protocol::{control_subject, sync_subject, unreachable, ControlMessage, ControlReply};
use super::route::Route;
use crate::error::{Error, Result};
use crate::volume::Mirror;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Synchronous writes up to this size are sent raw (see `Mirror::write` below).
const SYNC_RAW_MAX: usize = 16 << 10;
use std::time::{Duration, Instant};

/// What a sync pair does when the target stops answering.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnLoss {
    /// Writes wait (up to the pair's timeout), then fail with EIO.
    Block,
    /// Writes go on locally; the link turns off and the pair resyncs when the target is back.
    #[default]
    Suspend,
}

/// Time to wait for one acknowledgement before the link counts as lost.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Installed at a cut; writes wait until the target holds that cut.
    Pending,
    Active,
    /// Off: writes are only tracked; the shipper resyncs.
    Suspended,
    /// `block` pairs after a write timed out: every write fails with EIO (it is kept here and
    /// tracked) until the shipper has resynced and installed a new link.
    Failed,
}

pub struct SyncLink {
    route: Route,
    runtime: tokio::runtime::Handle,
    group: String,
    volume: String,
    target: String,
    /// Where the target's data plane listens (its site, or its node in the site).
    address: String,
    epoch: u64,
    level: i32,
    on_loss: OnLoss,
    block_timeout: Duration,
    /// The generation the target's sync session builds on (for re-attaching).
    base: AtomicU64,
    next_seq: AtomicU64,
    /// Sequence numbers sent and not acknowledged yet.
    unacked: Mutex<BTreeSet<u64>>,
    state: Mutex<(LinkState, Option<String>)>,
    changed: Condvar,
    /// Told when the link suspends itself, so the shipper resyncs at once.
    lost: Arc<tokio::sync::Notify>,
    pub writes: AtomicU64,
}

impl SyncLink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: Route,
        runtime: tokio::runtime::Handle,
        group: &str,
        volume: &str,
        target: &str,
        address: String,
        epoch: u64,
        level: i32,
        on_loss: OnLoss,
        block_timeout: Duration,
        lost: Arc<tokio::sync::Notify>,
    ) -> SyncLink {
        SyncLink {
            route,
            runtime,
            group: group.into(),
            volume: volume.into(),
            target: target.into(),
            address,
            epoch,
            level,
            on_loss,
            block_timeout,
            base: AtomicU64::new(0),
            next_seq: AtomicU64::new(1),
            unacked: Mutex::new(BTreeSet::new()),
            state: Mutex::new((LinkState::Pending, None)),
            changed: Condvar::new(),
            lost,
            writes: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> (LinkState, Option<String>) {
        self.state.lock().clone()
    }

    /// The target holds generation `base` and has a sync session on it: let writes through.
    pub fn activate(&self, base: u64) {
        self.base.store(base, Ordering::SeqCst);
        self.set_state(LinkState::Active, None);
    }

    /// A later generation is complete at the target (a sync mark).
    pub fn set_base(&self, base: u64) {
        self.base.store(base, Ordering::SeqCst);
    }

    /// Turn the link off; waiting writes go on locally.
    pub fn suspend(&self, why: &str) {
        let mut st = self.state.lock();
        if st.0 != LinkState::Suspended {
            log::warn!(
                "synchronous replication of '{}' to {} suspended: {why}",
                self.volume,
                self.target
            );
        }
        *st = (LinkState::Suspended, Some(why.to_string()));
        self.changed.notify_all();
        self.lost.notify_one();
    }

    /// Make every write fail until the link is replaced (`block` pairs that lost the target).
    pub fn fail(&self, why: &str) {
        self.set_state(LinkState::Failed, Some(why.to_string()));
    }

    fn set_state(&self, s: LinkState, why: Option<String>) {
        *self.state.lock() = (s, why);
        self.changed.notify_all();
    }

    /// The lowest sequence number every change at or below which was acknowledged.
    fn floor(&self) -> u64 {
        match self.unacked.lock().first() {
            Some(s) => s - 1,
            None => self.next_seq.load(Ordering::SeqCst) - 1,
        }
    }

    /// Wait while pending; true when the change must be sent.
    fn wait_active(&self) -> Result<bool> {
        let mut st = self.state.lock();
        while st.0 == LinkState::Pending {
            self.changed.wait(&mut st);
        }
        match st.0 {
            LinkState::Failed => Err(self.failed(st.1.as_deref().unwrap_or("unreachable"))),
            s => Ok(s == LinkState::Active),
        }
    }

    fn failed(&self, why: &str) -> Error {
        Error::Io {
            context: format!(
                "synchronous replication of '{}' to site {} failed ({why}); the write is kept here and tracked",
                self.volume, self.target
            ),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, why.to_string()),
        }
    }

    /// Run `f` to completion from a synchronous caller, on a runtime worker or not.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.runtime.block_on(f))
        } else {
            self.runtime.block_on(f)
        }
    }

    async fn request(&self, subject: String, body: bytes::Bytes) -> Result<()> {
        let reply =
            tokio::time::timeout(ATTEMPT_TIMEOUT, self.route.client().request(subject, body))
                .await
                .map_err(|_| Error::Service {
                    dir: self.target.clone().into(),
                    why: format!(
                        "site {} did not acknowledge within {ATTEMPT_TIMEOUT:?}",
                        self.target
                    ),
                })?
                .map_err(|e| unreachable(&self.target, &self.target, &e))?;
        let r: ControlReply =
            serde_json::from_slice(&reply.payload).map_err(|e| Error::Protocol {
                peer: format!("site {}", self.target),
                why: format!("malformed acknowledgement: {e}"),
            })?;
        r.into_result().map(|_| ())
    }

    /// Ask the target for a sync session on `base`, taking over every change up to `floor`.
    async fn attach(&self) -> Result<()> {
        let msg = ControlMessage::SyncStart {
            group: self.group.clone(),
            volume: self.volume.clone(),
            epoch: self.epoch,
            base: self.base.load(Ordering::SeqCst),
            floor: self.floor(),
        };
        let body = serde_json::to_vec(&msg).expect("control message serializes");
        self.request(control_subject(&self.address), body.into())
            .await
    }

    /// Start the target's session (at sync start, once the target holds `base`).
    pub async fn start_session(&self, base: u64) -> Result<()> {
        self.base.store(base, Ordering::SeqCst);
        self.attach().await
    }

    /// Send `body` until acknowledged, as the loss policy allows. `Ok(false)`: suspended.
    fn deliver(&self, subject: String, body: bytes::Bytes) -> Result<bool> {
        let started = Instant::now();
        loop {
            let r = self.block_on(self.request(subject.clone(), body.clone()));
            let e = match r {
                Ok(()) => return Ok(true),
                Err(e) => e,
            };
            // The target lost its session (it restarted): attach again and resend.
            if e.code() == "ERR_NO_SYNC_SESSION" && self.block_on(self.attach()).is_ok() {
                continue;
            }
            // Fenced off for good: the target's copy moved on (promoted, or another epoch).
            let fatal = matches!(e.code(), "ERR_STALE_EPOCH" | "ERR_INVALID_ARGUMENT");
            match self.on_loss {
                OnLoss::Suspend => {
                    self.suspend(&e.to_string());
                    return Ok(false);
                }
                OnLoss::Block if fatal || started.elapsed() >= self.block_timeout => {
                    let why = e.to_string();
                    log::warn!(
                        "synchronous replication of '{}' to {}: writes fail until it is resynced: {why}",
                        self.volume,
                        self.target
                    );
                    self.set_state(LinkState::Failed, Some(why.clone()));
                    self.lost.notify_one();
                    return Err(self.failed(&why));
                }
                OnLoss::Block => std::thread::sleep(RETRY_PAUSE),
            }
            match self.state.lock().0 {
                LinkState::Suspended => return Ok(false),
                LinkState::Failed => return Err(self.failed("another write timed out")),
                _ => {}
            }
        }
    }

    fn send_change(&self, frame_of: impl FnOnce(u64) -> Result<Vec<u8>>, fua: bool) -> Result<()> {
        if !self.wait_active()? {
            return Ok(());
        }
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let msg = frame_of(seq)?;
        self.unacked.lock().insert(seq);
        let r = self.deliver(sync_subject(&self.address), msg.into());
        self.unacked.lock().remove(&seq);
        if r? {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if fua {
                return self.flush();
            }
        }
        Ok(())
    }
}

impl Mirror for SyncLink {
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let base = self.base.load(Ordering::SeqCst);
        self.send_change(
            |seq| {
                frame::encode_data(
                    &self.volume,
                    self.epoch,
                    base,
                    seq,
                    offset,
                    data,
                    // A write waits for the target: small ones go raw, compressing them costs
                    // more time (zstd's setup per frame) than the bytes save on a metro link.
                    if data.len() <= SYNC_RAW_MAX {
                        frame::RAW_LEVEL
                    } else {
                        self.level
                    },
                )
            },
            fua,
        )
    }

    fn zero(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        let base = self.base.load(Ordering::SeqCst);
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(1 << 30);
            self.send_change(
                |seq| frame::encode_zero(&self.volume, self.epoch, base, seq, at, n as u32),
                false,
            )?;
            at += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.wait_active()? {
            return Ok(());
        }
        let msg = ControlMessage::SyncFlush {
            group: self.group.clone(),
            volume: self.volume.clone(),
            epoch: self.epoch,
        };
        let body = serde_json::to_vec(&msg).expect("control message serializes");
        self.deliver(control_subject(&self.address), body.into())
            .map(|_| ())
    }
}

/// The target's side of one volume's sync session: which changes were applied.
pub struct SyncSession {
    pub epoch: u64,
    /// Every sequence number up to here was applied (or belongs to an earlier session).
    upto: u64,
    above: BTreeSet<u64>,
}

impl SyncSession {
    pub fn new(epoch: u64, floor: u64) -> SyncSession {
        SyncSession {
            epoch,
            upto: floor,
            above: BTreeSet::new(),
        }
    }

    /// Was `seq` applied already (a resend)?
    pub fn seen(&self, seq: u64) -> bool {
        seq <= self.upto || self.above.contains(&seq)
    }

    pub fn record(&mut self, seq: u64) {
        self.above.insert(seq);
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_applies_each_sequence_number_once() {
        let mut s = SyncSession::new(1, 10);
        assert!(s.seen(10) && !s.seen(11));
        s.record(12);
        assert!(s.seen(12) && !s.seen(11));
        s.record(11);
        assert!(s.seen(11) && s.seen(12) && !s.seen(13));
        assert_eq!((s.upto, s.above.len()), (12, 0));
    }
}
