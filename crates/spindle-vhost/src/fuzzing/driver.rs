//! A vhost-user-blk frontend and virtio driver in one, for tests and fuzz
//! harnesses: rust-vmm's vhost-user frontend on the socket, guest memory
//! in a shared file mapped on both sides, and split virtqueues laid out
//! and filled by hand, so a test can set a ring up the way QEMU does and
//! then break it any way it likes.

use crate::blk::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size (at guest address 0, as QEMU's RAM starts).
pub const MEM_SIZE: u64 = 16 << 20;
/// Where queue `i`'s ring starts: one MiB each, from 1 MiB.
pub fn ring_base(i: usize) -> u64 {
    (1 + i as u64) << 20
}
/// Where request headers, data, status bytes and indirect tables go:
/// 128 KiB for each of 64 slots of the available ring, from 8 MiB.
pub fn area(slot: u16) -> u64 {
    (8 << 20) + u64::from(slot % 64) * (128 << 10)
}
/// `VHOST_F_LOG_ALL`.
const LOG_ALL: u64 = 1 << 26;
/// Largest data buffer of one request.
pub const MAX_DATA: usize = 64 << 10;

/// A memfd of `len` bytes, sealed against shrinking and growing when
/// `seal` (as QEMU makes its dirty log): what SET_LOG_BASE passes.
pub fn memfd(len: u64, seal: bool) -> std::io::Result<File> {
    use spindle_io::memfd::{create_sized, SEAL_GROW, SEAL_SHRINK};
    create_sized(c"spindle-test", len, if seal { SEAL_SHRINK | SEAL_GROW } else { 0 })
}

/// The pages whose bits are set in the dirty log file `log`.
pub fn log_pages(log: &File) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; log.metadata()?.len() as usize];
    log.read_exact_at(&mut b, 0)?;
    Ok((0..b.len() as u64 * 8)
        .filter(|p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect())
}

/// A split virtqueue as the driver laid it out.
#[derive(Debug)]
pub struct Ring {
    /// Entries.
    pub size: u16,
    /// Guest addresses of the descriptor table, available and used rings.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// The driver's next available index.
    pub avail_idx: u16,
    /// Used entries the driver has consumed.
    pub used_seen: u16,
    /// The queue's kick and call eventfds.
    pub kick: EventFd,
    /// Call eventfd.
    pub call: EventFd,
    /// Error eventfd (`SET_VRING_ERR`): the backend signals a broken ring.
    pub err: EventFd,
}

impl Ring {
    /// The layout of a ring of `size` entries at `base`.
    pub fn at(base: u64, size: u16) -> std::io::Result<Ring> {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Ok(Ring {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            err: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}

/// One frontend connection with its guest memory.
pub struct Driver {
    /// The vhost-user frontend.
    pub fe: Frontend,
    /// The driver's view of guest memory.
    pub mem: GuestMemoryMmap<()>,
    /// The file behind guest memory (what SET_MEM_TABLE passes).
    pub file: File,
    /// Queues set up so far, by index.
    pub rings: Vec<Option<Ring>>,
    /// Another handle on the socket, for raw messages.
    pub sock: UnixStream,
    /// The inflight buffer of the last GET_INFLIGHT_FD, as the frontend
    /// keeps it.
    pub inflight: Option<(File, VhostUserInflight)>,
    _deadline: Deadline,
}

/// Shuts a socket down once its time is up, so that a backend that stops
/// answering fails the frontend's calls instead of blocking them forever
/// (a read timeout would not do: the vhost crate retries on EAGAIN).
struct Deadline(Option<std::sync::mpsc::Sender<()>>);

impl Deadline {
    fn new(sock: UnixStream, after: Duration) -> Deadline {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
        });
        Deadline(Some(tx))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Driver {
    /// Connects to `socket`, for at most `lifetime`: after that the
    /// connection is shut down and every call fails (a wedged backend shows
    /// as an error, not a hang).
    pub fn connect(socket: &Path, queues: u64, lifetime: Duration) -> std::io::Result<Driver> {
        let sock = UnixStream::connect(socket)?;
        let raw = sock.try_clone()?;
        let deadline = Deadline::new(sock.try_clone()?, lifetime);
        let file = vmm_sys_util::tempfile::TempFile::new().map_err(io)?.into_file();
        file.set_len(MEM_SIZE)?;
        let offset = FileOffset::new(file.try_clone()?, 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_SIZE as usize, Some(offset))])
            .map_err(io)?;
        Ok(Driver {
            fe: Frontend::from_stream(sock, queues),
            mem,
            file,
            rings: (0..queues).map(|_| None).collect(),
            sock: raw,
            inflight: None,
            _deadline: deadline,
        })
    }

    /// The frontend's virtual address of guest address `gpa` (what
    /// SET_VRING_ADDR carries).
    pub fn va(&self, gpa: u64) -> u64 {
        let base = self.mem.get_host_address(GuestAddress(0)).map_or(0, |p| p as u64);
        base.wrapping_add(gpa)
    }

    /// The handshake QEMU makes: owner, features, protocol features with
    /// REPLY_ACK (every later message is acknowledged, so a refusal shows
    /// as an error), and the memory table.
    pub fn handshake(&mut self) -> vhost::Result<()> {
        self.fe.set_owner()?;
        let features = self.fe.get_features()?;
        let proto = self.fe.get_protocol_features()?;
        self.fe.set_protocol_features(
            proto
                & (VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                    | VhostUserProtocolFeatures::RESET_DEVICE
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                    | VhostUserProtocolFeatures::LOG_SHMFD),
        )?;
        self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        // Dirty logging is acked only while a migration runs, as QEMU does.
        self.fe.set_features(features & !LOG_ALL)?;
        self.set_mem_table()
    }

    /// Acks the backend's features with `VHOST_F_LOG_ALL` on or off, as
    /// QEMU does when a migration starts and ends.
    pub fn set_log_all(&mut self, on: bool) -> vhost::Result<()> {
        let features = self.fe.get_features()? & !LOG_ALL;
        self.fe.set_features(if on { features | LOG_ALL } else { features })
    }

    /// Stops queue `i` (`GET_VRING_BASE`, what QEMU sends when it stops
    /// the device); returns the ring's next available index.
    pub fn stop_queue(&mut self, i: usize) -> vhost::Result<u32> {
        self.fe.get_vring_base(i)
    }

    /// GET_INFLIGHT_FD for `queues` queues of `size` entries; the buffer is
    /// kept (`inflight`) for `set_inflight`.
    pub fn get_inflight(&mut self, queues: u16, size: u16) -> vhost::Result<VhostUserInflight> {
        let (desc, file) = self.fe.get_inflight_fd(&VhostUserInflight::new(0, 0, queues, size))?;
        self.inflight = Some((file, desc));
        Ok(desc)
    }

    /// SET_INFLIGHT_FD of the kept buffer, described as `desc`.
    pub fn set_inflight(&mut self, desc: &VhostUserInflight) -> vhost::Result<()> {
        let fd = self.inflight.as_ref().map_or(-1, |(f, _)| f.as_raw_fd());
        self.fe.set_inflight_fd(desc, fd)
    }

    /// Writes `bytes` into the kept inflight buffer at `offset`.
    pub fn poke_inflight(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.inflight {
            Some((f, _)) => f.write_all_at(bytes, offset),
            None => Err(std::io::Error::other("no inflight buffer")),
        }
    }

    /// SET_LOG_BASE: the dirty log is `size` bytes at `offset` in the file
    /// `fd` (as QEMU sends it when a migration starts).
    pub fn set_log_base(&self, fd: i32, size: u64, offset: u64) -> vhost::Result<()> {
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: fd,
        };
        self.fe.set_log_base(0, Some(region))
    }

    /// Sends the whole of guest memory as one region.
    pub fn set_mem_table(&mut self) -> vhost::Result<()> {
        self.set_mem_table_len(MEM_SIZE)
    }

    /// Sends the first `len` bytes of guest memory as its only region.
    pub fn set_mem_table_len(&mut self, len: u64) -> vhost::Result<()> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: len,
            userspace_addr: self.va(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        self.fe.set_mem_table(&[region]).map(|_| ())
    }

    /// Sets queue `i` up as QEMU does: size, base, addresses, kick, call,
    /// error eventfd, enable. The ring's memory is zeroed first.
    pub fn setup_queue(&mut self, i: usize, size: u16) -> vhost::Result<()> {
        self.setup_queue_at(i, ring_base(i), size)
    }

    /// `setup_queue` with the ring at guest address `base` (16-aligned).
    pub fn setup_queue_at(&mut self, i: usize, base: u64, size: u16) -> vhost::Result<()> {
        let ring = Ring::at(base, size).map_err(vhost::Error::IOError)?;
        let len = (ring.used + 6 + 8 * u64::from(size) - ring.desc) as usize;
        let _ = self.mem.write_slice(&vec![0u8; len], GuestAddress(ring.desc));
        self.fe.set_vring_num(i, size)?;
        self.fe.set_vring_base(i, 0)?;
        self.set_addr(i, &ring)?;
        self.fe.set_vring_kick(i, &ring.kick)?;
        self.fe.set_vring_call(i, &ring.call)?;
        self.fe.set_vring_err(i, &ring.err)?;
        self.fe.set_vring_enable(i, true)?;
        self.rings[i] = Some(ring);
        Ok(())
    }

    /// Starts queue `i` again after `stop_queue`, as QEMU does when it
    /// starts the device again (a cancelled migration, `cont`): the same
    /// ring memory, at `base` (what `GET_VRING_BASE` returned); chains
    /// published meanwhile are then taken.
    pub fn resume_queue(&mut self, i: usize, base: u32) -> vhost::Result<()> {
        let ring = self.rings[i].take().ok_or(vhost::Error::InvalidQueue)?;
        let res = (|| {
            self.fe.set_vring_num(i, ring.size)?;
            self.fe.set_vring_base(i, base as u16)?;
            self.set_addr(i, &ring)?;
            self.fe.set_vring_kick(i, &ring.kick)?;
            self.fe.set_vring_call(i, &ring.call)?;
            self.fe.set_vring_err(i, &ring.err)?;
            self.fe.set_vring_enable(i, true)
        })();
        self.rings[i] = Some(ring);
        res
    }

    /// SET_VRING_ADDR for `ring`'s layout.
    pub fn set_addr(&self, i: usize, ring: &Ring) -> vhost::Result<()> {
        let cfg = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: self.va(ring.desc),
            used_ring_addr: self.va(ring.used),
            avail_ring_addr: self.va(ring.avail),
            log_addr: None,
        };
        self.fe.set_vring_addr(i, &cfg)
    }

    /// Handshake plus `queues` queues of `size` entries.
    pub fn setup(&mut self, queues: usize, size: u16) -> vhost::Result<()> {
        self.handshake()?;
        (0..queues).try_for_each(|i| self.setup_queue(i, size))
    }

    /// Publishes `value` as queue `i`'s available index and kicks it.
    pub fn publish(&mut self, i: usize, value: u16) {
        if let Some(r) = self.rings[i].as_mut() {
            r.avail_idx = value;
            let _ = self
                .mem
                .store(value.to_le(), GuestAddress(r.avail + 2), Ordering::Release);
            let _ = r.kick.write(1);
        }
    }

    /// Kicks queue `i` without publishing anything.
    pub fn kick(&self, i: usize) {
        if let Some(r) = self.rings[i].as_ref() {
            let _ = r.kick.write(1);
        }
    }

    /// Puts a virtio-blk request on queue `i`: header (`kind`, `sector`),
    /// `data` bytes (device-readable for a write, writable otherwise) and a
    /// status byte. Queues of fewer than 3 entries get one indirect
    /// descriptor. Returns the head.
    pub fn submit(&mut self, i: usize, kind: u32, sector: u64, data: &[u8], writable: bool) -> Option<u16> {
        let ring = self.rings[i].as_ref()?;
        let slot = ring.avail_idx % ring.size;
        if data.len() > MAX_DATA {
            return None;
        }
        let area = area(slot);
        let (hdr, buf, status) = (area, area + 512, area + 512 + data.len() as u64);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).ok()?;
        self.mem.write_slice(data, GuestAddress(buf)).ok()?;
        self.mem.write_obj(0xffu8, GuestAddress(status)).ok()?;
        let w = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
        let mut chain = vec![(hdr, 16, 0)];
        if !data.is_empty() {
            chain.push((buf, data.len() as u32, w));
        }
        chain.push((status, 1, VRING_DESC_F_WRITE as u16));
        // Descriptors `slot * 3 ..` belong to this slot (a queue of 3 or
        // more entries has room for one chain per 3 entries in flight).
        let (table, first) = if ring.size < 3 {
            let table = area + (96 << 10);
            (table, 0u16)
        } else {
            (ring.desc, (slot * 3) % (ring.size - ring.size % 3))
        };
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let last = k + 1 == chain.len();
            let next = if last { 0 } else { first + k as u16 + 1 };
            let flags = flags | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            self.write_desc(table, first + k as u16, addr, len, flags, next)?;
        }
        let head = if ring.size < 3 {
            let len = 16 * chain.len() as u32;
            self.write_desc(ring.desc, slot, table, len, VRING_DESC_F_INDIRECT as u16, 0)?;
            slot
        } else {
            first
        };
        let entry = ring.avail + 4 + 2 * u64::from(slot);
        self.mem.write_obj(head.to_le(), GuestAddress(entry)).ok()?;
        let next = ring.avail_idx.wrapping_add(1);
        self.publish(i, next);
        Some(head)
    }

    fn write_desc(&self, table: u64, n: u16, addr: u64, len: u32, flags: u16, next: u16) -> Option<()> {
        let at = table + 16 * u64::from(n);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(at)).ok()
    }

    /// Waits up to `timeout` for queue `i`'s next used entry: (head, length).
    pub fn wait_used(&mut self, i: usize, timeout: Duration) -> Option<(u16, u32)> {
        let ring = self.rings[i].as_mut()?;
        let start = Instant::now();
        loop {
            let idx: u16 = self.mem.load(GuestAddress(ring.used + 2), Ordering::Acquire).ok()?;
            if u16::from_le(idx) != ring.used_seen {
                let at = ring.used + 4 + 8 * u64::from(ring.used_seen % ring.size);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).ok()?;
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).ok()?;
                ring.used_seen = ring.used_seen.wrapping_add(1);
                return Some((u32::from_le(id) as u16, u32::from_le(len)));
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The status byte of the request last submitted in `slot`, for a
    /// request of `data_len` bytes.
    fn status(&self, slot: u16, data_len: usize) -> Option<u8> {
        self.mem.read_obj(GuestAddress(area(slot) + 512 + data_len as u64)).ok()
    }

    /// Writes `data` at `sector` through queue `i`; returns the status.
    pub fn write(&mut self, i: usize, sector: u64, data: &[u8], timeout: Duration) -> Option<u8> {
        let slot = self.rings[i].as_ref().map(|r| r.avail_idx % r.size)?;
        self.submit(i, VIRTIO_BLK_T_OUT, sector, data, false)?;
        self.wait_used(i, timeout)?;
        self.status(slot, data.len())
    }

    /// Reads `len` bytes at `sector` through queue `i`: status and data.
    pub fn read(&mut self, i: usize, sector: u64, len: usize, timeout: Duration) -> Option<(u8, Vec<u8>)> {
        let slot = self.rings[i].as_ref().map(|r| r.avail_idx % r.size)?;
        self.submit(i, VIRTIO_BLK_T_IN, sector, &vec![0u8; len], true)?;
        self.wait_used(i, timeout)?;
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(area(slot) + 512)).ok()?;
        Some((self.status(slot, len)?, out))
    }
}
