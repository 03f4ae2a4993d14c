//! Publishes the worker's live routes to the shared directory (Redis Cluster in a cluster) off the
//! hot path: the worker queues route changes; a task on the worker's runtime applies them with
//! bounded retries and refreshes presence of the users online on this worker. A directory outage
//! never blocks messaging: the owning worker's in-memory routes stay authoritative for delivery,
//! and every login re-writes its route, so the directory heals itself.
//!
//! The queue is bounded ([`QUEUE`] changes): a worker whose change does not fit (the directory is
//! slow or down while users log in and out) drops it and, once there is room again, sends one
//! [`DirOp::Resync`] with every route it holds and the routes whose `Offline` it dropped: those
//! are removed (compare-and-delete by connection), the others written again. So memory stays
//! bounded and the directory converges after any loss. A resync holds every route of the worker,
//! so at most one is queued or being applied at a time ([`InFlight`]); changes dropped meanwhile
//! are covered by the next one. (Before, a starved node queued a resync per round: 228 copies of
//! 90 000 routes in 15 s, ~900 MB that stayed.)
//!
//! This task keeps no copy of what it published: the worker holds the routes, sends the users to
//! refresh ([`DirOp::Touch`], every [`REFRESH_EVERY`]) and the removals a resync must make. (A
//! table of every published route's connection cost ~52 B per online user at 500 000 users per
//! worker, issue 15.) What it keeps is the removals that failed their retries, tried again
//! before the next resync or refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_shared::{ConnId, UserId};
use tokio::sync::mpsc;

use crate::directory::{Directory, RouteEntry};

/// Presence lives this long in the directory unless refreshed.
pub const PRESENCE_TTL_SECS: u64 = 90;
/// Refresh period of presence (and with it of the route hashes' TTL), driven by the worker.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Route removals kept for a later attempt at most (by the worker: `Offline`s it dropped; here:
/// removals that failed). Beyond, newer ones are forgotten: such a route stays in the directory
/// until its user's presence expires (when no other device of the user refreshes it).
pub const MAX_GONE: usize = 65_536;

/// A route to remove: `(user, device type, connection)`, compare-and-delete by connection.
pub type Gone = (UserId, u8, ConnId);
/// Route changes a worker may have queued for its publisher.
pub const QUEUE: usize = 16_384;

/// A route change for the directory.
#[derive(Debug)]
pub enum DirOp {
    Online {
        uid: UserId,
        route: RouteEntry,
    },
    Offline {
        uid: UserId,
        device_type: u8,
        conn: ConnId,
    },
    /// Every route the worker holds now (after changes were dropped at a full queue), the routes
    /// whose `Offline` was dropped, and the worker's mark that a resync is on its way, cleared
    /// when this one is applied (or dropped).
    Resync(Vec<(UserId, RouteEntry)>, Vec<Gone>, InFlight),
    /// The users with a route on the worker: their presence (and the route hash's TTL) is
    /// refreshed. A refresh that fails asks the worker for a resync at the next period.
    Touch(Vec<UserId>),
}

/// The worker's "a resync is queued or being applied" mark: set by [`InFlight::start`], cleared
/// when the value is dropped, i.e. when the publisher is done with the resync that carries it
/// (or gone).
#[derive(Debug)]
pub struct InFlight(Arc<AtomicBool>);

impl InFlight {
    /// Marks a resync as on its way through `flag`, unless one already is.
    pub fn start(flag: &Arc<AtomicBool>) -> Option<InFlight> {
        (!flag.swap(true, Ordering::AcqRel)).then(|| InFlight(flag.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Changes written to the directory at once: a batch of queued changes, a slice of a resync or
/// of a refresh. The Redis client pipelines them on its connections, so a batch costs about one
/// round trip instead of one per change (one at a time, a node fell behind at ~4 000 logins/s and
/// dropped changes into resyncs: 670 000 dropped for 360 000 logins at 6 000/s).
const WINDOW: usize = 256;

/// Runs until the worker drops its sender. `heal` is the worker's "send me a resync" mark: set at
/// a refresh after a write to the directory failed (it was down, or slow past the retries), so
/// the routes written meanwhile, or lost, are written again from the worker's own state, at most
/// once per [`REFRESH_EVERY`].
pub async fn run<D: Directory>(dir: D, mut rx: mpsc::Receiver<DirOp>, heal: Arc<AtomicBool>) {
    let mut failed = false;
    // Removals that failed their retries.
    let undone = Mutex::new(Vec::<Gone>::new());
    // The first check one period after the start.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<DirOp> = Vec::with_capacity(WINDOW);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, WINDOW) => {
                if n == 0 {
                    return;
                }
                // Changes before a resync are applied first (it replaces what they published).
                while !batch.is_empty() {
                    let cut = batch
                        .iter()
                        .position(|op| matches!(op, DirOp::Resync(..) | DirOp::Touch(_)))
                        .unwrap_or(batch.len());
                    let changes: Vec<DirOp> = batch.drain(..cut).collect();
                    if !changes.is_empty() {
                        failed |= !apply_changes(&dir, changes, &undone).await;
                    }
                    match (!batch.is_empty()).then(|| batch.remove(0)) {
                        Some(DirOp::Resync(routes, mut gone, _in_flight)) => {
                            gone.extend(take_undone(&undone));
                            failed = !resync(&dir, routes, gone, &undone).await;
                        }
                        Some(DirOp::Touch(uids)) => {
                            let gone = take_undone(&undone);
                            let ok = remove_all(&dir, gone, &undone).await;
                            failed |= !(ok && touch(&dir, &uids).await);
                        }
                        _ => {}
                    }
                }
            }
            _ = tick.tick() => {
                if std::mem::take(&mut failed) {
                    heal.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// Applies queued `Online` / `Offline` changes: those of one `(user, device type)` in their order,
/// the others side by side. A removal that fails its retries is kept in `undone`. Whether every
/// write succeeded.
async fn apply_changes<D: Directory>(
    dir: &D,
    changes: Vec<DirOp>,
    undone: &Mutex<Vec<Gone>>,
) -> bool {
    let mut chains: HashMap<(UserId, u8), Vec<DirOp>> = HashMap::new();
    for op in changes {
        let key = match &op {
            DirOp::Online { uid, route } => (*uid, route.device_type),
            DirOp::Offline {
                uid, device_type, ..
            } => (*uid, *device_type),
            DirOp::Resync(..) | DirOp::Touch(_) => unreachable!("applied on their own"),
        };
        chains.entry(key).or_default().push(op);
    }
    all_of(chains.into_values().map(|ops| async move {
        let mut ok = true;
        for op in ops {
            ok &= match op {
                DirOp::Online { uid, route } => write(dir, uid, &route).await,
                DirOp::Offline {
                    uid,
                    device_type,
                    conn,
                } => {
                    let removed = retry(|| dir.remove_route(uid, device_type, conn.0)).await;
                    if !removed {
                        keep_undone(undone, vec![(uid, device_type, conn)]);
                    }
                    removed
                }
                DirOp::Resync(..) | DirOp::Touch(_) => true,
            };
        }
        ok
    }))
    .await
}

/// Takes the removals kept for another attempt.
fn take_undone(undone: &Mutex<Vec<Gone>>) -> Vec<Gone> {
    std::mem::take(&mut *undone.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Keeps removals for another attempt, at most [`MAX_GONE`] (the first ones).
fn keep_undone(undone: &Mutex<Vec<Gone>>, more: Vec<Gone>) {
    let mut u = undone.lock().unwrap_or_else(|e| e.into_inner());
    let room = MAX_GONE.saturating_sub(u.len());
    if more.len() > room {
        let n = more.len() - room;
        tracing::warn!("{n} directory route removals forgotten (they expire with presence)");
    }
    u.extend(more.into_iter().take(room));
}

/// Removes `gone` (compare-and-delete), a window at a time; at the first window with a failure,
/// it and the rest are kept in `undone`. Whether all were done.
async fn remove_all<D: Directory>(dir: &D, gone: Vec<Gone>, undone: &Mutex<Vec<Gone>>) -> bool {
    for (i, part) in gone.chunks(WINDOW).enumerate() {
        let ok = all_of(part.iter().map(|&(uid, device_type, conn)| async move {
            retry(|| dir.remove_route(uid, device_type, conn.0)).await
        }))
        .await;
        if !ok {
            keep_undone(undone, gone[i * WINDOW..].to_vec());
            return false;
        }
    }
    true
}

/// Writes every route the worker holds, after removing those whose `Offline` was dropped
/// (compare-and-delete: a route the worker holds again on a newer connection stays). Stops at
/// the first window with a failure. Whether it all succeeded.
async fn resync<D: Directory>(
    dir: &D,
    routes: Vec<(UserId, RouteEntry)>,
    gone: Vec<Gone>,
    undone: &Mutex<Vec<Gone>>,
) -> bool {
    if !remove_all(dir, gone, undone).await {
        return false;
    }
    for part in routes.chunks(WINDOW) {
        if !all_of(part.iter().map(|(uid, route)| write(dir, *uid, route))).await {
            return false;
        }
    }
    true
}

/// Awaits every future, side by side on this task. Whether all returned true.
async fn all_of<F: std::future::Future<Output = bool>>(futs: impl Iterator<Item = F>) -> bool {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut ok = true;
    std::future::poll_fn(|cx| {
        futs.retain_mut(|f| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => {
                ok &= r;
                false
            }
            std::task::Poll::Pending => true,
        });
        if futs.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    ok
}

/// Writes one route and marks its user online. Whether it succeeded.
async fn write<D: Directory>(dir: &D, uid: UserId, route: &RouteEntry) -> bool {
    retry(|| async {
        dir.set_route(uid, route.clone()).await?;
        dir.touch_presence(uid, PRESENCE_TTL_SECS).await
    })
    .await
}

/// Refreshes the presence (and with it the route hash's TTL) of `uids`, the users with a route on
/// the worker, a window at a time; stops at the first window with a refresh that failed its
/// retries (the directory is down: the next period asks the worker for a resync). Whether every
/// refresh succeeded.
async fn touch<D: Directory>(dir: &D, uids: &[UserId]) -> bool {
    for part in uids.chunks(WINDOW) {
        let ok = all_of(
            part.iter()
                .map(|&uid| retry(move || dir.touch_presence(uid, PRESENCE_TTL_SECS))),
        )
        .await;
        if !ok {
            return false;
        }
    }
    true
}

/// Up to 3 attempts for retryable errors; failures are logged and dropped (the next login or
/// refresh writes the state again). Whether it succeeded.
async fn retry<T, F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::directory::DirectoryError>>,
{
    for attempt in 0..3 {
        match f().await {
            Ok(_) => return true,
            Err(e) if e.is_retryable() && attempt < 2 => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => {
                tracing::warn!("directory update dropped: {e}");
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::MemoryDirectory;

    fn route(dt: u8, conn: u64) -> RouteEntry {
        RouteEntry {
            device_type: dt,
            device_id: format!("d{conn}"),
            gate: 1,
            core: 0,
            conn,
            epoch: 1,
        }
    }

    async fn conns(dir: &MemoryDirectory, uid: u64) -> Vec<u64> {
        let mut v: Vec<u64> = dir
            .routes(UserId(uid))
            .await
            .unwrap()
            .iter()
            .map(|r| r.conn)
            .collect();
        v.sort();
        v
    }

    /// Waits (with a deadline) until the publisher applied what was sent.
    async fn settle(dir: &MemoryDirectory, uid: u64, want: &[u64]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while conns(dir, uid).await != want {
            assert!(
                std::time::Instant::now() < deadline,
                "uid {uid}: {:?}",
                conns(dir, uid).await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A resync removes the routes whose `Offline` the worker dropped (compare-and-delete: one
    /// held again on a newer connection stays) and writes the held ones (also those whose
    /// `Online` was dropped).
    #[tokio::test]
    async fn a_resync_removes_the_routes_whose_offline_was_dropped_and_writes_the_rest() {
        let dir = MemoryDirectory::new();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(dir.clone(), rx, Arc::default()));
        for (uid, conn) in [(1, 11), (2, 21), (3, 31)] {
            let route = route(1, conn);
            tx.send(DirOp::Online {
                uid: UserId(uid),
                route,
            })
            .await
            .unwrap();
        }
        settle(&dir, 3, &[31]).await;
        // The worker lost changes: user 2 went away, user 3 re-logged in on connection 32, user
        // 4 came (its Online dropped), user 1 stayed.
        let held = vec![
            (UserId(1), route(1, 11)),
            (UserId(3), route(1, 32)),
            (UserId(4), route(1, 41)),
        ];
        let flag = Arc::new(AtomicBool::new(false));
        let in_flight = InFlight::start(&flag).expect("none yet");
        assert!(InFlight::start(&flag).is_none(), "one at a time");
        let gone = vec![(UserId(2), 1, ConnId(21)), (UserId(3), 1, ConnId(31))];
        tx.send(DirOp::Resync(held, gone, in_flight)).await.unwrap();
        settle(&dir, 4, &[41]).await;
        // Applied: the next one may go.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while flag.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the resync's mark was never cleared"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(InFlight::start(&flag).is_some());
        assert_eq!(conns(&dir, 1).await, [11]);
        assert_eq!(conns(&dir, 2).await, Vec::<u64>::new());
        assert_eq!(conns(&dir, 3).await, [32]);
        assert!(dir.is_online(UserId(4)).await.unwrap());
    }

    /// Changes queued together are written side by side, but those of one device keep their
    /// order: a login, its logout and the next login of the same device end with the last one,
    /// also when the first write is slower than the others.
    #[tokio::test(start_paused = true)]
    async fn a_batch_keeps_the_order_of_one_devices_changes() {
        let dir = MemoryDirectory::new();
        let flaky = Flaky {
            inner: dir.clone(),
            down: Arc::default(),
            touches: Arc::default(),
            slow_conn: 51,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        for uid in 100..400 {
            tx.send(DirOp::Online {
                uid: UserId(uid),
                route: route(1, uid * 10),
            })
            .await
            .unwrap();
        }
        tx.send(DirOp::Online {
            uid: UserId(5),
            route: route(1, 51),
        })
        .await
        .unwrap();
        tx.send(DirOp::Offline {
            uid: UserId(5),
            device_type: 1,
            conn: ConnId(51),
        })
        .await
        .unwrap();
        tx.send(DirOp::Online {
            uid: UserId(5),
            route: route(1, 52),
        })
        .await
        .unwrap();
        tx.send(DirOp::Offline {
            uid: UserId(6),
            device_type: 1,
            conn: ConnId(61),
        })
        .await
        .unwrap();
        tx.send(DirOp::Online {
            uid: UserId(6),
            route: route(1, 61),
        })
        .await
        .unwrap();
        // All of it is queued before the publisher first runs.
        tokio::spawn(run(flaky, rx, Arc::default()));
        settle(&dir, 5, &[52]).await;
        settle(&dir, 6, &[61]).await;
        for uid in 100..400 {
            settle(&dir, uid, &[uid * 10]).await;
        }
    }

    /// A directory that refuses route writes and presence refreshes while `down` is set.
    #[derive(Clone)]
    struct Flaky {
        inner: MemoryDirectory,
        down: Arc<AtomicBool>,
        touches: Arc<std::sync::atomic::AtomicUsize>,
        /// A route with this connection takes 10 ms to write.
        slow_conn: u64,
    }

    impl Flaky {
        fn check(&self) -> Result<(), crate::directory::DirectoryError> {
            if self.down.load(Ordering::Acquire) {
                Err(crate::directory::DirectoryError::Unavailable("down".into()))
            } else {
                Ok(())
            }
        }
    }

    impl Directory for Flaky {
        async fn set_route(
            &self,
            uid: UserId,
            route: RouteEntry,
        ) -> Result<(), crate::directory::DirectoryError> {
            self.check()?;
            if route.conn == self.slow_conn {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.inner.set_route(uid, route).await
        }
        async fn routes(
            &self,
            uid: UserId,
        ) -> Result<Vec<RouteEntry>, crate::directory::DirectoryError> {
            self.inner.routes(uid).await
        }
        async fn remove_route(
            &self,
            uid: UserId,
            device_type: u8,
            conn: u64,
        ) -> Result<bool, crate::directory::DirectoryError> {
            self.check()?;
            self.inner.remove_route(uid, device_type, conn).await
        }
        async fn touch_presence(
            &self,
            uid: UserId,
            ttl_secs: u64,
        ) -> Result<(), crate::directory::DirectoryError> {
            self.check()?;
            self.touches.fetch_add(1, Ordering::Relaxed);
            self.inner.touch_presence(uid, ttl_secs).await
        }
        async fn is_online(&self, uid: UserId) -> Result<bool, crate::directory::DirectoryError> {
            self.inner.is_online(uid).await
        }
        async fn register_gate(
            &self,
            gate: crate::directory::GateInfo,
            ttl_secs: u64,
        ) -> Result<(), crate::directory::DirectoryError> {
            self.inner.register_gate(gate, ttl_secs).await
        }
        async fn gates(
            &self,
        ) -> Result<Vec<crate::directory::GateInfo>, crate::directory::DirectoryError> {
            self.inner.gates().await
        }
        async fn shard_owner(
            &self,
            vshard: im_shared::ShardId,
        ) -> Result<Option<(u16, u64)>, crate::directory::DirectoryError> {
            self.inner.shard_owner(vshard).await
        }
        async fn claim_shard(
            &self,
            vshard: im_shared::ShardId,
            node: u16,
            epoch: u64,
        ) -> Result<u64, crate::directory::DirectoryError> {
            self.inner.claim_shard(vshard, node, epoch).await
        }
        async fn shard_map(
            &self,
        ) -> Result<Vec<(im_shared::ShardId, u16, u64)>, crate::directory::DirectoryError> {
            self.inner.shard_map().await
        }
        async fn acquire_shards(
            &self,
            node: u16,
            vshards: &[im_shared::ShardId],
            lease_ms: u64,
        ) -> Result<crate::directory::Acquired, crate::directory::DirectoryError> {
            self.inner.acquire_shards(node, vshards, lease_ms).await
        }
        async fn renew_lease(
            &self,
            node: u16,
            incarnation: u64,
            lease_ms: u64,
        ) -> Result<(), crate::directory::DirectoryError> {
            self.inner.renew_lease(node, incarnation, lease_ms).await
        }
        async fn release_lease(
            &self,
            node: u16,
            incarnation: u64,
        ) -> Result<(), crate::directory::DirectoryError> {
            self.inner.release_lease(node, incarnation).await
        }
    }

    /// A publisher over a [`Flaky`] directory (down or not) with its heal mark and its queue.
    fn start_flaky(down: bool) -> (MemoryDirectory, Flaky, Arc<AtomicBool>, mpsc::Sender<DirOp>) {
        let mem = MemoryDirectory::new();
        let dir = Flaky {
            inner: mem.clone(),
            down: Arc::new(AtomicBool::new(down)),
            touches: Arc::default(),
            slow_conn: 0,
        };
        let heal = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(dir.clone(), rx, heal.clone()));
        (mem, dir, heal, tx)
    }

    /// A route written while the directory was down is not lost for good: the next refresh asks
    /// the worker for a resync (once, not at every failure), the resync writes it, and the refresh
    /// after that keeps presence alive without another resync.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_failed_makes_the_next_refresh_ask_for_one_resync() {
        let (mem, dir, heal, tx) = start_flaky(true);
        tx.send(DirOp::Online {
            uid: UserId(7),
            route: route(1, 71),
        })
        .await
        .unwrap();
        // The write fails its retries (100 + 200 ms); nothing asks for a resync before the refresh.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!heal.load(Ordering::Acquire), "asked before the refresh");
        assert!(conns(&mem, 7).await.is_empty());
        dir.down.store(false, Ordering::Release);
        tokio::time::sleep(REFRESH_EVERY).await;
        assert!(
            heal.swap(false, Ordering::AcqRel),
            "no resync asked after a failed write"
        );
        assert!(conns(&mem, 7).await.is_empty(), "a refresh only touches");
        // The worker answers with every route it holds.
        let flag = Arc::new(AtomicBool::new(false));
        let in_flight = InFlight::start(&flag).expect("none yet");
        tx.send(DirOp::Resync(
            vec![(UserId(7), route(1, 71))],
            Vec::new(),
            in_flight,
        ))
        .await
        .unwrap();
        settle(&mem, 7, &[71]).await;
        // The worker's refreshes (one per period) touch presence and ask nothing more.
        let touched = dir.touches.load(Ordering::Relaxed);
        for _ in 0..3 {
            tx.send(DirOp::Touch(vec![UserId(7)])).await.unwrap();
            tokio::time::sleep(REFRESH_EVERY).await;
        }
        assert!(
            !heal.load(Ordering::Acquire),
            "asked again with nothing failed"
        );
        assert_eq!(dir.touches.load(Ordering::Relaxed), touched + 3);
    }

    /// A removal that fails its retries (the directory was down) is not forgotten: the next
    /// refresh removes it, and a failed refresh asks the worker for a resync.
    #[tokio::test(start_paused = true)]
    async fn a_failed_removal_is_done_at_the_next_refresh() {
        let (mem, dir, heal, tx) = start_flaky(false);
        tx.send(DirOp::Online {
            uid: UserId(8),
            route: route(1, 81),
        })
        .await
        .unwrap();
        settle(&mem, 8, &[81]).await;
        dir.down.store(true, Ordering::Release);
        tx.send(DirOp::Offline {
            uid: UserId(8),
            device_type: 1,
            conn: ConnId(81),
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(conns(&mem, 8).await, [81], "removed while down");
        // A refresh while still down fails; the period's end asks for a resync.
        tx.send(DirOp::Touch(vec![UserId(9)])).await.unwrap();
        tokio::time::sleep(REFRESH_EVERY).await;
        assert!(heal.swap(false, Ordering::AcqRel), "no resync asked");
        dir.down.store(false, Ordering::Release);
        tx.send(DirOp::Touch(vec![UserId(9)])).await.unwrap();
        settle(&mem, 8, &[]).await;
    }
}
