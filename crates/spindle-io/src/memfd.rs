//! Anonymous memory files (`memfd_create(2)`): the buffers Spindle shares
//! with a frontend (the inflight buffer, a dirty log in tests), and text
//! handed to another process (the handover's configuration).
//!
//! A file shared with another process can be sealed against shrinking
//! (`F_SEAL_SHRINK`): a mapping past the end of a file that shrank kills
//! the process that touches it, so a file that arrives from elsewhere is
//! mapped only when [`seals`] says it cannot shrink.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// `F_SEAL_SHRINK`: the file cannot be made shorter.
pub const SEAL_SHRINK: i32 = libc::F_SEAL_SHRINK;
/// `F_SEAL_GROW`: the file cannot be made longer.
pub const SEAL_GROW: i32 = libc::F_SEAL_GROW;
/// `F_SEAL_SEAL`: no more seals can be added (nor removed: seals never can).
pub const SEAL_SEAL: i32 = libc::F_SEAL_SEAL;

/// A new, empty memfd named `name` (the name shows in /proc/PID/fd),
/// close-on-exec; `sealing` allows seals to be added to it later
/// (`MFD_ALLOW_SEALING`; without it the file can never be sealed).
pub fn create(name: &CStr, sealing: bool) -> io::Result<File> {
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a plain system call on a NUL-terminated name; the result is
    // checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A new memfd of `len` zero bytes with `seals` added (any of
/// [`SEAL_SHRINK`], [`SEAL_GROW`], [`SEAL_SEAL`]; 0 for none, and then
/// sealing stays allowed).
pub fn create_sized(name: &CStr, len: u64, seals: i32) -> io::Result<File> {
    let file = create(name, true)?;
    file.set_len(len)?;
    if seals != 0 {
        add_seals(&file, seals)?;
    }
    Ok(file)
}

/// Adds `seals` to `file` (`F_ADD_SEALS`).
pub fn add_seals(file: &File, seals: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of `file` (`F_GET_SEALS`); an error for a file that cannot
/// be sealed (not a memfd nor on tmpfs/hugetlbfs).
pub fn seals(file: &File) -> io::Result<i32> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// Whether `file` is a memfd sealed against shrinking, so that a shared
/// mapping of it stays backed whatever its other users do.
pub fn cannot_shrink(file: &File) -> bool {
    seals(file).is_ok_and(|s| s & SEAL_SHRINK != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn an_unsealed_memfd_holds_text_and_cannot_be_sealed() {
        let mut f = create(c"spindle-test-text", false).unwrap();
        f.write_all(b"export = 1\n").unwrap();
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "export = 1\n");
        // Without MFD_ALLOW_SEALING the file carries F_SEAL_SEAL from birth.
        assert_eq!(seals(&f).unwrap(), SEAL_SEAL);
        assert!(add_seals(&f, SEAL_SHRINK).is_err());
        assert!(!cannot_shrink(&f));
        let fd = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert!(fd.to_string_lossy().contains("memfd:spindle-test-text"), "{fd:?}");
    }

    #[test]
    fn a_sealed_memfd_keeps_its_size() {
        let f = create_sized(c"spindle-test-sealed", 8192, SEAL_SHRINK | SEAL_GROW).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8192);
        assert!(cannot_shrink(&f));
        assert_eq!(seals(&f).unwrap(), SEAL_SHRINK | SEAL_GROW);
        assert!(f.set_len(4096).is_err(), "shrunk");
        assert!(f.set_len(16384).is_err(), "grown");
        let mut b = vec![1u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0), "not zeroed");
        // F_SEAL_SEAL: no seal can be added afterwards.
        let f = create_sized(c"spindle-test-final", 4096, SEAL_SHRINK | SEAL_SEAL).unwrap();
        assert!(add_seals(&f, SEAL_GROW).is_err());
        assert!(f.set_len(8192).is_ok(), "only shrinking was sealed");
    }

    #[test]
    fn an_unsealed_sizable_memfd_and_other_files_may_shrink() {
        let f = create_sized(c"spindle-test-open", 4096, 0).unwrap();
        assert!(!cannot_shrink(&f));
        assert_eq!(seals(&f).unwrap(), 0);
        f.set_len(0).unwrap();
        // A regular file (no seals: an error, or F_SEAL_SEAL on tmpfs).
        let tmp = tempfile::tempfile_in("/var/tmp").unwrap();
        assert!(!cannot_shrink(&tmp));
    }
}
