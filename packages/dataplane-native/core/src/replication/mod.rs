//! Replication between sites: what crosses from site A to site B over NATS, and the two ends that
//! send and apply it.
//!
//! `frame` spells the wire format of data frames and generation ends, and cuts a generation into
//! message-sized pieces; `protocol` spells the control conversation around them; `shipper` and
//! `receiver` are the two ends of a pair, `sync` the synchronous write path of a sync pair, and
//! `manager` a volume service's role at its site, `route` the connection it reaches a peer site on. Bytes
//! from a peer are never applied before `frame` has decoded and verified them.

pub mod applier;
pub mod frame;
pub mod manager;
pub mod protocol;
pub mod receiver;
pub mod route;
pub mod shipper;
pub mod sync;
