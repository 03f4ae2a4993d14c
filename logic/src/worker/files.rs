//! The file service's part in logic: upload tickets, the check of a file message's reference
//! when it is sent, and download URLs for the files of a user's own messages (a group's files
//! only while the user is a member). The bytes go over HTTP (im-api), never through a worker.

use im_shared::files::{check_mime, FileKind, FileRef, Ticket};
use im_shared::proto::{MarkerBody, CONV_MENTION, CONV_RECALL};

use super::*;
use crate::config::FilesPolicy;

impl<S: Store> Worker<S> {
    fn files_or_refuse(
        &self,
        conn: ConnId,
        req_id: u32,
        round: &mut Round,
    ) -> Option<Arc<FilesPolicy>> {
        let p = self.cfg.files.clone();
        if p.is_none() {
            round.send(
                conn,
                error_frame(
                    ErrorCode::Unavailable,
                    req_id,
                    "the file service is not configured on this server",
                ),
            );
        }
        p
    }

    /// Whether a message body may be sent: any body that is not typed, or a valid file
    /// reference whose key the file service issued. `Err`: the refusal's code and message.
    pub(super) fn check_body(&self, body: &Bytes) -> Result<(), (ErrorCode, String)> {
        let Some(f) = FileRef::from_body(body).map_err(|e| (ErrorCode::InvalidArgument, e))? else {
            return Ok(());
        };
        let Some(p) = &self.cfg.files else {
            return Err((
                ErrorCode::Unavailable,
                "the file service is not configured on this server".into(),
            ));
        };
        if !p.keys.key_ok(&f.sha256, &f.key) {
            return Err((
                ErrorCode::Forbidden,
                "file message: the key is not this file's (upload the file first)".into(),
            ));
        }
        if f.size > p.max_for(f.kind) {
            return Err((
                ErrorCode::InvalidArgument,
                format!(
                    "file message: a {} has at most {} bytes",
                    f.kind.name(),
                    p.max_for(f.kind)
                ),
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_file_upload(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        kind: u8,
        size: u64,
        sha256: [u8; 32],
        mime: String,
        round: &mut Round,
    ) {
        let Some(p) = self.files_or_refuse(conn, req_id, round) else {
            return;
        };
        let refuse = |round: &mut Round, why: &str| {
            round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, why));
        };
        let Some(kind) = FileKind::from_u8(kind) else {
            return refuse(
                round,
                &format!("unknown file kind {kind} (1 image, 2 voice, 3 video, 4 file)"),
            );
        };
        if let Err(why) = check_mime(kind, &mime) {
            return refuse(round, &why);
        }
        let max = p.max_for(kind);
        if size == 0 || size > max {
            return refuse(
                round,
                &format!("a {} has 1 to {max} bytes, not {size}", kind.name()),
            );
        }
        let expires_ms = self.now + p.ticket_ms;
        let ticket = p.keys.ticket(&Ticket {
            uid,
            sha256,
            size,
            expires_ms,
        });
        let frame = Command::FileTicket {
            url: format!("{}/v1/files/uploads", p.base_url()),
            ticket,
            expires_ms,
        };
        round.send(conn, frame.to_bytes(req_id));
    }

    /// A download URL for the file of message `seq` of the user's own timeline: directly for a
    /// one-to-one or business message, through the group's owner (which checks that the user
    /// is still a member) for a group message.
    pub(super) async fn on_file_download(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        seq: Seq,
        round: &mut Round,
    ) {
        let Some(p) = self.files_or_refuse(conn, req_id, round) else {
            return;
        };
        let found = match self
            .store
            .timeline(uid, Seq(seq.0.saturating_sub(1)), 1)
            .await
        {
            Ok(v) => v.into_iter().next().filter(|m| m.seq == seq && seq.0 != 0),
            Err(e) => {
                tracing::warn!("file download of {uid}: {e}");
                let f = error_frame(ErrorCode::Unavailable, req_id, "store unavailable");
                return round.send(conn, f);
            }
        };
        let Some(m) = found else {
            let f = error_frame(
                ErrorCode::NotFound,
                req_id,
                &format!("no message {} in your timeline", seq.0),
            );
            return round.send(conn, f);
        };
        let file = match FileRef::from_body(&m.body) {
            Ok(Some(f)) if m.conv != CONV_RECALL => f,
            _ => {
                let f = error_frame(
                    ErrorCode::NotFound,
                    req_id,
                    &format!("message {} is not a file message", seq.0),
                );
                return round.send(conn, f);
            }
        };
        // A recalled message's file is not handed out any more.
        match self.recalled(uid, &m).await {
            Ok(false) => {}
            Ok(true) => {
                let f = error_frame(
                    ErrorCode::NotFound,
                    req_id,
                    &format!("message {} was recalled", seq.0),
                );
                return round.send(conn, f);
            }
            Err(e) => {
                tracing::warn!("file download of {uid}: {e}");
                let f = error_frame(ErrorCode::Unavailable, req_id, "store unavailable");
                return round.send(conn, f);
            }
        }
        // A group's post (or a business push to a group: `to` is then the group, neither the
        // user nor 0) is fetched while a member only. A mention entry is a copy of a large
        // group's post, whose recall marker is in the group's timeline: the owner checks both.
        let group = m.conv == CONV_C2G || (m.conv == CONV_S2C && m.to != uid && m.to.0 != 0);
        if m.conv == CONV_MENTION {
            let op = GroupOp::MentionFile {
                msg_id: m.msg_id,
                time_ms: m.server_time_ms,
                sha256: file.sha256,
                mime: file.mime,
            };
            self.forward_group(
                uid,
                GroupId(m.to.0),
                op,
                Reply::Conn { conn, req_id },
                round,
            );
        } else if group {
            let op = GroupOp::FileUrl {
                sha256: file.sha256,
                mime: file.mime,
            };
            self.forward_group(
                uid,
                GroupId(m.to.0),
                op,
                Reply::Conn { conn, req_id },
                round,
            );
        } else {
            round.send(
                conn,
                file_url(&p, self.now, uid, &file.sha256, &file.mime, req_id),
            );
        }
    }
}

impl<S: Store> Worker<S> {
    /// Whether `uid`'s timeline holds a recall of `m` after it. A recall is accepted within the
    /// recall window of the message's time, so only the entries written until then (plus a
    /// margin for clock steps between nodes) are read, at most [`RECALL_SCAN`] of them.
    async fn recalled(&self, uid: UserId, m: &Message) -> Result<bool, StoreError> {
        let until = m.server_time_ms + self.cfg.recall_window_secs * 1000 + 60_000;
        let mut after = m.seq;
        let mut read = 0;
        while read < RECALL_SCAN {
            let page = self.store.timeline(uid, after, 200).await?;
            let Some(last) = page.last() else {
                return Ok(false);
            };
            after = last.seq;
            read += page.len();
            for e in &page {
                if e.conv == CONV_RECALL
                    && MarkerBody::decode(e.body.clone()).is_ok_and(|r| r.msg_id == m.msg_id)
                {
                    return Ok(true);
                }
            }
            if last.server_time_ms > until || page.len() < 200 {
                return Ok(false);
            }
        }
        Ok(false)
    }
}

/// Most timeline entries read after a file message to find its recall.
const RECALL_SCAN: usize = 2_000;

/// The `FileUrl` answer: a download URL of `sha256` for `uid`, served as `mime`.
pub(super) fn file_url(
    p: &FilesPolicy,
    now: u64,
    uid: UserId,
    sha256: &[u8; 32],
    mime: &str,
    req_id: u32,
) -> Bytes {
    let expires_ms = now + p.url_ms;
    let query = p.keys.download_query(sha256, uid, expires_ms, mime);
    Command::FileUrl {
        url: format!(
            "{}/v1/files/{}?{query}",
            p.base_url(),
            im_shared::files::hex(sha256)
        ),
        expires_ms,
    }
    .to_bytes(req_id)
}
