//! Publishes the worker's live routes to the shared directory (Redis Cluster in a cluster) off the
//! hot path: the worker queues route changes; a task on the worker's runtime applies them with
//! bounded retries and refreshes presence of the users online on this worker. A directory outage
//! never blocks messaging: the owning worker's in-memory routes stay authoritative for delivery,
//! and every login re-writes its route, so the directory heals itself.

use std::collections::HashMap;
use std::time::Duration;

use im_shared::{ConnId, UserId};
use tokio::sync::mpsc;

use crate::directory::{Directory, RouteEntry};

/// Presence lives this long in the directory unless refreshed.
pub const PRESENCE_TTL_SECS: u64 = 90;
/// Refresh period of presence and routes.
const REFRESH_EVERY: Duration = Duration::from_secs(30);

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
}

/// Runs until the worker drops its sender.
pub async fn run<D: Directory>(dir: D, mut rx: mpsc::UnboundedReceiver<DirOp>) {
    let mut online: HashMap<(UserId, u8), RouteEntry> = HashMap::new();
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            op = rx.recv() => match op {
                None => return,
                Some(DirOp::Online { uid, route }) => {
                    online.insert((uid, route.device_type), route.clone());
                    retry(|| async {
                        dir.set_route(uid, route.clone()).await?;
                        dir.touch_presence(uid, PRESENCE_TTL_SECS).await
                    })
                    .await;
                }
                Some(DirOp::Offline { uid, device_type, conn }) => {
                    if online.get(&(uid, device_type)).is_some_and(|r| r.conn == conn.0) {
                        online.remove(&(uid, device_type));
                    }
                    retry(|| dir.remove_route(uid, device_type, conn.0)).await;
                }
            },
            _ = tick.tick() => {
                for ((uid, _), route) in &online {
                    retry(|| async {
                        dir.set_route(*uid, route.clone()).await?;
                        dir.touch_presence(*uid, PRESENCE_TTL_SECS).await
                    })
                    .await;
                }
            }
        }
    }
}

/// Up to 3 attempts for retryable errors; failures are logged and dropped (the next login or
/// refresh writes the state again).
async fn retry<T, F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::directory::DirectoryError>>,
{
    for attempt in 0..3 {
        match f().await {
            Ok(_) => return,
            Err(e) if e.is_retryable() && attempt < 2 => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => {
                tracing::warn!("directory update dropped: {e}");
                return;
            }
        }
    }
}
