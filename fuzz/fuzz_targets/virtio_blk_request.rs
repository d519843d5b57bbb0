//! One virtio-blk request, as the vhost-user backend parses and runs it, from arbitrary bytes:
//! a device (read-write or read-only, 512- or 4096-byte sectors), a descriptor chain and the
//! guest memory behind it (see `block_io::vhost_user::fuzzing` for the layout). The request
//! must complete with a valid status, or with no used bytes when it has no place for one, and
//! the disk and guest memory must match the model: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    block_io::vhost_user::fuzzing::run(data);
});
