use super::*;
use crate::{open_image, probe_storage, Format, Node, OpenConfig};
use spindle_io::{CacheMode, Locking, OpenOptions, Runtime};

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(std::env::var("SPINDLE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap()
}

/// `null:SIZE` is a raw image on the null storage: zeroes, writes
/// dropped, all of it a zero hole at its own offset, resizable.
#[test]
fn raw_over_null() {
    let rt = Runtime::new(Default::default()).unwrap();
    rt.block_on(async {
        let node = open_image("null:1M", &OpenConfig::default()).unwrap();
        assert!(matches!(&node, Node::Raw(r) if matches!(r.storage(), Storage::Null(_))));
        assert_eq!(
            (node.size(), node.info().format, node.storage().driver()),
            (1 << 20, "null", "null")
        );
        assert!(node.file().is_none() && !node.is_read_only());
        node.write_from(4096, &[0xaa; 8192], true).await.unwrap();
        let mut got = vec![0xffu8; 16384];
        node.read_into(0, &mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
        let e = node.map_extent(512, 1 << 20).await.unwrap();
        assert_eq!(
            (e.len, e.data, e.zero, e.present, e.offset),
            ((1 << 20) - 512, false, true, true, Some(512))
        );
        assert_eq!(
            node.block_status(0, 4096).await.unwrap(),
            (crate::BlockStatus::Zero, 4096)
        );
        node.resize(2 << 20, false).await.unwrap();
        assert_eq!(node.size(), 2 << 20);
        assert!(node.read_into(3 << 20, &mut got).await.is_err(), "past the end");
        node.close().await.unwrap();
    });
}

/// A file opened with O_DIRECT serves setup reads at any offset and
/// length, short only at the end of the file; probing reads through it.
#[test]
fn blocking_reads_of_a_file_at_any_alignment() {
    let dir = scratch();
    let path = dir.path().join("f.raw");
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let opts = OpenOptions {
            cache,
            read_only: true,
            create: false,
        };
        let Ok(f) = spindle_io::File::open_with_lock(&path, opts, Locking::NONE) else {
            assert_eq!(
                cache,
                CacheMode::None,
                "only O_DIRECT may be refused by the file system"
            );
            continue;
        };
        let s = Storage::File(f);
        for (off, len) in [(0usize, 4usize), (1, 511), (4095, 2), (513, 9000), (19_990, 10)] {
            let mut buf = vec![0u8; len];
            s.read_exact_blocking(off as u64, &mut buf).unwrap();
            assert_eq!(buf, data[off..off + len], "{cache:?} at {off}+{len}");
        }
        let mut tail = vec![0xeeu8; 100];
        assert_eq!(s.read_blocking(19_950, &mut tail).unwrap(), 50);
        assert_eq!((&tail[..50], tail[50]), (&data[19_950..], 0xee));
        assert!(s.read_exact_blocking(19_950, &mut tail).is_err());
        assert_eq!(s.read_blocking(40_000, &mut tail).unwrap(), 0);
        assert_eq!(probe_storage(&s).unwrap(), Format::Raw);
    }
}

/// Storage of a fixed size refuses what would grow it; null grows.
#[test]
fn fixed_and_growing_lengths() {
    let null = Storage::Null(null::Null::new(4096));
    null.grow_to(8192).unwrap();
    assert_eq!(null.len().unwrap(), 8192);
    let mut buf = [0xffu8; 16];
    assert_eq!(null.read_blocking(8190, &mut buf).unwrap(), 2);
    assert_eq!(buf[..3], [0, 0, 0xff]);
    assert!(fits(4096, 4096, 8192).is_ok() && fits(4097, 4096, 8192).is_err() && fits(u64::MAX, 2, 8192).is_err());
}
