//! The embedded c2s backend end to end: records queued in a real fjall database under a temp
//! data dir, delivered by the hub's dispatcher thread with real HTTP POSTs to a local hyper
//! server (its own thread and runtime, so it can be stopped and started again on the same port).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use im_c2s::{
    C2sConfig, C2sError, C2sHub, C2sQueue, C2sRecord, DeadReason, HEADER_ATTEMPT, HEADER_ID,
    HEADER_SIGNATURE, HEADER_TOPIC,
};
use im_shared::msgid::MsgIdGen;
use im_shared::{MsgId, UserId};
use sha2::Sha256;

const SECRET: &str = "business-secret";

// ---------------------------------------------------------------------------------------------
// A real HTTP receiver.

#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: HashMap<String, String>,
    body: Bytes,
    /// The status this request was answered with.
    status: u16,
}

impl Got {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    fn id(&self) -> u64 {
        self.json()["id"].as_str().unwrap().parse().unwrap()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What the receiver answers and what it got; survives receiver restarts.
#[derive(Default)]
struct Inbox {
    /// path → status; missing: 200.
    status: Mutex<HashMap<String, u16>>,
    got: Mutex<Vec<Got>>,
}

impl Inbox {
    fn set_status(&self, path: &str, status: u16) {
        self.status.lock().unwrap().insert(path.to_owned(), status);
    }
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
    /// Requests answered 2xx, in arrival order.
    fn delivered(&self) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| (200..300).contains(&g.status))
            .collect()
    }
    fn delivered_ids(&self) -> HashSet<u64> {
        self.delivered().iter().map(Got::id).collect()
    }
}

struct Receiver {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Serves on `127.0.0.1:port` (0: any free port) on a thread of its own.
    fn start(port: u16, inbox: Arc<Inbox>) -> Receiver {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind receiver");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let inbox = inbox.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| handle(inbox.clone(), req));
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(sock), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accept => {}
                }
            });
            // Dropping the runtime closes the listener and every open connection.
        });
        let addr = addr_rx.recv().expect("receiver address");
        Receiver {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Takes the receiver down: connections are refused until it is started again.
    fn stop(mut self) -> SocketAddr {
        self.shutdown();
        self.addr
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn handle(
    inbox: Arc<Inbox>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let status = inbox
        .status
        .lock()
        .unwrap()
        .get(&path)
        .copied()
        .unwrap_or(200);
    inbox.got.lock().unwrap().push(Got {
        path,
        headers,
        body,
        status,
    });
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap())
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn cfg(
    webhooks: &[(&str, String)],
    default_url: Option<String>,
    secret: Option<&str>,
) -> C2sConfig {
    C2sConfig::Embedded {
        webhooks: webhooks
            .iter()
            .map(|(t, u)| ((*t).to_owned(), u.clone()))
            .collect::<BTreeMap<_, _>>(),
        default_url,
        secret: secret.map(str::to_owned),
        retry_initial_ms: 20,
        retry_max_ms: 200,
        timeout_ms: 2_000,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Records with ids from `gen`, in increasing id order.
fn records(gen: &mut MsgIdGen, from: u64, topic: &str, n: usize, cmid0: u64) -> Vec<C2sRecord> {
    (0..n)
        .map(|i| {
            let now = now_ms();
            C2sRecord {
                id: gen.next(now),
                from: UserId(from),
                client_msg_id: cmid0 + i as u64,
                topic: topic.to_owned(),
                body: Bytes::from(format!("{topic} #{}", cmid0 + i as u64)),
                time_ms: now,
            }
        })
        .collect()
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn enqueue(q: &dyn C2sQueue, recs: &[C2sRecord]) {
    q.enqueue(recs).await.expect("enqueue");
}

fn ids(recs: &[C2sRecord]) -> HashSet<u64> {
    recs.iter().map(|r| r.id.0).collect()
}

/// The ids delivered (2xx) to `path`, first occurrences only, in arrival order.
fn delivered_order(inbox: &Inbox, path: &str) -> Vec<u64> {
    let mut seen = HashSet::new();
    inbox
        .delivered()
        .iter()
        .filter(|g| g.path == path)
        .map(Got::id)
        .filter(|id| seen.insert(*id))
        .collect()
}

fn assert_increasing(v: &[u64], what: &str) {
    assert!(
        v.windows(2).all(|w| w[0] < w[1]),
        "{what} not in id order: {v:?}"
    );
}

fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn start(c: &C2sConfig, dir: &Path) -> Arc<C2sHub> {
    C2sHub::start(c, dir).expect("start c2s hub")
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn c2s_webhook_delivers_signed_json() {
    let inbox = Arc::new(Inbox::default());
    let rx = Receiver::start(0, inbox.clone());
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        &cfg(
            &[("orders", rx.url("/orders"))],
            Some(rx.url("/default")),
            Some(SECRET),
        ),
        dir.path(),
    );
    let q = hub.queue().await.unwrap();
    let t0 = now_ms();
    let mut gen = MsgIdGen::new(1);
    let text = C2sRecord {
        id: gen.next(t0),
        from: UserId(u64::MAX - 3),
        client_msg_id: u64::MAX - 5,
        topic: "orders".into(),
        body: Bytes::from_static("order #1 \"quoted\" ☃".as_bytes()),
        time_ms: t0,
    };
    let binary = C2sRecord {
        id: gen.next(t0),
        body: Bytes::from_static(b"\x00\xff\xfebin"),
        client_msg_id: 2,
        ..text.clone()
    };
    let other = C2sRecord {
        id: gen.next(t0),
        topic: "clicks".into(),
        body: Bytes::from_static(b"{\"x\":1}"),
        client_msg_id: 3,
        ..text.clone()
    };
    enqueue(&*q, &[text.clone(), binary.clone(), other.clone()]).await;
    assert_eq!(hub.stats().queued, 3);
    wait_until("3 deliveries", Duration::from_secs(10), || {
        hub.stats().delivered == 3
    })
    .await;
    let s = hub.stats();
    assert_eq!((s.pending, s.retries, s.dead_letters), (0, 0, 0), "{s:?}");

    let got = inbox.got();
    assert_eq!(got.len(), 3, "{got:?}");
    let by_id: HashMap<u64, &Got> = got.iter().map(|g| (g.id(), g)).collect();
    for (rec, path, encoding, body) in [
        (
            &text,
            "/orders",
            "utf8",
            serde_json::json!("order #1 \"quoted\" ☃"),
        ),
        (&binary, "/orders", "base64", serde_json::json!("AP/+Ymlu")),
        (&other, "/default", "utf8", serde_json::json!("{\"x\":1}")),
    ] {
        let g = by_id[&rec.id.0];
        assert_eq!(g.path, path);
        assert_eq!(g.header("content-type"), Some("application/json"));
        assert_eq!(g.header(HEADER_ID), Some(rec.id.0.to_string().as_str()));
        assert_eq!(g.header(HEADER_TOPIC), Some(rec.topic.as_str()));
        assert_eq!(g.header(HEADER_ATTEMPT), Some("1"));
        // The signature covers the exact body bytes.
        let sig = format!("sha256={}", hmac_hex(SECRET.as_bytes(), &g.body));
        assert_eq!(g.header(HEADER_SIGNATURE), Some(sig.as_str()));
        assert_eq!(
            g.json(),
            serde_json::json!({
                "v": 1,
                "id": rec.id.0.to_string(),
                "from": (u64::MAX - 3).to_string(),
                "client_msg_id": rec.client_msg_id.to_string(),
                "topic": rec.topic,
                "time_ms": t0,
                "encoding": encoding,
                "body": body,
            })
        );
    }
    // Same topic: in id order.
    assert_eq!(
        delivered_order(&inbox, "/orders"),
        vec![text.id.0, binary.id.0]
    );

    let mut m = String::new();
    hub.metrics(&mut m);
    for line in [
        "im_c2s_queued_total 3",
        "im_c2s_delivered_total 3",
        "im_c2s_retries_total 0",
        "im_c2s_pending 0",
        "im_c2s_dead_letters 0",
        "# TYPE im_c2s_pending gauge",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }

    // Without a secret there is no signature header.
    drop(q);
    hub.shutdown();
    drop(hub);
    let dir2 = tempfile::tempdir().unwrap();
    let hub = start(&cfg(&[], Some(rx.url("/plain")), None), dir2.path());
    let q = hub.queue().await.unwrap();
    enqueue(&*q, &records(&mut gen, 9, "plain", 1, 1)).await;
    wait_until("unsigned delivery", Duration::from_secs(10), || {
        hub.stats().delivered == 1
    })
    .await;
    let g = inbox
        .got()
        .into_iter()
        .find(|g| g.path == "/plain")
        .unwrap();
    assert_eq!(g.header(HEADER_SIGNATURE), None);
}

#[tokio::test]
async fn c2s_webhook_retries_5xx_and_outage_without_loss_in_order() {
    let inbox = Arc::new(Inbox::default());
    let rx = Receiver::start(0, inbox.clone());
    inbox.set_status("/a", 500);
    inbox.set_status("/b", 503);
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        &cfg(&[("a", rx.url("/a")), ("b", rx.url("/b"))], None, None),
        dir.path(),
    );
    let q = hub.queue().await.unwrap();
    let mut gen = MsgIdGen::new(2);
    let mut all_a = Vec::new();
    let mut all_b = Vec::new();
    // Several rounds, each with records of both topics.
    for round in 0..5u64 {
        let mut recs = records(&mut gen, 7, "a", 3, round * 10);
        recs.extend(records(&mut gen, 8, "b", 2, round * 10));
        enqueue(&*q, &recs).await;
        all_a.extend(recs.iter().filter(|r| r.topic == "a").cloned());
        all_b.extend(recs.iter().filter(|r| r.topic == "b").cloned());
    }
    // The receiver answers 5xx: retried with backoff, nothing deleted.
    // The receiver records a request before the dispatcher has read its answer and counted
    // the retry: wait for both.
    wait_until("retries of both topics", Duration::from_secs(10), || {
        let got = inbox.got();
        got.iter().filter(|g| g.path == "/a").count() >= 3
            && got.iter().filter(|g| g.path == "/b").count() >= 3
            && hub.stats().retries >= 6
    })
    .await;
    let s = hub.stats();
    assert_eq!((s.delivered, s.pending), (0, 25), "{s:?}");
    assert!(s.retries >= 6, "{s:?}");
    // Only the head of each topic is tried while it fails (one request in flight per topic).
    let tried: HashSet<u64> = inbox.got().iter().map(Got::id).collect();
    assert_eq!(tried, HashSet::from([all_a[0].id.0, all_b[0].id.0]));
    let retried = inbox
        .got()
        .iter()
        .find(|g| g.header(HEADER_ATTEMPT) == Some("3"))
        .is_some();
    assert!(retried, "attempt numbers count up");

    // Recovers: everything delivered, in id order per topic.
    inbox.set_status("/a", 200);
    inbox.set_status("/b", 200);
    wait_until("25 deliveries", Duration::from_secs(10), || {
        hub.stats().delivered == 25
    })
    .await;
    assert_eq!(hub.stats().pending, 0);
    let order_a = delivered_order(&inbox, "/a");
    let order_b = delivered_order(&inbox, "/b");
    assert_eq!(order_a, all_a.iter().map(|r| r.id.0).collect::<Vec<_>>());
    assert_eq!(order_b, all_b.iter().map(|r| r.id.0).collect::<Vec<_>>());

    // The receiver goes down (connection refused), records keep coming, then it comes back on
    // the same address.
    let addr = rx.stop();
    let retries_before = hub.stats().retries;
    let mut more = Vec::new();
    for round in 5..8u64 {
        let mut recs = records(&mut gen, 7, "a", 2, round * 10);
        recs.extend(records(&mut gen, 8, "b", 2, round * 10));
        enqueue(&*q, &recs).await;
        more.extend(recs);
    }
    wait_until("retries while down", Duration::from_secs(10), || {
        hub.stats().retries >= retries_before + 4
    })
    .await;
    assert_eq!(hub.stats().pending, 12);
    let _rx = Receiver::start(addr.port(), inbox.clone());
    wait_until("all 37 delivered", Duration::from_secs(10), || {
        hub.stats().delivered == 37
    })
    .await;
    let mut want = ids(&all_a);
    want.extend(ids(&all_b));
    want.extend(ids(&more));
    assert_eq!(inbox.delivered_ids(), want, "nothing lost");
    assert_increasing(&delivered_order(&inbox, "/a"), "topic a");
    assert_increasing(&delivered_order(&inbox, "/b"), "topic b");
    assert_eq!(hub.stats().pending, 0);
}

#[tokio::test]
async fn c2s_webhook_dead_topic_does_not_block_others() {
    let inbox = Arc::new(Inbox::default());
    let rx = Receiver::start(0, inbox.clone());
    inbox.set_status("/dead", 502);
    // A webhook that refuses connections: nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/x", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        &cfg(
            &[("dead", rx.url("/dead")), ("refused", closed_url)],
            Some(rx.url("/live")),
            None,
        ),
        dir.path(),
    );
    let q = hub.queue().await.unwrap();
    let mut gen = MsgIdGen::new(3);
    for round in 0..10u64 {
        let mut recs = records(&mut gen, 1, "dead", 1, round);
        recs.extend(records(&mut gen, 1, "refused", 1, round));
        recs.extend(records(&mut gen, 1, "live", 5, round * 10));
        enqueue(&*q, &recs).await;
    }
    wait_until("live topic delivered", Duration::from_secs(10), || {
        delivered_order(&inbox, "/live").len() == 50
    })
    .await;
    assert_increasing(&delivered_order(&inbox, "/live"), "live topic");
    let s = hub.stats();
    assert_eq!((s.delivered, s.pending), (50, 20), "{s:?}");
    assert!(s.retries > 0);
}

#[tokio::test]
async fn c2s_webhook_undelivered_records_survive_restart() {
    let inbox = Arc::new(Inbox::default());
    let rx = Receiver::start(0, inbox.clone());
    inbox.set_status("/r", 500);
    let data = tempfile::tempdir().unwrap();
    // The server keeps its store in the data dir too; the c2s database lives beside it.
    let store = im_store::FjallStore::open(data.path()).expect("store");
    let c = cfg(&[], Some(rx.url("/r")), Some(SECRET));
    let hub = start(&c, data.path());
    let q = hub.queue().await.unwrap();
    let mut gen = MsgIdGen::new(4);
    let mut recs = records(&mut gen, 5, "r", 4, 0);
    recs.extend(records(&mut gen, 6, "s", 3, 0));
    enqueue(&*q, &recs[..4]).await;
    enqueue(&*q, &recs[4..]).await;
    wait_until("failed attempts", Duration::from_secs(10), || {
        hub.stats().retries >= 2
    })
    .await;
    assert_eq!(hub.stats().pending, 7);
    drop(q);
    hub.shutdown();
    drop(hub);
    drop(store);
    assert!(inbox.delivered().is_empty());

    // Restart: the queue is found again and delivered once the receiver answers.
    let store = im_store::FjallStore::open(data.path()).expect("store reopens");
    inbox.set_status("/r", 200);
    let hub = start(&c, data.path());
    assert_eq!(hub.stats().pending, 7, "found after restart");
    wait_until("delivery after restart", Duration::from_secs(10), || {
        hub.stats().delivered == 7
    })
    .await;
    assert_eq!(inbox.delivered_ids(), ids(&recs));
    let order: Vec<u64> = delivered_order(&inbox, "/r");
    let mut want = recs.clone();
    want.sort_by_key(|r| (r.topic.clone(), r.id));
    for topic in ["r", "s"] {
        let got: Vec<u64> = inbox
            .delivered()
            .iter()
            .filter(|g| g.json()["topic"] == topic)
            .map(Got::id)
            .collect();
        let exp: Vec<u64> = want
            .iter()
            .filter(|r| r.topic == topic)
            .map(|r| r.id.0)
            .collect();
        assert_eq!(got, exp, "topic {topic} in id order");
    }
    assert_eq!(order.len(), 7);
    hub.shutdown();
    drop(hub);

    // Delivered records stay deleted across another restart.
    let hub = start(&c, data.path());
    assert_eq!(hub.stats().pending, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox.delivered().len(), 7, "nothing delivered twice");
    drop(hub);
    drop(store);
    drop(rx);
}

#[tokio::test]
async fn c2s_webhook_unknown_topic_and_4xx_are_dead_lettered() {
    let inbox = Arc::new(Inbox::default());
    let rx = Receiver::start(0, inbox.clone());
    inbox.set_status("/reject", 422);
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        &cfg(
            &[("known", rx.url("/known")), ("reject", rx.url("/reject"))],
            None,
            None,
        ),
        dir.path(),
    );
    // What a worker can check per report before queuing it.
    assert!(hub.check_topic("known").is_ok());
    assert!(matches!(hub.check_topic("nope"), Err(C2sError::Invalid(_))));
    assert!(matches!(hub.check_topic(""), Err(C2sError::Invalid(_))));

    let q = hub.queue().await.unwrap();
    // A record with an invalid topic fails the whole call, non-retryably.
    let mut gen = MsgIdGen::new(5);
    let bad = records(&mut gen, 1, "", 1, 0);
    let e = q.enqueue(&bad).await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(hub.stats().enqueue_errors, 1);

    // Queued anyway (a worker that did not check): parked, not lost, not blocking.
    let nope = records(&mut gen, 1, "nope", 2, 0);
    let rejected = records(&mut gen, 1, "reject", 1, 0);
    let known = records(&mut gen, 1, "known", 3, 0);
    let mut all = nope.clone();
    all.extend(rejected.clone());
    all.extend(known.clone());
    enqueue(&*q, &all).await;
    wait_until(
        "known delivered, others parked",
        Duration::from_secs(10),
        || {
            let s = hub.stats();
            s.delivered == 3 && s.dead_letters == 3
        },
    )
    .await;
    let s = hub.stats();
    assert_eq!((s.pending, s.dead_lettered, s.retries), (0, 3, 0), "{s:?}");
    // 4xx is not retried: the record was posted exactly once.
    assert_eq!(
        inbox.got().iter().filter(|g| g.path == "/reject").count(),
        1
    );
    let dead = hub.dead_letters(100).unwrap();
    assert_eq!(dead.len(), 3);
    let reasons: HashMap<MsgId, DeadReason> =
        dead.iter().map(|d| (d.record.id, d.reason)).collect();
    assert_eq!(reasons[&nope[0].id], DeadReason::NoWebhook);
    assert_eq!(reasons[&nope[1].id], DeadReason::NoWebhook);
    assert_eq!(
        reasons[&rejected[0].id],
        DeadReason::Rejected { status: 422 }
    );
    let back = dead.iter().find(|d| d.record.id == rejected[0].id).unwrap();
    assert_eq!(
        back.record, rejected[0],
        "dead letters keep the whole record"
    );
    let mut m = String::new();
    hub.metrics(&mut m);
    assert!(m.contains("\nim_c2s_dead_letters 3\n"), "{m}");
    assert!(m.contains("\nim_c2s_dead_lettered_total 3\n"), "{m}");
    drop(q);
    hub.shutdown();
    drop(hub);

    // After a restart with a default webhook and the business side fixed, a redrive delivers
    // them.
    inbox.set_status("/reject", 200);
    let hub = start(
        &cfg(
            &[("known", rx.url("/known")), ("reject", rx.url("/reject"))],
            Some(rx.url("/fallback")),
            None,
        ),
        dir.path(),
    );
    assert_eq!(
        hub.stats().dead_letters,
        3,
        "dead letters survive a restart"
    );
    assert_eq!(hub.redrive_dead_letters(Some("reject")).unwrap(), 1);
    assert_eq!(hub.redrive_dead_letters(None).unwrap(), 2);
    wait_until("redriven delivered", Duration::from_secs(10), || {
        hub.stats().delivered == 3
    })
    .await;
    assert!(hub.dead_letters(10).unwrap().is_empty());
    assert_eq!(hub.stats().dead_letters, 0);
    assert_eq!(
        delivered_order(&inbox, "/fallback"),
        vec![nope[0].id.0, nope[1].id.0]
    );
    assert!(inbox.delivered_ids().contains(&rejected[0].id.0));
}

#[tokio::test]
async fn c2s_webhook_concurrent_workers_keep_per_sender_order() {
    let inbox = Arc::new(Inbox::default());
    let rx = Receiver::start(0, inbox.clone());
    let dir = tempfile::tempdir().unwrap();
    let hub = start(&cfg(&[], Some(rx.url("/all")), None), dir.path());
    // Four "workers": own thread, own runtime, own queue handle and id generator, one topic.
    const WORKERS: u64 = 4;
    const ROUNDS: u64 = 40;
    const PER_ROUND: usize = 5;
    let mut threads = Vec::new();
    for w in 0..WORKERS {
        let hub = hub.clone();
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let q = hub.queue().await.unwrap();
                let mut gen = MsgIdGen::new(10 + w as u16);
                let mut mine = Vec::new();
                for round in 0..ROUNDS {
                    let recs = records(&mut gen, 100 + w, "shared", PER_ROUND, round * 100);
                    // Ids are taken at the start of a round and committed at its end: another
                    // worker's higher ids can commit (and be delivered) first, the dispatcher
                    // must still come back for these lower ones.
                    let pause = (w * 7 + round * 3) % 4;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    q.enqueue(&recs).await.unwrap();
                    mine.extend(recs);
                    // Let the dispatcher catch up, so it sits at the head of the queue.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                mine
            })
        }));
    }
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap());
    }
    let n = (WORKERS * ROUNDS) as usize * PER_ROUND;
    wait_until("all delivered", Duration::from_secs(30), || {
        hub.stats().delivered as usize == n
    })
    .await;
    assert_eq!(inbox.delivered_ids(), ids(&all), "nothing lost");
    // Each sender's records (one worker each) arrive in the order they were queued.
    let mut by_sender: HashMap<String, Vec<u64>> = HashMap::new();
    for g in inbox.delivered() {
        let v = g.json();
        by_sender
            .entry(v["from"].as_str().unwrap().to_owned())
            .or_default()
            .push(v["client_msg_id"].as_str().unwrap().parse().unwrap());
    }
    assert_eq!(by_sender.len(), WORKERS as usize);
    for (from, cmids) in by_sender {
        assert_increasing(&cmids, &format!("sender {from}"));
    }
    assert_eq!(hub.stats().pending, 0);
}
