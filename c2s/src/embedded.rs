//! The embedded backend: a durable queue in its own fjall database plus the webhook dispatcher.
//!
//! | keyspace | key | value |
//! |----------|-----|-------|
//! | `queue` | topic length `u16` ++ topic (UTF-8) ++ record id `u64` | `1u8` ++ from `u64` ++ client_msg_id `u64` ++ time_ms `u64` ++ body |
//! | `dead`  | same key | `1u8` ++ reason `u8` (1 = rejected, 2 = no webhook) ++ status `u16` ++ the `queue` value |
//!
//! Integers are big-endian, so one topic's records are contiguous and sorted by id.
//!
//! **Enqueue** writes all records of a call in one batch, fsynced (`PersistMode::SyncAll`)
//! before it returns. **Dispatch**: one task per topic on the dispatcher thread's runtime reads
//! the topic's records from a cursor in id order, POSTs them one at a time and deletes each after
//! a 2xx (that delete is written to the OS but not fsynced: a machine crash may bring a delivered
//! record back, which is then delivered again). The cursor spares the task from scanning the delete tombstones at the head of
//! the queue; because records of other workers can commit with a lower id than one already
//! delivered, every enqueue lowers its topic's `min_new` after the commit, and the task reads it
//! under the topic's `gate` write lock, which enqueues hold (read) from before their commit until
//! after that update: so a scan never sees a committed record whose `min_new` update is missing,
//! and the records of one worker (thus of one sender) are delivered in their commit order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::ops::Bound;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use im_shared::{MsgId, UserId};
use tokio::sync::{oneshot, Notify};

use super::webhook::{Outcome, Poster, Settings};
use super::{
    add, check_records, sub, topics_of, C2sError, C2sQueue, C2sRecord, Counters, DeadLetter,
    DeadReason,
};

const QUEUE: &str = "queue";
const DEAD: &str = "dead";
const VALUE_VERSION: u8 = 1;
const REASON_REJECTED: u8 = 1;
const REASON_NO_WEBHOOK: u8 = 2;
/// Records read per scan of one topic.
const FETCH: usize = 64;

fn io(e: impl std::fmt::Display) -> C2sError {
    C2sError::Io(e.to_string())
}

fn key(topic: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + topic.len() + 8);
    k.put_u16(topic.len() as u16);
    k.put_slice(topic.as_bytes());
    k.put_u64(id);
    k
}

/// `(topic, id)` of a key.
fn split_key(k: &[u8]) -> Option<(&str, u64)> {
    let len = usize::from(u16::from_be_bytes(k.get(..2)?.try_into().ok()?));
    if k.len() != 2 + len + 8 {
        return None;
    }
    let topic = std::str::from_utf8(&k[2..2 + len]).ok()?;
    let id = u64::from_be_bytes(k[2 + len..].try_into().ok()?);
    Some((topic, id))
}

fn encode(r: &C2sRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(25 + r.body.len());
    v.put_u8(VALUE_VERSION);
    v.put_u64(r.from.0);
    v.put_u64(r.client_msg_id);
    v.put_u64(r.time_ms);
    v.put_slice(&r.body);
    v
}

fn decode(topic: &str, id: u64, mut v: &[u8]) -> Option<C2sRecord> {
    if v.len() < 25 || v.get_u8() != VALUE_VERSION {
        return None;
    }
    Some(C2sRecord {
        id: MsgId(id),
        from: UserId(v.get_u64()),
        client_msg_id: v.get_u64(),
        time_ms: v.get_u64(),
        topic: topic.to_owned(),
        body: Bytes::copy_from_slice(v),
    })
}

fn encode_dead(reason: DeadReason, queue_value: &[u8]) -> Vec<u8> {
    let (code, status) = match reason {
        DeadReason::Rejected { status } => (REASON_REJECTED, status),
        DeadReason::NoWebhook => (REASON_NO_WEBHOOK, 0),
    };
    let mut v = Vec::with_capacity(4 + queue_value.len());
    v.put_u8(VALUE_VERSION);
    v.put_u8(code);
    v.put_u16(status);
    v.put_slice(queue_value);
    v
}

/// `(reason, queue value)` of a dead-letter value.
fn decode_dead(v: &[u8]) -> Option<(DeadReason, &[u8])> {
    if v.len() < 4 || v[0] != VALUE_VERSION {
        return None;
    }
    let reason = match v[1] {
        REASON_REJECTED => DeadReason::Rejected {
            status: u16::from_be_bytes([v[2], v[3]]),
        },
        REASON_NO_WEBHOOK => DeadReason::NoWebhook,
        _ => return None,
    };
    Some((reason, &v[4..]))
}

/// Per-topic coordination between enqueues and the topic's dispatch task.
#[derive(Debug)]
struct TopicShared {
    /// Held for reading by an enqueue from before its commit until `min_new` is updated; taken
    /// for writing by the dispatch task around reading `min_new` and scanning.
    gate: RwLock<()>,
    /// Lowest id enqueued since the task last looked (`u64::MAX`: none).
    min_new: AtomicU64,
    /// Wakes the dispatch task when records arrive.
    wake: Notify,
}

impl TopicShared {
    fn new() -> Arc<Self> {
        Arc::new(TopicShared {
            gate: RwLock::new(()),
            min_new: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
        })
    }
}

struct Core {
    db: Database,
    queue: Keyspace,
    dead: Keyspace,
    /// Every topic that has (had) records since start; never shrinks.
    topics: Mutex<HashMap<String, Arc<TopicShared>>>,
    /// Wakes the dispatcher's main loop when a topic is added to `topics`.
    new_topics: Notify,
    counters: Arc<Counters>,
    settings: Settings,
}

/// The embedded backend, owned by the hub.
pub(super) struct Embedded {
    core: Arc<Core>,
}

/// The queue handle of one worker (all handles share one database).
pub(super) struct EmbeddedQueue {
    core: Arc<Core>,
}

/// The running dispatcher thread.
pub(super) struct DispatcherHandle {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl DispatcherHandle {
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            tracing::error!("c2s dispatcher thread panicked");
        }
    }
}

impl Embedded {
    /// Opens (creating) the database in `dir` and finds the topics with pending records.
    pub fn open(
        dir: &Path,
        settings: Settings,
        counters: &Arc<Counters>,
    ) -> Result<Self, C2sError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::builder(dir).open().map_err(io)?;
        let queue = db
            .keyspace(QUEUE, KeyspaceCreateOptions::default)
            .map_err(io)?;
        let dead = db
            .keyspace(DEAD, KeyspaceCreateOptions::default)
            .map_err(io)?;
        let mut topics = HashMap::new();
        let mut pending = 0u64;
        for g in queue.iter() {
            let k = g.key().map_err(io)?;
            pending += 1;
            match split_key(&k) {
                Some((t, _)) if !topics.contains_key(t) => {
                    topics.insert(t.to_owned(), TopicShared::new());
                }
                Some(_) => {}
                None => tracing::error!(key = ?&*k, "c2s: malformed queue key, ignored"),
            }
        }
        let mut dead_n = 0u64;
        for g in dead.iter() {
            g.key().map_err(io)?;
            dead_n += 1;
        }
        counters.pending.store(pending, Ordering::Relaxed);
        counters.dead_letters.store(dead_n, Ordering::Relaxed);
        if pending > 0 || dead_n > 0 {
            tracing::info!(
                pending,
                dead_letters = dead_n,
                topics = topics.len(),
                "c2s: queue opened with undelivered records"
            );
        }
        Ok(Embedded {
            core: Arc::new(Core {
                db,
                queue,
                dead,
                topics: Mutex::new(topics),
                new_topics: Notify::new(),
                counters: counters.clone(),
                settings,
            }),
        })
    }

    pub fn queue(&self) -> EmbeddedQueue {
        EmbeddedQueue {
            core: self.core.clone(),
        }
    }

    pub fn routes(&self, topic: &str) -> bool {
        self.core.settings.url_for(topic).is_some()
    }

    pub fn start_dispatcher(&self) -> Result<DispatcherHandle, C2sError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let core = self.core.clone();
        let thread = std::thread::Builder::new()
            .name("c2s-dispatch".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = dispatch(core) => {}
                    }
                });
                // Dropping the runtime cancels the topic tasks at their await points: a POST in
                // flight is abandoned, its record stays queued.
                drop(rt);
            })
            .map_err(io)?;
        Ok(DispatcherHandle { stop, thread })
    }

    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, C2sError> {
        let mut out = Vec::new();
        for g in self.core.dead.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = g.into_inner().map_err(io)?;
            let parsed = split_key(&k).and_then(|(t, id)| {
                let (reason, qv) = decode_dead(&v)?;
                Some(DeadLetter {
                    record: decode(t, id, qv)?,
                    reason,
                })
            });
            match parsed {
                Some(d) => out.push(d),
                None => tracing::error!(key = ?&*k, "c2s: undecodable dead letter skipped"),
            }
        }
        Ok(out)
    }

    pub fn redrive(&self, topic: Option<&str>) -> Result<usize, C2sError> {
        let (mut lo, hi) = match topic {
            Some(t) => (
                Bound::Included(key(t, 0)),
                Bound::Included(key(t, u64::MAX)),
            ),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let mut total = 0;
        loop {
            // In chunks, so a large dead-letter keyspace is not loaded at once; each chunk starts
            // after the last key of the previous one, so a record the dispatcher parks again
            // meanwhile (same key) is not put back twice.
            let mut recs = Vec::new();
            let mut keys = Vec::new();
            for g in self.core.dead.range((lo.clone(), hi.clone())).take(1024) {
                let (k, v) = g.into_inner().map_err(io)?;
                let rec = split_key(&k)
                    .and_then(|(t, id)| decode(t, id, decode_dead(&v)?.1))
                    .ok_or_else(|| C2sError::Io(format!("undecodable dead letter {:?}", &*k)))?;
                recs.push(rec);
                keys.push(k.to_vec());
            }
            let Some(last) = keys.last() else {
                return Ok(total);
            };
            lo = Bound::Excluded(last.clone());
            self.core.insert(&recs, &keys)?;
            total += recs.len();
            sub(&self.core.counters.dead_letters, recs.len() as u64);
            tracing::info!(
                records = recs.len(),
                "c2s: dead letters put back into the queue"
            );
        }
    }
}

impl Core {
    /// Inserts `recs` into the queue (and removes `dead_keys` from the dead letters) in one
    /// fsynced batch, then tells the topics' dispatch tasks.
    fn insert(&self, recs: &[C2sRecord], dead_keys: &[Vec<u8>]) -> Result<(), C2sError> {
        let mut new_topic = false;
        let shared: BTreeMap<&str, Arc<TopicShared>> = {
            let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
            topics_of(recs)
                .into_iter()
                .map(|t| {
                    let s = topics.entry(t.to_owned()).or_insert_with(|| {
                        new_topic = true;
                        TopicShared::new()
                    });
                    (t, s.clone())
                })
                .collect()
        };
        // In topic order; the dispatch task only ever waits for one gate at a time.
        let guards: Vec<_> = shared
            .values()
            .map(|s| s.gate.read().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        for r in recs {
            b.insert(&self.queue, key(&r.topic, r.id.0), encode(r));
        }
        for k in dead_keys {
            b.remove(&self.dead, k.clone());
        }
        // Counted before the commit: once committed, a dispatch task may deliver a record (and
        // take it off `pending`) before this thread runs again, and a decrement that found 0
        // would be lost, leaving the gauge too high for good.
        add(&self.counters.pending, recs.len() as u64);
        if let Err(e) = b.commit() {
            sub(&self.counters.pending, recs.len() as u64);
            return Err(io(e));
        }
        for r in recs {
            shared[r.topic.as_str()]
                .min_new
                .fetch_min(r.id.0, Ordering::SeqCst);
        }
        drop(guards);
        for s in shared.values() {
            s.wake.notify_one();
        }
        if new_topic {
            self.new_topics.notify_one();
        }
        Ok(())
    }

    /// Up to [`FETCH`] queued `(key, record)`s of `topic` from `cursor` on, in id order (a record
    /// that does not decode comes as `None` and is left in place).
    #[allow(clippy::type_complexity)]
    fn fetch(
        &self,
        topic: &str,
        shared: &TopicShared,
        cursor: &mut u64,
    ) -> Result<Vec<(Vec<u8>, u64, Option<(C2sRecord, Vec<u8>)>)>, C2sError> {
        let _w = shared.gate.write().unwrap_or_else(|e| e.into_inner());
        let m = shared.min_new.swap(u64::MAX, Ordering::SeqCst);
        *cursor = (*cursor).min(m);
        let lo = key(topic, *cursor);
        let hi = key(topic, u64::MAX);
        let mut out = Vec::new();
        for g in self.queue.range(lo..=hi).take(FETCH) {
            let (k, v) = g.into_inner().map_err(io)?;
            let Some((_, id)) = split_key(&k) else {
                continue;
            };
            let rec = decode(topic, id, &v).map(|r| (r, v.to_vec()));
            out.push((k.to_vec(), id, rec));
        }
        Ok(out)
    }

    fn delivered(&self, key: &[u8]) {
        // Written to the OS (survives a process crash) but not fsynced: losing this delete in a
        // machine crash only means delivering the record again.
        let mut b = self.db.batch().durability(Some(PersistMode::Buffer));
        b.remove(&self.queue, key.to_vec());
        if let Err(e) = b.commit() {
            tracing::error!(
                "c2s: delete of a delivered record failed (redelivered after a restart): {e}"
            );
        }
        sub(&self.counters.pending, 1);
        add(&self.counters.delivered, 1);
    }

    fn park(&self, key: &[u8], queue_value: &[u8], reason: DeadReason) -> Result<(), C2sError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.dead, key.to_vec(), encode_dead(reason, queue_value));
        b.remove(&self.queue, key.to_vec());
        b.commit().map_err(io)?;
        sub(&self.counters.pending, 1);
        add(&self.counters.dead_lettered, 1);
        add(&self.counters.dead_letters, 1);
        Ok(())
    }
}

impl C2sQueue for EmbeddedQueue {
    fn enqueue<'a>(
        &'a self,
        recs: &'a [C2sRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), C2sError>> + Send + 'a>> {
        Box::pin(async move {
            if recs.is_empty() {
                return Ok(());
            }
            let r = check_records(recs).and_then(|()| self.core.insert(recs, &[]));
            match &r {
                Ok(()) => add(&self.core.counters.queued, recs.len() as u64),
                Err(_) => add(&self.core.counters.enqueue_errors, 1),
            }
            r
        })
    }
}

/// Main loop of the dispatcher: one task per topic, started as topics appear.
async fn dispatch(core: Arc<Core>) {
    let poster = Arc::new(Poster::new(&core.settings));
    let mut started: HashSet<String> = HashSet::new();
    loop {
        let fresh: Vec<(String, Arc<TopicShared>)> = {
            let topics = core.topics.lock().unwrap_or_else(|e| e.into_inner());
            topics
                .iter()
                .filter(|(t, _)| !started.contains(*t))
                .map(|(t, s)| (t.clone(), s.clone()))
                .collect()
        };
        for (topic, shared) in fresh {
            started.insert(topic.clone());
            tokio::spawn(topic_loop(core.clone(), poster.clone(), topic, shared));
        }
        core.new_topics.notified().await;
    }
}

/// Delivers one topic's records in id order, one at a time, with exponential backoff.
async fn topic_loop(core: Arc<Core>, poster: Arc<Poster>, topic: String, shared: Arc<TopicShared>) {
    let mut cursor = 0u64;
    let mut backoff = core.settings.retry_initial;
    loop {
        let batch = match core.fetch(&topic, &shared, &mut cursor) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(topic, "c2s: reading the queue failed, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            shared.wake.notified().await;
            continue;
        }
        for (k, id, rec) in batch {
            cursor = id.saturating_add(1);
            let Some((rec, value)) = rec else {
                tracing::error!(topic, id, "c2s: undecodable record left in the queue");
                continue;
            };
            let Some(url) = core.settings.url_for(&topic) else {
                tracing::warn!(
                    topic,
                    id,
                    "c2s: no webhook for the topic, record dead-lettered"
                );
                if !park_or_retry(&core, &k, &value, DeadReason::NoWebhook, &mut cursor, id) {
                    tokio::time::sleep(backoff).await;
                    break;
                }
                continue;
            };
            let mut attempt = 1u32;
            loop {
                match poster.post(url, &rec, attempt).await {
                    Outcome::Delivered => {
                        core.delivered(&k);
                        backoff = core.settings.retry_initial;
                        break;
                    }
                    Outcome::Rejected(status) => {
                        tracing::warn!(
                            topic,
                            id,
                            status,
                            "c2s: webhook refused the record, dead-lettered"
                        );
                        park_or_retry(
                            &core,
                            &k,
                            &value,
                            DeadReason::Rejected { status },
                            &mut cursor,
                            id,
                        );
                        break;
                    }
                    Outcome::Retry(why) => {
                        add(&core.counters.retries, 1);
                        tracing::warn!(topic, id, attempt, retry_in = ?backoff, "c2s: delivery failed: {why}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(core.settings.retry_max);
                        attempt = attempt.saturating_add(1);
                    }
                }
            }
            if cursor <= id {
                // Parking failed: look at this record again after a pause.
                tokio::time::sleep(backoff).await;
                break;
            }
        }
    }
}

/// Moves a record to the dead letters; if that fails, rewinds the cursor so it is tried again
/// (and returns false).
fn park_or_retry(
    core: &Core,
    k: &[u8],
    value: &[u8],
    reason: DeadReason,
    cursor: &mut u64,
    id: u64,
) -> bool {
    match core.park(k, value, reason) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(id, "c2s: dead-lettering failed, will retry: {e}");
            *cursor = id;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic_prefix(topic: &str) -> Vec<u8> {
        let mut k = key(topic, 0);
        k.truncate(k.len() - 8);
        k
    }

    #[test]
    fn keys_sort_by_topic_then_id() {
        let a1 = key("a", 1);
        let a2 = key("a", 256);
        let ab = key("ab", 0);
        assert!(a1 < a2);
        assert_eq!(split_key(&a2), Some(("a", 256)));
        assert_eq!(split_key(&ab), Some(("ab", 0)));
        assert!(a2.starts_with(&topic_prefix("a")));
        assert!(!ab.starts_with(&topic_prefix("a")));
        assert_eq!(split_key(b"\x00\x05ab"), None);
    }

    #[test]
    fn values_round_trip() {
        let r = C2sRecord {
            id: MsgId(9),
            from: UserId(3),
            client_msg_id: 4,
            topic: "t".into(),
            body: Bytes::from_static(b"\x00body"),
            time_ms: 5,
        };
        let v = encode(&r);
        assert_eq!(decode("t", 9, &v), Some(r.clone()));
        let d = encode_dead(DeadReason::Rejected { status: 422 }, &v);
        let (reason, qv) = decode_dead(&d).unwrap();
        assert_eq!(reason, DeadReason::Rejected { status: 422 });
        assert_eq!(decode("t", 9, qv), Some(r));
        assert_eq!(decode("t", 9, &v[..10]), None);
    }
}
