//! Intermediate commit and stream with `--base` on a served three-layer
//! chain (docs/jobs.md): raw base ← mid.qcow2 ← top.qcow2, data in each
//! layer. After the job the chain reads as before, `qemu-img info
//! --backing-chain` shows the shorter chain, and every image is clean.

mod common;

use common::jobs::{backing_chain, start_job, view, wait_job, Chain, NAME};
use common::{assert_clean, p, scratch};
use serde_json::json;

/// Runs `req` on a fresh served chain; returns the chain and its view
/// before the job, after checking the job completed and the server
/// stopped cleanly.
fn run_job(prefix: &str, req: impl Fn(&Chain) -> serde_json::Value) -> (tempfile::TempDir, Chain, Vec<u8>) {
    let d = scratch();
    let ch = Chain::create(d.path(), prefix, "raw");
    let before = view(&ch.top);
    let s = ch.serve();
    let id = start_job(&s, req(&ch));
    let j = wait_job(&s, id);
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(j["done"], j["total"], "{j}");
    let l = s.ctl(&json!({"cmd": "list"}));
    assert_eq!(
        l["exports"][0]["image"],
        p(&ch.top),
        "the export still serves the top: {l}"
    );
    assert!(s.stop().success(), "spindle serve did not exit 0");
    (d, ch, before)
}

#[test]
fn intermediate_commit_merges_mid_into_the_base() {
    let (_d, ch, before) = run_job(
        "ic",
        |ch| json!({"cmd": "commit", "name": NAME, "top": ch.mid, "speed": 0}),
    );
    assert!(view(&ch.top) == before, "the chain reads differently after the commit");
    assert_eq!(backing_chain(&ch.top), [p(&ch.top), p(&ch.base)], "top ← base");
    assert_clean(&ch.top);
    // The merged layer is left behind whole; the base holds its data.
    assert_clean(&ch.mid);
    let base = std::fs::read(&ch.base).unwrap();
    assert!(
        base[4 << 20..12 << 20].iter().all(|&b| b == 0x22),
        "mid's data is in the base"
    );
    assert!(
        base[14 << 20..15 << 20].iter().all(|&b| b == 0),
        "mid's zeroes are in the base"
    );
    assert!(
        base[..4 << 20].iter().all(|&b| b == 0x11),
        "the base keeps its own data"
    );
    assert!(
        base[8 << 20..10 << 20].iter().all(|&b| b == 0x22),
        "top's data stays in the top"
    );
}

#[test]
fn stream_with_base_copies_only_the_layers_above_it() {
    let (_d, ch, before) = run_job("sb", |ch| json!({"cmd": "stream", "name": NAME, "base": ch.base}));
    assert!(view(&ch.top) == before, "the chain reads differently after the stream");
    assert_eq!(backing_chain(&ch.top), [p(&ch.top), p(&ch.base)], "top ← base");
    assert_clean(&ch.top);
    assert_clean(&ch.mid);
    // The base's own data stays there (depth 1: read from the backing
    // file); mid's is in the top now (depth 0).
    let map = common::ok("qemu-img", &["map", "--output=json", p(&ch.top)]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let depth_at = |off: u64| {
        let e = extents
            .iter()
            .find(|e| {
                e["start"].as_u64().unwrap() <= off
                    && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .unwrap();
        e["depth"].as_u64().unwrap()
    };
    assert_eq!(depth_at(0), 1, "{map}");
    assert_eq!(depth_at((4 << 20) - 1), 1, "{map}");
    for off in [4 << 20, 6 << 20, 11 << 20, 14 << 20] {
        assert_eq!(depth_at(off), 0, "offset {off}: {map}");
    }
}
