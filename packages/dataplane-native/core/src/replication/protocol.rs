//! The replication session protocol between two sites' data planes: subjects and control
//! messages (JSON). Data frames are `frame`'s business; this file names where they go and what
//! the control conversation around them says.
//!
//! A session ships one consistency group from a source site to a target site:
//! `Open` (target checks residency, creates missing replicas, reports what it holds) →
//! per generation: `Begin` → data frames (each acknowledged after it is applied) → `Commit`
//! (every volume of the group moves to the generation together).

use serde::{Deserialize, Serialize};

/// Where a site's data plane listens: the site (one volume service in the site), or one node of
/// the site (`ferry volume serve --node`, several ferryd in one site, each serving its own
/// volumes). A node's subjects have one token more than the site's, so neither can take the
/// other's traffic.
pub fn address(site: &str, node: Option<&str>) -> String {
    match node {
        Some(n) => format!("{site}.{n}"),
        None => site.to_string(),
    }
}

/// Control requests to a data plane (`address`).
pub fn control_subject(address: &str) -> String {
    format!("ferry.dp.{address}.ctl")
}

/// Data frames to a data plane (`address`).
pub fn frames_subject(address: &str) -> String {
    format!("ferry.dp.{address}.frames")
}

/// Changes of synchronous sessions to a data plane (`address`; data frames, one change each).
pub fn sync_subject(address: &str) -> String {
    format!("ferry.dp.{address}.sync")
}

/// A site (or node) name is one NATS subject token.
pub fn valid_site_name(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= 64
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    pub name: String,
    pub size: u64,
    pub granularity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum ControlMessage {
    #[serde(rename_all = "camelCase")]
    Open {
        group: String,
        source_site: String,
        source_region: String,
        /// Regions allowed to hold a copy of this group; empty means any.
        allowed_regions: Vec<String>,
        volumes: Vec<VolumeSpec>,
        /// Complete generations each replica keeps as recovery points (the last one included).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovery_points: Option<usize>,
        /// Recovery points older than this are dropped (with `recovery_points` given: `None`
        /// keeps them by count only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        points_max_age_ms: Option<u64>,
        /// Replicating back after a failover: the target's volumes become replicas of the
        /// source's (see `ReverseBase`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reverse: Vec<ReverseBase>,
    },
    /// Start applying the given generation of each volume.
    #[serde(rename_all = "camelCase")]
    Begin {
        group: String,
        volumes: Vec<GenerationRef>,
    },
    /// Every volume of the group now holds its given generation completely.
    #[serde(rename_all = "camelCase")]
    Commit {
        group: String,
        volumes: Vec<GenerationRef>,
    },
    #[serde(rename_all = "camelCase")]
    Abort { group: String, volumes: Vec<String> },
    /// Start (or take up again) a synchronous session on a replica that holds `base` completely;
    /// changes up to sequence number `floor` are already applied.
    #[serde(rename_all = "camelCase")]
    SyncStart {
        group: String,
        volume: String,
        epoch: u64,
        base: u64,
        floor: u64,
    },
    /// Make every change of the session durable.
    #[serde(rename_all = "camelCase")]
    SyncFlush {
        group: String,
        volume: String,
        epoch: u64,
    },
    /// xxh3 of `count` consecutive blocks (of the volume's granularity) from block `first`,
    /// answered in `hashes`: a hash-compared resync.
    #[serde(rename_all = "camelCase")]
    BlockHashes {
        group: String,
        volume: String,
        first: u64,
        count: u64,
    },
    /// Every change of these generations is applied: record them as complete.
    #[serde(rename_all = "camelCase")]
    SyncMark {
        group: String,
        volumes: Vec<GenerationRef>,
    },
}

/// One volume's generation (generation numbers are per volume).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GenerationRef {
    pub name: String,
    pub epoch: u64,
    pub generation: u64,
    /// In `Begin`: continue the interrupted transfer of this generation instead of starting
    /// afresh (the source skipped what the target reported holding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<u64>,
    /// In `Begin`: the runs `[offset, length]` the generation changes (at most
    /// `MAX_ANNOUNCED_EXTENTS`; none if it changes more), so that the target reads their
    /// before-images from its disk while the data is still on its way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<[u64; 2]>,
}

/// Most runs a `Begin` announces per volume; a generation changing more runs announces none.
pub const MAX_ANNOUNCED_EXTENTS: usize = 4 * 1024;

/// Most extents a progress report lists; a more scattered map is not offered for resuming.
pub const MAX_RESUME_EXTENTS: usize = 16 * 1024;

/// A transfer the target holds part of (its progress map).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApplyingReport {
    /// The generation being applied, and the one it applies on top of (0: none).
    pub generation: u64,
    pub base: u64,
    /// The generation the applied blocks are known to match.
    pub reference: u64,
    /// `[offset, length]` runs of blocks applied completely.
    pub applied: Vec<[u64; 2]>,
}

/// A volume replicated back to its former source: what both copies last shared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReverseBase {
    pub name: String,
    /// The former source's `(epoch, generation)` the promoted copy held.
    pub common_epoch: u64,
    pub common_generation: u64,
    /// The new source's epoch and its (empty) generation closed at the promotion: the former
    /// source, demoted, counts as holding it plus its own divergence.
    pub epoch: u64,
    pub base: u64,
}

/// What the target holds of one volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaReport {
    pub name: String,
    pub epoch: u64,
    pub last_complete_generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applying: Option<ApplyingReport>,
    /// A demoted former source: `[offset, length]` runs where it may differ from what it is
    /// said to hold; the source ships them on top of its own changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<Vec<[u64; 2]>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hashes: Vec<u64>,
}

/// Most block hashes one `blockHashes` request asks for (a reply well under 1 MiB).
pub const MAX_HASHES: u64 = 16 * 1024;

/// The hash of one block for a hash-compared resync.
pub fn block_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

impl ControlReply {
    pub fn ok() -> ControlReply {
        ControlReply {
            ok: true,
            code: None,
            message: None,
            region: None,
            replicas: Vec::new(),
            hashes: Vec::new(),
        }
    }

    pub fn error(e: &crate::error::Error) -> ControlReply {
        ControlReply {
            ok: false,
            code: Some(e.code().to_string()),
            message: Some(e.to_string()),
            region: None,
            replicas: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// The reply as an error, if it is one.
    pub fn into_result(self) -> crate::error::Result<ControlReply> {
        if self.ok {
            return Ok(self);
        }
        Err(crate::error::Error::Remote {
            code: self.code.unwrap_or_else(|| "ERR_REMOTE".into()),
            message: self
                .message
                .unwrap_or_else(|| "the target site refused without a reason".into()),
        })
    }
}

/// Is `region` allowed by `allowed` (empty = any)?
pub fn region_allowed(region: &str, allowed: &[String]) -> bool {
    allowed.is_empty() || allowed.iter().any(|r| r == region)
}

/// A request to site `target` that NATS could not deliver, said the way an operator can act on.
pub fn unreachable(dir: &str, target: &str, e: &async_nats::RequestError) -> crate::error::Error {
    use async_nats::RequestErrorKind;
    let why = match e.kind() {
        RequestErrorKind::NoResponders => format!(
            "cannot reach site {target}: nothing answers there (is its `ferry volume serve --site {target}` running, and are the sites linked?)"
        ),
        RequestErrorKind::TimedOut => format!("cannot reach site {target}: the request timed out"),
        RequestErrorKind::Other => format!("cannot reach site {target}: {e}"),
    };
    crate::error::Error::Service {
        dir: dir.into(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_stable_json() {
        let m = ControlMessage::Begin {
            group: "g".into(),
            volumes: vec![GenerationRef {
                name: "a".into(),
                epoch: 1,
                generation: 2,
                resume_from: None,
                changes: vec![[0, 4096]],
            }],
        };
        let json = r#"{"op":"begin","group":"g","volumes":[{"name":"a","epoch":1,"generation":2,"changes":[[0,4096]]}]}"#;
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        // A source that announces nothing (or an earlier one) sends no `changes`.
        let earlier =
            r#"{"op":"begin","group":"g","volumes":[{"name":"a","epoch":1,"generation":2}]}"#;
        match serde_json::from_str::<ControlMessage>(earlier).unwrap() {
            ControlMessage::Begin { volumes, .. } => assert!(volumes[0].changes.is_empty()),
            other => panic!("parsed as {other:?}"),
        }
        assert!(valid_site_name("site-b") && !valid_site_name("a.b") && !valid_site_name(""));
        assert!(region_allowed("eu-de", &[]) && !region_allowed("us-east", &["eu-de".into()]));
    }
}
