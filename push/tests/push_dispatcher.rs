//! The dispatcher with in-memory providers: concurrency bound, retry policy per error class,
//! counters, metrics text, shutdown on drop.

mod push_support;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use im_push::{
    DispatchOptions, ErrorClass, PushDispatcher, PushError, PushNotification, PushProvider,
    PROVIDER_APNS, PROVIDER_FCM, PROVIDER_WEBHOOK,
};
use push_support::{notification, wait_until};

/// Behaves by token: `ok`, `flaky<k>` (k transport errors, then ok), `perm`, `invalid`,
/// `always` (timeouts), `hang` (never answers). Sleeps `delay` per call; tracks concurrency.
#[derive(Default)]
struct Fake {
    delay: Duration,
    calls: Mutex<HashMap<String, usize>>,
    current: AtomicUsize,
    max: AtomicUsize,
}

impl Fake {
    fn calls(&self, token: &str) -> usize {
        self.calls.lock().unwrap().get(token).copied().unwrap_or(0)
    }
}

impl PushProvider for Fake {
    fn send<'a>(
        &'a self,
        n: &'a PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + 'a>> {
        Box::pin(async move {
            let call = {
                let mut c = self.calls.lock().unwrap();
                let e = c.entry(n.token.clone()).or_default();
                *e += 1;
                *e
            };
            let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
            if n.token == "hang" {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.delay).await;
            self.current.fetch_sub(1, Ordering::SeqCst);
            let t = n.token.as_str();
            if let Some(k) = t.strip_prefix("flaky") {
                let k: usize = k.parse().unwrap();
                return if call <= k {
                    Err(PushError::Transport("connection reset".into()))
                } else {
                    Ok(())
                };
            }
            match t {
                "perm" => Err(PushError::Rejected {
                    provider: "fake",
                    status: 400,
                    reason: "BadTopic".into(),
                    class: ErrorClass::Permanent,
                    retry_after: None,
                }),
                "invalid" => Err(PushError::Rejected {
                    provider: "fake",
                    status: 410,
                    reason: "Unregistered".into(),
                    class: ErrorClass::TokenInvalid,
                    retry_after: None,
                }),
                "always" => Err(PushError::Timeout(Duration::from_millis(1))),
                _ => Ok(()),
            }
        })
    }
}

fn opts(concurrency: usize, max_attempts: u32) -> DispatchOptions {
    DispatchOptions {
        queue: 1000,
        concurrency,
        max_attempts,
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(20),
    }
}

#[tokio::test]
async fn push_dispatcher_bounds_concurrency() {
    let fake = Arc::new(Fake {
        delay: Duration::from_millis(30),
        ..Fake::default()
    });
    let d =
        PushDispatcher::with_options(vec![(PROVIDER_FCM, fake.clone() as _)], opts(3, 1)).unwrap();
    for i in 0..20 {
        d.submit(notification(PROVIDER_FCM, &format!("ok{i}"), ""));
    }
    assert!(wait_until(Duration::from_secs(10), || d.stats().sent == 20).await);
    assert_eq!(
        fake.max.load(Ordering::SeqCst),
        3,
        "never more than `concurrency` at once"
    );
}

#[tokio::test]
async fn push_dispatcher_retry_policy_by_error_class() {
    let fake = Arc::new(Fake::default());
    let d =
        PushDispatcher::with_options(vec![(PROVIDER_APNS, fake.clone() as _)], opts(8, 4)).unwrap();
    let invalid = Arc::new(Mutex::new(Vec::new()));
    let inv = invalid.clone();
    d.on_invalid_token(move |n| inv.lock().unwrap().push(n.token.clone()));
    for t in ["ok", "flaky2", "perm", "invalid", "always"] {
        d.submit(notification(PROVIDER_APNS, t, ""));
    }
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = d.stats();
            s.sent + s.failed == 5
        })
        .await
    );
    let s = d.stats();
    assert_eq!((s.queued, s.sent, s.failed, s.invalid_tokens), (5, 2, 3, 1));
    // flaky2: 2 retries; always: 3 retries (4 attempts).
    assert_eq!(s.retried, 5);
    assert_eq!(fake.calls("ok"), 1);
    assert_eq!(fake.calls("flaky2"), 3);
    assert_eq!(fake.calls("perm"), 1, "permanent errors are not retried");
    assert_eq!(fake.calls("invalid"), 1);
    assert_eq!(fake.calls("always"), 4, "bounded attempts");
    assert_eq!(*invalid.lock().unwrap(), vec!["invalid".to_owned()]);

    let mut m = String::new();
    d.metrics(&mut m);
    for line in [
        "im_push_sent_total{provider=\"apns\"} 2",
        "im_push_failed_total{provider=\"apns\"} 3",
        "im_push_retried_total 5",
        "im_push_invalid_tokens_total 1",
        "im_push_queued_total 5",
        "im_push_in_flight 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    // Well-formed exposition: every sample has a HELP and TYPE before it.
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(m.contains(&format!("# TYPE {name} ")), "{name}");
        assert!(l.rsplit(' ').next().unwrap().parse::<u64>().is_ok(), "{l}");
    }
    assert!(
        !m.contains("im_push_submitted_total"),
        "that one is the workers'"
    );
}

#[test]
fn push_dispatcher_submit_from_a_worker_runtime_never_blocks() {
    // A worker-like current-thread runtime submits into a full queue: returns at once.
    let fake = Arc::new(Fake::default());
    let d = PushDispatcher::with_options(
        vec![(PROVIDER_WEBHOOK, fake.clone() as _)],
        DispatchOptions {
            queue: 4,
            ..opts(1, 1)
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    rt.block_on(async {
        for _ in 0..10_000 {
            d.submit(notification(PROVIDER_WEBHOOK, "hang", ""));
        }
    });
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let s = d.stats();
    assert_eq!(s.queued + s.dropped, 10_000);
    assert!(s.dropped >= 10_000 - 6, "{s:?}");
}

#[test]
fn push_dispatcher_drop_stops_the_thread() {
    let fake = Arc::new(Fake::default());
    let d =
        PushDispatcher::with_options(vec![(PROVIDER_FCM, fake.clone() as _)], opts(2, 1)).unwrap();
    for _ in 0..10 {
        d.submit(notification(PROVIDER_FCM, "hang", ""));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fake.current.load(Ordering::SeqCst),
        2,
        "two hanging sends in flight"
    );
    let t0 = Instant::now();
    drop(d);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        t0.elapsed()
    );
    // The abandoned sends were dropped with the runtime: only the dispatcher's `fake` clones
    // are gone, ours is the last.
    assert!(
        wait_until_sync(Duration::from_secs(2), || Arc::strong_count(&fake) == 1),
        "providers released"
    );
}

fn wait_until_sync(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
