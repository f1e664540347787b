//! Image format drivers.

pub mod null;
pub mod qcow2;
pub mod raw;
