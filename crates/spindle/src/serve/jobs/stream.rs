//! `stream`: copies the backing chain's data into the export's top image
//! while the guest runs, then drops the backing link (or points it at
//! `base`), like QEMU's `block-stream`.
//!
//! Only ranges unallocated in the top and defined in a layer above `base`
//! are copied, with copy-on-read semantics: `Qcow2::write_unallocated`
//! checks and allocates under the image's range lock, so a guest write
//! that landed meanwhile is never overwritten. The backing files are
//! read-only and nobody writes them, so what is copied is what the guest
//! reads there. Until the switch at the end the guest's view is unchanged
//! whatever happens (cancel, failure, `kill -9`): the chain is the same
//! and the top only got, where it deferred to its backing file, the data
//! that file holds.

use super::super::server::Server;
use super::chain::{canonical, defined_above, depth_of, open_chain, refused, Ctx, CHUNK};
use super::table::{self, Job};
use crate::error::CliResult;
use spindle_block::{BlockStatus, Node, SgList};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Starts a stream job on export `name`; returns its id.
pub fn start(server: &Server, name: &str, base: Option<&Path>, speed: u64) -> CliResult<u64> {
    let ctx = Ctx::of(server, name)?;
    let node = ctx.node(None)?;
    let Node::Qcow2(q) = &*node else {
        return Err(refused(format!(
            "export '{name}' serves a {} image; stream copies into a qcow2 top image",
            node.info().format
        )));
    };
    if node.backing().is_none() {
        return Err(refused(format!(
            "export '{name}': its image has no backing file to stream from"
        )));
    }
    if q.info().qcow2.is_some_and(|i| i.extended_l2) {
        return Err(refused(format!(
            "export '{name}': stream does not support extended L2 entries (subclusters) yet"
        )));
    }
    let limit = match base {
        Some(b) => match depth_of(&node, b, name)? {
            0 => {
                return Err(refused(format!(
                    "export '{name}': the base {} is the top image",
                    b.display()
                )))
            }
            d => d,
        },
        None => usize::MAX,
    };
    let job = table::register("stream", name, node.size(), speed)?;
    let id = job.id;
    let (thread_job, base) = (job.clone(), base.map(Path::to_path_buf));
    let spawned = std::thread::Builder::new().name(format!("stream-{id}")).spawn(move || {
        let res = run(&ctx, &thread_job, node, limit, base.as_deref());
        thread_job.finish(res);
    });
    if let Err(e) = spawned {
        job.finish(Err(refused(format!("cannot start the job's thread: {e}"))));
        return Err(refused(format!("cannot start the job's thread: {e}")));
    }
    Ok(id)
}

fn run(ctx: &Ctx, job: &Job, node: Arc<Node>, limit: usize, base: Option<&Path>) -> CliResult<()> {
    let rt = ctx.runtime()?;
    let size = node.size();
    let step = CHUNK.max(node.info().cluster_size.unwrap_or(0));
    let mut pos = 0;
    while pos < size {
        job.check()?;
        ctx.node(Some(&node))?;
        let end = (pos + step).min(size);
        let copied = rt.block_on(copy_chunk(&node, pos, end, limit))?;
        job.done.store(end, Ordering::Release);
        job.copied(copied)?;
        pos = end;
    }
    // The switch: the backing link changes on disk while paused, then the
    // top is opened again (its own locks inherited) over the new chain.
    let _changing = ctx.change_lock()?;
    job.check()?;
    ctx.node(Some(&node))?;
    let top = canonical(node.path());
    let top_str = top.to_string_lossy().into_owned();
    let new_backing = match base {
        Some(b) => {
            let layer = super::chain::layers(&node)[limit];
            Some((
                canonical(b).to_string_lossy().into_owned(),
                layer.info().format.to_string(),
            ))
        }
        None => None,
    };
    let cfg = ctx.open_config(&node, vec![top.clone()])?;
    drop(node);
    ctx.pivot(
        &rt,
        |old| async move {
            let Node::Qcow2(q) = &*old else {
                return Err(refused("the top image is no longer qcow2".into()));
            };
            let (name, fmt) = new_backing.unzip();
            Ok(q.set_backing(name, fmt).await?)
        },
        || open_chain(&top, &cfg),
        &top_str,
        &cfg,
    )
}

/// Copies what `[pos, end)` needs from the backing chain into the top.
async fn copy_chunk(node: &Node, pos: u64, end: u64, limit: usize) -> CliResult<u64> {
    let Node::Qcow2(q) = node else { return Ok(0) };
    let Some(backing) = node.backing() else { return Ok(0) };
    let cs = q.cluster_size();
    let mut copied = 0;
    let mut p = pos;
    while p < end {
        let (st, n) = node.block_status(p, end - p).await?;
        let n = n.max(1);
        if st == BlockStatus::Unallocated {
            let mut b = p;
            let run_end = p + n;
            while b < run_end {
                let (defined, m) = match b < backing.size() {
                    // Depths counted from the top: the backing file is 1.
                    true => defined_above(backing, b, run_end - b, limit.saturating_sub(1)).await?,
                    false => (false, run_end - b),
                };
                let m = m.min(run_end - b);
                if defined {
                    copied += copy_in(q, backing, b, m, cs).await?;
                }
                b += m;
            }
        }
        p += n;
    }
    Ok(copied)
}

/// Writes the backing file's data of `[pos, pos+len)` into the top where
/// it is still unallocated: in one write, or cluster by cluster when the
/// guest allocated part of the range meanwhile.
async fn copy_in(
    q: &spindle_block::formats::qcow2::Qcow2,
    backing: &Node,
    pos: u64,
    len: u64,
    cs: u64,
) -> CliResult<u64> {
    let inside = len.min(backing.size().saturating_sub(pos));
    let buf = SgList::zeroed(len as usize);
    backing.read(pos, &buf.slice(0, inside as usize)).await?;
    if q.write_unallocated(pos, &buf).await? {
        return Ok(len);
    }
    let mut copied = 0;
    let mut c = pos;
    while c < pos + len {
        let n = (cs - c % cs).min(pos + len - c);
        if q.write_unallocated(c, &buf.slice((c - pos) as usize, n as usize))
            .await?
        {
            copied += n;
        }
        c += n;
    }
    Ok(copied)
}
