//! The S3-compatible object-store backend ([`S3Files`]): the same [`FileStore`] contract as
//! [`LocalFiles`](crate::LocalFiles), with the objects of one bucket as the only state, so any
//! number of logic nodes (and a restarted one) share the uploads and the files.
//!
//! Object layout under the configured `prefix` of the bucket (path-style URLs,
//! `<endpoint>/<bucket>/<key>`):
//!
//! ```text
//! <prefix>blobs/<64 hex>                       a stored file
//! <prefix>uploads/<32 hex>/meta                "<file hex> <size> <created_ms>\n"
//! <prefix>uploads/<32 hex>/c/<offset, 20 dec>  one appended chunk, named by its offset
//! ```
//!
//! - **Appends.** A chunk is one object, written with `If-None-Match: *` at the key of the offset
//!   the upload has, so it is durable (as durable as the store makes an acknowledged `PUT`) when
//!   [`FileStore::append`] returns, and clients may send chunks of any size (S3 multipart parts
//!   must be ≥ 5 MiB, so chunks are not parts). What an upload has is read back from the chunk
//!   objects (ListObjectsV2): after a restart, a full listing; within a process, a listing after
//!   the last chunk it knows of, one short request.
//! - **Concurrent chunks.** Within a process, a chunk while another of the same upload is being
//!   written is told to resume (`Offset`), as with `LocalFiles`. Across processes, two chunks
//!   racing for the same offset are kept apart by the conditional `PUT`: the loser is told to
//!   resume. That needs a store that evaluates `If-None-Match` atomically with the write (AWS S3
//!   documents it for its conditional writes); s3s-fs, the test server, checks and then writes,
//!   so on it a true race could keep the later of two chunks.
//! - **Completion.** [`FileStore::complete`] reads the chunks back one at a time, hashing them,
//!   and publishes `blobs/<hex>`: a single `PUT` up to [`PART_SIZE`], else a multipart upload of
//!   `PART_SIZE` parts assembled from the chunks (memory: about one part and one chunk). The
//!   blob appears only once the hash matched; a mismatch aborts the multipart upload and
//!   discards the upload. A file already stored is only hashed (its bytes prove possession)
//!   and the upload dropped.
//! - **Reads** are `Range` GETs, [`FileStore::size`] a HEAD; [`FileStore::purge_stale`] lists
//!   `uploads/` by delimiter and reads each upload's meta.
//!
//! Costs: an append is three requests (GET meta, a short LIST, the PUT); a completion reads the
//! chunks one after the other (latency-bound when a client sent many small chunks) and hashes
//! on the calling task a chunk at a time; removing an upload deletes its objects
//! [`PARALLEL_DELETES`] at a time; a read is one GET (callers read in pieces).
//!
//! Limits: requests are signed with AWS Signature V4 (access key and secret; no session tokens).
//! `https://` endpoints use rustls with Mozilla's root certificates (a private CA needs a
//! TLS-terminating proxy in front of the store); the tests cover plain `http://` only. Each
//! request has [`REQUEST_TIMEOUT`]. A completion cancelled half-way (or a process that dies
//! in it) can leave an unfinished multipart upload in the store: give the bucket a lifecycle
//! rule that aborts incomplete multipart uploads after a day.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};

use crate::{Busy, FileError, FileId, FileStore, UploadId, UploadState};

/// Where the files are: an S3-compatible endpoint and a bucket (which must exist).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
pub struct S3Config {
    /// `http://host:port` (or `https://…`), optionally with a path the bucket URLs go under.
    pub endpoint: String,
    /// The region requests are signed for (`us-east-1` when left out; MinIO and s3s-fs take
    /// any).
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// Key prefix of every object, e.g. `im/files` (a `/` is added); empty: the bucket's root.
    #[serde(default)]
    pub prefix: String,
}

fn default_region() -> String {
    "us-east-1".into()
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<hidden>")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Files completed into one object up to this size; above it, multipart parts of this size.
pub const PART_SIZE: usize = 8 << 20;
/// The most parts of a multipart upload (S3's limit): larger files get larger parts.
const MAX_PARTS: u64 = 10_000;
/// Deadline of one request, its body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// DELETEs in flight when an upload's chunk objects are removed.
pub const PARALLEL_DELETES: usize = 16;
/// SHA-256 of the empty payload.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Files in an S3-compatible object store (see the module docs). Cheap to clone: clones share
/// the connection pool.
#[derive(Clone)]
pub struct S3Files {
    inner: Arc<Inner>,
}

struct Inner {
    client: HttpClient,
    /// `scheme://authority`
    origin: String,
    /// The `Host` header (the endpoint's authority).
    host: String,
    /// `/<endpoint path>/<bucket>`, URI-encoded.
    bucket_path: String,
    region: String,
    access_key: String,
    secret_key: String,
    /// Empty or ending with `/`.
    prefix: String,
    max_size: u64,
    busy: Busy,
    /// Per upload: the last chunk this process knows of (its offset and end), so an append lists
    /// only what came after it.
    hints: Mutex<HashMap<UploadId, Hint>>,
}

#[derive(Clone, Copy, Debug)]
struct Hint {
    last: u64,
    end: u64,
}

impl fmt::Debug for S3Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Files")
            .field("origin", &self.inner.origin)
            .field("bucket_path", &self.inner.bucket_path)
            .field("prefix", &self.inner.prefix)
            .field("max_size", &self.inner.max_size)
            .finish_non_exhaustive()
    }
}

/// An answer: status, headers, the whole body.
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// One object of a listing.
struct Listed {
    key: String,
    size: u64,
}

impl S3Files {
    /// A store in `cfg`'s bucket, refusing files larger than `max_size`. Checks the
    /// configuration only; [`S3Files::check`] asks the store.
    pub fn new(cfg: S3Config, max_size: u64) -> Result<S3Files, FileError> {
        let bad = |m: String| Err(FileError::Invalid(format!("S3 config: {m}")));
        let uri: Uri = match cfg.endpoint.parse() {
            Ok(u) => u,
            Err(e) => return bad(format!("endpoint {:?}: {e}", cfg.endpoint)),
        };
        let scheme = uri.scheme_str().unwrap_or("");
        if scheme != "http" && scheme != "https" {
            return bad(format!(
                "endpoint {:?} is not an http:// or https:// URL",
                cfg.endpoint
            ));
        }
        let Some(authority) = uri.authority() else {
            return bad(format!("endpoint {:?} has no host", cfg.endpoint));
        };
        if uri.query().is_some() {
            return bad(format!("endpoint {:?} has a query", cfg.endpoint));
        }
        if cfg.bucket.is_empty() || cfg.bucket.contains('/') {
            return bad(format!("bad bucket name {:?}", cfg.bucket));
        }
        if cfg.region.is_empty() || cfg.access_key.is_empty() || cfg.secret_key.is_empty() {
            return bad("region, access_key and secret_key must be set".into());
        }
        let mut prefix = cfg.prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        if prefix.contains("//") {
            return bad(format!("prefix {:?} has an empty segment", cfg.prefix));
        }
        let base = uri.path().trim_end_matches('/');
        let bucket_path = format!("{base}/{}", uri_encode(&cfg.bucket, false));

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| FileError::Invalid(format!("S3 TLS setup: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(S3Files {
            inner: Arc::new(Inner {
                client,
                origin: format!("{scheme}://{authority}"),
                host: authority.as_str().to_string(),
                bucket_path,
                region: cfg.region,
                access_key: cfg.access_key,
                secret_key: cfg.secret_key,
                prefix,
                max_size,
                busy: Busy::default(),
                hints: Mutex::default(),
            }),
        })
    }

    /// Asks the store whether the bucket is there and the credentials work (HEAD bucket).
    pub async fn check(&self) -> Result<(), FileError> {
        let r = self
            .send(Method::HEAD, None, &[], &[], Bytes::new())
            .await?;
        match r.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(FileError::Io(format!(
                "S3 bucket {} does not exist at {}",
                self.inner.bucket_path, self.inner.origin
            ))),
            _ => Err(self.failed("HEAD bucket", "", &r)),
        }
    }

    fn blob_key(&self, f: FileId) -> String {
        format!("{}blobs/{}", self.inner.prefix, f.to_hex())
    }

    fn upload_dir(&self, id: UploadId) -> String {
        format!("{}uploads/{}/", self.inner.prefix, id.to_hex())
    }

    fn meta_key(&self, id: UploadId) -> String {
        format!("{}meta", self.upload_dir(id))
    }

    fn chunk_dir(&self, id: UploadId) -> String {
        format!("{}c/", self.upload_dir(id))
    }

    fn chunk_key(&self, id: UploadId, offset: u64) -> String {
        format!("{}{offset:020}", self.chunk_dir(id))
    }

    fn hint(&self, id: UploadId) -> Option<Hint> {
        let h = self.inner.hints.lock().unwrap_or_else(|p| p.into_inner());
        h.get(&id).copied()
    }

    fn set_hint(&self, id: UploadId, hint: Option<Hint>) {
        let mut h = self.inner.hints.lock().unwrap_or_else(|p| p.into_inner());
        match hint {
            Some(x) => h.insert(id, x),
            None => h.remove(&id),
        };
    }

    /// Sends a signed request for `key` (`None`: the bucket) and reads the whole answer.
    async fn send(
        &self,
        method: Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Resp, FileError> {
        let inner = &*self.inner;
        let path = match key {
            Some(k) => format!("{}/{}", inner.bucket_path, uri_encode(k, true)),
            None => inner.bucket_path.clone(),
        };
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let query_string = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let payload_hash = if body.is_empty() {
            EMPTY_SHA256.to_string()
        } else {
            hex(&Sha256::digest(&body))
        };
        let amz_date = amz_date(SystemTime::now());
        let mut signed: Vec<(String, String)> = vec![
            ("host".into(), inner.host.clone()),
            ("x-amz-content-sha256".into(), payload_hash.clone()),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        for (name, value) in headers {
            signed.push((name.to_ascii_lowercase(), value.clone()));
        }
        signed.sort();
        let (signed_headers, signature) = sign(&SignInput {
            secret_key: &inner.secret_key,
            region: &inner.region,
            service: "s3",
            amz_date: &amz_date,
            method: method.as_str(),
            canonical_uri: &path,
            canonical_query: &query_string,
            headers: &signed,
            payload_hash: &payload_hash,
        });
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{}/{}/s3/aws4_request,SignedHeaders={signed_headers},Signature={signature}",
            inner.access_key,
            &amz_date[..8],
            inner.region,
        );
        let what = || {
            format!(
                "S3 {method} {}{}",
                key.unwrap_or(&inner.bucket_path),
                if query_string.is_empty() {
                    String::new()
                } else {
                    format!("?{query_string}")
                }
            )
        };
        let url = if query_string.is_empty() {
            format!("{}{path}", inner.origin)
        } else {
            format!("{}{path}?{query_string}", inner.origin)
        };
        let mut req = Request::builder().method(method.clone()).uri(url);
        for (name, value) in &signed {
            req = req.header(name.as_str(), value.as_str());
        }
        req = req.header("authorization", authorization);
        let req = req
            .body(Full::new(body))
            .map_err(|e| FileError::Io(format!("{}: building the request: {e}", what())))?;
        let run = async {
            let resp = inner
                .client
                .request(req)
                .await
                .map_err(|e| error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| error_chain(&e))?;
            Ok::<_, String>(Resp {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(FileError::Io(format!(
                "{} at {}: {e}",
                what(),
                inner.origin
            ))),
            Err(_) => Err(FileError::Io(format!(
                "{} at {}: no answer within {REQUEST_TIMEOUT:?}",
                what(),
                inner.origin
            ))),
        }
    }

    /// The error of an unexpected answer, with S3's error code and message.
    fn failed(&self, op: &str, key: &str, r: &Resp) -> FileError {
        let body = String::from_utf8_lossy(&r.body);
        let code = tag_text(&body, "Code").unwrap_or_default();
        let msg = tag_text(&body, "Message").unwrap_or_default();
        FileError::Io(format!(
            "S3 {op} {key} at {}: HTTP {}{}{}",
            self.inner.origin,
            r.status,
            if code.is_empty() {
                String::new()
            } else {
                format!(" {code}")
            },
            if msg.is_empty() {
                String::new()
            } else {
                format!(": {msg}")
            },
        ))
    }

    async fn get(&self, key: &str, headers: &[(&'static str, String)]) -> Result<Resp, FileError> {
        self.send(Method::GET, Some(key), &[], headers, Bytes::new())
            .await
    }

    async fn put(
        &self,
        key: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Resp, FileError> {
        self.send(Method::PUT, Some(key), &[], headers, body).await
    }

    async fn delete(&self, key: &str) -> Result<(), FileError> {
        let r = self
            .send(Method::DELETE, Some(key), &[], &[], Bytes::new())
            .await?;
        match r.status {
            StatusCode::OK | StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.failed("DELETE", key, &r)),
        }
    }

    /// The size of an object, `None` if there is none.
    async fn head(&self, key: &str) -> Result<Option<u64>, FileError> {
        let r = self
            .send(Method::HEAD, Some(key), &[], &[], Bytes::new())
            .await?;
        match r.status {
            StatusCode::OK => r
                .headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| {
                    FileError::Io(format!("S3 HEAD {key}: no Content-Length in the answer"))
                }),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.failed("HEAD", key, &r)),
        }
    }

    /// ListObjectsV2 of the keys under `prefix` after `start_after` (all pages); with
    /// `delimited`, the common prefixes up to the next `/` instead of the objects below them.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimited: bool,
    ) -> Result<(Vec<Listed>, Vec<String>), FileError> {
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q: Vec<(&str, &str)> = vec![("list-type", "2"), ("prefix", prefix)];
            if delimited {
                q.push(("delimiter", "/"));
            }
            match (&token, start_after) {
                (Some(t), _) => q.push(("continuation-token", t)),
                (None, Some(s)) => q.push(("start-after", s)),
                (None, None) => {}
            }
            let r = self.send(Method::GET, None, &q, &[], Bytes::new()).await?;
            if r.status != StatusCode::OK {
                return Err(self.failed("ListObjectsV2", prefix, &r));
            }
            let xml = String::from_utf8_lossy(&r.body);
            for c in blocks(&xml, "Contents") {
                let key = tag_text(c, "Key");
                let size = tag_text(c, "Size").and_then(|s| s.trim().parse().ok());
                match (key, size) {
                    (Some(key), Some(size)) => objects.push(Listed { key, size }),
                    _ => {
                        return Err(FileError::Io(format!(
                            "S3 ListObjectsV2 {prefix}: an entry without key or size"
                        )))
                    }
                }
            }
            for c in blocks(&xml, "CommonPrefixes") {
                if let Some(p) = tag_text(c, "Prefix") {
                    prefixes.push(p);
                }
            }
            let truncated = tag_text(&xml, "IsTruncated").is_some_and(|t| t.trim() == "true");
            match tag_text(&xml, "NextContinuationToken") {
                Some(t) if truncated && !t.is_empty() => token = Some(t),
                _ if truncated => {
                    return Err(FileError::Io(format!(
                        "S3 ListObjectsV2 {prefix}: truncated without a continuation token"
                    )))
                }
                _ => return Ok((objects, prefixes)),
            }
        }
    }

    /// The upload's meta object.
    async fn meta(&self, id: UploadId) -> Result<(FileId, u64, u64), FileError> {
        let key = self.meta_key(id);
        let r = self.get(&key, &[]).await?;
        match r.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                self.set_hint(id, None);
                return Err(FileError::NotFound);
            }
            _ => return Err(self.failed("GET", &key, &r)),
        }
        let bad = || FileError::Io(format!("upload {} has a bad meta object", id.to_hex()));
        let text = std::str::from_utf8(&r.body).map_err(|_| bad())?;
        let mut it = text.split_whitespace();
        let file = it.next().and_then(FileId::from_hex).ok_or_else(bad)?;
        let size = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let created_ms = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok((file, size, created_ms))
    }

    /// The chunks of the upload from `hint` on (all of them without one): `(offset, size)` of
    /// each, in order, as far as they follow each other.
    async fn chunks(&self, id: UploadId, hint: Option<Hint>) -> Result<Vec<(u64, u64)>, FileError> {
        let dir = self.chunk_dir(id);
        let after = hint.map(|h| self.chunk_key(id, h.last));
        let (objects, _) = self.list(&dir, after.as_deref(), false).await?;
        let mut end = hint.map_or(0, |h| h.end);
        let mut out = Vec::with_capacity(objects.len());
        for o in objects {
            let off = o.key.strip_prefix(&dir).and_then(|s| s.parse::<u64>().ok());
            if off != Some(end) {
                tracing::warn!(
                    "files: upload {}: chunk object {} does not follow at {end}; ignored from there",
                    id.to_hex(),
                    o.key
                );
                break;
            }
            out.push((end, o.size));
            end += o.size;
        }
        Ok(out)
    }

    /// Bytes the upload has: the end of its last chunk.
    async fn received(&self, id: UploadId) -> Result<u64, FileError> {
        let hint = self.hint(id);
        let chunks = self.chunks(id, hint).await?;
        match chunks.last() {
            Some(&(last, size)) => {
                let h = Hint {
                    last,
                    end: last + size,
                };
                self.set_hint(id, Some(h));
                Ok(h.end)
            }
            None => Ok(hint.map_or(0, |h| h.end)),
        }
    }

    async fn state(&self, id: UploadId) -> Result<UploadState, FileError> {
        let (file, size, created_ms) = self.meta(id).await?;
        let received = self.received(id).await?;
        Ok(UploadState {
            file,
            size,
            received,
            created_ms,
        })
    }

    /// Removes the upload: its meta first (the upload is gone from then on), then its chunks.
    /// Failures are logged: leftover chunks without a meta are removed by `purge_stale`.
    async fn discard(&self, id: UploadId) {
        self.set_hint(id, None);
        let meta = self.meta_key(id);
        if let Err(e) = self.delete(&meta).await {
            tracing::warn!("files: removing upload {}: {e}", id.to_hex());
            return;
        }
        self.remove_chunks(id).await;
    }

    /// Deletes the upload's objects, [`PARALLEL_DELETES`] at a time.
    async fn remove_chunks(&self, id: UploadId) {
        let dir = self.upload_dir(id);
        let objects = match self.list(&dir, None, false).await {
            Ok((objects, _)) => objects,
            Err(e) => {
                tracing::warn!("files: removing upload {}: {e}", id.to_hex());
                return;
            }
        };
        let mut keys = objects.into_iter().map(|o| o.key);
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < PARALLEL_DELETES {
                let Some(key) = keys.next() else { break };
                let s = self.clone();
                running.spawn(async move { s.delete(&key).await });
            }
            match running.join_next().await {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    tracing::warn!("files: removing upload {}: {e}", id.to_hex());
                    return; // the rest with the next purge
                }
                Some(Err(e)) => {
                    tracing::warn!("files: removing upload {}: {e}", id.to_hex());
                    return;
                }
                None => return,
            }
        }
    }

    /// A chunk's bytes, in `complete`; a chunk gone meanwhile means the upload was removed.
    async fn chunk_bytes(&self, id: UploadId, offset: u64, size: u64) -> Result<Bytes, FileError> {
        let key = self.chunk_key(id, offset);
        let r = self.get(&key, &[]).await?;
        match r.status {
            StatusCode::OK if r.body.len() as u64 == size => Ok(r.body),
            StatusCode::OK => Err(FileError::Io(format!(
                "S3 GET {key}: {} bytes, listed with {size}",
                r.body.len()
            ))),
            StatusCode::NOT_FOUND => match self.meta(id).await {
                Err(FileError::NotFound) => Err(FileError::NotFound),
                _ => Err(FileError::Io(format!("S3 GET {key}: the chunk is gone"))),
            },
            _ => Err(self.failed("GET", &key, &r)),
        }
    }

    /// Hashes the upload's chunks and, with `publish`, writes them to `blob` (a single PUT up
    /// to [`PART_SIZE`], else a multipart upload). The blob is written only when the hash
    /// matched; returns whether it did.
    async fn hash_and_publish(
        &self,
        id: UploadId,
        st: &UploadState,
        chunks: &[(u64, u64)],
        publish: bool,
    ) -> Result<bool, FileError> {
        let blob = self.blob_key(st.file);
        let mut h = Sha256::new();
        if !publish || st.size <= PART_SIZE as u64 {
            let mut all = BytesMut::with_capacity(if publish { st.size as usize } else { 0 });
            for &(off, size) in chunks {
                let b = self.chunk_bytes(id, off, size).await?;
                h.update(&b);
                if publish {
                    all.extend_from_slice(&b);
                }
            }
            if FileId(h.finalize().into()) != st.file {
                return Ok(false);
            }
            if publish {
                let r = self.put(&blob, &[], all.freeze()).await?;
                if r.status != StatusCode::OK {
                    return Err(self.failed("PUT", &blob, &r));
                }
            }
            return Ok(true);
        }
        let part_size = (PART_SIZE as u64).max(st.size.div_ceil(MAX_PARTS)) as usize;
        let upload_id = self.multipart_begin(&blob).await?;
        let r = async {
            let mut parts: Vec<String> = Vec::new();
            let mut buf = BytesMut::with_capacity(part_size * 2);
            for &(off, size) in chunks {
                let b = self.chunk_bytes(id, off, size).await?;
                h.update(&b);
                buf.extend_from_slice(&b);
                while buf.len() >= part_size {
                    let part = buf.split_to(part_size).freeze();
                    let etag = self.multipart_part(&blob, &upload_id, parts.len() + 1, part);
                    parts.push(etag.await?);
                }
            }
            if FileId(h.finalize().into()) != st.file {
                return Ok(false);
            }
            if !buf.is_empty() {
                let part = buf.split().freeze();
                let etag = self.multipart_part(&blob, &upload_id, parts.len() + 1, part);
                parts.push(etag.await?);
            }
            self.multipart_complete(&blob, &upload_id, &parts).await?;
            Ok(true)
        }
        .await;
        if !matches!(r, Ok(true)) {
            self.multipart_abort(&blob, &upload_id).await;
        }
        r
    }

    async fn multipart_begin(&self, key: &str) -> Result<String, FileError> {
        let r = self
            .send(
                Method::POST,
                Some(key),
                &[("uploads", "")],
                &[],
                Bytes::new(),
            )
            .await?;
        let body = String::from_utf8_lossy(&r.body);
        match tag_text(&body, "UploadId") {
            Some(u) if r.status == StatusCode::OK && !u.is_empty() => Ok(u),
            _ => Err(self.failed("CreateMultipartUpload", key, &r)),
        }
    }

    /// Uploads part `n` (from 1); returns its ETag.
    async fn multipart_part(
        &self,
        key: &str,
        upload_id: &str,
        n: usize,
        part: Bytes,
    ) -> Result<String, FileError> {
        let n = n.to_string();
        let q = [("partNumber", n.as_str()), ("uploadId", upload_id)];
        let r = self.send(Method::PUT, Some(key), &q, &[], part).await?;
        match r.headers.get("etag").and_then(|v| v.to_str().ok()) {
            Some(etag) if r.status == StatusCode::OK => Ok(etag.to_string()),
            _ => Err(self.failed("UploadPart", key, &r)),
        }
    }

    async fn multipart_complete(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), FileError> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let q = [("uploadId", upload_id)];
        let r = self
            .send(Method::POST, Some(key), &q, &[], Bytes::from(xml))
            .await?;
        // S3 may answer 200 and still fail: the error is in the body.
        let body = String::from_utf8_lossy(&r.body);
        if r.status != StatusCode::OK || body.contains("<Error>") {
            return Err(self.failed("CompleteMultipartUpload", key, &r));
        }
        Ok(())
    }

    async fn multipart_abort(&self, key: &str, upload_id: &str) {
        let q = [("uploadId", upload_id)];
        match self
            .send(Method::DELETE, Some(key), &q, &[], Bytes::new())
            .await
        {
            Ok(r) if r.status.is_success() || r.status == StatusCode::NOT_FOUND => {}
            Ok(r) => tracing::warn!("files: {}", self.failed("AbortMultipartUpload", key, &r)),
            Err(e) => tracing::warn!("files: {e}"),
        }
    }
}

impl FileStore for S3Files {
    async fn begin(&self, file: FileId, size: u64, now_ms: u64) -> Result<UploadId, FileError> {
        if size == 0 || size > self.inner.max_size {
            return Err(FileError::Invalid(format!(
                "a file has 1 to {} bytes, not {size}",
                self.inner.max_size
            )));
        }
        let id = UploadId::random();
        let key = self.meta_key(id);
        let meta = format!("{} {size} {now_ms}\n", file.to_hex());
        let r = self.put(&key, &[], Bytes::from(meta)).await?;
        if r.status != StatusCode::OK {
            return Err(self.failed("PUT", &key, &r));
        }
        Ok(id)
    }

    async fn status(&self, id: UploadId) -> Result<UploadState, FileError> {
        self.state(id).await
    }

    async fn append(&self, id: UploadId, offset: u64, data: &[u8]) -> Result<u64, FileError> {
        let Some(_claim) = self.inner.busy.claim(id) else {
            let st = self.state(id).await?;
            return Err(FileError::Offset {
                received: st.received,
            });
        };
        let st = self.state(id).await?;
        st.check_append(offset, data.len())?;
        if data.is_empty() {
            return Ok(st.received);
        }
        let key = self.chunk_key(id, offset);
        let r = self
            .put(
                &key,
                &[("if-none-match", "*".into())],
                Bytes::copy_from_slice(data),
            )
            .await?;
        match r.status {
            StatusCode::OK => {
                let end = offset + data.len() as u64;
                self.set_hint(id, Some(Hint { last: offset, end }));
                Ok(end)
            }
            // Another process wrote a chunk at this offset first.
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => Err(FileError::Offset {
                received: self.received(id).await?,
            }),
            _ => Err(self.failed("PUT", &key, &r)),
        }
    }

    async fn complete(&self, id: UploadId) -> Result<FileId, FileError> {
        let Some(_claim) = self.inner.busy.claim(id) else {
            return Err(FileError::Invalid(
                "a chunk of this upload is being written".into(),
            ));
        };
        let (file, size, created_ms) = self.meta(id).await?;
        let chunks = self.chunks(id, None).await?;
        let received = chunks.last().map_or(0, |&(off, len)| off + len);
        if received != size {
            return Err(FileError::Offset { received });
        }
        let st = UploadState {
            file,
            size,
            received,
            created_ms,
        };
        let stored = self.head(&self.blob_key(file)).await?.is_some();
        if !self.hash_and_publish(id, &st, &chunks, !stored).await? {
            self.discard(id).await;
            return Err(FileError::Mismatch);
        }
        // Published (or a duplicate of a stored file): the upload goes.
        self.discard(id).await;
        Ok(file)
    }

    async fn size(&self, file: FileId) -> Result<Option<u64>, FileError> {
        self.head(&self.blob_key(file)).await
    }

    async fn read(&self, file: FileId, start: u64, len: u64) -> Result<Bytes, FileError> {
        let key = self.blob_key(file);
        // Past the end, or nothing asked: the size decides between empty and `Invalid`.
        let at_end = |size: Option<u64>| match size {
            None => Err(FileError::NotFound),
            Some(size) if start > size => Err(FileError::Invalid(format!(
                "range starts at {start}, past the file's {size} bytes"
            ))),
            Some(_) => Ok(Bytes::new()),
        };
        if len == 0 {
            return at_end(self.head(&key).await?);
        }
        // Open-ended for "to the end" (some servers refuse ends past i64).
        let range = match start.checked_add(len - 1) {
            Some(last) if last < i64::MAX as u64 => format!("bytes={start}-{last}"),
            _ => format!("bytes={start}-"),
        };
        let r = self.get(&key, &[("range", range)]).await?;
        match r.status {
            StatusCode::PARTIAL_CONTENT => Ok(r.body),
            // A store that ignores ranges sends the whole file.
            StatusCode::OK => {
                let size = r.body.len() as u64;
                if start > size {
                    return at_end(Some(size));
                }
                let end = start.saturating_add(len).min(size);
                Ok(r.body.slice(start as usize..end as usize))
            }
            StatusCode::NOT_FOUND => Err(FileError::NotFound),
            StatusCode::RANGE_NOT_SATISFIABLE => at_end(self.head(&key).await?),
            _ => Err(self.failed("GET", &key, &r)),
        }
    }

    async fn purge_stale(&self, before_ms: u64) -> Result<usize, FileError> {
        let dir = format!("{}uploads/", self.inner.prefix);
        let (_, prefixes) = self.list(&dir, None, true).await?;
        let mut seen = HashSet::new();
        let mut n = 0;
        for p in prefixes {
            let Some(id) = p
                .strip_prefix(&dir)
                .and_then(|s| s.strip_suffix('/'))
                .and_then(UploadId::from_hex)
            else {
                continue;
            };
            seen.insert(id);
            match self.meta(id).await {
                Ok((_, _, created_ms)) if created_ms < before_ms => {
                    if let Some(_claim) = self.inner.busy.claim(id) {
                        self.discard(id).await;
                        n += 1;
                    }
                }
                Ok(_) => {}
                // Chunks without a meta (a discard that stopped half-way): remove them.
                Err(FileError::NotFound) => self.remove_chunks(id).await,
                Err(e) => tracing::warn!("files: upload {}: {e}", id.to_hex()),
            }
        }
        // Uploads completed or removed by other processes.
        let mut h = self.inner.hints.lock().unwrap_or_else(|p| p.into_inner());
        h.retain(|id, _| seen.contains(id));
        Ok(n)
    }
}

/// The message of an error and its sources ("client error (Connect): tcp connect error: …").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// URI encoding as SigV4 wants it: everything but `A-Za-z0-9-_.~` as `%XY`, and `/` too unless
/// `path` (an object key keeps its slashes).
fn uri_encode(s: &str, path: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (path && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` (UTC).
fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// What a SigV4 signature covers.
struct SignInput<'a> {
    secret_key: &'a str,
    region: &'a str,
    service: &'a str,
    /// `YYYYMMDDTHHMMSSZ`
    amz_date: &'a str,
    method: &'a str,
    /// URI-encoded path.
    canonical_uri: &'a str,
    /// Encoded, sorted `k=v` pairs joined by `&`.
    canonical_query: &'a str,
    /// Lower-case names, sorted; every header the request signs (at least `host`).
    headers: &'a [(String, String)],
    payload_hash: &'a str,
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// AWS Signature Version 4: the `SignedHeaders` list and the signature (hex).
fn sign(i: &SignInput<'_>) -> (String, String) {
    let mut canonical_headers = String::new();
    for (name, value) in i.headers {
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&value.split_whitespace().collect::<Vec<_>>().join(" "));
        canonical_headers.push('\n');
    }
    let signed_headers = i
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        i.method, i.canonical_uri, i.canonical_query, i.payload_hash
    );
    let date = &i.amz_date[..8];
    let scope = format!("{date}/{}/{}/aws4_request", i.region, i.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        i.amz_date,
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let k = hmac(format!("AWS4{}", i.secret_key).as_bytes(), date.as_bytes());
    let k = hmac(&k, i.region.as_bytes());
    let k = hmac(&k, i.service.as_bytes());
    let k = hmac(&k, b"aws4_request");
    (signed_headers, hex(&hmac(&k, string_to_sign.as_bytes())))
}

/// The insides of every `<tag>…</tag>` in `xml` (no nesting of the same tag).
fn blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The unescaped text of the first `<tag>…</tag>` in `xml`.
fn tag_text(xml: &str, tag: &str) -> Option<String> {
    blocks(xml, tag).first().map(|t| xml_unescape(t))
}

fn xml_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn signs_the_s3_documentation_get_object_example() {
        // "Examples: Signature Calculations" of the S3 API reference (GET Object, Range).
        let headers = h(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let (signed, sig) = sign(&SignInput {
            secret_key: EXAMPLE_SECRET,
            region: "us-east-1",
            service: "s3",
            amz_date: "20130524T000000Z",
            method: "GET",
            canonical_uri: "/test.txt",
            canonical_query: "",
            headers: &headers,
            payload_hash: EMPTY_SHA256,
        });
        assert_eq!(signed, "host;range;x-amz-content-sha256;x-amz-date");
        assert_eq!(
            sig,
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn signs_the_sigv4_test_suite_query_order_case() {
        // get-vanilla-query-order-key-case of the SigV4 test suite.
        let headers = h(&[
            ("host", "example.amazonaws.com"),
            ("x-amz-date", "20150830T123600Z"),
        ]);
        let (signed, sig) = sign(&SignInput {
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            service: "service",
            amz_date: "20150830T123600Z",
            method: "GET",
            canonical_uri: "/",
            canonical_query: "Param1=value1&Param2=value2",
            headers: &headers,
            payload_hash: EMPTY_SHA256,
        });
        assert_eq!(signed, "host;x-amz-date");
        assert_eq!(
            sig,
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    #[test]
    fn dates_and_encodings() {
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(1_369_353_600)),
            "20130524T000000Z"
        );
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(951_825_599)),
            "20000229T115959Z"
        );
        assert_eq!(uri_encode("a b/c~d+é", true), "a%20b/c~d%2B%C3%A9");
        assert_eq!(uri_encode("a/b=", false), "a%2Fb%3D");
    }

    #[test]
    fn list_answers_are_parsed_by_hand() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount>
<IsTruncated>true</IsTruncated><NextContinuationToken>t&amp;1</NextContinuationToken>
<Contents><Key>p/a&lt;1</Key><Size>12</Size></Contents>
<Contents><Key>p/b</Key><LastModified>x</LastModified><Size>0</Size></Contents>
<CommonPrefixes><Prefix>p/c/</Prefix></CommonPrefixes></ListBucketResult>"#;
        let c = blocks(xml, "Contents");
        assert_eq!(c.len(), 2);
        assert_eq!(tag_text(c[0], "Key").as_deref(), Some("p/a<1"));
        assert_eq!(tag_text(c[1], "Size").as_deref(), Some("0"));
        assert_eq!(
            tag_text(xml, "NextContinuationToken").as_deref(),
            Some("t&1")
        );
        let p = blocks(xml, "CommonPrefixes");
        assert_eq!(tag_text(p[0], "Prefix").as_deref(), Some("p/c/"));
        assert_eq!(xml_unescape("&#65;&#x42;&bogus;"), "AB&bogus;");
    }

    #[test]
    fn configs_are_checked() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            access_key: "k".into(),
            secret_key: "s".into(),
            prefix: "/im/files".into(),
        };
        let s = S3Files::new(cfg.clone(), 10).unwrap();
        assert_eq!(s.inner.prefix, "im/files/");
        assert_eq!(s.inner.bucket_path, "/b");
        assert_eq!(s.inner.host, "127.0.0.1:9000");
        assert!(
            !format!("{cfg:?}").contains("\"s\""),
            "the secret is hidden"
        );
        let s = S3Files::new(
            S3Config {
                endpoint: "https://s3.example.com/base/".into(),
                prefix: String::new(),
                ..cfg.clone()
            },
            10,
        )
        .unwrap();
        assert_eq!(s.inner.bucket_path, "/base/b");
        assert_eq!(s.inner.prefix, "");
        for bad in [
            S3Config {
                endpoint: "ftp://x".into(),
                ..cfg.clone()
            },
            S3Config {
                endpoint: "127.0.0.1:9000".into(),
                ..cfg.clone()
            },
            S3Config {
                bucket: String::new(),
                ..cfg.clone()
            },
            S3Config {
                secret_key: String::new(),
                ..cfg.clone()
            },
        ] {
            assert!(
                matches!(S3Files::new(bad.clone(), 10), Err(FileError::Invalid(_))),
                "{bad:?}"
            );
        }
        let parsed: S3Config = serde_json::from_str(
            r#"{"endpoint":"http://h:1","bucket":"b","access_key":"a","secret_key":"s"}"#,
        )
        .unwrap();
        assert_eq!(
            (parsed.region.as_str(), parsed.prefix.as_str()),
            ("us-east-1", "")
        );
    }
}
