//! Image format drivers.

pub mod qcow2;
pub mod raw;
