//! NBD server handshake: the fixed-newstyle greeting and option haggling, up to the moment the
//! client enters transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! It owns what a connection agrees on — export, structured replies, metadata contexts, block
//! size constraints, transmission flags — and hands that over as a [`Session`]. It must never
//! touch a volume's data, and it must keep parsing after any option it refuses: only a broken
//! stream (bad magic, unknown client flags, an `NBD_OPT_EXPORT_NAME` it cannot satisfy) ends the
//! connection, because the spec forbids a server to hang up on a client that merely asked for
//! something it does not offer.

use crate::error::{Error, Result};
use crate::nbd::meta_context::{self, MetaContext, QueryMode};
use crate::nbd::proto::*;
use crate::registry::{ExportLease, Registry};
use crate::size::format_size;
use crate::volume::Volume;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most metadata-context queries one option may carry. Every query costs a scan of the export's
/// contexts, so this bounds the work a single option can cause.
const MAX_META_QUERIES: u32 = 128;
/// Largest preferred block size we advertise: bigger requests gain nothing on a page-cached file,
/// and clients size their buffers after it.
const MAX_PREFERRED_BLOCK: u64 = 2 * 1024 * 1024;

/// What option haggling agreed on; the transmission phase runs on it.
pub struct Session {
    /// The export, leased for as long as the connection is in transmission.
    pub export: ExportLease,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// Contexts selected for this export, with the ids the client was given.
    pub contexts: Vec<(u32, MetaContext)>,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`, so it promised to honour our
    /// constraints and we may refuse unaligned requests.
    pub block_size_agreed: bool,
}

/// Greet the client and haggle options. `Ok(None)`: the client left (`NBD_OPT_ABORT` or a
/// close between options) without entering transmission.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    registry: &Registry,
    peer: &str,
) -> Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io_err =
        |what: &str, e: io::Error| Error::io(format!("NBD handshake with {peer}: {what}"), e);
    let protocol = |why: String| Error::Protocol {
        peer: peer.to_string(),
        why,
    };

    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer
        .write_all(&greeting)
        .await
        .map_err(|e| io_err("sending the greeting", e))?;
    writer
        .flush()
        .await
        .map_err(|e| io_err("sending the greeting", e))?;

    let client_flags = match reader.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io_err("reading client flags", e)),
    };
    let unknown = client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    if unknown != 0 {
        // The spec makes the server drop a client that sets flags it did not advertise.
        return Err(protocol(format!(
            "client set unknown handshake flags {unknown:#x}"
        )));
    }
    let mut haggle = Haggle {
        registry,
        no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
        structured: false,
        selected: None,
        out: Vec::new(),
    };

    loop {
        let mut header = [0u8; 16];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io_err("reading an option", e)),
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().unwrap());
        if magic != IHAVEOPT {
            return Err(protocol(format!(
                "option does not start with IHAVEOPT (got {magic:#018x})"
            )));
        }
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let length = u32::from_be_bytes(header[12..16].try_into().unwrap());

        if length > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                // This option cannot be answered with an error, so the session ends here.
                return Err(protocol(format!(
                    "NBD_OPT_EXPORT_NAME carries {length} bytes, more than the {MAX_OPTION_LEN} allowed"
                )));
            }
            // Skip the payload without buffering it, refuse, and keep haggling.
            let skipped = tokio::io::copy(
                &mut (&mut *reader).take(length as u64),
                &mut tokio::io::sink(),
            )
            .await
            .map_err(|e| io_err("skipping an oversized option", e))?;
            if skipped < length as u64 {
                return Ok(None);
            }
            haggle.error(
                option,
                REP_ERR_TOO_BIG,
                &format!(
                    "{} data of {length} bytes exceeds the {MAX_OPTION_LEN}-byte limit",
                    option_name(option)
                ),
            );
            send(writer, &mut haggle.out)
                .await
                .map_err(|e| io_err("replying to an option", e))?;
            continue;
        }

        let mut data = vec![0u8; length as usize];
        match reader.read_exact(&mut data).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io_err("reading option data", e)),
        }

        let next = haggle.option(option, &data).map_err(protocol)?;
        match next {
            Next::Continue => {
                send(writer, &mut haggle.out)
                    .await
                    .map_err(|e| io_err("replying to an option", e))?;
            }
            Next::Abort => {
                // The client may already have closed: a failed ACK changes nothing.
                let _ = send(writer, &mut haggle.out).await;
                return Ok(None);
            }
            Next::Transmission(session) => {
                send(writer, &mut haggle.out)
                    .await
                    .map_err(|e| io_err("entering transmission", e))?;
                return Ok(Some(session));
            }
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    writer.write_all(out).await?;
    out.clear();
    writer.flush().await
}

enum Next {
    Continue,
    Abort,
    Transmission(Session),
}

/// A refused option: the error reply type and the message for the user.
struct Refusal {
    reply: u32,
    message: String,
}

fn refuse(reply: u32, message: impl Into<String>) -> Refusal {
    Refusal {
        reply,
        message: message.into(),
    }
}

/// Option-haggling state: what has been agreed so far, and the replies queued for the wire.
struct Haggle<'a> {
    registry: &'a Registry,
    no_zeroes: bool,
    structured: bool,
    /// Export name and contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`; they only apply
    /// if the client enters transmission on that same export.
    selected: Option<(String, Vec<(u32, MetaContext)>)>,
    out: Vec<u8>,
}

impl Haggle<'_> {
    /// Handle one option. `Err` is a reason to drop the connection (only `NBD_OPT_EXPORT_NAME`,
    /// which has no way to report an error); everything else queues replies in `self.out`.
    fn option(&mut self, option: u32, data: &[u8]) -> Result<Next, String> {
        let result = match option {
            OPT_EXPORT_NAME => return self.export_name(data).map(Next::Transmission),
            OPT_ABORT => {
                // Data on ABORT SHOULD be ignored rather than refused.
                self.reply(option, REP_ACK, &[]);
                return Ok(Next::Abort);
            }
            OPT_LIST => self.list(data),
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STRUCTURED_REPLY => self.structured_reply(data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            OPT_STARTTLS => Err(refuse(
                REP_ERR_UNSUP,
                "this server does not offer TLS; connect without it",
            )),
            OPT_EXTENDED_HEADERS => Err(refuse(
                REP_ERR_UNSUP,
                "extended headers are not supported; use compact headers",
            )),
            _ => Err(refuse(
                REP_ERR_UNSUP,
                format!("option {option} is not supported by this server"),
            )),
        };
        match result {
            Ok(None) => Ok(Next::Continue),
            Ok(Some(session)) => Ok(Next::Transmission(session)),
            Err(r) => {
                self.error(option, r.reply, &r.message);
                Ok(Next::Continue)
            }
        }
    }

    fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) {
        self.out
            .extend_from_slice(&option_reply_header(option, reply, payload.len() as u32));
        self.out.extend_from_slice(payload);
    }

    fn error(&mut self, option: u32, reply: u32, message: &str) {
        self.reply(option, reply, clip(message).as_bytes());
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Session, String> {
        let name =
            parse_name(data).map_err(|r| format!("NBD_OPT_EXPORT_NAME refused: {}", r.message))?;
        let Some(export) = self.registry.lease(&name) else {
            return Err(format!(
                "NBD_OPT_EXPORT_NAME asked for {}",
                unknown_export(self.registry, &name)
            ));
        };
        let session = self.session(&name, export, false);
        self.out
            .extend_from_slice(&session.export.size().to_be_bytes());
        self.out.extend_from_slice(&session.flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES]);
        }
        Ok(session)
    }

    fn list(&mut self, data: &[u8]) -> Result<Option<Session>, Refusal> {
        if !data.is_empty() {
            return Err(refuse(REP_ERR_INVALID, "NBD_OPT_LIST takes no data"));
        }
        for name in self.registry.names() {
            let mut payload = Vec::with_capacity(4 + name.len());
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &payload);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
        Ok(None)
    }

    fn structured_reply(&mut self, data: &[u8]) -> Result<Option<Session>, Refusal> {
        if !data.is_empty() {
            return Err(refuse(
                REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            ));
        }
        // Asking twice is harmless; acknowledging again keeps simple clients happy.
        self.structured = true;
        self.reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        Ok(None)
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, Refusal> {
        let request = parse_info_request(data)?;
        let export = if option == OPT_GO {
            match self.registry.lease(&request.name) {
                Some(lease) => Export::Leased(lease),
                None => {
                    return Err(refuse(
                        REP_ERR_UNKNOWN,
                        unknown_export(self.registry, &request.name),
                    ))
                }
            }
        } else {
            match self.registry.get(&request.name) {
                Some(volume) => Export::Peeked(volume),
                None => {
                    return Err(refuse(
                        REP_ERR_UNKNOWN,
                        unknown_export(self.registry, &request.name),
                    ))
                }
            }
        };
        let volume: &Volume = export.volume();
        let flags = transmission_flags(volume, self.structured);

        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&volume.size().to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &info);

        if request.wants(INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(volume.name().as_bytes());
            self.reply(option, REP_INFO, &info);
        }
        if request.wants(INFO_DESCRIPTION) {
            let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(describe(volume).as_bytes());
            self.reply(option, REP_INFO, &info);
        }
        // Sent even when not asked for (the spec allows unrequested info): clients that
        // understand it align their requests, which is what the volume wants anyway.
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        info.extend_from_slice(&preferred_block(volume).to_be_bytes());
        info.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.reply(option, REP_INFO, &info);

        self.reply(option, REP_ACK, &[]);
        match export {
            Export::Peeked(_) => Ok(None),
            Export::Leased(lease) => Ok(Some(self.session(
                &request.name,
                lease,
                request.wants(INFO_BLOCK_SIZE),
            ))),
        }
    }

    fn session(&mut self, name: &str, export: ExportLease, block_size_agreed: bool) -> Session {
        let contexts = match self.selected.take() {
            Some((for_export, contexts)) if for_export == name => contexts,
            _ => Vec::new(),
        };
        Session {
            flags: transmission_flags(&export, self.structured),
            structured: self.structured,
            contexts,
            block_size_agreed,
            export,
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, Refusal> {
        let mode = if option == OPT_SET_META_CONTEXT {
            QueryMode::Set
        } else {
            QueryMode::List
        };
        if mode == QueryMode::Set {
            // A SET replaces the previous selection even when it fails.
            self.selected = None;
        }
        if !self.structured {
            return Err(refuse(
                REP_ERR_INVALID,
                format!(
                    "{} needs NBD_OPT_STRUCTURED_REPLY first",
                    option_name(option)
                ),
            ));
        }
        let request = parse_meta_request(data)?;
        let Some(volume) = self.registry.get(&request.export) else {
            return Err(refuse(
                REP_ERR_UNKNOWN,
                unknown_export(self.registry, &request.export),
            ));
        };
        let offered = MetaContext::offered_by(&volume);
        let names: Vec<String> = offered.iter().map(|c| c.name()).collect();
        let chosen = meta_context::select(&names, &request.queries, mode)
            .map_err(|e| refuse(REP_ERR_INVALID, e.0))?;

        let mut selected = Vec::with_capacity(chosen.len());
        for (n, i) in chosen.into_iter().enumerate() {
            // LIST must send id 0; SET ids only need to be unique within the connection.
            let id = if mode == QueryMode::Set {
                n as u32 + 1
            } else {
                0
            };
            let mut payload = Vec::with_capacity(4 + names[i].len());
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(names[i].as_bytes());
            self.reply(option, REP_META_CONTEXT, &payload);
            selected.push((id, offered[i]));
        }
        self.reply(option, REP_ACK, &[]);
        if mode == QueryMode::Set {
            self.selected = Some((request.export, selected));
        }
        Ok(None)
    }
}

/// The volume an `NBD_OPT_INFO` looks at, or the lease an `NBD_OPT_GO` takes.
enum Export {
    Peeked(std::sync::Arc<Volume>),
    Leased(ExportLease),
}

impl Export {
    fn volume(&self) -> &Volume {
        match self {
            Export::Peeked(v) => v,
            Export::Leased(l) => l,
        }
    }
}

/// Transmission flags for `volume`. DF is only meaningful (and only allowed) with structured
/// replies; a read-only export offers no commands that modify it.
pub fn transmission_flags(volume: &Volume, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if volume.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// Preferred block size: the CBT granularity (writes of whole granules dirty the least), as a
/// power of two between `MIN_BLOCK` and `MAX_PREFERRED_BLOCK`.
fn preferred_block(volume: &Volume) -> u32 {
    let g = volume
        .granularity()
        .clamp(MIN_BLOCK as u64, MAX_PREFERRED_BLOCK);
    let pow2 = 1u64 << (63 - g.leading_zeros());
    pow2 as u32
}

fn describe(volume: &Volume) -> String {
    let mode = if volume.read_only() {
        "read-only"
    } else {
        "read-write"
    };
    format!(
        "Ferry volume '{}', {}, {mode}",
        volume.name(),
        format_size(volume.size())
    )
}

fn unknown_export(registry: &Registry, name: &str) -> String {
    if name.is_empty() {
        return "the default export, but this server has none: name a volume, e.g. nbd://HOST:PORT/VOLUME".into();
    }
    let names = registry.names();
    if names.is_empty() {
        format!("export '{name}', but this server has no volumes: create one with `ferry volume create`")
    } else {
        format!("unknown export '{name}'; exports: {}", names.join(", "))
    }
}

/// Messages travel in strings limited to `MAX_STRING_LEN` bytes.
fn clip(message: &str) -> &str {
    let max = MAX_STRING_LEN as usize;
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// A spec string: UTF-8, no NUL, at most `MAX_STRING_LEN` bytes.
fn parse_string(bytes: &[u8], what: &str) -> Result<String, Refusal> {
    if bytes.len() > MAX_STRING_LEN as usize {
        return Err(refuse(
            REP_ERR_TOO_BIG,
            format!(
                "{what} of {} bytes is longer than the {MAX_STRING_LEN} allowed",
                bytes.len()
            ),
        ));
    }
    let s = std::str::from_utf8(bytes)
        .map_err(|_| refuse(REP_ERR_INVALID, format!("{what} is not UTF-8")))?;
    if s.contains('\0') {
        return Err(refuse(
            REP_ERR_INVALID,
            format!("{what} contains a NUL byte"),
        ));
    }
    Ok(s.to_string())
}

fn parse_name(data: &[u8]) -> Result<String, Refusal> {
    parse_string(data, "export name")
}

/// Big-endian reader over an option's data that refuses to run past its end.
struct Cursor<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if self.data.len() < n {
            return Err(refuse(
                REP_ERR_INVALID,
                format!("{} data is truncated", self.what),
            ));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, Refusal> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, Refusal> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, Refusal> {
        let len = self.u32()? as usize;
        parse_string(self.take(len)?, what)
    }
    fn finish(&self) -> Result<(), Refusal> {
        if !self.data.is_empty() {
            return Err(refuse(
                REP_ERR_INVALID,
                format!("{} data has {} trailing bytes", self.what, self.data.len()),
            ));
        }
        Ok(())
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: export name and the information items asked for.
#[derive(Debug, PartialEq, Eq)]
struct InfoRequest {
    name: String,
    items: Vec<u16>,
}

impl InfoRequest {
    fn wants(&self, item: u16) -> bool {
        self.items.contains(&item)
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Refusal> {
    let mut c = Cursor {
        data,
        what: "NBD_OPT_INFO/NBD_OPT_GO",
    };
    let name = c.string("export name")?;
    let count = c.u16()?;
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        items.push(c.u16()?);
    }
    c.finish()?;
    Ok(InfoRequest { name, items })
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, PartialEq, Eq)]
struct MetaRequest {
    export: String,
    queries: Vec<String>,
}

fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Refusal> {
    let mut c = Cursor {
        data,
        what: "meta context option",
    };
    let export = c.string("export name")?;
    let count = c.u32()?;
    if count > MAX_META_QUERIES {
        return Err(refuse(
            REP_ERR_TOO_BIG,
            format!("{count} meta context queries; at most {MAX_META_QUERIES} are accepted"),
        ));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(c.string("meta context query")?);
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_bytes(name: &[u8], items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_bytes(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn info_request_parses() {
        let r = parse_info_request(&info_bytes(b"vol", &[INFO_BLOCK_SIZE, INFO_NAME]))
            .ok()
            .unwrap();
        assert_eq!(
            r,
            InfoRequest {
                name: "vol".into(),
                items: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        assert!(r.wants(INFO_BLOCK_SIZE) && !r.wants(INFO_DESCRIPTION));
    }

    #[test]
    fn info_request_with_bad_lengths_is_invalid() {
        let good = info_bytes(b"vol", &[INFO_NAME]);
        for bad in [
            &good[..good.len() - 1],
            &good[..3],
            &[&good[..], &[0u8][..]].concat()[..],
        ] {
            let r = parse_info_request(bad).err().unwrap();
            assert_eq!(r.reply, REP_ERR_INVALID, "{}", r.message);
        }
        // Name length pointing past the end of the data.
        let mut lying = good.clone();
        lying[3] = 200;
        assert_eq!(
            parse_info_request(&lying).err().unwrap().reply,
            REP_ERR_INVALID
        );
    }

    #[test]
    fn overlong_and_non_utf8_names_are_refused() {
        let long = vec![b'a'; MAX_STRING_LEN as usize + 1];
        assert_eq!(
            parse_info_request(&info_bytes(&long, &[]))
                .err()
                .unwrap()
                .reply,
            REP_ERR_TOO_BIG
        );
        assert_eq!(
            parse_info_request(&info_bytes(b"\xff\xfe", &[]))
                .err()
                .unwrap()
                .reply,
            REP_ERR_INVALID
        );
        assert_eq!(
            parse_info_request(&info_bytes(b"a\0b", &[]))
                .err()
                .unwrap()
                .reply,
            REP_ERR_INVALID
        );
    }

    #[test]
    fn meta_request_parses_and_bounds_queries() {
        let r = parse_meta_request(&meta_bytes(
            "vol",
            &["base:allocation", "qemu:dirty-bitmap:"],
        ))
        .ok()
        .unwrap();
        assert_eq!(r.export, "vol");
        assert_eq!(
            r.queries,
            vec![
                "base:allocation".to_string(),
                "qemu:dirty-bitmap:".to_string()
            ]
        );

        let many = vec!["base:"; MAX_META_QUERIES as usize + 1];
        assert_eq!(
            parse_meta_request(&meta_bytes("vol", &many))
                .err()
                .unwrap()
                .reply,
            REP_ERR_TOO_BIG
        );

        let mut truncated = meta_bytes("vol", &["base:allocation"]);
        truncated.pop();
        assert_eq!(
            parse_meta_request(&truncated).err().unwrap().reply,
            REP_ERR_INVALID
        );
    }

    #[test]
    fn clip_respects_char_boundaries() {
        let s = "é".repeat(MAX_STRING_LEN as usize);
        let c = clip(&s);
        assert!(c.len() <= MAX_STRING_LEN as usize && c.len().is_multiple_of(2));
        assert_eq!(clip("short"), "short");
    }
}
