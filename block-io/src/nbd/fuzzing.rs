//! The steps the `nbd_server` fuzz target runs on arbitrary bytes, shared with the stable
//! test that replays its corpus (`tests/nbd_fuzz_corpus.rs`), so both exercise the same
//! paths: the bytes are a client's side of a conversation, fed to the server's real
//! connection code (greeting, option haggling, `NBD_OPT_STARTTLS`, transmission) over an
//! in-memory duplex stream, against memory-backed exports.
//!
//! Input layout: byte 0 holds flags, the rest is what the client sends (after it, the client
//! closes its side):
//! - bit 0: the server requires TLS. Its configuration has no certificate, so a TLS
//!   handshake always fails: this fuzzes the pre-TLS state machine and the TLS record
//!   parsing of the ClientHello;
//! - bit 1: the default export `""` is read-only;
//! - bit 2: the default export has 4096-byte sectors (else 512).
//!
//! The exports: `""` ([`DISK_SIZE`] bytes, writable unless bit 1) and `"ro"` (read-only),
//! each with [`PATTERN`] at [`PATTERN_OFFSET`] so reads find data. [`run`] checks, besides
//! that nothing panics: the server greets first; the connection ends once the client's
//! input is used up and the server's output read (no hang, [`DEADLINE`]); the engines close
//! without a failure; a read-only export never changes; and with TLS required, no export
//! changes at all. A broken rule panics: that is the fuzzer's finding.

// A harness: a broken rule must panic, as that is what the fuzzer reports. Nothing on the
// serving path calls into this module.
#![allow(clippy::panic, clippy::expect_used)]

pub mod tls_records;

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::export::{Export, Served};
use super::server::connection;
use crate::{MemStorage, RawDisk, RawOptions, Storage};
pub use tls_records::tls_records;

/// Size of each export.
pub const DISK_SIZE: u64 = 1 << 20;
/// Where each export holds [`PATTERN`] bytes.
pub const PATTERN_OFFSET: u64 = 64 << 10;
/// How many pattern bytes.
pub const PATTERN_LEN: usize = 64 << 10;
/// The pattern byte.
pub const PATTERN: u8 = 0xa5;
/// How long a conversation may take once the client has sent everything.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Flag bit: the server requires TLS.
pub const FLAG_TLS: u8 = 1;
/// Flag bit: the default export is read-only.
pub const FLAG_READ_ONLY: u8 = 2;
/// Flag bit: the default export has 4096-byte sectors.
pub const FLAG_4K: u8 = 4;

/// What one conversation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every byte the server sent.
    pub output: Vec<u8>,
    /// Whether the default export's bytes changed.
    pub changed: bool,
}

/// A TLS configuration with no certificate: every handshake fails after the ClientHello.
#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

fn tls_config() -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("the ring provider supports every version")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Arc::new(config)
}

fn disk(sector: u32, read_only: bool) -> Arc<RawDisk<MemStorage>> {
    let s = MemStorage::new();
    s.set_len(DISK_SIZE).expect("memory storage grows");
    s.write_at(&[PATTERN; PATTERN_LEN], PATTERN_OFFSET)
        .expect("memory storage writes");
    Arc::new(
        RawDisk::open(
            s,
            &RawOptions::new().sector_size(sector).read_only(read_only),
        )
        .expect("a valid raw disk"),
    )
}

fn contents(d: &RawDisk<MemStorage>) -> Vec<u8> {
    let mut b = vec![0u8; DISK_SIZE as usize];
    d.storage()
        .read_at(&mut b, 0)
        .expect("memory storage reads");
    b
}

/// Runs one conversation (see the module docs for the layout and the checks).
pub fn run(data: &[u8]) -> Outcome {
    let (flags, conversation) = match data.split_first() {
        Some((f, rest)) => (*f, rest),
        None => (0, &[][..]),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(converse(flags, conversation))
}

async fn converse(flags: u8, conversation: &[u8]) -> Outcome {
    let tls = flags & FLAG_TLS != 0;
    let sector = if flags & FLAG_4K != 0 { 4096 } else { 512 };
    let rw = disk(sector, false);
    let ro = disk(512, false);
    let (rw_before, ro_before) = (contents(&rw), contents(&ro));
    let exports = [
        Export::new("", rw.clone())
            .read_only(flags & FLAG_READ_ONLY != 0)
            .description("fuzz"),
        Export::new("ro", ro.clone()).read_only(true),
    ];
    let served = exports
        .iter()
        .map(Served::new)
        .collect::<crate::Result<Vec<_>>>()
        .expect("the exports are valid");
    let served: Arc<[Arc<Served>]> = served.into();

    let (client, server) = tokio::io::duplex(64 << 10);
    let (_stop, stop_rx) = watch::channel(false);
    let conn = tokio::spawn(connection(
        server,
        served.clone(),
        tls.then(tls_config),
        // Longer than the harness waits: a stuck handshake is a finding, not a timeout.
        DEADLINE * 2,
        Arc::new(super::BufferPool::default()),
        stop_rx,
    ));
    let (mut rd, mut wr) = tokio::io::split(client);
    let input = conversation.to_vec();
    let feeder = tokio::spawn(async move {
        // The server may close before it read everything: the rest has nowhere to go.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    });
    let mut output = Vec::new();
    let finished = tokio::time::timeout(DEADLINE, async {
        let _ = rd.read_to_end(&mut output).await;
        conn.await
    })
    .await;
    match finished {
        Err(_) => panic!("the connection did not end within {DEADLINE:?} of the input's end"),
        Ok(Err(e)) => panic!("the connection task failed: {e}"),
        Ok(Ok(())) => {}
    }
    let _ = feeder.await;
    for e in served.iter() {
        if let Err(err) = e.disk.close().await {
            panic!("export '{}' failed: {}", e.name, err.chain_string());
        }
    }

    assert_greeting(&output);
    let changed = contents(&rw) != rw_before;
    if contents(&ro) != ro_before {
        panic!("the read-only export 'ro' changed");
    }
    if changed && flags & FLAG_READ_ONLY != 0 {
        panic!("the read-only default export changed");
    }
    if changed && tls {
        panic!("an export changed although TLS was required and cannot succeed");
    }
    Outcome { output, changed }
}

fn assert_greeting(output: &[u8]) {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&super::proto::NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&super::proto::IHAVEOPT.to_be_bytes());
    let f = super::proto::FLAG_FIXED_NEWSTYLE | super::proto::FLAG_NO_ZEROES;
    greeting[16..].copy_from_slice(&f.to_be_bytes());
    if !output.starts_with(&greeting) {
        panic!("the server did not greet first");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto;

    #[test]
    fn an_empty_conversation_gets_the_greeting() {
        let o = run(&[]);
        assert_eq!(o.output.len(), 18);
        assert!(!o.changed);
    }

    #[test]
    fn a_write_after_go_changes_the_default_export() {
        let mut c = vec![0u8];
        c.extend_from_slice(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes());
        let go = proto::InfoRequest {
            name: String::new(),
            requests: vec![],
        }
        .encode();
        let h = proto::OptionHeader {
            option: proto::OPT_GO,
            len: go.len() as u32,
        };
        c.extend_from_slice(&h.encode());
        c.extend_from_slice(&go);
        let w = proto::Request {
            flags: 0,
            command: proto::Command::Write,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        c.extend_from_slice(&w.encode());
        c.extend_from_slice(&[7u8; 512]);
        assert!(run(&c).changed);
        // The same with the export read-only, or TLS required: refused.
        c[0] = FLAG_READ_ONLY;
        assert!(!run(&c).changed);
        c[0] = FLAG_TLS;
        assert!(!run(&c).changed);
    }
}
