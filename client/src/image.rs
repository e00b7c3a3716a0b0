//! [`ImageClient`]: one image on a blockgate (or imageio) server, over
//! HTTPS with reqwest and rustls. Each call is one HTTP request, retried
//! by the [`RetryPolicy`] when that is safe; reads check that exactly the
//! asked bytes arrived, of the asked range (its `Content-Range`), so a
//! short body or another range is never taken for data. Nothing
//! the server sends is trusted further than checked: JSON and error
//! bodies are read up to a bound, extents must follow each other without
//! gaps or empty ones, a sparse stream must end with its `stop` frame, and
//! the server's messages are kept with their control characters escaped.

use std::time::Duration;

use blockgate_protocol::blkhash::Algorithm;
use blockgate_protocol::checkpoint::{Checkpoint, Restored, check_id};
use blockgate_protocol::json_array::ArrayDecoder;
use blockgate_protocol::sparse::Checksum;
use blockgate_protocol::{Extent, ImageOptions};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, Stream, StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response};
use serde::de::DeserializeOwned;

use crate::error::{ClientError, Result};
use crate::framing::FrameWalker;
use crate::http::{Trust, json, send, trusting};
use crate::retry::RetryPolicy;

/// Most bytes of one extent's JSON text.
const MAX_EXTENT_TEXT: usize = 64 << 10;

/// What a backup (an extents listing or a sparse stream) covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Only what changed: since `since`, else what the ticket's bitmap
    /// marks (imageio's `context=dirty`).
    pub incremental: bool,
    /// The checkpoint of the previous backup.
    pub since: Option<String>,
    /// The checkpoint this backup reaches (the server makes it if it does
    /// not exist).
    pub checkpoint: Option<String>,
}

impl Scope {
    /// Data and zero ranges of the whole image.
    pub fn full() -> Scope {
        Scope::default()
    }

    /// The query string, ids checked so none needs escaping.
    fn query(&self) -> Result<String> {
        let mut query = String::from(if self.incremental || self.since.is_some() { "context=dirty" } else { "context=zero" });
        for (key, id) in [("since", &self.since), ("checkpoint", &self.checkpoint)] {
            if let Some(id) = id {
                check_id(id).map_err(ClientError::Invalid)?;
                query.push_str(&format!("&{key}={id}"));
            }
        }
        Ok(query)
    }
}

/// A client of one image URL (`https://HOST:PORT/images/TICKET`).
#[derive(Clone)]
pub struct ImageClient {
    http: reqwest::Client,
    url: String,
    retry: RetryPolicy,
}

impl ImageClient {
    /// A client for `url`, trusting `trust`, keeping up to `connections`
    /// HTTP/1.1 connections open (one per parallel request).
    pub fn new(url: &str, trust: &Trust, connections: usize) -> Result<ImageClient> {
        if !url.starts_with("https://") {
            return Err(ClientError::Invalid(format!("{url:?} is not an https:// image URL")));
        }
        // No redirects: one would take the image's bytes (a range read, a
        // PUT's body) to wherever the server says, plain http:// too.
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls()
            .http1_only()
            .pool_max_idle_per_host(connections)
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .tcp_nodelay(true);
        let builder = trusting(builder, trust)?;
        Ok(ImageClient { http: builder.build()?, url: url.trim_end_matches('/').to_string(), retry: RetryPolicy::default() })
    }

    /// A client for the image at `url`'s path on a server's local unix
    /// socket (`--local-socket`): plain HTTP, no TLS, same API.
    pub fn over_unix_socket(url: &str, socket: &std::path::Path, connections: usize) -> Result<ImageClient> {
        let path = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .and_then(|rest| rest.find('/').map(|slash| &rest[slash..]))
            .ok_or_else(|| ClientError::Invalid(format!("{url:?} is not an image URL")))?;
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .pool_max_idle_per_host(connections)
            .read_timeout(Duration::from_secs(120))
            .build()?;
        Ok(ImageClient { http, url: format!("http://localhost{}", path.trim_end_matches('/')), retry: RetryPolicy::default() })
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> ImageClient {
        self.retry = retry;
        self
    }

    /// The image URL (`http://localhost/...` over a unix socket).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends a request; an error status is a [`ClientError::Status`] with
    /// the server's message.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Response> {
        send(&self.http, request).await
    }

    /// `OPTIONS`: features, limits and (from blockgate) size and bitmap.
    pub async fn options(&self) -> Result<ImageOptions> {
        self.retry.run("OPTIONS", || async { json(self.send(self.http.request(Method::OPTIONS, &self.url)).await?, "OPTIONS").await }).await
    }

    /// The image size, from the `Content-Range` of a one-byte GET: it works
    /// on imageio (which has no HEAD), and a refusal carries the server's
    /// reason in its body, which a HEAD answer cannot.
    pub async fn size(&self) -> Result<u64> {
        self.retry
            .run("GET size", || async {
                let response = self.send(self.http.get(&self.url).header(RANGE, "bytes=0-0")).await?;
                let content_range = response.headers().get(CONTENT_RANGE).and_then(|value| value.to_str().ok()).map(str::to_string);
                let size = match content_range {
                    Some(value) => value.rsplit_once('/').and_then(|(_, size)| size.parse().ok()),
                    None => response.headers().get(CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse().ok()),
                };
                size.ok_or_else(|| ClientError::Protocol("a ranged GET gave no Content-Range with the size".into()))
            })
            .await
    }

    /// The extents of `context`, optionally of one range, as a stream that
    /// parses the JSON array as it arrives; each must start where the last
    /// one ended (at the range's start first) and hold at least one byte.
    pub async fn extents<F>(&self, scope: &Scope, range: Option<(u64, u64)>) -> Result<impl Stream<Item = Result<Extent<F>>> + use<F>>
    where
        F: DeserializeOwned + Send + 'static,
    {
        let mut url = format!("{}/extents?{}", self.url, scope.query()?);
        if let Some((start, length)) = range {
            url.push_str(&format!("&start={start}&length={length}"));
        }
        let response = self.retry.run("GET extents", || self.send(self.http.get(&url))).await?;
        let body = response.bytes_stream().map_err(ClientError::from);
        let next = range.map_or(0, |(start, _)| start);
        let state = (Box::pin(body), BytesMut::new(), ArrayDecoder::default(), false, next);
        let invalid = |reason: String| ClientError::Protocol(format!("extents: {reason}"));
        Ok(stream::try_unfold(state, move |(mut body, mut buffer, mut decoder, mut ended, next)| async move {
            loop {
                if let Some(extent) = decoder.decode::<Extent<F>>(&mut buffer).map_err(|error| invalid(error.to_string()))? {
                    if extent.length == 0 {
                        return Err(invalid(format!("an empty extent at offset {}", extent.start)));
                    }
                    if extent.start != next {
                        return Err(invalid(format!("an extent at offset {} where one at {next} was due", extent.start)));
                    }
                    let end = extent.start.checked_add(extent.length).ok_or_else(|| invalid("an extent past 2^64 bytes".into()))?;
                    return Ok(Some((extent, (body, buffer, decoder, ended, end))));
                }
                if decoder.is_done() {
                    return Ok(None);
                }
                if ended {
                    return Err(invalid("the listing ended early".into()));
                }
                if buffer.len() > MAX_EXTENT_TEXT {
                    return Err(invalid(format!("an item larger than {MAX_EXTENT_TEXT} bytes")));
                }
                match body.next().await {
                    Some(chunk) => buffer.extend_from_slice(&chunk?),
                    None => ended = true,
                }
            }
        }))
    }

    /// `length` bytes at `offset` as a stream; the stream fails if the body
    /// ends short.
    pub async fn read_stream(&self, offset: u64, length: u64) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        if length == 0 {
            return Err(ClientError::Invalid("a read of 0 bytes".into()));
        }
        let range = format!("bytes={}-{}", offset, offset + length - 1);
        let response = self.send(self.http.get(&self.url).header(RANGE, range)).await?;
        check_range(&response, offset, length)?;
        let body = response.bytes_stream().map_err(ClientError::from);
        Ok(stream::try_unfold((Box::pin(body), 0u64), move |(mut body, got)| async move {
            match body.next().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    let got = got + chunk.len() as u64;
                    if got > length {
                        return Err(ClientError::ShortRead { offset, expected: length, got });
                    }
                    Ok(Some((chunk, (body, got))))
                }
                None if got == length => Ok(None),
                None => Err(ClientError::ShortRead { offset, expected: length, got }),
            }
        }))
    }

    /// `length` bytes at `offset`, as they arrive and in order. A body cut
    /// off half-way is read on from its last byte (a flaky backend costs a
    /// retry, not the transfer), within the retry policy's attempts; the
    /// stream fails if they run out, and never yields a byte past the range.
    pub fn read_resuming(&self, offset: u64, length: u64) -> impl Stream<Item = Result<Bytes>> + use<> {
        let end = offset + length;
        stream::try_unfold((self.clone(), offset, None, 1), move |(this, at, mut body, mut attempt)| async move {
            loop {
                if at == end {
                    return Ok(None);
                }
                let failure = match body.take() {
                    None => match this.read_stream(at, end - at).await {
                        Ok(opened) => {
                            body = Some(Box::pin(opened));
                            continue;
                        }
                        Err(error) => error,
                    },
                    Some(mut opened) => match opened.next().await {
                        Some(Ok(chunk)) => {
                            let at = at + chunk.len() as u64;
                            return Ok(Some((chunk, (this, at, Some(opened), attempt))));
                        }
                        Some(Err(error)) => error,
                        // read_stream fails a body that ends short first.
                        None => ClientError::ShortRead { offset: at, expected: end - at, got: 0 },
                    },
                };
                this.retry.pause(&format!("GET at offset {at}"), failure, &mut attempt).await?;
            }
        })
    }

    /// `length` bytes at `offset`, whole, resumed as [`Self::read_resuming`] does.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        let buffer = BytesMut::with_capacity(length as usize);
        let buffer = self
            .read_resuming(offset, length)
            .try_fold(buffer, |mut buffer, chunk| async move {
                buffer.extend_from_slice(&chunk);
                Ok(buffer)
            })
            .await?;
        Ok(buffer.freeze())
    }

    /// Writes `data` at `offset`; retried (a PUT of a range is idempotent).
    pub async fn write(&self, offset: u64, data: Bytes, flush: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let range = format!("bytes {}-{}/*", offset, offset + data.len() as u64 - 1);
        let url = format!("{}?flush={}", self.url, if flush { "y" } else { "n" });
        self.retry.run("PUT", || self.send(self.http.put(&url).header(CONTENT_RANGE, range.clone()).body(data.clone()))).await?;
        Ok(())
    }

    /// Zeroes `length` bytes at `offset` without sending them.
    pub async fn zero(&self, offset: u64, length: u64, flush: bool) -> Result<()> {
        let body = serde_json::json!({"op": "zero", "offset": offset, "size": length, "flush": flush}).to_string();
        self.retry
            .run("PATCH zero", || self.send(self.http.patch(&self.url).header(CONTENT_TYPE, "application/json").body(body.clone())))
            .await?;
        Ok(())
    }

    /// Flushes written data to storage.
    pub async fn flush(&self) -> Result<()> {
        let body = r#"{"op":"flush"}"#;
        self.retry.run("PATCH flush", || self.send(self.http.patch(&self.url).header(CONTENT_TYPE, "application/json").body(body))).await?;
        Ok(())
    }

    /// The image's blkhash on `algorithm` (servers other than blockgate
    /// may offer only blake2b).
    pub async fn checksum(&self, algorithm: Algorithm, block_size: Option<u64>) -> Result<Checksum> {
        let mut url = format!("{}/checksum?algorithm={}", self.url, algorithm.name());
        if let Some(block_size) = block_size {
            url.push_str(&format!("&block_size={block_size}"));
        }
        self.retry.run("GET checksum", || async { json(self.send(self.http.get(&url)).await?, "checksum").await }).await
    }

    /// The sparse stream of `scope`. Only starting the request is retried;
    /// a stream cut later fails, and so does one that ends, cleanly or not,
    /// without its `stop` frame, or has anything after it.
    pub async fn backup(&self, scope: &Scope) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let url = format!("{}?format=sparse&{}", self.url, scope.query()?);
        let response = self.retry.run("GET sparse", || self.send(self.http.get(&url))).await?;
        let body = Box::pin(response.bytes_stream().map_err(ClientError::from));
        let framing = |reason: String| ClientError::Protocol(format!("sparse stream: {reason}"));
        Ok(stream::try_unfold((body, FrameWalker::default()), move |(mut body, mut walker)| async move {
            match body.try_next().await? {
                Some(chunk) => {
                    walker.pass(&chunk).map_err(framing)?;
                    Ok(Some((chunk, (body, walker))))
                }
                None => walker.finish().map(|()| None).map_err(framing),
            }
        }))
    }

    /// Applies a sparse stream; `force` applies an incremental that does
    /// not continue the target's chain; `zero_tail` applies a full stream
    /// of a smaller image and zeroes the rest of the target.
    pub async fn restore<S>(&self, stream: S, force: bool, zero_tail: bool) -> Result<Restored>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    {
        let mut url = format!("{}?format=sparse&force={}", self.url, if force { "y" } else { "n" });
        if zero_tail {
            url.push_str("&zero_tail=y");
        }
        let response = self.send(self.http.put(&url).body(reqwest::Body::wrap_stream(stream))).await?;
        json(response, "restore summary").await
    }

    /// The image's checkpoints, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let url = format!("{}/checkpoints", self.url);
        self.retry.run("GET checkpoints", || async { json(self.send(self.http.get(&url)).await?, "checkpoints").await }).await
    }

    /// Makes a checkpoint (named by the server when `id` is `None`). Not
    /// retried: a lost answer would make a retry fail with "exists".
    pub async fn create_checkpoint(&self, id: Option<&str>) -> Result<Checkpoint> {
        let body = match id {
            Some(id) => {
                check_id(id).map_err(ClientError::Invalid)?;
                serde_json::json!({ "id": id })
            }
            None => serde_json::json!({}),
        };
        let request = self.http.post(format!("{}/checkpoints", self.url)).header(CONTENT_TYPE, "application/json").body(body.to_string());
        json(self.send(request).await?, "new checkpoint").await
    }

    /// Deletes a checkpoint. Not retried either: a retry after a lost
    /// answer would report a 404 for a checkpoint that was deleted.
    pub async fn delete_checkpoint(&self, id: &str) -> Result<()> {
        check_id(id).map_err(ClientError::Invalid)?;
        self.send(self.http.delete(format!("{}/checkpoints/{id}", self.url))).await?;
        Ok(())
    }
}

/// A ranged GET's answer is the range asked for: its `Content-Range`
/// names it, or, without one (a 200), the read starts at 0 and the body
/// is the image from its start. Bytes of another range would be written
/// where they do not belong.
fn check_range(response: &Response, offset: u64, length: u64) -> Result<()> {
    let asked = format!("bytes {}-{}/", offset, offset + length - 1);
    match response.headers().get(CONTENT_RANGE) {
        Some(answered) if answered.to_str().is_ok_and(|answered| answered.starts_with(&asked)) => Ok(()),
        None if offset == 0 => Ok(()),
        answered => Err(ClientError::Protocol(format!(
            "a GET of {asked}* was answered with {}",
            answered.map_or_else(|| "no Content-Range".to_string(), |value| format!("Content-Range {:?}", value))
        ))),
    }
}
