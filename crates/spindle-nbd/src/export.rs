//! What the server serves: an image node with its NBD description.

use crate::handshake::ExportInfo;
use spindle_block::Node;
use std::sync::Arc;

/// QEMU's `detect-zeroes`: what a write of all zeroes becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as data.
    #[default]
    Off,
    /// A zero write (no hole punched).
    On,
    /// A zero write that may unmap, when discards are honoured.
    Unmap,
}

/// One export: the node every connection to it shares, and its description.
pub struct Export {
    /// Name, size, flags as the handshake announces them.
    pub info: ExportInfo,
    /// The image (shared by every connection and I/O thread).
    pub node: Arc<Node>,
    /// `TRIM` and hole-punching zero writes reach the image (QEMU's
    /// `discard=unmap`); otherwise `TRIM` succeeds without effect.
    pub discard: bool,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
}

impl Export {
    /// Whether zeroing is always cheap on this node (`FAST_ZERO`): qcow2
    /// (zero clusters) and null; raw may fall back to writing zeroes.
    pub fn zeroing_is_fast(node: &Node) -> bool {
        matches!(node, Node::Qcow2(_) | Node::Null(_))
    }
}
