//! Pops, parses and completes virtio-blk requests from a virtqueue whose
//! descriptor table, rings and guest memory are the fuzzer's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spindle_vhost::fuzzing::blk_chain(data);
});
