//! One glommio executor (one thread, one core): owns a slice of the worker's users, one
//! connection each, and runs the requests the worker forwards.
//!
//! **Connections have no task** (issue 15: the loadgen holds up to a million idle connections on
//! the machine it loads, so an idle one must cost next to nothing). A connection is its [`Conn`]
//! record in the executor's `conns` slab (a `Vec` indexed by the user's local number; a unit test
//! pins its size) and a raw non-blocking socket: no glommio `TcpStream` (which keeps a reactor
//! source and two registered timers per socket), no future, no buffer while idle.
//!
//! - Each executor keeps one **epoll set**; a socket is registered once, right after its
//!   non-blocking connect (`EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`, tagged with the user's
//!   local number and the connection's generation, so an event of a closed socket is ignored).
//! - The **poller** task awaits the epoll descriptor's readability through glommio's io_uring (see
//!   [`epoll_readable`]), takes the ready events (`epoll_wait` without waiting, 256 at a time) and
//!   reads each ready socket with `recv(MSG_DONTWAIT)` into the executor's one 64 KiB scratch
//!   buffer, handling every complete frame; only a partial frame is kept (in `partial`, per
//!   connection, freed once the frame is complete). A connection that filled the scratch buffer
//!   four times in a row goes last in the queue (`again`), so one busy socket cannot starve the
//!   others.
//! - Other code never touches a socket: it encodes frames into the connection's output buffer
//!   (`out`, an entry only while something is queued) and marks the connection for the
//!   **sender** task, which writes each marked connection's queue with `send(MSG_DONTWAIT |
//!   MSG_NOSIGNAL)` after the round of tasks that queued it (so a round's frames leave in one
//!   write); a write that does not fit (or a connect still in progress) waits for `EPOLLOUT`.
//!   A close requested by the loadgen (storm, quit, login timeout) is carried out by the sender
//!   too, without flushing, as the old per-connection task did.
//! - Timers are shared: heartbeats and login deadlines are the 1 s ticker's scan, delivery acks
//!   and reconnects after a backoff are ordered queues that the 5 ms ticker takes due entries
//!   from. Nothing waits in a glommio timer per connection. The worker's hang detector still
//!   sees this executor's timers: the progress ticker is one.
//!
//! Nothing here blocks the thread; all state is `Cell`/`RefCell`, as the executor is single
//! threaded.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use glommio::timer::sleep;
use im_client::core::{classify, resend_due, Attempts, Offer};
use im_shared::frame::encode_header;
use im_shared::iplist::rendezvous_weight;
use im_shared::proto::{GroupEventKind, Message, CONV_C2G, CONV_GROUP_EVENT, CONV_MENTION};
use im_shared::token::HmacTokens;
use im_shared::{
    Cmd, Command, DeviceType, ErrorCode, FrameCodec, GroupId, KickReason, Seq, UserId,
};

use crate::msg::{
    group_member, group_members, Hist, Op, Plan, Report, Request, BODY_HEADER, PROGRESS_EVERY,
};
use crate::net::{errno_name, start_connect};

/// Counters the worker's main thread reads once a second for the progress line.
#[derive(Debug, Default)]
pub struct Live {
    pub connected: AtomicU64,
    pub logged_in: AtomicU64,
    pub login_failed: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    pub disconnects: AtomicU64,
}

/// What an executor tells the worker's main thread.
#[derive(Debug)]
pub enum ExecMsg {
    Done {
        id: u64,
        report: Option<Box<Report>>,
    },
    Interval {
        ack: Hist,
        deliver: Hist,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Idle,
    LoginSent,
    LoggedIn,
    /// Login failed or the connection died: not retried.
    Failed,
}

struct Pending {
    counter: u32,
    /// Recipient index (c2c) or group number (c2g).
    to: u32,
    req: u32,
    at: Instant,
    /// What a resend after a re-login repeats: the command, the wire recipient (uid or group
    /// id) and the send time in the body.
    cmd: Cmd,
    wire_to: u64,
    sent_ns: u64,
    /// When this send last went out (the first time, or its last repetition).
    last_try: Instant,
    /// Repetitions so far (carried in the body: [`BODY_HEADER`]).
    tries: u8,
    /// An `@all` post (its mentions are uid 0; a repetition keeps them).
    all: bool,
}

/// An optional instant in 10 µs units since the process's first use of it (0 = none), 4 bytes
/// instead of 16: the loadgen's per-connection record keeps four of them. Good for 11.9 hours.
#[derive(Default)]
struct Stamp(Cell<u32>);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1))
}

impl Stamp {
    const UNIT_NS: u128 = 10_000;

    fn new() -> Stamp {
        Stamp(Cell::new(0))
    }
    fn get(&self) -> Option<Instant> {
        match self.0.get() {
            0 => None,
            t => Some(epoch() + Duration::from_nanos(t as u64 * Self::UNIT_NS as u64)),
        }
    }
    fn set(&self, t: Option<Instant>) {
        let v = t.map_or(0, |t| {
            let n = t.saturating_duration_since(epoch()).as_nanos() / Self::UNIT_NS;
            n.clamp(1, u32::MAX as u128) as u32
        });
        self.0.set(v);
    }
    fn take(&self) -> Option<Instant> {
        let t = self.get();
        self.0.set(0);
        t
    }
}

/// Why the loadgen closes a connection itself (`Conn::close`, one byte).
const CLOSE_WHY: [&str; 4] = ["", "storm", "quit", "timeout"];

/// One user's connection record (the slab entry). Compact on purpose: an idle connection is this
/// record and its kernel socket, nothing else (a unit test pins the size).
struct Conn {
    /// Global user index (uid = uid_base + idx).
    idx: u32,
    local: u32,
    uid: UserId,
    /// The socket (-1 = none) and its generation (the epoll tag's high half; bumped at close).
    fd: Cell<i32>,
    gen: Cell<u32>,
    st: Cell<St>,
    /// A socket is open for this user right now.
    live: Cell<bool>,
    /// The loadgen asked to close it: an index into [`CLOSE_WHY`] (0 = no).
    close: Cell<u8>,
    /// Marked for the sender (in `Exec::flush`).
    queued: Cell<bool>,
    /// A write did not fit: the rest waits for `EPOLLOUT`.
    want_out: Cell<bool>,
    next_req: Cell<u32>,
    login_req: Cell<u32>,
    started: Stamp,
    // timeline
    last_seq: Cell<u64>,
    acked_seq: Cell<u64>,
    in_dirty: Cell<bool>,
    syncing: Cell<bool>,
    seen_max: Cell<u64>,
    /// Highest seq pushed (`Deliver`) on the current connection.
    push_max: Cell<u64>,
    /// Re-login (storm or reconnect after a lost connection): when the drop happened and the seq
    /// to reach before counting the user "back".
    storm_t0: Stamp,
    storm_target: Cell<u64>,
    /// The drop was the storm's (counted in the storm's numbers), not a lost connection.
    in_storm: Cell<bool>,
    reconnects: Cell<u32>,
    /// Failed attempts in a row (the backoff exponent); reset by a connection that stayed logged
    /// in for [`im_client::core::STABLE_MS`] (`im_client::core::Attempts`).
    attempt: Cell<u32>,
    /// Position in the user's gate order of the gate tried next (walks on after each failure).
    gate_pos: Cell<u32>,
    /// The user was logged in at least once in this run: it reconnects until the run ends.
    ever_in: Cell<bool>,
    /// First connect attempt (for `login_retry_ms`) and when the current login succeeded.
    first_try: Stamp,
    up_since: Stamp,
    // sending
    counter: Cell<u32>,
    pending: RefCell<VecDeque<Pending>>,
    // The tracked large group's timeline (`large-group` scenario), with the client rules of
    // PROTOCOL.md section 10 applied to the group's own seqs.
    /// Tracking started (`LargeReady`); `g_base` is the group's head then.
    g_on: Cell<bool>,
    g_base: Cell<u64>,
    g_last: Cell<u64>,
    g_syncing: Cell<bool>,
    /// req_id of the `GroupSync` in flight (a refusal ends it).
    g_sync_req: Cell<u32>,
    g_seen_max: Cell<u64>,
    /// Highest group seq pushed (`GroupDeliver`) on the current connection.
    g_push_max: Cell<u64>,
    /// Group id of the last `BecameLarge` event in the user's own timeline.
    large_of: Cell<u64>,
}

impl Conn {
    fn new(idx: u32, local: u32, uid: UserId) -> Conn {
        Conn {
            idx,
            local,
            uid,
            fd: Cell::new(-1),
            gen: Cell::new(0),
            st: Cell::new(St::Idle),
            live: Cell::new(false),
            close: Cell::new(0),
            queued: Cell::new(false),
            want_out: Cell::new(false),
            next_req: Cell::new(1),
            login_req: Cell::new(0),
            started: Stamp::new(),
            last_seq: Cell::new(0),
            acked_seq: Cell::new(0),
            in_dirty: Cell::new(false),
            syncing: Cell::new(false),
            seen_max: Cell::new(0),
            push_max: Cell::new(0),
            storm_t0: Stamp::new(),
            storm_target: Cell::new(0),
            in_storm: Cell::new(false),
            reconnects: Cell::new(0),
            attempt: Cell::new(0),
            gate_pos: Cell::new(0),
            ever_in: Cell::new(false),
            first_try: Stamp::new(),
            up_since: Stamp::new(),
            counter: Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
            g_on: Cell::new(false),
            g_base: Cell::new(0),
            g_last: Cell::new(0),
            g_syncing: Cell::new(false),
            g_sync_req: Cell::new(0),
            g_seen_max: Cell::new(0),
            g_push_max: Cell::new(0),
            large_of: Cell::new(0),
        }
    }

    fn req(&self) -> u32 {
        let r = self.next_req.get();
        self.next_req.set(r.wrapping_add(1).max(1));
        r
    }
}

struct Exec {
    plan: Arc<Plan>,
    run_id: u32,
    /// The slab: one record per user of this executor, by local number.
    conns: Vec<Conn>,
    /// The executor's epoll set (every open socket, edge-triggered).
    epfd: RawFd,
    /// Queued output of the connections that have some (no entry while idle).
    out: RefCell<HashMap<u32, BytesMut>>,
    /// The partial frame of the connections that have one (no entry while idle).
    partial: RefCell<HashMap<u32, BytesMut>>,
    /// Connections marked for the sender (to write or to close), and its waker.
    flush: RefCell<Vec<u32>>,
    sender_waker: Cell<Option<Waker>>,
    /// Connections that used their read turn with data left: read again before waiting.
    again: RefCell<VecDeque<u32>>,
    /// Reconnects waiting for their backoff: (due, local), earliest first.
    reconnect: RefCell<BinaryHeap<Reverse<(Instant, u32)>>>,
    rep: RefCell<Report>,
    iv_ack: RefCell<Hist>,
    iv_deliver: RefCell<Hist>,
    live: Arc<Live>,
    tokens: HmacTokens,
    rng: Cell<u64>,
    scratch: RefCell<Vec<u8>>,
    /// Connections with deliveries not acknowledged yet, with the time the first of them came,
    /// oldest first.
    dirty: RefCell<std::collections::VecDeque<(Instant, u32)>>,
    codec: FrameCodec,
    /// (to, from, counter) of accepted deliveries: dedup check across the whole run.
    seen: RefCell<HashSet<u128>>,
    /// (kind, from, conversation, recipient) → last counter accepted: order check. The
    /// conversation is the recipient for c2c and the group for c2g.
    order: RefCell<HashMap<u128, u32>>,
    /// `large-group`: the posts some member here already accepted, and each poster's last
    /// counter among them. A large group's copies need neither `seen` nor `order` (whose maps
    /// grow by one entry per copy, millions in a run, and stall the executor while they rehash):
    /// a member accepts the group's entries only in the group's seq order, once each, so a
    /// post's first copy here comes in the group's order, and the sender order is checked once
    /// per post; a post under two seqs is caught by `check_post_seqs`, a member whose order
    /// differs from the others' by the accounting's order check.
    large_first: RefCell<HashSet<u64>>,
    large_sender_last: RefCell<HashMap<u32, u32>>,
    /// `group` scenario: `(local conn, group number)` of every membership of this executor's
    /// users.
    memberships: Vec<(u32, u32)>,
    /// Group number → id (0 = not created), and back.
    group_ids: RefCell<Vec<u64>>,
    group_of: RefCell<HashMap<u64, u32>>,
    /// `(local conn << 32 | req_id)` of a `GroupCreate` in flight → group number.
    creating: RefCell<HashMap<u64, u32>>,
    /// `large-group`: the id of the tracked large group (0 = none yet).
    large_group: Cell<u64>,
    /// `(local conn << 32 | req_id)` of a `GroupAdd` in flight → (first member index, end,
    /// sent at, attempts so far).
    adding: RefCell<HashMap<u64, (u32, u32, Instant, u32)>>,
    /// Batches refused with a retryable code: (first, end, due, attempts so far).
    add_retry: RefCell<VecDeque<(u32, u32, Instant, u32)>>,
    /// `(local conn << 32 | req_id)` of the owner's `GroupSync` that reads the head.
    head_req: Cell<Option<u64>>,
    /// `(poster << 32 | counter, group seq)` pairs seen here (each reported once).
    post_seq: RefCell<HashSet<(u64, u64)>>,
    /// `@all`: mention entries of this run held per local conn (the poster's not counted), and
    /// how many conns hold one.
    mentions: RefCell<HashMap<u32, u32>>,
    mention_members: Cell<u64>,
    /// Open connections plus reconnects waiting for their backoff (drains and quits wait for
    /// them).
    tasks: Cell<u32>,
    pending_total: Cell<u64>,
    last_activity: Cell<Instant>,
    storm_mode: Cell<bool>,
    quitting: Cell<bool>,
    storm_back: Cell<u64>,
    storm_failed: Cell<u64>,
}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: the executor owns these descriptors; nothing uses them any more.
        unsafe {
            for c in &self.conns {
                if c.fd.get() >= 0 {
                    libc::close(c.fd.get());
                }
            }
            libc::close(self.epfd);
        }
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn code_name(c: ErrorCode) -> String {
    format!("{c:?}")
}

/// Why a connection's task ended. The report tallies ends by their text (`login_failures`,
/// `disconnects`), so the text is short and stable.
#[derive(Debug, thiserror::Error)]
enum End {
    /// The loadgen itself closed the connection: the run is quitting, a reconnect storm drops
    /// it, or the server stayed silent too long.
    #[error("{0}")]
    Local(&'static str),
    #[error("closed")]
    PeerClosed,
    /// A socket error, by errno name.
    #[error("{0}")]
    Io(String),
    #[error("connect {0}")]
    Connect(String),
    /// The login was refused with this code.
    #[error("{0:?}")]
    LoginRefused(ErrorCode),
    /// An `Error` frame the loadgen cannot go on after.
    #[error("error {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// A `Kickout` (reason byte, PROTOCOL.md section 8): the loadgen does not reconnect.
    #[error("kickout {0}")]
    Kicked(u8),
    #[error("bad body")]
    BadBody(#[source] im_shared::proto::BodyError),
    #[error("bad frame")]
    BadFrame(#[source] im_shared::DecodeError),
}

impl End {
    /// The loadgen ended it on purpose: not a failure.
    fn is_planned(&self) -> bool {
        matches!(self, End::Local("storm" | "quit"))
    }

    /// A phone would try again (after its backoff, on the next gate): the network, a server
    /// going away or refusing for now, a timeout. Not after a refusal of its credentials or
    /// request, a kickout other than `ServerShutdown`, or a protocol error (a bug to report).
    fn is_retryable(&self) -> bool {
        let code_retryable = |c: &ErrorCode| {
            matches!(
                c,
                ErrorCode::LoginTimeout
                    | ErrorCode::IdleTimeout
                    | ErrorCode::SlowConsumer
                    | ErrorCode::TokenExpired
                    | ErrorCode::Internal
                    | ErrorCode::Overloaded
                    | ErrorCode::Unavailable
            )
        };
        match self {
            End::Local(why) => !matches!(*why, "storm" | "quit"),
            End::PeerClosed | End::Io(_) | End::Connect(_) => true,
            End::LoginRefused(c) => code_retryable(c),
            End::Server { code, .. } => code_retryable(code),
            End::Kicked(r) => *r == KickReason::ServerShutdown as u8,
            End::BadBody(_) | End::BadFrame(_) => false,
        }
    }

    /// The text the report counts it under (with the cause of a protocol error).
    fn tally(&self) -> String {
        match self {
            End::BadBody(e) => format!("bad body: {e}"),
            End::BadFrame(e) => format!("bad frame: {e}"),
            other => other.to_string(),
        }
    }
}

impl Exec {
    /// Encodes `cmd` into the connection's output queue and marks it for the sender; the req id.
    fn push(&self, c: &Conn, cmd: &Command) -> u32 {
        let r = c.req();
        cmd.encode(r, self.out.borrow_mut().entry(c.local).or_default());
        self.mark_flush(c);
        r
    }

    /// Marks the connection for the sender (it has output, or is to be closed).
    fn mark_flush(&self, c: &Conn) {
        if !c.queued.get() && c.live.get() {
            c.queued.set(true);
            self.flush.borrow_mut().push(c.local);
            if let Some(w) = self.sender_waker.take() {
                w.wake();
            }
        }
    }

    fn request_close(&self, c: &Conn, why: &'static str) {
        if c.live.get() && c.close.get() == 0 {
            let code = CLOSE_WHY.iter().position(|w| *w == why).unwrap_or(3);
            c.close.set(code as u8);
            self.mark_flush(c);
        }
    }

    fn rand(&self) -> u64 {
        // splitmix64
        let mut z = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&self, n: u64) -> u64 {
        ((self.rand() as u128 * n as u128) >> 64) as u64
    }

    fn mark_dirty(&self, c: &Conn) {
        if !c.in_dirty.get() {
            c.in_dirty.set(true);
            self.dirty.borrow_mut().push_back((Instant::now(), c.local));
        }
    }

    fn start_sync(&self, c: &Conn) {
        if !c.syncing.get() {
            c.syncing.set(true);
            self.rep.borrow_mut().sync_requests += 1;
            self.push(
                c,
                &Command::SyncRequest {
                    after_seq: Seq(c.last_seq.get()),
                    limit: 200,
                },
            );
        }
    }

    fn check_back(&self, c: &Conn) {
        if let Some(t0) = c.storm_t0.get() {
            if c.st.get() == St::LoggedIn
                && !c.syncing.get()
                && !c.g_syncing.get()
                && c.last_seq.get() >= c.storm_target.get()
            {
                c.storm_t0.set(None);
                if c.in_storm.replace(false) {
                    let mut r = self.rep.borrow_mut();
                    r.back_us.record(t0.elapsed().as_micros() as u64);
                    r.synced += 1;
                    self.storm_back.set(self.storm_back.get() + 1);
                } else {
                    let mut r = self.rep.borrow_mut();
                    let took = t0.elapsed();
                    r.reconnected += 1;
                    r.reconnect_us.record(took.as_micros() as u64);
                    if r.reconnect_times.len() < crate::msg::MAX_RECONNECT_TIMES {
                        let lost_at =
                            (now_ns() / 1_000_000).saturating_sub(took.as_millis() as u64);
                        r.reconnect_times.push((lost_at, took.as_millis() as u32));
                    }
                }
            }
        }
    }

    /// Applies one timeline entry with the client rules of PROTOCOL.md section 10.
    fn offer(&self, c: &Conn, m: &Message, via_sync: bool) {
        c.seen_max.set(c.seen_max.get().max(m.seq.0));
        match classify(Seq(c.last_seq.get()), m.seq, m.prev_seq) {
            Offer::Duplicate => {
                self.rep.borrow_mut().raw_dups += 1;
                return;
            }
            Offer::Gap => {
                // The sync in progress, or a new one, picks it up.
                if !c.syncing.get() {
                    self.rep.borrow_mut().gaps += 1;
                    self.start_sync(c);
                }
                return;
            }
            Offer::Accepted => {}
        }
        c.last_seq.set(m.seq.0);
        self.mark_dirty(c);
        self.last_activity.set(Instant::now());
        if m.conv == CONV_GROUP_EVENT {
            // Membership changes are timeline entries, not messages.
            if m.body.first() == Some(&(GroupEventKind::BecameLarge as u8)) {
                // From here on the group's posts reach this user as `GroupDeliver`.
                c.large_of.set(m.to.0);
            }
            self.rep.borrow_mut().group_events += 1;
            return;
        }
        if m.conv == CONV_MENTION {
            // A mention entry (`@all` in a large group): a timeline entry, acked as any, and
            // the post's content, not a message of its own: counted apart.
            self.count_mention(c, m);
            return;
        }
        // A group post reaches its poster too (that copy is one of the member deliveries); a
        // c2c message's copy in the sender's own timeline is an echo.
        let group = m.conv == CONV_C2G;
        if m.from == c.uid && !group {
            self.rep.borrow_mut().echoes += 1;
            return;
        }
        self.count_post(c, m, via_sync, group, false);
    }

    /// Counts one accepted message or member copy of this run (latency, identity, duplicates,
    /// per-sender order); its `(sender index, counter)`, or `None` when it is not this run's.
    /// `chained`: a large group's entry, accepted by [`Exec::offer_group`] in the group's seq
    /// order (see `large_first`).
    fn count_post(
        &self,
        c: &Conn,
        m: &Message,
        via_sync: bool,
        group: bool,
        chained: bool,
    ) -> Option<(u32, u32)> {
        let p = &self.plan;
        if (m.client_msg_id >> 32) as u32 != self.run_id || m.body.len() < BODY_HEADER {
            // Left over from an earlier run (synced after a reconnect): not ours to count.
            return None;
        }
        let b = &m.body[..];
        let send_ns = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        let from_idx = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        let counter = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
        let repeated = b[16] != 0;
        let lat_us = now_ns().saturating_sub(send_ns) / 1000;
        self.live.delivered.fetch_add(1, Relaxed);
        self.iv_deliver.borrow_mut().record(lat_us);
        let mut r = self.rep.borrow_mut();
        r.delivered += 1;
        if via_sync {
            r.delivered_by_sync += 1;
        }
        r.deliver_us.record(lat_us);
        r.last_deliver_ns = Some(now_ns());
        if p.track && chained {
            r.received_ids.push(from_idx, c.idx, counter);
            let post = (from_idx as u64) << 32 | counter as u64;
            if self.large_first.borrow_mut().insert(post) {
                let mut last = self.large_sender_last.borrow_mut();
                let last = last.entry(from_idx).or_insert(0);
                if counter < *last && repeated {
                    r.reordered_by_resend += 1;
                } else if counter < *last {
                    r.out_of_order += 1;
                } else {
                    *last = counter;
                }
            }
        } else if p.track && group && m.to.0 != 0 && m.to.0 == self.large_group.get() {
            // A post of the tracked large group in a member's own timeline: its one route is the
            // group's timeline (the branch above), so this copy is one too many.
            r.dedup_dups += 1;
            return Some((from_idx, counter));
        } else if p.track {
            let key = (c.idx as u128) << 64 | (from_idx as u128) << 32 | counter as u128;
            if !self.seen.borrow_mut().insert(key) {
                r.dedup_dups += 1;
                return Some((from_idx, counter));
            }
            r.received_ids.push(from_idx, c.idx, counter);
            let conv = if group {
                let g = self.group_of.borrow().get(&m.to.0).copied();
                g.unwrap_or(u32::MAX)
            } else {
                c.idx
            };
            let pair = (group as u128) << 96
                | (from_idx as u128) << 64
                | (conv as u128) << 32
                | c.idx as u128;
            let mut order = self.order.borrow_mut();
            let last = order.entry(pair).or_insert(0);
            if counter < *last && repeated {
                // Accepted at its repetition, after later messages: the client reordered it.
                r.reordered_by_resend += 1;
            } else if counter < *last {
                r.out_of_order += 1;
            } else {
                *last = counter;
            }
        }
        Some((from_idx, counter))
    }

    /// Counts one accepted mention entry of this run's `@all`: a member's first (with its
    /// send → entry latency from the body), a duplicate, or one the poster should not get.
    fn count_mention(&self, c: &Conn, m: &Message) {
        if (m.client_msg_id >> 32) as u32 != self.run_id || m.body.len() < BODY_HEADER {
            return; // an earlier run's
        }
        let send_ns = u64::from_be_bytes(m.body[0..8].try_into().expect("8 bytes"));
        let mut r = self.rep.borrow_mut();
        if !r.mention_msg_ids.contains(&m.msg_id.0) {
            r.mention_msg_ids.push(m.msg_id.0);
        }
        if m.from == c.uid {
            r.mention_to_poster += 1;
            return;
        }
        let mut held = self.mentions.borrow_mut();
        let n = held.entry(c.local).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.mention_members.set(self.mention_members.get() + 1);
            r.mention_us.record(now_ns().saturating_sub(send_ns) / 1000);
        } else {
            r.mention_dups += 1;
        }
    }

    /// End of the `@all` wait: every user that was online, but the poster (user 0), holds a
    /// mention entry or misses it.
    fn count_mentions(&self) {
        let held = self.mentions.borrow();
        let mut r = self.rep.borrow_mut();
        for c in self.conns.iter().filter(|c| c.ever_in.get() && c.idx != 0) {
            r.mention_expected += 1;
            if held.contains_key(&c.local) {
                r.mention_received += 1;
            } else {
                r.mention_missing += 1;
            }
        }
    }

    /// Records that post `(from, counter)` has group seq `seq` (once per distinct pair).
    fn note_post_seq(&self, from: u32, counter: u32, seq: u64) {
        if self.plan.track
            && self
                .post_seq
                .borrow_mut()
                .insert(((from as u64) << 32 | counter as u64, seq))
        {
            self.rep
                .borrow_mut()
                .post_seqs
                .push(from, counter, seq.min(u32::MAX as u64) as u32);
        }
    }

    fn start_group_sync(&self, c: &Conn) {
        if !c.g_syncing.get() {
            c.g_syncing.set(true);
            self.rep.borrow_mut().group_sync_requests += 1;
            let req = self.push(
                c,
                &Command::GroupSync {
                    group: GroupId(self.large_group.get()),
                    after_seq: Seq(c.g_last.get()),
                    limit: 200,
                },
            );
            c.g_sync_req.set(req);
        }
    }

    /// A `GroupDeliver` push.
    fn on_group_push(&self, c: &Conn, m: &Message) {
        let g = self.large_group.get();
        // Any push is activity: a drain after the build waits until its events stop coming.
        self.last_activity.set(Instant::now());
        if g == 0 || m.to.0 != g || !c.g_on.get() {
            // Before tracking started: the build's events, sent live to the members online.
            let mut r = self.rep.borrow_mut();
            r.build_pushes += 1;
            r.build_push_bytes += m.body.len() as u64;
            return;
        }
        {
            let mut r = self.rep.borrow_mut();
            r.group_pushes += 1;
            if m.seq.0 < c.g_push_max.get() && m.seq.0 > c.g_base.get() {
                r.group_push_reorders += 1;
            }
        }
        c.g_push_max.set(c.g_push_max.get().max(m.seq.0));
        self.offer_group(c, m, false);
    }

    /// Applies one entry of the tracked large group's timeline (a push or a `GroupSyncPage`
    /// entry) with the rules of PROTOCOL.md section 10 on the group's own seqs: duplicate,
    /// next, or gap → `GroupSync`. Posts are counted as member copies, events apart.
    fn offer_group(&self, c: &Conn, m: &Message, via_sync: bool) {
        c.g_seen_max.set(c.g_seen_max.get().max(m.seq.0));
        if m.seq.0 <= c.g_last.get() {
            if m.seq.0 > c.g_base.get() {
                self.rep.borrow_mut().group_raw_dups += 1;
            }
            return;
        }
        if m.prev_seq.0 > c.g_last.get() {
            if !via_sync {
                // Gap: the sync in progress, or a new one, picks it up.
                if !c.g_syncing.get() {
                    self.rep.borrow_mut().group_gaps += 1;
                    self.start_group_sync(c);
                }
                return;
            }
            // The group's timeline itself lacks the entries in between: take it anyway (a
            // client could not do better) and count the hole.
            self.rep.borrow_mut().group_holes += 1;
        }
        c.g_last.set(m.seq.0);
        self.last_activity.set(Instant::now());
        match m.conv {
            CONV_GROUP_EVENT => self.rep.borrow_mut().group_events += 1,
            CONV_C2G => {
                if let Some((from, counter)) = self.count_post(c, m, via_sync, true, true) {
                    self.note_post_seq(from, counter, m.seq.0);
                }
            }
            _ => {}
        }
    }

    /// Handles one frame; `Err(reason)` closes the connection.
    fn handle(&self, c: &Conn, req: u32, cmd: Command) -> Result<(), End> {
        match cmd {
            Command::LoginResult { code, max_seq, .. } if req == c.login_req.get() => {
                if code != ErrorCode::Ok {
                    return Err(End::LoginRefused(code));
                }
                c.st.set(St::LoggedIn);
                c.ever_in.set(true);
                c.up_since.set(Some(Instant::now()));
                self.live.logged_in.fetch_add(1, Relaxed);
                let mut r = self.rep.borrow_mut();
                r.logged_in += 1;
                r.last_login_ns = Some(now_ns());
                if let Some(t) = c.started.get() {
                    r.login_us.record(t.elapsed().as_micros() as u64);
                }
                drop(r);
                if c.storm_t0.get().is_some() {
                    c.storm_target.set(max_seq.0);
                    if max_seq.0 > c.last_seq.get() {
                        self.start_sync(c);
                    }
                    self.check_back(c);
                } else {
                    // A fresh device skips what earlier runs left in the timeline.
                    c.last_seq.set(max_seq.0.max(c.last_seq.get()));
                    c.acked_seq.set(c.last_seq.get());
                }
                self.resend_pending(c);
            }
            Command::HeartbeatAck { .. } => self.rep.borrow_mut().heartbeat_acks += 1,
            Command::SendAck {
                code,
                client_msg_id,
                msg_id,
                seq,
                prev_seq,
                ..
            } => {
                let (post, all) = c
                    .pending
                    .borrow()
                    .iter()
                    .find(|p| p.req == req || p.counter == client_msg_id as u32)
                    .map_or((false, false), |p| (p.cmd == Cmd::SendC2g, p.all));
                if all && code == ErrorCode::Ok {
                    self.rep.borrow_mut().mention_msg_id = msg_id.0;
                }
                if post {
                    // A large group's post: `seq` is its place in the group's timeline (0 for a
                    // small group), not in the poster's.
                    if code == ErrorCode::Ok
                        && seq.0 > 0
                        && (client_msg_id >> 32) as u32 == self.run_id
                    {
                        self.note_post_seq(c.idx, client_msg_id as u32, seq.0);
                    }
                } else if code == ErrorCode::Ok && prev_seq.0 == c.last_seq.get() && seq > prev_seq
                {
                    // The sender's own message is in its timeline too: place it when it directly
                    // follows the last held seq (PROTOCOL.md), so the next push needs no sync.
                    c.last_seq.set(seq.0);
                    c.seen_max.set(c.seen_max.get().max(seq.0));
                    self.mark_dirty(c);
                }
                self.on_send_result(c, req, Some(client_msg_id as u32), code)
            }
            Command::Deliver(m) => {
                if m.seq.0 < c.push_max.get() {
                    self.rep.borrow_mut().push_reorders += 1;
                }
                c.push_max.set(c.push_max.get().max(m.seq.0));
                self.offer(c, &m, false)
            }
            Command::GroupDeliver(m) => self.on_group_push(c, &m),
            Command::GroupSyncPage {
                group,
                head,
                has_more,
                messages,
            } => {
                if self.head_req.get() == Some(create_key(c, req)) {
                    self.head_req.set(None);
                    self.rep.borrow_mut().large_head = head.0;
                    return Ok(());
                }
                if group.0 != self.large_group.get() || !c.g_on.get() {
                    return Ok(());
                }
                for m in &messages {
                    self.offer_group(c, m, true);
                }
                c.g_syncing.set(false);
                if !messages.is_empty() && (has_more || c.g_seen_max.get() > c.g_last.get()) {
                    self.start_group_sync(c);
                }
                self.check_back(c);
            }
            Command::GroupHeads { heads } => {
                // After a re-login: catch up with the group if it moved on meanwhile.
                let g = self.large_group.get();
                if c.g_on.get() {
                    for h in heads.iter().filter(|h| h.group.0 == g) {
                        c.g_seen_max.set(c.g_seen_max.get().max(h.head.0));
                        if h.head.0 > c.g_last.get() {
                            self.start_group_sync(c);
                        }
                    }
                }
            }
            Command::SyncPage {
                has_more, messages, ..
            } => {
                for m in &messages {
                    self.offer(c, m, true);
                }
                c.syncing.set(false);
                if (has_more && !messages.is_empty()) || c.seen_max.get() > c.last_seq.get() {
                    self.start_sync(c);
                }
                self.check_back(c);
            }
            Command::Error { code, message } => {
                if c.st.get() == St::LoginSent && req == c.login_req.get() {
                    return Err(End::LoginRefused(code));
                }
                let is_send = c.pending.borrow().iter().any(|p| p.req == req);
                let is_create = self.creating.borrow().contains_key(&create_key(c, req));
                if req != 0 && self.large_answer(c, req, code, &message) {
                    // an add, the head read or a group sync of the large group
                } else if req != 0 && is_create {
                    self.on_create_result(c, req, code, 0);
                } else if req != 0 && is_send {
                    self.on_send_result(c, req, None, code);
                } else if !matches!(
                    code,
                    ErrorCode::InvalidArgument
                        | ErrorCode::Internal
                        | ErrorCode::Overloaded
                        | ErrorCode::Unavailable
                        | ErrorCode::Forbidden
                        | ErrorCode::AlreadyLoggedIn
                ) {
                    let mut message = message;
                    message.truncate(60);
                    return Err(End::Server { code, message });
                }
            }
            Command::OpResult { code, id, message } => {
                let large = self.large_answer(c, req, code, &message);
                if !large {
                    self.on_create_result(c, req, code, id)
                }
            }
            Command::Kickout { reason, .. } => return Err(End::Kicked(reason)),
            _ => {}
        }
        Ok(())
    }

    /// An `OpResult` / `Error` answering a request about the large group (an add, the head
    /// read, a member's `GroupSync`): handled here, `true`; anything else, `false`.
    fn large_answer(&self, c: &Conn, req: u32, code: ErrorCode, message: &str) -> bool {
        let key = create_key(c, req);
        let add = self.adding.borrow_mut().remove(&key);
        if let Some((lo, hi, at, tries)) = add {
            self.last_activity.set(Instant::now());
            let mut r = self.rep.borrow_mut();
            if code == ErrorCode::Ok {
                r.adds_ok += 1;
                r.members_added += (hi - lo) as u64;
                r.add_us.record(at.elapsed().as_micros() as u64);
            } else {
                let mut m = message.to_string();
                m.truncate(80);
                *r.add_errors.entry(format!("{code:?}: {m}")).or_default() += 1;
                let retryable = matches!(
                    code,
                    ErrorCode::Overloaded | ErrorCode::Unavailable | ErrorCode::Internal
                );
                if retryable && tries < MAX_ADD_TRIES {
                    let due = Instant::now() + Duration::from_secs(1);
                    self.add_retry.borrow_mut().push_back((lo, hi, due, tries));
                } else {
                    r.adds_failed += 1;
                }
            }
            return true;
        }
        if self.head_req.get() == Some(key) {
            self.head_req.set(None);
            let mut m = message.to_string();
            m.truncate(120);
            self.rep.borrow_mut().head_error = Some(format!("{code:?}: {m}"));
            return true;
        }
        if c.g_syncing.get() && c.g_sync_req.get() == req {
            c.g_syncing.set(false);
            *self
                .rep
                .borrow_mut()
                .send_errors
                .entry(format!("GroupSync {code:?}"))
                .or_default() += 1;
            return true;
        }
        false
    }

    /// The answer to a `GroupCreate` (an `OpResult`, or an `Error` with its req id).
    fn on_create_result(&self, c: &Conn, req: u32, code: ErrorCode, id: u64) {
        let Some(g) = self.creating.borrow_mut().remove(&create_key(c, req)) else {
            return;
        };
        self.last_activity.set(Instant::now());
        let mut r = self.rep.borrow_mut();
        if code == ErrorCode::Ok && id != 0 {
            r.group_ids.push((g, id));
        } else {
            *r.group_create_errors.entry(code_name(code)).or_default() += 1;
        }
    }

    /// The connection of global user `idx`, if this executor owns it.
    fn conn_of(&self, idx: u32) -> Option<&Conn> {
        let first = self.conns.first()?.idx;
        self.conns.get(idx.checked_sub(first)? as usize)
    }

    /// Every group whose owner (member 0) lives here is created by it, with the other members.
    fn create_groups(&self) {
        let p = &self.plan;
        for k in 0..p.groups {
            let owner = group_member(k, 0, p.group_size, p.total);
            let Some(c) = self.conn_of(owner) else {
                continue;
            };
            if c.st.get() != St::LoggedIn {
                let mut r = self.rep.borrow_mut();
                *r.group_create_errors
                    .entry("owner not logged in".into())
                    .or_default() += 1;
                continue;
            }
            let members = group_members(k, p.group_size, p.total)
                .skip(1)
                .map(|u| UserId(p.uid_base + u as u64))
                .collect();
            let req = self.push(
                c,
                &Command::GroupCreate {
                    name: format!("lg-{k}"),
                    members,
                    client_id: 0, // a fresh group in every run, even against the same store
                },
            );
            self.creating.borrow_mut().insert(create_key(c, req), k);
        }
    }

    fn set_groups(&self, ids: Vec<u64>) {
        *self.group_of.borrow_mut() = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != 0)
            .map(|(k, id)| (*id, k as u32))
            .collect();
        *self.group_ids.borrow_mut() = ids;
    }

    fn on_send_result(&self, c: &Conn, req: u32, counter: Option<u32>, code: ErrorCode) {
        let mut pend = c.pending.borrow_mut();
        let pos = pend
            .iter()
            .position(|p| p.req == req || Some(p.counter) == counter);
        let retryable = matches!(
            code,
            ErrorCode::Unavailable | ErrorCode::Overloaded | ErrorCode::Internal
        );
        if retryable && self.plan.resend_ms > 0 {
            // A phone sends it again after a pause (same client_msg_id): due for the resend
            // ticker about a second from now.
            if let Some(p) = pos.map(|i| &mut pend[i]) {
                let back = Duration::from_millis(self.plan.resend_ms.saturating_sub(1000));
                p.last_try = Instant::now()
                    .checked_sub(back)
                    .unwrap_or_else(Instant::now);
                *self
                    .rep
                    .borrow_mut()
                    .send_errors
                    .entry(code_name(code))
                    .or_default() += 1;
            }
            return;
        }
        let Some(p) = pos.and_then(|i| pend.remove(i)) else {
            return; // late answer after the step gave up on it
        };
        drop(pend);
        self.pending_total.set(self.pending_total.get() - 1);
        self.last_activity.set(Instant::now());
        let mut r = self.rep.borrow_mut();
        if code == ErrorCode::Ok {
            let us = p.at.elapsed().as_micros() as u64;
            r.acked += 1;
            r.ack_us.record(us);
            r.last_ack_ns = Some(now_ns());
            self.iv_ack.borrow_mut().record(us);
            self.live.acked.fetch_add(1, Relaxed);
            if self.plan.track {
                r.acked_ids.push(c.idx, p.to, p.counter);
            }
        } else {
            *r.send_errors.entry(code_name(code)).or_default() += 1;
            if self.plan.track {
                r.unacked_ids.push(c.idx, p.to, p.counter);
            }
        }
    }

    /// Handles the bytes just read: every complete frame; a partial one is kept in `partial`
    /// (no entry, so no buffer, once nothing is left over).
    fn process(&self, c: &Conn, data: &[u8]) -> Result<(), End> {
        let mut buf = self
            .partial
            .borrow_mut()
            .remove(&c.local)
            .unwrap_or_default();
        buf.extend_from_slice(data);
        loop {
            match self.codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let cmd = Command::decode(&f).map_err(End::BadBody)?;
                    self.handle(c, f.req_id, cmd)?;
                }
                Ok(None) => break,
                Err(e) => return Err(End::BadFrame(e)),
            }
        }
        if !buf.is_empty() && c.live.get() {
            self.partial.borrow_mut().insert(c.local, buf);
        }
        Ok(())
    }

    /// A c2c message to a random other user.
    fn send_one(&self, c: &Conn) {
        let total = self.plan.total as u64;
        let mut to = self.below(total - 1) as u32;
        if to >= c.idx {
            to += 1;
        }
        self.send_msg(c, Cmd::SendC2c, to, self.plan.uid_base + to as u64, false);
    }

    /// A post to group number `g` (the caller checked it has an id).
    fn send_post(&self, c: &Conn, g: u32) {
        let id = self.group_ids.borrow()[g as usize];
        self.send_msg(c, Cmd::SendC2g, g, id, false);
    }

    /// `SendC2c` and `SendC2g` share their layout: `client_msg_id:u64 to:u64 body:bytes`; `to`
    /// is the recipient's index or the group number, `wire_to` the uid or group id. `all`: a
    /// `SendC2g` mentioning uid 0 (`@all`; the trailing `count:u16 mention:u64`).
    fn send_msg(&self, c: &Conn, cmd: Cmd, to: u32, wire_to: u64, all: bool) {
        let counter = c.counter.get() + 1;
        c.counter.set(counter);
        let req = c.req();
        let sent_ns = now_ns();
        self.encode_send(c, cmd, req, counter, wire_to, sent_ns, 0, all);
        c.pending.borrow_mut().push_back(Pending {
            counter,
            to,
            req,
            at: Instant::now(),
            cmd,
            wire_to,
            sent_ns,
            last_try: Instant::now(),
            tries: 0,
            all,
        });
        self.pending_total.set(self.pending_total.get() + 1);
        let mut r = self.rep.borrow_mut();
        r.sent += 1;
        if r.first_send_ns.is_none() {
            r.first_send_ns = Some(now_ns());
        }
        self.live.sent.fetch_add(1, Relaxed);
        self.mark_flush(c);
    }

    /// Writes one `SendC2c` / `SendC2g` frame into the connection's output buffer.
    #[allow(clippy::too_many_arguments)]
    fn encode_send(
        &self,
        c: &Conn,
        cmd: Cmd,
        req: u32,
        counter: u32,
        wire_to: u64,
        sent_ns: u64,
        tries: u8,
        all: bool,
    ) {
        let body_len = self.plan.body_size.max(BODY_HEADER);
        let mentions = if all { 2 + 8 } else { 0 };
        let mut outs = self.out.borrow_mut();
        let out = outs.entry(c.local).or_default();
        encode_header(out, cmd, req, 8 + 8 + 4 + body_len + mentions);
        out.put_u64((self.run_id as u64) << 32 | counter as u64);
        out.put_u64(wire_to);
        out.put_u32(body_len as u32);
        out.put_u64(sent_ns);
        out.put_u32(c.idx);
        out.put_u32(counter);
        out.put_u8(tries);
        out.put_bytes(b'x', body_len - BODY_HEADER);
        if all {
            out.put_u16(1);
            out.put_u64(0);
        }
    }

    /// After a login: every send still waiting for its ack (its connection was lost) is sent
    /// again with the same `client_msg_id` and body, as a phone's outbox does; the server's dedup
    /// answers one it already stored with the same ack.
    fn resend_pending(&self, c: &Conn) {
        self.resend_older(c, Duration::ZERO);
    }

    /// Sends again (same `client_msg_id` and body, a new `req_id`) every pending send that went
    /// out at least `age` ago: PROTOCOL.md section 10 tells a client to do so when the `SendAck`
    /// does not come.
    fn resend_older(&self, c: &Conn, age: Duration) {
        let mut pend = c.pending.borrow_mut();
        let mut n = 0;
        let age = age.as_millis() as u64;
        for p in pend
            .iter_mut()
            .filter(|p| age == 0 || resend_due(0, p.last_try.elapsed().as_millis() as u64, age))
        {
            p.req = c.req();
            p.last_try = Instant::now();
            p.tries = p.tries.saturating_add(1);
            self.encode_send(
                c, p.cmd, p.req, p.counter, p.wire_to, p.sent_ns, p.tries, p.all,
            );
            n += 1;
        }
        drop(pend);
        if n > 0 {
            self.rep.borrow_mut().resent += n;
            self.mark_flush(c);
        }
    }

    /// The gate for this user's next attempt: its `gate_pos`-th gate in its order (the iplist's
    /// rendezvous order with `gate_ids`, else starting at `server[uid % len]`).
    fn gate_for(&self, c: &Conn) -> SocketAddr {
        let p = &self.plan;
        let n = p.server.len().max(1);
        let pos = c.gate_pos.get() as usize % n;
        if p.gate_ids.len() == p.server.len() && !p.gate_ids.is_empty() {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| {
                let id = p.gate_ids[i];
                (std::cmp::Reverse(rendezvous_weight(c.uid, id)), id)
            });
            p.server[order[pos]]
        } else {
            p.server[((c.uid.0 % n as u64) as usize + pos) % n]
        }
    }

    /// Users that were logged in during the run and are not logged in and synced now.
    fn count_not_back(&self) {
        let mut r = self.rep.borrow_mut();
        for c in &self.conns {
            let back = c.st.get() == St::LoggedIn
                && !c.syncing.get()
                && !c.g_syncing.get()
                && c.storm_t0.get().is_none();
            if c.ever_in.get() && !back {
                r.not_back += 1;
                r.not_back_ids.push(c.idx);
            }
        }
    }

    /// Moves sends still waiting for an ack into the timeout column.
    fn expire_pending(&self) {
        let mut r = self.rep.borrow_mut();
        for c in &self.conns {
            for p in c.pending.borrow_mut().drain(..) {
                r.ack_timeouts += 1;
                if self.plan.track {
                    r.unacked_ids.push(c.idx, p.to, p.counter);
                }
            }
        }
        self.pending_total.set(0);
    }

    fn take_report(&self) -> Report {
        std::mem::take(&mut *self.rep.borrow_mut())
    }
}

/// The epoll tag of a connection's socket: its generation and local number.
fn tag(c: &Conn) -> u64 {
    (c.gen.get() as u64) << 32 | c.local as u64
}

fn last_errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Waits until the epoll set `epfd` has ready events, through glommio's reactor: the executor
/// still sleeps in one place (its io_uring), and a busy executor does not spin on epoll.
///
/// glommio has no public "wait for this descriptor" call, but a stream made from a raw
/// descriptor arms an io_uring `POLL_ADD` for readability at once (`TcpStream::from_raw_fd`),
/// and its `poll_read` waits on that poll before it tries a `recv`. The stream is made from a
/// duplicate of `epfd` (dropping the stream closes it): the `recv` it tries once the poll fired
/// fails (`ENOTSOCK`, an epoll descriptor is no socket), which means "readable" here. One
/// duplicate, one poll and one close per wait, however many sockets are ready.
async fn epoll_readable(epfd: RawFd) -> std::io::Result<()> {
    // SAFETY: `epfd` is a valid descriptor owned by the executor; the duplicate is owned below.
    let dup = unsafe { libc::fcntl(epfd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(last_errno());
    }
    // SAFETY: `dup` is a fresh descriptor that nothing else owns; the stream closes it.
    let mut stream = unsafe { TcpStream::from_raw_fd(dup) };
    let mut byte = [0u8; 1];
    let r = poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut byte)).await;
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => Ok(()),
        // Not reachable with an epoll descriptor; any other answer also ends the wait.
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}

/// The poller task: reads every socket the epoll set reports ready and handles its frames; also
/// hands `EPOLLOUT` to the sender for connections whose write did not fit.
async fn poller(ex: Rc<Exec>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut warned = false;
    loop {
        if ex.again.borrow().is_empty() {
            if let Err(e) = epoll_readable(ex.epfd).await {
                // No descriptor left for the duplicate (`EMFILE` at the open-file limit): look
                // every millisecond instead, until one is free again.
                if !std::mem::replace(&mut warned, true) {
                    eprintln!("im-loadgen: waiting for the epoll set: {e}; polling every 1 ms");
                }
                sleep(Duration::from_millis(1)).await;
            }
        }
        loop {
            // SAFETY: `events` has room for `len` entries; `epfd` is the executor's epoll set.
            let n =
                unsafe { libc::epoll_wait(ex.epfd, events.as_mut_ptr(), events.len() as i32, 0) };
            if n < 0 {
                if last_errno().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break;
            }
            let n = n as usize;
            for ev in &events[..n] {
                let (bits, t) = (ev.events, ev.u64);
                on_event(&ex, bits, t);
            }
            if n < events.len() {
                break;
            }
            glommio::yield_if_needed().await;
        }
        let again = std::mem::take(&mut *ex.again.borrow_mut());
        for l in again {
            read_ready(&ex, l, false);
        }
        glommio::yield_if_needed().await;
    }
}

fn on_event(ex: &Rc<Exec>, bits: u32, t: u64) {
    let Some(c) = ex.conns.get(t as u32 as usize) else {
        return;
    };
    if !c.live.get() || c.gen.get() != (t >> 32) as u32 {
        return; // a socket closed meanwhile
    }
    let hup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
    if bits & (libc::EPOLLOUT as u32 | hup) != 0 && c.want_out.get() {
        c.want_out.set(false);
        ex.mark_flush(c);
    }
    if bits & (libc::EPOLLIN as u32 | hup) != 0 {
        read_ready(ex, c.local, bits & hup != 0);
    }
}

/// Reads connection `l` until its socket is empty (a short read means empty, unless the peer
/// hung up: then until the end), it closed, or it used its turn (4 full scratch buffers: then it
/// goes last in the `again` queue, as an edge-triggered socket will not be reported again).
fn read_ready(ex: &Rc<Exec>, l: u32, hup: bool) {
    let c = &ex.conns[l as usize];
    for _ in 0..4 {
        if !c.live.get() || c.close.get() != 0 {
            return;
        }
        let mut scratch = ex.scratch.borrow_mut();
        // SAFETY: the scratch buffer is valid for writes of its length; `fd` is this open socket.
        let r = unsafe {
            libc::recv(
                c.fd.get(),
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = last_errno();
            drop(scratch);
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return,
                Some(libc::EINTR) => continue,
                _ => return finalize(ex, c, End::Io(errno_name(&e))),
            }
        }
        if r == 0 {
            drop(scratch);
            return finalize(ex, c, End::PeerClosed);
        }
        let n = r as usize;
        let full = n == scratch.len();
        let res = ex.process(c, &scratch[..n]);
        drop(scratch);
        if let Err(e) = res {
            return finalize(ex, c, e);
        }
        if !full && !hup {
            return;
        }
    }
    ex.again.borrow_mut().push_back(l);
}

/// The sender task: writes the output of every marked connection (one `send` of its whole queue,
/// so a round's frames leave together), or closes it if the loadgen asked to.
async fn sender(ex: Rc<Exec>) {
    let mut list = Vec::new();
    loop {
        poll_fn(|cx| {
            if ex.flush.borrow().is_empty() {
                ex.sender_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        std::mem::swap(&mut list, &mut *ex.flush.borrow_mut());
        for l in list.drain(..) {
            flush_one(&ex, l);
        }
        if list.capacity() > 4096 {
            list = Vec::new();
        }
    }
}

fn flush_one(ex: &Rc<Exec>, l: u32) {
    let c = &ex.conns[l as usize];
    c.queued.set(false);
    if !c.live.get() {
        return;
    }
    if c.close.get() != 0 {
        return finalize(ex, c, End::Local(CLOSE_WHY[c.close.get() as usize]));
    }
    if c.want_out.get() {
        return; // waits for EPOLLOUT
    }
    let mut outs = ex.out.borrow_mut();
    let Some(out) = outs.get_mut(&l) else {
        return;
    };
    while !out.is_empty() {
        // SAFETY: `out` is valid for reads of its length; `fd` is this open socket.
        let r = unsafe {
            libc::send(
                c.fd.get(),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = last_errno();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    // Full, or the connect is still in progress: `EPOLLOUT` brings it back.
                    c.want_out.set(true);
                    return;
                }
                _ => {
                    drop(outs);
                    return finalize(ex, c, End::Io(errno_name(&e)));
                }
            }
        }
        out.advance(r as usize);
    }
    // Nothing queued: no buffer kept.
    outs.remove(&l);
    if outs.is_empty() && outs.capacity() > 1024 {
        outs.shrink_to_fit();
    }
}

/// Opens a connection for user `c` (a non-blocking connect, registered with the epoll set) and
/// queues its `Login`; a connect that fails at once ends the attempt as a lost one would.
fn start_conn(ex: &Rc<Exec>, c: &Conn) {
    let p = &ex.plan;
    ex.tasks.set(ex.tasks.get() + 1);
    c.live.set(true);
    c.close.set(0);
    c.queued.set(false);
    c.want_out.set(false);
    c.st.set(St::LoginSent);
    c.started.set(Some(Instant::now()));
    c.syncing.set(false);
    c.push_max.set(0);
    c.g_syncing.set(false);
    c.g_push_max.set(0);
    c.up_since.set(None);
    if c.first_try.get().is_none() {
        c.first_try.set(Some(Instant::now()));
    }
    // Frames queued while the user had no connection (a request of a phase that went on) are not
    // the new connection's: it starts with its `Login`.
    ex.out.borrow_mut().remove(&c.local);
    ex.partial.borrow_mut().remove(&c.local);
    {
        let mut r = ex.rep.borrow_mut();
        r.attempted += 1;
        if r.first_connect_ns.is_none() {
            r.first_connect_ns = Some(now_ns());
        }
    }
    // Users go to gate `uid % gates`; the source address follows `idx / gates`, so every gate
    // sees every source address (with `idx % n` a gate count that shares a factor with the
    // address count gave each gate one address, and the gate's per-address cap of 10 000
    // connections stopped the run).
    let gates = p.server.len().max(1);
    let src =
        (!p.src_ips.is_empty()).then(|| p.src_ips[(c.idx as usize / gates) % p.src_ips.len()]);
    let server = ex.gate_for(c);
    let fd = match start_connect(src, server) {
        Err(e) => return end_conn(ex, c, End::Connect(errno_name(&e))),
        Ok(fd) => fd,
    };
    c.fd.set(fd);
    ex.live.connected.fetch_add(1, Relaxed);
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: tag(c),
    };
    // SAFETY: both descriptors are open and owned by this executor; `ev` lives on the stack.
    if unsafe { libc::epoll_ctl(ex.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        let e = last_errno();
        return finalize(ex, c, End::Io(errno_name(&e)));
    }
    let token = ex.tokens.mint(c.uid, im_shared::token::now_secs() + 86_400);
    let req = ex.push(
        c,
        &Command::Login {
            uid: c.uid,
            device_type: DeviceType::Phone,
            device_id: format!("lg-{}", c.uid.0),
            last_seq: Seq(c.last_seq.get()),
            token,
        },
    );
    c.login_req.set(req);
}

/// Closes connection `c`'s socket (which leaves the epoll set), drops its buffers, and ends the
/// attempt with `why`.
fn finalize(ex: &Rc<Exec>, c: &Conn, why: End) {
    if !c.live.get() {
        return;
    }
    let fd = c.fd.replace(-1);
    if fd >= 0 {
        // SAFETY: `fd` is this connection's socket, owned here and closed once.
        unsafe { libc::close(fd) };
        ex.live.connected.fetch_sub(1, Relaxed);
    }
    c.gen.set(c.gen.get().wrapping_add(1));
    c.want_out.set(false);
    ex.out.borrow_mut().remove(&c.local);
    ex.partial.borrow_mut().remove(&c.local);
    end_conn(ex, c, why);
}

/// The end of a connection attempt: counts why, and schedules the next attempt after the
/// backoff when a phone would try again.
fn end_conn(ex: &Rc<Exec>, c: &Conn, why: End) {
    let was = c.st.get();
    let up_for = c.up_since.take().map_or(Duration::ZERO, |t| t.elapsed());
    c.live.set(false);
    c.close.set(0);
    ex.tasks.set(ex.tasks.get() - 1);
    if was == St::LoggedIn {
        ex.live.logged_in.fetch_sub(1, Relaxed);
    }
    c.st.set(St::Idle);
    if why.is_planned() {
        return;
    }
    let mut r = ex.rep.borrow_mut();
    if was == St::LoginSent {
        ex.live.login_failed.fetch_add(1, Relaxed);
        *r.login_failures.entry(why.tally()).or_default() += 1;
    } else {
        ex.live.disconnects.fetch_add(1, Relaxed);
        *r.disconnects.entry(why.tally()).or_default() += 1;
    }
    drop(r);
    // A phone keeps trying (PROTOCOL.md section 9, docs/API.md "iplist"): after a lost
    // connection for as long as the run lasts, before its first login for `login_retry_ms`.
    let p = &ex.plan;
    let in_time = c.ever_in.get()
        || c.first_try
            .get()
            .is_some_and(|t| t.elapsed() < Duration::from_millis(p.login_retry_ms));
    if why.is_retryable() && in_time && !ex.quitting.get() {
        if was == St::LoggedIn {
            c.reconnects.set(c.reconnects.get() + 1);
            if c.storm_t0.get().is_none() {
                // Counted "back" once logged in again and synced up to the new max seq.
                c.storm_t0.set(Some(Instant::now()));
            }
        }
        // The core's rule: a connection that stayed up long enough starts the backoff over.
        let mut attempts = Attempts {
            next: c.attempt.get(),
        };
        let attempt = attempts.on_end(up_for.as_millis() as u64);
        c.attempt.set(attempts.next);
        let unit = (ex.rand() >> 11) as f64 / (1u64 << 53) as f64;
        let wait = Duration::from_millis(p.backoff.wait_ms(attempt, unit));
        c.gate_pos.set(c.gate_pos.get().wrapping_add(1));
        c.st.set(St::Idle);
        ex.rep.borrow_mut().retries += 1;
        // The pending reconnect keeps drains and quits waiting; the 5 ms ticker starts it.
        ex.tasks.set(ex.tasks.get() + 1);
        ex.reconnect
            .borrow_mut()
            .push(Reverse((Instant::now() + wait, c.local)));
    } else {
        c.st.set(St::Failed);
        if !c.ever_in.get() {
            ex.rep.borrow_mut().gave_up += 1;
        }
        let had = c.storm_t0.take().is_some();
        if had && c.in_storm.replace(false) {
            ex.storm_failed.set(ex.storm_failed.get() + 1);
        }
    }
}

fn create_key(c: &Conn, req: u32) -> u64 {
    (c.local as u64) << 32 | req as u64
}

/// Spawns a connection task for every user (or those selected) at `rate` per second.
async fn ramp(ex: &Rc<Exec>, rate: f64) {
    let start = Instant::now();
    let n = ex.conns.len();
    let mut i = 0;
    while i < n {
        let due = if rate <= 0.0 {
            n
        } else {
            ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(n)
        };
        while i < due {
            start_conn(ex, &ex.conns[i]);
            i += 1;
            if i % 256 == 0 {
                // Let the connects already started make progress.
                glommio::yield_if_needed().await;
            }
        }
        if i < n {
            sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn wait_until(mut f: impl FnMut() -> bool, max: Duration) {
    let start = Instant::now();
    while !f() && start.elapsed() < max {
        sleep(Duration::from_millis(5)).await;
    }
}

/// 1 s ticker: heartbeats (spread over the period), login timeouts.
async fn ticker_1s(ex: Rc<Exec>) {
    let mut tick: u64 = 0;
    let hb = ex.plan.heartbeat_secs.max(1) as u64;
    let login_timeout = Duration::from_millis(ex.plan.login_timeout_ms);
    let resend = ex.plan.resend_ms;
    loop {
        sleep(Duration::from_secs(1)).await;
        tick += 1;
        let mut hbs = 0;
        for c in &ex.conns {
            if ex.plan.resend_ms > 0 && c.st.get() == St::LoggedIn {
                let due = c
                    .pending
                    .borrow()
                    .iter()
                    .any(|p| resend_due(0, p.last_try.elapsed().as_millis() as u64, resend));
                if due {
                    ex.resend_older(c, Duration::from_millis(resend));
                }
            }
            match c.st.get() {
                St::LoggedIn if (c.local as u64 % hb) == tick % hb => {
                    ex.push(c, &Command::Heartbeat);
                    hbs += 1;
                }
                St::LoginSent if c.started.get().is_some_and(|t| t.elapsed() > login_timeout) => {
                    ex.request_close(c, "timeout");
                }
                _ => {}
            }
        }
        ex.rep.borrow_mut().heartbeats += hbs;
    }
}

/// Hands the latency histograms of the last [`PROGRESS_EVERY`] to the worker process.
async fn ticker_progress(ex: Rc<Exec>, tx: Sender<(usize, ExecMsg)>, me: usize) {
    loop {
        sleep(PROGRESS_EVERY).await;
        let ack = std::mem::take(&mut *ex.iv_ack.borrow_mut());
        let deliver = std::mem::take(&mut *ex.iv_deliver.borrow_mut());
        if tx.send((me, ExecMsg::Interval { ack, deliver })).is_err() {
            return;
        }
    }
}

/// How long a connection waits after a delivery before acknowledging it (with every delivery
/// that came meanwhile): one `DeliverAck` per connection per [`ACK_DELAY`] at most.
const ACK_DELAY: Duration = Duration::from_millis(100);

/// Every 5 ms: `DeliverAck` with the highest contiguous seq of each connection whose first
/// unacknowledged delivery is [`ACK_DELAY`] old (unless `--no-deliver-ack`), and the reconnects
/// whose backoff is over. Each connection keeps its own 100 ms ack rhythm, as independent phones
/// do; acking every connection on one common 100 ms tick instead made bursts of thousands of acks
/// (and `Delivered` notices) that both processes measured as latency.
async fn ticker_5ms(ex: Rc<Exec>) {
    let acks = !ex.plan.no_deliver_ack;
    loop {
        sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        while acks && !ex.dirty.borrow().is_empty() {
            let i = {
                let mut dirty = ex.dirty.borrow_mut();
                match dirty.front() {
                    Some(&(at, i)) if now.duration_since(at) >= ACK_DELAY => {
                        dirty.pop_front();
                        i
                    }
                    _ => break,
                }
            };
            let c = &ex.conns[i as usize];
            c.in_dirty.set(false);
            if c.st.get() == St::LoggedIn && c.last_seq.get() > c.acked_seq.get() {
                c.acked_seq.set(c.last_seq.get());
                ex.push(
                    c,
                    &Command::DeliverAck {
                        seq: Seq(c.last_seq.get()),
                    },
                );
            }
        }
        loop {
            let l = {
                let mut q = ex.reconnect.borrow_mut();
                match q.peek() {
                    Some(Reverse((at, l))) if *at <= now => {
                        let l = *l;
                        q.pop();
                        l
                    }
                    _ => break,
                }
            };
            ex.tasks.set(ex.tasks.get() - 1);
            let c = &ex.conns[l as usize];
            if !ex.quitting.get() && !c.live.get() {
                start_conn(&ex, c);
            }
        }
    }
}

/// A `GroupAdd` batch is sent at most this many times (retryable refusals).
const MAX_ADD_TRIES: u32 = 10;

/// `large-group`: the owner (user 0, if this executor has it) creates the group with users
/// `0..initial`, adds users `initial..members` in batches of `batch` with at most `window` adds
/// in flight, then reads the group's head (a one-entry `GroupSync` from seq 0).
async fn build_large(ex: &Rc<Exec>, members: u32, initial: u32, batch: u32, window: u32) {
    let Some(c) = ex.conn_of(0) else {
        return;
    };
    if c.st.get() != St::LoggedIn {
        *ex.rep
            .borrow_mut()
            .group_create_errors
            .entry("owner not logged in".into())
            .or_default() += 1;
        return;
    }
    let base = ex.plan.uid_base;
    let uid = move |i: u32| UserId(base + i as u64);
    let initial = initial.clamp(1, members.max(1));
    let req = ex.push(
        c,
        &Command::GroupCreate {
            name: "lg-large".into(),
            members: (1..initial).map(uid).collect(),
            client_id: 0, // a fresh group in every run
        },
    );
    ex.creating.borrow_mut().insert(create_key(c, req), 0);
    let long = Duration::from_millis(ex.plan.ack_timeout_ms).max(Duration::from_secs(30));
    wait_until(|| ex.creating.borrow().is_empty(), long).await;
    if !std::mem::take(&mut *ex.creating.borrow_mut()).is_empty() {
        *ex.rep
            .borrow_mut()
            .group_create_errors
            .entry("timeout".into())
            .or_default() += 1;
        return;
    }
    let Some(id) = ex.rep.borrow().group_ids.first().map(|g| g.1) else {
        return;
    };
    let (batch, window) = (batch.clamp(1, u16::MAX as u32), window.max(1) as usize);
    let mut next = initial;
    loop {
        while ex.adding.borrow().len() < window {
            let due = {
                let mut q = ex.add_retry.borrow_mut();
                match q.front() {
                    Some(&(_, _, at, _)) if at <= Instant::now() => q.pop_front(),
                    _ => None,
                }
            };
            let (lo, hi, tries) = match due {
                Some((lo, hi, _, tries)) => (lo, hi, tries),
                None if next < members => {
                    let lo = next;
                    next = next.saturating_add(batch).min(members);
                    (lo, next, 0)
                }
                None => break,
            };
            let req = ex.push(
                c,
                &Command::GroupAdd {
                    group: GroupId(id),
                    members: (lo..hi).map(uid).collect(),
                },
            );
            ex.adding
                .borrow_mut()
                .insert(create_key(c, req), (lo, hi, Instant::now(), tries + 1));
        }
        if next >= members && ex.adding.borrow().is_empty() && ex.add_retry.borrow().is_empty() {
            break;
        }
        // An add not answered for this long is given up (the owner's connection was lost, or
        // the server is stuck): counted, and the build goes on.
        let expired: Vec<u64> = ex
            .adding
            .borrow()
            .iter()
            .filter(|(_, v)| v.2.elapsed() >= long)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            ex.adding.borrow_mut().remove(&k);
            let mut r = ex.rep.borrow_mut();
            *r.add_errors.entry("timeout".into()).or_default() += 1;
            r.adds_failed += 1;
        }
        sleep(Duration::from_millis(1)).await;
    }
    let req = ex.push(
        c,
        &Command::GroupSync {
            group: GroupId(id),
            after_seq: Seq(0),
            limit: 1,
        },
    );
    ex.head_req.set(Some(create_key(c, req)));
    wait_until(|| ex.head_req.get().is_none(), long).await;
    if ex.head_req.take().is_some() {
        ex.rep.borrow_mut().head_error = Some("timeout".into());
    }
}

/// Sends at `rate` for `secs`: c2c messages from random logged-in users, or (`group`) posts of
/// random memberships of groups that exist; then waits for the acks.
async fn send_phase(ex: &Rc<Exec>, rate: f64, secs: f64, group: bool) {
    let logged_in = |l: u32| ex.conns[l as usize].st.get() == St::LoggedIn;
    // (local conn, group number)
    let cands: Vec<(u32, u32)> = if group {
        let ids = ex.group_ids.borrow();
        ex.memberships
            .iter()
            .filter(|(l, g)| logged_in(*l) && ids.get(*g as usize).is_some_and(|id| *id != 0))
            .copied()
            .collect()
    } else {
        ex.conns
            .iter()
            .map(|c| (c.local, 0))
            .filter(|(l, _)| logged_in(*l))
            .collect()
    };
    if rate > 0.0 && !cands.is_empty() && (group || ex.plan.total > 1) {
        let start = Instant::now();
        let dur = Duration::from_secs_f64(secs);
        let mut sent: u64 = 0;
        loop {
            let el = start.elapsed();
            let target = (el.min(dur).as_secs_f64() * rate) as u64;
            while sent < target {
                let (l, g) = cands[ex.below(cands.len() as u64) as usize];
                let c = &ex.conns[l as usize];
                if c.st.get() == St::LoggedIn {
                    if group {
                        ex.send_post(c, g);
                    } else {
                        ex.send_one(c);
                    }
                }
                sent += 1;
                if sent % 512 == 0 {
                    glommio::yield_if_needed().await;
                }
            }
            if el >= dur {
                break;
            }
            sleep(Duration::from_millis(1)).await;
        }
    }
    let to = Duration::from_millis(ex.plan.ack_timeout_ms);
    let e2 = ex.clone();
    wait_until(move || e2.pending_total.get() == 0, to).await;
}

/// Runs one executor until `Quit` or until the worker goes away.
pub async fn run(
    plan: Arc<Plan>,
    me: usize,
    users: std::ops::Range<u32>,
    rate_share: f64,
    live: Arc<Live>,
    rx: Receiver<Request>,
    tx: Sender<(usize, ExecMsg)>,
) {
    let mut memberships = Vec::new();
    for k in 0..plan.groups {
        for u in group_members(k, plan.group_size, plan.total) {
            if users.contains(&u) {
                memberships.push((u - users.start, k));
            }
        }
    }
    let conns = users
        .clone()
        .enumerate()
        .map(|(local, idx)| Conn::new(idx, local as u32, UserId(plan.uid_base + idx as u64)))
        .collect();
    // SAFETY: plain syscall; the descriptor is owned by the executor (closed by its Drop).
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        let _ = tx.send((
            me,
            ExecMsg::Done {
                id: u64::MAX,
                report: None,
            },
        ));
        panic!("epoll_create1: {}", last_errno());
    }
    let ex = Rc::new(Exec {
        run_id: (plan.seed >> 32) as u32,
        rng: Cell::new(plan.seed ^ (me as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)),
        tokens: HmacTokens::new(plan.token_secret.clone()),
        codec: FrameCodec::new(16 * 1024 * 1024),
        plan,
        conns,
        epfd,
        out: RefCell::default(),
        partial: RefCell::default(),
        flush: RefCell::default(),
        sender_waker: Cell::new(None),
        again: RefCell::default(),
        reconnect: RefCell::default(),
        rep: RefCell::default(),
        iv_ack: RefCell::default(),
        iv_deliver: RefCell::default(),
        live,
        scratch: RefCell::new(vec![0; 64 * 1024]),
        dirty: RefCell::default(),
        seen: RefCell::default(),
        order: RefCell::default(),
        large_first: RefCell::default(),
        large_sender_last: RefCell::default(),
        memberships,
        group_ids: RefCell::default(),
        group_of: RefCell::default(),
        creating: RefCell::default(),
        large_group: Cell::new(0),
        adding: RefCell::default(),
        add_retry: RefCell::default(),
        head_req: Cell::new(None),
        post_seq: RefCell::default(),
        mentions: RefCell::default(),
        mention_members: Cell::new(0),
        tasks: Cell::new(0),
        pending_total: Cell::new(0),
        last_activity: Cell::new(Instant::now()),
        storm_mode: Cell::new(false),
        quitting: Cell::new(false),
        storm_back: Cell::new(0),
        storm_failed: Cell::new(0),
    });
    glommio::spawn_local(ticker_1s(ex.clone())).detach();
    glommio::spawn_local(ticker_progress(ex.clone(), tx.clone(), me)).detach();
    glommio::spawn_local(ticker_5ms(ex.clone())).detach();
    glommio::spawn_local(poller(ex.clone())).detach();
    glommio::spawn_local(sender(ex.clone())).detach();
    let share = |total_rate: f64| total_rate * rate_share;
    loop {
        let req = loop {
            match rx.try_recv() {
                Ok(r) => break r,
                Err(TryRecvError::Empty) => sleep(Duration::from_millis(2)).await,
                Err(TryRecvError::Disconnected) => return,
            }
        };
        let report = match req.op {
            Op::Login { rate } => {
                ramp(&ex, share(rate)).await;
                let e2 = ex.clone();
                let n = ex.conns.len();
                wait_until(
                    move || {
                        e2.conns
                            .iter()
                            .all(|c| matches!(c.st.get(), St::LoggedIn | St::Failed))
                            || n == 0
                    },
                    Duration::from_secs(3600),
                )
                .await;
                Some(Box::new(ex.take_report()))
            }
            Op::Hold { secs } => {
                sleep(Duration::from_secs_f64(secs)).await;
                None
            }
            Op::Send { rate, secs } => {
                send_phase(&ex, share(rate), secs, false).await;
                None
            }
            Op::CreateGroups => {
                ex.create_groups();
                let e2 = ex.clone();
                wait_until(
                    move || e2.creating.borrow().is_empty(),
                    Duration::from_millis(ex.plan.ack_timeout_ms),
                )
                .await;
                let unanswered = std::mem::take(&mut *ex.creating.borrow_mut()).len() as u64;
                if unanswered > 0 {
                    *ex.rep
                        .borrow_mut()
                        .group_create_errors
                        .entry("timeout".into())
                        .or_default() += unanswered;
                }
                Some(Box::new(ex.take_report()))
            }
            Op::SetGroups { ids } => {
                ex.set_groups(ids);
                None
            }
            Op::BuildLarge {
                members,
                initial,
                batch,
                window,
            } => {
                build_large(&ex, members, initial, batch, window).await;
                Some(Box::new(ex.take_report()))
            }
            Op::LargeReady {
                group,
                head,
                max_secs,
            } => {
                ex.large_group.set(group);
                for c in &ex.conns {
                    c.g_on.set(true);
                    c.g_base.set(head);
                    c.g_last.set(head);
                    c.g_seen_max.set(head);
                    c.g_push_max.set(head);
                    c.g_syncing.set(false);
                }
                let ready = |c: &Conn| c.large_of.get() == group;
                wait_until(
                    || {
                        ex.conns
                            .iter()
                            .all(|c| c.st.get() != St::LoggedIn || ready(c))
                    },
                    Duration::from_secs_f64(max_secs),
                )
                .await;
                let mut r = ex.rep.borrow_mut();
                for c in ex.conns.iter().filter(|c| c.st.get() == St::LoggedIn) {
                    if ready(c) {
                        r.large_ready += 1;
                    } else {
                        r.large_not_ready += 1;
                    }
                }
                drop(r);
                Some(Box::new(ex.take_report()))
            }
            Op::SendGroup { rate, secs } => {
                // This executor's share of the posts: its share of the memberships.
                let all = ex.plan.groups as f64 * ex.plan.group_size as f64;
                let share = ex.memberships.len() as f64 / all.max(1.0);
                send_phase(&ex, rate * share, secs, true).await;
                None
            }
            Op::MentionAll { group } => {
                match ex.conn_of(0).filter(|c| c.st.get() == St::LoggedIn) {
                    Some(c) => {
                        ex.send_msg(c, Cmd::SendC2g, 0, group, true);
                        let e2 = ex.clone();
                        wait_until(
                            move || e2.pending_total.get() == 0,
                            Duration::from_millis(ex.plan.ack_timeout_ms),
                        )
                        .await;
                        ex.expire_pending();
                    }
                    None if ex.conn_of(0).is_some() => {
                        *ex.rep
                            .borrow_mut()
                            .send_errors
                            .entry("owner not logged in".into())
                            .or_default() += 1;
                    }
                    None => {}
                }
                Some(Box::new(ex.take_report()))
            }
            Op::MentionWait { max_secs, quiet_ms } => {
                let expected = ex
                    .conns
                    .iter()
                    .filter(|c| c.ever_in.get() && c.idx != 0)
                    .count() as u64;
                let quiet = Duration::from_millis(quiet_ms);
                wait_until(
                    || {
                        ex.mention_members.get() >= expected
                            && ex.last_activity.get().elapsed() >= quiet
                    },
                    Duration::from_secs_f64(max_secs),
                )
                .await;
                ex.count_mentions();
                Some(Box::new(ex.take_report()))
            }
            Op::Drain { quiet_ms, max_secs } => {
                let start = Instant::now();
                let quiet = Duration::from_millis(quiet_ms);
                let e2 = ex.clone();
                wait_until(
                    move || {
                        e2.last_activity.get().elapsed() >= quiet
                            && start.elapsed() >= quiet
                            && e2.pending_total.get() == 0
                            && e2.conns.iter().all(|c| {
                                !c.syncing.get() && !c.g_syncing.get() && c.storm_t0.get().is_none()
                            })
                    },
                    Duration::from_secs_f64(max_secs),
                )
                .await;
                None
            }
            Op::Report => {
                ex.count_not_back();
                ex.expire_pending();
                Some(Box::new(ex.take_report()))
            }
            Op::Storm { rate, fraction } => {
                let below = (fraction.clamp(0.0, 1.0) * 1000.0).round() as u32;
                ex.storm_mode.set(true);
                ex.storm_back.set(0);
                ex.storm_failed.set(0);
                let t0 = Instant::now();
                // The users that were online and are in the dropped share.
                let targets_list: Vec<&Conn> = ex
                    .conns
                    .iter()
                    .filter(|c| {
                        (c.live.get() || c.st.get() == St::LoggedIn) && c.idx % 1000 < below
                    })
                    .collect();
                for c in &targets_list {
                    ex.request_close(c, "storm");
                    c.storm_t0.set(Some(t0));
                    c.in_storm.set(true);
                }
                let targets = targets_list.len() as u64;
                ex.rep.borrow_mut().dropped += targets;
                wait_until(
                    || targets_list.iter().all(|c| !c.live.get()),
                    Duration::from_secs(60),
                )
                .await;
                // Reconnect them.
                let start = Instant::now();
                let r = share(rate);
                for (i, c) in targets_list.iter().enumerate() {
                    if r > 0.0 {
                        let due = Duration::from_secs_f64(i as f64 / r);
                        let el = start.elapsed();
                        if due > el {
                            sleep(due - el).await;
                        }
                    }
                    if !c.live.get() {
                        start_conn(&ex, c);
                    }
                    if i % 256 == 255 {
                        glommio::yield_if_needed().await;
                    }
                }
                let e2 = ex.clone();
                wait_until(
                    move || e2.storm_back.get() + e2.storm_failed.get() >= targets,
                    Duration::from_secs(600),
                )
                .await;
                ex.storm_mode.set(false);
                Some(Box::new(ex.take_report()))
            }
            Op::Quit => {
                ex.quitting.set(true);
                // Reconnects still in their backoff will not happen.
                let waiting = std::mem::take(&mut *ex.reconnect.borrow_mut()).len() as u32;
                ex.tasks.set(ex.tasks.get() - waiting);
                for c in &ex.conns {
                    ex.request_close(c, "quit");
                }
                let e2 = ex.clone();
                wait_until(move || e2.tasks.get() == 0, Duration::from_secs(5)).await;
                let _ = tx.send((
                    me,
                    ExecMsg::Done {
                        id: req.id,
                        report: None,
                    },
                ));
                return;
            }
        };
        if tx.send((me, ExecMsg::Done { id: req.id, report })).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The executor against a tiny in-process server (std threads): login, c2c with per-user
    //! timelines (seq/prev_seq), acks, groups (create with "created" events, posts fanned out to
    //! every member's timeline, the poster's included, in one order); checks the executor's
    //! counting end to end. The server can be told to lose or reorder one member's copy.

    use super::*;
    use crate::account::{join, join_group};
    use im_shared::proto::GroupEvent;
    use im_shared::{GroupId, MsgId};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream as StdStream};
    use std::sync::Mutex;

    /// Faults the fake server injects into group fan-out.
    #[derive(Clone, Copy, Default)]
    struct Faults {
        /// This user never gets the copy of the group's post number `.1` (0-based, per group).
        drop: Option<(u64, u64)>,
        /// This user gets the first two posts of its group in the opposite order (its timeline
        /// stays gap-free: only the order differs from the other members').
        swap: Option<u64>,
        /// Every `n`-th `SendC2c` (counted over all users) is stored and delivered, and then the
        /// sender's connection is closed without the ack: a gate or node that died after the
        /// commit. The sender must log in again and send it again (deduplicated here).
        cut_after_store: Option<u64>,
        /// The first login of every user is refused with `Unavailable` (retryable).
        refuse_first_login: bool,
        /// The first `SendC2c` of every user is refused with `Unavailable` (retryable).
        refuse_first_send: bool,
        /// Large group: this user never gets the group's post number `.1` (0-based), neither
        /// pushed nor in `GroupSync` (a hole in what the server holds for it).
        large_drop: Option<(u64, u64)>,
        /// Large group: this user gets the group's first two posts pushed in the opposite
        /// order (with their true seqs: its `GroupSync` repairs it).
        large_reorder: Option<u64>,
        /// Large group: this user gets the group's first two posts in the opposite order, each
        /// with the other's seq (a consistent chain, but another order than the members').
        large_seq_swap: Option<u64>,
        /// Large group: this user's first post is held, unacked, and stored after its second
        /// one (every member gets them in that order, with consistent seqs; both acked then).
        large_sender_swap: Option<u64>,
        /// Large group: this user also gets the group's first post in its own timeline (as
        /// write diffusion would store it): a copy too many.
        large_own_copy: Option<u64>,
        /// The first `GroupAdd` is refused with `Overloaded` (retryable).
        refuse_first_add: bool,
        /// `@all` in a large group: this user never gets its mention entry.
        mention_drop: Option<u64>,
        /// `@all` in a large group: this user gets its mention entry twice (two seqs).
        mention_dup: Option<u64>,
        /// Answers are written 7 bytes at a time (separate segments): frames reach the loadgen
        /// in pieces, split anywhere.
        dribble: bool,
    }

    /// A large group of the fake server: members in the order they joined, its own timeline,
    /// posts so far.
    #[derive(Default)]
    struct LargeFake {
        members: Vec<u64>,
        timeline: Vec<Message>,
        posts: u64,
    }

    #[derive(Default)]
    struct State {
        conns: HashMap<u64, StdStream>,
        /// Per user: last seq of its timeline.
        seqs: HashMap<u64, u64>,
        /// Group id → members (owner first) and posts so far.
        groups: HashMap<u64, (Vec<u64>, u64)>,
        faults: Faults,
        /// The swapped user's held-back copy.
        held: Option<Message>,
        /// Every timeline entry per user (for `SyncRequest`), and `(sender, client_msg_id)` of
        /// the accepted c2c sends.
        timelines: HashMap<u64, Vec<Message>>,
        dedup: HashSet<(u64, u64)>,
        sends: u64,
        logins: HashSet<u64>,
        senders: HashSet<u64>,
        /// `DeliverAck`s received, and the highest seq each user acknowledged.
        deliver_acks: u64,
        acked_seq: HashMap<u64, u64>,
        /// Large groups (made large by their first `GroupAdd`).
        large: HashMap<u64, LargeFake>,
        /// `(user, group seq)` entries a user never sees (`large_drop`).
        hidden: HashSet<(u64, u64)>,
        /// Copies held back for `large_reorder` and `large_seq_swap`.
        held_reorder: Option<Message>,
        held_swap: Option<Message>,
        /// `large_sender_swap`: the held first post (its req_id, client msg id and message), and
        /// whether the swap is done.
        held_post: Option<(u32, u64, Message)>,
        sender_swapped: bool,
        add_refused: bool,
    }

    type Shared = Arc<Mutex<State>>;

    impl State {
        /// Appends `m` to `uid`'s timeline and pushes it if the user is online.
        fn append(&mut self, uid: u64, mut m: Message) {
            let seq = self.seqs.entry(uid).or_insert(0);
            *seq += 1;
            m.seq = Seq(*seq);
            m.prev_seq = Seq(*seq - 1);
            self.timelines.entry(uid).or_default().push(m.clone());
            if let Some(s) = self.conns.get_mut(&uid) {
                let _ = s.write_all(&Command::Deliver(m).to_bytes(0));
            }
        }
    }

    impl State {
        /// Writes a frame to `uid` if it is online.
        fn push_to(&mut self, uid: u64, cmd: Command) {
            if let Some(s) = self.conns.get_mut(&uid) {
                let _ = s.write_all(&cmd.to_bytes(0));
            }
        }

        /// Appends `m` to large group `id`'s timeline and pushes it to the members online;
        /// returns its seq and the previous one.
        fn large_append(&mut self, id: u64, mut m: Message) -> (Seq, Seq) {
            let l = self.large.get_mut(&id).expect("large group");
            m.prev_seq = Seq(l.timeline.len() as u64);
            m.seq = Seq(l.timeline.len() as u64 + 1);
            l.timeline.push(m.clone());
            let members = l.members.clone();
            let post = (m.conv == CONV_C2G).then(|| {
                l.posts += 1;
                l.posts - 1
            });
            let f = self.faults;
            for u in members {
                match post {
                    Some(n) if f.large_drop == Some((u, n)) => {
                        self.hidden.insert((u, m.seq.0));
                    }
                    Some(0) if f.large_reorder == Some(u) => self.held_reorder = Some(m.clone()),
                    Some(0) if f.large_seq_swap == Some(u) => self.held_swap = Some(m.clone()),
                    Some(1) if f.large_reorder == Some(u) => {
                        self.push_to(u, Command::GroupDeliver(m.clone()));
                        let h = self.held_reorder.take().expect("held copy");
                        self.push_to(u, Command::GroupDeliver(h));
                    }
                    Some(1) if f.large_seq_swap == Some(u) => {
                        // Post 1 at post 0's place, then post 0 at post 1's.
                        let mut h = self.held_swap.take().expect("held copy");
                        let mut first = m.clone();
                        (first.seq, first.prev_seq) = (h.seq, h.prev_seq);
                        (h.seq, h.prev_seq) = (m.seq, m.prev_seq);
                        self.push_to(u, Command::GroupDeliver(first));
                        self.push_to(u, Command::GroupDeliver(h));
                    }
                    _ => self.push_to(u, Command::GroupDeliver(m.clone())),
                }
            }
            (m.seq, m.prev_seq)
        }
    }

    fn event(kind: GroupEventKind, users: &[u64]) -> bytes::Bytes {
        GroupEvent {
            kind,
            users: users.iter().map(|u| UserId(*u)).collect(),
        }
        .to_bytes()
    }

    fn msg(conv: u8, from: u64, to: u64, client_msg_id: u64, body: bytes::Bytes) -> Message {
        Message {
            seq: Seq(0),
            prev_seq: Seq(0),
            msg_id: MsgId(1),
            conv,
            from: UserId(from),
            to: UserId(to),
            client_msg_id,
            server_time_ms: 0,
            body,
        }
    }

    fn fake_server() -> SocketAddr {
        fake_server_with(Faults::default())
    }

    fn fake_server_with(faults: Faults) -> SocketAddr {
        fake_server_state(faults).0
    }

    /// A fake server and its state, for tests that read what it received.
    fn fake_server_state(faults: Faults) -> (SocketAddr, Shared) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state: Shared = Arc::new(Mutex::new(State {
            faults,
            ..Default::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let state = state.clone();
                std::thread::spawn(move || serve(s, state));
            }
        });
        (addr, shared)
    }

    fn serve(mut s: StdStream, state: Shared) {
        let codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut me = 0;
        let mut tmp = [0u8; 4096];
        loop {
            let n = match s.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&tmp[..n]);
            // A framing error here would be the loadgen's fault: fail loudly (acks go missing).
            while let Some(f) = codec
                .decode(&mut buf)
                .expect("loadgen sent a malformed frame")
            {
                let mut out = BytesMut::new();
                // One lock per frame: a group's fan-out is atomic, so every member sees the
                // group's posts in one order, and frames written from several threads stay whole.
                let mut g = state.lock().unwrap();
                match Command::decode(&f).unwrap() {
                    Command::Login { uid, .. } => {
                        if g.faults.refuse_first_login && g.logins.insert(uid.0) {
                            Command::Error {
                                code: ErrorCode::Unavailable,
                                message: "try again".into(),
                            }
                            .encode(f.req_id, &mut out);
                            let _ = s.write_all(&out);
                            return;
                        }
                        me = uid.0;
                        g.conns.insert(me, s.try_clone().unwrap());
                        let max_seq = g.seqs.get(&me).copied().unwrap_or(0);
                        Command::LoginResult {
                            code: ErrorCode::Ok,
                            server_time_ms: 0,
                            max_seq: Seq(max_seq),
                            heartbeat_secs: 30,
                            message: String::new(),
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::SendC2c {
                        client_msg_id,
                        to,
                        body,
                    } => {
                        if g.faults.refuse_first_send && g.senders.insert(me) {
                            Command::Error {
                                code: ErrorCode::Unavailable,
                                message: "later".into(),
                            }
                            .encode(f.req_id, &mut out);
                            let _ = s.write_all(&out);
                            continue;
                        }
                        if g.dedup.insert((me, client_msg_id)) {
                            g.append(to.0, msg(1, me, to.0, client_msg_id, body));
                            g.sends += 1;
                            if g.faults.cut_after_store.is_some_and(|n| g.sends % n == 0) {
                                // Stored and delivered; the ack dies with the connection.
                                g.conns.remove(&me);
                                let _ = s.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                        Command::SendAck {
                            code: ErrorCode::Ok,
                            client_msg_id,
                            msg_id: MsgId(1),
                            seq: Seq(0),
                            server_time_ms: 0,
                            prev_seq: Seq(0),
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::GroupCreate { members, .. } => {
                        let id = 7_000_000 + g.groups.len() as u64;
                        let mut all = vec![me];
                        all.extend(members.iter().map(|u| u.0).filter(|u| *u != me));
                        let ev = GroupEvent {
                            kind: GroupEventKind::Created,
                            users: all.iter().map(|u| UserId(*u)).collect(),
                        }
                        .to_bytes();
                        for u in &all {
                            g.append(*u, msg(CONV_GROUP_EVENT, me, id, 0, ev.clone()));
                        }
                        g.groups.insert(id, (all, 0));
                        Command::OpResult {
                            code: ErrorCode::Ok,
                            id,
                            message: String::new(),
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::SendC2g {
                        client_msg_id,
                        group: GroupId(id),
                        body,
                        mentions,
                    } if g.large.contains_key(&id) => {
                        let m = msg(CONV_C2G, me, id, client_msg_id, body.clone());
                        if g.faults.large_sender_swap == Some(me) && !g.sender_swapped {
                            match g.held_post.take() {
                                None => {
                                    g.held_post = Some((f.req_id, client_msg_id, m));
                                    continue;
                                }
                                Some((req, held_id, held)) => {
                                    // The second post first, then the held one: both acked.
                                    g.sender_swapped = true;
                                    for (req, cmid, m) in
                                        [(f.req_id, client_msg_id, m), (req, held_id, held)]
                                    {
                                        let (seq, prev_seq) = g.large_append(id, m);
                                        Command::SendAck {
                                            code: ErrorCode::Ok,
                                            client_msg_id: cmid,
                                            msg_id: MsgId(1),
                                            seq,
                                            server_time_ms: 0,
                                            prev_seq,
                                        }
                                        .encode(req, &mut out);
                                    }
                                    let _ = s.write_all(&out);
                                    continue;
                                }
                            }
                        }
                        if let Some(u) = g.faults.large_own_copy {
                            if g.large[&id].posts == 0 {
                                g.append(u, m.clone());
                            }
                        }
                        let (seq, prev_seq) = g.large_append(id, m);
                        // `@all`: every member but the poster gets a mention entry (msg_id 99,
                        // the post's) in its own timeline.
                        let all = mentions.contains(&UserId(0));
                        if all {
                            let mut e = msg(CONV_MENTION, me, id, client_msg_id, body);
                            e.msg_id = MsgId(99);
                            let f = g.faults;
                            for u in g.large[&id].members.clone() {
                                if u == me || f.mention_drop == Some(u) {
                                    continue;
                                }
                                g.append(u, e.clone());
                                if f.mention_dup == Some(u) {
                                    g.append(u, e.clone());
                                }
                            }
                        }
                        Command::SendAck {
                            code: ErrorCode::Ok,
                            client_msg_id,
                            msg_id: MsgId(if all { 99 } else { 1 }),
                            seq,
                            server_time_ms: 0,
                            prev_seq,
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::GroupAdd {
                        group: GroupId(id),
                        members,
                    } => {
                        if g.faults.refuse_first_add && !g.add_refused {
                            g.add_refused = true;
                            Command::Error {
                                code: ErrorCode::Overloaded,
                                message: "slow down".into(),
                            }
                            .encode(f.req_id, &mut out);
                            let _ = s.write_all(&out);
                            continue;
                        }
                        if let Some((old, _)) = g.groups.remove(&id) {
                            // Past the threshold (here: at the first add): the members so far
                            // get the marker, and the group's timeline starts with it.
                            for u in &old {
                                let ev = event(GroupEventKind::BecameLarge, &[]);
                                g.append(*u, msg(CONV_GROUP_EVENT, me, id, 0, ev));
                            }
                            g.large.insert(
                                id,
                                LargeFake {
                                    members: old,
                                    ..Default::default()
                                },
                            );
                            let ev = event(GroupEventKind::BecameLarge, &[]);
                            g.large_append(id, msg(CONV_GROUP_EVENT, me, id, 0, ev));
                        }
                        let l = g.large.get_mut(&id).expect("large group");
                        let new: Vec<u64> = members
                            .iter()
                            .map(|u| u.0)
                            .filter(|u| !l.members.contains(u))
                            .collect();
                        l.members.extend(&new);
                        for u in &new {
                            let ev = event(GroupEventKind::MembersAdded, &new);
                            g.append(*u, msg(CONV_GROUP_EVENT, me, id, 0, ev));
                            let ev = event(GroupEventKind::BecameLarge, &[]);
                            g.append(*u, msg(CONV_GROUP_EVENT, me, id, 0, ev));
                        }
                        let ev = event(GroupEventKind::MembersAdded, &new);
                        g.large_append(id, msg(CONV_GROUP_EVENT, me, id, 0, ev));
                        Command::OpResult {
                            code: ErrorCode::Ok,
                            id,
                            message: String::new(),
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::GroupSync {
                        group,
                        after_seq,
                        limit,
                    } => {
                        let l = &g.large[&group.0];
                        let head = l.timeline.len() as u64;
                        let messages: Vec<Message> = l
                            .timeline
                            .iter()
                            .filter(|m| m.seq > after_seq && !g.hidden.contains(&(me, m.seq.0)))
                            .take(limit.max(1) as usize)
                            .cloned()
                            .collect();
                        Command::GroupSyncPage {
                            group,
                            head: Seq(head),
                            has_more: messages.last().is_some_and(|m| m.seq.0 < head),
                            messages,
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::SendC2g {
                        client_msg_id,
                        group: GroupId(id),
                        body,
                        ..
                    } => {
                        let Some((members, n)) = g.groups.get_mut(&id) else {
                            panic!("post to unknown group {id}");
                        };
                        let (members, n) = (members.clone(), *n);
                        g.groups.get_mut(&id).unwrap().1 += 1;
                        let m = msg(CONV_C2G, me, id, client_msg_id, body);
                        let faults = g.faults;
                        for u in members {
                            if faults.drop == Some((u, n)) {
                                continue;
                            }
                            if faults.swap == Some(u) && n == 0 {
                                g.held = Some(m.clone());
                                continue;
                            }
                            g.append(u, m.clone());
                            if faults.swap == Some(u) && n == 1 {
                                let h = g.held.take().expect("held copy");
                                g.append(u, h);
                            }
                        }
                        Command::SendAck {
                            code: ErrorCode::Ok,
                            client_msg_id,
                            msg_id: MsgId(1),
                            seq: Seq(0),
                            server_time_ms: 0,
                            prev_seq: Seq(0),
                        }
                        .encode(f.req_id, &mut out);
                    }
                    Command::Heartbeat => {
                        Command::HeartbeatAck { server_time_ms: 0 }.encode(f.req_id, &mut out)
                    }
                    Command::DeliverAck { seq } => {
                        g.deliver_acks += 1;
                        let a = g.acked_seq.entry(me).or_insert(0);
                        *a = (*a).max(seq.0);
                    }
                    Command::SyncRequest { after_seq, limit } => {
                        let all = g.timelines.get(&me).cloned().unwrap_or_default();
                        let rest: Vec<Message> =
                            all.into_iter().filter(|m| m.seq > after_seq).collect();
                        let page: Vec<Message> =
                            rest.iter().take(limit as usize).cloned().collect();
                        Command::SyncPage {
                            max_seq: Seq(g.seqs.get(&me).copied().unwrap_or(0)),
                            has_more: rest.len() > page.len(),
                            messages: page,
                        }
                        .encode(f.req_id, &mut out);
                    }
                    _ => {}
                }
                if g.faults.dribble {
                    let _ = s.set_nodelay(true);
                    for piece in out.chunks(7) {
                        let _ = s.write_all(piece);
                    }
                } else if !out.is_empty() {
                    let _ = s.write_all(&out);
                }
            }
        }
    }

    /// An idle connection is its slab record: keep it compact (issue 15, loadgen ≤ 1 KiB per
    /// connection in all, with the process's fixed part).
    #[test]
    fn the_connection_record_stays_compact() {
        assert_eq!(std::mem::size_of::<Stamp>(), 4);
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 200, "Conn is {size} bytes");
    }

    #[test]
    fn stamps_keep_instants_to_10_us() {
        let s = Stamp::new();
        assert_eq!(s.get(), None);
        let t = Instant::now();
        s.set(Some(t));
        let back = s.get().expect("set");
        let diff = if back > t { back - t } else { t - back };
        assert!(diff <= Duration::from_micros(10), "{diff:?}");
        assert_eq!(s.take(), Some(back));
        assert_eq!(s.get(), None);
    }

    fn plan(server: SocketAddr, n: u32, groups: u32, group_size: u32) -> Arc<Plan> {
        Arc::new(Plan {
            worker: 0,
            first: 0,
            count: n,
            total: n,
            cores: 1,
            pin: false,
            io_memory_kib: 256,
            server: vec![server],
            token_secret: "s".into(),
            uid_base: 1000,
            src_ips: vec![std::net::Ipv4Addr::new(127, 0, 0, 2)],
            heartbeat_secs: 30,
            login_timeout_ms: 10_000,
            ack_timeout_ms: 5_000,
            body_size: 24,
            track: true,
            seed: 7 << 32 | 1,
            groups,
            group_size,
            gate_ids: Vec::new(),
            // Short waits: the tests reconnect within a few hundred ms.
            backoff: crate::msg::Backoff {
                initial_ms: 20,
                max_ms: 200,
                multiplier: 2.0,
                jitter: 0.5,
            },
            login_retry_ms: 10_000,
            resend_ms: 0,
            no_deliver_ack: false,
        })
    }

    /// One executor on its own thread, driven like the worker drives it.
    struct Harness {
        rtx: std::sync::mpsc::Sender<Request>,
        erx: Receiver<(usize, ExecMsg)>,
        live: Arc<Live>,
        h: glommio::ExecutorJoinHandle<()>,
    }

    impl Harness {
        fn start(plan: Arc<Plan>) -> Harness {
            let n = plan.count;
            let (rtx, rrx) = std::sync::mpsc::channel();
            let (etx, erx) = std::sync::mpsc::channel();
            let live = Arc::new(Live::default());
            let l2 = live.clone();
            let h = glommio::LocalExecutorBuilder::default()
                .io_memory(256 * 1024)
                .spawn(move || run(plan, 0, 0..n, 1.0, l2, rrx, etx))
                .unwrap();
            Harness { rtx, erx, live, h }
        }

        fn ask(&self, id: u64, op: Op) -> Option<Box<Report>> {
            self.rtx.send(Request { id, op }).unwrap();
            loop {
                match self
                    .erx
                    .recv_timeout(Duration::from_secs(30))
                    .expect("answer")
                {
                    (_, ExecMsg::Done { id: got, report }) if got == id => return report,
                    _ => {}
                }
            }
        }

        fn quit(self) {
            self.ask(u64::MAX, Op::Quit);
            self.h.join().unwrap();
        }
    }

    fn drain() -> Op {
        Op::Drain {
            quiet_ms: 200,
            max_secs: 10.0,
        }
    }

    /// Logs in all `n` users, sends c2c for 1 s at `rate`, drains; the final report.
    fn c2c_run(hx: &Harness, n: u32, rate: f64) -> Report {
        let login = hx.ask(1, Op::Login { rate: 0.0 }).unwrap();
        assert_eq!(login.logged_in, n as u64, "{:?}", login.login_failures);
        hx.ask(2, Op::Send { rate, secs: 1.0 });
        hx.ask(3, drain());
        *hx.ask(4, Op::Report).unwrap()
    }

    #[test]
    fn executor_logs_in_sends_and_counts_exactly() {
        let n = 50;
        let hx = Harness::start(plan(fake_server(), n, 0, 0));
        let r = c2c_run(&hx, n, 5000.0);
        assert!(r.sent >= 4500, "sent {}", r.sent);
        assert_eq!(r.acked, r.sent);
        assert_eq!(r.delivered, r.sent);
        assert_eq!(
            (r.raw_dups, r.dedup_dups, r.out_of_order, r.gaps),
            (0, 0, 0, 0)
        );
        let j = join(&r);
        assert_eq!((j.lost, j.phantom), (0, 0));
        assert_eq!(r.deliver_us.len(), r.sent);
        assert_eq!(hx.live.logged_in.load(Relaxed), n as u64);
        hx.quit();
    }

    /// Frames that arrive in pieces (split anywhere, over several reads) are put together: the
    /// partial frame is kept per connection between reads, and nothing is lost or doubled.
    #[test]
    fn frames_split_over_many_reads_are_reassembled() {
        let n = 20;
        let hx = Harness::start(plan(
            fake_server_with(Faults {
                dribble: true,
                ..Default::default()
            }),
            n,
            0,
            0,
        ));
        let r = c2c_run(&hx, n, 500.0);
        assert!(r.sent >= 400, "sent {}", r.sent);
        assert_eq!((r.acked, r.delivered), (r.sent, r.sent));
        assert_eq!((r.raw_dups, r.dedup_dups, r.out_of_order), (0, 0, 0));
        assert_eq!(join(&r).lost, 0);
        hx.quit();
    }

    /// Deliveries are acknowledged (a `DeliverAck` per connection at most every 100 ms), and
    /// not at all with `--no-deliver-ack`, which changes nothing else of the run.
    #[test]
    fn deliveries_are_acked_unless_no_deliver_ack() {
        let n = 20;
        for off in [false, true] {
            let (addr, state) = fake_server_state(Faults::default());
            let mut p = (*plan(addr, n, 0, 0)).clone();
            p.no_deliver_ack = off;
            let hx = Harness::start(Arc::new(p));
            let r = c2c_run(&hx, n, 1000.0);
            assert_eq!((r.acked, r.delivered), (r.sent, r.sent));
            assert_eq!(join(&r).lost, 0);
            // The drain waited 200 ms after the last delivery: every ack due was sent.
            let acks = state.lock().unwrap().deliver_acks;
            if off {
                assert_eq!(acks, 0, "acked with --no-deliver-ack");
            } else {
                assert!(acks >= n as u64 / 2, "only {acks} DeliverAcks");
            }
            hx.quit();
        }
    }

    /// A server that dies after storing a message but before acking it: the sender logs in
    /// again (after its backoff), syncs, and sends the unacknowledged message again with the
    /// same `client_msg_id`; the server's dedup keeps one copy. Nothing is lost, nothing is
    /// duplicated, and every user is back at the end.
    #[test]
    fn a_lost_connection_is_reconnected_synced_and_its_unacked_sends_repeated() {
        let n = 40;
        let faults = Faults {
            cut_after_store: Some(97),
            ..Default::default()
        };
        let hx = Harness::start(plan(fake_server_with(faults), n, 0, 0));
        let r = c2c_run(&hx, n, 2000.0);
        let j = join(&r);
        assert!(
            r.disconnects.get("closed").copied().unwrap_or(0) >= 10,
            "{:?}",
            r.disconnects
        );
        assert!(r.resent >= 10, "resent {}", r.resent);
        assert!(r.reconnected >= 10, "reconnected {}", r.reconnected);
        // Each reconnect with its time, within the run, as long as the histogram says.
        assert_eq!(r.reconnect_times.len() as u64, r.reconnected);
        let now_ms = now_ns() / 1_000_000;
        for &(lost_at, took) in &r.reconnect_times {
            assert!(
                lost_at <= now_ms && lost_at + 120_000 > now_ms,
                "{lost_at} vs {now_ms}"
            );
            assert!(
                f64::from(took) <= r.reconnect_us.max_ms() + 1.0,
                "{took} ms"
            );
        }
        assert_eq!((r.not_back, r.ack_timeouts), (0, 0));
        assert_eq!(r.acked, r.sent, "{:?}", r.send_errors);
        assert_eq!((j.lost, j.phantom, j.undelivered_offline), (0, 0, 0));
        assert_eq!((r.dedup_dups, r.out_of_order), (0, 0));
        assert_eq!(j.received, r.sent);
        hx.quit();
    }

    /// A refused login (`Unavailable`) and a gate that is down are retried: every user ends up
    /// logged in through the gate that works, none gave up.
    #[test]
    fn refused_logins_and_a_dead_gate_are_retried_on_the_next_gate() {
        let n = 30;
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap() // closed when `l` drops: connects are refused
        };
        let live = fake_server_with(Faults {
            refuse_first_login: true,
            ..Default::default()
        });
        let mut p = (*plan(live, n, 0, 0)).clone();
        p.server = vec![dead, live];
        let hx = Harness::start(Arc::new(p));
        let login = hx.ask(1, Op::Login { rate: 0.0 }).unwrap();
        assert_eq!(login.logged_in, n as u64, "{:?}", login.login_failures);
        assert_eq!(login.gave_up, 0);
        assert_eq!(
            login.login_failures.get("Unavailable").copied(),
            Some(n as u64),
            "{:?}",
            login.login_failures
        );
        // Half of the users start at the dead gate; after the refusal every user walks on to
        // the dead gate once more (the next in its order) before it is back at the live one.
        let refused: u64 = login
            .login_failures
            .iter()
            .filter(|(k, _)| k.contains("ECONNREFUSED"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            refused,
            n as u64 / 2 + n as u64,
            "{:?}",
            login.login_failures
        );
        assert_eq!(login.retries, n as u64 + refused);
        hx.quit();
    }

    /// A send refused with a retryable code is sent again after a pause with the same
    /// `client_msg_id` (PROTOCOL.md section 10), and then acknowledged: nothing is counted
    /// unacknowledged, the refusals are reported.
    #[test]
    fn a_send_refused_retryably_is_sent_again_and_acked() {
        let n = 20;
        let faults = Faults {
            refuse_first_send: true,
            ..Default::default()
        };
        let mut p = (*plan(fake_server_with(faults), n, 0, 0)).clone();
        p.resend_ms = 1500;
        let hx = Harness::start(Arc::new(p));
        let r = c2c_run(&hx, n, 200.0);
        let j = join(&r);
        assert_eq!(r.send_errors.get("Unavailable").copied(), Some(n as u64));
        assert_eq!(r.resent, n as u64);
        assert_eq!((r.acked, r.ack_timeouts), (r.sent, 0));
        assert_eq!((j.lost, j.phantom, j.delivered_unacked), (0, 0, 0));
        assert!(r.unacked_ids.0.is_empty());
        // Each user's first message was accepted at its repetition, after later ones: the
        // client reordered it, which is told apart from a server that reorders.
        assert_eq!((r.out_of_order, r.dedup_dups), (0, 0));
        assert!(r.reordered_by_resend > 0);
        hx.quit();
    }

    /// Logs in, creates the groups, posts for 1 s at `rate`, drains; the final report.
    fn group_run(hx: &Harness, groups: u32, rate: f64) -> (Report, Report) {
        let login = hx.ask(1, Op::Login { rate: 0.0 }).unwrap();
        assert_eq!(login.logged_in, hx.live.logged_in.load(Relaxed));
        let created = hx.ask(2, Op::CreateGroups).unwrap();
        assert!(
            created.group_create_errors.is_empty(),
            "{:?}",
            created.group_create_errors
        );
        assert_eq!(created.group_ids.len(), groups as usize);
        let mut ids = vec![0; groups as usize];
        for (g, id) in &created.group_ids {
            ids[*g as usize] = *id;
        }
        hx.ask(3, Op::SetGroups { ids });
        hx.ask(4, Op::SendGroup { rate, secs: 1.0 });
        hx.ask(5, drain());
        let r = *hx.ask(6, Op::Report).unwrap();
        (*created, r)
    }

    #[test]
    fn executor_creates_groups_posts_and_counts_every_member_copy() {
        // 5 groups of 8 among 30 users: the layout wraps (group 3 = users 24..30 and 0..2,
        // group 4 = users 2..10), so users 0..10 are in two groups.
        let (n, groups, size) = (30, 5, 8);
        let hx = Harness::start(plan(fake_server(), n, groups, size));
        let (created, r) = group_run(&hx, groups, 400.0);
        assert!(r.sent >= 350, "sent {}", r.sent);
        assert_eq!(r.acked, r.sent);
        // Every post reaches all 8 members, the poster included; events are not messages.
        assert_eq!(r.delivered, r.sent * size as u64);
        assert_eq!(r.echoes, 0);
        assert_eq!(
            created.group_events + r.group_events,
            (groups * size) as u64
        );
        assert_eq!(
            (r.raw_dups, r.dedup_dups, r.out_of_order, r.gaps),
            (0, 0, 0, 0)
        );
        assert_eq!(r.deliver_us.len(), r.delivered);
        let j = join_group(&r, size, n);
        assert_eq!(j.posts_acked, r.sent);
        assert_eq!(j.expected, r.delivered);
        assert_eq!(j.received, j.expected);
        assert_eq!(j.own_copies, r.sent);
        assert_eq!(
            (j.lost, j.phantom, j.non_member, j.delivered_unacked),
            (0, 0, 0, 0)
        );
        assert_eq!(j.order_mismatch_members, 0);
        assert_eq!(j.order_checked, (groups * size) as u64);
        hx.quit();
    }

    #[test]
    fn group_accounting_catches_a_lost_copy_and_a_member_out_of_order() {
        // 4 groups of 6 among 24 users: every user in exactly one group. User 9 (group 1) misses
        // the group's third post; user 15 (group 2) gets the group's first two posts swapped.
        let (n, groups, size) = (24, 4, 6);
        let faults = Faults {
            drop: Some((1000 + 9, 2)),
            swap: Some(1000 + 15),
            ..Default::default()
        };
        let hx = Harness::start(plan(fake_server_with(faults), n, groups, size));
        let (_, r) = group_run(&hx, groups, 300.0);
        assert!(r.sent >= 250, "sent {}", r.sent);
        assert_eq!(r.acked, r.sent);
        assert_eq!(r.delivered, r.sent * size as u64 - 1);
        // Seen from the swapped member alone, the two posts may come from different senders:
        // the per-sender check cannot see it; only the comparison across members can.
        let j = join_group(&r, size, n);
        assert_eq!(j.lost, 1);
        assert_eq!(j.posts_with_loss, 1);
        assert_eq!(j.lost_examples.len(), 1);
        assert_eq!(j.lost_examples[0][1], 9, "{:?}", j.lost_examples);
        assert_eq!(j.order_mismatch_members, 1);
        assert_eq!(j.order_mismatch_entries, 1);
        assert_eq!(j.order_examples, vec![[2, 15]]);
        assert_eq!((j.phantom, j.non_member), (0, 0));
        hx.quit();
    }

    /// `large-group`: logs in, builds the group (created with `initial` members, the rest of
    /// `members` added in batches of `batch`, two adds in flight), starts tracking it, posts
    /// for 1 s at `rate`, drains; the build's, the readiness's and the final report.
    fn large_run(
        hx: &Harness,
        members: u32,
        initial: u32,
        batch: u32,
        rate: f64,
    ) -> (Report, Report, Report) {
        let login = hx.ask(1, Op::Login { rate: 0.0 }).unwrap();
        assert_eq!(login.logged_in, hx.live.logged_in.load(Relaxed));
        let built = *hx
            .ask(
                2,
                Op::BuildLarge {
                    members,
                    initial,
                    batch,
                    window: 2,
                },
            )
            .unwrap();
        assert_eq!(built.group_ids.len(), 1, "{:?}", built.group_create_errors);
        assert_eq!(built.head_error, None);
        let id = built.group_ids[0].1;
        hx.ask(3, Op::SetGroups { ids: vec![id] });
        let ready = *hx
            .ask(
                4,
                Op::LargeReady {
                    group: id,
                    head: built.large_head,
                    max_secs: 10.0,
                },
            )
            .unwrap();
        hx.ask(5, Op::SendGroup { rate, secs: 1.0 });
        hx.ask(6, drain());
        let r = *hx.ask(7, Op::Report).unwrap();
        (built, ready, r)
    }

    #[test]
    fn executor_builds_a_large_group_and_counts_every_copy_once_in_seq_order() {
        // 20 connected users of a 50-member group: created with 10, 40 added in 6 batches of
        // at most 7; the first add is refused once (retryable) and sent again.
        let n = 20;
        let faults = Faults {
            refuse_first_add: true,
            ..Default::default()
        };
        let hx = Harness::start(plan(fake_server_with(faults), n, 1, n));
        let (built, ready, r) = large_run(&hx, 50, 10, 7, 300.0);
        assert_eq!((built.adds_ok, built.members_added), (6, 40));
        assert_eq!(built.adds_failed, 0);
        assert_eq!(
            built.add_errors.get("Overloaded: slow down").copied(),
            Some(1),
            "{:?}",
            built.add_errors
        );
        assert_eq!(built.add_us.len(), 6);
        // BecameLarge, then one MembersAdded per add.
        assert_eq!(built.large_head, 7);
        assert!(built.build_pushes > 0);
        assert_eq!((ready.large_ready, ready.large_not_ready), (n as u64, 0));
        assert!(r.sent >= 250, "sent {}", r.sent);
        assert_eq!(r.acked, r.sent);
        // Every post reaches every connected member once (the poster included), pushed.
        assert_eq!(r.delivered, r.sent * n as u64);
        assert_eq!(r.group_pushes, r.delivered);
        assert_eq!(r.deliver_us.len(), r.delivered);
        assert_eq!(
            (
                r.group_raw_dups,
                r.group_gaps,
                r.group_push_reorders,
                r.group_holes
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(
            (r.dedup_dups, r.out_of_order, r.delivered_by_sync),
            (0, 0, 0)
        );
        let j = join_group(&r, n, n);
        assert_eq!(j.posts_acked, r.sent);
        assert_eq!((j.expected, j.received), (r.delivered, r.delivered));
        assert_eq!(j.own_copies, r.sent);
        assert_eq!((j.lost, j.phantom, j.non_member), (0, 0, 0));
        assert_eq!((j.order_mismatch_members, j.order_checked), (0, n as u64));
        let q = crate::account::check_post_seqs(&r.post_seqs);
        assert_eq!(q.posts, r.sent);
        assert_eq!((q.posts_with_two_seqs, q.seqs_with_two_posts), (0, 0));
        hx.quit();
    }

    /// `@all` (`--mention-all`): after the posts, the owner posts one `@all` and every other
    /// connected member gets one mention entry (a `Deliver` of conv 7) in its own timeline,
    /// acknowledged like any entry and counted apart from the messages. Once clean (the wait
    /// ends as soon as every member holds its entry), once with user 7 never getting its entry
    /// and user 11 getting it twice (two seqs).
    #[test]
    fn an_at_all_reaches_every_member_once_and_missing_and_duplicate_entries_are_counted() {
        let n = 20;
        for faulty in [false, true] {
            let (addr, state) = fake_server_state(Faults {
                mention_drop: faulty.then_some(1000 + 7),
                mention_dup: faulty.then_some(1000 + 11),
                ..Default::default()
            });
            let hx = Harness::start(plan(addr, n, 1, n));
            let (built, _, r) = large_run(&hx, 30, 10, 10, 100.0);
            assert_eq!(r.acked, r.sent);
            assert_eq!((r.mention_us.len(), r.mention_dups), (0, 0));
            let sent = *hx
                .ask(
                    8,
                    Op::MentionAll {
                        group: built.group_ids[0].1,
                    },
                )
                .unwrap();
            assert_eq!((sent.sent, sent.acked, sent.ack_us.len()), (1, 1, 1));
            assert_eq!(sent.mention_msg_id, 99);
            let t0 = Instant::now();
            let got = *hx
                .ask(
                    9,
                    Op::MentionWait {
                        max_secs: 3.0,
                        quiet_ms: 200,
                    },
                )
                .unwrap();
            let waited = t0.elapsed();
            let mut m = sent;
            m.merge(&got);
            assert_eq!(m.mention_msg_ids, vec![99]);
            assert_eq!(m.mention_expected, n as u64 - 1, "all but the owner");
            assert_eq!(m.mention_to_poster, 0);
            if faulty {
                assert_eq!((m.mention_received, m.mention_missing), (n as u64 - 2, 1));
                assert_eq!(m.mention_dups, 1);
                assert!(waited >= Duration::from_secs(3), "{waited:?}");
            } else {
                assert_eq!((m.mention_received, m.mention_missing), (n as u64 - 1, 0));
                assert_eq!(m.mention_dups, 0);
                assert!(waited < Duration::from_secs(2), "{waited:?}");
            }
            assert_eq!(m.mention_us.len(), m.mention_received);
            // Not messages: only the @all post's own copies (GroupDeliver, the poster's
            // included) are deliveries, and nothing is a duplicate or an echo.
            assert_eq!(m.delivered, n as u64);
            assert_eq!((m.dedup_dups, m.echoes, m.raw_dups, m.gaps), (0, 0, 0, 0));
            // Acknowledged like any entry: every user's DeliverAck reaches its timeline's end.
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let g = state.lock().unwrap();
                let behind: Vec<u64> = (1000..1000 + n as u64)
                    .filter(|u| g.acked_seq.get(u) != g.seqs.get(u))
                    .collect();
                if behind.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "not acked to the end: {behind:?}"
                );
                drop(g);
                std::thread::sleep(Duration::from_millis(20));
            }
            hx.quit();
        }
    }

    #[test]
    fn large_group_accounting_catches_a_post_also_in_a_members_own_timeline() {
        let n = 12;
        let faults = Faults {
            large_own_copy: Some(1000 + 4),
            ..Default::default()
        };
        let hx = Harness::start(plan(fake_server_with(faults), n, 1, n));
        let (_, ready, r) = large_run(&hx, 20, 10, 10, 300.0);
        assert_eq!(ready.large_ready, n as u64);
        assert_eq!(r.acked, r.sent);
        assert_eq!(r.dedup_dups, 1, "the copy in user 4's own timeline");
        let j = join_group(&r, n, n);
        assert_eq!(j.lost, 0);
        hx.quit();
    }

    #[test]
    fn large_group_accounting_catches_a_sender_stored_out_of_order() {
        // User 7's first two posts are stored in the opposite order, for every member alike:
        // each member's chain is intact and all members agree, so only the sender order can
        // tell. Large-group copies skip the per-copy order map: the check runs once per post.
        let n = 12;
        let faults = Faults {
            large_sender_swap: Some(1000 + 7),
            ..Default::default()
        };
        let hx = Harness::start(plan(fake_server_with(faults), n, 1, n));
        let (_, ready, r) = large_run(&hx, 20, 10, 10, 300.0);
        assert_eq!(ready.large_ready, n as u64);
        assert_eq!(r.acked, r.sent);
        assert_eq!(r.delivered, r.sent * n as u64);
        assert_eq!(
            r.out_of_order, 1,
            "one post, counted once, not once per member"
        );
        let j = join_group(&r, n, n);
        assert_eq!((j.lost, j.order_mismatch_members), (0, 0));
        let q = crate::account::check_post_seqs(&r.post_seqs);
        assert_eq!((q.posts_with_two_seqs, q.seqs_with_two_posts), (0, 0));
        assert_eq!((r.dedup_dups, r.group_raw_dups), (0, 0));
        hx.quit();
    }

    #[test]
    fn large_group_accounting_catches_a_lost_copy_and_out_of_order_copies() {
        // 24 connected users of a 40-member group. User 9 never gets the group's third post
        // (not even by GroupSync); user 15 gets the first two posts pushed in the wrong order
        // (its GroupSync repairs it); user 5 gets them in the wrong order with each other's
        // seqs (its chain looks right: only the comparison with the others can tell).
        let n = 24;
        let faults = Faults {
            large_drop: Some((1000 + 9, 2)),
            large_reorder: Some(1000 + 15),
            large_seq_swap: Some(1000 + 5),
            ..Default::default()
        };
        let hx = Harness::start(plan(fake_server_with(faults), n, 1, n));
        let (built, ready, r) = large_run(&hx, 40, 10, 10, 300.0);
        assert_eq!((built.adds_ok, built.members_added), (3, 30));
        assert_eq!(ready.large_ready, n as u64);
        assert!(r.sent >= 250, "sent {}", r.sent);
        assert_eq!(r.acked, r.sent);
        assert_eq!(r.delivered, r.sent * n as u64 - 1);
        // The lost copy: found by the accounting, and by user 9's GroupSync as a hole.
        let j = join_group(&r, n, n);
        assert_eq!((j.lost, j.posts_with_loss), (1, 1));
        assert_eq!(j.lost_examples.len(), 1);
        assert_eq!(j.lost_examples[0][1], 9, "{:?}", j.lost_examples);
        assert_eq!(r.group_holes, 1);
        // The reordered push: seen, and repaired through GroupSync (no order disagreement).
        assert_eq!(r.group_push_reorders, 1);
        assert_eq!(r.group_gaps, 2, "user 15's and user 9's");
        assert!(r.delivered_by_sync >= 2, "{}", r.delivered_by_sync);
        // The swapped seqs: user 5's order differs from the others', and two posts have two
        // seqs each (at user 5 and everywhere else), so two seqs name two posts.
        assert_eq!(j.order_mismatch_members, 1);
        assert_eq!(j.order_examples, vec![[0, 5]]);
        let q = crate::account::check_post_seqs(&r.post_seqs);
        assert_eq!((q.posts_with_two_seqs, q.seqs_with_two_posts), (2, 2));
        assert_eq!((j.phantom, j.non_member, r.dedup_dups), (0, 0, 0));
        hx.quit();
    }
}
