//! `Shipper`: the source side of one replication pair — a consistency group of volumes shipped to
//! one target site. Each cycle cuts the group with images (copy-before-write), sends the changes
//! since what the target holds as verified frames over NATS with a bounded window of requests in
//! flight (each acknowledged only once applied), then commits the generation at the target.
//! Continuous mode runs a cycle every interval (starting early by twice the last cycle's time,
//! so the lag stays under the interval); `sync` runs one now and waits for it.

use super::frame::{self, FrameSizer};
use super::protocol::{
    address, block_hash, control_subject, frames_subject, region_allowed, unreachable,
    ControlMessage, ControlReply, GenerationRef, ReplicaReport, ReverseBase, VolumeSpec,
    MAX_ANNOUNCED_EXTENTS, MAX_HASHES,
};
use super::route::Route;
use super::sync::{LinkState, OnLoss, SyncLink};
use crate::bitmap::DirtyBitmap;
use crate::cut_image::CutImage;
use crate::error::{Error, Result};
use crate::ms;
use crate::registry::{CutBase, Registry};
use crate::volume::{Resume, Volume};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames in flight per pair: at most this many requests, and at most `WINDOW_BYTES` of volume
/// data in them — 16 frames of 1 MiB, or up to 64 small ones (the target applies what waits as
/// one batch, so small frames go faster in larger numbers).
pub const WINDOW: usize = 64;
pub const WINDOW_BYTES: u64 = 16 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const RESENDS: usize = 3;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Async,
    Sync,
}

/// A pair as configured (persisted, so a restarted service resumes it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairConfig {
    pub group: String,
    pub volumes: Vec<String>,
    pub target_site: String,
    /// The target site's node that holds the replicas (`None`: the site's one volume service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    pub mode: Mode,
    pub interval_ms: u64,
    /// Bytes per second on the wire; `None` is unlimited.
    pub rate: Option<u64>,
    pub level: i32,
    pub max_message: usize,
    /// Sync pairs: what happens to writes when the target is unreachable.
    #[serde(default)]
    pub on_loss: OnLoss,
    /// Sync pairs with `block`: how long a write waits for the target before it fails.
    #[serde(default = "default_block_timeout")]
    pub block_timeout_ms: u64,
    /// Complete generations the target keeps as recovery points (the last one included).
    #[serde(default = "default_recovery_points")]
    pub recovery_points: usize,
    /// Replicating back to the site these volumes were promoted from (see `ReverseBase`).
    #[serde(default)]
    pub reverse: bool,
    /// Recovery points older than this (ms) are dropped at the target; `None` keeps them by
    /// count only.
    #[serde(default)]
    pub points_max_age_ms: Option<u64>,
    /// Cut on `interval_ms` (the default) or only when asked (`Shipper::cut_now`): the
    /// orchestrator then takes every cut itself, around quiesce/thaw and member capture.
    #[serde(default = "default_scheduled")]
    pub scheduled: bool,
}

fn default_scheduled() -> bool {
    true
}

/// The generation each volume of a group was cut at.
pub type Cut = Vec<(String, u64)>;

/// Someone waiting on the shipper: for the next cut, or for it to be complete at the target.
enum Waiter {
    Complete(oneshot::Sender<Result<u64>>),
    Cut(oneshot::Sender<Result<Cut>>),
}

/// How long an unscheduled pair sleeps between cuts nobody asked for (never, in practice).
const UNSCHEDULED: Duration = Duration::from_secs(365 * 24 * 3600);

fn default_recovery_points() -> usize {
    crate::volume_meta::DEFAULT_KEEP_POINTS
}

pub const DEFAULT_BLOCK_TIMEOUT_MS: u64 = 30_000;

fn default_block_timeout() -> u64 {
    DEFAULT_BLOCK_TIMEOUT_MS
}

/// A sync pair goes synchronous once a catch-up generation shipped at most this much: writes
/// wait while the generation that starts sync is shipped.
const SYNC_ENTRY_MAX_BYTES: u64 = 64 << 20;
/// How long a stopping sync pair waits for the target to record its last generation.
const FINAL_MARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PairStatus {
    pub group: String,
    pub volumes: Vec<String>,
    pub target: String,
    /// The target's node holding the replicas (none: the site's one volume service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    pub mode: String,
    /// `starting`, `syncing` (first full copy), `shipping`, `idle`, `error`.
    pub state: String,
    pub last_complete_generation: Option<u64>,
    pub last_complete_at_ms: Option<u64>,
    pub lag_seconds: f64,
    /// Bytes of volume data per byte on the wire (1 when nothing was shipped yet).
    pub compression_ratio: f64,
    pub bytes_raw: u64,
    pub bytes_wire: u64,
    pub generations_shipped: u64,
    pub last_error: Option<String>,
    /// Sync pairs: `catching-up` (async until the target is close), `active` (every write
    /// waits for the target), `suspended` (the target was lost; resyncing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_state: Option<String>,
    /// Sync pairs: writes acknowledged by the target, and times sync was suspended.
    pub sync_writes: u64,
    pub suspensions: u64,
    /// The last generation shipped whole: what it took from its cut to the target's commit.
    pub last_cycle: Option<CycleStats>,
    /// While a generation ships: its volume data sent so far and in all (progress of a long
    /// transfer: a first full copy, a failback's resync, a migration's final sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
    /// How messages reach the target now: `direct` (a connection to the target site's own
    /// server, `--peer-nats`) or `leafnode` (through this site's server and the link).
    #[serde(default)]
    pub route: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Transfer {
    pub generation: u64,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// One generation's trip: cut at the source, shipped, applied and committed at the target.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CycleStats {
    /// The newest generation of the group's volumes it completed.
    pub generation: u64,
    /// From the start of the cut to the target's acknowledgement of the commit.
    pub ms: f64,
    /// Volume data shipped and bytes on the wire for it (frames only).
    pub bytes_raw: u64,
    pub bytes_wire: u64,
    /// Where `ms` went: the cut (with its copy-before-write images), the target's `begin`, the
    /// frames until the last one was acknowledged, and the commit (the target applying what it
    /// still held queued, then committing). What is slow shows here first.
    #[serde(default)]
    pub cut_ms: f64,
    #[serde(default)]
    pub begin_ms: f64,
    #[serde(default)]
    pub ship_ms: f64,
    #[serde(default)]
    pub commit_ms: f64,
}

/// Where the site's data plane sits, for residency checks and messages.
#[derive(Debug, Clone)]
pub struct SiteIdentity {
    pub site: String,
    pub region: String,
    /// Regions allowed to hold copies of this site's volumes; empty means any.
    pub allowed_regions: Vec<String>,
    /// This volume service's node in the site (`None`: the site's only volume service).
    pub node: Option<String>,
}

impl SiteIdentity {
    /// Where this data plane listens (see `protocol::address`).
    pub fn address(&self) -> String {
        address(&self.site, self.node.as_deref())
    }
}

impl PairConfig {
    /// Where the target's data plane listens (see `protocol::address`).
    pub fn target_address(&self) -> String {
        address(&self.target_site, self.target_node.as_deref())
    }
}

pub struct Shipper {
    cfg: PairConfig,
    me: SiteIdentity,
    registry: Arc<Registry>,
    /// This site's connection: events.
    nats: async_nats::Client,
    /// How messages reach the target site.
    route: Route,
    status: Mutex<PairStatus>,
    /// When the generation the target last completed was cut (ms since the epoch), for lag.
    started_ms: u64,
    bytes_raw: Arc<AtomicU64>,
    bytes_wire: Arc<AtomicU64>,
    sync_tx: mpsc::Sender<Waiter>,
    sync_rx: Mutex<Option<mpsc::Receiver<Waiter>>>,
    /// Sync pairs: the links installed in the volumes (one per volume), and their signal.
    links: Mutex<Vec<(Arc<Volume>, Arc<SyncLink>)>>,
    link_lost: Arc<tokio::sync::Notify>,
    /// A commit (or sync mark) is on its way to the target: a stop waits for it to be answered,
    /// so that what the pair reports is what the target holds.
    committing: AtomicBool,
    /// The generation shipping now: (generation, its bytes, `bytes_raw` when it started).
    transfer: Mutex<Option<(u64, u64, u64)>>,
}

fn now_ms() -> u64 {
    crate::volume_meta::now_ms()
}

fn answer_cut(waiters: &mut Vec<oneshot::Sender<Result<Cut>>>, cut: Cut) {
    for w in waiters.drain(..) {
        let _ = w.send(Ok(cut.clone()));
    }
}

impl Shipper {
    pub fn new(
        cfg: PairConfig,
        me: SiteIdentity,
        registry: Arc<Registry>,
        nats: async_nats::Client,
        route: Route,
    ) -> Arc<Shipper> {
        let (sync_tx, sync_rx) = mpsc::channel(16);
        let status = PairStatus {
            group: cfg.group.clone(),
            volumes: cfg.volumes.clone(),
            target: cfg.target_site.clone(),
            target_node: cfg.target_node.clone(),
            mode: match cfg.mode {
                Mode::Async => "async".into(),
                Mode::Sync => "sync".into(),
            },
            state: "starting".into(),
            sync_state: (cfg.mode == Mode::Sync).then(|| "catching-up".into()),
            ..Default::default()
        };
        // Until the target says what it holds, every closed bitmap may be needed.
        for v in &cfg.volumes {
            if let Some(vol) = registry.get(v) {
                vol.pin_generation(&cfg.group, Some(0));
            }
        }
        Arc::new(Shipper {
            cfg,
            me,
            registry,
            nats,
            route,
            status: Mutex::new(status),
            started_ms: now_ms(),
            bytes_raw: Arc::new(AtomicU64::new(0)),
            bytes_wire: Arc::new(AtomicU64::new(0)),
            sync_tx,
            sync_rx: Mutex::new(Some(sync_rx)),
            links: Mutex::new(Vec::new()),
            link_lost: Arc::new(tokio::sync::Notify::new()),
            committing: AtomicBool::new(false),
            transfer: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &PairConfig {
        &self.cfg
    }

    pub fn status(&self) -> PairStatus {
        let mut s = self.status.lock().clone();
        let since = s.last_complete_at_ms.unwrap_or(self.started_ms);
        s.lag_seconds = now_ms().saturating_sub(since) as f64 / 1000.0;
        s.bytes_raw = self.bytes_raw.load(Ordering::Relaxed);
        s.bytes_wire = self.bytes_wire.load(Ordering::Relaxed);
        s.route = self.route.kind().into();
        s.compression_ratio = if s.bytes_wire == 0 {
            1.0
        } else {
            s.bytes_raw as f64 / s.bytes_wire as f64
        };
        if let Some((generation, total, start)) = *self.transfer.lock() {
            s.transfer = Some(Transfer {
                generation,
                done_bytes: s.bytes_raw.saturating_sub(start).min(total),
                total_bytes: total,
            });
        }
        s.sync_writes += self
            .links
            .lock()
            .iter()
            .map(|(_, l)| l.writes.load(Ordering::Relaxed))
            .sum::<u64>();
        s
    }

    /// Is every link of this sync pair active?
    fn synchronous(&self) -> bool {
        let links = self.links.lock();
        !links.is_empty() && links.iter().all(|(_, l)| l.state().0 == LinkState::Active)
    }

    /// Why a link was lost, if one was.
    fn lost_link(&self) -> Option<String> {
        self.links.lock().iter().find_map(|(_, l)| match l.state() {
            (LinkState::Suspended | LinkState::Failed, why) => Some(why.unwrap_or_default()),
            _ => None,
        })
    }

    /// A `block` pair's write timed out: writes fail until a resync has brought the target up
    /// to date and sync starts again (the failed links stay installed until then).
    async fn block_sync(&self, why: &str) {
        {
            let mut st = self.status.lock();
            if st.sync_state.as_deref() == Some("blocked") {
                return;
            }
            st.sync_state = Some("blocked".into());
            st.suspensions += 1;
            st.last_error = Some(format!("synchronous replication lost its target: {why}"));
        }
        self.event("replication.blocked", why).await;
    }

    /// Take the links out of the volumes: writes stop waiting for the target. Their counts stay
    /// in the status.
    pub fn detach_links(&self, why: &str) {
        let links = std::mem::take(&mut *self.links.lock());
        let mut st = self.status.lock();
        for (vol, link) in links {
            link.suspend(why);
            vol.set_mirror(None);
            st.sync_writes += link.writes.load(Ordering::Relaxed);
        }
    }

    /// A sync pair lost its target: go back to shipping generations, say so on the site's event
    /// subject, and come back to sync once caught up.
    async fn suspend_sync(&self, why: &str) {
        self.detach_links(why);
        {
            let mut st = self.status.lock();
            st.sync_state = Some("suspended".into());
            st.suspensions += 1;
            st.last_error = Some(format!("synchronous replication suspended: {why}"));
        }
        self.event("replication.suspended", why).await;
    }

    /// Publish a CloudEvents-style event on `ferry.events.<site>.<kind>`.
    async fn event(&self, kind: &str, detail: &str) {
        let body = serde_json::json!({
            "specversion": "1.0",
            "type": format!("io.ferry.{kind}"),
            "source": format!("ferry/{}", self.me.site),
            "id": format!("{}-{}-{}", self.cfg.group, kind, now_ms()),
            "time_ms": now_ms(),
            "data": {
                "group": self.cfg.group,
                "volumes": self.cfg.volumes,
                "target": self.cfg.target_site,
                "detail": detail,
            },
        });
        let subject = format!("ferry.events.{}.{kind}", self.me.site);
        let _ = self
            .nats
            .publish(subject, body.to_string().into_bytes().into())
            .await;
    }

    /// Cut now and wait until that generation is complete at the target.
    pub async fn sync_now(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.sync_tx.send(Waiter::Complete(tx)).await.map_err(|_| {
            Error::InvalidArgument(format!(
                "replication of group '{}' is stopped",
                self.cfg.group
            ))
        })?;
        rx.await.map_err(|_| {
            Error::InvalidArgument(format!("replication of group '{}' stopped", self.cfg.group))
        })?
    }

    /// Cut now and answer the generations as soon as the cut is taken (shipping goes on): the
    /// orchestrator thaws an application it quiesced for this cut.
    pub async fn cut_now(&self) -> Result<Cut> {
        let (tx, rx) = oneshot::channel();
        let stopped = || {
            Error::InvalidArgument(format!(
                "replication of group '{}' is stopped",
                self.cfg.group
            ))
        };
        self.sync_tx
            .send(Waiter::Cut(tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Run cycles until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut sync_rx = self.sync_rx.lock().take().expect("run once");
        let mut held: Option<HashMap<String, ReplicaReport>> = None;
        let interval = if self.cfg.scheduled {
            Duration::from_millis(self.cfg.interval_ms.max(super::manager::MIN_INTERVAL_MS))
        } else {
            UNSCHEDULED
        };
        let retry =
            Duration::from_millis(self.cfg.interval_ms.max(super::manager::MIN_INTERVAL_MS))
                .min(Duration::from_secs(2));
        let mut next = tokio::time::Instant::now();
        let mut last_shipped = u64::MAX;
        let link_lost = self.link_lost.clone();
        loop {
            // Also when a stop arrived while a commit was let finish below.
            if *shutdown.borrow() {
                break;
            }
            let mut received = Vec::new();
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep_until(next) => {}
                _ = link_lost.notified() => {}
                w = sync_rx.recv() => match w { Some(w) => received.push(w), None => break },
            }
            while let Ok(w) = sync_rx.try_recv() {
                received.push(w);
            }
            let (mut waiters, mut cut_waiters) = (Vec::new(), Vec::new());
            for w in received {
                match w {
                    Waiter::Complete(w) => waiters.push(w),
                    Waiter::Cut(w) => cut_waiters.push(w),
                }
            }
            if let Some(why) = self.lost_link() {
                match self.cfg.on_loss {
                    OnLoss::Suspend => self.suspend_sync(&why).await,
                    OnLoss::Block => self.block_sync(&why).await,
                }
                held = None;
            }
            let sync_pair = self.cfg.mode == Mode::Sync;
            let in_sync = sync_pair && self.synchronous();
            let before = self.bytes_raw.load(Ordering::Relaxed);
            let cycle_started = tokio::time::Instant::now();
            let stopping = async {
                let _ = shutdown.changed().await;
                // A commit under way is let finish: the cycle then ends first.
                while self.committing.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            let r = tokio::select! {
                _ = stopping => break,
                r = async {
                    if in_sync {
                        self.mark(&mut cut_waiters).await
                    } else {
                        let enter = sync_pair && last_shipped <= SYNC_ENTRY_MAX_BYTES;
                        self.cycle(&mut held, enter, &mut cut_waiters).await
                    }
                } => r,
            };
            match &r {
                Ok(_) => {
                    last_shipped = self.bytes_raw.load(Ordering::Relaxed) - before;
                    // The interval is the lag the pair keeps under (its RPO): the lag peaks just
                    // before a generation lands, at the time from the previous cut to that
                    // landing, so the next cut starts early by twice this cycle's time (up to
                    // half the interval), whatever the cycle took. A sync pair catching up goes
                    // on at once until it is synchronous.
                    next = if sync_pair && !self.synchronous() {
                        tokio::time::Instant::now()
                    } else {
                        cycle_started + next_cut_after(interval, cycle_started.elapsed())
                    };
                    let mut st = self.status.lock();
                    st.state = "idle".into();
                    st.last_error = None;
                }
                Err(e) => {
                    held = None;
                    last_shipped = u64::MAX;
                    if sync_pair && !in_sync {
                        // A failed start of sync must not leave writes waiting: they go on
                        // locally (`suspend`) or fail until sync is back (`block`).
                        match self.cfg.on_loss {
                            OnLoss::Suspend => self.detach_links(&e.to_string()),
                            OnLoss::Block => {
                                for (_, l) in self.links.lock().iter() {
                                    l.fail(&e.to_string());
                                }
                            }
                        }
                    } else if in_sync && self.cfg.on_loss == OnLoss::Suspend {
                        self.suspend_sync(&e.to_string()).await;
                    }
                    // Back off, but not past the interval: the RPO depends on retrying.
                    next = tokio::time::Instant::now() + retry;
                    for name in &self.cfg.volumes {
                        if let Some(v) = self.registry.get(name) {
                            v.release_cut_image(&self.cfg.group);
                        }
                    }
                    let mut st = self.status.lock();
                    st.state = "error".into();
                    st.last_error = Some(e.to_string());
                    log::warn!(
                        "replication of group '{}' to {}: {e}",
                        self.cfg.group,
                        self.cfg.target_site
                    );
                }
            }
            *self.transfer.lock() = None;
            // A cut that was not reached: say why.
            for w in cut_waiters {
                let _ = w.send(Err(match &r {
                    Ok(_) => Error::InvalidArgument("replication stopped before the cut".into()),
                    Err(e) => Error::Remote {
                        code: e.code().to_string(),
                        message: e.to_string(),
                    },
                }));
            }
            for w in waiters {
                let _ = w.send(match &r {
                    Ok(g) => Ok(*g),
                    Err(e) => Err(Error::Remote {
                        code: e.code().to_string(),
                        message: e.to_string(),
                    }),
                });
            }
        }
        // A synchronous target holds every write acknowledged so far: record that as a complete
        // generation before the links go, so the target reports (and promotes at) what it holds
        // and a later reverse has less to send. Bounded: a target that is gone changes nothing.
        if self.cfg.mode == Mode::Sync && self.synchronous() {
            match tokio::time::timeout(FINAL_MARK_TIMEOUT, self.mark(&mut Vec::new())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::warn!("final mark of group '{}': {e}", self.cfg.group),
                Err(_) => log::warn!("final mark of group '{}' timed out", self.cfg.group),
            }
        }
        self.detach_links("replication stopped");
    }

    /// In sync: cut the group (every change before the cut is acknowledged by the target, since
    /// writes hold the gate until then) and tell the target that generation is complete.
    async fn mark(&self, cut_waiters: &mut Vec<oneshot::Sender<Result<Cut>>>) -> Result<u64> {
        let cut_at = now_ms();
        let reg = self.registry.clone();
        let names = self.cfg.volumes.clone();
        let cuts = tokio::task::spawn_blocking(move || reg.cut(&names))
            .await
            .map_err(join_err)??;
        let refs: Vec<GenerationRef> = cuts
            .iter()
            .map(|(name, g)| GenerationRef {
                name: name.clone(),
                epoch: self.registry.get(name).map(|v| v.meta().epoch).unwrap_or(1),
                generation: *g,
                resume_from: None,
                changes: Vec::new(),
            })
            .collect();
        answer_cut(
            cut_waiters,
            cuts.iter().map(|(n, g)| (n.clone(), *g)).collect(),
        );
        let _committing = Committing::start(&self.committing);
        self.control(&ControlMessage::SyncMark {
            group: self.cfg.group.clone(),
            volumes: refs.clone(),
        })
        .await?;
        for (vol, link) in self.links.lock().iter() {
            if let Some(r) = refs.iter().find(|r| r.name == vol.name()) {
                link.set_base(r.generation);
            }
        }
        let max_gen = refs.iter().map(|r| r.generation).max().unwrap_or(0);
        let mut st = self.status.lock();
        st.last_complete_generation = Some(max_gen);
        st.last_complete_at_ms = Some(cut_at);
        st.generations_shipped += 1;
        Ok(max_gen)
    }

    async fn request(&self, subject: String, body: Vec<u8>) -> Result<ControlReply> {
        let reply = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.route.client().request(subject.clone(), body.into()),
        )
        .await
        .map_err(|_| Error::Service {
            dir: subject.clone().into(),
            why: format!(
                "site {} did not answer within {REQUEST_TIMEOUT:?}",
                self.cfg.target_site
            ),
        })?
        .map_err(|e| unreachable(&subject, &self.cfg.target_site, &e))?;
        serde_json::from_slice::<ControlReply>(&reply.payload).map_err(|e| Error::Protocol {
            peer: format!("site {}", self.cfg.target_site),
            why: format!("malformed reply on {subject}: {e}"),
        })
    }

    async fn control(&self, msg: &ControlMessage) -> Result<ControlReply> {
        let body = serde_json::to_vec(msg).expect("control message serializes");
        self.request(control_subject(&self.cfg.target_address()), body)
            .await?
            .into_result()
    }

    async fn open(&self) -> Result<HashMap<String, ReplicaReport>> {
        let volumes = self
            .cfg
            .volumes
            .iter()
            .map(|n| {
                let v = self.registry.require(n)?;
                Ok(VolumeSpec {
                    name: n.clone(),
                    size: v.size(),
                    granularity: v.granularity(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let reply = self
            .control(&ControlMessage::Open {
                group: self.cfg.group.clone(),
                source_site: self.me.site.clone(),
                source_region: self.me.region.clone(),
                allowed_regions: self.me.allowed_regions.clone(),
                volumes,
                recovery_points: Some(self.cfg.recovery_points),
                points_max_age_ms: self.cfg.points_max_age_ms,
                reverse: self.reverse_bases()?,
            })
            .await?;
        let region = reply.region.clone().unwrap_or_default();
        // The target checked too; the source never trusts that alone.
        if !region_allowed(&region, &self.me.allowed_regions) {
            return Err(Error::Residency {
                volume: self.cfg.volumes.join(","),
                site: self.cfg.target_site.clone(),
                region,
                allowed: self.me.allowed_regions.join(","),
            });
        }
        Ok(reply
            .replicas
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect())
    }

    /// For a reverse pair: what each volume shared with the target when it was promoted.
    fn reverse_bases(&self) -> Result<Vec<ReverseBase>> {
        if !self.cfg.reverse {
            return Ok(Vec::new());
        }
        self.cfg
            .volumes
            .iter()
            .map(|n| {
                let meta = self.registry.require(n)?.meta();
                match meta.promoted {
                    Some(p) if p.source_site == self.cfg.target_site => Ok(ReverseBase {
                        name: n.clone(),
                        common_epoch: p.source_epoch,
                        common_generation: p.source_generation,
                        epoch: p.local_epoch,
                        base: p.local_generation,
                    }),
                    // Already replicated back once (the promotion record is the target's now),
                    // or never promoted: nothing to demote there.
                    _ => Err(Error::InvalidArgument(format!(
                        "volume '{n}' was not promoted from site {}: replicate it there with `replicate start`",
                        self.cfg.target_site
                    ))),
                }
            })
            .collect()
    }

    /// One generation: cut, ship, commit. Returns the highest generation now complete.
    /// With `enter_sync`, the cut also installs a pending sync link in every volume: writes after
    /// it wait until the target holds the cut, then go synchronous.
    async fn cycle(
        &self,
        held: &mut Option<HashMap<String, ReplicaReport>>,
        enter_sync: bool,
        cut_waiters: &mut Vec<oneshot::Sender<Result<Cut>>>,
    ) -> Result<u64> {
        if held.is_none() {
            *held = Some(self.open().await?);
        }
        let reports = held.as_ref().expect("opened");
        let mut bases = BTreeMap::new();
        let mut resume_from = HashMap::new();
        let mut earlier_epoch = std::collections::HashSet::new();
        for n in &self.cfg.volumes {
            let vol = self.registry.require(n)?;
            let epoch = vol.meta().epoch;
            let Some(r) = reports.get(n).filter(|r| r.epoch == epoch) else {
                // The target holds a generation of an earlier epoch of this volume (it has been a
                // replica and was promoted since, e.g. a failback): nothing proves what is common,
                // but most of it usually is — compare hashes rather than send it all.
                if reports
                    .get(n)
                    .is_some_and(|r| r.last_complete_generation > 0)
                {
                    earlier_epoch.insert(n.clone());
                }
                bases.insert(n.clone(), CutBase::default());
                continue;
            };
            let since = (r.last_complete_generation > 0).then_some(r.last_complete_generation);
            // The target holds part of an interrupted transfer on top of what we start from.
            let resume = r
                .applying
                .as_ref()
                .filter(|a| a.base == r.last_complete_generation)
                .map(|a| {
                    resume_from.insert(n.clone(), a.generation);
                    let applied = DirtyBitmap::new(vol.size(), vol.granularity());
                    for [offset, length] in &a.applied {
                        applied.mark_covered(*offset, *length);
                    }
                    Resume {
                        reference: a.reference,
                        applied,
                    }
                });
            // A demoted former source differs where it changed after what both shared.
            let extra = r.diverged.as_ref().map(|runs| {
                let map = DirtyBitmap::new(vol.size(), vol.granularity());
                for [offset, length] in runs {
                    map.mark(*offset, *length);
                }
                map
            });
            bases.insert(
                n.clone(),
                CutBase {
                    since,
                    resume,
                    extra,
                    mirror: None,
                },
            );
        }
        if enter_sync {
            let mut links = self.links.lock();
            // Failed links are replaced at the cut (under the gates), never removed before it.
            let _old = std::mem::take(&mut *links);
            for (name, base) in bases.iter_mut() {
                let vol = self.registry.require(name)?;
                let link = Arc::new(SyncLink::new(
                    self.route.clone(),
                    tokio::runtime::Handle::current(),
                    &self.cfg.group,
                    name,
                    &self.cfg.target_site,
                    self.cfg.target_address(),
                    vol.meta().epoch,
                    self.cfg.level,
                    self.cfg.on_loss,
                    Duration::from_millis(self.cfg.block_timeout_ms),
                    self.link_lost.clone(),
                ));
                base.mirror = Some(link.clone());
                links.push((vol, link));
            }
        }
        let initial = bases.values().any(|b| b.since.is_none());
        // Volumes the target holds a generation of: only their changes have before-images to
        // read ahead (a first generation journals nothing).
        let on_base: Vec<String> = bases
            .iter()
            .filter(|(_, b)| b.since.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        self.status.lock().state = if initial {
            "syncing".into()
        } else {
            "shipping".into()
        };
        let cut_at = now_ms();
        let started = Instant::now();
        let (raw_before, wire_before) = (
            self.bytes_raw.load(Ordering::Relaxed),
            self.bytes_wire.load(Ordering::Relaxed),
        );
        let reg = self.registry.clone();
        let names = self.cfg.volumes.clone();
        let since: HashMap<String, Option<u64>> =
            bases.iter().map(|(n, b)| (n.clone(), b.since)).collect();
        let owner = self.cfg.group.clone();
        let cuts = tokio::task::spawn_blocking(move || reg.cut_with_images(&owner, &names, &bases))
            .await
            .map_err(|e| Error::io("cut task", std::io::Error::other(e.to_string())))??;
        let cut_done = started.elapsed();
        // While it ships, the pair needs the changes after what the target holds — or, shipping
        // whole, after this cut (a failure ships whole again).
        for (name, g, _) in &cuts {
            if let Some(v) = self.registry.get(name) {
                let base = since.get(name).copied().flatten();
                v.pin_generation(&self.cfg.group, Some(base.unwrap_or(*g)));
            }
        }
        let refs: Vec<GenerationRef> = cuts
            .iter()
            .map(|(name, g, _)| GenerationRef {
                name: name.clone(),
                epoch: self.registry.get(name).map(|v| v.meta().epoch).unwrap_or(1),
                generation: *g,
                resume_from: resume_from.get(name).copied(),
                changes: Vec::new(),
            })
            .collect();
        answer_cut(
            cut_waiters,
            cuts.iter().map(|(n, g, _)| (n.clone(), *g)).collect(),
        );
        *self.transfer.lock() = Some((
            cuts.iter().map(|(_, g, _)| *g).max().unwrap_or(0),
            cuts.iter().map(|(_, _, image)| image.pending_bytes()).sum(),
            self.bytes_raw.load(Ordering::Relaxed),
        ));
        // Where the target may differ almost everywhere (a reverse whose common history could not
        // be proven, a replica of an earlier epoch), compare block hashes and ship only the blocks
        // that differ.
        for (name, _, image) in &cuts {
            let vol = self.registry.require(name)?;
            let diverged: u64 = reports
                .get(name)
                .and_then(|r| r.diverged.as_ref())
                .map_or(0, |runs| runs.iter().map(|[_, len]| *len).sum());
            if diverged * 2 >= vol.size() || earlier_epoch.contains(name) {
                self.hash_compare(&vol, image).await?;
            }
        }
        // `Begin` announces what each volume's generation changes: the target reads the
        // before-images meanwhile. The message stays well inside the server's max_payload.
        let cap = announce_cap(self.route.client().server_info().max_payload, refs.len());
        let announced = refs
            .iter()
            .zip(&cuts)
            .map(|(r, (_, _, image))| {
                let changes = match image.pending_extents() {
                    extents if on_base.contains(&r.name) && extents.len() <= cap => {
                        extents.iter().map(|e| [e.offset, e.length]).collect()
                    }
                    _ => Vec::new(),
                };
                GenerationRef {
                    changes,
                    ..r.clone()
                }
            })
            .collect();
        self.control(&ControlMessage::Begin {
            group: self.cfg.group.clone(),
            volumes: announced,
        })
        .await?;
        let begun = started.elapsed();
        for ((name, _, image), r) in cuts.iter().zip(&refs) {
            let vol = self.registry.require(name)?;
            self.ship_image(&vol, image.clone(), r).await?;
        }
        let shipped = started.elapsed();
        let _committing = Committing::start(&self.committing);
        self.control(&ControlMessage::Commit {
            group: self.cfg.group.clone(),
            volumes: refs.clone(),
        })
        .await?;
        let committed = started.elapsed();
        log::debug!(
            "group '{}' generation {:?}: cut {:.1} ms, begin {:.1} ms, ship {:.1} ms, commit {:.1} ms",
            self.cfg.group,
            refs.iter().map(|r| r.generation).collect::<Vec<_>>(),
            ms(cut_done),
            ms(begun - cut_done),
            ms(shipped - begun),
            ms(committed - shipped),
        );
        let mut max_gen = 0;
        if let Some(h) = held.as_mut() {
            for r in &refs {
                h.insert(
                    r.name.clone(),
                    ReplicaReport {
                        name: r.name.clone(),
                        epoch: r.epoch,
                        last_complete_generation: r.generation,
                        applying: None,
                        diverged: None,
                    },
                );
                max_gen = max_gen.max(r.generation);
                if let Some(v) = self.registry.get(&r.name) {
                    v.pin_generation(&self.cfg.group, Some(r.generation));
                }
            }
        }
        for (name, _, _) in &cuts {
            if let Some(v) = self.registry.get(name) {
                v.release_cut_image(&self.cfg.group);
            }
        }
        if enter_sync {
            let links: Vec<_> = self.links.lock().clone();
            for (vol, link) in &links {
                let g = refs.iter().find(|r| r.name == vol.name()).expect("cut");
                link.start_session(g.generation).await?;
            }
            for (vol, link) in &links {
                let g = refs.iter().find(|r| r.name == vol.name()).expect("cut");
                link.activate(g.generation);
            }
            let was_suspended = {
                let mut st = self.status.lock();
                let was = matches!(st.sync_state.as_deref(), Some("suspended" | "blocked"));
                st.sync_state = Some("active".into());
                was
            };
            if was_suspended {
                self.event("replication.resumed", "synchronous again").await;
            }
        }
        let mut st = self.status.lock();
        st.last_complete_generation = Some(max_gen);
        st.last_complete_at_ms = Some(cut_at);
        st.generations_shipped += 1;
        st.last_cycle = Some(CycleStats {
            generation: max_gen,
            ms: ms(committed),
            bytes_raw: self.bytes_raw.load(Ordering::Relaxed) - raw_before,
            bytes_wire: self.bytes_wire.load(Ordering::Relaxed) - wire_before,
            cut_ms: ms(cut_done),
            begin_ms: ms(begun - cut_done),
            ship_ms: ms(shipped - begun),
            commit_ms: ms(committed - shipped),
        });
        Ok(max_gen)
    }

    /// Drop from `image` every pending block the target already holds byte for byte (by xxh3).
    async fn hash_compare(&self, vol: &Arc<Volume>, image: &Arc<CutImage>) -> Result<()> {
        let gran = vol.granularity();
        let blocks = vol.size().div_ceil(gran);
        let mut buf = vec![0u8; gran as usize];
        let (mut equal, mut first) = (0u64, 0u64);
        while first < blocks {
            let count = MAX_HASHES.min(blocks - first);
            let wanted = (first..first + count).any(|b| image.is_pending(b));
            if wanted {
                let reply = self
                    .control(&ControlMessage::BlockHashes {
                        group: self.cfg.group.clone(),
                        volume: vol.name().to_string(),
                        first,
                        count,
                    })
                    .await?;
                if reply.hashes.len() as u64 != count {
                    return Err(Error::Protocol {
                        peer: format!("site {}", self.cfg.target_site),
                        why: format!("{} block hashes for {count} blocks", reply.hashes.len()),
                    });
                }
                for (b, theirs) in (first..).zip(&reply.hashes) {
                    if !image.is_pending(b) {
                        continue;
                    }
                    let offset = b * gran;
                    let len = gran.min(vol.size() - offset) as usize;
                    vol.read_cut(image, offset, &mut buf[..len])?;
                    if block_hash(&buf[..len]) == *theirs {
                        image.shipped(offset, len as u64);
                        equal += len as u64;
                    }
                }
            }
            first += count;
        }
        log::info!(
            "hash-compared '{}' with site {}: {equal} bytes already equal there",
            vol.name(),
            self.cfg.target_site
        );
        Ok(())
    }

    async fn ship_image(
        &self,
        vol: &Arc<Volume>,
        image: Arc<CutImage>,
        r: &GenerationRef,
    ) -> Result<()> {
        // Never above what the server accepts, whatever the pair asks for.
        let server_max = self.route.client().server_info().max_payload;
        let max_message = match server_max {
            0 => self.cfg.max_message,
            m => self.cfg.max_message.min(m),
        };
        let sizer = FrameSizer::new(max_message)?;
        let extents: Vec<(u64, u64)> = image
            .pending_extents()
            .iter()
            .map(|e| (e.offset, e.length))
            .collect();
        let mut inflight = tokio::task::JoinSet::new();
        let started = Instant::now();
        let sent_wire = Arc::new(AtomicU64::new(0));
        let mut in_flight_bytes = 0u64;
        // Frames are read and compressed a few at a time, as many as there are cores: a window
        // of 64 blocking tasks at once would make the first frames wait for the CPU behind all
        // the others instead of going out while the rest are prepared.
        let encoders = Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ));
        let mut next_seq = 0u64;
        // When the last message was ready, and the first and last acknowledgements (µs after
        // `started`): where a generation's transfer spends its time, at debug level.
        let marks = Arc::new([
            AtomicU64::new(0),
            AtomicU64::new(u64::MAX),
            AtomicU64::new(0),
        ]);
        let mut messages = 0usize;
        // Small pieces travel several to a message (a bundle): fewer requests through the two
        // servers and fewer round trips for the same bytes.
        for bundle in sizer.bundles(sizer.pieces(extents)) {
            let first_seq = next_seq;
            next_seq += bundle.len() as u64;
            let length: u64 = bundle.iter().map(|p| p.length as u64).sum();
            while inflight.len() >= WINDOW
                || (!inflight.is_empty() && in_flight_bytes + length > WINDOW_BYTES)
            {
                in_flight_bytes -= inflight
                    .join_next()
                    .await
                    .expect("non-empty")
                    .map_err(join_err)??;
            }
            in_flight_bytes += length;
            let nats = self.route.client().clone();
            let subject = frames_subject(&self.cfg.target_address());
            let (vol, image) = (vol.clone(), image.clone());
            let target = self.cfg.target_site.clone();
            let (epoch, generation, level) = (r.epoch, r.generation, self.cfg.level);
            let rate = self.cfg.rate.filter(|r| *r > 0);
            let sent_wire = sent_wire.clone();
            let stats = (self.bytes_raw.clone(), self.bytes_wire.clone());
            let encoders = encoders.clone();
            let marks = marks.clone();
            messages += 1;
            // Each bundle is read and compressed on the blocking pool, so the window's bundles
            // are prepared in parallel with one another and with the sending.
            inflight.spawn(async move {
                let permit = encoders.acquire_owned().await.expect("never closed");
                let (msg, image, bundle) = tokio::task::spawn_blocking(move || {
                    // Room for every frame at once: the message never moves while it grows.
                    let room = bundle
                        .iter()
                        .map(|p| frame::data_frame_room(vol.name(), p.length as usize))
                        .sum();
                    let mut msg = Vec::with_capacity(room);
                    let mut buf = Vec::new();
                    for (seq, piece) in (first_seq..).zip(&bundle) {
                        // Holes go as zero frames without being read.
                        if vol.cut_hole(&image, piece.offset, piece.length as u64)? {
                            msg.extend_from_slice(&frame::encode_zero(
                                vol.name(),
                                epoch,
                                generation,
                                seq,
                                piece.offset,
                                piece.length,
                            )?);
                        } else {
                            buf.resize(piece.length as usize, 0);
                            vol.read_cut(&image, piece.offset, &mut buf)?;
                            frame::encode_data_into(
                                &mut msg,
                                vol.name(),
                                epoch,
                                generation,
                                seq,
                                piece.offset,
                                &buf,
                                level,
                            )?;
                        }
                    }
                    Ok::<_, Error>((msg, image, bundle))
                })
                .await
                .map_err(join_err)??;
                drop(permit);
                marks[0].fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                let wire = msg.len() as u64;
                if let Some(rate) = rate {
                    // Keep the average at or under the limit: wait until the bytes sent are due.
                    let total = sent_wire.fetch_add(wire, Ordering::Relaxed) + wire;
                    let due = Duration::from_secs_f64(total as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                send_frame(&nats, subject, msg, &target).await?;
                let acked = started.elapsed().as_micros() as u64;
                marks[1].fetch_min(acked, Ordering::Relaxed);
                marks[2].fetch_max(acked, Ordering::Relaxed);
                for piece in &bundle {
                    image.shipped(piece.offset, piece.length as u64);
                }
                stats.0.fetch_add(length, Ordering::Relaxed);
                stats.1.fetch_add(wire, Ordering::Relaxed);
                Ok::<u64, Error>(length)
            });
        }
        while let Some(r) = inflight.join_next().await {
            r.map_err(join_err)??;
        }
        let mark = |i: usize| marks[i].load(Ordering::Relaxed) as f64 / 1000.0;
        log::debug!(
            "'{}' generation {}: {messages} messages, the last ready at {:.1} ms, acknowledged from {:.1} to {:.1} ms",
            vol.name(),
            r.generation,
            mark(0),
            if messages == 0 { 0.0 } else { mark(1) },
            mark(2)
        );
        Ok(())
    }
}

/// How long after a cycle's start the next cut starts, for a pair whose lag is to stay under
/// `interval` when a cycle takes about `took`: early by twice `took` (room for a cycle that takes
/// longer than the last), never sooner than half the interval.
fn next_cut_after(interval: Duration, took: Duration) -> Duration {
    interval
        .saturating_sub(took.saturating_mul(2))
        .max(interval / 2)
}

/// Marks a commit under way for as long as it lives (also when its cycle is abandoned).
struct Committing<'a>(&'a AtomicBool);

impl<'a> Committing<'a> {
    fn start(flag: &'a AtomicBool) -> Committing<'a> {
        flag.store(true, Ordering::SeqCst);
        Committing(flag)
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Most runs `Begin` announces per volume of a group of `volumes`: `MAX_ANNOUNCED_EXTENTS`, fewer
/// where a server's `max_payload` (0: unknown) leaves less than 64 bytes per run in half of it
/// (a run is at most 44 bytes of JSON).
fn announce_cap(max_payload: usize, volumes: usize) -> usize {
    let room = match max_payload {
        0 => usize::MAX,
        m => m / 2 / 64,
    };
    (room / volumes.max(1)).min(MAX_ANNOUNCED_EXTENTS)
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::io("frame task", std::io::Error::other(e.to_string()))
}

/// Send one message of frames; resend it when the target says it arrived damaged.
async fn send_frame(
    nats: &async_nats::Client,
    subject: String,
    msg: Vec<u8>,
    target: &str,
) -> Result<()> {
    let body: bytes::Bytes = msg.into();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = tokio::time::timeout(
            REQUEST_TIMEOUT,
            nats.request(subject.clone(), test_hooks::maybe_corrupt(&body)),
        )
        .await
        .map_err(|_| Error::Service {
            dir: subject.clone().into(),
            why: format!("site {target} did not acknowledge a frame within {REQUEST_TIMEOUT:?}"),
        })?
        .map_err(|e| unreachable(&subject, target, &e))?;
        let r: ControlReply =
            serde_json::from_slice(&reply.payload).map_err(|e| Error::Protocol {
                peer: format!("site {target}"),
                why: format!("malformed frame acknowledgement: {e}"),
            })?;
        if r.ok {
            return Ok(());
        }
        if r.code.as_deref() == Some("ERR_FRAME") && attempt <= RESENDS {
            log::warn!(
                "site {target} refused a damaged frame, resending: {}",
                r.message.unwrap_or_default()
            );
            continue;
        }
        return r.into_result().map(|_| ());
    }
}

/// Fault injection for tests, named as such: with `FERRY_TEST_CORRUPT_EVERY=N` set, one frame in
/// N is sent with a flipped byte, as a damaged network would deliver it.
pub mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);

    pub fn maybe_corrupt(body: &bytes::Bytes) -> bytes::Bytes {
        let every: u64 = match std::env::var("FERRY_TEST_CORRUPT_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(n) if n > 0 => n,
            _ => return body.clone(),
        };
        if !COUNT.fetch_add(1, Ordering::Relaxed).is_multiple_of(every) || body.len() < 2 {
            return body.clone();
        }
        let mut v = body.to_vec();
        let i = v.len() - 1;
        v[i] ^= 0x5a;
        v.into()
    }

    /// How many frames went through the hook.
    pub fn frames_seen() -> u64 {
        COUNT.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_start_early_by_twice_the_last_cycle_to_keep_the_lag_under_the_interval() {
        let ms = Duration::from_millis;
        assert_eq!(next_cut_after(ms(5000), ms(210)), ms(4580));
        assert_eq!(next_cut_after(ms(5000), ms(0)), ms(5000));
        // A cycle as long as the interval: never closer than half of it.
        assert_eq!(next_cut_after(ms(5000), ms(4000)), ms(2500));
        // With cycles of about the same length, the lag peaks before the interval.
        let (took, interval) = (ms(300), ms(2000));
        assert!(next_cut_after(interval, took) + took <= interval);
    }

    #[test]
    fn begin_announces_no_more_runs_than_half_the_servers_max_payload_holds() {
        assert_eq!(announce_cap(1 << 20, 1), MAX_ANNOUNCED_EXTENTS);
        assert_eq!(
            announce_cap(0, 1),
            MAX_ANNOUNCED_EXTENTS,
            "max_payload unknown"
        );
        assert_eq!(announce_cap(64 << 10, 1), 512);
        assert_eq!(
            announce_cap(64 << 10, 4),
            128,
            "shared by the group's volumes"
        );
        assert_eq!(announce_cap(1 << 20, 0), MAX_ANNOUNCED_EXTENTS);
        // The widest run, as JSON with its comma, fits the 64 bytes counted for it.
        let run = serde_json::to_string(&[u64::MAX, u64::MAX]).unwrap();
        assert!(run.len() < 64, "{run}");
    }
}
