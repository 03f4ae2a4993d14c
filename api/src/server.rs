//! The hyper server: accept loop, routing, auth, handlers, the API's own metrics.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use im_shared::proto::{ROLE_ADMIN, ROLE_MEMBER, ROLE_OWNER};
use im_shared::token::HmacTokens;
use im_shared::{ErrorCode, GroupId, UserId};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::auth::{self, AuthFailure, Credentials};
use super::iplist::{order_gates, Gates, GatesError};
use super::json::{self, Id};
use super::{ApiBackend, ApiConfig, ApiError, MetricsFn, PushTarget};
use crate::files::FilePath;

/// Most connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 4096;
/// Time to receive a request's headers (also bounds idle keep-alive connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to receive a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the logic tier gets to answer one call.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Time requests in flight get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A response body: a buffer, or a file streamed from the store.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;
pub(crate) type Resp = Response<Body>;

/// A body of these bytes.
pub(crate) fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// Everything the handlers share.
pub(crate) struct State {
    pub(crate) cfg: ApiConfig,
    pub(crate) backend: Arc<dyn ApiBackend>,
    gates: Gates,
    tokens: Option<Arc<HmacTokens>>,
    extra_metrics: Vec<MetricsFn>,
    metrics: ApiMetrics,
    /// Token bucket of each API key that made a request (a key of `cfg.keys`: bounded).
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Only `/healthz` and `/metrics` are served (`ApiServer::start_status`).
    pub(crate) status_only: bool,
    /// The file service's endpoints (`None`: they answer `503`).
    pub(crate) files: Option<crate::files::FilesHttp>,
    pub(crate) file_metrics: crate::files::FileMetrics,
}

/// Requests an API key may still make: `tokens` grows by `rate` per second up to `burst`.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Refills for the time since the last call, then takes one token; `Err(secs)`: empty, one
    /// token is back in `secs` whole seconds (at least 1).
    fn take(&mut self, rate: u32, burst: u32, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst.max(1)));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / f64::from(rate.max(1))).ceil() as u64).max(1))
        }
    }
}

impl State {
    /// Takes one request from `key`'s bucket; `Err(secs)` when it is empty: the whole seconds
    /// until one is back.
    fn take(&self, key: &str, now: Instant) -> Result<(), u64> {
        let (rate, burst) = (self.cfg.rate_per_key, self.cfg.burst_per_key);
        if rate == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::full(burst, now))
            .take(rate, burst, now)
    }

    pub(crate) fn new(
        cfg: ApiConfig,
        backend: Arc<dyn ApiBackend>,
        gates: Gates,
        tokens: Option<Arc<HmacTokens>>,
        extra_metrics: Vec<MetricsFn>,
    ) -> State {
        State {
            cfg,
            backend,
            gates,
            tokens,
            extra_metrics,
            metrics: ApiMetrics::default(),
            buckets: Mutex::default(),
            status_only: false,
            files: None,
            file_metrics: Default::default(),
        }
    }
}

/// Accepts and serves connections until `stop` turns true, then lets requests in flight finish.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let purge = tokio::spawn(crate::files::purge_loop(state.clone()));
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(v) => v,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("api: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    state.metrics.rejected_connections.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("api: too many connections, closing {peer}");
                    continue;
                }
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_connection(stream, state.clone(), stop.clone()));
            }
        }
    }
    drop(listener);
    purge.abort();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// Resolves once the server is told to stop (or its handle is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: Arc<State>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("api: connection error: {e}");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Healthz,
    Metrics,
    Iplist,
    Messages,
    Groups,
    Group(GroupId),
    GroupMembers(GroupId),
    UserGroups(UserId),
    Tokens,
    Org,
    OrgDept(u64),
    OrgUser(u64),
    OrgImport,
    File(crate::files::FilePath),
}

impl Route {
    /// The route's template: the `route` label of the request metric.
    fn template(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
            Route::Iplist => "/v1/iplist",
            Route::Messages => "/v1/messages",
            Route::Groups => "/v1/groups",
            Route::Group(_) => "/v1/groups/{id}",
            Route::GroupMembers(_) => "/v1/groups/{id}/members",
            Route::UserGroups(_) => "/v1/users/{uid}/groups",
            Route::Tokens => "/v1/tokens",
            Route::Org => "/v1/org",
            Route::OrgDept(_) => "/v1/org/departments/{id}",
            Route::OrgUser(_) => "/v1/org/users/{uid}",
            Route::OrgImport => "/v1/org/import",
            Route::File(FilePath::Uploads) => "/v1/files/uploads",
            Route::File(FilePath::Upload(_)) => "/v1/files/uploads/{id}",
            Route::File(FilePath::File(_)) => "/v1/files/{sha256}",
        }
    }

    fn methods(self) -> &'static [Method] {
        const GET: &[Method] = &[Method::GET];
        const POST: &[Method] = &[Method::POST];
        const POST_DELETE: &[Method] = &[Method::POST, Method::DELETE];
        const GET_PUT_DELETE: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];
        match self {
            Route::Healthz
            | Route::Metrics
            | Route::Iplist
            | Route::Group(_)
            | Route::UserGroups(_)
            | Route::Org => GET,
            Route::Messages | Route::Groups | Route::Tokens | Route::OrgImport => POST,
            Route::GroupMembers(_) => POST_DELETE,
            Route::OrgDept(_) | Route::OrgUser(_) => GET_PUT_DELETE,
            Route::File(FilePath::Uploads) => &[Method::POST, Method::OPTIONS],
            Route::File(FilePath::Upload(_)) => &[Method::HEAD, Method::PATCH, Method::OPTIONS],
            Route::File(FilePath::File(_)) => &[Method::GET, Method::HEAD, Method::OPTIONS],
        }
    }

    /// Signed by a business server; the file routes have their own authorization (a ticket, a
    /// signed URL).
    fn signed(self) -> bool {
        !matches!(
            self,
            Route::Healthz | Route::Metrics | Route::Iplist | Route::File(_)
        )
    }
}

/// Why a path did not resolve to a route.
enum NoRoute {
    NotFound,
    /// A known route (its template, for the metrics) with an id that is not a positive integer.
    BadId(&'static str, &'static str, String),
    /// A file route with an id that is not `what` (its template, the message).
    BadFileId(&'static str, String),
}

/// A positive decimal integer without sign or spaces.
fn positive_id(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|v| *v != 0)
}

fn route(path: &str) -> Result<Route, NoRoute> {
    fn id(template: &'static str, what: &'static str, s: &str) -> Result<u64, NoRoute> {
        positive_id(s).ok_or_else(|| NoRoute::BadId(template, what, s.to_string()))
    }
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    Ok(match segs.as_slice() {
        ["healthz"] => Route::Healthz,
        ["metrics"] => Route::Metrics,
        ["v1", "iplist"] => Route::Iplist,
        ["v1", "messages"] => Route::Messages,
        ["v1", "groups"] => Route::Groups,
        ["v1", "tokens"] => Route::Tokens,
        ["v1", "groups", g] => Route::Group(GroupId(id("/v1/groups/{id}", "group id", g)?)),
        ["v1", "groups", g, "members"] => {
            Route::GroupMembers(GroupId(id("/v1/groups/{id}/members", "group id", g)?))
        }
        ["v1", "users", u, "groups"] => {
            Route::UserGroups(UserId(id("/v1/users/{uid}/groups", "user id", u)?))
        }
        ["v1", "org"] => Route::Org,
        ["v1", "org", "import"] => Route::OrgImport,
        ["v1", "org", "departments", d] => {
            Route::OrgDept(id("/v1/org/departments/{id}", "department id", d)?)
        }
        ["v1", "org", "users", u] => Route::OrgUser(id("/v1/org/users/{uid}", "user id", u)?),
        ["v1", "files", "uploads"] => Route::File(FilePath::Uploads),
        ["v1", "files", "uploads", u] => match im_files::UploadId::from_hex(u) {
            Some(u) => Route::File(FilePath::Upload(u)),
            None => {
                return Err(NoRoute::BadFileId(
                    "/v1/files/uploads/{id}",
                    format!("invalid upload id {u:?}: expected 32 hex digits"),
                ))
            }
        },
        ["v1", "files", f] => match im_files::FileId::from_hex(f) {
            Some(f) => Route::File(FilePath::File(f)),
            None => {
                return Err(NoRoute::BadFileId(
                    "/v1/files/{sha256}",
                    format!("invalid file id {f:?}: expected the file's SHA-256 in 64 hex digits"),
                ))
            }
        },
        _ => return Err(NoRoute::NotFound),
    })
}

// ---------------------------------------------------------------------------------------------
// Responses

pub(crate) fn json_with(status: StatusCode, v: &Value) -> Resp {
    json_response(status, v)
}

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut body = serde_json::to_vec(v).expect("a Value always serializes");
    body.push(b'\n');
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn ok(v: Value) -> Resp {
    json_response(StatusCode::OK, &v)
}

/// `{"error":{"code":..,"message":..}}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Resp {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message.into()}}),
    )
}

/// A refusal on its way to becoming an error response (small, unlike a [`Resp`]).
pub(crate) struct Fail {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    extra: Option<(&'static str, String)>,
}

impl Fail {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            status,
            code,
            message: message.into(),
            retry_after: None,
            extra: None,
        }
    }

    /// Adds `Retry-After: secs` (at least 1).
    pub(crate) fn retry_after(mut self, secs: u64) -> Fail {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// Adds one more header.
    pub(crate) fn header(mut self, name: &'static str, value: String) -> Fail {
        self.extra = Some((name, value));
        self
    }

    pub(crate) fn into_response(self) -> Resp {
        let mut r = error(self.status, self.code, self.message);
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some((name, value)) = self.extra {
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert(name, v);
            }
        }
        r
    }
}

pub(crate) fn bad_request(message: impl Into<String>) -> Fail {
    Fail::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
}

/// The `error.code` string of a logic error code.
fn code_name(code: ErrorCode) -> &'static str {
    use ErrorCode::*;
    match code {
        Ok => "ok",
        Malformed => "malformed",
        FrameTooLarge => "frame_too_large",
        UnsupportedVersion => "unsupported_version",
        UnknownCommand => "unknown_command",
        NotLoggedIn => "not_logged_in",
        AlreadyLoggedIn => "already_logged_in",
        BadToken => "bad_token",
        TokenExpired => "token_expired",
        LoginTimeout => "login_timeout",
        InvalidArgument => "invalid_argument",
        IdleTimeout => "idle_timeout",
        SlowConsumer => "slow_consumer",
        Internal => "internal",
        Overloaded => "overloaded",
        Unavailable => "unavailable",
        Forbidden => "forbidden",
        NotMember => "not_member",
        NotFound => "not_found",
        RecallRefused => "recall_refused",
        GroupFull => "group_full",
        Conflict => "conflict",
    }
}

/// Maps a logic error onto an HTTP response.
pub(crate) fn api_error(e: &ApiError) -> Fail {
    let status = match e.code {
        ErrorCode::InvalidArgument | ErrorCode::Malformed => StatusCode::BAD_REQUEST,
        ErrorCode::Forbidden | ErrorCode::NotMember => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::GroupFull | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let f = Fail::new(status, code_name(e.code), e.message.clone());
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        f.retry_after(1)
    } else {
        f
    }
}

/// Runs a backend call with [`BACKEND_TIMEOUT`]; a timeout is `Unavailable`.
pub(crate) async fn call<T>(fut: super::BoxFut<'_, Result<T, ApiError>>) -> Result<T, Fail> {
    match tokio::time::timeout(BACKEND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(&e)),
        Err(_) => Err(api_error(&ApiError::new(
            ErrorCode::Unavailable,
            "the logic tier did not answer in time; retrying is safe (with the same request_id \
             for messages)",
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[derive(Default)]
struct ApiMetrics {
    /// `(method, route, status)` → requests.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    iplist_source_errors: AtomicU64,
    rejected_connections: AtomicU64,
    rate_limited: AtomicU64,
    /// How long requests took, from the request head to the response (body read included).
    request_seconds: im_shared::prom::Histogram,
}

impl ApiMetrics {
    fn record(&self, method: &'static str, route: &'static str, status: StatusCode) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((method, route, status.as_u16())).or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        self.request_seconds.render(
            out,
            "im_api_request_seconds",
            "HTTP API requests from head to response (the body read and the logic call included).",
        );
        out.push_str(
            "# HELP im_api_requests_total HTTP API requests by method, route and status.\n\
             # TYPE im_api_requests_total counter\n",
        );
        let reqs = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for ((method, route, status), n) in reqs {
            let _ = writeln!(
                out,
                "im_api_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP im_api_auth_failures_total Signed requests refused, by reason.\n\
             # TYPE im_api_auth_failures_total counter\n",
        );
        for (f, n) in AuthFailure::ALL.iter().zip(&self.auth_failures) {
            let _ = writeln!(
                out,
                "im_api_auth_failures_total{{reason=\"{}\"}} {}",
                f.code(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP im_api_iplist_source_errors_total Failed reads of the gate registry.\n\
             # TYPE im_api_iplist_source_errors_total counter\n\
             im_api_iplist_source_errors_total {}\n\
             # HELP im_api_rejected_connections_total Connections closed at accept (limit reached).\n\
             # TYPE im_api_rejected_connections_total counter\n\
             im_api_rejected_connections_total {}\n\
             # HELP im_api_rate_limited_total Signed requests refused because their key was over its rate.\n\
             # TYPE im_api_rate_limited_total counter\n\
             im_api_rate_limited_total {}\n",
            self.iplist_source_errors.load(Ordering::Relaxed),
            self.rejected_connections.load(Ordering::Relaxed),
            self.rate_limited.load(Ordering::Relaxed),
        );
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling

async fn handle(state: &State, mut req: Request<Incoming>) -> Resp {
    let began = Instant::now();
    let method = method_label(req.method());
    let route = route(req.uri().path());
    // HEAD of an unsigned GET route (`/healthz`, `/metrics`, `/v1/iplist`) is answered like the
    // GET, and hyper leaves the body out: load balancers and uptime checks probe with HEAD.
    if req.method() == Method::HEAD
        && matches!(&route, Ok(r) if !r.signed() && !matches!(r, Route::File(_)) && r.methods().contains(&Method::GET))
    {
        *req.method_mut() = Method::GET;
    }
    let (label, resp) = match route {
        Err(NoRoute::NotFound) => (
            "unmatched",
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {}", req.uri().path()),
            ),
        ),
        // Counted under the route it names: a client sending bad ids shows up there.
        Err(NoRoute::BadId(template, what, s)) => (
            template,
            bad_request(format!(
                "invalid {what} {s:?}: expected a positive decimal integer"
            ))
            .into_response(),
        ),
        Err(NoRoute::BadFileId(template, message)) => {
            (template, error(StatusCode::NOT_FOUND, "not_found", message))
        }
        Ok(r) if state.status_only && !matches!(r, Route::Healthz | Route::Metrics) => (
            "unmatched",
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no route for {} here: this process serves /healthz and /metrics only; the \
                     business API is on the logic nodes",
                    req.uri().path()
                ),
            ),
        ),
        Ok(r) => (r.template(), handle_route(state, r, req).await),
    };
    state.metrics.record(method, label, resp.status());
    state.metrics.request_seconds.observe(began.elapsed());
    resp
}

async fn handle_route(state: &State, route: Route, req: Request<Incoming>) -> Resp {
    if !route.methods().contains(req.method()) {
        let allow = route
            .methods()
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} {} is not supported; allowed: {allow}",
                req.method(),
                route.template()
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&allow) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    if !route.signed() {
        return match route {
            Route::Healthz => ok(json!({"status": "ok"})),
            Route::Metrics => metrics(state),
            Route::File(_) if req.method() == Method::OPTIONS => {
                let allow = route
                    .methods()
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>();
                crate::files::preflight(&allow.join(", "))
            }
            Route::File(path) => crate::files::handle(state, path, req).await,
            _ => iplist(state, req.uri().query().unwrap_or("")).await,
        };
    }
    let (parts, body) = req.into_parts();
    let max_body = match route {
        Route::OrgImport => state.cfg.max_body.max(crate::org::MAX_IMPORT_BODY),
        _ => state.cfg.max_body,
    };
    let body = match read_body(&parts.headers, body, max_body).await {
        Ok(b) => b,
        Err(f) => return f.into_response(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let creds = Credentials {
        key: header(auth::HEADER_KEY),
        timestamp: header(auth::HEADER_TIMESTAMP),
        signature: header(auth::HEADER_SIGNATURE),
    };
    let verified = auth::verify(
        &state.cfg.keys,
        state.cfg.max_skew_secs,
        im_shared::token::now_secs(),
        &creds,
        parts.method.as_str(),
        path_and_query,
        &body,
    );
    if let Ok(key) = verified {
        if let Err(secs) = state.take(key, Instant::now()) {
            state.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Fail::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "API key {key} is over {} requests/s (bursts of {})",
                    state.cfg.rate_per_key, state.cfg.burst_per_key
                ),
            )
            .retry_after(secs)
            .into_response();
        }
    }
    if let Err((failure, message)) = verified {
        let i = AuthFailure::ALL
            .iter()
            .position(|f| *f == failure)
            .expect("every failure is listed");
        state.metrics.auth_failures[i].fetch_add(1, Ordering::Relaxed);
        let mut r = error(StatusCode::UNAUTHORIZED, failure.code(), message);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("IM-HMAC-SHA256"),
        );
        return r;
    }
    let query = parts.uri.query().unwrap_or("");
    let result = match (route, &parts.method) {
        (Route::Messages, _) => send_message(state, &body).await,
        (Route::Groups, _) => create_group(state, &body).await,
        (Route::Group(g), _) => group_info(state, g).await,
        (Route::GroupMembers(g), &Method::POST) => add_members(state, g, &body).await,
        (Route::GroupMembers(g), _) => remove_members(state, g, &body).await,
        (Route::UserGroups(u), _) => groups_of(state, u).await,
        (Route::Tokens, _) => mint_token(state, &body),
        (Route::Org, _) => crate::org::top(state),
        (Route::OrgDept(d), &Method::GET) => crate::org::get_dept(state, d, query),
        (Route::OrgDept(d), &Method::PUT) => crate::org::put_dept(state, d, &body).await,
        (Route::OrgDept(d), _) => crate::org::delete_dept(state, d).await,
        (Route::OrgUser(u), &Method::GET) => crate::org::get_user(state, u),
        (Route::OrgUser(u), &Method::PUT) => crate::org::put_user(state, u, &body).await,
        (Route::OrgUser(u), _) => crate::org::delete_user(state, u).await,
        (Route::OrgImport, _) => crate::org::import(state, &body).await,
        (Route::Healthz | Route::Metrics | Route::Iplist | Route::File(_), _) => {
            unreachable!("not signed")
        }
    };
    result.unwrap_or_else(Fail::into_response)
}

/// Reads the whole body, at most `max` bytes (`413` beyond), within [`BODY_TIMEOUT`].
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
) -> Result<Bytes, Fail> {
    read_body_within(headers, body, max, BODY_TIMEOUT).await
}

/// [`read_body`] with another deadline (a file chunk over a slow mobile link).
pub(crate) async fn read_body_within(
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
    within: Duration,
) -> Result<Bytes, Fail> {
    let too_large = || {
        Fail::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(within, Limited::new(body, max).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(bad_request(format!("cannot read the request body: {e}"))),
        Err(_) => Err(Fail::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )),
    }
}

pub(crate) fn parse<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, Fail> {
    serde_json::from_slice(body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("invalid JSON body: {e}"),
        )
    })
}

fn metrics(state: &State) -> Resp {
    let mut out = String::with_capacity(4096);
    state.backend.metrics(&mut out);
    for f in &state.extra_metrics {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        f(&mut out);
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    state.metrics.render(&mut out);
    if state.files.is_some() {
        state.file_metrics.render(&mut out);
    }
    process_metrics(&mut out);
    let mut r = Response::new(full(Bytes::from(out)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// The process's own series, under the names Prometheus client libraries use (`process_*`),
/// read from `/proc/self`, and `im_build_info`: every role's `/metrics` has them.
fn process_metrics(out: &mut String) {
    use im_shared::prom::metric;
    let _ = writeln!(
        out,
        "# HELP im_build_info The running build (value 1).\n# TYPE im_build_info gauge\nim_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::GIT_COMMIT
    );
    // Fields after the command name (which may hold spaces) of /proc/self/stat.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf takes an integer and returns one.
    let (tck, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        im_shared::prom::header(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, seconds.",
        );
        let _ = writeln!(
            out,
            "process_cpu_seconds_total {}",
            (utime + stime) as f64 / tck
        );
    }
    if let Some(rss) = field(24) {
        metric(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, bytes.",
            rss * page,
        );
    }
    if let Some(vsz) = field(23) {
        metric(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, bytes.",
            vsz,
        );
    }
    if let Some(threads) = field(20) {
        metric(
            out,
            "process_threads",
            "gauge",
            "Threads of the process.",
            threads,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count() as u64,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        im_shared::prom::header(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, seconds.",
        );
        let _ = writeln!(
            out,
            "process_start_time_seconds {}",
            boot as f64 + start as f64 / tck
        );
    }
}

async fn iplist(state: &State, query: &str) -> Resp {
    iplist_inner(state, query)
        .await
        .unwrap_or_else(Fail::into_response)
}

async fn iplist_inner(state: &State, query: &str) -> Result<Resp, Fail> {
    let uid = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "uid")
        .map(|(_, v)| v);
    let uid = match uid.map(|v| (v, positive_id(v))) {
        None => return Err(bad_request("query parameter `uid` is required")),
        Some((_, Some(u))) => UserId(u),
        Some((v, None)) => {
            return Err(bad_request(format!(
                "invalid uid {v:?}: expected a positive decimal integer"
            )))
        }
    };
    let retry_secs = state.cfg.backoff.initial_ms.div_ceil(1000);
    let live = state
        .gates
        .live(|| {
            state
                .metrics
                .iplist_source_errors
                .fetch_add(1, Ordering::Relaxed);
        })
        .await;
    let gates = live.map_err(|GatesError::Unavailable(e)| {
        Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the gate registry is unavailable: {e}"),
        )
        .retry_after(retry_secs)
    })?;
    if gates.is_empty() {
        return Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_gate",
            "no gate is available; retry later",
        )
        .retry_after(retry_secs));
    }
    let mut gates = gates.as_ref().clone();
    order_gates(uid, &mut gates);
    let gates: Vec<Value> = gates
        .iter()
        .map(|g| json!({"id": g.id, "tcp": g.tcp_addr, "ws": g.ws_addr}))
        .collect();
    Ok(ok(
        json!({"uid": uid.0, "gates": gates, "backoff": state.cfg.backoff}),
    ))
}

async fn send_message(state: &State, body: &[u8]) -> Result<Resp, Fail> {
    let req: json::SendReq = parse(body)?;
    if req.from.0 == 0 {
        return Err(bad_request("`from` must be a positive user id"));
    }
    if req.mentions.is_some() && req.to_group.is_none() {
        return Err(bad_request(
            "`mentions` go with `to_group` only (a mention is of a group's member)",
        ));
    }
    let target = match (&req.to_users, req.to_group) {
        (Some(users), None) => PushTarget::Users(
            json::user_list("to_users", users, json::MAX_RECIPIENTS, false)
                .map_err(|e| bad_request(e.to_string()))?
                .into_iter()
                .map(UserId)
                .collect(),
        ),
        (None, Some(g)) if g.0 != 0 => {
            let mentions = req.mentions.as_deref().unwrap_or_default();
            if mentions.len() > json::MAX_MENTIONS {
                return Err(bad_request(format!(
                    "`mentions` lists {} users; at most {} are allowed",
                    mentions.len(),
                    json::MAX_MENTIONS
                )));
            }
            let mut m: Vec<UserId> = mentions.iter().map(|i| UserId(i.0)).collect();
            m.sort_unstable();
            m.dedup();
            PushTarget::Group(GroupId(g.0), m)
        }
        (None, Some(_)) => return Err(bad_request("`to_group` must be a positive group id")),
        (Some(_), Some(_)) => {
            return Err(bad_request(
                "give exactly one of `to_users` and `to_group`, not both",
            ))
        }
        (None, None) => return Err(bad_request("give exactly one of `to_users` and `to_group`")),
    };
    let payload = match (req.body, req.body_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => Bytes::from(
            json::base64_decode(&b64)
                .ok_or_else(|| bad_request("`body_base64` is not valid base64"))?,
        ),
        (Some(_), Some(_)) => {
            return Err(bad_request(
                "give exactly one of `body` and `body_base64`, not both",
            ))
        }
        (None, None) => return Err(bad_request("give one of `body` and `body_base64`")),
    };
    if payload.len() > json::MAX_MESSAGE_BODY {
        return Err(bad_request(format!(
            "message body is {} bytes; at most {} are allowed",
            payload.len(),
            json::MAX_MESSAGE_BODY
        )));
    }
    let request_id = req.request_id.map_or(0, |i| i.0);
    let accepted = call(
        state
            .backend
            .server_send(UserId(req.from.0), target, payload, request_id),
    )
    .await?;
    Ok(ok(json!({
        "msg_id": accepted.msg_id.0,
        "server_time_ms": accepted.server_time_ms,
    })))
}

fn check_name(name: &str) -> Result<(), Fail> {
    if name.trim().is_empty() {
        return Err(bad_request("`name` must not be empty"));
    }
    if name.len() > im_shared::proto::MAX_NAME_LEN {
        return Err(bad_request(format!(
            "`name` is {} bytes; at most {} are allowed",
            name.len(),
            im_shared::proto::MAX_NAME_LEN
        )));
    }
    Ok(())
}

fn users(field: &str, ids: &[Id], allow_empty: bool) -> Result<Vec<UserId>, Fail> {
    Ok(json::user_list(field, ids, json::MAX_LIST_LEN, allow_empty)
        .map_err(|e| bad_request(e.to_string()))?
        .into_iter()
        .map(UserId)
        .collect())
}

async fn create_group(state: &State, body: &[u8]) -> Result<Resp, Fail> {
    let req: json::CreateGroupReq = parse(body)?;
    if req.owner.0 == 0 {
        return Err(bad_request("`owner` must be a positive user id"));
    }
    check_name(&req.name)?;
    let members = users("members", &req.members, true)?;
    let group = call(state.backend.group_create(
        UserId(req.owner.0),
        req.name,
        members,
        req.client_id.map_or(0, |c| c.0),
    ))
    .await?;
    Ok(ok(json!({"group": group.0})))
}

fn role_name(role: u8) -> &'static str {
    match role {
        ROLE_OWNER => "owner",
        ROLE_MEMBER => "member",
        ROLE_ADMIN => "admin",
        _ => "other",
    }
}

async fn group_info(state: &State, g: GroupId) -> Result<Resp, Fail> {
    let (desc, members) = call(state.backend.group_info(g)).await?;
    let members: Vec<Value> = members
        .iter()
        .map(|(u, role)| json!({"uid": u.0, "role": role_name(*role)}))
        .collect();
    Ok(ok(json!({
        "group": desc.group.0,
        "name": desc.name,
        "creator": desc.creator.0,
        "owner": desc.owner.0,
        "announcement": desc.announcement,
        "created_ms": desc.created_ms,
        "members": members,
    })))
}

async fn add_members(state: &State, g: GroupId, body: &[u8]) -> Result<Resp, Fail> {
    let req: json::AddMembersReq = parse(body)?;
    let members = users("add", &req.add, false)?;
    call(state.backend.group_add(g, members)).await?;
    Ok(ok(json!({"group": g.0})))
}

async fn remove_members(state: &State, g: GroupId, body: &[u8]) -> Result<Resp, Fail> {
    let req: json::RemoveMembersReq = parse(body)?;
    let members = users("remove", &req.remove, false)?;
    call(state.backend.group_remove(g, members)).await?;
    Ok(ok(json!({"group": g.0})))
}

async fn groups_of(state: &State, u: UserId) -> Result<Resp, Fail> {
    let groups = call(state.backend.groups_of(u)).await?;
    let groups: Vec<Value> = groups
        .iter()
        .map(|(g, name)| json!({"group": g.0, "name": name}))
        .collect();
    Ok(ok(json!({"uid": u.0, "groups": groups})))
}

fn mint_token(state: &State, body: &[u8]) -> Result<Resp, Fail> {
    let Some(tokens) = &state.tokens else {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "token issuing is not configured on this server",
        ));
    };
    let req: json::TokenReq = parse(body)?;
    if req.uid.0 == 0 {
        return Err(bad_request("`uid` must be a positive user id"));
    }
    let ttl = req.ttl_secs.map_or(json::DEFAULT_TOKEN_TTL_SECS, |t| t.0);
    if ttl == 0 || ttl > json::MAX_TOKEN_TTL_SECS {
        return Err(bad_request(format!(
            "`ttl_secs` must be between 1 and {}",
            json::MAX_TOKEN_TTL_SECS
        )));
    }
    let expires_at = im_shared::token::now_secs() + ttl;
    let token = tokens.mint(UserId(req.uid.0), expires_at);
    Ok(ok(
        json!({"uid": req.uid.0, "token": token, "expires_at": expires_at}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_bucket_allows_its_burst_then_its_rate_and_says_when_to_come_back() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3, t0);
        for _ in 0..3 {
            assert_eq!(b.take(2, 3, t0), Ok(()));
        }
        assert_eq!(b.take(2, 3, t0), Err(1));
        // 2 per second: one back after half a second, not two.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(2, 3, t1), Ok(()));
        assert_eq!(b.take(2, 3, t1), Err(1));
        // Refilled, but never above the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(2, 3, t2), Ok(()));
        }
        assert!(b.take(2, 3, t2).is_err());
        // Empty at 1 per second: back in 1 s, and 1 s later it is.
        let mut b = Bucket {
            tokens: 0.0,
            at: t0,
        };
        assert_eq!(b.take(1, 1, t0), Err(1));
        assert_eq!(b.take(1, 1, t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn routes() {
        assert_eq!(route("/healthz").ok(), Some(Route::Healthz));
        assert_eq!(route("/v1/groups/7").ok(), Some(Route::Group(GroupId(7))));
        assert_eq!(
            route("/v1/groups/7/members").ok(),
            Some(Route::GroupMembers(GroupId(7)))
        );
        assert_eq!(
            route("/v1/users/9/groups").ok(),
            Some(Route::UserGroups(UserId(9)))
        );
        assert!(matches!(route("/v1/groups/"), Err(NoRoute::BadId(..))));
        assert!(matches!(route("/v1/groups/+7"), Err(NoRoute::BadId(..))));
        assert!(matches!(route("/v1/groups/0"), Err(NoRoute::BadId(..))));
        assert!(matches!(route("/v1/group"), Err(NoRoute::NotFound)));
        assert!(matches!(route("/healthz/"), Err(NoRoute::NotFound)));
        assert!(matches!(route("/"), Err(NoRoute::NotFound)));
    }
}
