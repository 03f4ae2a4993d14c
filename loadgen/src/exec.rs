//! One glommio executor (one thread, one core): owns a slice of the worker's users, one
//! connection each, and runs the requests the worker forwards.
//!
//! Each connection is one task (`conn_task`) that owns its `TcpStream` and drives it with a single
//! `poll_fn`: flush the connection's output buffer, read what arrived, handle every complete
//! frame, park. Other tasks (the sender, the heartbeat and ack tickers) never touch the socket:
//! they append encoded frames to the connection's output buffer and wake its task. Nothing here
//! blocks the thread; all state is `Rc`/`Cell`, as the executor is single threaded.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::os::fd::FromRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::timer::sleep;
use im_shared::frame::encode_header;
use im_shared::proto::Message;
use im_shared::token::HmacTokens;
use im_shared::{Cmd, Command, DeviceType, ErrorCode, FrameCodec, Seq, UserId};

use crate::msg::{Hist, Op, Plan, Report, Request, BODY_HEADER};
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
    to: u32,
    req: u32,
    at: Instant,
}

struct Conn {
    /// Global user index (uid = uid_base + idx).
    idx: u32,
    local: u32,
    uid: UserId,
    st: Cell<St>,
    /// A task owns a socket for this user right now.
    live: Cell<bool>,
    close: Cell<Option<&'static str>>,
    out: RefCell<BytesMut>,
    rbuf: RefCell<BytesMut>,
    waker: Cell<Option<Waker>>,
    next_req: Cell<u32>,
    login_req: Cell<u32>,
    started: Cell<Option<Instant>>,
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
    storm_t0: Cell<Option<Instant>>,
    storm_target: Cell<u64>,
    /// The drop was the storm's (counted in the storm's numbers), not a lost connection.
    in_storm: Cell<bool>,
    reconnects: Cell<u32>,
    // sending
    counter: Cell<u32>,
    pending: RefCell<VecDeque<Pending>>,
}

impl Conn {
    fn req(&self) -> u32 {
        let r = self.next_req.get();
        self.next_req.set(r.wrapping_add(1).max(1));
        r
    }
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
    fn push(&self, cmd: &Command) -> u32 {
        let r = self.req();
        cmd.encode(r, &mut self.out.borrow_mut());
        self.wake();
        r
    }
    fn request_close(&self, why: &'static str) {
        if self.live.get() && self.close.get().is_none() {
            self.close.set(Some(why));
            self.wake();
        }
    }
}

struct Exec {
    plan: Arc<Plan>,
    run_id: u32,
    conns: Vec<Rc<Conn>>,
    rep: RefCell<Report>,
    iv_ack: RefCell<Hist>,
    iv_deliver: RefCell<Hist>,
    live: Arc<Live>,
    tokens: HmacTokens,
    rng: Cell<u64>,
    scratch: RefCell<Vec<u8>>,
    dirty: RefCell<Vec<u32>>,
    codec: FrameCodec,
    /// (to, from, counter) of accepted deliveries: dedup check across the whole run.
    seen: RefCell<HashSet<u128>>,
    /// (from, to) → last counter accepted: order check.
    order: RefCell<HashMap<u64, u32>>,
    tasks: Cell<u32>,
    pending_total: Cell<u64>,
    last_activity: Cell<Instant>,
    storm_mode: Cell<bool>,
    quitting: Cell<bool>,
    storm_back: Cell<u64>,
    storm_failed: Cell<u64>,
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

impl Exec {
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
            self.dirty.borrow_mut().push(c.local);
        }
    }

    fn start_sync(&self, c: &Conn) {
        if !c.syncing.get() {
            c.syncing.set(true);
            self.rep.borrow_mut().sync_requests += 1;
            c.push(&Command::SyncRequest {
                after_seq: Seq(c.last_seq.get()),
                limit: 200,
            });
        }
    }

    fn check_back(&self, c: &Conn) {
        if let Some(t0) = c.storm_t0.get() {
            if c.st.get() == St::LoggedIn
                && !c.syncing.get()
                && c.last_seq.get() >= c.storm_target.get()
            {
                c.storm_t0.set(None);
                if c.in_storm.replace(false) {
                    let mut r = self.rep.borrow_mut();
                    r.back_us.record(t0.elapsed().as_micros() as u64);
                    r.synced += 1;
                    self.storm_back.set(self.storm_back.get() + 1);
                } else {
                    self.rep.borrow_mut().reconnected += 1;
                }
            }
        }
    }

    /// Applies one timeline entry with the client rules of PROTOCOL.md section 10.
    fn offer(&self, c: &Conn, m: &Message, via_sync: bool) {
        c.seen_max.set(c.seen_max.get().max(m.seq.0));
        if m.seq.0 <= c.last_seq.get() {
            self.rep.borrow_mut().raw_dups += 1;
            return;
        }
        if m.prev_seq.0 > c.last_seq.get() {
            // Gap: the sync in progress, or a new one, picks it up.
            if !c.syncing.get() {
                self.rep.borrow_mut().gaps += 1;
                self.start_sync(c);
            }
            return;
        }
        c.last_seq.set(m.seq.0);
        self.mark_dirty(c);
        self.last_activity.set(Instant::now());
        if m.from == c.uid {
            self.rep.borrow_mut().echoes += 1;
            return;
        }
        let p = &self.plan;
        if (m.client_msg_id >> 32) as u32 != self.run_id || m.body.len() < BODY_HEADER {
            // Left over from an earlier run (synced after a reconnect): not ours to count.
            return;
        }
        let b = &m.body[..];
        let send_ns = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        let from_idx = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        let counter = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
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
        if p.track {
            let key = (c.idx as u128) << 64 | (from_idx as u128) << 32 | counter as u128;
            if !self.seen.borrow_mut().insert(key) {
                r.dedup_dups += 1;
                return;
            }
            r.received_ids.push(from_idx, c.idx, counter);
            let pair = (from_idx as u64) << 32 | c.idx as u64;
            let mut order = self.order.borrow_mut();
            let last = order.entry(pair).or_insert(0);
            if counter < *last {
                r.out_of_order += 1;
            } else {
                *last = counter;
            }
        }
    }

    /// Handles one frame; `Err(reason)` closes the connection.
    fn handle(&self, c: &Conn, req: u32, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::LoginResult { code, max_seq, .. } if req == c.login_req.get() => {
                if code != ErrorCode::Ok {
                    return Err(code_name(code));
                }
                c.st.set(St::LoggedIn);
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
            }
            Command::HeartbeatAck { .. } => self.rep.borrow_mut().heartbeat_acks += 1,
            Command::SendAck {
                code,
                client_msg_id,
                seq,
                prev_seq,
                ..
            } => {
                // The sender's own message is in its timeline too: place it when it directly
                // follows the last held seq (PROTOCOL.md), so the next push needs no sync.
                if code == ErrorCode::Ok && prev_seq.0 == c.last_seq.get() && seq > prev_seq {
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
                    return Err(code_name(code));
                }
                let is_send = c.pending.borrow().iter().any(|p| p.req == req);
                if req != 0 && is_send {
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
                    let mut m = message;
                    m.truncate(60);
                    return Err(format!("error {}: {m}", code_name(code)));
                }
            }
            Command::Kickout { reason, .. } => return Err(format!("kickout {reason}")),
            _ => {}
        }
        Ok(())
    }

    fn on_send_result(&self, c: &Conn, req: u32, counter: Option<u32>, code: ErrorCode) {
        let mut pend = c.pending.borrow_mut();
        let pos = pend
            .iter()
            .position(|p| p.req == req || Some(p.counter) == counter);
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

    fn process(&self, c: &Conn, data: &[u8]) -> Result<(), String> {
        let mut buf = c.rbuf.borrow_mut();
        buf.extend_from_slice(data);
        loop {
            match self.codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let cmd = Command::decode(&f).map_err(|e| format!("bad body: {e}"))?;
                    self.handle(c, f.req_id, cmd)?;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("bad frame: {e}")),
            }
        }
        if buf.is_empty() {
            // No read buffer parked on an idle connection.
            *buf = BytesMut::new();
        }
        Ok(())
    }

    fn send_one(&self, c: &Conn) {
        let total = self.plan.total as u64;
        let mut to = self.below(total - 1) as u32;
        if to >= c.idx {
            to += 1;
        }
        let counter = c.counter.get() + 1;
        c.counter.set(counter);
        let req = c.req();
        let body_len = self.plan.body_size.max(BODY_HEADER);
        {
            let mut out = c.out.borrow_mut();
            encode_header(&mut out, Cmd::SendC2c, req, 8 + 8 + 4 + body_len);
            out.put_u64((self.run_id as u64) << 32 | counter as u64);
            out.put_u64(self.plan.uid_base + to as u64);
            out.put_u32(body_len as u32);
            out.put_u64(now_ns());
            out.put_u32(c.idx);
            out.put_u32(counter);
            out.put_bytes(b'x', body_len - BODY_HEADER);
        }
        c.pending.borrow_mut().push_back(Pending {
            counter,
            to,
            req,
            at: Instant::now(),
        });
        self.pending_total.set(self.pending_total.get() + 1);
        let mut r = self.rep.borrow_mut();
        r.sent += 1;
        if r.first_send_ns.is_none() {
            r.first_send_ns = Some(now_ns());
        }
        self.live.sent.fetch_add(1, Relaxed);
        c.wake();
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

/// Drives one socket until it closes; returns why.
async fn io_loop(ex: &Exec, c: &Conn, stream: &mut TcpStream) -> String {
    poll_fn(|cx| {
        for _ in 0..64 {
            if let Some(why) = c.close.get() {
                return Poll::Ready(why.to_string());
            }
            {
                let mut out = c.out.borrow_mut();
                while !out.is_empty() {
                    match Pin::new(&mut *stream).poll_write(cx, &out) {
                        Poll::Ready(Ok(0)) => return Poll::Ready("closed".into()),
                        Poll::Ready(Ok(n)) => out.advance(n),
                        Poll::Ready(Err(e)) => return Poll::Ready(errno_name(&e)),
                        Poll::Pending => break,
                    }
                }
                if out.is_empty() && out.capacity() > 0 {
                    *out = BytesMut::new();
                }
            }
            let mut scratch = ex.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0)) => return Poll::Ready("closed".into()),
                Poll::Ready(Ok(n)) => {
                    if let Err(e) = ex.process(c, &scratch[..n]) {
                        return Poll::Ready(e);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(errno_name(&e)),
                Poll::Pending => {
                    c.waker.set(Some(cx.waker().clone()));
                    return Poll::Pending;
                }
            }
        }
        // Fairness: let the other connections run.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

async fn conn_task(ex: Rc<Exec>, c: Rc<Conn>) {
    let p = &ex.plan;
    c.live.set(true);
    c.close.set(None);
    c.st.set(St::LoginSent);
    c.started.set(Some(Instant::now()));
    c.syncing.set(false);
    c.push_max.set(0);
    *c.out.borrow_mut() = BytesMut::new();
    *c.rbuf.borrow_mut() = BytesMut::new();
    {
        let mut r = ex.rep.borrow_mut();
        r.attempted += 1;
        if r.first_connect_ns.is_none() {
            r.first_connect_ns = Some(now_ns());
        }
    }
    let src = (!p.src_ips.is_empty()).then(|| p.src_ips[c.idx as usize % p.src_ips.len()]);
    let why = match start_connect(src, p.server) {
        Err(e) => format!("connect {}", errno_name(&e)),
        Ok(fd) => {
            // SAFETY: `fd` is a freshly created socket that nothing else owns.
            let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
            ex.live.connected.fetch_add(1, Relaxed);
            let token = ex.tokens.mint(c.uid, im_shared::token::now_secs() + 86_400);
            let req = c.push(&Command::Login {
                uid: c.uid,
                device_type: DeviceType::Phone,
                device_id: format!("lg-{}", c.uid.0),
                last_seq: Seq(c.last_seq.get()),
                token,
            });
            c.login_req.set(req);
            let why = io_loop(&ex, &c, &mut stream).await;
            ex.live.connected.fetch_sub(1, Relaxed);
            drop(stream);
            why
        }
    };
    c.waker.take();
    let was = c.st.get();
    c.live.set(false);
    ex.tasks.set(ex.tasks.get() - 1);
    if was == St::LoggedIn {
        ex.live.logged_in.fetch_sub(1, Relaxed);
    }
    c.st.set(St::Idle);
    if why == "storm" || why == "quit" {
        return;
    }
    c.st.set(St::Failed);
    let mut r = ex.rep.borrow_mut();
    let kicked = why.starts_with("kickout");
    if was == St::LoginSent {
        ex.live.login_failed.fetch_add(1, Relaxed);
        *r.login_failures.entry(why).or_default() += 1;
    } else {
        ex.live.disconnects.fetch_add(1, Relaxed);
        *r.disconnects.entry(why).or_default() += 1;
    }
    drop(r);
    if was == St::LoggedIn && !kicked && c.reconnects.get() < MAX_RECONNECTS {
        // A client reconnects after a lost connection, logs in with its last seq and syncs
        // (PROTOCOL.md section 9), so what was sent to it meanwhile still reaches it.
        c.reconnects.set(c.reconnects.get() + 1);
        if c.storm_t0.get().is_none() {
            c.storm_t0.set(Some(Instant::now()));
        }
        let ex2 = ex.clone();
        let c2 = c.clone();
        ex.tasks.set(ex.tasks.get() + 1); // the pending reconnect keeps drains and quits waiting
        glommio::spawn_local(async move {
            sleep(Duration::from_millis(200)).await;
            ex2.tasks.set(ex2.tasks.get() - 1);
            if !ex2.quitting.get() {
                spawn_conn(&ex2, &c2);
            }
        })
        .detach();
    } else {
        let had = c.storm_t0.take().is_some();
        if had && c.in_storm.replace(false) {
            ex.storm_failed.set(ex.storm_failed.get() + 1);
        }
    }
}

/// Reconnects per user per run after lost connections.
const MAX_RECONNECTS: u32 = 5;

fn spawn_conn(ex: &Rc<Exec>, c: &Rc<Conn>) {
    ex.tasks.set(ex.tasks.get() + 1);
    glommio::spawn_local(conn_task(ex.clone(), c.clone())).detach();
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
            spawn_conn(ex, &ex.conns[i]);
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

/// 1 s ticker: heartbeats (spread over the period), login timeouts, progress histograms.
async fn ticker_1s(ex: Rc<Exec>, tx: Sender<(usize, ExecMsg)>, me: usize) {
    let mut tick: u64 = 0;
    let hb = ex.plan.heartbeat_secs.max(1) as u64;
    let login_timeout = Duration::from_millis(ex.plan.login_timeout_ms);
    loop {
        sleep(Duration::from_secs(1)).await;
        tick += 1;
        let mut hbs = 0;
        for c in &ex.conns {
            match c.st.get() {
                St::LoggedIn if (c.local as u64 % hb) == tick % hb => {
                    c.push(&Command::Heartbeat);
                    hbs += 1;
                }
                St::LoginSent if c.started.get().is_some_and(|t| t.elapsed() > login_timeout) => {
                    c.request_close("timeout");
                }
                _ => {}
            }
        }
        ex.rep.borrow_mut().heartbeats += hbs;
        let ack = std::mem::take(&mut *ex.iv_ack.borrow_mut());
        let deliver = std::mem::take(&mut *ex.iv_deliver.borrow_mut());
        if tx.send((me, ExecMsg::Interval { ack, deliver })).is_err() {
            return;
        }
    }
}

/// 100 ms ticker: `DeliverAck` with the highest contiguous seq of each connection that got new
/// entries.
async fn ticker_ack(ex: Rc<Exec>) {
    loop {
        sleep(Duration::from_millis(100)).await;
        let dirty = std::mem::take(&mut *ex.dirty.borrow_mut());
        for i in dirty {
            let c = &ex.conns[i as usize];
            c.in_dirty.set(false);
            if c.st.get() == St::LoggedIn && c.last_seq.get() > c.acked_seq.get() {
                c.acked_seq.set(c.last_seq.get());
                c.push(&Command::DeliverAck {
                    seq: Seq(c.last_seq.get()),
                });
            }
        }
    }
}

async fn send_phase(ex: &Rc<Exec>, rate: f64, secs: f64) {
    let logged: Vec<u32> = ex
        .conns
        .iter()
        .filter(|c| c.st.get() == St::LoggedIn)
        .map(|c| c.local)
        .collect();
    if rate > 0.0 && !logged.is_empty() && ex.plan.total > 1 {
        let start = Instant::now();
        let dur = Duration::from_secs_f64(secs);
        let mut sent: u64 = 0;
        loop {
            let el = start.elapsed();
            let target = (el.min(dur).as_secs_f64() * rate) as u64;
            while sent < target {
                let c = &ex.conns[logged[ex.below(logged.len() as u64) as usize] as usize];
                if c.st.get() == St::LoggedIn {
                    ex.send_one(c);
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
    let conns = users
        .clone()
        .enumerate()
        .map(|(local, idx)| {
            Rc::new(Conn {
                idx,
                local: local as u32,
                uid: UserId(plan.uid_base + idx as u64),
                st: Cell::new(St::Idle),
                live: Cell::new(false),
                close: Cell::new(None),
                out: RefCell::new(BytesMut::new()),
                rbuf: RefCell::new(BytesMut::new()),
                waker: Cell::new(None),
                next_req: Cell::new(1),
                login_req: Cell::new(0),
                started: Cell::new(None),
                last_seq: Cell::new(0),
                acked_seq: Cell::new(0),
                in_dirty: Cell::new(false),
                syncing: Cell::new(false),
                seen_max: Cell::new(0),
                push_max: Cell::new(0),
                storm_t0: Cell::new(None),
                storm_target: Cell::new(0),
                in_storm: Cell::new(false),
                reconnects: Cell::new(0),
                counter: Cell::new(0),
                pending: RefCell::new(VecDeque::new()),
            })
        })
        .collect();
    let ex = Rc::new(Exec {
        run_id: (plan.seed >> 32) as u32,
        rng: Cell::new(plan.seed ^ (me as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)),
        tokens: HmacTokens::new(plan.token_secret.clone()),
        codec: FrameCodec::new(16 * 1024 * 1024),
        plan,
        conns,
        rep: RefCell::default(),
        iv_ack: RefCell::default(),
        iv_deliver: RefCell::default(),
        live,
        scratch: RefCell::new(vec![0; 64 * 1024]),
        dirty: RefCell::default(),
        seen: RefCell::default(),
        order: RefCell::default(),
        tasks: Cell::new(0),
        pending_total: Cell::new(0),
        last_activity: Cell::new(Instant::now()),
        storm_mode: Cell::new(false),
        quitting: Cell::new(false),
        storm_back: Cell::new(0),
        storm_failed: Cell::new(0),
    });
    glommio::spawn_local(ticker_1s(ex.clone(), tx.clone(), me)).detach();
    glommio::spawn_local(ticker_ack(ex.clone())).detach();
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
                send_phase(&ex, share(rate), secs).await;
                None
            }
            Op::Drain { quiet_ms, max_secs } => {
                let start = Instant::now();
                let quiet = Duration::from_millis(quiet_ms);
                let e2 = ex.clone();
                wait_until(
                    move || {
                        e2.last_activity.get().elapsed() >= quiet
                            && start.elapsed() >= quiet
                            && e2
                                .conns
                                .iter()
                                .all(|c| !c.syncing.get() && c.storm_t0.get().is_none())
                    },
                    Duration::from_secs_f64(max_secs),
                )
                .await;
                None
            }
            Op::Report => {
                ex.expire_pending();
                Some(Box::new(ex.take_report()))
            }
            Op::Storm { rate } => {
                ex.storm_mode.set(true);
                ex.storm_back.set(0);
                ex.storm_failed.set(0);
                let t0 = Instant::now();
                let mut targets = 0u64;
                for c in &ex.conns {
                    if c.live.get() || c.st.get() == St::LoggedIn {
                        c.request_close("storm");
                        c.storm_t0.set(Some(t0));
                        c.in_storm.set(true);
                        targets += 1;
                    }
                }
                let e2 = ex.clone();
                wait_until(move || e2.tasks.get() == 0, Duration::from_secs(60)).await;
                // Reconnect only the users that were online.
                let start = Instant::now();
                let targets_list: Vec<Rc<Conn>> = ex
                    .conns
                    .iter()
                    .filter(|c| c.in_storm.get())
                    .cloned()
                    .collect();
                let r = share(rate);
                for (i, c) in targets_list.iter().enumerate() {
                    if r > 0.0 {
                        let due = Duration::from_secs_f64(i as f64 / r);
                        let el = start.elapsed();
                        if due > el {
                            sleep(due - el).await;
                        }
                    }
                    spawn_conn(&ex, c);
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
                for c in &ex.conns {
                    c.request_close("quit");
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
    //! timelines (seq/prev_seq), acks; checks the executor's counting end to end.

    use super::*;
    use crate::account::join;
    use im_shared::MsgId;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::sync::Mutex;

    type Routes = Arc<Mutex<(HashMap<u64, StdStream>, HashMap<u64, u64>)>>;

    fn fake_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let routes: Routes = Arc::default();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let routes = routes.clone();
                std::thread::spawn(move || serve(s, routes));
            }
        });
        addr
    }

    fn serve(mut s: StdStream, routes: Routes) {
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
                match Command::decode(&f).unwrap() {
                    Command::Login { uid, .. } => {
                        me = uid.0;
                        routes.lock().unwrap().0.insert(me, s.try_clone().unwrap());
                        Command::LoginResult {
                            code: ErrorCode::Ok,
                            server_time_ms: 0,
                            max_seq: Seq(0),
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
                        let mut g = routes.lock().unwrap();
                        let seq = g.1.entry(to.0).or_insert(0);
                        *seq += 1;
                        let m = Message {
                            seq: Seq(*seq),
                            prev_seq: Seq(*seq - 1),
                            msg_id: MsgId(1),
                            conv: 1,
                            from: UserId(me),
                            to,
                            client_msg_id,
                            server_time_ms: 0,
                            body,
                        };
                        if let Some(r) = g.0.get_mut(&to.0) {
                            let _ = r.write_all(&Command::Deliver(m).to_bytes(0));
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
                    _ => {}
                }
                if !out.is_empty() {
                    // Writes to one socket come from several threads: keep frames whole.
                    let _g = routes.lock().unwrap();
                    let _ = s.write_all(&out);
                }
            }
        }
    }

    use std::net::SocketAddr;

    #[test]
    fn executor_logs_in_sends_and_counts_exactly() {
        let server = fake_server();
        let n = 50;
        let plan = Arc::new(Plan {
            worker: 0,
            first: 0,
            count: n,
            total: n,
            cores: 1,
            pin: false,
            io_memory_kib: 256,
            server,
            token_secret: "s".into(),
            uid_base: 1000,
            src_ips: vec![std::net::Ipv4Addr::new(127, 0, 0, 2)],
            heartbeat_secs: 30,
            login_timeout_ms: 10_000,
            ack_timeout_ms: 5_000,
            body_size: 24,
            track: true,
            seed: 7 << 32 | 1,
        });
        let (rtx, rrx) = std::sync::mpsc::channel();
        let (etx, erx) = std::sync::mpsc::channel();
        let live = Arc::new(Live::default());
        let l2 = live.clone();
        let h = glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .spawn(move || run(plan, 0, 0..n, 1.0, l2, rrx, etx))
            .unwrap();
        let ask = |id: u64, op: Op| -> Option<Box<Report>> {
            rtx.send(Request { id, op }).unwrap();
            loop {
                match erx.recv_timeout(Duration::from_secs(30)).expect("answer") {
                    (_, ExecMsg::Done { id: got, report }) if got == id => return report,
                    _ => {}
                }
            }
        };
        let login = ask(1, Op::Login { rate: 0.0 }).unwrap();
        assert_eq!(login.logged_in, n as u64, "{:?}", login.login_failures);
        ask(
            2,
            Op::Send {
                rate: 5000.0,
                secs: 1.0,
            },
        );
        ask(
            3,
            Op::Drain {
                quiet_ms: 200,
                max_secs: 10.0,
            },
        );
        let r = ask(4, Op::Report).unwrap();
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
        assert_eq!(live.logged_in.load(Relaxed), n as u64);
        ask(5, Op::Quit);
        h.join().unwrap();
    }
}
