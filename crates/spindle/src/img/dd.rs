//! `spindle img dd`: dd-style copy with qemu-img's operands.

use super::{format_arg, size_arg};
use crate::error::{CliResult, Error};
use spindle_block::formats::qcow2::CreateOptions;
use spindle_block::{Format, SgList};
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Input format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Operands: if=FILE of=FILE [bs=N] [count=N] [skip=N].
    operands: Vec<String>,
}

pub async fn run(a: Args) -> CliResult<()> {
    let (mut input, mut output, mut bs, mut count, mut skip) = (None, None, 512u64, None, 0u64);
    for op in &a.operands {
        let (k, v) = op
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("dd operand '{op}' is not KEY=VALUE")))?;
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => bs = size_arg(v)?,
            "count" => {
                count = Some(
                    v.parse::<u64>()
                        .map_err(|_| Error::Usage(format!("invalid count '{v}'")))?,
                )
            }
            "skip" => {
                skip = v
                    .parse::<u64>()
                    .map_err(|_| Error::Usage(format!("invalid skip '{v}'")))?
            }
            _ => {
                return Err(Error::Usage(format!(
                    "unknown dd operand '{k}' (if, of, bs, count, skip)"
                )))
            }
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(Error::Usage("dd needs if=INPUT and of=OUTPUT".into()));
    };
    if bs == 0 || bs > 64 << 20 {
        return Err(Error::Usage("bs must be between 1 byte and 64 MiB".into()));
    }
    let access = super::Access::Look {
        force_share: a.force_share,
    };
    let src = super::open(&input, format_arg(&a.format)?, CacheMode::Writeback, access)?;
    let start = skip
        .checked_mul(bs)
        .filter(|&s| s <= src.size())
        .ok_or_else(|| Error::Usage(format!("skip={skip} blocks of {bs} bytes is past the end of {input}")))?;
    let mut len = src.size() - start;
    if let Some(c) = count {
        len = len.min(c.saturating_mul(bs));
    }
    let out_fmt: Format = a.out_format.parse()?;
    super::create::create_image(
        &output,
        out_fmt,
        &[],
        CreateOptions {
            size: len,
            ..Default::default()
        },
    )
    .await?;
    let dst = super::open(&output, Some(out_fmt), CacheMode::Writeback, super::Access::Write)?;
    let buf = SgList::zeroed(bs.max(1 << 20) as usize);
    let mut pos = 0;
    while pos < len {
        let n = (buf.len() as u64).min(len - pos) as usize;
        let part = buf.slice(0, n);
        src.read(start + pos, &part).await?;
        if !part.is_zero() {
            dst.write(pos, &part, false).await?;
        }
        pos += n as u64;
    }
    Ok(dst.close().await?)
}
