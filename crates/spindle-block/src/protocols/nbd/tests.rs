//! The client against a scripted hostile server on a socketpair: a thread
//! that answers the handshake or a request with crafted bytes.

use super::conn::{Conn, Sink};
use super::handshake::{handshake, Export};
use super::stream::Stream;
use super::wire::{self, cmd, rep, reply, tflag, Request, REQUEST_LEN};
use super::NbdUri;
use spindle_io::{Runtime, RuntimeConfig, SgList};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

const EXPORT: Export = Export {
    size: 1 << 20,
    flags: tflag::HAS_FLAGS,
    min_block: 512,
    max_payload: 64 << 10,
    structured: true,
    context: Some(1),
};

fn chunk(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A server that reads one request and answers `answer(request)`, then
/// holds the connection open until the client is gone.
fn server(answer: impl FnOnce(Request) -> Vec<u8> + Send + 'static) -> (UnixStream, JoinHandle<()>) {
    let (client, mut srv) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut h = [0u8; REQUEST_LEN];
        srv.read_exact(&mut h).unwrap();
        let req = Request::decode(&h).unwrap();
        let _ = srv.write_all(&answer(req));
        let _ = srv.read_to_end(&mut Vec::new());
    });
    (client, t)
}

/// Runs one request against `answer`; the error text, if any.
fn call(kind: u16, len: u32, answer: impl FnOnce(Request) -> Vec<u8> + Send + 'static) -> Result<Vec<u8>, String> {
    let (client, t) = server(answer);
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let status = Cell::new(None);
    let r = rt.block_on(async {
        let c = Conn::new(Stream::Unix(client), "nbd://test/x", EXPORT).unwrap();
        let buf = SgList::zeroed(len as usize);
        let sink = match kind {
            cmd::READ => Sink::Read(&buf),
            cmd::BLOCK_STATUS => Sink::Status(&status),
            _ => Sink::Nothing,
        };
        let r = c.call(kind, 0, 4096, len, None, sink).await;
        // After a protocol error the connection takes no more requests.
        if r.as_ref().is_err_and(|e| e.to_string().contains("protocol error")) {
            let again = c.call(cmd::FLUSH, 0, 0, 0, None, Sink::Nothing).await;
            assert!(again.is_err(), "a broken connection was used again");
        }
        r.map(|_| buf.to_vec()).map_err(|e| e.to_string())
    });
    t.join().unwrap();
    if let Some((flags, n)) = status.get() {
        return r.map(|_| [flags.to_be_bytes(), (n as u32).to_be_bytes()].concat());
    }
    r
}

#[test]
fn a_well_formed_read_reassembles_data_and_holes() {
    let got = call(cmd::READ, 8192, |r| {
        let mut data = (r.offset + 4096).to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 4096]);
        let mut hole = r.offset.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        [
            chunk(r.cookie, 0, reply::OFFSET_DATA, &data),
            chunk(r.cookie, reply::FLAG_DONE, reply::OFFSET_HOLE, &hole),
        ]
        .concat()
    })
    .unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0) && got[4096..].iter().all(|&b| b == 7));
}

#[test]
fn an_oversized_chunk_is_refused_without_reading_it() {
    let e = call(cmd::READ, 4096, |r| {
        let mut b = chunk(r.cookie, reply::FLAG_DONE, reply::OFFSET_DATA, &[]);
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        b
    })
    .unwrap_err();
    assert!(
        e.contains("protocol error") && e.contains("data chunk of length 4294967295"),
        "{e}"
    );
}

#[test]
fn a_wrong_cookie_breaks_the_connection() {
    let e = call(cmd::READ, 512, |r| {
        chunk(r.cookie + 1, reply::FLAG_DONE, reply::NONE, &[])
    })
    .unwrap_err();
    assert!(e.contains("cookie"), "{e}");
}

#[test]
fn a_data_chunk_outside_the_request_is_refused() {
    let e = call(cmd::READ, 512, |r| {
        let mut data = (r.offset + 256).to_be_bytes().to_vec();
        data.extend_from_slice(&[1u8; 512]);
        chunk(r.cookie, reply::FLAG_DONE, reply::OFFSET_DATA, &data)
    })
    .unwrap_err();
    assert!(e.contains("outside the request"), "{e}");
}

#[test]
fn a_read_reply_that_covers_too_little_is_refused() {
    let e = call(cmd::READ, 1024, |r| {
        let mut data = r.offset.to_be_bytes().to_vec();
        data.extend_from_slice(&[1u8; 512]);
        chunk(r.cookie, reply::FLAG_DONE, reply::OFFSET_DATA, &data)
    })
    .unwrap_err();
    assert!(e.contains("covered 512 of 1024"), "{e}");
}

#[test]
fn a_descriptor_beyond_the_request_is_capped() {
    let got = call(cmd::BLOCK_STATUS, 8192, |r| {
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(1u32 << 30).to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        chunk(r.cookie, reply::FLAG_DONE, reply::BLOCK_STATUS, &p)
    })
    .unwrap();
    assert_eq!(got, [3u32.to_be_bytes(), 8192u32.to_be_bytes()].concat());
}

#[test]
fn server_errors_name_the_export_and_the_error() {
    let e = call(cmd::FLUSH, 0, |r| {
        let mut p = 28u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"full");
        chunk(r.cookie, reply::FLAG_DONE, reply::ERROR, &p)
    })
    .unwrap_err();
    assert!(
        e.starts_with("nbd://test/x: NBD FLUSH") && e.contains("ENOSPC") && e.ends_with(": full"),
        "{e}"
    );
}

fn info_export(size: u64) -> Vec<u8> {
    let mut d = super::wire::info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&tflag::HAS_FLAGS.to_be_bytes());
    d
}

/// A server that sends the greeting, then `replies` to each option in turn.
fn handshake_against(replies: Vec<(u32, Vec<u8>)>) -> String {
    let (client, mut srv) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut g = wire::NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES).to_be_bytes());
        srv.write_all(&g).unwrap();
        let mut f = [0u8; 4];
        srv.read_exact(&mut f).unwrap();
        let mut h = [0u8; 16];
        let mut more = false;
        for (kind, data) in replies {
            // An INFO reply is followed by more replies to the same option.
            if !std::mem::replace(&mut more, kind == rep::INFO) {
                if srv.read_exact(&mut h).is_err() {
                    return;
                }
                let mut d = vec![0u8; wire::be32(&h[12..]) as usize];
                srv.read_exact(&mut d).unwrap();
            }
            let mut b = wire::REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&h[8..12]);
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(&data);
            let mut b2 = b.clone();
            if data.len() > 1000 {
                // Claims a huge reply; sends only the header.
                b2.truncate(20);
                b2[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
            }
            let _ = srv.write_all(&b2);
        }
    });
    let uri = NbdUri::parse("nbd+unix:///vm?socket=/x").unwrap();
    let mut s = Stream::Unix(client);
    let e = handshake(&mut s, &uri, "nbd+unix:///vm?socket=/x")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    drop(s);
    t.join().unwrap();
    e
}

#[test]
fn handshake_errors_are_clear_and_bounded() {
    let e = handshake_against(vec![
        (rep::ACK, vec![]),
        (rep::ACK, vec![]),
        (rep::ERR_UNKNOWN, b"no vm here".to_vec()),
    ]);
    assert!(e.contains("has no export 'vm' (no vm here)"), "{e}");
    let e = handshake_against(vec![(rep::ERR_TLS_REQD, vec![])]);
    assert!(e.contains("requires TLS"), "{e}");
    let e = handshake_against(vec![(rep::ACK, vec![0; 2000])]);
    assert!(e.contains("too long"), "{e}");
    let e = handshake_against(vec![(rep::ACK, vec![]), (rep::ACK, vec![]), (rep::ACK, vec![])]);
    assert!(e.contains("no export size"), "{e}");
    let huge = info_export(u64::MAX);
    let e = handshake_against(vec![
        (rep::ACK, vec![]),
        (rep::ACK, vec![]),
        (rep::INFO, huge),
        (rep::ACK, vec![]),
    ]);
    assert!(e.contains("size 18446744073709551615 is too large"), "{e}");
}
