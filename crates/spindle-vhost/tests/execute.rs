//! Requests from crafted virtqueues executed against a real raw image.

use spindle_block::{open_image, Format, OpenConfig};
use spindle_io::{Runtime, RuntimeConfig};
use spindle_vhost::blk::request::*;
use spindle_vhost::blk::{complete, parse, Device, Limits};
use spindle_vhost::dirty::DirtyLog;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const HDR: u64 = 0x8000;
const BUF: u64 = 0x10000;
const STATUS: u64 = 0xF000;

fn r(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}
fn w(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

struct Guest {
    mem: GuestMemoryMmap,
}

/// A 1 MiB raw image filled with `fill`: its directory, path and node.
fn raw_disk(fill: u8) -> (tempfile::TempDir, std::path::PathBuf, spindle_block::Node) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![fill; 1 << 20]).unwrap();
    let cfg = OpenConfig {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let node = open_image(path.to_str().unwrap(), &cfg).unwrap();
    (dir, path, node)
}

impl Guest {
    /// 1 MiB of guest memory at 0.
    fn new() -> Guest {
        Guest {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        }
    }
    /// The memory as the data plane shares it (same mapping).
    fn shared(&self) -> spindle_vhost::blk::request::SharedMemory<()> {
        std::rc::Rc::new(std::sync::Arc::new(self.mem.clone()))
    }
    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }
    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

#[test]
fn requests_move_data_between_guest_memory_and_the_image() {
    let (_dir, path, node) = raw_disk(0x11);
    let g = Guest::new();
    let limits = Limits::new((1 << 20) / 512);
    let dev = Device::new("spindle-test-serial-0123456789");
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let q = MockSplitQueue::new(&g.mem, 64);
    let run = |descs: &[RawDescriptor]| {
        let chain = q.build_desc_chain(descs).unwrap();
        rt.block_on(complete(
            &node,
            &g.shared(),
            &dev,
            &DirtyLog::new(),
            parse(chain, &g.mem, &limits),
        ))
    };

    // Write 8 KiB from two guest buffers at sector 8.
    g.mem.write_slice(&[0xAB; 4096], GuestAddress(BUF)).unwrap();
    g.mem.write_slice(&[0xCD; 4096], GuestAddress(BUF + 0x4000)).unwrap();
    g.header(VIRTIO_BLK_T_OUT, 8);
    let c = run(&[r(HDR, 16), r(BUF, 4096), r(BUF + 0x4000, 4096), w(STATUS, 1)]);
    assert_eq!((c.status, c.used_len), (Some(VIRTIO_BLK_S_OK), 1));
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[4096..8192].iter().all(|&b| b == 0xAB) && disk[8192..12288].iter().all(|&b| b == 0xCD));

    // Read it back into another buffer (zero-copy into guest memory).
    g.header(VIRTIO_BLK_T_IN, 8);
    let c = run(&[r(HDR, 16), w(BUF + 0x8000, 8192), w(STATUS, 1)]);
    assert_eq!((c.status, c.used_len), (Some(VIRTIO_BLK_S_OK), 8193));
    let mut back = vec![0u8; 8192];
    g.mem.read_slice(&mut back, GuestAddress(BUF + 0x8000)).unwrap();
    assert_eq!(&back[..4096], &[0xAB; 4096][..]);
    assert_eq!(&back[4096..], &[0xCD; 4096][..]);

    // Flush, GET_ID.
    g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&[r(HDR, 16), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_OK));
    g.header(VIRTIO_BLK_T_GET_ID, 0);
    let c = run(&[r(HDR, 16), w(BUF, 20), w(STATUS, 1)]);
    assert_eq!((c.status, c.used_len), (Some(VIRTIO_BLK_S_OK), 21));
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id, b"spindle-test-serial-");

    // Write-zeroes with unmap over the written range.
    g.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    g.mem.write_obj(8u64.to_le(), GuestAddress(HDR + 16)).unwrap();
    g.mem.write_obj(16u32.to_le(), GuestAddress(HDR + 24)).unwrap();
    g.mem.write_obj(1u32.to_le(), GuestAddress(HDR + 28)).unwrap();
    assert_eq!(run(&[r(HDR, 32), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_OK));
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[4096..12288].iter().all(|&b| b == 0));
    assert!(disk[..4096].iter().all(|&b| b == 0x11), "neighbours untouched");

    // A hostile request: status IOERR in guest memory, nothing else touched.
    g.header(VIRTIO_BLK_T_IN, 1 << 40);
    let c = run(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);
    assert_eq!(
        (c.status, c.used_len, g.status()),
        (Some(VIRTIO_BLK_S_IOERR), 1, VIRTIO_BLK_S_IOERR)
    );
    // An unknown type: UNSUPP.
    g.header(77, 0);
    assert_eq!(run(&[r(HDR, 16), w(STATUS, 1)]).status, Some(VIRTIO_BLK_S_UNSUPP));
}

#[test]
fn a_read_only_image_fails_writes_with_ioerr() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("ro.raw");
    std::fs::write(&path, vec![0u8; 65536]).unwrap();
    let cfg = OpenConfig {
        format: Some(Format::Raw),
        read_only: true,
        ..Default::default()
    };
    let node = open_image(path.to_str().unwrap(), &cfg).unwrap();
    let g = Guest {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
    };
    // The device did not advertise RO (a misconfiguration): the image still refuses.
    let limits = Limits::new(128);
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let q = MockSplitQueue::new(&g.mem, 16);
    g.header(VIRTIO_BLK_T_OUT, 0);
    let chain = q.build_desc_chain(&[r(HDR, 16), r(BUF, 512), w(STATUS, 1)]).unwrap();
    let c = rt.block_on(complete(
        &node,
        &g.shared(),
        &Device::new("ro"),
        &DirtyLog::new(),
        parse(chain, &g.mem, &limits),
    ));
    assert_eq!(c.status, Some(VIRTIO_BLK_S_IOERR));
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn with_logging_on_reads_mark_their_data_and_status_and_writes_their_status_only() {
    use spindle_vhost::dirty::{LogMap, VHOST_F_LOG_ALL};
    use spindle_vhost::fuzzing::driver::{log_pages, memfd};
    use std::os::unix::fs::FileExt;
    let (_dir, _, node) = raw_disk(0x22);
    let g = Guest::new();
    let limits = Limits::new((1 << 20) / 512);
    let dev = Device::new("serial");
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let q = MockSplitQueue::new(&g.mem, 64);
    let file = memfd(4096, true).unwrap();
    let log = DirtyLog::new();
    log.set_base(LogMap::adopt(&file, &vhost::vhost_user::message::VhostUserLog::new(4096, 0)).unwrap());
    log.set_features(VHOST_F_LOG_ALL);
    let run = |descs: &[RawDescriptor]| {
        file.write_all_at(&[0u8; 4096], 0).unwrap();
        let chain = q.build_desc_chain(descs).unwrap();
        let c = rt.block_on(complete(&node, &g.shared(), &dev, &log, parse(chain, &g.mem, &limits)));
        (c.status, log_pages(&file).unwrap())
    };
    let page = |a: u64| a / 4096;

    // A read of 3 sectors at BUF + 4000 (pages 16 and 17), status at 0xF000.
    g.header(VIRTIO_BLK_T_IN, 0);
    let (st, pages) = run(&[r(HDR, 16), w(BUF + 4000, 1536), w(STATUS, 1)]);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK));
    assert_eq!(pages, [page(STATUS), page(BUF), page(BUF) + 1]);

    // A write: the device writes only the status byte.
    g.header(VIRTIO_BLK_T_OUT, 0);
    let (st, pages) = run(&[r(HDR, 16), r(BUF + 4000, 1536), w(STATUS, 1)]);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK));
    assert_eq!(pages, [page(STATUS)]);

    // GET_ID into 20 bytes on page 32.
    g.header(VIRTIO_BLK_T_GET_ID, 0);
    let (st, pages) = run(&[r(HDR, 16), w(0x20000, 20), w(STATUS, 1)]);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK));
    assert_eq!(pages, [page(STATUS), 32]);

    // A refused chain (a read past the end of the disk) writes its status.
    g.header(VIRTIO_BLK_T_IN, (1 << 20) / 512);
    let (st, pages) = run(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR));
    assert_eq!(pages, [page(STATUS)]);

    // Logging off: a read marks nothing.
    log.set_features(0);
    g.header(VIRTIO_BLK_T_IN, 0);
    let (st, pages) = run(&[r(HDR, 16), w(BUF, 4096), w(STATUS, 1)]);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK));
    assert_eq!(pages, Vec::<u64>::new());
}
