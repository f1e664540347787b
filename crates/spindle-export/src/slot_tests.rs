//! Handover of real images: raw and qcow2 files closed and opened again,
//! judged by a fresh open and by qemu-img.

use super::*;
use crate::activation::{Start, Waker};
use spindle_block::formats::qcow2::create::{create, CreateOptions};
use spindle_block::{open_image, OpenConfig, Sharing};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Opener(PathBuf);

impl Reopen for Opener {
    fn open_active(&self) -> Result<Node, BlockError> {
        open_image(self.0.to_str().unwrap(), &OpenConfig::default())
    }
    fn open_inactive(&self) -> Result<Node, BlockError> {
        let cfg = OpenConfig {
            read_only: true,
            sharing: Sharing::All,
            ..Default::default()
        };
        open_image(self.0.to_str().unwrap(), &cfg)
    }
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required for this test: install it with `apt-get install -y qemu-utils`");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn image(dir: &Path, qcow2: bool) -> PathBuf {
    let path = dir.join(if qcow2 { "d.qcow2" } else { "d.raw" });
    if qcow2 {
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        let opts = CreateOptions {
            size: 8 << 20,
            lazy_refcounts: true,
            ..Default::default()
        };
        rt.block_on(create(&path, &opts)).unwrap();
    } else {
        std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    }
    path
}

fn write(node: &Node, off: u64, byte: u8) {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(node.write_from(off, &[byte; 4096], false)).unwrap();
}

fn read(node: &Node, off: u64) -> Vec<u8> {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let mut buf = vec![0; 4096];
    rt.block_on(node.read_into(off, &mut buf)).unwrap();
    buf
}

fn slot_of(path: &Path) -> NodeSlot {
    let op = Opener(path.to_owned());
    NodeSlot::active(op.open_active().unwrap(), Box::new(op), RuntimeConfig::default())
}

fn handover(qcow2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), qcow2);
    let p = path.to_str().unwrap();
    let slot = slot_of(&path);
    let id = slot.attach();
    let node = slot.current().unwrap();
    write(&node, 1 << 20, 0xa5);
    if qcow2 {
        assert!(node.info().dirty, "a lazy-refcounts image is dirty while written");
    }
    drop(node);
    assert!(slot.inactivate().unwrap(), "a reopenable slot closes its image");
    assert!(slot.current().is_none() && !slot.is_open());
    assert_eq!(slot.size(), Some(8 << 20), "the look held knows the size");
    // Inactive: nothing cached, no write lock; the image is clean.
    if qcow2 {
        let (ok, out) = qemu_img(&["check", p]);
        assert!(ok, "qemu-img check while inactive: {out}");
        let (_, info) = qemu_img(&["info", "--output=json", p]);
        assert!(
            info.contains("\"dirty-flag\": false"),
            "dirty bit clear while inactive: {info}"
        );
    }
    // Another process (here: a fresh writable open) may take the image.
    let other = open_image(p, &OpenConfig::default()).expect("no write lock held while inactive");
    assert_eq!(read(&other, 1 << 20), vec![0xa5; 4096], "the write reached the image");
    write(&other, 2 << 20, 0x3c);
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(other.close()).unwrap();
    drop(other);
    // Activation opens it afresh: it sees the other writer's data.
    let node = slot.activate().unwrap();
    assert_eq!(read(&node, 2 << 20), vec![0x3c; 4096], "metadata re-read on activation");
    assert_eq!(read(&node, 1 << 20), vec![0xa5; 4096]);
    assert!(
        open_image(p, &OpenConfig::default()).is_err(),
        "an active slot holds the write lock again"
    );
    drop(node);
    slot.detach(id).unwrap();
    let (ok, out) = qemu_img(&["info", p]);
    assert!(ok, "the last detach let the image go: {out}");
    if qcow2 {
        let (ok, out) = qemu_img(&["check", p]);
        assert!(ok, "qemu-img check after the last detach: {out}");
    }
}

#[test]
fn raw_image_is_closed_and_reopened() {
    handover(false);
}

#[test]
fn qcow2_image_is_closed_clean_and_reopened_with_fresh_metadata() {
    handover(true);
}

#[test]
fn an_inactive_slot_waits_for_activation_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), true);
    let op = Opener(path.clone());
    let source = op.open_active().unwrap();
    // The destination's look shares everything: the source keeps writing.
    let slot = NodeSlot::inactive(
        op.open_inactive().unwrap(),
        Box::new(Opener(path.clone())),
        RuntimeConfig::default(),
    );
    write(&source, 0, 0x11);
    assert!(
        slot.activate().is_err(),
        "two writers never: the source holds the write lock"
    );
    assert!(slot.current().is_none(), "still inactive");
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(source.close()).unwrap();
    drop(source);
    let node = slot.activate().unwrap();
    assert_eq!(read(&node, 0), vec![0x11; 4096], "the source's last write");
}

#[test]
fn a_fixed_slot_only_flushes() {
    let node = open_image("null:1M", &OpenConfig::default()).unwrap();
    let slot = NodeSlot::fixed(node, RuntimeConfig::default());
    assert!(!slot.inactivate().unwrap());
    assert!(slot.is_open());
    assert!(slot.activate().is_ok());
}

fn waker() -> Arc<Waker> {
    Arc::new(Waker::new().unwrap())
}

fn serves(s: Start) -> bool {
    matches!(s, Start::Serve(_))
}

/// Waits up to `limit` for `f`.
fn within(limit: std::time::Duration, f: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !f() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

#[test]
fn one_export_of_a_slot_runs_at_a_time() {
    let node = open_image("null:1M", &OpenConfig::default()).unwrap();
    let slot = Arc::new(NodeSlot::fixed(node, RuntimeConfig::default()));
    let (a, b) = (slot.attach(), slot.attach());
    let (wa, wb) = (waker(), waker());
    assert!(serves(slot.start(a, &wa, "a")), "the first device starts");
    assert!(
        !serves(slot.start(b, &wb, "b")),
        "the second waits while the first runs"
    );
    assert!(!wb.woken());
    assert!(
        serves(slot.start(a, &wa, "a")),
        "the running one may start another ring"
    );
    slot.guard().stopped(a);
    assert!(wb.woken(), "the first one's stop wakes the waiting device");
    assert!(serves(slot.start(b, &wb, "b")));
    assert!(!serves(slot.start(a, &wa, "a")), "now the first one waits");
    slot.detach(b).unwrap();
    assert!(wa.woken(), "an export that goes wakes the waiting ones");
    assert!(serves(slot.start(a, &wa, "a")));
    slot.detach(a).unwrap();
}

/// An image another writer (`source`, returned) holds, and an inactive
/// slot of it whose device (export `id`, waker `w`) asked to start and
/// waits.
#[allow(clippy::type_complexity)]
fn waiting_behind_a_source(qcow2: bool) -> (tempfile::TempDir, PathBuf, Node, Arc<NodeSlot>, u64, Arc<Waker>) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), qcow2);
    let op = Opener(path.clone());
    let source = op.open_active().unwrap();
    let slot = Arc::new(NodeSlot::inactive(
        op.open_inactive().unwrap(),
        Box::new(Opener(path.clone())),
        RuntimeConfig::default(),
    ));
    let id = slot.attach();
    let w = waker();
    assert!(!serves(slot.start(id, &w, "dst")), "the source holds the write lock");
    (dir, path, source, slot, id, w)
}

#[test]
fn a_closed_image_is_opened_in_the_background_and_the_waiting_device_woken() {
    let (_dir, path, source, slot, id, w) = waiting_behind_a_source(true);
    assert!(slot.guard().is_activating());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!w.woken() && !slot.is_open(), "not while the source holds the lock");
    write(&source, 0, 0x22);
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(source.close()).unwrap();
    drop(source);
    let t = std::time::Duration::from_secs(10);
    assert!(within(t, || w.woken()), "woken once the image is open");
    assert!(slot.is_open() && !slot.guard().is_activating(), "the thread ended");
    let Start::Serve(node) = slot.start(id, &w, "dst") else {
        panic!("serves")
    };
    assert_eq!(read(&node, 0), vec![0x22; 4096], "the source's last write");
    drop(node);
    slot.detach(id).unwrap();
    let (ok, out) = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(ok, "qemu-img check after the last detach: {out}");
}

#[test]
fn the_activation_thread_ends_when_no_device_waits() {
    let (_dir, _path, source, slot, id, w) = waiting_behind_a_source(false);
    slot.guard().cancel(&w);
    let t = std::time::Duration::from_secs(10);
    assert!(within(t, || !slot.guard().is_activating()), "the thread ends");
    drop(source);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!slot.is_open() && !w.woken(), "nothing opened the image for no one");
    slot.detach(id).unwrap();
}
