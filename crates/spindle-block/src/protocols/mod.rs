//! Protocol drivers: exports reached over the network.

pub mod nbd;
