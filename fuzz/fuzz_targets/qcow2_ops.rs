//! Runs an operation script (reads, writes, zeroes, discards, resizes,
//! flushes, snapshot create/apply/delete, reopen, check) decoded from
//! fuzzer bytes on a qcow2 image, against a model of its contents.
#![no_main]

use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
}

fuzz_target!(|data: &[u8]| {
    DIR.with(|d| spindle_block::fuzzing::qcow2_ops(data, d.path()));
});
