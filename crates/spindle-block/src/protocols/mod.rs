//! Network protocol clients, the storage backends reached over the
//! network ([`crate::Storage::Nbd`], [`crate::Storage::Rbd`]).

pub mod nbd;
pub mod rbd;
