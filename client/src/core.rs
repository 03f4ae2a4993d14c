//! The sans-io client core: every rule a protocol-v1 client follows (docs/PROTOCOL.md §9–10,
//! docs/API.md "iplist"), with no socket, no thread and no clock (docs/CLIENT.md).
//!
//! [`Core`] is driven by what happens around it: [`Core::connected`], [`Core::disconnected`],
//! [`Core::handle_bytes`] (bytes read from the transport), [`Core::handle_timeout`] (the clock),
//! and the application's calls ([`Core::send_c2c`], [`Core::send_c2g`], [`Core::request`],
//! [`Core::sync`], [`Core::deliver_ack`], [`Core::logout`]). It answers through
//! [`Core::poll_io`] (open a connection to a gate, close it), [`Core::poll_transmit`] (bytes to
//! write), [`Core::poll_timeout`] (when to call `handle_timeout` next) and [`Core::poll_event`]
//! (what the application sees). Time is a caller-chosen monotonic clock in milliseconds; the
//! jitter of the reconnect backoff comes from a generator seeded by [`Config::seed`], so a test
//! replays a session exactly.
//!
//! The rules it owns:
//! - **login** on every connection with the last seq held; a refused token stops the session;
//! - **heartbeat** every `heartbeat_secs` of the `LoginResult`; a heartbeat that gets no frame
//!   back within the same interval declares the connection dead;
//! - **reconnect** after any loss but a kickout (reasons 1 and 3) or a logout, walking the gates
//!   in the user's rendezvous order, waiting [`Backoff::wait_ms`] before attempt *n*, the attempt
//!   count reset by a connection that stayed logged in for [`STABLE_MS`];
//! - **timeline**: dedup by seq, a gap (`prev_seq` above the last seq) starts exactly one sync,
//!   [`Event::Message`] reports every timeline entry once and in seq order (the sender's own c2c
//!   messages included, placed from their `SendAck`);
//! - **delivery acks**: one `DeliverAck` of the last contiguous seq per burst
//!   ([`Config::deliver_ack_delay_ms`]), as a phone coalesces them;
//! - **sends**: kept until acknowledged, sent again with the **same** `client_msg_id` after a
//!   reconnect, after [`Config::ack_timeout_ms`] without an answer and after a retryable refusal.
//!
//! The small rule pieces ([`classify`], [`Attempts`], [`Backoff`], [`resend_due`],
//! [`gate_order`]) are public on their own for clients that keep their state elsewhere (the
//! loadgen keeps 200 bytes per connection).

use std::collections::{HashSet, VecDeque};

use bytes::{Bytes, BytesMut};

use im_shared::codes::{ErrorCode, KickReason};
use im_shared::frame::FrameCodec;
use im_shared::ids::{DeviceType, GroupId, MsgId, Seq, UserId};
use im_shared::proto::{Command, GroupHead, Message, PresenceEntry, CONV_C2C};

/// A connection that stayed logged in this long resets the reconnect attempt count.
pub const STABLE_MS: u64 = 10_000;

/// Reconnect backoff, as the iplist hands it out (docs/API.md): the wait before attempt `n`
/// (0-based) is `min(max_ms, initial_ms * multiplier^n)` times a random factor in
/// `[1 - jitter, 1 + jitter]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
}

impl Backoff {
    /// The wait before attempt `attempt`, with `unit` uniform in `[0, 1)`
    /// ([`im_shared::iplist::reconnect_wait_ms`]).
    pub fn wait_ms(&self, attempt: u32, unit: f64) -> u64 {
        im_shared::iplist::reconnect_wait_ms(
            self.initial_ms,
            self.max_ms,
            self.multiplier,
            self.jitter,
            attempt,
            unit,
        )
    }
}

impl Default for Backoff {
    /// The iplist's default: 500 ms, doubling up to 30 s, ±50 %.
    fn default() -> Self {
        Backoff {
            initial_ms: 500,
            max_ms: 30_000,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

/// The reconnect attempt counter (the backoff's exponent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    /// The attempt number the next failure waits for.
    pub next: u32,
}

impl Attempts {
    /// A connection attempt ended after having been logged in for `up_for_ms` (0: it never
    /// logged in): the attempt number to wait for before the next one. A connection that stayed
    /// up for [`STABLE_MS`] starts the backoff over.
    pub fn on_end(&mut self, up_for_ms: u64) -> u32 {
        if up_for_ms >= STABLE_MS {
            self.next = 0;
        }
        let n = self.next;
        self.next = self.next.saturating_add(1);
        n
    }
}

/// What the timeline rule says about an entry (docs/PROTOCOL.md §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Next in order: it follows the last held seq.
    Accepted,
    /// Already held (seq not above the last one): dropped.
    Duplicate,
    /// Its `prev_seq` is above the last held seq: entries are missing, sync first.
    Gap,
}

/// The timeline rule: an entry `seq`/`prev_seq` offered to a device that holds everything up to
/// `last_seq`.
pub fn classify(last_seq: Seq, seq: Seq, prev_seq: Seq) -> Offer {
    if seq <= last_seq {
        Offer::Duplicate
    } else if prev_seq > last_seq {
        Offer::Gap
    } else {
        Offer::Accepted
    }
}

/// Whether a send written at `sent_ms` and still unanswered is due again at `now_ms` (with the
/// same `client_msg_id`); `ack_timeout_ms` 0: never on the same connection.
pub fn resend_due(sent_ms: u64, now_ms: u64, ack_timeout_ms: u64) -> bool {
    ack_timeout_ms > 0 && now_ms.saturating_sub(sent_ms) >= ack_timeout_ms
}

/// A gate a client may connect to: its id (the rendezvous key) and address (`host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gate {
    pub id: u16,
    pub addr: String,
}

/// Sorts `gates` in `uid`'s order: decreasing rendezvous weight, ties by gate id (docs/API.md).
pub fn gate_order(uid: UserId, gates: &mut [Gate]) {
    gates.sort_by(|a, b| {
        let (wa, wb) = (
            im_shared::iplist::rendezvous_weight(uid, a.id),
            im_shared::iplist::rendezvous_weight(uid, b.id),
        );
        wb.cmp(&wa).then(a.id.cmp(&b.id))
    });
}

/// What a session is: who logs in where, and its timers.
#[derive(Clone, Debug)]
pub struct Config {
    pub uid: UserId,
    pub token: String,
    pub device_type: DeviceType,
    /// Stable id of this installation, 1–64 bytes.
    pub device_id: String,
    /// Highest seq this device holds with no gap before it (0: a fresh install).
    pub last_seq: Seq,
    /// The gates (any order: the core sorts them by [`gate_order`]). At least one.
    pub gates: Vec<Gate>,
    pub backoff: Backoff,
    /// A send with no answer this long after it was written goes again, same id (0: only after
    /// a reconnect).
    pub ack_timeout_ms: u64,
    /// A login with no answer this long: the connection is given up.
    pub login_timeout_ms: u64,
    /// New entries are acknowledged this long after the first of a burst (0: at once).
    pub deliver_ack_delay_ms: u64,
    /// Messages asked per sync page.
    pub sync_limit: u16,
    /// Seeds the jitter and the generated `client_msg_id`s (use something per device and run).
    pub seed: u64,
}

impl Config {
    /// A configuration with the defaults: the iplist's backoff, a 10 s ack and login timeout,
    /// acks coalesced over 100 ms, sync pages of 200.
    pub fn new(
        uid: UserId,
        token: impl Into<String>,
        device_type: DeviceType,
        device_id: impl Into<String>,
        gates: Vec<Gate>,
    ) -> Config {
        Config {
            uid,
            token: token.into(),
            device_type,
            device_id: device_id.into(),
            last_seq: Seq(0),
            gates,
            backoff: Backoff::default(),
            ack_timeout_ms: 10_000,
            login_timeout_ms: 10_000,
            deliver_ack_delay_ms: 100,
            sync_limit: 200,
            seed: 0x1234_5678,
        }
    }
}

/// What the core asks of the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Io {
    /// Open a connection to this gate, then call [`Core::connected`] (or
    /// [`Core::disconnected`] if it fails). A connection still open is closed first.
    Connect(Gate),
    /// Close the current connection (no [`Core::disconnected`] call needed).
    Close,
}

/// A send the application made, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    Group(GroupId, Vec<UserId>),
}

/// What the application sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Connecting to `gate` (attempt counts failures in a row, 0 for the first).
    Connecting {
        gate: Gate,
        attempt: u32,
    },
    LoggedIn {
        max_seq: Seq,
        heartbeat_secs: u16,
        server_time_ms: u64,
    },
    /// The login was refused; `will_retry` false: the session stopped (bad or expired token).
    LoginFailed {
        code: ErrorCode,
        message: String,
        will_retry: bool,
    },
    /// A timeline entry, exactly once and in seq order.
    Message(Message),
    /// A sync (after a login or a gap) caught up to `last_seq`.
    Synced {
        last_seq: Seq,
    },
    /// A send was accepted (durable).
    SendAcked {
        client_msg_id: u64,
        msg_id: MsgId,
        seq: Seq,
        server_time_ms: u64,
    },
    /// A send was refused for good (not retryable).
    SendFailed {
        client_msg_id: u64,
        code: ErrorCode,
    },
    /// A recipient's device acknowledged a message of this user.
    Delivered {
        msg_id: MsgId,
        recipient: UserId,
    },
    /// Kicked out; `will_reconnect` only for a server shutdown.
    Kicked {
        reason: u8,
        message: String,
        will_reconnect: bool,
    },
    /// The connection is gone (`why`); a [`Event::Reconnecting`] follows unless stopped.
    Disconnected {
        why: String,
    },
    Reconnecting {
        after_ms: u64,
        attempt: u32,
    },
    /// A logout completed (or [`Core::logout`] before any login): the session stopped.
    LoggedOut,
    /// The user's large groups after a login.
    GroupHeads(Vec<GroupHead>),
    /// A large group's post (the group timeline's seqs; not part of the user's timeline).
    GroupPost(Message),
    Presence(Vec<PresenceEntry>),
    Typing {
        conv: u8,
        peer: u64,
        from: UserId,
        typing: bool,
    },
    OrgChanged {
        version: u64,
    },
    /// The answer to a [`Core::request`] (an `Error` frame included).
    Response {
        req_id: u32,
        cmd: Command,
    },
    /// A request of [`Core::request`] that will get no answer: its connection was lost.
    RequestLost {
        req_id: u32,
    },
    /// An `Error` frame that answers nothing the core tracks.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Why a call was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("not logged in")]
    NotLoggedIn,
    #[error("the session has stopped")]
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    /// Waiting for the backoff before the next connection attempt.
    Waiting {
        until: u64,
    },
    Connecting,
    LoginSent {
        req: u32,
        deadline: u64,
    },
    LoggedIn {
        since: u64,
    },
    LoggingOut {
        req: u32,
        deadline: u64,
    },
    Stopped,
}

#[derive(Clone, Debug)]
struct Pending {
    client_msg_id: u64,
    target: Target,
    body: Bytes,
    /// Request id on the current connection; 0: not written on it.
    req: u32,
    sent_ms: u64,
    /// A retryable refusal: written again at this time.
    retry_at: Option<u64>,
}

/// The client state machine of one session (see the module documentation).
pub struct Core {
    cfg: Config,
    state: State,
    rng: u64,
    attempts: Attempts,
    gate_pos: usize,
    next_req: u32,
    codec: FrameCodec,
    rbuf: BytesMut,
    tx: BytesMut,
    io: VecDeque<Io>,
    events: VecDeque<Event>,
    // timeline
    last_seq: Seq,
    acked_seq: Seq,
    seen_max: Seq,
    syncing: Option<u32>,
    /// New entries accepted by the sync in progress.
    sync_new: usize,
    /// A sync refused (retryable): asked again then.
    sync_retry_at: Option<u64>,
    ack_due: Option<u64>,
    // liveness
    heartbeat_ms: u64,
    next_heartbeat: Option<u64>,
    /// A heartbeat went out and nothing came back since.
    beat_unanswered_since: Option<u64>,
    // sends and requests
    outbox: VecDeque<Pending>,
    requests: HashSet<u32>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("uid", &self.cfg.uid)
            .field("state", &self.state)
            .field("last_seq", &self.last_seq)
            .field("outbox", &self.outbox.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    pub fn new(mut cfg: Config) -> Core {
        gate_order(cfg.uid, &mut cfg.gates);
        let last = cfg.last_seq;
        Core {
            rng: cfg.seed,
            cfg,
            state: State::Idle,
            attempts: Attempts::default(),
            gate_pos: 0,
            next_req: 1,
            codec: FrameCodec::new(16 * 1024 * 1024),
            rbuf: BytesMut::new(),
            tx: BytesMut::new(),
            io: VecDeque::new(),
            events: VecDeque::new(),
            last_seq: last,
            acked_seq: last,
            seen_max: last,
            syncing: None,
            sync_new: 0,
            sync_retry_at: None,
            ack_due: None,
            heartbeat_ms: 30_000,
            next_heartbeat: None,
            beat_unanswered_since: None,
            outbox: VecDeque::new(),
            requests: HashSet::new(),
        }
    }

    /// The gates in the order they are tried.
    pub fn gates(&self) -> &[Gate] {
        &self.cfg.gates
    }

    /// Highest seq held with no gap before it (persist it: the next session starts there).
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    pub fn is_logged_in(&self) -> bool {
        matches!(self.state, State::LoggedIn { .. })
    }

    /// Kicked out, logged out or refused for good: nothing more happens.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// Logged in with nothing in flight: no sync, no unacknowledged send, no ack waiting.
    pub fn is_settled(&self) -> bool {
        self.is_logged_in()
            && self.syncing.is_none()
            && self.outbox.is_empty()
            && self.ack_due.is_none()
            && self.events.is_empty()
    }

    /// Sends kept until acknowledged: `(client_msg_id, written on the current connection)`.
    pub fn unacked(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.outbox.iter().map(|p| (p.client_msg_id, p.req != 0))
    }

    /// Starts the session: the first connection is asked for at once.
    pub fn start(&mut self, _now_ms: u64) {
        if self.state == State::Idle {
            self.connect();
        }
    }

    // ---- transport callbacks ----

    /// The connection asked by [`Io::Connect`] is open: logs in.
    pub fn connected(&mut self, now_ms: u64) {
        if self.state != State::Connecting {
            return;
        }
        self.rbuf.clear();
        self.tx.clear();
        let req = self.req_id();
        self.write(
            req,
            &Command::Login {
                uid: self.cfg.uid,
                device_type: self.cfg.device_type,
                device_id: self.cfg.device_id.clone(),
                last_seq: self.last_seq,
                token: self.cfg.token.clone(),
            },
        );
        self.state = State::LoginSent {
            req,
            deadline: now_ms + self.cfg.login_timeout_ms,
        };
    }

    /// The connection (or the attempt to open it) failed or was closed by the peer.
    pub fn disconnected(&mut self, now_ms: u64, why: &str) {
        match self.state {
            State::Connecting | State::LoginSent { .. } | State::LoggedIn { .. } => {
                self.lost(now_ms, why, false)
            }
            State::LoggingOut { .. } => self.stop(false),
            State::Idle | State::Waiting { .. } | State::Stopped => {}
        }
    }

    /// Bytes read from the connection.
    pub fn handle_bytes(&mut self, now_ms: u64, bytes: &[u8]) {
        if !self.has_connection() || matches!(self.state, State::Connecting) {
            return;
        }
        self.rbuf.extend_from_slice(bytes);
        loop {
            let frame = match self.codec.decode(&mut self.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => return self.lost(now_ms, &format!("bad frame from server: {e}"), true),
            };
            self.beat_unanswered_since = None;
            match Command::decode(&frame) {
                Ok(cmd) => self.handle_frame(now_ms, frame.req_id, cmd),
                Err(e) => return self.lost(now_ms, &format!("bad body from server: {e}"), true),
            }
            if !self.has_connection() {
                return;
            }
        }
    }

    /// The clock reached a deadline of [`Core::poll_timeout`] (calling it early is harmless).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        match self.state {
            State::Waiting { until } if now_ms >= until => self.connect(),
            State::LoginSent { deadline, .. } if now_ms >= deadline => {
                self.lost(now_ms, "no answer to the login", true)
            }
            State::LoggingOut { deadline, .. } if now_ms >= deadline => self.stop(true),
            State::LoggedIn { .. } => self.logged_in_timers(now_ms),
            _ => {}
        }
    }

    fn logged_in_timers(&mut self, now: u64) {
        if let Some(t) = self.beat_unanswered_since {
            if now >= t + self.heartbeat_ms {
                return self.lost(now, "no answer to a heartbeat", true);
            }
        }
        if self.next_heartbeat.is_some_and(|t| now >= t) {
            let req = self.req_id();
            self.write(req, &Command::Heartbeat);
            self.beat_unanswered_since.get_or_insert(now);
            self.next_heartbeat = Some(now + self.heartbeat_ms);
        }
        if self.ack_due.is_some_and(|t| now >= t) {
            self.ack_now();
        }
        if self.sync_retry_at.is_some_and(|t| now >= t) {
            self.sync_retry_at = None;
            self.start_sync();
        }
        for i in 0..self.outbox.len() {
            let p = &self.outbox[i];
            let due = match p.retry_at {
                Some(t) => now >= t,
                None => p.req != 0 && resend_due(p.sent_ms, now, self.cfg.ack_timeout_ms),
            };
            if due {
                self.transmit_pending(i, now);
            }
        }
    }

    // ---- outputs ----

    pub fn poll_io(&mut self) -> Option<Io> {
        self.io.pop_front()
    }

    /// Bytes to write to the current connection (all of them, in order).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.tx.is_empty()).then(|| self.tx.split().freeze())
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`Core::poll_event`] has something.
    pub fn has_event(&self) -> bool {
        !self.events.is_empty()
    }

    /// The earliest time [`Core::handle_timeout`] has something to do (`None`: nothing timed).
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Waiting { until } => Some(until),
            State::LoginSent { deadline, .. } | State::LoggingOut { deadline, .. } => {
                Some(deadline)
            }
            State::LoggedIn { .. } => {
                let sends = self.outbox.iter().filter_map(|p| match p.retry_at {
                    Some(t) => Some(t),
                    None if p.req != 0 && self.cfg.ack_timeout_ms > 0 => {
                        Some(p.sent_ms + self.cfg.ack_timeout_ms)
                    }
                    None => None,
                });
                [
                    self.next_heartbeat,
                    self.beat_unanswered_since.map(|t| t + self.heartbeat_ms),
                    self.ack_due,
                    self.sync_retry_at,
                ]
                .into_iter()
                .flatten()
                .chain(sends)
                .min()
            }
            State::Idle | State::Connecting | State::Stopped => None,
        }
    }

    // ---- application calls ----

    /// Sends a c2c message (`client_msg_id` `None`: a new random one); returns its id. Kept and
    /// sent again (same id) until acknowledged; written at once when logged in.
    pub fn send_c2c(
        &mut self,
        now_ms: u64,
        to: UserId,
        client_msg_id: Option<u64>,
        body: Bytes,
    ) -> Result<u64, CallError> {
        self.send(now_ms, Target::User(to), client_msg_id, body)
    }

    /// Posts to a group, mentioning `mentions` (see [`Core::send_c2c`]).
    pub fn send_c2g(
        &mut self,
        now_ms: u64,
        group: GroupId,
        client_msg_id: Option<u64>,
        body: Bytes,
        mentions: Vec<UserId>,
    ) -> Result<u64, CallError> {
        self.send(now_ms, Target::Group(group, mentions), client_msg_id, body)
    }

    fn send(
        &mut self,
        now: u64,
        target: Target,
        client_msg_id: Option<u64>,
        body: Bytes,
    ) -> Result<u64, CallError> {
        if self.state == State::Stopped {
            return Err(CallError::Stopped);
        }
        let id = client_msg_id.unwrap_or_else(|| self.new_client_msg_id());
        if let Some(i) = self.outbox.iter().position(|p| p.client_msg_id == id) {
            // The same message asked again: one copy in the outbox, written again now.
            if self.is_logged_in() {
                self.transmit_pending(i, now);
            }
            return Ok(id);
        }
        self.outbox.push_back(Pending {
            client_msg_id: id,
            target,
            body,
            req: 0,
            sent_ms: now,
            retry_at: None,
        });
        if self.is_logged_in() {
            self.transmit_pending(self.outbox.len() - 1, now);
        }
        Ok(id)
    }

    /// Any other request (groups, organisation tree, files, presence, ...): its answer comes as
    /// [`Event::Response`] with the returned request id, or [`Event::RequestLost`].
    pub fn request(&mut self, cmd: &Command) -> Result<u32, CallError> {
        match self.state {
            State::LoggedIn { .. } => {}
            State::Stopped => return Err(CallError::Stopped),
            _ => return Err(CallError::NotLoggedIn),
        }
        let req = self.req_id();
        self.write(req, cmd);
        self.requests.insert(req);
        Ok(req)
    }

    /// Syncs from the last held seq now (unless a sync is in progress).
    pub fn sync(&mut self) -> Result<(), CallError> {
        if !self.is_logged_in() {
            return Err(CallError::NotLoggedIn);
        }
        if self.syncing.is_none() {
            self.start_sync();
        }
        Ok(())
    }

    /// Acknowledges the last held seq now instead of at the end of the burst.
    pub fn deliver_ack(&mut self) -> Result<(), CallError> {
        if !self.is_logged_in() {
            return Err(CallError::NotLoggedIn);
        }
        self.ack_now();
        Ok(())
    }

    /// Logs out (when logged in) and stops the session; [`Event::LoggedOut`] when done.
    pub fn logout(&mut self, now_ms: u64) {
        match self.state {
            State::LoggedIn { .. } => {
                self.ack_now();
                let req = self.req_id();
                self.write(req, &Command::Logout);
                self.state = State::LoggingOut {
                    req,
                    deadline: now_ms + 5_000,
                };
            }
            State::LoggingOut { .. } | State::Stopped => {}
            State::Connecting | State::LoginSent { .. } => self.stop(true),
            State::Idle | State::Waiting { .. } => self.stop(false),
        }
    }

    // ---- internals ----

    fn has_connection(&self) -> bool {
        matches!(
            self.state,
            State::Connecting
                | State::LoginSent { .. }
                | State::LoggedIn { .. }
                | State::LoggingOut { .. }
        )
    }

    fn req_id(&mut self) -> u32 {
        let r = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        r
    }

    fn write(&mut self, req: u32, cmd: &Command) {
        self.tx.extend_from_slice(&cmd.to_bytes(req));
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn new_client_msg_id(&mut self) -> u64 {
        loop {
            let id = self.next_u64();
            if id != 0 && !self.outbox.iter().any(|p| p.client_msg_id == id) {
                return id;
            }
        }
    }

    fn connect(&mut self) {
        if self.cfg.gates.is_empty() {
            self.events.push_back(Event::Disconnected {
                why: "no gate configured".into(),
            });
            return self.stop(false);
        }
        let gate = self.cfg.gates[self.gate_pos % self.cfg.gates.len()].clone();
        self.state = State::Connecting;
        self.events.push_back(Event::Connecting {
            gate: gate.clone(),
            attempt: self.attempts.next,
        });
        self.io.push_back(Io::Connect(gate));
    }

    /// The connection is over (`close`: the core ends it, the transport did not): schedule the
    /// next attempt after the backoff.
    fn lost(&mut self, now: u64, why: &str, close: bool) {
        let up_for = match self.state {
            State::LoggedIn { since } => now.saturating_sub(since),
            _ => 0,
        };
        self.drop_connection(close);
        let attempt = self.attempts.on_end(up_for);
        let unit = self.unit();
        let wait = self.cfg.backoff.wait_ms(attempt, unit);
        self.gate_pos = self.gate_pos.wrapping_add(1);
        self.state = State::Waiting { until: now + wait };
        self.events
            .push_back(Event::Disconnected { why: why.into() });
        self.events.push_back(Event::Reconnecting {
            after_ms: wait,
            attempt,
        });
    }

    fn stop(&mut self, close: bool) {
        self.drop_connection(close);
        self.state = State::Stopped;
    }

    fn drop_connection(&mut self, close: bool) {
        if close {
            self.io.push_back(Io::Close);
        }
        self.tx.clear();
        self.rbuf.clear();
        self.syncing = None;
        self.sync_retry_at = None;
        self.ack_due = None;
        self.next_heartbeat = None;
        self.beat_unanswered_since = None;
        for p in &mut self.outbox {
            p.req = 0;
            p.retry_at = None;
        }
        let mut lost: Vec<u32> = self.requests.drain().collect();
        lost.sort_unstable();
        for req_id in lost {
            self.events.push_back(Event::RequestLost { req_id });
        }
    }

    fn transmit_pending(&mut self, i: usize, now: u64) {
        let req = self.req_id();
        let p = &mut self.outbox[i];
        p.req = req;
        p.sent_ms = now;
        p.retry_at = None;
        let cmd = match &p.target {
            Target::User(to) => Command::SendC2c {
                client_msg_id: p.client_msg_id,
                to: *to,
                body: p.body.clone(),
            },
            Target::Group(group, mentions) => Command::SendC2g {
                client_msg_id: p.client_msg_id,
                group: *group,
                body: p.body.clone(),
                mentions: mentions.clone(),
            },
        };
        self.write(req, &cmd);
    }

    fn start_sync(&mut self) {
        let req = self.req_id();
        self.write(
            req,
            &Command::SyncRequest {
                after_seq: self.last_seq,
                limit: self.cfg.sync_limit,
            },
        );
        self.syncing = Some(req);
        self.sync_new = 0;
    }

    fn ack_now(&mut self) {
        self.ack_due = None;
        if self.last_seq > self.acked_seq {
            self.acked_seq = self.last_seq;
            let req = self.req_id();
            self.write(req, &Command::DeliverAck { seq: self.last_seq });
        }
    }

    fn schedule_ack(&mut self, now: u64) {
        if self.ack_due.is_none() {
            self.ack_due = Some(now + self.cfg.deliver_ack_delay_ms);
        }
    }

    /// Applies one timeline entry (from a push or a sync page).
    fn offer(&mut self, now: u64, m: Message) {
        self.seen_max = self.seen_max.max(m.seq);
        match classify(self.last_seq, m.seq, m.prev_seq) {
            Offer::Duplicate => {}
            Offer::Gap => {
                if self.syncing.is_none() {
                    self.start_sync();
                }
            }
            Offer::Accepted => {
                self.last_seq = m.seq;
                if self.syncing.is_some() {
                    self.sync_new += 1;
                }
                self.events.push_back(Event::Message(m));
                self.schedule_ack(now);
            }
        }
    }

    fn handle_frame(&mut self, now: u64, req: u32, cmd: Command) {
        if req != 0 && self.requests.remove(&req) {
            return self.events.push_back(Event::Response { req_id: req, cmd });
        }
        match cmd {
            Command::LoginResult {
                code,
                server_time_ms,
                max_seq,
                heartbeat_secs,
                message,
            } if matches!(self.state, State::LoginSent { req: r, .. } if r == req) => {
                if code == ErrorCode::Ok {
                    self.logged_in(now, max_seq, heartbeat_secs, server_time_ms)
                } else {
                    self.login_refused(now, code, message)
                }
            }
            Command::Error { code, message } if matches!(self.state, State::LoginSent { req: r, .. } if r == req) => {
                self.login_refused(now, code, message)
            }
            Command::LogoutAck if matches!(self.state, State::LoggingOut { req: r, .. } if r == req) =>
            {
                self.stop(true);
                self.events.push_back(Event::LoggedOut);
            }
            Command::Deliver(m) => self.offer(now, m),
            Command::SyncPage {
                has_more, messages, ..
            } if self.syncing == Some(req) => {
                let empty = messages.is_empty();
                for m in messages {
                    self.offer(now, m);
                }
                if has_more && !empty {
                    self.start_sync();
                    return;
                }
                self.syncing = None;
                if self.seen_max > self.last_seq && self.sync_new > 0 {
                    // A push beyond the page arrived meanwhile and was held back as a gap.
                    self.start_sync();
                    return;
                }
                // Nothing more to get: what was seen past it is not in this timeline.
                self.seen_max = self.last_seq;
                self.ack_now();
                self.events.push_back(Event::Synced {
                    last_seq: self.last_seq,
                });
            }
            Command::SendAck {
                code,
                client_msg_id,
                msg_id,
                seq,
                server_time_ms,
                prev_seq,
            } => self.on_send_answer(now, req, code, |core, p| {
                debug_assert_eq!(p.client_msg_id, client_msg_id);
                if let Target::User(to) = p.target {
                    core.seen_max = core.seen_max.max(seq);
                    if prev_seq == core.last_seq && seq > prev_seq {
                        // The sender's own message is in its timeline too (PROTOCOL.md §10).
                        core.offer(
                            now,
                            Message {
                                seq,
                                prev_seq,
                                msg_id,
                                conv: CONV_C2C,
                                from: core.cfg.uid,
                                to,
                                client_msg_id: p.client_msg_id,
                                server_time_ms,
                                body: p.body.clone(),
                            },
                        );
                    }
                }
                core.events.push_back(Event::SendAcked {
                    client_msg_id: p.client_msg_id,
                    msg_id,
                    seq,
                    server_time_ms,
                });
            }),
            Command::Error { code, message } => {
                if req != 0 && self.outbox.iter().any(|p| p.req == req) {
                    return self.on_send_answer(now, req, code, |_, _| {});
                }
                if req != 0 && self.syncing == Some(req) {
                    self.syncing = None;
                    if code.is_retryable() {
                        self.sync_retry_at = Some(now + self.cfg.backoff.initial_ms);
                    }
                }
                self.events.push_back(Event::Error { code, message });
            }
            Command::HeartbeatAck { .. } => {}
            Command::Kickout { reason, message } => {
                let again = KickReason::from_u8(reason) == Some(KickReason::ServerShutdown);
                self.events.push_back(Event::Kicked {
                    reason,
                    message,
                    will_reconnect: again,
                });
                if again {
                    self.lost(now, "the server is shutting down", true);
                } else {
                    self.stop(true);
                }
            }
            Command::Delivered { msg_id, recipient } => self
                .events
                .push_back(Event::Delivered { msg_id, recipient }),
            Command::GroupHeads { heads } => self.events.push_back(Event::GroupHeads(heads)),
            Command::GroupDeliver(m) => self.events.push_back(Event::GroupPost(m)),
            Command::PresenceNotice { entries } => self.events.push_back(Event::Presence(entries)),
            Command::TypingNotice {
                conv,
                peer,
                from,
                state,
                ..
            } => self.events.push_back(Event::Typing {
                conv,
                peer,
                from,
                typing: state == 1,
            }),
            Command::OrgChanged { version } => self.events.push_back(Event::OrgChanged { version }),
            // Answers to requests of a connection that is gone, or frames a newer server sends.
            _ => {}
        }
    }

    /// A `SendAck` or an `Error` answering send `req`: `ok` runs for an accepted one.
    fn on_send_answer(
        &mut self,
        now: u64,
        req: u32,
        code: ErrorCode,
        ok: impl FnOnce(&mut Core, &Pending),
    ) {
        let Some(i) = self.outbox.iter().position(|p| p.req == req && req != 0) else {
            return; // an answer to a copy written earlier: the later copy is answered too
        };
        if code == ErrorCode::Ok {
            let p = self.outbox.remove(i).expect("position");
            ok(self, &p);
        } else if code.is_retryable() {
            let unit = self.unit();
            let p = &mut self.outbox[i];
            p.req = 0;
            p.retry_at = Some(now + self.cfg.backoff.wait_ms(0, unit));
        } else {
            let p = self.outbox.remove(i).expect("position");
            self.events.push_back(Event::SendFailed {
                client_msg_id: p.client_msg_id,
                code,
            });
        }
    }

    fn logged_in(&mut self, now: u64, max_seq: Seq, heartbeat_secs: u16, server_time_ms: u64) {
        self.state = State::LoggedIn { since: now };
        self.heartbeat_ms = u64::from(heartbeat_secs.max(1)) * 1000;
        self.next_heartbeat = Some(now + self.heartbeat_ms);
        self.events.push_back(Event::LoggedIn {
            max_seq,
            heartbeat_secs,
            server_time_ms,
        });
        self.seen_max = self.seen_max.max(max_seq);
        if max_seq > self.last_seq {
            self.start_sync();
        }
        for i in 0..self.outbox.len() {
            self.transmit_pending(i, now);
        }
    }

    fn login_refused(&mut self, now: u64, code: ErrorCode, message: String) {
        let retry = code.is_retryable();
        self.events.push_back(Event::LoginFailed {
            code,
            message: message.clone(),
            will_retry: retry,
        });
        if retry {
            self.lost(now, &format!("login refused: {code:?} {message}"), true);
        } else {
            self.stop(true);
        }
    }
}

#[cfg(test)]
mod tests;
