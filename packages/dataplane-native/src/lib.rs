//! The napi-rs binding of `ferry-dataplane`: the one layer that holds `#[napi]`. It converts
//! types and errors and moves blocking work off the JavaScript thread — nothing else. Every error
//! reaches JavaScript with `error.code` set to the core's stable code (`ERR_UNKNOWN_VOLUME`, …):
//! napi-rs only carries a fixed status as the code, so the reason is sent as `CODE: message` and
//! `binding.js` moves the prefix into `error.code`.

use ferry_dataplane::admin::Admin;
use ferry_dataplane::control::Progress;
use ferry_dataplane::service::{ServeOptions as CoreServeOptions, VolumeService as CoreService};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::path::PathBuf;
use std::sync::Mutex;

/// The data plane's log (warnings of replication, debug timings) goes to stderr, filtered by
/// `$FERRY_LOG`: a level (`warn` unless set; `debug` adds the per-phase time of every
/// generation), or a filter spec naming modules (`ferry_dataplane::replication=debug`).
#[napi_derive::module_init]
fn init() {
    use std::io::Write;
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let mut spec = std::env::var("FERRY_LOG").unwrap_or_default();
    let level = spec.trim().to_ascii_lowercase();
    if level.is_empty() {
        spec = "warn".into();
    } else if LEVELS.contains(&level.as_str()) {
        spec = level;
    } else if !spec.contains('=') {
        eprintln!(
            "ferry data plane: FERRY_LOG='{spec}' is not a level ({}): logging warnings only",
            LEVELS.join(", ")
        );
        spec = "warn".into();
    }
    // A second load of the module in one process finds a logger already installed: keep it.
    let _ = env_logger::Builder::new()
        .parse_filters(&spec)
        .format(|buf, record| {
            writeln!(
                buf,
                "ferry data plane: {}: {}",
                record.level(),
                record.args()
            )
        })
        .try_init();
}

fn coded(code: &str, message: impl std::fmt::Display) -> napi::Error {
    napi::Error::new(Status::GenericFailure, format!("{code}: {message}"))
}

fn js_err(e: ferry_dataplane::Error) -> napi::Error {
    coded(e.code(), &e)
}

fn internal(why: impl std::fmt::Display) -> napi::Error {
    coded("ERR_INTERNAL", why)
}

/// Run blocking core work on tokio's blocking pool, never on the JS thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ferry_dataplane::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(internal)?
        .map_err(js_err)
}

fn js_number(n: f64, what: &str) -> Result<u64> {
    if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_991.0 {
        Ok(n as u64)
    } else {
        Err(coded(
            "ERR_INVALID_ARGUMENT",
            format!("{what} must be a whole number of bytes, got {n}"),
        ))
    }
}

#[napi(object)]
pub struct VolumeInfo {
    pub name: String,
    pub size: f64,
    pub granularity: f64,
    pub open_generation: f64,
    pub generations: Vec<f64>,
    pub read_only: bool,
    pub dirty_bytes: f64,
    /// On a replica: the site it replicates from.
    pub replica_of: Option<String>,
    /// On a replica: the last generation it holds completely.
    pub replica_generation: Option<f64>,
    /// Writes refused for a planned migration or failback (the `fence` operation of
    /// `replicate`).
    pub fenced: bool,
}

impl From<ferry_dataplane::volume::VolumeInfo> for VolumeInfo {
    fn from(v: ferry_dataplane::volume::VolumeInfo) -> Self {
        VolumeInfo {
            name: v.name,
            size: v.size as f64,
            granularity: v.granularity as f64,
            open_generation: v.open_generation as f64,
            generations: v.generations.into_iter().map(|g| g as f64).collect(),
            read_only: v.read_only,
            dirty_bytes: v.dirty_bytes as f64,
            replica_of: v.replica_of,
            replica_generation: v.replica_generation.map(|g| g as f64),
            fenced: v.fenced,
        }
    }
}

#[napi(object)]
pub struct Extent {
    pub offset: f64,
    pub length: f64,
}

#[napi(object)]
pub struct CutResult {
    pub volume: String,
    /// The generation that was closed.
    pub generation: f64,
}

#[napi(object)]
#[derive(Clone, Copy)]
pub struct ImportProgress {
    pub done: f64,
    pub total: f64,
}

/// Parse a size such as `1G`, `64K` or `4096` into bytes.
#[napi]
pub fn parse_size(input: String) -> Result<f64> {
    ferry_dataplane::size::parse_size(&input)
        .map(|n| n as f64)
        .map_err(js_err)
}

/// Check `--peer-nats` values (`SITE=URL`, another site's NATS server) of a service joining
/// `site`: throws `ERR_INVALID_ARGUMENT` saying which value is wrong and how, its password masked.
#[napi]
pub fn check_peer_nats(site: String, peers: Vec<String>) -> Result<()> {
    ferry_dataplane::replication::route::parse_peers(&site, &peers)
        .map(|_| ())
        .map_err(js_err)
}

fn admin(data_dir: &str) -> ferry_dataplane::Result<Admin> {
    Admin::open(&PathBuf::from(data_dir))
}

#[napi]
pub async fn create_volume(
    data_dir: String,
    name: String,
    size: f64,
    granularity: Option<f64>,
) -> Result<VolumeInfo> {
    let size = js_number(size, "size")?;
    let gran = match granularity {
        Some(g) => js_number(g, "granularity")?,
        None => ferry_dataplane::volume::DEFAULT_GRANULARITY,
    };
    blocking(move || admin(&data_dir)?.create(&name, size, gran))
        .await
        .map(Into::into)
}

#[napi]
pub async fn list_volumes(data_dir: String) -> Result<Vec<VolumeInfo>> {
    blocking(move || admin(&data_dir)?.list())
        .await
        .map(|v| v.into_iter().map(Into::into).collect())
}

#[napi]
pub async fn delete_volume(data_dir: String, name: String) -> Result<()> {
    blocking(move || admin(&data_dir)?.delete(&name)).await
}

/// Extents changed since the last cut.
#[napi]
pub async fn dirty_extents(data_dir: String, name: String) -> Result<Vec<Extent>> {
    let v = blocking(move || admin(&data_dir)?.dirty(&name)).await?;
    Ok(v.into_iter()
        .map(|e| Extent {
            offset: e.offset as f64,
            length: e.length as f64,
        })
        .collect())
}

/// Close the open generation of all named volumes at one consistency point.
#[napi]
pub async fn cut_volumes(data_dir: String, names: Vec<String>) -> Result<Vec<CutResult>> {
    let v = blocking(move || admin(&data_dir)?.cut(&names)).await?;
    Ok(v.into_iter()
        .map(|(volume, g)| CutResult {
            volume,
            generation: g as f64,
        })
        .collect())
}

/// Per-volume I/O statistics of the running service, as JSON text.
#[napi]
pub async fn volume_stats(data_dir: String) -> Result<String> {
    let m = blocking(move || admin(&data_dir)?.stats()).await?;
    serde_json::to_string(&serde_json::json!({ "volumes": m })).map_err(internal)
}

/// Import a volume from an NBD URI (`nbd://…`, `nbd+unix://…`) or a raw file.
#[napi]
pub async fn import_volume(
    data_dir: String,
    name: String,
    source: String,
    size: Option<f64>,
    on_progress: Option<ThreadsafeFunction<ImportProgress, (), ImportProgress, Status, false>>,
) -> Result<VolumeInfo> {
    let size = size.map(|s| js_number(s, "size")).transpose()?;
    blocking(move || {
        let report = |p: Progress| {
            if let Some(f) = &on_progress {
                f.call(
                    ImportProgress {
                        done: p.done as f64,
                        total: p.total as f64,
                    },
                    ThreadsafeFunctionCallMode::NonBlocking,
                );
            }
        };
        admin(&data_dir)?.import(&name, &source, size, &report)
    })
    .await
    .map(Into::into)
}

/// A replication request to the running service of `dataDir`, as JSON text (`{"op":
/// "replicateStart", …}`, `replicateStatus`, `replicateSync`, `replicateStop`,
/// `replicatePromote`, `replicaPoints`, `fence`, `replicaClone`); answers JSON text.
#[napi]
pub async fn replicate(data_dir: String, request_json: String) -> Result<String> {
    let req: ferry_dataplane::control::ControlRequest = serde_json::from_str(&request_json)
        .map_err(|e| {
            coded(
                "ERR_INVALID_ARGUMENT",
                format!("malformed replication request: {e}"),
            )
        })?;
    let v = blocking(move || admin(&data_dir)?.replicate(req)).await?;
    serde_json::to_string(&v).map_err(internal)
}

#[napi(object)]
pub struct ServeOptions {
    pub data_dir: String,
    /// `HOST:PORT` for NBD over TCP (default 127.0.0.1:10809 when no socket is given).
    pub listen: Option<String>,
    /// Unix socket path for NBD.
    pub socket: Option<String>,
    /// Benchmarks only: serve without changed-block tracking (volumes are marked wholly dirty).
    pub untracked: Option<bool>,
    /// This site's name, to join it for replication (with `region` and `nats`).
    pub site: Option<String>,
    /// This site's region (residency rules name regions).
    pub region: Option<String>,
    /// This service's node in the site, when the site has several: replication for the node's
    /// volumes is addressed to it.
    pub node: Option<String>,
    /// The site's NATS server, `nats://user:password@host:port`.
    pub nats: Option<String>,
    /// Regions allowed to hold copies of this site's volumes (default: any).
    pub allow_regions: Option<Vec<String>>,
    /// Other sites' NATS servers, `SITE=nats://user:password@host:port`: replication to SITE
    /// goes straight to its server while that connection is up, else through the leafnode.
    pub peers: Option<Vec<String>>,
}

/// A running volume service: NBD exports plus the control socket, on the data plane's own threads.
#[napi]
pub struct VolumeService {
    inner: Mutex<Option<CoreService>>,
    tcp: Option<String>,
    socket: Option<String>,
}

/// Start serving a data directory's volumes (takes its lock; fails if another service has it).
#[napi]
pub async fn start_volume_service(options: ServeOptions) -> Result<VolumeService> {
    let opts = CoreServeOptions {
        data_dir: PathBuf::from(options.data_dir),
        listen: options.listen,
        socket: options.socket.map(PathBuf::from),
        untracked: options.untracked.unwrap_or(false),
        site: options.site,
        region: options.region,
        node: options.node,
        nats: options.nats,
        allow_regions: options.allow_regions.unwrap_or_default(),
        peers: options.peers.unwrap_or_default(),
    };
    let svc = blocking(move || CoreService::start(opts)).await?;
    Ok(VolumeService {
        tcp: svc.tcp_addr().map(|a| a.to_string()),
        socket: svc.socket_path().map(|p| p.display().to_string()),
        inner: Mutex::new(Some(svc)),
    })
}

#[napi]
impl VolumeService {
    #[napi(getter)]
    pub fn tcp_address(&self) -> Option<String> {
        self.tcp.clone()
    }

    #[napi(getter)]
    pub fn socket_path(&self) -> Option<String> {
        self.socket.clone()
    }

    #[napi(getter)]
    pub fn volume_names(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.registry().names())
            .unwrap_or_default()
    }

    /// Every replication pair's status as JSON text (what `replicate({op: "replicateStatus"})`
    /// answers), straight from the running service: no control-socket round trip, for the
    /// orchestrator that runs in the same process and asks every second.
    #[napi]
    pub async fn replication_status(&self) -> Result<String> {
        let replication = self
            .inner
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|s| s.replication().cloned());
        let pairs =
            blocking(move || Ok(replication.map(|r| r.status()).unwrap_or_default())).await?;
        serde_json::to_string(&pairs).map_err(internal)
    }

    /// Stop serving: in-flight requests finish, volumes are closed cleanly. Idempotent.
    #[napi]
    pub async fn stop(&self) -> Result<()> {
        let svc = self.inner.lock().unwrap().take();
        match svc {
            Some(s) => blocking(move || s.stop()).await,
            None => Ok(()),
        }
    }
}
