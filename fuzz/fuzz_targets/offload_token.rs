//! Fuzz target: arbitrary bytes as an offload token (verbatim, or XOR-ed onto a genuine
//! token or the zero-data token) redeemed with arbitrary offsets, principal and events
//! (source write, revocation, expiry, key retirement) against a fixed provider. Refusals are
//! fine; a forged token redeemed, a genuine one refused without cause, or wrong bytes
//! written is a bug. See `offload_token::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = offload_token::fuzzing::run(data) {
        panic!("{v}");
    }
});
