//! `spindle img measure`: file size needed for an image, like qemu-img measure.

use super::{create::qcow2_options, format_arg, parse_opts, size_arg};
use crate::error::{CliResult, Error};
use serde_json::json;
use spindle_block::formats::qcow2::{measure, CreateOptions};
use spindle_block::{Format, Node};
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Output format of the image to be created.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Creation options.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure a new image of this size instead of an input file.
    #[arg(long)]
    size: Option<String>,
    /// Input format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long, default_value = "human")]
    output: String,
    /// Input image.
    filename: Option<String>,
}

/// Bytes of the input that hold data, each data extent rounded out to
/// `granularity`, as QEMU counts them (no granule counted twice).
async fn allocated(node: &Node, granularity: u64) -> CliResult<u64> {
    let (size, mut pos, mut total, mut counted_end) = (node.size(), 0, 0, 0);
    while pos < size {
        let e = node.map_extent(pos, size - pos).await?;
        let len = e.len.max(1);
        if e.data && !e.zero {
            let start = (pos / granularity * granularity).max(counted_end);
            let end = (pos + len).div_ceil(granularity) * granularity;
            total += end.saturating_sub(start);
            counted_end = counted_end.max(end);
        }
        pos += len;
    }
    Ok(total)
}

pub async fn run(a: Args) -> CliResult<()> {
    let out: Format = a.out_format.parse()?;
    let input = match (&a.size, &a.filename) {
        (Some(_), Some(_)) => return Err(Error::Usage("give either --size or an input image, not both".into())),
        (None, None) => return Err(Error::Usage("give --size SIZE or an input image".into())),
        (None, Some(f)) => Some(super::open(
            f,
            format_arg(&a.format)?,
            CacheMode::Writeback,
            super::Access::Look {
                force_share: a.force_share,
            },
        )?),
        (Some(_), None) => None,
    };
    let size = match (&a.size, &input) {
        (Some(s), _) => size_arg(s)?,
        (None, Some(n)) => n.size(),
        _ => 0,
    };
    let pairs = parse_opts(&a.options)?;
    let (required, fully, bitmaps) = match out {
        Format::Qcow2 => {
            let mut o = CreateOptions {
                size,
                ..Default::default()
            };
            qcow2_options(&pairs, &mut o)?;
            let cs = o.cluster_size;
            let virt = size.div_ceil(cs) * cs;
            let fully = measure::fully_allocated_size(size, cs, o.refcount_bits.trailing_zeros(), o.extended_l2);
            let data = match (&input, o.preallocation) {
                (_, p)
                    if p == spindle_block::formats::qcow2::Preallocation::Full
                        || p == spindle_block::formats::qcow2::Preallocation::Falloc =>
                {
                    virt
                }
                (Some(n), _) => allocated(n, cs).await?,
                (None, _) => 0,
            };
            let bitmaps = o.version >= 3 && matches!(input, Some(Node::Qcow2(_)));
            (fully - virt + data, fully, bitmaps)
        }
        Format::Raw => {
            let data = match &input {
                Some(n) => allocated(n, 512).await?,
                None => size,
            };
            (data, size, false)
        }
        Format::Null => return Err(Error::Usage("null devices take no space".into())),
    };
    if a.output == "json" {
        let mut v = json!({"required": required, "fully-allocated": fully});
        if bitmaps {
            v["bitmaps"] = json!(0);
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("required size: {required}\nfully allocated size: {fully}");
        if bitmaps {
            println!("bitmaps size: 0");
        }
    }
    Ok(())
}
