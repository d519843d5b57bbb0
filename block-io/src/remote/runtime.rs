//! The tokio runtime behind every remote storage of the process, and the bridge from the
//! synchronous [`Storage`](crate::Storage) methods to it.
//!
//! Callers never `block_on` (that panics inside another runtime): work is spawned onto this
//! runtime and its result handed back through a channel, so the storage may be used from any
//! thread, a tokio worker of another runtime included.

use std::future::Future;
use std::sync::OnceLock;

use parking_lot::Mutex;
use tokio::runtime::Runtime;

use super::error::RemoteError;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// The shared runtime, started on first use. One worker thread: the work is I/O, and on a
/// loaded two-core host a second worker cost more CPU (and 10% of sequential throughput) than
/// it gained.
pub(crate) fn runtime() -> Result<&'static Runtime, RemoteError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let _guard = INIT.lock();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vdisk-remote")
        .enable_all()
        .build()
        .map_err(|e| RemoteError::Runtime {
            detail: e.to_string(),
        })?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs `fut` on the shared runtime and waits for its output on the calling thread.
pub(crate) fn run<F>(fut: F) -> Result<F::Output, RemoteError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = runtime()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| RemoteError::Runtime {
        detail: "a background request ended without an answer".into(),
    })
}

/// Makes ring the process's default rustls provider unless one is installed already (reqwest
/// and object_store build their TLS configurations from the default).
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: some provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
