//! The HTTPS client shared by the providers: hyper-util's pooled client over rustls (ring,
//! Mozilla roots), HTTP/2 by ALPN (or prior knowledge for `http://` with `http2_only`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, RETRY_AFTER};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::PushError;

pub(crate) type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Most bytes of an answer that are read.
const MAX_ANSWER: usize = 64 * 1024;

/// A pooled client for `https://` (rustls) and `http://` URLs. `http2_only`: HTTP/2 only (ALPN
/// `h2` over TLS, prior knowledge over plain TCP); else HTTP/2 or HTTP/1.1 by ALPN, HTTP/1.1
/// over plain TCP.
pub(crate) fn client(
    http2_only: bool,
    connect_timeout: Duration,
) -> Result<HttpsClient, PushError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| PushError::Config(format!("TLS setup: {e}")))?
        .https_or_http();
    let connector = if http2_only {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_all_versions().wrap_connector(http)
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90));
    if http2_only {
        b.http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_timeout(Duration::from_secs(20));
    }
    Ok(b.build(connector))
}

/// An answer: status, headers and (up to 64 KiB of) body.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// `Retry-After` in delta-seconds (an HTTP date is ignored).
    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(&self.headers)
    }
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Sends `req` and reads the answer, all within `timeout`.
pub(crate) async fn execute(
    client: &HttpsClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Answer, PushError> {
    let run = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| PushError::Transport(im_shared::errors::error_chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map(|c| c.to_bytes())
            // An answer whose body broke or is too large still has a status worth classifying.
            .unwrap_or_default();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(PushError::Timeout(timeout)),
    }
}

/// A short printable snippet of an answer body for logs and error reasons.
pub(crate) fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    super::truncate_str(s, 200).to_owned()
}
