//! The daemon's side of `spindle vm snapshot --live`: the guest runs while
//! QEMU pre-copies its RAM into the VM-state disk, and stops at the
//! switch-over (QEMU's `pause-before-switchover`), when the disks are
//! quiesced and snapshotted.
//!
//! - `keep_image` marks the exports whose frontend migrates into the
//!   snapshot: their device stop at the switch-over, with dirty logging
//!   on, keeps the image open here instead of handing it over as for a
//!   migration to another host (docs/serve.md, "Live migration").
//! - A live `snapshot_create` streams without quiescing the export first,
//!   and takes the snapshot only if the export is quiesced when the
//!   stream ends ([`QuiescedAtEnd`]): the disk is then as it was at the
//!   switch-over.

use super::server::Server;
use crate::error::CliResult;
use serde_json::{json, Value};
use spindle_export::quiesce::Gate;
use spindle_vhost::Export;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How long a `keep_image` lasts without being cleared (default).
const DEFAULT_LEASE: u64 = 600;

static KEEPS: Mutex<Vec<(Weak<Export>, u64)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

fn keeps() -> std::sync::MutexGuard<'static, Vec<(Weak<Export>, u64)>> {
    KEEPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `keep_image`: sets or clears export `name`'s keep-image mark; a set
/// mark clears itself after `lease_s`.
pub fn keep_image(server: &Server, name: &str, keep: bool, lease_s: Option<u64>) -> CliResult<Value> {
    let (export, _) = server.running(name)?;
    let mut k = keeps();
    k.retain(|(e, _)| e.upgrade().is_some_and(|e| !Arc::ptr_eq(&e, &export)));
    export.dev.set_keep_image(keep);
    if !keep {
        return Ok(json!({"ok": true, "name": name, "keep": false}));
    }
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    k.push((Arc::downgrade(&export), id));
    let lease = lease_s.unwrap_or(DEFAULT_LEASE).clamp(1, 24 * 3600);
    let label = name.to_string();
    let _ = std::thread::Builder::new().name("keep-lease".into()).spawn(move || {
        std::thread::sleep(Duration::from_secs(lease));
        let mut k = keeps();
        if let Some(i) = k.iter().position(|(_, x)| *x == id) {
            if let Some(e) = k.remove(i).0.upgrade() {
                e.dev.set_keep_image(false);
            }
            tracing::warn!("export '{label}': keep_image not cleared within {lease} s; cleared");
        }
    });
    Ok(json!({"ok": true, "name": name, "keep": true, "lease_s": lease}))
}

/// A VM-state stream that fails at its end unless the export is
/// quiesced then.
pub struct QuiescedAtEnd<R> {
    inner: R,
    gate: Arc<Gate>,
    name: String,
}

impl<R> QuiescedAtEnd<R> {
    /// `inner`, checked against `export`'s gate at its end.
    pub fn new(inner: R, export: &Export) -> Self {
        QuiescedAtEnd {
            inner,
            gate: export.dev.gate().clone(),
            name: export.dev.cfg.name.clone(),
        }
    }
}

impl<R: Read> Read for QuiescedAtEnd<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.gate.is_held() {
            return Err(std::io::Error::other(format!(
                "export '{}' was not quiesced when the live VM state ended (quiesce it at the switch-over)",
                self.name
            )));
        }
        Ok(n)
    }
}
