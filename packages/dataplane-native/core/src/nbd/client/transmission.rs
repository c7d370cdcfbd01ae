//! Client transmission phase: sending requests and matching every reply chunk to the request it
//! answers, with several requests in flight.
//!
//! One reader task owns the receive side and assembles replies; senders share the send side under
//! a lock. Every reply is checked against its request (magic, cookie, chunk type, bounds, overlap,
//! coverage) before a byte of it is trusted, and every length is bounded before anything is
//! allocated: a hostile server gets an error, never a panic or an unbounded buffer. After the
//! first protocol violation or I/O error the connection is dead and says why to every caller.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::nbd::proto;

pub(super) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Bytes of request and reply payload in flight at once (backpressure for pipelined callers).
const WINDOW_BYTES: usize = 64 * 1024 * 1024;
/// Every request costs at least this much window, which bounds the number in flight.
const MIN_REQUEST_COST: usize = 64 * 1024;
/// Most descriptors we accept in one block status chunk (16 MiB of payload); qemu sends at most
/// 128 Ki per reply and nbdkit fewer.
const MAX_STATUS_DESCRIPTORS: u32 = 2 * 1024 * 1024;
/// Largest error chunk: header fields, a maximal message, an offset.
const MAX_ERROR_CHUNK: u32 =
    proto::ERROR_CHUNK_HEADER_LEN + proto::MAX_STRING_LEN + proto::ERROR_OFFSET_TRAILER_LEN;
/// Buffered reads keep reply headers from costing a syscall each.
const READ_BUFFER: usize = 64 * 1024;

/// A finished, successful reply.
pub(super) enum Reply {
    Done,
    Data(Vec<u8>),
    /// `(length, flags)` descriptors for the context that was asked about.
    Extents(Vec<(u32, u32)>),
}

/// Why the connection can no longer be used.
#[derive(Clone, Debug)]
enum Broken {
    Protocol(String),
    Io(std::io::ErrorKind, String),
    Closed,
}

impl Broken {
    fn error(&self, peer: &str) -> Error {
        match self {
            Broken::Protocol(why) => Error::Protocol {
                peer: peer.to_string(),
                why: why.clone(),
            },
            Broken::Io(kind, msg) => Error::io(
                format!("NBD connection to {peer}"),
                std::io::Error::new(*kind, msg.clone()),
            ),
            Broken::Closed => Error::io(
                format!("NBD connection to {peer}"),
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "closed (disconnected, or shut down by the server); connect again",
                ),
            ),
        }
    }
}

fn io_broken(e: &std::io::Error) -> Broken {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Broken::Io(
            e.kind(),
            "the server closed the connection in the middle of a reply".into(),
        )
    } else {
        Broken::Io(e.kind(), e.to_string())
    }
}

/// What the reader accumulates for a request until its reply is complete.
enum Body {
    None,
    Read {
        buf: Vec<u8>,
        /// Content chunks seen, start -> end (absolute offsets), to refuse overlaps.
        covered: BTreeMap<u64, u64>,
        bytes: u64,
    },
    Status {
        want: u32,
        seen: Vec<u32>,
        extents: Option<Vec<(u32, u32)>>,
    },
}

struct Pending {
    kind: u16,
    offset: u64,
    length: u32,
    tx: oneshot::Sender<Result<Reply>>,
    _window: OwnedSemaphorePermit,
    got_chunk: bool,
    error: Option<(u32, String)>,
    body: Body,
}

impl Pending {
    fn end(&self) -> u64 {
        self.offset + self.length as u64
    }
}

struct State {
    next_cookie: u64,
    inflight: HashMap<u64, Pending>,
    broken: Option<Broken>,
    /// The server answered ESHUTDOWN: no new requests; disconnect once the rest are answered.
    server_shutdown: bool,
    /// We sent NBD_CMD_DISC: the server closing is expected.
    disconnecting: bool,
}

pub(super) struct Shared {
    peer: String,
    structured: bool,
    /// Context ids granted at negotiation; a status chunk for any other id is a violation.
    context_ids: Vec<u32>,
    writer: tokio::sync::Mutex<Writer>,
    state: Mutex<State>,
    window: Arc<Semaphore>,
    /// Wakes the reader when a sender breaks the connection, so it stops waiting for replies.
    stop_reader: Notify,
}

/// A request on its way; await it with [`Shared::wait`].
pub(super) struct Ticket {
    rx: oneshot::Receiver<Result<Reply>>,
}

/// What to send.
pub(super) struct Command<'a> {
    pub kind: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub payload: &'a [u8],
    /// For BLOCK_STATUS: the context whose descriptors we want back.
    pub context: u32,
}

/// Marks the connection broken if a send is abandoned half-way (its future dropped), because the
/// server would read the next request from the middle of this one.
struct SendGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.fail(Broken::Protocol(
                "a request was abandoned while it was being sent; the stream is no longer in sync"
                    .into(),
            ));
        }
    }
}

impl Shared {
    pub(super) fn new(
        peer: String,
        structured: bool,
        context_ids: Vec<u32>,
        writer: Writer,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            peer,
            structured,
            context_ids,
            writer: tokio::sync::Mutex::new(writer),
            state: Mutex::new(State {
                next_cookie: 1,
                inflight: HashMap::new(),
                broken: None,
                server_shutdown: false,
                disconnecting: false,
            }),
            window: Arc::new(Semaphore::new(WINDOW_BYTES)),
            stop_reader: Notify::new(),
        })
    }

    fn protocol(&self, why: impl Into<String>) -> Error {
        Error::Protocol {
            peer: self.peer.clone(),
            why: why.into(),
        }
    }

    /// Break the connection (first reason wins) and fail everything in flight.
    fn fail(&self, why: Broken) {
        let drained: Vec<Pending> = {
            let mut st = self.state.lock();
            if st.broken.is_none() {
                st.broken = Some(why);
            }
            st.inflight.drain().map(|(_, p)| p).collect()
        };
        let why = self.state.lock().broken.clone().unwrap_or(Broken::Closed);
        for p in drained {
            let _ = p.tx.send(Err(why.error(&self.peer)));
        }
        self.stop_reader.notify_one();
    }

    /// Send one request; its reply arrives through the returned ticket.
    pub(super) async fn send(&self, cmd: Command<'_>) -> Result<Ticket> {
        let cost = (cmd.payload.len().max(if cmd.kind == proto::CMD_READ {
            cmd.length as usize
        } else {
            0
        }))
        .clamp(MIN_REQUEST_COST, WINDOW_BYTES);
        let permit = self
            .window
            .clone()
            .acquire_many_owned(cost as u32)
            .await
            .map_err(|_| self.protocol("request window closed"))?;
        let body = match cmd.kind {
            proto::CMD_READ => Body::Read {
                buf: vec![0u8; cmd.length as usize],
                covered: BTreeMap::new(),
                bytes: 0,
            },
            proto::CMD_BLOCK_STATUS => Body::Status {
                want: cmd.context,
                seen: Vec::new(),
                extents: None,
            },
            _ => Body::None,
        };
        let (tx, rx) = oneshot::channel();
        // The send side first: a caller that gives up while waiting for it leaves nothing behind.
        let mut w = self.writer.lock().await;
        // Registered before the first byte leaves, so the reader can never see a reply to a
        // cookie it does not know.
        let cookie = {
            let mut st = self.state.lock();
            if let Some(b) = &st.broken {
                return Err(b.error(&self.peer));
            }
            if st.server_shutdown || st.disconnecting {
                return Err(Broken::Closed.error(&self.peer));
            }
            let cookie = st.next_cookie;
            st.next_cookie += 1;
            st.inflight.insert(
                cookie,
                Pending {
                    kind: cmd.kind,
                    offset: cmd.offset,
                    length: cmd.length,
                    tx,
                    _window: permit,
                    got_chunk: false,
                    error: None,
                    body,
                },
            );
            cookie
        };
        let header = proto::Request {
            flags: cmd.flags,
            kind: cmd.kind,
            cookie,
            offset: cmd.offset,
            length: cmd.length,
        }
        .encode();
        let mut guard = SendGuard {
            shared: self,
            armed: true,
        };
        let sent = async {
            w.write_all(&header).await?;
            if !cmd.payload.is_empty() {
                w.write_all(cmd.payload).await?;
            }
            w.flush().await
        }
        .await;
        guard.armed = false;
        if let Err(e) = sent {
            let _ = w.shutdown().await;
            drop(w);
            self.fail(io_broken(&e));
            return Err(Error::io(
                format!(
                    "sending {} to NBD server {}",
                    proto::command_name(cmd.kind),
                    self.peer
                ),
                e,
            ));
        }
        Ok(Ticket { rx })
    }

    /// Wait for a request's reply.
    pub(super) async fn wait(&self, t: Ticket) -> Result<Reply> {
        match t.rx.await {
            Ok(r) => r,
            // The reader went away without answering: the connection broke.
            Err(_) => {
                let b = self.state.lock().broken.clone();
                Err(b.unwrap_or(Broken::Closed).error(&self.peer))
            }
        }
    }

    /// Send NBD_CMD_DISC and close our side. No new requests after this.
    pub(super) async fn disconnect(&self) -> Result<()> {
        {
            let mut st = self.state.lock();
            if let Some(b) = &st.broken {
                return Err(b.error(&self.peer));
            }
            if st.disconnecting {
                return Ok(());
            }
            st.disconnecting = true;
        }
        self.send_disc().await
    }

    async fn send_disc(&self) -> Result<()> {
        let header = proto::Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        let mut w = self.writer.lock().await;
        let r = async {
            w.write_all(&header).await?;
            w.flush().await?;
            w.shutdown().await
        }
        .await;
        r.map_err(|e| Error::io(format!("sending NBD_CMD_DISC to {}", self.peer), e))
    }
}

/// The reader task: runs until the connection ends, then fails whatever is still in flight.
pub(super) async fn run_reader(shared: Arc<Shared>, rd: Reader) {
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let outcome = tokio::select! {
        r = read_replies(&shared, &mut rd) => r,
        _ = shared.stop_reader.notified() => Err(Broken::Closed),
    };
    let why = match outcome {
        Ok(()) => Broken::Closed,
        Err(b) => b,
    };
    shared.fail(why);
}

/// Reads messages until the connection ends. A request is taken out of the table while its
/// message is processed, then put back or answered by `finish`.
async fn read_replies(
    shared: &Shared,
    rd: &mut BufReader<Reader>,
) -> std::result::Result<(), Broken> {
    loop {
        let mut magic = [0u8; 4];
        if let Err(e) = rd.read_exact(&mut magic).await {
            let st = shared.state.lock();
            if e.kind() == std::io::ErrorKind::UnexpectedEof && st.inflight.is_empty() {
                // Orderly close between replies: after our DISC, or the server went away while
                // idle. Either way nothing is lost; later requests will say the link is closed.
                return Ok(());
            }
            drop(st);
            return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Broken::Io(
                    e.kind(),
                    "the server closed the connection with requests in flight".into(),
                )
            } else {
                io_broken(&e)
            });
        }
        match u32::from_be_bytes(magic) {
            proto::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; proto::SIMPLE_REPLY_HEADER_LEN - 4];
                rd.read_exact(&mut h).await.map_err(|e| io_broken(&e))?;
                let errno = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut p = take(shared, cookie)?;
                if let Err(b) = simple_reply(shared, rd, &mut p, errno).await {
                    return Err(abandon(shared, p, b));
                }
                finish(shared, cookie, p, true)?;
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                if !shared.structured {
                    return Err(Broken::Protocol(
                        "structured reply chunk although structured replies were not negotiated"
                            .into(),
                    ));
                }
                let mut h = [0u8; proto::STRUCTURED_REPLY_HEADER_LEN - 4];
                rd.read_exact(&mut h).await.map_err(|e| io_broken(&e))?;
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut p = take(shared, cookie)?;
                if let Err(b) = chunk(shared, rd, &mut p, kind, len).await {
                    return Err(abandon(shared, p, b));
                }
                finish(shared, cookie, p, flags & proto::REPLY_FLAG_DONE != 0)?;
            }
            m => {
                return Err(Broken::Protocol(format!(
                    "reply with unknown magic 0x{m:08x}"
                )))
            }
        }
        // The spec wants a soft disconnect after ESHUTDOWN; wait until nothing is in flight.
        let disc = {
            let mut st = shared.state.lock();
            let due = st.server_shutdown && !st.disconnecting && st.inflight.is_empty();
            st.disconnecting |= due;
            due
        };
        if disc {
            shared
                .send_disc()
                .await
                .map_err(|e| Broken::Io(std::io::ErrorKind::Other, e.to_string()))?;
        }
    }
}

fn take(shared: &Shared, cookie: u64) -> std::result::Result<Pending, Broken> {
    shared.state.lock().inflight.remove(&cookie).ok_or_else(|| {
        Broken::Protocol(format!(
            "reply for cookie {cookie}, which no request in flight has"
        ))
    })
}

fn violation(why: String) -> Broken {
    Broken::Protocol(why)
}

/// The reader failed while holding `p` outside the table: break the connection, then answer `p`
/// with the same reason as everyone else.
fn abandon(shared: &Shared, p: Pending, why: Broken) -> Broken {
    shared.fail(why);
    let why = shared.state.lock().broken.clone().unwrap_or(Broken::Closed);
    let _ = p.tx.send(Err(why.error(&shared.peer)));
    why
}

async fn simple_reply(
    shared: &Shared,
    rd: &mut BufReader<Reader>,
    p: &mut Pending,
    errno: u32,
) -> std::result::Result<(), Broken> {
    let name = proto::command_name(p.kind);
    if p.got_chunk {
        return Err(violation(format!(
            "simple reply to {name} after structured chunks for it"
        )));
    }
    if errno != 0 {
        p.error = Some((errno, String::new()));
        return Ok(());
    }
    match (&mut p.body, shared.structured) {
        (Body::Read { .. }, true) => Err(violation(
            "successful simple reply to READ although structured replies were negotiated".into(),
        )),
        (Body::Read { buf, bytes, .. }, false) => {
            rd.read_exact(buf).await.map_err(|e| io_broken(&e))?;
            *bytes = buf.len() as u64;
            Ok(())
        }
        (Body::Status { .. }, _) => Err(violation(
            "successful simple reply to BLOCK_STATUS, which needs a structured reply".into(),
        )),
        (Body::None, _) => Ok(()),
    }
}

/// Read a chunk payload we have already bounded.
async fn payload(rd: &mut BufReader<Reader>, len: u32) -> std::result::Result<Vec<u8>, Broken> {
    let mut b = vec![0u8; len as usize];
    rd.read_exact(&mut b).await.map_err(|e| io_broken(&e))?;
    Ok(b)
}

async fn chunk(
    shared: &Shared,
    rd: &mut BufReader<Reader>,
    p: &mut Pending,
    kind: u16,
    len: u32,
) -> std::result::Result<(), Broken> {
    p.got_chunk = true;
    let name = proto::command_name(p.kind);
    match kind {
        proto::REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(violation(format!(
                    "NBD_REPLY_TYPE_NONE with a {len}-byte payload"
                )));
            }
            Ok(())
        }
        proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE => {
            let (start, end) = (p.offset, p.end());
            let Body::Read {
                buf,
                covered,
                bytes,
            } = &mut p.body
            else {
                return Err(violation(format!("content chunk in the reply to {name}")));
            };
            let (off, n) = if kind == proto::REPLY_TYPE_OFFSET_DATA {
                if len <= proto::OFFSET_DATA_HEADER_LEN
                    || (len - proto::OFFSET_DATA_HEADER_LEN) as u64 > end - start
                {
                    return Err(violation(format!(
                        "OFFSET_DATA chunk of {len} bytes for a {}-byte READ",
                        end - start
                    )));
                }
                let mut o = [0u8; 8];
                rd.read_exact(&mut o).await.map_err(|e| io_broken(&e))?;
                (
                    u64::from_be_bytes(o),
                    (len - proto::OFFSET_DATA_HEADER_LEN) as u64,
                )
            } else {
                if len != proto::OFFSET_HOLE_LEN {
                    return Err(violation(format!(
                        "OFFSET_HOLE chunk of {len} bytes, expected 12"
                    )));
                }
                let mut o = [0u8; 12];
                rd.read_exact(&mut o).await.map_err(|e| io_broken(&e))?;
                (
                    u64::from_be_bytes(o[0..8].try_into().unwrap()),
                    u32::from_be_bytes(o[8..12].try_into().unwrap()) as u64,
                )
            };
            let chunk_end = off.saturating_add(n);
            if n == 0 || off < start || chunk_end > end {
                return Err(violation(format!(
                    "content chunk [{off}, +{n}) outside the READ of [{start}, +{})",
                    end - start
                )));
            }
            let before = covered.range(..chunk_end).next_back().map(|(_, &e)| e);
            if before.is_some_and(|e| e > off) {
                return Err(violation(format!(
                    "content chunk [{off}, +{n}) overlaps an earlier one"
                )));
            }
            covered.insert(off, chunk_end);
            *bytes += n;
            let range = (off - start) as usize..(chunk_end - start) as usize;
            if kind == proto::REPLY_TYPE_OFFSET_DATA {
                rd.read_exact(&mut buf[range])
                    .await
                    .map_err(|e| io_broken(&e))?;
            }
            // A hole needs nothing: the buffer starts zeroed and this range was never written.
            Ok(())
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            let Body::Status {
                want,
                seen,
                extents,
            } = &mut p.body
            else {
                return Err(violation(format!(
                    "BLOCK_STATUS chunk in the reply to {name}"
                )));
            };
            let min = proto::BLOCK_STATUS_HEADER_LEN + proto::BLOCK_DESCRIPTOR_LEN;
            let max = proto::BLOCK_STATUS_HEADER_LEN
                + proto::BLOCK_DESCRIPTOR_LEN * MAX_STATUS_DESCRIPTORS;
            if len < min
                || len > max
                || (len - proto::BLOCK_STATUS_HEADER_LEN) % proto::BLOCK_DESCRIPTOR_LEN != 0
            {
                return Err(violation(format!("BLOCK_STATUS chunk of {len} bytes (must be 4 + 8*n, n from 1 to {MAX_STATUS_DESCRIPTORS})")));
            }
            let data = payload(rd, len).await?;
            let id = u32::from_be_bytes(data[0..4].try_into().unwrap());
            if !shared.context_ids.contains(&id) {
                return Err(violation(format!(
                    "BLOCK_STATUS for context id {id}, which was never granted"
                )));
            }
            if seen.contains(&id) {
                return Err(violation(format!(
                    "two BLOCK_STATUS chunks for context id {id}"
                )));
            }
            seen.push(id);
            if id == *want {
                let mut v = Vec::with_capacity(((len - 4) / 8) as usize);
                for d in data[4..].chunks_exact(8) {
                    let l = u32::from_be_bytes(d[0..4].try_into().unwrap());
                    let f = u32::from_be_bytes(d[4..8].try_into().unwrap());
                    if l == 0 {
                        return Err(violation("BLOCK_STATUS descriptor of length 0".into()));
                    }
                    v.push((l, f));
                }
                *extents = Some(v);
            }
            Ok(())
        }
        k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
            if !(proto::ERROR_CHUNK_HEADER_LEN..=MAX_ERROR_CHUNK).contains(&len) {
                return Err(violation(format!(
                    "error chunk of {len} bytes (must be 6 to {MAX_ERROR_CHUNK})"
                )));
            }
            let data = payload(rd, len).await?;
            let errno = u32::from_be_bytes(data[0..4].try_into().unwrap());
            let mlen = u16::from_be_bytes([data[4], data[5]]) as u32;
            let trailer = if k == proto::REPLY_TYPE_ERROR_OFFSET {
                proto::ERROR_OFFSET_TRAILER_LEN
            } else {
                0
            };
            let fixed = proto::ERROR_CHUNK_HEADER_LEN + trailer;
            if k == proto::REPLY_TYPE_ERROR || k == proto::REPLY_TYPE_ERROR_OFFSET {
                if len < fixed || mlen != len - fixed {
                    return Err(violation(format!(
                        "error chunk of {len} bytes with a {mlen}-byte message"
                    )));
                }
                if k == proto::REPLY_TYPE_ERROR_OFFSET {
                    let at = u64::from_be_bytes(data[len as usize - 8..].try_into().unwrap());
                    if at < p.offset || at >= p.end().max(p.offset + 1) {
                        return Err(violation(format!("error offset {at} outside the request")));
                    }
                }
            } else if mlen > len - proto::ERROR_CHUNK_HEADER_LEN {
                // Unknown error type: its message must at least fit, or we cannot trust the rest.
                return Err(violation(format!(
                    "error chunk type {k} with a {mlen}-byte message in {len} bytes"
                )));
            }
            if errno == 0 {
                return Err(violation("error chunk with error number 0".into()));
            }
            let msg = String::from_utf8_lossy(&data[6..6 + mlen as usize]).into_owned();
            // The first error is the one the caller hears about.
            p.error.get_or_insert((errno, msg));
            Ok(())
        }
        k => Err(violation(format!(
            "unknown reply chunk type {k} for {name}"
        ))),
    }
}

/// Put a request back in the table, or answer it if this was its last message.
fn finish(shared: &Shared, cookie: u64, p: Pending, done: bool) -> std::result::Result<(), Broken> {
    if !done {
        shared.state.lock().inflight.insert(cookie, p);
        return Ok(());
    }
    let kind = p.kind;
    let name = proto::command_name(kind);
    let result = if let Some((errno, message)) = p.error {
        if errno == proto::ESHUTDOWN {
            shared.state.lock().server_shutdown = true;
        }
        Err(Error::ServerError {
            peer: shared.peer.clone(),
            command: name,
            offset: p.offset,
            length: p.length as u64,
            errno,
            message,
        })
    } else {
        match p.body {
            Body::None => Ok(Reply::Done),
            Body::Read { buf, bytes, .. } => {
                if bytes != buf.len() as u64 {
                    let why = format!("READ reply ended after {bytes} of {} bytes", buf.len());
                    let _ = p.tx.send(Err(shared.protocol(why.clone())));
                    return Err(Broken::Protocol(why));
                }
                Ok(Reply::Data(buf))
            }
            Body::Status {
                extents: Some(v), ..
            } => Ok(Reply::Extents(v)),
            Body::Status { want, .. } => {
                let why = format!("BLOCK_STATUS reply without a chunk for context id {want}");
                let _ = p.tx.send(Err(shared.protocol(why.clone())));
                return Err(Broken::Protocol(why));
            }
        }
    };
    let _ = p.tx.send(result);
    Ok(())
}
