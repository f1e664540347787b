//! Image locking that QEMU understands.
//!
//! QEMU's file driver (block/file-posix.c) takes open-file-description
//! (OFD) byte-range locks on every image file it opens. Each of QEMU's four
//! block permissions, bit `i` of [`Perms`], owns two bytes of the file:
//!
//! - a shared lock on byte `100 + i` says "I hold this permission";
//! - a shared lock on byte `200 + i` says "I do not let others hold it".
//!
//! An opener first takes shared locks on the bytes of what it holds and of
//! what it does not share, then tests (F_OFD_GETLK with a write lock) the
//! opposite bytes: `200 + i` for each permission it holds (does anyone
//! forbid it?) and `100 + i` for each it does not share (does anyone hold
//! it?). Taking before testing means two openers that race both see each
//! other. Spindle does the same with the same bytes, so QEMU and qemu-img
//! refuse an image Spindle uses and the other way round. Byte 0 is
//! libvirt's (virtlockd); nobody here touches it.
//!
//! OFD locks belong to the open file description: they last until the
//! [`File`](crate::File) that took them is closed, other descriptors of the
//! same file (opened and closed in between) leave them alone, and two opens
//! in one process conflict like two processes.

use crate::error::{Error, Result};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

/// QEMU's block permissions (`BLK_PERM_*`), as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reads see a consistent image.
    pub const CONSISTENT_READ: Perms = Perms(0x1);
    /// Writes that change what a reader sees.
    pub const WRITE: Perms = Perms(0x2);
    /// Writes that do not change what a reader sees.
    pub const WRITE_UNCHANGED: Perms = Perms(0x4);
    /// Changing the size.
    pub const RESIZE: Perms = Perms(0x8);
    /// Every permission (QEMU's `BLK_PERM_ALL`; QEMU dropped 0x10, graph-mod, in 6.2).
    pub const ALL: Perms = Perms(0xf);

    /// Both sets.
    pub const fn with(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }
    /// This set without `other`.
    pub const fn without(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }
    /// Whether every permission of `other` is in the set.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
    /// The permissions in the set, with their bit number and QEMU's name.
    fn each(self) -> impl Iterator<Item = (u64, &'static str)> {
        const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
        (0..NAMES.len())
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| (i as u64, NAMES[i]))
    }
}

/// First byte of the "holds permission i" locks.
pub const PERM_BASE: u64 = 100;
/// First byte of the "does not share permission i" locks.
pub const SHARED_BASE: u64 = 200;

/// What an open holds and what it lets others hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locking {
    /// Permissions this open holds.
    pub hold: Perms,
    /// Permissions others may hold at the same time.
    pub share: Perms,
}

/// Others may read, but not write or resize: what QEMU's qcow2 driver (and
/// a guest disk) lets others do.
const SHARE_READERS: Perms = Perms::ALL.without(Perms::WRITE).without(Perms::RESIZE);

impl Locking {
    /// No locks at all: holds nothing, shares everything.
    pub const NONE: Locking = Locking {
        hold: Perms::NONE,
        share: Perms::ALL,
    };
    /// A reader that keeps writers out (a read-only export or VM disk, a
    /// copy's source, a backing file under either).
    pub const READ: Locking = Locking {
        hold: Perms::CONSISTENT_READ,
        share: SHARE_READERS,
    };
    /// A writer (a VM's disk, qemu-img's writable opens, writable exports).
    pub const WRITE: Locking = Locking {
        hold: Perms::CONSISTENT_READ.with(Perms::WRITE).with(Perms::RESIZE),
        share: SHARE_READERS,
    };
    /// Metadata only: holds nothing but keeps writers out (`qemu-img info`
    /// of a qcow2 image).
    pub const METADATA: Locking = Locking {
        hold: Perms::NONE,
        share: SHARE_READERS,
    };
    /// Creating the file: the size must stay as set (QEMU's image creation).
    pub const CREATE: Locking = Locking {
        hold: Perms::WRITE.with(Perms::RESIZE),
        share: Perms::ALL.without(Perms::RESIZE),
    };

    /// [`READ`](Self::READ) or [`WRITE`](Self::WRITE).
    pub const fn for_access(read_only: bool) -> Locking {
        if read_only {
            Locking::READ
        } else {
            Locking::WRITE
        }
    }

    /// The same holdings, sharing everything (qemu-img's `-U`/`--force-share`):
    /// nobody is kept out and only a user that forbids what this holds is a
    /// conflict.
    pub const fn force_share(self) -> Locking {
        Locking {
            hold: self.hold,
            share: Perms::ALL,
        }
    }
}

/// Takes `locking`'s locks on `fd` (the open of `path`) and checks that no
/// other open conflicts. On error the caller closes `fd`, which drops what
/// was taken. Setup-time only: a few fcntl calls.
pub(crate) fn acquire(fd: BorrowedFd<'_>, path: &Path, locking: Locking) -> Result<()> {
    let unshared = Perms::ALL.without(locking.share);
    let lock_err = |byte: u64, source: io::Error| Error::Lock {
        path: path.to_path_buf(),
        byte,
        source,
    };
    let held = locking.hold.each().map(|(i, _)| PERM_BASE + i);
    let not_shared = unshared.each().map(|(i, _)| SHARED_BASE + i);
    for byte in held.chain(not_shared) {
        set_lock(fd, byte, libc::F_RDLCK as libc::c_short).map_err(|e| lock_err(byte, e))?;
    }
    // Does anyone forbid what this open holds?
    for (i, name) in locking.hold.each() {
        if locked_by_others(fd, SHARED_BASE + i).map_err(|e| lock_err(SHARED_BASE + i, e))? {
            return Err(Error::InUse {
                path: path.to_path_buf(),
                perm: name,
                held: false,
            });
        }
    }
    // Does anyone hold what this open does not share?
    for (i, name) in unshared.each() {
        if locked_by_others(fd, PERM_BASE + i).map_err(|e| lock_err(PERM_BASE + i, e))? {
            return Err(Error::InUse {
                path: path.to_path_buf(),
                perm: name,
                held: true,
            });
        }
    }
    Ok(())
}

/// Sets this open's locks to exactly `locking`'s, without testing for
/// conflicts: the bytes it needs are taken first, then those it no longer
/// needs are let go, so nothing is unlocked in between. For a caller that
/// knows no conflict can exist: it only gives up permissions or sharing,
/// or another open of its own holds a superset of these locks (a chain
/// reopened under a running export, docs/jobs.md).
pub(crate) fn set(fd: BorrowedFd<'_>, path: &Path, locking: Locking) -> Result<()> {
    let unshared = Perms::ALL.without(locking.share);
    let want: Vec<u64> = locking
        .hold
        .each()
        .map(|(i, _)| PERM_BASE + i)
        .chain(unshared.each().map(|(i, _)| SHARED_BASE + i))
        .collect();
    for &byte in &want {
        set_lock(fd, byte, libc::F_RDLCK as libc::c_short).map_err(|source| Error::Lock {
            path: path.to_path_buf(),
            byte,
            source,
        })?;
    }
    for byte in Perms::ALL
        .each()
        .flat_map(|(i, _)| [PERM_BASE + i, SHARED_BASE + i])
        .filter(|b| !want.contains(b))
    {
        let _ = set_lock(fd, byte, libc::F_UNLCK as libc::c_short);
    }
    Ok(())
}

/// Drops every lock this open holds, when the image is closed. Closing the
/// descriptor would drop them too, but only once the last reference to
/// the open goes, and io_uring's workers keep one for a moment after the
/// process (or the File) is gone: QEMU would see the image in use.
pub(crate) fn release(fd: BorrowedFd<'_>) {
    for base in [PERM_BASE, SHARED_BASE] {
        let mut fl = flock(base, libc::F_UNLCK as libc::c_short);
        fl.l_len = 8;
        let _ = fcntl_lock(fd, libc::F_OFD_SETLK, &mut fl);
    }
}

/// The bytes of `path` that any open file description holds OFD locks on,
/// sorted, from /proc/locks: what Spindle, QEMU and qemu-img hold. For
/// diagnostics and tests.
pub fn locked_bytes(path: &Path) -> io::Result<Vec<u64>> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path)?.ino();
    let dev = std::fs::metadata(path)?.dev();
    let mut v: Vec<u64> = std::fs::read_to_string("/proc/locks")?
        .lines()
        .filter_map(|l| {
            // "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 101": adjacent bytes
            // of one description show as one range.
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|x| *x == "OFDLCK")?;
            let mut id = f.get(at + 4)?.split(':');
            let major = u64::from_str_radix(id.next()?, 16).ok()?;
            let minor = u64::from_str_radix(id.next()?, 16).ok()?;
            let file: u64 = id.next()?.parse().ok()?;
            let start: u64 = f.get(at + 5)?.parse().ok()?;
            let end: u64 = f.get(at + 6)?.parse().ok()?;
            let same_dev = libc::makedev(major as u32, minor as u32) == dev;
            (file == ino && same_dev).then_some(start..=end)
        })
        .flatten()
        .collect();
    v.sort();
    Ok(v)
}

fn flock(byte: u64, kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is valid (and l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: fcntl with an OFD lock command reads (and for GETLK writes)
        // the flock struct we own, on a descriptor we borrow.
        if unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn set_lock(fd: BorrowedFd<'_>, byte: u64, kind: libc::c_short) -> io::Result<()> {
    fcntl_lock(fd, libc::F_OFD_SETLK, &mut flock(byte, kind))
}

/// Whether another open file description holds any lock on `byte` (an OFD
/// GETLK ignores the caller's own locks).
fn locked_by_others(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let mut fl = flock(byte, libc::F_WRLCK as libc::c_short);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{File, OpenOptions};
    use std::os::fd::FromRawFd;
    use std::path::PathBuf;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir =
            tempfile::tempdir_in(std::env::var("SPINDLE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    fn open(path: &Path, locking: Locking) -> Result<File> {
        let read_only = !locking.hold.contains(Perms::WRITE);
        File::open_with_lock(
            path,
            OpenOptions {
                read_only,
                ..Default::default()
            },
            locking,
        )
    }

    /// (held, perm) of an InUse error.
    fn conflict(r: Result<File>) -> (bool, &'static str) {
        match r {
            Err(Error::InUse { held, perm, .. }) => (held, perm),
            Err(e) => panic!("expected an in-use error, got {e}"),
            Ok(_) => panic!("expected an in-use error, the open succeeded"),
        }
    }

    /// A closed image lets go of its locks even while something else (an
    /// io_uring worker, here a dup) still holds the open description.
    #[test]
    fn closing_releases_locks_while_the_open_lives_on() {
        let (_d, path) = image();
        let f = open(&path, Locking::WRITE).unwrap();
        assert!(!locked_bytes(&path).unwrap().is_empty());
        // SAFETY: dup of a descriptor we own; the OwnedFd below closes it.
        let dup = unsafe { libc::dup(f.raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: dup returned a fresh descriptor that nothing else owns.
        let dup = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) };
        drop(f);
        assert_eq!(locked_bytes(&path).unwrap(), Vec::<u64>::new());
        open(&path, Locking::WRITE).expect("the image is free once closed");
        drop(dup);
    }

    #[test]
    fn takes_the_bytes_qemu_takes() {
        let (_d, path) = image();
        // What strace shows qemu-img 7.2 and qemu-storage-daemon lock.
        let w = open(&path, Locking::WRITE).unwrap();
        assert_eq!(locked_bytes(&path).unwrap(), [100, 101, 103, 201, 203]);
        drop(w);
        assert_eq!(
            locked_bytes(&path).unwrap(),
            Vec::<u64>::new(),
            "closing drops the locks"
        );
        let r = open(&path, Locking::READ).unwrap();
        assert_eq!(locked_bytes(&path).unwrap(), [100, 201, 203]);
        drop(r);
        let u = open(&path, Locking::READ.force_share()).unwrap();
        assert_eq!(locked_bytes(&path).unwrap(), [100]);
        drop(u);
        let _m = open(&path, Locking::METADATA).unwrap();
        assert_eq!(locked_bytes(&path).unwrap(), [201, 203]);
    }

    #[test]
    fn a_writer_keeps_writers_and_readers_out() {
        let (_d, path) = image();
        let _w = open(&path, Locking::WRITE).unwrap();
        // A second writer: the first does not share write.
        assert_eq!(conflict(open(&path, Locking::WRITE)), (false, "write"));
        // A reader keeps writers out, but the writer is in.
        assert_eq!(conflict(open(&path, Locking::READ)), (true, "write"));
        assert_eq!(conflict(open(&path, Locking::METADATA)), (true, "write"));
        // Sharing everything reads alongside.
        open(&path, Locking::READ.force_share()).unwrap();
        open(&path, Locking::NONE).unwrap();
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let (_d, path) = image();
        let _r = open(&path, Locking::READ).unwrap();
        let _r2 = open(&path, Locking::READ).unwrap();
        assert_eq!(conflict(open(&path, Locking::WRITE)), (false, "write"));
        assert_eq!(conflict(open(&path, Locking::CREATE)), (false, "write"));
        // A force-shared writer is still refused: readers do not share write.
        assert_eq!(conflict(open(&path, Locking::WRITE.force_share())), (false, "write"));
    }

    #[test]
    fn a_failed_open_leaves_no_locks_behind() {
        let (_d, path) = image();
        let r = open(&path, Locking::READ).unwrap();
        conflict(open(&path, Locking::WRITE));
        assert_eq!(locked_bytes(&path).unwrap(), [100, 201, 203]);
        drop(r);
        // Nothing of the refused writer is left: a writer gets in now.
        open(&path, Locking::WRITE).unwrap();
    }

    #[test]
    fn other_descriptors_of_the_file_do_not_drop_the_locks() {
        let (_d, path) = image();
        let _w = open(&path, Locking::WRITE).unwrap();
        // What qcow2's open does: read the header through a plain descriptor.
        let plain = std::fs::File::open(&path).unwrap();
        drop(plain);
        assert_eq!(conflict(open(&path, Locking::READ)), (true, "write"));
    }

    #[test]
    fn creating_keeps_the_size_fixed() {
        let (_d, path) = image();
        let _c = open(&path, Locking::CREATE).unwrap();
        // Writers would be let in (QEMU's create shares write), but not
        // their resize; readers keep the creator's write out.
        assert_eq!(conflict(open(&path, Locking::WRITE)), (false, "resize"));
        assert_eq!(conflict(open(&path, Locking::READ)), (true, "write"));
        // Sharing everything and holding nothing gets in.
        open(&path, Locking::NONE).unwrap();
    }

    #[test]
    fn creating_over_an_image_in_use_leaves_it_whole() {
        let (_d, path) = image();
        let _r = open(&path, Locking::READ).unwrap();
        let create = OpenOptions {
            create: true,
            ..Default::default()
        };
        assert_eq!(
            conflict(File::open_with_lock(&path, create, Locking::CREATE)),
            (false, "write")
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4096,
            "truncated before locking"
        );
    }
}
