//! c2s: client reports queued durably for business servers.
//!
//! A client sends `Report { client_msg_id, topic, body }`; its logic worker turns it into a
//! [`C2sRecord`], hands all records of one round to [`C2sQueue::enqueue`] and acknowledges them
//! only once that returns `Ok` (the records are durable then). The business side receives every
//! acknowledged record at least once. Two backends ([`C2sConfig`]):
//!
//! * **Embedded** (single node): the records go into an embedded fjall database at
//!   `<data_dir>/c2s` (fsynced before `enqueue` returns) and a dispatcher thread POSTs each one
//!   as JSON to the webhook of its topic, deleting it only after a `2xx` answer. Delivery is
//!   sequential per topic (in id order), with per-topic exponential backoff, so a dead webhook
//!   holds up only its own topic. A record the business side refuses with a `4xx` (other than
//!   408/429), or whose topic has no webhook, is parked in a dead-letter keyspace (counted, never
//!   deleted) from which [`C2sHub::redrive_dead_letters`] puts it back into the queue.
//! * **RedisStreams** (cluster): one `XADD` per record to the stream `c2s:{<topic>}`; business
//!   servers consume the streams with consumer groups (`XREADGROUP` / `XACK`, and `XAUTOCLAIM`
//!   to take over the entries of a crashed consumer).
//!
//! The JSON contract, the Redis consumption recipe, the guarantees and the limits are in
//! `docs/C2S.md`.

mod embedded;
#[cfg(feature = "redis")]
mod redis_streams;
mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use im_shared::proto::MAX_TOPIC_LEN;
use im_shared::{MsgId, UserId};

pub use webhook::{base64, payload_json, signature_hex, PAYLOAD_VERSION};
pub use webhook::{HEADER_ATTEMPT, HEADER_ID, HEADER_SIGNATURE, HEADER_TOPIC};

/// One client report, as queued for the business side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct C2sRecord {
    /// Server-assigned, unique and time ordered; the idempotency key of the record.
    pub id: MsgId,
    /// The reporting user.
    pub from: UserId,
    /// The client's id of the report (a client retry after a lost ack carries the same one).
    pub client_msg_id: u64,
    /// Routing key: selects the webhook (embedded) or the stream (Redis).
    pub topic: String,
    /// Opaque payload.
    pub body: Bytes,
    /// Server time of acceptance, Unix ms.
    pub time_ms: u64,
}

/// Where c2s records go. Deserialized from the `[c2s]` table of the server config, tagged by
/// `backend = "embedded" | "redis_streams"` (sample in `docs/C2S.md`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum C2sConfig {
    /// Single node: durable queue in an embedded fjall database at `<data_dir>/c2s` + webhook
    /// delivery.
    Embedded {
        /// topic → webhook URL (`http://host:port/path`).
        #[serde(default)]
        webhooks: BTreeMap<String, String>,
        /// Webhook of every topic not in `webhooks`; without it such topics are refused by
        /// [`C2sHub::check_topic`] and dead-lettered by the dispatcher.
        #[serde(default)]
        default_url: Option<String>,
        /// Signs every POST body: `X-Im-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
        #[serde(default)]
        secret: Option<String>,
        /// First retry delay of a topic after a failed attempt (doubles per failure).
        #[serde(default = "default_retry_initial_ms")]
        retry_initial_ms: u64,
        /// Cap of the retry delay.
        #[serde(default = "default_retry_max_ms")]
        retry_max_ms: u64,
        /// Limit of one POST (connect, request and response).
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    /// Cluster: `XADD` to Redis Streams `c2s:{<topic>}` (one stream per topic), consumed by
    /// business servers with consumer groups.
    RedisStreams {
        /// Seed nodes, `redis://host:port`.
        nodes: Vec<String>,
        /// `XADD … MAXLEN ~ <n>`: approximate cap of each stream. Trimming drops the oldest
        /// entries whether or not a consumer group has read or acknowledged them.
        #[serde(default)]
        maxlen: Option<u64>,
    },
}

fn default_retry_initial_ms() -> u64 {
    500
}
fn default_retry_max_ms() -> u64 {
    60_000
}
fn default_timeout_ms() -> u64 {
    10_000
}

impl C2sConfig {
    /// An embedded config posting every topic to `url`, with default retry settings.
    pub fn embedded(url: impl Into<String>) -> Self {
        C2sConfig::Embedded {
            webhooks: BTreeMap::new(),
            default_url: Some(url.into()),
            secret: None,
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            timeout_ms: default_timeout_ms(),
        }
    }

    /// A Redis Streams config with these seed nodes and no `MAXLEN`.
    pub fn redis_streams<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        C2sConfig::RedisStreams {
            nodes: nodes.into_iter().map(Into::into).collect(),
            maxlen: None,
        }
    }
}

/// The queue a logic worker hands its records to.
pub trait C2sQueue: Send + Sync {
    /// Durable when Ok (embedded: fsync'd; redis: XADD acknowledged by the master). Called once
    /// per worker round with all records of the round. On `Err` none, some or all of the records
    /// may have been queued: the caller must not acknowledge any of them (a client retry may then
    /// queue a record twice; the business side deduplicates, see `docs/C2S.md`).
    fn enqueue<'a>(
        &'a self,
        recs: &'a [C2sRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), C2sError>> + Send + 'a>>;
}

/// Errors of the c2s queue.
#[derive(Debug, thiserror::Error)]
pub enum C2sError {
    /// Bad configuration (unparsable URL, no Redis nodes, backend not compiled in).
    #[error("c2s config: {0}")]
    Config(String),
    /// A record the queue does not take (empty or too long topic; unroutable topic).
    #[error("c2s record refused: {0}")]
    Invalid(String),
    /// The embedded database failed (open, write, fsync).
    #[error("c2s queue i/o: {0}")]
    Io(String),
    /// The Redis Cluster did not answer or refused for now (I/O, timeout, failover in progress).
    #[error("c2s backend unavailable: {0}")]
    Unavailable(String),
}

impl C2sError {
    /// Whether the same enqueue may succeed later: only a network backend that is unavailable.
    /// An embedded I/O error is not retried (after a failed fsync the only safe state is the one
    /// on disk), like [`im_store::StoreError::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, C2sError::Unavailable(_))
    }
}

/// Counters of a [`C2sHub`] since it started (gauges: `pending`, `dead_letters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct C2sStats {
    /// Records durably queued (embedded: committed; redis: `XADD` acknowledged).
    pub queued: u64,
    /// Failed `enqueue` calls.
    pub enqueue_errors: u64,
    /// Embedded: records delivered (webhook answered 2xx) and deleted.
    pub delivered: u64,
    /// Embedded: failed delivery attempts that will be retried (5xx, timeout, connection error).
    pub retries: u64,
    /// Embedded: records moved to the dead-letter keyspace since start.
    pub dead_lettered: u64,
    /// Embedded: records in the queue now (queued, not yet delivered).
    pub pending: u64,
    /// Embedded: records in the dead-letter keyspace now.
    pub dead_letters: u64,
}

/// Why a record was parked in the dead-letter keyspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// The webhook answered this `4xx` status (not 408 or 429).
    Rejected { status: u16 },
    /// Neither `webhooks` nor `default_url` names a webhook for the topic.
    NoWebhook,
}

/// A record in the dead-letter keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub record: C2sRecord,
    pub reason: DeadReason,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    queued: AtomicU64,
    enqueue_errors: AtomicU64,
    delivered: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    pending: AtomicU64,
    dead_letters: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> C2sStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        C2sStats {
            queued: g(&self.queued),
            enqueue_errors: g(&self.enqueue_errors),
            delivered: g(&self.delivered),
            retries: g(&self.retries),
            dead_lettered: g(&self.dead_lettered),
            pending: g(&self.pending),
            dead_letters: g(&self.dead_letters),
        }
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Saturating decrement of a gauge.
fn sub(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The Redis stream of `topic`: `c2s:{<topic>}`. The whole topic is the hash tag, so each
/// stream lives in one slot and different topics spread over the cluster. (A topic containing `}`
/// hashes by its part before the `}`; the key is still one per topic.)
pub fn stream_key(topic: &str) -> String {
    format!("c2s:{{{topic}}}")
}

/// Checks what every backend requires of a topic: 1..=[`MAX_TOPIC_LEN`] bytes.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN
}

fn check_records(recs: &[C2sRecord]) -> Result<(), C2sError> {
    match recs.iter().find(|r| !valid_topic(&r.topic)) {
        Some(r) => Err(C2sError::Invalid(format!(
            "topic of {} bytes (1..={MAX_TOPIC_LEN})",
            r.topic.len()
        ))),
        None => Ok(()),
    }
}

/// Distinct topics of a batch, sorted.
fn topics_of(recs: &[C2sRecord]) -> BTreeSet<&str> {
    recs.iter().map(|r| r.topic.as_str()).collect()
}

enum Backend {
    Embedded(embedded::Embedded),
    #[cfg(feature = "redis")]
    Redis(Box<redis_streams::RedisStreams>),
}

/// Process-wide part of c2s: the embedded database and its webhook dispatcher, or the Redis
/// client. Logic workers get their [`C2sQueue`] from [`C2sHub::queue`].
pub struct C2sHub {
    backend: Backend,
    counters: Arc<Counters>,
    /// Embedded: the dispatcher thread, until [`C2sHub::shutdown`].
    dispatcher: Mutex<Option<embedded::DispatcherHandle>>,
}

impl fmt::Debug for C2sHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.backend {
            Backend::Embedded(_) => "embedded",
            #[cfg(feature = "redis")]
            Backend::Redis(_) => "redis_streams",
        };
        f.debug_struct("C2sHub")
            .field("backend", &kind)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl C2sHub {
    /// Process-wide part: for Embedded opens the fjall db at `data_dir/c2s` (creating it) and
    /// starts the webhook dispatcher thread (own tokio runtime), which first delivers whatever an
    /// earlier run left in the queue. For RedisStreams checks the config (connections are made
    /// per worker by [`C2sHub::queue`]).
    pub fn start(cfg: &C2sConfig, data_dir: &Path) -> Result<Arc<C2sHub>, C2sError> {
        let counters = Arc::new(Counters::default());
        match cfg {
            C2sConfig::Embedded {
                webhooks,
                default_url,
                secret,
                retry_initial_ms,
                retry_max_ms,
                timeout_ms,
            } => {
                let settings = webhook::Settings::new(
                    webhooks,
                    default_url.as_deref(),
                    secret.as_deref(),
                    Duration::from_millis((*retry_initial_ms).max(1)),
                    Duration::from_millis((*retry_max_ms).max(*retry_initial_ms).max(1)),
                    Duration::from_millis((*timeout_ms).max(1)),
                )?;
                let emb = embedded::Embedded::open(&data_dir.join("c2s"), settings, &counters)?;
                let handle = emb.start_dispatcher()?;
                Ok(Arc::new(C2sHub {
                    backend: Backend::Embedded(emb),
                    counters,
                    dispatcher: Mutex::new(Some(handle)),
                }))
            }
            #[cfg(feature = "redis")]
            C2sConfig::RedisStreams { nodes, maxlen } => {
                let r = redis_streams::RedisStreams::new(nodes, *maxlen, counters.clone())?;
                Ok(Arc::new(C2sHub {
                    backend: Backend::Redis(Box::new(r)),
                    counters,
                    dispatcher: Mutex::new(None),
                }))
            }
            #[cfg(not(feature = "redis"))]
            C2sConfig::RedisStreams { .. } => Err(C2sError::Config(
                "backend redis_streams needs im-logic's `redis` feature".into(),
            )),
        }
    }

    /// Called by each logic worker on ITS OWN current-thread tokio runtime (a redis connection
    /// must stay on the runtime that created it): embedded → a handle to the shared queue; redis
    /// → a new cluster connection.
    pub async fn queue(&self) -> Result<Box<dyn C2sQueue>, C2sError> {
        match &self.backend {
            Backend::Embedded(e) => Ok(Box::new(e.queue())),
            #[cfg(feature = "redis")]
            Backend::Redis(r) => Ok(Box::new(r.connect().await?)),
        }
    }

    /// Whether a report on `topic` can be queued and routed: a valid topic and, for the
    /// embedded backend, a webhook for it (`webhooks` or `default_url`). Workers call it per
    /// report so that one bad report is refused alone (and not dead-lettered later).
    pub fn check_topic(&self, topic: &str) -> Result<(), C2sError> {
        if !valid_topic(topic) {
            return Err(C2sError::Invalid(format!(
                "topic of {} bytes (1..={MAX_TOPIC_LEN})",
                topic.len()
            )));
        }
        match &self.backend {
            Backend::Embedded(e) if !e.routes(topic) => {
                Err(C2sError::Invalid(format!("no webhook for topic {topic:?}")))
            }
            _ => Ok(()),
        }
    }

    pub fn stats(&self) -> C2sStats {
        self.counters.snapshot()
    }

    /// Appends the `im_c2s_*` Prometheus text lines (with `# HELP` / `# TYPE`). Delivery series
    /// (`delivered`, `retries`, `pending`, dead letters) exist only for the embedded backend:
    /// with Redis Streams the consumer groups of the business side own delivery.
    pub fn metrics(&self, out: &mut String) {
        let s = self.stats();
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            im_shared::prom::metric(out, name, kind, help, v)
        };
        line(
            "im_c2s_queued_total",
            "counter",
            "c2s records durably queued by this process.",
            s.queued,
        );
        if matches!(self.backend, Backend::Embedded(_)) {
            line(
                "im_c2s_delivered_total",
                "counter",
                "c2s records delivered to a webhook (2xx) and deleted.",
                s.delivered,
            );
            line(
                "im_c2s_retries_total",
                "counter",
                "Failed c2s webhook attempts that are retried.",
                s.retries,
            );
            line(
                "im_c2s_dead_lettered_total",
                "counter",
                "c2s records moved to the dead-letter keyspace.",
                s.dead_lettered,
            );
            line(
                "im_c2s_pending",
                "gauge",
                "c2s records queued and not yet delivered.",
                s.pending,
            );
            line(
                "im_c2s_dead_letters",
                "gauge",
                "c2s records in the dead-letter keyspace.",
                s.dead_letters,
            );
        }
    }

    /// Embedded: up to `limit` dead letters in key order (topic, then id). Redis: always empty.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, C2sError> {
        match &self.backend {
            Backend::Embedded(e) => e.dead_letters(limit),
            #[cfg(feature = "redis")]
            Backend::Redis(_) => Ok(Vec::new()),
        }
    }

    /// Embedded: moves the dead letters (of `topic`, or all) back into the queue, where the
    /// dispatcher delivers them again with the current webhooks; returns how many. Redis: 0.
    pub fn redrive_dead_letters(&self, topic: Option<&str>) -> Result<usize, C2sError> {
        match &self.backend {
            Backend::Embedded(e) => e.redrive(topic),
            #[cfg(feature = "redis")]
            Backend::Redis(_) => Ok(0),
        }
    }

    /// Stops the webhook dispatcher (embedded) and waits for its thread; a POST in flight is
    /// abandoned and its record stays queued (delivered again at the next start). Queue handles
    /// keep working: what they enqueue is delivered after the next start. The embedded database
    /// closes when the hub and every queue handle are dropped. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        let handle = self
            .dispatcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            h.stop();
        }
    }
}

impl Drop for C2sHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_deserializes_with_defaults() {
        let c: C2sConfig = serde_json::from_str(
            r#"{"backend":"embedded","default_url":"http://127.0.0.1:9/c2s",
                "webhooks":{"orders":"http://127.0.0.1:9/orders"},"secret":"s"}"#,
        )
        .unwrap();
        match c {
            C2sConfig::Embedded {
                webhooks,
                default_url,
                secret,
                retry_initial_ms,
                retry_max_ms,
                timeout_ms,
            } => {
                assert_eq!(webhooks["orders"], "http://127.0.0.1:9/orders");
                assert_eq!(default_url.as_deref(), Some("http://127.0.0.1:9/c2s"));
                assert_eq!(secret.as_deref(), Some("s"));
                assert_eq!(
                    (retry_initial_ms, retry_max_ms, timeout_ms),
                    (500, 60_000, 10_000)
                );
            }
            other => panic!("{other:?}"),
        }
        let c: C2sConfig = serde_json::from_str(
            r#"{"backend":"redis_streams","nodes":["redis://127.0.0.1:7300"],"maxlen":1000}"#,
        )
        .unwrap();
        assert!(
            matches!(c, C2sConfig::RedisStreams { maxlen: Some(1000), ref nodes } if nodes.len() == 1)
        );
        assert!(serde_json::from_str::<C2sConfig>(r#"{"backend":"kafka"}"#).is_err());
    }

    #[test]
    fn stream_key_is_hash_tagged() {
        assert_eq!(stream_key("orders"), "c2s:{orders}");
    }

    #[test]
    fn topics_are_bounded() {
        assert!(!valid_topic(""));
        assert!(valid_topic("a"));
        assert!(valid_topic(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn only_unavailable_is_retryable() {
        assert!(C2sError::Unavailable("x".into()).is_retryable());
        assert!(!C2sError::Io("x".into()).is_retryable());
        assert!(!C2sError::Invalid("x".into()).is_retryable());
        assert!(!C2sError::Config("x".into()).is_retryable());
    }
}
