//! Group commit at a target site: every volume of a consistency group moves to its new
//! generation, or none does — also across a crash between two volumes' commits.
//!
//! The receiver first makes every volume's data durable (written in place, or staged: see
//! `staged_tail`), then writes one intent file
//! (atomically: temp + fsync + rename) naming each volume's `(epoch, target)`: that rename is the
//! group's commit point. Then each volume commits on its own and the intent is removed. At open,
//! a volume named by an intent whose transaction is still there commits it (roll forward, its
//! staged changes written first) instead of rolling it back; a crash before the rename leaves no intent, and every volume rolls back or
//! resumes as usual.

use crate::bitmap::write_atomic;
use crate::error::{IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IntentEntry {
    pub name: String,
    pub epoch: u64,
    pub target: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    pub group: String,
    pub volumes: Vec<IntentEntry>,
}

fn dir(root: &Path) -> PathBuf {
    root.join("replication").join("commits")
}

fn path(root: &Path, group: &str) -> PathBuf {
    let safe: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir(root).join(format!("{safe}.json"))
}

/// Record the group's decision to commit; returns the file to remove once every volume has.
pub fn write(root: &Path, intent: &Intent) -> Result<PathBuf> {
    let d = dir(root);
    std::fs::create_dir_all(&d).ctx(|| format!("cannot create {}", d.display()))?;
    let p = path(root, &intent.group);
    write_atomic(&p, &serde_json::to_vec(intent).expect("intent serializes"))?;
    Ok(p)
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Intents left by a stop in the middle of a group commit.
pub fn pending(root: &Path) -> Vec<(PathBuf, Intent)> {
    let Ok(entries) = std::fs::read_dir(dir(root)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let intent = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, intent))
        })
        .collect()
}

/// Per volume, the `(epoch, target)` a pending intent commits it to.
pub fn roll_forward(intents: &[(PathBuf, Intent)]) -> BTreeMap<String, (u64, u64)> {
    intents
        .iter()
        .flat_map(|(_, i)| i.volumes.iter())
        .map(|e| (e.name.clone(), (e.epoch, e.target)))
        .collect()
}
