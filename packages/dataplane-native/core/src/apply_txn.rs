//! `ApplyTxn`: applying one generation to a replica atomically, with an undo journal.
//!
//! Before a block of the replica is overwritten for the first time in a transaction, its
//! before-image is appended to the journal; the journal is made durable before the data writes
//! of a batch (`sync`). Commit makes the data durable, records the new generation in the volume's
//! metadata (the commit point), then deletes the journal. After a crash, a journal whose target
//! generation is not the committed one is rolled back: the replica is again exactly its last
//! complete generation, never a mix. While a transaction runs, readers get the before-images
//! (`overlay`), so the replica's export keeps showing the last complete generation. A
//! generation committed before its last changes were in place (`staged_tail`) keeps its
//! transaction until they are: readers then get those changes instead (`set_committed`).
//!
//! Appends: a batch's records are gathered in memory (page-aligned) and written by `sync` in one
//! go, padded with a padding record to a multiple of 4 KiB, through a second descriptor opened
//! with `O_DIRECT` where the file system allows it. The journal is written once and read only to
//! undo; through the page cache, every append would fill new cache pages, which costs more than
//! the write itself (on a virtual machine whose memory is backed lazily, several times more).
//! The header and the first padding record fill the first 4 KiB, written through the page cache
//! at `begin`; records start at [`FIRST_RECORD`].
//!
//! Resuming: the blocks wholly applied so far form a *progress map*, saved now and then
//! (`apply.progress`, only after the data it vouches for is durable). After the link, the
//! source or this site restarts, the transaction is kept (`reopen`) instead of rolled back, and
//! the source skips the blocks of the map it has not changed since the map's *reference*
//! generation — the first generation this transaction was begun for. A resumed transaction moves
//! on to the source's newer generation (`retarget`); the reference stays, so every block of the
//! map holds content the source has not changed since the reference.

use crate::bitmap::{write_atomic, DirtyBitmap, GenerationId};
use crate::error::{Error, IoContext, Result};
use crate::staged_tail::Change;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const JOURNAL_FILE: &str = "apply.journal";
const MAGIC: &[u8; 8] = b"FERRYUJ1";
const HEADER_LEN: u64 = 64;
const RECORD_MAGIC: u32 = 0x5552_4543; // "UREC"
const RECORD_HEADER_LEN: u64 = 4 + 8 + 4 + 8;
/// Direct appends are multiples of this long, at offsets that are multiples of it.
pub(crate) const ALIGN: u64 = 4096;
/// Where the first before-image record starts (the header and a padding record before it).
const FIRST_RECORD: u64 = ALIGN;
/// The block of a padding record: it fills an append up to [`ALIGN`] and is never restored.
const PAD_BLOCK: u64 = u64::MAX;
const PROGRESS_FILE: &str = "apply.progress";
const PROGRESS_MAGIC: &[u8; 8] = b"FERRYAP1";
const PROGRESS_HEADER_LEN: usize = 8 + 4 * 8 + 8;
/// Most blocks kept as covered in part (see `ApplyTxn::partial`); more only cost resends.
const MAX_PARTIAL_BLOCKS: usize = 4096;
/// Save the progress map after this many bytes applied, or this long, whichever comes first.
const PROGRESS_EVERY_BYTES: u64 = 64 << 20;
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What a journal is for: moving a replica from `base` to `target` under `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnId {
    pub epoch: u64,
    pub base: u64,
    pub target: u64,
}

struct Index {
    /// block -> offset of its before-image record's data in the journal (at or past `end`: still
    /// in `pending`).
    blocks: HashMap<u64, u64>,
    /// Where the journal file ends: the next append goes there.
    end: u64,
    /// Records gathered since the last `sync`, to be appended at `end`.
    pending: Pending,
    /// Bytes of before-image records (headers included, padding not).
    records: u64,
}

/// One 4 KiB page of memory, aligned as `O_DIRECT` needs.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; ALIGN as usize]);

/// Bytes gathered in page-aligned memory, kept (warm) from one batch to the next.
#[derive(Default)]
pub(crate) struct Pending {
    pages: Vec<Page>,
    len: usize,
}

impl Pending {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes it can hold without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.pages.len() * ALIGN as usize
    }

    /// Empty again, keeping the memory.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `Page` is plain bytes without padding, the Vec's pages are contiguous, and
        // `len` never exceeds them.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }

    /// The bytes gathered so far, to change in place.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// `n` more bytes at the end, their content unspecified: the caller fills them.
    pub(crate) fn grow(&mut self, n: usize) -> &mut [u8] {
        let need = (self.len + n).div_ceil(ALIGN as usize);
        if self.pages.len() < need {
            self.pages.resize(need, Page([0; ALIGN as usize]));
        }
        // SAFETY: as in `bytes`, over every page held.
        let all = unsafe {
            std::slice::from_raw_parts_mut(
                self.pages.as_mut_ptr().cast::<u8>(),
                self.pages.len() * ALIGN as usize,
            )
        };
        let start = self.len;
        self.len += n;
        &mut all[start..start + n]
    }
}

/// Fill `rec` (a record's header and its `rec.len() - RECORD_HEADER_LEN` bytes of data, already
/// in place) with its header.
fn seal_record(rec: &mut [u8], block: u64) {
    let (head, img) = rec.split_at_mut(RECORD_HEADER_LEN as usize);
    head[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    head[4..12].copy_from_slice(&block.to_le_bytes());
    head[12..16].copy_from_slice(&(img.len() as u32).to_le_bytes());
    head[16..24].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(img).to_le_bytes());
}

/// A padding record of `len` bytes (at least a header's) at `at` of `file`.
fn write_padding(file: &File, path: &Path, at: u64, len: u64) -> Result<()> {
    let mut rec = vec![0u8; len as usize];
    seal_record(&mut rec, PAD_BLOCK);
    file.write_all_at(&rec, at)
        .ctx(|| format!("cannot write {}", path.display()))
}

pub struct ApplyTxn {
    /// The target changes when a resumed transaction moves on to a newer generation.
    id: Mutex<TxnId>,
    /// The generation the progress map's blocks are known to match (see the module doc).
    reference: u64,
    size: u64,
    granularity: u64,
    journal: File,
    /// The journal opened with `O_DIRECT` for appends; `None` where the file system refuses it
    /// (appends then go through `journal`).
    direct: Option<File>,
    path: PathBuf,
    index: Mutex<Index>,
    /// Blocks wholly applied (the progress map).
    applied: DirtyBitmap,
    /// Blocks applied only in part so far, with the byte runs applied of each. The source's
    /// pieces (1 MiB less a header, in 4 KiB units) rarely end on a block boundary, so nearly
    /// every frame leaves one block split with the next: once its runs cover it, it joins the map.
    /// In memory only: a lost entry costs a resend of that block, never correctness.
    partial: Mutex<HashMap<u64, Vec<(u64, u64)>>>,
    /// Bytes applied since the map was last saved, and when that was.
    unsaved: Mutex<(u64, std::time::Instant)>,
    /// Every change of the generation was announced at its `begin` and its before-images asked
    /// of the disk then: the applier need not ask again.
    read_ahead: std::sync::atomic::AtomicBool,
    /// Set when the generation is committed with a staged tail (see `staged_tail`): the changes
    /// not yet in place, which readers then get instead of the before-images.
    committed_tail: parking_lot::RwLock<Option<std::sync::Arc<Vec<Change>>>>,
}

/// What a resumable transaction tells the source: its generations and the blocks it holds.
pub struct Progress {
    pub id: TxnId,
    pub reference: u64,
    pub applied: DirtyBitmap,
}

fn header(id: TxnId, size: u64, granularity: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(MAGIC);
    for (i, v) in [id.epoch, id.base, id.target, size, granularity]
        .iter()
        .enumerate()
    {
        h[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&h[0..48]);
    h[48..56].copy_from_slice(&sum.to_le_bytes());
    h
}

fn parse_header(h: &[u8]) -> Option<(TxnId, u64, u64)> {
    if h.len() < HEADER_LEN as usize || &h[0..8] != MAGIC {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
    if xxhash_rust::xxh3::xxh3_64(&h[0..48]) != u(48) {
        return None;
    }
    Some((
        TxnId {
            epoch: u(8),
            base: u(16),
            target: u(24),
        },
        u(32),
        u(40),
    ))
}

impl ApplyTxn {
    pub fn journal_path(dir: &Path) -> PathBuf {
        dir.join(JOURNAL_FILE)
    }

    pub fn begin(dir: &Path, id: TxnId, size: u64, granularity: u64) -> Result<ApplyTxn> {
        let path = Self::journal_path(dir);
        let journal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ctx(|| format!("cannot create {}", path.display()))?;
        journal
            .write_all_at(&header(id, size, granularity), 0)
            .ctx(|| format!("cannot write {}", path.display()))?;
        write_padding(&journal, &path, HEADER_LEN, FIRST_RECORD - HEADER_LEN)?;
        journal
            .sync_all()
            .ctx(|| format!("cannot fsync {}", path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("cannot fsync {}", dir.display()))?;
        let _ = std::fs::remove_file(Self::progress_path(dir));
        let direct = (id.base > 0).then(|| open_direct(&path)).flatten();
        Ok(ApplyTxn {
            id: Mutex::new(id),
            reference: id.target,
            size,
            granularity,
            journal,
            direct,
            path,
            index: Mutex::new(Index {
                blocks: HashMap::new(),
                end: FIRST_RECORD,
                pending: Pending::default(),
                records: 0,
            }),
            applied: DirtyBitmap::new(size, granularity),
            partial: Mutex::new(HashMap::new()),
            unsaved: Mutex::new((0, std::time::Instant::now())),
            read_ahead: std::sync::atomic::AtomicBool::new(false),
            committed_tail: parking_lot::RwLock::new(None),
        })
    }

    pub fn progress_path(dir: &Path) -> PathBuf {
        dir.join(PROGRESS_FILE)
    }

    pub fn id(&self) -> TxnId {
        *self.id.lock()
    }

    /// The first generation of a replica: there is no complete generation to protect, so
    /// nothing is journaled; undoing it empties the replica, and readers see zeroes meanwhile.
    pub fn is_initial(&self) -> bool {
        self.id().base == 0
    }

    /// The progress map and what it refers to.
    pub fn progress(&self) -> Progress {
        Progress {
            id: self.id(),
            reference: self.reference,
            applied: self.applied.duplicate(),
        }
    }

    /// `[offset, offset+length)` of `data` was written by this transaction: record its whole
    /// blocks in the progress map — with the blocks this write completes that earlier ones
    /// covered in part — and save the map when enough has been applied since the last save.
    pub fn applied(&self, data: &File, offset: u64, length: u64) -> Result<()> {
        self.applied.mark_covered(offset, length);
        self.applied_in_part(offset, length);
        let due = {
            let mut u = self.unsaved.lock();
            u.0 += length;
            let due = u.0 >= PROGRESS_EVERY_BYTES || u.1.elapsed() >= PROGRESS_EVERY;
            if due {
                *u = (0, std::time::Instant::now());
            }
            due
        };
        if due {
            self.save_progress(data)?;
        }
        Ok(())
    }

    /// Track the edge blocks `[offset, offset+length)` covers only in part; a block whose runs
    /// now cover it whole joins the map. Every run was written by this transaction, as one write
    /// covering the block would have been: a block in the map is as good either way. (Runs
    /// written before a `retarget` may belong to the older generation; so may whole blocks of the
    /// map, and the source resends every block it changed since the reference anyway.)
    fn applied_in_part(&self, offset: u64, length: u64) {
        let end = (offset + length).min(self.size);
        if offset >= end {
            return;
        }
        let g = self.granularity;
        let (first, last) = (offset / g, (end - 1) / g);
        let mut partial = self.partial.lock();
        for block in if first == last {
            vec![first]
        } else {
            vec![first, last]
        } {
            let (start, stop) = (block * g, ((block + 1) * g).min(self.size));
            let run = (offset.max(start), end.min(stop));
            if run == (start, stop) {
                partial.remove(&block);
                continue;
            }
            if !partial.contains_key(&block) && partial.len() >= MAX_PARTIAL_BLOCKS {
                continue;
            }
            let runs = partial.entry(block).or_default();
            runs.push(run);
            runs.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
            for &(s, e) in runs.iter() {
                match merged.last_mut() {
                    Some(m) if s <= m.1 => m.1 = m.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            if merged == [(start, stop)] {
                partial.remove(&block);
                self.applied.mark_blocks(block, block);
            } else {
                *runs = merged;
            }
        }
    }

    /// Save the progress map. The map is copied first and the data made durable after, so the
    /// saved map never vouches for a write that could still be lost.
    pub fn save_progress(&self, data: &File) -> Result<()> {
        let snapshot = self.applied.duplicate();
        data.sync_data()
            .ctx(|| "cannot fsync the replica".to_string())?;
        let dir = self.path.parent().expect("journal has a directory");
        write_atomic(
            &Self::progress_path(dir),
            &encode_progress(self.id(), self.reference, &snapshot),
        )
    }

    /// Move this transaction on to generation `target` of the same epoch and base (the source
    /// resumed with a newer cut). The journal header names the new target before the map does,
    /// so a crash in between loses the map (a full resend), never correctness.
    pub fn retarget(&self, target: u64, data: &File) -> Result<()> {
        let mut id = self.id.lock();
        let next = TxnId { target, ..*id };
        self.journal
            .write_all_at(&header(next, self.size, self.granularity), 0)
            .ctx(|| format!("cannot write {}", self.path.display()))?;
        self.journal
            .sync_data()
            .ctx(|| format!("cannot fsync {}", self.path.display()))?;
        *id = next;
        drop(id);
        self.save_progress(data)
    }

    /// After a restart: take up the transaction left in `dir` if its journal and progress map
    /// agree and it was not committed; `None` otherwise (the caller then runs `recover`).
    pub fn reopen(dir: &Path, committed: impl Fn(TxnId) -> bool) -> Result<Option<ApplyTxn>> {
        Self::take_up(dir, |id| !committed(id), true)
    }

    /// After a restart: take up the transaction for `(epoch, target)` that its group decided to
    /// commit before the stop, so the caller can finish committing it. Its progress map, if any,
    /// comes along.
    pub fn reopen_to_commit(dir: &Path, epoch: u64, target: u64) -> Result<Option<ApplyTxn>> {
        Self::take_up(dir, |id| id.epoch == epoch && id.target == target, false)
    }

    fn take_up(
        dir: &Path,
        wanted: impl Fn(TxnId) -> bool,
        need_progress: bool,
    ) -> Result<Option<ApplyTxn>> {
        let path = Self::journal_path(dir);
        let Ok(journal) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN as usize];
        let Some((id, size, granularity)) = journal
            .read_exact_at(&mut h, 0)
            .ok()
            .and_then(|_| parse_header(&h))
        else {
            return Ok(None);
        };
        if !wanted(id) || !granularity.is_power_of_two() {
            return Ok(None);
        }
        let progress = std::fs::read(Self::progress_path(dir))
            .ok()
            .and_then(|b| decode_progress(&b, size, granularity))
            .filter(|(pid, _, _)| *pid == id);
        let (reference, applied) = match progress {
            Some((_, reference, applied)) => (reference, applied),
            None if need_progress => return Ok(None),
            None => (id.target, DirtyBitmap::new(size, granularity)),
        };
        // Rebuild the index of before-images; a torn tail protected no write and is cut off.
        let len = journal
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?
            .len();
        let mut blocks = HashMap::new();
        let mut records = 0;
        let mut at = HEADER_LEN;
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        while at + RECORD_HEADER_LEN <= len {
            journal
                .read_exact_at(&mut head, at)
                .ctx(|| format!("reading {}", path.display()))?;
            let Some((block, n)) = parse_record(&journal, &head, at, len) else {
                break;
            };
            if block != PAD_BLOCK {
                blocks.insert(block, at + RECORD_HEADER_LEN);
                records += RECORD_HEADER_LEN + n;
            }
            at += RECORD_HEADER_LEN + n;
        }
        journal
            .set_len(at)
            .ctx(|| format!("cannot truncate {}", path.display()))?;
        // Direct appends only from an aligned end (a journal of an older version may not be).
        let direct = (at.is_multiple_of(ALIGN) && id.base > 0)
            .then(|| open_direct(&path))
            .flatten();
        Ok(Some(ApplyTxn {
            id: Mutex::new(id),
            reference,
            size,
            granularity,
            journal,
            direct,
            path,
            index: Mutex::new(Index {
                blocks,
                end: at,
                pending: Pending::default(),
                records,
            }),
            applied,
            partial: Mutex::new(HashMap::new()),
            unsaved: Mutex::new((0, std::time::Instant::now())),
            read_ahead: std::sync::atomic::AtomicBool::new(false),
            committed_tail: parking_lot::RwLock::new(None),
        }))
    }

    /// The block-aligned range whose before-images `save_before_images` would read for
    /// `[offset, offset + length)`: none for an initial generation, a range past the end or one
    /// whose blocks are all journaled already.
    pub fn before_images_wanted(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        let end = (offset.checked_add(length)?).min(self.size);
        if self.is_initial() || offset >= end {
            return None;
        }
        let (first, last) = (offset / self.granularity, (end - 1) / self.granularity);
        let idx = self.index.lock();
        if (first..=last).all(|b| idx.blocks.contains_key(&b)) {
            return None;
        }
        let start = first * self.granularity;
        Some((
            start,
            ((last + 1) * self.granularity).min(self.size) - start,
        ))
    }

    /// Journal the before-images of every block of `[offset, offset+length)` not journaled yet.
    /// Not durable until `sync`.
    /// Whether every before-image this generation will journal was asked of the disk at its
    /// `begin` (see `set_read_ahead`).
    pub fn read_ahead(&self) -> bool {
        self.read_ahead.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_read_ahead(&self, all: bool) {
        self.read_ahead
            .store(all, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn save_before_images(&self, data: &File, offset: u64, length: u64) -> Result<()> {
        if length == 0 || self.is_initial() {
            return Ok(());
        }
        let end = (offset + length).min(self.size);
        let mut idx = self.index.lock();
        for block in offset / self.granularity..=(end - 1) / self.granularity {
            if idx.blocks.contains_key(&block) {
                continue;
            }
            let start = block * self.granularity;
            let len = self.granularity.min(self.size - start);
            let at = idx.end + idx.pending.len as u64;
            let rec = idx.pending.grow((RECORD_HEADER_LEN + len) as usize);
            let read = data.read_exact_at(&mut rec[RECORD_HEADER_LEN as usize..], start);
            if let Err(e) = read {
                idx.pending.len -= (RECORD_HEADER_LEN + len) as usize;
                return Err(Error::io(format!("reading before-image at {start}"), e));
            }
            seal_record(rec, block);
            idx.blocks.insert(block, at + RECORD_HEADER_LEN);
            idx.records += RECORD_HEADER_LEN + len;
        }
        Ok(())
    }

    /// Make the journaled before-images durable; call before writing the data they protect.
    pub fn sync(&self) -> Result<()> {
        if self.is_initial() {
            return Ok(());
        }
        {
            let mut idx = self.index.lock();
            if idx.pending.len > 0 {
                let at = idx.end;
                let direct = self.direct.as_ref().filter(|_| at.is_multiple_of(ALIGN));
                if direct.is_some() {
                    // Up to the next multiple of ALIGN, at least a record header long.
                    let used = at + idx.pending.len as u64;
                    let mut pad = (ALIGN - used % ALIGN) % ALIGN;
                    if pad > 0 && pad < RECORD_HEADER_LEN {
                        pad += ALIGN;
                    }
                    if pad > 0 {
                        let rec = idx.pending.grow(pad as usize);
                        rec.fill(0);
                        seal_record(rec, PAD_BLOCK);
                    }
                }
                // Written under the lock: `overlay` reads a record from `pending` until it is in
                // the file. A device that wants larger alignment refuses the direct write
                // (EINVAL): the page cache takes it then.
                let written = match direct {
                    Some(d) => match d.write_all_at(idx.pending.bytes(), at) {
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            self.journal.write_all_at(idx.pending.bytes(), at)
                        }
                        r => r,
                    },
                    None => self.journal.write_all_at(idx.pending.bytes(), at),
                };
                written.ctx(|| format!("cannot append to {}", self.path.display()))?;
                idx.end = at + idx.pending.len as u64;
                idx.pending.len = 0;
            }
        }
        self.journal
            .sync_data()
            .ctx(|| format!("cannot fsync {}", self.path.display()))
    }

    /// Replace, in `buf` (read from the replica at `offset`), every byte of a block modified by
    /// this transaction with its before-image. Call after reading the data, never before.
    /// Once the generation is committed (`set_committed`), what it changes instead: the data
    /// file holds the generation where it is applied, and `tail` holds the rest.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(tail) = self.committed_tail.read().as_ref() {
            crate::staged_tail::overlay(tail, offset, buf);
            return Ok(());
        }
        if self.is_initial() {
            buf.fill(0);
            return Ok(());
        }
        let idx = self.index.lock();
        if idx.blocks.is_empty() || buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        for block in offset / self.granularity..=(end - 1) / self.granularity {
            let Some(at) = idx.blocks.get(&block) else {
                continue;
            };
            let bstart = block * self.granularity;
            let from = offset.max(bstart);
            let to = end.min(bstart + self.granularity);
            let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let at = at + (from - bstart);
            if at >= idx.end {
                let p = (at - idx.end) as usize;
                piece.copy_from_slice(&idx.pending.bytes()[p..p + piece.len()]);
                continue;
            }
            self.journal
                .read_exact_at(piece, at)
                .ctx(|| format!("reading {}", self.path.display()))?;
        }
        Ok(())
    }

    /// The generation is committed; `tail`, its changes not yet applied in place, is staged
    /// (see `staged_tail`). From now on readers see the generation, not its before-images.
    pub fn set_committed(&self, tail: Vec<Change>) {
        *self.committed_tail.write() = Some(std::sync::Arc::new(tail));
    }

    /// Whether the generation was committed with a staged tail (it is being settled).
    pub fn committed(&self) -> bool {
        self.committed_tail.read().is_some()
    }

    /// The blocks (in units of the granularity) journaled so far: where the replica's file may
    /// no longer hold its last complete generation.
    pub fn journaled_blocks(&self) -> Vec<u64> {
        self.index.lock().blocks.keys().copied().collect()
    }

    /// Bytes of before-images journaled so far.
    pub fn journaled_bytes(&self) -> u64 {
        self.index.lock().records
    }

    /// Write every before-image back to `data` and make it durable (abort or crash recovery).
    fn roll_back(journal: &File, path: &Path, granularity: u64, data: &File) -> Result<u64> {
        let mut h = [0u8; HEADER_LEN as usize];
        journal
            .read_exact_at(&mut h, 0)
            .ctx(|| format!("reading {}", path.display()))?;
        if let Some((id, size, _)) = parse_header(&h) {
            if id.base == 0 {
                return empty_replica(data, size);
            }
        }
        let len = journal
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?
            .len();
        let mut at = HEADER_LEN;
        let mut restored = 0;
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        while at + RECORD_HEADER_LEN <= len {
            journal
                .read_exact_at(&mut head, at)
                .ctx(|| format!("reading {}", path.display()))?;
            // A torn tail: its data write never happened (the journal is synced first).
            let Some((block, n)) = parse_record(journal, &head, at, len) else {
                break;
            };
            if block == PAD_BLOCK {
                at += RECORD_HEADER_LEN + n;
                continue;
            }
            let mut img = vec![0u8; n as usize];
            journal
                .read_exact_at(&mut img, at + RECORD_HEADER_LEN)
                .ctx(|| format!("reading {}", path.display()))?;
            data.write_all_at(&img, block * granularity)
                .ctx(|| "restoring a before-image".to_string())?;
            restored += n;
            at += RECORD_HEADER_LEN + n;
        }
        data.sync_data()
            .ctx(|| "cannot fsync the replica after rollback".to_string())?;
        Ok(restored)
    }

    /// Restore the before-images of a kept journal (a recovery point's undo); the file stays.
    pub fn undo_file(path: &Path, data: &File) -> Result<u64> {
        let journal = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
        let mut h = [0u8; HEADER_LEN as usize];
        journal
            .read_exact_at(&mut h, 0)
            .ctx(|| format!("reading {}", path.display()))?;
        match parse_header(&h) {
            // An initial generation's journal would empty the replica: it is never kept.
            Some((id, _, granularity)) if id.base > 0 && granularity.is_power_of_two() => {
                Self::roll_back(&journal, path, granularity, data)
            }
            _ => Err(Error::CorruptMetadata {
                name: path.display().to_string(),
                path: path.to_path_buf(),
                why: "not an undo journal of a recovery point".into(),
            }),
        }
    }

    /// Abort: restore the before-images now and drop the journal.
    pub fn abort(self, data: &File) -> Result<u64> {
        let n = Self::roll_back(&self.journal, &self.path, self.granularity, data)?;
        self.finish()?;
        Ok(n)
    }

    /// The transaction committed (or was rolled back): drop the journal and the progress map.
    pub fn finish(self) -> Result<()> {
        let dir = self.path.parent().expect("journal has a directory");
        let _ = std::fs::remove_file(Self::progress_path(dir));
        std::fs::remove_file(&self.path).ctx(|| format!("cannot remove {}", self.path.display()))
    }

    /// At open: if a journal is left over, roll it back unless `committed` says its target
    /// generation was committed. Returns what was found.
    pub fn recover(
        dir: &Path,
        data: &File,
        committed: impl Fn(TxnId) -> bool,
    ) -> Result<Option<(TxnId, u64)>> {
        let path = Self::journal_path(dir);
        let journal = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
        };
        let mut h = [0u8; HEADER_LEN as usize];
        let (id, granularity) = match journal
            .read_exact_at(&mut h, 0)
            .ok()
            .and_then(|_| parse_header(&h))
        {
            Some((id, _, gran)) if gran.is_power_of_two() => (id, gran),
            // A journal whose header never became durable protected no write: nothing to undo.
            _ => {
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
        };
        let restored = if committed(id) {
            0
        } else {
            Self::roll_back(&journal, &path, granularity, data)?
        };
        let _ = std::fs::remove_file(Self::progress_path(dir));
        std::fs::remove_file(&path).ctx(|| format!("cannot remove {}", path.display()))?;
        Ok(Some((id, restored)))
    }
}

/// The journal at `path` opened again for direct appends, if the file system allows `O_DIRECT`.
pub(crate) fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// A whole, checksummed before-image record at `at` (header already read into `head`):
/// `(block, length)`, or `None` at a torn or damaged record.
fn parse_record(journal: &File, head: &[u8], at: u64, len: u64) -> Option<(u64, u64)> {
    let magic = u32::from_le_bytes(head[0..4].try_into().unwrap());
    let block = u64::from_le_bytes(head[4..12].try_into().unwrap());
    let n = u32::from_le_bytes(head[12..16].try_into().unwrap()) as u64;
    let sum = u64::from_le_bytes(head[16..24].try_into().unwrap());
    if magic != RECORD_MAGIC || at + RECORD_HEADER_LEN + n > len || n > 64 << 20 {
        return None;
    }
    let mut img = vec![0u8; n as usize];
    journal
        .read_exact_at(&mut img, at + RECORD_HEADER_LEN)
        .ok()?;
    (xxhash_rust::xxh3::xxh3_64(&img) == sum).then_some((block, n))
}

/// `magic, epoch, base, target, reference, xxh3 of those` + the map (a checksummed bitmap).
fn encode_progress(id: TxnId, reference: u64, map: &DirtyBitmap) -> Vec<u8> {
    let mut buf = Vec::with_capacity(PROGRESS_HEADER_LEN);
    buf.extend_from_slice(PROGRESS_MAGIC);
    for v in [id.epoch, id.base, id.target, reference] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    buf.extend_from_slice(&map.encode(GenerationId {
        epoch: id.epoch,
        generation: reference,
    }));
    buf
}

fn decode_progress(b: &[u8], size: u64, granularity: u64) -> Option<(TxnId, u64, DirtyBitmap)> {
    if b.len() < PROGRESS_HEADER_LEN || &b[0..8] != PROGRESS_MAGIC {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if xxhash_rust::xxh3::xxh3_64(&b[0..40]) != u(40) {
        return None;
    }
    let id = TxnId {
        epoch: u(8),
        base: u(16),
        target: u(24),
    };
    let (bid, map) = DirtyBitmap::decode(&b[PROGRESS_HEADER_LEN..], size, granularity).ok()?;
    (bid.epoch == id.epoch && bid.generation == u(32)).then_some((id, u(32), map))
}

/// Undo of an initial generation: the replica reads as zeroes again.
fn empty_replica(data: &File, size: u64) -> Result<u64> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            data.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            size as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "emptying the replica after an interrupted initial sync",
            std::io::Error::last_os_error(),
        ));
    }
    data.sync_data()
        .ctx(|| "cannot fsync the replica".to_string())?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: TxnId = TxnId {
        epoch: 1,
        base: 3,
        target: 4,
    };

    fn setup() -> (tempfile::TempDir, File) {
        let t = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.path().join("d"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        (t, f)
    }

    #[test]
    fn the_before_images_wanted_are_the_whole_blocks_not_yet_journaled() {
        let (t, data) = setup();
        let size = (1 << 20) - 4096;
        let txn = ApplyTxn::begin(t.path(), ID, size, 65536).unwrap();
        assert_eq!(txn.before_images_wanted(70000, 100), Some((65536, 65536)));
        assert_eq!(
            txn.before_images_wanted(65535, 2),
            Some((0, 2 * 65536)),
            "a change across a block boundary wants both blocks"
        );
        // The last block is short: the range stops at the volume's end.
        assert_eq!(
            txn.before_images_wanted(size - 10, 100),
            Some((15 * 65536, 65536 - 4096))
        );
        assert_eq!(txn.before_images_wanted(size, 4096), None, "past the end");
        assert_eq!(txn.before_images_wanted(0, 0), None);
        assert_eq!(txn.before_images_wanted(u64::MAX, 2), None);
        txn.save_before_images(&data, 70000, 100).unwrap();
        assert_eq!(
            txn.before_images_wanted(65536, 65536),
            None,
            "journaled already"
        );
        assert_eq!(
            txn.before_images_wanted(65536, 65537),
            Some((65536, 2 * 65536))
        );
        let dir = t.path().join("first");
        std::fs::create_dir(&dir).unwrap();
        let initial = TxnId {
            epoch: 1,
            base: 0,
            target: 1,
        };
        let first = ApplyTxn::begin(&dir, initial, size, 65536).unwrap();
        assert_eq!(
            first.before_images_wanted(0, 4096),
            None,
            "an initial generation journals nothing"
        );
    }

    #[test]
    fn overlay_shows_before_images_and_abort_restores() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.save_before_images(&data, 70000, 100).unwrap();
        txn.sync().unwrap();
        data.write_all_at(&[9u8; 100], 70000).unwrap();
        let mut buf = vec![0u8; 200];
        data.read_exact_at(&mut buf, 69950).unwrap();
        txn.overlay(69950, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        assert_eq!(txn.journaled_bytes(), 65536 + RECORD_HEADER_LEN);
        txn.abort(&data).unwrap();
        data.read_exact_at(&mut buf, 69950).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        assert!(!ApplyTxn::journal_path(t.path()).exists());
    }

    #[test]
    fn batches_are_appended_whole_and_aligned_and_read_back_before_and_after() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        let journal = ApplyTxn::journal_path(t.path());
        let len = || std::fs::metadata(&journal).unwrap().len();
        assert_eq!(len(), FIRST_RECORD);
        for (batch, (offset, length)) in [(0u64, 100u64), (3 * 65536, 2 * 65536)].iter().enumerate()
        {
            txn.save_before_images(&data, *offset, *length).unwrap();
            // Gathered, not yet in the file: readers get the before-images from memory.
            let mut buf = vec![0u8; 5 * 65536];
            data.read_exact_at(&mut buf, 0).unwrap();
            txn.overlay(0, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 7), "batch {batch}");
            txn.sync().unwrap();
            assert_eq!(len() % ALIGN, 0, "batch {batch}: {} bytes", len());
            data.write_all_at(&vec![batch as u8 + 1; *length as usize], *offset)
                .unwrap();
            data.read_exact_at(&mut buf, 0).unwrap();
            txn.overlay(0, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 7), "batch {batch}");
        }
        assert_eq!(txn.journaled_bytes(), 3 * (65536 + RECORD_HEADER_LEN));
        // After a crash the padding is skipped and every before-image restored.
        std::mem::forget(txn);
        let found = ApplyTxn::recover(t.path(), &data, |_| false)
            .unwrap()
            .unwrap();
        assert_eq!(found.1, 3 * 65536);
        let mut buf = vec![0u8; 1 << 20];
        data.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
    }

    #[test]
    fn a_journal_without_padding_still_undoes() {
        // As an earlier version wrote it: records straight after the header, no padding.
        let (t, data) = setup();
        let path = ApplyTxn::journal_path(t.path());
        let mut bytes = header(ID, 1 << 20, 65536).to_vec();
        let mut rec = vec![0u8; RECORD_HEADER_LEN as usize + 65536];
        rec[RECORD_HEADER_LEN as usize..].fill(7);
        seal_record(&mut rec, 2);
        bytes.extend_from_slice(&rec);
        std::fs::write(&path, &bytes).unwrap();
        data.write_all_at(&[1u8; 65536], 2 * 65536).unwrap();
        let found = ApplyTxn::recover(t.path(), &data, |_| false)
            .unwrap()
            .unwrap();
        assert_eq!(found.1, 65536);
        let mut buf = vec![0u8; 65536];
        data.read_exact_at(&mut buf, 2 * 65536).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
    }

    #[test]
    fn initial_generation_needs_no_journal() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(
            t.path(),
            TxnId {
                epoch: 1,
                base: 0,
                target: 1,
            },
            1 << 20,
            65536,
        )
        .unwrap();
        txn.save_before_images(&data, 0, 1 << 20).unwrap();
        assert_eq!(txn.journaled_bytes(), 0);
        let mut buf = vec![1u8; 100];
        txn.overlay(0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        std::mem::forget(txn);
        ApplyTxn::recover(t.path(), &data, |_| false)
            .unwrap()
            .unwrap();
        data.read_exact_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0),
            "an interrupted initial sync leaves an empty replica"
        );
    }

    #[test]
    fn crash_recovery_rolls_back_unless_committed() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.save_before_images(&data, 0, 200000).unwrap();
        txn.sync().unwrap();
        data.write_all_at(&[1u8; 200000], 0).unwrap();
        std::mem::forget(txn); // crash
        let found = ApplyTxn::recover(t.path(), &data, |_| false)
            .unwrap()
            .unwrap();
        assert_eq!(found.0, ID);
        assert_eq!(found.1, 4 * 65536);
        let mut buf = vec![0u8; 1 << 20];
        data.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|b| *b == 7));

        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.save_before_images(&data, 0, 10).unwrap();
        txn.sync().unwrap();
        data.write_all_at(&[1u8; 10], 0).unwrap();
        std::mem::forget(txn);
        // Committed before the crash: the journal is stale and must not undo anything.
        let found = ApplyTxn::recover(t.path(), &data, |id| id.target == 4)
            .unwrap()
            .unwrap();
        assert_eq!(found.1, 0);
        data.read_exact_at(&mut buf[..10], 0).unwrap();
        assert_eq!(&buf[..10], &[1u8; 10]);
    }

    #[test]
    fn a_reopened_transaction_keeps_its_progress_and_before_images() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.save_before_images(&data, 0, 3 * 65536).unwrap();
        txn.sync().unwrap();
        data.write_all_at(&[1u8; 3 * 65536], 0).unwrap();
        txn.applied(&data, 0, 2 * 65536 + 10).unwrap(); // block 2 only partly: not in the map
        txn.save_progress(&data).unwrap();
        std::mem::forget(txn); // crash
        assert!(ApplyTxn::reopen(t.path(), |id| id.target == 4)
            .unwrap()
            .is_none());
        let txn = ApplyTxn::reopen(t.path(), |_| false).unwrap().unwrap();
        assert_eq!((txn.id(), txn.progress().reference), (ID, 4));
        let p = txn.progress();
        assert!(p.applied.is_dirty(0) && p.applied.is_dirty(1) && !p.applied.is_dirty(2));
        // Readers still see the last complete generation.
        let mut buf = vec![0u8; 3 * 65536];
        data.read_exact_at(&mut buf, 0).unwrap();
        txn.overlay(0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        // Moving on to a newer generation keeps the map and its reference, and survives a crash.
        txn.retarget(6, &data).unwrap();
        std::mem::forget(txn);
        let txn = ApplyTxn::reopen(t.path(), |_| false).unwrap().unwrap();
        assert_eq!((txn.id().target, txn.progress().reference), (6, 4));
        assert_eq!(txn.progress().applied.dirty_blocks(), 2);
        // Abort still restores everything journaled before the first crash.
        txn.abort(&data).unwrap();
        data.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        assert!(!ApplyTxn::progress_path(t.path()).exists());
    }

    #[test]
    fn a_block_split_between_writes_joins_the_map_once_every_part_is_in() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        let is = |b| txn.progress().applied.is_dirty(b);
        // Block 1 is split three ways, and its parts come out of order.
        txn.applied(&data, 0, 65536 + 4096).unwrap();
        txn.applied(&data, 2 * 65536 - 4096, 65536 + 4096).unwrap();
        assert!(is(0) && !is(1) && is(2));
        txn.applied(&data, 65536 + 4096, 4096).unwrap();
        assert!(!is(1), "a part is still missing");
        txn.applied(&data, 65536 + 8192, 65536 - 3 * 4096).unwrap();
        assert!(is(1));
        // Parts that leave a gap, or a block only written in part, stay out.
        txn.applied(&data, 4 * 65536, 4096).unwrap();
        txn.applied(&data, 4 * 65536 + 8192, 65536 - 8192).unwrap();
        txn.applied(&data, 6 * 65536 - 4096, 8192).unwrap();
        assert!(!is(3) && !is(4) && !is(5) && !is(6));
        assert_eq!(txn.progress().applied.dirty_blocks(), 3);
        // The last block of a volume that does not end on a block boundary.
        let txn = ApplyTxn::begin(t.path(), ID, 65536 + 8192, 65536).unwrap();
        txn.applied(&data, 65536, 4096).unwrap();
        txn.applied(&data, 65536 + 4096, 4096).unwrap();
        assert!(txn.progress().applied.is_dirty(1));
    }

    #[test]
    fn without_a_matching_progress_map_nothing_is_reopened() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.applied(&data, 0, 65536).unwrap();
        std::mem::forget(txn); // never saved
        assert!(ApplyTxn::reopen(t.path(), |_| false).unwrap().is_none());
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.save_progress(&data).unwrap();
        std::mem::forget(txn);
        let p = ApplyTxn::progress_path(t.path());
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(ApplyTxn::reopen(t.path(), |_| false).unwrap().is_none());
    }

    #[test]
    fn torn_tail_is_ignored() {
        let (t, data) = setup();
        let txn = ApplyTxn::begin(t.path(), ID, 1 << 20, 65536).unwrap();
        txn.save_before_images(&data, 0, 65536 * 2).unwrap();
        txn.sync().unwrap();
        let j = std::fs::OpenOptions::new()
            .write(true)
            .open(ApplyTxn::journal_path(t.path()))
            .unwrap();
        // Into the second record (the end of a batch is padding).
        j.set_len(FIRST_RECORD + 2 * RECORD_HEADER_LEN + 65536 + 100)
            .unwrap();
        std::mem::forget(txn);
        let found = ApplyTxn::recover(t.path(), &data, |_| false)
            .unwrap()
            .unwrap();
        assert_eq!(found.1, 65536, "only the whole record is restored");
    }
}
