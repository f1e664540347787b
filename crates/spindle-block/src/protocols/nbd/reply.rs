//! Checks of what a server sends in the transmission phase: every chunk
//! length, offset, cookie and descriptor is validated here before the
//! receiver reads, allocates or writes anything because of it. Pure
//! functions, so hostile input is tested without a peer.

use super::wire::{be16, be32, be64, cmd, errno, reply};

/// Longest error chunk accepted (a message is at most 4096 bytes).
pub const MAX_ERROR_CHUNK: u32 = 8 << 10;
/// Longest block status chunk accepted (the context id and 1024 descriptors;
/// a request asks for one with `NBD_CMD_FLAG_REQ_ONE`).
pub const MAX_STATUS_CHUNK: u32 = 4 + 8 * 1024;
/// Most chunks other than content chunks in one reply.
pub const MAX_OTHER_CHUNKS: usize = 64;

/// The request a reply answers.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// The request's cookie.
    pub cookie: u64,
    /// Its command.
    pub cmd: u16,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub len: u32,
}

/// What to read after a structured chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `NBD_REPLY_TYPE_NONE`: nothing.
    None,
    /// `OFFSET_DATA`: an 8-byte offset, then this many bytes of data.
    Data(u32),
    /// `OFFSET_HOLE`: 12 bytes.
    Hole,
    /// `BLOCK_STATUS`: this many bytes.
    Status(u32),
    /// An error chunk of this type and length.
    Error(u16, u32),
}

/// Checks a structured chunk header against the request.
pub fn check_chunk(e: &Expect, flags: u16, kind: u16, cookie: u64, len: u32) -> Result<Step, String> {
    if cookie != e.cookie {
        return Err(format!(
            "reply cookie {cookie:#x} does not match the request's {:#x}",
            e.cookie
        ));
    }
    let done = flags & reply::FLAG_DONE != 0;
    match kind {
        reply::NONE if len == 0 && done => Ok(Step::None),
        reply::NONE => Err(format!("a NONE chunk of length {len} (done: {done})")),
        reply::OFFSET_DATA if e.cmd == cmd::READ => {
            if len <= 8 || u64::from(len - 8) > u64::from(e.len) {
                return Err(format!("a data chunk of length {len} for a {}-byte read", e.len));
            }
            Ok(Step::Data(len - 8))
        }
        reply::OFFSET_HOLE if e.cmd == cmd::READ && len == 12 => Ok(Step::Hole),
        reply::BLOCK_STATUS if e.cmd == cmd::BLOCK_STATUS => {
            if len < 12 || !(len - 4).is_multiple_of(8) || len > MAX_STATUS_CHUNK {
                return Err(format!("a block status chunk of length {len}"));
            }
            Ok(Step::Status(len))
        }
        k if k & (1 << 15) != 0 => {
            if !(6..=MAX_ERROR_CHUNK).contains(&len) {
                return Err(format!("an error chunk of length {len}"));
            }
            Ok(Step::Error(k, len))
        }
        k => Err(format!("an unexpected chunk of type {k} (length {len})")),
    }
}

/// Where in the request's buffer `n` bytes at `offset` go; `Err` when
/// they reach outside the request or past what is left to cover.
pub fn place(e: &Expect, offset: u64, n: u64, covered: u64) -> Result<(usize, usize), String> {
    let start = offset.checked_sub(e.offset);
    match start {
        Some(s) if n > 0 && s.checked_add(n).is_some_and(|end| end <= u64::from(e.len)) => {
            if covered + n > u64::from(e.len) {
                return Err("content chunks overlap".into());
            }
            Ok((s as usize, n as usize))
        }
        _ => Err(format!(
            "{n} bytes at offset {offset} lie outside the request (offset {}, length {})",
            e.offset, e.len
        )),
    }
}

/// Offset and size of an `OFFSET_HOLE` payload.
pub fn hole(p: &[u8; 12]) -> (u64, u64) {
    (be64(p), u64::from(be32(&p[8..])))
}

/// The first extent of a `BLOCK_STATUS` payload for `context`: (flags,
/// length), the length capped to the request and rounded to the server's
/// block size. `Ok(None)` for another context's chunk.
pub fn first_extent(e: &Expect, context: u32, p: &[u8], min_block: u32) -> Result<Option<(u32, u64)>, String> {
    if p.len() < 12 {
        return Err("a block status chunk without descriptors".into());
    }
    if be32(p) != context {
        return Ok(None);
    }
    let len = u64::from(be32(&p[4..]));
    let flags = be32(&p[8..]);
    if len == 0 {
        return Err("a block status descriptor of length 0".into());
    }
    // Beyond the request: only the requested part is described.
    let len = len.min(u64::from(e.len));
    let min = u64::from(min_block);
    if len < u64::from(e.len) && len % min != 0 {
        // Unaligned: keep the aligned part; less than a block is data (a read tells).
        return Ok(Some(if len < min { (0, len) } else { (flags, len - len % min) }));
    }
    Ok(Some((flags, len)))
}

/// Error number and message of an error chunk.
pub fn error_chunk(kind: u16, p: &[u8]) -> Result<(u32, String), String> {
    let (code, mlen) = (be32(p), usize::from(be16(&p[4..])));
    let tail = if kind == reply::ERROR_OFFSET { 8 } else { 0 };
    if mlen + 6 + tail > p.len() {
        return Err(format!("an error message of {mlen} bytes in a {}-byte chunk", p.len()));
    }
    let msg = String::from_utf8_lossy(&p[6..6 + mlen]);
    Ok((code, crate::printable(msg.trim()).into_owned()))
}

/// The errno for an NBD error value, and its name.
pub fn errno_of(code: u32) -> (i32, String) {
    let known = match code {
        errno::EPERM => Some((libc::EPERM, "EPERM")),
        errno::EIO => Some((libc::EIO, "EIO")),
        errno::ENOMEM => Some((libc::ENOMEM, "ENOMEM")),
        errno::EINVAL => Some((libc::EINVAL, "EINVAL")),
        errno::ENOSPC => Some((libc::ENOSPC, "ENOSPC")),
        errno::EOVERFLOW => Some((libc::EOVERFLOW, "EOVERFLOW")),
        errno::ENOTSUP => Some((libc::ENOTSUP, "ENOTSUP")),
        errno::ESHUTDOWN => Some((libc::ESHUTDOWN, "ESHUTDOWN")),
        _ => None,
    };
    match known {
        Some((e, name)) => (e, format!("{name} ({})", std::io::Error::from_raw_os_error(e).kind())),
        None => (libc::EIO, format!("error {code}")),
    }
}

/// The command's name, for messages.
pub fn cmd_name(c: u16) -> &'static str {
    match c {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        _ => "command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Expect = Expect {
        cookie: 7,
        cmd: cmd::READ,
        offset: 1 << 20,
        len: 64 << 10,
    };
    const STATUS: Expect = Expect {
        cookie: 8,
        cmd: cmd::BLOCK_STATUS,
        offset: 0,
        len: 1 << 20,
    };

    #[test]
    fn hostile_chunk_headers_are_refused() {
        let done = reply::FLAG_DONE;
        // An oversized data chunk: more than the read asked for, or u32::MAX.
        assert!(check_chunk(&READ, 0, reply::OFFSET_DATA, 7, 8 + (64 << 10) + 1).is_err());
        assert!(check_chunk(&READ, 0, reply::OFFSET_DATA, 7, u32::MAX).is_err());
        assert!(check_chunk(&READ, 0, reply::OFFSET_DATA, 7, 8).is_err());
        assert_eq!(
            check_chunk(&READ, 0, reply::OFFSET_DATA, 7, 8 + 4096),
            Ok(Step::Data(4096))
        );
        // A wrong cookie, whatever the chunk.
        let e = check_chunk(&READ, done, reply::NONE, 99, 0).unwrap_err();
        assert!(e.contains("cookie"), "{e}");
        // Chunk types that do not belong to the command, and bad lengths.
        assert!(check_chunk(&READ, done, reply::BLOCK_STATUS, 7, 12).is_err());
        assert!(check_chunk(&STATUS, done, reply::OFFSET_DATA, 8, 100).is_err());
        assert!(check_chunk(&READ, 0, reply::OFFSET_HOLE, 7, 13).is_err());
        assert!(
            check_chunk(&READ, 0, reply::NONE, 7, 0).is_err(),
            "NONE must be the last chunk"
        );
        assert!(check_chunk(&STATUS, 0, reply::BLOCK_STATUS, 8, 4 + 8 * 100_000).is_err());
        assert!(check_chunk(&STATUS, 0, reply::BLOCK_STATUS, 8, 13).is_err());
        assert!(check_chunk(&READ, 0, reply::ERROR, 7, 1 << 30).is_err());
        assert!(check_chunk(&READ, 0, reply::ERROR, 7, 5).is_err());
        assert!(check_chunk(&READ, 0, 77, 7, 0).is_err(), "unknown non-error type");
        assert_eq!(check_chunk(&READ, 0, 0x8077, 7, 6), Ok(Step::Error(0x8077, 6)));
    }

    #[test]
    fn content_must_land_inside_the_request() {
        assert_eq!(place(&READ, 1 << 20, 4096, 0), Ok((0, 4096)));
        assert_eq!(place(&READ, (1 << 20) + 4096, 60 << 10, 4096), Ok((4096, 60 << 10)));
        assert!(place(&READ, (1 << 20) - 1, 10, 0).is_err(), "before the request");
        assert!(place(&READ, (1 << 20) + (64 << 10) - 1, 2, 0).is_err(), "past its end");
        assert!(place(&READ, u64::MAX, u64::MAX, 0).is_err(), "overflow");
        assert!(place(&READ, 1 << 20, 0, 0).is_err(), "an empty hole");
        assert!(
            place(&READ, 1 << 20, 4096, 63 << 10).is_err(),
            "more than the request in all"
        );
    }

    #[test]
    fn status_descriptors_are_capped_to_the_request() {
        let mut p = vec![0, 0, 0, 1];
        p.extend_from_slice(&(u32::MAX).to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        // Beyond the request: capped to it.
        assert_eq!(first_extent(&STATUS, 1, &p, 512), Ok(Some((3, 1 << 20))));
        // Another context's chunk is not ours.
        assert_eq!(first_extent(&STATUS, 2, &p, 512), Ok(None));
        // Length 0 would never advance.
        p[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(first_extent(&STATUS, 1, &p, 512).is_err());
        // Unaligned: the aligned part keeps its flags, a sliver reads as data.
        p[4..8].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(first_extent(&STATUS, 1, &p, 512), Ok(Some((3, 512))));
        p[4..8].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(first_extent(&STATUS, 1, &p, 512), Ok(Some((0, 100))));
        assert!(first_extent(&STATUS, 1, &p[..8], 512).is_err());
    }

    #[test]
    fn error_chunks_cannot_claim_more_than_they_hold() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad\n");
        assert_eq!(error_chunk(reply::ERROR, &p), Ok((5, "bad".into())));
        assert!(error_chunk(reply::ERROR_OFFSET, &p).is_err(), "no room for the offset");
        p[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(error_chunk(reply::ERROR, &p).is_err());
        assert_eq!(errno_of(errno::ENOSPC).0, libc::ENOSPC);
        assert_eq!(errno_of(4242), (libc::EIO, "error 4242".into()));
    }
}
