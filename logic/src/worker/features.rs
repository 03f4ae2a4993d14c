//! Recall, read receipts, c2s reports, push-token registration, s2c from the API, and the
//! offline-push check.

use bytes::Bytes;
use im_shared::proto::{
    MarkerBody, CONV_C2C, CONV_C2G, CONV_READ, CONV_RECALL, CONV_S2C, MAX_PUSH_TOKEN_LEN,
    MAX_TOPIC_LEN,
};
use im_shared::shard::VSHARDS;
use im_shared::{Command, ConnId, ErrorCode, GroupId, MsgId, Seq, ShardId, UserId};

use super::groups::GroupOp;
use super::{error_frame, now_ms, op_ok, ApiOk, ApiReq, Reply, Round, Worker};
use crate::api::{Accepted, ApiError};
use crate::c2s::C2sRecord;
use crate::metrics::Metrics;
use crate::push::PushNotification;
use crate::store::{DedupEntry, Op, PushToken, Store};

/// Whether a message of this kind counts as unread content: it may trigger an offline push and
/// waits for a device's ack. Recalls, read receipts and group events do not.
pub(super) fn notifies(conv: u8) -> bool {
    matches!(conv, CONV_C2C | CONV_C2G | CONV_S2C)
}

/// Most recipients of one s2c call.
pub const MAX_S2C_USERS: usize = 1000;

impl<S: Store> Worker<S> {
    pub(super) async fn connect_c2s(&mut self) {
        if let Some(hub) = self.services.c2s.clone() {
            match hub.queue().await {
                Ok(q) => self.c2s = Some(q),
                Err(e) => tracing::error!(worker = self.idx, "c2s queue unavailable: {e}"),
            }
        }
    }

    /// Recall of one's own message within the recall window.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_recall(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        client_msg_id: u64,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
        round: &mut Round,
    ) {
        let refuse = |round: &mut Round, code: ErrorCode, m: &str| {
            round.send(conn, error_frame(code, req_id, m));
        };
        if conv != CONV_C2C && conv != CONV_C2G || peer == 0 {
            return refuse(
                round,
                ErrorCode::InvalidArgument,
                "recall: conv must be c2c or c2g",
            );
        }
        let window = self.cfg.recall_window_secs * 1000;
        if now_ms().saturating_sub(msg_id.timestamp_ms()) > window {
            return refuse(round, ErrorCode::RecallRefused, "recall window has passed");
        }
        // The message must be in the sender's own timeline, sent by them, in this conversation.
        let found = async {
            let Some(seq) = self.store.seq_of(uid, msg_id).await? else {
                return Ok(None);
            };
            let m = self.store.timeline(uid, Seq(seq.0 - 1), 1).await?;
            Ok::<_, crate::store::StoreError>(m.into_iter().next().filter(|m| m.msg_id == msg_id))
        }
        .await;
        let msg = match found {
            Ok(Some(m)) => m,
            Ok(None) => return refuse(round, ErrorCode::NotFound, "no such message"),
            Err(e) => {
                tracing::warn!("recall by {uid}: {e}");
                return refuse(round, ErrorCode::Unavailable, "store unavailable");
            }
        };
        if msg.from != uid || msg.conv != conv || msg.to.0 != peer {
            return refuse(
                round,
                ErrorCode::RecallRefused,
                "not your message in this conversation",
            );
        }
        let body = MarkerBody { conv, msg_id }.to_bytes();
        if conv == CONV_C2C {
            self.accept_direct(
                conn,
                uid,
                req_id,
                client_msg_id,
                CONV_RECALL,
                UserId(peer),
                body,
                true,
                round,
            )
            .await
        } else {
            let op = GroupOp::Post {
                client_msg_id,
                conv: CONV_RECALL,
                body,
            };
            self.forward_group(uid, GroupId(peer), op, Reply::Conn { conn, req_id }, round);
        }
    }

    /// A read receipt: to the peer and the reader's devices (c2c), or the reader's devices only
    /// (c2g: a receipt per member would cost a timeline entry per member per read).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_read(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        client_msg_id: u64,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
        round: &mut Round,
    ) {
        if conv != CONV_C2C && conv != CONV_C2G {
            round.send(
                conn,
                error_frame(
                    ErrorCode::InvalidArgument,
                    req_id,
                    "read: conv must be c2c or c2g",
                ),
            );
            return;
        }
        let body = MarkerBody { conv, msg_id }.to_bytes();
        self.accept_direct(
            conn,
            uid,
            req_id,
            client_msg_id,
            CONV_READ,
            UserId(peer),
            body,
            conv == CONV_C2C,
            round,
        )
        .await
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
        let now = now_ms();
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

    pub(super) fn on_register_push(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        provider: u8,
        token: String,
        round: &mut Round,
    ) {
        if !(1..=3).contains(&provider) || token.len() > MAX_PUSH_TOKEN_LEN {
            let m =
                format!("provider must be 1..=3 and the token at most {MAX_PUSH_TOKEN_LEN} bytes");
            round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, &m));
            return;
        }
        let Some(device_id) = self
            .routes
            .get(&uid)
            .and_then(|ds| ds.iter().find(|d| d.conn == conn))
            .map(|d| d.device_id.clone())
        else {
            return;
        };
        round.batch.push(Op::PushToken {
            uid,
            token: PushToken {
                device_id,
                provider,
                token,
            },
        });
        round.send(conn, op_ok(req_id, 0));
    }

    /// The lowest virtual shard this worker owns: the outbox shard of its s2c messages.
    fn my_shard(&self) -> ShardId {
        let me = self.router.global(self.idx);
        (0..VSHARDS)
            .map(ShardId)
            .find(|s| self.router.owner_of_shard(*s) == me)
            .unwrap_or(ShardId(0))
    }

    pub(super) async fn on_api(&mut self, req: ApiReq, round: &mut Round) {
        match req {
            ApiReq::ServerSend {
                from,
                to,
                body,
                request_id,
                reply,
            } => {
                let mut to = to;
                to.retain(|u| u.0 != 0);
                to.sort_unstable();
                to.dedup();
                if from.0 == 0 || to.is_empty() || to.len() > MAX_S2C_USERS {
                    let e = ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!("from must be non-zero and to 1..={MAX_S2C_USERS} users"),
                    );
                    round.api.push((reply, Err(e)));
                    return;
                }
                if request_id != 0 {
                    match self.store.dedup(from, request_id).await {
                        Ok(Some(e)) => {
                            let a = Accepted {
                                msg_id: e.msg_id,
                                server_time_ms: e.server_time_ms,
                            };
                            round.api.push((reply, Ok(ApiOk::Accepted(a))));
                            return;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("s2c dedup of {from}: {e}");
                            let e = ApiError::new(ErrorCode::Unavailable, "store unavailable");
                            round.api.push((reply, Err(e)));
                            return;
                        }
                    }
                }
                let now = now_ms();
                let msg = im_shared::proto::Message {
                    seq: Seq(0),
                    prev_seq: Seq(0),
                    msg_id: self.ids.next(now),
                    conv: CONV_S2C,
                    from,
                    to: if to.len() == 1 { to[0] } else { UserId(0) },
                    client_msg_id: request_id,
                    server_time_ms: now,
                    body,
                };
                let entry = DedupEntry {
                    msg_id: msg.msg_id,
                    seq: Seq(0),
                    prev_seq: Seq(0),
                    server_time_ms: now,
                };
                if request_id != 0 {
                    round.batch.push(Op::Dedup {
                        uid: from,
                        client_msg_id: request_id,
                        entry,
                    });
                }
                self.metrics.accepted(CONV_S2C);
                let shard = self.my_shard();
                self.fan_out(shard, &msg, to, round);
                let a = Accepted {
                    msg_id: msg.msg_id,
                    server_time_ms: now,
                };
                round.api.push((reply, Ok(ApiOk::Accepted(a))));
            }
            ApiReq::GroupCreate {
                owner,
                name,
                members,
                reply,
            } => self.on_group_create(owner, name, members, Reply::Api(reply), round),
            ApiReq::GroupsOf { uid, reply } => {
                self.on_my_groups(uid, Reply::Api(reply), round).await
            }
            ApiReq::DropPushToken { uid, device_id } => round.batch.push(Op::PushToken {
                uid,
                token: PushToken {
                    device_id,
                    provider: 0,
                    token: String::new(),
                },
            }),
        }
    }

    /// Sends push notifications for messages that no device acknowledged within the delay.
    pub(super) async fn push_overdue(&mut self) {
        let Some(push) = self.services.push.clone() else {
            return;
        };
        let now = now_ms();
        let mut due: Vec<(UserId, u64)> = Vec::new();
        while let Some(&(t, uid, seq)) = self.push_due.front() {
            if t > now {
                break;
            }
            self.push_due.pop_front();
            due.push((uid, seq));
        }
        // One notification per user per check: the newest overdue message, with the count of
        // unacknowledged ones as the badge.
        due.sort_unstable();
        due.dedup_by_key(|(u, _)| *u);
        for (uid, _) in due {
            let Some(p) = self
                .users
                .get(&uid)
                .and_then(|u| u.active.as_ref())
                .and_then(|a| {
                    let unread = a.pending.len() as u32;
                    a.pending.values().next_back().map(|p| (p, unread))
                })
                .map(|(p, unread)| {
                    (
                        p.sender,
                        p.msg_id,
                        p.conv,
                        p.peer,
                        p.preview.clone(),
                        unread,
                    )
                })
            else {
                continue; // acknowledged in time
            };
            let (sender, msg_id, conv, peer, preview, unread) = p;
            if now.saturating_sub(msg_id.timestamp_ms()) < push.delay_ms() {
                continue; // the newest one is not overdue yet: its own check comes later
            }
            let tokens = match self.store.push_tokens(uid).await {
                Ok(t) if !t.is_empty() => t,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("push tokens of {uid}: {e}");
                    continue;
                }
            };
            match self.store.mutes(uid).await {
                Ok(m) if m.contains(&0) || m.contains(&peer) => {
                    Metrics::inc(&self.metrics.pushes_muted);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("mutes of {uid}: {e}");
                    continue;
                }
            }
            for t in tokens {
                Metrics::inc(&self.metrics.pushes);
                push.submit(PushNotification {
                    uid,
                    device_id: t.device_id,
                    provider: t.provider,
                    token: t.token,
                    msg_id,
                    from: sender,
                    conv,
                    // The conversation as the recipient sees it: the group for c2g, else the
                    // recipient itself (mutes are keyed by `peer`: the sender or the group).
                    to: if conv == im_shared::proto::CONV_C2G {
                        peer
                    } else {
                        uid.0
                    },
                    preview: String::from_utf8_lossy(&preview).into_owned(),
                    unread,
                });
            }
        }
    }
}
