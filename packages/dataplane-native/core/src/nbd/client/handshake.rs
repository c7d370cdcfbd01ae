//! Client handshake: the greeting, then option haggling (structured replies, meta contexts, GO or
//! LIST), ending either in transmission or in a soft disconnect.
//!
//! Owns every byte exchanged before transmission. It must never trust a length from the server
//! without bounding it first, and it never guesses: anything the spec does not allow is an error
//! that names the server and what it sent.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{BlockSize, ExportEntry, MetaContext};
use crate::error::{Error, Result};
use crate::nbd::proto;

/// Most metadata contexts we keep from one SET_META_CONTEXT; a server sending more is broken.
const MAX_CONTEXTS: usize = 256;
/// Most exports we keep from one OPT_LIST.
const MAX_EXPORTS: usize = 65_536;

/// What the handshake agreed on.
#[derive(Debug)]
pub(super) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    /// `None` when the server sent no NBD_INFO_BLOCK_SIZE (or we fell back to EXPORT_NAME).
    pub block_size: Option<BlockSize>,
    pub structured: bool,
    pub contexts: Vec<MetaContext>,
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

/// The option haggling state: one stream, the peer's name for messages.
struct Haggle<'a, S> {
    s: &'a mut S,
    peer: &'a str,
}

fn io_err(peer: &str, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("NBD handshake with {peer}: {what}");
    move |e| Error::io(context, e)
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Haggle<'a, S> {
    fn protocol(&self, why: impl Into<String>) -> Error {
        Error::Protocol {
            peer: self.peer.to_string(),
            why: why.into(),
        }
    }

    /// Read the greeting and answer with our flags. Returns whether NO_ZEROES is in force.
    async fn greet(&mut self) -> Result<bool> {
        let mut b = [0u8; 18];
        self.s
            .read_exact(&mut b[..16])
            .await
            .map_err(io_err(self.peer, "reading the greeting"))?;
        let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
        if magic != proto::NBDMAGIC {
            return Err(self.protocol(format!(
                "greeting starts with 0x{magic:016x}, not NBDMAGIC: this is not an NBD server"
            )));
        }
        match u64::from_be_bytes(b[8..16].try_into().unwrap()) {
            proto::IHAVEOPT => {}
            proto::CLISERV_MAGIC => {
                return Err(Error::Refused {
                    peer: self.peer.to_string(),
                    what: "newstyle negotiation".into(),
                    why: "it speaks only the oldstyle protocol (no export names, no options); \
                          serve the export with a newstyle server such as qemu-nbd or nbdkit"
                        .into(),
                })
            }
            other => {
                return Err(self.protocol(format!("unknown greeting magic 0x{other:016x}")));
            }
        }
        self.s
            .read_exact(&mut b[16..18])
            .await
            .map_err(io_err(self.peer, "reading the greeting"))?;
        let hflags = u16::from_be_bytes([b[16], b[17]]);
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::Refused {
                peer: self.peer.to_string(),
                what: "fixed newstyle negotiation".into(),
                why: format!(
                    "handshake flags 0x{hflags:04x} lack NBD_FLAG_FIXED_NEWSTYLE, so options such \
                     as structured replies and OPT_GO cannot be negotiated; upgrade the server \
                     (qemu-nbd, nbdkit and nbd-server >= 3.10 all support it)"
                ),
            });
        }
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::CLIENT_NO_ZEROES;
        }
        self.s
            .write_all(&cflags.to_be_bytes())
            .await
            .map_err(io_err(self.peer, "sending client flags"))?;
        Ok(no_zeroes)
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l <= proto::MAX_OPTION_LEN)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} payload of {} bytes exceeds the {}-byte option limit; request fewer or \
                     shorter names",
                    proto::option_name(option),
                    data.len(),
                    proto::MAX_OPTION_LEN
                ))
            })?;
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        let what = format!("sending {}", proto::option_name(option));
        self.s
            .write_all(&msg)
            .await
            .map_err(io_err(self.peer, &what))?;
        self.s.flush().await.map_err(io_err(self.peer, &what))
    }

    async fn read_reply(&mut self, option: u32) -> Result<OptionReply> {
        let what = format!("reading the reply to {}", proto::option_name(option));
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.s
            .read_exact(&mut h)
            .await
            .map_err(io_err(self.peer, &what))?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let echoed = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        if magic != proto::OPT_REPLY_MAGIC {
            return Err(self.protocol(format!("option reply with bad magic 0x{magic:016x}")));
        }
        if echoed != option {
            return Err(self.protocol(format!(
                "reply names option {echoed} but we sent {} ({option})",
                proto::option_name(option)
            )));
        }
        if len > proto::MAX_OPTION_LEN {
            return Err(self.protocol(format!(
                "{} reply of {len} bytes exceeds the {}-byte limit",
                proto::option_name(option),
                proto::MAX_OPTION_LEN
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.s
            .read_exact(&mut data)
            .await
            .map_err(io_err(self.peer, &what))?;
        Ok(OptionReply { kind, data })
    }

    /// Turn an error reply into an error, quoting the server's message.
    fn refused(&self, option: u32, detail: &str, reply: &OptionReply) -> Error {
        let msg = String::from_utf8_lossy(&reply.data);
        let mut why = proto::option_error_name(reply.kind).to_string();
        if reply.kind & proto::REP_FLAG_ERROR == 0 {
            why = format!("unexpected reply type {}", reply.kind);
        }
        if !msg.is_empty() {
            why = format!("{why}: {msg}");
        }
        Error::Refused {
            peer: self.peer.to_string(),
            what: format!("{}{detail}", proto::option_name(option)),
            why,
        }
    }

    /// NBD_OPT_STRUCTURED_REPLY. `false` when the server does not offer it.
    async fn structured_reply(&mut self) -> Result<bool> {
        self.send_option(proto::OPT_STRUCTURED_REPLY, &[]).await?;
        let r = self.read_reply(proto::OPT_STRUCTURED_REPLY).await?;
        match r.kind {
            proto::REP_ACK if r.data.is_empty() => Ok(true),
            proto::REP_ACK => Err(self.protocol("NBD_REP_ACK with a payload")),
            proto::REP_ERR_SHUTDOWN => Err(self.refused(proto::OPT_STRUCTURED_REPLY, "", &r)),
            k if k & proto::REP_FLAG_ERROR != 0 => Ok(false),
            k => Err(self.protocol(format!(
                "unexpected reply type {k} to NBD_OPT_STRUCTURED_REPLY"
            ))),
        }
    }

    /// NBD_OPT_SET_META_CONTEXT: the contexts the server selected, with their ids.
    async fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<MetaContext>> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            if q.is_empty() || q.len() > proto::MAX_STRING_LEN as usize || !q.contains(':') {
                return Err(Error::InvalidArgument(format!(
                    "meta context '{q}': expected NAMESPACE:NAME of at most {} bytes, e.g. {} or \
                     {}bm0",
                    proto::MAX_STRING_LEN,
                    proto::META_BASE_ALLOCATION,
                    proto::META_DIRTY_BITMAP_PREFIX
                )));
            }
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        self.send_option(proto::OPT_SET_META_CONTEXT, &data).await?;
        let mut granted: Vec<MetaContext> = Vec::new();
        loop {
            let r = self.read_reply(proto::OPT_SET_META_CONTEXT).await?;
            match r.kind {
                proto::REP_META_CONTEXT => {
                    if r.data.len() < 5 {
                        return Err(self.protocol(format!(
                            "NBD_REP_META_CONTEXT of {} bytes is too short for an id and a name",
                            r.data.len()
                        )));
                    }
                    let id = u32::from_be_bytes(r.data[0..4].try_into().unwrap());
                    let name = String::from_utf8(r.data[4..].to_vec())
                        .map_err(|_| self.protocol("meta context name is not UTF-8"))?;
                    if name.len() > proto::MAX_STRING_LEN as usize {
                        return Err(self.protocol("meta context name longer than 4096 bytes"));
                    }
                    if granted.iter().any(|c| c.id == id || c.name == name) {
                        return Err(self.protocol(format!(
                            "meta context '{name}' (id {id}) granted twice or with a duplicate id"
                        )));
                    }
                    if granted.len() >= MAX_CONTEXTS {
                        return Err(
                            self.protocol(format!("more than {MAX_CONTEXTS} meta contexts"))
                        );
                    }
                    granted.push(MetaContext { id, name });
                }
                proto::REP_ACK => return Ok(granted),
                proto::REP_ERR_UNSUP => return Ok(Vec::new()),
                _ => {
                    let detail = format!(" for {queries:?} on export '{export}'");
                    return Err(self.refused(proto::OPT_SET_META_CONTEXT, &detail, &r));
                }
            }
        }
    }

    /// NBD_OPT_GO asking for block sizes. `Ok(None)` when the server does not know OPT_GO.
    async fn go(&mut self, export: &str) -> Result<Option<(u64, u16, Option<BlockSize>)>> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(proto::OPT_GO, &data).await?;
        let mut export_info = None;
        let mut block = None;
        loop {
            let r = self.read_reply(proto::OPT_GO).await?;
            match r.kind {
                proto::REP_INFO => {
                    if r.data.len() < 2 {
                        return Err(self.protocol("NBD_REP_INFO without an information type"));
                    }
                    let info = u16::from_be_bytes([r.data[0], r.data[1]]);
                    match info {
                        proto::INFO_EXPORT => {
                            if r.data.len() != proto::INFO_EXPORT_LEN as usize {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_EXPORT of {} bytes, expected {}",
                                    r.data.len(),
                                    proto::INFO_EXPORT_LEN
                                )));
                            }
                            let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                            let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                            export_info = Some((size, flags));
                        }
                        proto::INFO_BLOCK_SIZE => {
                            if r.data.len() != proto::INFO_BLOCK_SIZE_LEN as usize {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected {}",
                                    r.data.len(),
                                    proto::INFO_BLOCK_SIZE_LEN
                                )));
                            }
                            let word =
                                |i: usize| u32::from_be_bytes(r.data[i..i + 4].try_into().unwrap());
                            let b = BlockSize {
                                min: word(2),
                                preferred: word(6),
                                max: word(10),
                            };
                            self.check_block_size(&b)?;
                            block = Some(b);
                        }
                        // Name, description and types we did not ask for: ignored, as required.
                        _ => {}
                    }
                }
                proto::REP_ACK => {
                    if !r.data.is_empty() {
                        return Err(self.protocol("NBD_REP_ACK with a payload"));
                    }
                    let (size, flags) = export_info.ok_or_else(|| {
                        self.protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                    })?;
                    return Ok(Some((size, flags, block)));
                }
                proto::REP_ERR_UNSUP => return Ok(None),
                _ => {
                    return Err(self.refused(proto::OPT_GO, &format!(" for export '{export}'"), &r))
                }
            }
        }
    }

    /// The spec's constraints on advertised block sizes; we rely on them for alignment.
    fn check_block_size(&self, b: &BlockSize) -> Result<()> {
        let ok = b.min.is_power_of_two()
            && b.min <= proto::MAX_MIN_BLOCK
            && b.preferred.is_power_of_two()
            && b.preferred >= b.min
            && (b.max == proto::BLOCK_SIZE_UNLIMITED || (b.max >= b.min && b.max % b.min == 0));
        if ok {
            Ok(())
        } else {
            Err(self.protocol(format!(
                "invalid block sizes: minimum {} (must be a power of 2 <= 64 KiB), preferred {} \
                 (power of 2 >= minimum), maximum {} (multiple of minimum)",
                b.min, b.preferred, b.max
            )))
        }
    }

    /// NBD_OPT_EXPORT_NAME, for servers without OPT_GO. The server drops the connection when it
    /// does not like the name.
    async fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(u64, u16)> {
        self.send_option(proto::OPT_EXPORT_NAME, export.as_bytes())
            .await?;
        let mut b = [0u8; proto::EXPORT_NAME_REPLY_LEN + proto::EXPORT_NAME_REPLY_ZEROES];
        let n = if no_zeroes {
            proto::EXPORT_NAME_REPLY_LEN
        } else {
            b.len()
        };
        self.s.read_exact(&mut b[..n]).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Refused {
                    peer: self.peer.to_string(),
                    what: format!("export '{export}'"),
                    why: "it closed the connection after NBD_OPT_EXPORT_NAME (unknown export?)"
                        .into(),
                }
            } else {
                io_err(self.peer, "reading the NBD_OPT_EXPORT_NAME reply")(e)
            }
        })?;
        Ok((
            u64::from_be_bytes(b[0..8].try_into().unwrap()),
            u16::from_be_bytes([b[8], b[9]]),
        ))
    }

    /// Soft disconnect during haggling. The session ends here whatever the server does: the spec
    /// lets it close without replying (nbd-server resets the connection), so neither a missing
    /// nor a garbled reply changes the outcome the caller already has.
    async fn abort(&mut self) {
        if self.send_option(proto::OPT_ABORT, &[]).await.is_ok() {
            let _ = self.read_reply(proto::OPT_ABORT).await;
        }
    }
}

/// Greeting and option haggling up to transmission on `export`.
pub(super) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    peer: &str,
    export: &str,
    meta_contexts: &[&str],
) -> Result<Negotiated> {
    if export.len() > proto::MAX_STRING_LEN as usize {
        return Err(Error::InvalidArgument(format!(
            "export name of {} bytes exceeds NBD's {}-byte limit",
            export.len(),
            proto::MAX_STRING_LEN
        )));
    }
    let mut h = Haggle { s, peer };
    let no_zeroes = h.greet().await?;
    let r = haggle(&mut h, export, meta_contexts, no_zeroes).await;
    if let Err(Error::Refused { .. }) = &r {
        // The server said no but is still talking: end politely (a soft disconnect).
        h.abort().await;
    }
    r
}

async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    h: &mut Haggle<'_, S>,
    export: &str,
    meta_contexts: &[&str],
    no_zeroes: bool,
) -> Result<Negotiated> {
    let structured = h.structured_reply().await?;
    // Meta contexts ride on structured replies; without them there is nothing to ask for.
    let contexts = if structured && !meta_contexts.is_empty() {
        h.set_meta_context(export, meta_contexts).await?
    } else {
        Vec::new()
    };
    let (size, flags, block_size) = match h.go(export).await? {
        Some(v) => v,
        None => {
            let (size, flags) = h.export_name(export, no_zeroes).await?;
            (size, flags, None)
        }
    };
    if flags & proto::TFLAG_HAS_FLAGS == 0 {
        return Err(h.protocol(format!(
            "transmission flags 0x{flags:04x} lack NBD_FLAG_HAS_FLAGS"
        )));
    }
    Ok(Negotiated {
        size,
        flags,
        block_size,
        structured,
        contexts,
    })
}

/// Greeting, NBD_OPT_LIST, then a soft disconnect.
pub(super) async fn list<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    peer: &str,
) -> Result<Vec<ExportEntry>> {
    let mut h = Haggle { s, peer };
    h.greet().await?;
    h.send_option(proto::OPT_LIST, &[]).await?;
    let mut exports = Vec::new();
    loop {
        let r = h.read_reply(proto::OPT_LIST).await?;
        match r.kind {
            proto::REP_SERVER => {
                if r.data.len() < 4 {
                    return Err(h.protocol("NBD_REP_SERVER shorter than its name length"));
                }
                let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
                if n > r.data.len() - 4 {
                    return Err(h.protocol(format!(
                        "NBD_REP_SERVER name length {n} exceeds the reply's {} bytes",
                        r.data.len() - 4
                    )));
                }
                let name = String::from_utf8(r.data[4..4 + n].to_vec())
                    .map_err(|_| h.protocol("export name is not UTF-8"))?;
                let description = String::from_utf8_lossy(&r.data[4 + n..]).into_owned();
                if exports.len() >= MAX_EXPORTS {
                    return Err(h.protocol(format!("more than {MAX_EXPORTS} exports listed")));
                }
                exports.push(ExportEntry { name, description });
            }
            proto::REP_ACK => break,
            _ => {
                let e = h.refused(proto::OPT_LIST, "", &r);
                h.abort().await;
                return Err(e);
            }
        }
    }
    h.abort().await;
    Ok(exports)
}
