//! Counters of the logic tier, rendered in the Prometheus text format by the HTTP API.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use im_shared::proto::{CONV_C2C, CONV_C2G, CONV_GROUP_EVENT, CONV_READ, CONV_RECALL, CONV_S2C};

/// Shared by every worker of a node (relaxed atomics: monotonic counters only).
#[derive(Debug, Default)]
pub struct Metrics {
    by_conv: [AtomicU64; 7],
    pub logins: AtomicU64,
    pub groups_created: AtomicU64,
    pub c2s_queued: AtomicU64,
    pub c2s_failed: AtomicU64,
    pub pushes: AtomicU64,
    pub pushes_muted: AtomicU64,
    pub commits: AtomicU64,
    pub appends_retried: AtomicU64,
    /// User states held in memory (all workers; a gauge).
    pub users_cached: AtomicU64,
    pub users_evicted: AtomicU64,
    /// Group states held in memory (all workers; a gauge).
    pub groups_cached: AtomicU64,
    pub groups_evicted: AtomicU64,
}

impl Metrics {
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
        ] {
            let v = self.by_conv[conv as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "im_messages_accepted_total{{kind=\"{name}\"}} {v}");
        }
        for (name, help, c) in [
            ("im_logins_total", "Successful logins.", &self.logins),
            (
                "im_groups_created_total",
                "Groups created.",
                &self.groups_created,
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
                "im_users_evicted_total",
                "Offline users' state dropped from memory to keep within max_cached_users.",
                &self.users_evicted,
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
        ] {
            im_shared::prom::metric(out, name, "gauge", help, c.load(Ordering::Relaxed));
        }
    }
}
