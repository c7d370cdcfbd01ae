//! Replica clones: new ordinary, writable volumes holding exactly what replicas held at one of
//! their recovery points, made at a target site while replication into the replicas goes on —
//! for DR drills and test failovers that must leave the replicas alone.
//!
//! Consistency with a concurrent apply: the clone copies a replica's *last complete generation*
//! and then, for an earlier point, undoes the kept journals onto the copy (as a promote to that
//! point would onto the replica). A generation being applied meanwhile is never seen: its data
//! keeps landing in the replica's file, but every block it changes is journaled first and
//! `Volume::read_at` overlays those before-images, so reads show the last complete generation.
//! What must not move during the copy is that generation itself and the journals the copy
//! undoes: `Volume::hold_apply` holds off the commit (and an abort, a synchronous change, a
//! pruning of points) until the volume's copy is done. So the transfer from the source goes on;
//! only a commit that falls due waits, for no longer than the copy.
//!
//! Every volume of the call is held before any generation is read, and the hold is retried
//! while a group commit naming one of them is half done (its intent file is still there): so
//! the clones of one consistency group are of one generation. Clones are built in hidden
//! staging directories and moved into place, fsynced, only when every one is complete; on
//! failure nothing is left. This module must never change a replica.

use crate::commit_intent;
use crate::control::Progress;
use crate::error::{Error, IoContext, Result};
use crate::recovery_points;
use crate::registry::Registry;
use crate::volume::Volume;
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes read and written per step of the copy.
const CHUNK: u64 = 1 << 20;
/// How long to wait for a group commit under way to finish before giving up.
const COMMIT_WAIT: Duration = Duration::from_secs(30);
const COMMIT_POLL: Duration = Duration::from_millis(20);

/// One clone made: of which replica, its name, the generation it holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Cloned {
    pub volume: String,
    pub clone: String,
    pub generation: u64,
}

/// Clone each replica `replicas[i]` as a new volume `names[i]` at recovery point `back` (0: its
/// last complete generation; n: n points before it, as `replicatePromote` counts them).
pub fn clone_replicas(
    reg: &Registry,
    replicas: &[Arc<Volume>],
    back: usize,
    names: &[String],
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<Cloned>> {
    check_names(reg, replicas, names)?;
    let holds = hold_group(reg, replicas)?;
    let mut plans = Vec::new();
    for v in replicas {
        plans.push((v, target(v, back)?));
    }
    let staged: Vec<PathBuf> = names
        .iter()
        .map(|n| reg.data_dir().staging_dir(n, "clone"))
        .collect();
    let built = build_all(&plans, names, &staged, holds, progress);
    let result = built.and_then(|_| adopt_all(reg, names, &staged));
    for dir in &staged {
        let _ = std::fs::remove_dir_all(dir);
    }
    result?;
    Ok(plans
        .iter()
        .zip(names)
        .map(|((v, (generation, _)), n)| Cloned {
            volume: v.name().to_string(),
            clone: n.clone(),
            generation: *generation,
        })
        .collect())
}

fn check_names(reg: &Registry, replicas: &[Arc<Volume>], names: &[String]) -> Result<()> {
    if names.len() != replicas.len() {
        return Err(Error::InvalidArgument(format!(
            "replicaClone got {} volume(s) but {} clone name(s): give one name per volume, in the same order",
            replicas.len(),
            names.len()
        )));
    }
    for (i, v) in replicas.iter().enumerate() {
        if replicas[..i].iter().any(|o| o.name() == v.name()) {
            return Err(Error::InvalidArgument(format!(
                "volume '{}' is given twice: clone each replica once per call",
                v.name()
            )));
        }
    }
    for (i, n) in names.iter().enumerate() {
        crate::data_dir::DataDir::validate_name(n)?;
        if names[..i].contains(n) {
            return Err(Error::InvalidArgument(format!(
                "clone name '{n}' is given twice: give each clone its own name"
            )));
        }
        if reg.get(n).is_some() || reg.data_dir().exists(n) {
            return Err(Error::VolumeExists {
                name: n.clone(),
                dir: reg.data_dir().root().to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Hold every replica at its last complete generation (in name order, so two clones of
/// overlapping groups cannot deadlock), once no group commit naming one of them is half done.
fn hold_group<'a>(
    reg: &Registry,
    replicas: &'a [Arc<Volume>],
) -> Result<Vec<Option<parking_lot::RwLockWriteGuard<'a, ()>>>> {
    let mut order: Vec<usize> = (0..replicas.len()).collect();
    order.sort_by(|a, b| replicas[*a].name().cmp(replicas[*b].name()));
    let deadline = Instant::now() + COMMIT_WAIT;
    loop {
        let mut holds: Vec<Option<_>> = replicas.iter().map(|_| None).collect();
        for i in &order {
            holds[*i] = Some(replicas[*i].hold_apply()?);
        }
        let busy = commit_intent::pending(reg.data_dir().root())
            .into_iter()
            .flat_map(|(_, intent)| intent.volumes)
            .find(|e| replicas.iter().any(|v| v.name() == e.name));
        let Some(busy) = busy else {
            return Ok(holds);
        };
        drop(holds);
        if Instant::now() >= deadline {
            return Err(Error::VolumeBusy {
                name: busy.name,
                why: format!(
                    "its group has been committing generation {} for {}s; retry the clone once replication is healthy (see `ferry replicate status`)",
                    busy.target,
                    COMMIT_WAIT.as_secs()
                ),
            });
        }
        std::thread::sleep(COMMIT_POLL);
    }
}

/// `(generation to clone, last complete generation)` of a held replica.
fn target(v: &Volume, back: usize) -> Result<(u64, u64)> {
    let rep = v.replica().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "volume '{}' is no longer a replica (promoted meanwhile?): clone replicas only",
            v.name()
        ))
    })?;
    let last = rep.last_complete_generation;
    if last == 0 {
        return Err(Error::InvalidArgument(format!(
            "replica '{}' holds no complete generation yet: wait for the first one (`ferry replicate points`)",
            v.name()
        )));
    }
    Ok((rep.point_back(v.name(), back)?, last))
}

/// Build every clone in its staging directory; each replica's hold is released as soon as its
/// copy is done.
fn build_all(
    plans: &[(&Arc<Volume>, (u64, u64))],
    names: &[String],
    staged: &[PathBuf],
    mut holds: Vec<Option<parking_lot::RwLockWriteGuard<'_, ()>>>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<()> {
    let runs: Vec<Vec<(u64, u64)>> = plans
        .iter()
        .map(|(v, _)| v.content_runs())
        .collect::<Result<_>>()?;
    let total: u64 = runs.iter().flatten().map(|(s, e)| e - s).sum();
    let mut done = 0;
    for (i, ((src, (to, last)), name)) in plans.iter().zip(names).enumerate() {
        let dir = &staged[i];
        let _ = std::fs::remove_dir_all(dir);
        Volume::create(dir, name, src.size(), src.granularity())?;
        let dst = Volume::open(dir, name)?;
        let mut buf = vec![0u8; CHUNK as usize];
        for &(start, end) in &runs[i] {
            let mut at = start;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                src.read_at(at, &mut buf[..n])?;
                // Sparse: a zero run stays a hole.
                if buf[..n].iter().any(|b| *b != 0) {
                    dst.data_file()
                        .write_all_at(&buf[..n], at)
                        .ctx(|| format!("writing clone '{name}' at {at}"))?;
                    dst.mark_changed(at, n as u64);
                }
                at += n as u64;
                done += n as u64;
                progress(Progress { done, total });
            }
        }
        if to != last {
            // The kept journals undo, newest first, what came after the point.
            let rep = src.replica().expect("held as a replica");
            recovery_points::roll_back_to(src.dir(), dst.data_file(), &rep.points, *to)?;
            // Which blocks that touched is not tracked here: count them all as changed.
            dst.mark_changed(0, src.size());
        }
        // Data and bitmap durable before the clone is moved into place and reported.
        dst.close()?;
        drop(dst);
        holds[i] = None;
    }
    Ok(())
}

/// Move every staged clone into place; if one cannot be, remove those already moved.
fn adopt_all(reg: &Registry, names: &[String], staged: &[PathBuf]) -> Result<()> {
    for (i, (name, dir)) in names.iter().zip(staged).enumerate() {
        if let Err(e) = reg.adopt(name, dir) {
            for n in &names[..i] {
                let _ = reg.delete(n);
            }
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_dir::DataDir;
    use crate::volume::ApplyOp;

    const MIB: u64 = 1 << 20;

    fn content(v: &Volume) -> Vec<u8> {
        let mut buf = vec![0u8; v.size() as usize];
        v.read_at(0, &mut buf).unwrap();
        buf
    }

    fn apply(v: &Volume, g: u64, ops: &[ApplyOp<'_>]) -> Arc<crate::apply_txn::ApplyTxn> {
        let txn = v.begin_apply(1, g, None).unwrap();
        v.apply_batch(&txn, ops).unwrap();
        txn
    }

    fn no_progress(_: Progress) {}

    /// Generations 1-3 complete, 4 half applied (it overwrites data and punches a hole where
    /// generation 3 has data): clones show 3 and 2, never a byte of 4, and 4 commits after.
    #[test]
    fn clones_show_complete_generations_only() {
        let t = tempfile::tempdir().unwrap();
        let dd = DataDir::open(t.path()).unwrap();
        let _lock = dd.try_lock().unwrap().unwrap();
        let reg = Registry::open(dd).unwrap();
        reg.create("r", 4 * MIB, 65536).unwrap();
        let r = reg.require("r").unwrap();
        r.make_replica("site-a", 1).unwrap();
        let (one, two, three) = (vec![1u8; 1 << 20], vec![2u8; 4096], vec![3u8; 65536]);
        for (g, op) in [
            (
                1,
                ApplyOp::Data {
                    offset: 0,
                    data: &one,
                },
            ),
            (
                2,
                ApplyOp::Data {
                    offset: 0,
                    data: &two,
                },
            ),
            (
                3,
                ApplyOp::Data {
                    offset: 2 * MIB,
                    data: &three,
                },
            ),
        ] {
            let txn = apply(&r, g, &[op]);
            r.commit_apply(&txn).unwrap();
        }
        let at3 = content(&r);
        let four = [4u8; 8192];
        let txn = apply(
            &r,
            4,
            &[
                ApplyOp::Data {
                    offset: 4096,
                    data: &four,
                },
                ApplyOp::Zero {
                    offset: 2 * MIB,
                    length: 65536,
                },
            ],
        );
        let reps = vec![r.clone()];
        let made = clone_replicas(&reg, &reps, 0, &["c3".into()], &no_progress).unwrap();
        assert_eq!(
            made,
            vec![Cloned {
                volume: "r".into(),
                clone: "c3".into(),
                generation: 3
            }]
        );
        let c3 = reg.require("c3").unwrap();
        assert!(content(&c3) == at3, "the clone holds generation 3");
        assert!(c3.replica().is_none() && !c3.read_only());
        let made = clone_replicas(&reg, &reps, 1, &["c2".into()], &no_progress).unwrap();
        assert_eq!(made[0].generation, 2);
        let mut at2 = at3.clone();
        at2[2 * MIB as usize..2 * MIB as usize + 65536].fill(0);
        assert!(
            content(&reg.require("c2").unwrap()) == at2,
            "the clone holds generation 2"
        );
        // The held generation was released: 4 commits, the clones stay as they were.
        r.commit_apply(&txn).unwrap();
        assert_eq!(r.replica().unwrap().last_complete_generation, 4);
        assert!(content(&c3) == at3);
        c3.write_at(0, &[9u8; 4096], false).unwrap();
        // Sparse: the clone of 3 allocates about what generation 3 holds, not 4 MiB.
        let allocated = c3.allocation(0, 4 * MIB).unwrap();
        let data: u64 = allocated
            .iter()
            .filter(|e| e.flags == 0)
            .map(|e| e.length)
            .sum();
        assert!(data <= MIB + 2 * 65536, "{allocated:?}");
    }

    #[test]
    fn refused_clones_leave_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let dd = DataDir::open(t.path()).unwrap();
        let _lock = dd.try_lock().unwrap().unwrap();
        let reg = Registry::open(dd.clone()).unwrap();
        reg.create("r", MIB, 65536).unwrap();
        reg.create("other", MIB, 65536).unwrap();
        let r = reg.require("r").unwrap();
        r.make_replica("site-a", 1).unwrap();
        let reps = vec![r.clone()];
        let e = clone_replicas(&reg, &reps, 0, &["c".into()], &no_progress).unwrap_err();
        assert!(e.to_string().contains("no complete generation yet"), "{e}");
        let txn = apply(
            &r,
            1,
            &[ApplyOp::Data {
                offset: 0,
                data: &[1u8; 4096],
            }],
        );
        r.commit_apply(&txn).unwrap();
        for (back, names, code) in [
            (0, vec!["other".to_string()], "ERR_VOLUME_EXISTS"),
            (0, vec!["a".into(), "b".into()], "ERR_INVALID_ARGUMENT"),
            (1, vec!["c".into()], "ERR_INVALID_ARGUMENT"),
        ] {
            let e = clone_replicas(&reg, &reps, back, &names, &no_progress).unwrap_err();
            assert_eq!(e.code(), code, "{e}");
        }
        assert_eq!(reg.names(), vec!["other".to_string(), "r".to_string()]);
        assert_eq!(dd.volume_names().unwrap(), reg.names());
        assert_eq!(
            std::fs::read_dir(t.path().join("volumes")).unwrap().count(),
            2,
            "no staging directory left"
        );
    }
}
