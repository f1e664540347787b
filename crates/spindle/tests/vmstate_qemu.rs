//! VM state interop with a real QEMU (TCG, no guest kernel): a snapshot
//! whose VM state Spindle wrote is accepted by QEMU's loadvm, and Spindle
//! extracts what QEMU's savevm wrote.

mod common;
use common::qemu::*;
use common::*;

const MEM_MB: u64 = 128;

fn random_ram(path: &std::path::Path, seed: u64) -> Vec<u8> {
    mixed_data(path, (MEM_MB << 20) as usize, seed);
    std::fs::read(path).unwrap()
}

fn dump_ram(q: &mut Qemu, d: &tempfile::TempDir, name: &str) -> Vec<u8> {
    let out = at(d, name);
    q.execute(
        "pmemsave",
        serde_json::json!({"val": 0, "size": MEM_MB << 20, "filename": p(&out)}),
    );
    std::fs::read(&out).unwrap()
}

/// Guest RAM -> QMP migrate -> spindle (listening on a unix socket) ->
/// snapshot -> QEMU loadvm -> the same guest RAM.
#[test]
fn qemu_loadvm_accepts_spindle_written_vm_state() {
    need("qemu-img");
    need_qemu_system();
    let d = scratch();
    let img = at(&d, "disk.qcow2");
    qcow2_create(&img, &[], Some("64M"));
    let ram_a = at(&d, "ram-a.bin");
    random_ram(&ram_a, 61);
    let mut a = Qemu::start(d.path(), "a", &ram_a, MEM_MB, None);
    let before = dump_ram(&mut a, &d, "before.bin");
    // Spindle listens; QEMU connects and streams its migration stream.
    let sock = at(&d, "mig.sock");
    let mut saver = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "img",
            "snapshot",
            "-c",
            "from-spindle",
            "--vmstate",
            &format!("unix:{}", p(&sock)),
            p(&img),
        ])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.migrate(&format!("unix:{}", p(&sock)));
    assert!(saver.wait().unwrap().success(), "spindle failed to save the VM state");
    drop(a);
    assert_clean(&img);

    let ram_b = at(&d, "ram-b.bin");
    std::fs::File::create(&ram_b).unwrap().set_len(MEM_MB << 20).unwrap();
    let mut b = Qemu::start(d.path(), "b", &ram_b, MEM_MB, Some(&img));
    let out = b.hmp("loadvm from-spindle");
    assert!(out.trim().is_empty(), "loadvm said: {out}");
    let after = dump_ram(&mut b, &d, "after.bin");
    assert!(
        ram_without_rom(&after) == ram_without_rom(&before),
        "guest RAM after loadvm differs from what was saved"
    );
    b.quit();
    assert_clean(&img);
}

/// QEMU savevm -> Spindle extracts the VM state -> it is a migration stream
/// of the recorded size, and loading it back (through Spindle) restores
/// the same RAM.
#[test]
fn spindle_extracts_qemu_savevm_state() {
    need("qemu-img");
    need_qemu_system();
    let d = scratch();
    let img = at(&d, "disk.qcow2");
    qcow2_create(&img, &[], Some("64M"));
    let ram = at(&d, "ram.bin");
    random_ram(&ram, 62);
    let mut q = Qemu::start(d.path(), "c", &ram, MEM_MB, Some(&img));
    let before = dump_ram(&mut q, &d, "before.bin");
    let out = q.hmp("savevm from-qemu");
    assert!(out.trim().is_empty(), "savevm said: {out}");
    q.quit();
    assert_clean(&img);
    let list = ok("spindle", &["img", "snapshot", "-l", p(&img)]);
    assert!(list.contains("from-qemu"), "{list}");
    let state = at(&d, "state.bin");
    ok(
        "spindle",
        &["img", "snapshot", "-x", "from-qemu", "--vmstate", p(&state), p(&img)],
    );
    let s = std::fs::read(&state).unwrap();
    assert_eq!(&s[..4], b"QEVM", "a QEMU migration stream starts with QEVM");
    assert_eq!(
        u32::from_be_bytes(s[4..8].try_into().unwrap()),
        3,
        "migration stream version 3"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output", "json", p(&img)])).unwrap();
    let recorded = info["snapshots"][0]["vm-state-size"].as_u64().unwrap();
    assert_eq!(
        s.len() as u64,
        recorded,
        "extracted length differs from the size QEMU recorded"
    );

    // Put the extracted stream into a fresh image and have QEMU load it.
    let img2 = at(&d, "disk2.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img2), "64M"]);
    ok(
        "spindle",
        &["img", "snapshot", "-c", "again", "--vmstate", p(&state), p(&img2)],
    );
    let ram2 = at(&d, "ram2.bin");
    std::fs::File::create(&ram2).unwrap().set_len(MEM_MB << 20).unwrap();
    let mut r = Qemu::start(d.path(), "r", &ram2, MEM_MB, Some(&img2));
    let out = r.hmp("loadvm again");
    assert!(out.trim().is_empty(), "loadvm said: {out}");
    let after = dump_ram(&mut r, &d, "after.bin");
    assert!(
        ram_without_rom(&after) == ram_without_rom(&before),
        "RAM restored from the extracted state differs"
    );
}
