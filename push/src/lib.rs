//! Offline push notifications: the delivery side.
//!
//! The logic workers detect messages that no device of a recipient acknowledged within
//! [`PushConfig::delay_ms`], look up the recipient's push tokens and mutes, and hand one
//! [`PushNotification`] per token to [`PushDispatcher::submit`]. The dispatcher runs on its own
//! thread with its own tokio runtime: a bounded queue (a full queue drops and counts), bounded
//! concurrency, retries with exponential backoff and jitter for retryable errors, and counters
//! ([`PushStats`], [`PushDispatcher::metrics`]).
//!
//! Providers ([`PushProvider`]):
//!
//! * [`WebhookProvider`] (`PROVIDER_WEBHOOK`): JSON POST to the company push gateway, signed with
//!   HMAC-SHA256 when a secret is configured.
//! * [`ApnsProvider`] (`PROVIDER_APNS`): the HTTP/2 APNs provider API with an ES256 provider
//!   token (JWT).
//! * [`FcmProvider`] (`PROVIDER_FCM`): FCM HTTP v1 with an OAuth2 access token obtained with an
//!   RS256 service-account assertion (JWT).
//!
//! Contracts, config sample and limits: `docs/PUSH.md`.

mod apns;
mod dispatcher;
mod fcm;
mod http;
pub mod jwt;
mod webhook;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use im_shared::{MsgId, UserId};

pub use apns::{
    apns_payload, classify_apns_response, ApnsProvider, APNS_HOST_PRODUCTION, APNS_HOST_SANDBOX,
    APNS_MAX_PAYLOAD, APNS_TOKEN_REFRESH_SECS,
};
pub use dispatcher::{DispatchOptions, InvalidTokenHook, PushDispatcher, PushStats};
pub use fcm::{
    classify_fcm_response, fcm_message, parse_token_answer, FcmProvider, ServiceAccount,
    FCM_ENDPOINT, FCM_MAX_PAYLOAD, FCM_SCOPE, GOOGLE_TOKEN_URI,
};
pub use webhook::{
    webhook_body, WebhookProvider, WEBHOOK_HEADER_SIGNATURE, WEBHOOK_MAX_PREVIEW,
    WEBHOOK_PAYLOAD_VERSION,
};

/// Apple Push Notification service.
pub const PROVIDER_APNS: u8 = 1;
/// Firebase Cloud Messaging.
pub const PROVIDER_FCM: u8 = 2;
/// The company push gateway (webhook).
pub const PROVIDER_WEBHOOK: u8 = 3;

/// Name of a provider id for logs and metric labels.
pub fn provider_name(provider: u8) -> &'static str {
    match provider {
        PROVIDER_APNS => "apns",
        PROVIDER_FCM => "fcm",
        PROVIDER_WEBHOOK => "webhook",
        _ => "unknown",
    }
}

/// One notification to one device token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushNotification {
    /// The recipient.
    pub uid: UserId,
    pub device_id: String,
    /// Which provider the token belongs to ([`PROVIDER_APNS`], [`PROVIDER_FCM`],
    /// [`PROVIDER_WEBHOOK`]).
    pub provider: u8,
    /// APNs device token (hex), FCM registration token, or the gateway's device key.
    pub token: String,
    pub msg_id: MsgId,
    pub from: UserId,
    /// `im_shared::proto::CONV_*` of the message.
    pub conv: u8,
    /// Peer user or group id.
    pub to: u64,
    /// Short text preview (may be empty); each provider cuts it to fit its payload limit.
    pub preview: String,
    /// Badge count hint.
    pub unread: u32,
}

/// The `[push]` table of the server config. Every field is optional (`#[serde(default)]`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct PushConfig {
    /// How long a message may stay unacknowledged by every device before a push (ms).
    pub delay_ms: u64,
    /// The company push gateway.
    pub webhook: Option<WebhookConfig>,
    /// Apple Push Notification service.
    pub apns: Option<ApnsConfig>,
    /// Firebase Cloud Messaging (HTTP v1).
    pub fcm: Option<FcmConfig>,
    /// Notifications waiting for a sender; when full, new ones are dropped and counted.
    pub queue: usize,
    /// Notifications being sent (or waiting for a retry) at once.
    pub concurrency: usize,
    /// Attempts per notification for retryable errors (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry (ms); doubles per attempt, with jitter.
    pub retry_base_ms: u64,
    /// Longest delay between two attempts (ms).
    pub retry_max_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            delay_ms: 5000,
            webhook: None,
            apns: None,
            fcm: None,
            queue: 100_000,
            concurrency: 64,
            max_attempts: 4,
            retry_base_ms: 500,
            retry_max_ms: 10_000,
        }
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_ttl_secs() -> u64 {
    86_400
}

/// The company push gateway. (`Debug` does not print `auth_header` and `secret`.)
#[derive(Clone, serde::Deserialize)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the notifications are POSTed to.
    pub url: String,
    /// Value of the `Authorization` header sent with every POST (e.g. `Bearer <key>`).
    #[serde(default)]
    pub auth_header: Option<String>,
    /// HMAC-SHA256 key: every body is signed in `X-IM-Signature: sha256=<hex>`.
    #[serde(default)]
    pub secret: Option<String>,
    /// Per attempt, connect to end of the answer (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("auth_header", &redacted(&self.auth_header))
            .field("secret", &redacted(&self.secret))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Apple Push Notification service, token-based (`.p8` key) authentication.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ApnsConfig {
    /// Apple developer team id (`iss` of the provider token).
    pub team_id: String,
    /// Id of the signing key (`kid` of the provider token).
    pub key_id: String,
    /// The `AuthKey_<key_id>.p8` file (PKCS#8 PEM, P-256).
    pub key_path: PathBuf,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// `api.sandbox.push.apple.com` (development builds) instead of `api.push.apple.com`.
    #[serde(default)]
    pub sandbox: bool,
    /// Base URL overriding the Apple host (a proxy, or a local HTTP/2 test server with
    /// `http://`, spoken with prior knowledge).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Per attempt (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long APNs keeps trying to deliver (`apns-expiration` = now + this).
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
}

/// Firebase Cloud Messaging HTTP v1 with a service account.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct FcmConfig {
    /// Firebase project id; default: `project_id` of the service-account file.
    #[serde(default)]
    pub project_id: Option<String>,
    /// The service-account JSON key file downloaded from the Google Cloud console.
    pub service_account_path: PathBuf,
    /// Base URL overriding `https://fcm.googleapis.com` (proxy or test server).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Token endpoint overriding the `token_uri` of the service account.
    #[serde(default)]
    pub token_uri: Option<String>,
    /// Per attempt (ms), for the token request and the send alike.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long FCM keeps the message for an offline Android device (`android.ttl`).
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
}

/// Sends one notification. Implementations must be cheap to call concurrently.
pub trait PushProvider: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        n: &'a PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + 'a>>;
}

/// How an error answer is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (5xx, 429, expired credentials): retried with backoff.
    Retryable,
    /// This notification cannot succeed (4xx, payload refused): not retried.
    Permanent,
    /// The device token is invalid or unregistered: not retried, and the token should be
    /// dropped.
    TokenInvalid,
}

/// A failed send.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Connect, TLS, or the connection broke before an answer. Retryable.
    #[error("transport: {0}")]
    Transport(String),
    /// No complete answer within the timeout. Retryable.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The provider answered with an error status.
    #[error("{provider} answered {status}: {reason}")]
    Rejected {
        provider: &'static str,
        status: u16,
        /// The provider's reason code (APNs `reason`, FCM `errorCode`/`status`) or a snippet
        /// of the body.
        reason: String,
        class: ErrorClass,
        /// From a `Retry-After: <seconds>` header.
        retry_after: Option<Duration>,
    },
    /// The notification cannot be sent as is (malformed token, payload over the limit).
    /// Permanent; `token_invalid` when the token itself is malformed.
    #[error("invalid notification: {reason}")]
    Invalid { reason: String, token_invalid: bool },
    /// The provider is misconfigured (key, credentials, URL). Permanent.
    #[error("provider config: {0}")]
    Config(String),
    /// The provider's signing key cannot be loaded or cannot sign. Permanent.
    #[error("{provider} key")]
    Key {
        provider: &'static str,
        #[source]
        source: crate::jwt::JwtError,
    },
}

impl PushError {
    /// Worth another attempt after a backoff.
    pub fn is_retryable(&self) -> bool {
        match self {
            PushError::Transport(_) | PushError::Timeout(_) => true,
            PushError::Rejected { class, .. } => *class == ErrorClass::Retryable,
            PushError::Invalid { .. } | PushError::Config(_) | PushError::Key { .. } => false,
        }
    }

    /// The token is invalid or unregistered: the caller should drop it.
    pub fn token_invalid(&self) -> bool {
        match self {
            PushError::Rejected { class, .. } => *class == ErrorClass::TokenInvalid,
            PushError::Invalid { token_invalid, .. } => *token_invalid,
            _ => false,
        }
    }

    /// The provider's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PushError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status of a rejection.
    pub fn status(&self) -> Option<u16> {
        match self {
            PushError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Default classification by status: 408, 429 and 5xx retryable, other statuses permanent.
    pub fn from_status(
        provider: &'static str,
        status: u16,
        reason: String,
        retry_after: Option<Duration>,
    ) -> PushError {
        let class = if status == 408 || status == 429 || status >= 500 {
            ErrorClass::Retryable
        } else {
            ErrorClass::Permanent
        };
        PushError::Rejected {
            provider,
            status,
            reason,
            class,
            retry_after,
        }
    }

    fn invalid(reason: impl Into<String>) -> PushError {
        PushError::Invalid {
            reason: reason.into(),
            token_invalid: false,
        }
    }

    fn bad_token(reason: impl Into<String>) -> PushError {
        PushError::Invalid {
            reason: reason.into(),
            token_invalid: true,
        }
    }
}

/// Thread id of a notification for grouping on the device: `g<group>` for group messages and
/// mentions in a group, else `u<sender>`.
fn thread_key(n: &PushNotification) -> String {
    if n.conv == im_shared::proto::CONV_C2G || n.conv == im_shared::proto::CONV_MENTION {
        format!("g{}", n.to)
    } else {
        format!("u{}", n.from.0)
    }
}

/// Builds a JSON payload with `preview` cut (at a char boundary, with `…`) to the longest
/// prefix for which the payload is at most `limit` bytes. `build` gets the preview to use.
fn fit_preview(
    preview: &str,
    limit: usize,
    mut build: impl FnMut(&str) -> Vec<u8>,
) -> Result<Vec<u8>, PushError> {
    let body = build(preview);
    if body.len() <= limit {
        return Ok(body);
    }
    // Char boundaries of the prefixes worth trying (a prefix longer than `limit` never fits).
    let bounds: Vec<usize> = preview
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|&i| i <= limit)
        .collect();
    // The payload grows with the prefix: binary search for the longest prefix that fits.
    let (mut lo, mut hi) = (0usize, bounds.len()); // bounds[..lo] fit, bounds[hi..] do not
    let mut best = None;
    while lo < hi {
        let mid = (lo + hi) / 2;
        let k = bounds[mid];
        let cut = if k == 0 {
            String::new()
        } else {
            format!("{}…", &preview[..k])
        };
        let body = build(&cut);
        if body.len() <= limit {
            best = Some(body);
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    best.ok_or_else(|| {
        PushError::invalid(format!(
            "payload of {} bytes without preview exceeds {limit}",
            build("").len()
        ))
    })
}

/// `s` cut to at most `max` bytes at a char boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    &s[..floor_char_boundary(s, max)]
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_toml_shape() {
        let c = PushConfig::default();
        assert_eq!(c.delay_ms, 5000);
        assert_eq!(c.queue, 100_000);
        let c: PushConfig = serde_json::from_value(serde_json::json!({
            "delay_ms": 3000,
            "webhook": {"url": "http://127.0.0.1:9000/push", "secret": "s"},
            "apns": {"team_id": "T", "key_id": "K", "key_path": "/k.p8", "topic": "com.x"},
            "fcm": {"service_account_path": "/sa.json"}
        }))
        .unwrap();
        assert_eq!(c.delay_ms, 3000);
        assert_eq!(c.queue, 100_000, "missing fields take the defaults");
        let w = c.webhook.unwrap();
        assert_eq!(w.timeout_ms, 10_000);
        assert!(w.auth_header.is_none());
        let a = c.apns.unwrap();
        assert!(!a.sandbox);
        assert_eq!(a.ttl_secs, 86_400);
        assert!(c.fcm.unwrap().project_id.is_none());
        let w = WebhookConfig {
            url: "http://gw/".into(),
            auth_header: Some("Bearer k3y".into()),
            secret: Some("s3cret".into()),
            timeout_ms: 1,
        };
        let d = format!("{w:?}");
        assert!(
            !d.contains("k3y") && !d.contains("s3cret") && d.contains("http://gw/"),
            "{d}"
        );
    }

    #[test]
    fn error_classes() {
        let e = PushError::from_status("x", 503, "down".into(), Some(Duration::from_secs(2)));
        assert!(e.is_retryable() && !e.token_invalid());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(PushError::from_status("x", 429, String::new(), None).is_retryable());
        assert!(PushError::from_status("x", 408, String::new(), None).is_retryable());
        let e = PushError::from_status("x", 400, String::new(), None);
        assert!(!e.is_retryable() && !e.token_invalid());
        assert_eq!(e.status(), Some(400));
        assert!(PushError::Transport("reset".into()).is_retryable());
        assert!(PushError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(PushError::bad_token("x").token_invalid());
        assert!(!PushError::bad_token("x").is_retryable());
        assert!(!PushError::Config("x".into()).is_retryable());
    }

    #[test]
    fn fit_preview_cuts_at_char_boundaries() {
        let build = |p: &str| serde_json::to_vec(&serde_json::json!({ "p": p })).unwrap();
        // Fits: unchanged.
        assert_eq!(fit_preview("hello", 100, build).unwrap(), build("hello"));
        // Multi-byte chars and escapes are cut so that the whole JSON fits.
        for preview in ["é".repeat(500), "\u{1}".repeat(500), "😀".repeat(300)] {
            for limit in [20usize, 50, 333, 1000] {
                let out = fit_preview(&preview, limit, build).unwrap();
                assert!(out.len() <= limit, "{} > {limit}", out.len());
                let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
                let p = v["p"].as_str().unwrap();
                assert!(p.is_empty() || p.ends_with('…'));
            }
        }
        // Nothing fits.
        assert!(fit_preview("abc", 3, build).is_err());
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(truncate_str("héllo", 99), "héllo");
    }
}
