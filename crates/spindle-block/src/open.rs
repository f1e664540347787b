//! Opening images: format probing, backing chains, safety rules.

use crate::error::{fmt_err, io_err, BlockError, Result};
use crate::formats::{qcow2, raw::Raw};
use crate::node::Node;
use crate::protocols::{nbd, rbd};
use crate::storage::{null::Null, Storage};
use spindle_io::{CacheMode, File, Locking, OpenOptions, Perms};
use std::path::{Path, PathBuf};

/// Longest backing chain Spindle follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw bytes.
    Raw,
    /// qcow2.
    Qcow2,
    /// The null device (`null:SIZE`).
    Null,
}

impl std::str::FromStr for Format {
    type Err = BlockError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "null" | "null-co" => Ok(Format::Null),
            _ => Err(BlockError::Invalid(format!(
                "unknown format '{s}' (supported: raw, qcow2, null)"
            ))),
        }
    }
}

impl Format {
    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Null => "null",
        }
    }
}

/// How to open an image (and its backing chain).
#[derive(Debug, Clone)]
pub struct OpenConfig {
    /// Format; probed when `None`.
    pub format: Option<Format>,
    /// Cache mode of the top image (backing images use the same).
    pub cache: CacheMode,
    /// Open the top image read-only.
    pub read_only: bool,
    /// Open the backing chain; when false a qcow2 reads unallocated ranges as zeroes.
    pub open_backing: bool,
    /// qcow2 tunables.
    pub qcow2: qcow2::Qcow2Options,
    /// What other users (QEMU, qemu-img, other exports) may do to the
    /// images meanwhile; decides the image locks with `read_only`.
    pub sharing: Sharing,
    /// Only the images' metadata is read (`info`): the locks claim no read
    /// permission, as QEMU's metadata-only opens.
    pub metadata_only: bool,
    /// Images (canonical paths) whose locks another open of this process
    /// holds now, a superset of what this open takes: they are taken
    /// without testing for conflicts, so a chain reopened under a running
    /// export (a live overlay, stream or commit, docs/jobs.md) never
    /// leaves an image unlocked, and is not refused by its own old open.
    pub inherit_locks: Vec<PathBuf>,
}

/// What others may do to an open image, as QEMU's shared permissions.
/// Whatever this says, a writer of the image is never let in beside a
/// Spindle writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sharing {
    /// Others may read, not write or resize: a guest's disk, a copy's source.
    #[default]
    Readers,
    /// A look, as qemu-img's info, map, compare: a raw image may be written
    /// meanwhile, a qcow2 image not (its metadata must hold still, so
    /// QEMU's qcow2 driver keeps writers out of every open).
    Look,
    /// Everything, writers of qcow2 images too (qemu-img's
    /// `-U`/`--force-share`); read-only opens only.
    All,
}

impl OpenConfig {
    /// QEMU's image locks for an image of the chain (backing files inherit
    /// the sharing, as QEMU's backing nodes do from their parent).
    pub fn locking(&self, format: Format, read_only: bool) -> Locking {
        let hold = match (read_only, self.metadata_only) {
            (true, true) => Perms::NONE,
            (true, false) => Perms::CONSISTENT_READ,
            (false, _) => Locking::WRITE.hold,
        };
        let keep_writers_out = match self.sharing {
            Sharing::Readers => true,
            Sharing::Look => format == Format::Qcow2 || !read_only,
            Sharing::All => false,
        };
        let share = if keep_writers_out {
            Perms::ALL.without(Perms::WRITE).without(Perms::RESIZE)
        } else {
            Perms::ALL
        };
        Locking { hold, share }
    }
}

impl Default for OpenConfig {
    fn default() -> Self {
        OpenConfig {
            format: None,
            cache: CacheMode::Writeback,
            read_only: false,
            open_backing: true,
            qcow2: Default::default(),
            sharing: Sharing::Readers,
            metadata_only: false,
            inherit_locks: Vec::new(),
        }
    }
}

/// Parses `null:SIZE` (SIZE with an optional K/M/G/T suffix).
pub fn parse_null_spec(spec: &str) -> Option<Result<u64>> {
    let size = spec.strip_prefix("null:")?;
    Some(parse_size(size).ok_or_else(|| BlockError::Invalid(format!("invalid size in '{spec}' (e.g. null:1G)"))))
}

/// Parses a size with an optional binary suffix (k, M, G, T, P, E; bytes if none).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return None,
            };
            (&s[..i], 1u64 << shift)
        }
        _ => (s, 1),
    };
    if num.contains('.') {
        let v: f64 = num.parse().ok()?;
        if v.is_nan() || v < 0.0 {
            return None;
        }
        let bytes = v * mult as f64;
        return if bytes < u64::MAX as f64 {
            Some(bytes as u64)
        } else {
            None
        };
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Opens a file and guesses its format from its start (without taking
/// image locks: only a look).
pub fn probe(path: &Path) -> Result<Format> {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    probe_storage(&Storage::File(File::open_with_lock(path, opts, Locking::NONE)?))
}

/// Guesses the format of what a storage holds from its first bytes.
pub fn probe_storage(s: &Storage) -> Result<Format> {
    let mut head = [0u8; 4];
    let n = s.read_blocking(0, &mut head)?;
    Ok(if n == 4 && u32::from_be_bytes(head) == qcow2::header::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Opens `spec` (a path, `null:SIZE`, an NBD URI or an `rbd:` spec) and
/// its backing chain.
pub fn open_image(spec: &str, cfg: &OpenConfig) -> Result<Node> {
    if let Some(size) = parse_null_spec(spec) {
        return Ok(Node::Raw(Raw::new(Storage::Null(Null::new(size?)), false)?));
    }
    if nbd::is_nbd_spec(spec) {
        let storage = Storage::Nbd(Box::new(nbd::Nbd::open(spec, cfg.read_only)?));
        return open_remote(spec, storage, cfg.format, cfg);
    }
    if rbd::is_rbd_spec(spec) {
        let opts = rbd::RbdOpenOptions {
            read_only: cfg.read_only,
            cache: Some(cfg.cache),
            connect_timeout: None,
        };
        let storage = Storage::Rbd(Box::new(rbd::Rbd::open(spec, &opts)?));
        // A look (info) may probe: what it says cannot turn a guest's raw
        // disk into another format for a guest.
        let format = match cfg.format {
            None if cfg.metadata_only => Some(probe_storage(&storage)?),
            f => f,
        };
        return open_remote(spec, storage, format, cfg);
    }
    if cfg.format == Some(Format::Null) {
        return Err(BlockError::Invalid(format!(
            "'{spec}': the null format takes a spec like null:1G"
        )));
    }
    if cfg.sharing == Sharing::All && !cfg.read_only {
        return Err(BlockError::Invalid(format!(
            "{spec}: force-share (-U) can only be used with read-only images"
        )));
    }
    let mut seen = Vec::new();
    open_path(Path::new(spec), cfg.format, cfg, cfg.read_only, &mut seen)
}

fn open_path(
    path: &Path,
    format: Option<Format>,
    cfg: &OpenConfig,
    read_only: bool,
    seen: &mut Vec<PathBuf>,
) -> Result<Node> {
    let canon = path.canonicalize().map_err(io_err(path, "cannot open"))?;
    if seen.contains(&canon) {
        return Err(fmt_err(path, "backing chain loops back to this image"));
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(fmt_err(
            path,
            format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
        ));
    }
    let inherit = cfg.inherit_locks.contains(&canon);
    seen.push(canon);
    let probed = format.is_none();
    // Probed before the image locks are taken: which locks depends on it.
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let opts = OpenOptions {
        cache: cfg.cache,
        read_only,
        create: false,
    };
    // Locked from here until the node closes; backing files after it, as QEMU.
    let locking = cfg.locking(format, read_only);
    let file = if inherit {
        File::open_inheriting(path, opts, locking)?
    } else {
        File::open_with_lock(path, opts, locking)?
    };
    let storage = Storage::File(file);
    match format {
        Format::Raw => Ok(Node::Raw(Raw::new(storage, probed)?)),
        Format::Null => Err(BlockError::Invalid("null images have no path".into())),
        Format::Qcow2 => {
            let mut q = qcow2::Qcow2::open(storage, None, cfg.qcow2)?;
            let info = q.info();
            let backing = match (&info.backing_file, cfg.open_backing) {
                (Some(name), true) => {
                    let bpath = backing_path(path, name)?;
                    let bfmt = match info.backing_format.as_deref() {
                        Some(f) => Some(f.parse::<Format>().map_err(|_| {
                            fmt_err(path, format!("backing format '{f}' is not supported (raw, qcow2)"))
                        })?),
                        None => None,
                    };
                    if bfmt == Some(Format::Null) {
                        return Err(fmt_err(path, "a null backing format is not allowed"));
                    }
                    let b = open_path(&bpath, bfmt, cfg, true, seen).map_err(|e| match e {
                        // Names the backing file itself, and stays an in-use error.
                        e @ BlockError::Setup(spindle_io::Error::InUse { .. }) => e,
                        e => fmt_err(path, format!("cannot open backing file: {e}")),
                    })?;
                    Some(Box::new(b))
                }
                _ => None,
            };
            q.set_backing_node(backing);
            Ok(Node::Qcow2(Box::new(q)))
        }
    }
}

/// Opens a format on an NBD export or an RBD image: raw data unless a
/// format is stated (no probing: a guest's disk exported elsewhere must
/// not turn into an image format by what the guest wrote), or qcow2 on it
/// when stated, as QEMU's qcow2 over its `nbd` and `rbd` drivers.
fn open_remote(spec: &str, storage: Storage, format: Option<Format>, cfg: &OpenConfig) -> Result<Node> {
    let what = storage.driver();
    match format {
        None | Some(Format::Raw) => Ok(Node::Raw(Raw::new(storage, false)?)),
        Some(Format::Null) => Err(BlockError::Invalid(format!(
            "'{spec}': the null format takes a spec like null:1G"
        ))),
        Some(Format::Qcow2) => {
            let q = qcow2::Qcow2::open(storage, None, cfg.qcow2)?;
            if let (Some(name), true) = (q.info().backing_file, cfg.open_backing) {
                return Err(fmt_err(
                    Path::new(spec),
                    format!(
                        "the qcow2 image on this {} has a backing file '{name}'; \
                         Spindle opens backing files only of local images",
                        if what == "rbd" { "RBD image" } else { "NBD export" }
                    ),
                ));
            }
            Ok(Node::Qcow2(Box::new(q)))
        }
    }
}

/// Resolves a backing file name from an image: only ever a local path,
/// relative to the image's directory.
pub fn backing_path(image: &Path, name: &str) -> Result<PathBuf> {
    let looks_like_protocol = name.starts_with("json:")
        || name.split_once(':').is_some_and(|(p, _)| {
            !p.is_empty() && !p.contains('/') && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-')
        });
    if looks_like_protocol {
        return Err(fmt_err(
            image,
            format!("backing file name '{name}' is not a local path; Spindle never follows protocols or json: specs from an image"),
        ));
    }
    let p = Path::new(name);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_null_specs() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("10x"), None);
        assert_eq!(parse_size("99999999999E"), None);
        assert_eq!(parse_null_spec("null:4M").unwrap().unwrap(), 4 << 20);
        assert!(parse_null_spec("null:abc").unwrap().is_err());
    }

    /// The locks of each kind of open, as strace shows QEMU 7.2's tools
    /// taking them (qemu-img, qemu-io, qemu-system-x86_64 with a disk).
    #[test]
    fn locks_are_qemus_per_format_and_use() {
        let cfg = |sharing, metadata_only| OpenConfig {
            sharing,
            metadata_only,
            ..Default::default()
        };
        let rw = Perms::CONSISTENT_READ.with(Perms::WRITE).with(Perms::RESIZE);
        let readers = Perms::ALL.without(Perms::WRITE).without(Perms::RESIZE);
        let l = |hold, share| Locking { hold, share };
        let cr = Perms::CONSISTENT_READ;
        let none = Perms::NONE;
        for f in [Format::Raw, Format::Qcow2] {
            // A guest's disk and a writer never share writing.
            assert_eq!(cfg(Sharing::Readers, false).locking(f, false), l(rw, readers));
            assert_eq!(cfg(Sharing::Look, false).locking(f, false), l(rw, readers));
            // A copy's source, a read-only export, a backing file of either.
            assert_eq!(cfg(Sharing::Readers, false).locking(f, true), l(cr, readers));
            // -U: qemu-img check -U, map -U; info -U takes no locks at all.
            assert_eq!(cfg(Sharing::All, false).locking(f, true), l(cr, Perms::ALL));
            assert_eq!(cfg(Sharing::All, true).locking(f, true), Locking::NONE);
        }
        // qemu-img map/compare/check: raw shares everything, qcow2 keeps
        // writers off its metadata; info holds nothing.
        assert_eq!(cfg(Sharing::Look, false).locking(Format::Raw, true), l(cr, Perms::ALL));
        assert_eq!(cfg(Sharing::Look, false).locking(Format::Qcow2, true), l(cr, readers));
        assert_eq!(cfg(Sharing::Look, true).locking(Format::Raw, true), Locking::NONE);
        assert_eq!(cfg(Sharing::Look, true).locking(Format::Qcow2, true), l(none, readers));
    }

    #[test]
    fn an_image_is_opened_writable_once() {
        let dir =
            tempfile::tempdir_in(std::env::var("SPINDLE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let spec = path.to_str().unwrap();
        let rw = OpenConfig::default();
        let ro = OpenConfig {
            read_only: true,
            ..Default::default()
        };
        let look = OpenConfig {
            sharing: Sharing::Look,
            ..ro.clone()
        };
        let in_use = |r: Result<Node>| match r {
            Err(BlockError::Setup(spindle_io::Error::InUse { .. })) => {}
            Err(e) => panic!("expected an in-use error, got {e}"),
            Ok(_) => panic!("expected an in-use error, the open succeeded"),
        };
        let w = open_image(spec, &rw).unwrap();
        in_use(open_image(spec, &rw));
        in_use(open_image(spec, &ro));
        // A raw image may be looked at while written, as with qemu-img.
        open_image(spec, &look).unwrap();
        drop(w);
        let r = open_image(spec, &ro).unwrap();
        let _r2 = open_image(spec, &ro).unwrap();
        in_use(open_image(spec, &rw));
        drop(r);
        let forced = OpenConfig {
            sharing: Sharing::All,
            ..rw.clone()
        };
        let e = open_image(spec, &forced)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("can only be used with read-only images"), "{e}");
        // Null devices have no file and no locks.
        let _n1 = open_image("null:1M", &rw).unwrap();
        let _n2 = open_image("null:1M", &rw).unwrap();
    }

    #[test]
    fn backing_names_are_local_paths_only() {
        let img = Path::new("/images/top.qcow2");
        assert_eq!(backing_path(img, "base.raw").unwrap(), Path::new("/images/base.raw"));
        assert_eq!(backing_path(img, "/abs/base").unwrap(), Path::new("/abs/base"));
        for bad in [
            "json:{\"driver\":\"nbd\"}",
            "nbd:localhost:10809",
            "http://x/y",
            "file:/etc/passwd",
        ] {
            assert!(
                backing_path(img, bad)
                    .unwrap_err()
                    .to_string()
                    .contains("not a local path"),
                "{bad}"
            );
        }
    }
}
