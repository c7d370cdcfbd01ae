//! The staged tail of a generation committed early: the changes that were acknowledged to the
//! source but not yet written in place when the generation's commit arrived.
//!
//! Committing waits for the data to be durable, not for it to be in place: at the commit, what
//! the replica's applier still holds (queued, or in a batch being written) goes into one file,
//! `apply.staged`, written at once and synced, while the data file's writes so far are synced
//! beside it; then the metadata records the generation as complete and the source gets its
//! answer. The applier goes on writing the tail in place (before-images first, under the
//! generation's journal, as before), and readers meanwhile get the tail from memory
//! (`ApplyTxn::overlay`), so the export shows the committed generation from the moment it is
//! recorded. Once the tail is in place and durable, the file is invalidated (its header page
//! zeroed) and the journal goes, kept as the recovery point if the replica keeps points.
//!
//! After a crash in between, the volume's open finds a valid staged tail for the generation its
//! metadata says is complete and writes it again (rolling forward; writing the same bytes twice
//! is harmless, and blocks already journaled are not journaled again).
//!
//! The file is reused from one generation to the next (it is only ever overwritten from its
//! start), so a commit's sync finds its blocks allocated and has only data to write. Layout:
//! a 4 KiB header page (`MAGIC`, epoch, base, target, record count, body length, xxh3 of the
//! body, xxh3 of those), then the body: per change `kind, offset, length` (u64 each) and, for
//! data, its bytes. Padded to a multiple of 4 KiB; a torn or stale file fails its checksums and
//! is ignored.

use crate::apply_txn::{open_direct, Pending, TxnId, ALIGN};
use crate::error::{Error, IoContext, Result};
use crate::volume::ApplyOp;
use parking_lot::Mutex;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const FILE: &str = "apply.staged";
const MAGIC: &[u8; 8] = b"FERRYST1";
const HEADER_FIELDS: usize = 8 + 7 * 8;
const KIND_DATA: u64 = 0;
const KIND_ZERO: u64 = 1;
const RECORD_HEADER_LEN: usize = 24;

/// One verified change of a generation, owning its bytes (a slice of the message it arrived in,
/// or its decompressed data).
#[derive(Clone)]
pub enum Change {
    Data { offset: u64, data: bytes::Bytes },
    Zero { offset: u64, length: u64 },
}

impl Change {
    /// Bytes of data it holds (a zero run holds none).
    pub fn data_len(&self) -> usize {
        match self {
            Change::Data { data, .. } => data.len(),
            Change::Zero { .. } => 0,
        }
    }

    pub fn op(&self) -> ApplyOp<'_> {
        match self {
            Change::Data { offset, data } => ApplyOp::Data {
                offset: *offset,
                data,
            },
            Change::Zero { offset, length } => ApplyOp::Zero {
                offset: *offset,
                length: *length,
            },
        }
    }
}

/// Page-aligned memory for the file's image, kept warm from one commit to the next (fresh pages
/// of this machine kind cost more to touch than to write).
static IMAGE: Mutex<Option<Pending>> = Mutex::new(None);

/// Once per process, on a thread of its own: make the staging memory `bytes` long and touch it,
/// so that the first commits do not pay for fresh pages (on this machine kind a fresh page costs
/// more to touch than to write to disk; see `apply_txn`). A tail is at most the applier's batch
/// and queue; a longer one grows the memory then.
pub fn warm_up(bytes: usize) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("ferry-stage-warm".into())
            .spawn(move || {
                let mut slot = IMAGE.lock();
                let image = slot.get_or_insert_with(Pending::default);
                if image.capacity() < bytes {
                    // Growing fills the new pages (with zeroes): that is the touch.
                    image.clear();
                    image.grow(bytes);
                    image.clear();
                }
            });
    });
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Write `tail`, the unapplied changes of the generation `id` about to be committed, to the
/// volume's staged-tail file in `dir` and make it durable.
pub fn write(dir: &Path, id: TxnId, tail: &[Change]) -> Result<()> {
    let mut slot = IMAGE.lock();
    let image = slot.get_or_insert_with(Pending::default);
    image.clear();
    image.grow(ALIGN as usize).fill(0);
    for c in tail {
        let op = c.op();
        let kind = match c {
            Change::Data { .. } => KIND_DATA,
            Change::Zero { .. } => KIND_ZERO,
        };
        let head = image.grow(RECORD_HEADER_LEN);
        for (i, v) in [kind, op.offset(), op.length()].into_iter().enumerate() {
            head[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Change::Data { data, .. } = c {
            image.grow(data.len()).copy_from_slice(data);
        }
    }
    let body_len = image.len() - ALIGN as usize;
    let pad = (ALIGN as usize - image.len() % ALIGN as usize) % ALIGN as usize;
    image.grow(pad).fill(0);
    let body_sum = xxhash_rust::xxh3::xxh3_64(&image.bytes()[ALIGN as usize..][..body_len]);
    image.bytes_mut()[..HEADER_FIELDS].copy_from_slice(&header(
        id,
        tail.len() as u64,
        body_len as u64,
        body_sum,
    ));
    write_image(dir, image.bytes())
}

fn header(id: TxnId, count: u64, body_len: u64, body_sum: u64) -> [u8; HEADER_FIELDS] {
    let mut h = [0u8; HEADER_FIELDS];
    h[..8].copy_from_slice(MAGIC);
    for (i, v) in [id.epoch, id.base, id.target, count, body_len, body_sum]
        .into_iter()
        .enumerate()
    {
        h[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&h[..HEADER_FIELDS - 8]);
    h[HEADER_FIELDS - 8..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Write `image` (page-aligned, whole pages) at the start of the file, synced (through
/// `O_DIRECT` where the file system takes it).
fn write_image(dir: &Path, image: &[u8]) -> Result<()> {
    let p = path(dir);
    let existed = p.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .ctx(|| format!("cannot open {}", p.display()))?;
    let written = match open_direct(&p) {
        Some(d) => match d.write_all_at(image, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => file.write_all_at(image, 0),
            r => r,
        },
        None => file.write_all_at(image, 0),
    };
    written.ctx(|| format!("cannot write {}", p.display()))?;
    file.sync_data()
        .ctx(|| format!("cannot fsync {}", p.display()))?;
    if !existed {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("cannot fsync {}", dir.display()))?;
    }
    Ok(())
}

/// The staged tail in `dir`, if there is a whole one: its generation and its changes, in the
/// order they were applied.
pub fn read(dir: &Path) -> Result<Option<(TxnId, Vec<Change>)>> {
    let p = path(dir);
    let file = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot open {}", p.display()), e)),
    };
    // The header first: an invalidated file (the usual case) costs one page.
    let mut h = [0u8; HEADER_FIELDS];
    if file.read_exact_at(&mut h, 0).is_err() {
        return Ok(None);
    }
    let Some((id, count, body_len, body_sum)) = parse_header(&h) else {
        return Ok(None);
    };
    let mut body = vec![0u8; body_len];
    if file.read_exact_at(&mut body, ALIGN).is_err()
        || xxhash_rust::xxh3::xxh3_64(&body) != body_sum
    {
        return Ok(None);
    }
    Ok(parse_body(&bytes::Bytes::from(body), count).map(|changes| (id, changes)))
}

/// `(id, record count, body length, body checksum)` of a whole header.
fn parse_header(h: &[u8; HEADER_FIELDS]) -> Option<(TxnId, u64, usize, u64)> {
    if &h[..8] != MAGIC {
        return None;
    }
    let field = |i: usize| u64::from_le_bytes(h[8 + i * 8..16 + i * 8].try_into().unwrap());
    if xxhash_rust::xxh3::xxh3_64(&h[..HEADER_FIELDS - 8]) != field(6) {
        return None;
    }
    let id = TxnId {
        epoch: field(0),
        base: field(1),
        target: field(2),
    };
    // A body larger than any tail (the applier's queue and a batch) is not one.
    let body_len = usize::try_from(field(4)).ok().filter(|n| *n <= 1 << 30)?;
    Some((id, field(3), body_len, field(5)))
}

/// The `count` changes of a checksummed body.
fn parse_body(body: &bytes::Bytes, count: u64) -> Option<Vec<Change>> {
    let mut changes = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut at = 0usize;
    for _ in 0..count {
        let head = body.get(at..at + RECORD_HEADER_LEN)?;
        let f = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap());
        let (kind, offset, length) = (f(0), f(1), f(2));
        at += RECORD_HEADER_LEN;
        match kind {
            KIND_DATA => {
                let end = at.checked_add(usize::try_from(length).ok()?)?;
                if end > body.len() {
                    return None;
                }
                changes.push(Change::Data {
                    offset,
                    data: body.slice(at..end),
                });
                at = end;
            }
            KIND_ZERO => changes.push(Change::Zero { offset, length }),
            _ => return None,
        }
    }
    Some(changes)
}

/// The staged tail is in place and durable: zero the file's header page (synced), so that no
/// open writes it again. The file stays, for the next commit to reuse.
pub fn invalidate(dir: &Path) -> Result<()> {
    let p = path(dir);
    let file = match std::fs::OpenOptions::new().write(true).open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot open {}", p.display()), e)),
    };
    file.write_all_at(&[0u8; ALIGN as usize], 0)
        .ctx(|| format!("cannot write {}", p.display()))?;
    file.sync_data()
        .ctx(|| format!("cannot fsync {}", p.display()))
}

/// Replace, in `buf` (the replica read at `offset`), every byte `tail` changes, later changes
/// over earlier ones.
pub fn overlay(tail: &[Change], offset: u64, buf: &mut [u8]) {
    let end = offset + buf.len() as u64;
    for c in tail {
        let op = c.op();
        let (from, to) = (
            op.offset().max(offset),
            (op.offset() + op.length()).min(end),
        );
        if from >= to {
            continue;
        }
        let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
        match c {
            Change::Data { data, .. } => {
                let at = (from - op.offset()) as usize;
                piece.copy_from_slice(&data[at..at + piece.len()]);
            }
            Change::Zero { .. } => piece.fill(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> TxnId {
        TxnId {
            epoch: 3,
            base: 7,
            target: 8,
        }
    }

    fn tail() -> Vec<Change> {
        vec![
            Change::Data {
                offset: 65536,
                data: vec![5u8; 70000].into(),
            },
            Change::Zero {
                offset: 0,
                length: 4096,
            },
            Change::Data {
                offset: 65536 + 100,
                data: vec![6u8; 10].into(),
            },
        ]
    }

    #[test]
    fn a_staged_tail_reads_back_until_invalidated_and_a_damaged_one_never() {
        let t = tempfile::tempdir().unwrap();
        assert!(read(t.path()).unwrap().is_none());
        write(t.path(), id(), &tail()).unwrap();
        let (got, changes) = read(t.path()).unwrap().unwrap();
        assert_eq!(got, id());
        let mut want = vec![9u8; 200_000];
        let mut have = want.clone();
        overlay(&tail(), 0, &mut want);
        overlay(&changes, 0, &mut have);
        assert_eq!(have, want);
        assert_eq!(&want[..4096], &[0u8; 4096][..]);
        assert_eq!(want[65536 + 100], 6);
        assert_eq!(want[65536 + 69999], 5);
        // A smaller tail over the file: what is past it is not read as part of it.
        write(t.path(), id(), &tail()[1..2]).unwrap();
        assert_eq!(read(t.path()).unwrap().unwrap().1.len(), 1);
        // A flipped byte in the body: the whole file is ignored, not half applied.
        write(t.path(), id(), &tail()).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path(t.path()))
            .unwrap();
        f.write_all_at(&[0xff], ALIGN + 30).unwrap();
        assert!(read(t.path()).unwrap().is_none());
        write(t.path(), id(), &tail()).unwrap();
        invalidate(t.path()).unwrap();
        assert!(read(t.path()).unwrap().is_none());
    }
}
