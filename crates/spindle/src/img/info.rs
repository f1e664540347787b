//! `spindle img info`.

use super::{format_arg, human_size, CliResult};
use serde_json::{json, Map, Value};
use spindle_block::{ImageInfo, Node};
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
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
    match node {
        Node::Raw(r) => r.file().allocated_bytes().ok(),
        Node::Qcow2(q) => q.file().allocated_bytes().ok(),
        Node::Null(_) => None,
    }
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
    if let Some(a) = actual_size(node) {
        s += &format!("disk size: {}\n", human_size(a));
    }
    if let Some(cs) = info.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &info.backing_file {
        s += &format!("backing file: {b}\n");
    }
    if let Some(f) = &info.backing_format {
        s += &format!("backing file format: {f}\n");
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
    let node = super::open(&a.filename, format_arg(&a.format)?, CacheMode::Writeback, true)?;
    let mut chain = vec![&node];
    if a.backing_chain {
        while let Some(b) = chain[chain.len() - 1].backing() {
            chain.push(b);
        }
    }
    match a.output.as_str() {
        "json" => {
            let v: Vec<Value> = chain.iter().map(|n| to_json(n, &n.info())).collect();
            let out = if a.backing_chain {
                Value::Array(v)
            } else {
                v.into_iter().next().unwrap_or(Value::Null)
            };
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        "human" => {
            let parts: Vec<String> = chain.iter().map(|n| human(n, &n.info())).collect();
            print!("{}", parts.join("\n"));
        }
        o => {
            return Err(spindle_block::BlockError::Invalid(format!(
                "--output must be human or json, not '{o}'"
            )))
        }
    }
    Ok(())
}
