//! Fuzz target: arbitrary bytes as a `vdisk send` stream, read by `meta_ops::send::verify`
//! (the header, every record's crc32c and zstd payload, the END record's totals and digest),
//! which must return a typed error or a report, never panic or allocate past the per-record
//! cap. Seeds: `fuzz/corpus/send_stream` (valid streams of a small raw disk at several levels,
//! made by meta-ops' `send_fuzz_corpus` test); the same test replays the corpus on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meta_ops::send::verify(&mut &data[..]);
});
