//! Fuzz target: arbitrary bytes against an offload provider daemon's control connection
//! (on an in-memory pipe): as the initiator's raw wire bytes (hellos, frames, tags), or as
//! message bodies an honest initiator authenticates, so the JSON parser and every request
//! handler see them. A valid request left unanswered, an answer to a body that is no
//! request, an `info` outside the root not refused, or a hang is a bug; so is a panic. See
//! `offload_token::transfer::fuzzing`.
//!
//! Run with `-detect_leaks=0`: the daemon's blocking work runs on short-lived std threads,
//! and LeakSanitizer reports their thread-local destructor records (64 bytes, allocated in
//! glibc's `__cxa_thread_atexit_impl`) as leaked.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use offload_token::transfer::fuzzing::{default_root, ControlWorld};

fn world() -> &'static ControlWorld {
    static W: OnceLock<ControlWorld> = OnceLock::new();
    W.get_or_init(|| match ControlWorld::new(&default_root()) {
        Ok(w) => w,
        Err(e) => panic!("cannot build the fuzz world: {e}"),
    })
}

fuzz_target!(|data: &[u8]| {
    if let Err(v) = world().run(data) {
        panic!("{v}");
    }
});
