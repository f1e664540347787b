//! Fuzz harnesses, and the frontend they drive (see docs/fuzzing.md).
//!
//! Not a stable API: the fuzz targets in `fuzz/` and this crate's tests
//! call these functions; any outcome but a panic, a hang or a wedged
//! export is acceptable.

pub mod chain;
pub mod driver;
pub mod session;

pub use chain::blk_chain;
pub use session::vhost_user_session;
