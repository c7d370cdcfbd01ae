//! Harnesses shared by the integration tests; a test file pulls them in with `mod support;`.
//! Each module starts real components and cleans them up on `Drop`. Not every test uses every
//! helper.
#![allow(dead_code)]

pub mod link_proxy;
pub mod nats_sites;
pub mod sites;
