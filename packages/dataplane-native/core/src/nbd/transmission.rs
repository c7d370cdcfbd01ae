//! NBD server transmission phase: reads requests, runs them against the leased volume
//! concurrently, and writes their replies (simple or structured) as they complete.
//!
//! Shape of a connection: this task reads and validates requests (and WRITE payloads, which must
//! be consumed in stream order); each valid request runs in its own tokio task, calling the
//! volume inline because its methods are microsecond pread/pwrite calls; one writer task owns the
//! socket's write half and flushes its buffer whenever the reply queue runs dry. Requests in
//! flight and payload bytes in flight are bounded by semaphores whose permits travel with each
//! reply until it is written, so a client that sends without reading stalls itself, not the
//! server.
//!
//! Payload buffers are never zero-filled: WRITE payloads are read into spare capacity, and READ
//! replies reuse the initialised buffers of finished requests (`BufferPool`).
//!
//! This module never decides what an export is or which contexts exist (the handshake did), and
//! it never lets one connection's failure reach another: a protocol violation or a vanished
//! client ends this connection only.

use crate::error::{Error, Result};
use crate::nbd::handshake::Session;
use crate::nbd::meta_context::MetaContext;
use crate::nbd::proto::*;
use crate::registry::ExportLease;
use crate::volume::{StatusExtent, Volume, ZeroFlags};
use parking_lot::Mutex;
use std::io;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Requests a connection may have between reading their header and writing their reply.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 64;
/// READ and WRITE payload bytes a connection may hold in memory at once. At least
/// `MAX_PAYLOAD`, so the largest legal request always fits.
pub const MAX_BYTES_IN_FLIGHT: u32 = 64 * 1024 * 1024;
/// An oversized WRITE payload up to this size is read and thrown away so the client gets a clean
/// EINVAL; beyond it we hang up rather than swallow gigabytes (the spec allows either).
const MAX_DISCARD: u32 = 2 * MAX_PAYLOAD;
/// Socket write buffer: many small replies leave in one syscall; big READ data bypasses it.
const WRITE_BUFFER: usize = 256 * 1024;
/// Longest error text sent in a structured error chunk.
const MAX_ERROR_MESSAGE: usize = 1024;
/// Payload buffers smaller than this are not worth keeping: zeroing them is cheap.
const POOLED_MIN: usize = 64 * 1024;
/// Largest payload buffer kept for reuse, and the most bytes a connection keeps for reuse.
const POOLED_MAX: usize = 4 * 1024 * 1024;
const POOL_BYTES: usize = 8 * 1024 * 1024;

/// Why the transmission phase ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
    /// The server is shutting down.
    Shutdown,
}

/// Run the transmission phase until the client disconnects, the stream breaks, or `shutdown`
/// turns true. In every case the replies to requests already read are written first.
pub async fn serve<R, W>(
    reader: &mut R,
    writer: W,
    session: Session,
    peer: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Connection::new(session));
    let (tx, rx) = mpsc::channel::<Reply>(MAX_REQUESTS_IN_FLIGHT);
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(writer, rx, conn.pool.clone())));
    let requests = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_BYTES_IN_FLIGHT as usize));
    let read_err =
        |what: &str, e: io::Error| Error::io(format!("NBD connection from {peer}: {what}"), e);

    let outcome: Result<End> = loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break Ok(End::Shutdown),
            // The writer only goes away when the client stopped taking replies.
            _ = tx.closed() => break Ok(End::Closed),
            r = reader.read_exact(&mut header) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(End::Closed),
                Err(e) => break Err(read_err("reading a request", e)),
            },
        }
        let Some(req) = Request::parse(&header) else {
            break Err(Error::Protocol {
                peer: peer.to_string(),
                why: format!(
                    "request does not start with the request magic (got {:#010x}); closing the connection",
                    u32::from_be_bytes(header[0..4].try_into().unwrap())
                ),
            });
        };
        if req.kind == CMD_DISC {
            break Ok(End::Disconnect);
        }
        let request_permit = requests
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");

        if let Err(rejection) = conn.check(&req) {
            if req.kind == CMD_WRITE {
                // The payload follows the header whatever we think of the request.
                if req.length > MAX_DISCARD {
                    break Err(Error::Protocol {
                        peer: peer.to_string(),
                        why: format!(
                            "WRITE of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum by too much to skip; closing the connection",
                            req.length
                        ),
                    });
                }
                let skip = &mut (&mut *reader).take(req.length as u64);
                match tokio::io::copy(skip, &mut tokio::io::sink()).await {
                    Ok(n) if n == req.length as u64 => {}
                    Ok(_) => break Ok(End::Closed),
                    Err(e) => break Err(read_err("skipping a refused WRITE payload", e)),
                }
            }
            let reply = conn.error_reply(&req, rejection.errno, &rejection.message);
            if tx
                .send(reply.with_budget(request_permit, None))
                .await
                .is_err()
            {
                break Ok(End::Closed);
            }
            continue;
        }

        let bytes_permit = match req.kind {
            CMD_READ | CMD_WRITE => Some(
                bytes
                    .clone()
                    .acquire_many_owned(req.length)
                    .await
                    .expect("semaphore never closed"),
            ),
            _ => None,
        };
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            let len = req.length as usize;
            payload = conn.pool.take_empty(len);
            match read_payload(reader, &mut payload, len).await {
                Ok(()) => {}
                // A client vanishing mid-payload ends this connection and nothing else.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(End::Closed),
                Err(e) => break Err(read_err("reading a WRITE payload", e)),
            }
        }
        let conn = conn.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = conn.execute(&req, &payload);
            conn.pool.give(payload);
            // A send error means the client is gone; the reply has nowhere to go.
            let _ = tx
                .send(reply.with_budget(request_permit, bytes_permit))
                .await;
        });
    };

    // Replies of requests already accepted still go out: the writer ends once every request
    // task has sent its reply and dropped its sender.
    drop(tx);
    let written = (&mut writer.0).await;
    match (outcome, written) {
        (Err(e), _) => Err(e),
        (Ok(end), Ok(Ok(()))) => Ok(end),
        // Disconnecting clients often close before reading the last reply; not worth an error.
        (Ok(end), Ok(Err(_))) if end != End::Shutdown => Ok(end),
        (Ok(_), Ok(Err(e))) => Err(Error::io(
            format!("NBD connection from {peer}: writing replies"),
            e,
        )),
        (Ok(_), Err(join)) => Err(Error::io(
            format!("NBD connection from {peer}: reply writer failed"),
            io::Error::other(join.to_string()),
        )),
    }
}

/// Read a WRITE payload of `len` bytes into `buf` (empty, with room for them), never
/// zero-filling it first.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
) -> io::Result<()> {
    while buf.len() < len {
        let rest = len - buf.len();
        // `take` keeps `read_buf` from reading past the payload into `buf`'s spare capacity.
        if (&mut *reader).take(rest as u64).read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Payload buffers of finished requests, kept for the next ones of this connection. A READ needs
/// initialised memory to read into, and zero-filling a fresh 1 MiB buffer costs more than the
/// read itself; a reused buffer is already initialised. Whatever it held is overwritten before
/// it is sent, and a pool never outlives its connection, so no bytes reach another client.
/// Bounded by `POOL_BYTES`.
#[derive(Default)]
struct BufferPool {
    free: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl BufferPool {
    /// A kept buffer with room for `len` bytes, if there is one.
    fn take(&self, len: usize) -> Option<Vec<u8>> {
        if len < POOLED_MIN {
            return None;
        }
        let mut free = self.free.lock();
        let i = free.0.iter().rposition(|b| b.capacity() >= len)?;
        let buf = free.0.swap_remove(i);
        free.1 -= buf.capacity();
        Some(buf)
    }

    /// An empty buffer with room for `len` bytes.
    fn take_empty(&self, len: usize) -> Vec<u8> {
        match self.take(len) {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(len),
        }
    }

    /// A buffer of `len` initialised bytes with unspecified contents, for the caller to
    /// overwrite entirely before anyone sees them.
    fn take_filled(&self, len: usize) -> Vec<u8> {
        match self.take(len) {
            // Zeroes only what the buffer's last user did not initialise.
            Some(mut buf) => {
                buf.resize(len, 0);
                buf
            }
            None => vec![0u8; len],
        }
    }

    fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if !(POOLED_MIN..=POOLED_MAX).contains(&cap) {
            return;
        }
        let mut free = self.free.lock();
        if free.1 + cap <= POOL_BYTES {
            free.0.push(buf);
            free.1 += cap;
        }
    }
}

/// Cuts the writer task when the connection is dropped (e.g. by the server's shutdown grace
/// timeout), so a client that stopped reading cannot keep it, and its socket, alive.
struct AbortOnDrop(tokio::task::JoinHandle<io::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `shutdown` turns true. A dropped sender means nobody can ever ask for a
/// shutdown, so then it never resolves.
pub(crate) async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let sender_gone = shutdown.wait_for(|s| *s).await.is_err();
    if sender_gone {
        std::future::pending::<()>().await;
    }
}

/// Write replies in completion order; flush only when no other reply is ready, so a burst of
/// small replies leaves in one syscall and a lone reply leaves at once.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Reply>,
    pool: Arc<BufferPool>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(mut reply) = next {
            reply.write_to(&mut w).await?;
            pool.give(std::mem::take(&mut reply.data));
            // Dropping the reply here releases its request and byte permits.
            drop(reply);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// A request refused before it runs.
struct Rejection {
    errno: u32,
    message: String,
}

fn reject(errno: u32, message: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        message: message.into(),
    }
}

/// What every request task of one connection shares.
struct Connection {
    export: ExportLease,
    size: u64,
    read_only: bool,
    structured: bool,
    contexts: Vec<(u32, MetaContext)>,
    enforce_alignment: bool,
    pool: Arc<BufferPool>,
}

impl Connection {
    fn new(s: Session) -> Connection {
        Connection {
            size: s.export.size(),
            read_only: s.export.read_only(),
            structured: s.structured,
            contexts: s.contexts,
            enforce_alignment: s.block_size_agreed,
            export: s.export,
            pool: Arc::default(),
        }
    }

    fn volume(&self) -> &Volume {
        &self.export
    }

    /// Validate a request against the spec and what was negotiated, in the order the errors
    /// matter to a client: unknown command or flag, missing negotiation, permission, range,
    /// alignment.
    fn check(&self, r: &Request) -> Result<(), Rejection> {
        let name = command_name(r.kind);
        let allowed = match r.kind {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Err(reject(EINVAL, format!("unknown command {}", r.kind))),
        };
        if r.flags & !allowed != 0 {
            return Err(reject(
                EINVAL,
                format!(
                    "flags {:#x} are not valid on {name} here",
                    r.flags & !allowed
                ),
            ));
        }
        if r.kind == CMD_BLOCK_STATUS {
            if !self.structured {
                return Err(reject(EINVAL, "BLOCK_STATUS needs structured replies"));
            }
            if self.contexts.is_empty() {
                return Err(reject(
                    EINVAL,
                    "BLOCK_STATUS needs a metadata context selected with NBD_OPT_SET_META_CONTEXT",
                ));
            }
        }
        let modifies = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if modifies && self.read_only {
            return Err(reject(
                EPERM,
                format!("{name} on read-only export '{}'", self.volume().name()),
            ));
        }
        if r.kind == CMD_FLUSH {
            // Offset and length are reserved; there is nothing else to check.
            return Ok(());
        }
        if r.length == 0 {
            return Err(reject(EINVAL, format!("{name} with length 0")));
        }
        if matches!(r.kind, CMD_READ | CMD_WRITE) && r.length > MAX_PAYLOAD {
            // EOVERFLOW is reserved for a DF read we cannot send unfragmented.
            let errno = if r.flags & CMD_FLAG_DF != 0 {
                EOVERFLOW
            } else {
                EINVAL
            };
            return Err(reject(
                errno,
                format!(
                    "{name} of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                    r.length
                ),
            ));
        }
        let past_end = r
            .offset
            .checked_add(r.length as u64)
            .is_none_or(|end| end > self.size);
        if past_end {
            // ENOSPC for writes and zeroes, EINVAL for everything else, as the spec asks.
            let errno = if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err(reject(
                errno,
                format!(
                    "{name} at offset {} length {} is beyond the end of the export ({} bytes)",
                    r.offset, r.length, self.size
                ),
            ));
        }
        if self.enforce_alignment {
            let min = MIN_BLOCK as u64;
            if !r.offset.is_multiple_of(min) || !(r.length as u64).is_multiple_of(min) {
                return Err(reject(
                    EINVAL,
                    format!("{name} at offset {} length {} is not aligned to the {min}-byte minimum block size", r.offset, r.length),
                ));
            }
        }
        Ok(())
    }

    /// Run a validated request. Never panics out: a panicking volume call becomes EIO, so the
    /// client gets an answer instead of waiting forever on its cookie.
    fn execute(&self, r: &Request, payload: &[u8]) -> Reply {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.run(r, payload))) {
            Ok(reply) => reply,
            Err(_) => self.error_reply(r, EIO, "internal error in the volume service"),
        }
    }

    fn run(&self, r: &Request, payload: &[u8]) -> Reply {
        let volume = self.volume();
        let fua = r.flags & CMD_FLAG_FUA != 0;
        let (offset, length) = (r.offset, r.length as u64);
        let result = match r.kind {
            CMD_READ => return self.read(r),
            CMD_BLOCK_STATUS => return self.block_status(r),
            CMD_WRITE => volume.write_at(offset, payload, fua),
            CMD_FLUSH => volume.flush(),
            CMD_TRIM => match volume.trim(offset, length, fua) {
                // TRIM is a hint: a volume that cannot discard has still done its duty.
                Err(Error::NotSupported(_)) => Ok(()),
                other => other,
            },
            CMD_WRITE_ZEROES => volume.write_zeroes(
                offset,
                length,
                ZeroFlags {
                    may_trim: r.flags & CMD_FLAG_NO_HOLE == 0,
                    fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                },
            ),
            // A hint we have no use for: the page cache already does what CACHE asks.
            CMD_CACHE => Ok(()),
            _ => unreachable!("check() admits only known commands"),
        };
        match result {
            Ok(()) => Reply::simple(r.cookie, 0),
            Err(e) => self.volume_error(r, &e),
        }
    }

    /// Reply for a failed volume call, with the wire errno the spec allows for this command.
    fn volume_error(&self, r: &Request, e: &Error) -> Reply {
        let mut errno = e.nbd_errno();
        let fast_zero = r.kind == CMD_WRITE_ZEROES && r.flags & CMD_FLAG_FAST_ZERO != 0;
        if errno == ENOTSUP && !fast_zero {
            // ENOTSUP is only defined as the answer to a fast zero a server can't do fast.
            errno = EIO;
        }
        self.error_reply(r, errno, &e.to_string())
    }

    /// An error reply: a structured error chunk when negotiated (it carries the message), else
    /// a simple reply with just the errno.
    fn error_reply(&self, r: &Request, errno: u32, message: &str) -> Reply {
        if !self.structured {
            return Reply::simple(r.cookie, errno);
        }
        let mut reply = Reply::default();
        reply.error_chunk(r.cookie, errno, message);
        reply
    }

    fn read(&self, r: &Request) -> Reply {
        let volume = self.volume();
        let (offset, length) = (r.offset, r.length as usize);
        if !self.structured || r.flags & CMD_FLAG_DF != 0 {
            let mut data = self.pool.take_filled(length);
            if let Err(e) = volume.read_at(offset, &mut data) {
                return self.volume_error(r, &e);
            }
            return if self.structured {
                Reply::one_data_chunk(r.cookie, offset, data)
            } else {
                Reply::simple_data(r.cookie, data)
            };
        }

        // Structured: zero runs go out as OFFSET_HOLE chunks and are never read.
        let runs = read_runs(volume, offset, length as u64);
        if let [(_, false)] = runs.as_slice() {
            let mut data = self.pool.take_filled(length);
            if let Err(e) = volume.read_at(offset, &mut data) {
                return self.volume_error(r, &e);
            }
            return Reply::one_data_chunk(r.cookie, offset, data);
        }
        let data_len: u64 = runs
            .iter()
            .filter(|(_, zero)| !zero)
            .map(|(range, _)| range.end - range.start)
            .sum();
        let mut reply = Reply {
            data: self.pool.take_filled(data_len as usize),
            ..Reply::default()
        };
        let mut at = 0usize;
        let last = runs.len() - 1;
        for (i, (range, zero)) in runs.into_iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let len = (range.end - range.start) as usize;
            if zero {
                reply.meta_chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, r.cookie, OFFSET_HOLE_LEN);
                reply.push_meta(&range.start.to_be_bytes());
                reply.push_meta(&(len as u32).to_be_bytes());
            } else {
                if let Err(e) = volume.read_at(range.start, &mut reply.data[at..at + len]) {
                    // Nothing has been sent yet, so a lone error chunk is a complete answer.
                    return self.volume_error(r, &e);
                }
                reply.meta_chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    r.cookie,
                    OFFSET_DATA_HEADER_LEN + len as u32,
                );
                reply.push_meta(&range.start.to_be_bytes());
                reply.push_data(at..at + len);
                at += len;
            }
        }
        reply
    }

    fn block_status(&self, r: &Request) -> Reply {
        let volume = self.volume();
        let req_one = r.flags & CMD_FLAG_REQ_ONE != 0;
        let mut reply = Reply::default();
        let last = self.contexts.len() - 1;
        for (i, (id, context)) in self.contexts.iter().enumerate() {
            let extents = match context {
                MetaContext::Allocation => volume.allocation(r.offset, r.length as u64),
                MetaContext::DirtyBitmap(which) => {
                    volume.dirty_status(*which, r.offset, r.length as u64)
                }
            };
            let extents = match extents {
                Ok(e) => e,
                // Drop the chunks built so far: one error chunk answers the whole request.
                Err(e) => return self.volume_error(r, &e),
            };
            let descriptors = descriptors(&extents, r.length, req_one);
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let len = BLOCK_STATUS_HEADER_LEN + BLOCK_DESCRIPTOR_LEN * descriptors.len() as u32;
            reply.meta_chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, r.cookie, len);
            reply.push_meta(&id.to_be_bytes());
            for (length, status) in descriptors {
                reply.push_meta(&length.to_be_bytes());
                reply.push_meta(&status.to_be_bytes());
            }
        }
        reply
    }
}

/// Split `[offset, offset+length)` into maximal runs that read as zeroes (`true`) or must be
/// read (`false`). A failing or short allocation answer just means "read it": holes are an
/// optimisation, never a correctness question.
fn read_runs(volume: &Volume, offset: u64, length: u64) -> Vec<(Range<u64>, bool)> {
    let end = offset + length;
    let mut runs: Vec<(Range<u64>, bool)> = Vec::new();
    let push = |runs: &mut Vec<(Range<u64>, bool)>, start: u64, stop: u64, zero: bool| match runs
        .last_mut()
    {
        Some((last, z)) if *z == zero && last.end == start => last.end = stop,
        _ => runs.push((start..stop, zero)),
    };
    let mut pos = offset;
    while pos < end {
        let extents = volume.allocation(pos, end - pos).unwrap_or_default();
        let before = pos;
        for e in extents {
            let stop = pos.saturating_add(e.length).min(end);
            if stop <= pos {
                continue;
            }
            push(&mut runs, pos, stop, e.flags & STATE_ZERO != 0);
            pos = stop;
        }
        if pos == before {
            push(&mut runs, pos, end, false);
            pos = end;
        }
    }
    runs
}

/// Block-status descriptors from a volume's extents: merged where the status repeats, never
/// zero-length, never reaching past the request, exactly one with REQ_ONE, and at least one
/// always (status 0 claims nothing, which the spec allows for any block).
fn descriptors(extents: &[StatusExtent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = length as u64;
    for e in extents {
        if left == 0 {
            break;
        }
        let len = e.length.min(left);
        if len == 0 {
            continue;
        }
        left -= len;
        match out.last_mut() {
            Some((l, f)) if *f == e.flags => *l += len as u32,
            _ => out.push((len as u32, e.flags)),
        }
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// One request's complete reply: header and small fields in `meta`, READ data in `data`, and
/// `pieces` saying how they interleave (empty: all of `meta`, then all of `data`). The budget
/// permits ride along so memory is counted until the bytes are on the socket.
#[derive(Default)]
struct Reply {
    meta: Vec<u8>,
    data: Vec<u8>,
    pieces: Vec<Piece>,
    budget: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
}

#[derive(Clone)]
enum Piece {
    Meta(Range<usize>),
    Data(Range<usize>),
}

impl Reply {
    fn simple(cookie: u64, errno: u32) -> Reply {
        Reply {
            meta: simple_reply_header(errno, cookie).to_vec(),
            ..Reply::default()
        }
    }

    fn simple_data(cookie: u64, data: Vec<u8>) -> Reply {
        Reply {
            meta: simple_reply_header(0, cookie).to_vec(),
            data,
            ..Reply::default()
        }
    }

    /// The whole READ as one OFFSET_DATA chunk, final: the data is already in memory, so no
    /// error can follow it.
    fn one_data_chunk(cookie: u64, offset: u64, data: Vec<u8>) -> Reply {
        let len = OFFSET_DATA_HEADER_LEN + data.len() as u32;
        let mut meta = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 8);
        meta.extend_from_slice(&structured_reply_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            len,
        ));
        meta.extend_from_slice(&offset.to_be_bytes());
        Reply {
            meta,
            data,
            ..Reply::default()
        }
    }

    fn with_budget(
        mut self,
        request: OwnedSemaphorePermit,
        bytes: Option<OwnedSemaphorePermit>,
    ) -> Reply {
        self.budget = Some((request, bytes));
        self
    }

    fn error_chunk(&mut self, cookie: u64, errno: u32, message: &str) {
        let mut end = message.len().min(MAX_ERROR_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message.as_bytes()[..end];
        let len = ERROR_CHUNK_HEADER_LEN + message.len() as u32;
        self.meta_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len);
        self.push_meta(&errno.to_be_bytes());
        self.push_meta(&(message.len() as u16).to_be_bytes());
        self.push_meta(message);
    }

    fn meta_chunk_header(&mut self, flags: u16, kind: u16, cookie: u64, length: u32) {
        self.push_meta(&structured_reply_header(flags, kind, cookie, length));
    }

    fn push_meta(&mut self, bytes: &[u8]) {
        let start = self.meta.len();
        self.meta.extend_from_slice(bytes);
        match self.pieces.last_mut() {
            Some(Piece::Meta(r)) if r.end == start => r.end = self.meta.len(),
            _ => self.pieces.push(Piece::Meta(start..self.meta.len())),
        }
    }

    fn push_data(&mut self, range: Range<usize>) {
        self.pieces.push(Piece::Data(range));
    }

    async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> io::Result<()> {
        if self.pieces.is_empty() {
            w.write_all(&self.meta).await?;
            return w.write_all(&self.data).await;
        }
        for piece in &self.pieces {
            match piece {
                Piece::Meta(r) => w.write_all(&self.meta[r.clone()]).await?,
                Piece::Data(r) => w.write_all(&self.data[r.clone()]).await?,
            }
        }
        Ok(())
    }

    /// The bytes as they go on the wire (tests).
    #[cfg(test)]
    fn wire(&self) -> Vec<u8> {
        let mut v = Vec::new();
        block_on(self.write_to(&mut v)).unwrap();
        v
    }
}

#[cfg(test)]
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_merge_clamp_and_never_come_back_empty() {
        let e = |length, flags| StatusExtent { length, flags };
        let got = descriptors(
            &[e(4096, 0), e(4096, 0), e(8192, 3), e(1 << 40, 0)],
            20480,
            false,
        );
        assert_eq!(got, vec![(8192, 0), (8192, 3), (4096, 0)]);
        assert_eq!(
            descriptors(&[e(4096, 3), e(4096, 0)], 8192, true),
            vec![(4096, 3)]
        );
        assert_eq!(
            descriptors(&[e(1 << 33, 1)], u32::MAX, true),
            vec![(u32::MAX, 1)]
        );
        assert_eq!(descriptors(&[], 4096, false), vec![(4096, 0)]);
        assert_eq!(descriptors(&[e(0, 1)], 512, false), vec![(512, 0)]);
    }

    #[test]
    fn simple_and_single_chunk_replies_are_laid_out_per_spec() {
        let w = Reply::simple_data(9, vec![1, 2, 3]).wire();
        assert_eq!(&w[..16], &simple_reply_header(0, 9));
        assert_eq!(&w[16..], &[1, 2, 3]);

        let w = Reply::one_data_chunk(7, 4096, vec![0xab; 5]).wire();
        assert_eq!(
            &w[..20],
            &structured_reply_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 13)
        );
        assert_eq!(&w[20..28], &4096u64.to_be_bytes());
        assert_eq!(&w[28..], &[0xab; 5]);
    }

    #[test]
    fn error_chunk_carries_errno_and_clipped_message() {
        let mut r = Reply::default();
        let long = "x".repeat(5000);
        r.error_chunk(3, ENOSPC, &long);
        let w = r.wire();
        let len = u32::from_be_bytes(w[16..20].try_into().unwrap()) as usize;
        assert_eq!(
            u16::from_be_bytes(w[6..8].try_into().unwrap()),
            REPLY_TYPE_ERROR
        );
        assert_eq!(u32::from_be_bytes(w[20..24].try_into().unwrap()), ENOSPC);
        assert_eq!(
            u16::from_be_bytes(w[24..26].try_into().unwrap()) as usize,
            MAX_ERROR_MESSAGE
        );
        assert_eq!(len, 6 + MAX_ERROR_MESSAGE);
        assert_eq!(w.len(), 20 + len);
    }

    #[test]
    fn interleaved_pieces_keep_their_order() {
        let mut r = Reply {
            data: vec![1, 2, 3, 4],
            ..Reply::default()
        };
        r.push_meta(b"ab");
        r.push_data(0..2);
        r.push_meta(b"c");
        r.push_meta(b"d");
        r.push_data(2..4);
        assert_eq!(r.wire(), b"ab\x01\x02cd\x03\x04");
    }

    #[test]
    fn payloads_arrive_whole_and_in_stream_order() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let next = [3u8; REQUEST_HEADER_LEN];
        let mut stream = big.clone();
        stream.extend_from_slice(&next);
        stream.extend_from_slice(&big[..1000]);
        block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let feed = tokio::spawn(async move {
                for piece in stream.chunks(7001) {
                    client.write_all(piece).await.unwrap();
                }
            });
            let mut r = tokio::io::BufReader::with_capacity(50_000, server);
            let mut payload = BufferPool::default().take_empty(big.len());
            read_payload(&mut r, &mut payload, big.len()).await.unwrap();
            assert!(payload == big, "payload differs");
            let mut header = [0u8; REQUEST_HEADER_LEN];
            r.read_exact(&mut header).await.unwrap();
            assert_eq!(header, next);
            // The client stops 1000 bytes into a 300000-byte payload.
            let mut payload = Vec::with_capacity(big.len());
            feed.await.unwrap();
            let e = read_payload(&mut r, &mut payload, big.len())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    #[test]
    fn buffer_pool_reuses_large_buffers_within_its_bound() {
        let pool = BufferPool::default();
        let mib = 1 << 20;
        let mut a = pool.take_empty(mib);
        a.extend_from_slice(&vec![7u8; mib]);
        let at = a.as_ptr();
        pool.give(a);
        // A reused buffer keeps its (initialised) bytes and is cut or grown to the length asked.
        let b = pool.take_filled(mib / 2);
        assert_eq!((b.as_ptr(), b.len()), (at, mib / 2));
        pool.give(b);
        let c = pool.take_filled(mib);
        assert_eq!((c.as_ptr(), c.len()), (at, mib));
        assert!(c[..mib / 2].iter().all(|&x| x == 7) && c[mib / 2..].iter().all(|&x| x == 0));
        // Small buffers are not kept, nor more than POOL_BYTES in all.
        pool.give(vec![0u8; 4096]);
        for _ in 0..POOL_BYTES / mib + 4 {
            pool.give(vec![0u8; mib]);
        }
        pool.give(c);
        let free = pool.free.lock();
        assert!(free.1 <= POOL_BYTES && free.0.iter().all(|b| b.capacity() >= POOLED_MIN));
        assert_eq!(free.1, free.0.iter().map(Vec::capacity).sum::<usize>());
    }
}
