//! A harness shared by the cargo-fuzz target and the test suite: open an
//! image built from arbitrary bytes, read it all, write to it, check it.
//! Any outcome but a panic or a hang is acceptable.

use crate::formats::qcow2::{check, CheckMode};
use crate::{open_image, Format, Node, OpenConfig, SgList};
use spindle_io::{CacheMode, Runtime, RuntimeConfig};
use std::path::Path;

/// Runs the harness on `data`, using `dir` for the image file.
pub fn qcow2_bytes(data: &[u8], dir: &Path) {
    let path = dir.join("fuzz.qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(rt) = Runtime::new(RuntimeConfig {
        depth: 64,
        ..Default::default()
    }) else {
        return;
    };
    let cfg = OpenConfig {
        format: Some(Format::Qcow2),
        cache: CacheMode::Unsafe,
        open_backing: false,
        ..Default::default()
    };
    let Some(spec) = path.to_str() else { return };
    let Ok(node) = open_image(spec, &cfg) else { return };
    rt.block_on(async {
        let size = node.size().min(64 << 20);
        let buf = SgList::zeroed(256 << 10);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            if node.read(off, &buf.slice(0, n)).await.is_err() {
                break;
            }
            off += n as u64;
        }
        let w = SgList::copy_of(&[0x5au8; 70_000]);
        let _ = node
            .write(size / 3, &w.slice(0, (size / 2).min(70_000) as usize), false)
            .await;
        let _ = node.write_zeroes(0, size.min(1 << 20), true).await;
        let _ = node.discard(size / 2, size / 4).await;
        if let Node::Qcow2(q) = &node {
            let _ = check(q, CheckMode::Report).await;
        }
        let _ = node.close().await;
    });
}

mod ops;
pub use ops::qcow2_ops;
