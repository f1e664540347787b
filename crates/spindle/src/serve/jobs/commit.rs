//! `commit`: merges a layer of the export's chain down into a lower one
//! (`base`, by default the layer's backing file) while the guest runs,
//! like QEMU's `block-commit`.
//!
//! The base is opened writable beside the chain (the chain's read-only
//! open of it lets writers in for the job's length, as QEMU's commit
//! takes write permission on its base). Every range defined in a layer
//! from `top` down to above `base` is copied as `top` reads it. The chain
//! the guest reads is unchanged meanwhile: what lands in `base` is hidden
//! by the layers above it.
//!
//! - Active commit (`top` is the active layer): the guest's writes are
//!   recorded while the job runs (`Device::track_writes`, after each
//!   write completed), copied again in rounds, and at the end, paused, the
//!   last ones are copied and the export switches to `base` itself (the
//!   job's writable open, so no image is reopened). The old top is left
//!   closed clean, as QEMU leaves it.
//! - Intermediate commit (`top` is the active layer's backing file):
//!   nothing writes `top`; at the end, paused, the active layer's backing
//!   link is pointed at `base` (as `rebase -u`) and the active layer is
//!   opened again over the shorter chain.
//!
//! A cancel or a failure stops recording, gives the chain's open of
//! `base` its locks back and drops the writable one: the guest's disk is
//! as it was.

use super::super::server::Server;
use super::chain::{canonical, copy_range, defined_above, depth_of, open_chain, refused, Ctx, CHUNK};
use super::table::{self, Job};
use crate::error::{CliResult, Error};
use spindle_block::{Format, Node, OpenConfig};
use spindle_export::written::Written;
use spindle_io::{Locking, Perms};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Written bytes left for the paused last round of an active commit.
const LAST_ROUND: u64 = 16 << 20;
/// Rounds of copying written ranges before the last one is taken anyway.
const ROUNDS: usize = 16;

/// What a commit works on, by depth in the chain (0: the active layer).
struct Plan {
    top: usize,
    base: usize,
    base_path: PathBuf,
    base_format: Format,
}

/// Starts a commit job on export `name`; returns its id.
pub fn start(server: &Server, name: &str, base: Option<&Path>, top: Option<&Path>, speed: u64) -> CliResult<u64> {
    let ctx = Ctx::of(server, name)?;
    let node = ctx.node(None)?;
    let top = match top {
        Some(t) => depth_of(&node, t, name)?,
        None => 0,
    };
    if top > 1 {
        return Err(refused(format!(
            "export '{name}': committing a layer below the active layer's backing file is not supported; \
             commit the layers above it first"
        )));
    }
    let layers = super::chain::layers(&node);
    let base = match base {
        Some(b) => depth_of(&node, b, name)?,
        None => top + 1,
    };
    let Some(base_node) = layers.get(base).filter(|_| base > top) else {
        return Err(refused(format!(
            "export '{name}': {} has no backing file below it to commit into",
            layers[top].path().display()
        )));
    };
    if base_node.size() < node.size() {
        return Err(refused(format!(
            "export '{name}': the base {} is smaller than the disk; grow it first",
            base_node.path().display()
        )));
    }
    let plan = Plan {
        top,
        base,
        base_path: canonical(base_node.path()),
        base_format: base_node.info().format.parse()?,
    };
    drop(layers);
    let job = table::register("commit", name, node.size(), speed)?;
    let id = job.id;
    let thread_job = job.clone();
    let spawned = std::thread::Builder::new().name(format!("commit-{id}")).spawn(move || {
        let res = run(&ctx, &thread_job, node, &plan);
        thread_job.finish(res);
    });
    if let Err(e) = spawned {
        job.finish(Err(refused(format!("cannot start the job's thread: {e}"))));
        return Err(refused(format!("cannot start the job's thread: {e}")));
    }
    Ok(id)
}

fn run(ctx: &Ctx, job: &Job, node: Arc<Node>, plan: &Plan) -> CliResult<()> {
    let rt = ctx.runtime()?;
    let chain_base = super::chain::layers(&node)[plan.base];
    let chain_base_file = chain_base
        .file()
        .ok_or_else(|| refused("the base has no file".into()))?;
    let read_lock = OpenConfig::default().locking(plan.base_format, true);
    // Let the job's writer in beside the chain's reader.
    chain_base_file.set_locks(Locking {
        hold: Perms::CONSISTENT_READ,
        share: Perms::ALL,
    })?;
    let cfg = OpenConfig {
        format: Some(plan.base_format),
        read_only: false,
        ..ctx.open_config(&node, Vec::new())?
    };
    let mut base_w = match open_chain(&plan.base_path, &cfg) {
        Ok(b) => Some(b),
        Err(e) => {
            let _ = chain_base_file.set_locks(read_lock);
            return Err(e);
        }
    };
    let granule = node.info().cluster_size.unwrap_or(65536);
    let written = (plan.top == 0).then(|| Arc::new(Written::new(node.size(), granule)));
    if let Some(w) = &written {
        ctx.export.dev.track_writes(Some(w.clone()));
    }
    let res = copy_all(ctx, job, &rt, &node, plan, &mut base_w, written.as_deref());
    if res.is_err() {
        ctx.export.dev.track_writes(None);
        // Taken back while the job's writer still keeps others out.
        let _ = chain_base_file.set_locks(read_lock);
    }
    if let Some(b) = base_w.take() {
        let _ = rt.block_on(b.close());
    }
    res
}

/// The copy, the rounds of written ranges, and the switch, which takes
/// the writer (`base_w`) when it serves it.
fn copy_all(
    ctx: &Ctx,
    job: &Job,
    rt: &spindle_io::Runtime,
    node: &Arc<Node>,
    plan: &Plan,
    base_w: &mut Option<Node>,
    written: Option<&Written>,
) -> CliResult<()> {
    let base = base_w.as_ref().ok_or_else(|| refused("no base".into()))?;
    let top = super::chain::layers(node)[plan.top];
    let size = node.size();
    let step = CHUNK.max(node.info().cluster_size.unwrap_or(0));
    let mut pos = 0;
    while pos < size {
        job.check()?;
        ctx.node(Some(node))?;
        let end = (pos + step).min(size);
        let copied = rt.block_on(async {
            let mut copied = 0;
            let mut p = pos;
            while p < end {
                let (defined, n) = defined_above(top, p, end - p, plan.base - plan.top).await?;
                let n = n.min(end - p);
                if defined {
                    copied += copy_range(top, base, p, n).await?;
                }
                p += n;
            }
            Ok::<u64, Error>(copied)
        })?;
        job.done.store(end, Ordering::Release);
        job.copied(copied)?;
        pos = end;
    }
    let Some(written) = written else {
        return switch_intermediate(ctx, rt, node, plan, base);
    };
    // Rounds of what the guest wrote meanwhile, until little is left.
    for _ in 0..ROUNDS {
        let ranges = written.take();
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        job.total.fetch_add(bytes, Ordering::AcqRel);
        copy_ranges(rt, top, base, &ranges, Some(job))?;
        job.done.fetch_add(bytes, Ordering::AcqRel);
        if bytes <= LAST_ROUND {
            break;
        }
    }
    job.check()?;
    switch_active(ctx, rt, node, plan, base_w, written)
}

fn copy_ranges(
    rt: &spindle_io::Runtime,
    src: &Node,
    dst: &Node,
    ranges: &[(u64, u64)],
    job: Option<&Job>,
) -> CliResult<()> {
    for &(off, len) in ranges {
        let mut p = off;
        while p < off + len {
            let n = CHUNK.min(off + len - p);
            let c = rt.block_on(copy_range(src, dst, p, n))?;
            if let Some(j) = job {
                j.copied(c)?;
            }
            p += n;
        }
    }
    Ok(())
}

/// Paused: the last written ranges go to the base, and the export serves
/// the base (the job's writable open of it).
fn switch_active(
    ctx: &Ctx,
    rt: &spindle_io::Runtime,
    node: &Arc<Node>,
    plan: &Plan,
    base_w: &mut Option<Node>,
    written: &Written,
) -> CliResult<()> {
    let _changing = ctx.change_lock()?;
    ctx.node(Some(node))?;
    let base = base_w.as_ref().ok_or_else(|| refused("no base".into()))?;
    let pause = ctx.export.pause(super::chain::PAUSE_DRAIN).map_err(refused)?;
    copy_ranges(rt, node, base, &written.take(), None)?;
    rt.block_on(base.flush())?;
    rt.block_on(node.close())?;
    let image = plan.base_path.to_string_lossy().into_owned();
    let cfg = ctx.open_config(node, Vec::new())?;
    let format = base.info().format;
    let reopen = super::super::spec::ExportSpec::reopen_at(&image, &cfg);
    let base = base_w.take().ok_or_else(|| refused("no base".into()))?;
    let old = ctx.export.dev.slot.replace(base, Some(reopen))?;
    ctx.export.dev.track_writes(None);
    drop(pause);
    drop(old);
    (ctx.set_image)(&image, format);
    tracing::info!(export = %ctx.name, image, "commit done: the export serves its base");
    Ok(())
}

/// Paused: the active layer's backing link names the base, and the
/// active layer is opened again over the shorter chain (its locks and the
/// base's inherited: the job's writer still holds the base).
fn switch_intermediate(
    ctx: &Ctx,
    rt: &spindle_io::Runtime,
    node: &Arc<Node>,
    plan: &Plan,
    base: &Node,
) -> CliResult<()> {
    rt.block_on(base.flush())?;
    let _changing = ctx.change_lock()?;
    ctx.node(Some(node))?;
    let active = canonical(node.path());
    let image = active.to_string_lossy().into_owned();
    let cfg = ctx.open_config(node, vec![active.clone(), plan.base_path.clone()])?;
    let link = plan.base_path.to_string_lossy().into_owned();
    let fmt = plan.base_format.name().to_string();
    ctx.pivot(
        rt,
        |old| async move {
            let Node::Qcow2(q) = &*old else {
                return Err(refused("the active layer is no longer qcow2".into()));
            };
            Ok(q.set_backing(Some(link), Some(fmt)).await?)
        },
        || open_chain(&active, &cfg),
        &image,
        &cfg,
    )
}
