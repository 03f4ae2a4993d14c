//! Counters of the logic tier, rendered in the Prometheus text format by the HTTP API.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use im_shared::prom::Histogram;
use im_shared::proto::{
    CONV_C2C, CONV_C2G, CONV_GROUP_EVENT, CONV_MENTION, CONV_READ, CONV_RECALL, CONV_S2C,
};

/// Shared by every worker of a node (relaxed atomics: monotonic counters only).
#[derive(Debug)]
pub struct Metrics {
    by_conv: [AtomicU64; 8],
    pub logins: AtomicU64,
    /// `Typing` commands forwarded, and refused by the per-connection rate limit.
    pub typing_sent: AtomicU64,
    pub typing_refused: AtomicU64,
    pub groups_created: AtomicU64,
    pub groups_made_large: AtomicU64,
    pub large_delivered: AtomicU64,
    /// `@all` posts of large groups whose mention entries are still being fanned out (all
    /// workers; a gauge), and the members whose entry such a fan-out sent.
    pub mention_all_running: AtomicU64,
    pub mention_all_entries: AtomicU64,
    pub c2s_queued: AtomicU64,
    pub c2s_failed: AtomicU64,
    pub pushes: AtomicU64,
    pub pushes_muted: AtomicU64,
    pub commits: AtomicU64,
    pub appends_retried: AtomicU64,
    /// Route changes dropped at a full directory publisher queue, and the full resyncs sent
    /// after them.
    pub dir_dropped: AtomicU64,
    pub dir_resyncs: AtomicU64,
    /// User states held in memory (all workers; a gauge).
    pub users_cached: AtomicU64,
    pub users_evicted: AtomicU64,
    /// Group states held in memory (all workers; a gauge).
    pub groups_cached: AtomicU64,
    pub groups_evicted: AtomicU64,
    /// Estimated bytes of the user states held in memory (all workers; a gauge).
    pub cache_bytes: AtomicU64,
    /// Online users whose recent `client_msg_id`s and pending notices were dropped from memory
    /// to keep within `max_cache_bytes` (reloaded from the store when needed).
    pub active_trimmed: AtomicU64,
    /// Messages waiting in each worker's inbox (client frames, appends and confirmations from
    /// other workers, group and API requests), as the worker saw it before its last round.
    inbox: Vec<AtomicU64>,
    /// Messages from other logic nodes handed to each worker and not taken yet.
    peer_inbox: Vec<AtomicU64>,
    /// Items (appends, confirmations, notices, requests) from this node's other workers waiting
    /// for each worker, as it saw them after its last round.
    worker_backlog: Vec<AtomicU64>,
    /// Rounds in which a worker held client work back because its messages waited at another
    /// worker past `max_worker_backlog`.
    pub admission_held: AtomicU64,
    /// A worker's round, from taking its messages to releasing their effects.
    pub round_seconds: Histogram,
    /// A round's store commit, as the worker waited for it (successful attempts).
    pub commit_seconds: Histogram,
}

/// Most workers of one node whose inbox depth is reported (msg-id generator ids bound the
/// worker count far lower).
pub const MAX_WORKERS: usize = 1024;

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            by_conv: Default::default(),
            logins: AtomicU64::new(0),
            typing_sent: AtomicU64::new(0),
            typing_refused: AtomicU64::new(0),
            groups_created: AtomicU64::new(0),
            groups_made_large: AtomicU64::new(0),
            large_delivered: AtomicU64::new(0),
            mention_all_running: AtomicU64::new(0),
            mention_all_entries: AtomicU64::new(0),
            c2s_queued: AtomicU64::new(0),
            c2s_failed: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            pushes_muted: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            appends_retried: AtomicU64::new(0),
            dir_dropped: AtomicU64::new(0),
            dir_resyncs: AtomicU64::new(0),
            users_cached: AtomicU64::new(0),
            users_evicted: AtomicU64::new(0),
            groups_cached: AtomicU64::new(0),
            groups_evicted: AtomicU64::new(0),
            cache_bytes: AtomicU64::new(0),
            active_trimmed: AtomicU64::new(0),
            inbox: (0..MAX_WORKERS).map(|_| AtomicU64::new(0)).collect(),
            peer_inbox: (0..MAX_WORKERS).map(|_| AtomicU64::new(0)).collect(),
            worker_backlog: (0..MAX_WORKERS).map(|_| AtomicU64::new(0)).collect(),
            admission_held: AtomicU64::new(0),
            round_seconds: Histogram::new(),
            commit_seconds: Histogram::new(),
        }
    }
}

impl Metrics {
    /// Worker `idx` found `n` messages in its inbox.
    pub fn set_inbox(&self, idx: usize, n: usize) {
        if let Some(a) = self.inbox.get(idx) {
            a.store(n as u64, Ordering::Relaxed);
        }
    }

    /// Worker `idx` has `n` items from this node's other workers waiting.
    pub fn set_worker_backlog(&self, idx: usize, n: usize) {
        if let Some(a) = self.worker_backlog.get(idx) {
            a.store(n as u64, Ordering::Relaxed);
        }
    }

    /// A message from another node was handed to worker `idx`.
    pub fn peer_given(&self, idx: usize) {
        if let Some(a) = self.peer_inbox.get(idx) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Worker `idx` took a message from another node.
    pub fn peer_taken(&self, idx: usize) {
        if let Some(a) = self.peer_inbox.get(idx) {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Messages from other nodes waiting for worker `idx`.
    pub fn peer_waiting(&self, idx: usize) -> u64 {
        self.peer_inbox
            .get(idx)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Appends `im_logic_inbox{worker}` for the first `workers` workers.
    pub fn render_inboxes(&self, workers: usize, out: &mut String) {
        let load = |v: &[AtomicU64]| -> Vec<(usize, u64)> {
            v.iter()
                .take(workers)
                .map(|a| a.load(Ordering::Relaxed))
                .enumerate()
                .collect()
        };
        im_shared::prom::labeled(
            out,
            "im_logic_inbox",
            "gauge",
            "Messages waiting in a logic worker's inbox (client frames: bound max_queued; from \
             other nodes: max_queued; from this node's workers: max_worker_backlog items per \
             worker pair, then the sender holds client work back).",
            "worker",
            load(&self.inbox),
        );
        im_shared::prom::labeled(
            out,
            "im_logic_peer_inbox",
            "gauge",
            "Messages from other logic nodes waiting for a worker (bound: max_queued, then the \
             link's reader waits).",
            "worker",
            load(&self.peer_inbox),
        );
        im_shared::prom::labeled(
            out,
            "im_logic_worker_backlog",
            "gauge",
            "Items (appends, confirmations, notices) from this node's other workers waiting for a \
             worker (a sender with max_worker_backlog of them waiting holds client work back).",
            "worker",
            load(&self.worker_backlog),
        );
    }

    /// A message of kind `conv` was accepted (acknowledged to its sender).
    pub fn accepted(&self, conv: u8) {
        if let Some(c) = self.by_conv.get(conv as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends re-sent to another node's workers because they were not confirmed in time.
    pub fn add_retried_appends(&self, n: u64) {
        self.appends_retried.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the counters as Prometheus text.
    pub fn render(&self, out: &mut String) {
        im_shared::prom::header(
            out,
            "im_messages_accepted_total",
            "counter",
            "Messages accepted by logic, by kind.",
        );
        for (conv, name) in [
            (CONV_C2C, "c2c"),
            (CONV_C2G, "c2g"),
            (CONV_S2C, "s2c"),
            (CONV_RECALL, "recall"),
            (CONV_READ, "read"),
            (CONV_GROUP_EVENT, "group_event"),
            (CONV_MENTION, "mention"),
        ] {
            let v = self.by_conv[conv as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "im_messages_accepted_total{{kind=\"{name}\"}} {v}");
        }
        for (name, help, c) in [
            ("im_logins_total", "Successful logins.", &self.logins),
            (
                "im_typing_sent_total",
                "Typing indicators forwarded.",
                &self.typing_sent,
            ),
            (
                "im_typing_refused_total",
                "Typing indicators refused by the per-connection rate limit.",
                &self.typing_refused,
            ),
            (
                "im_groups_created_total",
                "Groups created.",
                &self.groups_created,
            ),
            (
                "im_groups_made_large_total",
                "Groups that passed the large-group threshold (read diffusion from then on).",
                &self.groups_made_large,
            ),
            (
                "im_large_group_deliveries_total",
                "Live posts of large groups handed to members' devices.",
                &self.large_delivered,
            ),
            (
                "im_mention_all_entries_total",
                "Mention entries sent to members by @all posts of large groups (one per member).",
                &self.mention_all_entries,
            ),
            (
                "im_c2s_enqueued_total",
                "c2s reports durably queued.",
                &self.c2s_queued,
            ),
            (
                "im_c2s_enqueue_failed_total",
                "c2s reports refused because the queue failed.",
                &self.c2s_failed,
            ),
            (
                "im_push_submitted_total",
                "Offline push notifications submitted.",
                &self.pushes,
            ),
            (
                "im_push_muted_total",
                "Offline pushes skipped because the user muted the conversation.",
                &self.pushes_muted,
            ),
            (
                "im_store_commits_total",
                "Group commits of the store.",
                &self.commits,
            ),
            (
                "im_appends_retried_total",
                "Fan-out appends re-sent to another node because they were not confirmed in time.",
                &self.appends_retried,
            ),
            (
                "im_directory_changes_dropped_total",
                "Route changes dropped because a worker's directory publisher queue was full \
                 (each loss is repaired by a full resync of the worker's routes).",
                &self.dir_dropped,
            ),
            (
                "im_directory_resyncs_total",
                "Full resyncs of a worker's routes to the directory after dropped changes.",
                &self.dir_resyncs,
            ),
            (
                "im_logic_admission_held_total",
                "Worker rounds that held client work back because the worker's messages waited \
                 at another worker of the node past max_worker_backlog.",
                &self.admission_held,
            ),
            (
                "im_users_evicted_total",
                "Offline users' state dropped from memory to keep within max_cached_users or max_cache_bytes.",
                &self.users_evicted,
            ),
            (
                "im_users_trimmed_total",
                "Online users whose remembered client_msg_ids and pending notices were dropped from \
                 memory to keep within max_cache_bytes (reloaded from the store when needed).",
                &self.active_trimmed,
            ),
            (
                "im_groups_evicted_total",
                "Groups' state dropped from memory to keep within max_cached_groups.",
                &self.groups_evicted,
            ),
        ] {
            im_shared::prom::metric(out, name, "counter", help, c.load(Ordering::Relaxed));
        }
        for (name, help, c) in [
            (
                "im_users_cached",
                "User states held in logic memory.",
                &self.users_cached,
            ),
            (
                "im_groups_cached",
                "Group states held in logic memory.",
                &self.groups_cached,
            ),
            (
                "im_mention_all_running",
                "@all posts of large groups whose mention entries are still being fanned out.",
                &self.mention_all_running,
            ),
            (
                "im_users_cached_bytes",
                "Estimated bytes of the user states held in logic memory (bound: max_cache_bytes).",
                &self.cache_bytes,
            ),
        ] {
            im_shared::prom::metric(out, name, "gauge", help, c.load(Ordering::Relaxed));
        }
        self.round_seconds.render(
            out,
            "im_logic_round_seconds",
            "A logic worker's round: its messages handled, committed and their effects released.",
        );
        self.commit_seconds.render(
            out,
            "im_store_commit_seconds",
            "A round's store commit as the worker waited for it (until durable; the embedded store applies it to its indexes afterwards).",
        );
        im_shared::prom::labeled(
            out,
            "im_store_log_handoffs_total",
            "counter",
            "Embedded store: commits whose appends went to another worker before their sync; covered: that worker's sync covered them, synced: they synced themselves after handoff_linger_us.",
            "outcome",
            [
                ("covered", im_store::LOG_HANDOFFS_COVERED.load(Ordering::Relaxed)),
                ("synced", im_store::LOG_HANDOFFS_SYNCED.load(Ordering::Relaxed)),
            ],
        );
        im_store::LOG_SYNC_SECONDS.render(
            out,
            "im_store_log_sync_seconds",
            "One fdatasync of the embedded store's commit log (one covers every commit written before it).",
        );
    }
}
