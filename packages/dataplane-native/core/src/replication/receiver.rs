//! `Receiver`: a site's data plane accepting replication from other sites. It answers control
//! messages (open a group after the residency check, begin and commit generations) and applies
//! data frames to replicas, acknowledging each only after it is applied. It refuses any frame for
//! a volume no accepted session covers, and never applies a frame that fails verification.

use super::applier::{Applier, Change};
use super::frame::{self, Content, Message};
use super::protocol::{
    block_hash, region_allowed, ApplyingReport, ControlMessage, ControlReply, GenerationRef,
    ReplicaReport, MAX_HASHES, MAX_RESUME_EXTENTS,
};
use super::sync::SyncSession;
use crate::apply_txn::ApplyTxn;
use crate::commit_intent::{self, Intent, IntentEntry};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::volume::ApplyOp;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Most bytes of before-images read ahead when a generation begins.
const PREFETCH_AT_BEGIN: u64 = 256 << 20;

fn names(v: &[GenerationRef]) -> Vec<String> {
    v.iter().map(|g| g.name.clone()).collect()
}

struct AcceptedGroup {
    source_site: String,
    volumes: Vec<String>,
}

pub struct Receiver {
    site: String,
    region: String,
    registry: Arc<Registry>,
    groups: Mutex<HashMap<String, AcceptedGroup>>,
    /// Synchronous sessions, per volume.
    sessions: Mutex<HashMap<String, SyncSession>>,
    /// This site's volumes that its own pairs ship elsewhere, and the pairs shipping each (one
    /// per target site).
    shipping: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Per replica, what applies the acknowledged frames of its running generation.
    appliers: Mutex<HashMap<String, Arc<Applier>>>,
}

fn refused(code: &str, message: String) -> Error {
    Error::Remote {
        code: code.into(),
        message,
    }
}

impl Receiver {
    pub fn new(site: &str, region: &str, registry: Arc<Registry>) -> Receiver {
        Receiver {
            site: site.into(),
            region: region.into(),
            registry,
            groups: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            shipping: Mutex::new(HashMap::new()),
            appliers: Mutex::new(HashMap::new()),
        }
    }

    /// Apply what is queued for `volume` and stop its applier: every frame acknowledged so far
    /// is in the replica, or the error says which failed.
    fn finish_applying(&self, volume: &str) -> Result<()> {
        match self.appliers.lock().remove(volume) {
            Some(a) => finish_applier(a),
            None => Ok(()),
        }
    }

    /// Take `volume`'s applier for a commit: with the changes it has not written in place yet
    /// (holding back its next batch), or, when it holds none, finished (`None`; its failure, if
    /// a change failed to apply).
    fn take_tail(&self, volume: &str) -> Result<Option<(Arc<Applier>, Vec<Change>)>> {
        let Some(a) = self.appliers.lock().remove(volume) else {
            return Ok(None);
        };
        match a.unapplied() {
            Ok(tail) if !tail.is_empty() => Ok(Some((a, tail))),
            _ => finish_applier(a).map(|()| None),
        }
    }

    /// The replica of `g` and its running transaction, which must be the generation `g` names.
    fn committing(&self, g: &GenerationRef) -> Result<(Arc<crate::volume::Volume>, Arc<ApplyTxn>)> {
        let v = self.registry.require(&g.name)?;
        let txn = v.applying().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "volume '{}' has no generation {} being applied",
                g.name, g.generation
            ))
        })?;
        if txn.id().epoch != g.epoch || txn.id().target != g.generation {
            return Err(Error::InvalidArgument(format!(
                "volume '{}' is applying generation {} of epoch {}, not {} of {}",
                g.name,
                txn.id().target,
                txn.id().epoch,
                g.generation,
                g.epoch
            )));
        }
        Ok((v, txn))
    }

    /// Commit the generation of a group of several volumes: one commit point for the whole group
    /// (see `commit_intent`). Every volume's data durable first — what its applier still holds
    /// staged, as for a lone volume (`commit_one`) —, then the intent, then each volume's own
    /// record, and the appliers write their tails in place after the answer.
    fn commit_group(&self, group: &str, volumes: &[GenerationRef]) -> Result<ControlReply> {
        let started = std::time::Instant::now();
        let mut parts: Vec<GroupPart<'_>> = Vec::new();
        let mut drained = Ok(());
        for g in volumes {
            // Every applier is taken (a failure of one does not leave the others running).
            let (applier, tail) = match self.take_tail(&g.name) {
                Ok(Some((a, tail))) => (Some(a), tail),
                Ok(None) => (None, Vec::new()),
                Err(e) => {
                    drained = drained.and(Err(e));
                    (None, Vec::new())
                }
            };
            parts.push((g, applier, tail));
        }
        // Until the intent is written nothing is committed: on a failure every applier finishes
        // what it holds (as a commit without tails would have), and the source may try again.
        let unwind = |parts: Vec<GroupPart<'_>>| {
            for (_, a, _) in parts {
                if let Some(a) = a {
                    let _ = finish_applier(a);
                }
            }
        };
        let mut ready = Vec::new();
        let durable = drained.and_then(|()| {
            for (g, _, tail) in &parts {
                let (v, txn) = self.committing(g)?;
                if tail.is_empty() {
                    v.flush_replica()?;
                } else {
                    v.stage_apply(&txn, tail)?;
                }
                ready.push((v, txn));
            }
            Ok(())
        });
        let intent = durable.and_then(|()| {
            commit_intent::write(
                self.registry.data_dir().root(),
                &Intent {
                    group: group.to_string(),
                    volumes: volumes
                        .iter()
                        .map(|g| IntentEntry {
                            name: g.name.clone(),
                            epoch: g.epoch,
                            target: g.generation,
                        })
                        .collect(),
                },
            )
        });
        let intent = match intent {
            Ok(i) => i,
            Err(e) => {
                unwind(parts);
                return Err(e);
            }
        };
        // Committed (the intent says so, also to the next open): each volume records it.
        let mut recorded = Ok(());
        let mut settling = Vec::new();
        for ((_, applier, tail), (v, txn)) in parts.into_iter().zip(ready) {
            let r = match applier {
                Some(a) => v
                    .record_staged(&txn, tail)
                    .map(|()| settling.push((v, txn, a))),
                None => v.commit_apply(&txn),
            };
            recorded = recorded.and(r);
        }
        if recorded.is_ok() {
            commit_intent::remove(&intent);
        }
        log::debug!(
            "group '{group}': committed {:.1} ms after its commit arrived, {} volume(s) with changes staged",
            crate::ms(started.elapsed()),
            settling.len()
        );
        for (v, txn, a) in settling {
            settle_later(v, txn, a);
        }
        recorded.map(|()| ControlReply::ok())
    }

    /// Commit the generation of a group of one volume (no intent: its own commit is atomic
    /// already, and the intent's two fsyncs are a good part of a small generation's time). The
    /// changes its applier still holds are staged instead of waited for (see `staged_tail`);
    /// the applier writes them in place after the answer, and the volume settles then.
    fn commit_one(&self, group: &str, g: &GenerationRef) -> Result<ControlReply> {
        let started = std::time::Instant::now();
        let Some((applier, tail)) = self.take_tail(&g.name)? else {
            let (v, txn) = self.committing(g)?;
            v.commit_apply(&txn)?;
            log::debug!(
                "group '{group}': committed {:.1} ms after its commit arrived",
                crate::ms(started.elapsed())
            );
            return Ok(ControlReply::ok());
        };
        let changes = tail.len();
        let committed = self
            .committing(g)
            .and_then(|(v, txn)| v.commit_apply_staged(&txn, tail).map(|()| (v, txn)));
        let (v, txn) = match committed {
            Ok(c) => c,
            Err(e) => {
                // Not committed: whatever was acknowledged is applied before the answer, as
                // without a tail.
                let _ = finish_applier(applier);
                return Err(e);
            }
        };
        log::debug!(
            "group '{group}': committed {:.1} ms after its commit arrived, {changes} changes staged",
            crate::ms(started.elapsed())
        );
        settle_later(v, txn, applier);
        Ok(ControlReply::ok())
    }

    /// The applier of `txn`, the running generation of `volume` (a new one replaces an applier
    /// of an earlier generation, which applies what it holds first).
    fn applier(
        &self,
        volume: &Arc<crate::volume::Volume>,
        txn: &Arc<ApplyTxn>,
    ) -> Result<Arc<Applier>> {
        let mut appliers = self.appliers.lock();
        if let Some(a) = appliers.get(volume.name()).filter(|a| a.applies(txn)) {
            return Ok(a.clone());
        }
        let a = Arc::new(Applier::start(volume.clone(), txn.clone())?);
        appliers.insert(volume.name().to_string(), a.clone());
        Ok(a)
    }

    /// A pair of this site ships `volumes` (or stopped doing so).
    pub fn set_shipping(&self, volumes: &[String], pair: &str, on: bool) {
        let mut s = self.shipping.lock();
        for v in volumes {
            let pairs = s.entry(v.clone()).or_default();
            if on {
                pairs.insert(pair.to_string());
            } else {
                pairs.remove(pair);
            }
            if pairs.is_empty() {
                s.remove(v);
            }
        }
    }

    /// Handle one control message; blocking (file I/O).
    pub fn control(&self, msg: ControlMessage) -> Result<ControlReply> {
        match msg {
            ControlMessage::Open {
                group,
                source_site,
                source_region: _,
                allowed_regions,
                volumes,
                recovery_points,
                points_max_age_ms,
                reverse,
            } => {
                if !region_allowed(&self.region, &allowed_regions) {
                    return Err(Error::Residency {
                        volume: volumes
                            .iter()
                            .map(|v| v.name.clone())
                            .collect::<Vec<_>>()
                            .join(","),
                        site: self.site.clone(),
                        region: self.region.clone(),
                        allowed: allowed_regions.join(","),
                    });
                }
                // Replicating back: this site's own volumes become replicas of the source's. All
                // are checked before any is demoted.
                let mut demote = Vec::new();
                for spec in &volumes {
                    let Some(vol) = self.registry.get(&spec.name) else {
                        continue;
                    };
                    if vol.replica().is_some() {
                        continue;
                    }
                    let Some(rb) = reverse.iter().find(|r| r.name == spec.name) else {
                        continue;
                    };
                    if vol.size() != spec.size {
                        return Err(Error::InvalidArgument(format!(
                            "volume '{}' has {} bytes at site {} and {} at {source_site}: it cannot be replicated back",
                            spec.name,
                            vol.size(),
                            self.site,
                            spec.size
                        )));
                    }
                    if let Some(pairs) = self.shipping.lock().get(&spec.name) {
                        let pairs: Vec<&str> = pairs.iter().map(String::as_str).collect();
                        return Err(Error::VolumeBusy {
                            name: spec.name.clone(),
                            why: format!(
                                "site {} still replicates it (pair {}); stop {} there before replicating back",
                                self.site,
                                pairs.join(", "),
                                if pairs.len() == 1 { "that pair" } else { "those pairs" }
                            ),
                        });
                    }
                    demote.push((vol, rb.clone()));
                }
                for (vol, rb) in demote {
                    let diverged = vol.demote(
                        &source_site,
                        rb.epoch,
                        rb.base,
                        Some((rb.common_epoch, rb.common_generation)),
                    )?;
                    log::info!(
                        "volume '{}' at site {} is now a replica of {source_site}; {} bytes to resend where it diverged",
                        vol.name(),
                        self.site,
                        diverged.dirty_bytes()
                    );
                }
                let mut replicas = Vec::new();
                for spec in &volumes {
                    let vol = match self.registry.get(&spec.name) {
                        Some(v) => v,
                        None => {
                            self.registry
                                .create(&spec.name, spec.size, spec.granularity)?;
                            let v = self.registry.require(&spec.name)?;
                            v.make_replica(&source_site, 1)?;
                            v
                        }
                    };
                    let rep = vol.replica().ok_or_else(|| Error::VolumeExists {
                        name: spec.name.clone(),
                        dir: self.registry.data_dir().root().to_path_buf(),
                    })?;
                    if rep.source_site != source_site || vol.size() != spec.size {
                        return Err(Error::InvalidArgument(format!(
                            "volume '{}' at site {} is a replica of {} with {} bytes; the session from {} has {} bytes: delete it there first",
                            spec.name,
                            self.site,
                            rep.source_site,
                            vol.size(),
                            source_site,
                            spec.size
                        )));
                    }
                    if let Some(n) = recovery_points {
                        vol.set_keep_points(n, points_max_age_ms)?;
                    }
                    replicas.push(ReplicaReport {
                        name: spec.name.clone(),
                        epoch: rep.epoch,
                        last_complete_generation: rep.last_complete_generation,
                        applying: vol.applying().and_then(|t| applying_report(&t)),
                        diverged: vol.diverged().map(|d| runs(&d, vol.size())),
                    });
                }
                self.groups.lock().insert(
                    group,
                    AcceptedGroup {
                        source_site,
                        volumes: volumes.into_iter().map(|v| v.name).collect(),
                    },
                );
                let mut r = ControlReply::ok();
                r.region = Some(self.region.clone());
                r.replicas = replicas;
                Ok(r)
            }
            ControlMessage::Begin { group, volumes } => {
                self.check_group(&group, &names(&volumes))?;
                // The memory a commit stages its tails in, touched before a commit needs it.
                crate::staged_tail::warm_up(2 * super::applier::MAX_QUEUED_BYTES);
                // Generations replace synchronous sessions (a resync after a suspension).
                let mut sessions = self.sessions.lock();
                for v in &volumes {
                    sessions.remove(&v.name);
                }
                drop(sessions);
                for v in &volumes {
                    // What an earlier attempt left queued lands before that attempt is resumed
                    // or rolled back; a failure there matters to that attempt only.
                    if let Err(e) = self.finish_applying(&v.name) {
                        log::warn!("an earlier transfer to '{}' ended unapplied: {e}", v.name);
                    }
                }
                let mut prefetch = Vec::new();
                for GenerationRef {
                    name,
                    epoch,
                    generation,
                    resume_from,
                    changes,
                } in volumes
                {
                    let v = self.registry.require(&name)?;
                    // A generation left half-applied by an earlier attempt is resumed when the
                    // source asks for it, else rolled back first.
                    let txn = match v.begin_apply(epoch, generation, resume_from) {
                        Ok(txn) => txn,
                        Err(Error::VolumeBusy { .. }) if resume_from.is_none() => {
                            v.abort_apply()?;
                            v.begin_apply(epoch, generation, None)?
                        }
                        Err(e) => return Err(e),
                    };
                    // Until the read-ahead below is under way, the applier asks per change.
                    txn.set_read_ahead(false);
                    if !changes.is_empty() && !txn.is_initial() {
                        prefetch.push((v, txn, changes));
                    }
                }
                // Announcements read ahead whole need no second request per change.
                let announced: u64 = prefetch
                    .iter()
                    .flat_map(|(_, _, changes)| changes.iter().map(|[_, len]| *len))
                    .sum();
                let whole: Vec<_> = if announced <= PREFETCH_AT_BEGIN {
                    prefetch.iter().map(|(_, txn, _)| txn.clone()).collect()
                } else {
                    Vec::new()
                };
                // Ask the disk for the before-images of the announced changes now, while the
                // data is on its way, off the reply's path (the page cache's pages are taken as
                // the reads start), up to `PREFETCH_AT_BEGIN` bytes: the applier asks for the
                // rest as the frames arrive.
                if !prefetch.is_empty() {
                    let started = std::thread::Builder::new()
                        .name("ferry-prefetch".into())
                        .spawn(move || {
                            let mut budget = PREFETCH_AT_BEGIN;
                            for (v, txn, changes) in prefetch {
                                for [offset, length] in changes {
                                    let length = length.min(budget);
                                    v.prefetch_before_images(&txn, offset, length);
                                    budget -= length;
                                    if budget == 0 {
                                        return;
                                    }
                                }
                            }
                        });
                    if started.is_ok() {
                        for txn in whole {
                            txn.set_read_ahead(true);
                        }
                    }
                }
                Ok(ControlReply::ok())
            }
            ControlMessage::Commit { group, volumes } => {
                self.check_group(&group, &names(&volumes))?;
                if let [g] = volumes.as_slice() {
                    return self.commit_one(&group, g);
                }
                self.commit_group(&group, &volumes)
            }
            ControlMessage::Abort { group, volumes } => {
                self.check_group(&group, &volumes)?;
                for name in &volumes {
                    let _ = self.finish_applying(name);
                    self.registry.require(name)?.abort_apply()?;
                }
                Ok(ControlReply::ok())
            }
            ControlMessage::SyncStart {
                group,
                volume,
                epoch,
                base,
                floor,
            } => {
                self.check_group(&group, std::slice::from_ref(&volume))?;
                let v = self.registry.require(&volume)?;
                let rep = v.replica().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "volume '{volume}' at site {} is not a replica",
                        self.site
                    ))
                })?;
                if rep.epoch != epoch {
                    return Err(refused(
                        "ERR_STALE_EPOCH",
                        format!(
                            "volume '{volume}' at site {} is at epoch {}, not {epoch}",
                            self.site, rep.epoch
                        ),
                    ));
                }
                if rep.last_complete_generation != base || v.applying().is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "volume '{volume}' at site {} holds generation {}, not {base}: resync before going synchronous",
                        self.site, rep.last_complete_generation
                    )));
                }
                // Sync changes are not journaled: no kept journal leads back any more.
                v.drop_points()?;
                self.sessions
                    .lock()
                    .insert(volume, SyncSession::new(epoch, floor));
                Ok(ControlReply::ok())
            }
            ControlMessage::SyncFlush {
                group,
                volume,
                epoch,
            } => {
                self.check_group(&group, std::slice::from_ref(&volume))?;
                self.check_session(&volume, epoch)?;
                self.registry.require(&volume)?.flush_replica()?;
                Ok(ControlReply::ok())
            }
            ControlMessage::BlockHashes {
                group,
                volume,
                first,
                count,
            } => {
                self.check_group(&group, std::slice::from_ref(&volume))?;
                let v = self.registry.require(&volume)?;
                let gran = v.granularity();
                let blocks = v.size().div_ceil(gran);
                if count > MAX_HASHES || first.saturating_add(count) > blocks {
                    return Err(Error::InvalidArgument(format!(
                        "blockHashes of blocks {first}+{count} of '{volume}' ({blocks} blocks, at most {MAX_HASHES} at once)"
                    )));
                }
                let mut buf = vec![0u8; gran as usize];
                let mut r = ControlReply::ok();
                for b in first..first + count {
                    let len = gran.min(v.size() - b * gran) as usize;
                    v.read_at(b * gran, &mut buf[..len])?;
                    r.hashes.push(block_hash(&buf[..len]));
                }
                Ok(r)
            }
            ControlMessage::SyncMark { group, volumes } => {
                self.check_group(&group, &names(&volumes))?;
                for g in &volumes {
                    self.check_session(&g.name, g.epoch)?;
                }
                for g in &volumes {
                    self.registry
                        .require(&g.name)?
                        .mark_complete(g.epoch, g.generation)?;
                }
                Ok(ControlReply::ok())
            }
        }
    }

    fn check_group(&self, group: &str, volumes: &[String]) -> Result<()> {
        let groups = self.groups.lock();
        let g = groups.get(group).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no replication session '{group}' is open at site {}; open it first",
                self.site
            ))
        })?;
        for v in volumes {
            if !g.volumes.contains(v) {
                return Err(Error::InvalidArgument(format!(
                    "volume '{v}' is not part of session '{group}' from {}",
                    g.source_site
                )));
            }
        }
        Ok(())
    }

    fn check_session(&self, volume: &str, epoch: u64) -> Result<()> {
        match self.sessions.lock().get(volume) {
            None => Err(refused(
                "ERR_NO_SYNC_SESSION",
                format!(
                    "no synchronous session for volume '{volume}' at site {}",
                    self.site
                ),
            )),
            Some(s) if s.epoch != epoch => Err(refused(
                "ERR_STALE_EPOCH",
                format!(
                    "change of epoch {epoch} for volume '{volume}' refused: the session is at epoch {}",
                    s.epoch
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Apply one change of a synchronous session (each sequence number once); blocking.
    pub fn sync_change(&self, bytes: &[u8]) -> Result<()> {
        let Message::Data(f) = frame::decode(bytes)? else {
            return Err(Error::InvalidArgument("expected a data frame".into()));
        };
        self.check_session(f.volume, f.epoch)?;
        if self
            .sessions
            .lock()
            .get(f.volume)
            .is_some_and(|s| s.seen(f.seq))
        {
            return Ok(());
        }
        let content = f.verify()?;
        let v = self.registry.require(f.volume)?;
        v.apply_sync(&apply_op(&f, &content))?;
        if let Some(s) = self.sessions.lock().get_mut(f.volume) {
            s.record(f.seq);
        }
        Ok(())
    }

    fn covered(&self, volume: &str) -> bool {
        self.groups
            .lock()
            .values()
            .any(|g| g.volumes.iter().any(|v| v == volume))
    }

    /// Verify a batch of messages of data frames (each a bundle of one or more frames) and queue
    /// their changes for the replicas' appliers, in arrival order; blocking (it waits while an
    /// applier's queue is full). Each message gets its own answer: a message with a damaged or
    /// unexpected frame is refused whole and none of its frames is applied; a good one is
    /// acknowledged once queued — its generation is then committed only with it applied
    /// (`finish_applying`).
    pub fn frames(&self, messages: &[bytes::Bytes]) -> Vec<ControlReply> {
        let mut replies: Vec<Option<ControlReply>> = messages.iter().map(|_| None).collect();
        // Per volume: the messages with changes for it, and the changes.
        let mut by_volume: Vec<(&str, Vec<usize>, Vec<Change>)> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let changes = match self.check_bundle(message) {
                Ok(changes) => changes,
                Err(e) => {
                    replies[i] = Some(ControlReply::error(&e));
                    continue;
                }
            };
            for (volume, change) in changes {
                let at = match by_volume.iter().position(|(v, _, _)| *v == volume) {
                    Some(at) => at,
                    None => {
                        by_volume.push((volume, Vec::new(), Vec::new()));
                        by_volume.len() - 1
                    }
                };
                let (_, indexes, list) = &mut by_volume[at];
                if indexes.last() != Some(&i) {
                    indexes.push(i);
                }
                list.push(change);
            }
        }
        for (volume, indexes, changes) in by_volume {
            let queued = self.registry.require(volume).and_then(|v| {
                let txn = v.applying().ok_or_else(|| no_generation(volume))?;
                self.applier(&v, &txn)?.push(changes)
            });
            for i in indexes {
                // A message with changes for two volumes is refused if either is.
                if replies[i].as_ref().is_none_or(|r| r.ok) {
                    replies[i] = Some(match &queued {
                        Ok(()) => ControlReply::ok(),
                        Err(e) => ControlReply::error(e),
                    });
                }
            }
        }
        replies
            .into_iter()
            .map(|r| r.expect("every message is answered"))
            .collect()
    }

    /// Split one message into its frames and check every one of them (see `check_frame`): its
    /// changes, or why the message is refused.
    fn check_bundle<'a>(&self, message: &'a bytes::Bytes) -> Result<Vec<(&'a str, Change)>> {
        frame::split(message)?
            .into_iter()
            .map(|bytes| {
                let (f, content) = self.check_frame(bytes)?;
                Ok((f.volume, owned_change(message, &f, content)))
            })
            .collect()
    }

    /// Decode and verify one data frame, and check it belongs to the generation being applied.
    fn check_frame<'a>(&self, bytes: &'a [u8]) -> Result<(frame::Frame<'a>, Content<'a>)> {
        let msg = frame::decode(bytes)?;
        let Message::Data(f) = msg else {
            return Err(Error::InvalidArgument("expected a data frame".into()));
        };
        if !self.covered(f.volume) {
            return Err(Error::InvalidArgument(format!(
                "frame for volume '{}' refused: no accepted replication session covers it at site {}",
                f.volume, self.site
            )));
        }
        let content = f.verify()?;
        let v = self.registry.require(f.volume)?;
        let txn = v.applying().ok_or_else(|| no_generation(f.volume))?;
        if !matches(&txn, &f) {
            return Err(mismatch(&txn, &f));
        }
        Ok((f, content))
    }
}

fn matches(txn: &crate::apply_txn::ApplyTxn, f: &frame::Frame<'_>) -> bool {
    txn.id().epoch == f.epoch && txn.id().target == f.generation
}

/// A volume of a group being committed: its generation, its applier if that still holds
/// changes, and those changes.
type GroupPart<'a> = (&'a GenerationRef, Option<Arc<Applier>>, Vec<Change>);

/// On a thread of its own: let `applier` write the staged tail of `txn`, committed, in place,
/// then settle `v` (see `Volume::finish_settle`).
fn settle_later(v: Arc<crate::volume::Volume>, txn: Arc<ApplyTxn>, applier: Arc<Applier>) {
    let settle = {
        let (v, txn) = (v.clone(), txn.clone());
        move || {
            let started = std::time::Instant::now();
            let applied = finish_applier(applier);
            v.finish_settle(&txn, applied);
            log::debug!(
                "replica '{}': staged changes in place {:.1} ms after the commit",
                v.name(),
                crate::ms(started.elapsed())
            );
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("ferry-settle".into())
        .spawn(settle)
    {
        // Without a thread the tail stays served from memory; the volume says to restart.
        log::warn!("cannot start a thread to settle '{}': {e}", v.name());
        v.finish_settle(&txn, Err(Error::io("cannot start the settle thread", e)));
    }
}

/// Apply everything `a` holds and stop it: the first failure if a change was not applied.
fn finish_applier(a: Arc<Applier>) -> Result<()> {
    match Arc::try_unwrap(a) {
        Ok(a) => a.finish(),
        // A batch of frames still holds it: the drain covers everything queued so far.
        Err(a) => a.drain(),
    }
}

fn no_generation(volume: &str) -> Error {
    Error::InvalidArgument(format!(
        "frame for volume '{volume}' arrived with no generation being applied"
    ))
}

fn mismatch(txn: &crate::apply_txn::ApplyTxn, f: &frame::Frame<'_>) -> Error {
    Error::InvalidArgument(format!(
        "frame of generation {} (epoch {}) for '{}' does not match the generation being applied ({})",
        f.generation,
        f.epoch,
        f.volume,
        txn.id().target
    ))
}

/// The progress of a running transaction as the source needs it to resume; `None` when there is
/// nothing worth resuming or the map is too scattered to send.
fn applying_report(txn: &crate::apply_txn::ApplyTxn) -> Option<ApplyingReport> {
    let p = txn.progress();
    let extents = p.applied.extents();
    if extents.is_empty() || extents.len() > MAX_RESUME_EXTENTS {
        return None;
    }
    Some(ApplyingReport {
        generation: p.id.target,
        base: p.id.base,
        reference: p.reference,
        applied: extents.iter().map(|e| [e.offset, e.length]).collect(),
    })
}

/// A verified frame's change, owning its bytes: raw data stays a slice of its message.
fn owned_change(message: &bytes::Bytes, f: &frame::Frame<'_>, content: Content<'_>) -> Change {
    match content {
        Content::Data(std::borrow::Cow::Borrowed(d)) => Change::Data {
            offset: f.offset,
            data: message.slice_ref(d),
        },
        Content::Data(std::borrow::Cow::Owned(d)) => Change::Data {
            offset: f.offset,
            data: d.into(),
        },
        Content::Zero | Content::Trim => Change::Zero {
            offset: f.offset,
            length: f.length as u64,
        },
    }
}

fn apply_op<'a>(f: &frame::Frame<'_>, content: &'a Content<'a>) -> ApplyOp<'a> {
    match content {
        Content::Data(d) => ApplyOp::Data {
            offset: f.offset,
            data: d,
        },
        Content::Zero | Content::Trim => ApplyOp::Zero {
            offset: f.offset,
            length: f.length as u64,
        },
    }
}

/// A bitmap as `[offset, length]` runs for a report; a map too scattered to list is sent as the
/// whole volume (more to ship, never less).
fn runs(map: &crate::bitmap::DirtyBitmap, size: u64) -> Vec<[u64; 2]> {
    let extents = map.extents();
    if extents.len() > MAX_RESUME_EXTENTS {
        return vec![[0, size]];
    }
    extents.iter().map(|e| [e.offset, e.length]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_dir::DataDir;
    use crate::replication::protocol::VolumeSpec;

    const GROUP: &str = "site-b/r";

    /// A site's receiver with group `GROUP` open for replica `r` (1 MiB) and `generation` begun.
    fn receiving(generation: u64) -> (tempfile::TempDir, crate::data_dir::DirLock, Receiver) {
        let t = tempfile::tempdir().unwrap();
        let dd = DataDir::open(t.path()).unwrap();
        let lock = dd.try_lock().unwrap().unwrap();
        let rx = Receiver::new("site-b", "eu", Registry::open(dd).unwrap());
        rx.control(ControlMessage::Open {
            group: GROUP.into(),
            source_site: "site-a".into(),
            source_region: "eu".into(),
            allowed_regions: vec![],
            volumes: vec![VolumeSpec {
                name: "r".into(),
                size: 1 << 20,
                granularity: 65536,
            }],
            recovery_points: None,
            points_max_age_ms: None,
            reverse: vec![],
        })
        .unwrap();
        rx.control(ControlMessage::Begin {
            group: GROUP.into(),
            volumes: vec![generation_ref(generation)],
        })
        .unwrap();
        (t, lock, rx)
    }

    fn generation_ref(generation: u64) -> GenerationRef {
        GenerationRef {
            name: "r".into(),
            epoch: 1,
            generation,
            resume_from: None,
            changes: Vec::new(),
        }
    }

    fn frame(seq: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        frame::encode_data("r", 1, 1, seq, offset, data, frame::DEFAULT_LEVEL).unwrap()
    }

    fn read(rx: &Receiver, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        rx.registry
            .require("r")
            .unwrap()
            .read_at(offset, &mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn a_bundle_with_a_damaged_frame_is_refused_whole_and_applied_when_sent_again() {
        let (_t, _lock, rx) = receiving(1);
        let text = b"generation one of replica r, frame two. ".repeat(1640);
        let frames = [
            frame(0, 0, &[7u8; 65536]),
            frame(1, 65536, &[0u8; 65536]),
            frame(2, 131072, &text[..65536]),
            frame(3, 262144, &[9u8; 4096]),
        ];
        let bundle = frames.concat();
        // One copy with a payload byte of the third frame flipped, one with a header byte of
        // the second (a zero frame, all header).
        let mut damaged_payload = bundle.clone();
        let third = frames[0].len() + frames[1].len();
        damaged_payload[third + frames[2].len() - 1] ^= 0x5a;
        let mut damaged_header = bundle.clone();
        damaged_header[frames[0].len() + 9] ^= 0x01;
        let other = frame(4, 524288, &[5u8; 65536]);
        let replies = rx.frames(&[damaged_payload.into(), damaged_header.into(), other.into()]);
        assert!(!replies[0].ok && !replies[1].ok && replies[2].ok);
        for r in &replies[..2] {
            assert_eq!(r.code.as_deref(), Some("ERR_FRAME"), "{:?}", r.message);
        }
        // Sent again intact (as the source does after ERR_FRAME), and once more (a resend after
        // a lost acknowledgement): the same bytes either way.
        let replies = rx.frames(&[bundle.clone().into(), bundle.into()]);
        assert!(replies.iter().all(|r| r.ok), "{replies:?}");
        rx.control(ControlMessage::Commit {
            group: GROUP.into(),
            volumes: vec![generation_ref(1)],
        })
        .unwrap();
        assert_eq!(read(&rx, 0, 65536), vec![7u8; 65536]);
        assert_eq!(read(&rx, 65536, 65536), vec![0u8; 65536]);
        assert_eq!(read(&rx, 131072, 65536), text[..65536].to_vec());
        assert_eq!(read(&rx, 262144, 4096), vec![9u8; 4096]);
        assert_eq!(read(&rx, 524288, 65536), vec![5u8; 65536]);
        let rep = rx.registry.require("r").unwrap().replica().unwrap();
        assert_eq!(rep.last_complete_generation, 1);
    }

    #[test]
    fn a_generation_announced_whole_is_read_ahead_once_not_per_change() {
        let (_t, _lock, rx) = receiving(1);
        let commit = |generation| ControlMessage::Commit {
            group: GROUP.into(),
            volumes: vec![generation_ref(generation)],
        };
        let begin = |changes: Vec<[u64; 2]>| ControlMessage::Begin {
            group: GROUP.into(),
            volumes: vec![GenerationRef {
                changes,
                ..generation_ref(2)
            }],
        };
        let txn = || rx.registry.require("r").unwrap().applying().unwrap();
        assert!(
            !txn().read_ahead(),
            "a first generation has nothing to read ahead"
        );
        rx.control(commit(1)).unwrap();
        rx.control(begin(vec![[0, 65536], [196608, 131072]]))
            .unwrap();
        assert!(txn().read_ahead());
        // The same generation begun again without an announcement: the applier asks per change.
        rx.control(begin(Vec::new())).unwrap();
        assert!(!txn().read_ahead());
        rx.control(begin(vec![[0, PREFETCH_AT_BEGIN + 65536]]))
            .unwrap();
        assert!(!txn().read_ahead(), "more than the read-ahead covers");
    }

    #[test]
    fn a_commit_waits_for_every_acknowledged_frame() {
        let (_t, _lock, rx) = receiving(1);
        let frames: Vec<bytes::Bytes> = (0..16u64)
            .map(|i| frame(i, i * 65536, &[i as u8 + 1; 65536]).into())
            .collect();
        assert!(rx.frames(&frames).iter().all(|r| r.ok));
        rx.control(ControlMessage::Commit {
            group: GROUP.into(),
            volumes: vec![generation_ref(1)],
        })
        .unwrap();
        for i in 0..16u64 {
            assert_eq!(read(&rx, i * 65536, 65536), vec![i as u8 + 1; 65536]);
        }
    }
}
