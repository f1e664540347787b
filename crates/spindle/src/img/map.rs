//! `spindle img map`: the same ranges as qemu-img map.

use super::format_arg;
use crate::error::{CliResult, Error};
use spindle_block::{Extent, Node};
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Format (probed if not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long, default_value = "human")]
    output: String,
    /// Image file.
    filename: String,
}

fn file_at_depth(node: &Node, depth: u32) -> String {
    let mut n = node;
    for _ in 0..depth {
        match n.backing() {
            Some(b) => n = b,
            None => break,
        }
    }
    n.path().display().to_string()
}

/// All extents of the image, merged like qemu-img does.
pub async fn extents(node: &Node) -> CliResult<Vec<(u64, Extent)>> {
    let size = node.size();
    let mut out: Vec<(u64, Extent)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = node.map_extent(pos, size - pos).await?;
        let len = e.len.max(1);
        match out.last_mut() {
            Some((s, p))
                if p.data == e.data
                    && p.zero == e.zero
                    && p.present == e.present
                    && p.depth == e.depth
                    && p.compressed == e.compressed
                    && match (p.offset, e.offset) {
                        (Some(a), Some(b)) => a + p.len == b,
                        (None, None) => true,
                        _ => false,
                    }
                    && *s + p.len == pos =>
            {
                p.len += len
            }
            _ => out.push((pos, Extent { len, ..e })),
        }
        pos += len;
    }
    Ok(out)
}

pub async fn run(a: Args) -> CliResult<()> {
    let access = super::Access::Look {
        force_share: a.force_share,
    };
    let node = super::open(&a.filename, format_arg(&a.format)?, CacheMode::Writeback, access)?;
    let ex = extents(&node).await?;
    match a.output.as_str() {
        "json" => {
            println!("[");
            let n = ex.len();
            for (i, (start, e)) in ex.iter().enumerate() {
                let mut s = format!(
                    "{{ \"start\": {start}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    e.len, e.depth, e.present, e.zero, e.data, e.compressed
                );
                if let Some(o) = e.offset {
                    s += &format!(", \"offset\": {o}");
                }
                s += "}";
                println!("{s}{}", if i + 1 < n { "," } else { "" });
            }
            println!("]");
        }
        "human" => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            let hex = |v: u64| {
                if v == 0 {
                    "0".to_string()
                } else {
                    format!("{v:#x}")
                }
            };
            for (start, e) in &ex {
                if let (true, Some(o)) = (e.data, e.offset) {
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        hex(*start),
                        hex(e.len),
                        hex(o),
                        file_at_depth(&node, e.depth)
                    );
                }
            }
        }
        o => return Err(Error::Usage(format!("--output must be human or json, not '{o}'"))),
    }
    Ok(())
}
