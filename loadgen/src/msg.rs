//! What the coordinator and its worker processes say to each other: one JSON object per line,
//! requests on the worker's stdin, events on its stdout.
//!
//! Latency histograms travel as real HDR histograms (V2 serialization, hex encoded) so that the
//! coordinator merges them exactly instead of averaging percentiles. Message identities for the
//! loss/duplicate join travel as packed `(from, to, counter)` triples of user indices.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Everything a worker needs to know, passed once on its command line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub worker: u32,
    /// Index (0-based, relative to `uid_base`) of the first user this worker owns.
    pub first: u32,
    /// Number of users (= connections) this worker owns.
    pub count: u32,
    /// Users across all workers: recipients are drawn from `0..total`.
    pub total: u32,
    /// glommio executors (threads) in this worker.
    pub cores: u32,
    /// Pin executor `i` of worker `w` to CPU `(w * cores + i) % ncpu`.
    pub pin: bool,
    pub io_memory_kib: usize,
    /// Gates; a user connects to `server[uid % len]`.
    pub server: Vec<SocketAddr>,
    pub token_secret: String,
    pub uid_base: u64,
    pub src_ips: Vec<Ipv4Addr>,
    pub heartbeat_secs: u32,
    pub login_timeout_ms: u64,
    pub ack_timeout_ms: u64,
    /// Total body size of a c2c message (at least [`BODY_HEADER`] bytes).
    pub body_size: usize,
    /// Record every message's identity for the exact loss/duplicate join.
    pub track: bool,
    /// Random seed (per worker it is mixed with the worker and executor index).
    pub seed: u64,
    /// `group` scenario: number of groups and members per group (see [`group_member`]); 0 for
    /// the other scenarios.
    #[serde(default)]
    pub groups: u32,
    #[serde(default)]
    pub group_size: u32,
    /// Gate ids of `server` (same order) when the gates came from the iplist (`--iplist`): each
    /// user tries them in its rendezvous order (docs/API.md). Empty: user `uid` starts at
    /// `server[uid % len]` and walks on from there.
    #[serde(default)]
    pub gate_ids: Vec<u16>,
    /// The wait before each reconnect attempt (the iplist's `backoff`).
    #[serde(default)]
    pub backoff: Backoff,
    /// A user that has never logged in stops retrying this long after its first attempt (a user
    /// that was logged in once keeps reconnecting until the run ends).
    #[serde(default = "default_login_retry_ms")]
    pub login_retry_ms: u64,
    /// A send whose ack has not come this long after it went out is sent again on the same
    /// connection (same `client_msg_id`); 0: only after a re-login.
    #[serde(default)]
    pub resend_ms: u64,
    /// Never acknowledge deliveries (a client that receives and never sends `DeliverAck`).
    #[serde(default)]
    pub no_deliver_ack: bool,
}

fn default_login_retry_ms() -> u64 {
    60_000
}

/// Reconnect backoff, as the iplist hands it out: the wait before attempt `n` (0-based, reset
/// after a connection that stayed logged in for [`im_client::core::STABLE_MS`]) is
/// `min(max_ms, initial_ms * multiplier^n)` times a random factor in `[1 - jitter, 1 + jitter]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
}

impl Backoff {
    /// The wait before attempt `attempt`, with `unit` uniform in `[0, 1)`.
    pub fn wait_ms(&self, attempt: u32, unit: f64) -> u64 {
        self.core().wait_ms(attempt, unit)
    }

    /// The client core's backoff (this one only adds serde for the plan).
    pub fn core(&self) -> im_client::core::Backoff {
        im_client::core::Backoff {
            initial_ms: self.initial_ms,
            max_ms: self.max_ms,
            multiplier: self.multiplier,
            jitter: self.jitter,
        }
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

/// Member `j` (`0..size`) of group `k` among `users` users: groups are consecutive runs of user
/// indices, wrapping around, so group `k` = users `[k*size .. k*size+size)` mod `users`. Member 0
/// is the owner (it creates the group). Members of one group are distinct when `size <= users`.
pub fn group_member(k: u32, j: u32, size: u32, users: u32) -> u32 {
    ((k as u64 * size as u64 + j as u64) % users.max(1) as u64) as u32
}

/// All members of group `k`, owner first.
pub fn group_members(k: u32, size: u32, users: u32) -> impl Iterator<Item = u32> {
    (0..size).map(move |j| group_member(k, j, size, users))
}

/// Bytes of the c2c body the loadgen interprets: send wall-clock ns, sender index, counter, and
/// the attempt (0 for the first send, n for the n-th repetition, saturating at 255).
pub const BODY_HEADER: usize = 8 + 4 + 4 + 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Connect and log in every user of the worker at `rate` connections/s (0 = no limit).
    Login { rate: f64 },
    /// Keep the connections (heartbeats) for `secs`.
    Hold { secs: f64 },
    /// Send c2c messages at `rate` msgs/s (the worker's share) for `secs`, then wait for the acks.
    Send { rate: f64, secs: f64 },
    /// Every logged-in owner (member 0) creates its groups; done when all are answered (or after
    /// the ack timeout). The report carries the new group ids.
    CreateGroups,
    /// The id of every group (index = group number; 0 = not created).
    SetGroups { ids: Vec<u64> },
    /// Random members post to their groups at `rate` posts/s in total (each executor takes its
    /// share of the memberships) for `secs`, then wait for the acks.
    SendGroup { rate: f64, secs: f64 },
    /// `large-group` scenario: the executor owning user 0 creates one group with users
    /// `0..initial` (at most the server's create limit), then adds users `initial..members` with
    /// `GroupAdd`s of `batch` members, at most `window` in flight (a batch refused with a
    /// retryable code is sent again a second later); finally it reads the group's head with a
    /// one-entry `GroupSync`. Every other executor answers at once. The report carries the id
    /// (`group_ids`), the add counters and `large_head`.
    BuildLarge {
        members: u32,
        initial: u32,
        batch: u32,
        window: u32,
    },
    /// `large-group` scenario: track large group `group` from its seq `head` on (every
    /// connection's group timeline starts there: what the build pushed is not counted), then
    /// wait until every logged-in user has the group's `BecameLarge` event in its own timeline
    /// (its shard sends it the group's posts from then on), at most `max_secs`.
    LargeReady {
        group: u64,
        head: u64,
        max_secs: f64,
    },
    /// `large-group` scenario, after the posts drained: the executor owning user 0 (the owner)
    /// posts one `@all` to large group `group` (a `SendC2g` whose mentions are uid 0, with the
    /// usual body, send time included) and waits for its ack (at most the ack timeout); every
    /// other executor answers at once. The report carries the ack and `mention_msg_id`.
    MentionAll { group: u64 },
    /// `large-group` scenario, after `MentionAll`: wait until every user that was online, but
    /// the poster, holds the `@all`'s mention entry and nothing arrived for `quiet_ms` (at most
    /// `max_secs`). The report carries the `mention_*` counts.
    MentionWait { max_secs: f64, quiet_ms: u64 },
    /// Wait until no message arrived for `quiet_ms` (at most `max_secs`).
    Drain { quiet_ms: u64, max_secs: f64 },
    /// Return the counters of the current step and reset them.
    Report,
    /// Drop every connection at once, reconnect at `rate` (0 = no limit), log in with the last
    /// seq held and sync; done when all are back.
    /// `fraction`: the share of users that drop (index mod 1000 below fraction × 1000).
    Storm { rate: f64, fraction: f64 },
    /// Close everything and exit.
    Quit,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// Cumulative counters once a second, with the latency histograms of the last interval.
    Progress(Box<Progress>),
    /// A request finished; `report` only for `Report` (and `Login`/`Storm`, which carry timing).
    Done {
        id: u64,
        report: Option<Box<Report>>,
    },
    Fatal {
        message: String,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub worker: u32,
    pub connected: u64,
    pub logged_in: u64,
    pub login_failed: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub disconnects: u64,
    pub rss_kib: u64,
    pub ack_us: Hist,
    pub deliver_us: Hist,
}

/// Counters of one step. Merged executor → worker → coordinator with [`Report::merge`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    // --- connections ---
    pub attempted: u64,
    pub logged_in: u64,
    /// Login failures by reason (error code name, `connect: <errno>`, `timeout`, `closed`).
    pub login_failures: BTreeMap<String, u64>,
    /// Wall clock (Unix ns) of the first connect attempt and of the last successful login.
    pub first_connect_ns: Option<u64>,
    pub last_login_ns: Option<u64>,
    /// Connect + login round trip.
    pub login_us: Hist,
    /// Connections lost after login, by reason.
    pub disconnects: BTreeMap<String, u64>,
    pub heartbeats: u64,
    pub heartbeat_acks: u64,
    // --- storm ---
    /// Connections the storm dropped.
    pub dropped: u64,
    /// Time from the drop until the connection was logged in and synced.
    pub back_us: Hist,
    pub synced: u64,
    /// Lost connections that reconnected, logged in and synced.
    pub reconnected: u64,
    /// Time from a lost connection until the user was logged in and synced again.
    pub reconnect_us: Hist,
    /// Each such reconnect: when the connection was lost (Unix ms) and how long until the user
    /// was back (ms); the first [`MAX_RECONNECT_TIMES`] of the run, so a chaos run can tell
    /// the clients' recovery by the fault that caused it.
    #[serde(default)]
    pub reconnect_times: Vec<(u64, u32)>,
    /// Connection attempts after a failed login or a lost connection (each after its backoff).
    pub retries: u64,
    /// Sends repeated after a re-login because their ack never came on the lost connection
    /// (same `client_msg_id`: the server's dedup answers them with the first ack).
    pub resent: u64,
    /// Users that were logged in during the run but were not logged in and synced at the
    /// report (still reconnecting, or stopped by a non-retryable end), and their indices.
    pub not_back: u64,
    pub not_back_ids: Vec<u32>,
    /// Users that never logged in and stopped retrying (`login_retry_ms` passed, or a
    /// non-retryable refusal).
    pub gave_up: u64,
    // --- messages ---
    pub sent: u64,
    pub acked: u64,
    /// SendAck / Error codes other than Ok, by name.
    pub send_errors: BTreeMap<String, u64>,
    /// Sent, never answered within the ack timeout (or the connection died first).
    pub ack_timeouts: u64,
    /// New messages from other users accepted into a timeline (after seq dedup).
    pub delivered: u64,
    /// Of `delivered`, how many came through a sync page instead of a push.
    pub delivered_by_sync: u64,
    /// Copies of a user's own messages (the sender's timeline gets one too).
    pub echoes: u64,
    /// Entries dropped by the client's seq dedup (seq <= last seq held): raw duplicates.
    pub raw_dups: u64,
    /// Entries with a new seq but a `(from, client_msg_id)` this recipient already holds:
    /// duplicates that survive client dedup (an invariant violation).
    pub dedup_dups: u64,
    /// Per (from → to) the sender's counter went backwards.
    pub out_of_order: u64,
    /// Messages that arrived after later ones of the same sender because the loadgen itself sent
    /// them again after a refusal or a lost connection (the stored copy is a repetition: its
    /// first attempt was not accepted), so the server accepted them later. Not `out_of_order`.
    pub reordered_by_resend: u64,
    /// Gaps detected through `prev_seq` (each leads to a sync).
    pub gaps: u64,
    /// `Deliver` pushes whose seq is below one already pushed on the same connection (the server
    /// pushed a timeline out of seq order; the client fixes it up through sync).
    pub push_reorders: u64,
    pub sync_requests: u64,
    pub ack_us: Hist,
    pub deliver_us: Hist,
    /// Wall clock of the first send and the last ack/delivery of the step (Unix ns).
    pub first_send_ns: Option<u64>,
    pub last_ack_ns: Option<u64>,
    pub last_deliver_ns: Option<u64>,
    /// Identities for the exact join (when the plan tracks): acknowledged sends, sends never
    /// acknowledged, and distinct deliveries. In the `group` scenario the sends' `to` is the
    /// group number and a delivery's `to` is the member that received it; deliveries are in the
    /// order each member accepted them (its timeline order), which the group order check uses.
    pub acked_ids: Packed,
    pub unacked_ids: Packed,
    pub received_ids: Packed,
    /// Worker RSS (sum over workers after merging).
    pub rss_kib: u64,
    // --- groups ---
    /// `(group number, group id)` of the groups created in this step.
    pub group_ids: Vec<(u32, u64)>,
    /// Group creations refused or unanswered, by reason.
    pub group_create_errors: BTreeMap<String, u64>,
    /// Group events (created, ...) accepted into timelines: not messages, not counted above.
    pub group_events: u64,
    // --- large groups (read diffusion; `large-group` scenario) ---
    /// `GroupAdd`s answered Ok, the members they added, their latency (request → `OpResult`).
    #[serde(default)]
    pub adds_ok: u64,
    #[serde(default)]
    pub members_added: u64,
    #[serde(default)]
    pub add_us: Hist,
    /// `GroupAdd`s refused (each refusal once, a retried batch may be refused again) or never
    /// answered, by `Code: message`.
    #[serde(default)]
    pub add_errors: BTreeMap<String, u64>,
    /// Batches that were never added (a final refusal or no answer).
    #[serde(default)]
    pub adds_failed: u64,
    /// The group's last seq after the build (from the owner's `GroupSync`); 0 if not large.
    #[serde(default)]
    pub large_head: u64,
    /// Why the head could not be read, if it could not.
    #[serde(default)]
    pub head_error: Option<String>,
    /// Logged-in users with (without) the group's `BecameLarge` in their own timeline when
    /// `LargeReady` ended.
    #[serde(default)]
    pub large_ready: u64,
    #[serde(default)]
    pub large_not_ready: u64,
    /// `GroupDeliver` frames of the tracked group received before its tracking started (the
    /// build's events, pushed live to the members already online), and their body bytes.
    #[serde(default)]
    pub build_pushes: u64,
    #[serde(default)]
    pub build_push_bytes: u64,
    /// `GroupDeliver` frames of the tracked group received while tracking it.
    #[serde(default)]
    pub group_pushes: u64,
    /// The group timeline's counterparts of `raw_dups`, `gaps`, `push_reorders`,
    /// `sync_requests` (`GroupSync` requests).
    #[serde(default)]
    pub group_raw_dups: u64,
    #[serde(default)]
    pub group_gaps: u64,
    #[serde(default)]
    pub group_push_reorders: u64,
    #[serde(default)]
    pub group_sync_requests: u64,
    /// Entries of a `GroupSyncPage` whose `prev_seq` the member did not hold: the group's
    /// timeline itself has a hole there (accepted anyway; must be 0).
    #[serde(default)]
    pub group_holes: u64,
    /// `(poster, counter, group seq)` of each post, once per distinct seq an executor saw it
    /// with (at a member, or in the poster's `SendAck`): every post has exactly one seq.
    #[serde(default)]
    pub post_seqs: Packed,
    /// `@all` (`--mention-all`): the msg_id of the owner's `SendAck` (0 = none).
    #[serde(default)]
    pub mention_msg_id: u64,
    /// Distinct msg_ids the mention entries of this run carried (all must be the post's).
    #[serde(default)]
    pub mention_msg_ids: Vec<u64>,
    /// Users that were online, but the poster (`MentionWait`): expected to hold one mention
    /// entry each; those that hold one, those that hold none.
    #[serde(default)]
    pub mention_expected: u64,
    #[serde(default)]
    pub mention_received: u64,
    #[serde(default)]
    pub mention_missing: u64,
    /// Mention entries beyond a member's first (a new seq each: not the client's raw
    /// duplicates), and entries the poster got (it gets none).
    #[serde(default)]
    pub mention_dups: u64,
    #[serde(default)]
    pub mention_to_poster: u64,
    /// Send → mention entry, each member's first.
    #[serde(default)]
    pub mention_us: Hist,
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.max(b)
}

/// Reconnects a report keeps the times of (see [`Report::reconnect_times`]).
pub const MAX_RECONNECT_TIMES: usize = 200_000;

fn merge_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

impl Report {
    pub fn merge(&mut self, o: &Report) {
        self.attempted += o.attempted;
        self.logged_in += o.logged_in;
        merge_map(&mut self.login_failures, &o.login_failures);
        self.first_connect_ns = min_opt(self.first_connect_ns, o.first_connect_ns);
        self.last_login_ns = max_opt(self.last_login_ns, o.last_login_ns);
        self.login_us.merge(&o.login_us);
        merge_map(&mut self.disconnects, &o.disconnects);
        self.heartbeats += o.heartbeats;
        self.heartbeat_acks += o.heartbeat_acks;
        self.dropped += o.dropped;
        self.back_us.merge(&o.back_us);
        self.synced += o.synced;
        self.reconnected += o.reconnected;
        self.reconnect_us.merge(&o.reconnect_us);
        let room = MAX_RECONNECT_TIMES.saturating_sub(self.reconnect_times.len());
        self.reconnect_times
            .extend(o.reconnect_times.iter().take(room).copied());
        self.retries += o.retries;
        self.resent += o.resent;
        self.not_back += o.not_back;
        self.not_back_ids.extend_from_slice(&o.not_back_ids);
        self.gave_up += o.gave_up;
        self.sent += o.sent;
        self.acked += o.acked;
        merge_map(&mut self.send_errors, &o.send_errors);
        self.ack_timeouts += o.ack_timeouts;
        self.delivered += o.delivered;
        self.delivered_by_sync += o.delivered_by_sync;
        self.echoes += o.echoes;
        self.raw_dups += o.raw_dups;
        self.dedup_dups += o.dedup_dups;
        self.out_of_order += o.out_of_order;
        self.reordered_by_resend += o.reordered_by_resend;
        self.gaps += o.gaps;
        self.push_reorders += o.push_reorders;
        self.sync_requests += o.sync_requests;
        self.ack_us.merge(&o.ack_us);
        self.deliver_us.merge(&o.deliver_us);
        self.first_send_ns = min_opt(self.first_send_ns, o.first_send_ns);
        self.last_ack_ns = max_opt(self.last_ack_ns, o.last_ack_ns);
        self.last_deliver_ns = max_opt(self.last_deliver_ns, o.last_deliver_ns);
        self.acked_ids.extend(&o.acked_ids);
        self.unacked_ids.extend(&o.unacked_ids);
        self.received_ids.extend(&o.received_ids);
        self.rss_kib += o.rss_kib;
        self.group_ids.extend_from_slice(&o.group_ids);
        merge_map(&mut self.group_create_errors, &o.group_create_errors);
        self.group_events += o.group_events;
        self.adds_ok += o.adds_ok;
        self.members_added += o.members_added;
        self.add_us.merge(&o.add_us);
        merge_map(&mut self.add_errors, &o.add_errors);
        self.adds_failed += o.adds_failed;
        self.large_head = self.large_head.max(o.large_head);
        if self.head_error.is_none() {
            self.head_error.clone_from(&o.head_error);
        }
        self.large_ready += o.large_ready;
        self.large_not_ready += o.large_not_ready;
        self.build_pushes += o.build_pushes;
        self.build_push_bytes += o.build_push_bytes;
        self.group_pushes += o.group_pushes;
        self.group_raw_dups += o.group_raw_dups;
        self.group_gaps += o.group_gaps;
        self.group_push_reorders += o.group_push_reorders;
        self.group_sync_requests += o.group_sync_requests;
        self.group_holes += o.group_holes;
        self.post_seqs.extend(&o.post_seqs);
        self.mention_msg_id = self.mention_msg_id.max(o.mention_msg_id);
        self.mention_msg_ids.extend_from_slice(&o.mention_msg_ids);
        self.mention_msg_ids.sort_unstable();
        self.mention_msg_ids.dedup();
        self.mention_expected += o.mention_expected;
        self.mention_received += o.mention_received;
        self.mention_missing += o.mention_missing;
        self.mention_dups += o.mention_dups;
        self.mention_to_poster += o.mention_to_poster;
        self.mention_us.merge(&o.mention_us);
    }
}

/// A latency histogram in microseconds (1 µs .. 1 h, 3 significant digits).
#[derive(Clone, Debug)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"))
    }
}

impl Hist {
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }
    pub fn merge(&mut self, o: &Hist) {
        // Same bounds everywhere, so add cannot fail; saturate instead of panicking anyway.
        if self.0.add(&o.0).is_err() {
            for v in o.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }
    pub fn len(&self) -> u64 {
        self.0.len()
    }
    /// Percentile in milliseconds, `None` when nothing was recorded.
    pub fn ms_opt(&self, q: f64) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.ms(q))
    }
    /// Percentile in milliseconds (0 when empty).
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.value_at_quantile(q) as f64 / 1000.0
        }
    }
    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut buf)
            .map_err(|e| serde::ser::Error::custom(format!("{e:?}")))?;
        s.serialize_str(&hex_encode(&buf))
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex_decode(&s).ok_or_else(|| serde::de::Error::custom("bad hex"))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| serde::de::Error::custom(format!("{e:?}")))?;
        let mut out = Hist::default();
        out.merge(&Hist(h));
        Ok(out)
    }
}

/// Message identities `(from index, to index, sender counter)`, hex of little-endian u32s on the
/// wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packed(pub Vec<[u32; 3]>);

impl Packed {
    pub fn push(&mut self, from: u32, to: u32, counter: u32) {
        self.0.push([from, to, counter]);
    }
    pub fn extend(&mut self, o: &Packed) {
        self.0.extend_from_slice(&o.0);
    }
}

impl Serialize for Packed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(self.0.len() * 12);
        for t in &self.0 {
            for v in t {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        s.serialize_str(&hex_encode(&bytes))
    }
}

impl<'de> Deserialize<'de> for Packed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex_decode(&s).ok_or_else(|| serde::de::Error::custom("bad hex"))?;
        if bytes.len() % 12 != 0 {
            return Err(serde::de::Error::custom(
                "packed ids: length not a multiple of 12",
            ));
        }
        let u = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        Ok(Packed(
            bytes
                .chunks_exact(12)
                .map(|c| [u(&c[0..4]), u(&c[4..8]), u(&c[8..12])])
                .collect(),
        ))
    }
}

pub fn hex_encode(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    b.chunks_exact(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

/// How often an executor hands its latency histograms to its worker process, and a worker its
/// progress to the coordinator. Four times per printed second, so that each printed second gets
/// the latencies of its own deliveries (to within this much) and none gets an empty histogram.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_exactly_through_json() {
        let mut a = Hist::default();
        let mut b = Hist::default();
        for v in 1..=1000 {
            a.record(v);
        }
        for v in 1001..=2000 {
            b.record(v * 10);
        }
        let ja = serde_json::to_string(&a).unwrap();
        let jb = serde_json::to_string(&b).unwrap();
        let mut m: Hist = serde_json::from_str(&ja).unwrap();
        m.merge(&serde_json::from_str(&jb).unwrap());
        let mut direct = a.clone();
        direct.merge(&b);
        assert_eq!(m.len(), 2000);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                m.0.value_at_quantile(q),
                direct.0.value_at_quantile(q),
                "q={q}"
            );
        }
        assert!((m.ms(0.5) - 1.0).abs() < 0.01, "{}", m.ms(0.5));
        assert!(m.max_ms() >= 19.99);
    }

    #[test]
    fn packed_round_trips() {
        let mut p = Packed::default();
        p.push(1, 2, 3);
        p.push(u32::MAX, 0, 77);
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Packed>(&j).unwrap(), p);
        assert!(serde_json::from_str::<Packed>("\"abc\"").is_err());
    }

    #[test]
    fn requests_and_events_round_trip() {
        let r = Request {
            id: 3,
            op: Op::Send {
                rate: 10.0,
                secs: 2.0,
            },
        };
        let j = serde_json::to_string(&r).unwrap();
        let back: Request = serde_json::from_str(&j).unwrap();
        assert!(matches!(back.op, Op::Send { .. }));
        let mut rep = Report::default();
        rep.login_failures.insert("BadToken".into(), 2);
        rep.deliver_us.record(1500);
        let e = Event::Done {
            id: 3,
            report: Some(Box::new(rep)),
        };
        let j = serde_json::to_string(&e).unwrap();
        let Event::Done {
            report: Some(r), ..
        } = serde_json::from_str(&j).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.login_failures["BadToken"], 2);
        assert_eq!(r.deliver_us.len(), 1);
    }

    #[test]
    fn group_layout_is_consecutive_wraps_and_has_distinct_members() {
        assert_eq!(group_members(0, 3, 10).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(group_members(3, 3, 10).collect::<Vec<_>>(), vec![9, 0, 1]);
        // Owner = member 0; every group of size <= users has distinct members.
        for (size, users) in [(10, 2000), (500, 2000), (7, 30), (30, 30)] {
            for k in 0..50 {
                let mut m: Vec<u32> = group_members(k, size, users).collect();
                assert_eq!(m[0], group_member(k, 0, size, users));
                m.sort_unstable();
                m.dedup();
                assert_eq!(m.len(), size as usize);
                assert!(m.iter().all(|u| *u < users));
            }
        }
        let r = Request {
            id: 1,
            op: Op::SetGroups { ids: vec![0, 42] },
        };
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert!(matches!(back.op, Op::SetGroups { ids } if ids == vec![0, 42]));
        let mut a = Report {
            group_ids: vec![(0, 5)],
            ..Default::default()
        };
        let b = Report {
            group_ids: vec![(1, 6)],
            group_events: 3,
            ..Default::default()
        };
        a.merge(&b);
        let j: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!((j.group_ids, j.group_events), (vec![(0, 5), (1, 6)], 3));
    }

    #[test]
    fn reports_merge() {
        let mut a = Report {
            first_connect_ns: Some(10),
            last_login_ns: Some(20),
            sent: 5,
            ..Default::default()
        };
        let b = Report {
            first_connect_ns: Some(5),
            last_login_ns: Some(15),
            sent: 7,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!(
            (a.first_connect_ns, a.last_login_ns, a.sent),
            (Some(5), Some(20), 12)
        );
        // `@all`: the owner's msg_id, the entries' distinct msg_ids, the counts.
        let mut m = Report {
            mention_msg_id: 9,
            mention_msg_ids: vec![9],
            mention_received: 2,
            ..Default::default()
        };
        m.merge(&Report {
            mention_msg_ids: vec![9],
            mention_received: 3,
            mention_dups: 1,
            ..Default::default()
        });
        assert_eq!(
            (
                m.mention_msg_id,
                m.mention_msg_ids,
                m.mention_received,
                m.mention_dups
            ),
            (9, vec![9], 5, 1)
        );
    }
}
