//! What a range of a node is: allocation status within one node
//! ([`BlockStatus`]) and through a chain ([`Extent`]).

/// What a range of the device is, as `qemu-img map` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the range in bytes.
    pub len: u64,
    /// Data is stored for it somewhere in the chain.
    pub data: bool,
    /// It reads as zeroes.
    pub zero: bool,
    /// Some image of the chain defines it.
    pub present: bool,
    /// Which image of the chain defines it (0 = this one).
    pub depth: u32,
    /// Offset in the defining image's file, when data sits there plainly.
    pub offset: Option<u64>,
    /// Stored compressed.
    pub compressed: bool,
}

/// Allocation state of a range within one node, for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Stored here, at the given host offset if plain.
    Data {
        /// Host offset of the data, if it is stored uncompressed.
        offset: Option<u64>,
        /// Stored compressed.
        compressed: bool,
    },
    /// Reads as zeroes, defined here.
    Zero,
    /// Not defined here: the backing image decides.
    Unallocated,
}

/// What a storage knows of a range of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Data is stored for it (not a hole).
    pub data: bool,
    /// It reads as zeroes.
    pub zero: bool,
}
