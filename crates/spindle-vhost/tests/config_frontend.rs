//! The configuration space over a real vhost-user connection, driven by
//! rust-vmm's vhost-user frontend: what a driver reads, the write-cache
//! switch (CONFIG_WCE) and refused writes.

use spindle_block::{open_image, OpenConfig};
use spindle_export::{Device, DeviceConfig};
use spindle_io::RuntimeConfig;
use spindle_vhost::{Export, VirtioDisk};
use std::sync::Arc;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

fn device() -> Arc<Device> {
    let node = open_image("null:1G", &OpenConfig::default()).unwrap();
    Arc::new(Device::new(
        node,
        DeviceConfig {
            name: "cfg".into(),
            serial: "cfg".into(),
            num_queues: 2,
            iothreads: 1,
            queue_size: 128,
            poll_ns: 0,
            engine: RuntimeConfig::default(),
            read_only: false,
        },
    ))
}

#[test]
fn frontend_reads_config_and_switches_the_write_cache() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cfg.sock");
    let dev = device();
    let export = Export::bind(dev.clone(), &sock).unwrap();
    let runner = export.clone();
    let server = std::thread::spawn(move || runner.run());

    let mut fe = Frontend::connect(&sock, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert_ne!(features & (1 << 11), 0, "CONFIG_WCE offered");
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    for f in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::LOG_SHMFD,
    ] {
        assert!(proto.contains(f), "{f:?} offered");
    }
    // Features set before the protocol features are asked for (as
    // libblkio does): memory slots are offered too (see
    // BlkBackend::protocol_features).
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    fe.set_protocol_features(
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ,
    )
    .unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let read = |fe: &mut Frontend| {
        let (_, cfg) = fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .unwrap();
        cfg
    };
    let cfg = read(&mut fe);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (1 << 30) / 512,
        "capacity"
    );
    assert_eq!(cfg[32], 1, "write cache on at start");

    // The driver turns its write cache off: writes become write-through.
    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    assert_eq!(read(&mut fe)[32], 0);
    assert!(!dev.writeback());
    assert!(dev.ident().write_through);

    // Anything but the writeback byte is refused and changes nothing (this
    // frontend does not ask for an ack, so the refusal shows in the space).
    let _ = fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[0xff; 8]);
    let _ = fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[7]);
    let after = read(&mut fe);
    assert_eq!(&after[..32], &cfg[..32]);
    assert_eq!(after[32], 0);
    assert_eq!(dev.capacity(), 1 << 30);

    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1]).unwrap();
    assert_eq!(read(&mut fe)[32], 1);
    assert!(dev.writeback());

    drop(fe);
    export.stop();
    server.join().unwrap().unwrap();
}

/// A frontend that negotiates the protocol features before it sets the
/// virtio features (QEMU's order) is not offered CONFIGURE_MEM_SLOTS, so
/// that each device start carries the whole memory table; a later
/// connection in libblkio's order is offered it again.
#[test]
fn memory_slots_are_offered_only_after_the_features_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("slots.sock");
    let export = Export::bind(device(), &sock).unwrap();
    let runner = export.clone();
    let server = std::thread::spawn(move || runner.run());

    let mut fe = Frontend::connect(&sock, 2).unwrap();
    let features = fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::CONFIG));
    assert!(
        !proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
        "{proto:?}"
    );
    fe.set_protocol_features(proto).unwrap();
    fe.set_owner().unwrap();
    fe.set_features(features).unwrap();
    drop(fe);

    let mut fe = loop {
        // The export takes the next frontend once the first one is gone.
        let fe = Frontend::connect(&sock, 2).unwrap();
        if fe.set_owner().is_ok() {
            break fe;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(
        proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
        "{proto:?}"
    );
    drop(fe);
    export.stop();
    server.join().unwrap().unwrap();
}

/// A connected frontend that never started the device (QEMU started with
/// `-S`, as libvirt starts a guest) leaves nothing to wait for: the export
/// quiesces for a snapshot (`spindle vm snapshot` of a guest not yet run).
#[test]
fn a_frontend_that_never_started_the_device_does_not_block_a_quiesce() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("never.sock");
    let export = Export::bind(device(), &sock).unwrap();
    let runner = export.clone();
    let server = std::thread::spawn(move || runner.run());
    let mut fe = Frontend::connect(&sock, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !export.is_connected() {
        assert!(
            std::time::Instant::now() < deadline,
            "the export never saw the frontend"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let hold = export.quiesce(std::time::Duration::from_secs(5));
    assert!(hold.is_ok(), "{:?}", hold.err());
    drop(hold);
    drop(fe);
    export.stop();
    server.join().unwrap().unwrap();
}
