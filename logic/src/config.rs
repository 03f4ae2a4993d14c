//! Logic configuration.

/// Settings of the logic tier.
#[derive(Clone, Debug)]
pub struct LogicConfig {
    /// Worker threads; virtual shards are split evenly between them.
    pub workers: usize,
    /// This node's id (0..=1023 / workers); part of every msg id.
    pub node_id: u16,
    /// Heartbeat interval announced to clients in `LoginResult`.
    pub heartbeat_secs: u16,
    /// Seqs reserved in the store at a time (a restart skips at most this many).
    pub seq_segment: u64,
    /// Most messages in one sync page.
    pub sync_page_max: u16,
    /// Most bytes of messages in one sync page (at least one message is always sent).
    pub sync_page_bytes: usize,
    /// Client frames queued per worker before new work is refused with `Overloaded`.
    pub max_queued: usize,
    /// Items (appends, confirmations, notices, requests) one worker may have waiting at another
    /// worker of this node. Past it the sending worker holds new client work back (frames stay
    /// counted against `max_queued`, so the gate refuses more with `Overloaded`) until the other
    /// worker catches up; what other workers send it is still handled, so no cycle forms.
    pub max_worker_backlog: usize,
    /// Most requests handled in one group commit.
    pub max_group: usize,
    /// Remembered `client_msg_id`s per user in memory (older ones are looked up in the store).
    pub dedup_window: usize,
    /// User states the node keeps in memory (split between its workers). Past it, the offline
    /// users touched longest ago are dropped (down to 90 %) and reloaded from the store when
    /// needed; online users are never dropped, so this is a soft bound when more are online.
    pub max_cached_users: usize,
    /// Estimated bytes of user states the node keeps in memory (split between its workers),
    /// counting each state and each remembered `client_msg_id` and pending notice it holds.
    /// Past it, offline users are dropped and then online users' recent ids and pending
    /// notices (both reloaded from the store when needed), least recently used first, down to
    /// 75 %.
    pub max_cache_bytes: usize,
    /// Group states (info, members, recent post ids) the node keeps in memory, the same way.
    pub max_cached_groups: usize,
    /// Bytes queued for one link to another logic node before that link is reset (its queue
    /// dropped, the outboxes replayed over a new connection).
    pub peer_queue_bytes: usize,
    /// Redis Cluster seed nodes (`redis://host:port`) of the shared directory; empty: none.
    pub redis_nodes: Vec<String>,
    /// How long after sending a user may recall a message.
    pub recall_window_secs: u64,
    /// This node's shard lease (cluster shape with a directory): every commit carries its
    /// writer identity and waits while it is expired. `None`: no fencing (single node).
    pub lease: Option<std::sync::Arc<crate::ownership::Lease>>,
    /// The c2c policy of the organisation tree: a user may start a chat only with users visible
    /// to it in the tree (hidden departments are seen from inside only; a user outside the tree
    /// is seen by nobody). Off: anyone may write to anyone.
    pub org_visibility: bool,
    /// The file service (file messages, upload tickets, download URLs); `None`: file messages
    /// and the file commands are refused with `Unavailable`.
    pub files: Option<std::sync::Arc<FilesPolicy>>,
    /// How long a user's last device must stay away before its followers are told it went
    /// offline (a phone that reconnects within it, e.g. switching networks, never flaps).
    pub presence_offline_delay_ms: u64,
    /// A group with more members than this is *large*: its posts are stored once in the group's
    /// own timeline (read diffusion) instead of once per member.
    pub large_group_threshold: usize,
    /// Most members of any group (a large one; a small one stops at the threshold and switches).
    pub max_group_members: usize,
    /// Posts per second a large group accepts (a burst of as many); more are refused with
    /// `Overloaded` (retryable).
    pub large_group_posts_per_sec: u32,
    /// Seconds between two `@all` posts of one large group (each writes a mention entry to
    /// every member); one sooner is refused with `Overloaded` (retryable).
    pub large_group_mention_all_secs: u64,
}

/// Largest image and voice clip a client may upload (a video or a document: up to
/// [`FilesPolicy::max_size`]).
pub const MAX_IMAGE_SIZE: u64 = 32 << 20;
pub const MAX_VOICE_SIZE: u64 = 16 << 20;

/// What logic needs of the file service: the signing keys, where the HTTP endpoints are, the
/// limits and lifetimes.
#[derive(Debug)]
pub struct FilesPolicy {
    pub keys: im_shared::files::FileKeys,
    /// Base URL of the HTTP file endpoints (`http://host:port`, no trailing slash): the public
    /// URL from the configuration, or the API's address once it listens.
    pub base_url: std::sync::RwLock<String>,
    /// Largest file (a video or a document).
    pub max_size: u64,
    /// How long an upload ticket is valid.
    pub ticket_ms: u64,
    /// How long a download URL is valid.
    pub url_ms: u64,
}

impl FilesPolicy {
    /// The largest file of `kind`.
    pub fn max_for(&self, kind: im_shared::files::FileKind) -> u64 {
        use im_shared::files::FileKind;
        match kind {
            FileKind::Image => MAX_IMAGE_SIZE.min(self.max_size),
            FileKind::Voice => MAX_VOICE_SIZE.min(self.max_size),
            FileKind::Video | FileKind::File => self.max_size,
        }
    }

    pub fn base_url(&self) -> String {
        self.base_url
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_base_url(&self, url: &str) {
        *self.base_url.write().unwrap_or_else(|e| e.into_inner()) =
            url.trim_end_matches('/').to_owned();
    }
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            node_id: 0,
            heartbeat_secs: 30,
            seq_segment: 10_000,
            sync_page_max: 200,
            sync_page_bytes: 64 * 1024,
            max_queued: 100_000,
            max_worker_backlog: 100_000,
            max_group: 1024,
            dedup_window: 256,
            max_cached_users: 2_000_000,
            max_cache_bytes: 1 << 30,
            max_cached_groups: 200_000,
            peer_queue_bytes: crate::peer::MAX_QUEUE_BYTES,
            redis_nodes: Vec::new(),
            recall_window_secs: 120,
            presence_offline_delay_ms: 5_000,
            large_group_threshold: im_shared::proto::MAX_GROUP_MEMBERS,
            max_group_members: 1_000_000,
            large_group_posts_per_sec: 100,
            large_group_mention_all_secs: 60,
            lease: None,
            org_visibility: false,
            files: None,
        }
    }
}
