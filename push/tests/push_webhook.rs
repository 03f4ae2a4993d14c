//! The webhook provider end to end: dispatcher → real HTTP POST → a local hyper server.

mod push_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use im_push::{
    DispatchOptions, PushConfig, PushDispatcher, PushProvider, PushStats, WebhookConfig,
    WebhookProvider, PROVIDER_APNS, PROVIDER_WEBHOOK, WEBHOOK_HEADER_SIGNATURE,
};
use push_support::{hmac_hex, notification, wait_until, Reply, TestServer};

const SECRET: &str = "gateway-secret";

fn webhook_cfg(server: &TestServer, secret: Option<&str>, timeout_ms: u64) -> WebhookConfig {
    WebhookConfig {
        url: server.url("/v1/push?src=im"),
        auth_header: Some("Bearer gw-key".into()),
        secret: secret.map(str::to_owned),
        timeout_ms,
    }
}

/// A dispatcher with only the webhook provider and fast retries.
fn dispatcher(cfg: &WebhookConfig, queue: usize, concurrency: usize) -> Arc<PushDispatcher> {
    let p: Arc<dyn PushProvider> = Arc::new(WebhookProvider::new(cfg).unwrap());
    PushDispatcher::with_options(
        vec![(PROVIDER_WEBHOOK, p)],
        DispatchOptions {
            queue,
            concurrency,
            max_attempts: 3,
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(100),
        },
    )
    .unwrap()
}

async fn settle(d: &PushDispatcher, f: impl Fn(PushStats) -> bool) -> PushStats {
    assert!(
        wait_until(Duration::from_secs(10), || f(d.stats())).await,
        "stats never settled: {:?}",
        d.stats()
    );
    d.stats()
}

#[tokio::test]
async fn push_webhook_delivers_json_with_signature() {
    let server = TestServer::scripted(false, vec![]).await;
    let d = dispatcher(&webhook_cfg(&server, Some(SECRET), 5000), 16, 4);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    d.submit(notification(
        PROVIDER_WEBHOOK,
        "device-key-1",
        "hello \"bob\" ☃",
    ));
    let s = settle(&d, |s| s.sent == 1).await;
    assert_eq!((s.queued, s.failed, s.retried, s.dropped), (1, 0, 0, 0));

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/push?src=im");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("authorization"), Some("Bearer gw-key"));
    // The signature covers the exact body bytes.
    let sig = r.header(WEBHOOK_HEADER_SIGNATURE).expect("signed");
    assert_eq!(
        sig,
        format!("sha256={}", hmac_hex(SECRET.as_bytes(), &r.body))
    );

    let v = r.json();
    let ts = v["ts_ms"].as_u64().unwrap();
    assert!(ts >= before && ts < before + 10_000, "ts_ms {ts}");
    assert_eq!(
        v,
        serde_json::json!({
            "v": 1,
            "uid": "42",
            "device_id": "phone",
            "provider": 3,
            "token": "device-key-1",
            "msg_id": "1234567890123456789",
            "from": "7",
            "conv": 1,
            "to": "42",
            "preview": "hello \"bob\" ☃",
            "unread": 3,
            "ts_ms": ts,
        })
    );
}

#[tokio::test]
async fn push_webhook_unsigned_without_secret() {
    let server = TestServer::scripted(false, vec![Reply::status(204)]).await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 16, 4);
    d.submit(notification(PROVIDER_WEBHOOK, "k", ""));
    settle(&d, |s| s.sent == 1).await;
    let r = &server.requests()[0];
    assert!(r.header(WEBHOOK_HEADER_SIGNATURE).is_none());
    assert_eq!(r.json()["preview"], "");
}

#[tokio::test]
async fn push_webhook_server_error_is_retried_and_delivered_once() {
    let server = TestServer::scripted(false, vec![Reply::status(500)]).await;
    let d = dispatcher(&webhook_cfg(&server, Some(SECRET), 5000), 16, 4);
    d.submit(notification(PROVIDER_WEBHOOK, "k", "hi"));
    let s = settle(&d, |s| s.sent == 1).await;
    assert_eq!((s.retried, s.failed), (1, 0));
    // Nothing more arrives after the success.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "one failed attempt, one delivery");
    for r in &reqs {
        // Each attempt is signed over its own body.
        assert_eq!(
            r.header(WEBHOOK_HEADER_SIGNATURE).unwrap(),
            format!("sha256={}", hmac_hex(SECRET.as_bytes(), &r.body))
        );
        assert_eq!(r.json()["msg_id"], "1234567890123456789");
    }
    assert_eq!(d.stats().sent, 1);
}

#[tokio::test]
async fn push_webhook_retries_are_bounded() {
    let server = TestServer::start(false, Arc::new(|_| Reply::status(503))).await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 16, 4);
    d.submit(notification(PROVIDER_WEBHOOK, "k", "hi"));
    let s = settle(&d, |s| s.failed == 1).await;
    assert_eq!((s.sent, s.retried, s.invalid_tokens), (0, 2, 0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.count(), 3, "max_attempts = 3");
}

#[tokio::test]
async fn push_webhook_client_error_is_not_retried() {
    let server = TestServer::scripted(false, vec![Reply::status(400)]).await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 16, 4);
    let hooked = Arc::new(AtomicUsize::new(0));
    let h = hooked.clone();
    assert!(d.on_invalid_token(move |_| {
        h.fetch_add(1, Ordering::Relaxed);
    }));
    d.submit(notification(PROVIDER_WEBHOOK, "k", "hi"));
    let s = settle(&d, |s| s.failed == 1).await;
    assert_eq!((s.sent, s.retried, s.invalid_tokens), (0, 0, 0));
    // Well past any backoff: still one request.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.count(), 1);
    assert_eq!(hooked.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn push_webhook_gone_marks_the_token_invalid() {
    let server = TestServer::scripted(false, vec![Reply::status(410)]).await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 16, 4);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    d.on_invalid_token(move |n| s2.lock().unwrap().push((n.uid, n.device_id.clone())));
    assert!(!d.on_invalid_token(|_| {}), "the hook is set once");
    d.submit(notification(PROVIDER_WEBHOOK, "stale", "hi"));
    let s = settle(&d, |s| s.failed == 1).await;
    assert_eq!((s.invalid_tokens, s.retried), (1, 0));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(im_shared::UserId(42), "phone".to_owned())]
    );
}

#[tokio::test]
async fn push_webhook_timeout_is_retryable() {
    // First answer comes after the 200 ms timeout; the retry is answered at once.
    let server = TestServer::scripted(
        false,
        vec![Reply::status(200).delayed(Duration::from_secs(2))],
    )
    .await;
    let d = dispatcher(&webhook_cfg(&server, None, 200), 16, 4);
    d.submit(notification(PROVIDER_WEBHOOK, "k", "hi"));
    let s = settle(&d, |s| s.sent == 1).await;
    assert_eq!(s.retried, 1);
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn push_webhook_retry_after_is_honoured() {
    let server =
        TestServer::scripted(false, vec![Reply::status(429).header("retry-after", "1")]).await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 16, 4);
    let t0 = std::time::Instant::now();
    d.submit(notification(PROVIDER_WEBHOOK, "k", "hi"));
    settle(&d, |s| s.sent == 1).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "retried after {:?}, before Retry-After",
        t0.elapsed()
    );
}

#[tokio::test]
async fn push_webhook_queue_overflow_is_counted_as_dropped() {
    // One slow delivery at a time, a queue of 2: most of a burst of 20 cannot be taken.
    let server = TestServer::start(
        false,
        Arc::new(|_| Reply::status(200).delayed(Duration::from_millis(300))),
    )
    .await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 2, 1);
    for i in 0..20 {
        d.submit(notification(PROVIDER_WEBHOOK, &format!("k{i}"), "hi"));
    }
    let s = d.stats();
    assert_eq!(s.queued + s.dropped, 20);
    // At most: 2 in the queue, 1 taken by the loop waiting for a slot, 1 in flight.
    assert!(s.dropped >= 16, "{s:?}");
    let s = settle(&d, |s| s.sent == s.queued).await;
    assert_eq!(s.failed, 0);
    assert_eq!(server.count() as u64, s.queued);

    let mut m = String::new();
    d.metrics(&mut m);
    assert!(
        m.contains(&format!("im_push_dropped_total {}\n", s.dropped)),
        "{m}"
    );
    assert!(m.contains(&format!(
        "im_push_sent_total{{provider=\"webhook\"}} {}\n",
        s.sent
    )));
    assert!(m.contains("# TYPE im_push_queue_depth gauge\nim_push_queue_depth 0\n"));
    assert!(
        !m.contains("provider=\"apns\""),
        "only configured providers are labelled"
    );
}

#[tokio::test]
async fn push_webhook_unconfigured_provider_is_counted() {
    let server = TestServer::scripted(false, vec![]).await;
    let d = dispatcher(&webhook_cfg(&server, None, 5000), 16, 4);
    d.submit(notification(PROVIDER_APNS, "abcd", "hi"));
    d.submit(notification(200, "x", "hi"));
    let s = d.stats();
    assert_eq!((s.no_provider, s.queued), (2, 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.count(), 0);
}

#[tokio::test]
async fn push_webhook_start_from_config_and_submit_from_other_threads() {
    let server = TestServer::scripted(false, vec![]).await;
    let cfg = PushConfig {
        webhook: Some(webhook_cfg(&server, Some(SECRET), 5000)),
        ..PushConfig::default()
    };
    let d = PushDispatcher::start(&cfg).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..5 {
                    d.submit(notification(PROVIDER_WEBHOOK, &format!("k{t}-{i}"), "hi"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    settle(&d, |s| s.sent == 20).await;
    let mut tokens: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.json()["token"].as_str().unwrap().to_owned())
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 20);
}

#[test]
fn push_webhook_start_refuses_a_bad_config() {
    let cfg = PushConfig {
        webhook: Some(WebhookConfig {
            url: "not a url".into(),
            auth_header: None,
            secret: None,
            timeout_ms: 1000,
        }),
        ..PushConfig::default()
    };
    assert!(PushDispatcher::start(&cfg).is_err());
    // No provider at all is fine: everything is counted as no_provider.
    let d = PushDispatcher::start(&PushConfig::default()).unwrap();
    d.submit(notification(PROVIDER_WEBHOOK, "k", ""));
    assert_eq!(d.stats().no_provider, 1);
}
