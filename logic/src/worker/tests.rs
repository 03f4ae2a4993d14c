//! Unit tests of the worker as a core: no sockets, no threads, no wall clock. A test builds
//! workers over a real fjall store (in a temporary directory) wrapped in a [`FaultyStore`], hands
//! them client frames and worker messages, runs their rounds with [`Worker::step`] at a time it
//! chooses, and reads what left them: frames to gates (a [`RecordingSink`]), messages to other
//! workers (their inboxes, which the test pumps) and the store.

use super::large::MUTED_HEADS_EVERY_MS;
use im_shared::proto::{
    GroupEvent, GroupEventKind, GroupHead, CONV_GROUP_EVENT, ROLE_ADMIN, ROLE_MEMBER, ROLE_OWNER,
};
use im_shared::token::HmacTokens;
use im_store::FjallStore;
use im_testkit::{DownFrame, FaultyStore, RecordingSink};
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;

type TestStore = FaultyStore<FjallStore>;

/// A fixed, plausible time (2026-12-03): tokens minted for it are valid.
const T0: u64 = 1_796_342_400_000;

/// One frame a connection received.
type Out = DownFrame;

struct Fx {
    /// Removed with the fixture.
    _dir: tempfile::TempDir,
    store: TestStore,
    sink: Arc<RecordingSink>,
    tokens: HmacTokens,
    cfg: LogicConfig,
    workers: Vec<Worker<TestStore>>,
    inboxes: Vec<UnboundedReceiver<WorkerMsg>>,
    depth: Arc<AtomicUsize>,
    /// Frames decoded but not yet taken by [`Fx::out`].
    kept: Vec<Out>,
    now: u64,
    /// Links to a second node (this fixture's node is node 0 of 2), if any.
    peers: Option<Arc<crate::peer::PeerLinks>>,
}

impl Fx {
    /// A node of `n` workers over a fresh store.
    async fn new(n: usize) -> Fx {
        Self::with(n, LogicConfig::default()).await
    }

    async fn with(n: usize, cfg: LogicConfig) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::new(FjallStore::open(dir.path()).unwrap());
        let mut fx = Fx {
            _dir: dir,
            store,
            sink: Arc::default(),
            tokens: HmacTokens::new(b"worker-tests".to_vec()),
            cfg: LogicConfig { workers: n, ..cfg },
            workers: Vec::new(),
            inboxes: Vec::new(),
            depth: Arc::default(),
            kept: Vec::new(),
            now: T0,
            peers: None,
        };
        fx.restart().await;
        fx
    }

    /// A fixture whose node is node 0 of 2, with `peers` its links to node 1.
    async fn with_peers(n: usize, peers: Arc<crate::peer::PeerLinks>) -> Fx {
        let mut fx = Self::new(n).await;
        fx.peers = Some(peers);
        fx.restart().await;
        fx
    }

    /// Replaces every worker by a fresh one over the same store, as a restart of the process
    /// does (in-memory state and unsent messages are gone), and runs their start.
    async fn restart(&mut self) {
        let n = self.cfg.workers;
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let nodes = if self.peers.is_some() { 2 } else { 1 };
        let router = Arc::new(Router::new(0, nodes, txs, self.peers.clone()));
        self.workers = (0..n)
            .map(|i| {
                Worker::new(
                    i,
                    self.cfg.clone(),
                    self.store.clone(),
                    Arc::new(self.tokens.clone()),
                    self.sink.clone(),
                    router.clone(),
                    self.depth.clone(),
                    Services::default(),
                    Arc::new(Metrics::default()),
                )
            })
            .collect();
        self.inboxes = rxs;
        for w in &mut self.workers {
            w.start(self.now).await;
        }
    }

    /// The local worker of `uid`.
    fn worker_of(&self, uid: UserId) -> usize {
        self.workers[0].router.local_of(uid)
    }

    /// The first user id ≥ `from` that lives on worker `w`.
    fn user_on(&self, w: usize, from: u64) -> UserId {
        (from..)
            .map(UserId)
            .find(|&u| self.worker_of(u) == w)
            .unwrap()
    }

    /// Runs one round of the worker of `uid`'s connection with these client frames.
    async fn client(&mut self, conn: ConnId, uid: UserId, cmds: Vec<(u32, Command)>) {
        let ups = cmds
            .into_iter()
            .map(|(req_id, c)| {
                self.depth.fetch_add(1, Ordering::Relaxed);
                Up::request(conn, uid, req_id, &c)
            })
            .collect();
        let w = self.worker_of(uid);
        self.step(w, vec![WorkerMsg::Gate(ups)]).await.unwrap();
    }

    async fn step(&mut self, w: usize, msgs: Vec<WorkerMsg>) -> Result<Step, Halt> {
        self.workers[w].step(msgs, self.now).await
    }

    /// `n` messages from `from` (logged in on `conn`) to `to`, client msg ids 1..=n, pumped
    /// until every worker is idle.
    async fn send_many(&mut self, conn: ConnId, from: UserId, to: UserId, n: u64) {
        let sends = (0..n)
            .map(|i| (i as u32 + 1, send(i + 1, to, "x")))
            .collect();
        self.client(conn, from, sends).await;
        self.pump().await;
    }

    /// Lets the lazy writes of every worker fall due and runs empty rounds on each (what the
    /// worker's timer does) until they are written: the first starts the drain, paced over the
    /// next `LAZY_FLUSH_MS`, one at its end writes the rest.
    async fn settle(&mut self) {
        for _ in 0..3 {
            self.now += LAZY_FLUSH_MS;
            for w in 0..self.workers.len() {
                self.step(w, Vec::new()).await.unwrap();
            }
        }
        for w in 0..self.workers.len() {
            assert!(self.workers[w].lazy.is_empty(), "lazy writes left");
        }
    }

    /// Runs rounds until no worker has anything in its inbox (bounded).
    async fn pump(&mut self) {
        for _ in 0..100 {
            let mut idle = true;
            for w in 0..self.workers.len() {
                let mut msgs = Vec::new();
                while let Ok(m) = self.inboxes[w].try_recv() {
                    msgs.push(m);
                }
                if !msgs.is_empty() {
                    idle = false;
                    self.step(w, msgs).await.unwrap();
                }
            }
            if idle {
                return;
            }
        }
        panic!("workers still busy after 100 rounds");
    }

    /// Messages waiting in worker `w`'s inbox (taken out; one from another worker is unwrapped
    /// and counted as taken, as the worker would).
    fn inbox(&mut self, w: usize) -> Vec<WorkerMsg> {
        let mut v = Vec::new();
        while let Ok(m) = self.inboxes[w].try_recv() {
            v.push(match m {
                WorkerMsg::Local { from, items, msg } => {
                    let limit = self.cfg.max_worker_backlog;
                    let router = &self.workers[w].router;
                    router.taken(from as usize, w, items as usize, limit);
                    *msg
                }
                m => m,
            });
        }
        v
    }

    /// Messages waiting in worker `w`'s inbox, taken out as they are (a worker's own step gives
    /// back the backlog counts).
    fn raw_inbox(&mut self, w: usize) -> Vec<WorkerMsg> {
        std::iter::from_fn(|| self.inboxes[w].try_recv().ok()).collect()
    }

    /// Everything sent to gates since the last call, decoded.
    fn out(&mut self) -> Vec<Out> {
        let mut out = std::mem::take(&mut self.kept);
        out.extend(self.sink.take());
        out
    }

    /// A `Login` of `uid` with a token valid for an hour.
    fn login_cmd(&self, uid: UserId, dt: DeviceType, device_id: &str, last_seq: Seq) -> Command {
        Command::Login {
            uid,
            device_type: dt,
            device_id: device_id.into(),
            last_seq,
            token: self.tokens.mint(uid, self.now / 1000 + 3600),
        }
    }

    async fn login(&mut self, conn: ConnId, uid: UserId, dt: DeviceType) -> Seq {
        let login = self.login_cmd(uid, dt, &format!("dev-{}", conn.serial()), Seq(0));
        self.client(conn, uid, vec![(1, login)]).await;
        // Takes the login result; everything else stays for `out`.
        let mut out = self.out();
        let i = out
            .iter()
            .position(|o| o.conn == conn && matches!(o.cmd, Command::LoginResult { .. }))
            .expect("a login result");
        let o = out.remove(i);
        self.kept = out;
        assert!(o.bind, "login not bound: {o:?}");
        match o.cmd {
            Command::LoginResult {
                code: ErrorCode::Ok,
                max_seq,
                ..
            } => max_seq,
            c => panic!("login failed: {c:?}"),
        }
    }

    async fn timeline(&self, uid: UserId) -> Vec<Message> {
        self.store.timeline(uid, Seq(0), 1000).await.unwrap()
    }

    /// Runs one round of the worker that owns `group` with what waits in its inbox.
    async fn step_owner(&mut self, group: GroupId) {
        let w = self.worker_of(UserId(group.0));
        let msgs = self.inbox(w);
        self.step(w, msgs).await.unwrap();
    }

    /// Whether none of `users` has a mention entry.
    async fn mentions_none(&self, users: &[UserId]) -> bool {
        for u in users {
            if self
                .timeline(*u)
                .await
                .iter()
                .any(|m| m.conv == im_shared::proto::CONV_MENTION)
            {
                return false;
            }
        }
        true
    }
}

fn conn(serial: u32) -> ConnId {
    ConnId::new(1, 0, serial)
}

fn send(client_msg_id: u64, to: UserId, body: &'static str) -> Command {
    Command::SendC2c {
        client_msg_id,
        to,
        body: Bytes::from_static(body.as_bytes()),
    }
}

/// `(client_msg_id, msg_id, seq, prev_seq)` of every `SendAck` in `out`, in order.
fn acks(out: &[Out]) -> Vec<(u64, MsgId, Seq, Seq)> {
    out.iter()
        .filter_map(|o| match &o.cmd {
            Command::SendAck {
                code: ErrorCode::Ok,
                client_msg_id,
                msg_id,
                seq,
                prev_seq,
                ..
            } => Some((*client_msg_id, *msg_id, *seq, *prev_seq)),
            _ => None,
        })
        .collect()
}

/// Messages delivered live to `c`, in order.
fn delivered_to(out: &[Out], c: ConnId) -> Vec<Message> {
    out.iter()
        .filter(|o| o.conn == c)
        .filter_map(|o| match &o.cmd {
            Command::Deliver(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// `Delivered` notices written to connection `c`: (msg_id, recipient).
fn notices_to(out: &[Out], c: ConnId) -> Vec<(MsgId, UserId)> {
    out.iter()
        .filter(|o| o.conn == c)
        .filter_map(|o| match o.cmd {
            Command::Delivered { msg_id, recipient } => Some((msg_id, recipient)),
            _ => None,
        })
        .collect()
}

/// `a` (on `conn(1)`) sends one c2c message to `b` (on `conn(2)`), and `b`'s device acks it;
/// returns the message's id and its seq in `b`'s timeline. What the ack caused is left in the
/// fixture (inboxes, output).
async fn send_one_and_ack(fx: &mut Fx, a: UserId, b: UserId) -> (MsgId, Seq) {
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.client(conn(1), a, vec![(1, send(1, b, "m1"))]).await;
    fx.pump().await;
    let out = fx.out();
    let msg_id = acks(&out)[0].1;
    let got = delivered_to(&out, conn(2));
    assert_eq!(got.len(), 1);
    fx.client(
        conn(2),
        b,
        vec![(0, Command::DeliverAck { seq: got[0].seq })],
    )
    .await;
    (msg_id, got[0].seq)
}

#[tokio::test]
async fn a_c2c_send_to_another_workers_user_is_acked_after_the_senders_commit_and_delivered_after_the_recipients(
) {
    let mut fx = Fx::new(2).await;
    let (a, b) = (fx.user_on(0, 1), fx.user_on(1, 1));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Tablet).await;
    fx.client(
        conn(1),
        a,
        vec![(10, send(100, b, "one")), (11, send(101, b, "two"))],
    )
    .await;
    // The sender's round acked; the appends for the recipient wait for the recipient's round,
    // and the outbox holds them until then.
    assert!(fx.timeline(b).await.is_empty());
    let mut out = fx.out();
    assert_eq!(out.iter().filter(|o| o.conn == conn(2)).count(), 0);
    let shard = im_shared::shard::vshard_of(a);
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), 2);
    fx.pump().await;
    out.extend(fx.out());
    check_two_sends_arrived(&fx, &out, a, b).await;
    // Confirmed: the outbox entries are deleted with the sender's next commit, or alone once the
    // deletion has waited LAZY_FLUSH_MS.
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), 2);
    fx.settle().await;
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_c2c_send_to_a_user_of_the_same_worker_is_stored_for_both_in_one_commit_without_an_outbox(
) {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Tablet).await;
    let commits = fx.store.attempts().len();
    fx.client(
        conn(1),
        a,
        vec![(10, send(100, b, "one")), (11, send(101, b, "two"))],
    )
    .await;
    // One round, one commit: both timelines are written, nothing waits in an outbox.
    assert_eq!(fx.store.attempts().len(), commits + 1);
    assert_eq!(fx.timeline(b).await.len(), 2);
    let shard = im_shared::shard::vshard_of(a);
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
    let out = fx.out();
    check_two_sends_arrived(&fx, &out, a, b).await;
    // Nothing else is pending for another round.
    assert!(fx.inbox(0).is_empty());
}

/// What both c2c tests above expect after sending "one" (client_msg_id 100, req 10) and "two"
/// (101, req 11) from `a` on conn 1 to `b` on conn 2.
async fn check_two_sends_arrived(fx: &Fx, out: &[Out], a: UserId, b: UserId) {
    let acks = acks(out);
    assert_eq!(acks.len(), 2);
    let req_ids: Vec<_> = out
        .iter()
        .filter(|o| matches!(o.cmd, Command::SendAck { .. }))
        .map(|o| (o.conn, o.req_id))
        .collect();
    assert_eq!(req_ids, [(conn(1), 10), (conn(1), 11)]);
    // The sender's timeline: seq 1 and 2, each naming the one before.
    assert_eq!((acks[0].2, acks[0].3), (Seq(1), Seq(0)));
    assert_eq!((acks[1].2, acks[1].3), (Seq(2), Seq(1)));
    assert!(acks[0].1 < acks[1].1, "msg ids increase");
    // The recipient got both, live, in order, with its own seqs.
    let got = delivered_to(out, conn(2));
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].seq, got[0].prev_seq), (Seq(1), Seq(0)));
    assert_eq!((got[1].seq, got[1].prev_seq), (Seq(2), Seq(1)));
    assert_eq!(got[0].msg_id, acks[0].1);
    assert_eq!(got[1].body, Bytes::from_static(b"two"));
    assert_eq!(fx.timeline(b).await.len(), 2);
    assert_eq!(fx.timeline(a).await.len(), 2);
}

#[tokio::test]
async fn a_retried_client_msg_id_gets_the_first_ack_and_is_stored_once() {
    // A window of 2 in memory: the third retry below is answered from the store's record.
    let cfg = LogicConfig {
        dedup_window: 2,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(1, cfg).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    // The same client_msg_id twice in one round, then again in a later round.
    fx.client(
        conn(1),
        a,
        vec![(1, send(7, b, "x")), (2, send(7, b, "x again"))],
    )
    .await;
    fx.now += 10;
    fx.client(conn(1), a, vec![(3, send(7, b, "x once more"))])
        .await;
    // Push 7 out of the in-memory window, then retry it after a restart too.
    fx.client(conn(1), a, vec![(4, send(8, b, "y")), (5, send(9, b, "z"))])
        .await;
    fx.client(conn(1), a, vec![(6, send(7, b, "x from the store"))])
        .await;
    fx.restart().await;
    fx.login(conn(3), a, DeviceType::Phone).await;
    fx.client(conn(3), a, vec![(7, send(7, b, "x after a restart"))])
        .await;
    fx.pump().await;
    let acks = acks(&fx.out());
    let sevens: Vec<_> = acks.iter().filter(|a| a.0 == 7).collect();
    assert_eq!(sevens.len(), 5);
    for s in &sevens {
        assert_eq!(*s, sevens[0], "every retry gets the first ack");
    }
    let tl = fx.timeline(b).await;
    let bodies: Vec<_> = tl.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        ["x", "y", "z"].map(|s| Bytes::from_static(s.as_bytes()))
    );
    // Past the dedup window the stored record no longer makes it a retry: a new message (the
    // same rule as ScyllaDB's TTL on its dedup rows).
    fx.now += im_store::DEDUP_WINDOW.as_millis() as u64 + 1;
    fx.restart().await;
    fx.login(conn(4), a, DeviceType::Phone).await;
    fx.client(conn(4), a, vec![(8, send(7, b, "x, a week later"))])
        .await;
    fx.pump().await;
    let late = self::acks(&fx.out());
    assert_eq!(late.len(), 1);
    assert_ne!(late[0].1, sevens[0].1, "a new message id");
    assert_eq!(fx.timeline(b).await.len(), 4);
}

#[tokio::test]
async fn appends_for_another_worker_leave_once_the_record_is_written_and_nothing_else_before_the_commit(
) {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let a2 = fx.user_on(0, a.0 + 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.out();
    // Observed at the start of a commit and right after its `written`: appends waiting at
    // worker 1 (× 1000) plus what reached the gates.
    let (router, sink) = (fx.workers[0].router.clone(), fx.sink.clone());
    fx.store
        .observe(move || router.waiting_at(1) * 1000 + sink.len());
    let gate_before = fx.sink.len();
    let before = fx.store.attempts().len();
    fx.client(conn(1), a, vec![(1, send(1, b, "across"))]).await;
    let attempts = fx.store.attempts().split_off(before);
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].observed, gate_before);
    assert_eq!(
        attempts[0].observed_written,
        Some(1000 + gate_before),
        "the append waits at worker 1 while the sender's ack has not left: {attempts:?}"
    );
    // To a user of the same worker nothing is handed on: one plain commit.
    fx.client(conn(1), a, vec![(2, send(2, a2, "same worker"))])
        .await;
    let last = fx.store.attempts().pop().unwrap();
    assert_eq!(last.observed_written, None, "{last:?}");
    // And the message arrives, once.
    fx.pump().await;
    let out = fx.out();
    assert_eq!(acks(&out).len(), 2);
    let got = delivered_to(&out, conn(2));
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"across");
    assert_eq!(fx.timeline(b).await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_commit_error_is_retried_with_backoff_and_nothing_is_released_before_the_commit(
) {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let sink = fx.sink.clone();
    fx.store.observe(move || sink.len());
    let before = fx.store.attempts().len();
    for _ in 0..3 {
        fx.store
            .fail_next_commit(StoreError::Unavailable("test".into()));
    }
    fx.client(conn(1), a, vec![(5, send(1, b, "hello"))]).await;
    let attempts = fx.store.attempts().split_off(before);
    assert_eq!(attempts.len(), 4, "{attempts:?}");
    assert!(attempts[..3].iter().all(|a| a.error.is_some()));
    assert_eq!(attempts[3].error, None);
    // Nothing reached a gate at any attempt: no ack, no delivery before the commit.
    assert!(attempts.iter().all(|a| a.observed == 0), "{attempts:?}");
    // Backoff doubles from 20 ms.
    let gaps: Vec<_> = attempts
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_millis())
        .collect();
    assert_eq!(gaps, [20, 40, 80]);
    // After the commit: the ack and, after the recipient's round, the delivery, once.
    fx.pump().await;
    let out = fx.out();
    assert_eq!(acks(&out).len(), 1);
    assert_eq!(delivered_to(&out, conn(2)).len(), 1);
    assert_eq!(fx.timeline(b).await.len(), 1);
}

#[tokio::test]
async fn a_fatal_commit_error_halts_the_worker_and_releases_nothing() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.store
        .fail_next_commit(StoreError::Io("disk gone".into()));
    let w = fx.worker_of(a);
    let up = Up::request(conn(1), a, 9, &send(1, b, "lost?"));
    let r = fx.step(w, vec![WorkerMsg::Gate(vec![up])]).await;
    assert!(matches!(r, Err(Halt::Fatal(StoreError::Io(_)))), "{r:?}");
    // No ack, no delivery, no append sent to the recipient's worker, nothing stored.
    assert!(fx.out().is_empty());
    assert!(fx.inbox(1).is_empty());
    assert!(fx.timeline(a).await.is_empty());
    assert!(fx.timeline(b).await.is_empty());
    // The restarted process accepts the client's retry as new.
    fx.restart().await;
    fx.login(conn(3), a, DeviceType::Phone).await;
    fx.client(conn(3), a, vec![(10, send(1, b, "lost?"))]).await;
    fx.pump().await;
    assert_eq!(acks(&fx.out()).len(), 1);
    assert_eq!(fx.timeline(b).await.len(), 1);
}

#[tokio::test]
async fn a_fenced_commit_halts_the_worker_and_releases_nothing() {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.store.fail_next_commit(StoreError::Fenced {
        node: 0,
        incarnation: 1,
        fence: 2,
    });
    let up = Up::request(conn(1), a, 3, &send(1, b, "x"));
    let r = fx.step(0, vec![WorkerMsg::Gate(vec![up])]).await;
    assert!(matches!(r, Err(Halt::Fenced(_))), "{r:?}");
    assert!(fx.out().is_empty());
    assert!(fx.timeline(b).await.is_empty());
}

#[tokio::test]
async fn a_fan_out_across_workers_is_kept_in_the_outbox_until_confirmed_and_replayed_after_a_crash()
{
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.client(conn(1), a, vec![(1, send(1, b, "m1"))]).await;
    // Acked once the sender's side is durable; the recipient's append is in flight.
    let ack = acks(&fx.out())[0];
    let shard = vshard_of(a);
    let entries = fx.store.outbox(shard).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].recipients, vec![b]);
    assert_eq!(entries[0].msg.msg_id, ack.1);
    // The process dies before worker 1 handled the append: the append is lost with memory.
    let lost = fx.inbox(1);
    assert!(matches!(&lost[..], [WorkerMsg::Append(v)] if v.len() == 1 && !v[0].replay));
    fx.restart().await;
    // At start, worker 0 replays its outbox to worker 1.
    let replay = fx.inbox(1);
    assert!(
        matches!(&replay[..], [WorkerMsg::Append(v)] if v.len() == 1 && v[0].replay && v[0].recipient == b),
        "no replay"
    );
    // The lost live append and the replay both arrive (a duplicate): stored once.
    fx.step(1, lost).await.unwrap();
    fx.step(1, replay).await.unwrap();
    let tl = fx.timeline(b).await;
    assert_eq!(tl.len(), 1);
    assert_eq!((tl[0].msg_id, tl[0].seq), (ack.1, Seq(1)));
    // Worker 1 confirmed (twice); worker 0 deletes the outbox entry.
    fx.pump().await;
    fx.settle().await;
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
    // Nothing left to replay at the next start.
    fx.restart().await;
    assert!(fx.inbox(1).is_empty());
}

/// Appends a fake node received, one list per connection: `(recipient, msg_id, replay)`.
type Got = Arc<std::sync::Mutex<Vec<Vec<(UserId, MsgId, bool)>>>>;

/// A fake node 1 for a node-0 worker's peer link: takes connections one after the other and
/// records the appends that arrive on each; reads nothing until `go` is set; ends a connection
/// once it got `cut` appends on it (the link then comes back in a new epoch).
fn fake_node(cut: usize, go: Arc<std::sync::atomic::AtomicBool>) -> (std::net::SocketAddr, Got) {
    use im_shared::link::{self, LinkMsg};
    use std::io::Read;
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = peer.local_addr().unwrap();
    let got: Got = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for mut s in peer.incoming().flatten() {
            g.lock().unwrap().push(Vec::new());
            while !go.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let (mut buf, mut chunk) = (bytes::BytesMut::new(), vec![0u8; 64 << 10]);
            loop {
                match link::decode_msg(&mut buf) {
                    Ok(Some(LinkMsg::Peer(p))) => {
                        if let Ok((_, WorkerMsg::Append(v))) = crate::peer::decode(p) {
                            let mut g = g.lock().unwrap();
                            let on_this = g.last_mut().unwrap();
                            on_this.extend(v.iter().map(|a| (a.recipient, a.msg.msg_id, a.replay)));
                            if on_this.len() >= cut {
                                break;
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    },
                    Err(_) => break,
                }
            }
        }
    });
    (addr, got)
}

/// Waits (60 s at most) until `cond` holds.
fn wait_for(what: &str, cond: &dyn Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first two users of node `node` (of 2) by `router`.
fn users_on_node(router: &Router, node: usize) -> Vec<UserId> {
    (1..)
        .map(UserId)
        .filter(|&u| router.node_of(router.owner(u)) == node)
        .take(2)
        .collect()
}

/// A link to another node that comes up (again) is resynced from the worker's memory: every
/// append to that node's users not confirmed yet goes out as a replay, in msg_id order, and a
/// confirmed one does not (`Worker::pump_resyncs`).
#[tokio::test]
async fn a_resync_of_a_peer_link_replays_the_unconfirmed_appends_bound_for_that_node() {
    let (addr, got) = fake_node(2, Arc::new(std::sync::atomic::AtomicBool::new(true)));
    let links = Arc::new(crate::peer::PeerLinks::start(
        0,
        vec!["127.0.0.1:9".parse().unwrap(), addr],
    ));
    let mut fx = Fx::with_peers(1, links.clone()).await;
    let router = fx.workers[0].router.clone();
    let a = users_on_node(&router, 0)[0];
    let (b, c) = (users_on_node(&router, 1)[0], users_on_node(&router, 1)[1]);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.client(
        conn(1),
        a,
        vec![(1, send(1, b, "to b")), (2, send(2, c, "to c"))],
    )
    .await;
    let ids: Vec<MsgId> = acks(&fx.out()).iter().map(|a| a.1).collect();
    assert_eq!(ids.len(), 2);
    // The link comes up; the worker's resync replays both appends.
    wait_for("the link", &|| !links.needs_resync(0).is_empty());
    fx.workers[0].tick(Tick::Resync, fx.now).await;
    wait_for("the replay", &|| {
        got.lock().unwrap().first().is_some_and(|v| v.len() >= 2)
    });
    assert_eq!(
        got.lock().unwrap()[0],
        vec![(b, ids[0], true), (c, ids[1], true)]
    );
    // b's worker confirms; node 1 ends the connection and the link comes back (it notices at
    // its next write: its ping after 5 s of quiet): only c's append is replayed.
    let shard = vshard_of(a);
    fx.step(0, vec![WorkerMsg::AppendDone(vec![(shard, ids[0], b)])])
        .await
        .unwrap();
    wait_for("the new link", &|| !links.needs_resync(0).is_empty());
    fx.workers[0].tick(Tick::Resync, fx.now).await;
    wait_for("the second replay", &|| {
        got.lock().unwrap().get(1).is_some_and(|v| !v.is_empty())
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(got.lock().unwrap()[1], vec![(c, ids[1], true)]);
}

/// The 400 sends of 32 KiB from `a` to `b` that fill a peer link (client msg ids from `from`).
fn big_sends(b: UserId, from: u64, n: u64) -> Vec<(u32, Command)> {
    let body = Bytes::from(vec![b'x'; 32 << 10]);
    (from..from + n)
        .map(|i| {
            let c = Command::SendC2c {
                client_msg_id: i,
                to: b,
                body: body.clone(),
            };
            (i as u32, c)
        })
        .collect()
}

/// A node-0 worker with 400 appends of 32 KiB for a user of node 1 (`b`, from `a`, logged in
/// on `conn(1)`), whose link to the fake node 1 is up with a small queue bound (256 KiB: the
/// replay passes it and the sockets' buffers at once): `(fx, links, a, b, got)`. The fake node
/// reads nothing until `go` is set.
async fn stalled_link(
    go: Arc<std::sync::atomic::AtomicBool>,
) -> (Fx, Arc<crate::peer::PeerLinks>, UserId, UserId, Got) {
    let (addr, got) = fake_node(usize::MAX, go);
    let links = Arc::new(crate::peer::PeerLinks::start_with(
        0,
        vec!["127.0.0.1:9".parse().unwrap(), addr],
        256 << 10,
    ));
    let mut fx = Fx::with_peers(1, links.clone()).await;
    let router = fx.workers[0].router.clone();
    let (a, b) = (users_on_node(&router, 0)[0], users_on_node(&router, 1)[0]);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.client(conn(1), a, big_sends(b, 1, 400)).await;
    wait_for("the link", &|| !links.needs_resync(0).is_empty());
    (fx, links, a, b, got)
}

/// A resync whose link has no room does not hold the worker: its rounds go on (their live
/// appends to that node wait, as the link is not resynced), and once the node reads, the
/// resync sends everything, those too, in msg_id order, then marks the link resynced.
#[tokio::test]
async fn a_resync_waiting_for_room_on_its_link_lets_the_worker_go_on() {
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut fx, links, a, b, got) = stalled_link(go.clone()).await;
    let mut ids: Vec<MsgId> = acks(&fx.out()).iter().map(|a| a.1).collect();
    assert_eq!(ids.len(), 400);
    fx.workers[0].tick(Tick::Resync, fx.now).await;
    assert!(
        !links.needs_resync(0).is_empty(),
        "resynced with node 1 reading nothing"
    );
    // The worker serves meanwhile: a round, whose append to node 1 waits too.
    fx.client(conn(1), a, big_sends(b, 401, 1)).await;
    let late = acks(&fx.out());
    assert_eq!(late.len(), 1, "no round while the resync waits");
    ids.push(late[0].1);
    // Nothing taken for 10 s less a ms: the link stays.
    fx.now += 9_999;
    fx.workers[0].tick(Tick::Resync, fx.now).await;
    assert_eq!(links.resets(), 0);
    // Node 1 reads: the resync goes on at each tick, and ends.
    go.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !links.needs_resync(0).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the resync never ended"
        );
        fx.workers[0].tick(Tick::Resync, fx.now).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for("every append", &|| got.lock().unwrap()[0].len() >= 401);
    let want: Vec<(UserId, MsgId, bool)> = ids.iter().map(|&m| (b, m, true)).collect();
    assert_eq!(got.lock().unwrap()[0], want);
    assert_eq!(links.resets(), 0);
    // Live appends go out at once now.
    fx.client(conn(1), a, big_sends(b, 402, 1)).await;
    let last = acks(&fx.out())[0].1;
    wait_for("the live append", &|| got.lock().unwrap()[0].len() == 402);
    assert_eq!(got.lock().unwrap()[0][401], (b, last, false));
}

/// A resync whose link takes no part for 10 s resets the link (a peer that does not read; the
/// next epoch's resync starts over).
#[tokio::test]
async fn a_resync_whose_link_takes_nothing_for_10_s_resets_it() {
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut fx, links, _, _, _) = stalled_link(go).await;
    // Ticks for a second at the same time: the link's thread and the sockets' buffers take what
    // they can, then nothing more (node 1 reads nothing).
    for _ in 0..20 {
        fx.workers[0].tick(Tick::Resync, fx.now).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.now += 9_999;
    fx.workers[0].tick(Tick::Resync, fx.now).await;
    assert_eq!(links.resets(), 0);
    fx.now += 1;
    fx.workers[0].tick(Tick::Resync, fx.now).await;
    assert_eq!(links.resets(), 1, "the link was not reset");
}

#[tokio::test]
async fn a_crash_before_a_confirmed_outbox_entry_is_deleted_replays_it_and_stores_nothing_twice() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.client(conn(1), a, vec![(1, send(1, b, "m1"))]).await;
    fx.pump().await;
    assert_eq!(fx.timeline(b).await.len(), 1);
    // Confirmed, but its deletion waits for worker 0's next commit: the process dies first.
    let shard = vshard_of(a);
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), 1);
    fx.restart().await;
    let replay = fx.inbox(1);
    assert!(matches!(&replay[..], [WorkerMsg::Append(v)] if v.len() == 1 && v[0].replay));
    fx.step(1, replay).await.unwrap();
    fx.pump().await;
    // The replayed append found b's copy by its msg index: still one message, and the entry
    // goes once the deletion is due.
    let tl = fx.timeline(b).await;
    assert_eq!(tl.iter().map(|m| m.seq).collect::<Vec<_>>(), [Seq(1)]);
    fx.settle().await;
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
}

/// Sender and recipient on one worker: the `Delivered` notice leaves with the round of the ack
/// itself, without a trip through the worker's inbox.
#[tokio::test]
async fn a_device_ack_tells_a_sender_of_the_same_worker_in_the_same_round() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(0, a.0 + 1);
    let (msg_id, _) = send_one_and_ack(&mut fx, a, b).await;
    // No pump: nothing went through an inbox.
    assert!(fx.inboxes[0].is_empty() && fx.inboxes[1].is_empty());
    assert_eq!(notices_to(&fx.out(), conn(1)), [(msg_id, b)]);
}

#[tokio::test]
async fn a_device_ack_moves_its_cursor_and_tells_the_sender_across_workers() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let (msg_id, seq) = send_one_and_ack(&mut fx, a, b).await;
    fx.pump().await;
    assert_eq!(notices_to(&fx.out(), conn(1)), [(msg_id, b)]);
    // The cursor alone does not cost a commit: it waits for one, at most LAZY_FLUSH_MS.
    assert_eq!(fx.store.cursor(b, "dev-2").await.unwrap(), Seq(0));
    let commits = fx.store.attempts().len();
    fx.now += LAZY_FLUSH_MS - 1;
    let wb = fx.worker_of(b);
    fx.step(wb, Vec::new()).await.unwrap();
    assert_eq!(fx.store.attempts().len(), commits, "not due yet");
    // Due: its drain starts, paced over the next second; a round 1 ms later writes it (the
    // whole of a one-write drain is due by then).
    fx.now += 1;
    fx.step(wb, Vec::new()).await.unwrap();
    assert_eq!(fx.store.attempts().len(), commits);
    fx.now += 1;
    fx.step(wb, Vec::new()).await.unwrap();
    assert_eq!(fx.store.attempts().len(), commits + 1);
    assert_eq!(fx.store.cursor(b, "dev-2").await.unwrap(), seq);
}

#[tokio::test]
async fn an_ack_beyond_what_the_device_was_given_counts_only_up_to_it() {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    // b is offline while a sends three messages.
    for i in 1..=3 {
        fx.client(conn(1), a, vec![(i, send(i as u64, b, "m"))])
            .await;
    }
    fx.out();
    fx.login(conn(2), b, DeviceType::Phone).await;
    // Given nothing yet (declared last_seq 0): an ack of everything moves nothing and tells
    // nobody.
    fx.client(conn(2), b, vec![(0, Command::DeliverAck { seq: Seq(3) })])
        .await;
    let notes = |out: &[Out]| {
        out.iter()
            .filter(|o| o.conn == conn(1) && matches!(o.cmd, Command::Delivered { .. }))
            .count()
    };
    assert_eq!(notes(&fx.out()), 0);
    assert_eq!(fx.workers[0].users[&b].devices[0].cursor, Seq(0));
    // A sync page of the first two: an ack of 3 counts up to 2.
    fx.client(
        conn(2),
        b,
        vec![(
            5,
            Command::SyncRequest {
                after_seq: Seq(0),
                limit: 2,
            },
        )],
    )
    .await;
    fx.out();
    fx.client(conn(2), b, vec![(0, Command::DeliverAck { seq: Seq(3) })])
        .await;
    fx.pump().await;
    assert_eq!(notes(&fx.out()), 2);
    assert_eq!(fx.workers[0].users[&b].devices[0].cursor, Seq(2));
    // A live delivery of a fourth: now everything up to 4 can be acknowledged.
    fx.client(conn(1), a, vec![(4, send(4, b, "m4"))]).await;
    let got = delivered_to(&fx.out(), conn(2));
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [Seq(4)]);
    fx.client(conn(2), b, vec![(0, Command::DeliverAck { seq: Seq(9) })])
        .await;
    fx.pump().await;
    assert_eq!(notes(&fx.out()), 2);
    assert_eq!(fx.workers[0].users[&b].devices[0].cursor, Seq(4));
    // A device that declares at login what it holds may acknowledge up to that.
    let login = fx.login_cmd(b, DeviceType::Desktop, "desk", Seq(3));
    fx.client(conn(3), b, vec![(1, login)]).await;
    fx.out();
    fx.client(conn(3), b, vec![(0, Command::DeliverAck { seq: Seq(4) })])
        .await;
    let desk = fx.workers[0].users[&b]
        .devices
        .iter()
        .find(|d| d.conn == conn(3))
        .map(|d| d.cursor);
    assert_eq!(desk, Some(Seq(3)));
}

#[tokio::test]
async fn a_waiting_cursor_rides_with_a_commit_once_due_and_a_relogin_sees_it() {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.client(conn(1), a, vec![(1, send(1, b, "m1"))]).await;
    let got = delivered_to(&fx.out(), conn(2));
    assert_eq!(got.len(), 1);
    let commits = fx.store.attempts().len();
    fx.client(
        conn(2),
        b,
        vec![(0, Command::DeliverAck { seq: got[0].seq })],
    )
    .await;
    assert_eq!(
        fx.store.attempts().len(),
        commits,
        "an ack alone commits nothing"
    );
    // b logs in again on the same device before the cursor was written: the login takes the
    // waiting cursor, not the store's older one.
    let relogin = fx.login_cmd(b, DeviceType::Phone, "dev-2", Seq(0));
    fx.client(conn(3), b, vec![(1, relogin)]).await;
    assert!(fx.out().iter().any(|o| o.conn == conn(3) && o.bind));
    let dev = &fx.workers[0].users[&b].devices[0];
    assert_eq!((dev.conn, dev.cursor), (conn(3), got[0].seq));
    // A commit before it is due (a's next send) does not carry it: a device's acks within the
    // second are coalesced into one write.
    fx.client(conn(1), a, vec![(2, send(2, b, "m2"))]).await;
    assert_eq!(fx.store.attempts().len(), commits + 1);
    assert_eq!(fx.store.cursor(b, "dev-2").await.unwrap(), Seq(0));
    // Due, its drain starts (with a's third send), and it rides with the next commit after
    // that (a's fourth send): no commit of its own.
    fx.now += LAZY_FLUSH_MS;
    fx.client(conn(1), a, vec![(3, send(3, b, "m3"))]).await;
    assert_eq!(fx.store.attempts().len(), commits + 2);
    assert_eq!(fx.store.cursor(b, "dev-2").await.unwrap(), Seq(0));
    fx.now += 1;
    fx.client(conn(1), a, vec![(4, send(4, b, "m4"))]).await;
    assert_eq!(fx.store.attempts().len(), commits + 3);
    assert_eq!(fx.store.cursor(b, "dev-2").await.unwrap(), got[0].seq);
}

#[tokio::test]
async fn a_login_with_the_same_device_type_kicks_the_first_and_another_type_does_not() {
    let mut fx = Fx::new(1).await;
    let a = UserId(5);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), a, DeviceType::Web).await;
    // The login of conn 3 answers it and closes conn 1 with a kickout; conn 2 stays.
    let login = fx.login_cmd(a, DeviceType::Phone, "dev-3", Seq(0));
    fx.client(conn(3), a, vec![(1, login)]).await;
    let out = fx.out();
    let kicked: Vec<_> = out
        .iter()
        .filter(|o| matches!(o.cmd, Command::Kickout { .. }))
        .collect();
    assert_eq!(kicked.len(), 1);
    assert_eq!(kicked[0].conn, conn(1));
    assert!(kicked[0].close);
    assert!(out.iter().any(|o| o.conn == conn(3) && o.bind));
    // conn 1 is no session any more; conn 2 and 3 are.
    fx.client(conn(1), a, vec![(2, send(1, UserId(6), "x"))])
        .await;
    fx.client(conn(2), a, vec![(3, send(2, UserId(6), "y"))])
        .await;
    let out = fx.out();
    assert!(out.iter().any(|o| o.conn == conn(1)
        && o.close
        && matches!(
            o.cmd,
            Command::Error {
                code: ErrorCode::NotLoggedIn,
                ..
            }
        )));
    assert_eq!(acks(&out).len(), 1);
    // The gate's close report of the kicked conn 1 comes later: it must not take conn 3 (the
    // same device type) or conn 2 with it.
    let w = fx.worker_of(a);
    fx.step(
        w,
        vec![WorkerMsg::Gate(vec![Up::Closed {
            conn: conn(1),
            uid: a,
        }])],
    )
    .await
    .unwrap();
    fx.client(conn(2), a, vec![(4, send(3, UserId(6), "z"))])
        .await;
    fx.client(conn(3), a, vec![(2, send(4, UserId(6), "w"))])
        .await;
    assert_eq!(acks(&fx.out()).len(), 2, "conn 2 and 3 are still logged in");
    // A second login on a logged-in connection is refused; the connection stays logged in.
    let again = fx.login_cmd(a, DeviceType::Phone, "dev-3", Seq(0));
    fx.client(conn(3), a, vec![(3, again)]).await;
    let out = fx.out();
    assert!(out.iter().any(|o| o.conn == conn(3)
        && matches!(
            o.cmd,
            Command::Error {
                code: ErrorCode::AlreadyLoggedIn,
                ..
            }
        )));
    // A frame of conn 3 that names another user is not that user's: refused and closed.
    let b = fx.user_on(w, 100);
    fx.client(conn(3), b, vec![(4, send(5, UserId(6), "v"))])
        .await;
    let out = fx.out();
    assert!(out.iter().any(|o| o.conn == conn(3)
        && o.close
        && matches!(
            o.cmd,
            Command::Error {
                code: ErrorCode::NotLoggedIn,
                ..
            }
        )));
    assert!(acks(&out).is_empty());
    // An expired token is refused and the connection closed.
    let expired = fx.tokens.mint(a, fx.now / 1000 - 1);
    let login = Command::Login {
        uid: a,
        device_type: DeviceType::Tablet,
        device_id: "dev-4".into(),
        last_seq: Seq(0),
        token: expired,
    };
    fx.client(conn(4), a, vec![(1, login)]).await;
    let out = fx.out();
    assert!(matches!(
        &out[..],
        [Out {
            cmd: Command::LoginResult {
                code: ErrorCode::TokenExpired,
                ..
            },
            close: true,
            ..
        }]
    ));
}

#[tokio::test]
async fn sync_pages_are_bounded_by_count_and_bytes_and_say_whether_more_follow() {
    let cfg = LogicConfig {
        sync_page_max: 3,
        sync_page_bytes: 400,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(1, cfg).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    let sends = (1..=5).map(|i| (i as u32, send(i, b, "short"))).collect();
    fx.client(conn(1), a, sends).await;
    fx.pump().await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let sync = |after, limit| Command::SyncRequest {
        after_seq: Seq(after),
        limit,
    };
    // limit 100 is capped at sync_page_max 3.
    fx.client(conn(2), b, vec![(1, sync(0, 100))]).await;
    fx.client(conn(2), b, vec![(2, sync(3, 100))]).await;
    fx.client(conn(2), b, vec![(3, sync(5, 100))]).await;
    let pages: Vec<_> = fx
        .out()
        .into_iter()
        .filter_map(|o| match o.cmd {
            Command::SyncPage {
                max_seq,
                has_more,
                messages,
            } => Some((
                max_seq,
                has_more,
                messages.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        pages,
        [
            (Seq(5), true, vec![1, 2, 3]),
            (Seq(5), false, vec![4, 5]),
            (Seq(5), false, vec![]),
        ]
    );
    // A page holds at least one message, however large, and stops at the byte bound.
    let big = Bytes::from(vec![b'x'; 1000]);
    fx.client(
        conn(1),
        a,
        vec![
            (
                9,
                Command::SendC2c {
                    client_msg_id: 50,
                    to: b,
                    body: big.clone(),
                },
            ),
            (
                10,
                Command::SendC2c {
                    client_msg_id: 51,
                    to: b,
                    body: big,
                },
            ),
        ],
    )
    .await;
    fx.pump().await;
    fx.out();
    fx.client(conn(2), b, vec![(4, sync(5, 3))]).await;
    let out = fx.out();
    let [Out {
        cmd: Command::SyncPage {
            has_more, messages, ..
        },
        ..
    }] = &out[..]
    else {
        panic!("{out:?}");
    };
    assert_eq!(messages.len(), 1);
    assert!(has_more);
}

#[tokio::test]
async fn a_group_post_is_stored_for_every_member_and_delivered_to_those_online() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = fx.user_on(0, a.0 + 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let create = Command::GroupCreate {
        name: "team".into(),
        members: vec![b, c],
        client_id: 0,
    };
    fx.client(conn(1), a, vec![(1, create)]).await;
    fx.pump().await;
    let out = fx.out();
    let group = out
        .iter()
        .find_map(|o| match o.cmd {
            Command::OpResult {
                code: ErrorCode::Ok,
                id,
                ..
            } if o.conn == conn(1) => Some(GroupId(id)),
            _ => None,
        })
        .expect("group created");
    let post = Command::SendC2g {
        client_msg_id: 77,
        group,
        body: Bytes::from_static(b"hi all"),
        mentions: Vec::new(),
    };
    fx.client(conn(2), b, vec![(2, post.clone())]).await;
    fx.pump().await;
    // A retry of the same post is answered with the same ack and stored once.
    fx.client(conn(2), b, vec![(3, post)]).await;
    fx.pump().await;
    let out = fx.out();
    let acks = acks(&out);
    assert_eq!(acks.len(), 2);
    assert_eq!(acks[0].1, acks[1].1);
    for m in [a, b, c] {
        let posts: Vec<_> = fx
            .timeline(m)
            .await
            .into_iter()
            .filter(|x| x.conv == CONV_C2G)
            .collect();
        assert_eq!(posts.len(), 1, "member {m}");
        assert_eq!(posts[0].msg_id, acks[0].1);
        assert_eq!(posts[0].to.0, group.0);
    }
    let live = delivered_to(&out, conn(1));
    assert_eq!(live.iter().filter(|m| m.conv == CONV_C2G).count(), 1);
    // Every member's fan-out confirmed: no outbox entry is left (once the deletions are due).
    fx.settle().await;
    for w in 0..2 {
        for s in 0..im_shared::shard::VSHARDS {
            if fx.workers[w].router.owner_of_shard(ShardId(s)) == w {
                assert!(fx.store.outbox(ShardId(s)).await.unwrap().is_empty());
            }
        }
    }
}

/// The group id of the first `OpResult Ok` sent to `c`.
fn created(out: &[Out], c: ConnId) -> GroupId {
    out.iter()
        .find_map(|o| match o.cmd {
            Command::OpResult {
                code: ErrorCode::Ok,
                id,
                ..
            } if o.conn == c => Some(GroupId(id)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no group created for {c:?}: {out:?}"))
}

#[tokio::test]
async fn a_group_create_retried_with_its_client_id_answers_the_first_group_even_after_a_restart() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let create = |client_id| Command::GroupCreate {
        name: "team".into(),
        members: vec![b],
        client_id,
    };
    fx.client(conn(1), a, vec![(1, create(42))]).await;
    fx.pump().await;
    let g1 = created(&fx.out(), conn(1));
    // The answer was lost: the client sends the same create again.
    fx.client(conn(1), a, vec![(2, create(42))]).await;
    fx.pump().await;
    assert_eq!(created(&fx.out(), conn(1)), g1);
    // After a restart nothing is in memory: the store has it.
    fx.restart().await;
    fx.pump().await;
    fx.login(conn(2), a, DeviceType::Phone).await;
    fx.client(conn(2), a, vec![(3, create(42))]).await;
    fx.pump().await;
    assert_eq!(created(&fx.out(), conn(2)), g1);
    // One group: one `Created` event for each member.
    fx.settle().await;
    for m in [a, b] {
        let events = fx
            .timeline(m)
            .await
            .into_iter()
            .filter(|x| x.conv == im_shared::proto::CONV_GROUP_EVENT)
            .count();
        assert_eq!(events, 1, "member {m}");
    }
    // Another key makes another group; so does the same key from another user, and no key.
    fx.client(conn(2), a, vec![(4, create(43))]).await;
    fx.pump().await;
    let g2 = created(&fx.out(), conn(2));
    fx.login(conn(3), b, DeviceType::Phone).await;
    fx.client(conn(3), b, vec![(5, create(42))]).await;
    fx.pump().await;
    let g3 = created(&fx.out(), conn(3));
    fx.client(conn(2), a, vec![(6, create(0))]).await;
    fx.pump().await;
    let g4 = created(&fx.out(), conn(2));
    fx.client(conn(2), a, vec![(7, create(0))]).await;
    fx.pump().await;
    let g5 = created(&fx.out(), conn(2));
    let all: std::collections::BTreeSet<_> = [g1, g2, g3, g4, g5].into();
    assert_eq!(all.len(), 5, "{all:?}");
}

#[tokio::test]
async fn offline_users_and_groups_are_evicted_past_the_budget_and_come_back_with_nothing_lost() {
    let cfg = LogicConfig {
        max_cached_users: 10,
        max_cached_groups: 2,
        seq_segment: 100,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(1, cfg).await;
    let a = UserId(1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    // b gets a message while offline (a notice is pending for a), then 30 other users are
    // touched: far over the budget of 10.
    let b = UserId(2);
    fx.client(conn(1), a, vec![(1, send(1, b, "first"))]).await;
    for (i, u) in (100..130).enumerate() {
        fx.now += 1000;
        fx.client(
            conn(1),
            a,
            vec![(2 + i as u32, send(2 + i as u64, UserId(u), "x"))],
        )
        .await;
    }
    fx.out();
    let w = &fx.workers[0];
    assert!(w.users.len() <= 10, "{} users cached", w.users.len());
    assert!(w.users.contains_key(&a), "an online user is never evicted");
    assert!(
        !w.users.contains_key(&b),
        "the least recently used went first"
    );
    // b comes back: its next message follows the first (seqs skip the unused reserved ones
    // and prev_seq links them), and its ack still tells a (the pending notice is rebuilt).
    fx.client(conn(1), a, vec![(50, send(50, b, "second"))])
        .await;
    // A retry of a's first send is still answered from the store, not sent again.
    fx.client(conn(1), a, vec![(51, send(1, b, "first, retried"))])
        .await;
    fx.out();
    let tl = fx.timeline(b).await;
    assert_eq!(tl.len(), 2, "{tl:?}");
    assert!(tl[1].seq > tl[0].seq);
    assert_eq!(tl[1].prev_seq, tl[0].seq);
    for u in 100..130 {
        fx.now += 1000;
        fx.client(conn(1), a, vec![(60, send(1000 + u, UserId(u), "y"))])
            .await;
    }
    assert!(!fx.workers[0].users.contains_key(&b));
    let login = fx.login_cmd(b, DeviceType::Phone, "b-phone", tl[1].seq);
    fx.client(conn(2), b, vec![(1, login)]).await;
    fx.out();
    fx.client(
        conn(2),
        b,
        vec![(0, Command::DeliverAck { seq: tl[1].seq })],
    )
    .await;
    fx.pump().await;
    let notes: Vec<MsgId> = notices_to(&fx.out(), conn(1))
        .into_iter()
        .filter(|&(_, r)| r == b)
        .map(|(m, _)| m)
        .collect();
    assert_eq!(notes, [tl[0].msg_id, tl[1].msg_id]);
    // Groups: three created with a budget of two; the first, evicted, still takes posts.
    let mut groups = Vec::new();
    for k in 0..3u64 {
        fx.now += 1000;
        let create = Command::GroupCreate {
            name: format!("g{k}"),
            members: vec![b],
            client_id: 0,
        };
        fx.client(conn(1), a, vec![(70 + k as u32, create)]).await;
        fx.pump().await;
        groups.push(created(&fx.out(), conn(1)));
    }
    assert!(fx.workers[0].groups.len() <= 2);
    assert!(!fx.workers[0].groups.contains_key(&groups[0]));
    let post = Command::SendC2g {
        client_msg_id: 80,
        group: groups[0],
        body: Bytes::from_static(b"still here"),
        mentions: Vec::new(),
    };
    fx.client(conn(1), a, vec![(80, post)]).await;
    fx.pump().await;
    assert_eq!(acks(&fx.out()).len(), 1);
    let posts = fx
        .timeline(b)
        .await
        .into_iter()
        .filter(|m| m.conv == CONV_C2G && m.to.0 == groups[0].0)
        .count();
    assert_eq!(posts, 1);
    let evicted = fx.workers[0].metrics.users_evicted.load(Ordering::Relaxed);
    assert!(evicted > 0);
}

#[test]
fn the_pending_list_keeps_seq_order_for_appends_and_recovered_entries() {
    let p = |n: u64| Pending {
        sender: UserId(n),
        msg_id: MsgId(n),
        conv: CONV_C2C,
        peer: n,
        preview: Bytes::new(),
    };
    let mut l = PendingList::default();
    l.insert(10, p(10));
    l.insert(11, p(11));
    // Recovered after a reload: older entries, one of them already there.
    for s in [3, 5, 10] {
        l.insert(s, p(s));
    }
    l.insert(12, p(12));
    assert_eq!(l.len(), 5);
    assert_eq!(l.newest().map(|p| p.msg_id), Some(MsgId(12)));
    let taken: Vec<_> = l.take_through(10).iter().map(|p| p.msg_id.0).collect();
    assert_eq!(taken, [3, 5, 10]);
    l.pop_oldest();
    assert_eq!(l.len(), 1);
    assert_eq!(l.take_through(99).len(), 1);
    assert_eq!(l.len(), 0);
    assert!(l.newest().is_none());
}

/// A burst of organisation tree changes costs each connection at most one `OrgChanged` a second,
/// carrying the newest version; the one held back goes out on a later (even empty) round.
#[tokio::test]
async fn org_change_notices_are_coalesced_to_one_a_second_per_connection() {
    let mut fx = Fx::new(1).await;
    fx.login(conn(1), UserId(1), DeviceType::Phone).await;
    let notices = |out: &[Out]| -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o.cmd {
                Command::OrgChanged { version } if o.conn == conn(1) => Some(version),
                _ => None,
            })
            .collect()
    };
    fx.step(0, vec![WorkerMsg::OrgChanged(5)]).await.unwrap();
    assert_eq!(notices(&fx.out()), [5]);
    fx.now += 300;
    fx.step(0, vec![WorkerMsg::OrgChanged(6), WorkerMsg::OrgChanged(8)])
        .await
        .unwrap();
    fx.now += 300;
    fx.step(0, vec![WorkerMsg::OrgChanged(7)]).await.unwrap();
    assert!(notices(&fx.out()).is_empty(), "within a second of the last");
    fx.now += 400;
    fx.step(0, Vec::new()).await.unwrap();
    assert_eq!(notices(&fx.out()), [8], "the newest, once");
    fx.now += 5000;
    fx.step(0, Vec::new()).await.unwrap();
    assert!(notices(&fx.out()).is_empty(), "nothing more to tell");
}

/// `TypingNotice`s written to connection `c`: (conv, peer, from, state).
fn typing_to(out: &[Out], c: ConnId) -> Vec<(u8, u64, UserId, u8)> {
    out.iter()
        .filter(|o| o.conn == c)
        .filter_map(|o| match o.cmd {
            Command::TypingNotice {
                conv,
                peer,
                from,
                state,
                ttl_ms,
            } => {
                assert_eq!(ttl_ms, im_shared::proto::TYPING_TTL_MS);
                Some((conv, peer, from, state))
            }
            _ => None,
        })
        .collect()
}

/// Presence entries written to connection `c`, in order: (uid, online, last_seen_ms).
fn presence_to(out: &[Out], c: ConnId) -> Vec<(UserId, bool, u64)> {
    out.iter()
        .filter(|o| o.conn == c)
        .filter_map(|o| match &o.cmd {
            Command::PresenceNotice { entries } => Some(
                entries
                    .iter()
                    .map(|e| (e.uid, e.online, e.last_seen_ms))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The error code (and message) answered to `req_id` on `c`, if any.
fn error_to(out: &[Out], c: ConnId, req_id: u32) -> Option<(ErrorCode, String)> {
    out.iter()
        .filter(|o| o.conn == c && o.req_id == req_id)
        .find_map(|o| match &o.cmd {
            Command::Error { code, message } => Some((*code, message.clone())),
            _ => None,
        })
}

fn ok_to(out: &[Out], c: ConnId, req_id: u32) -> bool {
    out.iter().any(|o| {
        o.conn == c
            && o.req_id == req_id
            && matches!(
                o.cmd,
                Command::OpResult {
                    code: ErrorCode::Ok,
                    ..
                }
            )
    })
}

fn typing(conv: u8, peer: u64, state: u8) -> Command {
    Command::Typing { conv, peer, state }
}

#[tokio::test]
async fn typing_in_a_c2c_chat_reaches_the_peers_devices_on_another_worker_and_is_never_stored() {
    let mut fx = Fx::new(2).await;
    let (a, b) = (fx.user_on(0, 1), fx.user_on(1, 1));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.login(conn(3), b, DeviceType::Desktop).await;
    fx.out();
    let commits = fx.store.attempts().len();
    fx.client(conn(1), a, vec![(5, typing(CONV_C2C, b.0, 1))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert!(ok_to(&out, conn(1), 5));
    for c in [conn(2), conn(3)] {
        assert_eq!(typing_to(&out, c), vec![(CONV_C2C, a.0, a, 1)], "{c:?}");
    }
    assert!(
        typing_to(&out, conn(1)).is_empty(),
        "not echoed to the typist"
    );
    assert_eq!(fx.store.attempts().len(), commits, "nothing was written");
    assert!(fx.timeline(b).await.is_empty());
    // Stopped.
    fx.client(conn(1), a, vec![(6, typing(CONV_C2C, b.0, 0))])
        .await;
    fx.pump().await;
    assert_eq!(typing_to(&fx.out(), conn(2)), vec![(CONV_C2C, a.0, a, 0)]);
}

#[tokio::test]
async fn bad_typing_commands_are_refused_with_a_reason_and_forward_nothing() {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.out();
    let cases = [
        (1, typing(CONV_C2C, b.0, 2), "state must be 0 or 1"),
        (2, typing(CONV_C2C, 0, 1), "peer must be another user"),
        (3, typing(CONV_C2C, a.0, 1), "peer must be another user"),
        (4, typing(CONV_C2G, 0, 1), "group 0"),
        (5, typing(9, b.0, 1), "conv must be 1 (c2c) or 2 (c2g)"),
    ];
    for (req, cmd, why) in cases {
        fx.client(conn(1), a, vec![(req, cmd)]).await;
        fx.pump().await;
        let out = fx.out();
        let (code, msg) = error_to(&out, conn(1), req).expect("an error");
        assert_eq!(code, ErrorCode::InvalidArgument);
        assert!(msg.contains(why), "{msg}");
        assert!(typing_to(&out, conn(2)).is_empty());
    }
    // A group that does not exist.
    fx.client(conn(1), a, vec![(6, typing(CONV_C2G, 999, 1))])
        .await;
    fx.pump().await;
    assert_eq!(
        error_to(&fx.out(), conn(1), 6).map(|e| e.0),
        Some(ErrorCode::NotFound)
    );
}

#[tokio::test]
async fn typing_is_rate_limited_per_connection_with_a_burst() {
    let mut fx = Fx::new(1).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.out();
    let burst = super::presence::TYPING_BURST as u32;
    let cmds = (0..burst + 2)
        .map(|i| (10 + i, typing(CONV_C2C, b.0, 1)))
        .collect();
    fx.client(conn(1), a, cmds).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(typing_to(&out, conn(2)).len(), burst as usize);
    for i in 0..burst {
        assert!(ok_to(&out, conn(1), 10 + i));
    }
    for i in burst..burst + 2 {
        let (code, msg) = error_to(&out, conn(1), 10 + i).expect("refused");
        assert_eq!(code, ErrorCode::Overloaded);
        assert!(msg.contains("at most 2 a second"), "{msg}");
    }
    // One more is allowed once its interval has passed.
    fx.now += super::presence::TYPING_EVERY_MS;
    fx.client(conn(1), a, vec![(30, typing(CONV_C2C, b.0, 0))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert!(ok_to(&out, conn(1), 30));
    assert_eq!(typing_to(&out, conn(2)).len(), 1);
}

#[tokio::test]
async fn typing_in_a_group_reaches_the_other_online_members_and_a_non_member_is_refused() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = fx.user_on(0, a.0 + 1);
    let stranger = fx.user_on(1, b.0 + 1);
    for (i, u) in [a, b, c, stranger].into_iter().enumerate() {
        fx.login(conn(i as u32 + 1), u, DeviceType::Phone).await;
    }
    let create = Command::GroupCreate {
        name: "team".into(),
        members: vec![b, c],
        client_id: 0,
    };
    fx.client(conn(1), a, vec![(1, create)]).await;
    fx.pump().await;
    let group = created(&fx.out(), conn(1));
    fx.client(conn(2), b, vec![(7, typing(CONV_C2G, group.0, 1))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert!(ok_to(&out, conn(2), 7));
    for c in [conn(1), conn(3)] {
        assert_eq!(typing_to(&out, c), vec![(CONV_C2G, group.0, b, 1)]);
    }
    assert!(typing_to(&out, conn(2)).is_empty());
    assert!(typing_to(&out, conn(4)).is_empty());
    fx.client(conn(4), stranger, vec![(8, typing(CONV_C2G, group.0, 1))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(
        error_to(&out, conn(4), 8).map(|e| e.0),
        Some(ErrorCode::NotMember)
    );
    assert!(typing_to(&out, conn(1)).is_empty());
}

#[tokio::test]
async fn presence_is_answered_then_pushed_on_change_with_offline_debounced() {
    let cfg = LogicConfig {
        presence_offline_delay_ms: 3_000,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(2, cfg).await;
    let watcher = fx.user_on(0, 1);
    let (a, b) = (fx.user_on(1, 1), fx.user_on(0, watcher.0 + 1));
    fx.login(conn(1), watcher, DeviceType::Phone).await;
    fx.login(conn(2), a, DeviceType::Phone).await;
    fx.out();
    let sub = Command::PresenceSubscribe {
        users: vec![a, b, a],
    };
    fx.client(conn(1), watcher, vec![(3, sub)]).await;
    fx.pump().await;
    let out = fx.out();
    assert!(ok_to(&out, conn(1), 3));
    let mut got = presence_to(&out, conn(1));
    got.sort();
    let mut want = vec![(a, true, 0), (b, false, 0)];
    want.sort();
    assert_eq!(got, want, "the current state of each, once");
    // b comes online: told at once.
    fx.login(conn(3), b, DeviceType::Phone).await;
    fx.pump().await;
    assert_eq!(presence_to(&fx.out(), conn(1)), vec![(b, true, 0)]);
    // a's phone drops and comes back within the delay: nothing.
    fx.now += 100;
    let close = |c, u| WorkerMsg::Gate(vec![Up::Closed { conn: c, uid: u }]);
    let wa = fx.worker_of(a);
    fx.step(wa, vec![close(conn(2), a)]).await.unwrap();
    fx.now += 1_000;
    fx.login(conn(4), a, DeviceType::Phone).await;
    fx.now += 5_000;
    for w in 0..2 {
        fx.workers[w].tick(Tick::Presence, fx.now).await;
    }
    fx.pump().await;
    assert!(
        presence_to(&fx.out(), conn(1)).is_empty(),
        "a flap is not news"
    );
    // a leaves for good: told after the delay, with the time it left.
    let left = fx.now;
    fx.step(wa, vec![close(conn(4), a)]).await.unwrap();
    fx.now += 2_000;
    fx.workers[wa].tick(Tick::Presence, fx.now).await;
    fx.pump().await;
    assert!(
        presence_to(&fx.out(), conn(1)).is_empty(),
        "not before the delay"
    );
    fx.now += 1_500;
    fx.workers[wa].tick(Tick::Presence, fx.now).await;
    fx.pump().await;
    assert_eq!(presence_to(&fx.out(), conn(1)), vec![(a, false, left)]);
    // A second follower on the same worker gets the known state at once, without a new watch.
    let second = fx.user_on(0, b.0 + 1);
    fx.login(conn(5), second, DeviceType::Phone).await;
    fx.out();
    let sub = Command::PresenceSubscribe { users: vec![a] };
    fx.client(conn(5), second, vec![(9, sub)]).await;
    assert!(fx.inbox(wa).is_empty(), "the owner is not asked again");
    let out = fx.out();
    assert!(ok_to(&out, conn(5), 9));
    assert_eq!(presence_to(&out, conn(5)), vec![(a, false, left)]);
    // Unsubscribed (empty list) and closed connections hear nothing more; the owner forgets
    // the watcher once no connection there follows a.
    let none = Command::PresenceSubscribe { users: vec![] };
    fx.client(conn(1), watcher, vec![(10, none)]).await;
    let ww = fx.worker_of(watcher);
    fx.step(ww, vec![close(conn(5), second)]).await.unwrap();
    fx.pump().await;
    fx.login(conn(6), a, DeviceType::Phone).await;
    fx.pump().await;
    let out = fx.out();
    assert!(presence_to(&out, conn(1)).is_empty());
    assert!(presence_to(&out, conn(5)).is_empty());
    assert_eq!(fx.workers[ww].presence.sizes().0, 0);
    assert_eq!(fx.workers[wa].presence.sizes().2, 0);
}

#[tokio::test]
async fn a_presence_list_above_the_limit_or_with_user_0_is_refused() {
    let mut fx = Fx::new(1).await;
    let a = UserId(1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.out();
    let too_many = (1..=im_shared::proto::MAX_PRESENCE_SUBSCRIPTIONS as u64 + 1)
        .map(|u| UserId(u + 10))
        .collect();
    let cases = [
        (1, too_many, "at most 256 users"),
        (2, vec![UserId(2), UserId(0)], "user 0"),
    ];
    for (req, users, why) in cases {
        let sub = Command::PresenceSubscribe { users };
        fx.client(conn(1), a, vec![(req, sub)]).await;
        fx.pump().await;
        let out = fx.out();
        let (code, msg) = error_to(&out, conn(1), req).expect("refused");
        assert_eq!(code, ErrorCode::InvalidArgument);
        assert!(msg.contains(why), "{msg}");
        assert!(presence_to(&out, conn(1)).is_empty());
    }
    assert_eq!(fx.workers[0].presence.sizes(), (0, 0, 0));
}

#[tokio::test]
async fn a_hidden_user_is_seen_offline_by_followers_and_the_setting_survives_a_restart() {
    let mut fx = Fx::new(2).await;
    let watcher = fx.user_on(0, 1);
    let a = fx.user_on(1, 1);
    fx.login(conn(1), watcher, DeviceType::Phone).await;
    fx.login(conn(2), a, DeviceType::Phone).await;
    let sub = || Command::PresenceSubscribe { users: vec![a] };
    fx.client(conn(1), watcher, vec![(1, sub())]).await;
    fx.pump().await;
    assert_eq!(presence_to(&fx.out(), conn(1)), vec![(a, true, 0)]);
    // a hides: its followers see it offline, with no last-seen time.
    let hide = |hidden| Command::PresencePrivacy { hidden };
    fx.client(conn(2), a, vec![(2, hide(true))]).await;
    fx.pump().await;
    let out = fx.out();
    assert!(ok_to(&out, conn(2), 2));
    assert_eq!(presence_to(&out, conn(1)), vec![(a, false, 0)]);
    // Its devices coming and going show nothing.
    fx.login(conn(3), a, DeviceType::Desktop).await;
    fx.pump().await;
    assert!(presence_to(&fx.out(), conn(1)).is_empty());
    // Stored: after a restart a new watch finds it hidden although a is online again.
    fx.restart().await;
    fx.login(conn(4), watcher, DeviceType::Phone).await;
    fx.login(conn(5), a, DeviceType::Phone).await;
    fx.client(conn(4), watcher, vec![(3, sub())]).await;
    fx.pump().await;
    assert_eq!(presence_to(&fx.out(), conn(4)), vec![(a, false, 0)]);
    // Shown again: online at once.
    fx.client(conn(5), a, vec![(4, hide(false))]).await;
    fx.pump().await;
    assert_eq!(presence_to(&fx.out(), conn(4)), vec![(a, true, 0)]);
    assert_eq!(fx.store.user_flags(a).await.unwrap(), Vec::<u8>::new());
}

#[tokio::test]
async fn a_kicked_connection_follows_nobody_any_more() {
    let mut fx = Fx::new(1).await;
    let (w, a) = (UserId(1), UserId(2));
    fx.login(conn(1), w, DeviceType::Phone).await;
    let sub = Command::PresenceSubscribe { users: vec![a] };
    fx.client(conn(1), w, vec![(1, sub)]).await;
    fx.pump().await;
    assert_eq!(fx.workers[0].presence.sizes(), (1, 1, 1));
    // The same device type logs in on another connection: the first one is kicked.
    fx.login(conn(2), w, DeviceType::Phone).await;
    fx.pump().await;
    assert_eq!(fx.workers[0].presence.sizes(), (0, 0, 0));
    fx.out();
    fx.login(conn(3), a, DeviceType::Phone).await;
    fx.pump().await;
    assert!(presence_to(&fx.out(), conn(1)).is_empty());
}

/// Two workers with `max_worker_backlog` = `bound`, user `a` (connection 1) online on worker 0
/// and `b` (connection 2) on worker 1, their logins' output taken.
async fn two_workers_with_backlog(bound: usize) -> (Fx, UserId, UserId) {
    let cfg = LogicConfig {
        max_worker_backlog: bound,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(2, cfg).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.out();
    (fx, a, b)
}

/// The worker → worker hop is bounded: a worker whose appends wait at another worker past
/// `max_worker_backlog` holds new client frames back (unanswered, still counted against the
/// gate's `max_queued`) and handles them, in order, once the other worker took its backlog.
#[tokio::test]
async fn a_worker_whose_appends_wait_at_another_holds_client_frames_until_they_are_taken() {
    let (mut fx, a, b) = two_workers_with_backlog(3).await;
    // Three sends in one round: three appends wait at worker 1, the bound.
    let three = (1..=3).map(|i| (i as u32, send(i, b, "m"))).collect();
    fx.client(conn(1), a, three).await;
    assert_eq!(acks(&fx.out()).len(), 3);
    assert!(fx.workers[0].router.held(0, 3));
    assert_eq!(fx.workers[0].router.waiting_at(1), 3);
    // The next frame is held: no answer, still queued for the gate.
    fx.client(conn(1), a, vec![(4, send(4, b, "held"))]).await;
    assert!(fx.out().is_empty(), "a held frame was answered");
    assert_eq!(fx.depth.load(Ordering::Relaxed), 1);
    assert_eq!(
        fx.workers[0].metrics.admission_held.load(Ordering::Relaxed),
        1
    );
    // Worker 1 takes the appends: its confirmations and a Resume wake worker 0, which then
    // answers the held frame; nothing is lost, duplicated or reordered.
    let raw = fx.raw_inbox(1);
    fx.step(1, raw).await.unwrap();
    assert!(!fx.workers[0].router.held(0, 3));
    let to0 = fx.raw_inbox(0);
    assert!(to0.iter().any(|m| matches!(m, WorkerMsg::Resume)));
    fx.step(0, to0).await.unwrap();
    fx.pump().await;
    let out = fx.out();
    assert_eq!(acks(&out).iter().map(|a| a.0).collect::<Vec<_>>(), vec![4]);
    assert_eq!(fx.depth.load(Ordering::Relaxed), 0);
    let got: Vec<u64> = fx
        .timeline(b)
        .await
        .iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
    let live: Vec<u64> = delivered_to(&out, conn(2))
        .iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(live, vec![1, 2, 3, 4]);
}

/// Two workers held by each other at once still take each other's appends (work from other
/// workers is never held), so both resume: no cycle.
#[tokio::test]
async fn two_workers_held_by_each_other_both_resume() {
    let (mut fx, a, b) = two_workers_with_backlog(1).await;
    let ups = |fx: &Fx, c: ConnId, u: UserId, to: UserId, id: u64| {
        fx.depth.fetch_add(1, Ordering::Relaxed);
        WorkerMsg::Gate(vec![Up::request(c, u, id as u32, &send(id, to, "x"))])
    };
    let m = ups(&fx, conn(1), a, b, 1);
    fx.step(0, vec![m]).await.unwrap();
    let m = ups(&fx, conn(2), b, a, 1);
    fx.step(1, vec![m]).await.unwrap();
    assert!(fx.workers[0].router.held(0, 1) && fx.workers[0].router.held(1, 1));
    // Both hold their next frame ...
    let m = ups(&fx, conn(1), a, b, 2);
    fx.step(0, vec![m]).await.unwrap();
    let m = ups(&fx, conn(2), b, a, 2);
    fx.step(1, vec![m]).await.unwrap();
    assert_eq!(
        acks(&fx.out()).len(),
        2,
        "only the first sends were answered"
    );
    assert_eq!(fx.depth.load(Ordering::Relaxed), 2);
    // ... and the plain pump (rounds of whatever is in the inboxes) settles everything.
    for _ in 0..10 {
        for w in 0..2 {
            let raw = fx.raw_inbox(w);
            fx.step(w, raw).await.unwrap();
        }
    }
    assert_eq!(fx.depth.load(Ordering::Relaxed), 0);
    assert_eq!(acks(&fx.out()).len(), 2);
    let ids = |v: Vec<Message>| v.iter().map(|m| m.client_msg_id).collect::<Vec<_>>();
    assert_eq!(
        ids(fx
            .timeline(a)
            .await
            .into_iter()
            .filter(|m| m.from == b)
            .collect()),
        [1, 2]
    );
    assert_eq!(
        ids(fx
            .timeline(b)
            .await
            .into_iter()
            .filter(|m| m.from == a)
            .collect()),
        [1, 2]
    );
    assert_eq!(
        fx.workers[0].router.waiting_at(0) + fx.workers[0].router.waiting_at(1),
        0
    );
}

/// The counters behind the byte budget agree with the states they count.
fn assert_entries_counted(w: &Worker<TestStore>) {
    let (mut d, mut p, mut a) = (0, 0, 0);
    for u in w.users.values() {
        let (ud, up) = u.entries();
        d += ud;
        p += up;
        a += usize::from(u.active.is_some());
    }
    assert_eq!(
        (w.dedup_entries, w.pending_entries, w.active_users),
        (d, p, a),
        "counted (dedup, pending, active) differ from the states"
    );
}

#[test]
fn cache_byte_estimates_cover_the_types() {
    use std::mem::size_of;
    // A hash map slot is the entry plus a control byte, at a load of at most 7/8.
    let slot = |entry: usize| (entry + 1) * 8 / 7;
    // A user is a dense entry (hash, key, state) and an index slot of 8 bytes.
    assert!(size_of::<(UserId, UserState)>() + 8 + slot(8) <= USER_BYTES);
    // What an online user costs besides: pinned, as they are per user at a million.
    assert_eq!(size_of::<UserState>(), 64);
    assert_eq!(size_of::<Device>(), 56);
    assert!(size_of::<Active>() + 16 <= ACTIVE_BYTES);
    assert!(slot(size_of::<(u64, DedupEntry)>()) + size_of::<u64>() <= DEDUP_BYTES);
    assert!(size_of::<(u64, Pending)>() + PREVIEW_BYTES + 16 <= PENDING_BYTES);
}

/// A user's device list: adds at the end, removes one or those of a kind, keeps the others in
/// their order, and holds no allocation once empty.
#[test]
fn a_device_list_keeps_its_order_through_logins_and_closes() {
    let dev = |conn: u32, device_type| Device {
        conn: ConnId::new(1, 0, conn),
        device_type,
        device_id: format!("d{conn}").into_boxed_str(),
        cursor: Seq(0),
        sent: Seq(0),
        typing_tat: 0,
    };
    let conns = |ds: &Devices| ds.iter().map(|d| d.conn.serial()).collect::<Vec<_>>();
    let mut ds = Devices::default();
    assert!(ds.is_empty());
    ds.push(dev(1, DeviceType::Phone));
    ds.push(dev(2, DeviceType::Desktop));
    ds.push(dev(3, DeviceType::Web));
    assert_eq!(conns(&ds), [1, 2, 3]);
    assert!(ds
        .take_if(|d| d.device_type == DeviceType::Tablet)
        .is_empty());
    assert_eq!(conns(&ds), [1, 2, 3]);
    let kicked = ds.take_if(|d| d.device_type == DeviceType::Desktop);
    assert_eq!(
        kicked.iter().map(|d| d.conn.serial()).collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(conns(&ds), [1, 3]);
    assert_eq!(&*ds.remove(1).device_id, "d3");
    assert_eq!(conns(&ds), [1]);
    ds.remove(0);
    assert!(ds.is_empty());
    assert_eq!(
        std::mem::size_of_val(&*ds.0),
        0,
        "an empty list holds no allocation"
    );
}

/// Past `max_cache_bytes`, an online user's remembered ids and pending notices are dropped
/// from memory, and nothing is lost: the recipient's ack still brings every `Delivered`
/// notice (rebuilt from the store) and the sender's retry of an old id still gets its ack
/// (found in the store's dedup records), not a second message.
#[tokio::test]
async fn past_the_byte_budget_online_users_active_parts_go_and_nothing_is_lost() {
    let cfg = LogicConfig {
        max_cache_bytes: 2 * USER_BYTES + 2 * ACTIVE_BYTES + 8 * PENDING_BYTES,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(1, cfg).await;
    let (a, b) = (UserId(1), UserId(2));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.out();
    let sends = (1..=20).map(|i| (i as u32, send(i, b, "m"))).collect();
    fx.client(conn(1), a, sends).await;
    let out = fx.out();
    let first: Vec<_> = acks(&out);
    assert_eq!(first.len(), 20);
    assert_eq!(delivered_to(&out, conn(2)).len(), 20);
    let w = &fx.workers[0];
    assert_entries_counted(w);
    assert!(w.cache_bytes() <= w.cfg.max_cache_bytes, "not trimmed");
    assert!(
        w.users[&b].active.is_none(),
        "the receiver's pending notices stayed"
    );
    assert_eq!(w.metrics.active_trimmed.load(Ordering::Relaxed), 2);
    assert_eq!(w.users.len(), 2, "an online user was evicted");
    // b acknowledges everything: all 20 notices reach a, from the store.
    fx.client(conn(2), b, vec![(0, Command::DeliverAck { seq: Seq(20) })])
        .await;
    fx.pump().await;
    let notes: Vec<MsgId> = notices_to(&fx.out(), conn(1))
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    assert_eq!(notes, first.iter().map(|x| x.1).collect::<Vec<_>>());
    // a retries message 5: the same ack, no new message.
    fx.client(conn(1), a, vec![(50, send(5, b, "m"))]).await;
    let again = acks(&fx.out());
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].1, again[0].2), (first[4].1, first[4].2));
    assert_eq!(fx.timeline(b).await.len(), 20);
    assert_entries_counted(&fx.workers[0]);
}

/// The counters stay exact through appends, acks, the dedup window and evictions.
#[tokio::test]
async fn the_byte_budget_counters_follow_every_change() {
    let cfg = LogicConfig {
        max_cached_users: 3,
        dedup_window: 4,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(1, cfg).await;
    let a = UserId(1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    for (i, to) in (2..12).map(UserId).enumerate() {
        fx.now += 1000;
        fx.client(conn(1), a, vec![(i as u32, send(i as u64, to, "x"))])
            .await;
        assert_entries_counted(&fx.workers[0]);
    }
    assert!(fx.workers[0].users.len() <= 3);
    assert!(fx.workers[0].dedup_entries <= 4);
    let b = UserId(2);
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.client(conn(2), b, vec![(0, Command::DeliverAck { seq: Seq(1) })])
        .await;
    fx.pump().await;
    assert_entries_counted(&fx.workers[0]);
}

/// The directory publisher's queue is bounded: a route change that does not fit is dropped, and
/// once there is room the worker sends every route it holds as one resync (so the directory
/// converges, `publish.rs` test `a_resync_removes_what_the_worker_no_longer_holds_and_writes_the_rest`).
#[tokio::test]
async fn a_full_directory_queue_drops_changes_and_resyncs_every_route_once_there_is_room() {
    let mut fx = Fx::new(1).await;
    let (tx, mut rx) = mpsc::channel(2);
    fx.workers[0].dir = Some(tx);
    for u in 1..=3 {
        fx.login(conn(u as u32), UserId(u), DeviceType::Phone).await;
    }
    let w = &fx.workers[0];
    assert!(w.dir_lost);
    assert_eq!(w.metrics.dir_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(
        w.metrics.dir_resyncs.load(Ordering::Relaxed),
        0,
        "no room yet"
    );
    let queued: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert!(matches!(
        &queued[..],
        [
            crate::publish::DirOp::Online { .. },
            crate::publish::DirOp::Online { .. }
        ]
    ));
    fx.step(0, Vec::new()).await.unwrap();
    let Ok(crate::publish::DirOp::Resync(mut routes, _, in_flight)) = rx.try_recv() else {
        panic!("no resync");
    };
    routes.sort_by_key(|(u, _)| u.0);
    let got: Vec<(u64, u64)> = routes.iter().map(|(u, r)| (u.0, r.conn)).collect();
    assert_eq!(got, [(1, conn(1).0), (2, conn(2).0), (3, conn(3).0)]);
    assert!(routes
        .iter()
        .all(|(u, r)| r.device_id == format!("dev-{}", u.0)));
    assert!(!fx.workers[0].dir_lost);
    assert_eq!(fx.workers[0].metrics.dir_resyncs.load(Ordering::Relaxed), 1);
    // More changes dropped while that resync is not applied yet: no second copy of every route
    // is queued behind it (a starved node used to queue one per round) ...
    for u in 4..=6 {
        fx.login(conn(u as u32), UserId(u), DeviceType::Phone).await;
    }
    assert!(fx.workers[0].dir_lost);
    let _ = std::iter::from_fn(|| rx.try_recv().ok()).count();
    fx.step(0, Vec::new()).await.unwrap();
    assert!(
        rx.try_recv().is_err(),
        "a second resync while the first is in flight"
    );
    assert_eq!(fx.workers[0].metrics.dir_resyncs.load(Ordering::Relaxed), 1);
    // ... and once the publisher is done with it, the next one holds every route.
    drop(in_flight);
    fx.step(0, Vec::new()).await.unwrap();
    let Ok(crate::publish::DirOp::Resync(routes, _, _)) = rx.try_recv() else {
        panic!("no resync after the first was applied");
    };
    assert_eq!(routes.len(), 6);
    assert_eq!(fx.workers[0].metrics.dir_resyncs.load(Ordering::Relaxed), 2);
}

/// The publisher asks for a resync when a write to the directory failed (`publish.rs` test
/// `a_write_that_failed_makes_the_next_refresh_ask_for_one_resync`): the worker sends every
/// route it holds at its next timer, with no client round needed.
#[tokio::test]
async fn a_publishers_failed_write_gets_every_route_at_the_next_timer() {
    let mut fx = Fx::new(1).await;
    let (tx, mut rx) = mpsc::channel(16);
    fx.workers[0].dir = Some(tx);
    for u in 1..=2 {
        fx.login(conn(u as u32), UserId(u), DeviceType::Phone).await;
    }
    let _ = std::iter::from_fn(|| rx.try_recv().ok()).count();
    let now = fx.now;
    fx.workers[0].tick(Tick::Retry, now).await;
    assert!(rx.try_recv().is_err(), "a resync nobody asked for");
    fx.workers[0].dir_heal.store(true, Ordering::Release);
    fx.workers[0].tick(Tick::Retry, now).await;
    let Ok(crate::publish::DirOp::Resync(routes, _, _)) = rx.try_recv() else {
        panic!("no resync after the publisher asked");
    };
    assert_eq!(routes.len(), 2);
    assert!(!fx.workers[0].dir_heal.load(Ordering::Acquire));
}

/// A logout whose `Offline` does not fit the publisher's queue is not lost: the next resync
/// carries it for removal (the publisher keeps no copy of what it published).
#[tokio::test]
async fn a_dropped_offline_is_removed_by_the_next_resync() {
    let mut fx = Fx::new(1).await;
    let (tx, mut rx) = mpsc::channel(1);
    fx.workers[0].dir = Some(tx);
    fx.login(conn(1), UserId(1), DeviceType::Phone).await;
    fx.login(conn(2), UserId(2), DeviceType::Phone).await;
    // The queue holds user 1's `Online`; user 2's was dropped, so is user 1's `Offline`.
    let close = WorkerMsg::Gate(vec![Up::Closed {
        conn: conn(1),
        uid: UserId(1),
    }]);
    fx.step(0, vec![close]).await.unwrap();
    assert!(matches!(
        rx.try_recv(),
        Ok(crate::publish::DirOp::Online { uid: UserId(1), .. })
    ));
    fx.step(0, Vec::new()).await.unwrap();
    let Ok(crate::publish::DirOp::Resync(routes, gone, _)) = rx.try_recv() else {
        panic!("no resync");
    };
    let held: Vec<u64> = routes.iter().map(|(u, _)| u.0).collect();
    assert_eq!(held, [2]);
    assert_eq!(gone, [(UserId(1), DeviceType::Phone as u8, conn(1))]);
    assert!(fx.workers[0].dir_gone.is_empty(), "sent once");
}

/// The presence of the users with a device here is refreshed through the publisher once per
/// period, first one period after the start, and not for users who left.
#[tokio::test]
async fn online_users_are_sent_for_a_presence_refresh_once_per_period() {
    let mut fx = Fx::new(1).await;
    let (tx, mut rx) = mpsc::channel(16);
    fx.workers[0].dir = Some(tx);
    for u in 1..=3 {
        fx.login(conn(u as u32), UserId(u), DeviceType::Phone).await;
    }
    let close = WorkerMsg::Gate(vec![Up::Closed {
        conn: conn(2),
        uid: UserId(2),
    }]);
    fx.step(0, vec![close]).await.unwrap();
    let every = crate::publish::REFRESH_EVERY.as_millis() as u64;
    let touches = |rx: &mut mpsc::Receiver<crate::publish::DirOp>| {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|op| match op {
                crate::publish::DirOp::Touch(mut uids) => {
                    uids.sort_unstable();
                    Some(uids)
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert!(touches(&mut rx).is_empty(), "before a period passed");
    fx.now += every - 1;
    fx.step(0, Vec::new()).await.unwrap();
    assert!(touches(&mut rx).is_empty(), "before a period passed");
    fx.now += 1;
    let now = fx.now;
    fx.workers[0].tick(Tick::Retry, now).await;
    assert_eq!(touches(&mut rx), [vec![UserId(1), UserId(3)]]);
    fx.step(0, Vec::new()).await.unwrap();
    assert!(touches(&mut rx).is_empty(), "twice in one period");
    fx.now += every;
    fx.step(0, Vec::new()).await.unwrap();
    assert_eq!(touches(&mut rx), [vec![UserId(1), UserId(3)]]);
}

/// A group operation of a newer build (a rolling upgrade: it came over a peer link as
/// `GroupOp::Unsupported`) is refused `UnknownCommand` to its client, and the group is untouched.
#[tokio::test]
async fn a_newer_nodes_group_operation_is_refused_unknown_command() {
    let mut fx = Fx::new(1).await;
    let a = UserId(1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let _ = fx.out();
    let req = GroupReq {
        group: GroupId(77),
        actor: a,
        admin: false,
        reply: Reply::Conn {
            conn: conn(1),
            req_id: 5,
        },
        op: GroupOp::Unsupported(99),
    };
    fx.step(0, vec![WorkerMsg::Group(req)]).await.unwrap();
    let out = fx.out();
    let got = op_results(&out, conn(1));
    assert_eq!(got.len(), 1, "{out:?}");
    assert_eq!(got[0].0, ErrorCode::UnknownCommand);
    assert!(got[0].1.contains("group operation 99"), "{}", got[0].1);
}

/// Posts of large groups delivered live to `c` (`GroupDeliver`), in order.
fn group_delivered_to(out: &[Out], c: ConnId) -> Vec<Message> {
    out.iter()
        .filter(|o| o.conn == c)
        .filter_map(|o| match &o.cmd {
            Command::GroupDeliver(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// `(code, message)` of every `OpResult` sent to `c`, in order.
/// Codes of the `Error` frames in `out` (refused sends), in order.
fn refused(out: &[Out]) -> Vec<ErrorCode> {
    out.iter()
        .filter_map(|o| match &o.cmd {
            Command::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

fn op_results(out: &[Out], c: ConnId) -> Vec<(ErrorCode, String)> {
    out.iter()
        .filter(|o| o.conn == c)
        .filter_map(|o| match &o.cmd {
            Command::OpResult { code, message, .. } => Some((*code, message.clone())),
            _ => None,
        })
        .collect()
}

/// The group events (kind, users) in `uid`'s timeline for `group`, in order.
async fn events_of(fx: &Fx, uid: UserId, group: GroupId) -> Vec<(GroupEventKind, Vec<UserId>)> {
    fx.timeline(uid)
        .await
        .into_iter()
        .filter(|m| m.conv == CONV_GROUP_EVENT && m.to.0 == group.0)
        .map(|m| {
            let e = GroupEvent::decode(m.body).unwrap();
            (e.kind, e.users)
        })
        .collect()
}

fn post(client_msg_id: u64, group: GroupId, body: &'static str) -> Command {
    Command::SendC2g {
        client_msg_id,
        group,
        body: Bytes::from_static(body.as_bytes()),
        mentions: Vec::new(),
    }
}

#[test]
fn one_post_to_many_connections_is_one_down_per_gate_core() {
    let mut r = Round::new(1);
    let data = Bytes::from_static(b"frame");
    let (g1c0a, g1c0b) = (ConnId::new(1, 0, 5), ConnId::new(1, 0, 3));
    let (g1c1, g2c0) = (ConnId::new(1, 1, 4), ConnId::new(2, 0, 1));
    r.send(g1c0a, Bytes::from_static(b"before"));
    r.send_many(vec![g1c0a, g2c0, g1c0b, g1c1], data.clone());
    let mut downs: Vec<(u64, Vec<Down>)> = r.downs.into_iter().collect();
    downs.sort_by_key(|(core, _)| *core);
    assert_eq!(
        downs,
        vec![
            (
                0x1_0000,
                vec![
                    Down::Send {
                        conn: g1c0a,
                        data: Bytes::from_static(b"before"),
                    },
                    Down::SendMany {
                        conns: vec![g1c0b, g1c0a],
                        data: data.clone(),
                    },
                ],
            ),
            // A core with one of them gets a plain Send.
            (
                0x1_0001,
                vec![Down::Send {
                    conn: g1c1,
                    data: data.clone()
                }]
            ),
            (0x2_0000, vec![Down::Send { conn: g2c0, data }]),
        ]
    );
}

/// A node of two workers where groups with more than 3 members are large.
async fn large_fx() -> Fx {
    let cfg = LogicConfig {
        large_group_threshold: 3,
        ..LogicConfig::default()
    };
    Fx::with(2, cfg).await
}

/// `a` (logged in on `conn(1)`) creates a group of `a`, `b`, `c`; returns its id.
async fn create_group(fx: &mut Fx, a: UserId, members: Vec<UserId>) -> GroupId {
    let create = Command::GroupCreate {
        name: "all hands".into(),
        members,
        client_id: 0,
    };
    fx.client(conn(1), a, vec![(1, create)]).await;
    fx.pump().await;
    created(&fx.out(), conn(1))
}

#[tokio::test]
async fn a_group_switches_to_read_diffusion_past_the_threshold_and_every_post_is_in_exactly_one_place(
) {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = fx.user_on(0, a.0 + 1);
    let d = fx.user_on(1, b.0 + 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.login(conn(4), d, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    // Small: the post goes to every member's timeline.
    fx.client(conn(2), b, vec![(2, post(1, group, "small"))])
        .await;
    fx.pump().await;
    fx.out();
    // The add that passes the threshold switches the group.
    let add = Command::GroupAdd {
        group,
        members: vec![d],
    };
    fx.client(conn(1), a, vec![(3, add)]).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(
        op_results(&out, conn(1)),
        vec![(ErrorCode::Ok, String::new())]
    );
    // Online members, d included, get the group timeline's first entry live: the marker (the
    // add itself is told only to d).
    for c in [conn(1), conn(2), conn(4)] {
        let live = group_delivered_to(&out, c);
        let seqs: Vec<u64> = live.iter().map(|m| m.seq.0).collect();
        assert_eq!(seqs, vec![1], "{c:?}");
        assert_eq!(live[0].prev_seq, Seq(0));
    }
    fx.client(conn(2), b, vec![(4, post(2, group, "large one"))])
        .await;
    fx.client(conn(1), a, vec![(5, post(3, group, "large two"))])
        .await;
    fx.pump().await;
    let out = fx.out();
    let acks = acks(&out);
    assert_eq!(
        acks.iter().map(|a| (a.2, a.3)).collect::<Vec<_>>(),
        vec![(Seq(2), Seq(1)), (Seq(3), Seq(2))],
        "acks carry the place in the group's timeline"
    );
    for c in [conn(1), conn(2), conn(4)] {
        let live = group_delivered_to(&out, c);
        let bodies: Vec<&[u8]> = live.iter().map(|m| &m.body[..]).collect();
        assert_eq!(bodies, vec![&b"large one"[..], b"large two"], "{c:?}");
    }
    // The group timeline: the marker, the two posts, chained.
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    assert_eq!(gt.len(), 3);
    for (i, m) in gt.iter().enumerate() {
        assert_eq!((m.seq.0, m.prev_seq.0), (i as u64 + 1, i as u64));
        assert_eq!(m.to.0, group.0);
    }
    assert_eq!(
        GroupEvent::decode(gt[0].body.clone()).unwrap().kind,
        GroupEventKind::BecameLarge
    );
    assert_eq!(gt[1].msg_id, acks[0].1);
    // Members' timelines: the small post, then the marker last; no large post in any.
    for m in [a, b, c] {
        let tl = fx.timeline(m).await;
        let posts: Vec<&[u8]> = tl
            .iter()
            .filter(|x| x.conv == CONV_C2G)
            .map(|x| &x.body[..])
            .collect();
        assert_eq!(posts, vec![&b"small"[..]], "member {m}");
        let ev = events_of(&fx, m, group).await;
        assert_eq!(ev.last().unwrap().0, GroupEventKind::BecameLarge, "{m}");
        assert_eq!(
            tl.last().unwrap().conv,
            CONV_GROUP_EVENT,
            "marker after the post: {m}"
        );
    }
    // The new member: told it was added and that the group is large; no old post.
    let ev = events_of(&fx, d, group).await;
    assert_eq!(
        ev,
        vec![
            (GroupEventKind::MembersAdded, vec![d]),
            (GroupEventKind::BecameLarge, vec![])
        ]
    );
    assert!(fx.timeline(d).await.iter().all(|m| m.conv != CONV_C2G));
    assert_eq!(
        fx.store.large_groups_of(c).await.unwrap(),
        vec![group],
        "offline member indexed too"
    );
}

#[tokio::test]
async fn a_member_learns_the_heads_at_login_syncs_the_group_and_keeps_a_read_cursor() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let (b, c, d) = (UserId(a.0 + 1), UserId(a.0 + 2), UserId(a.0 + 3));
    let e = UserId(a.0 + 4);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    // 3 members: small (large is "more than 3").
    assert!(fx.store.large_groups_of(a).await.unwrap().is_empty());
    let add = Command::GroupAdd {
        group,
        members: vec![d, e],
    };
    fx.client(conn(1), a, vec![(2, add)]).await;
    for i in 0..3 {
        fx.client(conn(1), a, vec![(10 + i as u32, post(10 + i, group, "p"))])
            .await;
    }
    fx.pump().await;
    fx.out();
    // Head 4: the marker, three posts.
    let heads = |out: &[Out], cn: ConnId| {
        out.iter()
            .filter(|o| o.conn == cn)
            .find_map(|o| match &o.cmd {
                Command::GroupHeads { heads } => Some(heads.clone()),
                _ => None,
            })
    };
    fx.login(conn(3), c, DeviceType::Phone).await;
    fx.pump().await;
    let out = fx.out();
    let h = heads(&out, conn(3)).expect("heads after the login result");
    assert_eq!(
        h,
        vec![GroupHead {
            group,
            head: Seq(4),
            read: Seq(0)
        }]
    );
    // Sync in pages.
    let sync = |after, limit| Command::GroupSync {
        group,
        after_seq: Seq(after),
        limit,
    };
    fx.client(conn(3), c, vec![(20, sync(0, 2)), (21, sync(2, 0))])
        .await;
    fx.pump().await;
    let pages: Vec<(Seq, bool, Vec<u64>)> = fx
        .out()
        .into_iter()
        .filter_map(|o| match o.cmd {
            Command::GroupSyncPage {
                head,
                has_more,
                messages,
                ..
            } => Some((head, has_more, messages.iter().map(|m| m.seq.0).collect())),
            _ => None,
        })
        .collect();
    assert_eq!(
        pages,
        vec![(Seq(4), true, vec![1, 2]), (Seq(4), false, vec![3, 4])]
    );
    // The read cursor: stored, never lowered.
    let read = |seq| Command::GroupRead {
        group,
        seq: Seq(seq),
    };
    fx.client(conn(3), c, vec![(30, read(4)), (31, read(2))])
        .await;
    let out = fx.out();
    let r = op_results(&out, conn(3));
    assert_eq!(r, vec![(ErrorCode::Ok, String::new()); 2]);
    assert_eq!(fx.store.group_read(c, group).await.unwrap(), Seq(4));
    fx.client(conn(3), c, vec![(33, Command::Logout)]).await;
    fx.out();
    fx.login(conn(5), c, DeviceType::Phone).await;
    fx.pump().await;
    let h = heads(&fx.out(), conn(5)).unwrap();
    assert_eq!(h[0].read, Seq(4));
    // A non-member: no heads, and every read refused with NotMember.
    let outsider = UserId(a.0 + 50);
    fx.login(conn(6), outsider, DeviceType::Phone).await;
    fx.pump().await;
    let out = fx.out();
    assert!(heads(&out, conn(6)).is_none());
    fx.client(conn(6), outsider, vec![(40, sync(0, 0)), (41, read(1))])
        .await;
    fx.pump().await;
    let out = fx.out();
    let r = op_results(&out, conn(6));
    assert_eq!(r.len(), 2, "{out:?}");
    assert!(
        r.iter().all(|(code, _)| *code == ErrorCode::NotMember),
        "{r:?}"
    );
}

#[tokio::test]
async fn removing_a_member_of_a_large_group_touches_only_that_member_and_stops_its_live_posts() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let (c, d) = (UserId(b.0 + 100), UserId(b.0 + 101));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    fx.client(
        conn(1),
        a,
        vec![(
            2,
            Command::GroupAdd {
                group,
                members: vec![d],
            },
        )],
    )
    .await;
    fx.pump().await;
    fx.out();
    let before_c = fx.timeline(c).await.len();
    fx.client(
        conn(1),
        a,
        vec![(
            3,
            Command::GroupRemove {
                group,
                members: vec![b],
            },
        )],
    )
    .await;
    fx.pump().await;
    fx.out();
    assert_eq!(
        events_of(&fx, b, group).await.last().unwrap(),
        &(GroupEventKind::MembersRemoved, vec![b])
    );
    assert_eq!(
        fx.timeline(c).await.len(),
        before_c,
        "others' timelines untouched"
    );
    assert!(fx.store.large_groups_of(b).await.unwrap().is_empty());
    assert_eq!(fx.workers[fx.worker_of(b)].large.online_in(group), 0);
    fx.client(conn(1), a, vec![(4, post(5, group, "after"))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(group_delivered_to(&out, conn(1)).len(), 1);
    assert!(
        group_delivered_to(&out, conn(2)).is_empty(),
        "removed member"
    );
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    let kinds: Vec<_> = gt
        .iter()
        .filter(|m| m.conv == CONV_GROUP_EVENT)
        .map(|m| GroupEvent::decode(m.body.clone()).unwrap().kind)
        .collect();
    assert_eq!(
        kinds,
        vec![GroupEventKind::BecameLarge],
        "no membership entries"
    );
    fx.client(
        conn(2),
        b,
        vec![(
            5,
            Command::GroupSync {
                group,
                after_seq: Seq(0),
                limit: 0,
            },
        )],
    )
    .await;
    fx.pump().await;
    let r = op_results(&fx.out(), conn(2));
    assert_eq!(r[0].0, ErrorCode::NotMember);
}

#[tokio::test]
async fn a_large_group_stays_large_across_a_restart_and_its_timeline_continues() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let others: Vec<UserId> = (1..=3).map(|i| UserId(a.0 + i)).collect();
    let group = create_group(&mut fx, a, others[..2].to_vec()).await;
    fx.client(
        conn(1),
        a,
        vec![(
            2,
            Command::GroupAdd {
                group,
                members: vec![others[2]],
            },
        )],
    )
    .await;
    fx.client(conn(1), a, vec![(3, post(1, group, "before"))])
        .await;
    fx.pump().await;
    fx.out();
    fx.restart().await;
    fx.login(conn(7), a, DeviceType::Phone).await;
    fx.out();
    // A retried post is answered from the dedup record, a new one continues the timeline.
    fx.client(
        conn(7),
        a,
        vec![(4, post(1, group, "before")), (5, post(2, group, "after"))],
    )
    .await;
    fx.pump().await;
    let out = fx.out();
    let acks = acks(&out);
    assert_eq!(acks[0].2, Seq(2), "the retry's ack");
    assert_eq!(acks[1].2, Seq(3));
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    assert_eq!(
        gt.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        group_delivered_to(&out, conn(7))
            .iter()
            .map(|m| m.seq.0)
            .collect::<Vec<_>>(),
        vec![3]
    );
}

#[tokio::test]
async fn a_large_group_refuses_posts_past_its_rate_and_members_past_its_limit() {
    let cfg = LogicConfig {
        large_group_threshold: 2,
        max_group_members: 4,
        large_group_posts_per_sec: 2,
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(1, cfg).await;
    let a = UserId(1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    // Created with more than the threshold: refused (groups grow past it by adds).
    let create = Command::GroupCreate {
        name: "big".into(),
        members: vec![UserId(2), UserId(3)],
        client_id: 0,
    };
    fx.client(conn(1), a, vec![(1, create)]).await;
    let r = op_results(&fx.out(), conn(1));
    assert_eq!(r[0].0, ErrorCode::GroupFull, "{r:?}");
    let group = create_group(&mut fx, a, vec![UserId(2)]).await;
    let add = |members| Command::GroupAdd { group, members };
    fx.client(conn(1), a, vec![(2, add(vec![UserId(3), UserId(4)]))])
        .await;
    fx.client(conn(1), a, vec![(3, add(vec![UserId(5)]))]).await;
    fx.pump().await;
    let r = op_results(&fx.out(), conn(1));
    assert_eq!(r[0].0, ErrorCode::Ok);
    assert_eq!(r[1].0, ErrorCode::GroupFull, "{r:?}");
    // Two posts a second with a burst of two: the third in the same instant is refused, and a
    // retry of an accepted one is still acked.
    fx.now += 10_000;
    fx.client(
        conn(1),
        a,
        vec![
            (10, post(1, group, "1")),
            (11, post(2, group, "2")),
            (12, post(3, group, "3")),
            (13, post(1, group, "1")),
        ],
    )
    .await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(acks(&out).len(), 3, "{out:?}");
    let refused: Vec<_> = out
        .iter()
        .filter_map(|o| match &o.cmd {
            Command::Error { code, .. } => Some((o.req_id, *code)),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![(12, ErrorCode::Overloaded)]);
    fx.now += 500;
    fx.client(conn(1), a, vec![(14, post(3, group, "3"))]).await;
    fx.pump().await;
    assert_eq!(
        acks(&fx.out()).len(),
        1,
        "half a second later: room for one"
    );
}

#[tokio::test]
async fn the_member_list_of_a_group_is_paged() {
    let mut fx = Fx::new(1).await;
    let a = UserId(10);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, (11..=14).map(UserId).collect()).await;
    let page = |after, limit| Command::GroupMembers {
        group,
        after: UserId(after),
        limit,
    };
    fx.client(
        conn(1),
        a,
        vec![(2, page(0, 2)), (3, page(11, 0)), (4, page(14, 5))],
    )
    .await;
    fx.pump().await;
    let pages: Vec<(u32, bool, Vec<u64>)> = fx
        .out()
        .into_iter()
        .filter_map(|o| match o.cmd {
            Command::GroupMembersPage {
                total,
                more,
                members,
                ..
            } => Some((total, more, members.iter().map(|m| m.0 .0).collect())),
            _ => None,
        })
        .collect();
    assert_eq!(
        pages,
        vec![
            (5, true, vec![10, 11]),
            (5, false, vec![12, 13, 14]),
            (5, false, vec![])
        ]
    );
    // Not a member: refused.
    fx.login(conn(2), UserId(99), DeviceType::Phone).await;
    fx.client(conn(2), UserId(99), vec![(5, page(0, 0))]).await;
    fx.pump().await;
    assert_eq!(op_results(&fx.out(), conn(2))[0].0, ErrorCode::NotMember);
}

#[tokio::test]
async fn a_muted_large_group_sends_one_coalesced_heads_push_instead_of_every_post() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let others: Vec<UserId> = (1..=3).map(|i| UserId(b.0 + 100 + i)).collect();
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    // Two large groups with b in both.
    let mut groups = Vec::new();
    for _ in 0..2 {
        let g = create_group(&mut fx, a, vec![b]).await;
        let add = Command::GroupAdd {
            group: g,
            members: others.clone(),
        };
        fx.client(conn(1), a, vec![(2, add)]).await;
        fx.pump().await;
        fx.out();
        groups.push(g);
    }
    fx.out();
    let mute = |g: GroupId, muted| Command::SetMute { peer: g.0, muted };
    fx.client(
        conn(2),
        b,
        vec![(3, mute(groups[0], true)), (4, mute(groups[1], true))],
    )
    .await;
    fx.out();
    for (i, g) in [groups[0], groups[1], groups[0]].into_iter().enumerate() {
        fx.client(
            conn(1),
            a,
            vec![(10 + i as u32, post(10 + i as u64, g, "x"))],
        )
        .await;
    }
    fx.pump().await;
    let out = fx.out();
    assert_eq!(group_delivered_to(&out, conn(1)).len(), 3, "not muted");
    assert!(
        group_delivered_to(&out, conn(2)).is_empty(),
        "muted: no live post"
    );
    let heads_to = |out: &[Out]| -> Vec<Vec<GroupHead>> {
        out.iter()
            .filter(|o| o.conn == conn(2))
            .filter_map(|o| match &o.cmd {
                Command::GroupHeads { heads } => Some(heads.clone()),
                _ => None,
            })
            .collect()
    };
    // Heads instead of posts: at most one push per second, each for every muted group that
    // moved since the last; together they tell the newest head of each.
    let mut pushes = heads_to(&out);
    assert!(
        pushes.len() <= 1,
        "one push at most within a second: {pushes:?}"
    );
    fx.client(conn(1), a, vec![(15, post(15, groups[1], "z"))])
        .await;
    fx.pump().await;
    assert!(heads_to(&fx.out()).is_empty(), "within the second: held");
    fx.now += MUTED_HEADS_EVERY_MS;
    let wb = fx.worker_of(b);
    fx.step(wb, Vec::new()).await.unwrap();
    let later = heads_to(&fx.out());
    assert_eq!(later.len(), 1, "{later:?}");
    pushes.extend(later);
    let mut newest = std::collections::BTreeMap::new();
    for h in pushes.iter().flatten() {
        let e = newest.entry(h.group).or_insert(Seq(0));
        *e = (*e).max(h.head);
    }
    let want: std::collections::BTreeMap<GroupId, Seq> = [(groups[0], Seq(3)), (groups[1], Seq(3))]
        .into_iter()
        .collect();
    assert_eq!(newest, want);
    fx.now += MUTED_HEADS_EVERY_MS;
    fx.step(wb, Vec::new()).await.unwrap();
    assert!(heads_to(&fx.out()).is_empty(), "nothing moved since");
    // Unmuted: live again.
    fx.client(conn(2), b, vec![(5, mute(groups[1], false))])
        .await;
    fx.client(conn(1), a, vec![(20, post(20, groups[1], "y"))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(group_delivered_to(&out, conn(2)).len(), 1);
    assert!(heads_to(&out).is_empty());
}

/// Recall in a large group: the post is in the group's timeline, so its owner checks it. The
/// poster (and the owner or an admin, moderating) recall it with one marker post in the group's
/// timeline, live to the online members; another member, a group event, an unknown id and a post
/// past the window are refused.
#[tokio::test]
async fn a_large_groups_post_is_recalled_through_its_owner() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = UserId(b.0 + 100);
    let d = fx.user_on(1, b.0 + 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.login(conn(4), d, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    let add = Command::GroupAdd {
        group,
        members: vec![d],
    };
    fx.client(conn(1), a, vec![(2, add)]).await;
    fx.pump().await;
    fx.out();
    fx.client(conn(2), b, vec![(3, post(1, group, "b's"))])
        .await;
    fx.client(conn(4), d, vec![(4, post(2, group, "d's"))])
        .await;
    fx.pump().await;
    let posted = acks(&fx.out());
    let (b_post, d_post) = (posted[0].1, posted[1].1);
    let recall = |cid: u64, msg_id: MsgId| Command::Recall {
        client_msg_id: cid,
        conv: CONV_C2G,
        peer: group.0,
        msg_id,
    };
    let refusals = |out: &[Out], c: ConnId| -> Vec<(u32, ErrorCode)> {
        out.iter()
            .filter(|o| o.conn == c)
            .filter_map(|o| match &o.cmd {
                Command::Error { code, .. } => Some((o.req_id, *code)),
                _ => None,
            })
            .collect()
    };
    // d may not recall b's post; b recalls it.
    fx.client(conn(4), d, vec![(5, recall(10, b_post))]).await;
    fx.client(conn(2), b, vec![(6, recall(11, b_post))]).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(refusals(&out, conn(4)), vec![(5, ErrorCode::RecallRefused)]);
    assert_eq!(acks(&out).len(), 1, "{out:?}");
    for c in [conn(1), conn(2), conn(4)] {
        let live = group_delivered_to(&out, c);
        assert_eq!(live.len(), 1, "{c:?}");
        assert_eq!(live[0].conv, im_shared::proto::CONV_RECALL);
        assert_eq!(
            im_shared::proto::MarkerBody::decode(live[0].body.clone())
                .unwrap()
                .msg_id,
            b_post
        );
    }
    // The owner moderates: it recalls d's post. A group event, an unknown id: refused.
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    let became_large = gt[0].msg_id;
    let unknown = MsgId(d_post.0 + 1000);
    fx.client(
        conn(1),
        a,
        vec![
            (7, recall(12, d_post)),
            (8, recall(13, became_large)),
            (9, recall(14, unknown)),
        ],
    )
    .await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(acks(&out).len(), 1, "{out:?}");
    assert_eq!(
        refusals(&out, conn(1)),
        vec![(8, ErrorCode::RecallRefused), (9, ErrorCode::NotFound)]
    );
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    let markers: Vec<(UserId, MsgId)> = gt
        .iter()
        .filter(|m| m.conv == im_shared::proto::CONV_RECALL)
        .map(|m| {
            (
                m.from,
                im_shared::proto::MarkerBody::decode(m.body.clone())
                    .unwrap()
                    .msg_id,
            )
        })
        .collect();
    assert_eq!(markers, vec![(b, b_post), (a, d_post)]);
    // Past the recall window: refused, nothing written.
    fx.client(conn(2), b, vec![(10, post(3, group, "late"))])
        .await;
    fx.pump().await;
    let late = acks(&fx.out())[0].1;
    fx.now += 121_000;
    fx.client(conn(2), b, vec![(11, recall(15, late))]).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(
        refusals(&out, conn(2)),
        vec![(11, ErrorCode::RecallRefused)]
    );
    let after = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    assert_eq!(after.len(), gt.len() + 1, "only the late post was added");
}

#[tokio::test]
async fn a_mention_in_a_large_group_reaches_the_mentioned_members_own_timelines_only() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let (c, d, e) = (UserId(b.0 + 100), UserId(b.0 + 101), UserId(b.0 + 102));
    let outsider = UserId(b.0 + 200);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    let add = Command::GroupAdd {
        group,
        members: vec![d, e],
    };
    fx.client(conn(1), a, vec![(2, add)]).await;
    fx.pump().await;
    fx.out();
    let before: Vec<usize> = {
        let mut v = Vec::new();
        for u in [a, b, c, d, e, outsider] {
            v.push(fx.timeline(u).await.len());
        }
        v
    };
    let mention = |cid, mentions: Vec<UserId>| Command::SendC2g {
        client_msg_id: cid,
        group,
        body: Bytes::from_static(b"@b @c look"),
        mentions,
    };
    // b (online) and c (offline) are mentioned; the poster itself and a non-member are ignored.
    fx.client(
        conn(1),
        a,
        vec![(3, mention(1, vec![b, c, c, a, outsider]))],
    )
    .await;
    fx.pump().await;
    let out = fx.out();
    let ack = acks(&out)[0];
    for (i, u) in [a, b, c, d, e, outsider].into_iter().enumerate() {
        let tl = fx.timeline(u).await;
        let mentions: Vec<&Message> = tl[before[i]..]
            .iter()
            .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
            .collect();
        if u == b || u == c {
            assert_eq!(mentions.len(), 1, "{u}");
            let m = mentions[0];
            assert_eq!((m.msg_id, m.from, m.to.0), (ack.1, a, group.0));
            assert_eq!(&m.body[..], b"@b @c look");
        } else {
            assert_eq!(tl.len(), before[i], "nothing new for {u}");
        }
    }
    // b's device got both: the post live (group seqs) and the mention (b's own timeline).
    assert_eq!(group_delivered_to(&out, conn(2)).len(), 1);
    assert_eq!(
        delivered_to(&out, conn(2))
            .iter()
            .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
            .count(),
        1
    );
    // More than 20 mentions are refused anywhere.
    let many: Vec<UserId> = (1..=21).map(|i| UserId(b.0 + 300 + i)).collect();
    fx.client(conn(1), a, vec![(5, mention(3, many))]).await;
    fx.pump().await;
    let refused: Vec<(u32, ErrorCode)> = fx
        .out()
        .iter()
        .filter_map(|o| match &o.cmd {
            Command::Error { code, .. } => Some((o.req_id, *code)),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![(5, ErrorCode::InvalidArgument)]);
}

/// A large group of the owner `a` (worker 0, online on `conn(1)`), `b` (worker 1, online on
/// `conn(2)`), `c` (worker 0, online on `conn(3)`) and eleven offline members spread over both
/// workers: 14 members, four chunks of an `@all` at the test chunk size.
async fn all_hands(fx: &mut Fx) -> (UserId, UserId, UserId, GroupId, Vec<UserId>) {
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = fx.user_on(0, a.0 + 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.login(conn(3), c, DeviceType::Phone).await;
    let group = create_group(fx, a, vec![b, c]).await;
    let offline: Vec<UserId> = (0..11).map(|i| UserId(b.0 + 1_000 + i * 7)).collect();
    let add = Command::GroupAdd {
        group,
        members: offline.clone(),
    };
    fx.client(conn(1), a, vec![(2, add)]).await;
    fx.pump().await;
    fx.out();
    (a, b, c, group, offline)
}

fn mention_all(client_msg_id: u64, group: GroupId) -> Command {
    Command::SendC2g {
        client_msg_id,
        group,
        body: Bytes::from_static(b"@all meeting at 10"),
        mentions: vec![UserId(0)],
    }
}

/// The mention entries (`msg_id`s) in `uid`'s timeline.
async fn mentions_of(fx: &Fx, uid: UserId) -> Vec<MsgId> {
    fx.timeline(uid)
        .await
        .iter()
        .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
        .map(|m| m.msg_id)
        .collect()
}

#[tokio::test]
async fn an_all_mention_in_a_large_group_reaches_every_member_once_chunk_by_chunk() {
    let mut fx = large_fx().await;
    let (a, b, c, group, offline) = all_hands(&mut fx).await;
    // A plain member may not; the owner may.
    fx.client(conn(2), b, vec![(3, mention_all(1, group))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(
        error_to(&out, conn(2), 3).map(|e| e.0),
        Some(ErrorCode::Forbidden)
    );
    assert!(fx.mentions_none(&[a, b, c]).await);
    // The set-up's confirmed outbox entries are deleted once due.
    fx.settle().await;
    fx.out();
    fx.client(conn(1), a, vec![(4, mention_all(2, group))])
        .await;
    fx.step_owner(group).await;
    let ack = acks(&fx.out())[0];
    // The post's outbox entry is the first chunk: the @all mark and 4 members, in uid order.
    let shard = vshard_of(UserId(group.0));
    let entries = fx.store.outbox(shard).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].recipients.len(), 5);
    assert_eq!(entries[0].recipients[0], UserId(0));
    assert!(entries[0].recipients[1..].is_sorted());
    assert_eq!(entries[0].msg.conv, im_shared::proto::CONV_MENTION);
    fx.pump().await;
    let out = fx.out();
    // Every member but the poster: exactly one mention entry, the post's.
    for u in [b, c].iter().chain(&offline) {
        assert_eq!(mentions_of(&fx, *u).await, vec![ack.1], "member {u}");
    }
    assert!(mentions_of(&fx, a).await.is_empty(), "not the poster");
    // The online members got it live too (and the post itself, once).
    for cn in [conn(2), conn(3)] {
        let live: Vec<MsgId> = delivered_to(&out, cn)
            .iter()
            .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
            .map(|m| m.msg_id)
            .collect();
        assert_eq!(live, vec![ack.1], "{cn:?}");
        assert_eq!(group_delivered_to(&out, cn).len(), 1, "{cn:?}");
    }
    // The group timeline has the post once; the last chunk's entry goes once it is confirmed.
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    assert_eq!(gt.iter().filter(|m| m.msg_id == ack.1).count(), 1);
    fx.settle().await;
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
    // Another @all within the interval is refused (retryable), even by an admin; after it, an
    // admin's is taken.
    let role = Command::GroupRole {
        group,
        uid: c,
        role: ROLE_ADMIN,
    };
    fx.client(conn(1), a, vec![(5, role)]).await;
    fx.pump().await;
    fx.out();
    fx.client(conn(3), c, vec![(6, mention_all(3, group))])
        .await;
    fx.pump().await;
    let out = fx.out();
    let (code, why) = error_to(&out, conn(3), 6).expect("refused");
    assert_eq!(code, ErrorCode::Overloaded);
    assert!(why.contains("one @all every 60 s"), "{why}");
    fx.now += 60_000;
    fx.client(conn(3), c, vec![(7, mention_all(3, group))])
        .await;
    fx.pump().await;
    let second = acks(&fx.out())[0].1;
    assert_eq!(mentions_of(&fx, a).await, vec![second], "the owner too now");
    assert_eq!(mentions_of(&fx, b).await, vec![ack.1, second]);
    assert_eq!(mentions_of(&fx, c).await, vec![ack.1], "not the poster");
    // The owner's wall clock steps back an hour (an NTP step, say): the interval counts from
    // the step, not until the clock is back at the last @all.
    fx.settle().await;
    fx.now -= 3_600_000;
    fx.client(conn(3), c, vec![(8, mention_all(4, group))])
        .await;
    fx.pump().await;
    let (code, why) = error_to(&fx.out(), conn(3), 8).expect("refused");
    assert_eq!(code, ErrorCode::Overloaded);
    assert!(why.contains("one @all every 60 s"), "{why}");
    fx.now += 60_000;
    fx.client(conn(3), c, vec![(9, mention_all(4, group))])
        .await;
    fx.pump().await;
    let third = acks(&fx.out())[0].1;
    assert_eq!(mentions_of(&fx, b).await, vec![ack.1, second, third]);
}

#[tokio::test]
async fn an_all_mention_is_refused_while_the_last_one_is_still_being_delivered() {
    let mut fx = large_fx().await;
    let (a, _b, _c, group, _offline) = all_hands(&mut fx).await;
    fx.client(conn(1), a, vec![(3, mention_all(1, group))])
        .await;
    fx.step_owner(group).await;
    assert_eq!(acks(&fx.out()).len(), 1);
    // The first chunk's appends are not confirmed yet; even past the interval, a second waits.
    fx.now += 120_000;
    fx.client(conn(1), a, vec![(4, mention_all(2, group))])
        .await;
    fx.step_owner(group).await;
    let (code, why) = error_to(&fx.out(), conn(1), 4).expect("refused");
    assert_eq!(code, ErrorCode::Overloaded);
    assert!(why.contains("still being delivered"), "{why}");
    // A retry of the first (same client_msg_id) is its ack again, not a refusal.
    fx.client(conn(1), a, vec![(5, mention_all(1, group))])
        .await;
    fx.step_owner(group).await;
    assert_eq!(acks(&fx.out()).len(), 1);
}

#[tokio::test]
async fn an_all_mention_interrupted_by_a_crash_resumes_after_the_restart_and_stores_nothing_twice()
{
    let mut fx = large_fx().await;
    let (a, b, c, group, offline) = all_hands(&mut fx).await;
    fx.client(conn(1), a, vec![(3, mention_all(1, group))])
        .await;
    fx.step_owner(group).await;
    let ack = acks(&fx.out())[0];
    // The members' workers append the first chunk and confirm; the confirmations die with the
    // process, before the owner wrote the second chunk.
    let mut lost = 0;
    for _ in 0..2 {
        for w in 0..2 {
            let mut msgs = fx.inbox(w);
            let n = msgs.len();
            msgs.retain(|m| !matches!(m, WorkerMsg::AppendDone(_)));
            lost += n - msgs.len();
            fx.step(w, msgs).await.unwrap();
        }
    }
    let appended: usize = {
        let mut n = 0;
        for u in [b, c].iter().chain(&offline) {
            n += mentions_of(&fx, *u).await.len();
        }
        n
    };
    assert_eq!(appended, 4, "one chunk");
    assert!(lost > 0);
    fx.restart().await;
    // The stored chunk is replayed (found by the members' msg index: no second copy) and the
    // fan-out goes on after it.
    fx.pump().await;
    for u in [b, c].iter().chain(&offline) {
        assert_eq!(mentions_of(&fx, *u).await, vec![ack.1], "member {u}");
    }
    fx.settle().await;
    let shard = vshard_of(UserId(group.0));
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
    // Nothing is left to replay at the next start.
    fx.restart().await;
    assert!(fx.inbox(0).is_empty() && fx.inbox(1).is_empty());
}

#[tokio::test]
async fn a_broadcast_channel_takes_posts_from_its_owner_only_across_a_restart() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b]).await;
    let posting = |owner_only| Command::GroupPosting { group, owner_only };
    // Only the owner sets it.
    fx.client(conn(2), b, vec![(2, posting(true))]).await;
    fx.client(conn(1), a, vec![(3, posting(true))]).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(op_results(&out, conn(2))[0].0, ErrorCode::Forbidden);
    assert_eq!(
        op_results(&out, conn(1)),
        vec![(ErrorCode::Ok, String::new())]
    );
    for round in 0..2 {
        if round == 1 {
            // The setting is stored: a restarted owner loads it with the group.
            fx.restart().await;
            fx.login(conn(5), a, DeviceType::Phone).await;
            fx.login(conn(6), b, DeviceType::Phone).await;
            fx.out();
        }
        let (ca, cb) = if round == 0 {
            (conn(1), conn(2))
        } else {
            (conn(5), conn(6))
        };
        fx.client(cb, b, vec![(10, post(10 + round, group, "me too"))])
            .await;
        fx.client(ca, a, vec![(11, post(20 + round, group, "news"))])
            .await;
        fx.pump().await;
        let out = fx.out();
        assert_eq!(refused(&out), vec![ErrorCode::Forbidden], "round {round}");
        assert_eq!(acks(&out).len(), 1, "the owner's post, round {round}");
    }
    // Open again: members post.
    fx.client(conn(5), a, vec![(12, posting(false))]).await;
    fx.pump().await;
    fx.client(conn(6), b, vec![(13, post(30, group, "finally"))])
        .await;
    fx.pump().await;
    let out = fx.out();
    assert!(refused(&out).is_empty(), "{out:?}");
    assert_eq!(acks(&out).len(), 1);
}

#[tokio::test]
async fn admins_manage_members_and_post_in_a_channel_and_only_the_owner_sets_roles() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = fx.user_on(0, a.0 + 1);
    let d = fx.user_on(1, b.0 + 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.login(conn(3), c, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    let role = |uid: UserId, role: u8| Command::GroupRole { group, uid, role };
    // One request, its OpResult code.
    async fn one(fx: &mut Fx, on: ConnId, who: UserId, cmd: Command) -> ErrorCode {
        fx.client(on, who, vec![(7, cmd)]).await;
        fx.pump().await;
        let r = op_results(&fx.out(), on);
        assert_eq!(r.len(), 1, "{r:?}");
        r[0].0
    }
    // Only the owner sets roles, of members only, never its own, to member or admin only.
    assert_eq!(
        one(&mut fx, conn(2), b, role(b, ROLE_ADMIN)).await,
        ErrorCode::Forbidden
    );
    assert_eq!(
        one(&mut fx, conn(1), a, role(d, ROLE_ADMIN)).await,
        ErrorCode::NotMember
    );
    assert_eq!(
        one(&mut fx, conn(1), a, role(a, ROLE_MEMBER)).await,
        ErrorCode::Forbidden
    );
    assert_eq!(
        one(&mut fx, conn(1), a, role(b, ROLE_OWNER)).await,
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        one(&mut fx, conn(1), a, role(b, ROLE_ADMIN)).await,
        ErrorCode::Ok
    );
    // Every member is told, once (setting it again changes nothing).
    assert_eq!(
        one(&mut fx, conn(1), a, role(b, ROLE_ADMIN)).await,
        ErrorCode::Ok
    );
    for m in [a, b, c] {
        let ev = events_of(&fx, m, group).await;
        let admin_events: Vec<_> = ev
            .iter()
            .filter(|e| e.0 == GroupEventKind::AdminAdded)
            .collect();
        assert_eq!(
            admin_events,
            vec![&(GroupEventKind::AdminAdded, vec![b])],
            "{m}"
        );
    }
    // The admin manages members, but neither the owner nor another admin, nor roles.
    let add = Command::GroupAdd {
        group,
        members: vec![d],
    };
    assert_eq!(one(&mut fx, conn(2), b, add).await, ErrorCode::Ok);
    let remove = |u: UserId| Command::GroupRemove {
        group,
        members: vec![u],
    };
    assert_eq!(
        one(&mut fx, conn(2), b, remove(a)).await,
        ErrorCode::Forbidden
    );
    assert_eq!(
        one(&mut fx, conn(2), b, role(c, ROLE_ADMIN)).await,
        ErrorCode::Forbidden
    );
    assert_eq!(
        one(&mut fx, conn(1), a, role(c, ROLE_ADMIN)).await,
        ErrorCode::Ok
    );
    assert_eq!(
        one(&mut fx, conn(2), b, remove(c)).await,
        ErrorCode::Forbidden
    );
    assert_eq!(one(&mut fx, conn(2), b, remove(d)).await, ErrorCode::Ok);
    // A channel: the owner and its admins post, a member does not.
    let posting = Command::GroupPosting {
        group,
        owner_only: true,
    };
    assert_eq!(one(&mut fx, conn(2), b, posting).await, ErrorCode::Ok);
    assert_eq!(
        one(&mut fx, conn(1), a, role(c, ROLE_MEMBER)).await,
        ErrorCode::Ok
    );
    for round in 0..2u64 {
        let (ca, cb, cc) = if round == 0 {
            (conn(1), conn(2), conn(3))
        } else {
            // Roles are stored with the members: a restarted owner knows them.
            fx.restart().await;
            fx.login(conn(11), a, DeviceType::Phone).await;
            fx.login(conn(12), b, DeviceType::Phone).await;
            fx.login(conn(13), c, DeviceType::Phone).await;
            fx.out();
            (conn(11), conn(12), conn(13))
        };
        fx.client(ca, a, vec![(20, post(100 + round, group, "owner"))])
            .await;
        fx.client(cb, b, vec![(21, post(200 + round, group, "admin"))])
            .await;
        fx.client(cc, c, vec![(22, post(300 + round, group, "member"))])
            .await;
        fx.pump().await;
        let out = fx.out();
        assert_eq!(refused(&out), vec![ErrorCode::Forbidden], "round {round}");
        assert_eq!(acks(&out).len(), 2, "round {round}");
    }
    // Made a member again, the former admin no longer posts.
    assert_eq!(
        one(&mut fx, conn(11), a, role(b, ROLE_MEMBER)).await,
        ErrorCode::Ok
    );
    fx.client(conn(12), b, vec![(23, post(400, group, "admin?"))])
        .await;
    fx.pump().await;
    assert_eq!(refused(&fx.out()), vec![ErrorCode::Forbidden]);
    // The first change went to every member's timeline; adding d made the group large, so
    // the later ones are single entries of the group's own timeline.
    let roles = |ev: Vec<(GroupEventKind, Vec<UserId>)>| -> Vec<(GroupEventKind, Vec<UserId>)> {
        ev.into_iter()
            .filter(|e| {
                matches!(
                    e.0,
                    GroupEventKind::AdminAdded | GroupEventKind::AdminRemoved
                )
            })
            .collect()
    };
    assert_eq!(
        roles(events_of(&fx, c, group).await),
        vec![(GroupEventKind::AdminAdded, vec![b])]
    );
    let gt = fx.store.group_timeline(group, Seq(0), 100).await.unwrap();
    let in_group = gt
        .into_iter()
        .filter(|m| m.conv == CONV_GROUP_EVENT)
        .map(|m| {
            let e = GroupEvent::decode(m.body).unwrap();
            (e.kind, e.users)
        })
        .collect();
    assert_eq!(
        roles(in_group),
        vec![
            (GroupEventKind::AdminAdded, vec![c]),
            (GroupEventKind::AdminRemoved, vec![c]),
            (GroupEventKind::AdminRemoved, vec![b]),
        ]
    );
}

#[tokio::test]
async fn a_member_of_many_large_groups_gets_one_heads_push_per_owner_worker_at_login() {
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    let (b, c, d, e) = (
        UserId(a.0 + 1),
        UserId(a.0 + 2),
        UserId(a.0 + 3),
        UserId(a.0 + 4),
    );
    fx.login(conn(1), a, DeviceType::Phone).await;
    let mut groups = vec![];
    for i in 0..4 {
        // Distinct client ids: a create with the same one is a retry of the first.
        let create = Command::GroupCreate {
            name: format!("g{i}"),
            members: vec![b, c],
            client_id: i,
        };
        fx.client(conn(1), a, vec![(1, create)]).await;
        fx.pump().await;
        let g = created(&fx.out(), conn(1));
        let add = Command::GroupAdd {
            group: g,
            members: vec![d, e],
        };
        fx.client(conn(1), a, vec![(2, add)]).await;
        fx.pump().await;
        let r = op_results(&fx.out(), conn(1));
        assert_eq!(r, vec![(ErrorCode::Ok, String::new())], "add to group {i}");
        groups.push(g);
    }
    groups.dedup();
    assert_eq!(groups.len(), 4, "{groups:?}");
    fx.client(conn(1), a, vec![(3, post(1, groups[2], "p"))])
        .await;
    fx.pump().await;
    fx.out();
    assert_eq!(fx.store.large_groups_of(c).await.unwrap().len(), 4);
    fx.login(conn(3), c, DeviceType::Phone).await;
    fx.pump().await;
    let pushes: Vec<Vec<GroupHead>> = fx
        .out()
        .into_iter()
        .filter(|o| o.conn == conn(3))
        .filter_map(|o| match o.cmd {
            Command::GroupHeads { heads } => Some(heads),
            _ => None,
        })
        .collect();
    // Two workers own the four groups: at most two pushes, together every group once.
    assert!(
        (1..=2).contains(&pushes.len()),
        "{} pushes: {pushes:?}",
        pushes.len()
    );
    let mut all: Vec<GroupHead> = pushes.concat();
    all.sort_unstable_by_key(|h| h.group);
    let mut want: Vec<GroupHead> = groups
        .iter()
        .map(|&g| GroupHead {
            group: g,
            head: Seq(if g == groups[2] { 2 } else { 1 }),
            read: Seq(0),
        })
        .collect();
    want.sort_unstable_by_key(|h| h.group);
    assert_eq!(all, want);
}

/// An add of many members to a large group tells each of them in an event that lists at most
/// `MEMBER_EVENT_CHUNK` of the added members, itself among them; a removal the same way.
#[tokio::test]
async fn a_large_groups_member_events_list_at_most_a_chunk_each_the_member_itself_included() {
    use super::large::MEMBER_EVENT_CHUNK;
    let mut fx = large_fx().await;
    let a = fx.user_on(0, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let b = UserId(a.0 + 1);
    let group = create_group(&mut fx, a, vec![b]).await;
    let new: Vec<UserId> = (0..150).map(|i| UserId(a.0 + 100 + i)).collect();
    let add = Command::GroupAdd {
        group,
        members: new.clone(),
    };
    fx.client(conn(1), a, vec![(2, add)]).await;
    fx.pump().await;
    let mut told: Vec<UserId> = Vec::new();
    for u in &new {
        let ev = events_of(&fx, *u, group).await;
        assert_eq!(ev.len(), 2, "{u}: {ev:?}");
        let (kind, users) = &ev[0];
        assert_eq!(*kind, GroupEventKind::MembersAdded);
        assert!(
            users.contains(u) && users.len() <= MEMBER_EVENT_CHUNK,
            "{u}"
        );
        assert_eq!(ev[1].0, GroupEventKind::BecameLarge);
        if users[0] == *u {
            told.extend(users);
        }
    }
    assert_eq!(
        told, new,
        "the events' lists cover the add, each member once"
    );
    let remove = Command::GroupRemove {
        group,
        members: new[..100].to_vec(),
    };
    fx.client(conn(1), a, vec![(3, remove)]).await;
    fx.pump().await;
    for u in &new[..100] {
        let ev = events_of(&fx, *u, group).await;
        let (kind, users) = ev.last().unwrap();
        assert_eq!(*kind, GroupEventKind::MembersRemoved);
        assert!(
            users.contains(u) && users.len() <= MEMBER_EVENT_CHUNK,
            "{u}"
        );
    }
}

/// The download URL answered to `req_id` on `c`, or the refusal.
fn file_answer(out: &[Out], c: ConnId, req_id: u32) -> Result<String, (ErrorCode, String)> {
    out.iter()
        .filter(|o| o.conn == c && o.req_id == req_id)
        .find_map(|o| match &o.cmd {
            Command::FileUrl { url, .. } => Some(Ok(url.clone())),
            Command::Error { code, message } => Some(Err((*code, message.clone()))),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no answer to {req_id}: {out:?}"))
}

/// A large group (a, b, c, d; a and b online on conns 1 and 2) on a node with the file service,
/// and a's post of a file mentioning b: `(fx, group, a, b, the post's msg_id and group seq, b's
/// mention entry's seq)`.
async fn large_group_file_post() -> (Fx, GroupId, UserId, UserId, MsgId, Seq, Seq) {
    let keys = im_shared::files::FileKeys::new(b"a file secret".to_vec());
    let sha256 = [7u8; 32];
    let file = im_shared::files::FileRef {
        kind: im_shared::files::FileKind::File,
        sha256,
        size: 10,
        key: keys.file_key(&sha256),
        mime: "application/pdf".into(),
        name: "x.pdf".into(),
        width: 0,
        height: 0,
        duration_ms: 0,
        thumb: Bytes::new(),
    };
    let cfg = LogicConfig {
        large_group_threshold: 3,
        large_group_posts_per_sec: 1_000_000,
        files: Some(Arc::new(crate::FilesPolicy {
            keys,
            base_url: std::sync::RwLock::new("http://files".into()),
            max_size: 1 << 20,
            ticket_ms: 60_000,
            url_ms: 60_000,
        })),
        ..LogicConfig::default()
    };
    let mut fx = Fx::with(2, cfg).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let (c, d) = (UserId(b.0 + 100), UserId(b.0 + 101));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    let group = create_group(&mut fx, a, vec![b, c]).await;
    let add = Command::GroupAdd {
        group,
        members: vec![d],
    };
    fx.client(conn(1), a, vec![(2, add)]).await;
    fx.pump().await;
    fx.out();
    let send = Command::SendC2g {
        client_msg_id: 1,
        group,
        body: file.to_body(),
        mentions: vec![b],
    };
    fx.client(conn(1), a, vec![(3, send)]).await;
    fx.pump().await;
    let out = fx.out();
    let (_, msg_id, seq, _) = acks(&out)[0];
    let entry = fx
        .timeline(b)
        .await
        .into_iter()
        .find(|m| m.conv == im_shared::proto::CONV_MENTION && m.msg_id == msg_id)
        .expect("a mention entry")
        .seq;
    (fx, group, a, b, msg_id, seq, entry)
}

#[tokio::test]
async fn a_large_groups_file_recalled_thousands_of_posts_later_is_handed_out_to_nobody() {
    let (mut fx, group, a, b, msg_id, seq, entry) = large_group_file_post().await;
    let ask = |req_id: u32| {
        vec![
            (req_id, Command::GroupFileDownload { group, seq }),
            (req_id + 1, Command::FileDownload { seq: entry }),
        ]
    };
    fx.client(conn(2), b, ask(10)).await;
    fx.pump().await;
    let out = fx.out();
    assert!(file_answer(&out, conn(2), 10).is_ok(), "{out:?}");
    assert!(file_answer(&out, conn(2), 11).is_ok(), "{out:?}");
    // More posts after it than a user's timeline scan reads (2 000), then its recall.
    for i in 0..22u64 {
        let posts = (0..100)
            .map(|j| {
                (
                    100 + (i * 100 + j) as u32,
                    post(100 + i * 100 + j, group, "text"),
                )
            })
            .collect();
        fx.client(conn(1), a, posts).await;
        fx.pump().await;
        assert_eq!(acks(&fx.out()).len(), 100, "posts accepted");
    }
    let recall = Command::Recall {
        client_msg_id: 9_999,
        conv: CONV_C2G,
        peer: group.0,
        msg_id,
    };
    fx.client(conn(1), a, vec![(9_999, recall)]).await;
    fx.pump().await;
    assert_eq!(acks(&fx.out()).len(), 1, "the recall is accepted");
    fx.client(conn(2), b, ask(20)).await;
    fx.pump().await;
    let out = fx.out();
    for req_id in [20, 21] {
        let (code, why) = file_answer(&out, conn(2), req_id).unwrap_err();
        assert_eq!(code, ErrorCode::NotFound, "{why}");
        assert!(why.contains("recalled"), "{why}");
    }
    // After a restart the owner remembers nothing: it reads the timeline after the post, past
    // the 2 200 posts, to the recall.
    fx.restart().await;
    fx.login(conn(5), b, DeviceType::Phone).await;
    fx.pump().await;
    fx.out();
    fx.client(conn(5), b, ask(30)).await;
    fx.pump().await;
    let out = fx.out();
    for req_id in [30, 31] {
        let (code, why) = file_answer(&out, conn(5), req_id).unwrap_err();
        assert_eq!(code, ErrorCode::NotFound, "{why}");
        assert!(why.contains("recalled"), "{why}");
    }
}

#[tokio::test]
async fn a_mention_entrys_file_is_checked_whatever_the_clock_of_the_groups_owner_did() {
    let (mut fx, group, a, b, msg_id, _, entry) = large_group_file_post().await;
    // The owner's clock steps back a minute (another node took over with a slower clock): the
    // entries after the post, its recall included, are older than it.
    fx.now -= 60_000;
    let posts = (0..8)
        .map(|j| (100 + j as u32, post(100 + j, group, "text")))
        .collect();
    fx.client(conn(1), a, posts).await;
    let recall = Command::Recall {
        client_msg_id: 9_999,
        conv: CONV_C2G,
        peer: group.0,
        msg_id,
    };
    fx.client(conn(1), a, vec![(9_999, recall)]).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(acks(&out).len(), 9, "posts and recall accepted: {out:?}");
    // Nothing remembered: the owner looks for the post where its time says, does not meet it
    // there, and looks again from further back.
    fx.restart().await;
    fx.login(conn(5), b, DeviceType::Phone).await;
    fx.pump().await;
    fx.out();
    fx.client(conn(5), b, vec![(30, Command::FileDownload { seq: entry })])
        .await;
    fx.pump().await;
    let (code, why) = file_answer(&fx.out(), conn(5), 30).unwrap_err();
    assert_eq!(code, ErrorCode::NotFound, "{why}");
    assert!(why.contains("recalled"), "{why}");
}

#[test]
fn lazy_writes_fall_due_by_age_by_count_and_on_a_clock_step_back() {
    let mut l = super::Lazy::default();
    l.cursor(UserId(1), "d".into(), Seq(3), 10_000);
    assert!(!l.due(10_000 + LAZY_FLUSH_MS - 1));
    assert!(l.due(10_000 + LAZY_FLUSH_MS), "by age");
    assert!(
        l.due(9_999),
        "the wall clock stepped back: not held until it catches up"
    );
    for i in 0..super::LAZY_MAX as u64 - 2 {
        l.outbox_delete(im_shared::shard::vshard_of(UserId(1)), MsgId(i), 10_000);
    }
    assert!(!l.due(10_000));
    l.outbox_delete(
        im_shared::shard::vshard_of(UserId(1)),
        MsgId(u64::MAX),
        10_000,
    );
    assert!(l.due(10_000), "by count");
}

#[test]
fn due_lazy_writes_drain_a_share_at_a_time_oldest_first_and_stay_visible_until_written() {
    let mut l = super::Lazy::default();
    let shard = im_shared::shard::vshard_of(UserId(1));
    l.cursor(UserId(1), "d".into(), Seq(3), 10_000);
    for i in 0..1_000 {
        l.outbox_delete(shard, MsgId(i), 10_000);
    }
    assert!(l.due(10_000 + LAZY_FLUSH_MS));
    l.start_draining(10_000 + LAZY_FLUSH_MS);
    assert!(l.fresh_is_empty() && !l.due(10_000 + LAZY_FLUSH_MS));
    // A newer cursor of the same device while the older one drains: the newer one is seen.
    l.cursor(UserId(1), "d".into(), Seq(5), 10_500);
    assert_eq!(l.cursor_of(UserId(1), "d"), Some(Seq(5)));
    l.cursors.clear();
    assert_eq!(
        l.cursor_of(UserId(1), "d"),
        Some(Seq(3)),
        "a draining cursor"
    );
    assert_eq!(l.cursors_of(UserId(1)).collect::<Vec<_>>(), vec![Seq(3)]);
    assert!(l.cursors_of(UserId(2)).next().is_none());
    // The round's own op stays behind the older lazy writes (on a shared key it wins).
    let mut b = WriteBatch::default();
    b.push(Op::Cursor {
        uid: UserId(9),
        device_id: "own".into(),
        seq: Seq(1),
    });
    l.take_into(&mut b, super::LAZY_PER_ROUND);
    assert_eq!(b.len(), super::LAZY_PER_ROUND + 1);
    assert!(matches!(
        b.ops.last(),
        Some(Op::Cursor { uid: UserId(9), .. })
    ));
    b.ops.pop();
    assert_eq!(
        l.cursor_of(UserId(1), "d"),
        None,
        "written: no longer waiting"
    );
    assert!(
        matches!(b.ops[0], Op::Cursor { seq: Seq(3), .. }),
        "oldest first"
    );
    assert!(matches!(
        b.ops[1],
        Op::OutboxDelete {
            msg_id: MsgId(0),
            ..
        }
    ));
    // What is not written yet still counts as deleting (a replay skips it).
    let deleting: HashSet<_> = l.outbox_deleting().collect();
    assert_eq!(deleting.len(), 1_000 - (super::LAZY_PER_ROUND - 1));
    assert!(deleting.contains(&(shard, MsgId(999))));
    assert!(!deleting.contains(&(shard, MsgId(0))));
    let mut rest = WriteBatch::default();
    l.take_into(&mut rest, usize::MAX);
    assert_eq!(b.len() + rest.len(), 1_001);
    assert!(l.is_empty());
}

#[tokio::test]
async fn due_lazy_writes_go_out_evenly_over_the_drain_and_the_last_round_takes_all() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    let n = 6 * super::LAZY_PER_ROUND; // 1 536
    fx.send_many(conn(1), a, b, n as u64).await;
    // b's worker confirmed every append: a's worker has one outbox deletion waiting for each.
    let shard = im_shared::shard::vshard_of(a);
    let stored = fx.store.outbox(shard).await.unwrap().len();
    assert_eq!(stored, n);
    // How many of them the pace has made due `t` ms into the drain.
    let paced = |t: u64| (n as u64 * t).div_ceil(super::LAZY_DRAIN_MS) as usize;
    // Due: the round that starts the drain writes none of it yet.
    fx.now += LAZY_FLUSH_MS;
    fx.step(0, Vec::new()).await.unwrap();
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), n);
    // 100 ms into it, what is due by then (615: enough for a commit of their own).
    fx.now += 100;
    fx.step(0, Vec::new()).await.unwrap();
    assert!(paced(100) >= super::LAZY_PER_ROUND);
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), n - paced(100));
    // 2 ms later 12 more are due: not worth a commit alone ...
    fx.now += 2;
    fx.step(0, Vec::new()).await.unwrap();
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), n - paced(100));
    // ... nor to ride with a round that commits anyway (its send adds one entry) ...
    fx.client(conn(1), a, vec![(9_998, send(n as u64 + 1, b, "x"))])
        .await;
    assert_eq!(
        fx.store.outbox(shard).await.unwrap().len(),
        n - paced(100) + 1
    );
    // ... which takes them once LAZY_MIN_RIDE are due (92, at 115 ms).
    fx.now += 13;
    fx.client(conn(1), a, vec![(9_999, send(n as u64 + 2, b, "y"))])
        .await;
    assert!(paced(115) - paced(100) >= super::LAZY_MIN_RIDE);
    assert_eq!(
        fx.store.outbox(shard).await.unwrap().len(),
        n - paced(115) + 2
    );
    // Once the drain's time is over, a round writes all that is left of it.
    fx.now += super::LAZY_DRAIN_MS;
    fx.step(0, Vec::new()).await.unwrap();
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), 2);
    assert!(fx.workers[0].lazy.draining.is_empty());
    // The last round (the worker stops) writes everything that waits, the fresh writes too.
    fx.pump().await;
    assert!(!fx.workers[0].lazy.is_empty());
    let total = fx.workers[0].router.total();
    fx.workers[0].finish(Round::new(total), true).await.unwrap();
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
    assert!(fx.workers[0].lazy.is_empty());
}

#[tokio::test]
async fn a_round_leaves_at_most_lazy_max_writes_draining() {
    let mut fx = Fx::new(1).await;
    let shard = im_shared::shard::vshard_of(UserId(1));
    for i in 0..super::LAZY_MAX as u64 + 5_000 {
        fx.workers[0].lazy.draining.push_back(Op::OutboxDelete {
            shard,
            msg_id: MsgId(i),
        });
    }
    // A drain that has just started: the pace allows none of them yet.
    let lazy = &mut fx.workers[0].lazy;
    (lazy.drain_from, lazy.drain_len) = (fx.now, lazy.draining.len());
    fx.step(0, Vec::new()).await.unwrap();
    assert_eq!(fx.workers[0].lazy.draining.len(), super::LAZY_MAX);
}

#[tokio::test]
async fn draining_lazy_writes_are_seen_by_a_login_and_a_replay_until_written() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    let c = fx.user_on(1, 2);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(3), c, DeviceType::Phone).await;
    // A backlog: 3 072 confirmed deletions fall due on a's worker; its next rounds write a share
    // each.
    let n = 12 * super::LAZY_PER_ROUND as u64;
    fx.send_many(conn(1), a, b, n).await;
    fx.out();
    fx.now += LAZY_FLUSH_MS;
    fx.step(0, Vec::new()).await.unwrap();
    // c's message reaches a, whose device acknowledges it: a fresh cursor.
    fx.client(conn(3), c, vec![(1, send(1, a, "hi"))]).await;
    fx.pump().await;
    let seq = delivered_to(&fx.out(), conn(1))[0].seq;
    fx.client(conn(1), a, vec![(0, Command::DeliverAck { seq })])
        .await;
    // Due again: the cursor goes behind the deletions still draining, and this round (one send
    // of its own) writes only a share.
    fx.now += LAZY_FLUSH_MS;
    fx.client(conn(1), a, vec![(9_999, send(n + 1, b, "y"))])
        .await;
    let lazy = &fx.workers[0].lazy;
    assert!(lazy.fresh_is_empty());
    assert!(
        lazy.draining.len() > 1 && lazy.draining_cursors.len() == 1,
        "the cursor drains behind {} writes",
        lazy.draining.len()
    );
    assert_eq!(
        fx.store.cursor(a, "dev-1").await.unwrap(),
        Seq(0),
        "not written yet"
    );
    let shard = im_shared::shard::vshard_of(a);
    let stored = fx.store.outbox(shard).await.unwrap().len();
    assert!(
        stored > 1,
        "deletions still draining: {stored} entries stored"
    );
    // A replay fans out only the entry nobody confirmed ("y"), not those whose deletion drains.
    while fx.inboxes[1].try_recv().is_ok() {}
    fx.workers[0].replay_outbox().await;
    let mut replayed = 0;
    while let Ok(m) = fx.inboxes[1].try_recv() {
        let m = match m {
            WorkerMsg::Local { msg, .. } => *msg,
            m => m,
        };
        if let WorkerMsg::Append(reqs) = m {
            replayed += reqs.len();
        }
    }
    assert_eq!(replayed, 1, "draining deletions were fanned out again");
    // A login of the same device reads its draining cursor, not the store's.
    let login = fx.login_cmd(a, DeviceType::Phone, "dev-1", Seq(0));
    fx.client(conn(4), a, vec![(1, login)]).await;
    let dev = devices_of(&fx.workers[0].users, a)
        .iter()
        .find(|d| d.conn == conn(4))
        .expect("logged in");
    assert_eq!(dev.cursor, seq);
    fx.settle().await;
    assert_eq!(fx.store.cursor(a, "dev-1").await.unwrap(), seq);
}

#[tokio::test]
async fn a_replay_skips_confirmed_entries_whose_deletion_waits() {
    let mut fx = Fx::new(2).await;
    let a = fx.user_on(0, 1);
    let b = fx.user_on(1, 1);
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.client(conn(1), a, vec![(1, send(1, b, "one"))]).await;
    fx.pump().await;
    // Confirmed by b's worker; the entry's deletion waits (lazy), so it is still in the store.
    let shard = im_shared::shard::vshard_of(a);
    assert_eq!(fx.store.outbox(shard).await.unwrap().len(), 1);
    assert!(fx.inboxes[1].try_recv().is_err());
    // A replay (a peer link's reset does one) leaves it alone: nothing for b's worker.
    fx.workers[0].replay_outbox().await;
    assert!(
        fx.inboxes[1].try_recv().is_err(),
        "a confirmed entry was fanned out again"
    );
    fx.settle().await;
    assert!(fx.store.outbox(shard).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_c2c_recall_finds_the_message_in_the_recipients_timeline_and_waits_for_it_there() {
    let mut fx = Fx::new(2).await;
    let (a, b) = (fx.user_on(0, 1), fx.user_on(1, 1));
    fx.login(conn(1), a, DeviceType::Phone).await;
    fx.login(conn(2), b, DeviceType::Phone).await;
    fx.client(conn(1), a, vec![(1, send(1, b, "oops"))]).await;
    let (_, msg_id, a_seq, _) = acks(&fx.out())[0];
    // The sender's copy is in its timeline without a msg index: one store entry less.
    let mine = fx.store.timeline(a, Seq(a_seq.0 - 1), 1).await.unwrap();
    assert_eq!(mine[0].msg_id, msg_id);
    assert_eq!(fx.store.seq_of(a, msg_id).await.unwrap(), None);
    let recall = |cid: u64| Command::Recall {
        client_msg_id: cid,
        conv: CONV_C2C,
        peer: b.0,
        msg_id,
    };
    // Not yet stored for b (b's worker has not run): a retryable refusal, not NotFound.
    fx.client(conn(1), a, vec![(2, recall(2))]).await;
    assert_eq!(
        error_to(&fx.out(), conn(1), 2).map(|e| e.0),
        Some(ErrorCode::Unavailable)
    );
    fx.pump().await;
    assert!(fx.store.seq_of(b, msg_id).await.unwrap().is_some());
    fx.out();
    // b cannot recall a's message, whichever peer it names; a can.
    for (req, peer) in [(3, a.0), (4, b.0)] {
        let cmd = Command::Recall {
            client_msg_id: 10 + req as u64,
            conv: CONV_C2C,
            peer,
            msg_id,
        };
        fx.client(conn(2), b, vec![(req, cmd)]).await;
        assert_eq!(
            error_to(&fx.out(), conn(2), req).map(|e| e.0),
            Some(ErrorCode::RecallRefused),
            "peer {peer}"
        );
    }
    // What a's timeline holds from others is not b's to learn: a message c sent to a, which b
    // never got, is "not found" for b, not "someone else's".
    let c = fx.user_on(1, b.0 + 1);
    fx.login(conn(3), c, DeviceType::Phone).await;
    fx.client(conn(3), c, vec![(1, send(1, a, "private"))])
        .await;
    fx.pump().await;
    let c_msg = acks(&fx.out())[0].1;
    assert!(fx.store.seq_of(a, c_msg).await.unwrap().is_some());
    let probe = Command::Recall {
        client_msg_id: 20,
        conv: CONV_C2C,
        peer: a.0,
        msg_id: c_msg,
    };
    fx.client(conn(2), b, vec![(20, probe)]).await;
    assert_eq!(
        error_to(&fx.out(), conn(2), 20).map(|e| e.0),
        Some(ErrorCode::NotFound)
    );
    fx.client(conn(1), a, vec![(5, recall(5))]).await;
    fx.pump().await;
    let out = fx.out();
    assert_eq!(error_to(&out, conn(1), 5), None);
    let marker = delivered_to(&out, conn(2));
    assert_eq!(marker.len(), 1);
    assert_eq!(marker[0].conv, im_shared::proto::CONV_RECALL);
    // A message to oneself is its only copy: indexed, and recallable.
    fx.client(conn(1), a, vec![(6, send(6, a, "note"))]).await;
    let own = acks(&fx.out())[0].1;
    assert!(fx.store.seq_of(a, own).await.unwrap().is_some());
    let cmd = Command::Recall {
        client_msg_id: 7,
        conv: CONV_C2C,
        peer: a.0,
        msg_id: own,
    };
    fx.client(conn(1), a, vec![(7, cmd)]).await;
    fx.pump().await;
    assert_eq!(error_to(&fx.out(), conn(1), 7), None);
}
