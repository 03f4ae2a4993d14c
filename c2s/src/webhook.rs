//! Webhook delivery of the embedded backend: the JSON contract, its signature and one POST.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use super::{C2sError, C2sRecord};

/// Value of the payload's `v` field.
pub const PAYLOAD_VERSION: u32 = 1;
/// Header carrying the record id (decimal): the business side drops a record it has already
/// processed.
pub const HEADER_ID: &str = "idempotency-key";
/// Header carrying `sha256=<lowercase hex HMAC-SHA256(secret, raw body)>` when a secret is set.
pub const HEADER_SIGNATURE: &str = "x-im-signature";
/// Header carrying the record's topic (also in the body).
pub const HEADER_TOPIC: &str = "x-im-topic";
/// Header carrying the attempt number of this POST (1 for the first).
pub const HEADER_ATTEMPT: &str = "x-im-attempt";

/// Most bytes of a webhook's answer that are read (and ignored).
const MAX_ANSWER: usize = 64 * 1024;

#[derive(serde::Serialize)]
struct Payload<'a> {
    v: u32,
    id: String,
    from: String,
    client_msg_id: String,
    topic: &'a str,
    time_ms: u64,
    encoding: &'static str,
    body: Cow<'a, str>,
}

/// The JSON body POSTed for `rec` (contract in `docs/C2S.md`): 64-bit ids as decimal strings
/// (JavaScript numbers lose precision above 2^53), `body` as text with `"encoding":"utf8"` when
/// it is valid UTF-8, else standard base64 with padding and `"encoding":"base64"`.
pub fn payload_json(rec: &C2sRecord) -> Vec<u8> {
    let (encoding, body) = match std::str::from_utf8(&rec.body) {
        Ok(s) => ("utf8", Cow::Borrowed(s)),
        Err(_) => ("base64", Cow::Owned(base64(&rec.body))),
    };
    let p = Payload {
        v: PAYLOAD_VERSION,
        id: rec.id.0.to_string(),
        from: rec.from.0.to_string(),
        client_msg_id: rec.client_msg_id.to_string(),
        topic: &rec.topic,
        time_ms: rec.time_ms,
        encoding,
        body,
    };
    serde_json::to_vec(&p).expect("a payload of strings and integers always serializes")
}

/// Standard base64 (RFC 4648 §4) with padding.
pub fn base64(data: &[u8]) -> String {
    im_shared::b64::encode_std(data)
}

/// Lowercase hex of HMAC-SHA256(`secret`, `body`).
pub fn signature_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut s = String::with_capacity(tag.len() * 2);
    for b in tag {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

fn parse_url(what: &str, s: &str) -> Result<Uri, C2sError> {
    let uri: Uri = s
        .parse()
        .map_err(|e| C2sError::Config(format!("{what}: bad URL {s:?}: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(C2sError::Config(format!(
            "{what}: {s:?} is not an http://host[:port]/path URL (https is not supported)"
        )));
    }
    Ok(uri)
}

/// Validated webhook settings.
#[derive(Debug)]
pub(crate) struct Settings {
    webhooks: HashMap<String, Uri>,
    default_url: Option<Uri>,
    secret: Option<Vec<u8>>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub timeout: Duration,
}

impl Settings {
    pub fn new(
        webhooks: &BTreeMap<String, String>,
        default_url: Option<&str>,
        secret: Option<&str>,
        retry_initial: Duration,
        retry_max: Duration,
        timeout: Duration,
    ) -> Result<Self, C2sError> {
        let webhooks = webhooks
            .iter()
            .map(|(t, u)| Ok((t.clone(), parse_url(&format!("webhook of {t:?}"), u)?)))
            .collect::<Result<_, C2sError>>()?;
        let default_url = default_url
            .map(|u| parse_url("default_url", u))
            .transpose()?;
        Ok(Settings {
            webhooks,
            default_url,
            secret: secret.map(|s| s.as_bytes().to_vec()),
            retry_initial,
            retry_max,
            timeout,
        })
    }

    pub fn url_for(&self, topic: &str) -> Option<&Uri> {
        self.webhooks.get(topic).or(self.default_url.as_ref())
    }
}

/// What one POST came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// 2xx: the business side has the record.
    Delivered,
    /// 4xx other than 408/429: the business side refuses this record; retrying will not help.
    Rejected(u16),
    /// 5xx, 408, 429, 1xx/3xx, timeout, connection error: try again later.
    Retry(String),
}

pub(crate) fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 => Outcome::Retry(format!("HTTP {status}")),
        400..=499 => Outcome::Rejected(status),
        _ => Outcome::Retry(format!("HTTP {status}")),
    }
}

/// HTTP/1.1 client with keep-alive; lives on the dispatcher's runtime.
pub(crate) struct Poster {
    client: Client<HttpConnector, Full<Bytes>>,
    secret: Option<Vec<u8>>,
    timeout: Duration,
}

impl Poster {
    pub fn new(settings: &Settings) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(settings.timeout));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http);
        Poster {
            client,
            secret: settings.secret.clone(),
            timeout: settings.timeout,
        }
    }

    /// POSTs `rec` to `url` once, within the timeout.
    pub async fn post(&self, url: &Uri, rec: &C2sRecord, attempt: u32) -> Outcome {
        let body = payload_json(rec);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(HEADER_ID, rec.id.0.to_string())
            .header(HEADER_ATTEMPT, attempt.to_string());
        // Topics are arbitrary UTF-8; the header is only informative, the body has the topic.
        if let Ok(v) = HeaderValue::from_str(&rec.topic) {
            req = req.header(HEADER_TOPIC, v);
        }
        if let Some(secret) = &self.secret {
            req = req.header(
                HEADER_SIGNATURE,
                format!("sha256={}", signature_hex(secret, &body)),
            );
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return Outcome::Retry(format!("cannot build request: {e}")),
        };
        let exchange = async {
            // The legacy client's error hides its cause in `source()`.
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| im_shared::errors::error_chain(&e))?;
            let status = resp.status().as_u16();
            // Read (a bounded part of) the answer so the connection can be reused; its content
            // does not matter, and neither does a failure to read it.
            let _ = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
            Ok::<u16, String>(status)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(status)) => classify(status),
            Ok(Err(e)) => Outcome::Retry(e),
            Err(_) => Outcome::Retry(format!("timed out after {:?}", self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_shared::{MsgId, UserId};

    fn rec(body: &'static [u8]) -> C2sRecord {
        C2sRecord {
            id: MsgId(u64::MAX - 1),
            from: UserId(42),
            client_msg_id: 7,
            topic: "orders".into(),
            body: Bytes::from_static(body),
            time_ms: 1_718_000_000_000,
        }
    }

    #[test]
    fn payload_is_text_or_base64() {
        let v: serde_json::Value =
            serde_json::from_slice(&payload_json(&rec(b"hi \"x\""))).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["id"], (u64::MAX - 1).to_string());
        assert_eq!(v["from"], "42");
        assert_eq!(v["client_msg_id"], "7");
        assert_eq!(v["topic"], "orders");
        assert_eq!(v["time_ms"], 1_718_000_000_000u64);
        assert_eq!(v["encoding"], "utf8");
        assert_eq!(v["body"], "hi \"x\"");
        let v: serde_json::Value =
            serde_json::from_slice(&payload_json(&rec(b"\xff\x00a"))).unwrap();
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["body"], "/wBh");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn signature_matches_rfc4231_case_2() {
        assert_eq!(
            signature_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(classify(200), Outcome::Delivered));
        assert!(matches!(classify(204), Outcome::Delivered));
        assert!(matches!(classify(400), Outcome::Rejected(400)));
        assert!(matches!(classify(404), Outcome::Rejected(404)));
        assert!(matches!(classify(408), Outcome::Retry(_)));
        assert!(matches!(classify(429), Outcome::Retry(_)));
        assert!(matches!(classify(500), Outcome::Retry(_)));
        assert!(matches!(classify(503), Outcome::Retry(_)));
        assert!(matches!(classify(302), Outcome::Retry(_)));
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(parse_url("t", "http://127.0.0.1:8080/c2s").is_ok());
        assert!(parse_url("t", "https://example.com/c2s").is_err());
        assert!(parse_url("t", "/c2s").is_err());
        assert!(parse_url("t", "not a url").is_err());
    }
}
