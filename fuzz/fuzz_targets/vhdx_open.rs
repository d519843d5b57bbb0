//! Fuzz target: arbitrary bytes (a sparse image description, or a raw image starting with
//! "vhdxfile") opened as VHDX in a capacity-limited `MemStorage`, then read, written, zeroed,
//! flushed and closed. See `vhdx_format::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhdx_format::fuzzing::run(data);
});
