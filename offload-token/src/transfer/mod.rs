//! Provider-to-provider offload copies (issue 14 part 3, feature `transfer`): an initiator
//! copies a range of an image at provider S into an image at provider D. S and D know
//! nothing of each other; the initiator, trusted by both, sets up a per-transfer CA, mints a
//! token at S (offload read) and redeems it at D (offload write); D pulls the token's range
//! from S directly as a read-only NBD export over mutual TLS 1.3. The initiator sees
//! control messages only, never the data.
//!
//! ```text
//!            control (HMAC-authenticated)        control (HMAC-authenticated)
//!   S  <------------------------------  initiator  ------------------------------>  D
//!   |  trust/certify, mint -> token                 trust/certify, redeem(token) |
//!   |                                                                            |
//!   +------ NBD over mutual TLS 1.3: D reads exactly the token's range <---------+
//! ```
//!
//! ## Trust
//!
//! 1. The initiator creates a CA for the transfer ([`TransferCa`], rcgen, Ed25519), valid for
//!    the transfer's certificate lifetime (default 15 min).
//! 2. Over each provider's own authenticated control channel it sends `trust` with the
//!    transfer id, the provider's role and the CA certificate. The provider generates a
//!    fresh key pair for the transfer and answers with its public key only.
//! 3. The initiator signs a certificate over that key naming the transfer and role
//!    ([`peer_name`]: `<role>.<transfer>.transfer.vdisk.invalid` as the only DNS SAN; EKU
//!    server authentication for S, client authentication for D) and sends it with
//!    `certify`.
//! 4. S serves each token's range on an NBD export of its own ([`NbdServer`] with
//!    [`source_config`]): TLS 1.3 only, the client must present a certificate chaining to
//!    this transfer's CA, valid now, for client authentication, naming the destination of
//!    this transfer. D connects with [`destination_config`], trusting only that CA and
//!    checking S's certificate names the source of this transfer. A certificate from another
//!    transfer's CA, an expired one, or one of the wrong role or transfer fails the
//!    handshake on either side.
//!
//! The token's audience is the principal `transfer:<id>:destination`, which is what the
//! destination certificate proves; the export serves only that token's range
//! ([`TokenExport`]), checking the token before and after every read (expired, revoked or
//! invalidated tokens fail the read), so D gets the token's data or an error.
//!
//! ## The control protocol (version 1)
//!
//! TCP; each frame is a 32-bit big-endian length (at most [`MAX_FRAME`]) and its bytes.
//! Authentication is by a per-provider pre-shared control key ([`ControlKey`]); see
//! [`control`] for the session: two hellos (`"VDXC"`/`"VDXS"`, version range, 32-byte
//! nonce), then every frame is `seq || JSON || HMAC-SHA256 tag` under a session key derived
//! from the control key and both nonces. The JSON messages ([`Request`], [`Reply`]) are
//! objects tagged by `op` (requests) and `reply` (answers); binary fields are lower-case
//! hex. Requests on one connection are answered in order.
//!
//! | request (`op`) | fields | reply (`reply`) | semantics |
//! |---|---|---|---|
//! | `info` | `path` | `info`: `virtual_size`, `sector_size`, `format` | size of an image under the root |
//! | `trust` | `transfer`, `role`, `ca` (DER) | `trusted`: `public_key` (Ed25519, 32 bytes) | join a transfer; the CA becomes its only trust anchor |
//! | `certify` | `transfer`, `role`, `cert` (DER) | `certified` | install the certificate signed over that key |
//! | `mint` | `transfer`, `path`, `offset`, `length`, `ttl_ms` | `minted`: `token` (512 bytes), `transfer_length`, `flags`, `port`, `export` | offload read at S (FSCTL_OFFLOAD_READ semantics: may be shorter; flag 1 = ALL_ZERO_BEYOND_CURRENT_RANGE; the zero-data token has no export) |
//! | `redeem` | `transfer`, `path`, `offset`, `length`, `token`, `token_offset`, `source` {`host`, `port`, `export`} | `redeemed`: `written` | offload write at D (FSCTL_OFFLOAD_WRITE semantics: at most [`DaemonConfig::max_redeem_len`] (256 MiB) and about [`DaemonConfig::redeem_time`] (1 s) of pulling per call, so it may write less; callers loop) |
//! | `status` | `transfer`, `role` | `status`: `role`, `certified`, `cancelled`, `tokens`, `bytes_served`, `bytes_written` | counters |
//! | `cancel` | `transfer`, `role` | `cancelled`: `revoked` | revoke the transfer's tokens, stop its exports, fail its redeems (from any connection) |
//! | `close` | `transfer`, `role` | `closed` | flush D's images, revoke tokens, stop exports, forget the transfer |
//! | any | | `error`: `code`, `message` | `code` is one of `bad-request`, `outside-root`, `no-transfer`, `exists`, `wrong-role`, `not-certified`, `cancelled`, `token`, `io`, `tls` |
//!
//! A transfer belongs to the connection that sent `trust`: only it may certify, mint,
//! redeem and close it, and it ends (as by `close`) when that connection ends. `status` and
//! `cancel` work from any authenticated connection.
//!
//! ## Rights
//!
//! The control key is the provider's whole authorization: its holders may read and write
//! every image under the provider's root ([`resolve_under`] refuses absolute paths, `..` and
//! symlinks leading outside it). Keep per-provider keys apart.
//!
//! ## Limits
//!
//! - The certificates live [`CopyRequest::cert_lifetime`] (15 min by default): S opens a new
//!   export per token and D reaches it by a new handshake, so a copy must end within it.
//! - S serves each export on the address its control connection arrived on, and D is told
//!   to reach it at the address the initiator used for S: S must be reachable from D there
//!   (no NAT between them).
//! - The control channel authenticates but does not encrypt; tokens and image paths are
//!   visible on the wire.
//! - Tokens live in S's memory: a restarted S has forgotten them, and the copy fails.
//!
//! [`NbdServer`]: block_io::nbd::NbdServer

pub mod ca;
pub mod control;
mod daemon;
#[cfg(feature = "testing")]
pub mod fuzzing;
mod initiator;
pub mod tls;
mod window;

pub use ca::{peer_name, ProviderKeyPair, PublicKey, Role, TransferCa};
pub use control::{
    ByteCounter, ControlKey, Counted, Reply, Request, Session, SourceEndpoint, TransferStatus,
    MAX_FRAME, PROTOCOL_VERSION,
};
pub use daemon::{resolve_under, DaemonConfig, DaemonStop, ImageOpener, ProviderDaemon};
pub use initiator::{copy, copy_blocking, ControlClient, CopyReport, CopyRequest, Endpoint};
pub use tls::{destination_config, source_config};
pub use window::TokenExport;

use uuid::Uuid;

/// What went wrong in a transfer, on either side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Network or file I/O failed.
    #[error("I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer broke the control protocol.
    #[error("control protocol: {0}")]
    Protocol(String),
    /// A control frame's tag did not verify (wrong control key, tampering, replay).
    #[error("the control channel failed authentication (wrong control key?)")]
    Auth,
    /// No common control protocol version.
    #[error("control protocol version {theirs} is not ours ({ours})")]
    Version {
        /// Ours.
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// A certificate could not be made or used.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(String),
    /// The provider answered with an error.
    #[error("provider {provider} refused: {message} ({code})")]
    Remote {
        /// Which provider (its address).
        provider: String,
        /// The error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// A path names something outside the provider's root.
    #[error("{0} is outside the provider's root")]
    OutsideRoot(String),
    /// An offload operation failed.
    #[error("offload")]
    Offload(#[from] crate::Error),
    /// A device failed.
    #[error("block I/O")]
    Block(#[from] block_io::Error),
    /// The NBD client could not reach or use S's export.
    #[error("NBD")]
    Nbd(#[from] block_io::nbd::ClientError),
    /// A step took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The transfer was cancelled.
    #[error("transfer {0} was cancelled")]
    Cancelled(Uuid),
    /// A request or argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The provider refused a request about a transfer (unknown, already joined, wrong
    /// role, not certified).
    #[error("{message}")]
    Refused {
        /// The protocol's error code.
        code: &'static str,
        /// Why.
        message: String,
    },
}

impl TransferError {
    /// The protocol's error code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            TransferError::OutsideRoot(_) => "outside-root",
            TransferError::Refused { code, .. } => code,
            TransferError::Cancelled(_) => "cancelled",
            TransferError::Offload(_) => "token",
            TransferError::Tls(_) | TransferError::Certificate(_) => "tls",
            TransferError::Io(_)
            | TransferError::Block(_)
            | TransferError::Nbd(_)
            | TransferError::Timeout(_) => "io",
            TransferError::Remote { .. } => "io",
            TransferError::Protocol(_)
            | TransferError::Auth
            | TransferError::Version { .. }
            | TransferError::Invalid(_) => "bad-request",
        }
    }
}

/// `e` and its sources, joined with ": " (what goes into an `error` reply).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The principal a transfer's destination is (the audience of its tokens).
pub(crate) fn destination_principal(transfer: Uuid) -> crate::Principal {
    crate::Principal::new(format!("transfer:{}:destination", transfer))
}
