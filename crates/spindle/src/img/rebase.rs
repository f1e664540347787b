//! `spindle img rebase`: change an image's backing file, keeping what the
//! guest sees (safe mode) or only the header (`-u`).

use super::{format_arg, Access};
use crate::error::{CliResult, Error};
use spindle_block::{BlockStatus, Format, Node};
use spindle_io::CacheMode;
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image (must be qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Unsafe: change the header only.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// New backing file ("" for none).
    #[arg(short = 'b', required = true)]
    backing: String,
    /// New backing format.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Image file.
    filename: String,
}

pub async fn run(a: Args) -> CliResult<()> {
    let cfg = spindle_block::OpenConfig {
        format: format_arg(&a.format)?,
        cache: CacheMode::Writeback,
        open_backing: !a.unsafe_mode,
        ..super::open_config(None, CacheMode::Writeback, Access::Write)
    };
    let node = super::open_with(&a.filename, &cfg, Access::Write)?;
    let Node::Qcow2(q) = &node else {
        return Err(Error::Usage(format!(
            "{}: only qcow2 images have a backing file",
            a.filename
        )));
    };
    let new_name = (!a.backing.is_empty()).then(|| a.backing.clone());
    let mut new_fmt = a.backing_format.clone();
    let new_node = match &new_name {
        Some(b) => {
            let path = spindle_block::backing_path(Path::new(&a.filename), b)?;
            let fmt: Option<Format> = format_arg(&new_fmt)?;
            if new_fmt.is_none() && !a.unsafe_mode {
                new_fmt = Some(spindle_block::probe(&path)?.name().to_string());
            }
            if a.unsafe_mode {
                None
            } else {
                Some(super::open(
                    path.to_str().unwrap_or(b),
                    fmt,
                    CacheMode::Writeback,
                    Access::Read,
                )?)
            }
        }
        None => None,
    };
    if !a.unsafe_mode {
        copy_differences(&node, new_node.as_ref()).await?;
    }
    q.set_backing(new_name, new_fmt).await?;
    Ok(node.close().await?)
}

/// Where the image defers to its backing file, and the old and new backing
/// files differ, write the old contents into the image.
async fn copy_differences(node: &Node, new: Option<&Node>) -> CliResult<()> {
    const CHUNK: u64 = 1 << 20;
    let size = node.size();
    let mut old_buf = vec![0u8; CHUNK as usize];
    let mut new_buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let (st, n) = node.block_status(pos, CHUNK.min(size - pos)).await?;
        let n = n.max(1);
        if st == BlockStatus::Unallocated {
            let (o, w) = (&mut old_buf[..n as usize], &mut new_buf[..n as usize]);
            read_or_zero(node.backing(), pos, o).await?;
            read_or_zero(new, pos, w).await?;
            if o != w {
                node.write_from(pos, o, false).await?;
            }
        }
        pos += n;
    }
    Ok(())
}

async fn read_or_zero(n: Option<&Node>, pos: u64, buf: &mut [u8]) -> CliResult<()> {
    buf.fill(0);
    if let Some(n) = n {
        let inside = (n.size().saturating_sub(pos)).min(buf.len() as u64) as usize;
        if inside > 0 {
            n.read_into(pos, &mut buf[..inside]).await?;
        }
    }
    Ok(())
}
