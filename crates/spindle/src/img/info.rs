//! `spindle img info`.

use super::{format_arg, human_size};
use crate::error::{CliResult, Error};
use serde_json::{json, Map, Value};
use spindle_block::{ImageInfo, Node};
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
    /// Show every image of the backing chain.
    #[arg(long)]
    backing_chain: bool,
    /// Image file.
    filename: String,
}

fn actual_size(node: &Node) -> Option<u64> {
    node.storage().allocated_bytes()
}

/// Snapshots of a qcow2 node (empty for other formats).
async fn snapshots(node: &Node) -> Vec<spindle_block::formats::qcow2::snapshot::Snapshot> {
    match node {
        Node::Qcow2(q) => q.snapshot_list().await,
        _ => Vec::new(),
    }
}

/// What an RBD image's storage adds: object size, features, its own
/// snapshots (of the RBD image, under any format).
struct RbdFacts {
    name: String,
    object_size: u64,
    features: Vec<&'static str>,
    snapshots: Vec<spindle_rbd::Snapshot>,
}

fn rbd_facts(node: &Node) -> CliResult<Option<RbdFacts>> {
    let spindle_block::Storage::Rbd(r) = node.storage() else {
        return Ok(None);
    };
    let (stat, bits) = r.stat()?;
    use spindle_rbd::features as f;
    let names = [
        (f::LAYERING, "layering"),
        (f::STRIPINGV2, "striping"),
        (f::EXCLUSIVE_LOCK, "exclusive-lock"),
        (f::OBJECT_MAP, "object-map"),
        (f::FAST_DIFF, "fast-diff"),
        (f::DEEP_FLATTEN, "deep-flatten"),
        (f::JOURNALING, "journaling"),
        (f::DATA_POOL, "data-pool"),
    ];
    Ok(Some(RbdFacts {
        name: r.name().to_owned(),
        object_size: stat.object_size,
        features: names.iter().filter(|(b, _)| bits & b != 0).map(|&(_, n)| n).collect(),
        snapshots: r.snapshots()?,
    }))
}

fn rbd_json(f: &RbdFacts) -> Value {
    json!({
        "image": f.name, "object-size": f.object_size, "features": f.features,
        "snapshots": f.snapshots.iter().map(|s| json!({"id": s.id, "name": s.name, "size": s.size})).collect::<Vec<_>>(),
    })
}

fn rbd_human(f: &RbdFacts) -> String {
    let mut s = format!(
        "RBD image: {}
    object size: {}
    features: {}
",
        f.name,
        human_size(f.object_size),
        f.features.join(", ")
    );
    if !f.snapshots.is_empty() {
        s += "    snapshots:
";
        for snap in &f.snapshots {
            s += &format!("        {} (id {}, {})\n", snap.name, snap.id, human_size(snap.size));
        }
    }
    s
}

fn snapshots_json(snaps: &[spindle_block::formats::qcow2::snapshot::Snapshot]) -> Value {
    Value::Array(
        snaps
            .iter()
            .map(|s| {
                let mut v = json!({
                    "id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                });
                if let Some(ic) = s.icount.filter(|&i| i != u64::MAX) {
                    v["icount"] = json!(ic);
                }
                v
            })
            .collect(),
    )
}

fn to_json(node: &Node, info: &ImageInfo) -> Value {
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("filename".into(), json!(node.path().display().to_string()));
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(info.format));
    if let Some(a) = actual_size(node) {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(q) = &info.qcow2 {
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": {
                "compat": q.compat, "compression-type": q.compression_type,
                "lazy-refcounts": q.lazy_refcounts, "refcount-bits": q.refcount_bits,
                "corrupt": q.corrupt, "extended-l2": q.extended_l2}}),
        );
    }
    if let Some(b) = &info.backing_file {
        m.insert("backing-filename".into(), json!(b));
        if let Some(bn) = node.backing() {
            m.insert("full-backing-filename".into(), json!(bn.path().display().to_string()));
        }
    }
    if let Some(f) = &info.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Value::Object(m)
}

fn human(node: &Node, info: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\n",
        node.path().display(),
        info.format,
        human_size(info.virtual_size),
        info.virtual_size
    );
    match actual_size(node) {
        Some(a) => s += &format!("disk size: {}\n", human_size(a)),
        // qemu-img's words for an export it cannot see the storage of.
        None if matches!(
            node.storage(),
            spindle_block::Storage::Nbd(_) | spindle_block::Storage::Rbd(_)
        ) =>
        {
            s += "disk size: unavailable\n"
        }
        None => {}
    }
    if let Some(cs) = info.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &info.backing_file {
        s += &format!("backing file: {}\n", spindle_block::printable(b));
    }
    if let Some(f) = &info.backing_format {
        s += &format!("backing file format: {}\n", spindle_block::printable(f));
    }
    if let Some(q) = &info.qcow2 {
        s += &format!(
            "Format specific information:\n    compat: {}\n    compression type: {}\n    lazy refcounts: {}\n    refcount bits: {}\n    corrupt: {}\n    extended l2: {}\n",
            q.compat, q.compression_type, q.lazy_refcounts, q.refcount_bits, q.corrupt, q.extended_l2
        );
    }
    s
}

pub async fn run(a: Args) -> CliResult<()> {
    let access = super::Access::Metadata {
        force_share: a.force_share,
    };
    let node = super::open(&a.filename, format_arg(&a.format)?, CacheMode::Writeback, access)?;
    let mut chain = vec![&node];
    if a.backing_chain {
        while let Some(b) = chain[chain.len() - 1].backing() {
            chain.push(b);
        }
    }
    match a.output.as_str() {
        "json" => {
            let mut v: Vec<Value> = Vec::new();
            for n in &chain {
                let mut j = to_json(n, &n.info());
                if let Some(f) = rbd_facts(n)? {
                    j["rbd"] = rbd_json(&f);
                }
                let snaps = snapshots(n).await;
                if !snaps.is_empty() {
                    j["snapshots"] = snapshots_json(&snaps);
                }
                v.push(j);
            }
            let out = if a.backing_chain {
                Value::Array(v)
            } else {
                v.into_iter().next().unwrap_or(Value::Null)
            };
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        "human" => {
            let mut parts = Vec::new();
            for n in &chain {
                let mut h = human(n, &n.info());
                let snaps = snapshots(n).await;
                if !snaps.is_empty() {
                    // qemu-img puts the list after the backing file lines.
                    let at = h.find("Format specific information:").unwrap_or(h.len());
                    h.insert_str(at, &super::snapshot::list(&snaps));
                }
                if let Some(f) = rbd_facts(n)? {
                    h += &rbd_human(&f);
                }
                parts.push(h);
            }
            print!("{}", parts.join("\n"));
        }
        o => return Err(Error::Usage(format!("--output must be human or json, not '{o}'"))),
    }
    Ok(())
}
