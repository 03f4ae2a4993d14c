//! Typed commands of protocol v1 and their body layouts (all integers big-endian;
//! `str` = u16 length + UTF-8; `bytes` = u32 length + raw bytes). Decoders ignore trailing bytes
//! so that later versions can append fields.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codes::ErrorCode;
use crate::frame::{encode_header, Cmd, Frame, HEADER_LEN};
use crate::ids::{DeviceType, GroupId, MsgId, Seq, UserId};
use crate::org::{self, OrgRecord};
pub use crate::wire::BodyError;
use crate::wire::{put_bytes, put_string, string_len, Reader};

/// Kind of a [`Message`] (its `conv` field).
/// One-to-one: `to` is the peer user.
pub const CONV_C2C: u8 = 1;
/// Group message: `to` is the group id, `from` the member who posted it.
pub const CONV_C2G: u8 = 2;
/// Server push from a business server (s2c): `from` is the business account, `to` the user or
/// group it was addressed to.
pub const CONV_S2C: u8 = 3;
/// A recall: body = [`MarkerBody`] naming the recalled message; `to` is the peer or group.
pub const CONV_RECALL: u8 = 4;
/// A read receipt: `from` has read everything up to the body's msg id in the conversation.
pub const CONV_READ: u8 = 5;
/// A group event (created, members added/removed, left, updated): body = [`GroupEvent`].
pub const CONV_GROUP_EVENT: u8 = 6;
/// The user was mentioned in a large group's post: `to` is the group, `msg_id`, `from` and the
/// body are the post's (its place in the group's timeline comes with `GroupSync`).
pub const CONV_MENTION: u8 = 7;
/// Most members one post may mention.
pub const MAX_MENTIONS: usize = 20;

/// Largest group a client may create or grow (write diffusion: one timeline entry per member).
pub const MAX_GROUP_MEMBERS: usize = 2000;
/// Longest group name / announcement / c2s topic, in bytes.
pub const MAX_NAME_LEN: usize = 256;
pub const MAX_ANNOUNCEMENT_LEN: usize = 4096;
pub const MAX_TOPIC_LEN: usize = 128;
/// Most users one connection may follow the presence of (`PresenceSubscribe`).
pub const MAX_PRESENCE_SUBSCRIPTIONS: usize = 256;
/// How long a `TypingNotice` stands unless repeated (the sender's client repeats `Typing` every
/// few seconds while the user types).
pub const TYPING_TTL_MS: u32 = 6_000;
/// Largest group whose members are told who is typing.
pub const MAX_TYPING_GROUP: usize = 500;
/// Longest push token, in bytes.
pub const MAX_PUSH_TOKEN_LEN: usize = 512;

/// Body of a [`CONV_RECALL`] or [`CONV_READ`] message: `conv:u8 msg_id:u64`, the conversation
/// kind ([`CONV_C2C`] or [`CONV_C2G`]) and the message recalled / read up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkerBody {
    pub conv: u8,
    pub msg_id: MsgId,
}

impl MarkerBody {
    pub fn to_bytes(self) -> Bytes {
        let mut b = BytesMut::with_capacity(9);
        b.put_u8(self.conv);
        b.put_u64(self.msg_id.0);
        b.freeze()
    }
    pub fn decode(body: Bytes) -> Result<MarkerBody, BodyError> {
        let mut r = Reader::new(body);
        Ok(MarkerBody {
            conv: r.u8("conv")?,
            msg_id: MsgId(r.u64("msg_id")?),
        })
    }
}

/// What happened to a group, in a [`CONV_GROUP_EVENT`] message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GroupEventKind {
    Created = 1,
    MembersAdded = 2,
    MembersRemoved = 3,
    MemberLeft = 4,
    Updated = 5,
    /// The group passed the large-group threshold: its posts from now on are in the group's own
    /// timeline (`GroupDeliver`, `GroupSync`), no longer appended to members' timelines.
    BecameLarge = 6,
    /// The owner made `users` admins (`GroupRole`).
    AdminAdded = 7,
    /// The owner made `users` plain members again (`GroupRole`).
    AdminRemoved = 8,
}

/// Body of a [`CONV_GROUP_EVENT`] message: `kind:u8 count:u16 uid:u64*` (the users concerned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEvent {
    pub kind: GroupEventKind,
    pub users: Vec<UserId>,
}

impl GroupEvent {
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(3 + 8 * self.users.len());
        b.put_u8(self.kind as u8);
        b.put_u16(self.users.len() as u16);
        for u in &self.users {
            b.put_u64(u.0);
        }
        b.freeze()
    }
    pub fn decode(body: Bytes) -> Result<GroupEvent, BodyError> {
        let mut r = Reader::new(body);
        let k = r.u8("kind")?;
        let kind = match k {
            1 => GroupEventKind::Created,
            2 => GroupEventKind::MembersAdded,
            3 => GroupEventKind::MembersRemoved,
            4 => GroupEventKind::MemberLeft,
            5 => GroupEventKind::Updated,
            6 => GroupEventKind::BecameLarge,
            7 => GroupEventKind::AdminAdded,
            8 => GroupEventKind::AdminRemoved,
            _ => {
                return Err(BodyError::Invalid {
                    field: "kind",
                    value: k as u64,
                })
            }
        };
        let users = read_uids(&mut r)?;
        Ok(GroupEvent { kind, users })
    }
}

/// Role of a group member.
pub const ROLE_MEMBER: u8 = 0;
/// A member the owner made an admin (`GroupRole`): manages members and posts in a channel.
pub const ROLE_ADMIN: u8 = 1;
pub const ROLE_OWNER: u8 = 2;

/// A group as `GroupInfoReply` describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupDesc {
    pub group: GroupId,
    pub name: String,
    pub creator: UserId,
    pub owner: UserId,
    pub announcement: String,
    pub created_ms: u64,
}

impl GroupDesc {
    fn encoded_len(&self) -> usize {
        8 + string_len(&self.name) + 8 + 8 + string_len(&self.announcement) + 8
    }
    fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(self.group.0);
        put_string(out, &self.name);
        out.put_u64(self.creator.0);
        out.put_u64(self.owner.0);
        put_string(out, &self.announcement);
        out.put_u64(self.created_ms);
    }
    /// Encoding used in `GroupInfoReply` and as the embedded store's group record.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }
    pub fn decode(buf: Bytes) -> Result<GroupDesc, BodyError> {
        Self::read(&mut Reader::new(buf))
    }
    fn read(r: &mut Reader) -> Result<GroupDesc, BodyError> {
        Ok(GroupDesc {
            group: GroupId(r.u64("group")?),
            name: r.string("name")?,
            creator: UserId(r.u64("creator")?),
            owner: UserId(r.u64("owner")?),
            announcement: r.string("announcement")?,
            created_ms: r.u64("created_ms")?,
        })
    }
}

/// `count:u16 uid:u64*`, with the allocation capped by what the body can hold.
fn read_uids(r: &mut Reader) -> Result<Vec<UserId>, BodyError> {
    let n = r.u16("count")? as usize;
    let mut v = Vec::with_capacity(n.min(r.remaining() / 8));
    for _ in 0..n {
        v.push(UserId(r.u64("uid")?));
    }
    Ok(v)
}

fn put_uids(out: &mut impl BufMut, uids: &[UserId]) {
    out.put_u16(uids.len() as u16);
    for u in uids {
        out.put_u64(u.0);
    }
}

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// One timeline entry as the recipient sees it. Also the storage record of the embedded store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Position in the receiving user's timeline.
    pub seq: Seq,
    /// Seq of the previous entry in the same timeline (0 for the first); a client whose last seq
    /// differs has a gap and should sync.
    pub prev_seq: Seq,
    pub msg_id: MsgId,
    /// [`CONV_C2C`].
    pub conv: u8,
    pub from: UserId,
    /// The peer user for c2c.
    pub to: UserId,
    pub client_msg_id: u64,
    pub server_time_ms: u64,
    pub body: Bytes,
}

impl Message {
    const FIXED: usize = 8 * 7 + 1 + 4;

    pub fn encoded_len(&self) -> usize {
        Self::FIXED + self.body.len()
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(self.seq.0);
        out.put_u64(self.prev_seq.0);
        out.put_u64(self.msg_id.0);
        out.put_u8(self.conv);
        out.put_u64(self.from.0);
        out.put_u64(self.to.0);
        out.put_u64(self.client_msg_id);
        out.put_u64(self.server_time_ms);
        put_bytes(out, &self.body);
    }

    fn read(r: &mut Reader) -> Result<Message, BodyError> {
        Ok(Message {
            seq: Seq(r.u64("seq")?),
            prev_seq: Seq(r.u64("prev_seq")?),
            msg_id: MsgId(r.u64("msg_id")?),
            conv: r.u8("conv")?,
            from: UserId(r.u64("from")?),
            to: UserId(r.u64("to")?),
            client_msg_id: r.u64("client_msg_id")?,
            server_time_ms: r.u64("server_time_ms")?,
            body: r.bytes("body")?,
        })
    }

    /// Parses one message from `buf` (a storage record or a `Deliver` body).
    pub fn decode(buf: Bytes) -> Result<Message, BodyError> {
        Self::read(&mut Reader::new(buf))
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }
}

/// Every command of protocol v1 with its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Login {
        uid: UserId,
        device_type: DeviceType,
        device_id: String,
        /// Highest seq this device already holds (0 for a fresh install).
        last_seq: Seq,
        token: String,
    },
    LoginResult {
        code: ErrorCode,
        server_time_ms: u64,
        /// Highest seq in the user's timeline; sync if above the device's last seq.
        max_seq: Seq,
        /// Send a heartbeat at least this often.
        heartbeat_secs: u16,
        message: String,
    },
    Logout,
    LogoutAck,
    Heartbeat,
    HeartbeatAck {
        server_time_ms: u64,
    },
    Kickout {
        reason: u8,
        message: String,
    },
    SendC2c {
        client_msg_id: u64,
        to: UserId,
        body: Bytes,
    },
    SendAck {
        code: ErrorCode,
        client_msg_id: u64,
        msg_id: MsgId,
        /// The message's seq in the sender's own timeline.
        seq: Seq,
        server_time_ms: u64,
        /// Seq of the entry before it in the sender's timeline: the sending device can place its
        /// own message without a sync when this equals its last seq.
        prev_seq: Seq,
    },
    Deliver(Message),
    DeliverAck {
        /// Highest seq this device holds without gaps.
        seq: Seq,
    },
    SyncRequest {
        after_seq: Seq,
        limit: u16,
    },
    SyncPage {
        max_seq: Seq,
        has_more: bool,
        messages: Vec<Message>,
    },
    Delivered {
        msg_id: MsgId,
        /// The recipient one of whose devices acknowledged the message.
        recipient: UserId,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Post to a group (members only). Acked with `SendAck` whose `seq`/`prev_seq` are 0: the
    /// sender's own copy arrives as a `Deliver` like everyone else's, in the group's order.
    SendC2g {
        client_msg_id: u64,
        group: GroupId,
        body: Bytes,
        /// Members mentioned (`@user`; at most [`MAX_MENTIONS`]): in a large group each gets
        /// the post as a personal [`CONV_MENTION`] entry (and its offline push). A trailing
        /// field: absent when empty.
        mentions: Vec<UserId>,
    },
    /// Recall one's own message within the recall window. `conv` is [`CONV_C2C`] (peer = the
    /// other user) or [`CONV_C2G`] (peer = the group). Acked with `SendAck`.
    Recall {
        client_msg_id: u64,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
    },
    /// "I have read up to `msg_id` in this conversation". For c2c the peer and the reader's
    /// other devices get a [`CONV_READ`] message; for a group only the reader's devices do.
    ReadReport {
        client_msg_id: u64,
        conv: u8,
        peer: u64,
        msg_id: MsgId,
    },
    /// c2s: an event for the business servers of `topic`. Acked with `SendAck` once durably
    /// queued; delivered to the business side at least once.
    Report {
        client_msg_id: u64,
        topic: String,
        body: Bytes,
    },
    /// Create a group owned by the sender with these initial members (the sender is added).
    /// Answered with `OpResult` whose `id` is the new group id.
    GroupCreate {
        name: String,
        members: Vec<UserId>,
        /// Chosen by the client, like `client_msg_id`: a create retried with the same non-zero
        /// `client_id` by the same user answers the group the first one made. 0: none (every
        /// create makes a new group). Optional on the wire (absent = 0).
        client_id: u64,
    },
    /// Owner only. Answered with `OpResult`.
    GroupAdd {
        group: GroupId,
        members: Vec<UserId>,
    },
    /// Owner only (the owner cannot remove itself). Answered with `OpResult`.
    GroupRemove {
        group: GroupId,
        members: Vec<UserId>,
    },
    /// A member leaves (the owner cannot leave). Answered with `OpResult`.
    GroupLeave {
        group: GroupId,
    },
    /// Owner only: new name and announcement. Answered with `OpResult`.
    GroupUpdate {
        group: GroupId,
        name: String,
        announcement: String,
    },
    /// Members only: the group and its members. Answered with `GroupInfoReply` (or `OpResult`
    /// with an error code).
    GroupInfo {
        group: GroupId,
    },
    /// The groups the user belongs to. Answered with `GroupList`.
    MyGroups,
    /// Mute push notifications for one conversation (`peer` = user or group id) or for
    /// everything (`peer` = 0). Answered with `OpResult`.
    SetMute {
        peer: u64,
        muted: bool,
    },
    /// Register this device's push token (`provider`: 1 APNs, 2 FCM, 3 webhook); an empty token
    /// unregisters. Answered with `OpResult`.
    RegisterPush {
        provider: u8,
        token: String,
    },
    /// Result of a management command: `code` and, for `GroupCreate`, the new group in `id`.
    OpResult {
        code: ErrorCode,
        id: u64,
        message: String,
    },
    GroupInfoReply {
        group: GroupDesc,
        /// `(member, role)`.
        members: Vec<(UserId, u8)>,
    },
    GroupList {
        /// `(group, name)`.
        groups: Vec<(GroupId, String)>,
    },
    /// The organisation tree's records with a version above `since` (0: everything), visible
    /// to the user, at most `limit` (capped at [`crate::org::MAX_ORG_PAGE`]). Answered with
    /// `OrgPage`.
    OrgSync {
        since: u64,
        limit: u16,
    },
    /// A department (0: the top level), its sub-departments and a page of its members.
    /// Answered with `OrgReply`.
    OrgDept {
        dept: u64,
        offset: u32,
        limit: u16,
    },
    /// A user's person record, memberships and the departments above them. Answered with
    /// `OrgReply`.
    OrgUser {
        uid: UserId,
    },
    /// Departments and people whose name contains `query` (case-insensitive). Answered with
    /// `OrgReply`.
    OrgSearch {
        query: String,
        limit: u16,
    },
    /// A page of `OrgSync`: records in version order; sync again with `since = next` while
    /// `more`. `version` is the tree's version when the page was read.
    OrgPage {
        version: u64,
        next: u64,
        more: bool,
        records: Vec<OrgRecord>,
    },
    /// Answer of `OrgDept`, `OrgUser` and `OrgSearch`: `total` counts the department's members
    /// (`OrgDept`) or the matches (`OrgSearch`), of which `records` may hold a page.
    OrgReply {
        version: u64,
        total: u32,
        records: Vec<OrgRecord>,
    },
    /// Server push: the tree changed and is now at `version`; sync from the last version held.
    OrgChanged {
        version: u64,
    },
    /// "I am about to upload a file of `size` bytes whose SHA-256 is `sha256`" (`kind` as in
    /// [`crate::files::FileKind`], `mime` its type). Answered with `FileTicket`, or an `Error`
    /// with this request's id (docs/PROTOCOL.md, "File messages").
    FileUpload {
        kind: u8,
        size: u64,
        sha256: [u8; 32],
        mime: String,
    },
    /// "Give me a download URL for the file of my message `seq`" (a message of the user's own
    /// timeline whose body is a file reference). Answered with `FileUrl` or an `Error`.
    FileDownload {
        seq: Seq,
    },
    /// Upload the bytes to `url` with this `ticket` (HTTP, docs/API.md "Files") before
    /// `expires_ms` (Unix ms).
    FileTicket {
        url: String,
        ticket: String,
        expires_ms: u64,
    },
    /// A signed download URL, valid until `expires_ms`.
    FileUrl {
        url: String,
        expires_ms: u64,
    },
    /// "I am typing (`state` 1) / I stopped (0)" in a conversation: `conv` [`CONV_C2C`] with user
    /// `peer`, or [`CONV_C2G`] in group `peer`. Never stored and never answered on success.
    Typing {
        conv: u8,
        peer: u64,
        state: u8,
    },
    /// Follow the presence of these users (replaces the connection's list; empty = none).
    /// Answered with `OpResult`; the current state of each then comes as `PresenceNotice`.
    PresenceSubscribe {
        users: Vec<UserId>,
    },
    /// Hide this user's presence from everyone (`hidden` true: followers see it offline with no
    /// last-seen time) or show it again. Stored; answered with `OpResult`.
    PresencePrivacy {
        hidden: bool,
    },
    /// Server push: `from` is typing (`state` 1) or stopped (0) in conversation `conv`/`peer`
    /// (for c2c `peer` is `from`, for c2g the group). It stands for `ttl_ms` unless repeated.
    TypingNotice {
        conv: u8,
        peer: u64,
        from: UserId,
        state: u8,
        ttl_ms: u32,
    },
    /// Server push: the presence of followed users.
    PresenceNotice {
        entries: Vec<PresenceEntry>,
    },
    /// Posts of a large group (read diffusion) with seq > `after_seq`, at most `limit` (0 = the
    /// server's page size). Members only. Answered with `GroupSyncPage`.
    GroupSync {
        group: GroupId,
        after_seq: Seq,
        limit: u16,
    },
    /// "I have read the large group up to `seq`": stored as the user's read cursor of the
    /// group (never lowered), reported back in `GroupHeads`. Answered with `OpResult`.
    GroupRead {
        group: GroupId,
        seq: Seq,
    },
    /// A page of a group's member list: members with uid > `after`, at most `limit` (0 = the
    /// server's page size), in uid order. Members only. Answered with `GroupMembersPage`.
    GroupMembers {
        group: GroupId,
        after: UserId,
        limit: u16,
    },
    /// Who may post in a group: everyone (`owner_only` false) or only its owner (a broadcast
    /// channel). Owner only. Answered with `OpResult`.
    GroupPosting {
        group: GroupId,
        owner_only: bool,
    },
    /// Makes member `uid` an admin (`role` [`ROLE_ADMIN`]) or a plain member again
    /// ([`ROLE_MEMBER`]). Owner only. Answered with `OpResult`.
    GroupRole {
        group: GroupId,
        uid: UserId,
        role: u8,
    },
    /// "Give me a download URL for the file of post `seq` of large group `group`'s timeline"
    /// (members only). Answered with `FileUrl` or an `Error`.
    GroupFileDownload {
        group: GroupId,
        seq: Seq,
    },
    /// Server push: a post of a large group, live. `seq`/`prev_seq` are the group timeline's
    /// (not the user's), `to` is the group.
    GroupDeliver(Message),
    /// Answer to `GroupSync`: posts ascending; `head` is the group's last seq.
    GroupSyncPage {
        group: GroupId,
        head: Seq,
        has_more: bool,
        messages: Vec<Message>,
    },
    /// Server push (after `LoginResult`): the user's large groups, each with its head and the
    /// user's read cursor, so the client syncs the ones it is behind on.
    GroupHeads {
        heads: Vec<GroupHead>,
    },
    /// Answer to `GroupMembers`: `total` members in all; `more` when a later page exists
    /// (ask again with `after` = the last uid of this page).
    GroupMembersPage {
        group: GroupId,
        total: u32,
        more: bool,
        members: Vec<(UserId, u8)>,
    },
}

/// One large group in `GroupHeads`: its last seq and the user's read cursor in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHead {
    pub group: GroupId,
    pub head: Seq,
    pub read: Seq,
}

/// One user's presence: online, or offline since `last_seen_ms` (Unix ms; 0 = not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    pub uid: UserId,
    pub online: bool,
    pub last_seen_ms: u64,
}

impl Command {
    pub fn cmd(&self) -> Cmd {
        match self {
            Command::Login { .. } => Cmd::Login,
            Command::LoginResult { .. } => Cmd::LoginResult,
            Command::Logout => Cmd::Logout,
            Command::LogoutAck => Cmd::LogoutAck,
            Command::Heartbeat => Cmd::Heartbeat,
            Command::HeartbeatAck { .. } => Cmd::HeartbeatAck,
            Command::Kickout { .. } => Cmd::Kickout,
            Command::SendC2c { .. } => Cmd::SendC2c,
            Command::SendAck { .. } => Cmd::SendAck,
            Command::Deliver(_) => Cmd::Deliver,
            Command::DeliverAck { .. } => Cmd::DeliverAck,
            Command::SyncRequest { .. } => Cmd::SyncRequest,
            Command::SyncPage { .. } => Cmd::SyncPage,
            Command::Delivered { .. } => Cmd::Delivered,
            Command::Error { .. } => Cmd::Error,
            Command::SendC2g { .. } => Cmd::SendC2g,
            Command::Recall { .. } => Cmd::Recall,
            Command::ReadReport { .. } => Cmd::ReadReport,
            Command::Report { .. } => Cmd::Report,
            Command::GroupCreate { .. } => Cmd::GroupCreate,
            Command::GroupAdd { .. } => Cmd::GroupAdd,
            Command::GroupRemove { .. } => Cmd::GroupRemove,
            Command::GroupLeave { .. } => Cmd::GroupLeave,
            Command::GroupUpdate { .. } => Cmd::GroupUpdate,
            Command::GroupInfo { .. } => Cmd::GroupInfo,
            Command::MyGroups => Cmd::MyGroups,
            Command::SetMute { .. } => Cmd::SetMute,
            Command::RegisterPush { .. } => Cmd::RegisterPush,
            Command::OpResult { .. } => Cmd::OpResult,
            Command::GroupInfoReply { .. } => Cmd::GroupInfoReply,
            Command::GroupList { .. } => Cmd::GroupList,
            Command::OrgSync { .. } => Cmd::OrgSync,
            Command::OrgDept { .. } => Cmd::OrgDept,
            Command::OrgUser { .. } => Cmd::OrgUser,
            Command::OrgSearch { .. } => Cmd::OrgSearch,
            Command::OrgPage { .. } => Cmd::OrgPage,
            Command::OrgReply { .. } => Cmd::OrgReply,
            Command::OrgChanged { .. } => Cmd::OrgChanged,
            Command::FileUpload { .. } => Cmd::FileUpload,
            Command::FileDownload { .. } => Cmd::FileDownload,
            Command::Typing { .. } => Cmd::Typing,
            Command::PresenceSubscribe { .. } => Cmd::PresenceSubscribe,
            Command::PresencePrivacy { .. } => Cmd::PresencePrivacy,
            Command::TypingNotice { .. } => Cmd::TypingNotice,
            Command::PresenceNotice { .. } => Cmd::PresenceNotice,
            Command::GroupSync { .. } => Cmd::GroupSync,
            Command::GroupRead { .. } => Cmd::GroupRead,
            Command::GroupFileDownload { .. } => Cmd::GroupFileDownload,
            Command::GroupMembers { .. } => Cmd::GroupMembers,
            Command::GroupPosting { .. } => Cmd::GroupPosting,
            Command::GroupRole { .. } => Cmd::GroupRole,
            Command::GroupDeliver(_) => Cmd::GroupDeliver,
            Command::GroupSyncPage { .. } => Cmd::GroupSyncPage,
            Command::GroupHeads { .. } => Cmd::GroupHeads,
            Command::GroupMembersPage { .. } => Cmd::GroupMembersPage,
            Command::FileTicket { .. } => Cmd::FileTicket,
            Command::FileUrl { .. } => Cmd::FileUrl,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Command::Login {
                device_id, token, ..
            } => 8 + 1 + string_len(device_id) + 8 + string_len(token),
            Command::LoginResult { message, .. } => 2 + 8 + 8 + 2 + string_len(message),
            Command::Logout | Command::LogoutAck | Command::Heartbeat => 0,
            Command::HeartbeatAck { .. } => 8,
            Command::Kickout { message, .. } => 1 + string_len(message),
            Command::SendC2c { body, .. } => 8 + 8 + 4 + body.len(),
            Command::SendAck { .. } => 2 + 8 + 8 + 8 + 8 + 8,
            Command::Deliver(m) => m.encoded_len(),
            Command::DeliverAck { .. } => 8,
            Command::SyncRequest { .. } => 8 + 2,
            Command::SyncPage { messages, .. } => {
                8 + 1 + 2 + messages.iter().map(Message::encoded_len).sum::<usize>()
            }
            Command::Delivered { .. } => 16,
            Command::Error { message, .. } => 2 + string_len(message),
            Command::SendC2g { body, mentions, .. } => {
                8 + 8
                    + 4
                    + body.len()
                    + if mentions.is_empty() {
                        0
                    } else {
                        2 + 8 * mentions.len()
                    }
            }
            Command::Recall { .. } | Command::ReadReport { .. } => 8 + 1 + 8 + 8,
            Command::Report { topic, body, .. } => 8 + string_len(topic) + 4 + body.len(),
            Command::GroupCreate { name, members, .. } => {
                string_len(name) + 2 + 8 * members.len() + 8
            }
            Command::GroupAdd { members, .. } | Command::GroupRemove { members, .. } => {
                8 + 2 + 8 * members.len()
            }
            Command::GroupLeave { .. } | Command::GroupInfo { .. } => 8,
            Command::GroupUpdate {
                name, announcement, ..
            } => 8 + string_len(name) + string_len(announcement),
            Command::MyGroups => 0,
            Command::SetMute { .. } => 9,
            Command::RegisterPush { token, .. } => 1 + string_len(token),
            Command::OpResult { message, .. } => 2 + 8 + string_len(message),
            Command::GroupInfoReply { group, members } => {
                group.encoded_len() + 4 + 9 * members.len()
            }
            Command::GroupList { groups } => {
                2 + groups.iter().map(|(_, n)| 8 + string_len(n)).sum::<usize>()
            }
            Command::OrgSync { .. } => 8 + 2,
            Command::OrgDept { .. } => 8 + 4 + 2,
            Command::OrgUser { .. } | Command::OrgChanged { .. } => 8,
            Command::OrgSearch { query, .. } => string_len(query) + 2,
            Command::OrgPage { records, .. } => 8 + 8 + 1 + org::records_len(records),
            Command::OrgReply { records, .. } => 8 + 4 + org::records_len(records),
            Command::FileUpload { mime, .. } => 1 + 8 + 32 + string_len(mime),
            Command::FileDownload { .. } => 8,
            Command::Typing { .. } => 1 + 8 + 1,
            Command::PresenceSubscribe { users } => 2 + 8 * users.len(),
            Command::PresencePrivacy { .. } => 1,
            Command::TypingNotice { .. } => 1 + 8 + 8 + 1 + 4,
            Command::PresenceNotice { entries } => 2 + 17 * entries.len(),
            Command::GroupSync { .. } => 8 + 8 + 2,
            Command::GroupRead { .. } | Command::GroupFileDownload { .. } => 8 + 8,
            Command::GroupMembers { .. } => 8 + 8 + 2,
            Command::GroupPosting { .. } => 8 + 1,
            Command::GroupRole { .. } => 8 + 8 + 1,
            Command::GroupDeliver(m) => m.encoded_len(),
            Command::GroupSyncPage { messages, .. } => {
                8 + 8 + 1 + 2 + messages.iter().map(Message::encoded_len).sum::<usize>()
            }
            Command::GroupHeads { heads } => 2 + 24 * heads.len(),
            Command::GroupMembersPage { members, .. } => 8 + 4 + 1 + 2 + 9 * members.len(),
            Command::FileTicket { url, ticket, .. } => string_len(url) + string_len(ticket) + 8,
            Command::FileUrl { url, .. } => string_len(url) + 8,
        }
    }

    /// Appends the whole frame (header + body) to `out`.
    pub fn encode(&self, req_id: u32, out: &mut BytesMut) {
        let len = self.body_len();
        encode_header(out, self.cmd(), req_id, len);
        let start = out.len();
        match self {
            Command::Login {
                uid,
                device_type,
                device_id,
                last_seq,
                token,
            } => {
                out.put_u64(uid.0);
                out.put_u8(*device_type as u8);
                put_string(out, device_id);
                out.put_u64(last_seq.0);
                put_string(out, token);
            }
            Command::LoginResult {
                code,
                server_time_ms,
                max_seq,
                heartbeat_secs,
                message,
            } => {
                out.put_u16(*code as u16);
                out.put_u64(*server_time_ms);
                out.put_u64(max_seq.0);
                out.put_u16(*heartbeat_secs);
                put_string(out, message);
            }
            Command::Logout | Command::LogoutAck | Command::Heartbeat => {}
            Command::HeartbeatAck { server_time_ms } => out.put_u64(*server_time_ms),
            Command::Kickout { reason, message } => {
                out.put_u8(*reason);
                put_string(out, message);
            }
            Command::SendC2c {
                client_msg_id,
                to,
                body,
            } => {
                out.put_u64(*client_msg_id);
                out.put_u64(to.0);
                put_bytes(out, body);
            }
            Command::SendAck {
                code,
                client_msg_id,
                msg_id,
                seq,
                server_time_ms,
                prev_seq,
            } => {
                out.put_u16(*code as u16);
                out.put_u64(*client_msg_id);
                out.put_u64(msg_id.0);
                out.put_u64(seq.0);
                out.put_u64(*server_time_ms);
                out.put_u64(prev_seq.0);
            }
            Command::Deliver(m) => m.encode(out),
            Command::DeliverAck { seq } => out.put_u64(seq.0),
            Command::SyncRequest { after_seq, limit } => {
                out.put_u64(after_seq.0);
                out.put_u16(*limit);
            }
            Command::SyncPage {
                max_seq,
                has_more,
                messages,
            } => {
                out.put_u64(max_seq.0);
                out.put_u8(*has_more as u8);
                out.put_u16(messages.len() as u16);
                for m in messages {
                    m.encode(out);
                }
            }
            Command::Delivered { msg_id, recipient } => {
                out.put_u64(msg_id.0);
                out.put_u64(recipient.0);
            }
            Command::Error { code, message } => {
                out.put_u16(*code as u16);
                put_string(out, message);
            }
            Command::SendC2g {
                client_msg_id,
                group,
                body,
                mentions,
            } => {
                out.put_u64(*client_msg_id);
                out.put_u64(group.0);
                put_bytes(out, body);
                if !mentions.is_empty() {
                    put_uids(out, mentions);
                }
            }
            Command::Recall {
                client_msg_id,
                conv,
                peer,
                msg_id,
            }
            | Command::ReadReport {
                client_msg_id,
                conv,
                peer,
                msg_id,
            } => {
                out.put_u64(*client_msg_id);
                out.put_u8(*conv);
                out.put_u64(*peer);
                out.put_u64(msg_id.0);
            }
            Command::Report {
                client_msg_id,
                topic,
                body,
            } => {
                out.put_u64(*client_msg_id);
                put_string(out, topic);
                put_bytes(out, body);
            }
            Command::GroupCreate {
                name,
                members,
                client_id,
            } => {
                put_string(out, name);
                put_uids(out, members);
                out.put_u64(*client_id);
            }
            Command::GroupAdd { group, members } | Command::GroupRemove { group, members } => {
                out.put_u64(group.0);
                put_uids(out, members);
            }
            Command::GroupLeave { group } | Command::GroupInfo { group } => out.put_u64(group.0),
            Command::GroupUpdate {
                group,
                name,
                announcement,
            } => {
                out.put_u64(group.0);
                put_string(out, name);
                put_string(out, announcement);
            }
            Command::MyGroups => {}
            Command::SetMute { peer, muted } => {
                out.put_u64(*peer);
                out.put_u8(*muted as u8);
            }
            Command::RegisterPush { provider, token } => {
                out.put_u8(*provider);
                put_string(out, token);
            }
            Command::OpResult { code, id, message } => {
                out.put_u16(*code as u16);
                out.put_u64(*id);
                put_string(out, message);
            }
            Command::GroupInfoReply { group, members } => {
                group.encode(out);
                out.put_u32(members.len() as u32);
                for (u, role) in members {
                    out.put_u64(u.0);
                    out.put_u8(*role);
                }
            }
            Command::GroupList { groups } => {
                out.put_u16(groups.len() as u16);
                for (g, n) in groups {
                    out.put_u64(g.0);
                    put_string(out, n);
                }
            }
            Command::OrgSync { since, limit } => {
                out.put_u64(*since);
                out.put_u16(*limit);
            }
            Command::OrgDept {
                dept,
                offset,
                limit,
            } => {
                out.put_u64(*dept);
                out.put_u32(*offset);
                out.put_u16(*limit);
            }
            Command::OrgUser { uid } => out.put_u64(uid.0),
            Command::OrgSearch { query, limit } => {
                put_string(out, query);
                out.put_u16(*limit);
            }
            Command::OrgPage {
                version,
                next,
                more,
                records,
            } => {
                out.put_u64(*version);
                out.put_u64(*next);
                out.put_u8(*more as u8);
                org::put_records(out, records);
            }
            Command::OrgReply {
                version,
                total,
                records,
            } => {
                out.put_u64(*version);
                out.put_u32(*total);
                org::put_records(out, records);
            }
            Command::OrgChanged { version } => out.put_u64(*version),
            Command::FileUpload {
                kind,
                size,
                sha256,
                mime,
            } => {
                out.put_u8(*kind);
                out.put_u64(*size);
                out.put_slice(sha256);
                put_string(out, mime);
            }
            Command::FileDownload { seq } => out.put_u64(seq.0),
            Command::Typing { conv, peer, state } => {
                out.put_u8(*conv);
                out.put_u64(*peer);
                out.put_u8(*state);
            }
            Command::PresenceSubscribe { users } => put_uids(out, users),
            Command::PresencePrivacy { hidden } => out.put_u8(*hidden as u8),
            Command::TypingNotice {
                conv,
                peer,
                from,
                state,
                ttl_ms,
            } => {
                out.put_u8(*conv);
                out.put_u64(*peer);
                out.put_u64(from.0);
                out.put_u8(*state);
                out.put_u32(*ttl_ms);
            }
            Command::PresenceNotice { entries } => {
                out.put_u16(entries.len() as u16);
                for e in entries {
                    out.put_u64(e.uid.0);
                    out.put_u8(e.online as u8);
                    out.put_u64(e.last_seen_ms);
                }
            }
            Command::GroupSync {
                group,
                after_seq,
                limit,
            } => {
                out.put_u64(group.0);
                out.put_u64(after_seq.0);
                out.put_u16(*limit);
            }
            Command::GroupRead { group, seq } | Command::GroupFileDownload { group, seq } => {
                out.put_u64(group.0);
                out.put_u64(seq.0);
            }
            Command::GroupMembers {
                group,
                after,
                limit,
            } => {
                out.put_u64(group.0);
                out.put_u64(after.0);
                out.put_u16(*limit);
            }
            Command::GroupPosting { group, owner_only } => {
                out.put_u64(group.0);
                out.put_u8(*owner_only as u8);
            }
            Command::GroupRole { group, uid, role } => {
                out.put_u64(group.0);
                out.put_u64(uid.0);
                out.put_u8(*role);
            }
            Command::GroupDeliver(m) => m.encode(out),
            Command::GroupSyncPage {
                group,
                head,
                has_more,
                messages,
            } => {
                out.put_u64(group.0);
                out.put_u64(head.0);
                out.put_u8(*has_more as u8);
                out.put_u16(messages.len() as u16);
                for m in messages {
                    m.encode(out);
                }
            }
            Command::GroupHeads { heads } => {
                out.put_u16(heads.len() as u16);
                for h in heads {
                    out.put_u64(h.group.0);
                    out.put_u64(h.head.0);
                    out.put_u64(h.read.0);
                }
            }
            Command::GroupMembersPage {
                group,
                total,
                more,
                members,
            } => {
                out.put_u64(group.0);
                out.put_u32(*total);
                out.put_u8(*more as u8);
                out.put_u16(members.len() as u16);
                for (u, role) in members {
                    out.put_u64(u.0);
                    out.put_u8(*role);
                }
            }
            Command::FileTicket {
                url,
                ticket,
                expires_ms,
            } => {
                put_string(out, url);
                put_string(out, ticket);
                out.put_u64(*expires_ms);
            }
            Command::FileUrl { url, expires_ms } => {
                put_string(out, url);
                out.put_u64(*expires_ms);
            }
        }
        debug_assert_eq!(out.len() - start, len);
    }

    /// Encodes into a fresh buffer (header + body).
    pub fn to_bytes(&self, req_id: u32) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.body_len());
        self.encode(req_id, &mut b);
        b.freeze()
    }

    /// Encodes into a [`Frame`].
    pub fn to_frame(&self, req_id: u32) -> Frame {
        let mut b = self.to_bytes(req_id);
        let body = b.split_off(HEADER_LEN);
        Frame::new(self.cmd(), req_id, body)
    }

    /// Parses the body of `frame` according to its command.
    pub fn decode(frame: &Frame) -> Result<Command, BodyError> {
        Self::decode_body(frame.cmd, frame.body.clone())
    }

    pub fn decode_body(cmd: Cmd, body: Bytes) -> Result<Command, BodyError> {
        let mut r = Reader::new(body);
        let code = |v: u16| {
            ErrorCode::from_u16(v).ok_or(BodyError::Invalid {
                field: "code",
                value: v as u64,
            })
        };
        Ok(match cmd {
            Cmd::Login => {
                let uid = UserId(r.u64("uid")?);
                let dt = r.u8("device_type")?;
                let device_type = DeviceType::from_u8(dt).ok_or(BodyError::Invalid {
                    field: "device_type",
                    value: dt as u64,
                })?;
                Command::Login {
                    uid,
                    device_type,
                    device_id: r.string("device_id")?,
                    last_seq: Seq(r.u64("last_seq")?),
                    token: r.string("token")?,
                }
            }
            Cmd::LoginResult => Command::LoginResult {
                code: code(r.u16("code")?)?,
                server_time_ms: r.u64("server_time_ms")?,
                max_seq: Seq(r.u64("max_seq")?),
                heartbeat_secs: r.u16("heartbeat_secs")?,
                message: r.string("message")?,
            },
            Cmd::Logout => Command::Logout,
            Cmd::LogoutAck => Command::LogoutAck,
            Cmd::Heartbeat => Command::Heartbeat,
            Cmd::HeartbeatAck => Command::HeartbeatAck {
                server_time_ms: r.u64("server_time_ms")?,
            },
            Cmd::Kickout => Command::Kickout {
                reason: r.u8("reason")?,
                message: r.string("message")?,
            },
            Cmd::SendC2c => Command::SendC2c {
                client_msg_id: r.u64("client_msg_id")?,
                to: UserId(r.u64("to")?),
                body: r.bytes("body")?,
            },
            Cmd::SendAck => Command::SendAck {
                code: code(r.u16("code")?)?,
                client_msg_id: r.u64("client_msg_id")?,
                msg_id: MsgId(r.u64("msg_id")?),
                seq: Seq(r.u64("seq")?),
                server_time_ms: r.u64("server_time_ms")?,
                prev_seq: Seq(r.u64("prev_seq")?),
            },
            Cmd::Deliver => Command::Deliver(Message::read(&mut r)?),
            Cmd::DeliverAck => Command::DeliverAck {
                seq: Seq(r.u64("seq")?),
            },
            Cmd::SyncRequest => Command::SyncRequest {
                after_seq: Seq(r.u64("after_seq")?),
                limit: r.u16("limit")?,
            },
            Cmd::SyncPage => {
                let max_seq = Seq(r.u64("max_seq")?);
                let has_more = r.u8("has_more")? != 0;
                let n = r.u16("count")? as usize;
                // Each message needs at least Message::FIXED bytes: cap the allocation by what
                // the body can actually hold so a forged count cannot allocate much.
                let mut messages = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    messages.push(Message::read(&mut r)?);
                }
                Command::SyncPage {
                    max_seq,
                    has_more,
                    messages,
                }
            }
            Cmd::Delivered => Command::Delivered {
                msg_id: MsgId(r.u64("msg_id")?),
                recipient: UserId(r.u64("recipient")?),
            },
            Cmd::Error => Command::Error {
                code: code(r.u16("code")?)?,
                message: r.string("message")?,
            },
            Cmd::SendC2g => Command::SendC2g {
                client_msg_id: r.u64("client_msg_id")?,
                group: GroupId(r.u64("group")?),
                body: r.bytes("body")?,
                mentions: if r.remaining() >= 2 {
                    read_uids(&mut r)?
                } else {
                    Vec::new()
                },
            },
            Cmd::Recall => Command::Recall {
                client_msg_id: r.u64("client_msg_id")?,
                conv: r.u8("conv")?,
                peer: r.u64("peer")?,
                msg_id: MsgId(r.u64("msg_id")?),
            },
            Cmd::ReadReport => Command::ReadReport {
                client_msg_id: r.u64("client_msg_id")?,
                conv: r.u8("conv")?,
                peer: r.u64("peer")?,
                msg_id: MsgId(r.u64("msg_id")?),
            },
            Cmd::Report => Command::Report {
                client_msg_id: r.u64("client_msg_id")?,
                topic: r.string("topic")?,
                body: r.bytes("body")?,
            },
            Cmd::GroupCreate => Command::GroupCreate {
                name: r.string("name")?,
                members: read_uids(&mut r)?,
                // Appended field: absent in bodies from older clients.
                client_id: if r.remaining() == 0 {
                    0
                } else {
                    r.u64("client_id")?
                },
            },
            Cmd::GroupAdd => Command::GroupAdd {
                group: GroupId(r.u64("group")?),
                members: read_uids(&mut r)?,
            },
            Cmd::GroupRemove => Command::GroupRemove {
                group: GroupId(r.u64("group")?),
                members: read_uids(&mut r)?,
            },
            Cmd::GroupLeave => Command::GroupLeave {
                group: GroupId(r.u64("group")?),
            },
            Cmd::GroupUpdate => Command::GroupUpdate {
                group: GroupId(r.u64("group")?),
                name: r.string("name")?,
                announcement: r.string("announcement")?,
            },
            Cmd::GroupInfo => Command::GroupInfo {
                group: GroupId(r.u64("group")?),
            },
            Cmd::MyGroups => Command::MyGroups,
            Cmd::SetMute => Command::SetMute {
                peer: r.u64("peer")?,
                muted: r.u8("muted")? != 0,
            },
            Cmd::RegisterPush => Command::RegisterPush {
                provider: r.u8("provider")?,
                token: r.string("token")?,
            },
            Cmd::OpResult => Command::OpResult {
                code: code(r.u16("code")?)?,
                id: r.u64("id")?,
                message: r.string("message")?,
            },
            Cmd::GroupInfoReply => {
                let group = GroupDesc::read(&mut r)?;
                let n = r.u32("count")? as usize;
                let mut members = Vec::with_capacity(n.min(r.remaining() / 9));
                for _ in 0..n {
                    members.push((UserId(r.u64("uid")?), r.u8("role")?));
                }
                Command::GroupInfoReply { group, members }
            }
            Cmd::GroupList => {
                let n = r.u16("count")? as usize;
                let mut groups = Vec::with_capacity(n.min(r.remaining() / 10));
                for _ in 0..n {
                    groups.push((GroupId(r.u64("group")?), r.string("name")?));
                }
                Command::GroupList { groups }
            }
            Cmd::OrgSync => Command::OrgSync {
                since: r.u64("since")?,
                limit: r.u16("limit")?,
            },
            Cmd::OrgDept => Command::OrgDept {
                dept: r.u64("dept")?,
                offset: r.u32("offset")?,
                limit: r.u16("limit")?,
            },
            Cmd::OrgUser => Command::OrgUser {
                uid: UserId(r.u64("uid")?),
            },
            Cmd::OrgSearch => Command::OrgSearch {
                query: r.string("query")?,
                limit: r.u16("limit")?,
            },
            Cmd::OrgPage => Command::OrgPage {
                version: r.u64("version")?,
                next: r.u64("next")?,
                more: r.u8("more")? != 0,
                records: org::read_records(&mut r)?,
            },
            Cmd::OrgReply => Command::OrgReply {
                version: r.u64("version")?,
                total: r.u32("total")?,
                records: org::read_records(&mut r)?,
            },
            Cmd::OrgChanged => Command::OrgChanged {
                version: r.u64("version")?,
            },
            Cmd::FileUpload => Command::FileUpload {
                kind: r.u8("kind")?,
                size: r.u64("size")?,
                sha256: {
                    let mut h = [0u8; 32];
                    for b in &mut h {
                        *b = r.u8("sha256")?;
                    }
                    h
                },
                mime: r.string("mime")?,
            },
            Cmd::FileDownload => Command::FileDownload {
                seq: Seq(r.u64("seq")?),
            },
            Cmd::FileTicket => Command::FileTicket {
                url: r.string("url")?,
                ticket: r.string("ticket")?,
                expires_ms: r.u64("expires_ms")?,
            },
            Cmd::FileUrl => Command::FileUrl {
                url: r.string("url")?,
                expires_ms: r.u64("expires_ms")?,
            },
            Cmd::Typing => Command::Typing {
                conv: r.u8("conv")?,
                peer: r.u64("peer")?,
                state: r.u8("state")?,
            },
            Cmd::PresenceSubscribe => Command::PresenceSubscribe {
                users: read_uids(&mut r)?,
            },
            Cmd::PresencePrivacy => Command::PresencePrivacy {
                hidden: r.u8("hidden")? != 0,
            },
            Cmd::TypingNotice => Command::TypingNotice {
                conv: r.u8("conv")?,
                peer: r.u64("peer")?,
                from: UserId(r.u64("from")?),
                state: r.u8("state")?,
                ttl_ms: r.u32("ttl_ms")?,
            },
            Cmd::PresenceNotice => {
                let n = r.u16("count")? as usize;
                let mut entries = Vec::with_capacity(n.min(r.remaining() / 17));
                for _ in 0..n {
                    entries.push(PresenceEntry {
                        uid: UserId(r.u64("uid")?),
                        online: r.u8("online")? != 0,
                        last_seen_ms: r.u64("last_seen_ms")?,
                    });
                }
                Command::PresenceNotice { entries }
            }
            Cmd::GroupSync => Command::GroupSync {
                group: GroupId(r.u64("group")?),
                after_seq: Seq(r.u64("after_seq")?),
                limit: r.u16("limit")?,
            },
            Cmd::GroupRead => Command::GroupRead {
                group: GroupId(r.u64("group")?),
                seq: Seq(r.u64("seq")?),
            },
            Cmd::GroupFileDownload => Command::GroupFileDownload {
                group: GroupId(r.u64("group")?),
                seq: Seq(r.u64("seq")?),
            },
            Cmd::GroupMembers => Command::GroupMembers {
                group: GroupId(r.u64("group")?),
                after: UserId(r.u64("after")?),
                limit: r.u16("limit")?,
            },
            Cmd::GroupPosting => Command::GroupPosting {
                group: GroupId(r.u64("group")?),
                owner_only: r.u8("owner_only")? != 0,
            },
            Cmd::GroupRole => Command::GroupRole {
                group: GroupId(r.u64("group")?),
                uid: UserId(r.u64("uid")?),
                role: r.u8("role")?,
            },
            Cmd::GroupDeliver => Command::GroupDeliver(Message::read(&mut r)?),
            Cmd::GroupSyncPage => {
                let group = GroupId(r.u64("group")?);
                let head = Seq(r.u64("head")?);
                let has_more = r.u8("has_more")? != 0;
                let n = r.u16("count")? as usize;
                let mut messages = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    messages.push(Message::read(&mut r)?);
                }
                Command::GroupSyncPage {
                    group,
                    head,
                    has_more,
                    messages,
                }
            }
            Cmd::GroupHeads => {
                let n = r.u16("count")? as usize;
                let mut heads = Vec::with_capacity(n.min(r.remaining() / 24));
                for _ in 0..n {
                    heads.push(GroupHead {
                        group: GroupId(r.u64("group")?),
                        head: Seq(r.u64("head")?),
                        read: Seq(r.u64("read")?),
                    });
                }
                Command::GroupHeads { heads }
            }
            Cmd::GroupMembersPage => {
                let group = GroupId(r.u64("group")?);
                let total = r.u32("total")?;
                let more = r.u8("more")? != 0;
                let n = r.u16("count")? as usize;
                let mut members = Vec::with_capacity(n.min(r.remaining() / 9));
                for _ in 0..n {
                    members.push((UserId(r.u64("uid")?), r.u8("role")?));
                }
                Command::GroupMembersPage {
                    group,
                    total,
                    more,
                    members,
                }
            }
        })
    }
}

/// Reads only the user id of a `Login` body: the one field the gate looks at.
pub fn peek_login_uid(body: &[u8]) -> Option<UserId> {
    let b: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(UserId(u64::from_be_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameCodec;
    use proptest::prelude::*;

    fn msg(seq: u64, body: &'static [u8]) -> Message {
        Message {
            seq: Seq(seq),
            prev_seq: Seq(seq.saturating_sub(1)),
            msg_id: MsgId(99),
            conv: CONV_C2C,
            from: UserId(1),
            to: UserId(2),
            client_msg_id: 5,
            server_time_ms: 1234,
            body: Bytes::from_static(body),
        }
    }

    fn all_commands() -> Vec<Command> {
        vec![
            Command::Login {
                uid: UserId(7),
                device_type: DeviceType::Desktop,
                device_id: "dev-1".into(),
                last_seq: Seq(3),
                token: "v1.7.99.abc".into(),
            },
            Command::LoginResult {
                code: ErrorCode::Ok,
                server_time_ms: 1,
                max_seq: Seq(9),
                heartbeat_secs: 30,
                message: "welcome".into(),
            },
            Command::Logout,
            Command::LogoutAck,
            Command::Heartbeat,
            Command::HeartbeatAck { server_time_ms: 5 },
            Command::Kickout {
                reason: 1,
                message: "bye".into(),
            },
            Command::SendC2c {
                client_msg_id: 11,
                to: UserId(2),
                body: Bytes::from_static(b"hi"),
            },
            Command::SendAck {
                code: ErrorCode::Ok,
                client_msg_id: 11,
                msg_id: MsgId(12),
                seq: Seq(13),
                server_time_ms: 14,
                prev_seq: Seq(12),
            },
            Command::Deliver(msg(4, b"yo")),
            Command::DeliverAck { seq: Seq(4) },
            Command::SyncRequest {
                after_seq: Seq(1),
                limit: 100,
            },
            Command::SyncPage {
                max_seq: Seq(9),
                has_more: true,
                messages: vec![msg(2, b"a"), msg(3, b"")],
            },
            Command::Delivered {
                msg_id: MsgId(1),
                recipient: UserId(2),
            },
            Command::Error {
                code: ErrorCode::Overloaded,
                message: "later".into(),
            },
            Command::SendC2g {
                client_msg_id: 3,
                group: GroupId(77),
                body: Bytes::from_static(b"all"),
                mentions: Vec::new(),
            },
            Command::SendC2g {
                client_msg_id: 3,
                group: GroupId(77),
                body: Bytes::from_static(b"@5 @6 hi"),
                mentions: vec![UserId(5), UserId(6)],
            },
            Command::Recall {
                client_msg_id: 4,
                conv: CONV_C2G,
                peer: 77,
                msg_id: MsgId(5),
            },
            Command::ReadReport {
                client_msg_id: 4,
                conv: CONV_C2C,
                peer: 2,
                msg_id: MsgId(6),
            },
            Command::Report {
                client_msg_id: 9,
                topic: "orders".into(),
                body: Bytes::from_static(b"{}"),
            },
            Command::GroupCreate {
                name: "team".into(),
                members: vec![UserId(2), UserId(3)],
                client_id: 0x0102_0304_0506_0708,
            },
            Command::GroupAdd {
                group: GroupId(8),
                members: vec![UserId(4)],
            },
            Command::GroupRemove {
                group: GroupId(8),
                members: vec![UserId(4), UserId(5)],
            },
            Command::GroupLeave { group: GroupId(8) },
            Command::GroupUpdate {
                group: GroupId(8),
                name: "n".into(),
                announcement: "a".into(),
            },
            Command::GroupInfo { group: GroupId(8) },
            Command::MyGroups,
            Command::SetMute {
                peer: 8,
                muted: true,
            },
            Command::RegisterPush {
                provider: 3,
                token: "tok".into(),
            },
            Command::OpResult {
                code: ErrorCode::NotMember,
                id: 8,
                message: "no".into(),
            },
            Command::GroupInfoReply {
                group: GroupDesc {
                    group: GroupId(8),
                    name: "team".into(),
                    creator: UserId(1),
                    owner: UserId(1),
                    announcement: "hello".into(),
                    created_ms: 5,
                },
                members: vec![(UserId(1), ROLE_OWNER), (UserId(2), ROLE_MEMBER)],
            },
            Command::GroupList {
                groups: vec![(GroupId(8), "team".into()), (GroupId(9), String::new())],
            },
            Command::OrgSync {
                since: 7,
                limit: 100,
            },
            Command::OrgDept {
                dept: 3,
                offset: 20,
                limit: 50,
            },
            Command::OrgUser { uid: UserId(9) },
            Command::OrgSearch {
                query: "stor".into(),
                limit: 10,
            },
            Command::OrgPage {
                version: 12,
                next: 12,
                more: false,
                records: vec![
                    OrgRecord {
                        version: 11,
                        deleted: false,
                        entity: org::OrgEntity::Dept(org::OrgDept {
                            id: 3,
                            parent: 1,
                            order: 2,
                            hidden: true,
                            name: "Storage".into(),
                        }),
                    },
                    OrgRecord {
                        version: 12,
                        deleted: true,
                        entity: org::OrgEntity::Member(org::OrgMember {
                            uid: 9,
                            dept: 3,
                            order: 0,
                            title: "lead".into(),
                        }),
                    },
                ],
            },
            Command::OrgReply {
                version: 12,
                total: 1,
                records: vec![OrgRecord {
                    version: 5,
                    deleted: false,
                    entity: org::OrgEntity::Person(org::OrgPerson {
                        uid: 9,
                        name: "Alice".into(),
                    }),
                }],
            },
            Command::OrgChanged { version: 12 },
            Command::FileUpload {
                kind: 1,
                size: 1234,
                sha256: [7; 32],
                mime: "image/png".into(),
            },
            Command::FileDownload { seq: Seq(77) },
            Command::FileTicket {
                url: "http://127.0.0.1:8080/v1/files/uploads".into(),
                ticket: "5.07.1234.99.ab".into(),
                expires_ms: 99,
            },
            Command::FileUrl {
                url: "http://127.0.0.1:8080/v1/files/07?u=5".into(),
                expires_ms: 99,
            },
            Command::Typing {
                conv: CONV_C2G,
                peer: 7,
                state: 1,
            },
            Command::PresenceSubscribe {
                users: vec![UserId(2), UserId(3)],
            },
            Command::PresencePrivacy { hidden: true },
            Command::TypingNotice {
                conv: CONV_C2C,
                peer: 5,
                from: UserId(5),
                state: 0,
                ttl_ms: TYPING_TTL_MS,
            },
            Command::PresenceNotice {
                entries: vec![
                    PresenceEntry {
                        uid: UserId(2),
                        online: true,
                        last_seen_ms: 0,
                    },
                    PresenceEntry {
                        uid: UserId(3),
                        online: false,
                        last_seen_ms: 1_700_000_000_000,
                    },
                ],
            },
            Command::GroupSync {
                group: GroupId(9),
                after_seq: Seq(3),
                limit: 50,
            },
            Command::GroupRead {
                group: GroupId(9),
                seq: Seq(4),
            },
            Command::GroupFileDownload {
                group: GroupId(9),
                seq: Seq(5),
            },
            Command::GroupMembers {
                group: GroupId(9),
                after: UserId(7),
                limit: 0,
            },
            Command::GroupPosting {
                group: GroupId(9),
                owner_only: true,
            },
            Command::GroupRole {
                group: GroupId(9),
                uid: UserId(7),
                role: ROLE_ADMIN,
            },
            Command::GroupDeliver(Message {
                seq: Seq(4),
                prev_seq: Seq(3),
                msg_id: MsgId(99),
                conv: CONV_C2G,
                from: UserId(5),
                to: UserId(9),
                client_msg_id: 1,
                server_time_ms: 1_700_000_000_000,
                body: Bytes::from_static(b"hi all"),
            }),
            Command::GroupSyncPage {
                group: GroupId(9),
                head: Seq(4),
                has_more: false,
                messages: vec![Message {
                    seq: Seq(4),
                    prev_seq: Seq(3),
                    msg_id: MsgId(99),
                    conv: CONV_C2G,
                    from: UserId(5),
                    to: UserId(9),
                    client_msg_id: 1,
                    server_time_ms: 1_700_000_000_000,
                    body: Bytes::from_static(b"hi all"),
                }],
            },
            Command::GroupHeads {
                heads: vec![GroupHead {
                    group: GroupId(9),
                    head: Seq(4),
                    read: Seq(2),
                }],
            },
            Command::GroupMembersPage {
                group: GroupId(9),
                total: 3,
                more: true,
                members: vec![(UserId(5), ROLE_OWNER), (UserId(7), ROLE_MEMBER)],
            },
        ]
    }

    /// The worked example of PROTOCOL.md's `GroupRole` section, byte for byte.
    #[test]
    fn group_role_encodes_as_the_protocol_document_shows() {
        let f = Command::GroupRole {
            group: GroupId(77),
            uid: UserId(1002),
            role: ROLE_ADMIN,
        }
        .to_bytes(5);
        let hex: Vec<String> = f.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "49 4d 01 2d 00 00 00 05 00 00 00 11 00 00 00 00 \
             00 00 00 4d 00 00 00 00 00 00 03 ea 01"
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    #[test]
    fn markers_and_events_round_trip() {
        let m = MarkerBody {
            conv: CONV_C2G,
            msg_id: MsgId(42),
        };
        assert_eq!(MarkerBody::decode(m.to_bytes()).unwrap(), m);
        assert!(MarkerBody::decode(m.to_bytes().slice(..8)).is_err());
        let e = GroupEvent {
            kind: GroupEventKind::MembersAdded,
            users: vec![UserId(1), UserId(2)],
        };
        assert_eq!(GroupEvent::decode(e.to_bytes()).unwrap(), e);
        assert!(GroupEvent::decode(Bytes::from_static(&[9, 0, 0])).is_err());
        // A forged count larger than the body is an error, not a large allocation.
        assert!(GroupEvent::decode(Bytes::from_static(&[1, 0xFF, 0xFF, 0, 0])).is_err());
    }

    /// The worked examples of PROTOCOL.md §12 ("Organisation tree sync"), byte for byte.
    #[test]
    fn the_file_upload_worked_example_is_the_documented_bytes() {
        let req = Command::FileUpload {
            kind: 1,
            size: 1234,
            sha256: [0xab; 32],
            mime: "image/png".into(),
        }
        .to_bytes(4);
        let mut want = vec![0x49, 0x4d, 0x01, 0x24, 0, 0, 0, 4, 0, 0, 0, 0x34, 1];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x04, 0xd2]);
        want.extend_from_slice(&[0xab; 32]);
        want.extend_from_slice(&[0, 9]);
        want.extend_from_slice(b"image/png");
        assert_eq!(&req[..], &want[..]);
    }

    #[test]
    fn the_presence_and_typing_worked_examples_are_the_documented_bytes() {
        let typing = Command::Typing {
            conv: CONV_C2G,
            peer: 7,
            state: 1,
        }
        .to_bytes(5);
        let want: &[u8] = &[
            0x49, 0x4d, 0x01, 0x26, 0, 0, 0, 5, 0, 0, 0, 0x0a, 2, 0, 0, 0, 0, 0, 0, 0, 7, 1,
        ];
        assert_eq!(&typing[..], want);
        let notice = Command::PresenceNotice {
            entries: vec![
                PresenceEntry {
                    uid: UserId(2),
                    online: true,
                    last_seen_ms: 0,
                },
                PresenceEntry {
                    uid: UserId(3),
                    online: false,
                    last_seen_ms: 1_700_000_000_000,
                },
            ],
        }
        .to_bytes(0);
        let mut want = vec![0x49, 0x4d, 0x01, 0x9d, 0, 0, 0, 0, 0, 0, 0, 0x24, 0, 2];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3, 0]);
        want.extend_from_slice(&[0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00]);
        assert_eq!(&notice[..], &want[..]);
    }

    #[test]
    fn the_large_group_worked_examples_are_the_documented_bytes() {
        let sync = Command::GroupSync {
            group: GroupId(9),
            after_seq: Seq(3),
            limit: 50,
        }
        .to_bytes(6);
        let mut want = vec![0x49, 0x4d, 0x01, 0x29, 0, 0, 0, 6, 0, 0, 0, 0x12];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0x32]);
        assert_eq!(&sync[..], &want[..]);
        let heads = Command::GroupHeads {
            heads: vec![GroupHead {
                group: GroupId(9),
                head: Seq(5),
                read: Seq(3),
            }],
        }
        .to_bytes(0);
        let mut want = vec![0x49, 0x4d, 0x01, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0x1a, 0, 1];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 5]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(&heads[..], &want[..]);
        let file = Command::GroupFileDownload {
            group: GroupId(9),
            seq: Seq(5),
        }
        .to_bytes(42);
        let mut want = vec![0x49, 0x4d, 0x01, 0x2e, 0, 0, 0, 42, 0, 0, 0, 0x10];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&file[..], &want[..]);
    }

    #[test]
    fn the_org_worked_examples_are_the_documented_bytes() {
        let req = Command::OrgSync {
            since: 0,
            limit: 100,
        }
        .to_bytes(3);
        let want: &[u8] = &[
            0x49, 0x4d, 0x01, 0x20, 0, 0, 0, 3, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64,
        ];
        assert_eq!(&req[..], want);
        let page = Command::OrgPage {
            version: 5,
            next: 5,
            more: false,
            records: vec![OrgRecord {
                version: 5,
                deleted: false,
                entity: org::OrgEntity::Dept(org::OrgDept {
                    id: 2,
                    parent: 1,
                    order: 0,
                    hidden: false,
                    name: "Eng".into(),
                }),
            }],
        }
        .to_bytes(3);
        let want: &[u8] = &[
            0x49, 0x4d, 0x01, 0x97, 0, 0, 0, 3, 0, 0, 0, 0x37, // header
            0, 0, 0, 0, 0, 0, 0, 5, // version
            0, 0, 0, 0, 0, 0, 0, 5, // next
            0, // more
            0, 1, // count
            1, // tag Dept
            0, 0, 0, 0, 0, 0, 0, 5, // record version
            0, // deleted
            0, 0, 0, 0, 0, 0, 0, 2, // id
            0, 0, 0, 0, 0, 0, 0, 1, // parent
            0, 0, 0, 0, // order
            0, // hidden
            0, 3, b'E', b'n', b'g', // name
        ];
        assert_eq!(&page[..], want);
    }

    #[test]
    fn every_command_round_trips() {
        for c in all_commands() {
            let mut b = BytesMut::new();
            c.encode(77, &mut b);
            let f = FrameCodec::default().decode(&mut b).unwrap().unwrap();
            assert_eq!(f.req_id, 77);
            assert_eq!(Command::decode(&f).unwrap(), c);
            assert_eq!(c.to_frame(77), f);
        }
    }

    #[test]
    fn truncated_bodies_are_errors_not_panics() {
        for c in all_commands() {
            let f = c.to_frame(1);
            for cut in 0..f.body.len() {
                if matches!(c, Command::GroupCreate { .. }) && cut == f.body.len() - 8 {
                    continue; // the body before the optional `client_id` is complete
                }
                if let Command::SendC2g { mentions, .. } = &c {
                    // Complete before the optional mentions (one stray byte reads as none).
                    let at = f.body.len() - (2 + 8 * mentions.len());
                    if !mentions.is_empty() && (cut == at || cut == at + 1) {
                        continue;
                    }
                }
                let short = Frame::new(f.cmd, 1, f.body.slice(..cut));
                assert!(Command::decode(&short).is_err(), "{c:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let c = Command::DeliverAck { seq: Seq(8) };
        let mut f = c.to_frame(1);
        let mut body = BytesMut::from(&f.body[..]);
        body.extend_from_slice(b"future fields");
        f.body = body.freeze();
        assert_eq!(Command::decode(&f).unwrap(), c);
    }

    #[test]
    fn a_group_create_without_the_appended_client_id_reads_as_zero() {
        let c = Command::GroupCreate {
            name: "old".into(),
            members: vec![UserId(5)],
            client_id: 77,
        };
        let mut f = c.to_frame(1);
        f.body = f.body.slice(..f.body.len() - 8); // what a client before the field sends
        assert_eq!(
            Command::decode(&f).unwrap(),
            Command::GroupCreate {
                name: "old".into(),
                members: vec![UserId(5)],
                client_id: 0,
            }
        );
    }

    #[test]
    fn peek_uid() {
        let f = all_commands()[0].to_frame(1);
        assert_eq!(peek_login_uid(&f.body), Some(UserId(7)));
        assert_eq!(peek_login_uid(&f.body[..7]), None);
    }

    proptest! {
        #[test]
        fn decode_body_never_panics(cmd in 0u8..=255, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Some(cmd) = Cmd::from_u8(cmd) {
                let _ = Command::decode_body(cmd, Bytes::from(body));
            }
        }

        #[test]
        fn c2c_round_trips(cmid: u64, to: u64, body in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let c = Command::SendC2c { client_msg_id: cmid, to: UserId(to), body: Bytes::from(body) };
            prop_assert_eq!(Command::decode(&c.to_frame(3)).unwrap(), c);
        }
    }
}
