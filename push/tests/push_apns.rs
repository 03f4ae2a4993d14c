//! APNs provider: request building (path, headers, payload, ES256 provider token verified with
//! an independently derived public key), error classification, and a send over HTTP/2 (prior
//! knowledge) to a local server.

mod push_support;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use im_push::jwt::{b64_std, b64url, pem_block, JwtError};
use im_push::{
    apns_payload, classify_apns_response, ApnsConfig, ApnsProvider, DispatchOptions, PushConfig,
    PushDispatcher, PushError, PushProvider, APNS_MAX_PAYLOAD, APNS_TOKEN_REFRESH_SECS,
    PROVIDER_APNS,
};
use push_support::{notification, split_jwt, wait_until, Reply, TestServer};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};

/// TEST ONLY key in Apple's `.p8` layout, and its public point as printed by OpenSSL.
const P8: &str = include_str!("push_fixtures/apns_test_authkey.p8");
const P8_PUBLIC_HEX: &str = include_str!("push_fixtures/apns_test_pubkey.hex");

const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn cfg() -> ApnsConfig {
    ApnsConfig {
        team_id: "TEAM123456".into(),
        key_id: "KEY7654321".into(),
        key_path: "/nonexistent.p8".into(),
        topic: "com.example.chat".into(),
        sandbox: false,
        endpoint: None,
        timeout_ms: 5000,
        ttl_secs: 3600,
    }
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn verify_es256(jwt: &str, public: &[u8]) {
    let (_, _, input, sig) = split_jwt(jwt);
    assert_eq!(sig.len(), 64, "ES256 signature is r || s (JOSE), not DER");
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public)
        .verify(input.as_bytes(), &sig)
        .expect("ES256 signature verifies with the key's public point");
}

#[tokio::test]
async fn push_apns_request_building() {
    let p = ApnsProvider::with_key_pem(&cfg(), P8).unwrap();
    assert_eq!(p.base_url(), "https://api.push.apple.com");
    let now = 1_700_000_000;
    let n = notification(PROVIDER_APNS, TOKEN, "hello");
    let req = p.build_request(&n, now).unwrap();
    assert_eq!(req.method(), "POST");
    assert_eq!(
        req.uri().to_string(),
        format!("https://api.push.apple.com/3/device/{TOKEN}")
    );
    let h = req.headers();
    assert_eq!(h["apns-topic"], "com.example.chat");
    assert_eq!(h["apns-push-type"], "alert");
    assert_eq!(h["apns-priority"], "10");
    assert_eq!(h["apns-expiration"], (now + 3600).to_string().as_str());
    assert_eq!(h["apns-collapse-id"], "1234567890123456789");
    assert_eq!(h["content-type"], "application/json");

    let auth = h["authorization"].to_str().unwrap();
    let jwt = auth.strip_prefix("bearer ").expect("bearer scheme");
    let (header, claims, _, _) = split_jwt(jwt);
    assert_eq!(
        header,
        serde_json::json!({"alg": "ES256", "kid": "KEY7654321"})
    );
    assert_eq!(claims, serde_json::json!({"iss": "TEAM123456", "iat": now}));
    verify_es256(jwt, &unhex(P8_PUBLIC_HEX));

    // The body is the payload.
    let body = req.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.as_ref(), apns_payload(&n).unwrap().as_slice());
}

#[test]
fn push_apns_sandbox_and_endpoint_hosts() {
    let mut c = cfg();
    c.sandbox = true;
    let p = ApnsProvider::with_key_pem(&c, P8).unwrap();
    assert_eq!(p.base_url(), "https://api.sandbox.push.apple.com");
    let req = p
        .build_request(&notification(PROVIDER_APNS, TOKEN, ""), 1)
        .unwrap();
    assert_eq!(req.uri().host(), Some("api.sandbox.push.apple.com"));
    c.endpoint = Some("http://127.0.0.1:9999/".into());
    let p = ApnsProvider::with_key_pem(&c, P8).unwrap();
    let req = p
        .build_request(&notification(PROVIDER_APNS, TOKEN, ""), 1)
        .unwrap();
    assert_eq!(
        req.uri().to_string(),
        format!("http://127.0.0.1:9999/3/device/{TOKEN}")
    );
}

#[test]
fn push_apns_provider_token_is_cached_and_renewed() {
    let p = ApnsProvider::with_key_pem(&cfg(), P8).unwrap();
    let t0 = p.provider_token(1000).unwrap();
    assert_eq!(p.provider_token(1000 + 60).unwrap(), t0, "reused");
    assert_eq!(
        p.provider_token(1000 + APNS_TOKEN_REFRESH_SECS - 1)
            .unwrap(),
        t0
    );
    let t1 = p.provider_token(1000 + APNS_TOKEN_REFRESH_SECS).unwrap();
    assert_ne!(t1, t0, "renewed after {APNS_TOKEN_REFRESH_SECS} s");
    assert_eq!(
        split_jwt(&t1).1["iat"],
        1000 + APNS_TOKEN_REFRESH_SECS,
        "the new token carries its own iat"
    );
    p.invalidate_token();
    let t2 = p.provider_token(1000 + APNS_TOKEN_REFRESH_SECS).unwrap();
    assert_ne!(t2, t1, "a fresh signature after invalidation");
    verify_es256(&t2, &unhex(P8_PUBLIC_HEX));
}

#[test]
fn push_apns_key_generated_in_test_and_read_from_file() {
    // A key generated here (ring), written as a .p8 file, read through key_path.
    let rng = ring::rand::SystemRandom::new();
    let doc =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let public = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        doc.as_ref(),
        &rng,
    )
    .unwrap()
    .public_key()
    .as_ref()
    .to_vec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("AuthKey_KEY7654321.p8");
    std::fs::write(
        &path,
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64_std(doc.as_ref())
        ),
    )
    .unwrap();
    let mut c = cfg();
    c.key_path = path;
    let p = ApnsProvider::new(&c).unwrap();
    verify_es256(&p.provider_token(5).unwrap(), &public);

    // The fixture's DER is what the PEM holds.
    assert!(pem_block(P8, "PRIVATE KEY").unwrap().len() > 100);
}

#[test]
fn push_apns_bad_config_is_refused() {
    assert!(
        matches!(ApnsProvider::new(&cfg()), Err(PushError::Config(_))),
        "missing key file"
    );
    assert!(matches!(
        ApnsProvider::with_key_pem(&cfg(), "not a key"),
        Err(PushError::Key {
            source: JwtError::NoPemBlock(_),
            ..
        })
    ));
    let rsa = include_str!("push_fixtures/fcm_test_key.pem");
    assert!(
        matches!(
            ApnsProvider::with_key_pem(&cfg(), rsa),
            Err(PushError::Key {
                source: JwtError::KeyRejected { .. },
                ..
            })
        ),
        "an RSA key is not a P-256 key"
    );
    let mut c = cfg();
    c.topic = String::new();
    assert!(ApnsProvider::with_key_pem(&c, P8).is_err());
    let mut c = cfg();
    c.team_id = String::new();
    assert!(ApnsProvider::with_key_pem(&c, P8).is_err());
    // Dispatcher start surfaces it as an io error.
    let pc = PushConfig {
        apns: Some(cfg()),
        ..PushConfig::default()
    };
    assert!(PushDispatcher::start(&pc).is_err());
}

#[test]
fn push_apns_malformed_device_tokens_are_invalid() {
    let p = ApnsProvider::with_key_pem(&cfg(), P8).unwrap();
    for bad in [
        "",
        "xyz",
        "../../3/device/abcd",
        "abcd/ef",
        &"a".repeat(401),
        "ab cd",
    ] {
        let e = p
            .build_request(&notification(PROVIDER_APNS, bad, "hi"), 1)
            .unwrap_err();
        assert!(e.token_invalid() && !e.is_retryable(), "{bad:?}: {e}");
    }
}

#[test]
fn push_apns_payload_shape_and_limit() {
    let mut n = notification(PROVIDER_APNS, TOKEN, "hello");
    let v: serde_json::Value = serde_json::from_slice(&apns_payload(&n).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "aps": {
                "alert": {"body": "hello"},
                "badge": 3,
                "sound": "default",
                "mutable-content": 1,
                "thread-id": "u7",
            },
            "im": {"v": 1, "msg_id": "1234567890123456789", "from": "7", "conv": 1, "to": "42"},
        })
    );
    // Group messages thread by group; an empty preview gets a generic body.
    n.conv = im_shared::proto::CONV_C2G;
    n.to = 900;
    n.preview.clear();
    let v: serde_json::Value = serde_json::from_slice(&apns_payload(&n).unwrap()).unwrap();
    assert_eq!(v["aps"]["thread-id"], "g900");
    assert_eq!(v["aps"]["alert"]["body"], "New message");
    // A huge preview is cut (at a char boundary, with an ellipsis) to fit 4 KB.
    for big in [
        "x".repeat(10_000),
        "日本語".repeat(3000),
        "\"\\".repeat(4000),
    ] {
        n.preview = big.clone();
        let out = apns_payload(&n).unwrap();
        assert!(out.len() <= APNS_MAX_PAYLOAD, "{}", out.len());
        assert!(
            out.len() > APNS_MAX_PAYLOAD - 64,
            "cut no more than needed: {}",
            out.len()
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let body = v["aps"]["alert"]["body"].as_str().unwrap();
        assert!(body.ends_with('…'));
        assert!(big.starts_with(body.trim_end_matches('…')));
    }
}

#[test]
fn push_apns_error_classification() {
    let class = |status: u16, reason: &str| {
        let body = serde_json::json!({ "reason": reason }).to_string();
        classify_apns_response(status, body.as_bytes(), None).unwrap_err()
    };
    assert!(classify_apns_response(200, b"", None).is_ok());
    for (status, reason) in [
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
        (410, "Unregistered"),
        (410, "ExpiredToken"),
    ] {
        let e = class(status, reason);
        assert!(e.token_invalid() && !e.is_retryable(), "{status} {reason}");
        assert!(e.to_string().contains(reason));
    }
    for (status, reason) in [
        (403, "ExpiredProviderToken"),
        (429, "TooManyRequests"),
        (429, "TooManyProviderTokenUpdates"),
        (500, "InternalServerError"),
        (503, "ServiceUnavailable"),
        (503, "Shutdown"),
    ] {
        let e = class(status, reason);
        assert!(e.is_retryable() && !e.token_invalid(), "{status} {reason}");
    }
    for (status, reason) in [
        (400, "BadTopic"),
        (400, "PayloadEmpty"),
        (400, "BadCollapseId"),
        (403, "InvalidProviderToken"),
        (403, "MissingProviderToken"),
        (405, "MethodNotAllowed"),
        (413, "PayloadTooLarge"),
    ] {
        let e = class(status, reason);
        assert!(!e.is_retryable() && !e.token_invalid(), "{status} {reason}");
        assert_eq!(e.status(), Some(status));
    }
    // A body that is not JSON still classifies by status.
    let e = classify_apns_response(
        502,
        b"<html>bad gateway</html>",
        Some(Duration::from_secs(3)),
    )
    .unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
}

/// A provider token check as APNs does it: signature, kid, iss.
fn apns_like_handler(public: Vec<u8>) -> push_support::Handler {
    Arc::new(move |r: &push_support::Recorded| {
        let Some(jwt) = r
            .header("authorization")
            .and_then(|a| a.strip_prefix("bearer "))
        else {
            return Reply::json(403, serde_json::json!({"reason": "MissingProviderToken"}));
        };
        let (h, c, input, sig) = split_jwt(jwt);
        let ok = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
            .verify(input.as_bytes(), &sig)
            .is_ok();
        if !ok || h["kid"] != "KEY7654321" || c["iss"] != "TEAM123456" {
            return Reply::json(403, serde_json::json!({"reason": "InvalidProviderToken"}));
        }
        match r.path.rsplit('/').next() {
            Some("dead") | Some("dead00") => Reply::json(
                410,
                serde_json::json!({"reason": "Unregistered", "timestamp": 1}),
            ),
            _ => Reply::status(200).header("apns-id", "EC1BF194-B3B2-424A-89A9-5A918A6E6B5E"),
        }
    })
}

#[tokio::test]
async fn push_apns_sends_over_http2_to_a_local_server() {
    let server = TestServer::start(true, apns_like_handler(unhex(P8_PUBLIC_HEX))).await;
    let mut c = cfg();
    c.endpoint = Some(server.url(""));
    let p = Arc::new(ApnsProvider::with_key_pem(&c, P8).unwrap());

    // Direct sends: success, then an unregistered token.
    p.send(&notification(PROVIDER_APNS, TOKEN, "hi"))
        .await
        .unwrap();
    let e = p
        .send(&notification(PROVIDER_APNS, "dead00", "hi"))
        .await
        .unwrap_err();
    assert!(e.token_invalid(), "{e}");

    // Through the dispatcher, several at once over the one HTTP/2 connection.
    let d = PushDispatcher::with_options(
        vec![(PROVIDER_APNS, p.clone() as Arc<dyn PushProvider>)],
        DispatchOptions {
            retry_base: Duration::from_millis(10),
            ..DispatchOptions::default()
        },
    )
    .unwrap();
    for i in 0..10u8 {
        d.submit(notification(
            PROVIDER_APNS,
            &format!("{TOKEN}{i:02x}"),
            "hi",
        ));
    }
    assert!(
        wait_until(Duration::from_secs(10), || d.stats().sent == 10).await,
        "{:?}",
        d.stats()
    );

    let reqs = server.requests();
    assert_eq!(reqs.len(), 12);
    for r in &reqs {
        assert_eq!(r.version, hyper::Version::HTTP_2, "APNs is HTTP/2 only");
        assert_eq!(r.method, "POST");
        assert!(r.path.starts_with("/3/device/"));
        assert_eq!(r.header("apns-topic"), Some("com.example.chat"));
        assert_eq!(r.header("apns-push-type"), Some("alert"));
        assert_eq!(r.json()["aps"]["badge"], 3);
    }
}

#[tokio::test]
async fn push_apns_expired_provider_token_is_renewed_and_retried() {
    // The first answer calls the provider token expired; the retry must carry a new one.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let server = TestServer::start(
        true,
        Arc::new(move |r: &push_support::Recorded| {
            let mut s = s.lock().unwrap();
            s.push(r.header("authorization").unwrap_or("").to_owned());
            if s.len() == 1 {
                Reply::json(403, serde_json::json!({"reason": "ExpiredProviderToken"}))
            } else {
                Reply::status(200)
            }
        }),
    )
    .await;
    let mut c = cfg();
    c.endpoint = Some(server.url(""));
    let p: Arc<dyn PushProvider> = Arc::new(ApnsProvider::with_key_pem(&c, P8).unwrap());
    let d = PushDispatcher::with_options(
        vec![(PROVIDER_APNS, p)],
        DispatchOptions {
            retry_base: Duration::from_millis(10),
            ..DispatchOptions::default()
        },
    )
    .unwrap();
    d.submit(notification(PROVIDER_APNS, TOKEN, "hi"));
    assert!(wait_until(Duration::from_secs(10), || d.stats().sent == 1).await);
    assert_eq!(d.stats().retried, 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_ne!(
        seen[0], seen[1],
        "a new provider token after ExpiredProviderToken"
    );
}

#[test]
fn push_apns_b64url_is_jwt_safe() {
    assert_eq!(b64url(&[0xff, 0xfe, 0xfd]), "__79");
}
