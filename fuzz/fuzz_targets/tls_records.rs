//! Fuzz target: the NBD TLS 1.3 record layer after a real rustls handshake, reading raw
//! socket bytes or records the peer sealed with its real keys, then edited (layout and
//! checks in `block_io::nbd::fuzzing::tls_records`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    block_io::nbd::fuzzing::tls_records(data);
});
