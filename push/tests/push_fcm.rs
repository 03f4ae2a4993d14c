//! FCM provider: the service-account assertion (RS256, verified with the fixture's public key
//! from OpenSSL), the token and send requests, error classification, and the full flow (token
//! endpoint + messages:send, token cache, 401 renewal) against a local server.

mod push_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use im_push::jwt::b64_decode;
use im_push::{
    classify_fcm_response, fcm_message, FcmConfig, FcmProvider, PushDispatcher, PushError,
    PushProvider, ServiceAccount, FCM_MAX_PAYLOAD, FCM_SCOPE, PROVIDER_FCM,
};
use push_support::{notification, split_jwt, wait_until, Recorded, Reply, TestServer};
use ring::signature::{self, UnparsedPublicKey};

/// TEST ONLY RSA key (PKCS#8) and its public key (PKCS#1 DER, base64) as printed by OpenSSL.
const KEY_PEM: &str = include_str!("push_fixtures/fcm_test_key.pem");
const PUBLIC_B64: &str = include_str!("push_fixtures/fcm_test_pubkey_pkcs1.der.b64");
const FCM_TOKEN: &str = "dGVzdC1mY20tdG9rZW4:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

fn account(token_uri: Option<&str>) -> ServiceAccount {
    serde_json::from_value(serde_json::json!({
        "type": "service_account",
        "project_id": "chat-prod",
        "private_key_id": "0123456789abcdef",
        "private_key": KEY_PEM,
        "client_email": "push@chat-prod.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri.unwrap_or("https://oauth2.googleapis.com/token"),
    }))
    .unwrap()
}

fn cfg() -> FcmConfig {
    FcmConfig {
        project_id: None,
        service_account_path: "/nonexistent.json".into(),
        endpoint: None,
        token_uri: None,
        timeout_ms: 5000,
        ttl_secs: 600,
    }
}

fn verify_rs256(jwt: &str) {
    let (_, _, input, sig) = split_jwt(jwt);
    let public = b64_decode(PUBLIC_B64).unwrap();
    UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &public)
        .verify(input.as_bytes(), &sig)
        .expect("RS256 signature verifies with the OpenSSL public key");
}

#[test]
fn push_fcm_assertion_is_a_valid_rs256_jwt() {
    let p = FcmProvider::with_service_account(&cfg(), account(None)).unwrap();
    let now = 1_700_000_000;
    let jwt = p.assertion(now).unwrap();
    let (header, claims, _, sig) = split_jwt(&jwt);
    assert_eq!(
        header,
        serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "0123456789abcdef"})
    );
    assert_eq!(
        claims,
        serde_json::json!({
            "iss": "push@chat-prod.iam.gserviceaccount.com",
            "scope": FCM_SCOPE,
            "aud": "https://oauth2.googleapis.com/token",
            "iat": now,
            "exp": now + 3600,
        })
    );
    assert_eq!(sig.len(), 256, "RSA-2048 signature");
    verify_rs256(&jwt);
    // PKCS#1 v1.5 is deterministic: the same input signs the same.
    assert_eq!(p.assertion(now).unwrap(), jwt);
}

#[tokio::test]
async fn push_fcm_token_request() {
    let p = FcmProvider::with_service_account(&cfg(), account(None)).unwrap();
    let req = p.token_request(1000).unwrap();
    assert_eq!(req.method(), "POST");
    assert_eq!(req.uri(), "https://oauth2.googleapis.com/token");
    assert_eq!(
        req.headers()["content-type"],
        "application/x-www-form-urlencoded"
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body = std::str::from_utf8(&body).unwrap();
    let form: Vec<(&str, &str)> = body
        .split('&')
        .map(|kv| kv.split_once('=').unwrap())
        .collect();
    assert_eq!(form.len(), 2);
    assert_eq!(
        form[0],
        (
            "grant_type",
            "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        )
    );
    assert_eq!(form[1].0, "assertion");
    verify_rs256(form[1].1);
    assert_eq!(split_jwt(form[1].1).1["iat"], 1000);
}

#[tokio::test]
async fn push_fcm_send_request() {
    let p = FcmProvider::with_service_account(&cfg(), account(None)).unwrap();
    assert_eq!(p.project_id(), "chat-prod");
    let n = notification(PROVIDER_FCM, FCM_TOKEN, "hello");
    let req = p.build_request(&n, "ya29.access").unwrap();
    assert_eq!(req.method(), "POST");
    assert_eq!(
        req.uri(),
        "https://fcm.googleapis.com/v1/projects/chat-prod/messages:send"
    );
    assert_eq!(req.headers()["authorization"], "Bearer ya29.access");
    assert_eq!(
        req.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"message": {
            "token": FCM_TOKEN,
            "notification": {"body": "hello"},
            "data": {
                "v": "1", "msg_id": "1234567890123456789", "from": "7", "conv": "1",
                "to": "42", "unread": "3",
            },
            "android": {
                "priority": "HIGH",
                "ttl": "600s",
                "collapse_key": "1234567890123456789",
                "notification": {"notification_count": 3},
            },
            "apns": {
                "headers": {"apns-priority": "10", "apns-collapse-id": "1234567890123456789"},
                "payload": {"aps": {
                    "badge": 3, "sound": "default", "mutable-content": 1, "thread-id": "u7",
                }},
            },
        }})
    );
    // Every data value is a string (FCM refuses others).
    assert!(v["message"]["data"]
        .as_object()
        .unwrap()
        .values()
        .all(|x| x.is_string()));
}

#[test]
fn push_fcm_project_and_uris() {
    // Config overrides the service account.
    let mut c = cfg();
    c.project_id = Some("other".into());
    c.endpoint = Some("http://127.0.0.1:1/".into());
    c.token_uri = Some("http://127.0.0.1:1/token".into());
    let p = FcmProvider::with_service_account(&c, account(None)).unwrap();
    assert_eq!(p.project_id(), "other");
    assert_eq!(
        p.send_uri(),
        "http://127.0.0.1:1/v1/projects/other/messages:send"
    );
    assert_eq!(p.token_uri(), "http://127.0.0.1:1/token");
    // No project anywhere: refused.
    let mut sa = account(None);
    sa.project_id = None;
    assert!(matches!(
        FcmProvider::with_service_account(&cfg(), sa),
        Err(PushError::Config(_))
    ));
    // A bad key: refused.
    let mut sa = account(None);
    sa.private_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
    assert!(FcmProvider::with_service_account(&cfg(), sa).is_err());
    // The Debug form does not print the key.
    assert!(!format!("{:?}", account(None)).contains("PRIVATE KEY"));
}

#[test]
fn push_fcm_reads_the_service_account_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(
        &path,
        serde_json::json!({
            "type": "service_account",
            "project_id": "from-file",
            "private_key": KEY_PEM,
            "client_email": "x@from-file.iam.gserviceaccount.com",
        })
        .to_string(),
    )
    .unwrap();
    let mut c = cfg();
    c.service_account_path = path;
    let p = FcmProvider::new(&c).unwrap();
    assert_eq!(p.project_id(), "from-file");
    assert_eq!(p.token_uri(), "https://oauth2.googleapis.com/token");
    let (h, _, _, _) = split_jwt(&p.assertion(1).unwrap());
    assert!(h.get("kid").is_none(), "no private_key_id: no kid");
    assert!(FcmProvider::new(&cfg()).is_err(), "missing file");
}

#[test]
fn push_fcm_payload_limit_and_empty_token() {
    let mut n = notification(PROVIDER_FCM, FCM_TOKEN, &"ü".repeat(5000));
    let out = fcm_message(&n, 60).unwrap();
    assert!(out.len() <= FCM_MAX_PAYLOAD);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v["message"]["notification"]["body"]
        .as_str()
        .unwrap()
        .ends_with('…'));
    n.preview.clear();
    let v: serde_json::Value = serde_json::from_slice(&fcm_message(&n, 60).unwrap()).unwrap();
    assert_eq!(v["message"]["notification"]["body"], "New message");
    n.token.clear();
    assert!(fcm_message(&n, 60).unwrap_err().token_invalid());
}

fn fcm_error(status: u16, code: &str, message: &str, fcm_code: Option<&str>) -> Vec<u8> {
    let mut details = Vec::new();
    if let Some(c) = fcm_code {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": c,
        }));
    }
    serde_json::json!({"error": {
        "code": status, "message": message, "status": code, "details": details,
    }})
    .to_string()
    .into_bytes()
}

#[test]
fn push_fcm_error_classification() {
    assert!(classify_fcm_response(200, br#"{"name":"projects/p/messages/1"}"#, None).is_ok());
    let c = |status, code, message, fcm| {
        classify_fcm_response(status, &fcm_error(status, code, message, fcm), None).unwrap_err()
    };
    // Token invalid: drop it.
    for e in [
        c(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            Some("UNREGISTERED"),
        ),
        c(
            403,
            "PERMISSION_DENIED",
            "SenderId mismatch",
            Some("SENDER_ID_MISMATCH"),
        ),
        c(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            Some("INVALID_ARGUMENT"),
        ),
    ] {
        assert!(e.token_invalid() && !e.is_retryable(), "{e}");
    }
    // Retryable.
    for e in [
        c(429, "RESOURCE_EXHAUSTED", "quota", Some("QUOTA_EXCEEDED")),
        c(503, "UNAVAILABLE", "try later", Some("UNAVAILABLE")),
        c(500, "INTERNAL", "oops", Some("INTERNAL")),
        c(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            None,
        ),
    ] {
        assert!(e.is_retryable() && !e.token_invalid(), "{e}");
    }
    // Permanent, token kept.
    for e in [
        c(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.android.ttl'",
            Some("INVALID_ARGUMENT"),
        ),
        c(
            401,
            "UNAUTHENTICATED",
            "APNs auth error",
            Some("THIRD_PARTY_AUTH_ERROR"),
        ),
        c(403, "PERMISSION_DENIED", "no permission", None),
        // A wrong project is a 404 without UNREGISTERED: the token must not be dropped.
        c(404, "NOT_FOUND", "Requested entity was not found.", None),
    ] {
        assert!(!e.is_retryable() && !e.token_invalid(), "{e}");
    }
    // Not JSON: by status, with Retry-After.
    let e = classify_fcm_response(502, b"bad gateway", Some(Duration::from_secs(7))).unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert!(!classify_fcm_response(418, b"", None)
        .unwrap_err()
        .is_retryable());
    let e = c(404, "NOT_FOUND", "gone", Some("UNREGISTERED"));
    assert!(e.to_string().contains("UNREGISTERED"), "{e}");
}

#[test]
fn push_fcm_token_answers() {
    use im_push::FCM_ENDPOINT;
    assert!(FCM_ENDPOINT.starts_with("https://"));
    let parse = im_fcm_parse;
    let (t, exp) = parse(
        200,
        br#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#,
    )
    .unwrap();
    assert_eq!((t.as_str(), exp), ("ya29.x", 1000 + 3599));
    let e = parse(
        400,
        br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
    )
    .unwrap_err();
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("invalid_grant"));
    assert!(parse(503, b"").unwrap_err().is_retryable());
    assert!(parse(200, b"not json").unwrap_err().is_retryable());
}

fn im_fcm_parse(status: u16, body: &[u8]) -> Result<(String, u64), PushError> {
    im_push::parse_token_answer(status, body, None, 1000)
}

/// Google's token endpoint and FCM in one server: `/token` checks the assertion and issues
/// `tok-<n>`; `messages:send` accepts only the latest token, and answers 404 UNREGISTERED for
/// the token `dead`.
struct FakeGoogle {
    issued: AtomicUsize,
    revoked: Mutex<Vec<String>>,
}

fn fake_google(g: Arc<FakeGoogle>) -> push_support::Handler {
    Arc::new(move |r: &Recorded| {
        if r.path == "/token" {
            let body = std::str::from_utf8(&r.body).unwrap();
            let Some(jwt) = body.split("assertion=").nth(1) else {
                return Reply::json(400, serde_json::json!({"error": "invalid_request"}));
            };
            let (_, _, input, sig) = split_jwt(jwt);
            let public = b64_decode(PUBLIC_B64).unwrap();
            if UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &public)
                .verify(input.as_bytes(), &sig)
                .is_err()
            {
                return Reply::json(400, serde_json::json!({"error": "invalid_grant"}));
            }
            let n = g.issued.fetch_add(1, Ordering::SeqCst) + 1;
            return Reply::json(
                200,
                serde_json::json!({"access_token": format!("tok-{n}"), "expires_in": 3599, "token_type": "Bearer"}),
            );
        }
        assert_eq!(r.path, "/v1/projects/chat-prod/messages:send");
        let bearer = r.header("authorization").unwrap_or("").to_owned();
        let current = format!("Bearer tok-{}", g.issued.load(Ordering::SeqCst));
        if bearer != current || g.revoked.lock().unwrap().contains(&bearer) {
            return Reply::json(
                401,
                serde_json::json!({"error": {
                "code": 401, "status": "UNAUTHENTICATED", "message": "invalid credentials"}}),
            );
        }
        if r.json()["message"]["token"] == "dead" {
            return Reply::json(
                404,
                serde_json::json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "not found",
                    "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                 "errorCode": "UNREGISTERED"}]}}),
            );
        }
        Reply::json(
            200,
            serde_json::json!({"name": "projects/chat-prod/messages/1"}),
        )
    })
}

#[tokio::test]
async fn push_fcm_full_flow_against_a_local_server() {
    let g = Arc::new(FakeGoogle {
        issued: AtomicUsize::new(0),
        revoked: Mutex::new(Vec::new()),
    });
    let server = TestServer::start(false, fake_google(g.clone())).await;
    let mut c = cfg();
    c.endpoint = Some(server.url(""));
    let p = Arc::new(
        FcmProvider::with_service_account(&c, account(Some(&server.url("/token")))).unwrap(),
    );
    assert_eq!(
        split_jwt(&p.assertion(1).unwrap()).1["aud"],
        server.url("/token"),
        "aud is the token_uri of the service account"
    );

    // First send fetches a token; the next ones reuse it.
    p.send(&notification(PROVIDER_FCM, FCM_TOKEN, "1"))
        .await
        .unwrap();
    p.send(&notification(PROVIDER_FCM, FCM_TOKEN, "2"))
        .await
        .unwrap();
    assert_eq!(g.issued.load(Ordering::SeqCst), 1);
    let paths: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/token",
            "/v1/projects/chat-prod/messages:send",
            "/v1/projects/chat-prod/messages:send"
        ]
    );

    // Unregistered token: token_invalid, no retry.
    let e = p
        .send(&notification(PROVIDER_FCM, "dead", "x"))
        .await
        .unwrap_err();
    assert!(e.token_invalid(), "{e}");

    // The access token is revoked: 401 → retryable and forgotten; the retry gets a new one.
    g.revoked.lock().unwrap().push("Bearer tok-1".into());
    let e = p
        .send(&notification(PROVIDER_FCM, FCM_TOKEN, "3"))
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    p.send(&notification(PROVIDER_FCM, FCM_TOKEN, "3"))
        .await
        .unwrap();
    assert_eq!(g.issued.load(Ordering::SeqCst), 2);

    // Through the dispatcher: many at once share one token fetch.
    let fresh = Arc::new(
        FcmProvider::with_service_account(&c, account(Some(&server.url("/token")))).unwrap(),
    );
    let d =
        PushDispatcher::with_providers(vec![(PROVIDER_FCM, fresh as Arc<dyn PushProvider>)], 64)
            .unwrap();
    let before = g.issued.load(Ordering::SeqCst);
    for i in 0..8 {
        d.submit(notification(PROVIDER_FCM, &format!("{FCM_TOKEN}{i}"), "hi"));
    }
    assert!(
        wait_until(Duration::from_secs(10), || d.stats().sent == 8).await,
        "{:?}",
        d.stats()
    );
    assert_eq!(
        g.issued.load(Ordering::SeqCst),
        before + 1,
        "one token request for all"
    );
}
