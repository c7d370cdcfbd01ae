//! `Replication`: a volume service's replication role at its site — the receiver for pairs that
//! target this site, and the shippers of pairs that start here, with their configuration persisted
//! in `<data dir>/replication/` so a restarted service resumes every pair.

use super::protocol::{
    control_subject, frames_subject, sync_subject, valid_site_name, ControlMessage, ControlReply,
};
use super::receiver::Receiver;
use super::route::Route;
use super::shipper::{Mode, PairConfig, PairStatus, Shipper, SiteIdentity};
use crate::bitmap::write_atomic;
use crate::error::{Error, IoContext, Result};
use crate::registry::Registry;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// Most frames applied as one batch (the source's window of small frames), and most bytes of
/// frames (messages, compressed) in one: a quarter of the source's window of large ones, so that
/// applying one batch overlaps receiving the next.
const FRAME_BATCH: usize = super::shipper::WINDOW;
const FRAME_BATCH_BYTES: usize = 4 << 20;

#[derive(Clone, Copy)]
enum Inbound {
    Control,
    Frame,
    SyncChange,
}

struct RunningPair {
    shipper: Arc<Shipper>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Replication {
    me: SiteIdentity,
    registry: Arc<Registry>,
    nats: async_nats::Client,
    /// Direct connections to peer sites' servers (`--peer-nats`), by site.
    peers: BTreeMap<String, async_nats::Client>,
    receiver: Arc<Receiver>,
    pairs: Mutex<BTreeMap<String, RunningPair>>,
    dir: PathBuf,
    runtime: tokio::runtime::Handle,
}

/// Connect to the site's NATS server. Credentials come from the URL
/// (`nats://user:password@host:port`); the client does not take them from there by itself.
pub async fn connect_nats(nats_url: &str, site: &str) -> Result<async_nats::Client> {
    connect(nats_url, format!("ferry-dataplane {site}"), false).await
}

/// Connect to a peer site's NATS server for the direct route to it. Never fails for an
/// unreachable server: the client keeps trying in the background, and until it is connected the
/// pairs to that site take the leafnode route.
pub async fn connect_peer(nats_url: &str, me: &str, peer: &str) -> Result<async_nats::Client> {
    connect(nats_url, format!("ferry-dataplane {me} → {peer}"), true).await
}

async fn connect(nats_url: &str, name: String, retry: bool) -> Result<async_nats::Client> {
    let bad = |why: String| Error::Service {
        dir: redact(nats_url).into(),
        why,
    };
    let mut url = url::Url::parse(nats_url).map_err(|e| {
        bad(format!(
            "not a NATS URL ({e}); use nats://user:password@host:port"
        ))
    })?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(std::time::Duration::from_secs(5));
    if retry {
        opts = opts.retry_on_initial_connect();
    }
    if !url.username().is_empty() {
        let user = percent_decode(url.username());
        let password = percent_decode(url.password().unwrap_or(""));
        opts = opts.user_and_password(user, password);
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    opts.connect(url.as_str()).await.map_err(|e| {
        bad(format!("cannot connect to NATS: {e}; check --nats (nats://user:password@host:port) and that the server runs"))
    })
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A URL fit for messages: the password replaced.
pub fn redact(nats_url: &str) -> String {
    match url::Url::parse(nats_url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => nats_url.to_string(),
    }
}

/// Shortest interval between cycles of a continuous pair.
pub const MIN_INTERVAL_MS: u64 = 100;

/// The pairs configured in a data directory, as status rows for when no service runs them.
pub fn configured_pairs(data_dir: &std::path::Path) -> Vec<PairStatus> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("replication")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice::<PairConfig>(&std::fs::read(e.path()).ok()?).ok())
        .map(|c| PairStatus {
            group: c.group,
            volumes: c.volumes,
            target: c.target_site,
            target_node: c.target_node,
            mode: match c.mode {
                Mode::Async => "async".into(),
                Mode::Sync => "sync".into(),
            },
            state: "not running".into(),
            last_error: Some("no volume service runs this data directory; start `ferry volume serve --site …` to resume".into()),
            ..Default::default()
        })
        .collect()
}

/// The group id of a set of volumes shipped to a site.
pub fn group_id(target: &str, volumes: &[String]) -> String {
    let mut v = volumes.to_vec();
    v.sort();
    format!("{target}/{}", v.join("+"))
}

impl Replication {
    /// Join the site's NATS (and connect to the peer sites given as `SITE=URL`) and resume the
    /// pairs configured in the data directory.
    pub async fn start(
        me: SiteIdentity,
        nats_url: &str,
        peers: &[String],
        registry: Arc<Registry>,
    ) -> Result<Arc<Replication>> {
        if !valid_site_name(&me.site) {
            return Err(Error::InvalidArgument(format!(
                "site name '{}' must be 1-64 characters from [A-Za-z0-9_-]",
                me.site
            )));
        }
        let peer_urls = super::route::parse_peers(&me.site, peers)?;
        let nats = connect_nats(nats_url, &me.site).await?;
        let mut peers = BTreeMap::new();
        for (site, url) in peer_urls {
            peers.insert(site.clone(), connect_peer(&url, &me.site, &site).await?);
        }
        let dir = registry.data_dir().root().join("replication");
        std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
        let receiver = Arc::new(Receiver::new(&me.site, &me.region, registry.clone()));
        let r = Arc::new(Replication {
            me,
            registry,
            nats,
            peers,
            receiver,
            pairs: Mutex::new(BTreeMap::new()),
            dir,
            runtime: tokio::runtime::Handle::current(),
        });
        for entry in std::fs::read_dir(&r.dir).ctx(|| format!("cannot list {}", r.dir.display()))? {
            let path = entry
                .ctx(|| "listing replication configs".to_string())?
                .path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes =
                    std::fs::read(&path).ctx(|| format!("cannot read {}", path.display()))?;
                let cfg: PairConfig =
                    serde_json::from_slice(&bytes).map_err(|e| Error::CorruptMetadata {
                        name: path.display().to_string(),
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                r.spawn(cfg);
            }
        }
        Ok(r)
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    fn config_path(&self, group: &str) -> PathBuf {
        let safe: String = group
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    fn spawn(&self, cfg: PairConfig) {
        let shipper = Shipper::new(
            cfg.clone(),
            self.me.clone(),
            self.registry.clone(),
            self.nats.clone(),
            Route::new(self.nats.clone(), self.peers.get(&cfg.target_site).cloned()),
        );
        let (stop, rx) = watch::channel(false);
        self.receiver.set_shipping(&cfg.volumes, &cfg.group, true);
        let task = self.runtime.spawn(shipper.clone().run(rx));
        self.pairs.lock().insert(
            cfg.group,
            RunningPair {
                shipper,
                stop,
                task,
            },
        );
    }

    /// Start shipping `cfg.volumes` (one consistency group) to `cfg.target_site`. Idempotent for
    /// the same group; a volume may belong to one pair only.
    pub fn start_pair(&self, mut cfg: PairConfig) -> Result<PairStatus> {
        if !valid_site_name(&cfg.target_site) {
            return Err(Error::InvalidArgument(format!(
                "target site '{}' is not a valid site name",
                cfg.target_site
            )));
        }
        if let Some(n) = cfg.target_node.as_deref().filter(|n| !valid_site_name(n)) {
            return Err(Error::InvalidArgument(format!(
                "target node '{n}' is not a valid node name (letters, digits, '-' and '_', at most 64)"
            )));
        }
        if cfg.target_site == self.me.site {
            return Err(Error::InvalidArgument(format!(
                "site {} cannot replicate to itself: give another site with --to",
                self.me.site
            )));
        }
        if cfg.volumes.is_empty() {
            return Err(Error::InvalidArgument(
                "replicate start needs at least one volume".into(),
            ));
        }
        // Settings the shipper would only trip over later are refused now.
        super::frame::FrameSizer::new(cfg.max_message)?;
        super::frame::check_level(cfg.level)?;
        for v in &cfg.volumes {
            let vol = self.registry.require(v)?;
            if vol.replica().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "volume '{v}' is a replica here; promote it before replicating it elsewhere"
                )));
            }
            if cfg.reverse
                && vol
                    .meta()
                    .promoted
                    .is_none_or(|p| p.source_site != cfg.target_site)
            {
                return Err(Error::InvalidArgument(format!(
                    "volume '{v}' was not promoted from site {}: reverse replicates back to the site a volume failed over from",
                    cfg.target_site
                )));
            }
        }
        cfg.group = group_id(&cfg.target_site, &cfg.volumes);
        let pairs = self.pairs.lock();
        if let Some(p) = pairs.get(&cfg.group) {
            let running = &p.shipper.config().target_node;
            if *running != cfg.target_node {
                return Err(Error::VolumeBusy {
                    name: cfg.volumes[0].clone(),
                    why: format!(
                        "pair {} ships to node {} of site {}; stop it before replicating to node {}",
                        cfg.group,
                        running.as_deref().unwrap_or("(the site's service)"),
                        cfg.target_site,
                        cfg.target_node.as_deref().unwrap_or("(the site's service)")
                    ),
                });
            }
            return Ok(p.shipper.status());
        }
        // A volume may replicate to several sites (one pair each), synchronously to one at most.
        for (g, p) in pairs.iter() {
            let other = p.shipper.config();
            let Some(v) = cfg.volumes.iter().find(|v| other.volumes.contains(v)) else {
                continue;
            };
            if other.target_site == cfg.target_site {
                return Err(Error::VolumeBusy {
                    name: v.clone(),
                    why: format!(
                        "it is already replicated to site {} by pair {g}; stop that pair first",
                        cfg.target_site
                    ),
                });
            }
            if other.mode == Mode::Sync && cfg.mode == Mode::Sync {
                return Err(Error::VolumeBusy {
                    name: v.clone(),
                    why: format!(
                        "it replicates synchronously to site {} already (pair {g}); a volume has one synchronous target — replicate to site {} with --mode async",
                        other.target_site, cfg.target_site
                    ),
                });
            }
        }
        drop(pairs);
        let bytes = serde_json::to_vec_pretty(&cfg).expect("config serializes");
        write_atomic(&self.config_path(&cfg.group), &bytes)?;
        self.spawn(cfg.clone());
        Ok(self.pairs.lock()[&cfg.group].shipper.status())
    }

    pub fn status(&self) -> Vec<PairStatus> {
        self.pairs
            .lock()
            .values()
            .map(|p| p.shipper.status())
            .collect()
    }

    /// The pair holding all of `volumes` — to site `to` when given; without it, the only such pair
    /// (volumes replicating to several sites need `to`).
    fn pair_of(&self, volumes: &[String], to: Option<&str>) -> Result<Arc<Shipper>> {
        let pairs = self.pairs.lock();
        let found: Vec<_> = pairs
            .values()
            .filter(|p| {
                let c = p.shipper.config();
                volumes.iter().all(|v| c.volumes.contains(v))
                    && to.is_none_or(|t| c.target_site == t)
            })
            .collect();
        match found.as_slice() {
            [p] => Ok(p.shipper.clone()),
            [] => Err(Error::InvalidArgument(format!(
                "no replication pair holds all of {}{}: see `ferry replicate status`",
                volumes.join(", "),
                to.map(|t| format!(" to site {t}")).unwrap_or_default()
            ))),
            several => Err(Error::InvalidArgument(format!(
                "{} replicate to several sites ({}): name one with --to",
                volumes.join(", "),
                several
                    .iter()
                    .map(|p| p.shipper.config().target_site.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Cut now and wait until the target holds that generation completely.
    pub async fn sync(&self, volumes: &[String], to: Option<&str>) -> Result<PairStatus> {
        let s = self.pair_of(volumes, to)?;
        s.sync_now().await?;
        Ok(s.status())
    }

    /// Cut the pair holding `volumes` now: its group id and the generation of each volume, as
    /// soon as the cut is taken (it ships after).
    pub async fn cut(
        &self,
        volumes: &[String],
        to: Option<&str>,
    ) -> Result<(String, super::shipper::Cut)> {
        let s = self.pair_of(volumes, to)?;
        let cut = s.cut_now().await?;
        Ok((s.config().group.clone(), cut))
    }

    /// Stop the pair holding `volumes` (to `to`) and forget its configuration.
    pub async fn stop_pair(&self, volumes: &[String], to: Option<&str>) -> Result<PairStatus> {
        let group = self.pair_of(volumes, to)?.config().group.clone();
        let p = self.pairs.lock().remove(&group).expect("pair exists");
        let _ = p.stop.send(true);
        let _ = p.task.await;
        self.receiver
            .set_shipping(&p.shipper.config().volumes, &group, false);
        for v in &p.shipper.config().volumes {
            if let Some(vol) = self.registry.get(v) {
                vol.release_cut_image(&group);
                vol.pin_generation(&group, None);
            }
        }
        let _ = std::fs::remove_file(self.config_path(&group));
        let mut s = p.shipper.status();
        s.state = "stopped".into();
        Ok(s)
    }

    /// Answer replication traffic addressed to this site until `shutdown` turns true.
    pub async fn serve(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let nats = &self.nats;
        let subscribe = |subject: String| async move {
            nats.subscribe(subject.clone())
                .await
                .map_err(|e| Error::Service {
                    dir: "nats".into(),
                    why: format!("cannot subscribe to {subject}: {e}"),
                })
        };
        let mut ctl = subscribe(control_subject(&self.me.address())).await?;
        let mut frames = subscribe(frames_subject(&self.me.address())).await?;
        let mut changes = subscribe(sync_subject(&self.me.address())).await?;
        loop {
            let (msg, kind) = tokio::select! {
                _ = shutdown.changed() => break,
                m = ctl.next() => match m { Some(m) => (m, Inbound::Control), None => break },
                m = frames.next() => match m { Some(m) => (m, Inbound::Frame), None => break },
                m = changes.next() => match m { Some(m) => (m, Inbound::SyncChange), None => break },
            };
            // Control messages and sync changes are requests: one nobody waits for is dropped.
            if msg.reply.is_none() && !matches!(kind, Inbound::Frame) {
                continue;
            }
            match kind {
                Inbound::Frame => {
                    // Frames that arrived meanwhile are applied with this one, as one batch.
                    let mut batch = vec![msg];
                    let mut bytes = batch[0].payload.len();
                    while batch.len() < FRAME_BATCH && bytes < FRAME_BATCH_BYTES {
                        match frames.next().now_or_never() {
                            Some(Some(m)) => {
                                bytes += m.payload.len();
                                batch.push(m);
                            }
                            _ => break,
                        }
                    }
                    self.apply_frames(batch).await;
                }
                Inbound::SyncChange => {
                    // A client's write waits for this answer: applied right here, one small
                    // write into the page cache, without a hop to the blocking pool.
                    let answer = self
                        .receiver
                        .sync_change(&msg.payload)
                        .map(|_| ControlReply::ok())
                        .unwrap_or_else(|e| ControlReply::error(&e));
                    self.answer(&msg, &answer).await;
                }
                Inbound::Control => {
                    // Answered one at a time per site (the subscription is the bounded queue);
                    // control messages do blocking file I/O.
                    let receiver = self.receiver.clone();
                    let payload = msg.payload.clone();
                    let answer = tokio::task::spawn_blocking(move || {
                        serde_json::from_slice::<ControlMessage>(&payload)
                            .map_err(|e| {
                                Error::InvalidArgument(format!("malformed control message: {e}"))
                            })
                            .and_then(|m| receiver.control(m))
                            .unwrap_or_else(|e| ControlReply::error(&e))
                    })
                    .await
                    .unwrap_or_else(|e| {
                        ControlReply::error(&Error::io(
                            "receiver task",
                            std::io::Error::other(e.to_string()),
                        ))
                    });
                    self.answer(&msg, &answer).await;
                }
            }
        }
        Ok(())
    }

    /// Apply a batch of frames and answer each frame's request.
    async fn apply_frames(&self, batch: Vec<async_nats::Message>) {
        let receiver = self.receiver.clone();
        let answered = tokio::task::spawn_blocking(move || {
            let payloads: Vec<bytes::Bytes> = batch.iter().map(|m| m.payload.clone()).collect();
            let replies = receiver.frames(&payloads);
            (batch, replies)
        })
        .await;
        let Ok((batch, replies)) = answered else {
            // The task panicked: the frames go unanswered, their requests time out at the source
            // and it ships the generation again.
            return;
        };
        for (msg, answer) in batch.iter().zip(replies) {
            self.answer(msg, &answer).await;
        }
    }

    /// Reply to a request (a message without a reply subject gets none).
    async fn answer(&self, msg: &async_nats::Message, answer: &ControlReply) {
        if let Some(reply_to) = msg.reply.clone() {
            let body = serde_json::to_vec(answer).expect("reply serializes");
            let _ = self.nats.publish(reply_to, body.into()).await;
        }
    }

    /// Stop every shipper (service stop); configurations stay, so the pairs resume on restart.
    pub async fn shutdown(&self) {
        let pairs: Vec<RunningPair> = std::mem::take(&mut *self.pairs.lock())
            .into_values()
            .collect();
        for p in pairs {
            let _ = p.stop.send(true);
            let _ = p.task.await;
        }
        // Bounded: with the server gone, a flush would wait for it forever.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.nats.flush()).await;
        for peer in self.peers.values() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), peer.flush()).await;
        }
    }
}
