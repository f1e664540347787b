//! A hostile NBD server's bytes against Spindle's NBD client: the
//! handshake or one request's reply
//! (`spindle_block::protocols::nbd::fuzzing::server_bytes`, which checks
//! that nothing is written outside the request's buffer).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spindle_block::protocols::nbd::fuzzing::server_bytes(data);
});
