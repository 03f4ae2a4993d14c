//! Blocking Rust client SDK (std sockets): used by the terminal client, the bindings
//! (`im-client-ffi`) and the integration tests.
//!
//! [`core::Core`] is the sans-io client core: every client rule (login, heartbeat, reconnect
//! with the iplist's backoff, dedup by seq, gap → sync, resend with the same `client_msg_id`,
//! delivery acks) with no I/O (docs/CLIENT.md). [`session::Session`] drives it over std sockets
//! (TLS under the `tls` feature): the reconnecting session of `im-cli` and the bindings, with the
//! request helpers of [`Requests`].
//!
//! [`Client`] speaks protocol v1 over one TCP connection, with no rules of its own (the
//! integration tests drive the server with it, misbehaving on purpose where they need to). Server pushes that arrive while a call
//! waits for its response are queued and returned by [`Client::recv`]. [`Timeline`] is the
//! client-side half of the message model: it drops duplicates by seq and detects gaps through
//! `prev_seq`, so a caller knows when to sync.

pub mod core;
pub mod files;
pub mod requests;
pub mod session;

pub use requests::Requests;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use im_shared::codes::ErrorCode;
use im_shared::frame::{DecodeError, FrameCodec};
use im_shared::ids::{DeviceType, GroupId, MsgId, Seq, UserId};
use im_shared::org::{OrgRecord, OrgTree};
use im_shared::proto::{BodyError, Command, GroupDesc, Message};

/// What went wrong in a client call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame from server: {0}")]
    Decode(#[from] DecodeError),
    #[error("bad body from server: {0}")]
    Body(#[from] BodyError),
    #[error("server refused: {code:?} {message}")]
    Server { code: ErrorCode, message: String },
    #[error("kicked out (reason {reason}): {message}")]
    Kicked { reason: u8, message: String },
    #[error("connection closed by server")]
    Closed,
    #[error("timed out waiting for the server")]
    Timeout,
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Result of a successful login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginInfo {
    pub max_seq: Seq,
    pub server_time_ms: u64,
    pub heartbeat_secs: u16,
}

/// A successful send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendAck {
    pub client_msg_id: u64,
    pub msg_id: MsgId,
    pub seq: Seq,
    pub server_time_ms: u64,
    /// Seq before it in the sender's timeline.
    pub prev_seq: Seq,
}

/// One protocol v1 connection.
pub struct Client {
    stream: TcpStream,
    codec: FrameCodec,
    rbuf: BytesMut,
    next_req: u32,
    inbox: VecDeque<Command>,
    /// Default time to wait for a response.
    pub timeout: Duration,
}

/// A page of a group's member list ([`Client::group_members`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembersPage {
    /// Members of the group in all.
    pub total: u32,
    /// A later page exists: ask again after the last uid of this one.
    pub more: bool,
    /// `(uid, role)` in uid order.
    pub members: Vec<(UserId, u8)>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        Client::from_stream(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    }

    /// A client on a socket connected by the caller (e.g. bound to a chosen source address).
    pub fn from_stream(stream: TcpStream) -> Result<Client, ClientError> {
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            codec: FrameCodec::new(16 * 1024 * 1024),
            rbuf: BytesMut::with_capacity(4096),
            next_req: 1,
            inbox: VecDeque::new(),
            timeout: Duration::from_secs(10),
        })
    }

    /// The underlying socket (for tests that misbehave on purpose).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    fn req_id(&mut self) -> u32 {
        let r = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        r
    }

    /// Sends a command; returns its request id.
    pub fn send_cmd(&mut self, cmd: &Command) -> Result<u32, ClientError> {
        let req = self.req_id();
        self.stream.write_all(&cmd.to_bytes(req))?;
        Ok(req)
    }

    /// Writes raw bytes (for protocol tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next frame from the socket, waiting until `deadline`.
    fn read_frame(&mut self, deadline: Instant) -> Result<(u32, Command), ClientError> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.rbuf)? {
                return Ok((f.req_id, Command::decode(&f)?));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout);
            }
            self.stream.set_read_timeout(Some(deadline - now))?;
            let mut tmp = [0u8; 16 * 1024];
            match self.stream.read(&mut tmp) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits for a frame accepted by `want`; other frames are queued for [`Client::recv`].
    /// An `Error` frame or a kickout ends the wait with an error.
    fn wait_for<T>(
        &mut self,
        mut want: impl FnMut(u32, &Command) -> Option<T>,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let (req, cmd) = self.read_frame(deadline)?;
            if let Some(t) = want(req, &cmd) {
                return Ok(t);
            }
            match cmd {
                Command::Error { code, message } => {
                    return Err(ClientError::Server { code, message })
                }
                Command::Kickout { reason, message } => {
                    return Err(ClientError::Kicked { reason, message })
                }
                other => self.inbox.push_back(other),
            }
        }
    }

    pub fn login(
        &mut self,
        uid: UserId,
        token: &str,
        device_type: DeviceType,
        device_id: &str,
        last_seq: Seq,
    ) -> Result<LoginInfo, ClientError> {
        let req = self.send_cmd(&Command::Login {
            uid,
            device_type,
            device_id: device_id.to_owned(),
            last_seq,
            token: token.to_owned(),
        })?;
        let res = self.wait_for(|r, c| match c {
            Command::LoginResult { .. } if r == req => Some(c.clone()),
            _ => None,
        })?;
        match res {
            Command::LoginResult {
                code: ErrorCode::Ok,
                server_time_ms,
                max_seq,
                heartbeat_secs,
                ..
            } => Ok(LoginInfo {
                max_seq,
                server_time_ms,
                heartbeat_secs,
            }),
            Command::LoginResult { code, message, .. } => {
                Err(ClientError::Server { code, message })
            }
            _ => unreachable!("filtered above"),
        }
    }

    /// Sends a c2c message and waits for its ack. Retrying with the same `client_msg_id` is safe.
    pub fn send_c2c(
        &mut self,
        to: UserId,
        client_msg_id: u64,
        body: impl Into<Bytes>,
    ) -> Result<SendAck, ClientError> {
        self.send_acked(&Command::SendC2c {
            client_msg_id,
            to,
            body: body.into(),
        })
    }

    /// Posts to a group (members only). For a small group the ack's `seq` is 0: this device
    /// gets its own copy as a `Deliver`, in the group's order. For a large group the ack carries
    /// the post's place in the group's timeline, and the copy comes as a `GroupDeliver`.
    pub fn send_c2g(
        &mut self,
        group: GroupId,
        client_msg_id: u64,
        body: impl Into<Bytes>,
    ) -> Result<SendAck, ClientError> {
        self.send_c2g_mentioning(group, client_msg_id, body, &[])
    }

    /// [`Client::send_c2g`] mentioning members (`@user`, at most 20): in a large group each
    /// gets the post in its own timeline too, as a mention (and an offline push).
    pub fn send_c2g_mentioning(
        &mut self,
        group: GroupId,
        client_msg_id: u64,
        body: impl Into<Bytes>,
        mentions: &[UserId],
    ) -> Result<SendAck, ClientError> {
        self.send_acked(&Command::SendC2g {
            client_msg_id,
            group,
            body: body.into(),
            mentions: mentions.to_vec(),
        })
    }

    /// Recalls one's own message (`conv` c2c with `peer` = the other user, or c2g with `peer` =
    /// the group) within the server's recall window.
    pub fn recall(
        &mut self,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
        client_msg_id: u64,
    ) -> Result<SendAck, ClientError> {
        self.send_acked(&Command::Recall {
            client_msg_id,
            conv,
            peer,
            msg_id,
        })
    }

    /// Reports "read up to `msg_id`" in a conversation.
    pub fn read_report(
        &mut self,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
        client_msg_id: u64,
    ) -> Result<SendAck, ClientError> {
        self.send_acked(&Command::ReadReport {
            client_msg_id,
            conv,
            peer,
            msg_id,
        })
    }

    /// c2s: sends an event for the business servers of `topic`; acked once durably queued.
    pub fn report(
        &mut self,
        topic: &str,
        client_msg_id: u64,
        body: impl Into<Bytes>,
    ) -> Result<SendAck, ClientError> {
        self.send_acked(&Command::Report {
            client_msg_id,
            topic: topic.to_owned(),
            body: body.into(),
        })
    }

    /// Sends a command answered by `SendAck` and waits for it.
    pub fn send_acked(&mut self, cmd: &Command) -> Result<SendAck, ClientError> {
        let req = self.send_cmd(cmd)?;
        let ack = self.wait_for(|r, c| match c {
            Command::SendAck { .. } if r == req => Some(c.clone()),
            _ => None,
        })?;
        match ack {
            Command::SendAck {
                code: ErrorCode::Ok,
                client_msg_id,
                msg_id,
                seq,
                server_time_ms,
                prev_seq,
            } => Ok(SendAck {
                client_msg_id,
                msg_id,
                seq,
                server_time_ms,
                prev_seq,
            }),
            Command::SendAck { code, .. } => Err(ClientError::Server {
                code,
                message: "send refused".into(),
            }),
            _ => unreachable!("filtered above"),
        }
    }

    /// Sends a management command answered by `OpResult`; returns its `id`.
    pub fn op(&mut self, cmd: &Command) -> Result<u64, ClientError> {
        let req = self.send_cmd(cmd)?;
        let res = self.wait_for(|r, c| match c {
            Command::OpResult { code, id, message } if r == req => {
                Some((*code, *id, message.clone()))
            }
            _ => None,
        })?;
        match res {
            (ErrorCode::Ok, id, _) => Ok(id),
            (code, _, message) => Err(ClientError::Server { code, message }),
        }
    }

    /// Creates a group owned by this user; returns its id. Not idempotent: see
    /// [`Client::create_group_with_id`] for a create that may be retried.
    pub fn create_group(&mut self, name: &str, members: &[UserId]) -> Result<GroupId, ClientError> {
        self.create_group_with_id(name, members, 0)
    }

    /// Creates a group with an idempotency key: sending it again with the same non-zero
    /// `client_id` (after a lost answer, on a new connection, after a server restart) answers the
    /// group the first create made instead of making another. Keep the key with the pending
    /// create, like a message's `client_msg_id`.
    pub fn create_group_with_id(
        &mut self,
        name: &str,
        members: &[UserId],
        client_id: u64,
    ) -> Result<GroupId, ClientError> {
        self.op(&Command::GroupCreate {
            name: name.to_owned(),
            members: members.to_vec(),
            client_id,
        })
        .map(GroupId)
    }

    pub fn group_add(&mut self, group: GroupId, members: &[UserId]) -> Result<(), ClientError> {
        self.op(&Command::GroupAdd {
            group,
            members: members.to_vec(),
        })
        .map(|_| ())
    }

    pub fn group_remove(&mut self, group: GroupId, members: &[UserId]) -> Result<(), ClientError> {
        self.op(&Command::GroupRemove {
            group,
            members: members.to_vec(),
        })
        .map(|_| ())
    }

    pub fn group_leave(&mut self, group: GroupId) -> Result<(), ClientError> {
        self.op(&Command::GroupLeave { group }).map(|_| ())
    }

    /// Makes `group` a broadcast channel (`owner_only`: only the owner may post; a member's
    /// post is refused `Forbidden`) or opens it to every member again. Owner only.
    pub fn group_posting(&mut self, group: GroupId, owner_only: bool) -> Result<(), ClientError> {
        self.op(&Command::GroupPosting { group, owner_only })
            .map(|_| ())
    }

    /// Makes member `uid` of `group` an admin (`admin` true: manages members and settings, posts
    /// in a channel) or a plain member again. Owner only.
    pub fn group_role(
        &mut self,
        group: GroupId,
        uid: UserId,
        admin: bool,
    ) -> Result<(), ClientError> {
        let role = if admin {
            im_shared::proto::ROLE_ADMIN
        } else {
            im_shared::proto::ROLE_MEMBER
        };
        self.op(&Command::GroupRole { group, uid, role })
            .map(|_| ())
    }

    pub fn group_update(
        &mut self,
        group: GroupId,
        name: &str,
        announcement: &str,
    ) -> Result<(), ClientError> {
        self.op(&Command::GroupUpdate {
            group,
            name: name.to_owned(),
            announcement: announcement.to_owned(),
        })
        .map(|_| ())
    }

    /// The group and its `(member, role)` list (members only).
    pub fn group_info(
        &mut self,
        group: GroupId,
    ) -> Result<(GroupDesc, Vec<(UserId, u8)>), ClientError> {
        let req = self.send_cmd(&Command::GroupInfo { group })?;
        let res = self.wait_for(|r, c| match c {
            Command::GroupInfoReply { .. } | Command::OpResult { .. } if r == req => {
                Some(c.clone())
            }
            _ => None,
        })?;
        match res {
            Command::GroupInfoReply { group, members } => Ok((group, members)),
            Command::OpResult { code, message, .. } => Err(ClientError::Server { code, message }),
            _ => unreachable!("filtered above"),
        }
    }

    /// One page of a large group's timeline after `after_seq` (`limit` 0: the server's page
    /// size): `(posts, has_more, head)`.
    pub fn group_sync(
        &mut self,
        group: GroupId,
        after_seq: Seq,
        limit: u16,
    ) -> Result<(Vec<Message>, bool, Seq), ClientError> {
        let req = self.send_cmd(&Command::GroupSync {
            group,
            after_seq,
            limit,
        })?;
        let res = self.wait_for(|r, c| match c {
            Command::GroupSyncPage { .. } | Command::OpResult { .. } if r == req => Some(c.clone()),
            _ => None,
        })?;
        match res {
            Command::GroupSyncPage {
                head,
                has_more,
                messages,
                ..
            } => Ok((messages, has_more, head)),
            Command::OpResult { code, message, .. } => Err(ClientError::Server { code, message }),
            _ => unreachable!("filtered above"),
        }
    }

    /// Marks a large group read up to `seq` (the read cursor `GroupHeads` reports).
    pub fn group_read(&mut self, group: GroupId, seq: Seq) -> Result<(), ClientError> {
        self.op(&Command::GroupRead { group, seq }).map(|_| ())
    }

    /// One page of a group's members with uid above `after` (`limit` 0: the server's page).
    pub fn group_members(
        &mut self,
        group: GroupId,
        after: UserId,
        limit: u16,
    ) -> Result<MembersPage, ClientError> {
        let req = self.send_cmd(&Command::GroupMembers {
            group,
            after,
            limit,
        })?;
        let res = self.wait_for(|r, c| match c {
            Command::GroupMembersPage { .. } | Command::OpResult { .. } if r == req => {
                Some(c.clone())
            }
            _ => None,
        })?;
        match res {
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
            Command::OpResult { code, message, .. } => Err(ClientError::Server { code, message }),
            _ => unreachable!("filtered above"),
        }
    }

    /// The groups this user belongs to.
    pub fn my_groups(&mut self) -> Result<Vec<(GroupId, String)>, ClientError> {
        let req = self.send_cmd(&Command::MyGroups)?;
        self.wait_for(|r, c| match c {
            Command::GroupList { groups } if r == req => Some(groups.clone()),
            _ => None,
        })
    }

    /// Mutes (or unmutes) offline push for a conversation (`peer` user or group; 0 = all).
    pub fn set_mute(&mut self, peer: u64, muted: bool) -> Result<(), ClientError> {
        self.op(&Command::SetMute { peer, muted }).map(|_| ())
    }

    /// Tells the other side of a conversation that this user types (`true`) or stopped:
    /// `conv` [`im_shared::proto::CONV_C2C`] with user `peer`, or `CONV_C2G` in group `peer`.
    /// Repeat it every few seconds while typing: a notice stands for
    /// [`im_shared::proto::TYPING_TTL_MS`] only. Refused `Overloaded` above 2 a second.
    pub fn typing(&mut self, conv: u8, peer: u64, typing: bool) -> Result<(), ClientError> {
        self.op(&Command::Typing {
            conv,
            peer,
            state: typing as u8,
        })
        .map(|_| ())
    }

    /// Follows the presence of exactly these users (at most
    /// [`im_shared::proto::MAX_PRESENCE_SUBSCRIPTIONS`]; empty: none). Their current state and
    /// every later change arrive as `PresenceNotice` pushes ([`Client::recv`]).
    pub fn presence_subscribe(&mut self, users: &[UserId]) -> Result<(), ClientError> {
        self.op(&Command::PresenceSubscribe {
            users: users.to_vec(),
        })
        .map(|_| ())
    }

    /// Hides this user's presence from everyone (`true`: followers see it offline, with no
    /// last-seen time) or shows it again. Stored with the user, for all its devices.
    pub fn set_presence_hidden(&mut self, hidden: bool) -> Result<(), ClientError> {
        self.op(&Command::PresencePrivacy { hidden }).map(|_| ())
    }

    /// Registers this device's push token (provider 1 APNs, 2 FCM, 3 webhook; empty = remove).
    pub fn register_push(&mut self, provider: u8, token: &str) -> Result<(), ClientError> {
        self.op(&Command::RegisterPush {
            provider,
            token: token.to_owned(),
        })
        .map(|_| ())
    }

    /// One page of the organisation tree's records above `since` (0: from the start):
    /// `(version, next, more, records)`; call again with `since = next` while `more`.
    pub fn org_sync(
        &mut self,
        since: u64,
        limit: u16,
    ) -> Result<(u64, u64, bool, Vec<OrgRecord>), ClientError> {
        let req = self.send_cmd(&Command::OrgSync { since, limit })?;
        self.wait_for(|r, c| match c {
            Command::OrgPage {
                version,
                next,
                more,
                records,
            } if r == req => Some((*version, *next, *more, records.clone())),
            _ => None,
        })
    }

    /// Every organisation record above `since`, page by page, applied to `tree`; returns the
    /// version reached (the next `since`). A page refused with a retryable code (`Overloaded`:
    /// the pages count against the user's message rate; `Unavailable`: the tree is loading) is
    /// asked again after a backoff (100 ms doubling to 2 s, at most 30 times in a row).
    pub fn org_sync_all(&mut self, tree: &mut OrgTree, since: u64) -> Result<u64, ClientError> {
        let mut since = since;
        let mut refused = 0u32;
        loop {
            let (_, next, more, records) = match self.org_sync(since, 1000) {
                Ok(p) => {
                    refused = 0;
                    p
                }
                Err(e) if e.code().is_some_and(ErrorCode::is_retryable) && refused < 30 => {
                    let wait =
                        Duration::from_millis(100 << refused.min(5)).min(Duration::from_secs(2));
                    refused += 1;
                    std::thread::sleep(wait);
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
        let req = self.send_cmd(cmd)?;
        self.wait_for(|r, c| match c {
            Command::OrgReply {
                version,
                total,
                records,
            } if r == req => Some((*version, *total, records.clone())),
            _ => None,
        })
    }

    /// A department (0: the top level): `(version, members_total, records)`, the records being
    /// the department, its sub-departments, then a page of members (membership, person).
    pub fn org_dept(
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

    /// A user's person record, memberships and the departments above them.
    pub fn org_user(&mut self, uid: UserId) -> Result<(u64, u32, Vec<OrgRecord>), ClientError> {
        self.org_reply(&Command::OrgUser { uid })
    }

    /// Departments and people whose name contains `query`: `(version, matches, records)`.
    pub fn org_search(
        &mut self,
        query: &str,
        limit: u16,
    ) -> Result<(u64, u32, Vec<OrgRecord>), ClientError> {
        self.org_reply(&Command::OrgSearch {
            query: query.to_owned(),
            limit,
        })
    }

    /// Requests one sync page of messages after `after_seq`.
    pub fn sync_page(
        &mut self,
        after_seq: Seq,
        limit: u16,
    ) -> Result<(Vec<Message>, bool, Seq), ClientError> {
        let req = self.send_cmd(&Command::SyncRequest { after_seq, limit })?;
        let page = self.wait_for(|r, c| match c {
            Command::SyncPage { .. } if r == req => Some(c.clone()),
            _ => None,
        })?;
        match page {
            Command::SyncPage {
                max_seq,
                has_more,
                messages,
            } => Ok((messages, has_more, max_seq)),
            _ => unreachable!("filtered above"),
        }
    }

    /// Tells the server this device holds everything up to `seq`.
    pub fn deliver_ack(&mut self, seq: Seq) -> Result<(), ClientError> {
        self.send_cmd(&Command::DeliverAck { seq })?;
        Ok(())
    }

    pub fn heartbeat(&mut self) -> Result<u64, ClientError> {
        let req = self.send_cmd(&Command::Heartbeat)?;
        self.wait_for(|r, c| match c {
            Command::HeartbeatAck { server_time_ms } if r == req => Some(*server_time_ms),
            _ => None,
        })
    }

    pub fn logout(&mut self) -> Result<(), ClientError> {
        let req = self.send_cmd(&Command::Logout)?;
        self.wait_for(|r, c| matches!(c, Command::LogoutAck if r == req).then_some(()))
    }

    /// Next server push (deliver, delivered notice, kickout, error), waiting up to `timeout`.
    /// `Ok(None)` on timeout.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Command>, ClientError> {
        if let Some(c) = self.inbox.pop_front() {
            return Ok(Some(c));
        }
        match self.read_frame(Instant::now() + timeout) {
            Ok((_, c)) => Ok(Some(c)),
            Err(ClientError::Timeout) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the server closes the connection (returns the frames received before).
    pub fn read_until_closed(&mut self, timeout: Duration) -> Result<Vec<Command>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Command> = self.inbox.drain(..).collect();
        loop {
            match self.read_frame(deadline) {
                Ok((_, c)) => got.push(c),
                Err(ClientError::Closed) => return Ok(got),
                Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(got)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Client-side view of one user's timeline on one device: exactly-once and in order.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Highest seq held with no gap before it.
    pub last_seq: Seq,
    /// Messages accepted, in seq order.
    pub messages: Vec<Message>,
}

/// What [`Timeline::offer`] did with a message (the rule of [`core::classify`]).
pub use crate::core::Offer;

impl Timeline {
    pub fn new(last_seq: Seq) -> Self {
        Timeline {
            last_seq,
            messages: Vec::new(),
        }
    }

    pub fn offer(&mut self, m: &Message) -> Offer {
        let o = core::classify(self.last_seq, m.seq, m.prev_seq);
        if o == Offer::Accepted {
            self.last_seq = m.seq;
            self.messages.push(m.clone());
        }
        o
    }

    /// Places a message this device sent (it is in the sender's own timeline too): accepted when
    /// the ack's `prev_seq` is the last held seq, so no sync is needed for it.
    pub fn on_sent(&mut self, ack: &SendAck, from: UserId, to: UserId, body: Bytes) -> Offer {
        self.offer(&Message {
            seq: ack.seq,
            prev_seq: ack.prev_seq,
            msg_id: ack.msg_id,
            conv: im_shared::proto::CONV_C2C,
            from,
            to,
            client_msg_id: ack.client_msg_id,
            server_time_ms: ack.server_time_ms,
            body,
        })
    }

    /// Pulls every page after `last_seq` from the server.
    pub fn sync(&mut self, c: &mut Client) -> Result<usize, ClientError> {
        let mut n = 0;
        loop {
            let (msgs, more, _) = c.sync_page(self.last_seq, 200)?;
            for m in &msgs {
                if self.offer(m) == Offer::Accepted {
                    n += 1;
                }
            }
            if !more || msgs.is_empty() {
                return Ok(n);
            }
        }
    }

    /// Handles a `Deliver` push: accepts it, or syncs on a gap. Acks the new last seq to the
    /// server. Returns the number of new messages.
    pub fn on_deliver(&mut self, c: &mut Client, m: &Message) -> Result<usize, ClientError> {
        let n = match self.offer(m) {
            Offer::Accepted => 1,
            Offer::Duplicate => return Ok(0),
            Offer::Gap => self.sync(c)?,
        };
        c.deliver_ack(self.last_seq)?;
        Ok(n)
    }
}
