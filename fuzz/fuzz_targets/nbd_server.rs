//! One NBD client conversation, as the server's connection code handles it, from arbitrary
//! bytes: a flags byte (TLS required, read-only or 4 KiB-sector default export), then what
//! the client sends — greeting flags, options (STARTTLS, GO, INFO, LIST, meta contexts,
//! EXPORT_NAME, ...), requests and write payloads — over an in-memory duplex stream against
//! memory-backed exports (see `block_io::nbd::fuzzing` for the layout and the checks). Never
//! a panic or a hang; read-only exports never change; nothing changes when TLS is required.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    block_io::nbd::fuzzing::run(data);
});
