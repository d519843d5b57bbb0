//! NBD, the Network Block Device protocol (NetworkBlockDevice/nbd `doc/proto.md`): a server
//! for any [`BlockDevice`](crate::BlockDevice), speaking what qemu-nbd, nbdkit and libnbd
//! speak, so that `qemu-img`, `qemu-io`, `nbdcopy`, `nbdinfo` and the Linux kernel client
//! can use our images (feature `nbd`).
//!
//! - [`proto`]: the wire format, pure parsers and encoders (shared with a client and the
//!   fuzz target);
//! - [`NbdServer`]: fixed newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`/`ABORT`,
//!   `NBD_OPT_EXPORT_NAME`, structured replies and the `base:allocation` metadata context;
//!   transmission with READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE, FAST_ZERO),
//!   BLOCK_STATUS and DISC, many requests in flight per connection, replies in completion
//!   order, multi-conn; optionally TLS required (`NBD_OPT_STARTTLS`, rustls) with or without
//!   client certificates ([`NbdServer::require_tls`]);
//! - [`BufferPool`]: the payload buffers a server reuses, shareable between servers;
//! - [`tls`]: server TLS configurations from x509 PEM files (QEMU's `tls-creds-x509`
//!   directory layout or explicit paths) or certificates in memory;
//! - [`NbdClient`]: the other side, a [`BlockDevice`](crate::BlockDevice) over an export of
//!   any NBD server (qemu-nbd, nbdkit, ours), from `nbd://`, `nbd+unix://`, `nbds://` URLs
//!   ([`NbdUrl`]), with TLS, many requests in flight and reconnect ([`RetryPolicy`]).
//!
//! Both sides hand a TLS 1.3 connection over to a record layer of their own once the option
//! haggling is done, when its rustls configuration sets `enable_secret_extraction` (rustls'
//! hand-off for kernel TLS): the records stay TLS 1.3 of the negotiated suite (opened by
//! rustls' record decrypter, sealed by `ring` under rustls' nonce and additional data), but
//! opened where they land, each byte copied once on its way to the caller, and a read's
//! reply sealed where it lies in the server's buffer. Key updates are not followed after the
//! hand-off; other configurations keep rustls' own stream.

mod client;
mod conn;
mod export;
#[cfg(feature = "testing")]
pub mod fuzzing;
mod handshake;
mod pool;
pub mod proto;
mod ranges;
mod record;
mod server;
pub mod tls;

pub use client::{
    client_config_from_qemu_creds_dir, ClientError, ExportInfo, NbdClient, NbdClientOptions,
    NbdTarget, NbdUrl, RetryPolicy, TlsOptions, UrlError, DEFAULT_PORT,
};
pub use export::Export;
pub use pool::BufferPool;
pub use server::{NbdServer, StopHandle, DEFAULT_HANDSHAKE_LIMIT};
