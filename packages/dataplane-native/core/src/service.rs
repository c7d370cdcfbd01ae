//! `VolumeService`: a running volume service — the data directory's lock, its open volumes, the
//! NBD server and the control socket — on its own tokio runtime, so the data path never runs on
//! (or waits for) the embedding process's event loop.

use crate::admin::ServiceControl;
use crate::data_dir::{DataDir, DirLock};
use crate::error::{Error, Result};
use crate::nbd::server::NbdServer;
use crate::registry::Registry;
use crate::replication::manager::Replication;
use crate::replication::shipper::SiteIdentity;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    /// `HOST:PORT` for NBD over TCP. Neither this nor `socket` set means 127.0.0.1:10809.
    pub listen: Option<String>,
    /// Unix socket path for NBD.
    pub socket: Option<PathBuf>,
    /// Benchmarks only: serve without changed-block tracking (every volume is marked wholly
    /// dirty first, so nothing is ever missed).
    pub untracked: bool,
    /// Join a site for replication: this site's name and region, and its NATS server.
    pub site: Option<String>,
    pub region: Option<String>,
    /// This service's node in the site, when the site has several (`--node`): replication
    /// traffic for the node's volumes is addressed to it (see `replication::protocol::address`).
    pub node: Option<String>,
    pub nats: Option<String>,
    /// Regions allowed to hold copies of this site's volumes (empty: any).
    pub allow_regions: Vec<String>,
    /// Other sites' NATS servers as `SITE=URL`: replication to SITE goes straight to its server
    /// while that connection is up (`replication::route`).
    pub peers: Vec<String>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

pub struct VolumeService {
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    registry: Arc<Registry>,
    tcp_addr: Option<SocketAddr>,
    socket_path: Option<PathBuf>,
    control_path: PathBuf,
    replication: Option<Arc<Replication>>,
    _lock: DirLock,
}

pub fn parse_listen(addr: &str) -> Result<SocketAddr> {
    let bad = |why: &str| Error::Listen {
        addr: addr.to_string(),
        why: why.to_string(),
    };
    let mut addrs = addr
        .to_socket_addrs()
        .map_err(|_| bad("not HOST:PORT, e.g. 127.0.0.1:10809"))?;
    addrs.next().ok_or_else(|| bad("resolves to no address"))
}

/// Keep MiB-sized buffers in the heap. Every replication frame, NBD request and cut-image read
/// allocates one; above glibc's mmap threshold each is a fresh mapping, page-faulted in and zeroed
/// by the kernel, then unmapped — measured a fifth to a third of a full sync's CPU in the service
/// (ARCHITECTURE §4, "Allocation"). Process-wide and once; freed memory above the trim threshold
/// still goes back to the system.
fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
    });
}

impl VolumeService {
    pub fn start(opts: ServeOptions) -> Result<VolumeService> {
        tune_allocator();
        let dir = DataDir::open(&opts.data_dir)?;
        let lock = dir
            .try_lock()?
            .ok_or_else(|| dir.busy("stop it or pass another --data"))?;
        let tcp = match (&opts.listen, &opts.socket) {
            (Some(l), _) => Some(parse_listen(l)?),
            (None, None) => Some(parse_listen(DEFAULT_LISTEN)?),
            (None, Some(_)) => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-dataplane")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the data-plane runtime", e))?;
        let registry = Registry::open(dir.clone())?;
        if opts.untracked {
            for n in registry.names() {
                registry.require(&n)?.set_tracking(false)?;
            }
        }
        let control_path = dir.control_socket();
        let (shutdown, rx) = tokio::sync::watch::channel(false);

        match opts.node.as_deref() {
            Some(_) if opts.site.is_none() => {
                return Err(Error::InvalidArgument(
                    "--node needs --site, --region and --nats: a node is one volume service of a site".into(),
                ))
            }
            Some(n) if !crate::replication::protocol::valid_site_name(n) => {
                return Err(Error::InvalidArgument(format!(
                    "--node '{n}' is not a valid node name: use letters, digits, '-' and '_' (at most 64)"
                )))
            }
            _ => {}
        }
        let identity = match (&opts.site, &opts.region, &opts.nats) {
            (None, None, None) if opts.peers.is_empty() => None,
            (Some(site), Some(region), Some(nats)) => Some((
                SiteIdentity {
                    site: site.clone(),
                    region: region.clone(),
                    allowed_regions: opts.allow_regions.clone(),
                    node: opts.node.clone(),
                },
                nats.clone(),
            )),
            _ if !opts.peers.is_empty() => {
                return Err(Error::InvalidArgument(
                    "--peer-nats needs --site, --region and --nats: a peer is another site this one replicates with".into(),
                ))
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "--site, --region and --nats go together: give all three to join a site for replication".into(),
                ))
            }
        };
        let (server, control, replication) = runtime.block_on(async {
            let server = NbdServer::bind(registry.clone(), tcp, opts.socket.clone()).await?;
            let control = crate::control::bind(&control_path)?;
            let replication = match identity {
                Some((me, url)) => {
                    Some(Replication::start(me, &url, &opts.peers, registry.clone()).await?)
                }
                None => None,
            };
            Ok::<_, Error>((server, control, replication))
        })?;
        let tcp_addr = server.local_addr();
        let handler = Arc::new(ServiceControl {
            registry: registry.clone(),
            runtime: runtime.handle().clone(),
            replication: replication.clone(),
        });
        let mut tasks = vec![
            runtime.spawn(server.run(rx.clone())),
            runtime.spawn(crate::control::serve(control, handler, rx.clone())),
        ];
        if let Some(r) = &replication {
            let r = r.clone();
            tasks.push(runtime.spawn(async move {
                if let Err(e) = r.serve(rx).await {
                    log::error!("replication receiver stopped: {e}");
                }
            }));
        }
        Ok(VolumeService {
            runtime: Some(runtime),
            shutdown,
            tasks,
            registry,
            tcp_addr,
            socket_path: opts.socket,
            control_path,
            replication,
            _lock: lock,
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn socket_path(&self) -> Option<&PathBuf> {
        self.socket_path.as_ref()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The replication of the site this service joined (none when it joined none).
    pub fn replication(&self) -> Option<&Arc<Replication>> {
        self.replication.as_ref()
    }

    /// Stop accepting, let in-flight requests finish, close every volume cleanly. Blocking.
    pub fn stop(mut self) -> Result<()> {
        let _ = self.shutdown.send(true);
        if let Some(rt) = self.runtime.take() {
            if let Some(r) = self.replication.take() {
                rt.block_on(r.shutdown());
            }
            rt.block_on(async {
                for t in self.tasks.drain(..) {
                    let _ = t.await;
                }
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&self.control_path);
        if let Some(s) = &self.socket_path {
            let _ = std::fs::remove_file(s);
        }
        self.registry.close_all()
    }
}
