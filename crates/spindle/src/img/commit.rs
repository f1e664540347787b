//! `spindle img commit`: write an image's data into its backing file.

use super::{format_arg, Access};
use crate::error::{CliResult, Error};
use spindle_block::{BlockStatus, Node, SgList};
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Do not empty the image after committing.
    #[arg(short = 'd')]
    keep: bool,
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
    // Only the image's own clusters are copied: no need to read through
    // its backing file, which is opened once, writable, below.
    let cfg = spindle_block::OpenConfig {
        open_backing: false,
        ..super::open_config(format_arg(&a.format)?, CacheMode::Writeback, Access::Write)
    };
    let top = super::open_with(&a.filename, &cfg, Access::Write)?;
    let Node::Qcow2(q) = &top else {
        return Err(Error::Usage(format!(
            "{}: only qcow2 images have a backing file to commit to",
            a.filename
        )));
    };
    let info = top.info();
    let Some(backing) = &info.backing_file else {
        return Err(Error::Usage(format!("{}: image has no backing file", a.filename)));
    };
    let fmt = format_arg(&info.backing_format)?;
    let bpath = spindle_block::backing_path(std::path::Path::new(&a.filename), backing)?;
    let base = super::open(
        bpath.to_str().unwrap_or(backing),
        fmt,
        CacheMode::Writeback,
        Access::Write,
    )?;
    if base.size() < top.size() {
        base.resize(top.size(), false).await?;
    }
    const CHUNK: u64 = 2 << 20;
    let buf = SgList::zeroed(CHUNK as usize);
    let mut pos = 0;
    let size = top.size();
    while pos < size {
        let (st, n) = top.block_status(pos, CHUNK.min(size - pos)).await?;
        let n = n.max(1);
        match st {
            BlockStatus::Data { .. } => {
                let b = buf.slice(0, n as usize);
                top.read(pos, &b).await?;
                base.write(pos, &b, false).await?;
            }
            BlockStatus::Zero => base.write_zeroes(pos, n, false).await?,
            BlockStatus::Unallocated => {}
        }
        pos += n;
    }
    base.close().await?;
    if !a.keep {
        q.make_empty().await?;
    }
    top.close().await?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(())
}
