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
    /// Most requests handled in one group commit.
    pub max_group: usize,
    /// Remembered `client_msg_id`s per user in memory (older ones are looked up in the store).
    pub dedup_window: usize,
    /// User states the node keeps in memory (split between its workers). Past it, the offline
    /// users touched longest ago are dropped (down to 90 %) and reloaded from the store when
    /// needed; online users are never dropped, so this is a soft bound when more are online.
    pub max_cached_users: usize,
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
            max_group: 1024,
            dedup_window: 256,
            max_cached_users: 2_000_000,
            max_cached_groups: 200_000,
            peer_queue_bytes: crate::peer::MAX_QUEUE_BYTES,
            redis_nodes: Vec::new(),
            recall_window_secs: 120,
            lease: None,
            org_visibility: false,
        }
    }
}
