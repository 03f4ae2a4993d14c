//! APNs: the HTTP/2 provider API with token-based (ES256 JWT) authentication.
//!
//! `POST /3/device/<token>` on `api.push.apple.com` (or `api.sandbox.push.apple.com`), headers
//! `authorization: bearer <jwt>`, `apns-topic`, `apns-push-type: alert`, `apns-priority: 10`,
//! `apns-expiration`, `apns-collapse-id`; JSON payload of at most 4096 bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};

use super::http::{self, HttpsClient};
use super::jwt::Es256Key;
use super::{
    fit_preview, now_secs, thread_key, ApnsConfig, ErrorClass, PushError, PushNotification,
    PushProvider,
};

pub const APNS_HOST_PRODUCTION: &str = "https://api.push.apple.com";
pub const APNS_HOST_SANDBOX: &str = "https://api.sandbox.push.apple.com";
/// Largest payload of a regular (non-VoIP) notification.
pub const APNS_MAX_PAYLOAD: usize = 4096;
/// Age at which the provider token is renewed (Apple: not more often than every 20 minutes,
/// not less often than every 60).
pub const APNS_TOKEN_REFRESH_SECS: u64 = 50 * 60;
/// Body shown when the notification has no preview.
const DEFAULT_BODY: &str = "New message";
/// Longest APNs device token (hex characters) accepted.
const MAX_TOKEN_HEX: usize = 400;

/// The APNs JSON payload of `n` (at most [`APNS_MAX_PAYLOAD`] bytes; the preview is cut to fit):
///
/// ```json
/// {"aps":{"alert":{"body":"hi"},"badge":3,"sound":"default","mutable-content":1,"thread-id":"u7"},
///  "im":{"v":1,"msg_id":"…","from":"7","conv":1,"to":"42"}}
/// ```
pub fn apns_payload(n: &PushNotification) -> Result<Vec<u8>, PushError> {
    let thread = thread_key(n);
    let build = |preview: &str| {
        let body = if preview.is_empty() {
            DEFAULT_BODY
        } else {
            preview
        };
        let v = serde_json::json!({
            "aps": {
                "alert": { "body": body },
                "badge": n.unread,
                "sound": "default",
                "mutable-content": 1,
                "thread-id": thread,
            },
            "im": {
                "v": 1,
                "msg_id": n.msg_id.0.to_string(),
                "from": n.from.0.to_string(),
                "conv": n.conv,
                "to": n.to.to_string(),
            },
        });
        serde_json::to_vec(&v).expect("a JSON value serializes")
    };
    fit_preview(&n.preview, APNS_MAX_PAYLOAD, build)
}

/// Classifies an APNs answer: `Ok` for 200, else the error with its class (see `docs/PUSH.md`).
pub fn classify_apns_response(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(), PushError> {
    if status == 200 {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        reason: String,
    }
    let reason = serde_json::from_slice::<Answer>(body)
        .map(|a| a.reason)
        .unwrap_or_else(|_| http::snippet(body));
    let class = match (status, reason.as_str()) {
        (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => ErrorClass::TokenInvalid,
        (410, _) => ErrorClass::TokenInvalid, // Unregistered, ExpiredToken
        // Our provider token aged out (e.g. clock skew): a fresh one is made for the retry.
        (403, "ExpiredProviderToken") => ErrorClass::Retryable,
        (429, _) => ErrorClass::Retryable, // TooManyRequests, TooManyProviderTokenUpdates
        (s, _) if s >= 500 => ErrorClass::Retryable, // InternalServerError, ServiceUnavailable
        _ => ErrorClass::Permanent,
    };
    Err(PushError::Rejected {
        provider: "apns",
        status,
        reason,
        class,
        retry_after,
    })
}

/// Sends to APNs over one pooled HTTP/2 connection (multiplexed).
pub struct ApnsProvider {
    team_id: String,
    key_id: String,
    topic: HeaderValue,
    base: String,
    ttl_secs: u64,
    timeout: Duration,
    key: Es256Key,
    /// The current provider token and when it was made (Unix seconds).
    token: Mutex<Option<(String, u64)>>,
    client: HttpsClient,
}

impl ApnsProvider {
    /// Reads the `.p8` key at `cfg.key_path`.
    pub fn new(cfg: &ApnsConfig) -> Result<Self, PushError> {
        let pem = std::fs::read_to_string(&cfg.key_path)
            .map_err(|e| PushError::Config(format!("APNs key {}: {e}", cfg.key_path.display())))?;
        Self::with_key_pem(cfg, &pem)
    }

    /// With the key given as PEM (`cfg.key_path` is not read).
    pub fn with_key_pem(cfg: &ApnsConfig, pem: &str) -> Result<Self, PushError> {
        let key = Es256Key::from_pem(pem).map_err(|source| PushError::Key {
            provider: "APNs",
            source,
        })?;
        if cfg.team_id.is_empty() || cfg.key_id.is_empty() {
            return Err(PushError::Config(
                "APNs team_id and key_id are required".into(),
            ));
        }
        let topic = HeaderValue::from_str(&cfg.topic)
            .ok()
            .filter(|_| !cfg.topic.is_empty())
            .ok_or_else(|| PushError::Config(format!("APNs topic {:?}", cfg.topic)))?;
        let base = match &cfg.endpoint {
            Some(e) => e.trim_end_matches('/').to_owned(),
            None if cfg.sandbox => APNS_HOST_SANDBOX.to_owned(),
            None => APNS_HOST_PRODUCTION.to_owned(),
        };
        format!("{base}/3/device/00")
            .parse::<Uri>()
            .map_err(|e| PushError::Config(format!("APNs endpoint {base:?}: {e}")))?;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        Ok(ApnsProvider {
            team_id: cfg.team_id.clone(),
            key_id: cfg.key_id.clone(),
            topic,
            base,
            ttl_secs: cfg.ttl_secs,
            timeout,
            key,
            token: Mutex::new(None),
            client: http::client(true, timeout)?,
        })
    }

    /// Scheme and host requests go to (`https://api.push.apple.com` by default).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The provider token (`{"alg":"ES256","kid":key_id}.{"iss":team_id,"iat":…}`), reused until
    /// it is [`APNS_TOKEN_REFRESH_SECS`] old.
    pub fn provider_token(&self, now: u64) -> Result<String, PushError> {
        let mut t = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((jwt, iat)) = &*t {
            if now >= *iat && now - iat < APNS_TOKEN_REFRESH_SECS {
                return Ok(jwt.clone());
            }
        }
        let jwt = self
            .key
            .sign(
                &serde_json::json!({ "alg": "ES256", "kid": self.key_id }),
                &serde_json::json!({ "iss": self.team_id, "iat": now }),
            )
            .map_err(|source| PushError::Key {
                provider: "APNs",
                source,
            })?;
        *t = Some((jwt.clone(), now));
        Ok(jwt)
    }

    /// Forgets the provider token (APNs called it expired or invalid).
    pub fn invalidate_token(&self) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The request for `n` at `now` (Unix seconds).
    pub fn build_request(
        &self,
        n: &PushNotification,
        now: u64,
    ) -> Result<Request<Full<Bytes>>, PushError> {
        let t = &n.token;
        if t.is_empty() || t.len() > MAX_TOKEN_HEX || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PushError::bad_token(format!(
                "APNs device token must be 1..={MAX_TOKEN_HEX} hex digits"
            )));
        }
        let payload = apns_payload(n)?;
        let jwt = self.provider_token(now)?;
        Request::builder()
            .method(Method::POST)
            .uri(format!("{}/3/device/{}", self.base, t))
            .header(AUTHORIZATION, format!("bearer {jwt}"))
            .header("apns-topic", self.topic.clone())
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", (now + self.ttl_secs).to_string())
            // A retry after a lost answer replaces rather than duplicates the notification.
            .header("apns-collapse-id", n.msg_id.0.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| PushError::invalid(format!("APNs request: {e}")))
    }

    async fn send_one(&self, n: &PushNotification) -> Result<(), PushError> {
        let req = self.build_request(n, now_secs())?;
        let a = http::execute(&self.client, req, self.timeout).await?;
        let r = classify_apns_response(a.status.as_u16(), &a.body, a.retry_after());
        if let Err(PushError::Rejected {
            status: 403,
            reason,
            ..
        }) = &r
        {
            if reason == "ExpiredProviderToken" || reason == "InvalidProviderToken" {
                self.invalidate_token();
            }
        }
        r
    }
}

impl PushProvider for ApnsProvider {
    fn send<'a>(
        &'a self,
        n: &'a PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + 'a>> {
        Box::pin(self.send_one(n))
    }
}
