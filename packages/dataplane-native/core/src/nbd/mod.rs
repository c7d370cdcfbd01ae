//! NBD protocol: wire constants, the server (handshake, option haggling, transmission) and the client.

pub mod proto;
pub mod client;
pub mod uri;
