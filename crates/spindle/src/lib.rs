//! The commands of the `spindle` binary, as a library so that the fuzz
//! targets and the tests can call the code they exercise directly. The
//! binary (`src/main.rs`) only parses the command line and dispatches.

pub mod bench;
pub mod ctl;
pub mod doctor;
pub mod error;
pub mod img;
pub mod libvirt;
pub mod logging;
pub mod nbd;
pub mod nbd_addr;
pub mod protocol;
pub mod serve;
pub mod vm;

#[doc(hidden)]
pub mod fuzzing;
