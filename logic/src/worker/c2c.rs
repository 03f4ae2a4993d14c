//! One-to-one messages: dedup on `(sender, client_msg_id)`, the sender's timeline entry, the ack,
//! and the fan-out to the recipient through the outbox.

use super::*;

impl<S: Store> Worker<S> {
    /// The stored dedup record of `(uid, client_msg_id)` if it is within
    /// [`im_store::DEDUP_WINDOW`] of this round's clock: an older one (fjall keeps it until a
    /// compaction drops it) no longer makes a send a retry, as ScyllaDB's TTL would have removed
    /// it.
    pub(super) async fn stored_dedup(
        &self,
        uid: UserId,
        client_msg_id: u64,
    ) -> Result<Option<DedupEntry>, StoreError> {
        let window = im_store::DEDUP_WINDOW.as_millis() as u64;
        Ok(self
            .store
            .dedup(uid, client_msg_id)
            .await?
            .filter(|e| e.server_time_ms.saturating_add(window) >= self.now))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_send_c2c(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        client_msg_id: u64,
        to: UserId,
        body: Bytes,
        round: &mut Round,
    ) {
        if let Err((code, why)) = self.org_allows_c2c(uid, to) {
            // A retry of a message accepted before the tree changed still gets its ack.
            if !matches!(self.stored_dedup(uid, client_msg_id).await, Ok(Some(_))) {
                round.send(conn, error_frame(code, req_id, &why));
                return;
            }
        }
        self.accept_direct(
            conn,
            uid,
            req_id,
            client_msg_id,
            CONV_C2C,
            to,
            body,
            true,
            round,
        )
        .await
    }

    /// Accepts a message of `uid` addressed to `to` (c2c content, or a recall / read receipt):
    /// dedup on `(uid, client_msg_id)`, an entry in the sender's timeline (roaming to its other
    /// devices) and, with `fan_out`, the outbox record and the append to `to`'s timeline.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn accept_direct(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        client_msg_id: u64,
        conv: u8,
        to: UserId,
        body: Bytes,
        fan_out: bool,
        round: &mut Round,
    ) {
        let ack = |e: DedupEntry| ack_frame(client_msg_id, e, req_id);
        if to.0 == 0 {
            round.send(
                conn,
                error_frame(
                    ErrorCode::InvalidArgument,
                    req_id,
                    "recipient must not be 0",
                ),
            );
            return;
        }
        // A recipient of this worker is appended in the same batch (below), so it is loaded now,
        // before anything is decided: a send is accepted whole or not at all.
        let local = fan_out && to != uid && self.owner(to) == self.router.global(self.idx);
        let mut loaded = self.load_user(uid).await;
        if loaded.is_ok() && local {
            loaded = self.load_user(to).await;
        }
        if let Err(e) = loaded {
            tracing::warn!("send by {uid}: {e}");
            round.send(
                conn,
                error_frame(ErrorCode::Unavailable, req_id, "store unavailable"),
            );
            return;
        }
        // Dedup: the in-memory window, then the store.
        let cached = self.users[&uid]
            .active
            .as_ref()
            .and_then(|a| a.dedup.get(&client_msg_id).copied());
        if let Some(e) = cached {
            round.send(conn, ack(e));
            return;
        }
        match self.stored_dedup(uid, client_msg_id).await {
            Ok(Some(e)) => {
                self.remember(uid, client_msg_id, e);
                round.send(conn, ack(e));
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("dedup lookup for {uid}: {e}");
                round.send(
                    conn,
                    error_frame(ErrorCode::Unavailable, req_id, "store unavailable"),
                );
                return;
            }
        }
        let now = self.now;
        let msg_id = self.ids.next(now);
        let (seq, prev_seq) = self.alloc_seq(uid, round);
        let msg = Message {
            seq,
            prev_seq,
            msg_id,
            conv,
            from: uid,
            to,
            client_msg_id,
            server_time_ms: now,
            body,
        };
        self.metrics.accepted(conv);
        let entry = DedupEntry {
            msg_id,
            seq,
            server_time_ms: now,
            prev_seq,
        };
        self.remember(uid, client_msg_id, entry);
        // The recipient's copy carries the msg index (a recall looks the message up there), so
        // the sender's copy needs none, if the recipient's timeline is in this node's store (a
        // node of a cluster may have a store of its own); a message to oneself is its only copy.
        // (`local` is a case of the same store.)
        let msg_c = msg.clone();
        let same_store = self.router.node_of(self.owner(to)) == self.router.node;
        round.batch.push(if fan_out && to != uid && same_store {
            Op::AppendUnindexed { uid, msg: msg_c }
        } else {
            Op::Append { uid, msg: msg_c }
        });
        round.batch.push(Op::Dedup {
            uid,
            client_msg_id,
            entry,
        });
        if local {
            // Sender and recipient on one worker: both timelines in one batch, one commit; no
            // outbox entry is needed, since nothing is left to do after the commit but deliver.
            self.append_now(to, &msg, round);
        } else if fan_out && to != uid {
            self.fan_out(vshard_of(uid), &msg, vec![to], round);
        }
        round.send(conn, ack(entry));
        // Roaming: the sender's other devices see their own message.
        let deliver = Command::Deliver(msg).to_bytes(0);
        {
            for d in devices_of_mut(&mut self.users, uid) {
                // The sending device got its own message's place in the ack.
                d.sent = d.sent.max(seq);
                if d.conn != conn {
                    round.send(d.conn, deliver.clone());
                }
            }
        }
    }

    pub(super) fn remember(&mut self, uid: UserId, client_msg_id: u64, e: DedupEntry) {
        let window = self.cfg.dedup_window;
        let u = self.users.get_mut(&uid).expect("user loaded");
        self.active_users += usize::from(u.active.is_none());
        let a = u.active();
        if a.dedup.insert(client_msg_id, e).is_none() {
            self.dedup_entries += 1;
            a.dedup_order.push_back(client_msg_id);
            while a.dedup_order.len() > window {
                if let Some(old) = a.dedup_order.pop_front() {
                    if a.dedup.remove(&old).is_some() {
                        self.dedup_entries -= 1;
                    }
                }
            }
        }
    }
}
