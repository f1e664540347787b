//! `spindle img resize`.

use super::{format_arg, size_arg};
use crate::error::{CliResult, Error};
use spindle_io::CacheMode;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Format (probed if not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    filename: String,
    /// New size, or +SIZE / -SIZE relative to the current one.
    size: String,
}

pub async fn run(a: Args) -> CliResult<()> {
    let node = super::open(
        &a.filename,
        format_arg(&a.format)?,
        CacheMode::Writeback,
        super::Access::Write,
    )?;
    let cur = node.size();
    let new = if let Some(s) = a.size.strip_prefix('+') {
        cur.checked_add(size_arg(s)?)
    } else if let Some(s) = a.size.strip_prefix('-') {
        cur.checked_sub(size_arg(s)?)
    } else {
        Some(size_arg(&a.size)?)
    }
    .ok_or_else(|| Error::Usage(format!("new size {} is out of range", a.size)))?;
    node.resize(new, a.shrink).await?;
    node.close().await?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(())
}
