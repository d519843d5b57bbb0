//! The S3 source and upload: `s3://bucket/key` through the `object_store` crate's S3 client.
//!
//! Open is a `HeadObject` (size, ETag, Last-Modified); a fetch is a ranged `GetObject` with
//! `If-Match` on the ETag, whose answer is checked again (ETag, range). An upload is one
//! `PutObject` up to the part size, else a multipart upload (`CreateMultipartUpload`,
//! `UploadPart` with a few parts in flight, `CompleteMultipartUpload`, or
//! `AbortMultipartUpload` when anything fails). Endpoint and credentials come from the `AWS_*`
//! environment variables (see the [module docs](super)). `object_store` retries transient
//! failures itself, with the bounds of [`RemoteOptions`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use reqwest::Url;

use super::cache::{Deliver, FetchFuture, Source};
use super::error::{chain, RemoteError};
use super::runtime::{self, install_crypto_provider};
use super::{RemoteIdentity, RemoteOptions};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Multipart parts uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

/// The smallest part S3 accepts (except the last).
const MIN_PART: usize = 5 << 20;

/// A bucket client and the object's key, parsed from `s3://bucket/key`.
struct Target {
    store: Arc<AmazonS3>,
    path: Path,
    url: String,
}

fn target(url: &str, opts: &RemoteOptions) -> Result<Target, RemoteError> {
    let bad = |detail: String| RemoteError::BadUrl {
        url: url.to_owned(),
        detail,
    };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let bucket = parsed
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no bucket name".into()))?;
    let path = Path::from_url_path(parsed.path()).map_err(|e| bad(chain(&e)))?;
    if path.as_ref().is_empty() {
        return Err(bad("no object key".into()));
    }
    install_crypto_provider();
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: opts.retry_delay,
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: opts.retries as usize,
        retry_timeout: opts.timeout,
    };
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry)
        .build()
        .map_err(|e| bad(chain(&e)))?;
    Ok(Target {
        store: Arc::new(store),
        path,
        url: url.to_owned(),
    })
}

fn store_error(url: &str, e: object_store::Error) -> RemoteError {
    RemoteError::Store {
        url: url.to_owned(),
        not_found: matches!(e, object_store::Error::NotFound { .. }),
        detail: chain(&e),
    }
}

fn identity(url: &str, meta: &ObjectMeta) -> RemoteIdentity {
    RemoteIdentity {
        url: url.to_owned(),
        size: meta.size,
        etag: meta.e_tag.clone(),
        last_modified: Some(
            meta.last_modified
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string(),
        ),
    }
}

/// An S3 object read by ranged `GetObject`s.
#[derive(Debug)]
pub(crate) struct S3Source {
    store: Arc<AmazonS3>,
    path: Path,
    id: RemoteIdentity,
}

impl S3Source {
    /// Opens `s3://bucket/key`: its identity from `HeadObject`.
    pub(crate) async fn open(
        url: &str,
        opts: &RemoteOptions,
    ) -> Result<(Arc<dyn Source>, RemoteIdentity), RemoteError> {
        let t = target(url, opts)?;
        let meta = t
            .store
            .head(&t.path)
            .await
            .map_err(|e| store_error(url, e))?;
        let id = identity(url, &meta);
        let src = S3Source {
            store: t.store,
            path: t.path,
            id: id.clone(),
        };
        Ok((Arc::new(src), id))
    }

    fn changed(&self, found: String) -> RemoteError {
        RemoteError::Changed {
            url: self.id.url.clone(),
            expected: self.id.version(),
            found,
        }
    }

    async fn fetch_range(
        &self,
        offset: u64,
        len: u64,
        deliver: &mut Deliver,
    ) -> Result<(), RemoteError> {
        let url = &self.id.url;
        let want = offset..offset + len;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(want.clone())),
            if_match: self.id.etag.clone(),
            ..GetOptions::default()
        };
        let r = match self.store.get_opts(&self.path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::Precondition { .. }) => {
                return Err(self.changed("the store refused If-Match".into()))
            }
            Err(e @ object_store::Error::NotFound { .. }) => {
                return Err(self.changed(format!("gone ({})", chain(&e))))
            }
            Err(e) => return Err(store_error(url, e)),
        };
        let etag_changed = matches!((&self.id.etag, &r.meta.e_tag), (Some(a), Some(b)) if a != b);
        if etag_changed || r.meta.size != self.id.size {
            return Err(self.changed(identity(url, &r.meta).version()));
        }
        if r.range != want {
            return Err(RemoteError::Protocol {
                url: url.clone(),
                detail: format!("asked for {want:?}, got {:?}", r.range),
            });
        }
        let data = r.bytes().await.map_err(|e| store_error(url, e))?;
        if data.len() as u64 != len {
            return Err(RemoteError::Truncated {
                url: url.clone(),
                offset,
                want: len,
                got: data.len() as u64,
            });
        }
        deliver(data);
        Ok(())
    }
}

impl Source for S3Source {
    fn fetch(self: Arc<Self>, offset: u64, len: u64, mut deliver: Deliver) -> FetchFuture {
        Box::pin(async move { self.fetch_range(offset, len, &mut deliver).await })
    }
}

/// Reads `[offset, offset + len)` of `src` into a new buffer.
fn read_part(src: &dyn Storage, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    src.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// See [`super::upload`].
pub(crate) fn upload(src: &dyn Storage, url: &str, opts: &RemoteOptions) -> Result<RemoteIdentity> {
    let ctx = |e: RemoteError| e.into_error(format!("uploading to {url}"));
    let t = target(url, opts).map_err(ctx)?;
    let size = src.len()?;
    let part = opts.part_size.max(MIN_PART);
    let store = t.store.clone();
    let path = t.path.clone();
    if size <= part as u64 {
        let data = read_part(src, 0, size as usize)?;
        let u = t.url.clone();
        runtime::run(async move {
            store
                .put(&path, PutPayload::from(data))
                .await
                .map_err(|e| store_error(&u, e))
        })
        .and_then(|r| r)
        .map_err(ctx)?;
    } else {
        let u = t.url.clone();
        let mut up = runtime::run(async move {
            store
                .put_multipart(&path)
                .await
                .map_err(|e| store_error(&u, e))
        })
        .and_then(|r| r)
        .map_err(ctx)?;
        let rt = runtime::runtime().map_err(ctx)?;
        let sent: Result<()> = (|| {
            let mut inflight = VecDeque::new();
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(part as u64) as usize;
                let data = read_part(src, off, n)?;
                inflight.push_back(rt.spawn(up.put_part(PutPayload::from(data))));
                off += n as u64;
                while inflight.len() >= PARTS_IN_FLIGHT || (off >= size && !inflight.is_empty()) {
                    if let Some(h) = inflight.pop_front() {
                        wait_part(h, url)?;
                    }
                }
            }
            Ok(())
        })();
        let u = t.url.clone();
        let finished = match sent {
            Ok(()) => {
                runtime::run(async move { up.complete().await.map_err(|e| store_error(&u, e)) })
                    .and_then(|r| r)
                    .map_err(ctx)
            }
            Err(e) => {
                // Leave no half-uploaded parts behind; the first failure is what counts.
                let _ = runtime::run(async move { up.abort().await });
                return Err(e);
            }
        };
        finished?;
    }
    let (store, path, u) = (t.store.clone(), t.path.clone(), t.url.clone());
    let meta = runtime::run(async move { store.head(&path).await.map_err(|e| store_error(&u, e)) })
        .and_then(|r| r)
        .map_err(ctx)?;
    Ok(identity(url, &meta))
}

/// Waits for one part upload spawned on the runtime.
fn wait_part(h: tokio::task::JoinHandle<object_store::Result<()>>, url: &str) -> Result<(), Error> {
    let u = url.to_owned();
    runtime::run(async move {
        match h.await {
            Ok(r) => r.map_err(|e| store_error(&u, e)),
            Err(e) => Err(RemoteError::Runtime {
                detail: e.to_string(),
            }),
        }
    })
    .and_then(|r| r)
    .map_err(|e| e.into_error(format!("uploading a part to {url}")))
}
