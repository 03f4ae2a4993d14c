//! A worker whose store cannot commit stalls without acknowledging anything, its queue fills, and
//! the gate's admission (`UpstreamLink::admit`) sheds new client frames with `Overloaded` until
//! the store is back; then every queued request is answered. Real worker threads, a real fjall
//! store behind a `FaultyStore` that is made unavailable on purpose.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use im_logic::store::FjallStore;
use im_logic::LogicConfig;
use im_shared::link::{Up, UpstreamLink};
use im_shared::token::HmacTokens;
use im_shared::{Command, ConnId, DeviceType, ErrorCode, Seq, UserId};
use im_testkit::{DownFrame, FaultyStore, RecordingSink};

/// Deadline of every wait.
const WAIT: Duration = Duration::from_secs(20);

fn acks(frames: &[DownFrame]) -> usize {
    frames
        .iter()
        .filter(|f| {
            matches!(
                f.cmd,
                Command::SendAck {
                    code: ErrorCode::Ok,
                    ..
                }
            )
        })
        .count()
}

/// One logic worker over a fjall store that can be made unavailable, with user 1 logged in.
struct Node {
    _dir: tempfile::TempDir,
    store: FaultyStore<FjallStore>,
    sink: Arc<RecordingSink>,
    logic: Arc<im_logic::LogicHandle>,
}

const A: UserId = UserId(1);

fn conn() -> ConnId {
    ConnId::new(1, 0, 1)
}

/// A `SendC2c` of user 1 to user 2 with client msg id `i`.
fn send(i: u64) -> Up {
    let c = Command::SendC2c {
        client_msg_id: i,
        to: UserId(2),
        body: Bytes::from_static(b"x"),
    };
    Up::request(conn(), A, 100 + i as u32, &c)
}

fn logged_in(max_queued: usize) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = FaultyStore::new(FjallStore::open(dir.path()).unwrap());
    let tokens = HmacTokens::new(b"stall".to_vec());
    let sink = Arc::new(RecordingSink::default());
    let cfg = LogicConfig {
        workers: 1,
        max_queued,
        ..LogicConfig::default()
    };
    let logic = Arc::new(
        im_logic::start(cfg, store.clone(), Arc::new(tokens.clone()), sink.clone()).unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let login = Command::Login {
        uid: A,
        device_type: DeviceType::Phone,
        device_id: "d".into(),
        last_seq: Seq(0),
        token: tokens.mint(A, now + 600),
    };
    logic.send(logic.lane_of(A), vec![Up::request(conn(), A, 1, &login)]);
    sink.wait("the login result", WAIT, |f| {
        f.iter().any(|f| {
            matches!(
                f.cmd,
                Command::LoginResult {
                    code: ErrorCode::Ok,
                    ..
                }
            )
        })
    });
    Node {
        _dir: dir,
        store,
        sink,
        logic,
    }
}

impl Node {
    /// Makes the store unavailable and waits until the worker's round of `send(0)` is retrying
    /// its commit.
    fn stall(&self) {
        self.store.set_unavailable(true);
        self.logic.send(self.logic.lane_of(A), vec![send(0)]);
        let deadline = Instant::now() + WAIT;
        while self
            .store
            .attempts()
            .iter()
            .filter(|a| a.error.is_some())
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "the commit was never retried");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn a_worker_that_cannot_commit_acks_nothing_and_its_queue_sheds_with_overloaded() {
    const MAX_QUEUED: usize = 8;
    let n = logged_in(MAX_QUEUED);
    let (logic, sink, store) = (&n.logic, &n.sink, &n.store);
    let lane = logic.lane_of(A);
    // The first frame's round stalls in its commit.
    n.stall();
    // Frames queue behind it until the queue is full; then the gate is told to shed.
    let mut admitted = 0;
    while logic.admit(lane, 0).is_ok() {
        admitted += 1;
        assert!(admitted <= MAX_QUEUED, "admitted past max_queued");
        logic.send(lane, vec![send(admitted as u64)]);
    }
    assert_eq!(admitted, MAX_QUEUED);
    assert_eq!(logic.admit(lane, 0), Err(ErrorCode::Overloaded));
    // Nothing was acknowledged while the store could not commit.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(acks(&sink.frames()), 0);

    store.set_unavailable(false);
    sink.wait("every queued request answered", WAIT, |f| {
        acks(f) == MAX_QUEUED + 1
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while logic.admit(lane, 0).is_err() {
        assert!(Instant::now() < deadline, "the queue never drained");
        std::thread::sleep(Duration::from_millis(5));
    }
    logic.shutdown();
}

/// Issue 14: messages from other logic nodes cannot pile up without bound behind a stalled
/// worker: past `max_queued` of them the link reader that hands them over waits (and with it
/// the link: TCP slows the other node), and goes on once the worker takes them.
#[test]
fn messages_from_other_nodes_wait_in_the_link_at_max_queued_behind_a_stalled_worker() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MAX_QUEUED: usize = 8;
    let n = logged_in(MAX_QUEUED);
    let logic = &n.logic;
    n.stall();
    // A link reader hands over twice the bound.
    let handed = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (logic, handed) = (logic.clone(), handed.clone());
        std::thread::spawn(move || {
            for _ in 0..2 * MAX_QUEUED {
                logic.deliver_peer(0, im_logic::worker::WorkerMsg::Delivered(Vec::new()));
                handed.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        handed.load(Ordering::SeqCst),
        MAX_QUEUED,
        "the reader did not wait"
    );
    let mut m = String::new();
    logic.metrics_ref().render_inboxes(1, &mut m);
    assert!(
        m.contains(&format!("im_logic_peer_inbox{{worker=\"0\"}} {MAX_QUEUED}")),
        "{m}"
    );
    // The store is back: the worker takes them and the reader goes on.
    n.store.set_unavailable(false);
    let deadline = Instant::now() + WAIT;
    while handed.load(Ordering::SeqCst) < 2 * MAX_QUEUED {
        assert!(Instant::now() < deadline, "the reader never went on");
        std::thread::sleep(Duration::from_millis(5));
    }
    reader.join().unwrap();
    logic.shutdown();
}
