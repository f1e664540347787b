//! RBD image specs, as QEMU spells them:
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH][:KEY=VALUE…]`.
//!
//! `\` escapes the next character (a `:` inside a path, an `@` in a name).
//! `id` (or `user`) is the client id without `client.`; `mon_host`
//! overrides the conf's monitors; any other key is a Ceph configuration
//! option, set on the connection, as QEMU passes them on.

use crate::error::{BlockError, Result};
use std::path::PathBuf;

/// Longest spec accepted (a command line or a config file gives it).
const MAX_SPEC: usize = 4096;

/// A parsed `rbd:` spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The namespace in the pool (`None`: the default one).
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// A snapshot to open read-only.
    pub snapshot: Option<String>,
    /// A ceph.conf (`None`: Ceph's default places).
    pub conf: Option<PathBuf>,
    /// The client id, without `client.` (`None`: `admin`).
    pub user: Option<String>,
    /// A keyring file.
    pub keyring: Option<PathBuf>,
    /// Monitor addresses, overriding the conf's.
    pub mon_host: Option<String>,
    /// Further Ceph options.
    pub options: Vec<(String, String)>,
}

/// Whether `spec` names an RBD image.
pub fn is_rbd_spec(spec: &str) -> bool {
    spec.starts_with("rbd:")
}

fn bad(spec: &str, why: &str) -> BlockError {
    BlockError::Invalid(format!(
        "'{spec}': {why} (an RBD image is rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH])"
    ))
}

/// Splits at unescaped `sep`, unescaping `\x` to `x`.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    parts.last_mut().expect("never empty").push(n);
                }
            }
            c if c == sep => parts.push(String::new()),
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    parts
}

/// The byte index of the first `sep` not escaped by `\`.
fn first_unescaped(s: &str, sep: char) -> Option<usize> {
    let mut esc = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if esc => esc = false,
            '\\' => esc = true,
            c if c == sep => return Some(i),
            _ => {}
        }
    }
    None
}

/// `\x` to `x`.
fn unescape(s: &str) -> String {
    split_unescaped(s, '\u{0}').remove(0)
}

/// A name part: nonempty, printable, no `/` or `@` left in it.
fn name<'a>(spec: &str, what: &str, s: &'a str) -> Result<&'a str> {
    if s.is_empty() {
        return Err(bad(spec, &format!("the {what} name is empty")));
    }
    if s.chars().any(|c| c.is_control() || c == '/' || c == '@') {
        return Err(bad(
            spec,
            &format!("the {what} name '{s}' has a character names cannot hold"),
        ));
    }
    Ok(s)
}

impl RbdSpec {
    /// Parses an `rbd:` spec.
    pub fn parse(spec: &str) -> Result<RbdSpec> {
        if spec.len() > MAX_SPEC {
            let head: String = spec.chars().take(64).collect();
            return Err(bad(&head, &format!("longer than {MAX_SPEC} bytes")));
        }
        let rest = spec.strip_prefix("rbd:").ok_or_else(|| bad(spec, "not an rbd: spec"))?;
        // The image part (still escaped) ends at the first unescaped ':'.
        let cut = first_unescaped(rest, ':').unwrap_or(rest.len());
        let (head, opts) = (&rest[..cut], rest.get(cut + 1..));
        let (raw_path, snapshot) = match first_unescaped(head, '@') {
            None => (head, None),
            Some(at) => {
                let snap = &head[at + 1..];
                if first_unescaped(snap, '@').is_some() {
                    return Err(bad(spec, "more than one '@'"));
                }
                let snap = unescape(snap);
                (&head[..at], Some(name(spec, "snapshot", &snap)?.to_owned()))
            }
        };
        if raw_path.is_empty() {
            return Err(bad(spec, "the image is empty"));
        }
        let parts = split_unescaped(raw_path, '/');
        let (pool, namespace, image) = match parts.as_slice() {
            [p, i] => (name(spec, "pool", p)?, None, name(spec, "image", i)?),
            [p, n, i] => (
                name(spec, "pool", p)?,
                Some(name(spec, "namespace", n)?.to_owned()),
                name(spec, "image", i)?,
            ),
            [_] => return Err(bad(spec, "no pool: POOL/IMAGE")),
            _ => return Err(bad(spec, "too many '/'")),
        };
        let mut out = RbdSpec {
            pool: pool.to_owned(),
            namespace,
            image: image.to_owned(),
            snapshot,
            ..Default::default()
        };
        for kv in opts.map(|o| split_unescaped(o, ':')).unwrap_or_default() {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(bad(spec, &format!("option '{kv}' is not KEY=VALUE")));
            };
            if v.is_empty() {
                return Err(bad(spec, &format!("option '{k}' has no value")));
            }
            match k {
                "conf" => out.conf = Some(v.into()),
                "id" | "user" => out.user = Some(v.to_owned()),
                "keyring" => out.keyring = Some(v.into()),
                "mon_host" => out.mon_host = Some(v.to_owned()),
                "" => return Err(bad(spec, "an option has no name")),
                k if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {
                    out.options.push((k.to_owned(), v.to_owned()))
                }
                k => return Err(bad(spec, &format!("'{k}' is not a Ceph option name"))),
            }
        }
        Ok(out)
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`, how messages name it.
    pub fn display_name(&self) -> String {
        let mut s = self.pool.clone();
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(ns);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }

    /// The spec as QEMU's `rbd:` filename, escaped so it parses back to
    /// the same (for config-file keys turned into a spec).
    pub fn to_spec(&self) -> String {
        fn esc(s: &str) -> String {
            let mut o = String::new();
            for c in s.chars() {
                if matches!(c, ':' | '@' | '/' | '\\') {
                    o.push('\\');
                }
                o.push(c);
            }
            o
        }
        let mut s = format!("rbd:{}", esc(&self.pool));
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(&esc(ns));
        }
        s.push('/');
        s.push_str(&esc(&self.image));
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(&esc(snap));
        }
        let mut opt = |k: &str, v: &str| {
            s.push(':');
            s.push_str(k);
            s.push('=');
            for c in v.chars() {
                if matches!(c, ':' | '\\') {
                    s.push('\\');
                }
                s.push(c);
            }
        };
        if let Some(c) = &self.conf {
            opt("conf", &c.to_string_lossy());
        }
        if let Some(u) = &self.user {
            opt("id", u);
        }
        if let Some(k) = &self.keyring {
            opt("keyring", &k.to_string_lossy());
        }
        if let Some(m) = &self.mon_host {
            opt("mon_host", m);
        }
        for (k, v) in &self.options {
            opt(k, v);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_spellings_parse() {
        let s = RbdSpec::parse("rbd:vms/disk1").unwrap();
        assert_eq!(
            (s.pool.as_str(), s.image.as_str(), s.namespace, s.snapshot),
            ("vms", "disk1", None, None)
        );
        let s = RbdSpec::parse(
            "rbd:vms/tenant/disk1@daily:conf=/etc/ceph/c\\:1.conf:id=libvirt:keyring=/k:rbd_cache=false",
        )
        .unwrap();
        assert_eq!(s.namespace.as_deref(), Some("tenant"));
        assert_eq!(s.snapshot.as_deref(), Some("daily"));
        assert_eq!(s.conf.as_deref(), Some(std::path::Path::new("/etc/ceph/c:1.conf")));
        assert_eq!(s.user.as_deref(), Some("libvirt"));
        assert_eq!(s.keyring.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(s.options, vec![("rbd_cache".to_owned(), "false".to_owned())]);
        assert_eq!(s.display_name(), "vms/tenant/disk1@daily");
        let s2 = RbdSpec::parse("rbd:vms/disk1:mon_host=127.0.0.1\\:6789").unwrap();
        assert_eq!(s2.mon_host.as_deref(), Some("127.0.0.1:6789"));
    }

    #[test]
    fn specs_round_trip_through_to_spec() {
        for spec in [
            "rbd:vms/disk1",
            "rbd:vms/ns/disk1@s1:conf=/a\\:b:id=u:keyring=/k:mon_host=1.2.3.4\\:6789:rbd_cache=true",
            "rbd:p/we\\:ird@snap",
        ] {
            let s = RbdSpec::parse(spec).unwrap();
            assert_eq!(RbdSpec::parse(&s.to_spec()).unwrap(), s, "{spec}");
        }
        let s = RbdSpec {
            pool: "p".into(),
            image: "a:b".into(),
            ..Default::default()
        };
        assert_eq!(RbdSpec::parse(&s.to_spec()).unwrap(), s);
    }

    #[test]
    fn bad_specs_get_one_clear_error() {
        for (spec, says) in [
            ("rbd:", "image is empty"),
            ("rbd:disk1", "no pool"),
            ("rbd:a/b/c/d", "too many"),
            ("rbd:vms/", "image name is empty"),
            ("rbd:vms/d@", "snapshot name is empty"),
            ("rbd:vms/d@a@b", "more than one"),
            ("rbd:vms/d:conf", "not KEY=VALUE"),
            ("rbd:vms/d:conf=", "no value"),
            ("rbd:vms/d:=x", "no name"),
            ("rbd:vms/d:a;b=c", "not a Ceph option"),
        ] {
            let e = RbdSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(e.contains("rbd:POOL"), "{spec}: {e}");
        }
        let long = format!("rbd:p/{}", "x".repeat(5000));
        assert!(RbdSpec::parse(&long).unwrap_err().to_string().contains("longer than"));
    }
}
