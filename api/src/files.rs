//! The file service's HTTP endpoints (docs/API.md, "Files"):
//!
//! - `POST /v1/files/uploads` (`Authorization: Ticket <ticket>` from `FileTicket`) starts an
//!   upload; `PATCH /v1/files/uploads/{id}` with `Upload-Offset` appends a chunk (the last one
//!   completes the upload and answers the file's key); `HEAD` says where to resume.
//! - `GET|HEAD /v1/files/{sha256}?u=&e=&m=&s=` serves a stored file by a signed, expiring URL
//!   (from `FileUrl`), with single `Range`s.
//!
//! Uploads that never complete are removed after [`STALE_UPLOAD`] by a task of the API's runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use im_files::{FileError, FileId, FileStore, UploadId};
use im_shared::files::{hex, FileKeys, SignedError, Ticket};
use serde_json::json;

use crate::server::{full, json_with, read_body_within, Fail, Resp, State};

/// The storage backend the endpoints use: the local filesystem or an S3-compatible store.
pub type FileBackend = im_files::AnyFiles;

/// An upload that has not completed this long after it began is removed.
pub const STALE_UPLOAD: Duration = Duration::from_secs(24 * 3600);
/// How often the stale uploads are looked for.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// Default largest chunk of one `PATCH`.
pub const DEFAULT_MAX_CHUNK: usize = 8 << 20;
/// Time one chunk's body has to arrive: a chunk is stored whole or not at all, so a client on a
/// slow link sends chunks it can send in this time (8 MiB at 70 KB/s).
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes read from the store per body frame of a download.
const READ_CHUNK: u64 = 256 * 1024;

/// Chunks and files above this size are written / hashed on the blocking pool ([`offload`]).
const OFFLOAD_ABOVE: u64 = 256 * 1024;

/// Runs `f` on the store on tokio's blocking pool. Used for the two operations that can take long
/// on a local store (which does plain file I/O, complete at the first poll): a chunk's write and
/// `fdatasync` (up to `max_chunk`), and the completion that hashes the whole file (about a second
/// for 256 MiB), when the chunk or the file is above [`OFFLOAD_ABOVE`]. Only for a store whose
/// operations complete inline (`AnyFiles::completes_inline`: the local one); an S3 store's are
/// network calls, awaited on the API's runtime. Inline, they would stall
/// the API's one thread and every other request with it. Everything smaller (a picture, status,
/// size, reads of 256 KiB, begin) stays inline: a hand-off to another thread costs more than it
/// does (docs/BENCHMARKS.md, "File messages").
async fn offload<T, F, Fut>(store: &FileBackend, f: F) -> Result<T, FileError>
where
    F: FnOnce(FileBackend) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, FileError>>,
    T: Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut fut = std::pin::pin!(f(store));
        match fut
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(r) => r,
            Poll::Pending => Err(FileError::Io(
                "a local file operation did not complete at once".into(),
            )),
        }
    })
    .await
    .map_err(|e| FileError::Io(format!("file store task: {e}")))?
}

/// The file service as the HTTP API serves it.
#[derive(Clone, Debug)]
pub struct FilesHttp {
    pub store: FileBackend,
    pub keys: FileKeys,
    /// Largest body of one `PATCH` (`413` above).
    pub max_chunk: usize,
}

/// Counters of the file endpoints (`/metrics`).
#[derive(Default)]
pub(crate) struct FileMetrics {
    uploads_completed: AtomicU64,
    received_bytes: AtomicU64,
    served_bytes: AtomicU64,
    purged: AtomicU64,
}

impl FileMetrics {
    pub(crate) fn render(&self, out: &mut String) {
        use im_shared::prom::metric;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            out,
            "im_files_uploads_completed_total",
            "counter",
            "File uploads completed (hash checked, file stored).",
            g(&self.uploads_completed),
        );
        metric(
            out,
            "im_files_received_bytes_total",
            "counter",
            "Bytes of upload chunks stored.",
            g(&self.received_bytes),
        );
        metric(
            out,
            "im_files_served_bytes_total",
            "counter",
            "Bytes of files served to downloads (by the ranges answered).",
            g(&self.served_bytes),
        );
        metric(
            out,
            "im_files_stale_uploads_purged_total",
            "counter",
            "Uploads removed because they did not complete within 24 h.",
            g(&self.purged),
        );
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Removes stale uploads every [`PURGE_EVERY`] while the server runs.
pub(crate) async fn purge_loop(state: std::sync::Arc<State>) {
    let Some(files) = state.files.as_ref() else {
        return;
    };
    loop {
        let before = now_ms().saturating_sub(STALE_UPLOAD.as_millis() as u64);
        match files.store.purge_stale(before).await {
            Ok(n) => {
                state
                    .file_metrics
                    .purged
                    .fetch_add(n as u64, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!("files: removed {n} uploads that did not complete within 24 h");
                }
            }
            Err(e) => tracing::warn!("files: purging stale uploads: {e}"),
        }
        tokio::time::sleep(PURGE_EVERY).await;
    }
}

/// Headers every file response has: any origin may call these endpoints from a web page (they
/// are authorized by the ticket or the URL's signature, never by cookies).
fn cors(r: &mut Resp) {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "Upload-Offset, Upload-Length, Location, Content-Range, Accept-Ranges, ETag",
        ),
    );
}

/// The CORS preflight of a file route.
pub(crate) fn preflight(methods: &str) -> Resp {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    cors(&mut r);
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(methods) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Upload-Offset, Content-Type, Range"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

fn not_configured() -> Fail {
    Fail::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the file service is not configured on this server",
    )
}

fn store_error(e: FileError) -> Fail {
    match e {
        FileError::NotFound => Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such upload: it completed, was removed after 24 h, or never began",
        ),
        FileError::Offset { received } => Fail::new(
            StatusCode::CONFLICT,
            "offset_mismatch",
            format!("the upload has {received} bytes: send the chunk at offset {received}"),
        )
        .header("upload-offset", received.to_string()),
        FileError::Invalid(m) => Fail::new(StatusCode::BAD_REQUEST, "invalid_argument", m),
        FileError::Mismatch => Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            "the bytes do not hash to the ticket's SHA-256: the upload was discarded, begin again",
        ),
        FileError::Io(m) => {
            tracing::warn!("files: store: {m}");
            Fail::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the file store failed; retry",
            )
            .retry_after(1)
        }
    }
}

/// The upload ticket of `Authorization: Ticket <ticket>`.
fn ticket(keys: &FileKeys, headers: &HeaderMap) -> Result<Ticket, Fail> {
    let unauthorized =
        |code: &'static str, m: &str| Fail::new(StatusCode::UNAUTHORIZED, code, m.to_string());
    let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Ticket "))
    else {
        return Err(unauthorized(
            "missing_ticket",
            "send the upload ticket from FileTicket as 'Authorization: Ticket <ticket>'",
        ));
    };
    keys.check_ticket(t.trim(), now_ms()).map_err(|e| match e {
        SignedError::Expired => unauthorized(
            "ticket_expired",
            "the upload ticket expired: ask for a new one (FileUpload)",
        ),
        _ => unauthorized("bad_ticket", &format!("the upload ticket is invalid ({e})")),
    })
}

/// Routes of the file service: `POST /v1/files/uploads`, `HEAD|PATCH /v1/files/uploads/{id}`,
/// `GET|HEAD /v1/files/{sha256}`; `OPTIONS` of each is the CORS preflight.
pub(crate) async fn handle(state: &State, path: FilePath, req: Request<Incoming>) -> Resp {
    let mut r = match handle_inner(state, path, req).await {
        Ok(r) => r,
        Err(f) => f.into_response(),
    };
    cors(&mut r);
    r
}

/// Which file route a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FilePath {
    Uploads,
    Upload(UploadId),
    File(FileId),
}

async fn handle_inner(state: &State, path: FilePath, req: Request<Incoming>) -> Result<Resp, Fail> {
    let files = state.files.as_ref().ok_or_else(not_configured)?;
    let (parts, body) = req.into_parts();
    match (path, &parts.method) {
        (FilePath::Uploads, _) => {
            let t = ticket(&files.keys, &parts.headers)?;
            let id = files
                .store
                .begin(FileId(t.sha256), t.size, now_ms())
                .await
                .map_err(store_error)?;
            let mut r = json_with(
                StatusCode::CREATED,
                &json!({"upload": id.to_hex(), "offset": 0, "size": t.size}),
            );
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/files/uploads/{}", id.to_hex())) {
                h.insert(header::LOCATION, v);
            }
            h.insert("upload-offset", HeaderValue::from(0u64));
            Ok(r)
        }
        (FilePath::Upload(id), m) => {
            let t = ticket(&files.keys, &parts.headers)?;
            let st = files.store.status(id).await.map_err(store_error)?;
            if st.file.0 != t.sha256 {
                return Err(Fail::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this ticket is for another file than this upload",
                ));
            }
            if m == Method::HEAD {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                let h = r.headers_mut();
                h.insert("upload-offset", HeaderValue::from(st.received));
                h.insert("upload-length", HeaderValue::from(st.size));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return Ok(r);
            }
            let offset = parts
                .headers
                .get("upload-offset")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    Fail::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_argument",
                        "a chunk needs the header Upload-Offset: <the offset it starts at>",
                    )
                })?;
            let chunk =
                read_body_within(&parts.headers, body, files.max_chunk, CHUNK_TIMEOUT).await?;
            let mut received = st.received;
            if !chunk.is_empty() || offset != st.received {
                received =
                    if chunk.len() as u64 > OFFLOAD_ABOVE && files.store.completes_inline() {
                        let data = chunk.clone();
                        offload(&files.store, move |s| async move {
                            s.append(id, offset, &data).await
                        })
                        .await
                    } else {
                        files.store.append(id, offset, &chunk).await
                    }
                    .map_err(store_error)?;
                state
                    .file_metrics
                    .received_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            if received < st.size {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r.headers_mut()
                    .insert("upload-offset", HeaderValue::from(received));
                return Ok(r);
            }
            let file = if st.size > OFFLOAD_ABOVE && files.store.completes_inline() {
                offload(&files.store, move |s| async move { s.complete(id).await }).await
            } else {
                files.store.complete(id).await
            }
            .map_err(store_error)?;
            state
                .file_metrics
                .uploads_completed
                .fetch_add(1, Ordering::Relaxed);
            let key = files.keys.file_key(&file.0);
            let mut r = json_with(
                StatusCode::CREATED,
                &json!({"sha256": file.to_hex(), "size": st.size, "key": hex(&key)}),
            );
            r.headers_mut()
                .insert("upload-offset", HeaderValue::from(st.size));
            Ok(r)
        }
        (FilePath::File(file), _) => {
            let query = parts.uri.query().unwrap_or("");
            let mime = files
                .keys
                .check_download(&file.0, query, now_ms())
                .map_err(|e| match e {
                    SignedError::Expired => Fail::new(
                        StatusCode::FORBIDDEN,
                        "url_expired",
                        "this download URL expired: ask for a new one (FileDownload)",
                    ),
                    e => Fail::new(
                        StatusCode::FORBIDDEN,
                        "bad_signature",
                        format!("this download URL is not valid ({e})"),
                    ),
                })?;
            let Some(size) = files.store.size(file).await.map_err(store_error)? else {
                return Err(Fail::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such file",
                ));
            };
            let range = parts
                .headers
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .map_or(Ok(None), |v| parse_range(v, size));
            let (status, start, end) = match range {
                Ok(None) => (StatusCode::OK, 0, size),
                Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
                Err(()) => {
                    let mut r = Fail::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "range_not_satisfiable",
                        format!("the file has {size} bytes"),
                    )
                    .into_response();
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                        r.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(r);
                }
            };
            let body = if parts.method == Method::HEAD {
                full(Bytes::new())
            } else {
                state
                    .file_metrics
                    .served_bytes
                    .fetch_add(end - start, Ordering::Relaxed);
                FileBody {
                    store: files.store.clone(),
                    file,
                    pos: start,
                    end,
                    pending: None,
                }
                .boxed_unsync()
            };
            let mut r = Response::new(body);
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
            if status == StatusCode::PARTIAL_CONTENT {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if let Ok(v) = HeaderValue::from_str(&mime) {
                h.insert(header::CONTENT_TYPE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", file.to_hex())) {
                h.insert(header::ETAG, v);
            }
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=3600, immutable"),
            );
            h.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            // The type is the sender's word: nothing served here runs as a page of this origin.
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; sandbox"),
            );
            let media = ["image/", "audio/", "video/"]
                .iter()
                .any(|p| mime.starts_with(p))
                && !mime.starts_with("image/svg");
            if !media {
                h.insert(
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment"),
                );
            }
            Ok(r)
        }
    }
}

/// One range of `Range: bytes=a-b | a- | -n` as `[start, end)`; `Ok(None)`: no range to honour
/// (not `bytes=`, several ranges, or unparsable: the whole file is served, as RFC 9110 allows);
/// `Err`: unsatisfiable (`416`).
fn parse_range(v: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let Some(n) = num(b) else { return Ok(None) };
            if n == 0 || size == 0 {
                return Err(());
            }
            Ok(Some((size - n.min(size), size)))
        }
        (false, _) => {
            let Some(start) = num(a) else { return Ok(None) };
            let end = if b.is_empty() {
                size
            } else {
                let Some(last) = num(b) else { return Ok(None) };
                if last < start {
                    return Ok(None);
                }
                last.saturating_add(1).min(size)
            };
            if start >= size {
                return Err(());
            }
            Ok(Some((start, end)))
        }
        (true, true) => Ok(None),
    }
}

type ReadFut = Pin<Box<dyn Future<Output = Result<Bytes, FileError>> + Send>>;

/// A download's body: the file read from the store a chunk at a time, so a large video does
/// not sit in memory.
struct FileBody {
    store: FileBackend,
    file: FileId,
    pos: u64,
    end: u64,
    pending: Option<ReadFut>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let fut = this.pending.get_or_insert_with(|| {
            let (store, file, pos, n) = (
                this.store.clone(),
                this.file,
                this.pos,
                (this.end - this.pos).min(READ_CHUNK),
            );
            Box::pin(async move { store.read(file, pos, n).await })
        });
        let r = match fut.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        this.pending = None;
        Poll::Ready(Some(match r {
            Ok(b) if !b.is_empty() => {
                this.pos += b.len() as u64;
                Ok(Frame::data(b))
            }
            Ok(_) => Err(std::io::Error::other("the file is shorter than its size")),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 100))));
        assert_eq!(parse_range("bytes=90-200", 100), Ok(Some((90, 100))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 100))));
        assert_eq!(parse_range("bytes=-200", 100), Ok(Some((0, 100))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("bytes=5-1", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 100), Ok(None));
    }
}
