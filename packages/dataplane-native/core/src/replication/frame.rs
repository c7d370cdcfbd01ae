//! Replication messages on the wire — data frames and generation ends — encoded and decoded here
//! and nowhere else.
//!
//! A volume's generation crosses to the peer site as a sequence of *data frames*, each covering one
//! piece `[offset, offset + length)` of the volume as it was at the cut, followed by one
//! *generation end* that says how many frames and bytes the generation had, so the receiver knows
//! it holds all of it before it exposes the generation. [`FrameSizer`] cuts a generation's extents
//! into pieces that fit one message.
//!
//! # Layout (version 1; integers little-endian)
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `FRYF` |
//! | 1 | version, 1 |
//! | 1 | kind: 1 data frame, 2 generation end |
//! | 1 | length n of the volume name, 1..=64 |
//! | 1 | reserved, 0 |
//! | 52 or 32 | body of a data frame or of a generation end (below) |
//! | n | volume name: a valid Ferry volume name (`DataDir::validate_name`) |
//! | 8 | xxh3-64 of every header byte before it |
//! | `payload_len` | payload (data frames only); nothing may follow it |
//!
//! Data frame body: `epoch u64, generation u64, seq u64, offset u64, length u32, encoding u8,
//! reserved [u8; 3] = 0, xxh3 u64, payload_len u32`. Generation end body: `epoch u64,
//! generation u64, frames u64, bytes u64`.
//!
//! Encodings: `raw` (the payload is the `length` bytes), `zstd` (zstd frames that decompress to
//! exactly `length` bytes, with `payload_len < length`), `zero` (the range reads as zeroes) and
//! `trim` (the range is discarded); the last two carry no payload.
//!
//! Two checksums for two jobs. A data frame's `xxh3` is the xxh3-64 of its *uncompressed* data, so
//! it compares with block hashes computed anywhere else; `zero` and `trim` frames carry no data and
//! their `xxh3` is [`EMPTY_XXH3`], the xxh3-64 of the empty input. The header checksum covers the
//! header itself: without it a flipped bit in `offset` or `seq` would put good data in the wrong
//! place and no data hash could tell.
//!
//! # Bundles
//!
//! One NATS message may carry several data frames back to back (a *bundle*, at most
//! [`MAX_BUNDLE_FRAMES`] and never more than the message size): each frame is self-delimiting
//! (its header gives its payload's length), so [`split`] cuts a message into its frames, which are
//! then decoded and verified one by one as if each had come alone. A message of one frame is a
//! bundle of one. The receiver answers a bundle as a whole: if any frame of it fails, none is
//! applied and the source sends the whole bundle again (applying a frame twice writes the same
//! bytes).
//!
//! [`decode`] is strict and allocates nothing but its error: it checks the header and returns
//! views borrowed from the message. [`Frame::verify`] then decompresses — never into more than the header's
//! `length`, itself at most [`MAX_LENGTH`] — and compares the data hash. Nothing from a peer may
//! be applied before both have passed.
//!
//! The encoders hash and compress the buffer they are given, so callers must pass a private copy
//! (the copy-before-write image of the cut, say), never a buffer that is still being written: a
//! write racing the hash would ship a frame whose hash matches neither version of the data.

use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::volume::BLOCK_SIZE;
use std::borrow::Cow;
use xxhash_rust::xxh3::xxh3_64;

/// First bytes of every replication message.
pub const MAGIC: [u8; 4] = *b"FRYF";
/// The one version this build speaks.
pub const VERSION: u8 = 1;
/// Longest volume name on the wire, in bytes (the volume name rule's limit).
pub const MAX_NAME_LEN: usize = 64;
/// Most uncompressed bytes one data frame may cover. Bounds what a receiver ever allocates for a
/// frame, whatever its header claims.
pub const MAX_LENGTH: u32 = 32 << 20;
/// The `xxh3` of `zero` and `trim` frames: xxh3-64 of the empty input.
pub const EMPTY_XXH3: u64 = 0x2d06_8005_38d3_94c2;
/// zstd level used unless a policy asks for another.
pub const DEFAULT_LEVEL: i32 = 1;
/// zstd levels [`encode_data`] accepts.
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
/// Default largest message: NATS's default `max_payload`.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

const KIND_DATA: u8 = 1;
const KIND_END: u8 = 2;
const PREFIX_LEN: usize = 8;
const DATA_BODY_LEN: usize = 52;
const END_BODY_LEN: usize = 32;
const CHECKSUM_LEN: usize = 8;
/// Longest data frame header (one with a 64-byte volume name): a message of `M` bytes carries at
/// most `M - MAX_DATA_HEADER_LEN` bytes of payload.
pub const MAX_DATA_HEADER_LEN: usize = PREFIX_LEN + DATA_BODY_LEN + MAX_NAME_LEN + CHECKSUM_LEN;

/// How a data frame carries its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Raw = 1,
    Zstd = 2,
    Zero = 3,
    Trim = 4,
}

impl Encoding {
    fn from_wire(b: u8) -> Option<Encoding> {
        Some(match b {
            1 => Encoding::Raw,
            2 => Encoding::Zstd,
            3 => Encoding::Zero,
            4 => Encoding::Trim,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Zstd => "zstd",
            Encoding::Zero => "zero",
            Encoding::Trim => "trim",
        }
    }
}

/// A decoded replication message, borrowing from the bytes it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Data(Frame<'a>),
    End(GenerationEnd<'a>),
}

/// One piece of one volume's generation. `payload` is the wire payload, still compressed for
/// `zstd`; call [`Frame::verify`] to get the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub volume: &'a str,
    pub epoch: u64,
    pub generation: u64,
    /// Frame number within the generation, from 0.
    pub seq: u64,
    pub offset: u64,
    /// Uncompressed bytes covered, 1..=[`MAX_LENGTH`].
    pub length: u32,
    pub encoding: Encoding,
    /// xxh3-64 of the uncompressed data; [`EMPTY_XXH3`] for `zero` and `trim`.
    pub xxh3: u64,
    pub payload: &'a [u8],
}

/// The last message of a generation: the receiver may expose the generation only once it has
/// applied exactly `frames` data frames (seq `0..frames`) covering `bytes` uncompressed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationEnd<'a> {
    pub volume: &'a str,
    pub epoch: u64,
    pub generation: u64,
    pub frames: u64,
    /// Sum of the frames' `length`.
    pub bytes: u64,
}

/// What a verified data frame says to do with its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    /// Write these `length` bytes (borrowed from the message for `raw` frames).
    Data(Cow<'a, [u8]>),
    /// Make the range read as zeroes.
    Zero,
    /// Discard the range.
    Trim,
}

/// Refuse a zstd level outside [`LEVELS`], saying which are allowed.
pub fn check_level(level: i32) -> Result<()> {
    if LEVELS.contains(&level) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "zstd level {level} for replication frames is out of range: use {} to {} ({} is the default)",
        LEVELS.start(),
        LEVELS.end(),
        DEFAULT_LEVEL
    )))
}

/// `encode_data` at this level sends data frames raw, never trying zstd: the synchronous write
/// path's small writes, where compressing costs more time than the bytes it saves.
pub const RAW_LEVEL: i32 = 0;

/// Encode `data`, the volume's bytes at `[offset, offset + data.len())` in generation
/// `(epoch, generation)`, as data frame `seq`: a `zero` frame if every byte is zero, else `zstd`
/// at `level` when that saves at least 1/16 of the bytes, else `raw`. The message is never longer
/// than the frame header plus `data.len()`, so a piece from [`FrameSizer`] always fits.
///
/// `data` must be a private copy that nothing writes while this runs (see the module docs).
pub fn encode_data(
    volume: &str,
    epoch: u64,
    generation: u64,
    seq: u64,
    offset: u64,
    data: &[u8],
    level: i32,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_data_into(
        &mut out, volume, epoch, generation, seq, offset, data, level,
    )?;
    Ok(out)
}

/// [`encode_data`] appending the frame to `out` (a message being bundled): no buffer of its
/// own, and no copy into the message afterwards. On failure `out` is as it was.
#[allow(clippy::too_many_arguments)]
pub fn encode_data_into(
    out: &mut Vec<u8>,
    volume: &str,
    epoch: u64,
    generation: u64,
    seq: u64,
    offset: u64,
    data: &[u8],
    level: i32,
) -> Result<()> {
    if level != RAW_LEVEL {
        check_level(level)?;
    }
    let length = check_range(volume, offset, data.len() as u64)?;
    let mut frame = Frame {
        volume,
        epoch,
        generation,
        seq,
        offset,
        length,
        encoding: Encoding::Zero,
        xxh3: EMPTY_XXH3,
        payload: &[],
    };
    if is_zero(data) {
        out.extend_from_slice(&frame.header(0));
        return Ok(());
    }
    frame.xxh3 = xxh3_64(data);
    if level == RAW_LEVEL {
        frame.encoding = Encoding::Raw;
        out.extend_from_slice(&frame.header(data.len()));
        out.extend_from_slice(data);
        return Ok(());
    }
    // Compress straight into the message, behind room for the header, with at least zstd's
    // bound for `data` to spare, so compression cannot run out of room (nor can `data`).
    let start = out.len();
    let payload_at = start + frame.header_len();
    out.reserve(payload_at - start + zstd::zstd_safe::compress_bound(data.len()));
    out.resize(payload_at, 0);
    let mut cursor = std::io::Cursor::new(std::mem::take(out));
    cursor.set_position(payload_at as u64);
    let compressed = compress(level, data, &mut cursor);
    *out = cursor.into_inner();
    let compressed = match compressed {
        Ok(n) => n,
        Err(e) => {
            out.truncate(start);
            return Err(Error::io(
                format!("zstd compression of {}", frame.describe()),
                e,
            ));
        }
    };
    if compressed < data.len() && compressed <= data.len() - data.len() / 16 {
        frame.encoding = Encoding::Zstd;
    } else {
        frame.encoding = Encoding::Raw;
        out.truncate(payload_at);
        out.extend_from_slice(data);
    }
    let header = frame.header(out.len() - payload_at);
    out[start..payload_at].copy_from_slice(&header);
    Ok(())
}

/// Room a data frame of `len` bytes may take in a message: its header (for `volume`) and at
/// most zstd's bound of its data (a raw frame takes less).
pub fn data_frame_room(volume: &str, len: usize) -> usize {
    PREFIX_LEN + DATA_BODY_LEN + volume.len() + CHECKSUM_LEN + zstd::zstd_safe::compress_bound(len)
}

/// Compress with this thread's zstd context. Keeping it between frames matters: a fresh context
/// allocates (and page-faults in) its tables for every frame, which costs more than compressing
/// 1 MiB of incompressible data does.
fn compress(level: i32, data: &[u8], out: &mut std::io::Cursor<Vec<u8>>) -> std::io::Result<usize> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        let mut compressor = match slot.take() {
            Some((current, mut c)) => {
                if current != level {
                    c.set_compression_level(level)?;
                }
                c
            }
            None => zstd::bulk::Compressor::new(level)?,
        };
        let n = compressor.compress_to_buffer(data, out)?;
        *slot = Some((level, compressor));
        Ok(n)
    })
}

/// Decompress with this thread's zstd context, kept between frames as the compressor's is.
fn decompress(payload: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress_to_buffer(payload, out)
    })
}

/// Encode data frame `seq` saying that `[offset, offset + length)` reads as zeroes — for ranges
/// known to be holes or zeroes, without reading them.
pub fn encode_zero(
    volume: &str,
    epoch: u64,
    generation: u64,
    seq: u64,
    offset: u64,
    length: u32,
) -> Result<Vec<u8>> {
    encode_empty(
        volume,
        epoch,
        generation,
        seq,
        offset,
        length,
        Encoding::Zero,
    )
}

/// Encode data frame `seq` saying that `[offset, offset + length)` was discarded.
pub fn encode_trim(
    volume: &str,
    epoch: u64,
    generation: u64,
    seq: u64,
    offset: u64,
    length: u32,
) -> Result<Vec<u8>> {
    encode_empty(
        volume,
        epoch,
        generation,
        seq,
        offset,
        length,
        Encoding::Trim,
    )
}

/// Encode the message that closes a generation.
pub fn encode_end(end: &GenerationEnd<'_>) -> Result<Vec<u8>> {
    check_name(end.volume)?;
    let mut out = start_message(KIND_END, end.volume);
    put_u64(&mut out, end.epoch);
    put_u64(&mut out, end.generation);
    put_u64(&mut out, end.frames);
    put_u64(&mut out, end.bytes);
    seal(&mut out, end.volume);
    Ok(out)
}

/// Decode one message, refusing anything that is not exactly a well-formed version 1 message
/// with an intact header. The payload of a data frame is not checked here: call
/// [`Frame::verify`] before using it.
pub fn decode(bytes: &[u8]) -> Result<Message<'_>> {
    let total = bytes.len();
    if total < PREFIX_LEN {
        return Err(refuse(format!(
            "a message of {total} bytes is shorter than the {PREFIX_LEN}-byte prefix (truncated)"
        )));
    }
    if bytes[..4] != MAGIC {
        return Err(refuse(format!(
            "bad magic {:02x?} (expected {:02x?} \"FRYF\"): not a Ferry replication message",
            &bytes[..4],
            MAGIC
        )));
    }
    if bytes[4] != VERSION {
        return Err(refuse(format!(
            "version {} is not spoken here (this build speaks {VERSION}): run the same Ferry version at both sites",
            bytes[4]
        )));
    }
    let kind = bytes[5];
    let body_len = match kind {
        KIND_DATA => DATA_BODY_LEN,
        KIND_END => END_BODY_LEN,
        k => return Err(refuse(format!("unknown message kind {k}"))),
    };
    let name_len = bytes[6] as usize;
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(refuse(format!(
            "volume name length {name_len} is outside 1..={MAX_NAME_LEN}"
        )));
    }
    if bytes[7] != 0 {
        return Err(refuse(format!(
            "reserved prefix byte is {}, not 0",
            bytes[7]
        )));
    }
    let header_len = PREFIX_LEN + body_len + name_len + CHECKSUM_LEN;
    if total < header_len {
        return Err(refuse(format!(
            "a message of {total} bytes is shorter than its {header_len}-byte header (truncated)"
        )));
    }
    let (header, payload) = bytes.split_at(header_len);
    let (covered, stored) = header.split_at(header_len - CHECKSUM_LEN);
    let stored = u64::from_le_bytes(stored.try_into().expect("8 bytes"));
    let computed = xxh3_64(covered);
    if stored != computed {
        return Err(refuse(format!(
            "header checksum mismatch (header says {stored:#018x}, bytes hash to {computed:#018x}): corrupted in transit"
        )));
    }
    let (body, name) = covered[PREFIX_LEN..].split_at(body_len);
    let volume = std::str::from_utf8(name)
        .ok()
        .filter(|v| DataDir::validate_name(v).is_ok())
        .ok_or_else(|| {
            refuse(format!(
                "volume name {:?} is not a valid volume name",
                String::from_utf8_lossy(name)
            ))
        })?;
    let mut body = Fields(body);
    if kind == KIND_END {
        let end = GenerationEnd {
            volume,
            epoch: body.u64(),
            generation: body.u64(),
            frames: body.u64(),
            bytes: body.u64(),
        };
        if !payload.is_empty() {
            return Err(refuse(format!(
                "{} bytes follow the end of generation {} of volume '{volume}'",
                payload.len(),
                end.generation
            )));
        }
        return Ok(Message::End(end));
    }

    let epoch = body.u64();
    let generation = body.u64();
    let seq = body.u64();
    let offset = body.u64();
    let length = body.u32();
    let encoding = body.u8();
    let reserved = body.bytes(3);
    let xxh3 = body.u64();
    let payload_len = body.u32() as usize;
    let where_ = || {
        format!("frame {seq} of volume '{volume}' (epoch {epoch}, generation {generation}) at offset {offset}")
    };
    let Some(encoding) = Encoding::from_wire(encoding) else {
        return Err(refuse(format!("{}: unknown encoding {encoding}", where_())));
    };
    if reserved != [0; 3] {
        return Err(refuse(format!("{}: reserved bytes are not zero", where_())));
    }
    if length == 0 || length > MAX_LENGTH {
        return Err(refuse(format!(
            "{}: length {length} is outside 1..={MAX_LENGTH} (the {} MiB limit)",
            where_(),
            MAX_LENGTH >> 20
        )));
    }
    if offset.checked_add(u64::from(length)).is_none() {
        return Err(refuse(format!(
            "{}: offset + length {length} overflows",
            where_()
        )));
    }
    let payload_ok = match encoding {
        Encoding::Raw => payload_len == length as usize,
        Encoding::Zstd => payload_len > 0 && payload_len < length as usize,
        Encoding::Zero | Encoding::Trim => payload_len == 0,
    };
    if !payload_ok {
        return Err(refuse(format!(
            "{}: a {} frame of length {length} cannot have a {payload_len}-byte payload",
            where_(),
            encoding.as_str()
        )));
    }
    if payload.len() != payload_len {
        return Err(refuse(format!(
            "{}: the header announces a {payload_len}-byte payload but {} bytes follow ({})",
            where_(),
            payload.len(),
            if payload.len() < payload_len {
                "truncated"
            } else {
                "trailing bytes"
            }
        )));
    }
    Ok(Message::Data(Frame {
        volume,
        epoch,
        generation,
        seq,
        offset,
        length,
        encoding,
        xxh3,
        payload,
    }))
}

impl<'a> Frame<'a> {
    /// Recover the frame's content and check it against the data hash. Decompression never
    /// produces more than `length` bytes, and must produce exactly that many.
    pub fn verify(&self) -> Result<Content<'a>> {
        let data: Cow<'a, [u8]> = match self.encoding {
            Encoding::Raw => Cow::Borrowed(self.payload),
            Encoding::Zstd => Cow::Owned(self.decompress()?),
            Encoding::Zero | Encoding::Trim => {
                if self.xxh3 != EMPTY_XXH3 {
                    return Err(refuse(format!(
                        "{}: a {} frame must carry xxh3 {EMPTY_XXH3:#018x}, not {:#018x}",
                        self.describe(),
                        self.encoding.as_str(),
                        self.xxh3
                    )));
                }
                return Ok(if self.encoding == Encoding::Zero {
                    Content::Zero
                } else {
                    Content::Trim
                });
            }
        };
        let computed = xxh3_64(&data);
        if computed != self.xxh3 {
            return Err(refuse(format!(
                "{}: data hashes to xxh3 {computed:#018x} but the header says {:#018x}: corrupted in transit; drop it and have the sender resend the generation from this frame",
                self.describe(),
                self.xxh3
            )));
        }
        Ok(Content::Data(data))
    }

    fn decompress(&self) -> Result<Vec<u8>> {
        let length = self.length as usize;
        // Bulk decompression writes into the buffer's capacity and fails rather than grow it, so
        // a payload claiming more than `length` costs no more memory than `length`.
        let mut out = Vec::with_capacity(length);
        let result = decompress(self.payload, &mut out);
        match result {
            Ok(n) if n == length => Ok(out),
            Ok(n) => Err(refuse(format!(
                "{}: zstd payload decompresses to {n} bytes, not {length}",
                self.describe()
            ))),
            Err(e) => Err(refuse(format!(
                "{}: zstd payload does not decompress into {length} bytes: {e}",
                self.describe()
            ))),
        }
    }

    /// "frame 3 of volume 'vm1' (epoch 1, generation 5) at offset 4096, 65536 bytes" — for
    /// messages.
    pub fn describe(&self) -> String {
        format!(
            "frame {} of volume '{}' (epoch {}, generation {}) at offset {}, {} bytes",
            self.seq, self.volume, self.epoch, self.generation, self.offset, self.length
        )
    }

    fn header_len(&self) -> usize {
        PREFIX_LEN + DATA_BODY_LEN + self.volume.len() + CHECKSUM_LEN
    }

    /// The header announcing a `payload_len`-byte payload (`payload` itself is not looked at).
    /// Only the encoders call this, with fields they have checked.
    fn header(&self, payload_len: usize) -> Vec<u8> {
        let mut out = start_message(KIND_DATA, self.volume);
        put_u64(&mut out, self.epoch);
        put_u64(&mut out, self.generation);
        put_u64(&mut out, self.seq);
        put_u64(&mut out, self.offset);
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&[self.encoding as u8, 0, 0, 0]);
        put_u64(&mut out, self.xxh3);
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        seal(&mut out, self.volume);
        debug_assert_eq!(out.len(), self.header_len());
        out
    }
}

fn encode_empty(
    volume: &str,
    epoch: u64,
    generation: u64,
    seq: u64,
    offset: u64,
    length: u32,
    encoding: Encoding,
) -> Result<Vec<u8>> {
    let length = check_range(volume, offset, u64::from(length))?;
    Ok(Frame {
        volume,
        epoch,
        generation,
        seq,
        offset,
        length,
        encoding,
        xxh3: EMPTY_XXH3,
        payload: &[],
    }
    .header(0))
}

/// The checks [`decode`] makes on a frame's range, made before encoding one.
fn check_range(volume: &str, offset: u64, length: u64) -> Result<u32> {
    check_name(volume)?;
    if length == 0 || length > u64::from(MAX_LENGTH) {
        return Err(Error::InvalidArgument(format!(
            "a replication frame of volume '{volume}' at offset {offset} must cover 1 to {MAX_LENGTH} bytes, not {length}: cut the range with FrameSizer"
        )));
    }
    if offset.checked_add(length).is_none() {
        return Err(Error::InvalidArgument(format!(
            "a replication frame of volume '{volume}' at offset {offset}, length {length} runs past the largest offset"
        )));
    }
    Ok(length as u32)
}

fn check_name(volume: &str) -> Result<()> {
    DataDir::validate_name(volume)
}

/// Prefix of a header whose body follows.
fn start_message(kind: u8, volume: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + DATA_BODY_LEN + volume.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    // `check_name` has bounded the name to MAX_NAME_LEN bytes.
    out.extend_from_slice(&[VERSION, kind, volume.len() as u8, 0]);
    out
}

/// Append the volume name and the header checksum: the header is complete.
fn seal(out: &mut Vec<u8>, volume: &str) {
    out.extend_from_slice(volume.as_bytes());
    let checksum = xxh3_64(out);
    put_u64(out, checksum);
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Most data frames in one message.
pub const MAX_BUNDLE_FRAMES: usize = 16;

/// Cut a message into the frames it carries, front to back, checking each header's checksum
/// before trusting the payload length it gives; the frames still have to be [`decode`]d (which
/// checks the rest) and verified. An empty message, a truncated frame or a damaged header refuses
/// the whole message.
pub fn split(bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if frames.len() == MAX_BUNDLE_FRAMES {
            return Err(refuse(format!(
                "a message carries more than {MAX_BUNDLE_FRAMES} frames"
            )));
        }
        // Anything but a data frame's header (a generation end, which travels alone, or bytes
        // that are no frame) is taken whole, for `decode` to judge.
        let covered = PREFIX_LEN + DATA_BODY_LEN + rest.get(6).copied().unwrap_or(0) as usize;
        let len = if rest.len() >= covered + CHECKSUM_LEN
            && rest[..4] == MAGIC
            && rest[5] == KIND_DATA
        {
            let at = bytes.len() - rest.len();
            let stored = u64::from_le_bytes(
                rest[covered..covered + CHECKSUM_LEN]
                    .try_into()
                    .expect("8 bytes"),
            );
            if stored != xxh3_64(&rest[..covered]) {
                return Err(refuse(format!(
                    "the header of the frame at byte {at} of a {}-byte message does not match its checksum: corrupted in transit",
                    bytes.len()
                )));
            }
            let field = PREFIX_LEN + DATA_BODY_LEN - 4;
            let payload_len =
                u32::from_le_bytes(rest[field..field + 4].try_into().expect("4 bytes")) as usize;
            // Truncated: the whole rest goes to `decode`, which says so.
            (covered + CHECKSUM_LEN)
                .saturating_add(payload_len)
                .min(rest.len())
        } else {
            rest.len()
        };
        let (frame, tail) = rest.split_at(len);
        frames.push(frame);
        rest = tail;
    }
    if frames.is_empty() {
        return Err(refuse("an empty message carries no frame".into()));
    }
    Ok(frames)
}

fn refuse(why: String) -> Error {
    Error::Frame { why }
}

/// Reads a body of known length front to back; `decode` has checked the length, so running
/// short is a bug here, not bad input.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().expect("8 bytes"))
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed chunks lets the compiler vectorize; `iter().all` would test byte by byte.
    data.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Recompute the header checksum of a message, so a fuzzer's or a test's changes to header
/// fields reach the checks behind it. Does nothing to bytes too short to have a header.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub fn reseal_for_fuzzing(bytes: &mut [u8]) {
    if bytes.len() < PREFIX_LEN {
        return;
    }
    let body_len = match bytes[5] {
        KIND_DATA => DATA_BODY_LEN,
        KIND_END => END_BODY_LEN,
        _ => return,
    };
    let covered = PREFIX_LEN + body_len + bytes[6] as usize;
    if bytes.len() < covered + CHECKSUM_LEN {
        return;
    }
    let checksum = xxh3_64(&bytes[..covered]);
    bytes[covered..covered + CHECKSUM_LEN].copy_from_slice(&checksum.to_le_bytes());
}

/// One piece of a generation to ship as one data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub length: u32,
}

/// Cuts a generation's changed extents into pieces that each fit one message of at most
/// `max_message` bytes, whatever the frame's encoding and volume name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSizer {
    max_piece: u32,
    max_message: usize,
}

impl FrameSizer {
    /// `max_message` is the largest message the transport takes (NATS: the server's
    /// `max_payload`, [`DEFAULT_MAX_MESSAGE`] by default).
    pub fn new(max_message: usize) -> Result<FrameSizer> {
        let room = max_message
            .saturating_sub(MAX_DATA_HEADER_LEN)
            .min(MAX_LENGTH as usize);
        let max_piece = room as u64 / BLOCK_SIZE * BLOCK_SIZE;
        if max_piece == 0 {
            return Err(Error::InvalidArgument(format!(
                "a message size of {max_message} bytes cannot hold a {MAX_DATA_HEADER_LEN}-byte frame header and one {BLOCK_SIZE}-byte block: use at least {} bytes",
                MAX_DATA_HEADER_LEN as u64 + BLOCK_SIZE
            )));
        }
        Ok(FrameSizer {
            max_piece: max_piece as u32,
            max_message,
        })
    }

    /// Consecutive `pieces` grouped into bundles: the frames of each, whatever their encoding
    /// (zstd is kept only when smaller than raw), fit one message together, and a bundle has at
    /// most [`MAX_BUNDLE_FRAMES`]. Pieces of the largest size go one per message.
    pub fn bundles(&self, pieces: impl IntoIterator<Item = Piece>) -> Vec<Vec<Piece>> {
        let mut out: Vec<Vec<Piece>> = Vec::new();
        let mut bytes = 0;
        for piece in pieces {
            let size = MAX_DATA_HEADER_LEN + piece.length as usize;
            match out.last_mut() {
                Some(b) if b.len() < MAX_BUNDLE_FRAMES && bytes + size <= self.max_message => {
                    b.push(piece);
                    bytes += size;
                }
                _ => {
                    out.push(vec![piece]);
                    bytes = size;
                }
            }
        }
        out
    }

    /// Longest piece: a multiple of 4 KiB, at most [`MAX_LENGTH`].
    pub fn max_piece(&self) -> u32 {
        self.max_piece
    }

    /// Pieces covering `extents` (`(offset, length)`, as a dirty bitmap yields them: sorted,
    /// 4 KiB-aligned). Every piece starts and ends on a 4 KiB boundary and is at most
    /// [`max_piece`](Self::max_piece) long. Extents that touch or overlap are shipped as one run,
    /// so a piece spans several when it can and no byte goes twice; empty extents are skipped.
    /// An unaligned extent is widened to 4 KiB boundaries — volumes are made of whole 4 KiB
    /// blocks, so that never reaches past the end of one.
    pub fn pieces<I>(&self, extents: I) -> Pieces<I::IntoIter>
    where
        I: IntoIterator<Item = (u64, u64)>,
    {
        Pieces {
            extents: extents.into_iter().fuse(),
            max: u64::from(self.max_piece),
            origin: 0,
            start: 0,
            end: 0,
            pending: None,
        }
    }
}

/// Iterator returned by [`FrameSizer::pieces`]. It holds one run, never the whole list.
#[derive(Debug)]
pub struct Pieces<I> {
    extents: std::iter::Fuse<I>,
    max: u64,
    /// The current run is `[origin, end)`; `[origin, start)` has been yielded.
    origin: u64,
    start: u64,
    end: u64,
    /// The extent that did not touch the current run: it starts the next one.
    pending: Option<(u64, u64)>,
}

impl<I: Iterator<Item = (u64, u64)>> Pieces<I> {
    /// Next non-empty extent, widened to block boundaries, as `[start, end)`.
    fn pull(&mut self) -> Option<(u64, u64)> {
        loop {
            let (offset, length) = self.extents.next()?;
            if length == 0 {
                continue;
            }
            let start = offset / BLOCK_SIZE * BLOCK_SIZE;
            let end = offset
                .saturating_add(length)
                .checked_next_multiple_of(BLOCK_SIZE)
                .unwrap_or(u64::MAX / BLOCK_SIZE * BLOCK_SIZE);
            return Some((start, end));
        }
    }
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for Pieces<I> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        loop {
            // Grow the run until it fills a piece or the next extent does not touch it. An
            // extent starting inside `[origin, end]` only adds bytes past `end`; what it shares
            // with `[origin, start)` has been yielded already.
            while self.end - self.start < self.max && self.pending.is_none() {
                let Some((start, end)) = self.pull() else {
                    break;
                };
                if self.origin <= start && start <= self.end {
                    self.end = self.end.max(end);
                } else {
                    self.pending = Some((start, end));
                }
            }
            if self.start < self.end {
                let length = (self.end - self.start).min(self.max);
                let piece = Piece {
                    offset: self.start,
                    length: length as u32,
                };
                self.start += length;
                return Some(piece);
            }
            let (start, end) = self.pending.take()?;
            (self.origin, self.start, self.end) = (start, start, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    const VOL: &str = "vm1-disk0";

    /// A bundle of a raw, a zero and a zstd frame (in that order), as the shipper builds it.
    fn mixed_bundle() -> (Vec<u8>, [Vec<u8>; 3]) {
        let frames = [
            encode_data(VOL, 1, 2, 0, 0, &random(65536, 1), DEFAULT_LEVEL).unwrap(),
            encode_data(VOL, 1, 2, 1, 65536, &[0u8; 65536], DEFAULT_LEVEL).unwrap(),
            encode_data(
                VOL,
                1,
                2,
                2,
                1 << 20,
                &compressible(65536, 2),
                DEFAULT_LEVEL,
            )
            .unwrap(),
        ];
        (frames.concat(), frames)
    }

    #[test]
    fn frames_appended_to_a_message_are_the_frames_encode_data_makes() {
        let text: Vec<u8> = b"a compressible line of log text\n".repeat(4096);
        let pieces: [(u64, Vec<u8>); 3] = [
            (0, random(65536, 7)),
            (65536, vec![0u8; 65536]),
            (131072, text[..65536].to_vec()),
        ];
        let mut msg = b"earlier frames".to_vec();
        let mut want = msg.clone();
        for (seq, (offset, data)) in pieces.iter().enumerate() {
            let seq = seq as u64;
            encode_data_into(&mut msg, VOL, 1, 2, seq, *offset, data, DEFAULT_LEVEL).unwrap();
            want.extend(encode_data(VOL, 1, 2, seq, *offset, data, DEFAULT_LEVEL).unwrap());
        }
        assert_eq!(msg, want);
        // A level out of range leaves the message as it was.
        let before = msg.clone();
        assert!(encode_data_into(&mut msg, VOL, 1, 2, 3, 0, &pieces[0].1, 99).is_err());
        assert_eq!(msg, before);
        assert!(data_frame_room(VOL, 65536) >= 65536);
    }

    #[test]
    fn a_bundle_splits_into_its_frames_of_every_encoding() {
        let (bundle, frames) = mixed_bundle();
        let parts = split(&bundle).unwrap();
        assert_eq!(parts, frames.iter().map(|f| &f[..]).collect::<Vec<_>>());
        let kinds: Vec<&str> = parts
            .iter()
            .map(|p| match decode(p).unwrap() {
                Message::Data(f) => {
                    f.verify().unwrap();
                    f.encoding.as_str()
                }
                Message::End(_) => "end",
            })
            .collect();
        assert_eq!(kinds, ["raw", "zero", "zstd"]);
        // A lone frame is a bundle of one; a generation end travels alone.
        assert_eq!(split(&frames[1]).unwrap(), [&frames[1][..]]);
        let end = encode_end(&GenerationEnd {
            volume: VOL,
            epoch: 1,
            generation: 2,
            frames: 3,
            bytes: 3 * 65536,
        })
        .unwrap();
        assert!(matches!(
            decode(split(&end).unwrap()[0]).unwrap(),
            Message::End(_)
        ));
    }

    #[test]
    fn a_damaged_frame_inside_a_bundle_is_caught() {
        let (bundle, frames) = mixed_bundle();
        let second = frames[0].len();
        let third = second + frames[1].len();
        // A flipped byte in the header of the middle frame: its boundaries cannot be trusted, the
        // whole message is refused.
        let mut bad = bundle.clone();
        bad[second + 20] ^= 0x40;
        let e = split(&bad).unwrap_err();
        assert_eq!(e.code(), "ERR_FRAME");
        assert!(e.to_string().contains(&format!("at byte {second}")), "{e}");
        // A flipped payload byte of the last (zstd) frame: it splits, and that frame fails
        // verification.
        let mut bad = bundle.clone();
        let last = bad.len() - 10;
        bad[last] ^= 0x01;
        let parts = split(&bad).unwrap();
        assert_eq!(parts.len(), 3);
        let Message::Data(f) = decode(parts[2]).unwrap() else {
            panic!("a data frame")
        };
        assert_eq!(f.verify().unwrap_err().code(), "ERR_FRAME");
        // Cut short inside the last frame, or with bytes after it.
        let e = decode(split(&bundle[..bundle.len() - 1]).unwrap()[2]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut long = bundle.clone();
        long.extend_from_slice(b"FRYF");
        assert!(split(&long).unwrap().len() == 4 && decode(b"FRYF").is_err());
        assert_eq!(split(&bundle[..third]).unwrap().len(), 2);
        assert_eq!(split(&[]).unwrap_err().code(), "ERR_FRAME");
    }

    #[test]
    fn bundles_fit_one_message_and_hold_at_most_sixteen_frames() {
        let sizer = FrameSizer::new(DEFAULT_MAX_MESSAGE).unwrap();
        let small = (0..40u64).map(|i| Piece {
            offset: i * 131072,
            length: 65536,
        });
        let bundles = sizer.bundles(small);
        assert_eq!(
            bundles.iter().map(Vec::len).collect::<Vec<_>>(),
            [15, 15, 10]
        );
        for b in &bundles {
            let worst: usize = b
                .iter()
                .map(|p| MAX_DATA_HEADER_LEN + p.length as usize)
                .sum();
            assert!(worst <= DEFAULT_MAX_MESSAGE);
        }
        let tiny = (0..40u64).map(|i| Piece {
            offset: i * 8192,
            length: 4096,
        });
        assert_eq!(
            sizer.bundles(tiny).iter().map(Vec::len).collect::<Vec<_>>(),
            [16, 16, 8]
        );
        let large = sizer.pieces([(0u64, 4u64 << 20)]);
        assert!(sizer.bundles(large).iter().all(|b| b.len() == 1));
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// Text-like data with a small vocabulary and random numbers: compresses about 3-4x.
    fn compressible(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "volume ",
            "generation ",
            "epoch ",
            "write ",
            "block ",
            "the ",
            "of ",
            "a ",
            "frame ",
            "site ",
            "replica ",
            "\n",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            if rng.random_bool(0.2) {
                v.extend_from_slice(rng.random::<u16>().to_string().as_bytes());
                v.push(b' ');
            } else {
                v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            }
        }
        v.truncate(len);
        v
    }

    fn data_frame(bytes: &[u8]) -> Frame<'_> {
        match decode(bytes).expect("decodes") {
            Message::Data(f) => f,
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    fn frame_error(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(e @ Error::Frame { .. }) => {
                assert_eq!(e.code(), "ERR_FRAME");
                e.to_string()
            }
            other => panic!("expected an ERR_FRAME error, got {other:?}"),
        }
    }

    /// Offset of a data frame body field, for tests that forge headers.
    const OFF_LENGTH: usize = PREFIX_LEN + 32;
    const OFF_ENCODING: usize = PREFIX_LEN + 36;
    const OFF_XXH3: usize = PREFIX_LEN + 40;
    const OFF_PAYLOAD_LEN: usize = PREFIX_LEN + 48;

    fn forge(bytes: &[u8], at: usize, patch: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b[at..at + patch.len()].copy_from_slice(patch);
        reseal_for_fuzzing(&mut b);
        b
    }

    #[test]
    fn empty_xxh3_is_the_hash_of_nothing() {
        assert_eq!(EMPTY_XXH3, xxh3_64(b""));
    }

    #[test]
    fn incompressible_data_goes_raw_and_round_trips_borrowed() {
        let data = random(64 * 1024, 1);
        let msg = encode_data(VOL, 3, 7, 2, 1 << 20, &data, DEFAULT_LEVEL).unwrap();
        assert_eq!(
            msg.len(),
            PREFIX_LEN + DATA_BODY_LEN + VOL.len() + 8 + data.len()
        );
        let f = data_frame(&msg);
        assert_eq!(
            (f.volume, f.epoch, f.generation, f.seq, f.offset, f.length),
            (VOL, 3, 7, 2, 1 << 20, data.len() as u32)
        );
        assert_eq!(f.encoding, Encoding::Raw);
        assert_eq!(f.xxh3, xxh3_64(&data));
        match f.verify().unwrap() {
            Content::Data(Cow::Borrowed(d)) => assert_eq!(d, &data[..]),
            other => panic!("expected borrowed data, got {other:?}"),
        }
    }

    #[test]
    fn compressible_data_goes_zstd_smaller_and_round_trips() {
        let data = compressible(256 * 1024, 2);
        let mut by_level = Vec::new();
        // The thread's compressor changes level and back.
        for level in [1, 3, 19, 1] {
            let msg = encode_data(VOL, 1, 1, 0, 0, &data, level).unwrap();
            by_level.push(msg.len());
            assert!(
                msg.len() < data.len() / 2,
                "level {level}: {} bytes for {}",
                msg.len(),
                data.len()
            );
            let f = data_frame(&msg);
            assert_eq!(f.encoding, Encoding::Zstd);
            assert_eq!(f.length as usize, data.len());
            assert_eq!(f.verify().unwrap(), Content::Data(Cow::Borrowed(&data[..])));
        }
        assert_eq!(by_level[0], by_level[3], "{by_level:?}");
        assert!(by_level[2] < by_level[0], "{by_level:?}");
    }

    #[test]
    fn barely_compressible_data_goes_raw() {
        // Only the first 1/32 compresses: zstd would save less than 1/16.
        let mut data = random(64 * 1024, 3);
        data[..2048].fill(7);
        let f_bytes = encode_data(VOL, 1, 1, 0, 0, &data, 1).unwrap();
        assert_eq!(data_frame(&f_bytes).encoding, Encoding::Raw);
    }

    #[test]
    fn zeroes_go_as_a_zero_frame_without_payload() {
        let data = vec![0u8; 1 << 20];
        let msg = encode_data(VOL, 1, 2, 3, 8192, &data, 1).unwrap();
        assert_eq!(msg.len(), PREFIX_LEN + DATA_BODY_LEN + VOL.len() + 8);
        let f = data_frame(&msg);
        assert_eq!(
            (f.encoding, f.length, f.xxh3),
            (Encoding::Zero, 1 << 20, EMPTY_XXH3)
        );
        assert!(f.payload.is_empty());
        assert_eq!(f.verify().unwrap(), Content::Zero);
        // A single non-zero byte at the very end is data.
        let mut data = data;
        *data.last_mut().unwrap() = 1;
        let msg = encode_data(VOL, 1, 2, 3, 8192, &data, 1).unwrap();
        assert_eq!(data_frame(&msg).encoding, Encoding::Zstd);
    }

    #[test]
    fn zero_and_trim_frames_round_trip() {
        let msg = encode_zero(VOL, 4, 5, 6, 4096, 65536).unwrap();
        let f = data_frame(&msg);
        assert_eq!(
            (f.encoding, f.offset, f.length),
            (Encoding::Zero, 4096, 65536)
        );
        assert_eq!(f.verify().unwrap(), Content::Zero);
        let msg = encode_trim(VOL, 4, 5, 7, 1 << 30, MAX_LENGTH).unwrap();
        let f = data_frame(&msg);
        assert_eq!(
            (f.encoding, f.seq, f.offset, f.length),
            (Encoding::Trim, 7, 1 << 30, MAX_LENGTH)
        );
        assert_eq!(f.verify().unwrap(), Content::Trim);
    }

    #[test]
    fn generation_end_round_trips_and_is_told_apart() {
        let end = GenerationEnd {
            volume: VOL,
            epoch: 2,
            generation: 9,
            frames: 1234,
            bytes: 5 << 30,
        };
        let msg = encode_end(&end).unwrap();
        assert_eq!(decode(&msg).unwrap(), Message::End(end));
        let data = encode_zero(VOL, 2, 9, 0, 0, 4096).unwrap();
        assert!(matches!(decode(&data).unwrap(), Message::Data(_)));
    }

    #[test]
    fn encoders_refuse_bad_arguments() {
        let data = random(4096, 4);
        for level in [-1, 20, 22] {
            let e = encode_data(VOL, 1, 1, 0, 0, &data, level).unwrap_err();
            assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "level {level}");
            assert!(e.to_string().contains("1 to 19"), "{e}");
        }
        // What a user may configure: 0 is the sync path's internal "raw", not a level.
        for level in [0, -1, 20] {
            assert!(check_level(level)
                .unwrap_err()
                .to_string()
                .contains("1 to 19"));
        }
        let text = b"compressible ".repeat(400);
        let raw = encode_data(VOL, 1, 1, 0, 0, &text, RAW_LEVEL).unwrap();
        let Message::Data(f) = decode(&raw).unwrap() else {
            panic!("a data frame")
        };
        assert_eq!(f.encoding, Encoding::Raw, "never compressed at RAW_LEVEL");
        assert!(matches!(f.verify().unwrap(), Content::Data(d) if *d == text[..]));
        assert!(encode_data(VOL, 1, 1, 0, 0, &data, 19).is_ok());
        let e = encode_data(VOL, 1, 1, 0, 0, &[], 1).unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        let big = vec![1u8; MAX_LENGTH as usize + 1];
        let e = encode_data(VOL, 1, 1, 0, 0, &big, 1).unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        let e = encode_data(VOL, 1, 1, 0, u64::MAX - 100, &data, 1).unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        for name in ["", "../etc", &"x".repeat(65), "vol/1", "välj"] {
            let e = encode_data(name, 1, 1, 0, 0, &data, 1).unwrap_err();
            assert_eq!(e.code(), "ERR_BAD_NAME", "{name:?}");
            let end = GenerationEnd {
                volume: name,
                epoch: 1,
                generation: 1,
                frames: 0,
                bytes: 0,
            };
            assert_eq!(encode_end(&end).unwrap_err().code(), "ERR_BAD_NAME");
        }
        assert_eq!(
            encode_trim(VOL, 1, 1, 0, 0, 0).unwrap_err().code(),
            "ERR_INVALID_ARGUMENT"
        );
        assert_eq!(
            encode_zero(VOL, 1, 1, 0, 0, MAX_LENGTH + 1)
                .unwrap_err()
                .code(),
            "ERR_INVALID_ARGUMENT"
        );
        // The longest valid name fits the longest header.
        let name = "n".repeat(MAX_NAME_LEN);
        let msg = encode_data(&name, 1, 1, 0, 0, &data, 1).unwrap();
        assert_eq!(msg.len(), MAX_DATA_HEADER_LEN + data.len());
    }

    /// Small frames of every kind, with the content each must verify to.
    fn samples() -> Vec<(Vec<u8>, Option<Content<'static>>)> {
        let raw = random(300, 5);
        let packed = compressible(600, 6);
        let samples = vec![
            (
                encode_data(VOL, 1, 2, 3, 4096, &raw, 1).unwrap(),
                Some(Content::Data(Cow::Owned(raw))),
            ),
            (
                encode_data(VOL, 1, 2, 4, 8192, &packed, 1).unwrap(),
                Some(Content::Data(Cow::Owned(packed))),
            ),
            (
                encode_zero(VOL, 1, 2, 5, 0, 4096).unwrap(),
                Some(Content::Zero),
            ),
            (
                encode_trim(VOL, 1, 2, 6, 0, 4096).unwrap(),
                Some(Content::Trim),
            ),
            (
                encode_end(&GenerationEnd {
                    volume: VOL,
                    epoch: 1,
                    generation: 2,
                    frames: 7,
                    bytes: 12288,
                })
                .unwrap(),
                None,
            ),
        ];
        let encodings: Vec<_> = samples[..4]
            .iter()
            .map(|(m, _)| data_frame(m).encoding)
            .collect();
        assert_eq!(
            encodings,
            [
                Encoding::Raw,
                Encoding::Zstd,
                Encoding::Zero,
                Encoding::Trim
            ]
        );
        samples
    }

    /// A corrupted message must never pass as something it is not: `decode` refuses it, `verify`
    /// catches it, or — only inside a zstd payload, whose encoding is not canonical (a weight of
    /// an unused Huffman symbol, say) — it still decodes to exactly the original frame and data,
    /// so nothing wrong can be applied.
    #[test]
    fn every_single_byte_corruption_is_refused_or_caught() {
        let mut harmless = Vec::new();
        let mut flips = 0;
        for (msg, content) in samples() {
            let intact = decode(&msg).unwrap();
            let intact_content = match &intact {
                Message::Data(f) => Some(f.verify().unwrap()),
                Message::End(_) => None,
            };
            assert_eq!(intact_content, content);
            for at in 0..msg.len() {
                for flip in [0x01u8, 0x80, 0xff, 0x5a] {
                    flips += 1;
                    let mut bad = msg.clone();
                    bad[at] ^= flip;
                    let decoded = match decode(&bad) {
                        Err(e) => {
                            assert_eq!(e.code(), "ERR_FRAME");
                            continue;
                        }
                        Ok(m) => m,
                    };
                    let kind = match &decoded {
                        Message::Data(f) => f.encoding.as_str(),
                        Message::End(_) => "end",
                    };
                    let what = format!("byte {at} ^ {flip:#04x} of a {}-byte {kind}", msg.len());
                    match (&decoded, &intact) {
                        (Message::Data(f), Message::Data(g)) => {
                            let Ok(got) = f.verify() else { continue };
                            assert_eq!(f.encoding, Encoding::Zstd, "{what} passed");
                            assert_eq!(
                                Frame {
                                    payload: &[],
                                    ..f.clone()
                                },
                                Frame {
                                    payload: &[],
                                    ..g.clone()
                                },
                                "{what}"
                            );
                            assert_eq!(Some(got), content, "{what} passed with other data");
                            harmless.push(what);
                        }
                        _ => panic!("{what} passed"),
                    }
                }
            }
        }
        // 4 of 3876 with these samples.
        assert!(harmless.len() * 100 < flips, "{harmless:#?}");
    }

    #[test]
    fn truncation_at_every_length_and_trailing_bytes_are_refused() {
        for (msg, _) in samples() {
            for len in 0..msg.len() {
                let why = frame_error(decode(&msg[..len]));
                assert!(
                    why.contains("truncated") || why.contains("shorter"),
                    "{len}: {why}"
                );
            }
            let mut long = msg.clone();
            long.push(0);
            frame_error(decode(&long));
        }
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_any_allocation() {
        // `decode` returns borrowed views: a length it refuses is never allocated. 0xffff_ffff
        // is the largest length the header can carry, 4 GiB - 1.
        let raw = encode_data(VOL, 1, 1, 0, 0, &random(4096, 7), 1).unwrap();
        let packed = encode_data(VOL, 1, 1, 0, 0, &compressible(4096, 8), 1).unwrap();
        for msg in [&raw, &packed] {
            for length in [u32::MAX, 1 << 31, MAX_LENGTH + 1] {
                let bad = forge(msg, OFF_LENGTH, &length.to_le_bytes());
                let why = frame_error(decode(&bad));
                assert!(why.contains("32 MiB limit"), "{why}");
            }
        }
    }

    #[test]
    fn decompression_is_bounded_by_the_declared_length() {
        // A 1 MiB run of one byte compresses to a few dozen bytes; declared as 4 KiB it must be
        // refused by verify after writing at most 4 KiB, not inflated.
        let bomb = zstd::bulk::compress(&vec![9u8; 1 << 20], 1).unwrap();
        let small = compressible(4096, 9);
        let msg = encode_data(VOL, 1, 1, 0, 0, &small, 1).unwrap();
        let header_len = msg.len() - data_frame(&msg).payload.len();
        let mut bad = msg[..header_len].to_vec();
        bad.extend_from_slice(&bomb);
        bad[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4]
            .copy_from_slice(&(bomb.len() as u32).to_le_bytes());
        reseal_for_fuzzing(&mut bad);
        let f = data_frame(&bad);
        let why = frame_error(f.verify());
        assert!(why.contains("does not decompress into 4096 bytes"), "{why}");
        // And one that decompresses to fewer bytes than declared is refused too.
        let short = zstd::bulk::compress(&small[..4000], 1).unwrap();
        let mut bad = msg[..header_len].to_vec();
        bad.extend_from_slice(&short);
        bad[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4]
            .copy_from_slice(&(short.len() as u32).to_le_bytes());
        reseal_for_fuzzing(&mut bad);
        let why = frame_error(data_frame(&bad).verify());
        assert!(
            why.contains("decompresses to 4000 bytes, not 4096"),
            "{why}"
        );
    }

    #[test]
    fn inconsistent_headers_are_refused_with_a_reason() {
        let raw = encode_data(VOL, 1, 1, 0, 0, &random(4096, 10), 1).unwrap();
        let zero = encode_zero(VOL, 1, 1, 0, 0, 4096).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (forge(&raw, 0, b"XRYF"), "bad magic"),
            (forge(&raw, 4, &[2]), "version 2"),
            (forge(&raw, 5, &[3]), "unknown message kind 3"),
            (forge(&raw, 6, &[0]), "name length 0"),
            (forge(&raw, 6, &[65]), "name length 65"),
            (forge(&raw, 7, &[1]), "reserved prefix byte"),
            (forge(&raw, OFF_ENCODING, &[0]), "unknown encoding 0"),
            (forge(&raw, OFF_ENCODING, &[5]), "unknown encoding 5"),
            (forge(&raw, OFF_ENCODING + 1, &[1]), "reserved bytes"),
            (forge(&raw, OFF_LENGTH, &0u32.to_le_bytes()), "length 0"),
            (
                forge(&raw, PREFIX_LEN + 24, &u64::MAX.to_le_bytes()),
                "overflows",
            ),
            (
                forge(&raw, OFF_ENCODING, &[2]),
                "zstd frame of length 4096 cannot have a 4096-byte payload",
            ),
            (
                forge(&raw, OFF_ENCODING, &[3]),
                "zero frame of length 4096 cannot have a 4096-byte payload",
            ),
            (
                forge(&raw, OFF_PAYLOAD_LEN, &4095u32.to_le_bytes()),
                "raw frame",
            ),
            (
                forge(&zero, OFF_PAYLOAD_LEN, &1u32.to_le_bytes()),
                "zero frame",
            ),
            (
                forge(&raw, PREFIX_LEN + DATA_BODY_LEN, b"."),
                "not a valid volume name",
            ),
            (
                forge(&raw, PREFIX_LEN + DATA_BODY_LEN, &[0xc3]),
                "not a valid volume name",
            ),
            (
                {
                    let mut b = raw.clone();
                    b[PREFIX_LEN] ^= 1;
                    b
                },
                "header checksum mismatch",
            ),
        ];
        for (bad, expect) in cases {
            let why = frame_error(decode(&bad));
            assert!(why.contains(expect), "expected {expect:?} in {why:?}");
        }
        // Fields only verify can judge.
        let bad = forge(&zero, OFF_XXH3, &1u64.to_le_bytes());
        let why = frame_error(data_frame(&bad).verify());
        assert!(why.contains("must carry xxh3"), "{why}");
    }

    #[test]
    fn a_data_hash_mismatch_names_the_frame() {
        let mut msg = encode_data(VOL, 3, 7, 42, 1 << 20, &random(4096, 11), 1).unwrap();
        *msg.last_mut().unwrap() ^= 1;
        let why = frame_error(data_frame(&msg).verify());
        for part in [
            "frame 42",
            "volume 'vm1-disk0'",
            "epoch 3",
            "generation 7",
            "offset 1048576",
            "corrupted in transit",
        ] {
            assert!(why.contains(part), "{part:?} missing from {why:?}");
        }
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf3a1);
        let seeds: Vec<Vec<u8>> = samples().into_iter().map(|(m, _)| m).collect();
        let (mut decoded, mut verified) = (0, 0);
        for i in 0..6000 {
            let mut bytes = match i % 3 {
                // Pure noise, sometimes behind a valid prefix so it reaches the header checks.
                0 => {
                    let mut b = random(rng.random_range(0..200), rng.random());
                    if rng.random_bool(0.5) && b.len() >= 8 {
                        b[..4].copy_from_slice(&MAGIC);
                        b[4] = VERSION;
                        b[5] = rng.random_range(1..=2);
                        b[6] = rng.random_range(1..=64);
                        b[7] = 0;
                    }
                    b
                }
                // A valid message with a few bytes changed, resized or not.
                _ => {
                    let mut b = seeds[rng.random_range(0..seeds.len())].clone();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..b.len());
                        b[at] = rng.random();
                    }
                    if rng.random_bool(0.2) {
                        b.truncate(rng.random_range(0..b.len()));
                    }
                    if rng.random_bool(0.1) {
                        b.extend_from_slice(&random(rng.random_range(0..64), rng.random()));
                    }
                    b
                }
            };
            // Resealing lets changes to header fields reach the checks behind the checksum.
            if rng.random_bool(0.7) {
                reseal_for_fuzzing(&mut bytes);
            }
            if let Ok(m) = decode(&bytes) {
                decoded += 1;
                if let Message::Data(f) = m {
                    if f.verify().is_ok() {
                        verified += 1;
                    }
                }
            }
        }
        // Guard against a loop that never gets past the first check.
        assert!(decoded > 200, "only {decoded} of 6000 decoded");
        assert!(verified > 20, "only {verified} of 6000 verified");
    }

    fn sizer(max_message: usize) -> FrameSizer {
        FrameSizer::new(max_message).unwrap()
    }

    fn pieces(s: FrameSizer, extents: &[(u64, u64)]) -> Vec<(u64, u32)> {
        s.pieces(extents.iter().copied())
            .map(|p| (p.offset, p.length))
            .collect()
    }

    #[test]
    fn sizer_fits_the_longest_header_and_aligns_to_blocks() {
        let s = sizer(DEFAULT_MAX_MESSAGE);
        assert_eq!(s.max_piece(), 1020 * 1024);
        assert_eq!(sizer(64 << 20).max_piece(), MAX_LENGTH);
        assert_eq!(sizer(MAX_DATA_HEADER_LEN + 4096).max_piece(), 4096);
        for too_small in [0, 4096, MAX_DATA_HEADER_LEN + 4095] {
            let e = FrameSizer::new(too_small).unwrap_err();
            assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        }
        // A full piece of incompressible data under the longest name fits the message.
        let data = random(s.max_piece() as usize, 12);
        let name = "n".repeat(MAX_NAME_LEN);
        let msg = encode_data(&name, 1, 1, 0, 0, &data, 1).unwrap();
        assert!(msg.len() <= DEFAULT_MAX_MESSAGE, "{}", msg.len());
    }

    #[test]
    fn sizer_splits_merges_and_widens() {
        let s = sizer(MAX_DATA_HEADER_LEN + 8192); // 8 KiB pieces
        assert_eq!(pieces(s, &[]), vec![]);
        assert_eq!(pieces(s, &[(0, 0), (4096, 0)]), vec![]);
        // One long extent is split.
        assert_eq!(
            pieces(s, &[(4096, 20480)]),
            vec![(4096, 8192), (12288, 8192), (20480, 4096)]
        );
        // Touching extents become one run; a gap starts another.
        assert_eq!(
            pieces(s, &[(0, 4096), (4096, 4096), (8192, 4096), (65536, 4096)]),
            vec![(0, 8192), (8192, 4096), (65536, 4096)]
        );
        // Unaligned extents are widened, and what they then share is shipped once.
        assert_eq!(
            pieces(s, &[(100, 10), (200, 10), (4000, 200)]),
            vec![(0, 8192)]
        );
        assert_eq!(
            pieces(s, &[(0, 8192 - 100), (8192 - 50, 10), (8192, 1)]),
            vec![(0, 8192), (8192, 4096)]
        );
        // Out-of-order extents are all shipped.
        assert_eq!(
            pieces(s, &[(65536, 4096), (0, 4096)]),
            vec![(65536, 4096), (0, 4096)]
        );
    }

    #[test]
    fn sizer_covers_exactly_the_extents() {
        const BLOCKS: usize = 512;
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for round in 0..300 {
            let s = sizer(MAX_DATA_HEADER_LEN + 4096 * rng.random_range(1..20));
            let mut dirty = [false; BLOCKS];
            let mut extents = Vec::new();
            let mut block = 0;
            while block < BLOCKS {
                block += rng.random_range(0..8);
                if block >= BLOCKS {
                    break;
                }
                let n = rng.random_range(0..12).min(BLOCKS.saturating_sub(block));
                if n > 0 || rng.random_bool(0.1) {
                    extents.push((block as u64 * BLOCK_SIZE, n as u64 * BLOCK_SIZE));
                    dirty[block..block + n].fill(true);
                }
                block += n;
            }
            let mut shipped = [false; BLOCKS];
            for p in s.pieces(extents.iter().copied()) {
                assert!(p.length > 0 && p.length <= s.max_piece(), "{round}: {p:?}");
                assert_eq!(p.offset % BLOCK_SIZE, 0, "{round}: {p:?}");
                assert_eq!(u64::from(p.length) % BLOCK_SIZE, 0, "{round}: {p:?}");
                let first = (p.offset / BLOCK_SIZE) as usize;
                let blocks = &mut shipped[first..first + (p.length as u64 / BLOCK_SIZE) as usize];
                assert!(
                    !blocks.contains(&true),
                    "{round}: {p:?} ships a block twice"
                );
                blocks.fill(true);
            }
            assert_eq!(shipped, dirty, "{round}: {extents:?}");
        }
    }
}
