//! NBD: the wire constants shared by the client and the server.

pub mod wire;
