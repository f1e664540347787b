use super::*;
use clap::Parser;
use serde_json::json;

fn err(line: &[u8]) -> String {
    parse(line).expect_err("must be refused")
}

#[test]
fn each_malformed_request_is_refused_naming_the_problem() {
    assert!(err(b"\xff{}").contains("not UTF-8 (invalid byte 0xff at offset 0)"));
    assert!(err(b"").contains("empty request"));
    assert!(err(b" \t\r").contains("empty request"));
    assert!(err(b"[]").contains("must be a JSON object, not an array"));
    assert!(err(b"42").contains("not a number"));
    assert!(err(b"{").contains("not valid JSON"));
    assert!(err(&[b'['; 10_000]).contains("recursion limit"));
    assert!(err(b"{}").contains("missing field `cmd`"));
    assert!(err(br#"{"cmd":7}"#).contains("`cmd` must be a string, not a number"));
    assert!(err(br#"{"cmd":"frob"}"#).contains("unknown cmd `frob`"));
    assert!(err(br#"{"cmd":"list","x":1}"#).contains("unknown field `x`"));
    assert!(err(br#"{"cmd":"remove","name":"a","force":true}"#).contains("unknown field `force`"));
    assert!(err(br#"{"cmd":"add","export":{"image":"a","socket":"b","colour":1}}"#).contains("unknown field `colour`"));
    assert!(err(br#"{"cmd":"add","export":{"image":"a","socket":"b"},"x":1}"#).contains("unknown field `x`"));
    assert!(err(br#"{"cmd":"remove"}"#).contains("missing field `name`"));
    assert!(err(br#"{"cmd":"resize","name":"a","size":1e999}"#).contains("not valid JSON"));
    assert!(err(br#"{"cmd":"resize","name":"a","size":18446744073709551616}"#).contains("invalid type"));
    assert!(err(br#"{"cmd":"resize","name":"a","size":"1G","shrink":"yes"}"#).contains("invalid type"));
    assert!(err(br#"{"cmd":"stream","name":"a","force":true}"#).contains("unknown field `force`"));
    assert!(err(br#"{"cmd":"job_cancel"}"#).contains("missing field `id`"));
    assert!(err(br#"{"cmd":"quiesce","name":"a","force":true}"#).contains("unknown field `force`"));
    assert!(err(br#"{"cmd":"snapshot_list"}"#).contains("missing field `name`"));
    assert!(err(br#"{"cmd":"quiesce","name":"a","lease_s":-1}"#).contains("invalid value"));
}

#[test]
fn errors_stay_on_one_line() {
    let e = err(b"{\"cmd\":\"frob\\n\\u0000\"}");
    assert!(!e.contains('\n') && !e.contains('\0'), "{e:?}");
    let e = err(b"{\"cmd\":\"remove\",\"na\\nme\":1}");
    assert!(!e.contains('\n'), "{e:?}");
}

#[test]
fn good_requests_parse_into_their_family() {
    assert!(matches!(
        parse(br#" {"cmd":"list"} "#),
        Ok(Request::Export(ExportRequest::List {}))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"resize","name":"a","size":"2G"}"#),
        Ok(Request::Export(ExportRequest::Resize { shrink: false, .. }))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"commit","name":"a","speed":1048576}"#),
        Ok(Request::Job(JobRequest::Commit {
            speed: Some(1048576),
            base: None,
            top: None,
            ..
        }))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"jobs"}"#),
        Ok(Request::Job(JobRequest::Jobs {}))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"overlay","name":"a","image":"/x.qcow2"}"#),
        Ok(Request::Job(JobRequest::Overlay { .. }))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"snapshot_create","name":"a","snapshot":"s","vmstate":"/x.sock"}"#),
        Ok(Request::Vm(VmRequest::SnapshotCreate {
            vmstate: Some(_),
            live: false,
            ..
        }))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"vm_disks","pid":7}"#),
        Ok(Request::Vm(VmRequest::VmDisks { pid: 7 }))
    ));
    assert!(matches!(
        parse(br#"{"cmd":"quiesce","name":"a"}"#),
        Ok(Request::Vm(VmRequest::Quiesce { lease_s: None, .. }))
    ));
}

/// Every name the command line offers is one the parser knows, in one
/// family only, and the refusal lists them all.
#[test]
fn the_command_line_and_the_parser_agree_on_every_name() {
    let n = names();
    let all: Vec<&String> = n.export.iter().chain(&n.vm).chain(&n.job).collect();
    assert_eq!(all.len(), 25, "{all:?}");
    for (i, name) in all.iter().enumerate() {
        assert!(!all[i + 1..].contains(name), "{name} is in two families");
        let e = err(json!({"cmd": name, "zzz": 1}).to_string().as_bytes());
        assert!(
            !e.contains("unknown cmd") && !e.contains("unknown variant"),
            "{name}: {e}"
        );
        assert!(n.all.contains(name.as_str()), "{name}");
    }
    let e = err(br#"{"cmd":"frob"}"#);
    assert!(e.contains("list, add, remove") && e.contains(" or job_cancel"), "{e}");
}

#[derive(Parser)]
struct Ctl {
    #[command(subcommand)]
    req: Request,
}

/// What `spindle ctl` sends for a command line, parsed back as the daemon does.
fn sent(args: &[&str]) -> (Value, Request) {
    let ctl = Ctl::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let v = ctl.req.to_json();
    let back = parse(v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{v}: {e}"));
    (v, back)
}

#[test]
fn command_lines_become_the_requests_the_daemon_parses() {
    let cwd = std::env::current_dir().unwrap();
    let (v, _) = sent(&["list"]);
    assert_eq!(v, json!({"cmd": "list"}));
    let (v, _) = sent(&["resize", "vm1", "20G", "--shrink"]);
    assert_eq!(
        v,
        json!({"cmd": "resize", "name": "vm1", "size": "20G", "shrink": true})
    );
    let (v, _) = sent(&["throttle-group", "g", "iops-total=100"]);
    assert_eq!(
        v,
        json!({"cmd": "throttle_group", "name": "g", "limits": "iops-total=100"})
    );
    let (v, _) = sent(&["trace"]);
    assert_eq!(v, json!({"cmd": "trace", "filter": null}));
    let (v, back) = sent(&["commit", "vm1", "--speed", "64M", "--base", "rel/base.qcow2"]);
    assert_eq!(v["speed"], json!(64u64 << 20));
    assert_eq!(v["base"], json!(cwd.join("rel/base.qcow2")));
    assert!(matches!(back, Request::Job(JobRequest::Commit { top: None, .. })));
    let (v, _) = sent(&["overlay", "vm1", "new.qcow2"]);
    assert_eq!(v["image"], json!(cwd.join("new.qcow2")));
    let (v, _) = sent(&["job-cancel", "7"]);
    assert_eq!(v, json!({"cmd": "job_cancel", "id": 7}));
    let (v, _) = sent(&["quiesce", "vm1", "--lease", "20"]);
    assert_eq!(v, json!({"cmd": "quiesce", "name": "vm1", "lease_s": 20}));
    let (v, back) = sent(&[
        "add",
        "x.raw",
        "--vhost-user",
        "/run/x.sock",
        "--iothreads",
        "2",
        "--nbd",
    ]);
    assert_eq!(v["cmd"], json!("add"));
    assert_eq!(v["export"]["image"], json!("x.raw"));
    assert_eq!(v["export"]["socket"], json!("/run/x.sock"));
    assert_eq!(v["export"]["iothreads"], json!(2));
    assert_eq!(v["export"]["nbd"], json!(true));
    assert!(matches!(back, Request::Export(ExportRequest::Add(_))));
}

#[test]
fn bad_command_lines_are_refused_by_the_client() {
    let refused = |args: &[&str]| {
        Ctl::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .err()
            .unwrap_or_else(|| panic!("{args:?} must be refused"))
            .to_string()
    };
    let e = refused(&["add", "x.raw"]);
    assert!(
        e.contains("required arguments were not provided") && e.contains("--vhost-user <SOCKET>"),
        "{e}"
    );
    assert!(refused(&["commit", "vm1", "--speed", "fast"]).contains("invalid rate 'fast'"));
    assert!(refused(&["job-cancel", "x"]).contains("invalid digit"));
    assert!(refused(&["frob"]).contains("unrecognized subcommand"));
}
