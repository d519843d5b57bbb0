//! The HTTP(S) source: an object on any web server or object store read by range requests
//! (RFC 9110 §14: `Range: bytes=a-b` answered by `206 Partial Content` with a
//! `Content-Range: bytes a-b/size`).
//!
//! Open sends `HEAD` for the size, ETag and Last-Modified; a server that refuses `HEAD` (a
//! presigned URL signed for `GET` only) or leaves out the length is asked a one-byte ranged
//! `GET` instead, whose `Content-Range` carries the size. A server that does not advertise
//! `Accept-Ranges: bytes` is probed the same way at open, so one that ignores ranges is refused
//! before any read. Every fetch carries `If-Match` with a strong ETag (else
//! `If-Unmodified-Since` with Last-Modified, RFC 9110 §13.1) and checks the response's
//! ETag, Last-Modified and total size against those captured at open.

use std::sync::Arc;

use reqwest::header::{self, HeaderMap};
use reqwest::{Client, StatusCode, Url};

use super::cache::{Deliver, FetchFuture, Source};
use super::direct::{Conn, DirectError, Target};
use super::error::{chain, RemoteError};
use super::retry::Retry;
use super::runtime::install_crypto_provider;
use super::{RemoteIdentity, RemoteOptions};

/// A remote object read by HTTP range requests.
#[derive(Debug)]
pub(crate) struct HttpSource {
    client: Client,
    url: Url,
    id: RemoteIdentity,
    retry: Retry,
    /// Where direct streams ask, if they suit the URL (see [`super::direct`]).
    direct: Option<Target>,
}

/// What a response says about the object's version.
struct Version {
    etag: Option<String>,
    last_modified: Option<String>,
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

fn version(h: &HeaderMap) -> Version {
    Version {
        etag: header_str(h, header::ETAG),
        last_modified: header_str(h, header::LAST_MODIFIED),
    }
}

/// Parses `Content-Range: bytes FIRST-LAST/TOTAL` (RFC 9110 §14.4) into (first, last, total);
/// `None` if it is missing, malformed, or has an unknown total (`*`).
fn content_range(h: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = header_str(h, header::CONTENT_RANGE)?;
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total) = (
        first.trim().parse().ok()?,
        last.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (first <= last && last < total).then_some((first, last, total))
}

fn transport(url: &Url, e: &reqwest::Error) -> RemoteError {
    RemoteError::Transport {
        url: url.to_string(),
        detail: chain(e),
    }
}

impl HttpSource {
    /// Opens `url`: its identity from `HEAD` (or a one-byte ranged `GET`), range support
    /// checked.
    pub(crate) async fn open(
        url: &str,
        opts: &RemoteOptions,
    ) -> Result<(Arc<dyn Source>, RemoteIdentity), RemoteError> {
        let parsed = Url::parse(url).map_err(|e| RemoteError::BadUrl {
            url: url.to_owned(),
            detail: e.to_string(),
        })?;
        install_crypto_provider();
        let mut builder = Client::builder()
            .connect_timeout(opts.timeout)
            .timeout(opts.timeout)
            .pool_max_idle_per_host(opts.readahead + 8)
            .tcp_nodelay(true);
        if let Some(pem) = &opts.ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| RemoteError::Config {
                    detail: format!("reading the extra CA certificates: {}", chain(&e)),
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| transport(&parsed, &e))?;
        let retry = Retry {
            retries: opts.retries,
            delay: opts.retry_delay,
        };
        let head = retry
            .run(|| async {
                let r = client
                    .head(parsed.clone())
                    .send()
                    .await
                    .map_err(|e| transport(&parsed, &e))?;
                let status = r.status();
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    return Err(RemoteError::Status {
                        url: url.to_owned(),
                        status: status.as_u16(),
                    });
                }
                Ok(r)
            })
            .await?;
        let h = head.headers();
        let len = header_str(h, header::CONTENT_LENGTH).and_then(|s| s.parse::<u64>().ok());
        let ranges = header_str(h, header::ACCEPT_RANGES).map(|s| s.to_ascii_lowercase());
        if head.status().as_u16() == 404 {
            return Err(RemoteError::Status {
                url: url.to_owned(),
                status: 404,
            });
        }
        if ranges.as_deref() == Some("none") {
            return Err(RemoteError::RangesIgnored {
                url: url.to_owned(),
                status: head.status().as_u16(),
            });
        }
        let mut id = RemoteIdentity {
            url: url.to_owned(),
            size: 0,
            etag: None,
            last_modified: None,
        };
        let probe = match (head.status().is_success(), len) {
            (true, Some(size)) => {
                let v = version(h);
                id.size = size;
                id.etag = v.etag;
                id.last_modified = v.last_modified;
                // Without `Accept-Ranges: bytes`, find out now rather than at the first read.
                size > 0 && ranges.as_deref() != Some("bytes")
            }
            _ => true,
        };
        if probe {
            let src = Probe {
                client: &client,
                url: &parsed,
            };
            let (size, v) = retry.run(|| src.run()).await?;
            id.size = size;
            id.etag = v.etag;
            id.last_modified = v.last_modified;
        }
        let direct = Target::new(&parsed, &id, opts.timeout);
        let src = HttpSource {
            client,
            url: parsed,
            id: id.clone(),
            retry,
            direct,
        };
        Ok((Arc::new(src), id))
    }

    /// The request for `[offset, offset + len)` with the version preconditions.
    fn request(&self, offset: u64, len: u64) -> reqwest::RequestBuilder {
        let mut rq = self.client.get(self.url.clone()).header(
            header::RANGE,
            format!("bytes={}-{}", offset, offset + len - 1),
        );
        match (&self.id.etag, &self.id.last_modified) {
            (Some(etag), _) if !etag.starts_with("W/") => {
                rq = rq.header(header::IF_MATCH, etag.as_str());
            }
            (_, Some(lm)) => rq = rq.header(header::IF_UNMODIFIED_SINCE, lm.as_str()),
            _ => {}
        }
        rq
    }

    /// Whether the response's version is the one captured at open; the difference if not.
    fn check_version(&self, h: &HeaderMap, total: Option<u64>) -> Result<(), RemoteError> {
        let v = version(h);
        let etag_changed = matches!((&self.id.etag, &v.etag), (Some(a), Some(b)) if a != b);
        let lm_changed =
            matches!((&self.id.last_modified, &v.last_modified), (Some(a), Some(b)) if a != b);
        let size_changed = total.is_some_and(|t| t != self.id.size);
        if etag_changed || lm_changed || size_changed {
            let found = RemoteIdentity {
                url: String::new(),
                size: total.unwrap_or(self.id.size),
                etag: v.etag,
                last_modified: v.last_modified,
            };
            return Err(self.changed(found.version()));
        }
        Ok(())
    }

    /// Judges the head of a direct stream's answer to `[offset, offset + len)` as
    /// [`HttpSource::fetch_once`] judges its answers.
    fn check_direct(
        &self,
        status: u16,
        h: &HeaderMap,
        offset: u64,
        len: u64,
    ) -> Result<(), DirectError> {
        match status {
            206 => {}
            412 => {
                return Err(DirectError::Changed(
                    self.changed("the server refused the precondition (412)".into()),
                ))
            }
            416 => {
                return Err(DirectError::Changed(
                    self.changed(format!("range {offset}+{len} not satisfiable (416)")),
                ))
            }
            200 => {
                self.check_version(h, None).map_err(DirectError::Changed)?;
                return Err(DirectError::Unsuitable(
                    "the range was ignored (200)".into(),
                ));
            }
            408 | 429 | 500..=599 => return Err(DirectError::Failed(format!("HTTP {status}"))),
            _ => return Err(DirectError::Unsuitable(format!("HTTP {status}"))),
        }
        let cr = content_range(h);
        self.check_version(h, cr.map(|c| c.2))
            .map_err(DirectError::Changed)?;
        match cr {
            Some((first, last, _))
                if first == offset && Some(last) == (offset + len).checked_sub(1) =>
            {
                Ok(())
            }
            _ => Err(DirectError::Unsuitable(format!(
                "asked for {offset}+{len}, got Content-Range {:?}",
                header_str(h, header::CONTENT_RANGE)
            ))),
        }
    }

    fn changed(&self, found: String) -> RemoteError {
        RemoteError::Changed {
            url: self.id.url.clone(),
            expected: self.id.version(),
            found,
        }
    }

    /// One try at fetching `[offset, offset + len)`: its bytes go to `deliver` as they arrive,
    /// `got` counts them.
    async fn fetch_once(
        &self,
        offset: u64,
        len: u64,
        got: &mut u64,
        deliver: &mut Deliver,
    ) -> Result<(), RemoteError> {
        let url = &self.id.url;
        let mut r = self
            .request(offset, len)
            .send()
            .await
            .map_err(|e| transport(&self.url, &e))?;
        let status = r.status();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::PRECONDITION_FAILED => {
                return Err(self.changed("the server refused the precondition (412)".into()))
            }
            StatusCode::OK => {
                // A 200 may also be a whole object that was replaced by a smaller one; name
                // the change if the headers show it, else the missing range support.
                self.check_version(r.headers(), None)?;
                return Err(RemoteError::RangesIgnored {
                    url: url.clone(),
                    status: 200,
                });
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The object shrank below the range: `Content-Range: bytes */SIZE`.
                return Err(self.changed(format!("range {offset}+{len} not satisfiable (416)")));
            }
            _ => {
                return Err(RemoteError::Status {
                    url: url.clone(),
                    status: status.as_u16(),
                })
            }
        }
        let cr = content_range(r.headers());
        self.check_version(r.headers(), cr.map(|c| c.2))?;
        match cr {
            Some((first, last, _)) if first == offset && last == offset + len - 1 => {}
            _ => {
                return Err(RemoteError::Protocol {
                    url: url.clone(),
                    detail: format!(
                        "asked for bytes {}-{}, got Content-Range {:?}",
                        offset,
                        offset + len - 1,
                        header_str(r.headers(), header::CONTENT_RANGE)
                    ),
                })
            }
        }
        // The body's buffers go on as they come: no copy into one.
        let mut this = 0u64;
        while let Some(chunk) = r.chunk().await.map_err(|e| transport(&self.url, &e))? {
            this += chunk.len() as u64;
            if this > len {
                return Err(RemoteError::Protocol {
                    url: url.clone(),
                    detail: format!("response for {offset}+{len} is longer than asked"),
                });
            }
            *got += chunk.len() as u64;
            deliver(chunk);
        }
        if this != len {
            return Err(RemoteError::Truncated {
                url: url.clone(),
                offset,
                want: len,
                got: this,
            });
        }
        Ok(())
    }
}

impl Source for HttpSource {
    fn direct(&self) -> bool {
        self.direct.is_some()
    }

    fn open_range(&self, conn: Option<Conn>, offset: u64, len: u64) -> Result<Conn, DirectError> {
        match &self.direct {
            Some(t) => t.request(conn, offset, len, &|status, h| {
                self.check_direct(status, h, offset, len)
            }),
            None => Err(DirectError::Unsuitable("not a plain http:// URL".into())),
        }
    }

    fn fetch(self: Arc<Self>, offset: u64, len: u64, mut deliver: Deliver) -> FetchFuture {
        Box::pin(async move {
            let mut got = 0u64;
            let mut attempt = 0u32;
            loop {
                // A retry asks only for what has not arrived yet.
                let r = self
                    .fetch_once(offset + got, len - got, &mut got, &mut deliver)
                    .await;
                match r {
                    // Everything arrived before the failure (a reset after the last byte).
                    Err(_) if got == len => return Ok(()),
                    Err(e) if e.is_transient() && attempt < self.retry.retries => {
                        tokio::time::sleep(self.retry.delay(attempt)).await;
                        attempt += 1;
                    }
                    r => return r,
                }
            }
        })
    }
}

/// The one-byte ranged `GET` that finds the size and proves range support.
struct Probe<'a> {
    client: &'a Client,
    url: &'a Url,
}

impl Probe<'_> {
    async fn run(&self) -> Result<(u64, Version), RemoteError> {
        let r = self
            .client
            .get(self.url.clone())
            .header(header::RANGE, "bytes=0-0")
            .send()
            .await
            .map_err(|e| transport(self.url, &e))?;
        let status = r.status();
        let url = self.url.to_string();
        match status {
            StatusCode::PARTIAL_CONTENT => match content_range(r.headers()) {
                Some((_, _, total)) => Ok((total, version(r.headers()))),
                None => Err(RemoteError::Protocol {
                    url,
                    detail: "a 206 response without a usable Content-Range".into(),
                }),
            },
            // An empty object has no byte 0: `Content-Range: bytes */0`.
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let empty =
                    header_str(r.headers(), header::CONTENT_RANGE).as_deref() == Some("bytes */0");
                if empty {
                    Ok((0, version(r.headers())))
                } else {
                    Err(RemoteError::Status { url, status: 416 })
                }
            }
            StatusCode::OK => Err(RemoteError::RangesIgnored { url, status: 200 }),
            _ => Err(RemoteError::Status {
                url,
                status: status.as_u16(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn content_range_parses_and_rejects() {
        let mut h = HeaderMap::new();
        assert_eq!(content_range(&h), None);
        for (v, want) in [
            ("bytes 0-0/10", Some((0, 0, 10))),
            ("bytes 5-9/10", Some((5, 9, 10))),
            ("bytes 5-10/10", None),
            ("bytes 9-5/10", None),
            ("bytes */10", None),
            ("bytes 0-1/*", None),
            ("items 0-1/2", None),
        ] {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_static(v));
            assert_eq!(content_range(&h), want, "{v}");
        }
    }
}
