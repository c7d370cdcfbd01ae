//! `Volume`: one protected block device — a sparse raw file plus metadata — with changed-block
//! tracking and a generation history.
//!
//! Every write, trim and zero marks the open generation's `DirtyBitmap` before it touches the
//! file, under a shared *gate*; a cut takes the gate exclusively (on every volume of a group at
//! once, see `registry.rs`), so a write is wholly before or wholly after a cut. Crash safety of the
//! bitmap comes from the `ActivityLog`. This module must never talk to the network.

use crate::activity_log::ActivityLog;
use crate::apply_txn::{ApplyTxn, TxnId};
use crate::bitmap::{DirtyBitmap, Extent, GenerationId};
use crate::cut_image::CutImage;
use crate::error::{Error, IoContext, Result};
use crate::ms;
use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::recovery_points;
use crate::staged_tail::{self, Change as StagedChange};
use crate::stats::{Op, Stats};
use crate::volume_meta::{
    now_ms, GenerationRecord, PointRecord, Promoted, ReplicaState, VolumeMeta,
    DEFAULT_KEEP_GENERATIONS, DEFAULT_KEEP_POINTS, META_VERSION,
};
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub const BLOCK_SIZE: u64 = 4096;
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;
/// Most runs one block-status answer carries.
pub const MAX_STATUS_RUNS: usize = 1024;

/// Most closed generations a volume keeps for replication pairs whose targets lag behind the others
/// (see `Volume::pin_generation`), so that the metadata rewritten at every cut stays small: older
/// ones a pair still needs are folded into the oldest kept bitmap (`VolumeMeta::folded_from`).
pub const MAX_PINNED_GENERATIONS: usize = 1024;
const META_FILE: &str = "meta.json";
const DATA_FILE: &str = "data.raw";
const OPEN_BITMAP_FILE: &str = "open.bitmap";
const ACTIVITY_LOG_FILE: &str = "activity.log";
/// On a demoted volume: the blocks it may differ in from its new source.
const DIVERGED_FILE: &str = "diverged.bitmap";

/// One run of a block-status answer: `length` bytes with NBD state `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u64,
    pub flags: u32,
}

/// Which dirty bitmap a `qemu:dirty-bitmap:<name>` context refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BitmapRef {
    /// Changes since the last cut (`qemu:dirty-bitmap:open`).
    Open,
    /// The changes of closed generation N (`qemu:dirty-bitmap:gen-N`).
    Generation(u64),
}

impl BitmapRef {
    pub fn parse(name: &str) -> Option<BitmapRef> {
        if name == "open" {
            return Some(BitmapRef::Open);
        }
        let n = name.strip_prefix("gen-")?;
        if n.is_empty()
            || !n.bytes().all(|b| b.is_ascii_digit())
            || (n.len() > 1 && n.starts_with('0'))
        {
            return None;
        }
        n.parse().ok().map(BitmapRef::Generation)
    }

    pub fn name(&self) -> String {
        match self {
            BitmapRef::Open => "open".to_string(),
            BitmapRef::Generation(n) => format!("gen-{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroFlags {
    /// The client allows the range to be deallocated (no NBD_CMD_FLAG_NO_HOLE).
    pub may_trim: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with `Error::NotSupported` rather than write zeroes slowly.
    pub fast: bool,
    pub fua: bool,
}

/// What `ferry volume list` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub granularity: u64,
    pub open_generation: u64,
    pub generations: Vec<u64>,
    pub read_only: bool,
    pub dirty_bytes: u64,
    /// On a replica: the site it replicates from and the last generation it holds completely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_generation: Option<u64>,
    /// Writes refused for a planned migration or failback (see `Volume::set_fenced`).
    #[serde(default)]
    pub fenced: bool,
}

struct OpenGeneration {
    id: GenerationId,
    bitmap: DirtyBitmap,
}

pub struct Volume {
    name: String,
    dir: PathBuf,
    file: File,
    size: u64,
    granularity: u64,
    /// Clients may not write (a read-only volume, or a replica).
    read_only: AtomicBool,
    /// Clients may not write for now: a planned migration or failback (see `set_fenced`).
    fenced: AtomicBool,
    /// Taken exclusively by a replica clone while it copies (see `hold_apply`); every step that
    /// changes what the replica's last complete generation is, or its recovery points, takes it
    /// shared. Applying the data of a generation does not: its before-images keep the last
    /// complete generation readable meanwhile.
    apply_hold: RwLock<()>,
    gate: RwLock<OpenGeneration>,
    closed: RwLock<BTreeMap<u64, Arc<DirtyBitmap>>>,
    meta: Mutex<VolumeMeta>,
    al: ActivityLog,
    stats: Stats,
    leases: AtomicUsize,
    /// Off only for benchmarks that measure what tracking costs; a volume served untracked has
    /// its whole open bitmap marked dirty when tracking is turned off (see `set_tracking`).
    tracking: AtomicBool,
    /// The content at each cut being shipped, one per replication pair (its owner), preserved
    /// while it ships (copy-before-write).
    images: RwLock<Vec<(String, Arc<CutImage>)>>,
    /// Per replication pair, the generation its target holds (0: not known yet, e.g. before the
    /// pair reached its target after a restart): closed bitmaps after it are kept so that its
    /// next cut ships only what changed (see `CutGuard::commit`).
    pins: Mutex<BTreeMap<String, u64>>,
    /// `MAX_PINNED_GENERATIONS`, lower in tests.
    max_pinned: AtomicUsize,
    /// On a replica, the generation being applied (its before-images serve readers meanwhile),
    /// or one committed with a staged tail that is still being written in place (its tail
    /// serves readers; see `staged_tail`).
    txn: RwLock<Option<Arc<ApplyTxn>>>,
    /// Why writing a committed generation's staged tail in place failed, if it did: every step
    /// that waits for it (`settle`) fails with it until the service restarts and rolls forward.
    settle_failed: Mutex<Option<String>>,
    /// Signalled when a committed generation is settled (or failed to be).
    settled: parking_lot::Condvar,
    /// Synchronous replication: every change goes through it before it is acknowledged.
    mirror: RwLock<Option<Arc<dyn Mirror>>>,
}

/// Where a volume in synchronous replication sends each change, while the change's write gate is
/// held, so a cut never closes with a change the mirror has not acknowledged.
pub trait Mirror: Send + Sync {
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Zeroes (a trim or a zero request).
    fn zero(&self, offset: u64, length: u64, fua: bool) -> Result<()>;
    fn flush(&self) -> Result<()>;
}

/// A change as the mirror needs it.
#[derive(Clone, Copy)]
enum Change<'a> {
    Data(&'a [u8]),
    Zero(u64),
}

pub type SharedVolume = Arc<Volume>;

impl Volume {
    /// Create the files of a new volume in `dir` (which must not exist). Validation of name and
    /// geometry is the caller's (`DataDir`).
    pub fn create(dir: &Path, name: &str, size: u64, granularity: u64) -> Result<()> {
        let parent = dir.parent().expect("volume dir has a parent");
        // Build in a hidden temp dir and rename, so a crash never leaves a half-made volume.
        let tmp = parent.join(format!(".creating-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).ctx(|| format!("cannot create {}", tmp.display()))?;
        let data = File::create(tmp.join(DATA_FILE))
            .ctx(|| format!("cannot create data file in {}", tmp.display()))?;
        data.set_len(size)
            .ctx(|| format!("cannot size data file to {size} bytes"))?;
        data.sync_all()
            .ctx(|| "cannot fsync data file".to_string())?;
        let meta = VolumeMeta {
            version: META_VERSION,
            name: name.to_string(),
            size,
            block_size: BLOCK_SIZE,
            granularity,
            created_at_ms: now_ms(),
            epoch: 1,
            open_generation: 1,
            generations: Vec::new(),
            folded_from: None,
            keep_generations: DEFAULT_KEEP_GENERATIONS,
            read_only: false,
            replica: None,
            promoted: None,
            fenced: false,
        };
        let id = GenerationId {
            epoch: 1,
            generation: 1,
        };
        DirtyBitmap::new(size, granularity).save(&tmp.join(OPEN_BITMAP_FILE), id)?;
        meta.save(&tmp.join(META_FILE))?;
        std::fs::rename(&tmp, dir).ctx(|| format!("cannot move {} into place", tmp.display()))?;
        File::open(parent)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("cannot fsync {}", parent.display()))
    }

    /// Open a volume, recovering its open bitmap after an unclean stop.
    pub fn open(dir: &Path, name: &str) -> Result<Volume> {
        Self::open_with(dir, name, None)
    }

    /// Open a volume; `commit` names a generation `(epoch, target)` its group decided to commit
    /// before a stop (see `commit_intent`): a transaction for it left here is committed.
    pub fn open_with(dir: &Path, name: &str, commit: Option<(u64, u64)>) -> Result<Volume> {
        let meta = VolumeMeta::load(&dir.join(META_FILE), name)?;
        let data_path = dir.join(DATA_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!meta.read_only)
            .open(&data_path)
            .ctx(|| format!("cannot open {}", data_path.display()))?;
        let len = file
            .metadata()
            .ctx(|| format!("cannot stat {}", data_path.display()))?
            .len();
        if len != meta.size {
            return Err(Error::CorruptMetadata {
                name: name.to_string(),
                path: data_path,
                why: format!("data file is {len} bytes, metadata says {}", meta.size),
            });
        }
        let mut resumable = None;
        let mut to_commit = None;
        let (mut staged, mut to_settle, mut commit_tail) = (None, None, None);
        if !meta.read_only {
            // An interrupted apply is taken up again when its progress map allows resuming it,
            // else rolled back, unless its generation was committed.
            let committed = meta
                .replica
                .as_ref()
                .map(|r| (r.epoch, r.last_complete_generation));
            let is_committed = |t: TxnId| committed == Some((t.epoch, t.target));
            if let Some((epoch, target)) = commit.filter(|c| Some(*c) != committed) {
                if meta.replica.is_some() {
                    to_commit = ApplyTxn::reopen_to_commit(dir, epoch, target)?;
                    // Staged for the group's commit, not written in place yet: written first.
                    if to_commit.is_some() {
                        commit_tail = staged_tail::read(dir)?
                            .filter(|(id, _)| id.epoch == epoch && id.target == target)
                            .map(|(_, tail)| tail);
                    }
                }
            }
            // A generation committed with a staged tail that was not all in place yet is
            // finished below (rolled forward), never rolled back.
            if let (Some((epoch, target)), None) = (committed, &to_commit) {
                staged = staged_tail::read(dir)?
                    .filter(|(id, _)| id.epoch == epoch && id.target == target)
                    .map(|(_, tail)| tail);
                if staged.is_some() {
                    to_settle = ApplyTxn::reopen_to_commit(dir, epoch, target)?;
                }
            }
            if meta.replica.is_some() && to_commit.is_none() && staged.is_none() {
                resumable = ApplyTxn::reopen(dir, is_committed)?;
            }
            if resumable.is_none() && to_commit.is_none() && staged.is_none() {
                ApplyTxn::recover(dir, &file, is_committed)?;
            }
        }
        let (size, gran) = (meta.size, meta.granularity);
        let id = GenerationId {
            epoch: meta.epoch,
            generation: meta.open_generation,
        };
        let (al, recovered) = ActivityLog::open(&dir.join(ACTIVITY_LOG_FILE), size, gran)?;

        let bitmap = match std::fs::read(dir.join(OPEN_BITMAP_FILE))
            .ok()
            .map(|b| DirtyBitmap::decode(&b, size, gran))
        {
            Some(Ok((bid, bm))) if bid == id => bm,
            // A crash between a cut's commit and the reset of the open bitmap: no write reached
            // the new generation yet (writes resume only after the reset).
            Some(Ok((bid, _))) if bid.epoch == id.epoch && bid.generation + 1 == id.generation => {
                DirtyBitmap::new(size, gran)
            }
            // Missing, corrupt or from an unknown generation: never trust it, everything is dirty.
            _ => {
                let bm = DirtyBitmap::new(size, gran);
                bm.mark_all();
                bm
            }
        };
        if let Some(rec) = recovered {
            let es = al.extent_size();
            for e in rec.extents {
                bitmap.mark(e as u64 * es, es);
            }
        }

        let mut closed = BTreeMap::new();
        for g in &meta.generations {
            let gid = GenerationId {
                epoch: meta.epoch,
                generation: g.generation,
            };
            let path = dir.join(format!("gen-{}.bitmap", g.generation));
            let bm = match std::fs::read(&path)
                .ok()
                .map(|b| DirtyBitmap::decode(&b, size, gran))
            {
                Some(Ok((bid, bm))) if bid == gid => bm,
                _ => {
                    let bm = DirtyBitmap::new(size, gran);
                    bm.mark_all();
                    bm
                }
            };
            closed.insert(g.generation, Arc::new(bm));
        }

        let meta_read_only = meta.read_only;
        let vol = Volume {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            file,
            size,
            granularity: gran,
            read_only: AtomicBool::new(meta.read_only || meta.replica.is_some()),
            fenced: AtomicBool::new(meta.fenced && meta.replica.is_none()),
            apply_hold: RwLock::new(()),
            gate: RwLock::new(OpenGeneration { id, bitmap }),
            closed: RwLock::new(closed),
            meta: Mutex::new(meta),
            al,
            stats: Stats::default(),
            leases: AtomicUsize::new(0),
            tracking: AtomicBool::new(true),
            images: RwLock::new(Vec::new()),
            pins: Mutex::new(BTreeMap::new()),
            max_pinned: AtomicUsize::new(MAX_PINNED_GENERATIONS),
            txn: RwLock::new(resumable.map(Arc::new)),
            settle_failed: Mutex::new(None),
            settled: parking_lot::Condvar::new(),
            mirror: RwLock::new(None),
        };
        // Persist what recovery concluded and start with an empty activity log.
        if !meta_read_only {
            if let Some(txn) = to_commit {
                let txn = Arc::new(txn);
                if let Some(tail) = &commit_tail {
                    vol.write_tail(&txn, tail)?;
                }
                vol.commit_apply(&txn)?;
                if commit_tail.is_some() {
                    staged_tail::invalidate(&vol.dir)?;
                }
            }
            if let Some(tail) = staged {
                vol.roll_forward(to_settle.map(Arc::new), &tail)?;
            }
            vol.finish_restore()?;
            if let Some(rep) = vol.replica() {
                recovery_points::prune(&vol.dir, &rep.points);
            }
            vol.checkpoint()?;
        }
        Ok(vol)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn granularity(&self) -> u64 {
        self.granularity
    }
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn info(&self) -> VolumeInfo {
        // Never hold `meta` while taking the gate: a cut takes the gate first, then `meta`.
        let dirty_bytes = self.gate.read().bitmap.dirty_bytes();
        let meta = self.meta.lock();
        VolumeInfo {
            name: self.name.clone(),
            size: self.size,
            granularity: self.granularity,
            open_generation: meta.open_generation,
            generations: meta.generations.iter().map(|g| g.generation).collect(),
            read_only: self.read_only(),
            dirty_bytes,
            replica_of: meta.replica.as_ref().map(|r| r.source_site.clone()),
            replica_generation: meta.replica.as_ref().map(|r| r.last_complete_generation),
            fenced: self.fenced(),
        }
    }

    pub fn meta(&self) -> VolumeMeta {
        self.meta.lock().clone()
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                name: self.name.clone(),
                offset,
                length,
                size: self.size,
            }),
        }
    }

    fn check_not_read_only(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// May a client change the volume now? (Read-only and replicas never; fenced not until the
    /// fence is lifted.) Checked again under the gate, which is how demote and fence drain.
    fn check_writable(&self) -> Result<()> {
        self.check_not_read_only()?;
        if self.fenced() {
            return Err(Error::Fenced {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Raise (`true`) or lift the fence of a planned migration or failback: while raised,
    /// client writes, trims and zeroes fail with `Error::Fenced` (EPERM on NBD, also for
    /// connections made before) and reads go on. Raising returns only once the writes in flight
    /// have finished, so nothing lands after it; cuts still work, so the last changes can be
    /// shipped. Persisted, so a restart keeps it. Idempotent. A replica has no fence (it takes
    /// no client writes at all).
    pub fn set_fenced(&self, on: bool) -> Result<()> {
        if self.replica().is_some() {
            return Err(Error::InvalidArgument(format!(
                "volume '{}' is a replica: it takes no client writes, so there is nothing to fence; fence its source volume at the source site",
                self.name
            )));
        }
        if on == self.fenced() && on == self.meta.lock().fenced {
            return Ok(());
        }
        let was = self.fenced();
        if on {
            // As `demote`: writes stop first (a write re-checks under the gate), then the gate
            // drains the ones in flight.
            self.fenced.store(true, Ordering::SeqCst);
            drop(self.gate.write());
        }
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        next.fenced = on;
        if let Err(e) = next.save(&self.dir.join(META_FILE)) {
            self.fenced.store(was, Ordering::SeqCst);
            return Err(e);
        }
        *meta = next;
        self.fenced.store(on, Ordering::SeqCst);
        Ok(())
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let t = Instant::now();
        self.file
            .read_exact_at(buf, offset)
            .ctx(|| format!("read of volume '{}' at {offset} failed", self.name))?;
        // After the data, never before: see `ApplyTxn::overlay`.
        if let Some(txn) = self.txn.read().as_ref() {
            txn.overlay(offset, buf)?;
        }
        self.stats.record(Op::Read, buf.len() as u64, t.elapsed());
        Ok(())
    }

    /// Run `op` on `[offset, offset+length)` with the range marked dirty in the open generation
    /// and its activity-log extents persisted as hot — the one path every modification takes.
    fn modify(
        &self,
        offset: u64,
        change: Change<'_>,
        fua: bool,
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let length = match change {
            Change::Data(d) => d.len() as u64,
            Change::Zero(n) => n,
        };
        self.check_writable()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        if !self.tracking.load(Ordering::Relaxed) {
            let _gen = self.gate.read();
            self.check_writable()?;
            self.preserve_for_image(offset, length)?;
            op()?;
            return self.mirror_change(offset, change, fua);
        }
        let (first, last) = self.al.extents_of(offset, length);
        loop {
            let gen = self.gate.read();
            if self.al.is_hot(first, last) {
                // Again under the gate: a demotion drains writes through it.
                self.check_writable()?;
                gen.bitmap.mark(offset, length);
                self.preserve_for_image(offset, length)?;
                op()?;
                // Still under the gate: a cut waits for the mirror's acknowledgement.
                return self.mirror_change(offset, change, fua);
            }
            let id = gen.id;
            drop(gen);
            self.make_hot(id, first, last)?;
        }
    }

    fn mirror_change(&self, offset: u64, change: Change<'_>, fua: bool) -> Result<()> {
        let Some(m) = self.mirror.read().clone() else {
            return Ok(());
        };
        match change {
            Change::Data(d) => m.write(offset, d, fua),
            Change::Zero(n) => m.zero(offset, n, fua),
        }
    }

    /// Install or remove the synchronous mirror (see `CutGuard::set_mirror` to install it at a
    /// cut).
    pub fn set_mirror(&self, m: Option<Arc<dyn Mirror>>) {
        *self.mirror.write() = m;
    }

    pub fn mirrored(&self) -> bool {
        self.mirror.read().is_some()
    }

    fn preserve_for_image(&self, offset: u64, length: u64) -> Result<()> {
        for (_, img) in self.images.read().iter() {
            img.preserve(&self.file, offset, length)?;
        }
        Ok(())
    }

    /// Read the content of the generation being shipped, as it was at its cut.
    pub fn read_cut(&self, image: &CutImage, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        image.read(&self.file, offset, buf)
    }

    /// Was `[offset, offset+length)` a hole at the image's cut (see `CutImage::is_hole`)?
    pub fn cut_hole(&self, image: &CutImage, offset: u64, length: u64) -> Result<bool> {
        self.check_range(offset, length)?;
        image.is_hole(&self.file, offset, length)
    }

    /// The image `owner` (a replication pair) is shipping, if any.
    pub fn cut_image(&self, owner: &str) -> Option<Arc<CutImage>> {
        self.images
            .read()
            .iter()
            .find(|(o, _)| o == owner)
            .map(|(_, i)| i.clone())
    }

    /// `owner`'s shipping of its image is over (complete, or abandoned for a later cut); the
    /// images of other pairs stay.
    pub fn release_cut_image(&self, owner: &str) {
        self.images.write().retain(|(o, _)| o != owner);
    }

    /// Keep at most `n` closed bitmaps for pinned pairs (default `MAX_PINNED_GENERATIONS`).
    pub fn set_max_pinned_generations(&self, n: usize) {
        self.max_pinned.store(n.max(2), Ordering::Relaxed);
    }

    /// Replication pair `owner`'s target holds generation `generation` (0: not known yet): keep
    /// the closed bitmaps after it; `None`: the pair is gone.
    pub fn pin_generation(&self, owner: &str, generation: Option<u64>) {
        let mut pins = self.pins.lock();
        match generation {
            Some(g) => pins.insert(owner.to_string(), g),
            None => pins.remove(owner),
        };
    }

    fn make_hot(&self, id: GenerationId, first: u32, last: u32) -> Result<()> {
        if self.al.make_hot(id, first, last, false)? {
            return Ok(());
        }
        // The hot set is full: persist the whole bitmap with writes paused, then start over.
        let gen = self.gate.write();
        gen.bitmap.save(&self.dir.join(OPEN_BITMAP_FILE), gen.id)?;
        self.al.make_hot(gen.id, first, last, true)?;
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let t = Instant::now();
        self.modify(offset, Change::Data(data), fua, || {
            self.file
                .write_all_at(data, offset)
                .ctx(|| format!("write to volume '{}' at {offset} failed", self.name))
        })?;
        if fua {
            self.flush_data()?;
        }
        self.stats.record(Op::Write, data.len() as u64, t.elapsed());
        Ok(())
    }

    pub fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        let t = Instant::now();
        self.modify(offset, Change::Zero(length), fua, || {
            self.fallocate(libc::FALLOC_FL_PUNCH_HOLE, offset, length)
        })?;
        if fua {
            self.flush_data()?;
        }
        self.stats.record(Op::Trim, length, t.elapsed());
        Ok(())
    }

    pub fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        let t = Instant::now();
        self.modify(offset, Change::Zero(length), flags.fua, || {
            let mode = if flags.may_trim {
                libc::FALLOC_FL_PUNCH_HOLE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
            match self.fallocate(mode, offset, length) {
                Err(Error::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    if flags.fast {
                        return Err(Error::NotSupported(format!(
                            "fast zeroing on volume '{}'",
                            self.name
                        )));
                    }
                    self.write_zero_bytes(offset, length)
                }
                other => other,
            }
        })?;
        if flags.fua {
            self.flush_data()?;
        }
        self.stats.record(Op::Zero, length, t.elapsed());
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, length: u64) -> Result<()> {
        let zeros = vec![0u8; (1 << 20).min(length as usize)];
        let end = offset + length;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset)
                .ctx(|| format!("zeroing volume '{}' at {offset} failed", self.name))?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> Result<()> {
        // SAFETY: plain syscall on a file descriptor we own.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                format!(
                    "fallocate on volume '{}' at {offset}+{length} failed",
                    self.name
                ),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn flush_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .ctx(|| format!("fsync of volume '{}' failed", self.name))
    }

    /// Make every completed write durable (NBD FLUSH; with one shared file descriptor this covers
    /// writes from every connection, which is what CAN_MULTI_CONN promises).
    pub fn flush(&self) -> Result<()> {
        let t = Instant::now();
        self.flush_data()?;
        if let Some(m) = self.mirror.read().clone() {
            m.flush()?;
        }
        self.stats.record(Op::Flush, 0, t.elapsed());
        Ok(())
    }

    /// `base:allocation` for `[offset, offset+length)`, from the file's holes.
    pub fn allocation(&self, offset: u64, length: u64) -> Result<Vec<StatusExtent>> {
        self.check_range(offset, length)?;
        let fd = self.file.as_raw_fd();
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_STATUS_RUNS {
            // SAFETY: lseek on our own descriptor; we never rely on the file position elsewhere.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            let (run_end, flags) = if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::ENXIO) {
                    return Err(Error::io(
                        format!("SEEK_DATA on volume '{}' failed", self.name),
                        err,
                    ));
                }
                (end, STATE_HOLE | STATE_ZERO)
            } else if data as u64 > pos {
                ((data as u64).min(end), STATE_HOLE | STATE_ZERO)
            } else {
                let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
                if hole < 0 {
                    return Err(Error::io(
                        format!("SEEK_HOLE on volume '{}' failed", self.name),
                        std::io::Error::last_os_error(),
                    ));
                }
                ((hole as u64).min(end), 0)
            };
            out.push(StatusExtent {
                length: run_end - pos,
                flags,
            });
            pos = run_end;
        }
        Ok(out)
    }

    /// `qemu:dirty-bitmap:*` for `[offset, offset+length)`.
    pub fn dirty_status(
        &self,
        which: BitmapRef,
        offset: u64,
        length: u64,
    ) -> Result<Vec<StatusExtent>> {
        self.check_range(offset, length)?;
        match which {
            BitmapRef::Open => Ok(self
                .gate
                .read()
                .bitmap
                .status(offset, length, MAX_STATUS_RUNS)),
            BitmapRef::Generation(n) => match self.closed.read().get(&n) {
                Some(bm) => Ok(bm.status(offset, length, MAX_STATUS_RUNS)),
                None => Err(Error::InvalidArgument(format!(
                    "volume '{}' keeps no bitmap for generation {n}; kept: {:?}",
                    self.name,
                    self.bitmaps().iter().map(|b| b.name()).collect::<Vec<_>>()
                ))),
            },
        }
    }

    /// Bitmaps this volume offers now: `open` and `gen-N` for every kept closed generation.
    pub fn bitmaps(&self) -> Vec<BitmapRef> {
        let mut v = vec![BitmapRef::Open];
        v.extend(self.closed.read().keys().map(|g| BitmapRef::Generation(*g)));
        v
    }

    /// Extents changed since the last cut.
    pub fn dirty_extents(&self) -> Vec<Extent> {
        self.gate.read().bitmap.extents()
    }

    /// Extents changed in closed generation `n`, if still kept.
    pub fn generation_extents(&self, n: u64) -> Option<Vec<Extent>> {
        self.closed.read().get(&n).map(|bm| bm.extents())
    }

    /// Pause writes to this volume until the guard is committed or dropped. A group cut takes the
    /// guards of all its volumes (in name order) before committing any of them.
    pub fn lock_for_cut(&self) -> CutGuard<'_> {
        CutGuard {
            vol: self,
            gen: self.gate.write(),
        }
    }

    /// Persist the open bitmap and empty the activity log: what a clean stop leaves behind.
    pub fn checkpoint(&self) -> Result<()> {
        let gen = self.gate.write();
        gen.bitmap.save(&self.dir.join(OPEN_BITMAP_FILE), gen.id)?;
        self.al.reset(gen.id)
    }

    /// Clean stop: data and bitmap durable, activity log empty.
    pub fn close(&self) -> Result<()> {
        if self.meta.lock().read_only {
            return Ok(());
        }
        self.settle()?;
        if let Some(t) = self.applying() {
            t.save_progress(&self.file)?;
        }
        self.flush_data()?;
        self.checkpoint()
    }

    /// Turn changed-block tracking off (benchmarks only) or back on. Turning it off marks the
    /// whole volume dirty first, so the bitmap stays a superset of what changed.
    pub fn set_tracking(&self, on: bool) -> Result<()> {
        if !on {
            let gen = self.gate.write();
            gen.bitmap.mark_all();
            gen.bitmap.save(&self.dir.join(OPEN_BITMAP_FILE), gen.id)?;
        }
        self.tracking.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// The replica state, if this volume is a replica.
    pub fn replica(&self) -> Option<ReplicaState> {
        self.meta.lock().replica.clone()
    }

    /// Make a replica writable at its last complete generation (a generation being applied is
    /// rolled back first). From here on the volume tracks its own writes under a new epoch, so its
    /// history can never be mistaken for its former source's. Returns the generation it holds.
    pub fn promote(&self) -> Result<u64> {
        self.promote_to(None)
    }

    /// Promote at recovery point `to` (a generation listed in the replica's points, or its last
    /// complete one; `None`: the last complete one). Going back undoes the kept journals.
    pub fn promote_to(&self, to: Option<u64>) -> Result<u64> {
        self.settle()?;
        let _hold = self.apply_hold.read();
        let rep = self.require_replica()?;
        self.abort_apply_held()?;
        let held = match to {
            Some(g) if g != rep.last_complete_generation => {
                if !rep.points.iter().any(|p| p.generation == g) {
                    let mut have = vec![rep.last_complete_generation];
                    have.extend(rep.points.iter().map(|p| p.generation));
                    return Err(Error::InvalidArgument(format!(
                        "replica '{}' has no recovery point at generation {g}; it has {}",
                        self.name,
                        have.iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                self.update_replica(|r| r.restoring_to = Some(g))?;
                self.finish_restore()?;
                g
            }
            _ => rep.last_complete_generation,
        };
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        next.replica = None;
        next.epoch = next.epoch.max(rep.epoch) + 1;
        next.save(&self.dir.join(META_FILE))?;
        *meta = next;
        drop(meta);
        self.gate.write().id.epoch = self.meta.lock().epoch;
        self.read_only.store(false, Ordering::SeqCst);
        // The points undo towards the former source's history; this volume now writes its own.
        recovery_points::prune(&self.dir, &[]);
        // An (empty) generation marks the promotion: everything written here from now on is in
        // the generations after it, which is what `reverse` sends back.
        let local = self.lock_for_cut().commit("promote")?;
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        next.promoted = Some(Promoted {
            source_site: rep.source_site.clone(),
            source_epoch: rep.epoch,
            source_generation: held,
            local_generation: local,
            local_epoch: next.epoch,
        });
        next.save(&self.dir.join(META_FILE))?;
        *meta = next;
        Ok(held)
    }

    /// Blocks changed here after generation `generation` of epoch `epoch`, if the history still
    /// proves it (every generation since is kept); `None` when it cannot.
    pub fn changes_since(&self, epoch: u64, generation: u64) -> Option<DirtyBitmap> {
        let gen = self.gate.read();
        if gen.id.epoch != epoch || generation >= gen.id.generation {
            return None;
        }
        let folded_from = self.meta.lock().folded_from;
        let closed = self.closed.read();
        union_after(
            &closed,
            folded_from,
            generation,
            gen.id.generation,
            &gen.bitmap,
        )
    }

    /// Turn this volume into a replica of `source_site`'s copy, which holds generation `base` of
    /// epoch `epoch` plus changes. `common` is this volume's own `(epoch, generation)` both
    /// copies last shared; the blocks changed here since then are where this volume may differ
    /// (everything, when the history cannot prove it). They stay on record, and are reported to
    /// the source, until a generation has been applied over them. Returns them.
    pub fn demote(
        &self,
        source_site: &str,
        epoch: u64,
        base: u64,
        common: Option<(u64, u64)>,
    ) -> Result<DirtyBitmap> {
        // Writes stop first (a write re-checks under the gate), then the gate drains the ones in
        // flight: nothing lands after the divergence is taken.
        self.read_only.store(true, Ordering::SeqCst);
        drop(self.gate.write());
        // A replica takes no client writes: the fence of the move that demoted it is done.
        self.fenced.store(false, Ordering::SeqCst);
        let diverged = common
            .and_then(|(e, g)| self.changes_since(e, g))
            .unwrap_or_else(|| {
                let all = DirtyBitmap::new(self.size, self.granularity);
                all.mark_all();
                all
            });
        diverged.save(
            &self.dir.join(DIVERGED_FILE),
            GenerationId {
                epoch,
                generation: base,
            },
        )?;
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        next.replica = Some(ReplicaState {
            source_site: source_site.to_string(),
            epoch,
            last_complete_generation: base,
            last_complete_at_ms: now_ms(),
            points: Vec::new(),
            keep_points: DEFAULT_KEEP_POINTS,
            points_max_age_ms: None,
            restoring_to: None,
        });
        next.promoted = None;
        next.fenced = false;
        next.save(&self.dir.join(META_FILE))?;
        *meta = next;
        Ok(diverged)
    }

    /// The blocks a demoted volume may still differ in from its new source (see `demote`).
    pub fn diverged(&self) -> Option<DirtyBitmap> {
        let bytes = std::fs::read(self.dir.join(DIVERGED_FILE)).ok()?;
        match DirtyBitmap::decode(&bytes, self.size, self.granularity) {
            Ok((_, bm)) => Some(bm),
            // Unreadable: it may differ anywhere.
            Err(_) => {
                let all = DirtyBitmap::new(self.size, self.granularity);
                all.mark_all();
                Some(all)
            }
        }
    }

    /// Change the replica's metadata crash-safely.
    fn update_replica(&self, f: impl FnOnce(&mut ReplicaState)) -> Result<ReplicaState> {
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        let rep = next.replica.as_mut().ok_or_else(|| {
            Error::InvalidArgument(format!("volume '{}' is not a replica", self.name))
        })?;
        f(rep);
        let out = rep.clone();
        next.save(&self.dir.join(META_FILE))?;
        *meta = next;
        Ok(out)
    }

    /// Finish a roll-back to a recovery point recorded in the metadata (after a crash, redone
    /// from the start: see `recovery_points`).
    fn finish_restore(&self) -> Result<()> {
        let Some(rep) = self.replica() else {
            return Ok(());
        };
        let Some(g) = rep.restoring_to else {
            return Ok(());
        };
        recovery_points::roll_back_to(&self.dir, &self.file, &rep.points, g)?;
        self.flush_data()?;
        let at = rep
            .points
            .iter()
            .find(|p| p.generation == g)
            .map_or(rep.last_complete_at_ms, |p| p.at_ms);
        let rep = self.update_replica(|r| {
            r.last_complete_generation = g;
            r.last_complete_at_ms = at;
            r.points.retain(|p| p.generation < g);
            r.restoring_to = None;
        })?;
        recovery_points::prune(&self.dir, &rep.points);
        Ok(())
    }

    /// How many complete generations the replica keeps (the last one included; 1 keeps none
    /// before it), and for how long (`max_age_ms`; `None`: by count only).
    pub fn set_keep_points(&self, keep: usize, max_age_ms: Option<u64>) -> Result<()> {
        self.settle()?;
        let _hold = self.apply_hold.read();
        let keep = keep.max(1);
        let oldest = max_age_ms.map(|age| now_ms().saturating_sub(age));
        if self.replica().is_some_and(|r| {
            r.keep_points == keep
                && r.points_max_age_ms == max_age_ms
                && !r.points.iter().any(|p| oldest.is_some_and(|o| p.at_ms < o))
        }) {
            return Ok(());
        }
        let rep = self.update_replica(|r| {
            r.keep_points = keep;
            r.points_max_age_ms = max_age_ms;
            retain_points(r);
        })?;
        recovery_points::prune(&self.dir, &rep.points);
        Ok(())
    }

    /// Forget every recovery point (a synchronous session changes blocks without journaling
    /// them, so no kept journal leads back to its generation any more).
    pub fn drop_points(&self) -> Result<()> {
        self.settle()?;
        let _hold = self.apply_hold.read();
        if self.replica().is_some_and(|r| r.points.is_empty()) {
            return Ok(());
        }
        self.update_replica(|r| r.points.clear())?;
        recovery_points::prune(&self.dir, &[]);
        Ok(())
    }

    /// Make this (new, empty) volume a replica of `source_site`'s volume; no generation yet.
    pub fn make_replica(&self, source_site: &str, epoch: u64) -> Result<()> {
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        next.replica = Some(ReplicaState {
            source_site: source_site.to_string(),
            epoch,
            last_complete_generation: 0,
            last_complete_at_ms: now_ms(),
            points: Vec::new(),
            keep_points: DEFAULT_KEEP_POINTS,
            points_max_age_ms: None,
            restoring_to: None,
        });
        next.save(&self.dir.join(META_FILE))?;
        *meta = next;
        self.read_only.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn require_replica(&self) -> Result<ReplicaState> {
        self.replica().ok_or_else(|| {
            Error::InvalidArgument(format!("volume '{}' is not a replica", self.name))
        })
    }

    /// Start applying generation `target` of the source (epoch `epoch`) to this replica. With
    /// `resume_from`, the transaction applying that generation moves on to `target`, keeping what
    /// it applied (the source skips those blocks); it must still be the one running.
    pub fn begin_apply(
        &self,
        epoch: u64,
        target: u64,
        resume_from: Option<u64>,
    ) -> Result<Arc<ApplyTxn>> {
        self.settle()?;
        let rep = self.require_replica()?;
        let mut slot = self.txn.write();
        if let Some(t) = slot.as_ref() {
            if t.id().epoch == epoch && t.id().target == target {
                return Ok(t.clone());
            }
            if t.id().epoch == epoch && resume_from == Some(t.id().target) {
                t.retarget(target, &self.file)?;
                return Ok(t.clone());
            }
            return Err(Error::VolumeBusy {
                name: self.name.clone(),
                why: format!(
                    "generation {} is being applied; finish or abort it first",
                    t.id().target
                ),
            });
        }
        if let Some(from) = resume_from {
            return Err(Error::InvalidArgument(format!(
                "volume '{}' has no generation {from} being applied to resume; start generation {target} afresh",
                self.name
            )));
        }
        let id = TxnId {
            epoch,
            base: rep.last_complete_generation,
            target,
        };
        let txn = Arc::new(ApplyTxn::begin(&self.dir, id, self.size, self.granularity)?);
        *slot = Some(txn.clone());
        Ok(txn)
    }

    /// The generation being applied, if any.
    pub fn applying(&self) -> Option<Arc<ApplyTxn>> {
        self.txn.read().clone().filter(|t| !t.committed())
    }

    /// Wait until a generation committed with a staged tail is all in place (see
    /// `staged_tail`); every step that changes or reads what the replica's data file holds
    /// other than through `read_at` waits here first. Fails if writing it in place failed.
    pub fn settle(&self) -> Result<()> {
        let mut failed = self.settle_failed.lock();
        loop {
            if let Some(why) = failed.as_ref() {
                return Err(Error::VolumeBusy {
                    name: self.name.clone(),
                    why: why.clone(),
                });
            }
            if !self.txn.read().as_ref().is_some_and(|t| t.committed()) {
                return Ok(());
            }
            self.settled
                .wait_for(&mut failed, std::time::Duration::from_millis(50));
        }
    }

    /// Apply a batch of changes of the running transaction: before-images first (durable), then
    /// the data.
    pub fn apply_batch(&self, txn: &ApplyTxn, ops: &[ApplyOp<'_>]) -> Result<()> {
        // Held for the batch: an abort or a promotion waits for it, and a batch queued for a
        // transaction that has ended since is refused instead of written over what replaced it.
        let running = self.txn.read();
        if !running.as_deref().is_some_and(|t| std::ptr::eq(t, txn)) {
            return Err(Error::InvalidArgument(format!(
                "generation {} is no longer being applied to replica '{}'",
                txn.id().target,
                self.name
            )));
        }
        let started = std::time::Instant::now();
        for op in ops {
            self.check_range(op.offset(), op.length())?;
            txn.save_before_images(&self.file, op.offset(), op.length())?;
        }
        let saved = started.elapsed();
        txn.sync()?;
        let journaled = started.elapsed();
        for op in ops {
            self.write_in_place(op)?;
            txn.applied(&self.file, op.offset(), op.length())?;
        }
        // Start writing the batch back now, without waiting: the fdatasync that the progress map
        // and the commit need later then finds little left to write, instead of stalling the
        // transfer for everything applied since the last one.
        if let (Some(first), Some(last)) = (
            ops.iter().map(|o| o.offset()).min(),
            ops.iter().map(|o| o.offset() + o.length()).max(),
        ) {
            self.start_writeback(first, last - first);
        }
        log::debug!(
            "replica '{}': before-images read {:.1} ms, journal synced {:.1} ms, data written {:.1} ms",
            self.name,
            ms(saved),
            ms(journaled - saved),
            ms(started.elapsed() - journaled)
        );
        Ok(())
    }

    /// Ask the disk now for the before-images that applying `[offset, offset + length)` in `txn`
    /// will journal (`posix_fadvise(WILLNEED)` starts the reads and returns). A replica whose
    /// blocks left the page cache then reads them many at a time, while the data is still on its
    /// way, instead of one block after another when the batch is applied. A hint: a failure only
    /// leaves the reads to the apply.
    pub fn prefetch_before_images(&self, txn: &ApplyTxn, offset: u64, length: u64) {
        if let Some((start, len)) = txn.before_images_wanted(offset, length) {
            // SAFETY: plain syscall on a file descriptor we own.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    start as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Ask the kernel to start writing `[offset, offset + length)` back to disk, asynchronously
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). A hint: no durability is claimed, and a
    /// failure only means the later fdatasync has more to do.
    fn start_writeback(&self, offset: u64, length: u64) {
        // SAFETY: plain syscall on a file descriptor we own.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                length as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Apply one change of a synchronous session to this replica, in place (no transaction: a
    /// sync replica is always the source's latest acknowledged state).
    pub fn apply_sync(&self, op: &ApplyOp<'_>) -> Result<()> {
        self.settle()?;
        let _hold = self.apply_hold.read();
        self.require_replica()?;
        self.check_range(op.offset(), op.length())?;
        if self.txn.read().is_some() {
            return Err(Error::VolumeBusy {
                name: self.name.clone(),
                why: "a generation is being applied; synchronous changes wait for it".into(),
            });
        }
        self.write_in_place(op)
    }

    /// Write one change of a replica into its data file (a zero run punches a hole).
    fn write_in_place(&self, op: &ApplyOp<'_>) -> Result<()> {
        match op {
            ApplyOp::Data { offset, data } => self
                .file
                .write_all_at(data, *offset)
                .ctx(|| format!("applying to replica '{}' at {offset} failed", self.name)),
            ApplyOp::Zero { offset, length } => {
                self.fallocate(libc::FALLOC_FL_PUNCH_HOLE, *offset, *length)
            }
        }
    }

    /// Make a replica's data durable (a synchronous session's FLUSH).
    pub fn flush_replica(&self) -> Result<()> {
        self.require_replica()?;
        self.flush_data()
    }

    /// A synchronous session reached generation `generation` of the source: every change of it is
    /// applied. Make it durable and record it as complete.
    pub fn mark_complete(&self, epoch: u64, generation: u64) -> Result<()> {
        self.settle()?;
        let _hold = self.apply_hold.read();
        self.flush_data()?;
        self.update_replica(|r| {
            r.epoch = epoch;
            r.last_complete_generation = generation;
            r.last_complete_at_ms = now_ms();
        })
        .map(|_| ())
    }

    /// Commit the running transaction: the replica now holds generation `target` completely.
    pub fn commit_apply(&self, txn: &ApplyTxn) -> Result<()> {
        let _hold = self.apply_hold.read();
        let keep = self.make_durable(txn, &[])?;
        self.record_commit(txn.id(), keep, true)?;
        if let Some(t) = self.txn.write().take() {
            let _ = Arc::try_unwrap(t).map(|t| t.finish());
        }
        self.remove_txn_files();
        Ok(())
    }

    /// Remove the journal and progress map of a transaction that is over (a journal kept as a
    /// recovery point stays, under its other name).
    fn remove_txn_files(&self) {
        let _ = std::fs::remove_file(ApplyTxn::progress_path(&self.dir));
        let _ = std::fs::remove_file(ApplyTxn::journal_path(&self.dir));
    }

    /// Record generation `id.target` as the replica's last complete one (with the point back to
    /// `id.base` if `keep`), its data durable already. With `prune`, the journals of the points
    /// it drops are deleted now (else by `finish_settle`, after the answer: deleting a journal
    /// costs milliseconds, and an unlisted one is only an orphan until then).
    fn record_commit(&self, id: TxnId, keep: bool, prune: bool) -> Result<()> {
        let started = Instant::now();
        let rep = self.update_replica(|r| {
            if keep {
                r.points.insert(
                    0,
                    PointRecord {
                        generation: id.base,
                        at_ms: r.last_complete_at_ms,
                    },
                );
                retain_points(r);
            } else if r.epoch != id.epoch {
                r.points.clear();
            }
            r.epoch = id.epoch;
            r.last_complete_generation = id.target;
            r.last_complete_at_ms = now_ms();
        })?;
        let recorded = started.elapsed();
        if prune {
            recovery_points::prune(&self.dir, &rep.points);
        }
        log::debug!(
            "replica '{}' generation {}: recorded {:.1} ms, points pruned {:.1} ms",
            self.name,
            id.target,
            ms(recorded),
            ms(started.elapsed() - recorded)
        );
        // A generation applied over a demoted volume's divergence settled it.
        let _ = std::fs::remove_file(self.dir.join(DIVERGED_FILE));
        Ok(())
    }

    /// Commit the running transaction `txn` without waiting for `tail`, the changes its applier
    /// has not written in place yet (in the order they are applied): they are staged, durable,
    /// beside the data written so far (see `staged_tail`), and readers get them from memory
    /// until `finish_settle`. The applier goes on writing them in place meanwhile.
    pub fn commit_apply_staged(&self, txn: &Arc<ApplyTxn>, tail: Vec<StagedChange>) -> Result<()> {
        let _hold = self.apply_hold.read();
        self.check_running(txn)?;
        let keep = self.make_durable(txn, &tail)?;
        self.record_commit(txn.id(), keep, false)?;
        txn.set_committed(tail);
        Ok(())
    }

    /// For a volume of a group: make `txn`'s generation durable with `tail` staged, as
    /// `commit_apply_staged` does, without recording it yet — the group's intent is the commit
    /// point (see `commit_intent`), and `record_staged` follows it.
    pub fn stage_apply(&self, txn: &Arc<ApplyTxn>, tail: &[StagedChange]) -> Result<()> {
        let _hold = self.apply_hold.read();
        self.check_running(txn)?;
        self.make_durable(txn, tail).map(|_| ())
    }

    /// Record the generation `stage_apply` made durable with `tail` (after the group's intent).
    pub fn record_staged(&self, txn: &Arc<ApplyTxn>, tail: Vec<StagedChange>) -> Result<()> {
        let _hold = self.apply_hold.read();
        self.check_running(txn)?;
        let keep = self.keeps_point(txn.id())?;
        self.record_commit(txn.id(), keep, false)?;
        txn.set_committed(tail);
        Ok(())
    }

    /// `txn` is the transaction running (and not committed yet).
    fn check_running(&self, txn: &Arc<ApplyTxn>) -> Result<()> {
        if !self
            .txn
            .read()
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, txn))
            || txn.committed()
        {
            return Err(Error::InvalidArgument(format!(
                "generation {} is no longer being applied to replica '{}'",
                txn.id().target,
                self.name
            )));
        }
        Ok(())
    }

    /// Whether committing `id` keeps its journal as the point back to `id.base`.
    fn keeps_point(&self, id: TxnId) -> Result<bool> {
        let rep = self.require_replica()?;
        Ok(id.base > 0 && rep.keep_points > 1 && rep.epoch == id.epoch)
    }

    /// Everything a commit of `txn` needs on disk before the metadata records it, in parallel
    /// (independent, so their fsyncs overlap): the data written in place so far (every write
    /// returned before `tail` was taken), `tail` staged when there is one (see `staged_tail`),
    /// and the journal linked as the point back to the base when one is kept. Call with
    /// `apply_hold` held. Returns whether a point is kept.
    fn make_durable(&self, txn: &ApplyTxn, tail: &[StagedChange]) -> Result<bool> {
        let id = txn.id();
        // The journal undoes this generation: keep it as the way back to the one before.
        let keep = self.keeps_point(id)?;
        let started = std::time::Instant::now();
        let (kept, staged, flushed, data_synced, tail_synced) = std::thread::scope(|s| {
            let kept = s.spawn(|| {
                if keep {
                    recovery_points::keep(&self.dir, &ApplyTxn::journal_path(&self.dir), id.base)
                } else {
                    Ok(())
                }
            });
            let staged = (!tail.is_empty()).then(|| {
                s.spawn(|| {
                    let r = staged_tail::write(&self.dir, id, tail);
                    (r, started.elapsed())
                })
            });
            let flushed = self.flush_data();
            let data_synced = started.elapsed();
            let (staged, tail_synced) = match staged {
                Some(h) => h.join().expect("staging a tail panicked"),
                None => (Ok(()), std::time::Duration::ZERO),
            };
            (
                kept.join().expect("keeping a recovery point panicked"),
                staged,
                flushed,
                data_synced,
                tail_synced,
            )
        });
        log::debug!(
            "replica '{}' generation {}: data synced {:.1} ms, tail of {} changes staged {:.1} ms, durable{} {:.1} ms",
            self.name,
            id.target,
            ms(data_synced),
            tail.len(),
            ms(tail_synced),
            if keep { " and point kept" } else { "" },
            ms(started.elapsed())
        );
        kept?;
        staged?;
        flushed?;
        Ok(keep)
    }

    /// The applier of `txn`, committed by `commit_apply_staged`, is done (`applied`: whether it
    /// wrote every change): make the data durable, drop the staged tail and the transaction.
    /// On failure the generation stays committed, served from memory, and `settle` fails until
    /// a restart writes the tail from its file.
    pub fn finish_settle(&self, txn: &Arc<ApplyTxn>, applied: Result<()>) {
        let settled = applied
            .and_then(|()| self.flush_data())
            .and_then(|()| staged_tail::invalidate(&self.dir));
        match settled {
            Ok(()) => {
                if let Some(rep) = self.replica() {
                    recovery_points::prune(&self.dir, &rep.points);
                }
                self.remove_txn_files();
                let mut slot = self.txn.write();
                if slot.as_ref().is_some_and(|t| Arc::ptr_eq(t, txn)) {
                    *slot = None;
                }
            }
            Err(e) => {
                let why = format!(
                    "generation {} is committed but writing its last changes in place failed ({e}); \
                     they are kept in {}: restart the volume service to write them",
                    txn.id().target,
                    staged_tail::path(&self.dir).display()
                );
                log::error!("replica '{}': {why}", self.name);
                *self.settle_failed.lock() = Some(why);
            }
        }
        let _guard = self.settle_failed.lock();
        self.settled.notify_all();
    }

    /// At open: write a staged `tail` in place under `txn`, which becomes the running transaction.
    fn write_tail(&self, txn: &Arc<ApplyTxn>, tail: &[StagedChange]) -> Result<()> {
        *self.txn.write() = Some(txn.clone());
        let ops: Vec<ApplyOp<'_>> = tail.iter().map(StagedChange::op).collect();
        self.apply_batch(txn, &ops)
    }

    /// At open: write the staged `tail` of the committed generation in place again (under its
    /// journal `txn` when there is one left), then drop both.
    fn roll_forward(&self, txn: Option<Arc<ApplyTxn>>, tail: &[StagedChange]) -> Result<()> {
        match txn {
            Some(txn) => {
                let written = self.write_tail(&txn, tail);
                self.txn.write().take();
                written?;
            }
            None => {
                for c in tail {
                    self.write_in_place(&c.op())?;
                }
            }
        }
        self.flush_data()?;
        staged_tail::invalidate(&self.dir)?;
        self.remove_txn_files();
        log::info!(
            "replica '{}': wrote the last {} changes of its committed generation again after a stop",
            self.name,
            tail.len()
        );
        Ok(())
    }

    /// Abort the running transaction, restoring the last complete generation.
    pub fn abort_apply(&self) -> Result<()> {
        self.settle()?;
        let _hold = self.apply_hold.read();
        self.abort_apply_held()
    }

    fn abort_apply_held(&self) -> Result<()> {
        let Some(t) = self.txn.write().take() else {
            return Ok(());
        };
        match Arc::try_unwrap(t) {
            Ok(t) => t.abort(&self.file).map(|_| ()),
            Err(_) => {
                // Someone still holds it; recover from the journal file directly.
                ApplyTxn::recover(&self.dir, &self.file, |_| false).map(|_| ())
            }
        }
    }

    /// Keep this replica at its last complete generation, with its recovery points, until the
    /// guard is dropped: no generation commits or aborts, no synchronous change lands, no point
    /// is dropped. A generation's data goes on being applied meanwhile (under its journal, which
    /// `read_at` overlays), so the transfer from the source does not stop; only its commit waits.
    pub(crate) fn hold_apply(&self) -> Result<parking_lot::RwLockWriteGuard<'_, ()>> {
        self.settle()?;
        Ok(self.apply_hold.write())
    }

    /// The byte runs where this replica's last complete generation may hold anything but zeroes:
    /// the file's data, and the blocks a generation being applied has changed (one of its zero
    /// runs may have punched a hole where that generation has data). Call with `hold_apply`
    /// held. The file is scanned before the journal is read: a block punched after the scan was
    /// data in it, one punched before is journaled by then.
    pub(crate) fn content_runs(&self) -> Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            // SAFETY: lseek on our own descriptor; we never rely on the file position elsewhere.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(Error::io(
                    format!("SEEK_DATA on volume '{}' failed", self.name),
                    err,
                ));
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(Error::io(
                    format!("SEEK_HOLE on volume '{}' failed", self.name),
                    std::io::Error::last_os_error(),
                ));
            }
            let (start, end) = (data as u64, (hole as u64).min(self.size));
            runs.push((start, end));
            pos = end.max(start + 1);
        }
        if let Some(txn) = self.applying() {
            let g = self.granularity;
            runs.extend(
                txn.journaled_blocks()
                    .into_iter()
                    .map(|b| (b * g, ((b + 1) * g).min(self.size))),
            );
        }
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (s, e) in runs {
            match merged.last_mut() {
                Some(m) if s <= m.1 => m.1 = m.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Ok(merged)
    }

    /// The data file, for filling a volume no client uses yet (a replica clone).
    pub(crate) fn data_file(&self) -> &File {
        &self.file
    }

    /// Record `[offset, offset+length)` as changed in the open generation, for content written
    /// to `data_file` directly; durable at the next `checkpoint` (or `close`).
    pub(crate) fn mark_changed(&self, offset: u64, length: u64) {
        self.gate.read().bitmap.mark(offset, length);
    }

    pub(crate) fn add_lease(&self) {
        self.leases.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn drop_lease(&self) {
        self.leases.fetch_sub(1, Ordering::SeqCst);
    }
    pub fn leases(&self) -> usize {
        self.leases.load(Ordering::SeqCst)
    }
}

/// One change applied to a replica.
pub enum ApplyOp<'a> {
    Data {
        offset: u64,
        data: &'a [u8],
    },
    /// Zeroes (holes, zero runs, trims at the source).
    Zero {
        offset: u64,
        length: u64,
    },
}

impl ApplyOp<'_> {
    pub fn offset(&self) -> u64 {
        match self {
            ApplyOp::Data { offset, .. } | ApplyOp::Zero { offset, .. } => *offset,
        }
    }
    pub fn length(&self) -> u64 {
        match self {
            ApplyOp::Data { data, .. } => data.len() as u64,
            ApplyOp::Zero { length, .. } => *length,
        }
    }
}

/// What the target already holds of an interrupted transfer (see `commit_with_image`).
pub struct Resume {
    /// The generation the held blocks are known to match.
    pub reference: u64,
    pub applied: DirtyBitmap,
}

/// Writes to one volume paused for a cut.
pub struct CutGuard<'a> {
    vol: &'a Volume,
    gen: RwLockWriteGuard<'a, OpenGeneration>,
}

impl CutGuard<'_> {
    /// Close the open generation and open the next; returns the closed generation's number.
    /// The metadata rename is the commit point.
    pub fn commit(mut self, cut_id: &str) -> Result<u64> {
        let v = self.vol;
        // A fenced volume is still cut: its last changes must reach the other site.
        v.check_not_read_only()?;
        let closed_id = self.gen.id;
        let closed_path = v.dir.join(format!("gen-{}.bitmap", closed_id.generation));
        let new_id = GenerationId {
            epoch: closed_id.epoch,
            generation: closed_id.generation + 1,
        };
        let next_bitmap = DirtyBitmap::new(v.size, v.granularity);

        let mut meta = v.meta.lock();
        let mut next = meta.clone();
        next.generations.push(GenerationRecord {
            generation: closed_id.generation,
            cut_id: cut_id.to_string(),
            closed_at_ms: now_ms(),
            dirty_bytes: self.gen.bitmap.dirty_bytes(),
        });
        next.open_generation = closed_id.generation + 1;
        // Beyond the kept count, a bitmap still goes only when no pair's next cut needs it (it
        // is at or before every pinned generation). Past the most the pins may keep, the oldest
        // needed ones are folded into the oldest kept one instead: a lagging pair then ships the
        // union of their changes, more than it needs but not the whole volume.
        let oldest_pin = v.pins.lock().values().min().copied();
        let len = next.generations.len();
        let excess = len.saturating_sub(next.keep_generations);
        let needed = next.generations[..excess]
            .iter()
            .position(|g| oldest_pin.is_some_and(|p| g.generation > p))
            .unwrap_or(excess);
        let drop_n = needed.max(len.saturating_sub(v.max_pinned.load(Ordering::Relaxed)));
        // Of those going, the ones a pin still needs (after the oldest pin) are folded.
        let folding: Vec<u64> = next.generations[..drop_n]
            .iter()
            .map(|g| g.generation)
            .filter(|g| oldest_pin.is_some_and(|p| *g > p))
            .collect();
        if drop_n > 0 {
            let oldest = next.generations[0].generation;
            next.folded_from = match folding.first() {
                None => None,
                // The old oldest is folded too: what it held folded stays covered.
                Some(&first) if first == oldest => Some(meta.folded_from.unwrap_or(first)),
                Some(&first) => Some(first),
            };
        }
        let pruned: Vec<u64> = next
            .generations
            .drain(..drop_n)
            .map(|g| g.generation)
            .collect();
        if let Some(into) = next.generations.first_mut().filter(|_| !folding.is_empty()) {
            // Saved before the metadata that drops the folded ones: a crash in between leaves a
            // kept bitmap holding more than its own changes (more to ship, never less).
            let closed = v.closed.read();
            let fold_into = |target: &DirtyBitmap| {
                for g in &folding {
                    match closed.get(g) {
                        Some(b) => target.union_with(b),
                        None => target.mark_all(),
                    }
                }
            };
            if into.generation == closed_id.generation {
                fold_into(&self.gen.bitmap);
                into.dirty_bytes = self.gen.bitmap.dirty_bytes();
            } else if let Some(target) = closed.get(&into.generation) {
                fold_into(target);
                into.dirty_bytes = target.dirty_bytes();
                let id = GenerationId {
                    epoch: closed_id.epoch,
                    generation: into.generation,
                };
                target.save(&v.dir.join(format!("gen-{}.bitmap", into.generation)), id)?;
            } else {
                // Nothing to fold into (not expected): the pinned pairs ship whole instead.
                next.folded_from = None;
            }
        }
        // The closed generation's bitmap, the metadata that lists it and the next generation's
        // empty bitmap are written at once, their fsyncs overlapping: the cut holds the writes of
        // the whole group meanwhile. Any of them may survive a crash without the others, and
        // each such mix opens safely — a listed bitmap that is missing, or an open bitmap of a
        // generation the metadata does not have open, reads as all dirty (more to ship, never
        // less), and an open bitmap one generation behind reads as empty, the activity log
        // (reset below, before writes resume) holding what the new generation wrote.
        let (closed_saved, meta_saved, next_saved) = std::thread::scope(|s| {
            let closed = s.spawn(|| self.gen.bitmap.save(&closed_path, closed_id));
            let open = s.spawn(|| next_bitmap.save(&v.dir.join(OPEN_BITMAP_FILE), new_id));
            let meta_saved = next.save(&v.dir.join(META_FILE));
            (
                closed.join().expect("saving a bitmap panicked"),
                meta_saved,
                open.join().expect("saving a bitmap panicked"),
            )
        });
        closed_saved?;
        meta_saved?;
        next_saved?;
        *meta = next;
        drop(meta);

        let closed_bitmap = std::mem::replace(&mut self.gen.bitmap, next_bitmap);
        self.gen.id = new_id;
        {
            let mut closed = v.closed.write();
            closed.insert(closed_id.generation, Arc::new(closed_bitmap));
            for g in &pruned {
                closed.remove(g);
                let _ = std::fs::remove_file(v.dir.join(format!("gen-{g}.bitmap")));
            }
        }
        v.al.reset(new_id)?;
        Ok(closed_id.generation)
    }

    pub fn volume(&self) -> &Volume {
        self.vol
    }

    /// Install the synchronous mirror at this cut: every change after it goes through `m`.
    pub fn set_mirror(&self, m: Option<Arc<dyn Mirror>>) {
        *self.vol.mirror.write() = m;
    }

    /// Blocks changed after generation `since` up to this cut, if every generation in between
    /// is still known.
    fn changes_since(
        &self,
        closed: &BTreeMap<u64, Arc<DirtyBitmap>>,
        since: Option<u64>,
    ) -> Option<DirtyBitmap> {
        let generation = self.gen.id.generation;
        let k = since.filter(|k| *k < generation)?;
        let folded_from = self.vol.meta.lock().folded_from;
        union_after(closed, folded_from, k, generation, &self.gen.bitmap)
    }

    /// Commit the cut and keep the content at the cut readable while writes go on (for
    /// shipping by replication pair `owner`; each pair has its own image). The image's pending
    /// blocks are the changes since generation `since` (the last one the target holds
    /// completely, `None` when it holds none): the union of the kept bitmaps after it — or the
    /// whole volume when a bitmap in between is no longer kept.
    ///
    /// `extra` blocks are pending too (where a demoted target may differ from this volume).
    ///
    /// With `resume`, the target already holds some blocks from an interrupted transfer: those it
    /// holds as of the resume's reference generation and that did not change since are not
    /// pending. When the changes since the reference are not all known, nothing is skipped.
    pub fn commit_with_image(
        self,
        owner: &str,
        cut_id: &str,
        since: Option<u64>,
        resume: Option<&Resume>,
        extra: Option<&DirtyBitmap>,
    ) -> Result<(u64, Arc<CutImage>)> {
        let v = self.vol;
        let generation = self.gen.id.generation;
        let closed = v.closed.read();
        let pending = match self.changes_since(&closed, since) {
            Some(p) => p,
            None => {
                let all = DirtyBitmap::new(v.size, v.granularity);
                all.mark_all();
                all
            }
        };
        if let Some(x) = extra {
            pending.union_with(x);
        }
        if let Some(r) = resume {
            if let Some(changed) = self.changes_since(&closed, Some(r.reference)) {
                let skip = r.applied.duplicate();
                skip.subtract(&changed);
                pending.subtract(&skip);
            }
        }
        drop(closed);
        // Created before the commit releases the gate, so no write can slip in unpreserved.
        let image = Arc::new(CutImage::create(&v.dir, generation, &pending)?);
        {
            // A pair's new image replaces the one it was shipping (abandoned for this cut).
            let mut images = v.images.write();
            images.retain(|(o, _)| o != owner);
            images.push((owner.to_string(), image.clone()));
        }
        match self.commit(cut_id) {
            Ok(g) => Ok((g, image)),
            Err(e) => {
                v.release_cut_image(owner);
                Err(e)
            }
        }
    }
}

/// Blocks changed after generation `k`: the union of the kept closed bitmaps after it and the open
/// generation's (`open`, generation `open_generation`), if they prove it — every generation
/// since `k` is kept, or folded into the oldest kept one (`folded_from`, see `VolumeMeta`);
/// `None` when they do not. A fold may add changes from before `k`: more to ship, never less.
fn union_after(
    closed: &BTreeMap<u64, Arc<DirtyBitmap>>,
    folded_from: Option<u64>,
    k: u64,
    open_generation: u64,
    open: &DirtyBitmap,
) -> Option<DirtyBitmap> {
    let end = open_generation;
    let mut start = k + 1;
    if let (Some(oldest), Some(from)) = (closed.keys().next().copied(), folded_from) {
        if start >= from && start < oldest {
            start = oldest;
        }
    }
    if !(start..end).all(|g| closed.contains_key(&g)) {
        return None;
    }
    let out = DirtyBitmap::new(open.size(), open.granularity());
    for g in start..end {
        out.union_with(&closed[&g]);
    }
    out.union_with(open);
    Some(out)
}

/// Apply the replica's retention to its recovery points (newest first): at most `keep_points`
/// complete generations in all, none older than `points_max_age_ms`.
fn retain_points(r: &mut ReplicaState) {
    r.points.truncate(r.keep_points.saturating_sub(1));
    if let Some(age) = r.points_max_age_ms {
        let oldest = now_ms().saturating_sub(age);
        r.points.retain(|p| p.at_ms >= oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_volume(size: u64) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        Volume::create(&dir, "v", size, DEFAULT_GRANULARITY).unwrap();
        (tmp, dir)
    }

    #[test]
    fn bitmap_ref_names() {
        assert_eq!(BitmapRef::parse("open"), Some(BitmapRef::Open));
        assert_eq!(BitmapRef::parse("gen-12"), Some(BitmapRef::Generation(12)));
        for bad in ["gen-", "gen-01", "gen-x", "Open", "gen--1"] {
            assert_eq!(BitmapRef::parse(bad), None, "{bad}");
        }
        assert_eq!(BitmapRef::Generation(3).name(), "gen-3");
    }

    #[test]
    fn writes_are_tracked_and_read_back() {
        let (_t, dir) = new_volume(16 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.write_at(70000, &[7u8; 100], false).unwrap();
        let mut buf = [0u8; 100];
        v.read_at(70000, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 100]);
        assert_eq!(
            v.dirty_extents(),
            vec![Extent {
                offset: 65536,
                length: 65536
            }]
        );
        assert_eq!(
            v.write_at(16 << 20, &[1], false).unwrap_err().code(),
            "ERR_OUT_OF_RANGE"
        );
    }

    #[test]
    fn cut_moves_changes_to_a_closed_generation() {
        let (_t, dir) = new_volume(16 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.write_at(0, &[1u8; 4096], false).unwrap();
        assert_eq!(v.lock_for_cut().commit("c1").unwrap(), 1);
        assert!(v.dirty_extents().is_empty());
        assert_eq!(
            v.generation_extents(1).unwrap(),
            vec![Extent {
                offset: 0,
                length: 65536
            }]
        );
        v.trim(1 << 20, 4096, false).unwrap();
        assert_eq!(v.bitmaps(), vec![BitmapRef::Open, BitmapRef::Generation(1)]);
        v.close().unwrap();
        drop(v);
        let v = Volume::open(&dir, "v").unwrap();
        assert_eq!(v.info().open_generation, 2);
        assert_eq!(
            v.dirty_extents(),
            vec![Extent {
                offset: 1 << 20,
                length: 65536
            }]
        );
        assert_eq!(
            v.generation_extents(1).unwrap(),
            vec![Extent {
                offset: 0,
                length: 65536
            }]
        );
    }

    #[test]
    fn unclean_stop_keeps_every_write_in_the_bitmap() {
        let (_t, dir) = new_volume(64 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.write_at(10 << 20, &[9u8; 4096], false).unwrap();
        v.write_zeroes(33 << 20, 8192, ZeroFlags::default())
            .unwrap();
        // No close(): simulate kill -9 by leaking the volume.
        std::mem::forget(v);
        let v = Volume::open(&dir, "v").unwrap();
        let dirty = v.dirty_extents();
        for off in [10u64 << 20, 33 << 20] {
            assert!(
                dirty
                    .iter()
                    .any(|e| e.offset <= off && off < e.offset + e.length),
                "{off} missing from {dirty:?}"
            );
        }
        // False positives are limited to the hot 4 MiB extents.
        assert!(v.info().dirty_bytes <= 8 << 20);
    }

    #[test]
    fn hot_set_overflow_flushes_bitmap_without_losing_bits() {
        let size = (crate::activity_log::CAPACITY as u64 + 8) * crate::activity_log::EXTENT_SIZE;
        let (_t, dir) = new_volume(size);
        let v = Volume::open(&dir, "v").unwrap();
        let n = crate::activity_log::CAPACITY as u64 + 4;
        for e in 0..n {
            v.write_at(e * crate::activity_log::EXTENT_SIZE, &[1u8; 4096], false)
                .unwrap();
        }
        std::mem::forget(v);
        let v = Volume::open(&dir, "v").unwrap();
        let dirty = v.dirty_extents();
        for e in 0..n {
            let off = e * crate::activity_log::EXTENT_SIZE;
            assert!(
                dirty
                    .iter()
                    .any(|x| x.offset <= off && off < x.offset + x.length),
                "extent {e} lost"
            );
        }
    }

    #[test]
    fn cut_image_reads_the_cut_while_writes_go_on() {
        let (_t, dir) = new_volume(4 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.write_at(0, &[1u8; 131072], false).unwrap();
        v.write_at(1 << 20, &[2u8; 4096], false).unwrap();
        let (g, img) = v
            .lock_for_cut()
            .commit_with_image("p1", "c", Some(0), None, None)
            .unwrap();
        assert_eq!(g, 1);
        assert_eq!(img.pending_bytes(), 131072 + 65536);
        // Writes after the cut, to pending and to clean blocks, and a trim.
        v.write_at(4096, &[9u8; 4096], false).unwrap();
        v.write_at(2 << 20, &[9u8; 4096], false).unwrap();
        v.trim(1 << 20, 65536, false).unwrap();
        let mut buf = vec![0u8; 131072];
        v.read_cut(&img, 0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|b| *b == 1),
            "image shows the cut, not the later write"
        );
        let mut b2 = vec![0u8; 4096];
        v.read_cut(&img, 1 << 20, &mut b2).unwrap();
        assert!(
            b2.iter().all(|b| *b == 2),
            "trimmed after the cut, still there in the image"
        );
        v.read_at(4096, &mut b2).unwrap();
        assert!(
            b2.iter().all(|b| *b == 9),
            "the volume itself has the new data"
        );
        img.shipped(0, 131072);
        assert_eq!(img.pending_bytes(), 65536);
        v.release_cut_image("p1");
        drop(img);
        assert!(!dir.join("cut-image-1.side").exists());
    }

    /// Two pairs (two target sites) ship the same volume from different cuts: each reads its own
    /// cut while writes go on, and one pair's release or next cut leaves the other's image alone.
    #[test]
    fn each_pair_ships_its_own_cut_image() {
        let (_t, dir) = new_volume(4 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        let block = |byte: u8| vec![byte; 65536];
        v.write_at(0, &block(1), false).unwrap();
        let (_, first) = v
            .lock_for_cut()
            .commit_with_image("to-b", "c1", None, None, None)
            .unwrap();
        v.write_at(0, &block(2), false).unwrap();
        let (_, second) = v
            .lock_for_cut()
            .commit_with_image("to-c", "c2", None, None, None)
            .unwrap();
        v.write_at(0, &block(3), false).unwrap();
        let read = |img: &CutImage| {
            let mut buf = vec![0u8; 65536];
            v.read_cut(img, 0, &mut buf).unwrap();
            buf[0]
        };
        assert_eq!((read(&first), read(&second)), (1, 2));
        // to-b cuts again: its old image goes, to-c's stays and still shows its cut.
        let (_, third) = v
            .lock_for_cut()
            .commit_with_image("to-b", "c3", None, None, None)
            .unwrap();
        assert!(Arc::ptr_eq(&v.cut_image("to-b").unwrap(), &third));
        v.write_at(0, &block(4), false).unwrap();
        assert_eq!((read(&second), read(&third)), (2, 3));
        v.release_cut_image("to-b");
        assert!(v.cut_image("to-b").is_none());
        assert!(Arc::ptr_eq(&v.cut_image("to-c").unwrap(), &second));
        v.write_at(0, &block(5), false).unwrap();
        assert_eq!(read(&second), 2);
    }

    /// Past the most the pins may keep, the oldest needed bitmaps are folded into the oldest kept
    /// one: the lagging pair's next cut is still a delta — every block changed since its base,
    /// plus at most the folded generations' own — and that survives a reopen.
    #[test]
    fn bitmaps_past_the_pinned_maximum_are_folded_not_lost() {
        let (_t, dir) = new_volume(4 << 20);
        let block = |i: u64| i * DEFAULT_GRANULARITY;
        let since_base = |v: &Volume| {
            let guard = v.lock_for_cut();
            let closed = v.closed.read();
            guard.changes_since(&closed, Some(2))
        };
        {
            let v = Volume::open(&dir, "v").unwrap();
            v.set_max_pinned_generations(4);
            v.pin_generation("slow", Some(2));
            // Generation g (1, 2, …) writes block g.
            for g in 1..=20u64 {
                v.write_at(block(g), &[g as u8; 4096], false).unwrap();
                v.lock_for_cut().commit("c").unwrap();
            }
            assert_eq!(
                v.closed.read().len(),
                4,
                "at most the pinned maximum is kept"
            );
            assert_eq!(v.meta().folded_from, Some(3));
            let changed = since_base(&v).expect("still a delta");
            let dirty: Vec<u64> = (0..64).filter(|b| changed.is_dirty(*b)).collect();
            assert_eq!(
                dirty,
                (3..=20).collect::<Vec<_>>(),
                "exactly the changes after 2"
            );
            // A base inside the folded range gets a superset; one before it, nothing provable.
            let guard = v.lock_for_cut();
            let closed = v.closed.read();
            let from_10 = guard.changes_since(&closed, Some(10)).unwrap();
            assert!((11..=20).all(|b| from_10.is_dirty(b)));
            assert!(guard.changes_since(&closed, Some(1)).is_none());
        }
        // The fold is on disk: a reopened volume proves the same.
        let v = Volume::open(&dir, "v").unwrap();
        let changed = since_base(&v).expect("still a delta after a reopen");
        assert!(
            (3..=20).all(|b| changed.is_dirty(b)) && !changed.is_dirty(1) && !changed.is_dirty(2)
        );
        // Without pins the count rules again and the fold goes with the oldest bitmap.
        for _ in 0..10 {
            v.lock_for_cut().commit("c").unwrap();
        }
        assert_eq!(v.meta().folded_from, None);
        assert_eq!(
            v.closed.read().len() as u64,
            v.meta().keep_generations as u64
        );
    }

    /// Closed bitmaps beyond the kept count stay while a pair's target still needs them (its
    /// pinned generation is before them), and go once it catches up or leaves.
    #[test]
    fn pinned_generations_keep_their_bitmaps_past_the_count() {
        let (_t, dir) = new_volume(1 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        let keep = v.meta().keep_generations as u64;
        v.pin_generation("slow", Some(2));
        for _ in 0..keep + 5 {
            v.write_at(0, &[1u8; 4096], false).unwrap();
            v.lock_for_cut().commit("c").unwrap();
        }
        let kept = |v: &Volume| v.closed.read().keys().copied().collect::<Vec<_>>();
        assert_eq!(
            kept(&v).first(),
            Some(&3),
            "everything after the pin is kept"
        );
        let since2 = v.lock_for_cut().changes_since(&v.closed.read(), Some(2));
        assert!(since2.is_some(), "the slow pair's next cut is a delta");
        v.pin_generation("slow", Some(keep + 2));
        v.lock_for_cut().commit("c").unwrap();
        assert_eq!(
            kept(&v).len() as u64,
            keep,
            "caught up: back to the kept count"
        );
        v.pin_generation("slow", None);
        v.lock_for_cut().commit("c").unwrap();
        assert_eq!(kept(&v).len() as u64, keep);
    }

    /// Apply generation `g` writing `byte` over `[offset, offset+len)`.
    fn apply_gen(v: &Volume, g: u64, offset: u64, byte: u8, len: usize) {
        let txn = v.begin_apply(1, g, None).unwrap();
        let data = vec![byte; len];
        v.apply_batch(
            &txn,
            &[ApplyOp::Data {
                offset,
                data: &data,
            }],
        )
        .unwrap();
        v.commit_apply(&txn).unwrap();
    }

    fn byte_at(v: &Volume, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        v.read_at(offset, &mut b).unwrap();
        b[0]
    }

    #[test]
    fn an_interrupted_restore_to_a_recovery_point_finishes_at_open() {
        let (_t, dir) = new_volume(4 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.make_replica("site-a", 1).unwrap();
        apply_gen(&v, 1, 0, 1, 1 << 20);
        apply_gen(&v, 2, 0, 2, 4096);
        apply_gen(&v, 3, 65536, 3, 4096);
        apply_gen(&v, 4, 0, 4, 4096);
        let rep = v.replica().unwrap();
        let kept: Vec<u64> = rep.points.iter().map(|p| p.generation).collect();
        assert_eq!(kept, vec![3, 2], "the default keeps two before the last");
        // A crash right after the restore to 2 was recorded, before any undo ran.
        v.update_replica(|r| r.restoring_to = Some(2)).unwrap();
        drop(v);
        let v = Volume::open(&dir, "v").unwrap();
        let rep = v.replica().unwrap();
        assert_eq!((rep.last_complete_generation, rep.restoring_to), (2, None));
        assert!(rep.points.is_empty());
        assert_eq!(
            (byte_at(&v, 0), byte_at(&v, 65536), byte_at(&v, 4096)),
            (2, 1, 1)
        );
        // Too few points to go further back: a clear refusal.
        let e = v.promote_to(Some(1)).unwrap_err();
        assert!(
            e.to_string().contains("no recovery point at generation 1"),
            "{e}"
        );
        assert_eq!(v.promote_to(Some(2)).unwrap(), 2);
    }

    #[test]
    fn replica_applies_generations_atomically() {
        let (_t, dir) = new_volume(4 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.make_replica("site-a", 1).unwrap();
        assert_eq!(
            v.write_at(0, &[1], false).unwrap_err().code(),
            "ERR_READ_ONLY"
        );
        let txn = v.begin_apply(1, 1, None).unwrap();
        v.apply_batch(
            &txn,
            &[ApplyOp::Data {
                offset: 0,
                data: &[5u8; 8192],
            }],
        )
        .unwrap();
        let mut buf = vec![0u8; 8192];
        v.read_at(0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0),
            "readers see the last complete generation mid-apply"
        );
        v.commit_apply(&txn).unwrap();
        drop(txn);
        v.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 5));
        assert_eq!(v.replica().unwrap().last_complete_generation, 1);

        // Generation 2 interrupted by a crash: rolled back at the next open.
        let txn = v.begin_apply(1, 2, None).unwrap();
        v.apply_batch(
            &txn,
            &[
                ApplyOp::Data {
                    offset: 0,
                    data: &[6u8; 4096],
                },
                ApplyOp::Zero {
                    offset: 1 << 20,
                    length: 65536,
                },
            ],
        )
        .unwrap();
        std::mem::forget(txn);
        std::mem::forget(v);
        let v = Volume::open(&dir, "v").unwrap();
        v.read_at(0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|b| *b == 5),
            "the interrupted generation is rolled back"
        );
        assert_eq!(v.replica().unwrap().last_complete_generation, 1);
    }

    #[test]
    fn promote_rolls_back_and_opens_for_writes() {
        let (_t, dir) = new_volume(4 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        assert_eq!(v.promote().unwrap_err().code(), "ERR_INVALID_ARGUMENT");
        v.make_replica("site-a", 1).unwrap();
        let txn = v.begin_apply(1, 1, None).unwrap();
        v.apply_batch(
            &txn,
            &[ApplyOp::Data {
                offset: 0,
                data: &[3u8; 4096],
            }],
        )
        .unwrap();
        v.commit_apply(&txn).unwrap();
        let txn = v.begin_apply(1, 2, None).unwrap();
        v.apply_batch(
            &txn,
            &[ApplyOp::Data {
                offset: 0,
                data: &[4u8; 4096],
            }],
        )
        .unwrap();
        drop(txn);
        assert_eq!(v.promote().unwrap(), 1);
        let mut buf = vec![0u8; 4096];
        v.read_at(0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|b| *b == 3),
            "the interrupted generation 2 was rolled back"
        );
        v.write_at(8192, &[9u8; 4096], false).unwrap();
        assert_eq!(
            v.dirty_extents(),
            vec![Extent {
                offset: 0,
                length: 65536
            }]
        );
        v.close().unwrap();
        drop(v);
        let v = Volume::open(&dir, "v").unwrap();
        assert!(v.replica().is_none() && !v.read_only());
        assert_eq!(v.meta().epoch, 2);
        assert_eq!(
            v.dirty_extents(),
            vec![Extent {
                offset: 0,
                length: 65536
            }]
        );
    }

    #[test]
    fn a_fence_refuses_writes_until_lifted_and_outlives_a_reopen() {
        let (_t, dir) = new_volume(4 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        v.write_at(0, &[1u8; 4096], false).unwrap();
        v.set_fenced(true).unwrap();
        v.set_fenced(true).unwrap();
        let refused = [
            v.write_at(0, &[2u8; 4096], false).unwrap_err(),
            v.trim(0, 4096, false).unwrap_err(),
            v.write_zeroes(0, 4096, ZeroFlags::default()).unwrap_err(),
        ];
        for e in refused {
            assert_eq!(e.code(), "ERR_FENCED");
            assert_eq!(e.nbd_errno(), crate::nbd::proto::EPERM);
            assert!(
                e.to_string().contains("planned migration or failback"),
                "{e}"
            );
        }
        assert_eq!(byte_at(&v, 0), 1, "reads go on, nothing landed");
        // Cuts go on too: the last changes must still ship.
        assert_eq!(v.lock_for_cut().commit("c").unwrap(), 1);
        assert!(v.info().fenced);
        v.close().unwrap();
        drop(v);
        let v = Volume::open(&dir, "v").unwrap();
        assert!(v.info().fenced, "the fence is persisted");
        assert_eq!(v.write_at(0, &[3], false).unwrap_err().code(), "ERR_FENCED");
        v.set_fenced(false).unwrap();
        v.write_at(0, &[3], false).unwrap();
        drop(v);
        let v = Volume::open(&dir, "v").unwrap();
        assert!(!v.fenced());
        // Demoting (what `reverse` does to the former source) ends the fence.
        v.set_fenced(true).unwrap();
        v.demote("site-b", 1, 1, None).unwrap();
        assert!(!v.fenced() && !v.meta().fenced && v.read_only());
        assert_eq!(
            v.set_fenced(true).unwrap_err().code(),
            "ERR_INVALID_ARGUMENT",
            "a replica has no fence"
        );
        drop(v);
        assert!(!Volume::open(&dir, "v").unwrap().info().fenced);
    }

    #[test]
    fn a_meta_from_before_fences_loads_unfenced() {
        let (_t, dir) = new_volume(1 << 20);
        let path = dir.join(META_FILE);
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        m.as_object_mut().unwrap().remove("fenced");
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let v = Volume::open(&dir, "v").unwrap();
        assert!(!v.fenced());
        v.write_at(0, &[1], false).unwrap();
    }

    #[test]
    fn allocation_reports_holes() {
        let (_t, dir) = new_volume(16 << 20);
        let v = Volume::open(&dir, "v").unwrap();
        assert_eq!(
            v.allocation(0, 16 << 20).unwrap(),
            vec![StatusExtent {
                length: 16 << 20,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        v.write_at(4 << 20, &[5u8; 1 << 20], false).unwrap();
        let a = v.allocation(0, 16 << 20).unwrap();
        assert_eq!(a.iter().map(|e| e.length).sum::<u64>(), 16 << 20);
        assert!(a.iter().any(|e| e.flags == 0));
        v.write_zeroes(
            4 << 20,
            1 << 20,
            ZeroFlags {
                may_trim: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            v.allocation(0, 16 << 20).unwrap(),
            vec![StatusExtent {
                length: 16 << 20,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        let mut buf = vec![1u8; 4096];
        v.read_at(4 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }
}
