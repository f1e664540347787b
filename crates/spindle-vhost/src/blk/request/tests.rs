//! Crafted chains, well-formed and hostile, through virtio-queue's mock queue.

use super::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x10_0000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xF000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
}

fn r(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}
fn w(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

/// Parses a chain built from `descs` (next flags filled in by the mock).
fn run(mem: &GuestMemoryMmap, descs: &[RawDescriptor], limits: &Limits) -> Parsed {
    let q = MockSplitQueue::new(mem, 64);
    let chain = q.build_desc_chain(descs).unwrap();
    parse(chain, mem, limits)
}

fn limits() -> Limits {
    Limits::new(1 << 20) // 512 MiB
}

fn failed(p: &Parsed) -> (u8, &'static str) {
    match p {
        Parsed::Fail {
            status,
            reason,
            status_addr,
        } => {
            assert_eq!(
                *status_addr,
                GuestAddress(STATUS),
                "status goes to the last writable byte"
            );
            (*status, *reason)
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn well_formed_requests() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 8);
    let p = run(&m, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &limits());
    let Parsed::Request(req) = p else { panic!("{p:?}") };
    assert_eq!((req.kind, req.sector, req.data_len), (RequestKind::Read, 8, 4096));
    assert_eq!(req.data, vec![(GuestAddress(DATA), 4096)]);
    assert_eq!(req.status, GuestAddress(STATUS));

    // Write with the header and data in one descriptor (any layout).
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let p = run(&m, &[r(HDR, 16 + 1024), w(STATUS, 1)], &limits());
    let Parsed::Request(req) = p else { panic!("{p:?}") };
    assert_eq!(req.kind, RequestKind::Write);
    assert_eq!(req.data, vec![(GuestAddress(HDR + 16), 1024)]);

    // Read with data and status sharing the last descriptor.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let p = run(&m, &[r(HDR, 16), w(STATUS - 512, 513)], &limits());
    let Parsed::Request(req) = p else { panic!("{p:?}") };
    assert_eq!(req.data, vec![(GuestAddress(STATUS - 512), 512)]);

    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert!(matches!(
        run(&m, &[r(HDR, 16), w(STATUS, 1)], &limits()),
        Parsed::Request(Request {
            kind: RequestKind::Flush,
            ..
        })
    ));

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let p = run(&m, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)], &limits());
    assert!(
        matches!(
            p,
            Parsed::Request(Request {
                kind: RequestKind::GetId,
                data_len: 20,
                ..
            })
        ),
        "{p:?}"
    );

    // Write-zeroes with two segments, one with unmap.
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    for (i, (sector, n, flags)) in [(100u64, 8u32, 1u32), (200, 16, 0)].iter().enumerate() {
        let at = GuestAddress(HDR + 16 + 16 * i as u64);
        m.write_obj(sector.to_le(), at).unwrap();
        m.write_obj(n.to_le(), at.unchecked_add(8)).unwrap();
        m.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
    }
    let p = run(&m, &[r(HDR, 48), w(STATUS, 1)], &limits());
    let Parsed::Request(req) = p else { panic!("{p:?}") };
    assert_eq!(
        req.kind,
        RequestKind::WriteZeroes(vec![
            Range {
                sector: 100,
                sectors: 8,
                unmap: true
            },
            Range {
                sector: 200,
                sectors: 16,
                unmap: false
            }
        ])
    );
    // The same list as a discard: the unmap flag is not defined there.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        failed(&run(&m, &[r(HDR, 48), w(STATUS, 1)], &limits())).0,
        VIRTIO_BLK_S_UNSUPP
    );
}

#[test]
fn hostile_chains_get_a_status_not_a_crash() {
    let m = mem();
    let l = limits();
    let cases: Vec<(u32, u64, Vec<RawDescriptor>, u8, &str)> = vec![
        (
            99,
            0,
            vec![r(HDR, 16), w(STATUS, 1)],
            VIRTIO_BLK_S_UNSUPP,
            "unknown request type",
        ),
        (
            VIRTIO_BLK_T_IN,
            (1 << 20) - 1,
            vec![r(HDR, 16), w(DATA, 1024), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "past the end",
        ),
        (
            VIRTIO_BLK_T_IN,
            u64::MAX,
            vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "past the end",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 16), w(DATA, 100), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "multiple of 512",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 8), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "shorter than 16",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 16), w(DATA, 512), r(DATA + 512, 512), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "after a writable",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 16), w(MEM + 0x1000, 512), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "outside guest memory",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 16), w(DATA, 1024), w(DATA + 512, 512), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "overlap",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "device-readable data",
        ),
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![r(HDR, 16 + 512), w(DATA, 512), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "writable bytes",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(HDR, 16), w(DATA, 2 << 20), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "size_max",
        ),
        (
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![r(HDR, 16), w(DATA, 10), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "shorter than 20",
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![r(HDR, 16 + 7), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "16-byte segments",
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![r(HDR, 16 + 33 * 16), w(STATUS, 1)],
            VIRTIO_BLK_S_IOERR,
            "more segments",
        ),
    ];
    for (kind, sector, descs, status, reason) in cases {
        header(&m, kind, sector);
        let (got, why) = failed(&run(&m, &descs, &l));
        assert_eq!(got, status, "type {kind}: {why}");
        assert!(why.contains(reason), "type {kind}: expected '{reason}', got '{why}'");
    }
    // Read-only devices refuse every kind of change.
    let ro = Limits { read_only: true, ..l };
    for kind in [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&m, kind, 0);
        assert_eq!(failed(&run(&m, &[r(HDR, 32), w(STATUS, 1)], &ro)).0, VIRTIO_BLK_S_IOERR);
    }
    // Too many descriptors for seg_max.
    let small = Limits { seg_max: 2, ..l };
    header(&m, VIRTIO_BLK_T_IN, 0);
    let many = [
        r(HDR, 16),
        w(DATA, 512),
        w(DATA + 512, 512),
        w(DATA + 1024, 512),
        w(DATA + 1536, 512),
        w(STATUS, 1),
    ];
    let (_, why) = failed(&run(&m, &many, &small));
    assert!(why.contains("seg_max"), "{why}");
}

#[test]
fn chains_without_a_status_byte_are_dropped() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert!(matches!(
        run(&m, &[r(HDR, 16), r(DATA, 512)], &limits()),
        Parsed::Drop { .. }
    ));
    assert!(matches!(
        run(&m, &[r(HDR, 16), w(MEM + 10, 1)], &limits()),
        Parsed::Drop { .. }
    ));
    assert!(matches!(
        run(&m, &[r(HDR, 16), w(u64::MAX, 1)], &limits()),
        Parsed::Drop { .. }
    ));
}

#[test]
fn a_looping_chain_ends() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&m, 16);
    // Descriptor 1 points at itself.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            1,
        )),
    ];
    let chain = q.build_multiple_desc_chains(&descs).unwrap();
    let p = parse(chain, &m, &limits());
    assert!(matches!(p, Parsed::Fail { .. } | Parsed::Drop { .. }), "{p:?}");
}

#[test]
fn buffers_become_an_sg_list_over_guest_memory() {
    let m = mem();
    m.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let p = run(&m, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &limits());
    let Parsed::Request(req) = p else { panic!("{p:?}") };
    let shared = std::rc::Rc::new(std::sync::Arc::new(m.clone()));
    let sg = sg_list(&shared, &req.data).unwrap();
    let mut out = [0u8; 512];
    sg.copy_to(&mut out);
    assert_eq!(out, [7u8; 512]);
    sg.fill_zero();
    let mut back = [1u8; 512];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0u8; 512], "the list writes guest memory in place (zero-copy)");
}
