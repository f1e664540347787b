//! `spindle img amend`: change qcow2 options in place.

use super::{format_arg, parse_opts};
use crate::error::{CliResult, Error};
use spindle_block::Node;
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Format (must be qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options: compat=0.10|1.1, lazy_refcounts=on|off.
    #[arg(short = 'o', required = true)]
    options: Vec<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    filename: String,
}

pub async fn run(a: Args) -> CliResult<()> {
    let node = super::open(
        &a.filename,
        format_arg(&a.format)?,
        CacheMode::Writeback,
        super::Access::Write,
    )?;
    let Node::Qcow2(q) = &node else {
        return Err(Error::Usage(format!(
            "{}: amend supports qcow2 images only",
            a.filename
        )));
    };
    for (k, v) in parse_opts(&a.options)? {
        match (k.as_str(), v.as_str()) {
            ("compat", "0.10" | "v2") => q.set_version(2).await?,
            ("compat", "1.1" | "v3") => q.set_version(3).await?,
            ("lazy_refcounts", "on" | "true") => q.set_lazy_refcounts(true).await?,
            ("lazy_refcounts", "off" | "false") => q.set_lazy_refcounts(false).await?,
            _ => {
                return Err(Error::Usage(format!(
                    "amend cannot change '{k}={v}' (supported: compat=0.10|1.1, lazy_refcounts=on|off)"
                )))
            }
        }
    }
    Ok(node.close().await?)
}
