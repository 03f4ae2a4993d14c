//! Shard ownership of a logic node in the cluster shape: a lease in the shared directory plus a
//! writer fence in the store.
//!
//! The node list decides which virtual shards a node serves (`owner_of_vshard(shard, nodes)`).
//! With a Redis directory configured, a node also has to *hold* them before it serves anything:
//!
//! 1. [`acquire`] takes the node's shards with [`Directory::acquire_shards`]: it waits while
//!    another node's live lease (or this node's previous incarnation's lease) holds any of them,
//!    then gets a new incarnation and a lease of `lease_ms`.
//! 2. It raises the store fence of every node it displaced past both the value the directory
//!    gave and the fence the store already has ([`Store::fence`]), and its own fence to its new
//!    incarnation (acquiring again while the store's fence is higher: the directory's counter
//!    can go back when Redis loses a write in a failover), so a previous incarnation of itself
//!    or of a displaced node can no longer commit.
//! 3. Every batch the workers commit carries the node and incarnation
//!    ([`crate::store::Writer`]); the store refuses it once the fence is above it.
//! 4. [`hold`] runs [`acquire`] and then renews the lease every `lease_ms / 4`. The node may commit only while
//!    its lease is valid by its own clock: until the send time of the last successful renewal
//!    plus three quarters of the lease, which ends before the directory lets the lease expire.
//!    When it runs out (the directory is unreachable, the process was paused) the workers stall
//!    before committing; a later successful renewal lets them go on. When the directory answers
//!    that the lease is lost (another node took the shards, or a newer incarnation of this node
//!    started), the process logs it and exits with [`FENCED_EXIT_CODE`]; its supervisor restarts
//!    it and the restart acquires again.
//!
//! Without a directory (single node, or a cluster configured only by its node list) there is no
//! lease and batches carry no writer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use im_shared::shard::{owner_of_vshard, VSHARDS};
use im_shared::ShardId;

use crate::directory::{Acquired, Directory, DirectoryError};
use crate::store::{Store, StoreError, Writer};

/// Exit status of a logic process that lost its shards to another node or incarnation.
pub const FENCED_EXIT_CODE: i32 = 75;

/// The shards node `node` of `nodes` serves (all of them for a lone node).
pub fn shards_of(node: usize, nodes: usize) -> Vec<ShardId> {
    (0..VSHARDS)
        .map(ShardId)
        .filter(|&s| owner_of_vshard(s, nodes.max(1)) == node)
        .collect()
}

/// Whether the holder of a [`Lease`] may commit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Valid,
    /// Not renewed in time; may become valid again.
    Expired,
    /// Lost for good: the process must stop.
    Fenced,
}

/// A node's hold on its shards (see the module docs). Shared by the renewal thread and the
/// workers.
#[derive(Debug)]
pub struct Lease {
    node: u16,
    incarnation: u64,
    origin: Instant,
    /// Nanoseconds after `origin` until which commits are allowed.
    valid_until: AtomicU64,
    fenced: AtomicBool,
    lease: Duration,
}

impl Lease {
    fn new(node: u16, incarnation: u64, lease: Duration) -> Lease {
        Lease {
            node,
            incarnation,
            origin: Instant::now(),
            valid_until: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            lease,
        }
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The writer identity of this node's batches.
    pub fn writer(&self) -> Writer {
        Writer {
            node: self.node,
            incarnation: self.incarnation,
        }
    }

    pub fn state(&self) -> LeaseState {
        if self.fenced.load(Ordering::Acquire) {
            return LeaseState::Fenced;
        }
        let now = self.origin.elapsed().as_nanos() as u64;
        if now < self.valid_until.load(Ordering::Acquire) {
            LeaseState::Valid
        } else {
            LeaseState::Expired
        }
    }

    /// A renewal sent at `sent` succeeded: valid until `sent + 3/4 lease`.
    fn extend(&self, sent: Instant) {
        let until = sent.saturating_duration_since(self.origin) + self.lease * 3 / 4;
        self.valid_until
            .fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
    }

    /// Marks the lease lost; [`Lease::state`] reports [`LeaseState::Fenced`] from now on.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
    }
}

/// Logs that this process is fenced and exits with [`FENCED_EXIT_CODE`]. Nothing after the
/// fence is acknowledged: the exit happens before any effect of an uncommitted round leaves.
pub fn exit_fenced(why: &str) -> ! {
    tracing::error!("fenced, exiting: {why}");
    eprintln!("fenced, exiting: {why}");
    std::process::exit(FENCED_EXIT_CODE)
}

/// Waits until `lease` is valid (stalling commits while it is expired); exits the process when
/// it is fenced.
pub async fn wait_valid(lease: &Lease, worker: usize) {
    let mut warned = false;
    loop {
        match lease.state() {
            LeaseState::Valid => return,
            LeaseState::Fenced => exit_fenced("the shard lease was lost"),
            LeaseState::Expired => {
                if !warned {
                    tracing::warn!(worker, "shard lease expired; commits wait for a renewal");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Retries a directory or store call while it fails with a retryable error.
async fn retry<T, E: std::fmt::Display>(
    what: &str,
    retryable: impl Fn(&E) -> bool,
    mut f: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match f().await {
            Err(e) if retryable(&e) => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Failure of [`acquire`].
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("starting the shard lease thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// [`Directory::acquire_shards`], retried while the shards are held under a live lease or the
/// directory is unavailable. Returns what it got and when the successful call was sent.
async fn acquire_waiting<D: Directory>(
    dir: &D,
    node: u16,
    shards: &[ShardId],
    lease_ms: u64,
) -> Result<(Acquired, Instant), DirectoryError> {
    let mut logged: Option<(u16, u16)> = None;
    loop {
        let sent = Instant::now();
        match dir.acquire_shards(node, shards, lease_ms).await {
            Ok(got) => return Ok((got, sent)),
            Err(DirectoryError::Held {
                vshard,
                node: holder,
            }) => {
                if logged != Some((vshard, holder)) {
                    tracing::warn!(
                        vshard,
                        holder,
                        "shard held under a live lease; waiting for it to end"
                    );
                    logged = Some((vshard, holder));
                }
                tokio::time::sleep(Duration::from_millis(lease_ms / 8 + 1)).await;
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!("acquiring shards: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Takes `shards` for `node` (steps 1 and 2 of the module docs), waiting while they are held.
/// Returns a valid lease; [`hold`] renews it.
pub async fn acquire<D: Directory, S: Store>(
    dir: &D,
    store: &S,
    node: u16,
    shards: &[ShardId],
    lease_ms: u64,
) -> Result<Arc<Lease>, AcquireError> {
    let lease_ms = lease_ms.max(4);
    let started = Instant::now();
    let (mut got, mut sent) = acquire_waiting(dir, node, shards, lease_ms).await?;
    for &(other, raised) in &got.displaced {
        // The store's fence is the durable record of the displaced node's incarnations (each one
        // fenced itself at start); go past it even if the directory's counter went back in a
        // Redis failover, so the stale writer is refused whatever number it holds.
        let held = retry(
            "reading a displaced node's fence",
            StoreError::is_retryable,
            async || store.fence(other, 0).await,
        )
        .await?;
        let target = raised.max(held + 1);
        let f = retry(
            "fencing a displaced node",
            StoreError::is_retryable,
            async || store.fence(other, target).await,
        )
        .await?;
        tracing::info!(
            node = other,
            fence = f,
            "displaced node fenced in the store"
        );
    }
    loop {
        let old = retry(
            "reading this node's fence",
            StoreError::is_retryable,
            async || store.fence(node, 0).await,
        )
        .await?;
        if got.incarnation > old {
            retry(
                "fencing this node's previous incarnations",
                StoreError::is_retryable,
                async || store.fence(node, got.incarnation).await,
            )
            .await?;
            break;
        }
        // The store has seen this incarnation number or a higher one (the directory's counter
        // went back in a Redis failover, or a displacing node fenced past it): acquire again,
        // which increments the counter, until it is past the fence.
        tracing::warn!(
            node,
            incarnation = got.incarnation,
            fence = old,
            "incarnation not above the store fence; acquiring again"
        );
        if old - got.incarnation > 1_000 {
            return Err(AcquireError::Directory(DirectoryError::Corrupt(format!(
                "node {node}: the directory's incarnation {} is far below the store fence \
                 {old}; set {{shards}}:inc:{node} to {old} in Redis",
                got.incarnation
            ))));
        }
        dir.release_lease(node, got.incarnation).await?;
        (got, sent) = acquire_waiting(dir, node, shards, lease_ms).await?;
    }
    let lease = Arc::new(Lease::new(
        node,
        got.incarnation,
        Duration::from_millis(lease_ms),
    ));
    lease.extend(sent);
    tracing::info!(
        node,
        incarnation = got.incarnation,
        shards = shards.len(),
        displaced = ?got.displaced,
        waited_ms = started.elapsed().as_millis() as u64,
        "shards acquired"
    );
    Ok(lease)
}

/// A node's shards held by a thread of its own (with its own runtime, so a busy worker cannot
/// delay a renewal): it connects the directory, [`acquire`]s, then renews every quarter of the
/// lease until [`Holder::release`]. Exits the process when the lease is lost.
pub struct Holder {
    pub lease: Arc<Lease>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Holder {
    /// Stops renewing and releases the lease (clean shutdown), so a successor need not wait.
    pub fn release(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the holder thread and blocks until the shards are acquired (waiting while they are
/// held by someone else) or acquiring failed.
pub fn hold<D, S, F, Fut>(
    connect: F,
    store: S,
    node: u16,
    shards: Vec<ShardId>,
    lease_ms: u64,
) -> Result<Holder, AcquireError>
where
    D: Directory,
    S: Store + Send,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<D, DirectoryError>>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("shard-lease".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build tokio runtime");
            rt.block_on(async move {
                let dir = match retry(
                    "connecting the directory",
                    DirectoryError::is_retryable,
                    async || connect().await,
                )
                .await
                {
                    Ok(d) => d,
                    Err(e) => return drop(tx.send(Err(AcquireError::from(e)))),
                };
                match acquire(&dir, &store, node, &shards, lease_ms).await {
                    Ok(lease) => {
                        let _ = tx.send(Ok(lease.clone()));
                        renew_loop(dir, lease, stop2).await;
                    }
                    Err(e) => drop(tx.send(Err(e))),
                }
            });
        })?;
    match rx.recv() {
        Ok(Ok(lease)) => Ok(Holder {
            lease,
            stop,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(AcquireError::Directory(DirectoryError::Unavailable(
                "the shard lease thread died".into(),
            )))
        }
    }
}

async fn renew_loop<D: Directory>(dir: D, lease: Arc<Lease>, stop: Arc<AtomicBool>) {
    let ms = lease.lease.as_millis() as u64;
    let period = Duration::from_millis((ms / 4).max(1));
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            tokio::time::sleep((next - now).min(Duration::from_millis(50))).await;
            continue;
        }
        next = now + period;
        let call = dir.renew_lease(lease.node, lease.incarnation, ms);
        match tokio::time::timeout(period, call).await {
            Ok(Ok(())) => lease.extend(now),
            Ok(Err(DirectoryError::LeaseLost { current })) => {
                lease.fence();
                exit_fenced(&format!(
                    "node {} incarnation {} was superseded by incarnation {current}",
                    lease.node, lease.incarnation
                ));
            }
            Ok(Err(e)) => tracing::warn!("renewing the shard lease: {e}"),
            Err(_) => tracing::warn!("renewing the shard lease timed out"),
        }
    }
    if let Err(e) = dir.release_lease(lease.node, lease.incarnation).await {
        tracing::warn!("releasing the shard lease: {e}");
    } else {
        tracing::info!(node = lease.node, "shard lease released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::MemoryDirectory;
    use crate::store::{FjallStore, Op, WriteBatch};
    use im_shared::{Seq, UserId};

    fn batch(lease: &Lease) -> WriteBatch {
        WriteBatch {
            ops: vec![Op::SeqBound {
                uid: UserId(1),
                bound: Seq(10),
            }],
            writer: Some(lease.writer()),
        }
    }

    #[test]
    fn shards_split_the_vshards_between_nodes() {
        let all: Vec<_> = (0..3).flat_map(|n| shards_of(n, 3)).collect();
        assert_eq!(all.len(), VSHARDS as usize);
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), VSHARDS as usize, "no shard twice");
        assert_eq!(shards_of(0, 1).len(), VSHARDS as usize);
        assert_eq!(shards_of(0, 0).len(), VSHARDS as usize);
    }

    #[tokio::test]
    async fn a_displaced_node_is_fenced_in_the_store_and_a_restart_fences_the_old_incarnation() {
        let dir = MemoryDirectory::default();
        let tmp = tempfile::tempdir().unwrap();
        let store = FjallStore::open(tmp.path()).unwrap();
        let shards = shards_of(0, 2);

        let a = acquire(&dir, &store, 0, &shards, 200).await.unwrap();
        assert_eq!(a.state(), LeaseState::Valid);
        store.commit(batch(&a)).await.unwrap();

        // Node 7 wants node 0's shards: it waits out the lease, then displaces node 0.
        let t = Instant::now();
        let b = acquire(&dir, &store, 7, &shards, 10_000).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "waited for the lease"
        );
        assert!(matches!(
            store.commit(batch(&a)).await,
            Err(StoreError::Fenced { node: 0, .. })
        ));
        store.commit(batch(&b)).await.unwrap();
        assert!(matches!(
            dir.renew_lease(0, a.incarnation(), 200).await,
            Err(DirectoryError::LeaseLost { .. })
        ));

        // A restart of node 7 (after a clean release) fences its previous incarnation.
        dir.release_lease(7, b.incarnation()).await.unwrap();
        let b2 = acquire(&dir, &store, 7, &shards, 10_000).await.unwrap();
        assert!(b2.incarnation() > b.incarnation());
        assert!(matches!(
            store.commit(batch(&b)).await,
            Err(StoreError::Fenced { node: 7, .. })
        ));
        store.commit(batch(&b2)).await.unwrap();
    }

    #[tokio::test]
    async fn an_incarnation_the_store_has_seen_is_never_reused() {
        let dir = MemoryDirectory::default();
        let tmp = tempfile::tempdir().unwrap();
        let store = FjallStore::open(tmp.path()).unwrap();
        // The store saw incarnation 3 of node 2 (say, before Redis lost the counter).
        assert_eq!(store.fence(2, 3).await.unwrap(), 3);
        let l = acquire(&dir, &store, 2, &shards_of(0, 1), 10_000)
            .await
            .unwrap();
        assert_eq!(l.incarnation(), 4, "acquired again until past the fence");
        store.commit(batch(&l)).await.unwrap();
        let stale = Lease::new(2, 3, Duration::from_secs(1));
        assert!(matches!(
            store.commit(batch(&stale)).await,
            Err(StoreError::Fenced { fence: 4, .. })
        ));

        // A displaced node is fenced past its store fence even if the directory's counter for
        // it is behind: node 5 runs as incarnation 9 (fenced itself at 9), but the directory lost
        // that and only knows incarnation 1.
        assert_eq!(store.fence(5, 9).await.unwrap(), 9);
        let dir = MemoryDirectory::default();
        let shards = shards_of(1, 2);
        assert_eq!(
            dir.acquire_shards(5, &shards, 50)
                .await
                .unwrap()
                .incarnation,
            1
        );
        let five = Lease::new(5, 9, Duration::from_secs(1));
        store.commit(batch(&five)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        acquire(&dir, &store, 6, &shards, 10_000).await.unwrap();
        assert!(matches!(
            store.commit(batch(&five)).await,
            Err(StoreError::Fenced {
                node: 5,
                incarnation: 9,
                fence: 10
            })
        ));
    }

    #[test]
    fn a_lease_expires_by_the_holders_clock_before_the_directory_lets_it_go() {
        let l = Lease::new(1, 1, Duration::from_secs(40));
        assert_eq!(l.state(), LeaseState::Expired, "not valid before a renewal");
        l.extend(Instant::now());
        assert_eq!(l.state(), LeaseState::Valid);
        l.fence();
        assert_eq!(l.state(), LeaseState::Fenced);

        // A renewal sent at the start of a 40 ms lease is good for 30 ms only.
        let l = Lease::new(1, 1, Duration::from_millis(40));
        let sent = l.origin;
        std::thread::sleep(Duration::from_millis(31));
        l.extend(sent);
        assert_eq!(l.state(), LeaseState::Expired);
        // An older renewal never shortens a newer one.
        l.extend(Instant::now());
        l.extend(sent);
        assert!(l.valid_until.load(Ordering::Relaxed) > 30_000_000);
    }
}
