//! The NBD client against a server that sends arbitrary bytes: shared by
//! the `nbd_client` cargo-fuzz target and the test suite. The first byte
//! picks what the client does (the handshake, or one request of a
//! transmission-phase connection); the rest is everything the server
//! says, after which it closes its side. Any outcome but a panic, a hang
//! or a write outside the request's buffer is acceptable.

use super::conn::{Conn, Sink};
use super::handshake::{handshake, Export};
use super::stream::Stream;
use super::wire::{cmd, tflag};
use super::NbdUri;
use spindle_io::{Runtime, RuntimeConfig, SgList};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

const SPEC: &str = "nbd+unix:///fuzz?socket=/nonexistent";
/// What a finished handshake said, for the transmission cases.
const EXPORT: Export = Export {
    size: 1 << 20,
    flags: tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA,
    min_block: 512,
    max_payload: 64 << 10,
    structured: true,
    context: Some(1),
};

/// Runs one case (see the module documentation); whether the client's
/// handshake or request succeeded.
pub fn server_bytes(data: &[u8]) -> bool {
    let Some((&mode, said)) = data.split_first() else {
        return false;
    };
    let Ok((client, mut server)) = UnixStream::pair() else {
        return false;
    };
    let said = said.to_vec();
    // The server's side: its bytes, then the end of its stream; whatever
    // the client sends is read and dropped so the client never blocks.
    let peer = std::thread::spawn(move || {
        let _ = server.write_all(&said);
        let _ = server.shutdown(std::net::Shutdown::Write);
        let _ = server.read_to_end(&mut Vec::new());
    });
    let ok = if mode % 5 == 0 {
        let uri = NbdUri::parse(SPEC).expect("the harness's URI parses");
        let mut s = Stream::Unix(client);
        let r = handshake(&mut s, &uri, SPEC);
        if let Ok(e) = &r {
            assert!(e.min_block > 0 && e.max_payload >= e.min_block, "unchecked block sizes");
        }
        r.is_ok()
    } else {
        request(mode, client)
    };
    let _ = peer.join();
    ok
}

fn request(mode: u8, client: UnixStream) -> bool {
    let Ok(rt) = Runtime::new(RuntimeConfig::default()) else {
        return false;
    };
    rt.block_on(async {
        let Ok(c) = Conn::new(Stream::Unix(client), SPEC, EXPORT) else {
            return false;
        };
        let (len, guard) = (8192usize, 4096usize);
        // The request's buffer sits between two guard regions that must
        // stay untouched.
        let whole = SgList::zeroed(guard + len + guard);
        whole.copy_from(&vec![0xa5; guard + len + guard]);
        let buf = whole.slice(guard, len);
        let status = Cell::new(None);
        let (kind, sink) = match mode % 5 {
            1 => (cmd::READ, Sink::Read(&buf)),
            2 => (cmd::BLOCK_STATUS, Sink::Status(&status)),
            3 => (cmd::WRITE, Sink::Nothing),
            _ => (cmd::FLUSH, Sink::Nothing),
        };
        let payload = (kind == cmd::WRITE).then_some(&buf);
        let n = if kind == cmd::FLUSH { 0 } else { len as u32 };
        let ok = c.call(kind, 0, 4096, n, payload, sink).await.is_ok();
        let bytes = whole.to_vec();
        assert!(
            bytes[..guard].iter().chain(&bytes[guard + len..]).all(|&b| b == 0xa5),
            "a reply wrote outside the request's buffer"
        );
        if let Some((_, n)) = status.get() {
            assert!(
                n > 0 && n <= len as u64,
                "an extent of {n} bytes for a {len}-byte request"
            );
        }
        ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/nbd_client");

    fn seeds() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = std::fs::read_dir(DIR)
            .expect("fuzz/corpus/nbd_client")
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn well_formed_seeds_are_served_and_error_replies_are_errors() {
        let seed = |name: &str| std::fs::read(format!("{DIR}/{name}")).unwrap();
        for good in ["handshake", "read_data_and_hole", "block_status", "write_simple"] {
            assert!(server_bytes(&seed(good)), "seed {good} was not served");
        }
        for bad in ["read_error", "flush_error"] {
            assert!(!server_bytes(&seed(bad)), "seed {bad} succeeded");
        }
    }

    #[test]
    fn the_seeds_their_prefixes_and_mutations_neither_panic_nor_hang() {
        let seeds = seeds();
        assert!(seeds.len() >= 5, "the seed corpus is missing");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for s in &seeds {
            server_bytes(s);
            for cut in (1..s.len()).step_by(7) {
                server_bytes(&s[..cut]);
            }
            for _ in 0..40 {
                let mut m = s.clone();
                for _ in 0..1 + next() % 4 {
                    if m.len() > 1 {
                        let i = 1 + (next() as usize) % (m.len() - 1);
                        m[i] = next() as u8;
                    }
                }
                server_bytes(&m);
            }
        }
    }
}
