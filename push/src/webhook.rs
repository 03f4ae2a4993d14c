//! The company push gateway: one JSON POST per notification (contract in `docs/PUSH.md`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Uri};
use sha2::Sha256;

use super::http::{self, HttpsClient};
use super::{
    now_ms, truncate_str, ErrorClass, PushError, PushNotification, PushProvider, WebhookConfig,
};

/// Value of the body's `v` field.
pub const WEBHOOK_PAYLOAD_VERSION: u32 = 1;
/// Header carrying `sha256=<lowercase hex HMAC-SHA256(secret, raw body)>` when a secret is set.
pub const WEBHOOK_HEADER_SIGNATURE: &str = "x-im-signature";
/// Longest `preview` sent to the gateway, in bytes (cut at a char boundary).
pub const WEBHOOK_MAX_PREVIEW: usize = 1024;

#[derive(serde::Serialize)]
struct Body<'a> {
    v: u32,
    uid: String,
    device_id: &'a str,
    provider: u8,
    token: &'a str,
    msg_id: String,
    from: String,
    conv: u8,
    to: String,
    preview: &'a str,
    unread: u32,
    ts_ms: u64,
}

/// The JSON body POSTed for `n` at `ts_ms` (Unix ms): 64-bit ids as decimal strings (JavaScript
/// numbers lose precision above 2^53), `preview` cut to [`WEBHOOK_MAX_PREVIEW`] bytes.
pub fn webhook_body(n: &PushNotification, ts_ms: u64) -> Vec<u8> {
    let b = Body {
        v: WEBHOOK_PAYLOAD_VERSION,
        uid: n.uid.0.to_string(),
        device_id: &n.device_id,
        provider: n.provider,
        token: &n.token,
        msg_id: n.msg_id.0.to_string(),
        from: n.from.0.to_string(),
        conv: n.conv,
        to: n.to.to_string(),
        preview: truncate_str(&n.preview, WEBHOOK_MAX_PREVIEW),
        unread: n.unread,
        ts_ms,
    };
    serde_json::to_vec(&b).expect("strings and integers always serialize")
}

/// Lowercase hex of HMAC-SHA256(`secret`, `body`).
pub fn signature_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// POSTs notifications to the push gateway. 2xx: delivered; 408, 429, 5xx, timeouts and
/// connection errors: retryable; 410: the token is invalid (drop it); other statuses: permanent.
pub struct WebhookProvider {
    url: Uri,
    auth_header: Option<HeaderValue>,
    secret: Option<Vec<u8>>,
    timeout: Duration,
    client: HttpsClient,
}

impl WebhookProvider {
    pub fn new(cfg: &WebhookConfig) -> Result<Self, PushError> {
        let url: Uri = cfg
            .url
            .parse()
            .map_err(|e| PushError::Config(format!("webhook url {:?}: {e}", cfg.url)))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(PushError::Config(format!(
                "webhook url {:?}: http:// or https:// URL with a host expected",
                cfg.url
            )));
        }
        let auth_header = match &cfg.auth_header {
            Some(v) => Some(HeaderValue::from_str(v).map_err(|_| {
                PushError::Config("webhook auth_header is not a valid header value".into())
            })?),
            None => None,
        };
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        Ok(WebhookProvider {
            url,
            auth_header,
            secret: cfg.secret.as_ref().map(|s| s.as_bytes().to_vec()),
            timeout,
            client: http::client(false, timeout)?,
        })
    }

    /// The POST for `n` at `ts_ms`.
    pub fn build_request(&self, n: &PushNotification, ts_ms: u64) -> Request<Full<Bytes>> {
        let body = webhook_body(n, ts_ms);
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, "im-push/1");
        if let Some(a) = &self.auth_header {
            b = b.header(AUTHORIZATION, a.clone());
        }
        if let Some(secret) = &self.secret {
            b = b.header(
                WEBHOOK_HEADER_SIGNATURE,
                format!("sha256={}", signature_hex(secret, &body)),
            );
        }
        b.body(Full::new(Bytes::from(body)))
            .expect("method, parsed uri and valid headers")
    }

    async fn send_one(&self, n: &PushNotification) -> Result<(), PushError> {
        let req = self.build_request(n, now_ms());
        let a = http::execute(&self.client, req, self.timeout).await?;
        if a.status.is_success() {
            return Ok(());
        }
        let status = a.status.as_u16();
        let reason = http::snippet(&a.body);
        if status == 410 {
            return Err(PushError::Rejected {
                provider: "webhook",
                status,
                reason,
                class: ErrorClass::TokenInvalid,
                retry_after: None,
            });
        }
        Err(PushError::from_status(
            "webhook",
            status,
            reason,
            a.retry_after(),
        ))
    }
}

impl PushProvider for WebhookProvider {
    fn send<'a>(
        &'a self,
        n: &'a PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + 'a>> {
        Box::pin(self.send_one(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_shared::{MsgId, UserId};

    fn n(preview: &str) -> PushNotification {
        PushNotification {
            uid: UserId(42),
            device_id: "phone".into(),
            provider: super::super::PROVIDER_WEBHOOK,
            token: "dev-key".into(),
            msg_id: MsgId(u64::MAX - 1),
            from: UserId(7),
            conv: 1,
            to: 42,
            preview: preview.into(),
            unread: 3,
        }
    }

    #[test]
    fn body_shape() {
        let v: serde_json::Value = serde_json::from_slice(&webhook_body(&n("hi"), 123)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "v": 1, "uid": "42", "device_id": "phone", "provider": 3, "token": "dev-key",
                "msg_id": (u64::MAX - 1).to_string(), "from": "7", "conv": 1, "to": "42",
                "preview": "hi", "unread": 3, "ts_ms": 123
            })
        );
        let long = "é".repeat(WEBHOOK_MAX_PREVIEW);
        let v: serde_json::Value = serde_json::from_slice(&webhook_body(&n(&long), 1)).unwrap();
        assert_eq!(v["preview"].as_str().unwrap().len(), WEBHOOK_MAX_PREVIEW);
    }

    #[test]
    fn signature_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn config_is_checked() {
        let cfg = |url: &str| WebhookConfig {
            url: url.into(),
            auth_header: None,
            secret: None,
            timeout_ms: 1000,
        };
        assert!(WebhookProvider::new(&cfg("ftp://x/")).is_err());
        assert!(WebhookProvider::new(&cfg("/relative")).is_err());
        let mut c = cfg("http://127.0.0.1:1/push");
        c.auth_header = Some("bad\nvalue".into());
        assert!(WebhookProvider::new(&c).is_err());
        c.auth_header = Some("Bearer k".into());
        c.secret = Some("s".into());
        let p = WebhookProvider::new(&c).unwrap();
        let req = p.build_request(&n("x"), 5);
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer k");
        let body = webhook_body(&n("x"), 5);
        assert_eq!(
            req.headers()[WEBHOOK_HEADER_SIGNATURE],
            format!("sha256={}", signature_hex(b"s", &body)).as_str()
        );
    }
}
