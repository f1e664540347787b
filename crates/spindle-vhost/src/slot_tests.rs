//! Handover of real images: raw and qcow2 files closed and opened again,
//! judged by a fresh open and by qemu-img.

use super::*;
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
    slot.attach();
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
    slot.detach().unwrap();
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
