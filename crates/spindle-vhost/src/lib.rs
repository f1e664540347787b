//! Spindle's data plane: virtio-blk requests from guest memory to the block
//! layer.
//!
//! This crate starts with the part that faces the guest: [`blk::request`]
//! turns a descriptor chain into a validated request, or into the status a
//! hostile or broken chain deserves, before any byte is moved. The
//! vhost-user backend built on rust-vmm's `vhost-user-backend` comes next.
#![deny(missing_docs)]

pub mod blk;
