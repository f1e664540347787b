use super::*;
use std::io::Write;

const CAPS: Caps = Caps {
    queues: 4,
    queue_size: 256,
};

fn ask(queues: u16, size: u16) -> VhostUserInflight {
    VhostUserInflight::new(0, 0, queues, size)
}

/// A buffer as GET_INFLIGHT_FD hands it out, adopted as SET_INFLIGHT_FD
/// brings it back.
fn region(queues: u16, size: u16) -> (Region, File, VhostUserInflight) {
    let (file, desc) = create(&ask(queues, size), CAPS).unwrap();
    let again = file.try_clone().unwrap();
    (Region::adopt(file, &desc, CAPS).unwrap(), again, desc)
}

/// The buffer again, as a restarted backend gets it.
fn readopt(file: &File, desc: &VhostUserInflight) -> Result<Region, Refused> {
    Region::adopt(file.try_clone().unwrap(), desc, CAPS)
}

#[test]
fn the_layout_is_the_specs_split_ring_layout() {
    // 16-byte header and 16 bytes per descriptor, each queue 64-aligned.
    assert_eq!(queue_region_size(1), 64);
    assert_eq!(queue_region_size(128), 16 + 16 * 128 + 48);
    assert_eq!(region_size(2, 256), 2 * (16 * 256 + 64));
    let (file, desc) = create(&ask(2, 128), CAPS).unwrap();
    assert_eq!(
        (desc.mmap_size, desc.mmap_offset, desc.num_queues, desc.queue_size),
        (region_size(2, 128), 0, 2, 128)
    );
    assert_eq!(file.metadata().unwrap().len(), desc.mmap_size);
    // Sealed: the frontend cannot shrink it under the backend.
    assert!(file.set_len(10).is_err());
}

#[test]
fn a_fresh_buffer_starts_empty_and_records_header_and_entries() {
    let (r, _, _) = region(1, 16);
    assert_eq!(r.load::<u16>(0, H_VERSION), 0, "never used");
    assert_eq!(
        r.start(0, 16, 7).unwrap(),
        Resume {
            heads: vec![],
            counter: 1
        }
    );
    assert_eq!(r.load::<u16>(0, H_VERSION), VERSION);
    assert_eq!(r.load::<u16>(0, H_DESC_NUM), 16);
    assert_eq!(r.load::<u16>(0, H_USED_IDX), 7);
    assert!(r.mark(0, 3, 1));
    assert_eq!(r.load::<u8>(0, r.desc(3, D_INFLIGHT)), 1);
    assert_eq!(r.load::<u64>(0, r.desc(3, D_COUNTER)), 1);
    assert!(!r.mark(0, 3, 2), "a chain in flight cannot be taken twice");
    assert!(!r.mark(0, 16, 2), "not a descriptor");
    r.complete(0, &[3u16], |h| *h, || (1, 8));
    assert_eq!(r.load::<u8>(0, r.desc(3, D_INFLIGHT)), 0);
    assert_eq!(r.load::<u16>(0, H_USED_IDX), 8);
    assert_eq!(r.load::<u16>(0, H_LAST_BATCH_HEAD), 3);
}

#[test]
fn chains_still_in_flight_are_resubmitted_in_the_order_they_were_taken() {
    let (r, file, desc) = region(2, 16);
    r.start(1, 16, 0).unwrap();
    // Taken in the order 9, 2, 14, 5, 0; completed out of order: 2, 5.
    for (c, h) in [9u16, 2, 14, 5, 0].into_iter().enumerate() {
        assert!(r.mark(1, h, 100 + c as u64));
    }
    r.complete(1, &[2u16, 5], |h| *h, || (2, 2));
    // A new backend (kill -9 and restart) gets the buffer back.
    drop(r);
    let r = readopt(&file, &desc).unwrap();
    let resume = r.start(1, 16, 2).unwrap();
    assert_eq!(
        resume,
        Resume {
            heads: vec![9, 14, 0],
            counter: 105
        }
    );
    // Queue 0 was never started: it starts empty.
    assert_eq!(r.start(0, 16, 0).unwrap().heads, Vec::<u16>::new());
}

/// Completes `heads` of queue `q` as a backend that is killed while it
/// publishes them: some of their used entries and the used index may have
/// reached the ring, nothing after that did.
fn complete_and_die(r: &Region, q: usize, heads: &[u16]) {
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        r.complete(
            q,
            heads,
            |h| *h,
            || -> (usize, u16) { panic!("killed after publishing") },
        )
    }));
    assert!(died.is_err());
}

#[test]
fn the_last_batch_is_repaired_from_the_rings_used_index() {
    for k in 0..=4u16 {
        let (r, file, desc) = region(1, 8);
        r.start(0, 8, 40).unwrap();
        for (c, h) in [6u16, 1, 4, 7, 2].into_iter().enumerate() {
            assert!(r.mark(0, h, c as u64 + 1));
        }
        // One batch of four (completed out of order); the backend dies
        // with `k` of them on the used ring.
        let batch = [4u16, 6, 2, 1];
        complete_and_die(&r, 0, &batch);
        drop(r);
        let r = readopt(&file, &desc).unwrap();
        let resume = r.start(0, 8, 40 + k).unwrap();
        // The first k are done; the rest of the batch and 7 (never
        // completed) are resubmitted, oldest first.
        let mut want: Vec<(u64, u16)> = batch[k as usize..]
            .iter()
            .chain(&[7])
            .map(|&h| ([6u16, 1, 4, 7, 2].iter().position(|&x| x == h).unwrap() as u64 + 1, h))
            .collect();
        want.sort();
        assert_eq!(
            resume.heads,
            want.iter().map(|&(_, h)| h).collect::<Vec<_>>(),
            "{k} published"
        );
        assert_eq!(r.load::<u16>(0, H_USED_IDX), 40 + k);
    }
}

#[test]
fn a_used_index_from_another_ring_is_refused() {
    let (r, _, _) = region(1, 8);
    r.start(0, 8, 100).unwrap();
    assert_eq!(
        r.start(0, 8, 100 + 9),
        Err(Refused::Batch {
            queue: 0,
            ring: 109,
            tracked: 100
        })
    );
    // Behind it: the driver's ring started afresh, not this buffer's.
    assert!(matches!(r.start(0, 8, 99), Err(Refused::Batch { .. })));
}

#[test]
fn a_ring_larger_than_the_buffer_or_smaller_than_a_chain_in_flight_is_refused() {
    let (r, _, _) = region(1, 8);
    assert!(matches!(
        r.start(0, 16, 0),
        Err(Refused::RingSize {
            ring: 16,
            desc_num: 8,
            ..
        })
    ));
    assert!(
        matches!(r.start(1, 8, 0), Err(Refused::RingSize { .. })),
        "no such queue"
    );
    r.start(0, 8, 0).unwrap();
    assert!(r.mark(0, 6, 1));
    assert!(matches!(r.start(0, 4, 0), Err(Refused::RingSize { ring: 4, .. })));
    assert_eq!(r.start(0, 8, 0).unwrap().heads, vec![6]);
}

#[test]
fn requests_outside_the_devices_limits_are_refused() {
    for (q, s, want) in [
        (0, 16, Refused::Queues { asked: 0, max: 4 }),
        (5, 16, Refused::Queues { asked: 5, max: 4 }),
        (1, 0, Refused::QueueSize { asked: 0, max: 256 }),
        (1, 512, Refused::QueueSize { asked: 512, max: 256 }),
    ] {
        assert_eq!(create(&ask(q, s), CAPS).err(), Some(want.clone()));
        let (file, _) = create(&ask(1, 16), CAPS).unwrap();
        let desc = VhostUserInflight::new(region_size(q, s), 0, q, s);
        assert_eq!(Region::adopt(file, &desc, CAPS).err(), Some(want));
    }
}

#[test]
fn a_buffer_of_the_wrong_size_offset_or_file_is_refused() {
    let (file, desc) = create(&ask(2, 16), CAPS).unwrap();
    let mut d = desc;
    d.mmap_size -= 64;
    let e = readopt(&file, &d).err().unwrap();
    assert_eq!(
        e,
        Refused::Size {
            got: desc.mmap_size - 64,
            want: desc.mmap_size
        }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "its size is {} bytes; the layout needs {}",
            desc.mmap_size - 64,
            desc.mmap_size
        )
    );
    let mut d = desc;
    d.mmap_offset = 100;
    assert_eq!(readopt(&file, &d).err(), Some(Refused::Offset(100)));
    let mut d = desc;
    d.mmap_offset = 4096;
    assert_eq!(
        readopt(&file, &d).err(),
        Some(Refused::FileTooSmall {
            len: desc.mmap_size,
            end: 4096 + desc.mmap_size
        })
    );
    d.mmap_offset = !4095;
    assert!(matches!(readopt(&file, &d).err(), Some(Refused::FileTooSmall { .. })));
    // A file the frontend could shrink under the backend.
    let mut plain = tempfile::tempfile().unwrap();
    plain.write_all(&vec![0; desc.mmap_size as usize]).unwrap();
    assert_eq!(Region::adopt(plain, &desc, CAPS).err(), Some(Refused::NotSealed));
}

/// Adopting the buffer after `poke` wrote into queue 1's region.
fn adopt_after(poke: impl Fn(&Region)) -> Result<Region, Refused> {
    let (r, file, desc) = region(2, 8);
    r.start(0, 8, 0).unwrap();
    r.start(1, 8, 0).unwrap();
    poke(&r);
    drop(r);
    readopt(&file, &desc)
}

#[test]
fn every_malformed_queue_header_or_entry_is_refused_by_name() {
    assert!(adopt_after(|_| {}).is_ok());
    type Poke = Box<dyn Fn(&Region)>;
    let cases: Vec<(Poke, Refused, &str)> = vec![
        (
            Box::new(|r| r.store(1, H_VERSION, 2u16)),
            Refused::Version { queue: 1, version: 2 },
            "queue 1: version 2 (only 1 is known)",
        ),
        (
            Box::new(|r| r.store(1, H_FEATURES, 4u64)),
            Refused::Features { queue: 1, features: 4 },
            "queue 1: unknown features 0x4",
        ),
        (
            Box::new(|r| r.store(1, H_DESC_NUM, 16u16)),
            Refused::DescNum {
                queue: 1,
                desc_num: 16,
                want: 8,
            },
            "queue 1: desc_num 16 is not the queue size 8",
        ),
        (
            Box::new(|r| r.store(1, H_LAST_BATCH_HEAD, 8u16)),
            Refused::Index {
                queue: 1,
                field: "last_batch_head",
                entry: None,
                value: 8,
                desc_num: 8,
            },
            "queue 1: last_batch_head 8 is not below 8",
        ),
        (
            Box::new(|r| r.store(1, r.desc(5, D_NEXT), 300u16)),
            Refused::Index {
                queue: 1,
                field: "next",
                entry: Some(5),
                value: 300,
                desc_num: 8,
            },
            "queue 1: entry 5: next 300 is not below 8",
        ),
        (
            Box::new(|r| r.store(1, r.desc(2, D_INFLIGHT), 7u8)),
            Refused::Flag {
                queue: 1,
                entry: 2,
                value: 7,
            },
            "queue 1: entry 2: inflight flag 7",
        ),
        (
            Box::new(|r| {
                assert!(r.mark(1, 2, 9));
                assert!(r.mark(1, 4, 9));
            }),
            Refused::Counter { queue: 1, counter: 9 },
            "queue 1: two chains in flight share counter 9",
        ),
    ];
    for (poke, want, msg) in cases {
        let e = adopt_after(poke).err();
        assert_eq!(e, Some(want));
        assert_eq!(e.unwrap().to_string(), msg);
    }
}

#[test]
fn a_buffer_changed_after_adoption_is_checked_again_at_ring_start() {
    let (r, _, _) = region(1, 8);
    r.start(0, 8, 0).unwrap();
    r.store(0, r.desc(3, D_NEXT), 99u16);
    assert!(matches!(r.start(0, 8, 0), Err(Refused::Index { value: 99, .. })));
}
