//! `Receiver`: a site's data plane accepting replication from other sites. It answers control
//! messages (open a group after the residency check, begin and commit generations) and applies
//! data frames to replicas, acknowledging each only after it is applied. It refuses any frame for
//! a volume no accepted session covers, and never applies a frame that fails verification.

use super::frame::{self, Content, Message};
use super::protocol::{
    block_hash, region_allowed, ApplyingReport, ControlMessage, ControlReply, GenerationRef,
    ReplicaReport, MAX_HASHES, MAX_RESUME_EXTENTS,
};
use super::sync::SyncSession;
use crate::commit_intent::{self, Intent, IntentEntry};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::volume::ApplyOp;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

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
    /// This site's volumes that its own pairs ship elsewhere (volume -> pair).
    shipping: Mutex<HashMap<String, String>>,
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
        }
    }

    /// A pair of this site ships `volumes` (or stopped doing so).
    pub fn set_shipping(&self, volumes: &[String], pair: &str, on: bool) {
        let mut s = self.shipping.lock();
        for v in volumes {
            if on {
                s.insert(v.clone(), pair.to_string());
            } else {
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
                    if let Some(pair) = self.shipping.lock().get(&spec.name) {
                        return Err(Error::VolumeBusy {
                            name: spec.name.clone(),
                            why: format!(
                                "site {} still replicates it (pair {pair}); stop that pair there before replicating back",
                                self.site
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
                        vol.set_keep_points(n)?;
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
                // Generations replace synchronous sessions (a resync after a suspension).
                let mut sessions = self.sessions.lock();
                for v in &volumes {
                    sessions.remove(&v.name);
                }
                drop(sessions);
                for GenerationRef {
                    name,
                    epoch,
                    generation,
                    resume_from,
                } in volumes
                {
                    let v = self.registry.require(&name)?;
                    // A generation left half-applied by an earlier attempt is resumed when the
                    // source asks for it, else rolled back first.
                    match v.begin_apply(epoch, generation, resume_from) {
                        Ok(_) => {}
                        Err(Error::VolumeBusy { .. }) if resume_from.is_none() => {
                            v.abort_apply()?;
                            v.begin_apply(epoch, generation, None)?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(ControlReply::ok())
            }
            ControlMessage::Commit { group, volumes } => {
                self.check_group(&group, &names(&volumes))?;
                // One commit point for the whole group (see `commit_intent`): every volume's data
                // durable, then the intent, then each volume's own commit.
                let mut txns = Vec::new();
                for g in &volumes {
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
                    v.flush_replica()?;
                    txns.push((v, txn));
                }
                let intent = commit_intent::write(
                    self.registry.data_dir().root(),
                    &Intent {
                        group: group.clone(),
                        volumes: volumes
                            .iter()
                            .map(|g| IntentEntry {
                                name: g.name.clone(),
                                epoch: g.epoch,
                                target: g.generation,
                            })
                            .collect(),
                    },
                )?;
                for (v, txn) in txns {
                    v.commit_apply(&txn)?;
                }
                commit_intent::remove(&intent);
                Ok(ControlReply::ok())
            }
            ControlMessage::Abort { group, volumes } => {
                self.check_group(&group, &volumes)?;
                for name in &volumes {
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

    /// Verify and apply a batch of data frames, in arrival order; blocking. Each frame gets its
    /// own answer: a damaged or unexpected frame is refused alone and never applied. The good
    /// frames of one volume are applied together — every before-image journaled and synced once,
    /// then the data — so a burst of small frames costs one journal fsync, not one each.
    pub fn frames(&self, payloads: &[&[u8]]) -> Vec<ControlReply> {
        let mut replies: Vec<Option<ControlReply>> = payloads.iter().map(|_| None).collect();
        type Checked<'a> = (usize, frame::Frame<'a>, Content<'a>);
        let mut by_volume: Vec<(&str, Vec<Checked<'_>>)> = Vec::new();
        for (i, bytes) in payloads.iter().enumerate() {
            match self.check_frame(bytes) {
                Ok((f, content)) => match by_volume.iter_mut().find(|(v, _)| *v == f.volume) {
                    Some((_, list)) => list.push((i, f, content)),
                    None => by_volume.push((f.volume, vec![(i, f, content)])),
                },
                Err(e) => replies[i] = Some(ControlReply::error(&e)),
            }
        }
        for (volume, list) in &by_volume {
            let applied = self.registry.require(volume).and_then(|v| {
                let txn = v.applying().ok_or_else(|| no_generation(volume))?;
                // Checked against the frames' generation above; it may only have ended since.
                if let Some((_, f, _)) = list.iter().find(|(_, f, _)| !matches(&txn, f)) {
                    return Err(mismatch(&txn, f));
                }
                let ops: Vec<ApplyOp<'_>> = list.iter().map(|(_, f, c)| apply_op(f, c)).collect();
                v.apply_batch(&txn, &ops)
            });
            for (i, _, _) in list {
                replies[*i] = Some(match &applied {
                    Ok(()) => ControlReply::ok(),
                    Err(e) => ControlReply::error(e),
                });
            }
        }
        replies
            .into_iter()
            .map(|r| r.expect("every frame is answered"))
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
