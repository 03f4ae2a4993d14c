//! Recall: a sender withdraws its message within the recall window; every device of both sides
//! (or every member) gets a recall marker.

use im_shared::proto::{MarkerBody, CONV_C2C, CONV_C2G, CONV_RECALL};
use im_shared::shard::vshard_of;
use im_shared::{ConnId, ErrorCode, GroupId, MsgId, Seq, UserId};

use super::GroupOp;
use super::{error_frame, Reply, Round, Worker};
use crate::store::Store;

impl<S: Store> Worker<S> {
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
        if self.now.saturating_sub(msg_id.timestamp_ms()) > window {
            return refuse(round, ErrorCode::RecallRefused, "recall window has passed");
        }
        if conv == CONV_C2G && self.large.groups_of(uid).contains(&GroupId(peer)) {
            // A large group's post is in the group's timeline, not the sender's: its owner
            // checks it (`large_recall_check`), and the marker is one post of that timeline.
            let op = GroupOp::Post {
                client_msg_id,
                conv: CONV_RECALL,
                body: MarkerBody { conv, msg_id }.to_bytes(),
                mentions: Vec::new(),
            };
            return self.forward_group(uid, GroupId(peer), op, Reply::Conn { conn, req_id }, round);
        }
        // The message must be the caller's, in this conversation. A c2c message is looked up in
        // the peer's timeline (the recipient's copy is indexed, the sender's own copy is not),
        // then in the caller's (a message it received, or a group post's copy).
        let store = &self.store;
        let at = |owner: UserId| async move {
            let Some(seq) = store.seq_of(owner, msg_id).await? else {
                return Ok(None);
            };
            let m = store.timeline(owner, Seq(seq.0 - 1), 1).await?;
            Ok::<_, crate::store::StoreError>(m.into_iter().next().filter(|m| m.msg_id == msg_id))
        };
        // What the peer's timeline holds from others is not the caller's to learn: only its own
        // message counts there, anything else is looked for in the caller's timeline.
        let found = if conv == CONV_C2C && peer != uid.0 {
            match at(UserId(peer)).await {
                Ok(Some(m)) if m.from == uid => Ok(Some(m)),
                Ok(_) => at(uid).await,
                r => r,
            }
        } else {
            at(uid).await
        };
        let msg = match found {
            Ok(Some(m)) => m,
            Ok(None)
                if conv == CONV_C2C
                    && self
                        .outbox
                        .is_unconfirmed(vshard_of(uid), msg_id, UserId(peer)) =>
            {
                // Sent, not yet in the recipient's timeline (its worker has not stored it).
                return refuse(
                    round,
                    ErrorCode::Unavailable,
                    "the message is still being delivered; try again",
                );
            }
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
                mentions: Vec::new(),
            };
            self.forward_group(uid, GroupId(peer), op, Reply::Conn { conn, req_id }, round);
        }
    }
}
