//! Attack protection at the gate (docs/SECURITY.md): admission at accept (gate-wide connection
//! cap, per-IP concurrent connections, per-IP connection rate), back-off after failed logins (per
//! source IP and per user), and the per-user message rate.
//!
//! Where the state lives, and why:
//!
//! - **Per source IP**: one table shared by all cores of the gate, split into [`SHARDS`]
//!   mutex-protected hash maps. It is touched at accept, when a connection's socket is finally
//!   released and on a failed login: never per frame. Shared rather than per core because
//!   `SO_REUSEPORT` spreads one address's connections over every core (the kernel hashes the
//!   4-tuple, so the source port decides) and a login hands the socket to yet another core:
//!   per-core tables would let an address hold `cores ×` the limit and would need a cross-core
//!   message to release a count. With 64 shards and critical sections of a hash lookup, two cores
//!   rarely meet on one lock.
//! - **Per user**: on the user's owner core (all devices of a user on this gate live there), in
//!   plain maps behind the core's `RefCell`: no lock on the frame path.
//! - **Per connection**: a [`Slot`] (24 bytes, in `Conn`), whose drop releases the address's and
//!   the gate's connection counts exactly when the connection is gone. Nothing in the reader
//!   future.
//!
//! Every refusal answers with the existing, retryable `Overloaded` code (no new protocol code):
//! clients already back off and retry on it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use im_shared::frame::{Cmd, HEADER_LEN};
use im_shared::{Command, ErrorCode, Seq, UserId};

use crate::conn::Conn;
use crate::core::Core;

/// Attack-protection limits of one gate (`GateConfig::limits`). A limit of 0 is off.
///
/// Also the `[limits]` table of the server's config file, deserialised as is: a key per field,
/// except the durations, which are written `login_backoff_ms`, `login_backoff_max_secs` and
/// `login_fail_window_secs`; a missing key keeps its default, an unknown key is an error.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Sockets the gate holds at once, logged in or not (pre-login and closing ones included).
    /// Beyond it a new connection gets `Error Overloaded` and is closed at accept.
    pub max_connections: usize,
    /// Sockets one source address holds at once (IPv6: one /64). Beyond it, as above.
    pub max_conns_per_ip: u32,
    /// New connections per second one source address may open (token bucket refill).
    pub conn_rate_per_ip: u32,
    /// Bucket size of the above: connections an address may open at once after a quiet period.
    pub conn_burst_per_ip: u32,
    /// Frames per second one logged-in user may send to logic, over all its devices (token
    /// bucket). Heartbeats (answered by the gate) and `DeliverAck`s (their rate follows the
    /// server's pushes) are not counted. Over the limit a frame is answered with
    /// `Error Overloaded` and dropped; the connection stays.
    pub msg_rate_per_user: u32,
    /// Bucket size of the above.
    pub msg_burst_per_user: u32,
    /// A connection that has had this many frames refused by the message rate since its user's
    /// bucket was last full is closed (`Error Overloaded`): it ignores the back-off. 0 = never.
    pub msg_refusals_before_close: u32,
    /// Failed logins (`BadToken`) from one source address, within `login_fail_window`, after
    /// which logins from that address are refused for a back-off period.
    pub login_fails_per_ip: u32,
    /// Failed logins of one user id after which that user's logins are refused for a back-off
    /// period from every address that has failed a login itself (an address with a clean record
    /// still gets through, so an attacker cannot lock the real user out).
    pub login_fails_per_uid: u32,
    /// First back-off period; each further failure doubles it (`login_backoff_ms`).
    #[serde(rename = "login_backoff_ms", deserialize_with = "millis")]
    pub login_backoff: Duration,
    /// Longest back-off period (`login_backoff_max_secs`).
    #[serde(rename = "login_backoff_max_secs", deserialize_with = "secs")]
    pub login_backoff_max: Duration,
    /// Failures are forgotten after this long without a new one (`login_fail_window_secs`).
    #[serde(rename = "login_fail_window_secs", deserialize_with = "secs")]
    pub login_fail_window: Duration,
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_millis)
}

fn secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_secs)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1_000_000,
            max_conns_per_ip: 10_000,
            conn_rate_per_ip: 500,
            conn_burst_per_ip: 5_000,
            msg_rate_per_user: 50,
            msg_burst_per_user: 100,
            msg_refusals_before_close: 200,
            login_fails_per_ip: 20,
            login_fails_per_uid: 5,
            login_backoff: Duration::from_secs(1),
            login_backoff_max: Duration::from_secs(300),
            login_fail_window: Duration::from_secs(600),
        }
    }
}

/// Shards of the per-IP table.
pub const SHARDS: usize = 64;

/// A token bucket in thousandths of a token, refilled lazily from a millisecond clock.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli: u64,
    at_ms: u64,
}

impl Bucket {
    fn full(burst: u32, now: u64) -> Bucket {
        Bucket {
            milli: u64::from(burst.max(1)) * 1000,
            at_ms: now,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: u64) {
        let cap = u64::from(burst.max(1)) * 1000;
        let elapsed = now.saturating_sub(self.at_ms);
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(rate)))
            .min(cap);
        self.at_ms = self.at_ms.max(now);
    }

    /// Takes one token if there is one.
    fn take(&mut self, rate: u32, burst: u32, now: u64) -> bool {
        self.refill(rate, burst, now);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    fn is_full(mut self, rate: u32, burst: u32, now: u64) -> bool {
        self.refill(rate, burst, now);
        self.milli >= u64::from(burst.max(1)) * 1000
    }
}

/// Failed logins of one address or user, with the back-off they earned.
#[derive(Clone, Copy, Debug, Default)]
struct Fails {
    count: u32,
    last_ms: u64,
    until_ms: u64,
}

impl Fails {
    fn record(&mut self, threshold: u32, lim: &Limits, now: u64) {
        if now.saturating_sub(self.last_ms) >= ms(lim.login_fail_window) {
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.last_ms = now;
        if threshold > 0 && self.count >= threshold {
            let doublings = (self.count - threshold).min(30);
            let d = ms(lim.login_backoff)
                .saturating_mul(1 << doublings)
                .min(ms(lim.login_backoff_max));
            self.until_ms = now + d;
        }
    }

    /// Milliseconds left in the back-off, if any.
    fn blocked_for(&self, now: u64) -> Option<u64> {
        (self.until_ms > now).then(|| self.until_ms - now)
    }

    /// Failures within the window (or a back-off still running).
    fn active(&self, lim: &Limits, now: u64) -> bool {
        (self.count > 0 && now.saturating_sub(self.last_ms) < ms(lim.login_fail_window))
            || self.until_ms > now
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// A source address as limited: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by its /64 (what one
/// subscriber is usually given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey([u8; 16]);

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpKey(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpKey(o)
            }
        }
    }

    fn shard(&self) -> usize {
        let x = u128::from_be_bytes(self.0);
        let h = ((x >> 64) as u64 ^ x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 58) as usize % SHARDS
    }
}

#[derive(Debug)]
struct IpEntry {
    conns: u32,
    bucket: Bucket,
    fails: Fails,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The gate holds `max_connections` sockets.
    MaxConnections,
    /// The address holds `max_conns_per_ip` sockets.
    IpConnections,
    /// The address opens connections faster than `conn_rate_per_ip`.
    IpRate,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "gate full, retry later or use another gate",
            Refusal::IpConnections => "too many connections from this address",
            Refusal::IpRate => "connecting too fast from this address, retry later",
        }
    }
}

/// Gate-wide admission state: the connection count and the per-IP table (see the module docs).
pub struct Admission {
    lim: Limits,
    epoch: Instant,
    open: AtomicUsize,
    shards: Box<[Mutex<HashMap<IpKey, IpEntry>>]>,
}

/// One admitted socket: releases its address's and the gate's count when dropped.
pub struct Slot {
    adm: Arc<Admission>,
    key: IpKey,
}

impl Slot {
    pub fn key(&self) -> IpKey {
        self.key
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.adm.release(self.key);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Slot").field(&self.key).finish()
    }
}

impl Admission {
    pub fn new(lim: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            lim,
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Milliseconds since the gate started (the clock of every bucket and back-off).
    pub fn now_ms(&self) -> u64 {
        ms(self.epoch.elapsed())
    }

    /// Sockets currently admitted.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn shard(&self, key: &IpKey) -> MutexGuard<'_, HashMap<IpKey, IpEntry>> {
        // A panic aborts the process (see ARCHITECTURE.md), so a poisoned lock is never seen in
        // practice; the data is plain counters anyway.
        self.shards[key.shard()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new socket from `ip`, or says why not. Every attempt takes a token from the
    /// address's bucket, refused ones too, so an address that keeps hammering stays throttled.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let lim = &self.lim;
        let key = IpKey::of(ip);
        let now = self.now_ms();
        let mut shard = self.shard(&key);
        let e = shard.entry(key).or_insert_with(|| IpEntry {
            conns: 0,
            bucket: Bucket::full(lim.conn_burst_per_ip, now),
            fails: Fails::default(),
        });
        if lim.conn_rate_per_ip > 0
            && !e
                .bucket
                .take(lim.conn_rate_per_ip, lim.conn_burst_per_ip, now)
        {
            return Err(Refusal::IpRate);
        }
        if lim.max_conns_per_ip > 0 && e.conns >= lim.max_conns_per_ip {
            return Err(Refusal::IpConnections);
        }
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        if lim.max_connections > 0 && before >= lim.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::MaxConnections);
        }
        e.conns += 1;
        Ok(Slot {
            adm: self.clone(),
            key,
        })
    }

    fn release(&self, key: IpKey) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        let now = self.now_ms();
        let mut shard = self.shard(&key);
        if let Some(e) = shard.get_mut(&key) {
            e.conns = e.conns.saturating_sub(1);
            if self.idle(e, now) {
                shard.remove(&key);
            }
        }
    }

    /// An entry that carries no information any more: no socket, full bucket, no failures.
    fn idle(&self, e: &IpEntry, now: u64) -> bool {
        let lim = &self.lim;
        e.conns == 0
            && (lim.conn_rate_per_ip == 0
                || e.bucket
                    .is_full(lim.conn_rate_per_ip, lim.conn_burst_per_ip, now))
            && !e.fails.active(lim, now)
    }

    /// The address's login back-off: milliseconds left (if refused now), and whether the
    /// address failed a login within the window.
    fn login_state(&self, key: IpKey, now: u64) -> (Option<u64>, bool) {
        match self.shard(&key).get(&key) {
            Some(e) => (e.fails.blocked_for(now), e.fails.active(&self.lim, now)),
            None => (None, false),
        }
    }

    fn login_failed(&self, key: IpKey, now: u64) {
        let mut shard = self.shard(&key);
        // The entry exists while the socket's slot lives.
        if let Some(e) = shard.get_mut(&key) {
            e.fails.record(self.lim.login_fails_per_ip, &self.lim, now);
        }
    }

    /// Drops the idle entries of shard `i` (entries of addresses that left while their bucket
    /// was not full, or whose failures expired).
    fn sweep(&self, i: usize, now: u64) {
        let mut shard = self.shards[i % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        shard.retain(|_, e| !self.idle(e, now));
    }

    /// Entries in the per-IP table.
    #[cfg(test)]
    fn ip_entries(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                self.shards[i]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .len()
            })
            .sum()
    }
}

/// Per-user policy state of one core (the users it owns). Single-threaded.
#[derive(Default)]
pub struct CoreLimits {
    /// Message-rate buckets of users with a logged-in connection here (or that left with a
    /// bucket that was not full yet: see `lingering`).
    users: im_shared::fast::FastMap<UserId, UserRate>,
    /// Users whose last connection closed while their bucket was not full: their entry stays
    /// until it is, so that reconnecting does not refill it. Checked every second.
    lingering: Vec<UserId>,
    /// Failed logins per user id.
    uid_fails: im_shared::fast::FastMap<UserId, Fails>,
}

struct UserRate {
    bucket: Bucket,
    /// Frames refused since the bucket was last full.
    refused: u32,
    /// Logged-in connections of the user on this core.
    conns: u32,
}

/// At most this many user ids are tracked for failed logins per core; beyond it new ids are not
/// tracked (the per-address back-off still applies to them).
const MAX_UID_FAILS: usize = 1 << 20;

impl Core {
    fn lim(&self) -> &Limits {
        &self.ctx.cfg.limits
    }

    /// Accept-time admission of a socket. A refused socket is closed when the caller drops it;
    /// on a `plain` protocol-v1 socket (no TLS, no WebSocket) it first gets a best-effort
    /// `Error Overloaded` (one non-blocking send, no task). TLS and WebSocket clients just see
    /// the close: a handshake for a connection that is refused anyway is not worth its cost.
    pub(crate) fn admit_socket(
        &self,
        stream: &monoio::net::TcpStream,
        peer: std::net::SocketAddr,
        plain: bool,
    ) -> Option<Slot> {
        let refusal = match self.ctx.admission.admit(peer.ip()) {
            Ok(slot) => return Some(slot),
            Err(r) => r,
        };
        let st = &self.ctx.stats;
        match refusal {
            Refusal::MaxConnections => &st.refused_max_connections,
            Refusal::IpConnections => &st.refused_ip_connections,
            Refusal::IpRate => &st.refused_ip_rate,
        }
        .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, ?refusal, "connection refused at accept");
        if !plain {
            return None;
        }
        let frame = Command::Error {
            code: ErrorCode::Overloaded,
            message: refusal.message().to_owned(),
        }
        .to_bytes(0);
        // SAFETY: plain syscall on a descriptor owned by `stream`, which outlives the call.
        unsafe {
            libc::send(
                stream.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
        None
    }

    /// At adopt, before the login is forwarded: refuses it (`LoginResult Overloaded`, then
    /// close) while its address or its user is in a failed-login back-off. Returns whether it
    /// refused.
    pub(crate) fn refuse_login(&self, c: &Rc<Conn>, req_id: u32) -> bool {
        let Some(key) = c.slot.get().map(Slot::key) else {
            return false;
        };
        let adm = &self.ctx.admission;
        let now = adm.now_ms();
        let (ip_block, ip_dirty) = adm.login_state(key, now);
        let uid_block = if ip_dirty {
            self.limits
                .borrow()
                .uid_fails
                .get(&c.uid.get())
                .and_then(|f| f.blocked_for(now))
        } else {
            None
        };
        let (left, what) = match (ip_block, uid_block) {
            (Some(l), _) => (l, "from this address"),
            (None, Some(l)) => (l, "for this user"),
            (None, None) => return false,
        };
        self.ctx
            .stats
            .login_backoff_refused
            .fetch_add(1, Ordering::Relaxed);
        let r = Command::LoginResult {
            code: ErrorCode::Overloaded,
            server_time_ms: crate::conn::unix_ms(),
            max_seq: Seq(0),
            heartbeat_secs: 0,
            message: format!(
                "too many failed logins {what}, retry in {} s",
                left.div_ceil(1000)
            ),
        };
        c.enqueue(self, r.to_bytes(req_id));
        c.close_after_flush(self);
        true
    }

    /// Logic closes a connection whose login it had not accepted: a `LoginResult BadToken`
    /// counts as a failed login of the user and of the address.
    pub(crate) fn on_login_closed(&self, c: &Conn, data: &[u8]) {
        if !c.login_sent.get() || c.logged_in.get() || !is_bad_token(data) {
            return;
        }
        self.ctx
            .stats
            .login_failures
            .fetch_add(1, Ordering::Relaxed);
        let adm = &self.ctx.admission;
        let now = adm.now_ms();
        if let Some(slot) = c.slot.get() {
            adm.login_failed(slot.key(), now);
        }
        let lim = self.lim();
        let mut l = self.limits.borrow_mut();
        let uid = c.uid.get();
        if l.uid_fails.len() < MAX_UID_FAILS || l.uid_fails.contains_key(&uid) {
            l.uid_fails
                .entry(uid)
                .or_default()
                .record(lim.login_fails_per_uid, lim, now);
        }
    }

    /// Logic accepted a login of `uid` on this core.
    pub(crate) fn on_bound(&self, uid: UserId) {
        let lim = self.lim();
        if lim.msg_rate_per_user == 0 {
            return;
        }
        let now = self.ctx.admission.now_ms();
        let mut l = self.limits.borrow_mut();
        let u = l.users.entry(uid).or_insert_with(|| UserRate {
            bucket: Bucket::full(lim.msg_burst_per_user, now),
            refused: 0,
            conns: 0,
        });
        u.conns += 1;
    }

    /// A logged-in connection of `uid` left this core.
    pub(crate) fn on_unbound(&self, uid: UserId) {
        let lim = self.lim();
        let now = self.ctx.admission.now_ms();
        let mut l = self.limits.borrow_mut();
        let Some(u) = l.users.get_mut(&uid) else {
            return;
        };
        u.conns = u.conns.saturating_sub(1);
        if u.conns == 0 {
            if u.bucket
                .is_full(lim.msg_rate_per_user, lim.msg_burst_per_user, now)
            {
                l.users.remove(&uid);
            } else {
                l.lingering.push(uid);
            }
        }
    }

    /// The per-user message rate, for a frame about to be forwarded to logic. `None`: forward
    /// it. `Some(keep_reading)`: it was refused (the answer is queued), and whether the
    /// connection stays.
    pub(crate) fn limit_frame(&self, c: &Rc<Conn>, cmd: Cmd, req_id: u32) -> Option<bool> {
        let lim = self.lim();
        if lim.msg_rate_per_user == 0 || cmd == Cmd::DeliverAck {
            return None;
        }
        let now = self.ctx.admission.now_ms();
        let close = {
            let mut l = self.limits.borrow_mut();
            let u = l.users.get_mut(&c.uid.get())?;
            let (rate, burst) = (lim.msg_rate_per_user, lim.msg_burst_per_user);
            if u.bucket.is_full(rate, burst, now) {
                u.refused = 0;
            }
            if u.bucket.take(rate, burst, now) {
                return None;
            }
            u.refused = u.refused.saturating_add(1);
            lim.msg_refusals_before_close > 0 && u.refused > lim.msg_refusals_before_close
        };
        self.ctx.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        if close {
            self.ctx
                .stats
                .closed_rate_limit
                .fetch_add(1, Ordering::Relaxed);
            c.close_with(
                self,
                req_id,
                ErrorCode::Overloaded,
                "message rate limit exceeded, closing",
            );
            return Some(false);
        }
        c.enqueue(
            self,
            Command::Error {
                code: ErrorCode::Overloaded,
                message: "message rate limit, slow down and retry".into(),
            }
            .to_bytes(req_id),
        );
        Some(true)
    }

    /// Once a second from the ticker: forgets what no longer limits anybody.
    pub(crate) fn sweep_limits(&self, now_secs: u32) {
        let lim = self.lim();
        let adm = &self.ctx.admission;
        let now = adm.now_ms();
        // One shard of the shared IP table per core and second: the whole table every
        // SHARDS / cores seconds.
        let cores = self.ctx.peers.len().max(1);
        adm.sweep(now_secs as usize * cores + self.ctx.core as usize, now);
        let mut guard = self.limits.borrow_mut();
        let l = &mut *guard;
        let users = &mut l.users;
        l.lingering.retain(|uid| match users.get(uid) {
            Some(u) if u.conns > 0 => false, // back online: the entry is live again
            Some(u) => {
                if u.bucket
                    .is_full(lim.msg_rate_per_user, lim.msg_burst_per_user, now)
                {
                    users.remove(uid);
                    false
                } else {
                    true
                }
            }
            None => false,
        });
        if now_secs.is_multiple_of(10) {
            l.uid_fails.retain(|_, f| f.active(lim, now));
        }
    }
}

/// Whether `data` is a `LoginResult` frame with code `BadToken`.
fn is_bad_token(data: &[u8]) -> bool {
    data.len() >= HEADER_LEN + 2
        && data[3] == Cmd::LoginResult as u8
        && u16::from_be_bytes([data[HEADER_LEN], data[HEADER_LEN + 1]])
            == ErrorCode::BadToken as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let mut b = Bucket::full(3, 0);
        assert!(b.take(10, 3, 0) && b.take(10, 3, 0) && b.take(10, 3, 0));
        assert!(!b.take(10, 3, 0));
        assert!(!b.take(10, 3, 99)); // 0.99 token
        assert!(b.take(10, 3, 100));
        assert!(b.is_full(10, 3, 100 + 300));
        assert!(!b.is_full(10, 3, 100 + 299));
        // A long pause refills only up to the burst.
        let mut b = Bucket::full(2, 0);
        assert!(b.take(1, 2, 1_000_000) && b.take(1, 2, 1_000_000));
        assert!(!b.take(1, 2, 1_000_000));
    }

    #[test]
    fn backoff_doubles_then_caps_and_is_forgotten_after_the_window() {
        let lim = Limits {
            login_backoff: Duration::from_millis(100),
            login_backoff_max: Duration::from_millis(350),
            login_fail_window: Duration::from_secs(10),
            ..Limits::default()
        };
        let mut f = Fails::default();
        f.record(3, &lim, 1);
        f.record(3, &lim, 2);
        assert_eq!(f.blocked_for(2), None);
        f.record(3, &lim, 3);
        assert_eq!(f.blocked_for(3), Some(100));
        f.record(3, &lim, 200);
        assert_eq!(f.blocked_for(200), Some(200));
        f.record(3, &lim, 500);
        assert_eq!(f.blocked_for(500), Some(350));
        assert!(f.active(&lim, 9_000));
        assert!(!f.active(&lim, 10_500));
        // After the window the count starts over: one failure is no back-off.
        f.record(3, &lim, 20_000);
        assert_eq!((f.count, f.blocked_for(20_000)), (1, None));
    }

    #[test]
    fn ip_keys_fold_mapped_v4_and_v6_subnets() {
        let k = |s: &str| IpKey::of(s.parse().unwrap());
        assert_eq!(k("10.1.2.3"), k("::ffff:10.1.2.3"));
        assert_ne!(k("10.1.2.3"), k("10.1.2.4"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[test]
    fn admission_counts_per_ip_and_gate_wide() {
        let adm = Admission::new(Limits {
            max_connections: 3,
            max_conns_per_ip: 2,
            conn_rate_per_ip: 0,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = adm.admit(a).unwrap();
        let a2 = adm.admit(a).unwrap();
        assert_eq!(adm.admit(a).unwrap_err(), Refusal::IpConnections);
        let b1 = adm.admit(b).unwrap();
        assert_eq!(adm.admit(b).unwrap_err(), Refusal::MaxConnections);
        assert_eq!(adm.open(), 3);
        drop(a1);
        let a3 = adm.admit(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(adm.open(), 0);
        assert_eq!(adm.ip_entries(), 0, "idle entries are dropped at release");
    }

    #[test]
    fn admission_rate_limits_per_ip() {
        let adm = Admission::new(Limits {
            conn_rate_per_ip: 1,
            conn_burst_per_ip: 2,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let _s = (adm.admit(a).unwrap(), adm.admit(a).unwrap());
        assert_eq!(adm.admit(a).unwrap_err(), Refusal::IpRate);
        assert!(adm.admit("10.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn bad_token_is_recognised() {
        let r = |code| {
            Command::LoginResult {
                code,
                server_time_ms: 0,
                max_seq: Seq(0),
                heartbeat_secs: 0,
                message: "x".into(),
            }
            .to_bytes(1)
        };
        assert!(is_bad_token(&r(ErrorCode::BadToken)));
        assert!(!is_bad_token(&r(ErrorCode::TokenExpired)));
        let e = Command::Error {
            code: ErrorCode::BadToken,
            message: String::new(),
        }
        .to_bytes(1);
        assert!(!is_bad_token(&e));
    }
}
