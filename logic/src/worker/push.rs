//! Offline push: device push-token registration, and the check for messages no device
//! acknowledged within the push delay.

use im_shared::proto::MAX_PUSH_TOKEN_LEN;
use im_shared::{ConnId, ErrorCode, UserId};

use super::{error_frame, op_ok, Round, Worker};
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
