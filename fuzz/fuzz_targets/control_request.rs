//! Feeds fuzzer bytes to the control socket's protocol, as one
//! connection's input, against a sandboxed server (only `null:` exports).
#![no_main]

use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir().expect("temp dir");
}

fuzz_target!(|data: &[u8]| {
    DIR.with(|d| spindle::fuzzing::control_bytes(data, d.path()));
});
