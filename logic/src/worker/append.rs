//! The recipient side of a fan-out: an append to a user's timeline (idempotent for replays), the
//! live delivery to its devices and the confirmation to the outbox owner.

use super::*;

impl<S: Store> Worker<S> {
    pub(super) async fn on_append(&mut self, a: AppendReq, round: &mut Round) {
        let r = a.recipient;
        let key = (r, a.msg.msg_id);
        let done_to = self.router.owner_of_shard(a.shard);
        if round.appended.contains(&key) {
            round.done_out[done_to].push((a.shard, a.msg.msg_id, r));
            return;
        }
        // Store reads are retried in place (not re-queued) so appends keep their order.
        let mut backoff = Duration::from_millis(20);
        let existing = loop {
            let res = match self.load_user(r).await {
                Ok(()) if a.replay => self.store.seq_of(r, a.msg.msg_id).await,
                Ok(()) => Ok(None),
                Err(e) => Err(e),
            };
            match res {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(worker = self.idx, "append to {r}: {e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        if existing.is_none() {
            if a.replay {
                // The live append was lost (with a link, a restart): this copy goes after
                // whatever reached the recipient meanwhile (ARCHITECTURE.md, known limits). Rare
                // enough to log each, so a run that finds a timeline out of order can be traced.
                tracing::warn!(
                    worker = self.idx,
                    recipient = r.0,
                    msg_id = a.msg.msg_id.0,
                    conv = a.msg.conv,
                    to = a.msg.to.0,
                    from = a.msg.from.0,
                    "a replayed append was stored now: its live copy was lost"
                );
            }
            self.append_now(r, &a.msg, round);
        }
        // (An existing one was appended before a restart: only the outbox entry is released.)
        round.done_out[done_to].push((a.shard, a.msg.msg_id, r));
    }

    /// Appends `m` to the timeline of `r` (a loaded user of this worker) in this round's batch
    /// and queues its live delivery and offline-push bookkeeping.
    pub(super) fn append_now(&mut self, r: UserId, m: &Message, round: &mut Round) {
        let key = (r, m.msg_id);
        let (seq, prev_seq) = self.alloc_seq(r, round);
        let msg = Message {
            seq,
            prev_seq,
            ..m.clone()
        };
        round.batch.push(Op::Append {
            uid: r,
            msg: msg.clone(),
        });
        round.appended.insert(key);
        if notifies(msg.conv) && msg.from != r {
            let u = self.users.get_mut(&r).expect("loaded");
            self.active_users += usize::from(u.active.is_none());
            let act = u.active();
            if act.pending.insert(seq.0, Pending::of(&msg)) {
                self.pending_entries += 1;
            }
            if act.pending.len() > MAX_PENDING_NOTICES {
                act.pending.pop_oldest();
                self.pending_entries -= 1;
            }
            if let Some(p) = &self.services.push {
                self.push_due.push_back((self.now + p.delay_ms(), r, seq.0));
                // Durable with the message: a push still to be decided at a crash is decided
                // after the restart (push.rs `replay_push_watches`).
                round.batch.push(Op::PushWatch {
                    shard: vshard_of(r),
                    uid: r,
                    seq,
                    on: true,
                });
            }
        }
        if msg.conv == im_shared::proto::CONV_GROUP_EVENT {
            self.large_event_appended(r, &msg, round);
        }
        let seq = msg.seq;
        let deliver = Command::Deliver(msg).to_bytes(0);
        {
            for d in devices_of_mut(&mut self.users, r) {
                d.sent = d.sent.max(seq);
                round.send(d.conn, deliver.clone());
            }
        }
    }
}
