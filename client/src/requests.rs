//! Requests answered by one frame (groups, organisation tree, files, presence, recall), over
//! anything that can make a request and wait for its answer: the reconnecting [`Session`]
//! (through the core) implements [`Requests`]. (The older [`crate::Client`] has the same
//! methods inherent, for the integration tests that drive one raw connection.)

use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use im_shared::codes::ErrorCode;
use im_shared::files::{FileKind, FileRef};
use im_shared::ids::{GroupId, MsgId, Seq, UserId};
use im_shared::org::{OrgRecord, OrgTree};
use im_shared::proto::{Command, GroupDesc, Message};

use crate::files::{http_request, upload, UploadTicket};
use crate::session::Session;
use crate::{ClientError, MembersPage};

fn unexpected(c: Command) -> ClientError {
    ClientError::Server {
        code: ErrorCode::Internal,
        message: format!("unexpected answer {:?}", c.cmd()),
    }
}

fn refused(code: ErrorCode, message: String) -> ClientError {
    ClientError::Server { code, message }
}

/// Request helpers on top of [`Requests::call`].
pub trait Requests {
    /// Sends `cmd` and returns its answer (an `Error` frame is [`ClientError::Server`]).
    fn call(&mut self, cmd: &Command) -> Result<Command, ClientError>;

    /// How long HTTP transfers of files may take.
    fn http_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// A command answered by `OpResult`: its `id`.
    fn op(&mut self, cmd: &Command) -> Result<u64, ClientError> {
        match self.call(cmd)? {
            Command::OpResult {
                code: ErrorCode::Ok,
                id,
                ..
            } => Ok(id),
            Command::OpResult { code, message, .. } => Err(refused(code, message)),
            c => Err(unexpected(c)),
        }
    }

    /// A command answered by `SendAck` (recall, read report): the message id.
    fn acked(&mut self, cmd: &Command) -> Result<MsgId, ClientError> {
        match self.call(cmd)? {
            Command::SendAck {
                code: ErrorCode::Ok,
                msg_id,
                ..
            } => Ok(msg_id),
            Command::SendAck { code, .. } => Err(refused(code, "refused".into())),
            c => Err(unexpected(c)),
        }
    }

    fn recall(
        &mut self,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
        cmid: u64,
    ) -> Result<MsgId, ClientError> {
        self.acked(&Command::Recall {
            client_msg_id: cmid,
            conv,
            peer,
            msg_id,
        })
    }

    fn my_groups(&mut self) -> Result<Vec<(GroupId, String)>, ClientError> {
        match self.call(&Command::MyGroups)? {
            Command::GroupList { groups } => Ok(groups),
            c => Err(unexpected(c)),
        }
    }

    fn create_group(&mut self, name: &str, members: &[UserId]) -> Result<GroupId, ClientError> {
        self.op(&Command::GroupCreate {
            name: name.to_owned(),
            members: members.to_vec(),
            client_id: 0,
        })
        .map(GroupId)
    }

    fn group_info(
        &mut self,
        group: GroupId,
    ) -> Result<(GroupDesc, Vec<(UserId, u8)>), ClientError> {
        match self.call(&Command::GroupInfo { group })? {
            Command::GroupInfoReply { group, members } => Ok((group, members)),
            Command::OpResult { code, message, .. } => Err(refused(code, message)),
            c => Err(unexpected(c)),
        }
    }

    fn group_add(&mut self, group: GroupId, members: &[UserId]) -> Result<(), ClientError> {
        let members = members.to_vec();
        self.op(&Command::GroupAdd { group, members }).map(|_| ())
    }

    fn group_remove(&mut self, group: GroupId, members: &[UserId]) -> Result<(), ClientError> {
        let members = members.to_vec();
        self.op(&Command::GroupRemove { group, members })
            .map(|_| ())
    }

    fn group_leave(&mut self, group: GroupId) -> Result<(), ClientError> {
        self.op(&Command::GroupLeave { group }).map(|_| ())
    }

    fn group_posting(&mut self, group: GroupId, owner_only: bool) -> Result<(), ClientError> {
        self.op(&Command::GroupPosting { group, owner_only })
            .map(|_| ())
    }

    fn group_role(&mut self, group: GroupId, uid: UserId, admin: bool) -> Result<(), ClientError> {
        let role = if admin {
            im_shared::proto::ROLE_ADMIN
        } else {
            im_shared::proto::ROLE_MEMBER
        };
        self.op(&Command::GroupRole { group, uid, role })
            .map(|_| ())
    }

    fn group_sync(
        &mut self,
        group: GroupId,
        after_seq: Seq,
        limit: u16,
    ) -> Result<(Vec<Message>, bool, Seq), ClientError> {
        match self.call(&Command::GroupSync {
            group,
            after_seq,
            limit,
        })? {
            Command::GroupSyncPage {
                head,
                has_more,
                messages,
                ..
            } => Ok((messages, has_more, head)),
            Command::OpResult { code, message, .. } => Err(refused(code, message)),
            c => Err(unexpected(c)),
        }
    }

    fn group_read(&mut self, group: GroupId, seq: Seq) -> Result<(), ClientError> {
        self.op(&Command::GroupRead { group, seq }).map(|_| ())
    }

    fn group_members(
        &mut self,
        group: GroupId,
        after: UserId,
        limit: u16,
    ) -> Result<MembersPage, ClientError> {
        match self.call(&Command::GroupMembers {
            group,
            after,
            limit,
        })? {
            Command::GroupMembersPage {
                total,
                more,
                members,
                ..
            } => Ok(MembersPage {
                total,
                more,
                members,
            }),
            Command::OpResult { code, message, .. } => Err(refused(code, message)),
            c => Err(unexpected(c)),
        }
    }

    fn presence_subscribe(&mut self, users: &[UserId]) -> Result<(), ClientError> {
        let users = users.to_vec();
        self.op(&Command::PresenceSubscribe { users }).map(|_| ())
    }

    fn set_presence_hidden(&mut self, hidden: bool) -> Result<(), ClientError> {
        self.op(&Command::PresencePrivacy { hidden }).map(|_| ())
    }

    fn typing(&mut self, conv: u8, peer: u64, typing: bool) -> Result<(), ClientError> {
        let state = typing as u8;
        self.op(&Command::Typing { conv, peer, state }).map(|_| ())
    }

    /// `(version, next, more, records)` of one organisation tree page.
    fn org_sync(
        &mut self,
        since: u64,
        limit: u16,
    ) -> Result<(u64, u64, bool, Vec<OrgRecord>), ClientError> {
        match self.call(&Command::OrgSync { since, limit })? {
            Command::OrgPage {
                version,
                next,
                more,
                records,
            } => Ok((version, next, more, records)),
            c => Err(unexpected(c)),
        }
    }

    /// Every record above `since` applied to `tree`; the version reached. A retryable refusal
    /// is asked again after a backoff (100 ms doubling to 2 s, at most 30 times in a row).
    fn org_sync_all(&mut self, tree: &mut OrgTree, since: u64) -> Result<u64, ClientError> {
        let mut since = since;
        let mut refused = 0u32;
        loop {
            let (_, next, more, records) = match self.org_sync(since, 1000) {
                Ok(p) => {
                    refused = 0;
                    p
                }
                Err(e) if e.code().is_some_and(ErrorCode::is_retryable) && refused < 30 => {
                    std::thread::sleep(Duration::from_millis(100 << refused.min(4)));
                    refused += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for r in records {
                tree.apply(r);
            }
            since = next;
            if !more {
                return Ok(since);
            }
        }
    }

    fn org_reply(&mut self, cmd: &Command) -> Result<(u64, u32, Vec<OrgRecord>), ClientError> {
        match self.call(cmd)? {
            Command::OrgReply {
                version,
                total,
                records,
            } => Ok((version, total, records)),
            c => Err(unexpected(c)),
        }
    }

    fn org_dept(
        &mut self,
        dept: u64,
        offset: u32,
        limit: u16,
    ) -> Result<(u64, u32, Vec<OrgRecord>), ClientError> {
        self.org_reply(&Command::OrgDept {
            dept,
            offset,
            limit,
        })
    }

    fn org_user(&mut self, uid: UserId) -> Result<(u64, u32, Vec<OrgRecord>), ClientError> {
        self.org_reply(&Command::OrgUser { uid })
    }

    fn org_search(
        &mut self,
        query: &str,
        limit: u16,
    ) -> Result<(u64, u32, Vec<OrgRecord>), ClientError> {
        let query = query.to_owned();
        self.org_reply(&Command::OrgSearch { query, limit })
    }

    /// Uploads `data` and returns the file reference to send (see `Client::upload_file`).
    fn upload_file(
        &mut self,
        kind: FileKind,
        mime: &str,
        name: &str,
        data: &[u8],
        chunk: usize,
    ) -> Result<FileRef, ClientError> {
        let sha256: [u8; 32] = Sha256::digest(data).into();
        let t = match self.call(&Command::FileUpload {
            kind: kind as u8,
            size: data.len() as u64,
            sha256,
            mime: mime.to_owned(),
        })? {
            Command::FileTicket {
                url,
                ticket,
                expires_ms,
            } => UploadTicket {
                url,
                ticket,
                expires_ms,
            },
            c => return Err(unexpected(c)),
        };
        let up = upload(&t, data, chunk, self.http_timeout())?;
        Ok(FileRef {
            kind,
            sha256: up.sha256,
            size: up.size,
            key: up.key,
            mime: mime.to_owned(),
            name: name.to_owned(),
            width: 0,
            height: 0,
            duration_ms: 0,
            thumb: Bytes::new(),
        })
    }

    /// The file of message `seq`, whole.
    fn fetch_file(&mut self, seq: Seq) -> Result<Vec<u8>, ClientError> {
        self.fetch_from(&Command::FileDownload { seq })
    }

    /// The file of post `seq` of large group `group`'s own timeline, whole (members only).
    fn fetch_group_file(&mut self, group: GroupId, seq: Seq) -> Result<Vec<u8>, ClientError> {
        self.fetch_from(&Command::GroupFileDownload { group, seq })
    }

    /// The file that `ask` (a `FileDownload` or `GroupFileDownload`) gives a URL of, whole.
    fn fetch_from(&mut self, ask: &Command) -> Result<Vec<u8>, ClientError> {
        let url = match self.call(ask)? {
            Command::FileUrl { url, .. } => url,
            c => return Err(unexpected(c)),
        };
        let r = http_request("GET", &url, &[], &[], self.http_timeout())?;
        if r.status != 200 {
            return Err(refused(
                ErrorCode::Unavailable,
                format!("GET of the file: HTTP {}", r.status),
            ));
        }
        Ok(r.body)
    }
}

impl Requests for Session {
    fn call(&mut self, cmd: &Command) -> Result<Command, ClientError> {
        Session::call(self, cmd, Duration::from_secs(10))
    }
}
