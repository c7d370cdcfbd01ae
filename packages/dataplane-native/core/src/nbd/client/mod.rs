//! NBD client: connects to an export on another server (qemu-nbd, nbdkit, nbd-server, libvirt
//! backup pull mode) to read it, write it and query its allocation and dirty bitmaps.
//!
//! Owns the client side of the protocol in two phases, each in its own file: `handshake`
//! (greeting and option haggling) and `transmission` (requests and replies, pipelined). This
//! module holds the public face and the request planning: splitting at the server's maximum block
//! size, aligning to its minimum, and refusing what the server said it cannot do. It must never
//! trust the server: every reply is validated before use, and a misbehaving server produces an
//! [`Error`], never a panic or an unbounded allocation.

// `x % m == 0` rather than `is_multiple_of`: the workspace's minimum Rust (1.80) predates it.
#![allow(clippy::manual_is_multiple_of)]

mod handshake;
#[cfg(test)]
mod tests;
mod transmission;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::nbd::proto;
use crate::nbd::uri::{NbdUri, Transport};
use transmission::{Command, Reply, Shared, Ticket};

/// Requests one multi-request read or write keeps in flight.
const PIPELINE_DEPTH: usize = 8;
/// Largest READ/WRITE we send even when the server allows more: the spec's interoperable bound,
/// and what keeps one reply's buffer reasonable.
const MAX_REQUEST: u32 = proto::DEFAULT_MAX_BLOCK;
/// Largest range one BLOCK_STATUS or TRIM request covers.
const MAX_RANGE_REQUEST: u32 = 1 << 30;
/// How long `disconnect` waits for the server to close after NBD_CMD_DISC.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// How long connecting and option haggling may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Block size constraints as the server advertised them (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    /// `proto::BLOCK_SIZE_UNLIMITED` when the server has no inherent limit.
    pub max: u32,
}

/// A metadata context the server granted, with the id its block status replies carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// One entry of NBD_OPT_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    /// Free text for humans; often empty.
    pub description: String,
}

/// A run of `length` bytes at `offset` with one status. For `base:allocation` the flags are
/// `proto::STATE_HOLE | proto::STATE_ZERO`; for `qemu:dirty-bitmap:*` `proto::STATE_DIRTY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// A connection to one export in the transmission phase. Methods take `&self` and may be called
/// concurrently; their requests are pipelined on the one connection.
pub struct NbdClient {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    peer: String,
    export: String,
    size: u64,
    flags: u16,
    block: Option<BlockSize>,
    structured: bool,
    contexts: Vec<MetaContext>,
}

/// Connect to `uri` (`nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`) and ask for
/// the given metadata contexts (e.g. `base:allocation`, `qemu:dirty-bitmap:bm0`). Contexts the
/// server does not grant are simply absent from [`NbdClient::meta_contexts`].
pub async fn connect(uri: &str, meta_contexts: &[&str]) -> Result<NbdClient> {
    NbdClient::connect_uri(&NbdUri::parse(uri)?, meta_contexts).await
}

/// The exports a server lists (NBD_OPT_LIST); the export part of `uri` is ignored.
pub async fn list_exports(uri: &str) -> Result<Vec<ExportEntry>> {
    let uri = NbdUri::parse(uri)?;
    let peer = uri.to_string();
    bounded(&peer, async {
        match &uri.transport {
            Transport::Tcp { .. } => handshake::list(&mut dial_tcp(&uri).await?, &peer).await,
            Transport::Unix { .. } => handshake::list(&mut dial_unix(&uri).await?, &peer).await,
        }
    })
    .await
}

/// Connecting and haggling get [`HANDSHAKE_TIMEOUT`]: a server that accepts and then says
/// nothing must not hang the caller. (Requests have no timeout: a slow server is not a broken one.)
async fn bounded<T>(peer: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(Error::io(
                format!("NBD handshake with {peer}"),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {HANDSHAKE_TIMEOUT:?}"),
                ),
            ))
        })
}

async fn dial_tcp(uri: &NbdUri) -> Result<TcpStream> {
    let Transport::Tcp { host, port } = &uri.transport else {
        unreachable!("caller matched Tcp")
    };
    let s = TcpStream::connect((host.as_str(), *port))
        .await
        .map_err(|e| Error::io(format!("connecting to NBD server {uri}"), e))?;
    // Requests are small and latency-bound; the spec asks both sides to disable Nagle.
    s.set_nodelay(true)
        .map_err(|e| Error::io(format!("setting TCP_NODELAY for {uri}"), e))?;
    Ok(s)
}

async fn dial_unix(uri: &NbdUri) -> Result<UnixStream> {
    let Transport::Unix { socket } = &uri.transport else {
        unreachable!("caller matched Unix")
    };
    UnixStream::connect(socket).await.map_err(|e| {
        Error::io(
            format!(
                "connecting to NBD server {uri} (socket {})",
                socket.display()
            ),
            e,
        )
    })
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl NbdClient {
    /// [`connect`] with an already parsed URI.
    pub async fn connect_uri(uri: &NbdUri, meta_contexts: &[&str]) -> Result<NbdClient> {
        let peer = uri.to_string();
        let (n, r, w): (_, transmission::Reader, transmission::Writer) = bounded(&peer, async {
            match &uri.transport {
                Transport::Tcp { .. } => {
                    let mut s = dial_tcp(uri).await?;
                    let n = handshake::negotiate(&mut s, &peer, &uri.export, meta_contexts).await?;
                    let (r, w) = s.into_split();
                    Ok((n, Box::new(r) as _, Box::new(w) as _))
                }
                Transport::Unix { .. } => {
                    let mut s = dial_unix(uri).await?;
                    let n = handshake::negotiate(&mut s, &peer, &uri.export, meta_contexts).await?;
                    let (r, w) = s.into_split();
                    Ok((n, Box::new(r) as _, Box::new(w) as _))
                }
            }
        })
        .await?;
        Ok(Self::start(peer, uri.export.clone(), n, r, w))
    }

    /// Run the handshake over an already connected stream (a TLS session, a socketpair, a test
    /// double). `peer` names the server in error messages.
    pub async fn connect_stream<S>(
        mut stream: S,
        peer: &str,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let n = bounded(
            peer,
            handshake::negotiate(&mut stream, peer, export, meta_contexts),
        )
        .await?;
        let (r, w) = tokio::io::split(stream);
        Ok(Self::start(
            peer.to_string(),
            export.to_string(),
            n,
            Box::new(r),
            Box::new(w),
        ))
    }

    fn start(
        peer: String,
        export: String,
        n: handshake::Negotiated,
        r: transmission::Reader,
        w: transmission::Writer,
    ) -> NbdClient {
        let ids = n.contexts.iter().map(|c| c.id).collect();
        let shared = Shared::new(peer.clone(), n.structured, ids, w);
        let reader = tokio::spawn(transmission::run_reader(shared.clone(), r));
        NbdClient {
            shared,
            reader,
            peer,
            export,
            size: n.size,
            flags: n.flags,
            block: n.block_size,
            structured: n.structured,
            contexts: n.contexts,
        }
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (`proto::TFLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// `(minimum, preferred, maximum)` block sizes: as advertised, or the spec's defaults
    /// (1, 4096, 32 MiB) when the server advertised none.
    pub fn block_size(&self) -> (u32, u32, u32) {
        match self.block {
            Some(b) => (b.min, b.preferred, b.max),
            None => (
                proto::DEFAULT_MIN_BLOCK,
                proto::DEFAULT_PREFERRED_BLOCK,
                proto::DEFAULT_MAX_BLOCK,
            ),
        }
    }

    /// Block sizes exactly as advertised, if they were.
    pub fn advertised_block_size(&self) -> Option<BlockSize> {
        self.block
    }

    /// Largest READ/WRITE this client sends: the server's maximum, capped at 32 MiB.
    pub fn max_request(&self) -> u32 {
        let max = self.block.map_or(MAX_REQUEST, |b| b.max.min(MAX_REQUEST));
        let min = self.min_block();
        (max / min * min).max(min)
    }

    fn min_block(&self) -> u32 {
        self.block.map_or(proto::DEFAULT_MIN_BLOCK, |b| b.min)
    }

    fn has_flag(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    /// Several connections to this export see each other's flushed writes (NBD_FLAG_CAN_MULTI_CONN).
    pub fn can_multi_conn(&self) -> bool {
        self.has_flag(proto::TFLAG_CAN_MULTI_CONN)
    }

    pub fn is_read_only(&self) -> bool {
        self.has_flag(proto::TFLAG_READ_ONLY)
    }

    pub fn can_flush(&self) -> bool {
        self.has_flag(proto::TFLAG_SEND_FLUSH)
    }

    pub fn can_trim(&self) -> bool {
        self.has_flag(proto::TFLAG_SEND_TRIM)
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.has_flag(proto::TFLAG_SEND_WRITE_ZEROES)
    }

    /// Whether structured replies were negotiated (needed for block status and sparse reads).
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The metadata contexts the server granted.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.contexts
    }

    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }

    /// The server as named in messages (its URI).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn export_name(&self) -> &str {
        &self.export
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{what} of {len} bytes at offset {offset} runs past the end of export '{}' on {} \
                 ({} bytes)",
                self.export, self.peer, self.size
            ))),
        }
    }

    fn check_aligned(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        let min = self.min_block() as u64;
        if offset % min == 0 && (len % min == 0 || offset + len == self.size) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{what} of {len} bytes at offset {offset}: {} requires offsets and lengths in \
                 multiples of its minimum block size {min}",
                self.peer
            )))
        }
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::Refused {
                peer: self.peer.clone(),
                what: what.to_string(),
                why: format!("export '{}' is read-only (NBD_FLAG_READ_ONLY)", self.export),
            });
        }
        Ok(())
    }

    fn check_supported(&self, flag: u16, what: &str) -> Result<()> {
        if self.has_flag(flag) {
            return Ok(());
        }
        Err(Error::NotSupported(format!(
            "NBD server {} does not offer {what} on export '{}' (transmission flags 0x{:04x})",
            self.peer, self.export, self.flags
        )))
    }

    /// The aligned range covering `[offset, offset+len)`, clipped to the export.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let min = self.min_block() as u64;
        (
            align_down(offset, min),
            align_up(offset + len, min).min(self.size),
        )
    }

    async fn send(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Ticket> {
        self.shared
            .send(Command {
                kind,
                flags,
                offset,
                length,
                payload,
                context: 0,
            })
            .await
    }

    /// Read `len` bytes at `offset`. Unaligned ranges are widened to the server's minimum block
    /// size and trimmed back; large ones are split and pipelined.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_range("READ", offset, len as u64)?;
        let (start, end) = self.widen(offset, len as u64);
        if start == offset && end == offset + len as u64 && len <= self.max_request() as usize {
            if len == 0 {
                return Ok(Vec::new());
            }
            let t = self
                .send(proto::CMD_READ, 0, offset, len as u32, &[])
                .await?;
            return self.data(t).await;
        }
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Read `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("READ", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (start, end) = self.widen(offset, len);
        let step = self.max_request() as u64;
        let mut queue: VecDeque<(u64, Ticket)> = VecDeque::new();
        let mut next = start;
        loop {
            while queue.len() < PIPELINE_DEPTH && next < end {
                let n = (end - next).min(step);
                queue.push_back((
                    next,
                    self.send(proto::CMD_READ, 0, next, n as u32, &[]).await?,
                ));
                next += n;
            }
            let Some((at, t)) = queue.pop_front() else {
                break;
            };
            let data = self.data(t).await?;
            // Copy the part of this piece that the caller asked for.
            let lo = at.max(offset);
            let hi = (at + data.len() as u64).min(offset + len);
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        Ok(())
    }

    /// Start one aligned READ of at most `max_request()` bytes; await it with [`PendingRead`].
    /// Lets a caller keep reads in flight while it works on earlier data.
    pub(crate) async fn start_read(&self, offset: u64, len: u32) -> Result<PendingRead<'_>> {
        self.check_range("READ", offset, len as u64)?;
        self.check_aligned("READ", offset, len as u64)?;
        if len == 0 || len > self.max_request() {
            return Err(Error::InvalidArgument(format!(
                "READ of {len} bytes: one request carries 1 to {} bytes",
                self.max_request()
            )));
        }
        let t = self.send(proto::CMD_READ, 0, offset, len, &[]).await?;
        Ok(PendingRead {
            client: self,
            ticket: t,
        })
    }

    async fn data(&self, t: Ticket) -> Result<Vec<u8>> {
        match self.shared.wait(t).await? {
            Reply::Data(d) => Ok(d),
            _ => Err(Error::Protocol {
                peer: self.peer.clone(),
                why: "READ answered without data".into(),
            }),
        }
    }

    async fn done(&self, t: Ticket) -> Result<()> {
        self.shared.wait(t).await.map(|_| ())
    }

    /// Write `data` at `offset`; offset and length must be multiples of the minimum block size.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_with(offset, data, false).await
    }

    /// Write with FUA: the reply comes only once the data is on stable storage. Falls back to a
    /// write followed by a flush when the server has no FUA.
    pub async fn write_fua(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.has_flag(proto::TFLAG_SEND_FUA) {
            self.write_with(offset, data, true).await
        } else {
            self.write_with(offset, data, false).await?;
            self.flush().await
        }
    }

    async fn write_with(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable("WRITE")?;
        self.check_range("WRITE", offset, data.len() as u64)?;
        self.check_aligned("WRITE", offset, data.len() as u64)?;
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        let mut queue = VecDeque::new();
        for (i, piece) in data.chunks(self.max_request() as usize).enumerate() {
            if queue.len() == PIPELINE_DEPTH {
                self.done(queue.pop_front().expect("queue is full")).await?;
            }
            let at = offset + (i * self.max_request() as usize) as u64;
            queue.push_back(
                self.send(proto::CMD_WRITE, flags, at, piece.len() as u32, piece)
                    .await?,
            );
        }
        for t in queue {
            self.done(t).await?;
        }
        Ok(())
    }

    /// NBD_CMD_FLUSH: every write answered so far reaches stable storage.
    pub async fn flush(&self) -> Result<()> {
        self.check_supported(proto::TFLAG_SEND_FLUSH, "FLUSH")?;
        let t = self.send(proto::CMD_FLUSH, 0, 0, 0, &[]).await?;
        self.done(t).await
    }

    /// NBD_CMD_TRIM: the server may discard the range; its contents are undefined afterwards.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_supported(proto::TFLAG_SEND_TRIM, "TRIM")?;
        self.check_writable("TRIM")?;
        self.range_command(proto::CMD_TRIM, 0, offset, len, MAX_RANGE_REQUEST)
            .await
    }

    /// NBD_CMD_WRITE_ZEROES; `may_trim` lets the server punch a hole instead of writing zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.check_supported(proto::TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")?;
        self.check_writable("WRITE_ZEROES")?;
        let flags = if may_trim { 0 } else { proto::CMD_FLAG_NO_HOLE };
        self.range_command(
            proto::CMD_WRITE_ZEROES,
            flags,
            offset,
            len,
            self.max_request(),
        )
        .await
    }

    async fn range_command(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        step: u32,
    ) -> Result<()> {
        let name = proto::command_name(kind);
        self.check_range(name, offset, len)?;
        self.check_aligned(name, offset, len)?;
        let min = self.min_block();
        let step = (step / min * min) as u64;
        let mut queue = VecDeque::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            if queue.len() == PIPELINE_DEPTH {
                self.done(queue.pop_front().expect("queue is full")).await?;
            }
            let n = (end - at).min(step);
            queue.push_back(self.send(kind, flags, at, n as u32, &[]).await?);
            at += n;
        }
        for t in queue {
            self.done(t).await?;
        }
        Ok(())
    }

    /// The status of `[offset, offset+len)` in metadata context `context` (which must have been
    /// granted at connect), as consecutive extents covering exactly that range.
    pub async fn block_status(&self, offset: u64, len: u64, context: &str) -> Result<Vec<Extent>> {
        let id = self.meta_context_id(context).ok_or_else(|| {
            let granted: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
            Error::NotSupported(format!(
                "meta context '{context}' was not granted by {} (granted: {granted:?}); request it \
                 in connect() and check that the server offers it",
                self.peer
            ))
        })?;
        self.check_range("BLOCK_STATUS", offset, len)?;
        let (start, end) = self.widen(offset, len);
        let min = self.min_block();
        let step = (MAX_RANGE_REQUEST / min * min) as u64;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = start;
        while at < end {
            let n = (end - at).min(step);
            let cmd = Command {
                kind: proto::CMD_BLOCK_STATUS,
                flags: 0,
                offset: at,
                length: n as u32,
                payload: &[],
                context: id,
            };
            let t = self.shared.send(cmd).await?;
            let Reply::Extents(descs) = self.shared.wait(t).await? else {
                return Err(Error::Protocol {
                    peer: self.peer.clone(),
                    why: "BLOCK_STATUS answered without extents".into(),
                });
            };
            // The server may describe less than asked (we ask again from where it stopped) or,
            // with its last extent, more (we cut it off).
            for (l, flags) in descs {
                if at >= end {
                    break;
                }
                let l = (l as u64).min(end - at);
                match out.last_mut() {
                    Some(e) if e.flags == flags && e.offset + e.length == at => e.length += l,
                    _ => out.push(Extent {
                        offset: at,
                        length: l,
                        flags,
                    }),
                }
                at += l;
            }
        }
        // Trim the alignment padding back to what the caller asked for.
        let stop = offset + len;
        out.retain_mut(|e| {
            let (lo, hi) = (e.offset.max(offset), (e.offset + e.length).min(stop));
            e.offset = lo;
            e.length = hi.saturating_sub(lo);
            e.length > 0
        });
        Ok(out)
    }

    /// Soft disconnect: NBD_CMD_DISC, then wait (bounded) for the server to close.
    pub async fn disconnect(mut self) -> Result<()> {
        let r = self.shared.disconnect().await;
        // The server answers anything still in flight (requests of dropped futures) and closes;
        // the reader sees that. Past the grace period, Drop cuts the connection.
        let _ = tokio::time::timeout(DISCONNECT_GRACE, &mut self.reader).await;
        r
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // The reader holds the receive half; stopping it closes the connection (a hard
        // disconnect, as for any client that goes away without DISC).
        self.reader.abort();
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("peer", &self.peer)
            .field("size", &self.size)
            .field("flags", &format_args!("0x{:04x}", self.flags))
            .field("block", &self.block)
            .field("structured", &self.structured)
            .field("contexts", &self.contexts)
            .finish()
    }
}

/// A READ in flight, started by [`NbdClient::start_read`].
pub(crate) struct PendingRead<'a> {
    client: &'a NbdClient,
    ticket: Ticket,
}

impl PendingRead<'_> {
    pub(crate) async fn wait(self) -> Result<Vec<u8>> {
        self.client.data(self.ticket).await
    }
}
