//! Sync: pages of a user's timeline after a seq, bounded in count and bytes.

use super::*;

impl<S: Store> Worker<S> {
    pub(super) async fn on_sync(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        after: Seq,
        limit: u16,
        round: &mut Round,
    ) {
        let limit = limit.clamp(1, self.cfg.sync_page_max) as usize;
        if let Err(e) = self.load_user(uid).await {
            tracing::warn!("sync of {uid}: {e}");
            round.send(
                conn,
                error_frame(ErrorCode::Unavailable, req_id, "store unavailable"),
            );
            return;
        }
        let mut msgs = match self.store.timeline(uid, after, limit + 1).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("sync of {uid}: {e}");
                round.send(
                    conn,
                    error_frame(ErrorCode::Unavailable, req_id, "store unavailable"),
                );
                return;
            }
        };
        let mut has_more = msgs.len() > limit;
        msgs.truncate(limit);
        let mut bytes = 0;
        let mut keep = 0;
        for m in &msgs {
            bytes += m.encoded_len();
            if keep > 0 && bytes > self.cfg.sync_page_bytes {
                break;
            }
            keep += 1;
        }
        if keep < msgs.len() {
            msgs.truncate(keep);
            has_more = true;
        }
        if let Some(last) = msgs.last() {
            if let Some(d) = self.device(uid, conn) {
                d.sent = d.sent.max(last.seq);
            }
        }
        let page = Command::SyncPage {
            max_seq: Seq(self.users[&uid].last_seq),
            has_more,
            messages: msgs,
        };
        round.send(conn, page.to_bytes(req_id));
    }
}
