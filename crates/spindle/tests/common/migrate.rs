//! Live migration of the test guest (common/vm.rs) from one QEMU to a
//! second one started with `-incoming`, over a unix socket, with the gio
//! workload (tests/guest/gio.c) running in it.
//!
//! Why the guest has one vCPU here: QEMU 7.2 under TCG corrupts guest
//! memory when a busy guest migrates with `-smp 2` (with or without
//! `-accel tcg,thread=single`), and also when a busy guest that itself
//! arrived by migration migrates again, whatever its disk is (a QEMU-native
//! virtio-blk disk, qemu-storage-daemon, or no disk I/O at all: a guest
//! writing its page cache breaks the same way). A freshly booted one-vCPU
//! guest mostly migrates fine, but not reliably either; a guest paused
//! for the RAM copy always does. So the tests pause the source right after
//! the migration's setup ([`Mode::PauseAfterSetup`]): QEMU has turned on
//! dirty logging by then (a backend sees `VHOST_F_LOG_ALL` before its rings
//! stop, as in a live migration's switch-over), the guest's in-flight
//! requests are still in flight when its devices stop, and the guest runs
//! on the destination afterwards.
//!
//! qemu-storage-daemon 7.2 under a busy guest, live: the destination's
//! I/O hung for good after the first migration, and qsd logged `vu_panic:
//! Error writing eventfd: Bad file descriptor` (libvhost-user closes a
//! ring's call eventfd when it answers `GET_VRING_BASE`; a request that
//! completes later panics the device). With the guest stopped before the
//! migration (no dirty logging reaches a stopped device) it migrated 3 of 3
//! times.
#![allow(dead_code)]

use super::gio;
use super::vm::Vm;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// vCPUs of a guest that migrates (see the module's note).
pub const SMP: u32 = 1;

/// The migration stream's socket for migration `n` in `work`.
pub fn uri(work: &Path, n: u32) -> String {
    format!("unix:{}", work.join(format!("mig{n}.sock")).display())
}

/// What `query-migrate` reported for a completed migration.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// `total-time`, ms.
    pub total_ms: u64,
    /// `downtime`, ms.
    pub downtime_ms: u64,
}

/// How the guest migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Live: the guest runs until the switch-over.
    Live,
    /// `stop` as soon as the migration left its setup (dirty logging is
    /// on), `cont` on the destination.
    PauseAfterSetup,
}

/// Sets the migration's bandwidth limit in bytes/s.
pub fn set_bandwidth(vm: &mut Vm, bytes: u64) {
    vm.qmp
        .execute("migrate-set-parameters", json!({ "max-bandwidth": bytes }));
}

/// Turns migration capabilities on (QMP `migrate-set-capabilities`).
pub fn set_caps(vm: &mut Vm, caps: &[&str]) {
    let caps: Vec<Value> = caps.iter().map(|c| json!({"capability": c, "state": true})).collect();
    vm.qmp
        .execute("migrate-set-capabilities", json!({ "capabilities": caps }));
}

/// Starts a migration of `src` to `uri` (a `-incoming` QEMU listens there)
/// at the bandwidth set before.
pub fn start(src: &mut Vm, uri: &str) {
    src.qmp.execute("migrate", json!({ "uri": uri }));
}

/// Polls the source's `query-migrate` until `want` (at most `limit`);
/// fails the test with both QEMUs' output when the migration fails.
pub fn wait(src: &mut Vm, dst: &Vm, want: &[&str], limit: Duration) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let st = src.qmp.execute("query-migrate", json!({}));
        let status = st["status"].as_str().unwrap_or("").to_string();
        if want.contains(&status.as_str()) {
            return st;
        }
        assert!(
            !["failed", "cancelled"].contains(&status.as_str()) && std::time::Instant::now() < deadline,
            "migration {status} (waiting for {want:?} for at most {limit:?}): {st}\n--- source QEMU stderr:\n{}\n--- destination QEMU stderr:\n{}\n--- destination console:\n{}",
            src.stderr(),
            dst.stderr(),
            dst.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrates `src` to `dst` (listening on `uri`) and waits until the
/// destination runs; the source stays, paused, until the caller ends it.
pub fn migrate(src: &mut Vm, dst: &mut Vm, uri: &str, mode: Mode) -> Figures {
    set_bandwidth(src, 100_000_000_000);
    start(src, uri);
    if mode == Mode::PauseAfterSetup {
        loop {
            let st = src.qmp.execute("query-migrate", json!({}));
            if st["status"] != "setup" {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        src.qmp.execute("stop", json!({}));
    }
    let st = wait(src, dst, &["completed"], Duration::from_secs(180));
    if mode == Mode::PauseAfterSetup {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while dst.qmp.execute("query-status", json!({}))["status"] != "paused" {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: not paused after the migration",
                dst.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        dst.qmp.execute("cont", json!({}));
    }
    dst.wait_running(Duration::from_secs(60));
    let ms = |k: &str| {
        st[k]
            .as_u64()
            .unwrap_or_else(|| panic!("query-migrate has no {k}: {st}"))
    };
    Figures {
        total_ms: ms("total-time"),
        downtime_ms: ms("downtime"),
    }
}

/// Ends a migrated-away source QEMU (QMP `quit`).
pub fn quit(src: &mut Vm) {
    src.qmp.send_quit();
    src.wait_exit(Duration::from_secs(60));
}

/// Tells gio migration `n` is about to start; returns the I/Os it had in
/// progress.
pub fn announce(vm: &mut Vm, n: u32) -> u64 {
    let mark = vm.mark();
    vm.send(&format!("M{n}"));
    let (_, ack) = vm.wait_line(mark, &format!("GIO-MIGRATE-ACK n={n} "), Duration::from_secs(60));
    gio::fields(&ack)["inflight"].parse().unwrap()
}

/// The guest lines that mean gio or the guest kernel failed.
pub const FAILED: &[&str] = &[
    "GIO-ERROR",
    "GIO-VERIFY-FAIL",
    "GIO-HOLD-FAIL",
    "GIO-HUNG",
    "GIO-FATAL",
    "is not a head",
    "I/O error",
    "Kernel panic",
    "BUG:",
    "Oops",
];

/// After migration (or cancelled migration) `n`: gio re-checks the buffers
/// its holders keep in guest memory (with `holders`), then every writer must
/// finish two more generations. Fails the test on any failure line; returns
/// how many held buffers were checked.
pub fn resumed(vm: &mut Vm, n: u32, holders: bool, what: &str) -> u64 {
    let mark = vm.mark();
    let mut checked = 0;
    if holders {
        vm.send(&format!("V{n}"));
        let want = format!("GIO-HELD-CHECKED n={n} ");
        let (_, line) = vm.wait_any(mark, &[&[want.as_str()], FAILED].concat(), Duration::from_secs(60));
        assert!(line.contains(&want), "{what}: {line}\n--- console:\n{}", vm.console());
        let f = gio::fields(&line);
        assert_eq!(f["hold_failures"], "0", "{what}: {line}\n{}", vm.console());
        checked = f["checked"].parse().unwrap();
    }
    vm.send(&format!("W{n}"));
    let want = format!("GIO-RESUMED n={n} ");
    let (_, line) = vm.wait_any(mark, &[&[want.as_str()], FAILED].concat(), Duration::from_secs(90));
    assert!(
        line.contains(&want),
        "{what}: the guest failed: {line}\n--- console:\n{}\n--- QEMU stderr:\n{}",
        vm.console(),
        vm.stderr()
    );
    checked
}
