//! Network protocol clients, the storage backends reached over the
//! network ([`crate::Storage::Nbd`]).

pub mod nbd;
