//! Stream sockets on the per-thread runtime.
//!
//! A [`Socket`] is a connected stream socket (TCP or unix) registered with
//! the runtime of the thread that made it; a [`Listener`] accepts them.
//! Nothing blocks the thread: under io_uring, data moves by
//! `IORING_OP_RECVMSG`/`IORING_OP_SENDMSG` with `MSG_DONTWAIT` (batched
//! with the disk I/O in the same `io_uring_enter`); under the other
//! engines by non-blocking `recvmsg`/`sendmsg` on the thread. Either way an
//! `EAGAIN` parks the task until the runtime's epoll descriptor reports the
//! socket's next edge (`reactor`). Data moves straight between the socket
//! and an [`SgList`], and the list's keep-alives stay with the op until its
//! completion is reaped, as for file I/O.
//!
//! Accepting is not on the data path: [`Listener::accept`] is a
//! non-blocking `accept4` under every engine, woken by readiness.

use crate::engine::EngineKind;
use crate::reactor::Dir;
use crate::runtime::{submit, try_current, Inner, OpMem};
use crate::{Op, SgList};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

/// At most this many iovecs go into one message (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

fn outside() -> io::Error {
    io::Error::other("spindle-io: a socket was made outside a runtime (a bug)")
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connected stream socket on this thread's runtime.
pub struct Socket {
    fd: Arc<OwnedFd>,
    key: usize,
    rt: Rc<Inner>,
    uring: bool,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Socket({})", self.fd.as_raw_fd())
    }
}

impl Socket {
    /// Takes a connected stream socket, makes it non-blocking and registers
    /// it with the runtime this thread is running (call it from a task).
    pub fn new(fd: OwnedFd) -> io::Result<Socket> {
        let rt = try_current().ok_or_else(outside)?;
        set_nonblocking(fd.as_raw_fd())?;
        let key = rt.reactor.register(fd.as_raw_fd())?;
        let uring = rt.kind == EngineKind::IoUring;
        Ok(Socket {
            fd: Arc::new(fd),
            key,
            rt,
            uring,
        })
    }

    /// The descriptor, for shutting the socket from another thread
    /// (`shutdown(2)` on it while it is still open; the upgrade fails once
    /// the socket was dropped, so a reused descriptor number is never hit).
    pub fn weak_fd(&self) -> std::sync::Weak<OwnedFd> {
        Arc::downgrade(&self.fd)
    }

    /// The descriptor (for `shutdown`, socket options, logs).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Receives into `sg`; returns the bytes received (0: the peer closed).
    pub async fn recv(&self, sg: &SgList) -> io::Result<usize> {
        self.transfer(Dir::Read, sg).await
    }

    /// Sends from `sg`; returns the bytes the kernel took.
    pub async fn send(&self, sg: &SgList) -> io::Result<usize> {
        self.transfer(Dir::Write, sg).await
    }

    /// Fills `sg` entirely; `UnexpectedEof` when the peer closes first.
    pub async fn recv_exact(&self, sg: &SgList) -> io::Result<()> {
        let mut done = 0;
        while done < sg.len() {
            let n = self.recv(&sg.slice(done, sg.len() - done)).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }

    /// Sends all of `sg`.
    pub async fn send_all(&self, sg: &SgList) -> io::Result<()> {
        let mut done = 0;
        while done < sg.len() {
            let rest;
            let part = if done == 0 {
                sg
            } else {
                rest = sg.slice(done, sg.len() - done);
                &rest
            };
            done += self.send(part).await?;
        }
        Ok(())
    }

    /// `shutdown(2)`: ends reading, writing or both. A task waiting to
    /// receive then sees the end of the stream.
    pub fn shutdown(&self, how: std::net::Shutdown) {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on our own descriptor; no memory involved.
        unsafe { libc::shutdown(self.raw_fd(), how) };
    }

    /// One `recvmsg`/`sendmsg`, retried after `EAGAIN` once the socket is
    /// ready again.
    async fn transfer(&self, dir: Dir, sg: &SgList) -> io::Result<usize> {
        if sg.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.rt.reactor.is_ready(self.key, dir) {
                poll_fn(|cx| self.rt.reactor.poll_ready(self.key, dir, cx)).await;
            }
            let ticks = self.rt.reactor.ticks(self.key);
            let res = if self.uring {
                self.through_ring(dir, sg).await
            } else {
                self.on_thread(dir, sg)
            };
            match res {
                r if r == -libc::EAGAIN => self.rt.reactor.clear(self.key, dir, ticks),
                r if r == -libc::EINTR => {}
                r if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
                r => {
                    // A stream socket that gave less than asked for has
                    // nothing more queued: the next receive waits for the
                    // next edge instead of a call that says `EAGAIN`.
                    if dir == Dir::Read && r > 0 && (r as usize) < sg.len() {
                        self.rt.reactor.clear(self.key, dir, ticks);
                    }
                    return Ok(r as usize);
                }
            }
        }
    }

    fn flags(dir: Dir) -> i32 {
        match dir {
            Dir::Read => libc::MSG_DONTWAIT,
            Dir::Write => libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        }
    }

    /// A message header over `iov`.
    fn header(iov: &mut [libc::iovec]) -> libc::msghdr {
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len().min(MAX_IOV) as _;
        msg
    }

    /// The non-blocking system call on this thread.
    fn on_thread(&self, dir: Dir, sg: &SgList) -> i32 {
        let mut iov = sg.iovecs();
        let mut msg = Self::header(&mut iov);
        let op = match dir {
            Dir::Read => Op::RecvMsg {
                fd: self.raw_fd(),
                msg: &mut msg,
                flags: Self::flags(dir),
            },
            Dir::Write => Op::SendMsg {
                fd: self.raw_fd(),
                msg: &msg,
                flags: Self::flags(dir),
            },
        };
        // SAFETY: msg and iov live on this stack frame for the whole call;
        // the iovecs point into `sg`'s memory, which its keep-alives keep
        // valid; MSG_DONTWAIT makes the call return at once.
        unsafe { op.run_blocking() }
    }

    /// The op through io_uring, batched with the runtime's other I/O.
    async fn through_ring(&self, dir: Dir, sg: &SgList) -> i32 {
        let (op, mem) = {
            let mut iov = sg.iovecs();
            let mut msg = Box::new(Self::header(&mut iov));
            let ptr: *mut libc::msghdr = &mut *msg;
            let op = match dir {
                Dir::Read => Op::RecvMsg {
                    fd: self.raw_fd(),
                    msg: ptr,
                    flags: Self::flags(dir),
                },
                Dir::Write => Op::SendMsg {
                    fd: self.raw_fd(),
                    msg: ptr,
                    flags: Self::flags(dir),
                },
            };
            let mut keep = sg.keep_alives();
            keep.push(Rc::new(msg));
            let mem = OpMem {
                iov,
                keep,
                fd: Some(self.fd.clone()),
            };
            (op, mem)
        };
        // SAFETY: the op points at the boxed header, which `mem.keep`
        // holds (the box's heap block does not move), and the header
        // points at `mem.iov`, whose entries point into memory the list's
        // keep-alives (also in `mem`) keep valid.
        unsafe { submit(op, Some(mem)) }.await
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.rt.reactor.deregister(self.key, self.raw_fd());
    }
}

/// A listening stream socket on this thread's runtime.
pub struct Listener {
    fd: OwnedFd,
    key: usize,
    rt: Rc<Inner>,
}

impl Listener {
    /// Takes a bound, listening socket (a `std` TCP or unix listener
    /// turned into an `OwnedFd`) and registers it with this thread's
    /// runtime (call it from a task).
    pub fn new(fd: OwnedFd) -> io::Result<Listener> {
        let rt = try_current().ok_or_else(outside)?;
        set_nonblocking(fd.as_raw_fd())?;
        let key = rt.reactor.register(fd.as_raw_fd())?;
        Ok(Listener { fd, key, rt })
    }

    /// The next connection, close-on-exec, for [`Socket::new`] on any
    /// thread's runtime.
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            poll_fn(|cx| self.rt.reactor.poll_ready(self.key, Dir::Read, cx)).await;
            let ticks = self.rt.reactor.ticks(self.key);
            // SAFETY: accept4 on our listening descriptor without an address buffer.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor that we own.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.rt.reactor.clear(self.key, Dir::Read, ticks),
                // The connection went away before it was accepted, or a signal: next.
                Some(libc::EINTR) | Some(libc::ECONNABORTED) | Some(libc::EPROTO) => {}
                _ => return Err(e),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.rt.reactor.deregister(self.key, self.fd.as_raw_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Runtime, RuntimeConfig};
    use std::cell::Cell;
    use std::io::{Read, Write};

    const KINDS: [EngineKind; 3] = [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads];

    fn runtime(kind: EngineKind) -> Runtime {
        Runtime::new(RuntimeConfig {
            engine: kind,
            ..Default::default()
        })
        .unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// 8 MiB each way over a socketpair, between two tasks of one runtime:
    /// far more than the socket buffers, so both sides wait for readiness
    /// many times, and neither wait blocks the other task.
    #[test]
    fn tasks_stream_through_a_socketpair() {
        for kind in KINDS {
            let rt = runtime(kind);
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let (a, b) = (OwnedFd::from(a), OwnedFd::from(b));
            let want = pattern(8 << 20, 3);
            let got = rt.block_on(async {
                let a = Rc::new(Socket::new(a).unwrap());
                let b = Socket::new(b).unwrap();
                let sender = {
                    let (a, data) = (a.clone(), want.clone());
                    crate::spawn(async move { a.send_all(&SgList::copy_of(&data)).await.unwrap() })
                };
                let sg = SgList::zeroed(want.len());
                b.recv_exact(&sg).await.unwrap();
                sender.await;
                a.shutdown(std::net::Shutdown::Write);
                assert_eq!(b.recv(&SgList::zeroed(16)).await.unwrap(), 0, "{kind}: end of stream");
                sg.to_vec()
            });
            assert!(got == want, "{kind}: the bytes arrive in order");
        }
    }

    /// A short receive waits for the socket's next edge, except when the
    /// peer's end came with the data: its edge is already reaped, and the
    /// next receive must see the end of the stream, not wait for ever.
    #[test]
    fn a_short_read_before_the_end_of_the_stream_sees_the_end() {
        for kind in KINDS {
            let rt = runtime(kind);
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            let peer = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                b.write_all(b"0123456789").unwrap();
                b.shutdown(std::net::Shutdown::Write).unwrap();
                let _ = b.read_to_end(&mut Vec::new());
            });
            let got = rt.block_on(async {
                let s = Socket::new(OwnedFd::from(a)).unwrap();
                let sg = SgList::zeroed(64);
                let mut got = Vec::new();
                let all = async {
                    loop {
                        let n = s.recv(&sg).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&sg.slice(0, n).to_vec());
                    }
                };
                let ended = crate::time::timeout(std::time::Duration::from_secs(10), all)
                    .await
                    .unwrap();
                assert!(ended.is_some(), "{kind}: the end of the stream never came");
                got
            });
            assert_eq!(got, b"0123456789", "{kind}");
            peer.join().unwrap();
        }
    }

    /// A listener accepts connections from another thread; a receiving
    /// task waits for data without holding up a second connection's task.
    #[test]
    fn listener_accepts_and_waiting_tasks_do_not_block_others() {
        for kind in KINDS {
            let rt = runtime(kind);
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let peer = std::thread::spawn(move || {
                let quiet = std::net::TcpStream::connect(addr).unwrap();
                let mut busy = std::net::TcpStream::connect(addr).unwrap();
                busy.write_all(b"ping").unwrap();
                let mut r = [0u8; 4];
                busy.read_exact(&mut r).unwrap();
                drop(quiet); // only now does the quiet connection end
                r
            });
            let served = Rc::new(Cell::new(0));
            rt.block_on(async {
                let l = Listener::new(OwnedFd::from(l)).unwrap();
                let quiet = Socket::new(l.accept().await.unwrap()).unwrap();
                let busy = Socket::new(l.accept().await.unwrap()).unwrap();
                let s = served.clone();
                let quiet_task = crate::spawn(async move {
                    let n = quiet.recv(&SgList::zeroed(8)).await.unwrap();
                    assert_eq!(n, 0);
                    s.set(s.get() + 1);
                });
                let sg = SgList::zeroed(4);
                busy.recv_exact(&sg).await.unwrap();
                assert_eq!(sg.to_vec(), b"ping");
                busy.send_all(&SgList::copy_of(b"pong")).await.unwrap();
                quiet_task.await;
            });
            assert_eq!(&peer.join().unwrap(), b"pong", "{kind}");
            assert_eq!(served.get(), 1, "{kind}");
        }
    }

    /// An external loop sees socket readiness on `event_fds` (the epoll
    /// descriptor) and `run_ready` finishes the waiting task.
    #[test]
    fn event_fds_report_socket_readiness() {
        for kind in KINDS {
            let rt = runtime(kind);
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            let got = Rc::new(Cell::new(0u8));
            let g = got.clone();
            rt.spawn(async move {
                let s = Socket::new(OwnedFd::from(a)).unwrap();
                let sg = SgList::zeroed(1);
                s.recv_exact(&sg).await.unwrap();
                g.set(sg.to_vec()[0]);
            })
            .detach();
            rt.run_ready();
            assert_eq!(got.get(), 0);
            b.write_all(&[42]).unwrap();
            for _ in 0..100 {
                let n = crate::runtime::tests::wait_readable(&rt.event_fds(), 5000);
                assert!(n > 0, "{kind}: no descriptor fired for the socket");
                rt.run_ready();
                if got.get() != 0 {
                    break;
                }
            }
            assert_eq!(got.get(), 42, "{kind}");
        }
    }
}
