//! Harnesses shared by the fuzz targets in `fuzz/` and the test suite
//! (docs/fuzzing.md). Each panics when an invariant breaks.

use crate::protocol::MAX_LINE;
use crate::serve::control::serve_stream;
use crate::serve::server::Server;
use serde_json::Value;
use std::path::Path;

/// What a request line must get back, judged from its bytes alone.
#[derive(Debug)]
enum Expect {
    TooLong,
    NotUtf8,
    Empty,
    Any,
}

fn expect(line: &[u8]) -> Expect {
    if line.len() > MAX_LINE {
        return Expect::TooLong;
    }
    match std::str::from_utf8(line) {
        Err(_) => Expect::NotUtf8,
        Ok(s) if s.trim().is_empty() => Expect::Empty,
        Ok(_) => Expect::Any,
    }
}

/// Feeds `data` to the control protocol as the input of one connection,
/// against a sandboxed server (only `null:` exports, sockets inside `dir`),
/// then stops every export. Checks that each request line got exactly one
/// reply, in order, each a JSON object with a boolean `ok` and, when that
/// is false, a one-line `error` that names the problem; and that stopping
/// left no export and no socket behind.
pub fn control_bytes(data: &[u8], dir: &Path) {
    let server = Server::sandboxed(dir);
    let mut out = Vec::new();
    serve_stream(&server, data, &mut out).expect("in-memory I/O does not fail");
    let stopped = server.remove_all();
    assert!(stopped.is_ok(), "stopping the exports failed: {stopped:?}");
    assert!(server.list().is_empty(), "exports left after stopping");

    let mut requests: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if requests.last().is_some_and(|l| l.is_empty()) {
        requests.pop();
    }
    let text = std::str::from_utf8(&out).expect("replies are UTF-8");
    assert!(out.is_empty() || text.ends_with('\n'), "unterminated reply: {text:?}");
    let replies: Vec<&str> = text.lines().collect();
    assert_eq!(replies.len(), requests.len(), "one reply per request line: {text}");
    for (req, reply) in requests.iter().zip(&replies) {
        let v: Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"));
        let ok = v["ok"]
            .as_bool()
            .unwrap_or_else(|| panic!("reply {reply} has no boolean ok"));
        let error = v["error"].as_str().unwrap_or_default();
        assert!(ok || !error.is_empty(), "a refusal without an error: {reply}");
        let want = match expect(req) {
            Expect::TooLong => Some("longer than"),
            Expect::NotUtf8 => Some("not UTF-8"),
            Expect::Empty => Some("empty request"),
            Expect::Any => None,
        };
        if let Some(w) = want {
            assert!(
                !ok && error.contains(w),
                "request {:?}: want '{w}' in {reply}",
                String::from_utf8_lossy(req)
            );
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");
}
