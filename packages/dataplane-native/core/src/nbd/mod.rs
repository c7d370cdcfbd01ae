//! NBD protocol: wire constants, the server (handshake, option haggling, transmission) and the client.

pub mod client;
pub mod handshake;
pub mod meta_context;
pub mod proto;
pub mod server;
pub mod transmission;
pub mod uri;
