//! The NBD server: listeners (TCP, unix socket), the accept loop, one task per connection, and
//! clean shutdown (stop accepting, let every connection finish the replies it owes, then close).
//!
//! It owns sockets and connection lifetimes only; what is said on a connection belongs to
//! `handshake` and `transmission`. One connection's failure must never stop the accept loop or
//! another connection.

use crate::error::{Error, Result};
use crate::nbd::handshake::negotiate;
use crate::nbd::transmission::{self, shutdown_requested, End};
use crate::registry::Registry;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A client gets this long to finish option haggling; a connection that never does would
/// otherwise hold a slot forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// After shutdown is requested, connections get this long to deliver the replies they owe
/// before they are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Connections served at once; beyond it the accept loop waits (the kernel backlog queues).
pub const MAX_CONNECTIONS: usize = 1024;
/// Read buffer per connection: a 4 KiB WRITE and the next headers usually arrive in one read.
const READ_BUFFER: usize = 128 * 1024;
/// Pause after an accept error such as EMFILE, which would otherwise repeat in a tight loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An NBD server bound to its listeners, ready to [`run`](NbdServer::run).
pub struct NbdServer {
    registry: Arc<Registry>,
    tcp: Option<TcpListener>,
    unix: Option<UnixSocket>,
}

/// A unix listener that removes its socket file when dropped, if the file is still ours.
struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        // Another server may have replaced a file we no longer listen on; leave that one alone.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl NbdServer {
    /// Bind the listeners: a TCP address, a unix socket path, or both.
    pub async fn bind(
        registry: Arc<Registry>,
        tcp: Option<SocketAddr>,
        unix: Option<PathBuf>,
    ) -> Result<NbdServer> {
        if tcp.is_none() && unix.is_none() {
            return Err(Error::InvalidArgument(
                "the NBD server needs somewhere to listen: give a TCP address (e.g. 127.0.0.1:10809) or a unix socket path".into(),
            ));
        }
        let tcp = match tcp {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| listen_error(&addr.to_string(), e))?,
            ),
            None => None,
        };
        let unix = match unix {
            Some(path) => Some(bind_unix(&path)?),
            None => None,
        };
        Ok(NbdServer {
            registry,
            tcp,
            unix,
        })
    }

    /// The bound TCP address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The unix socket path, if listening on one.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }

    /// Accept and serve connections until `shutdown` turns true (or its sender is dropped).
    /// Then stop accepting, let connections deliver the replies they owe (at most
    /// `SHUTDOWN_GRACE`), cut the rest, and remove the unix socket file.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let (stop_connections, connection_shutdown) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut serial: u64 = 0;
        loop {
            let room = connections.len() < MAX_CONNECTIONS;
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                Ok((stream, addr)) = accept_tcp(self.tcp.as_ref()), if room => {
                    // Small replies must not wait for Nagle; the spec asks for this.
                    let _ = stream.set_nodelay(true);
                    let peer = addr.to_string();
                    let (r, w) = stream.into_split();
                    connections.spawn(serve_halves(r, w, self.registry.clone(), peer, connection_shutdown.clone()));
                }
                Ok(stream) = accept_unix(self.unix.as_ref()), if room => {
                    serial += 1;
                    let peer = format!("unix:{}#{serial}", self.unix.as_ref().map(|u| u.path.display().to_string()).unwrap_or_default());
                    let (r, w) = stream.into_split();
                    connections.spawn(serve_halves(r, w, self.registry.clone(), peer, connection_shutdown.clone()));
                }
                Some(done) = connections.join_next(), if !connections.is_empty() => report(done),
            }
        }

        // Stop accepting first, so no client connects to a server that is going away.
        self.tcp = None;
        self.unix = None;
        let _ = stop_connections.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(done) = connections.join_next().await {
                report(done);
            }
        })
        .await;
        if drained.is_err() {
            log::warn!(
                "NBD server: {} connection(s) still busy {}s after shutdown; closing them",
                connections.len(),
                SHUTDOWN_GRACE.as_secs()
            );
            connections.shutdown().await;
        }
    }
}

/// Serve one client over any byte stream (tests and the fuzzer use `tokio::io::duplex`): the
/// handshake, then transmission until the client disconnects.
pub async fn serve_connection<S>(stream: S, registry: Arc<Registry>, peer: String) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // No sender: this connection is only ended by its client.
    let (_, never) = watch::channel(false);
    let (r, w) = tokio::io::split(stream);
    serve_halves(r, w, registry, peer, never)
        .await
        .1
        .map(|_| ())
}

/// One connection from greeting to close. Returns the peer with the outcome for the report;
/// `Ok(None)` means the client left during the handshake.
async fn serve_halves<R, W>(
    reader: R,
    mut writer: W,
    registry: Arc<Registry>,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
) -> (String, Result<Option<End>>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        negotiate(&mut reader, &mut writer, &registry, &peer),
    );
    let session = tokio::select! {
        r = handshake => match r {
            Ok(Ok(Some(session))) => session,
            Ok(Ok(None)) => return (peer, Ok(None)),
            Ok(Err(e)) => return (peer, Err(e)),
            Err(_) => {
                let why = format!("handshake not finished within {}s; closing the connection", HANDSHAKE_TIMEOUT.as_secs());
                return (peer.clone(), Err(Error::Protocol { peer, why }));
            }
        },
        // Nothing is owed to a client still haggling: just close.
        _ = shutdown_requested(&mut shutdown) => return (peer, Ok(None)),
    };
    let result = transmission::serve(&mut reader, writer, session, &peer, shutdown).await;
    (peer, result.map(Some))
}

fn report(done: std::result::Result<(String, Result<Option<End>>), tokio::task::JoinError>) {
    match done {
        Ok((peer, Ok(end))) => log::debug!("NBD connection from {peer} ended: {end:?}"),
        Ok((_, Err(e))) => log::warn!("{e}"),
        Err(e) if e.is_panic() => log::error!("NBD connection task panicked: {e}"),
        Err(_) => {}
    }
}

async fn accept_tcp(
    listener: Option<&TcpListener>,
) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    let Some(l) = listener else {
        return std::future::pending().await;
    };
    let r = l.accept().await;
    if let Err(e) = &r {
        accept_failed(e).await;
    }
    r
}

async fn accept_unix(socket: Option<&UnixSocket>) -> io::Result<tokio::net::UnixStream> {
    let Some(s) = socket else {
        return std::future::pending().await;
    };
    let r = s.listener.accept().await.map(|(stream, _)| stream);
    if let Err(e) = &r {
        accept_failed(e).await;
    }
    r
}

/// Accept errors are about one would-be connection or a passing resource shortage (EMFILE);
/// report, pause briefly so a persistent one does not spin, and keep serving.
async fn accept_failed(e: &io::Error) {
    log::warn!("NBD server: accepting a connection failed: {e}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

fn listen_error(addr: &str, e: io::Error) -> Error {
    let why = match e.kind() {
        io::ErrorKind::AddrInUse => {
            "address already in use — pick another --listen port or stop the other server"
                .to_string()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied — use a port above 1023 or a directory you can write to".to_string()
        }
        io::ErrorKind::AddrNotAvailable => {
            "no such address on this host — listen on 127.0.0.1 or one of this machine's addresses"
                .to_string()
        }
        _ => e.to_string(),
    };
    Error::Listen {
        addr: addr.to_string(),
        why,
    }
}

/// Bind a unix socket, replacing a stale socket file (one nobody listens on) but never a live
/// one or a file that is not a socket.
fn bind_unix(path: &Path) -> Result<UnixSocket> {
    let addr = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::Listen { addr, why: "the path exists and is not a socket — pick another socket path".into() });
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::Listen {
                    addr,
                    why: "another server is listening on this socket — stop it or pick another socket path".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| Error::Listen {
                    addr: addr.clone(),
                    why: format!("cannot remove the stale socket file: {e}"),
                })?;
            }
            Err(e) => {
                return Err(Error::Listen { addr, why: format!("cannot tell whether the existing socket is in use: {e}") })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(&addr, e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| listen_error(&addr, e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| listen_error(&addr, e))?;
    Ok(UnixSocket {
        listener,
        path: path.to_path_buf(),
        inode: (meta.dev(), meta.ino()),
    })
}
