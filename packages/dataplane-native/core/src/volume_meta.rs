//! `VolumeMeta`: a volume's persistent description (geometry and generation history), stored as
//! JSON and replaced crash-safely (temp file + fsync + rename). It is the commit point of a cut.

use crate::bitmap::write_atomic;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const META_VERSION: u32 = 1;
pub const DEFAULT_KEEP_GENERATIONS: usize = 8;

/// A closed generation whose bitmap is still kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GenerationRecord {
    pub generation: u64,
    /// Shared by every volume closed in the same group cut.
    pub cut_id: String,
    /// Milliseconds since the Unix epoch.
    pub closed_at_ms: u64,
    pub dirty_bytes: u64,
}

/// Present on a replica: which generation of its source it holds, completely.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaState {
    pub source_site: String,
    /// The source's epoch the generations below belong to.
    pub epoch: u64,
    /// The last generation applied completely (0: none yet).
    pub last_complete_generation: u64,
    pub last_complete_at_ms: u64,
    /// Earlier complete generations that can still be restored, newest first (see
    /// `recovery_points`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<PointRecord>,
    /// Complete generations to keep, the last one included.
    #[serde(default = "default_keep_points")]
    pub keep_points: usize,
    /// Recovery points older than this (ms) are dropped; `None` keeps them by count only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points_max_age_ms: Option<u64>,
    /// Set while the replica is being rolled back to this generation (finished at open after a
    /// crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring_to: Option<u64>,
}

impl ReplicaState {
    /// The generation of recovery point `back` of replica `name`: 0 is the last complete
    /// generation, n the n-th kept point before it (as `replicate points` lists them).
    pub fn point_back(&self, name: &str, back: usize) -> Result<u64> {
        match back {
            0 => Ok(self.last_complete_generation),
            n => self.points.get(n - 1).map(|p| p.generation).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "replica '{name}' keeps {} recovery point(s) before its last complete generation, not {n}: see `ferry replicate points`",
                    self.points.len()
                ))
            }),
        }
    }
}

pub const DEFAULT_KEEP_POINTS: usize = 3;

fn default_keep_points() -> usize {
    DEFAULT_KEEP_POINTS
}

/// An earlier complete generation of a replica, kept as a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PointRecord {
    pub generation: u64,
    /// When the replica completed it (ms since the Unix epoch).
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMeta {
    pub version: u32,
    pub name: String,
    pub size: u64,
    pub block_size: u64,
    pub granularity: u64,
    pub created_at_ms: u64,
    /// Bumped when the volume changes role (promote); generations restart under a new epoch.
    pub epoch: u64,
    /// The generation that writes currently land in.
    pub open_generation: u64,
    /// Closed generations still kept, oldest first.
    pub generations: Vec<GenerationRecord>,
    /// The oldest kept generation's bitmap also holds the changes of the generations from this
    /// one on, folded into it when a replication pair still needed them but there were too many
    /// to keep (see `Volume::pin_generation`). `None`: it holds its own changes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folded_from: Option<u64>,
    pub keep_generations: usize,
    pub read_only: bool,
    /// Set while the volume is a replica of another site's volume: NBD clients may only read it,
    /// and it changes only by applying complete generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaState>,
    /// Set when this volume was a replica and got promoted: what it held then, so replicating
    /// back (`reverse`) can prove what both sides still share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<Promoted>,
    /// Writes refused for a planned migration or failback (see `Volume::set_fenced`); kept
    /// across restarts so a restarted service cannot take a write the move would lose.
    #[serde(default)]
    pub fenced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Promoted {
    /// The former source: its site, its epoch, and its generation this volume held.
    pub source_site: String,
    pub source_epoch: u64,
    pub source_generation: u64,
    /// This volume's own (empty) generation closed at the promotion: its changes since then are
    /// the generations after it.
    pub local_generation: u64,
    pub local_epoch: u64,
}

impl VolumeMeta {
    pub fn load(path: &Path, name: &str) -> Result<VolumeMeta> {
        let corrupt = |why: String| Error::CorruptMetadata {
            name: name.to_string(),
            path: path.to_path_buf(),
            why,
        };
        let bytes = std::fs::read(path).map_err(|e| corrupt(e.to_string()))?;
        let meta: VolumeMeta =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if meta.version != META_VERSION {
            return Err(corrupt(format!("unsupported version {}", meta.version)));
        }
        if meta.size == 0
            || !meta.size.is_multiple_of(meta.block_size)
            || !meta.granularity.is_power_of_two()
        {
            return Err(corrupt("inconsistent geometry".into()));
        }
        Ok(meta)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("meta serializes");
        write_atomic(path, &bytes)
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
