//! FCM HTTP v1: an OAuth2 access token from a service-account RS256 assertion (RFC 7523), then
//! `POST https://fcm.googleapis.com/v1/projects/<project>/messages:send` per notification.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};

use super::http::{self, HttpsClient};
use super::jwt::Rs256Key;
use super::{
    fit_preview, now_secs, thread_key, ErrorClass, FcmConfig, PushError, PushNotification,
    PushProvider,
};

pub const FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// OAuth2 scope of the FCM send API.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Largest message body sent (FCM's payload limit is 4096 bytes).
pub const FCM_MAX_PAYLOAD: usize = 4096;
/// Lifetime asked for the assertion (Google's maximum).
const ASSERTION_TTL_SECS: u64 = 3600;
/// An access token is renewed this long before it expires.
const ACCESS_TOKEN_MARGIN_SECS: u64 = 60;
const DEFAULT_BODY: &str = "New message";

/// The fields of a Google service-account key file that are used.
#[derive(Clone, serde::Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    /// PKCS#8 PEM.
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default)]
    pub token_uri: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

/// The `messages:send` body for `n` (at most [`FCM_MAX_PAYLOAD`] bytes; the preview is cut to
/// fit). `data` values are strings, as FCM requires:
///
/// ```json
/// {"message":{"token":"…","notification":{"body":"hi"},
///   "data":{"v":"1","msg_id":"…","from":"7","conv":"1","to":"42","unread":"3"},
///   "android":{"priority":"HIGH","ttl":"86400s","collapse_key":"…","notification":{"notification_count":3}},
///   "apns":{"headers":{"apns-priority":"10","apns-collapse-id":"…"},
///           "payload":{"aps":{"badge":3,"sound":"default","mutable-content":1,"thread-id":"u7"}}}}}
/// ```
pub fn fcm_message(n: &PushNotification, ttl_secs: u64) -> Result<Vec<u8>, PushError> {
    if n.token.is_empty() {
        return Err(PushError::bad_token("empty FCM registration token"));
    }
    let msg_id = n.msg_id.0.to_string();
    let thread = thread_key(n);
    let build = |preview: &str| {
        let body = if preview.is_empty() {
            DEFAULT_BODY
        } else {
            preview
        };
        let v = serde_json::json!({
            "message": {
                "token": n.token,
                "notification": { "body": body },
                "data": {
                    "v": "1",
                    "msg_id": msg_id,
                    "from": n.from.0.to_string(),
                    "conv": n.conv.to_string(),
                    "to": n.to.to_string(),
                    "unread": n.unread.to_string(),
                },
                "android": {
                    "priority": "HIGH",
                    "ttl": format!("{ttl_secs}s"),
                    "collapse_key": msg_id,
                    "notification": { "notification_count": n.unread },
                },
                "apns": {
                    "headers": { "apns-priority": "10", "apns-collapse-id": msg_id },
                    "payload": { "aps": {
                        "badge": n.unread,
                        "sound": "default",
                        "mutable-content": 1,
                        "thread-id": thread,
                    } },
                },
            }
        });
        serde_json::to_vec(&v).expect("a JSON value serializes")
    };
    fit_preview(&n.preview, FCM_MAX_PAYLOAD, build)
}

/// Classifies an answer of `messages:send`: `Ok` for 2xx, else the error with its class, from
/// the `FcmError` `errorCode` of `error.details` or else `error.status` (see `docs/PUSH.md`).
pub fn classify_fcm_response(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(), PushError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let err = &v["error"];
    let fcm_code = err["details"].as_array().and_then(|d| {
        d.iter()
            .find(|x| {
                x["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))
            })
            .and_then(|x| x["errorCode"].as_str())
    });
    let code = fcm_code.or(err["status"].as_str()).unwrap_or("");
    let message = err["message"].as_str().unwrap_or("");
    let class = match code {
        "UNREGISTERED" | "SENDER_ID_MISMATCH" => ErrorClass::TokenInvalid,
        "INVALID_ARGUMENT" if message.to_ascii_lowercase().contains("registration token") => {
            ErrorClass::TokenInvalid
        }
        "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" => ErrorClass::Retryable,
        // The access token expired or was revoked: a new one is fetched for the retry.
        "UNAUTHENTICATED" => ErrorClass::Retryable,
        "THIRD_PARTY_AUTH_ERROR" | "INVALID_ARGUMENT" | "PERMISSION_DENIED" | "NOT_FOUND" => {
            ErrorClass::Permanent
        }
        _ if status == 408 || status == 429 || status >= 500 => ErrorClass::Retryable,
        _ => ErrorClass::Permanent,
    };
    let reason = match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code.to_owned(),
        _ => http::snippet(body),
    };
    Err(PushError::Rejected {
        provider: "fcm",
        status,
        reason,
        class,
        retry_after,
    })
}

/// Parses the token endpoint's answer at `now`: the access token and when it expires.
pub fn parse_token_answer(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    now: u64,
) -> Result<(String, u64), PushError> {
    if !(200..300).contains(&status) {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let reason = match (v["error"].as_str(), v["error_description"].as_str()) {
            (Some(e), Some(d)) => format!("{e}: {d}"),
            (Some(e), None) => e.to_owned(),
            _ => http::snippet(body),
        };
        return Err(PushError::from_status(
            "google-oauth",
            status,
            reason,
            retry_after,
        ));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| PushError::Rejected {
        provider: "google-oauth",
        status,
        reason: format!("unreadable token answer: {e}"),
        class: ErrorClass::Retryable,
        retry_after: None,
    })?;
    Ok((
        a.access_token,
        now + a.expires_in.unwrap_or(ASSERTION_TTL_SECS),
    ))
}

/// Sends to FCM; the access token is cached and renewed (one request at a time) a minute
/// before it expires or after FCM answers 401.
pub struct FcmProvider {
    project_id: String,
    send_uri: Uri,
    token_uri: Uri,
    client_email: String,
    key_id: Option<String>,
    key: Rs256Key,
    ttl_secs: u64,
    timeout: Duration,
    client: HttpsClient,
    /// `(access token, expires at (Unix seconds))`.
    access: tokio::sync::Mutex<Option<(String, u64)>>,
}

impl FcmProvider {
    /// Reads the service-account file at `cfg.service_account_path`.
    pub fn new(cfg: &FcmConfig) -> Result<Self, PushError> {
        let path = cfg.service_account_path.display();
        let raw = std::fs::read(&cfg.service_account_path)
            .map_err(|e| PushError::Config(format!("FCM service account {path}: {e}")))?;
        let sa: ServiceAccount = serde_json::from_slice(&raw)
            .map_err(|e| PushError::Config(format!("FCM service account {path}: {e}")))?;
        Self::with_service_account(cfg, sa)
    }

    /// With the service account given (`cfg.service_account_path` is not read).
    pub fn with_service_account(cfg: &FcmConfig, sa: ServiceAccount) -> Result<Self, PushError> {
        let key = Rs256Key::from_pem(&sa.private_key).map_err(|source| PushError::Key {
            provider: "FCM service account",
            source,
        })?;
        let project_id = cfg
            .project_id
            .clone()
            .or(sa.project_id)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                PushError::Config("FCM project_id missing (config or service account)".into())
            })?;
        if sa.client_email.is_empty() {
            return Err(PushError::Config(
                "FCM service account without client_email".into(),
            ));
        }
        let base = cfg
            .endpoint
            .as_deref()
            .unwrap_or(FCM_ENDPOINT)
            .trim_end_matches('/');
        let send_uri = format!("{base}/v1/projects/{project_id}/messages:send")
            .parse::<Uri>()
            .map_err(|e| PushError::Config(format!("FCM endpoint / project id: {e}")))?;
        let token_uri = cfg
            .token_uri
            .clone()
            .or(sa.token_uri)
            .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned());
        let token_uri = token_uri
            .parse::<Uri>()
            .map_err(|e| PushError::Config(format!("FCM token_uri {token_uri:?}: {e}")))?;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        Ok(FcmProvider {
            project_id,
            send_uri,
            token_uri,
            client_email: sa.client_email,
            key_id: sa.private_key_id,
            key,
            ttl_secs: cfg.ttl_secs,
            timeout,
            client: http::client(false, timeout)?,
            access: tokio::sync::Mutex::new(None),
        })
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// `…/v1/projects/<project>/messages:send`.
    pub fn send_uri(&self) -> &Uri {
        &self.send_uri
    }

    pub fn token_uri(&self) -> &Uri {
        &self.token_uri
    }

    /// The signed assertion at `now`: header `{"alg":"RS256","typ":"JWT","kid":private_key_id}`,
    /// claims `{"iss":client_email,"scope":FCM_SCOPE,"aud":token_uri,"iat":now,"exp":now+3600}`.
    pub fn assertion(&self, now: u64) -> Result<String, PushError> {
        let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri.to_string(),
            "iat": now,
            "exp": now + ASSERTION_TTL_SECS,
        });
        self.key
            .sign(&header, &claims)
            .map_err(|source| PushError::Key {
                provider: "FCM",
                source,
            })
    }

    /// The token request at `now`: a form POST with the JWT-bearer grant (RFC 7523).
    pub fn token_request(&self, now: u64) -> Result<Request<Full<Bytes>>, PushError> {
        // A JWT is made of base64url and dots: nothing to percent-encode.
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
            self.assertion(now)?
        );
        Request::builder()
            .method(Method::POST)
            .uri(self.token_uri.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PushError::Config(format!("token request: {e}")))
    }

    /// The `messages:send` request for `n` with `access_token`.
    pub fn build_request(
        &self,
        n: &PushNotification,
        access_token: &str,
    ) -> Result<Request<Full<Bytes>>, PushError> {
        let body = fcm_message(n, self.ttl_secs)?;
        Request::builder()
            .method(Method::POST)
            .uri(self.send_uri.clone())
            .header(AUTHORIZATION, format!("Bearer {access_token}"))
            .header(CONTENT_TYPE, "application/json; charset=UTF-8")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PushError::Config(format!("FCM request: {e}")))
    }

    /// A valid access token: the cached one, or a new one from the token endpoint (concurrent
    /// callers wait for that one request).
    pub async fn access_token(&self) -> Result<String, PushError> {
        let mut cached = self.access.lock().await;
        let now = now_secs();
        if let Some((t, exp)) = &*cached {
            if now + ACCESS_TOKEN_MARGIN_SECS < *exp {
                return Ok(t.clone());
            }
        }
        let req = self.token_request(now)?;
        let a = http::execute(&self.client, req, self.timeout).await?;
        let (token, exp) = parse_token_answer(a.status.as_u16(), &a.body, a.retry_after(), now)?;
        tracing::debug!(
            expires_in = exp.saturating_sub(now),
            "FCM access token renewed"
        );
        *cached = Some((token.clone(), exp));
        Ok(token)
    }

    /// Forgets the cached access token if it is still `token`.
    async fn invalidate(&self, token: &str) {
        let mut cached = self.access.lock().await;
        if cached.as_ref().is_some_and(|(t, _)| t == token) {
            *cached = None;
        }
    }

    async fn send_one(&self, n: &PushNotification) -> Result<(), PushError> {
        // Check the message before spending a token request on it.
        fcm_message(n, self.ttl_secs)?;
        let token = self.access_token().await?;
        let req = self.build_request(n, &token)?;
        let a = http::execute(&self.client, req, self.timeout).await?;
        let r = classify_fcm_response(a.status.as_u16(), &a.body, a.retry_after());
        if a.status.as_u16() == 401 {
            self.invalidate(&token).await;
        }
        r
    }
}

impl PushProvider for FcmProvider {
    fn send<'a>(
        &'a self,
        n: &'a PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + 'a>> {
        Box::pin(self.send_one(n))
    }
}
