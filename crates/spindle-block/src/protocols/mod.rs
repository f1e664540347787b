//! Protocol drivers: exports reached over the network, seen as raw nodes.

pub mod nbd;
