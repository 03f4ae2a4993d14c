//! c2s: client reports to business servers, queued durably before they are acknowledged.

use bytes::Bytes;
use im_shared::proto::MAX_TOPIC_LEN;
use im_shared::{Command, ConnId, ErrorCode, Seq, UserId};

use super::{error_frame, Round, Worker};
use crate::c2s::C2sRecord;
use crate::metrics::Metrics;
use crate::store::Store;

impl<S: Store> Worker<S> {
    pub(super) async fn connect_c2s(&mut self) {
        if let Some(hub) = self.services.c2s.clone() {
            match hub.queue().await {
                Ok(q) => self.c2s = Some(q),
                Err(e) => tracing::error!(worker = self.idx, "c2s queue unavailable: {e}"),
            }
        }
    }

    /// c2s: queue the report (acked after the round's enqueue succeeded).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_report(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        client_msg_id: u64,
        topic: String,
        body: Bytes,
        round: &mut Round,
    ) {
        if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
            let m = format!("topic must be 1..={MAX_TOPIC_LEN} bytes");
            round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, &m));
            return;
        }
        if self.c2s.is_none() {
            round.send(
                conn,
                error_frame(
                    ErrorCode::Unavailable,
                    req_id,
                    "no business queue configured",
                ),
            );
            return;
        }
        // A topic the queue cannot deliver (no webhook) is refused now, not dead-lettered later.
        if let Some(Err(e)) = self.services.c2s.as_ref().map(|h| h.check_topic(&topic)) {
            let m = e.to_string();
            round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, &m));
            return;
        }
        let now = self.now;
        let rec = C2sRecord {
            id: self.ids.next(now),
            from: uid,
            client_msg_id,
            topic,
            body,
            time_ms: now,
        };
        round.c2s.push((rec, conn, req_id));
    }

    /// Enqueues the round's c2s records (before the commit) and queues their acks, or errors if
    /// the queue keeps failing (the client retries; delivery is at-least-once anyway).
    pub(super) async fn enqueue_c2s(&mut self, round: &mut Round) {
        if round.c2s.is_empty() {
            return;
        }
        let items = std::mem::take(&mut round.c2s);
        let recs: Vec<C2sRecord> = items.iter().map(|(r, _, _)| r.clone()).collect();
        let mut backoff = std::time::Duration::from_millis(20);
        let mut ok = false;
        if let Some(q) = &self.c2s {
            for _ in 0..5 {
                match q.enqueue(&recs).await {
                    Ok(()) => {
                        ok = true;
                        break;
                    }
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(worker = self.idx, "c2s enqueue failed, retrying: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                    Err(e) => {
                        tracing::error!(worker = self.idx, "c2s enqueue failed: {e}");
                        break;
                    }
                }
            }
        }
        for (rec, conn, req_id) in items {
            if ok {
                Metrics::inc(&self.metrics.c2s_queued);
                let ack = Command::SendAck {
                    code: ErrorCode::Ok,
                    client_msg_id: rec.client_msg_id,
                    msg_id: rec.id,
                    seq: Seq(0),
                    server_time_ms: rec.time_ms,
                    prev_seq: Seq(0),
                };
                round.send(conn, ack.to_bytes(req_id));
            } else {
                Metrics::inc(&self.metrics.c2s_failed);
                round.send(
                    conn,
                    error_frame(ErrorCode::Unavailable, req_id, "business queue unavailable"),
                );
            }
        }
    }
}
