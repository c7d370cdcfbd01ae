//! Recovery points of a replica: earlier complete generations it can still go back to.
//!
//! Applying generation `target` on top of `base` journals the before-image of every block it
//! changes (`apply_txn`). At commit that journal is kept (hard-linked into `points/`) instead of
//! deleted: it is exactly the undo from `target` back to `base`. Going back to an older point
//! undoes the kept journals newest first. A point costs only the blocks its successor changed.
//!
//! Crash safety: the link is made before the metadata that lists it (an unlisted file is an
//! orphan, removed at open); a roll-back records its goal in the metadata first and is redone
//! from the start at open if it was interrupted (undoing newest first again ends in the same
//! bytes).

use crate::apply_txn::ApplyTxn;
use crate::error::{IoContext, Result};
use crate::volume_meta::PointRecord;
use std::fs::File;
use std::path::{Path, PathBuf};

const POINTS_DIR: &str = "points";

fn points_dir(dir: &Path) -> PathBuf {
    dir.join(POINTS_DIR)
}

/// The undo journal that takes the replica from its successor back to `generation`.
pub fn undo_path(dir: &Path, generation: u64) -> PathBuf {
    points_dir(dir).join(format!("undo-to-{generation}.journal"))
}

/// Keep the journal of a committing transaction as the way back to `base`.
pub fn keep(dir: &Path, journal: &Path, base: u64) -> Result<()> {
    let pd = points_dir(dir);
    std::fs::create_dir_all(&pd).ctx(|| format!("cannot create {}", pd.display()))?;
    let to = undo_path(dir, base);
    let _ = std::fs::remove_file(&to);
    std::fs::hard_link(journal, &to)
        .ctx(|| format!("cannot keep {} as {}", journal.display(), to.display()))?;
    File::open(&pd)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("cannot fsync {}", pd.display()))
}

/// Delete the undo journals of points no longer listed, and any file not listed (an orphan of
/// a crash between keeping a journal and committing).
pub fn prune(dir: &Path, listed: &[PointRecord]) {
    let Ok(entries) = std::fs::read_dir(points_dir(dir)) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !listed.iter().any(|p| undo_path(dir, p.generation) == path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Undo, newest first, every kept journal down to and including the one back to `to`. Returns
/// the bytes restored.
pub fn roll_back_to(dir: &Path, data: &File, points: &[PointRecord], to: u64) -> Result<u64> {
    let mut chain: Vec<u64> = points
        .iter()
        .map(|p| p.generation)
        .filter(|g| *g >= to)
        .collect();
    chain.sort_unstable_by(|a, b| b.cmp(a));
    let mut restored = 0;
    for g in chain {
        restored += ApplyTxn::undo_file(&undo_path(dir, g), data)?;
    }
    Ok(restored)
}
