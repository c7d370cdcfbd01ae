//! `Admin`: the volume operations behind `ferry volume …`, working the same whether or not a
//! service runs for the data directory. With a service, requests go over its control socket (it
//! owns the volumes); without one, they run here on the files under the directory's lock.
//! `ServiceControl` is the service-side handler of the same requests.

use crate::bitmap::Extent;
use crate::control::{ControlClient, ControlHandler, ControlRequest, Progress};
use crate::data_dir::{DataDir, DirLock};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::replication::manager::Replication;
use crate::replication::shipper::{Mode, PairConfig, DEFAULT_BLOCK_TIMEOUT_MS};
use crate::replication::sync::OnLoss;
use crate::stats::StatsSnapshot;
use crate::volume::{Volume, VolumeInfo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub struct Admin {
    dir: DataDir,
}

enum Access {
    Remote(ControlClient),
    Local(DirLock),
}

fn to_value<T: Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("serializable")
}

fn from_value<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Protocol {
        peer: "volume service".into(),
        why: e.to_string(),
    })
}

impl Admin {
    pub fn open(dir: &Path) -> Result<Admin> {
        Ok(Admin {
            dir: DataDir::open(dir)?,
        })
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    fn access(&self) -> Result<Access> {
        if let Some(c) = ControlClient::connect(&self.dir.control_socket(), self.dir.root()) {
            return Ok(Access::Remote(c));
        }
        match self.dir.try_lock()? {
            Some(lock) => Ok(Access::Local(lock)),
            None => Err(self.dir.busy(
                "its control socket does not answer yet; retry in a moment, or stop that process",
            )),
        }
    }

    fn run(&self, req: ControlRequest, progress: &(dyn Fn(Progress) + Sync)) -> Result<Value> {
        match self.access()? {
            Access::Remote(c) => c.request(&req, progress),
            Access::Local(_lock) => local(&self.dir, req, progress),
        }
    }

    pub fn create(&self, name: &str, size: u64, granularity: u64) -> Result<VolumeInfo> {
        from_value(self.run(
            ControlRequest::Create {
                name: name.into(),
                size,
                granularity,
            },
            &|_| {},
        )?)
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        from_value(self.run(ControlRequest::List, &|_| {})?)
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        self.run(ControlRequest::Delete { name: name.into() }, &|_| {})
            .map(|_| ())
    }

    pub fn dirty(&self, name: &str) -> Result<Vec<Extent>> {
        from_value(self.run(ControlRequest::Dirty { name: name.into() }, &|_| {})?)
    }

    /// Returns `(volume, closed generation)` per name, in the order given.
    pub fn cut(&self, names: &[String]) -> Result<Vec<(String, u64)>> {
        from_value(self.run(
            ControlRequest::Cut {
                names: names.to_vec(),
            },
            &|_| {},
        )?)
    }

    /// Per-volume I/O statistics of the running service (empty when none runs).
    pub fn stats(&self) -> Result<BTreeMap<String, Value>> {
        from_value(self.run(ControlRequest::Stats, &|_| {})?)
    }

    /// A replication request (start, status, sync, stop); answered by the running service.
    pub fn replicate(&self, req: ControlRequest) -> Result<Value> {
        self.run(req, &|_| {})
    }

    pub fn import(
        &self,
        name: &str,
        source: &str,
        size: Option<u64>,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<VolumeInfo> {
        from_value(self.run(
            ControlRequest::Import {
                name: name.into(),
                source: source.into(),
                size,
            },
            progress,
        )?)
    }
}

/// Offline execution, under the data directory's lock.
fn local(
    dir: &DataDir,
    req: ControlRequest,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Value> {
    let with_volume = |name: &str, f: &dyn Fn(&Volume) -> Result<Value>| -> Result<Value> {
        let v = dir.open_volume(name)?;
        let r = f(&v);
        v.close()?;
        r
    };
    match req {
        ControlRequest::Ping => Ok(Value::Null),
        ControlRequest::List => Ok(to_value(dir.list_offline()?)),
        ControlRequest::Create {
            name,
            size,
            granularity,
        } => {
            dir.create_volume(&name, size, granularity)?;
            with_volume(&name, &|v| Ok(to_value(v.info())))
        }
        ControlRequest::Delete { name } => dir.delete_volume(&name).map(|_| Value::Null),
        ControlRequest::Dirty { name } => with_volume(&name, &|v| Ok(to_value(v.dirty_extents()))),
        ControlRequest::Cut { names } => {
            // Reuse the registry's group cut over just the named volumes.
            let reg = Registry::open_subset(dir.clone(), &names)?;
            let r = reg.cut(&names);
            reg.close_all()?;
            Ok(to_value(r?))
        }
        ControlRequest::Stats => Ok(to_value(BTreeMap::<String, StatsSnapshot>::new())),
        ControlRequest::Import { name, source, size } => {
            crate::import_volume::import(dir, &name, &source, size, progress).map(to_value)
        }
        ControlRequest::ReplicateStatus => Ok(to_value(crate::replication::manager::configured_pairs(dir.root()))),
        ControlRequest::ReplicatePromote { volumes, back } => {
            let reg = Registry::open_subset(dir.clone(), &volumes)?;
            let r = promote(&reg, &volumes, back.unwrap_or(0));
            reg.close_all()?;
            r
        }
        ControlRequest::ReplicaPoints { volumes } => {
            let reg = Registry::open_subset(dir.clone(), &volumes)?;
            let r = points(&reg, &volumes);
            reg.close_all()?;
            r
        }
        ControlRequest::Fence { volumes, fenced } => {
            let reg = Registry::open_subset(dir.clone(), &volumes)?;
            let r = fence(&reg, &volumes, fenced);
            reg.close_all()?;
            r
        }
        ControlRequest::ReplicaClone { volumes, back, names } => {
            let reg = Registry::open_subset(dir.clone(), &volumes)?;
            let r = replica_clone(&reg, &volumes, back.unwrap_or(0), &names, progress);
            reg.close_all()?;
            r
        }
        ControlRequest::ReplicateStart { .. }
        | ControlRequest::ReplicateSync { .. }
        | ControlRequest::ReplicateCut { .. }
        | ControlRequest::ReplicateStop { .. } => {
            Err(Error::InvalidArgument(format!(
                "replication needs a running volume service for {}: start `ferry volume serve --data {} --site NAME --region REGION --nats URL`",
                dir.root().display(),
                dir.root().display()
            )))
        }
    }
}

/// The named volumes, at least one, all known (else a clear error naming what to do).
fn named(reg: &Registry, volumes: &[String], what: &str) -> Result<Vec<Arc<Volume>>> {
    if volumes.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} needs at least one volume"
        )));
    }
    volumes.iter().map(|n| reg.require(n)).collect()
}

/// The named volumes, each a replica (else a clear error naming what to do).
fn replicas(reg: &Registry, volumes: &[String], what: &str) -> Result<Vec<Arc<Volume>>> {
    let vols = named(reg, volumes, what)?;
    if let Some(v) = vols.iter().find(|v| v.replica().is_none()) {
        return Err(Error::InvalidArgument(format!(
            "volume '{}' is not a replica: {what} runs at the target site, on replicated volumes",
            v.name()
        )));
    }
    Ok(vols)
}

/// Promote every named replica, `back` recovery points before its last complete generation;
/// answers `[{volume, generation}]` (the generation each now holds). Every volume is checked
/// before any is promoted.
fn promote(reg: &Registry, volumes: &[String], back: usize) -> Result<Value> {
    let vols = replicas(reg, volumes, "promote")?;
    let mut targets = Vec::new();
    for v in &vols {
        targets.push(v.replica().expect("checked").point_back(v.name(), back)?);
    }
    let mut out = Vec::new();
    for (v, to) in vols.iter().zip(targets) {
        out.push(serde_json::json!({ "volume": v.name(), "generation": v.promote_to(Some(to))? }));
    }
    Ok(Value::Array(out))
}

/// Raise or lift the fence of every named volume; answers `[{volume, fenced}]`. Every volume
/// is checked before any is changed.
fn fence(reg: &Registry, volumes: &[String], fenced: bool) -> Result<Value> {
    let vols = named(reg, volumes, "fence")?;
    if let Some(v) = vols.iter().find(|v| v.replica().is_some()) {
        return Err(Error::InvalidArgument(format!(
            "volume '{}' is a replica: it takes no client writes, so there is nothing to fence; fence its source volume at the source site",
            v.name()
        )));
    }
    let mut out = Vec::new();
    for v in &vols {
        v.set_fenced(fenced)?;
        out.push(serde_json::json!({ "volume": v.name(), "fenced": v.fenced() }));
    }
    Ok(Value::Array(out))
}

/// Clone every named replica at recovery point `back` as the volume of the same position in
/// `names`; answers `[{volume, clone, generation}]`.
fn replica_clone(
    reg: &Registry,
    volumes: &[String],
    back: usize,
    names: &[String],
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Value> {
    let vols = replicas(reg, volumes, "replicaClone")?;
    Ok(to_value(crate::replica_clone::clone_replicas(
        reg, &vols, back, names, progress,
    )?))
}

/// The recovery points of every named replica, newest first (the last complete one first).
fn points(reg: &Registry, volumes: &[String]) -> Result<Value> {
    let vols = replicas(reg, volumes, "points")?;
    let out: Vec<Value> = vols
        .iter()
        .map(|v| {
            let rep = v.replica().expect("checked");
            let mut points = vec![serde_json::json!({
                "back": 0,
                "generation": rep.last_complete_generation,
                "atMs": rep.last_complete_at_ms,
            })];
            points.extend(rep.points.iter().enumerate().map(|(i, p)| {
                serde_json::json!({ "back": i + 1, "generation": p.generation, "atMs": p.at_ms })
            }));
            serde_json::json!({
                "volume": v.name(),
                "sourceSite": rep.source_site,
                "keep": rep.keep_points,
                "points": points,
            })
        })
        .collect();
    Ok(Value::Array(out))
}

/// The running service's handler for control requests.
pub struct ServiceControl {
    pub registry: Arc<Registry>,
    pub runtime: tokio::runtime::Handle,
    pub replication: Option<Arc<Replication>>,
}

impl ServiceControl {
    fn replication(&self) -> Result<&Arc<Replication>> {
        self.replication.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this volume service has not joined a site: restart it with --site NAME --region REGION --nats URL".into(),
            )
        })
    }
}

impl ControlHandler for ServiceControl {
    fn handle(
        &self,
        req: ControlRequest,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Value> {
        let reg = &self.registry;
        match req {
            ControlRequest::Ping => Ok(Value::Null),
            ControlRequest::List => Ok(to_value(reg.list())),
            ControlRequest::Create {
                name,
                size,
                granularity,
            } => Ok(to_value(reg.create(&name, size, granularity)?)),
            ControlRequest::Delete { name } => reg.delete(&name).map(|_| Value::Null),
            ControlRequest::Dirty { name } => Ok(to_value(reg.require(&name)?.dirty_extents())),
            ControlRequest::Cut { names } => Ok(to_value(reg.cut(&names)?)),
            ControlRequest::Stats => {
                let m: BTreeMap<String, StatsSnapshot> = reg
                    .names()
                    .into_iter()
                    .filter_map(|n| reg.get(&n).map(|v| (n, v.stats().snapshot())))
                    .collect();
                Ok(to_value(m))
            }
            ControlRequest::Import { name, source, size } => {
                crate::import_volume::import_registered(reg, &name, &source, size, progress)
                    .map(to_value)
            }
            ControlRequest::ReplicateStart {
                volumes,
                to,
                to_node,
                mode,
                interval_ms,
                rate,
                level,
                on_loss,
                block_timeout_ms,
                recovery_points,
                reverse,
                max_message,
                points_max_age_ms,
                scheduled,
            } => {
                let on_loss = match on_loss.as_deref() {
                    None | Some("suspend") => OnLoss::Suspend,
                    Some("block") => OnLoss::Block,
                    Some(other) => {
                        return Err(Error::InvalidArgument(format!(
                            "--on-loss {other}: use block (writes wait, then fail with EIO) or suspend (fall back to async and resync)"
                        )))
                    }
                };
                let mode = match mode.as_str() {
                    "async" => Mode::Async,
                    "sync" => Mode::Sync,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "--mode {other}: use async or sync"
                        )))
                    }
                };
                let level = level.unwrap_or(crate::replication::frame::DEFAULT_LEVEL);
                let cfg = PairConfig {
                    group: String::new(),
                    volumes,
                    target_site: to,
                    target_node: to_node,
                    mode,
                    interval_ms,
                    rate,
                    level,
                    max_message: max_message
                        .unwrap_or(crate::replication::frame::DEFAULT_MAX_MESSAGE),
                    on_loss,
                    block_timeout_ms: block_timeout_ms.unwrap_or(DEFAULT_BLOCK_TIMEOUT_MS),
                    recovery_points: recovery_points
                        .unwrap_or(crate::volume_meta::DEFAULT_KEEP_POINTS)
                        .max(1),
                    reverse: reverse.unwrap_or(false),
                    points_max_age_ms,
                    scheduled: scheduled.unwrap_or(true),
                };
                Ok(to_value(self.replication()?.start_pair(cfg)?))
            }
            ControlRequest::ReplicatePromote { volumes, back } => {
                promote(reg, &volumes, back.unwrap_or(0))
            }
            ControlRequest::ReplicaPoints { volumes } => points(reg, &volumes),
            ControlRequest::Fence { volumes, fenced } => fence(reg, &volumes, fenced),
            ControlRequest::ReplicaClone {
                volumes,
                back,
                names,
            } => replica_clone(reg, &volumes, back.unwrap_or(0), &names, progress),
            ControlRequest::ReplicateStatus => Ok(to_value(match &self.replication {
                Some(r) => r.status(),
                None => Vec::new(),
            })),
            ControlRequest::ReplicateSync { volumes, to } => {
                let r = self.replication()?.clone();
                Ok(to_value(self.runtime.block_on(async move {
                    r.sync(&volumes, to.as_deref()).await
                })?))
            }
            ControlRequest::ReplicateCut { volumes, to } => {
                let r = self.replication()?.clone();
                let (group, cut) = self
                    .runtime
                    .block_on(async move { r.cut(&volumes, to.as_deref()).await })?;
                Ok(serde_json::json!({
                    "group": group,
                    "volumes": cut
                        .iter()
                        .map(|(name, generation)| serde_json::json!({"name": name, "generation": generation}))
                        .collect::<Vec<_>>(),
                    "atMs": crate::volume_meta::now_ms(),
                }))
            }
            ControlRequest::ReplicateStop { volumes, to } => {
                let r = self.replication()?.clone();
                Ok(to_value(self.runtime.block_on(async move {
                    r.stop_pair(&volumes, to.as_deref()).await
                })?))
            }
        }
    }
}
