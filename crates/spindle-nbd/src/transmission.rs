//! Transmission-phase requests: validation and reply encoding, over bytes
//! only (the connection does the socket I/O, [`crate::exec`] the image I/O).

use crate::handshake::Contexts;
use crate::proto::{self, cflag, cmd, errno, reply, Request, MAX_PAYLOAD};

/// What the export allows, as validation needs it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size.
    pub size: u64,
    /// Writes are refused with `EPERM`.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Selected metadata contexts.
    pub contexts: Contexts,
    /// `FAST_ZERO` was offered.
    pub fast_zero: bool,
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes; `df`: one data chunk.
    Read {
        /// Offset.
        offset: u64,
        /// Length (at most [`MAX_PAYLOAD`]).
        len: u32,
        /// Do not fragment.
        df: bool,
    },
    /// Write the `len` bytes of payload that follow.
    Write {
        /// Offset.
        offset: u64,
        /// Length (at most [`MAX_PAYLOAD`]).
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch a range.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
        /// Must not punch a hole.
        no_hole: bool,
        /// Fail with `ENOTSUP` unless fast.
        fast: bool,
    },
    /// Block status of the selected contexts.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length of interest.
        len: u32,
        /// One extent per context.
        req_one: bool,
    },
    /// Soft disconnect.
    Disconnect,
}

/// A request answered with an error without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The error on the wire.
    pub errno: u32,
    /// For humans (structured error chunks).
    pub why: &'static str,
    /// Payload bytes that follow the request and must be skipped unread.
    pub skip: u32,
}

fn refuse(errno: u32, why: &'static str, skip: u32) -> Refusal {
    Refusal { errno, why, skip }
}

/// Checks a request against the export and the negotiated features.
pub fn validate(r: &Request, l: &Limits) -> Result<Command, Refusal> {
    let skip = if r.kind == cmd::WRITE { r.len } else { 0 };
    let allowed = match r.kind {
        cmd::READ if l.structured => cflag::FUA | cflag::DF,
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | if l.fast_zero { cflag::FAST_ZERO } else { 0 },
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        cmd::DISC => 0,
        _ => return Err(refuse(errno::EINVAL, "unknown command", 0)),
    };
    if r.flags & !allowed != 0 {
        return Err(refuse(errno::EINVAL, "flags not allowed for this command", skip));
    }
    let fua = r.flags & cflag::FUA != 0;
    let writes = matches!(r.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && l.read_only {
        return Err(refuse(errno::EPERM, "the export is read-only", skip));
    }
    let too_long = if l.structured { errno::EOVERFLOW } else { errno::EINVAL };
    if matches!(r.kind, cmd::READ | cmd::WRITE | cmd::CACHE) && r.len > MAX_PAYLOAD {
        return Err(refuse(too_long, "longer than the maximum block size (32 MiB)", skip));
    }
    let in_range = r.offset.checked_add(r.len as u64).is_some_and(|end| end <= l.size);
    let ranged = !matches!(r.kind, cmd::FLUSH | cmd::DISC);
    if ranged && !in_range {
        let e = if matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(refuse(e, "past the end of the export", skip));
    }
    let (offset, len) = (r.offset, r.len);
    Ok(match r.kind {
        cmd::READ => Command::Read {
            offset,
            len,
            df: r.flags & cflag::DF != 0,
        },
        cmd::WRITE => Command::Write { offset, len, fua },
        cmd::FLUSH => Command::Flush,
        cmd::TRIM => Command::Trim { offset, len, fua },
        cmd::CACHE => Command::Cache { offset, len },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: r.flags & cflag::NO_HOLE != 0,
            fast: r.flags & cflag::FAST_ZERO != 0,
        },
        cmd::BLOCK_STATUS => {
            if !l.structured || l.contexts.is_empty() {
                return Err(refuse(errno::EINVAL, "no metadata context was selected", 0));
            }
            if len == 0 {
                return Err(refuse(errno::EINVAL, "block status of zero bytes", 0));
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: r.flags & cflag::REQ_ONE != 0,
            }
        }
        _ => Command::Disconnect,
    })
}

/// The header of a data chunk (`OFFSET_DATA`) carrying `len` bytes.
pub fn data_chunk(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let flags = if done { reply::FLAG_DONE } else { 0 };
    let mut b = proto::chunk_header(cookie, flags, reply::OFFSET_DATA, 8 + len).to_vec();
    b.extend_from_slice(&offset.to_be_bytes());
    b
}

/// A hole chunk (`OFFSET_HOLE`).
pub fn hole_chunk(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let flags = if done { reply::FLAG_DONE } else { 0 };
    let mut b = proto::chunk_header(cookie, flags, reply::OFFSET_HOLE, 12).to_vec();
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// The final chunk of a successful reply that sent everything already.
pub fn done_chunk(cookie: u64) -> Vec<u8> {
    proto::chunk_header(cookie, reply::FLAG_DONE, reply::NONE, 0).to_vec()
}

/// A final error chunk; with `offset`, `ERROR_OFFSET` (a read's failed range).
pub fn error_chunk(cookie: u64, errno: u32, why: &str, offset: Option<u64>) -> Vec<u8> {
    let why = &why.as_bytes()[..why.len().min(proto::MAX_STRING)];
    let (kind, extra) = match offset {
        Some(_) => (reply::ERROR_OFFSET, 8),
        None => (reply::ERROR, 0),
    };
    let len = 6 + why.len() as u32 + extra;
    let mut b = proto::chunk_header(cookie, reply::FLAG_DONE, kind, len).to_vec();
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(why.len() as u16).to_be_bytes());
    b.extend_from_slice(why);
    if let Some(o) = offset {
        b.extend_from_slice(&o.to_be_bytes());
    }
    b
}

/// A block status chunk for one context: `(length, flags)` extents.
pub fn block_status_chunk(cookie: u64, done: bool, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let flags = if done { reply::FLAG_DONE } else { 0 };
    let len = 4 + 8 * extents.len() as u32;
    let mut b = proto::chunk_header(cookie, flags, reply::BLOCK_STATUS, len).to_vec();
    b.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// The error reply to a refused or failed request: a simple reply, or a
/// structured error chunk once structured replies were negotiated.
pub fn error_reply(cookie: u64, structured: bool, errno: u32, why: &str) -> Vec<u8> {
    if structured {
        error_chunk(cookie, errno, why, None)
    } else {
        proto::simple_reply(cookie, errno).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(structured: bool, read_only: bool) -> Limits {
        Limits {
            size: 1 << 20,
            read_only,
            structured,
            contexts: Contexts {
                base: structured,
                depth: false,
            },
            fast_zero: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn oversized_requests_are_refused_and_their_payload_skipped() {
        let big = MAX_PAYLOAD + 1;
        let r = validate(&req(cmd::WRITE, 0, 0, big), &limits(true, false)).unwrap_err();
        assert_eq!((r.errno, r.skip), (errno::EOVERFLOW, big));
        let r = validate(&req(cmd::READ, 0, 0, big), &limits(false, false)).unwrap_err();
        assert_eq!((r.errno, r.skip), (errno::EINVAL, 0));
    }

    #[test]
    fn range_read_only_flags_and_unknown_commands() {
        let l = limits(true, false);
        let e = |r| validate(&r, &l).unwrap_err().errno;
        assert_eq!(e(req(cmd::READ, 0, (1 << 20) - 1, 2)), errno::EINVAL);
        assert_eq!(e(req(cmd::WRITE, 0, u64::MAX, 2)), errno::ENOSPC);
        assert_eq!(e(req(cmd::READ, cflag::REQ_ONE, 0, 2)), errno::EINVAL);
        assert_eq!(e(req(42, 0, 0, 0)), errno::EINVAL);
        let ro = limits(false, true);
        let r = validate(&req(cmd::WRITE, 0, 0, 512), &ro).unwrap_err();
        assert_eq!((r.errno, r.skip), (errno::EPERM, 512));
        // DF only with structured replies; block status only with a context.
        assert!(validate(&req(cmd::READ, cflag::DF, 0, 512), &ro).is_err());
        assert!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 512), &ro).is_err());
        assert_eq!(
            validate(&req(cmd::BLOCK_STATUS, cflag::REQ_ONE, 0, 512), &l),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true
            })
        );
    }

    #[test]
    fn chunks_have_the_spec_layout() {
        let e = error_chunk(5, errno::EIO, "bad", Some(4096));
        assert_eq!(proto::be16(&e[6..]), reply::ERROR_OFFSET);
        assert_eq!(proto::be32(&e[16..]) as usize, e.len() - 20);
        assert_eq!(proto::be32(&e[20..]), errno::EIO);
        assert_eq!(proto::be64(&e[e.len() - 8..]), 4096);
        let b = block_status_chunk(5, true, 1, &[(4096, 3), (512, 0)]);
        assert_eq!(proto::be32(&b[16..]), 20);
        let h = hole_chunk(5, false, 0, 7);
        assert_eq!((h.len(), proto::be16(&h[4..])), (32, 0));
    }
}
