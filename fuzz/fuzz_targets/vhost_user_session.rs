//! A fuzzing vhost-user frontend against the real backend: a sequence of
//! messages, guest-memory writes, kicks and requests, then a new frontend
//! that must be served.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spindle_vhost::fuzzing::vhost_user_session(data);
});
