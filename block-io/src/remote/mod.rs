//! Images on web servers and object stores: a read-only [`Storage`] over HTTP(S) range requests
//! and over the S3 API, and the upload of a whole image to S3.
//!
//! [`open_url`] takes `https://…`/`http://…` (any web server or object store that honours
//! `Range: bytes=a-b`, e.g. nginx, or S3/Azure/GCS presigned URLs) or `s3://bucket/key` (the S3
//! API through the `object_store` crate) and returns the storage with the object's
//! [`RemoteIdentity`] (size, ETag, Last-Modified), which the lineage checks of a chain record
//! next to the parent ids. Every response is checked against that identity (`If-Match` on the
//! request, the response's ETag, Last-Modified and total length), so an object replaced under
//! an open image fails its reads with [`RemoteError::Changed`] (kind
//! [`ErrorKind::Corrupt`]) from then on, never mixing old and new bytes. Writes fail with
//! [`ErrorKind::ReadOnly`].
//!
//! Reads go through a block cache ([`RemoteOptions::block_size`] blocks, at most
//! [`RemoteOptions::cache_bytes`] of them, least recently used evicted) with sequential
//! read-ahead: once reads that continue each other have covered a block, the next
//! [`RemoteOptions::readahead`] blocks are fetched in the background, several requests of up to
//! [`RemoteOptions::request_blocks`] blocks in flight at once. Large sequential reads of a plain
//! `http://` object skip the cache instead ([`RemoteOptions::stream_reads`]): each such run of
//! reads gets a connection of its own with one long range request at a time, whose body is read
//! from the socket straight into the caller's buffers on the caller's thread, as `curl` reads.
//! Transient failures (connection errors, timeouts, truncated bodies, HTTP 5xx, 408, 429) are
//! retried with exponential backoff, [`RemoteOptions::retries`] times at most.
//!
//! The network side runs on one tokio runtime shared by every remote storage of the process
//! (one worker thread, started on first use), except direct streams, which block the reading
//! thread on their socket; the [`Storage`] methods stay synchronous and may be called from any
//! thread, including from inside another tokio runtime. TLS is rustls with
//! the ring provider, which is installed as the process default if none is installed yet.
//!
//! # S3 configuration
//!
//! `s3://` URLs take their endpoint and credentials from the environment, as the AWS tools do:
//!
//! | variable | meaning |
//! |---|---|
//! | `AWS_ENDPOINT_URL` | the S3 endpoint, e.g. `http://127.0.0.1:9000` (default: AWS for the region) |
//! | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | the access key (and `AWS_SESSION_TOKEN` if temporary) |
//! | `AWS_REGION` (or `AWS_DEFAULT_REGION`) | the region to sign for (default `us-east-1`) |
//! | `AWS_ALLOW_HTTP` | `true` to allow a plain-HTTP endpoint |
//! | `AWS_VIRTUAL_HOSTED_STYLE_REQUEST` | `true` for `bucket.host` addressing (default: path style) |
//!
//! Every other `AWS_*` variable that `object_store`'s `AmazonS3Builder::from_env` knows is
//! honoured too.
//!
//! # Notes
//!
//! - Tests run against real servers on loopback: nginx (`tests/remote_http.rs`) and `s3s-fs`
//!   (`tests/remote_s3.rs`). Ceph's radosgw (Debian's 16.2 packages) was tried first for S3: a
//!   single-node cluster with a memstore OSD got its monitor up at once, but the OSD was never
//!   marked up and radosgw waited on its pools past the two minutes a test may take, on a
//!   two-core host where three Ceph daemons also compete with the build; `s3s-fs` starts in
//!   milliseconds.
//! - Sequential throughput: `.ci/bench-remote-http` reads a 1 GiB file from nginx through this
//!   storage and with `curl` in one run and prints the ratio. Through the cache alone (one
//!   runtime worker receiving into fresh buffers, the reader copying them out) 1 MiB reads
//!   reached 0.45-0.83x curl: the receive copy lands in cold memory (about twice curl's kernel
//!   time per byte), allocations fault pages in, and the reader waits on block hand-offs.
//!   Direct streams read with one copy into the reader's own buffer, as curl does: 1.1-1.2x
//!   curl (median of five, loaded two-core host), 0.23 s of CPU per GiB instead of 0.33.

mod cache;
mod direct;
mod error;
mod http;
mod retry;
mod runtime;
mod s3;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use cache::{RemoteStats, RemoteStorage};
pub use error::RemoteError;

use crate::error::{ErrorKind, Result};
use crate::storage::Storage;

/// Tuning of a remote storage: cache geometry, read-ahead, retries, upload part size.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// Size of a cache block and of a ranged request, in bytes (default 1 MiB; at least 4 KiB).
    pub block_size: usize,
    /// Memory for cached blocks, in bytes (default 64 MiB); at least twice the read-ahead.
    pub cache_bytes: usize,
    /// Blocks fetched ahead of a sequential reader (default 16; 0 turns read-ahead off).
    pub readahead: usize,
    /// Most consecutive blocks one request fetches (default 8): read-ahead tops its window up
    /// this many blocks at a time, so a streaming reader costs a request per 8 MiB (two in
    /// flight with the default window) while random reads still fetch single blocks.
    pub request_blocks: usize,
    /// Retries of a transient failure before the read fails (default 5).
    pub retries: u32,
    /// First retry delay; each next one doubles, up to 2 s (default 100 ms).
    pub retry_delay: Duration,
    /// Timeout of one request, connection included (default 60 s).
    pub timeout: Duration,
    /// Part size of a multipart upload, in bytes (default 16 MiB; S3 needs at least 5 MiB).
    /// Images up to this size are uploaded with a single put.
    pub part_size: usize,
    /// Whether large sequential reads of a plain `http://` object are read straight from the
    /// socket into the caller's buffers, past the cache (default true): once a run of reads
    /// of at least 64 KiB each is sequential, it gets its own connection and one long range
    /// request at a time (4 MiB, doubling up to 256 MiB), read as `curl` reads. `https://`,
    /// S3, smaller reads, random reads and readers with several reads in flight at once (they
    /// share the cache's blocks instead) always go through the cache.
    pub stream_reads: bool,
    /// Extra CA certificates (PEM, one or more) that `https://` servers may chain to, besides
    /// the system's roots: a private CA of an internal image server (default none). An `s3://`
    /// endpoint is checked against the system's roots only.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            block_size: 1 << 20,
            cache_bytes: 64 << 20,
            readahead: 16,
            request_blocks: 8,
            retries: 5,
            retry_delay: Duration::from_millis(100),
            timeout: Duration::from_secs(60),
            part_size: 16 << 20,
            stream_reads: true,
            ca_pem: None,
        }
    }
}

/// What identifies the remote object a storage reads: captured at open, checked on every
/// response, and recorded by lineage checks next to the image's own ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteIdentity {
    /// The URL the object was opened by.
    pub url: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its entity tag as the server sent it (quotes included), if it sent one.
    pub etag: Option<String>,
    /// Its `Last-Modified` time as the server sent it (an HTTP date), if it sent one.
    pub last_modified: Option<String>,
}

impl RemoteIdentity {
    /// A short description of the version: ETag, Last-Modified and size.
    pub fn version(&self) -> String {
        format!(
            "etag {}, last-modified {}, {} bytes",
            self.etag.as_deref().unwrap_or("none"),
            self.last_modified.as_deref().unwrap_or("none"),
            self.size
        )
    }
}

impl fmt::Display for RemoteIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.url, self.version())
    }
}

/// Whether `s` is a URL that [`open_url`] takes (`http://`, `https://` or `s3://`), as opposed
/// to a local path.
pub fn is_remote_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("s3://")
}

/// Opens the object at `url` (`http://`, `https://` or `s3://bucket/key`) read-only with the
/// default [`RemoteOptions`]: its storage and its identity.
pub fn open_url(url: &str) -> Result<(Arc<dyn Storage>, RemoteIdentity)> {
    open_url_with(url, &RemoteOptions::default())
}

/// [`open_url`] with options.
pub fn open_url_with(
    url: &str,
    opts: &RemoteOptions,
) -> Result<(Arc<dyn Storage>, RemoteIdentity)> {
    let s = RemoteStorage::open(url, opts)?;
    let id = s.identity().clone();
    Ok((Arc::new(s), id))
}

/// Uploads the whole of `src` to `url` (`s3://bucket/key`), replacing any object there: one put
/// up to [`RemoteOptions::part_size`], a multipart upload of such parts above (a few in
/// flight; aborted on failure, so no partial object appears). Returns the new object's identity.
pub fn upload(src: &dyn Storage, url: &str, opts: &RemoteOptions) -> Result<RemoteIdentity> {
    if !url.get(..5).unwrap_or(url).eq_ignore_ascii_case("s3://") {
        return Err(crate::Error::new(
            ErrorKind::Unsupported,
            format!("uploading to {url}: only s3:// URLs take uploads"),
        ));
    }
    s3::upload(src, url, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_urls_are_told_from_paths() {
        assert!(is_remote_url("https://example.org/a.vhdx"));
        assert!(is_remote_url("HTTP://example.org/a.vhdx"));
        assert!(is_remote_url("s3://bucket/a.vhdx"));
        assert!(!is_remote_url("/srv/a.vhdx"));
        assert!(!is_remote_url("nbd://host/export"));
        assert!(!is_remote_url("s3"));
    }
}
