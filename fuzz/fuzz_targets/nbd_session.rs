//! An NBD client's bytes: the handshake, then transmission-phase requests
//! (`spindle_nbd::fuzzing::session`, which checks the invariants).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spindle_nbd::fuzzing::session(data);
});
