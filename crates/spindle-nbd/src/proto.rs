//! Wire constants and fixed-size structures of the NBD protocol: the
//! shared ones live in `spindle_block::protocols::nbd::wire` (the client
//! uses them too) and are re-exported here; the reply encoders are the
//! server's own. Everything is big endian on the wire.

pub use spindle_block::protocols::nbd::wire::*;

/// A simple reply header (16 bytes).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (20 bytes).
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply: header and data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn reply_headers_have_the_spec_layout() {
        let s = simple_reply(7, errno::EIO);
        assert_eq!(be32(&s), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&s[4..]), 5);
        assert_eq!(be64(&s[8..]), 7);
        let c = chunk_header(9, reply::FLAG_DONE, reply::OFFSET_HOLE, 12);
        assert_eq!(be32(&c), STRUCTURED_REPLY_MAGIC);
        assert_eq!((be16(&c[4..]), be16(&c[6..])), (1, 2));
        assert_eq!((be64(&c[8..]), be32(&c[16..])), (9, 12));
        let o = option_reply(opt::GO, rep::ERR_UNKNOWN, b"x");
        assert_eq!(be64(&o), REPLY_MAGIC);
        assert_eq!(
            (be32(&o[8..]), be32(&o[12..]), be32(&o[16..]), o[20]),
            (opt::GO, rep::ERR_UNKNOWN, 1, b'x')
        );
    }
}
