//! `spindle img compare`: exit 0 identical, 1 different, 2 error.

use super::{cache_arg, format_arg};
use crate::error::CliResult;
use spindle_block::Node;
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image's format.
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Second image's format.
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict: sizes must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Cache mode for both.
    #[arg(short = 'T')]
    cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// First image.
    image1: String,
    /// Second image.
    image2: String,
}

const CHUNK: u64 = 1 << 20;

async fn read(n: &Node, off: u64, buf: &mut [u8]) -> CliResult<()> {
    let ext = n.map_extent(off, buf.len() as u64).await?;
    if ext.zero && !ext.data && ext.len >= buf.len() as u64 {
        buf.fill(0);
        return Ok(());
    }
    Ok(n.read_into(off, buf).await?)
}

/// First offset where one image has the range allocated in its chain and the
/// other does not (qemu-img's strict mode).
async fn first_allocation_mismatch(one: &Node, two: &Node) -> CliResult<Option<u64>> {
    let size = one.size().min(two.size());
    let mut pos = 0;
    while pos < size {
        let e1 = one.map_extent(pos, size - pos).await?;
        let e2 = two.map_extent(pos, size - pos).await?;
        if e1.present != e2.present {
            return Ok(Some(pos));
        }
        pos += e1.len.min(e2.len).max(1);
    }
    Ok(None)
}

pub async fn run(a: Args) -> CliResult<u8> {
    let cache = cache_arg(&a.cache, CacheMode::Writeback)?;
    let access = super::Access::Look {
        force_share: a.force_share,
    };
    let (one, two) = match (
        super::open(&a.image1, format_arg(&a.format1)?, cache, access),
        super::open(&a.image2, format_arg(&a.format2)?, cache, access),
    ) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("spindle: {e}");
            return Ok(2);
        }
    };
    let say = |s: String| {
        if !a.quiet {
            println!("{s}");
        }
    };
    if a.strict && one.size() != two.size() {
        say("Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    if a.strict {
        if let Some(at) = first_allocation_mismatch(&one, &two).await? {
            say(format!("Strict mode: Offset {at} block status mismatch!"));
            return Ok(1);
        }
    }
    let (s1, s2) = (one.size(), two.size());
    let end = s1.max(s2);
    let mut b1 = vec![0u8; CHUNK as usize];
    let mut b2 = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < end {
        let n = CHUNK.min(end - off) as usize;
        let (x, y) = (&mut b1[..n], &mut b2[..n]);
        let r = async {
            for (node, size, buf) in [(&one, s1, &mut *x), (&two, s2, &mut *y)] {
                let inside = (size.saturating_sub(off)).min(n as u64) as usize;
                buf[inside..].fill(0);
                if inside > 0 {
                    read(node, off, &mut buf[..inside]).await?;
                }
            }
            Ok::<(), crate::error::Error>(())
        }
        .await;
        if let Err(e) = r {
            eprintln!("spindle: {e}");
            return Ok(2);
        }
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            let at = off + i as u64;
            say(format!("Content mismatch at offset {at}!"));
            return Ok(1);
        }
        off += n as u64;
    }
    say("Images are identical.".into());
    Ok(0)
}
