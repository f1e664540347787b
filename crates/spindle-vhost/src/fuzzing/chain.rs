//! The request-parser harness: a virtqueue whose descriptor table,
//! available ring and guest memory come from the fuzzer, popped and
//! parsed the way an I/O thread does, each request completed against a
//! null disk. Beyond "no panic", it checks what the rest of the data
//! plane relies on: a request's buffers lie in guest memory and do not
//! overlap, reads and writes stay inside the disk, and a completion never
//! claims more bytes than the chain could hold.

use crate::blk::{complete, parse, Device, Limits, Parsed, RequestKind, VIRTIO_BLK_S_OK};
use crate::ring;
use spindle_block::{open_image, Node, OpenConfig};
use spindle_io::{Runtime, RuntimeConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory: two 64 KiB regions with a hole between them, so buffers
/// can straddle a region's end or fall into nothing.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x10000), (0x20000, 0x10000)];
/// Ring layout at the start of the first region (room for 256 entries):
/// descriptor table, available ring, used ring; requests go from 0x2000.
pub const DESC: u64 = 0x0000;
/// Available ring.
pub const AVAIL: u64 = 0x1000;
/// Used ring.
pub const USED: u64 = 0x1400;
/// Disk size in sectors (1 MiB).
pub const SECTORS: u64 = 2048;

struct Env {
    rt: Runtime,
    node: Node,
}

thread_local! {
    static ENV: Option<Env> = (|| {
        let rt = Runtime::new(RuntimeConfig::default()).ok()?;
        let node = open_image("null:1M", &OpenConfig::default()).ok()?;
        Some(Env { rt, node })
    })();
}

/// What one input did: chains popped, requests that completed with
/// `VIRTIO_BLK_S_OK`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Chains popped.
    pub popped: usize,
    /// Requests that succeeded.
    pub ok: usize,
}

/// Runs the harness on `data`: byte 0 picks the queue size (a power of
/// two up to 256), byte 1 flags (bit 0: read-only disk, bit 1: event
/// index), bytes 2-3 the next index to pop; the rest is guest memory from
/// address 0 on (the ring lives there too), then on into the second region.
pub fn blk_chain(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    let Some((head, image)) = data.split_first_chunk::<4>() else {
        return out;
    };
    let size = 1u16 << (head[0] % 9);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l))) else {
        return out;
    };
    let mut rest = image;
    for (addr, len) in REGIONS {
        let n = rest.len().min(len);
        let _ = vm_memory::Bytes::write_slice(&mem, &rest[..n], GuestAddress(addr));
        rest = &rest[n..];
    }
    let Ok(mut q) = Queue::new(256) else { return out };
    q.set_size(size);
    let _ = q.try_set_desc_table_address(GuestAddress(DESC));
    let _ = q.try_set_avail_ring_address(GuestAddress(AVAIL));
    let _ = q.try_set_used_ring_address(GuestAddress(USED));
    q.set_event_idx(head[1] & 2 != 0);
    q.set_next_avail(u16::from_le_bytes([head[2], head[3]]));
    q.set_ready(true);
    let mut limits = Limits::new(SECTORS);
    limits.read_only = head[1] & 1 != 0;
    let dev = Device::new("fuzz");
    assert_eq!(ring::check(&q, &mem), Ok(()), "the harness's ring fits its memory");
    ENV.with(|env| {
        let Some(env) = env else { return };
        // A well-formed ring holds at most `size` chains.
        for _ in 0..=size {
            match ring::pending(&q, &mem) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Ok(chain) = ring::pop(&mut q, &mem) else { break };
            out.popped += 1;
            let head = chain.head_index();
            assert!(head < size, "ring::pop returned head {head} on a queue of {size}");
            let writable: u64 = chain
                .clone()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            let parsed = parse(chain, &mem, &limits);
            check_parsed(&parsed, &mem, &limits);
            let shared = std::rc::Rc::new(std::sync::Arc::new(mem.clone()));
            let c = env.rt.block_on(complete(
                &env.node,
                &shared,
                &dev,
                &crate::dirty::DirtyLog::new(),
                parsed,
            ));
            assert!(
                u64::from(c.used_len) <= writable,
                "used length {} for a chain of {writable} writable bytes",
                c.used_len
            );
            assert!(q.add_used(&mem, head, c.used_len).is_ok(), "used ring in memory");
            out.ok += usize::from(c.status == Some(VIRTIO_BLK_S_OK));
        }
    });
    out
}

/// What `parse` promises about a request it accepts.
fn check_parsed(p: &Parsed, mem: &GuestMemoryMmap<()>, limits: &Limits) {
    let Parsed::Request(r) = p else { return };
    assert!(mem.check_address(r.status).is_some(), "status byte in memory");
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &(addr, len) in &r.data {
        assert!(mem.check_range(addr, len), "buffer {addr:?}+{len} in memory");
        spans.push((addr.0, len as u64));
    }
    spans.sort_unstable();
    assert!(
        spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
        "buffers overlap: {spans:?}"
    );
    let total: u64 = spans.iter().map(|s| s.1).sum();
    match &r.kind {
        RequestKind::Read | RequestKind::Write => {
            assert_eq!(total, r.data_len, "buffers add up to the data length");
            assert!(
                r.sector + r.data_len / 512 <= limits.capacity_sectors,
                "inside the disk"
            );
            assert!(
                !(limits.read_only && r.kind == RequestKind::Write),
                "write to a read-only disk"
            );
        }
        RequestKind::Discard(v) | RequestKind::WriteZeroes(v) => {
            assert!(!limits.read_only);
            for s in v {
                assert!(
                    s.sector + u64::from(s.sectors) <= limits.capacity_sectors,
                    "segment inside the disk"
                );
            }
        }
        RequestKind::GetId => assert!(total >= 20),
        RequestKind::Flush => {}
    }
}
