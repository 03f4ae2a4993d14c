//! A [`Store`] that fails on demand: a real backend underneath, and commits that fail with the
//! errors a test queued, or keep failing while the store is marked unavailable. Every commit
//! attempt is logged (with what an observer saw at that moment), so a test can assert what a
//! caller did before, between and after its attempts — e.g. that no ack left a worker before its
//! batch was committed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use im_shared::proto::{GroupDesc, Message};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};
use im_store::{DedupEntry, MemberRecord, OutboxEntry, PushToken, Store, StoreError, WriteBatch};

/// One call of [`Store::commit`].
#[derive(Clone, Debug)]
pub struct CommitAttempt {
    /// Ops in the batch.
    pub ops: usize,
    /// `None`: committed; otherwise the error returned (nothing of the batch was applied).
    pub error: Option<String>,
    /// What the observer (see [`FaultyStore::observe`]) returned at the start of the attempt.
    pub observed: usize,
    /// Tokio's clock at the attempt (paused time in tests advances only by sleeps).
    pub at: tokio::time::Instant,
    /// For a [`Store::commit_then`]: what the observer returned right after its `written` ran
    /// (`None`: a plain commit, or `written` did not run).
    pub observed_written: Option<usize>,
}

type Observer = Arc<dyn Fn() -> usize + Send + Sync>;

#[derive(Default)]
struct Faults {
    /// Errors the next commits return, in order (one each).
    queued: VecDeque<StoreError>,
    /// While set, every commit fails with [`StoreError::Unavailable`].
    unavailable: bool,
    attempts: Vec<CommitAttempt>,
    observer: Option<Observer>,
}

/// Wraps a store; clones share the same faults and log.
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    faults: Arc<Mutex<Faults>>,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            faults: Arc::default(),
        }
    }

    /// The wrapped store (reads and writes through it bypass the faults).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The next commit fails with `e` (queued after any error queued before).
    pub fn fail_next_commit(&self, e: StoreError) {
        self.faults.lock().unwrap().queued.push_back(e);
    }

    /// While `on`, every commit fails with a retryable [`StoreError::Unavailable`].
    pub fn set_unavailable(&self, on: bool) {
        self.faults.lock().unwrap().unavailable = on;
    }

    /// Calls `f` at the start of every commit attempt (and, for a [`Store::commit_then`], right
    /// after its `written` ran) and logs what it returned.
    pub fn observe(&self, f: impl Fn() -> usize + Send + Sync + 'static) {
        self.faults.lock().unwrap().observer = Some(Arc::new(f));
    }

    /// Every commit attempt so far, in order.
    pub fn attempts(&self) -> Vec<CommitAttempt> {
        self.faults.lock().unwrap().attempts.clone()
    }
}

impl<S: Store> FaultyStore<S> {
    async fn attempt(
        &self,
        batch: WriteBatch,
        written: Option<impl FnOnce()>,
    ) -> Result<(), StoreError> {
        let (fault, observer) = {
            let mut f = self.faults.lock().unwrap();
            let fault = match f.queued.pop_front() {
                Some(e) => Some(e),
                None if f.unavailable => Some(StoreError::Unavailable("made unavailable".into())),
                None => None,
            };
            (fault, f.observer.clone())
        };
        let observed = observer.as_ref().map_or(0, |o| o());
        let ops = batch.len();
        let mut observed_written = None;
        let res = match (fault, written) {
            (Some(e), _) => Err(e),
            (None, None) => self.inner.commit(batch).await,
            (None, Some(written)) => {
                let seen = &mut observed_written;
                let observer = observer.clone();
                self.inner
                    .commit_then(batch, move || {
                        written();
                        *seen = Some(observer.map_or(0, |o| o()));
                    })
                    .await
            }
        };
        self.faults.lock().unwrap().attempts.push(CommitAttempt {
            ops,
            error: res.as_ref().err().map(|e| e.to_string()),
            observed,
            at: tokio::time::Instant::now(),
            observed_written,
        });
        res
    }
}

impl<S: Store> Store for FaultyStore<S> {
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.attempt(batch, None::<fn()>).await
    }
    async fn commit_then(
        &self,
        batch: WriteBatch,
        written: impl FnOnce(),
    ) -> Result<(), StoreError> {
        self.attempt(batch, Some(written)).await
    }
    fn unsettled(&self) -> bool {
        self.inner.unsettled()
    }
    fn settle(&self) -> Result<(), StoreError> {
        self.inner.settle()
    }
    async fn fence(&self, node: u16, incarnation: u64) -> Result<u64, StoreError> {
        self.inner.fence(node, incarnation).await
    }
    async fn seq_bound(&self, uid: UserId) -> Result<Seq, StoreError> {
        self.inner.seq_bound(uid).await
    }
    async fn last_seq(&self, uid: UserId) -> Result<Seq, StoreError> {
        self.inner.last_seq(uid).await
    }
    async fn timeline(
        &self,
        uid: UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner.timeline(uid, after, limit).await
    }
    async fn seq_of(&self, uid: UserId, msg_id: MsgId) -> Result<Option<Seq>, StoreError> {
        self.inner.seq_of(uid, msg_id).await
    }
    async fn dedup(
        &self,
        uid: UserId,
        client_msg_id: u64,
    ) -> Result<Option<DedupEntry>, StoreError> {
        self.inner.dedup(uid, client_msg_id).await
    }
    async fn cursor(&self, uid: UserId, device_id: &str) -> Result<Seq, StoreError> {
        self.inner.cursor(uid, device_id).await
    }
    async fn cursors(&self, uid: UserId) -> Result<Vec<(String, Seq)>, StoreError> {
        self.inner.cursors(uid).await
    }
    async fn push_watches(&self, shard: ShardId) -> Result<Vec<(UserId, Seq)>, StoreError> {
        self.inner.push_watches(shard).await
    }
    async fn outbox(&self, shard: ShardId) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.outbox(shard).await
    }
    async fn group(&self, group: GroupId) -> Result<Option<GroupDesc>, StoreError> {
        self.inner.group(group).await
    }
    async fn members(&self, group: GroupId) -> Result<Vec<MemberRecord>, StoreError> {
        self.inner.members(group).await
    }
    async fn groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError> {
        self.inner.groups_of(uid).await
    }
    async fn large_groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError> {
        self.inner.large_groups_of(uid).await
    }
    async fn group_head(&self, group: GroupId) -> Result<Seq, StoreError> {
        self.inner.group_head(group).await
    }
    async fn group_timeline(
        &self,
        group: GroupId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner.group_timeline(group, after, limit).await
    }
    async fn group_read(&self, uid: UserId, group: GroupId) -> Result<Seq, StoreError> {
        self.inner.group_read(uid, group).await
    }
    async fn user_flags(&self, uid: UserId) -> Result<Vec<u8>, StoreError> {
        self.inner.user_flags(uid).await
    }
    async fn mutes(&self, uid: UserId) -> Result<Vec<u64>, StoreError> {
        self.inner.mutes(uid).await
    }
    async fn push_tokens(&self, uid: UserId) -> Result<Vec<PushToken>, StoreError> {
        self.inner.push_tokens(uid).await
    }
    async fn id_floor(&self, generator: u16) -> Result<u64, StoreError> {
        self.inner.id_floor(generator).await
    }
    async fn org_records(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<im_shared::org::OrgRecord>, StoreError> {
        self.inner.org_records(after, limit).await
    }
}
