//! `Registry`: the open volumes of one data directory while a service runs, shared by the NBD
//! server and the control socket; group cuts across them; leases that make a served volume busy.

use crate::commit_intent;
use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::volume::{Volume, VolumeInfo};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the target holds of one volume, for a shipping cut.
#[derive(Default)]
pub struct CutBase {
    /// The last generation it holds completely.
    pub since: Option<u64>,
    /// Blocks it holds of an interrupted transfer.
    pub resume: Option<crate::volume::Resume>,
    /// Blocks to ship whatever changed (where a demoted target may differ).
    pub extra: Option<crate::bitmap::DirtyBitmap>,
    /// A synchronous mirror to install at the cut (sync replication starting).
    pub mirror: Option<Arc<dyn crate::volume::Mirror>>,
}

pub struct Registry {
    dir: DataDir,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
}

/// A connection's hold on an export; while any lease exists the volume counts as busy.
pub struct ExportLease {
    volume: Arc<Volume>,
}

impl std::ops::Deref for ExportLease {
    type Target = Arc<Volume>;
    fn deref(&self) -> &Arc<Volume> {
        &self.volume
    }
}

impl Drop for ExportLease {
    fn drop(&mut self) {
        self.volume.drop_lease();
    }
}

impl Registry {
    /// Open every volume of `dir`. The caller must hold the directory's lock.
    pub fn open(dir: DataDir) -> Result<Arc<Registry>> {
        let names = dir.volume_names()?;
        Self::open_subset(dir, &names)
    }

    /// Open only the named volumes (an offline group cut). The caller must hold the lock.
    /// Group commits interrupted by a stop are finished for the volumes opened (see
    /// `commit_intent`); an intent is dropped once all its volumes are done.
    pub fn open_subset(dir: DataDir, names: &[String]) -> Result<Arc<Registry>> {
        let intents = commit_intent::pending(dir.root());
        let commits = commit_intent::roll_forward(&intents);
        let mut volumes = BTreeMap::new();
        for name in names {
            if !volumes.contains_key(name) {
                let v = match commits.get(name) {
                    Some(c) if dir.exists(name) => dir.open_volume_committing(name, *c)?,
                    _ => dir.open_volume(name)?,
                };
                volumes.insert(name.clone(), Arc::new(v));
            }
        }
        for (path, intent) in &intents {
            if intent.volumes.iter().all(|e| volumes.contains_key(&e.name)) {
                commit_intent::remove(path);
            }
        }
        Ok(Arc::new(Registry {
            dir,
            volumes: RwLock::new(volumes),
        }))
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> {
        self.volumes.read().keys().cloned().collect()
    }

    /// Look up an export without leasing it (OPT_INFO, OPT_LIST_META_CONTEXT).
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(name).cloned()
    }

    pub fn require(&self, name: &str) -> Result<Arc<Volume>> {
        self.get(name).ok_or_else(|| Error::UnknownVolume {
            name: name.to_string(),
            dir: self.dir.root().to_path_buf(),
        })
    }

    /// Lease an export for a connection entering transmission (OPT_GO / EXPORT_NAME).
    pub fn lease(&self, name: &str) -> Option<ExportLease> {
        let v = self.get(name)?;
        v.add_lease();
        Some(ExportLease { volume: v })
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        self.volumes.read().values().map(|v| v.info()).collect()
    }

    pub fn create(&self, name: &str, size: u64, granularity: u64) -> Result<VolumeInfo> {
        let mut vols = self.volumes.write();
        self.dir.create_volume(name, size, granularity)?;
        let v = Arc::new(self.dir.open_volume(name)?);
        let info = v.info();
        vols.insert(name.to_string(), v);
        Ok(info)
    }

    /// Move a volume built under `staged` (a hidden directory of the same data directory, see
    /// `DataDir::staging_dir`) into place as `name` and export it at once. Refused when `name`
    /// exists by then; the staged directory is left to the caller.
    pub fn adopt(&self, name: &str, staged: &std::path::Path) -> Result<VolumeInfo> {
        let mut vols = self.volumes.write();
        DataDir::validate_name(name)?;
        if vols.contains_key(name) || self.dir.exists(name) {
            return Err(Error::VolumeExists {
                name: name.to_string(),
                dir: self.dir.root().to_path_buf(),
            });
        }
        self.dir.move_into_place(staged, name)?;
        let v = Arc::new(self.dir.open_volume(name)?);
        let info = v.info();
        vols.insert(name.to_string(), v);
        Ok(info)
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let mut vols = self.volumes.write();
        let v = vols.get(name).ok_or_else(|| Error::UnknownVolume {
            name: name.to_string(),
            dir: self.dir.root().to_path_buf(),
        })?;
        let n = v.leases();
        if n > 0 {
            return Err(Error::VolumeBusy {
                name: name.to_string(),
                why: format!("{n} NBD connection(s) are using it; disconnect them first"),
            });
        }
        // A generation committed with its last changes staged is written in place first (or
        // has failed to be): nothing writes into the volume's files once they go.
        let _ = v.settle();
        vols.remove(name);
        self.dir.delete_volume(name)
    }

    /// Pause writes to every named volume for one consistency point: guards taken in name order
    /// (so concurrent group cuts cannot deadlock) before any is committed. Returns the volumes,
    /// deduplicated, and the cut's id.
    fn pause_all(&self, names: &[String]) -> Result<(Vec<Arc<Volume>>, String)> {
        if names.is_empty() {
            return Err(Error::InvalidArgument(
                "cut needs at least one volume name".into(),
            ));
        }
        let mut vols: Vec<Arc<Volume>> = names
            .iter()
            .map(|n| self.require(n))
            .collect::<Result<_>>()?;
        vols.sort_by(|a, b| a.name().cmp(b.name()));
        vols.dedup_by(|a, b| a.name() == b.name());
        let cut_id = format!(
            "cut-{}-{}",
            crate::volume_meta::now_ms(),
            std::process::id()
        );
        Ok((vols, cut_id))
    }

    /// Close the open generation of every named volume at one consistency point. Returns
    /// `(volume, closed generation)` in the order given.
    pub fn cut(&self, names: &[String]) -> Result<Vec<(String, u64)>> {
        let (vols, cut_id) = self.pause_all(names)?;
        let guards: Vec<_> = vols.iter().map(|v| v.lock_for_cut()).collect();
        let mut closed = BTreeMap::new();
        for g in guards {
            let name = g.volume().name().to_string();
            closed.insert(name, g.commit(&cut_id)?);
        }
        Ok(names.iter().map(|n| (n.clone(), closed[n])).collect())
    }

    /// A group cut that keeps each volume's content at the cut readable for shipping by
    /// replication pair `owner`: returns
    /// `(volume, closed generation, image)` in the order given. `bases` holds, per volume, what
    /// the target has (see `CutGuard::commit_with_image`).
    pub fn cut_with_images(
        &self,
        owner: &str,
        names: &[String],
        bases: &BTreeMap<String, CutBase>,
    ) -> Result<Vec<(String, u64, Arc<crate::cut_image::CutImage>)>> {
        let (vols, cut_id) = self.pause_all(names)?;
        let guards: Vec<_> = vols.iter().map(|v| v.lock_for_cut()).collect();
        let mut out = BTreeMap::new();
        for g in guards {
            let name = g.volume().name().to_string();
            let base = bases.get(&name);
            let since = base.and_then(|b| b.since);
            let resume = base.and_then(|b| b.resume.as_ref());
            if let Some(m) = base.and_then(|b| b.mirror.clone()) {
                g.set_mirror(Some(m));
            }
            let extra = base.and_then(|b| b.extra.as_ref());
            out.insert(
                name,
                g.commit_with_image(owner, &cut_id, since, resume, extra)?,
            );
        }
        Ok(names
            .iter()
            .map(|n| (n.clone(), out[n].0, out[n].1.clone()))
            .collect())
    }

    /// Close every volume cleanly (service stop).
    pub fn close_all(&self) -> Result<()> {
        let mut first_err = None;
        for v in self.volumes.read().values() {
            if let Err(e) = v.close() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry on a fresh data dir in `t`, with the dir's lock.
    fn open_registry(t: &std::path::Path) -> (crate::data_dir::DirLock, Arc<Registry>) {
        let dd = DataDir::open(t).unwrap();
        let lock = dd.try_lock().unwrap().unwrap();
        (lock, Registry::open(dd).unwrap())
    }

    /// A new 1 MiB volume `name`, a replica of site-a's at epoch 1.
    fn new_replica(reg: &Registry, name: &str) -> Arc<Volume> {
        reg.create(name, 1 << 20, 65536).unwrap();
        let v = reg.require(name).unwrap();
        v.make_replica("site-a", 1).unwrap();
        v
    }

    /// The intent of group a+b to commit generation `target` of epoch 1.
    fn write_group_intent(root: &std::path::Path, target: u64) {
        let volumes = ["a", "b"]
            .iter()
            .map(|n| commit_intent::IntentEntry {
                name: n.to_string(),
                epoch: 1,
                target,
            })
            .collect();
        commit_intent::write(
            root,
            &commit_intent::Intent {
                group: "site-b/a+b".into(),
                volumes,
            },
        )
        .unwrap();
    }

    /// A stop between two volumes' commits of one group: the intent makes the next open finish
    /// the other volume's commit, so the group is again at one generation.
    #[test]
    fn an_interrupted_group_commit_finishes_at_open() {
        let t = tempfile::tempdir().unwrap();
        let (lock, reg) = open_registry(t.path());
        let mut txns = Vec::new();
        for (name, byte) in [("a", 1u8), ("b", 2u8)] {
            let v = new_replica(&reg, name);
            let txn = v.begin_apply(1, 1, None).unwrap();
            let data = [byte; 8192];
            v.apply_batch(
                &txn,
                &[crate::volume::ApplyOp::Data {
                    offset: 0,
                    data: &data,
                }],
            )
            .unwrap();
            v.flush_replica().unwrap();
            txns.push((v, txn));
        }
        write_group_intent(t.path(), 1);
        txns[0].0.commit_apply(&txns[0].1).unwrap();
        // The stop: b never committed, nothing closes cleanly.
        std::mem::forget(txns);
        std::mem::forget(reg);
        drop(lock);

        let (_lock, reg) = open_registry(t.path());
        for (name, byte) in [("a", 1u8), ("b", 2u8)] {
            let v = reg.require(name).unwrap();
            assert_eq!(v.replica().unwrap().last_complete_generation, 1, "{name}");
            assert!(v.applying().is_none());
            let mut buf = [0u8; 8192];
            v.read_at(0, &mut buf).unwrap();
            assert!(buf.iter().all(|x| *x == byte), "{name} holds generation 1");
        }
        assert!(commit_intent::pending(t.path()).is_empty());
    }

    /// As above, with each volume's last changes staged instead of in place (`stage_apply`):
    /// a, recorded before the stop, and b, not recorded, both end at generation 2 with every
    /// change, and each keeps its way back to generation 1.
    #[test]
    fn an_interrupted_group_commit_with_staged_tails_finishes_at_open() {
        use crate::staged_tail::Change;
        let t = tempfile::tempdir().unwrap();
        let (lock, reg) = open_registry(t.path());
        let change = |offset: u64, byte: u8| Change::Data {
            offset,
            data: vec![byte; 65536].into(),
        };
        let mut txns = Vec::new();
        for (name, byte) in [("a", 1u8), ("b", 2u8)] {
            let v = new_replica(&reg, name);
            let txn = v.begin_apply(1, 1, None).unwrap();
            v.apply_batch(&txn, &[change(0, byte).op(), change(65536, byte).op()])
                .unwrap();
            v.commit_apply(&txn).unwrap();
            // Generation 2: its first block in place, the second staged.
            let txn = v.begin_apply(1, 2, None).unwrap();
            v.apply_batch(&txn, &[change(0, byte + 10).op()]).unwrap();
            let tail = vec![change(65536, byte + 20)];
            v.stage_apply(&txn, &tail).unwrap();
            txns.push((v, txn, tail));
        }
        write_group_intent(t.path(), 2);
        let (v, txn, tail) = &txns[0];
        v.record_staged(txn, tail.clone()).unwrap();
        std::mem::forget(txns);
        std::mem::forget(reg);
        drop(lock);

        let (_lock, reg) = open_registry(t.path());
        let read = |v: &Volume, offset: u64| {
            let mut buf = vec![0u8; 65536];
            v.read_at(offset, &mut buf).unwrap();
            buf
        };
        for (name, byte) in [("a", 1u8), ("b", 2u8)] {
            let v = reg.require(name).unwrap();
            assert_eq!(v.replica().unwrap().last_complete_generation, 2, "{name}");
            assert!(v.applying().is_none());
            assert_eq!(read(&v, 0), vec![byte + 10; 65536], "{name}");
            assert_eq!(read(&v, 65536), vec![byte + 20; 65536], "{name}");
            assert!(
                crate::staged_tail::read(v.dir()).unwrap().is_none(),
                "{name}"
            );
            assert_eq!(v.promote_to(Some(1)).unwrap(), 1, "{name}");
            assert_eq!(read(&v, 65536), vec![byte; 65536], "{name}");
        }
        assert!(commit_intent::pending(t.path()).is_empty());
    }

    #[test]
    fn group_cut_and_busy_delete() {
        let t = tempfile::tempdir().unwrap();
        let (_lock, reg) = open_registry(t.path());
        reg.create("a", 1 << 20, 65536).unwrap();
        reg.create("b", 1 << 20, 65536).unwrap();
        reg.get("a")
            .unwrap()
            .write_at(0, &[1; 4096], false)
            .unwrap();
        let r = reg.cut(&["b".into(), "a".into()]).unwrap();
        assert_eq!(r, vec![("b".to_string(), 1), ("a".to_string(), 1)]);
        assert_eq!(
            reg.cut(&["nope".into()]).unwrap_err().code(),
            "ERR_UNKNOWN_VOLUME"
        );
        let lease = reg.lease("a").unwrap();
        assert_eq!(reg.delete("a").unwrap_err().code(), "ERR_VOLUME_BUSY");
        drop(lease);
        reg.delete("a").unwrap();
        assert_eq!(reg.names(), vec!["b".to_string()]);
    }
}
