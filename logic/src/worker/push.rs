//! Offline push: device push-token registration, and the check for messages no device
//! acknowledged within the push delay.

use im_shared::proto::MAX_PUSH_TOKEN_LEN;
use im_shared::shard::{vshard_of, VSHARDS};
use im_shared::{ConnId, ErrorCode, ShardId, UserId};

use super::{devices_of, error_frame, op_ok, Round, Worker};
use crate::metrics::Metrics;
use crate::push::PushNotification;
use crate::store::{Op, PushToken, Store};

impl<S: Store> Worker<S> {
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
        let Some(device_id) = devices_of(&self.users, uid)
            .iter()
            .find(|d| d.conn == conn)
            .map(|d| d.device_id.to_string())
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

    /// At start: the push watches of this worker's shards are the messages whose push was not
    /// decided when the previous process stopped; they are checked one push delay later (the
    /// users' pending
    /// notices are rebuilt from the store on the way, see `recover_pending`). Without a push
    /// service they are dropped.
    pub(super) async fn replay_push_watches(&mut self) {
        let me = self.router.global(self.idx);
        let now = self.now;
        let delay = self.services.push.as_ref().map_or(0, |p| p.delay_ms());
        let mut n = 0usize;
        for s in 0..VSHARDS {
            let shard = ShardId(s);
            if self.router.owner_of_shard(shard) != me {
                continue;
            }
            let watches = match self.store.push_watches(shard).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(worker = self.idx, shard = s, "push watches unreadable: {e}");
                    continue;
                }
            };
            for (uid, seq) in watches {
                if self.services.push.is_none() {
                    self.lazy.unwatch(shard, uid, seq, now);
                    continue;
                }
                if let Err(e) = self.load_user(uid).await {
                    tracing::warn!("push watch of {uid}: {e}");
                    continue; // stays watched: the next start tries again
                }
                // A whole delay from now: the message may be younger than that, and a push
                // checked too early is not checked again (the queue is in due order).
                self.push_due.push_back((now + delay, uid, seq.0));
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(
                worker = self.idx,
                n,
                "offline pushes pending at the last stop"
            );
        }
    }

    /// Sends push notifications for messages that no device acknowledged within the delay.
    pub(super) async fn push_overdue(&mut self) {
        let Some(push) = self.services.push.clone() else {
            return;
        };
        let now = self.now;
        let mut due: Vec<(UserId, u64)> = Vec::new();
        while let Some(&(t, uid, seq)) = self.push_due.front() {
            if t > now {
                break;
            }
            self.push_due.pop_front();
            due.push((uid, seq));
            // Decided below (pushed, or no longer needed): its watch is deleted lazily.
            self.lazy
                .unwatch(vshard_of(uid), uid, im_shared::Seq(seq), now);
        }
        // One notification per user per check: the newest overdue message, with the count of
        // unacknowledged ones as the badge.
        due.sort_unstable();
        due.dedup_by_key(|(u, _)| *u);
        for (uid, _) in due {
            // An evicted user (trim_caches) comes back with its pending notices rebuilt.
            if let Err(e) = self.load_user(uid).await {
                tracing::warn!("push check of {uid}: {e}");
                continue;
            }
            if let Err(e) = self.recover_pending(uid).await {
                tracing::warn!("pending notices of {uid} not recovered, no push: {e}");
                continue;
            }
            let Some(p) = self
                .users
                .get(&uid)
                .and_then(|u| u.active.as_ref())
                .and_then(|a| {
                    let unread = a.pending.len() as u32;
                    a.pending.newest().map(|p| (p, unread))
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
            // A mention gets through the mute of its group (not "mute everything").
            let mention = conv == im_shared::proto::CONV_MENTION;
            match self.store.mutes(uid).await {
                Ok(m) if m.contains(&0) || (!mention && m.contains(&peer)) => {
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
                    to: if conv == im_shared::proto::CONV_C2G || mention {
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
