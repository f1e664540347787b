//! Images whose metadata lies: Spindle refuses what QEMU refuses, marks the
//! image corrupt, and never writes onto its own metadata (issue 10, items
//! 1, 2 and 5). Each image is built by qemu-img and patched in place.

mod common;
use common::qcow2::*;
use common::*;
use std::path::Path;

fn spindle_fails(args: &[&str], want: &str) -> String {
    let o = run("spindle", args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "spindle {args:?} should fail; stderr: {err}");
    assert!(err.contains(want), "spindle {args:?}: expected '{want}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// qemu-img's own `info --output json` field.
fn qemu_info(img: &Path, key: &str) -> serde_json::Value {
    let out = ok("qemu-img", &["info", "-U", "--output", "json", p(img)]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()[key].clone()
}

/// The issue's reproducer: L2[0] points inside the L2 table itself.
#[test]
fn an_unaligned_data_offset_is_refused_and_nothing_lands_on_the_l2_table() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let img = at(&d, "u.qcow2");
    qcow2_create(&img, &[], Some("16M"));
    qemu_io(&img, &["write -P 0x22 4M 64k"]);
    let l2 = l2_table(&img, 0);
    poke(&img, l2, &0x8000_0000_0004_0200u64.to_be_bytes());
    let table = bytes(&img, l2, 65536);
    let raw = at(&d, "u.raw");
    spindle_fails(&["img", "convert", "-O", "raw", p(&img), p(&raw)], "not aligned");
    spindle_fails(&["img", "bench", "-w", "-c", "1", "-s", "4k", p(&img)], "corrupt");
    assert_eq!(bytes(&img, l2, 65536), table, "the L2 table was written to");
    assert!(corrupt_bit(&img), "the image must be marked corrupt");
    assert_eq!(qemu_info(&img, "format-specific")["data"]["corrupt"], true);
    // The data at 4 MiB is intact (QEMU reads it; only cluster 0 is bad).
    ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0x22 4M 64k", p(&img)]);
    // Later writes are refused outright, even to good clusters.
    spindle_fails(&["img", "bench", "-w", "-c", "1", "-o", "4M", p(&img)], "corrupt");
}

/// Aligned offsets that point at metadata: reads return those bytes (as
/// QEMU's do), writes are refused by the overlap check before they are
/// issued, and the image is marked corrupt.
#[test]
fn writes_onto_metadata_are_refused_by_the_overlap_check() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    // In place: L2[0] names the active L1 table's cluster, COPIED.
    let img = at(&d, "l1.qcow2");
    qcow2_create(&img, &[], Some("16M"));
    qemu_io(&img, &["write -P 0x22 4M 64k"]);
    let l1 = l1_offset(&img);
    poke(&img, l2_table(&img, 0), &((1u64 << 63) | l1).to_be_bytes());
    let before = bytes(&img, l1, 65536);
    spindle_fails(
        &["img", "bench", "-w", "-c", "1", "-s", "4k", p(&img)],
        "active L1 table",
    );
    assert_eq!(bytes(&img, l1, 65536), before, "the L1 table was written to");
    assert!(corrupt_bit(&img));

    // Allocating: the L2 table's refcount says free, so the allocator
    // hands out the L2 table's own cluster for new data.
    let img = at(&d, "rc.qcow2");
    qcow2_create(&img, &[], Some("16M"));
    qemu_io(&img, &["write -P 0x22 4M 64k"]);
    let l2 = l2_table(&img, 0);
    let block = be64(&img, refcount_table(&img));
    poke(&img, block + 2 * (l2 / 65536), &0u16.to_be_bytes());
    let table = bytes(&img, l2, 65536);
    spindle_fails(
        &["img", "bench", "-w", "-c", "1", "-s", "64k", "-o", "8M", p(&img)],
        "active L2 table",
    );
    assert_eq!(bytes(&img, l2, 65536), table, "the L2 table was written to");
    assert!(corrupt_bit(&img));
    ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0x22 4M 64k", p(&img)]);
}

/// Item 2: what QEMU refuses to read, Spindle refuses, and `check` calls
/// it a corruption.
#[test]
fn bad_subcluster_bitmaps_and_v2_zero_flags_are_corruptions() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let ext = at(&d, "ext.qcow2");
    qcow2_create(&ext, &["-o", "extended_l2=on"], Some("16M"));
    qemu_io(&ext, &["write -P 0x44 0 64k"]);
    // Entry 0's bitmap: subcluster 0 both allocated and zero.
    poke(
        &ext,
        l2_entry_at(&ext, 0, 2) + 8,
        &0x0000_0001_ffff_ffffu64.to_be_bytes(),
    );
    assert_eq!(run("qemu-img", &["check", p(&ext)]).status.code(), Some(2));
    let o = run("spindle", &["img", "check", p(&ext)]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stdout));
    spindle_fails(
        &["img", "convert", "-O", "raw", p(&ext), p(&at(&d, "ext.raw"))],
        "both allocated and zero",
    );
    // Unallocated cluster with an allocated subcluster.
    let ext2 = at(&d, "ext2.qcow2");
    qcow2_create(&ext2, &["-o", "extended_l2=on"], Some("16M"));
    qemu_io(&ext2, &["write -P 0x44 0 64k"]);
    poke(&ext2, l2_entry_at(&ext2, 1, 2) + 8, &1u64.to_be_bytes());
    assert_eq!(run("qemu-img", &["check", p(&ext2)]).status.code(), Some(2));
    assert_eq!(run("spindle", &["img", "check", p(&ext2)]).status.code(), Some(2));

    let v2 = at(&d, "v2.qcow2");
    qcow2_create(&v2, &["-o", "compat=0.10"], Some("16M"));
    qemu_io(&v2, &["write -P 0x22 0 64k"]);
    let e = l2_entry_at(&v2, 0, 1);
    poke(&v2, e, &(be64(&v2, e) | 1).to_be_bytes());
    let qemu_read = run("qemu-io", &["-r", "-f", "qcow2", "-c", "read 0 4k", p(&v2)]);
    assert!(String::from_utf8_lossy(&qemu_read.stdout).contains("Input/output error"));
    spindle_fails(
        &["img", "convert", "-O", "raw", p(&v2), p(&at(&d, "v2.raw"))],
        "compat=0.10",
    );
    // qemu-img check says clean here although every read fails; Spindle
    // reports it.
    let o = run("spindle", &["img", "check", p(&v2)]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Item 5: the smaller differences from QEMU.
#[test]
fn sizes_snapshots_and_backing_names_are_read_as_qemu_reads_them() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    // A virtual size that is not a multiple of 512 is rounded down.
    let odd = at(&d, "odd.qcow2");
    qcow2_create(&odd, &[], Some("16M"));
    poke(&odd, 24, &0x10000ffu64.to_be_bytes());
    let out = ok("spindle", &["img", "info", "--output", "json", p(&odd)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"], qemu_info(&odd, "virtual-size"));
    assert_eq!(v["virtual-size"], 16777216);

    // A snapshot with an unaligned L1 offset fails alone.
    let snap = at(&d, "snap.qcow2");
    qcow2_create(&snap, &[], Some("16M"));
    qemu_io(&snap, &["write -P 0x33 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "sn1", p(&snap)]);
    qemu_io(&snap, &["write -P 0x34 0 64k"]);
    let table = be64(&snap, 64);
    poke(&snap, table, &(be64(&snap, table) + 0x200).to_be_bytes());
    let info = ok("spindle", &["img", "info", p(&snap)]);
    assert!(info.contains("sn1"), "{info}");
    let raw = at(&d, "snap.raw");
    ok("spindle", &["img", "convert", "-O", "raw", p(&snap), p(&raw)]);
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x34 0 64k", p(&raw)]);
    spindle_fails(&["img", "snapshot", "-a", "sn1", p(&snap)], "invalid L1 table offset");
    assert_eq!(run("qemu-img", &["check", p(&snap)]).status.code(), Some(2));
    let o = run("spindle", &["img", "check", p(&snap)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not cluster aligned"));

    // backing_file_size 0: no backing file, as in QEMU.
    let base = at(&d, "base.raw");
    std::fs::write(&base, vec![0x55u8; 1 << 20]).unwrap();
    let top = at(&d, "top.qcow2");
    qcow2_create(&top, &["-b", p(&base), "-F", "raw"], Some("1M"));
    poke(&top, 16, &0u32.to_be_bytes());
    let v: serde_json::Value =
        serde_json::from_str(&ok("spindle", &["img", "info", "--output", "json", p(&top)])).unwrap();
    assert!(v.get("backing-filename").is_none(), "{v}");
    assert!(qemu_info(&top, "backing-filename").is_null());
    ok(
        "spindle",
        &["img", "convert", "-O", "raw", p(&top), p(&at(&d, "top.raw"))],
    );

    // A name with control bytes is printed escaped; a NUL ends it (as
    // QEMU reads a C string).
    let top2 = at(&d, "top2.qcow2");
    qcow2_create(&top2, &["-b", p(&base), "-F", "raw"], Some("1M"));
    let name_off = be64(&top2, 8);
    let evil = b"base.raw\x1b[2J\x07";
    poke(&top2, name_off, evil);
    poke(&top2, 16, &(evil.len() as u32).to_be_bytes());
    // Missing: the error names it, escaped.
    let o = run("spindle", &["img", "info", p(&top2)]);
    assert!(!o.status.success());
    assert!(!o.stderr.contains(&0x1b), "an escape byte reached the terminal");
    assert!(String::from_utf8_lossy(&o.stderr).contains("base.raw\\u{1b}[2J\\u{7}"));
    // Present (a legal file name): info prints it escaped.
    std::fs::copy(&base, d.path().join(std::str::from_utf8(evil).unwrap())).unwrap();
    let o = run("spindle", &["img", "info", p(&top2)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !o.stdout.contains(&0x1b), "{out}");
    assert!(out.contains("backing file: base.raw\\u{1b}[2J\\u{7}"), "{out}");
    poke(&top2, name_off, b"base.raw\0junk");
    poke(&top2, 16, &13u32.to_be_bytes());
    let v: serde_json::Value =
        serde_json::from_str(&ok("spindle", &["img", "info", "--output", "json", p(&top2)])).unwrap();
    assert_eq!(v["backing-filename"], "base.raw");

    // The corrupt-bit warning comes once.
    let c = at(&d, "c.qcow2");
    qcow2_create(&c, &[], Some("1M"));
    poke(&c, 72, &2u64.to_be_bytes());
    let err = spindle_fails(&["img", "bench", "-w", "-c", "1", p(&c)], "corrupt");
    assert_eq!(err.matches("opened read-only").count(), 1, "{err}");
}

/// Found by the mutation campaign (case 1166: c64k-zstd-rc8, "refcount[4]
/// 1 := 0"): an L2 table only a snapshot uses, with refcount 0, was handed
/// out for new data and overwritten, destroying the snapshot's mapping.
/// The overlap check covers snapshots' L2 tables too (QEMU's `all` mode).
#[test]
fn a_free_looking_snapshot_l2_table_is_not_overwritten() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let img = at(&d, "s.qcow2");
    qcow2_create(&img, &[], Some("16M"));
    qemu_io(&img, &["write -P 0x22 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    qemu_io(&img, &["write -P 0x23 0 4k"]); // the active L1 gets its own L2 table
    let snap_l1 = be64(&img, be64(&img, 64));
    let snap_l2 = be64(&img, snap_l1) & OFFSET_MASK;
    assert_ne!(snap_l2, l2_table(&img, 0), "the snapshot's L2 table is its own");
    let block = be64(&img, refcount_table(&img));
    poke(&img, block + 2 * (snap_l2 / 65536), &0u16.to_be_bytes());
    let table = bytes(&img, snap_l2, 65536);
    spindle_fails(
        &["img", "bench", "-w", "-c", "1", "-s", "64k", "-o", "8M", p(&img)],
        "L2 table of a snapshot",
    );
    assert_eq!(
        bytes(&img, snap_l2, 65536),
        table,
        "the snapshot's L2 table was written to"
    );
    assert!(corrupt_bit(&img));
    // The snapshot still reads as it was taken.
    let raw = at(&d, "s1.raw");
    ok("qemu-img", &["convert", "-l", "s1", "-O", "raw", p(&img), p(&raw)]);
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x22 0 64k", p(&raw)]);
}

/// Found by the mutation campaign (case 1331: c64k-rc32-backing,
/// "ext[1].length 384 := 392"): header extensions end where the backing
/// file name starts, end marker or not, as QEMU reads them; Spindle read
/// on into the name and refused the image.
#[test]
fn header_extensions_end_at_the_backing_file_name() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let base = at(&d, "base.qcow2");
    qcow2_create(&base, &[], Some("1M"));
    qemu_io(&base, &["write -P 0x61 0 1M"]);
    let img = at(&d, "top.qcow2");
    qcow2_create(&img, &["-b", "base.qcow2", "-F", "qcow2"], Some("1M"));
    qemu_io(&img, &["write -P 0x62 64k 64k"]);
    // Walk to the feature table and make it 8 bytes longer: the walk now
    // reaches the backing file name without an end marker.
    let mut off = be32(&img, 100) as u64;
    while be32(&img, off) != 0x6803_f857 {
        off += 8 + (be32(&img, off + 4) as u64).div_ceil(8) * 8;
    }
    let len = be32(&img, off + 4);
    poke(&img, off + 4, &(len + 8).to_be_bytes());
    assert_eq!(
        off + 8 + len as u64 + 8,
        be64(&img, 8),
        "the end marker sat just before the name"
    );
    let (ours, theirs) = (at(&d, "ours.raw"), at(&d, "theirs.raw"));
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&theirs)]);
    ok("spindle", &["img", "convert", "-O", "raw", p(&img), p(&ours)]);
    assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
}

/// Found by the qcow2_ops fuzz harness: with narrow refcounts, a snapshot
/// operation that would need a refcount above the maximum failed as a
/// corruption and marked a healthy image corrupt. It fails alone, as in
/// QEMU, and the image stays clean.
#[test]
fn a_refcount_overflow_is_refused_without_marking_the_image_corrupt() {
    need("qemu-img");
    let d = scratch();
    let img = at(&d, "rc2.qcow2");
    ok(
        "spindle",
        &["img", "create", "-f", "qcow2", "-o", "refcount_bits=2", p(&img), "1M"],
    );
    ok("spindle", &["img", "bench", "-w", "-c", "1", "-s", "64k", p(&img)]);
    ok("spindle", &["img", "snapshot", "-c", "a", p(&img)]);
    ok("spindle", &["img", "snapshot", "-c", "b", p(&img)]);
    // A third reference to the data cluster needs refcount 4 > 3.
    let err = spindle_fails(&["img", "snapshot", "-c", "c", p(&img)], "refcount_bits=2");
    assert!(!err.contains("corrupt"), "{err}");
    assert!(!corrupt_bit(&img), "a healthy image was marked corrupt");
    assert_clean(&img);
    ok("spindle", &["img", "bench", "-w", "-c", "1", "-s", "4k", p(&img)]);
}

/// A refcount table entry that points far past the end of the file: using
/// that block would read zeroes and write a block there (a 1 TiB sparse
/// file). It is a corruption instead, and the file does not grow.
#[test]
fn a_refcount_block_past_the_end_of_the_file_is_never_written() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let img = at(&d, "far.qcow2");
    // 512-byte clusters: refcount block 1 covers clusters 256 to 511, which
    // the writes below allocate.
    qcow2_create(&img, &["-o", "cluster_size=512"], Some("16M"));
    qemu_io(&img, &["write -P 0x22 0 64k"]);
    poke(&img, refcount_table(&img) + 8, &(1u64 << 40).to_be_bytes());
    let len = std::fs::metadata(&img).unwrap().len();
    assert_eq!(run("qemu-img", &["check", p(&img)]).status.code(), Some(2));
    spindle_fails(
        &["img", "bench", "-w", "-c", "8", "-s", "64k", "-o", "1M", p(&img)],
        "outside the image file",
    );
    let now = std::fs::metadata(&img).unwrap().len();
    assert!(now < len + (1 << 20), "the file grew from {len} to {now} bytes");
    ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0x22 0 64k", p(&img)]);
}
