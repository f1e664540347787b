//! Opens, reads, writes and checks a qcow2 image built from fuzzer bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir().expect("temp dir");
}

fuzz_target!(|data: &[u8]| {
    DIR.with(|d| spindle_block::fuzzing::qcow2_bytes(data, d.path()));
});
