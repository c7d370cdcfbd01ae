//! Ferry's block data plane core: volumes with changed-block tracking and generations, the NBD
//! server that serves them and the NBD client that imports from other servers.
//!
//! This crate must never depend on napi or know about JavaScript; `ferry-dataplane-native` is the
//! one thin binding layer.

pub mod activity_log;
pub mod admin;
pub mod apply_txn;
pub mod bitmap;
pub mod commit_intent;
pub mod control;
pub mod cut_image;
pub mod data_dir;
pub mod error;
pub mod import;
pub mod import_volume;
pub mod nbd;
pub mod recovery_points;
pub mod registry;
pub mod replica_clone;
pub mod replication;
pub mod service;
pub mod size;
pub mod staged_tail;
pub mod stats;
pub mod volume;
pub mod volume_meta;

pub use error::{Error, Result};

/// A duration in milliseconds, for the debug log's timings.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
