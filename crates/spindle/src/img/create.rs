//! `spindle img create`.

use super::{format_arg, parse_opts, size_arg};
use crate::error::{CliResult, Error};
use spindle_block::formats::qcow2::{self, header::Compression, CreateOptions, Preallocation};
use spindle_block::{BlockError, Format};
use spindle_io::{File, Locking, OpenOptions};
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Format (raw, qcow2).
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Options: cluster_size, compat, refcount_bits, lazy_refcounts,
    /// extended_l2, compression_type, preallocation, backing_file, backing_fmt.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    filename: String,
    /// Size (e.g. 10G); defaults to the backing file's size.
    size: Option<String>,
}

fn bool_opt(k: &str, v: &str) -> CliResult<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::Usage(format!("invalid value '{v}' for option {k} (on/off)"))),
    }
}

/// Builds qcow2 create options from `-o` pairs.
pub fn qcow2_options(pairs: &[(String, String)], o: &mut CreateOptions) -> CliResult<Preallocation> {
    let invalid = |m: String| Error::Usage(m);
    for (k, v) in pairs {
        match k.as_str() {
            "cluster_size" => o.cluster_size = size_arg(v)?,
            "compat" => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(invalid(format!("invalid compat level '{v}' (0.10 or 1.1)"))),
                }
            }
            "refcount_bits" => {
                o.refcount_bits = v.parse().map_err(|_| invalid(format!("invalid refcount_bits '{v}'")))?
            }
            "lazy_refcounts" => o.lazy_refcounts = bool_opt(k, v)?,
            "extended_l2" => o.extended_l2 = bool_opt(k, v)?,
            "compression_type" => {
                o.compression = match v.as_str() {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => return Err(invalid(format!("invalid compression_type '{v}' (zlib, zstd)"))),
                }
            }
            "preallocation" => o.preallocation = v.parse().map_err(invalid)?,
            "backing_file" => o.backing_file = Some(v.clone()),
            "backing_fmt" => o.backing_format = Some(v.clone()),
            "size" => o.size = size_arg(v)?,
            _ => return Err(invalid(format!("unknown qcow2 option '{k}'"))),
        }
    }
    Ok(o.preallocation)
}

/// Creates an image of `format`; shared with `convert`.
pub async fn create_image(
    path: &str,
    format: Format,
    pairs: &[(String, String)],
    base: CreateOptions,
) -> CliResult<()> {
    if spindle_block::protocols::rbd::is_rbd_spec(path) {
        return create_on_rbd(path, format, pairs, base).await;
    }
    match format {
        Format::Qcow2 => {
            let mut o = base;
            qcow2_options(pairs, &mut o)?;
            if o.compression == Compression::Zstd && o.version == 3 {
                // qemu-img sets compat 1.1 by default; zstd is valid there.
            }
            refuse_if_in_use(path)?;
            Ok(qcow2::create(Path::new(path), &o).await?)
        }
        Format::Raw => {
            let mut prealloc = Preallocation::Off;
            let mut size = base.size;
            for (k, v) in pairs {
                match k.as_str() {
                    "preallocation" => prealloc = v.parse().map_err(Error::Usage)?,
                    "size" => size = size_arg(v)?,
                    _ => return Err(Error::Usage(format!("unknown raw option '{k}'"))),
                }
            }
            if base.backing_file.is_some() {
                return Err(Error::Usage("raw images cannot have a backing file".into()));
            }
            create_raw(path, size, prealloc).await
        }
        Format::Null => Err(Error::Usage(
            "null devices are not created; use null:SIZE directly".into(),
        )),
    }
}

/// Creates an RBD image: raw, of the size; or qcow2 on an empty image
/// that grows as the qcow2 image does. An image that exists is refused
/// (librbd's own rule), so nothing in use is ever overwritten.
async fn create_on_rbd(spec: &str, format: Format, pairs: &[(String, String)], base: CreateOptions) -> CliResult<()> {
    use spindle_block::protocols::rbd;
    match format {
        Format::Raw => {
            let mut size = base.size;
            for (k, v) in pairs {
                match k.as_str() {
                    "size" => size = size_arg(v)?,
                    "preallocation" if v == "off" => {}
                    "preallocation" => {
                        return Err(Error::Usage(format!(
                            "{spec}: RBD images are thin; preallocation={v} is not supported (off only)"
                        )))
                    }
                    _ => return Err(Error::Usage(format!("unknown raw option '{k}'"))),
                }
            }
            if base.backing_file.is_some() {
                return Err(Error::Usage("raw images cannot have a backing file".into()));
            }
            Ok(rbd::create(spec, size)?)
        }
        Format::Qcow2 => {
            let mut o = base;
            qcow2_options(pairs, &mut o)?;
            o.validate().map_err(|m| Error::Usage(format!("{spec}: {m}")))?;
            if o.backing_file.is_some() {
                return Err(Error::Usage(format!(
                    "{spec}: a qcow2 image on RBD cannot have a backing file (Spindle opens backing files only of local images)"
                )));
            }
            rbd::create(spec, 0)?;
            let opts = rbd::RbdOpenOptions::default();
            let storage = spindle_block::Storage::Rbd(Box::new(rbd::Rbd::open(spec, &opts)?));
            Ok(qcow2::create_on(storage, &o).await?)
        }
        Format::Null => Err(Error::Usage(
            "null devices are not created; use null:SIZE directly".into(),
        )),
    }
}

/// Like qemu-img, never truncate an image another process uses: take the
/// image lock of a creator (QEMU's) and let go before the format writes it.
fn refuse_if_in_use(path: &str) -> CliResult<()> {
    if Path::new(path).exists() {
        drop(File::open_with_lock(
            Path::new(path),
            OpenOptions::default(),
            Locking::CREATE,
        )?);
    }
    Ok(())
}

async fn create_raw(path: &str, size: u64, prealloc: Preallocation) -> CliResult<()> {
    let err = |e| BlockError::Io {
        path: path.into(),
        context: "cannot create",
        source: e,
    };
    // Truncated only once the creator's lock is held.
    let create = OpenOptions {
        create: true,
        ..Default::default()
    };
    let f = File::open(Path::new(path), create).map_err(|e| match e {
        spindle_io::Error::Open { source, .. } => err(source),
        e => e.into(),
    })?;
    f.set_len(size).map_err(err)?;
    drop(f);
    if prealloc == Preallocation::Off {
        return Ok(());
    }
    if prealloc == Preallocation::Metadata {
        return Err(Error::Usage(
            "raw images support preallocation off, falloc and full".into(),
        ));
    }
    let file = File::open(Path::new(path), Default::default())?;
    file.allocate(0, size).await.map_err(err)?;
    if prealloc == Preallocation::Full {
        file.write_zeroes(0, size, false).await.map_err(err)?;
    }
    Ok(file.flush().await.map_err(err)?)
}

pub async fn run(a: Args) -> CliResult<()> {
    let format = format_arg(&Some(a.format.clone()))?.unwrap_or(Format::Raw);
    let pairs = parse_opts(&a.options)?;
    let mut base = CreateOptions {
        backing_file: a.backing.clone(),
        backing_format: a.backing_format.clone(),
        ..Default::default()
    };
    if let Some((_, v)) = pairs.iter().find(|(k, _)| k == "backing_file") {
        base.backing_file = Some(v.clone());
    }
    base.size = match &a.size {
        Some(s) => size_arg(s)?,
        None => match &base.backing_file {
            Some(b) => {
                let bpath = spindle_block::backing_path(Path::new(&a.filename), b)?;
                let fmt = format_arg(&base.backing_format)?;
                // Only its size, and without locks: what qemu-img create does.
                let size_only = super::Access::Metadata { force_share: true };
                let node = super::open(
                    bpath.to_str().unwrap_or(b),
                    fmt,
                    spindle_io::CacheMode::Writeback,
                    size_only,
                )?;
                node.size()
            }
            None => return Err(Error::Usage(format!("{}: an image size is required", a.filename))),
        },
    };
    if base.backing_file.is_some() && base.backing_format.is_none() {
        let bpath = spindle_block::backing_path(Path::new(&a.filename), base.backing_file.as_deref().unwrap_or(""))?;
        base.backing_format = Some(spindle_block::probe(&bpath)?.name().to_string());
    }
    if !a.quiet {
        println!("Formatting '{}', fmt={} size={}", a.filename, format.name(), base.size);
    }
    create_image(&a.filename, format, &pairs, base).await
}
