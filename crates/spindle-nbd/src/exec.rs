//! Runs a validated command on the export's node and sends its reply.
//!
//! Each request is its own task on the connection's I/O thread: data moves
//! between the socket, a pool buffer and the image with no copy, and
//! replies go out as they complete (out of order). Reads with structured
//! replies send hole chunks for ranges that read as zeroes (from the
//! node's block status through the backing chain) and an `ERROR_OFFSET`
//! chunk for a range that failed.

use crate::connection::Conn;
use crate::export::DetectZeroes;
use crate::handshake::Contexts;
use crate::pool::Buf;
use crate::proto::{errno, simple_reply, state};
use crate::transmission::{self as tx, Command};
use spindle_block::{BlockError, Extent, Node};
use spindle_export::stats::Op;
use spindle_export::throttle::Direction;
use spindle_io::trace::{NBD_COMPLETE, NBD_SUBMIT};
use spindle_io::{traced, SgList};
use std::rc::Rc;
use std::time::Instant;

/// Reads shorter than this skip the block-status look for holes.
const SPARSE_MIN: u32 = 64 << 10;
/// Extents one `BLOCK_STATUS` reply describes at most, per context.
const MAX_EXTENTS: usize = 1024;

/// The wire error for a failed node call.
pub fn wire_errno(e: &BlockError) -> u32 {
    match e.errno() {
        libc::EPERM | libc::EROFS => errno::EPERM,
        libc::ENOSPC | libc::EDQUOT => errno::ENOSPC,
        libc::EINVAL => errno::EINVAL,
        libc::ENOMEM => errno::ENOMEM,
        libc::EOPNOTSUPP => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

/// A reply to send once the image work is done (and the request no
/// longer holds the export's gate).
struct Reply {
    /// Dropped first (fields drop in order), so that the pool buffer
    /// below is shared by nothing when it drops and goes back to the pool.
    parts: Vec<SgList>,
    /// The buffer a read's data sits in, kept until the reply is sent.
    _buf: Option<Buf>,
}

impl From<Vec<SgList>> for Reply {
    fn from(parts: Vec<SgList>) -> Reply {
        Reply { parts, _buf: None }
    }
}

/// Runs `cmd` (with the write payload, already received) and replies.
/// The request passes the export's quiesce gate first and is counted in
/// flight until its image work is done; the reply goes out after, so a
/// client that does not read its replies cannot hold a snapshot back.
pub(crate) async fn run(conn: Rc<Conn>, cookie: u64, cmd: Command, payload: Option<Buf>) {
    let dev = conn.export.dev.clone();
    let (op, bytes) = classify(&cmd);
    // In flight from here until its `record` below.
    dev.lane_stats(conn.lane).start();
    if spindle_io::trace_on!(NBD_SUBMIT) {
        let (name, offset, len) = describe(&cmd);
        traced!(NBD_SUBMIT, export = %conn.export.settings.name, lane = conn.lane, cookie, op = %name, offset, len, "request");
    }
    let arrived = spindle_io::trace_on!(NBD_COMPLETE).then(Instant::now);
    // The throttle first, before the gate: a throttled request holds no
    // pass a snapshot would wait for; while the gate is held (or the
    // export goes) its turn comes at once.
    let dir = match op {
        Op::Read => Some(Direction::Read),
        Op::Write | Op::Discard | Op::WriteZeroes => Some(Direction::Write),
        _ => None,
    };
    if let Some(dir) = dir {
        let export = conn.export.clone();
        let waited = dev
            .throttle(dir, bytes, &|| export.dev.gate().is_held() || export.is_closed())
            .await;
        if !waited.is_zero() {
            dev.lane_stats(conn.lane).record_throttled(waited.as_nanos() as u64);
        }
    }
    let pass = dev.gate().pass().await;
    let start = Instant::now();
    let node = if conn.export.is_closed() {
        Err((
            errno::ESHUTDOWN,
            format!("export '{}' was withdrawn", conn.export.settings.name),
        ))
    } else {
        dev.open_node().map_err(|e| (errno::EIO, e.to_string()))
    };
    let (reply, ok) = match node {
        Ok(node) => {
            let (reply, ok) = image_work(&conn, &node, cookie, cmd, payload).await;
            if let Some((off, len)) = written_span(&cmd) {
                // A failed write may have landed in part: a live commit
                // job copies the range again, as for vhost-user.
                dev.wrote(off, len);
            }
            (reply, ok)
        }
        Err((code, why)) => {
            spindle_export::limited!(warn, "NBD request refused: {why}");
            (error_reply(&conn, cookie, code, &why), false)
        }
    };
    drop(pass);
    let ns = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
    // A failed request counts under its kind, as vhost-user's do (its
    // bytes only when it succeeded).
    dev.lane_stats(conn.lane).record(op, bytes, ok, ns);
    if let Some(arrived) = arrived {
        let (name, offset, len) = describe(&cmd);
        // `us` from the gate on, as the statistics count; `waited_us` from
        // arrival (the throttle and the gate included).
        traced!(NBD_COMPLETE, export = %conn.export.settings.name, lane = conn.lane, cookie, op = %name, offset, len, ok,
            us = ns / 1000, waited_us = arrived.elapsed().as_micros() as u64, "request done");
    }
    let refs: Vec<&SgList> = reply.parts.iter().collect();
    conn.send(&refs).await
}

fn error_reply(conn: &Conn, cookie: u64, errno: u32, why: &str) -> Reply {
    Reply::from(vec![SgList::copy_unaligned(&tx::error_reply(
        cookie,
        conn.limits.structured,
        errno,
        why,
    ))])
}

/// The statistics kind and byte count of a command.
fn classify(cmd: &Command) -> (Op, u64) {
    match *cmd {
        Command::Read { len, .. } => (Op::Read, len as u64),
        Command::Write { len, .. } => (Op::Write, len as u64),
        Command::Flush => (Op::Flush, 0),
        Command::Trim { len, .. } => (Op::Discard, len as u64),
        Command::WriteZeroes { len, .. } => (Op::WriteZeroes, len as u64),
        _ => (Op::Other, 0),
    }
}

/// What a trace line calls a command, with its range.
fn describe(cmd: &Command) -> (&'static str, u64, u32) {
    match *cmd {
        Command::Read { offset, len, .. } => ("read", offset, len),
        Command::Write { offset, len, .. } => ("write", offset, len),
        Command::Flush => ("flush", 0, 0),
        Command::Trim { offset, len, .. } => ("trim", offset, len),
        Command::Cache { offset, len } => ("cache", offset, len),
        Command::WriteZeroes { offset, len, .. } => ("write_zeroes", offset, len),
        Command::BlockStatus { offset, len, .. } => ("block_status", offset, len),
        Command::Disconnect => ("disconnect", 0, 0),
    }
}

/// The range a command may change.
fn written_span(cmd: &Command) -> Option<(u64, u64)> {
    match *cmd {
        Command::Write { offset, len, .. } => Some((offset, len as u64)),
        Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => Some((offset, len as u64)),
        _ => None,
    }
}

/// The image work of one command: its reply and whether it succeeded.
async fn image_work(conn: &Conn, node: &Node, cookie: u64, cmd: Command, payload: Option<Buf>) -> (Reply, bool) {
    let r = match cmd {
        Command::Read { offset, len, df } => return read(conn, node, cookie, offset, len, df).await,
        Command::BlockStatus { offset, len, req_one } => {
            return block_status(conn, node, cookie, offset, len, req_one).await
        }
        Command::Write { offset, fua, .. } => {
            let sg = payload.as_ref().map(Buf::sg).unwrap_or_else(|| SgList::zeroed(0));
            write(conn, node, offset, &sg, fua).await
        }
        Command::Flush => node.flush().await,
        Command::Trim { offset, len, fua } => {
            let r = if conn.export.settings.discard {
                node.discard(offset, len as u64).await
            } else {
                Ok(())
            };
            finish_fua(node, r, fua).await
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            if fast && !crate::export::Export::zeroing_is_fast(node) {
                return (
                    error_reply(conn, cookie, errno::ENOTSUP, "zeroing is not fast on this image"),
                    false,
                );
            }
            let unmap = conn.export.settings.discard && !no_hole;
            finish_fua(node, node.write_zeroes(offset, len as u64, unmap).await, fua).await
        }
        Command::Cache { offset, len } => {
            let buf = Buf::get(len as usize);
            node.read(offset, &buf.sg()).await
        }
        Command::Disconnect => Ok(()),
    };
    match r {
        Ok(()) => (vec![SgList::copy_unaligned(&simple_reply(cookie, 0))].into(), true),
        Err(e) => {
            spindle_export::limited!(warn, "NBD request failed: {e}");
            (error_reply(conn, cookie, wire_errno(&e), &e.to_string()), false)
        }
    }
}

async fn finish_fua(node: &Node, r: spindle_block::Result<()>, fua: bool) -> spindle_block::Result<()> {
    r?;
    if fua {
        node.flush().await?;
    }
    Ok(())
}

async fn write(conn: &Conn, node: &Node, offset: u64, sg: &SgList, fua: bool) -> spindle_block::Result<()> {
    let detect = conn.export.settings.detect_zeroes;
    if detect != DetectZeroes::Off && sg.is_zero() {
        let unmap = detect == DetectZeroes::Unmap && conn.export.settings.discard;
        return finish_fua(node, node.write_zeroes(offset, sg.len() as u64, unmap).await, fua).await;
    }
    node.write(offset, sg, fua).await
}

/// The ranges of `[offset, offset + len)` through the backing chain.
async fn extents(node: &Node, offset: u64, len: u64, max: usize) -> spindle_block::Result<Vec<(u64, Extent)>> {
    let mut out = Vec::new();
    let (mut pos, end) = (offset, offset + len);
    while pos < end && out.len() < max {
        let e = node.map_extent(pos, end - pos).await?;
        if e.len == 0 {
            break;
        }
        let e = Extent {
            len: e.len.min(end - pos),
            ..e
        };
        out.push((pos, e));
        pos += e.len;
    }
    Ok(out)
}

async fn read(conn: &Conn, node: &Node, cookie: u64, offset: u64, len: u32, df: bool) -> (Reply, bool) {
    let structured = conn.limits.structured;
    let buf = Buf::get(len as usize);
    let sg = buf.sg();
    // Holes: only for structured, fragmentable reads long enough to be
    // worth a look on an image that may have some (a dense raw file has
    // none: no two `lseek`s per read), or any where the look is free (a
    // null device: the reply is a hole chunk instead of the zeroes, as
    // qemu-nbd's null-co).
    let look = (len >= SPARSE_MIN && node.may_have_holes()) || node.status_is_free();
    let holes = if structured && !df && look {
        extents(node, offset, len as u64, usize::MAX).await.ok()
    } else {
        None
    };
    let Some(map) = holes.filter(|m| m.iter().any(|(_, e)| e.zero)) else {
        return match node.read(offset, &sg).await {
            Ok(()) if structured => (
                Reply {
                    parts: vec![SgList::copy_unaligned(&tx::data_chunk(cookie, true, offset, len)), sg],
                    _buf: Some(buf),
                },
                true,
            ),
            Ok(()) => (
                Reply {
                    parts: vec![SgList::copy_unaligned(&simple_reply(cookie, 0)), sg],
                    _buf: Some(buf),
                },
                true,
            ),
            Err(e) => {
                spindle_export::limited!(warn, "NBD read failed: {e}");
                (error_reply(conn, cookie, wire_errno(&e), &e.to_string()), false)
            }
        };
    };
    // Merge neighbours of one kind; read every data run concurrently.
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (pos, e) in map {
        match runs.last_mut() {
            Some(last) if last.2 == e.zero => last.1 += e.len,
            _ => runs.push((pos, e.len, e.zero)),
        }
    }
    let reads = runs.iter().map(|&(pos, n, zero)| {
        let part = sg.slice((pos - offset) as usize, n as usize);
        async move {
            if zero {
                Ok(())
            } else {
                node.read(pos, &part).await
            }
        }
    });
    let results = futures::future::join_all(reads).await;
    let mut parts: Vec<SgList> = Vec::new();
    let mut failed = None;
    for (i, (&(pos, n, zero), r)) in runs.iter().zip(results).enumerate() {
        let last = i + 1 == runs.len();
        if let Err(e) = r {
            failed = Some((pos, n, e));
            break;
        }
        if zero {
            parts.push(SgList::copy_unaligned(&tx::hole_chunk(cookie, last, pos, n as u32)));
        } else {
            parts.push(SgList::copy_unaligned(&tx::data_chunk(cookie, last, pos, n as u32)));
            parts.push(sg.slice((pos - offset) as usize, n as usize));
        }
    }
    let ok = failed.is_none();
    if let Some((pos, _, e)) = failed {
        spindle_export::limited!(warn, "NBD read failed at {pos}: {e}");
        parts.push(SgList::copy_unaligned(&tx::error_chunk(
            cookie,
            wire_errno(&e),
            &e.to_string(),
            Some(pos),
        )));
    }
    (Reply { parts, _buf: Some(buf) }, ok)
}

/// Merges `(len, value)` pairs with equal values; with `one`, keeps one.
fn merged(items: impl Iterator<Item = (u64, u32)>, one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for (len, v) in items {
        match out.last_mut() {
            Some(last) if last.1 == v => last.0 += len,
            _ => out.push((len, v)),
        }
    }
    if one {
        out.truncate(1);
    }
    // Lengths stay within the request's u32 length.
    out.into_iter().map(|(l, v)| (l as u32, v)).collect()
}

async fn block_status(conn: &Conn, node: &Node, cookie: u64, offset: u64, len: u32, one: bool) -> (Reply, bool) {
    let max = if one { 1 } else { MAX_EXTENTS };
    let map = match extents(node, offset, len as u64, max).await {
        Ok(m) if !m.is_empty() => m,
        Ok(_) => return (error_reply(conn, cookie, errno::EINVAL, "no extent"), false),
        Err(e) => return (error_reply(conn, cookie, wire_errno(&e), &e.to_string()), false),
    };
    let ctx = conn.limits.contexts;
    let mut out = Vec::new();
    if ctx.base {
        let items = map.iter().map(|(_, e)| {
            let hole = if e.data { 0 } else { state::HOLE };
            let zero = if e.zero { state::ZERO } else { 0 };
            (e.len, hole | zero)
        });
        out.push((Contexts::BASE_ID, merged(items, one)));
    }
    if ctx.depth {
        let items = map
            .iter()
            .map(|(_, e)| (e.len, if e.present { e.depth + 1 } else { 0 }));
        out.push((Contexts::DEPTH_ID, merged(items, one)));
    }
    let n = out.len();
    let mut bytes = Vec::new();
    for (i, (id, ext)) in out.into_iter().enumerate() {
        bytes.extend(tx::block_status_chunk(cookie, i + 1 == n, id, &ext));
    }
    (vec![SgList::copy_unaligned(&bytes)].into(), true)
}
