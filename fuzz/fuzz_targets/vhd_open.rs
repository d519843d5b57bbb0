//! Opens arbitrary bytes as a VHD in a capacity-limited `MemStorage` and, when that works,
//! reads, writes, discards, flushes, reopens and checks through it (`vhd_format::fuzzing`).
//! The same steps run over the seed corpus in `vhd-format/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhd_format::fuzzing::run(data);
});
