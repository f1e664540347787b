//! `overlay`: a live external snapshot, like QEMU's
//! `blockdev-snapshot-sync`. A new qcow2 image whose backing file is the
//! export's current image (its format recorded) is created, and the export
//! switches to it (`Ctx::pivot`): the old image becomes a read-only
//! backing file, locked as QEMU locks backing files (read held, writers
//! kept out). On any failure the export serves its old image unchanged
//! and the new file is removed.

use super::super::server::Server;
use super::chain::{canonical, open_chain, refused, Ctx};
use crate::error::CliResult;
use serde_json::{json, Value};
use spindle_block::formats::qcow2::{self, CreateOptions};
use std::path::Path;

/// Creates `image` on top of export `name`'s chain and serves it.
pub fn run(server: &Server, name: &str, image: &Path) -> CliResult<Value> {
    let ctx = Ctx::of(server, name)?;
    if !image.is_absolute() {
        return Err(refused(format!(
            "{}: give the new image as an absolute path",
            image.display()
        )));
    }
    if std::fs::symlink_metadata(image).is_ok() {
        return Err(refused(format!(
            "{} exists already; an overlay is a new file",
            image.display()
        )));
    }
    if let Some(job) = super::table::running(name) {
        return Err(refused(format!(
            "export '{name}' has a {} job running (id {}); wait for it or cancel it",
            job.kind, job.id
        )));
    }
    let _changing = ctx.change_lock()?;
    let rt = ctx.runtime()?;
    let node = ctx.node(None)?;
    if node.info().format == "null" {
        return Err(refused(format!(
            "export '{name}' serves a null device; it has no file to overlay"
        )));
    }
    let backing = canonical(node.path());
    let backing_str = backing
        .to_str()
        .ok_or_else(|| refused(format!("{}: not a UTF-8 path", backing.display())))?
        .to_string();
    let opts = CreateOptions {
        size: ctx.export.dev.capacity(),
        backing_file: Some(backing_str.clone()),
        backing_format: Some(node.info().format.to_string()),
        cluster_size: node.info().cluster_size.unwrap_or(65536).clamp(4096, 2 << 20),
        ..Default::default()
    };
    rt.block_on(qcow2::create(image, &opts))?;
    let image_str = image.to_string_lossy().into_owned();
    let cfg = ctx.open_config(&node, vec![backing.clone()])?;
    drop(node);
    let res = ctx.pivot(&rt, |_| async { Ok(()) }, || open_chain(image, &cfg), &image_str, &cfg);
    if let Err(e) = res {
        let _ = std::fs::remove_file(image);
        return Err(refused(format!(
            "export '{name}': overlay {}: {e}; it still serves {backing_str}",
            image.display()
        )));
    }
    Ok(json!({"ok": true, "name": name, "image": image_str, "backing": backing_str}))
}
