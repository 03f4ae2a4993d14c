//! The session: built on a dedicated `scylla-driver` thread (see **Runtime** in the module docs
//! of [`ScyllaStore`](super::ScyllaStore)), with `LOCAL_QUORUM` / `LOCAL_SERIAL` defaults, a
//! client-side request timeout and monotonic client-side timestamps.

use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::statement::{Consistency, SerialConsistency};
use tokio::sync::oneshot;

use super::errors::session_err;
use crate::StoreError;

/// Client-side timeout of one request (the server's own timeouts are shorter: 2 s for writes,
/// 5 s for reads by default, so their errors arrive first).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a session on a new `scylla-driver` thread that keeps driving it until the returned
/// sender is dropped.
pub(super) async fn open_session(
    nodes: &[String],
    keyspace: &str,
) -> Result<(Session, oneshot::Sender<()>), StoreError> {
    if nodes.is_empty() {
        return Err(StoreError::Io("scylla connect: no nodes given".into()));
    }
    let nodes = nodes.to_vec();
    let keyspace = keyspace.to_owned();
    let (ready_tx, ready_rx) = oneshot::channel::<Result<Session, StoreError>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("scylla-driver".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(StoreError::Io(format!("driver runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                let profile = ExecutionProfile::builder()
                    .consistency(Consistency::LocalQuorum)
                    .serial_consistency(Some(SerialConsistency::LocalSerial))
                    .request_timeout(Some(REQUEST_TIMEOUT))
                    .build();
                let built = SessionBuilder::new()
                    .known_nodes(&nodes)
                    .default_execution_profile_handle(profile.into_handle())
                    .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
                    .keyspaces_to_fetch([keyspace])
                    .build()
                    .await
                    .map_err(session_err);
                let ok = built.is_ok();
                // If the caller went away the session comes back in the error and is dropped.
                if ready_tx.send(built).is_ok() && ok {
                    // Resolves (with an error) when the store's sender is dropped.
                    let _ = stop_rx.await;
                }
            });
        })
        .map_err(|e| StoreError::Io(format!("spawn scylla driver thread: {e}")))?;
    let session = ready_rx
        .await
        .map_err(|_| StoreError::Io("scylla driver thread died".into()))??;
    Ok((session, stop_tx))
}
