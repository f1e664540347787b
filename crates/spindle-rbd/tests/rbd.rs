//! spindle-rbd against a real single-node Ceph cluster
//! (tests/ceph/cluster.sh, one per run of this binary), with the `rbd`
//! tool as the peer that judges the data.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{cluster, unique};
use spindle_rbd::{features, Cluster, ClusterOptions, Completion, CreateOptions, Error, EventQueue, Extent, OpKind};

const MIB: u64 = 1 << 20;

/// A deterministic pattern for `len` bytes, different per `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// Waits (in poll(2) on the eventfd, bounded) for `n` completions, by token.
fn wait_for(q: &mut EventQueue, n: usize) -> HashMap<u64, Completion> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = HashMap::new();
    while done.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{} of {n} requests completed in 60 s", done.len());
        for c in q.wait(Some(left)).expect("wait") {
            assert!(done.insert(c.token, c).is_none(), "token completed twice");
        }
    }
    done
}

fn ok(c: &Completion) -> usize {
    match &c.result {
        Ok(n) => *n,
        Err(e) => panic!("request {} ({:?}) failed: {e}", c.token, c.kind),
    }
}

#[test]
fn aio_writes_read_back_and_match_rbd_export() {
    let tc = cluster();
    let pool = tc.connect().pool("rbd", None).unwrap();
    let name = unique("aio");
    let size = 8 * MIB;
    pool.create_image(&name, size, &CreateOptions::default()).unwrap();
    let mut q = EventQueue::new(pool.open(&name).unwrap()).unwrap();
    let mut expect = vec![0u8; size as usize];

    // Owned buffers, several in flight at once.
    let writes = [
        (0u64, 4096usize),
        (3 * MIB + 512, 70_000),
        (4 * MIB - 4096, 8192),
        (size - 4096, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u8, len);
        expect[off as usize..off as usize + len].copy_from_slice(&data);
        q.write(i as u64, off, data).unwrap();
    }
    // A vectored write from caller-owned memory: two pieces, one request.
    let (a, b) = (pattern(100, 5000), pattern(101, 3192));
    let iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        },
    ];
    // SAFETY: `a` and `b` are neither freed nor written until the
    // completion for token 10 is reaped below.
    unsafe { q.writev(10, 6 * MIB, &iov) }.unwrap();
    expect[6 * MIB as usize..6 * MIB as usize + 5000].copy_from_slice(&a);
    expect[6 * MIB as usize + 5000..6 * MIB as usize + 8192].copy_from_slice(&b);
    assert_eq!(q.in_flight(), 5);
    let done = wait_for(&mut q, 5);
    for (i, &(_, len)) in writes.iter().enumerate() {
        assert_eq!(ok(&done[&(i as u64)]), len);
        assert_eq!(done[&(i as u64)].kind, OpKind::Write);
    }
    assert_eq!(ok(&done[&10]), 8192);
    drop((a, b));

    q.flush(20).unwrap();
    ok(&wait_for(&mut q, 1)[&20]);

    // Read everything back through the queue, in 1 MiB owned reads and
    // one vectored read into caller memory.
    for i in 0..7u64 {
        q.read(100 + i, i * MIB, vec![0xAA; MIB as usize]).unwrap();
    }
    let mut tail = vec![0u8; MIB as usize];
    let (t1, t2) = tail.split_at_mut(4096);
    let iov = [
        libc::iovec {
            iov_base: t1.as_mut_ptr().cast(),
            iov_len: t1.len(),
        },
        libc::iovec {
            iov_base: t2.as_mut_ptr().cast(),
            iov_len: t2.len(),
        },
    ];
    // SAFETY: `tail` is not touched until token 107 is reaped below.
    unsafe { q.readv(107, 7 * MIB, &iov) }.unwrap();
    let done = wait_for(&mut q, 8);
    let mut got = Vec::with_capacity(size as usize);
    for i in 0..7u64 {
        let c = &done[&(100 + i)];
        assert_eq!(ok(c), MIB as usize);
        got.extend_from_slice(c.buffer.as_ref().unwrap());
    }
    assert_eq!(ok(&done[&107]), MIB as usize);
    got.extend_from_slice(&tail);
    assert!(
        got == expect,
        "data read back through aio differs from what was written"
    );
    drop(q);

    let export = tc.rbd(&["export", &format!("rbd/{name}"), "-"]).stdout;
    assert_eq!(export.len(), expect.len());
    assert!(export == expect, "rbd export differs from what spindle-rbd wrote");
    pool.remove_image(&name).unwrap();
}

#[test]
fn rbd_import_data_reads_back_identically() {
    let tc = cluster();
    let name = unique("import");
    let data = pattern(7, (3 * MIB + 12345) as usize);
    let file = tc.dir.join(format!("{name}.raw"));
    std::fs::write(&file, &data).unwrap();
    tc.rbd(&["import", file.to_str().unwrap(), &format!("rbd/{name}")]);
    let pool = tc.connect().pool("rbd", None).unwrap();
    let image = pool.open_read_only(&name, None).unwrap();
    assert_eq!(image.size().unwrap(), data.len() as u64);
    let mut q = EventQueue::new(image).unwrap();
    q.read(1, 0, vec![0; data.len()]).unwrap();
    let c = wait_for(&mut q, 1).remove(&1).unwrap();
    assert_eq!(ok(&c), data.len());
    assert!(c.buffer.unwrap() == data, "imported data reads back differently");
    // A read-only image refuses writes before they reach librbd.
    let e = q.write(2, 0, vec![1; 512]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EROFS), "{e}");
    drop(q);
    pool.remove_image(&name).unwrap();
}

#[test]
fn resize_stat_and_features() {
    let tc = cluster();
    let pool = tc.connect().pool("rbd", None).unwrap();
    let name = unique("resize");
    let opts = CreateOptions {
        features: Some(features::LAYERING),
        order: Some(20),
    };
    pool.create_image(&name, 4 * MIB, &opts).unwrap();
    let image = pool.open(&name).unwrap();
    assert_eq!(image.features().unwrap(), features::LAYERING);
    let st = image.stat().unwrap();
    assert_eq!((st.size, st.object_size, st.objects, st.order), (4 * MIB, MIB, 4, 20));
    image.resize(12 * MIB + 4096).unwrap();
    assert_eq!(image.size().unwrap(), 12 * MIB + 4096);
    let info = String::from_utf8(tc.rbd(&["info", "--format", "json", &format!("rbd/{name}")]).stdout).unwrap();
    assert!(info.contains(&format!("\"size\":{}", 12 * MIB + 4096)), "{info}");
    image.resize(MIB).unwrap();
    assert_eq!(image.stat().unwrap().size, MIB);
    drop(image);
    pool.remove_image(&name).unwrap();
}

#[test]
fn snapshots_are_listed_and_open_read_only() {
    let tc = cluster();
    let pool = tc.connect().pool("rbd", None).unwrap();
    let name = unique("snap");
    pool.create_image(&name, 2 * MIB, &CreateOptions::default()).unwrap();
    let mut q = EventQueue::new(pool.open(&name).unwrap()).unwrap();
    assert!(q.image().snapshots().unwrap().is_empty());
    q.write(1, 0, vec![1; 4096]).unwrap();
    ok(&wait_for(&mut q, 1)[&1]);
    tc.rbd(&["snap", "create", &format!("rbd/{name}@first")]);
    q.write(2, 0, vec![2; 4096]).unwrap();
    ok(&wait_for(&mut q, 1)[&2]);
    q.image().resize(3 * MIB).unwrap();
    tc.rbd(&["snap", "create", &format!("rbd/{name}@second")]);

    let snaps = q.image().snapshots().unwrap();
    let names: Vec<(&str, u64)> = snaps.iter().map(|s| (s.name.as_str(), s.size)).collect();
    assert_eq!(names, [("first", 2 * MIB), ("second", 3 * MIB)]);
    assert!(snaps[0].id < snaps[1].id);

    let at_first = pool.open_read_only(&name, Some("first")).unwrap();
    assert!(at_first.is_read_only());
    assert_eq!(at_first.size().unwrap(), 2 * MIB);
    let mut sq = EventQueue::new(at_first).unwrap();
    sq.read(1, 0, vec![0; 4096]).unwrap();
    let c = wait_for(&mut sq, 1).remove(&1).unwrap();
    assert_eq!(
        c.buffer.unwrap(),
        vec![1; 4096],
        "the snapshot shows the data before it"
    );
    drop(sq);

    let e = pool.open_read_only(&name, Some("nope")).unwrap_err();
    assert_eq!(e.to_string(), format!("image rbd/{name}@nope not found"));
    drop(q);
    tc.rbd(&["snap", "purge", &format!("rbd/{name}")]);
    pool.remove_image(&name).unwrap();
}

#[test]
fn diff_iterate_reports_only_written_extents() {
    let tc = cluster();
    let pool = tc.connect().pool("rbd", None).unwrap();
    let name = unique("diff");
    let size = 64 * MIB;
    // Default features (exclusive-lock, object-map, fast-diff), 4 MiB
    // objects.
    pool.create_image(&name, size, &CreateOptions::default()).unwrap();
    let mut q = EventQueue::new(pool.open(&name).unwrap()).unwrap();
    assert!(q.image().features().unwrap() & features::FAST_DIFF != 0);
    assert_eq!(q.image().allocated(0, size, false).unwrap(), []);
    q.write(1, 8192, vec![3; 4096]).unwrap();
    q.write(2, 20 * MIB, vec![4; MIB as usize]).unwrap();
    q.write(3, 63 * MIB, vec![5; 512]).unwrap();
    wait_for(&mut q, 3).values().for_each(|c| assert!(ok(c) > 0));

    let ext = |offset, length| Extent { offset, length };
    let written = [ext(8192, 4096), ext(20 * MIB, MIB), ext(63 * MIB, 512)];
    // Exact extents come from the OSD's allocation map, memstore's being
    // coarser than the bytes written (it reports an object's data from
    // its start, e.g. 0..12288 for the first write): each write is covered
    // and nothing outside the objects written shows.
    let exact = q.image().allocated(0, size, false).unwrap();
    assert_eq!(exact.len(), 3, "{exact:?}");
    for (got, w) in exact.iter().zip(&written) {
        let object = w.offset / (4 * MIB) * (4 * MIB);
        assert!(got.offset >= object && got.offset <= w.offset, "{got:?} for {w:?}");
        assert!(got.offset + got.length >= w.offset + w.length, "{got:?} for {w:?}");
        assert!(got.offset + got.length <= object + 4 * MIB, "{got:?} for {w:?}");
    }
    let whole = q.image().allocated(0, size, true).unwrap();
    assert_eq!(whole, [ext(0, 4 * MIB), ext(20 * MIB, 4 * MIB), ext(60 * MIB, 4 * MIB)]);
    // A window.
    assert_eq!(q.image().allocated(16 * MIB, 8 * MIB, false).unwrap(), [exact[1]]);

    // Discard and write-zeroes: the ranges read as zeroes after.
    q.discard(4, 20 * MIB, MIB).unwrap();
    q.write_zeroes(5, 8192, 4096, false).unwrap();
    let done = wait_for(&mut q, 2);
    assert_eq!((done[&4].kind, done[&5].kind), (OpKind::Discard, OpKind::WriteZeroes));
    done.values().for_each(|c| assert_eq!(ok(c), 0));
    q.read(6, 20 * MIB, vec![9; MIB as usize]).unwrap();
    q.read(7, 0, vec![9; 16384]).unwrap();
    let done = wait_for(&mut q, 2);
    assert!(done[&6].buffer.as_ref().unwrap().iter().all(|&b| b == 0));
    assert!(done[&7].buffer.as_ref().unwrap().iter().all(|&b| b == 0));
    drop(q);
    pool.remove_image(&name).unwrap();
}

#[test]
fn exclusive_lock_keeps_a_second_client_out() {
    let tc = cluster();
    // Two connections: what two hosts look like.
    let pool_a = tc.connect().pool("rbd", None).unwrap();
    let pool_b = tc.connect().pool("rbd", None).unwrap();
    let name = unique("lock");
    let opts = CreateOptions {
        features: Some(features::LAYERING | features::EXCLUSIVE_LOCK),
        order: None,
    };
    pool_a.create_image(&name, 4 * MIB, &opts).unwrap();
    let a = pool_a.open(&name).unwrap();
    let b = pool_b.open(&name).unwrap();
    assert!(!a.is_lock_owner().unwrap());
    assert_eq!(a.lock_owners().unwrap(), Vec::<String>::new());

    a.lock_acquire().unwrap();
    assert!(a.is_lock_owner().unwrap());
    a.lock_acquire().unwrap(); // Already the owner: fine.
    let t = Instant::now();
    let e = b.lock_acquire().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(20), "acquire took {:?}", t.elapsed());
    assert!(matches!(e, Error::Image { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("image rbd/{name}")), "{e}");
    assert!(!b.is_lock_owner().unwrap());
    assert_eq!(b.lock_owners().unwrap().len(), 1);

    // Writes from the other client do not get the lock handed over either.
    let mut qb = EventQueue::new(b).unwrap();
    qb.write(1, 0, vec![1; 4096]).unwrap();
    let c = wait_for(&mut qb, 1).remove(&1).unwrap();
    let errno = c.result.as_ref().map(drop).unwrap_err().errno();
    assert_eq!(errno, Some(libc::EROFS), "{:?}", c.result);

    a.lock_release().unwrap();
    assert!(!a.is_lock_owner().unwrap());
    qb.image().lock_acquire().unwrap();
    assert!(qb.image().is_lock_owner().unwrap());
    qb.write(2, 0, vec![2; 4096]).unwrap();
    ok(&wait_for(&mut qb, 1)[&2]);
    // Now the first client is the one kept out.
    assert!(a.lock_acquire().is_err());
    qb.image().lock_release().unwrap();
    drop((a, qb));
    pool_a.remove_image(&name).unwrap();

    // Without the feature there is no lock to take.
    let plain = unique("nolock");
    pool_a
        .create_image(
            &plain,
            MIB,
            &CreateOptions {
                features: Some(features::LAYERING),
                order: None,
            },
        )
        .unwrap();
    let e = pool_a.open(&plain).unwrap().lock_acquire().unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    pool_a.remove_image(&plain).unwrap();
}

#[test]
fn not_found_errors_name_pool_and_image() {
    let tc = cluster();
    let c = tc.connect();
    let pool = c.pool("rbd", None).unwrap();
    let e = pool.open("no-such-image").unwrap_err();
    assert_eq!(e.to_string(), "image rbd/no-such-image not found");
    assert!(matches!(
        pool.remove_image("no-such-image"),
        Err(Error::ImageNotFound { .. })
    ));
    let e = c.pool("no-such-pool", None).unwrap_err();
    assert!(matches!(e, Error::PoolNotFound { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with("pool no-such-pool not found on cluster "),
        "{e}"
    );
}

#[test]
fn namespaces_hold_their_own_images() {
    let tc = cluster();
    let ns = unique("ns");
    tc.rbd(&["namespace", "create", &format!("rbd/{ns}")]);
    let c = tc.connect();
    let pool = c.pool("rbd", Some(&ns)).unwrap();
    assert_eq!(pool.name(), format!("rbd/{ns}"));
    pool.create_image("inns", MIB, &CreateOptions::default()).unwrap();
    let listed = String::from_utf8(tc.rbd(&["ls", &format!("rbd/{ns}")]).stdout).unwrap();
    assert_eq!(listed.trim(), "inns");
    let e = c.pool("rbd", None).unwrap().open("inns").unwrap_err();
    assert_eq!(e.to_string(), "image rbd/inns not found");
    assert_eq!(pool.open("inns").unwrap().spec(), format!("rbd/{ns}/inns"));
    pool.remove_image("inns").unwrap();
    tc.rbd(&["namespace", "remove", &format!("rbd/{ns}")]);
}

#[test]
fn a_cluster_that_is_down_errors_within_the_timeout() {
    // Something that is surely no monitor: a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mon = format!("127.0.0.1:{port}");
    let opts = ClusterOptions {
        mon_host: Some(mon.clone()),
        connect_timeout: Some(Duration::from_secs(3)),
        op_timeout: Some(Duration::from_secs(3)),
        // No conf or keyring: cephx would fail at once for the missing key;
        // auth none makes the client go looking for the monitor.
        options: vec![("auth_client_required".into(), "none".into())],
        ..Default::default()
    };
    let t = Instant::now();
    let e = Cluster::connect(&opts).unwrap_err();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "connect to a down cluster took {took:?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "failed before trying for the timeout: {e}"
    );
    assert_eq!(e.errno(), Some(libc::ETIMEDOUT), "{e}");
    assert!(e.to_string().starts_with(&format!("cluster {mon}: connect: ")), "{e}");
}

#[test]
fn cephx_user_and_keyring_without_a_conf() {
    let tc = cluster();
    let user = unique("spindle").replace('-', "_");
    let keyring = tc.dir.join(format!("{user}.keyring"));
    tc.ceph(&[
        "auth",
        "get-or-create",
        &format!("client.{user}"),
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=rbd",
        "-o",
        keyring.to_str().unwrap(),
    ]);
    let opts = ClusterOptions {
        mon_host: Some(tc.mon_host()),
        user: Some(user.clone()),
        keyring: Some(keyring),
        connect_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let c = Cluster::connect(&opts).unwrap();
    let pool = c.pool("rbd", None).unwrap();
    let name = unique("cephx");
    pool.create_image(&name, MIB, &CreateOptions::default()).unwrap();
    assert_eq!(pool.open(&name).unwrap().size().unwrap(), MIB);
    pool.remove_image(&name).unwrap();

    // A keyring without the user's key: refused at once, not after a
    // timeout.
    let empty = tc.dir.join(format!("{user}.empty"));
    std::fs::write(&empty, "").unwrap();
    let t = Instant::now();
    let e = Cluster::connect(&ClusterOptions {
        keyring: Some(empty),
        ..opts
    })
    .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(matches!(e, Error::Cluster { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("cluster {}: connect: ", tc.mon_host())),
        "{e}"
    );
}
