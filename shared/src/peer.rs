//! The logic ↔ logic payload, carried in [`LinkMsg::Peer`](crate::link::LinkMsg::Peer): what a
//! worker of one logic node sends to a worker of another (appends of a fan-out, their
//! confirmations, delivered notices, a client's group request for the group's owner).
//!
//! ```text
//! payload := worker:u16 kind:u8 count:u32 entry*
//! kind 1 Append    : recipient:u64 shard:u16 replay:u8 msg_len:u32 msg (Message encoding)
//! kind 2 AppendDone: shard:u16 msg_id:u64 recipient:u64
//! kind 3 Delivered : sender:u64 msg_id:u64 recipient:u64
//! kind 4 Group     : (count = 1) group:u64 actor:u64 conn:u64 req_id:u32 op:u8 fields
//!   op 1 Create: name:str16 members:uids      op 2 Add: uids     op 3 Remove: uids
//!   op 4 Leave                                op 5 Update: name:str16 announcement:str16
//!   op 6 Info                                 op 7 Post: client_msg_id:u64 conv:u8 len:u32 body
//!                                                  [mentions:uids] (trailing, absent if none)
//!   str16 := len:u16 utf8      uids := n:u16 uid:u64 * n
//! kind 5 OrgPull   : (count = 1) reply_to:u32 since:u64
//! kind 6 OrgRecords: len:u32 record (the organisation tree's record encoding, PROTOCOL.md §6.9)
//! kind 7 Typing    : from:u64 conv:u8 peer:u64 state:u8 to:uids
//! kind 8 Watch     : (count = 1) watcher:u32 on:uids off:uids
//! kind 9 Presence  : uid:u64 online:u8 last_seen_ms:u64
//!   group op 9 Typing: state:u8
//!   group op 10 Sync: after:u64 limit:u16    op 11 Members: after:u64 limit:u16
//!   group op 12 Head: read:u64               op 13 Posting: owner_only:u8
//!   group op 14 Role: uid:u64 role:u8
//!   group op 15 Heads: count:u32 (group:u64 read:u64)*   (the call's `group` is the first)
//! kind 10 GroupLive : group:u64 msg_len:u32 msg (a large group's post, for online members)
//! ```
//! `GroupLive` goes from a large group's owner to every worker of the cluster once per post (not
//! once per member): each delivers it to its own online members.
//! `Typing` asks the receiving worker to tell its users `to` that `from` types in a conversation;
//! `Watch` tells a user's owner that global worker `watcher` starts (`on`) or stops (`off`)
//! following these users' presence, and `Presence` is the owner's answer and every later change.
//! `OrgPull` asks the worker that owns the organisation tree for its records above `since`;
//! it answers `OrgRecords` to global worker `reply_to` (a node with no store of the tree's own).
//! `worker` is the index of the receiving worker on its node. Decoding never panics: a truncated
//! or unknown payload is a [`PeerError`], and the receiving link treats it as a broken peer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::ids::{ConnId, GroupId, MsgId, Seq, ShardId, UserId};
use crate::org::OrgRecord;
use crate::proto::{Message, PresenceEntry};

/// Append `msg` to `recipient`'s timeline; `shard` names the outbox entry to release afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendReq {
    pub recipient: UserId,
    pub shard: ShardId,
    pub msg: Message,
    /// Sent by an outbox replay: the append may already have happened, so the recipient checks
    /// its `(uid, msg_id)` index first. A live fan-out is sent exactly once and skips that read.
    pub replay: bool,
}

/// A recipient device acknowledged `msg_id` of `sender`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveredNote {
    pub sender: UserId,
    pub msg_id: MsgId,
    pub recipient: UserId,
}

/// "`from` types (`state` 1) / stopped (0) in conversation `conv`/`peer`": for the devices of
/// users `to` (users of the receiving worker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypingNote {
    pub to: Vec<UserId>,
    pub from: UserId,
    pub conv: u8,
    pub peer: u64,
    pub state: u8,
}

/// Global worker `watcher` starts (`on`) and stops (`off`) following the presence of these
/// users of the receiving worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchReq {
    pub watcher: u32,
    pub on: Vec<UserId>,
    pub off: Vec<UserId>,
}

/// What is asked of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupOp {
    Create {
        name: String,
        members: Vec<UserId>,
    },
    Add(Vec<UserId>),
    Remove(Vec<UserId>),
    Leave,
    Update {
        name: String,
        announcement: String,
    },
    Info,
    /// A message to every member: a member's post (c2g), a recall, or a business push (s2c).
    Post {
        client_msg_id: u64,
        conv: u8,
        body: Bytes,
        /// Members mentioned (`SendC2g`'s trailing field).
        mentions: Vec<UserId>,
    },
    /// A member asks for a download URL of a file posted in the group (members only: a user
    /// removed from the group no longer gets one). Answered with `FileUrl`.
    FileUrl {
        sha256: [u8; 32],
        mime: String,
    },
    /// A member types (`state` 1) or stopped (0): its online co-members are told (groups of at
    /// most [`crate::proto::MAX_TYPING_GROUP`] members). Nothing is stored.
    Typing {
        state: u8,
    },
    /// A member reads a large group's timeline (`GroupSync`). Answered with `GroupSyncPage`.
    Sync {
        after: Seq,
        limit: u16,
    },
    /// A member pages the member list (`GroupMembers`). Answered with `GroupMembersPage`.
    Members {
        after: UserId,
        limit: u16,
    },
    /// A member's device logged in: the owner pushes it the group's head (`GroupHeads`) with the
    /// member's read cursor `read` (kept by the member's own shard). Nothing on a refusal.
    Head {
        read: Seq,
    },
    /// The owner lets everyone post (`owner_only` false) or only itself (`GroupPosting`).
    Posting {
        owner_only: bool,
    },
    /// The owner makes a member an admin or a plain member again (`GroupRole`).
    Role {
        uid: UserId,
        role: u8,
    },
    /// An operation this build does not know (kind byte), sent by a newer node during a rolling
    /// upgrade: answered `UnknownCommand` by the group's owner instead of ending the peer link
    /// (the operation's own bytes are skipped). Never encoded by this build's own requests.
    Unsupported(u8),
    /// [`GroupOp::Head`] for several large groups of one owner worker at once: one `GroupHeads`
    /// push lists them all (groups the actor is not a member of, or that are not large, are left
    /// out). Nothing on a refusal.
    Heads {
        heads: Vec<(GroupId, Seq)>,
    },
    /// A member asks for a download URL of the file of post `seq` of a large group's own
    /// timeline (`GroupFileDownload`): the owner reads the post, checks it is a file message
    /// that was not recalled, and answers with `FileUrl`.
    PostFile {
        seq: Seq,
    },
    /// A member asks for a download URL of the file of a large group's post `msg_id` (made at
    /// `time_ms`) that it holds as a mention entry of its own timeline (`FileDownload`): the owner
    /// checks the membership and the post's recall (its marker is in the group's timeline).
    MentionFile {
        msg_id: MsgId,
        time_ms: u64,
        sha256: [u8; 32],
        mime: String,
    },
}

/// A client's group request, forwarded to the node that owns the group. The owner answers the
/// client directly through the gate that holds `conn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCall {
    pub group: GroupId,
    pub actor: UserId,
    pub conn: ConnId,
    pub req_id: u32,
    pub op: GroupOp,
}

/// A decoded payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    Append(Vec<AppendReq>),
    /// `(outbox shard, msg_id, recipient)`: the recipient's append is durable.
    AppendDone(Vec<(ShardId, MsgId, UserId)>),
    Delivered(Vec<DeliveredNote>),
    Group(GroupCall),
    /// Records of the organisation tree above `since`, for global worker `reply_to`.
    OrgPull {
        reply_to: u32,
        since: u64,
    },
    OrgRecords(Vec<OrgRecord>),
    Typing(Vec<TypingNote>),
    Watch(WatchReq),
    Presence(Vec<PresenceEntry>),
    GroupLive(Vec<(GroupId, Message)>),
}

/// A payload to encode, borrowed from the sender's own message.
#[derive(Clone, Copy, Debug)]
pub enum PeerMsgRef<'a> {
    Append(&'a [AppendReq]),
    AppendDone(&'a [(ShardId, MsgId, UserId)]),
    Delivered(&'a [DeliveredNote]),
    Group(&'a GroupCall),
    OrgPull { reply_to: u32, since: u64 },
    OrgRecords(&'a [OrgRecord]),
    Typing(&'a [TypingNote]),
    Watch(&'a WatchReq),
    Presence(&'a [PresenceEntry]),
    GroupLive(&'a [(GroupId, Message)]),
}

impl PeerMsg {
    pub fn as_ref(&self) -> PeerMsgRef<'_> {
        match self {
            PeerMsg::Append(v) => PeerMsgRef::Append(v),
            PeerMsg::AppendDone(v) => PeerMsgRef::AppendDone(v),
            PeerMsg::Delivered(v) => PeerMsgRef::Delivered(v),
            PeerMsg::Group(g) => PeerMsgRef::Group(g),
            PeerMsg::OrgPull { reply_to, since } => PeerMsgRef::OrgPull {
                reply_to: *reply_to,
                since: *since,
            },
            PeerMsg::OrgRecords(v) => PeerMsgRef::OrgRecords(v),
            PeerMsg::Typing(v) => PeerMsgRef::Typing(v),
            PeerMsg::GroupLive(v) => PeerMsgRef::GroupLive(v),
            PeerMsg::Watch(w) => PeerMsgRef::Watch(w),
            PeerMsg::Presence(v) => PeerMsgRef::Presence(v),
        }
    }
}

/// Why a peer payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad peer payload: {0}")]
pub struct PeerError(&'static str);

const UNKNOWN_KIND: &str = "unknown kind";

impl PeerError {
    /// A message of a kind this build does not know: a newer node's, during a rolling upgrade.
    /// The payload is whole (the link's framing delimits it), so a receiver skips it and keeps
    /// the link, rather than ending it and being sent the same message again after the resync.
    pub fn is_unknown_kind(&self) -> bool {
        self.0 == UNKNOWN_KIND
    }
}

/// Encodes `msg` for worker `worker` of another node.
pub fn encode(worker: u16, msg: PeerMsgRef<'_>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u16(worker);
    match msg {
        PeerMsgRef::Append(reqs) => {
            b.put_u8(1);
            b.put_u32(reqs.len() as u32);
            for a in reqs {
                b.put_u64(a.recipient.0);
                b.put_u16(a.shard.0);
                b.put_u8(a.replay as u8);
                b.put_u32(a.msg.encoded_len() as u32);
                a.msg.encode(&mut b);
            }
        }
        PeerMsgRef::AppendDone(done) => {
            b.put_u8(2);
            b.put_u32(done.len() as u32);
            for (s, m, r) in done {
                b.put_u16(s.0);
                b.put_u64(m.0);
                b.put_u64(r.0);
            }
        }
        PeerMsgRef::Delivered(notes) => {
            b.put_u8(3);
            b.put_u32(notes.len() as u32);
            for n in notes {
                b.put_u64(n.sender.0);
                b.put_u64(n.msg_id.0);
                b.put_u64(n.recipient.0);
            }
        }
        PeerMsgRef::Group(call) => {
            b.put_u8(4);
            b.put_u32(1);
            encode_group(call, &mut b);
        }
        PeerMsgRef::OrgPull { reply_to, since } => {
            b.put_u8(5);
            b.put_u32(1);
            b.put_u32(reply_to);
            b.put_u64(since);
        }
        PeerMsgRef::OrgRecords(records) => {
            b.put_u8(6);
            b.put_u32(records.len() as u32);
            for r in records {
                b.put_u32(r.encoded_len() as u32);
                r.encode(&mut b);
            }
        }
        PeerMsgRef::Typing(notes) => {
            b.put_u8(7);
            b.put_u32(notes.len() as u32);
            for n in notes {
                b.put_u64(n.from.0);
                b.put_u8(n.conv);
                b.put_u64(n.peer);
                b.put_u8(n.state);
                put_uids(&mut b, &n.to);
            }
        }
        PeerMsgRef::Watch(w) => {
            b.put_u8(8);
            b.put_u32(1);
            b.put_u32(w.watcher);
            put_uids(&mut b, &w.on);
            put_uids(&mut b, &w.off);
        }
        PeerMsgRef::Presence(entries) => {
            b.put_u8(9);
            b.put_u32(entries.len() as u32);
            for e in entries {
                b.put_u64(e.uid.0);
                b.put_u8(e.online as u8);
                b.put_u64(e.last_seen_ms);
            }
        }
        PeerMsgRef::GroupLive(posts) => {
            b.put_u8(10);
            b.put_u32(posts.len() as u32);
            for (g, m) in posts {
                b.put_u64(g.0);
                b.put_u32(m.encoded_len() as u32);
                m.encode(&mut b);
            }
        }
    }
    b.freeze()
}

/// `n:u32 uid:u64 * n` (a watch list or a typing note's recipients: a group's members can be
/// more than a u16 counts).
fn put_uids(b: &mut BytesMut, v: &[UserId]) {
    b.put_u32(v.len() as u32);
    for u in v {
        b.put_u64(u.0);
    }
}

fn get_uids(b: &mut Bytes) -> Result<Vec<UserId>, PeerError> {
    need(b, 4)?;
    let n = b.get_u32() as usize;
    need(b, n.saturating_mul(8))?;
    Ok((0..n).map(|_| UserId(b.get_u64())).collect())
}

/// Decodes a payload into (receiving worker, message).
pub fn decode(mut b: Bytes) -> Result<(u16, PeerMsg), PeerError> {
    need(&b, 7)?;
    let worker = b.get_u16();
    let kind = b.get_u8();
    let n = b.get_u32() as usize;
    let msg = match kind {
        1 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 15)?;
                let recipient = UserId(b.get_u64());
                let shard = ShardId(b.get_u16());
                let replay = b.get_u8() != 0;
                let len = b.get_u32() as usize;
                need(&b, len)?;
                let msg = Message::decode(b.split_to(len)).map_err(|_| PeerError("message"))?;
                v.push(AppendReq {
                    recipient,
                    shard,
                    msg,
                    replay,
                });
            }
            PeerMsg::Append(v)
        }
        2 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 18)?;
                v.push((
                    ShardId(b.get_u16()),
                    MsgId(b.get_u64()),
                    UserId(b.get_u64()),
                ));
            }
            PeerMsg::AppendDone(v)
        }
        3 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 24)?;
                v.push(DeliveredNote {
                    sender: UserId(b.get_u64()),
                    msg_id: MsgId(b.get_u64()),
                    recipient: UserId(b.get_u64()),
                });
            }
            PeerMsg::Delivered(v)
        }
        4 => PeerMsg::Group(decode_group(&mut b)?),
        5 => {
            need(&b, 12)?;
            PeerMsg::OrgPull {
                reply_to: b.get_u32(),
                since: b.get_u64(),
            }
        }
        6 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 4)?;
                let len = b.get_u32() as usize;
                need(&b, len)?;
                let r = OrgRecord::decode(b.split_to(len)).map_err(|_| PeerError("org record"))?;
                v.push(r);
            }
            PeerMsg::OrgRecords(v)
        }
        7 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 18)?;
                let from = UserId(b.get_u64());
                let conv = b.get_u8();
                let peer = b.get_u64();
                let state = b.get_u8();
                v.push(TypingNote {
                    to: get_uids(&mut b)?,
                    from,
                    conv,
                    peer,
                    state,
                });
            }
            PeerMsg::Typing(v)
        }
        8 => {
            need(&b, 4)?;
            let watcher = b.get_u32();
            let on = get_uids(&mut b)?;
            let off = get_uids(&mut b)?;
            PeerMsg::Watch(WatchReq { watcher, on, off })
        }
        9 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 17)?;
                v.push(PresenceEntry {
                    uid: UserId(b.get_u64()),
                    online: b.get_u8() != 0,
                    last_seen_ms: b.get_u64(),
                });
            }
            PeerMsg::Presence(v)
        }
        10 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 12)?;
                let g = GroupId(b.get_u64());
                let len = b.get_u32() as usize;
                need(&b, len)?;
                let msg = Message::decode(b.split_to(len)).map_err(|_| PeerError("message"))?;
                v.push((g, msg));
            }
            PeerMsg::GroupLive(v)
        }
        _ => return Err(PeerError(UNKNOWN_KIND)),
    };
    Ok((worker, msg))
}

fn need(b: &Bytes, n: usize) -> Result<(), PeerError> {
    if b.remaining() < n {
        Err(PeerError("truncated"))
    } else {
        Ok(())
    }
}

fn encode_group(call: &GroupCall, b: &mut BytesMut) {
    b.put_u64(call.group.0);
    b.put_u64(call.actor.0);
    b.put_u64(call.conn.0);
    b.put_u32(call.req_id);
    let put_str = |b: &mut BytesMut, s: &str| {
        b.put_u16(s.len() as u16);
        b.put_slice(s.as_bytes());
    };
    let put_uids = |b: &mut BytesMut, v: &[UserId]| {
        b.put_u16(v.len() as u16);
        for u in v {
            b.put_u64(u.0);
        }
    };
    match &call.op {
        GroupOp::Create { name, members } => {
            b.put_u8(1);
            put_str(b, name);
            put_uids(b, members);
        }
        GroupOp::Add(v) => {
            b.put_u8(2);
            put_uids(b, v);
        }
        GroupOp::Remove(v) => {
            b.put_u8(3);
            put_uids(b, v);
        }
        GroupOp::Leave => b.put_u8(4),
        GroupOp::Update { name, announcement } => {
            b.put_u8(5);
            put_str(b, name);
            put_str(b, announcement);
        }
        GroupOp::Info => b.put_u8(6),
        GroupOp::Post {
            client_msg_id,
            conv,
            body,
            mentions,
        } => {
            b.put_u8(7);
            b.put_u64(*client_msg_id);
            b.put_u8(*conv);
            b.put_u32(body.len() as u32);
            b.put_slice(body);
            if !mentions.is_empty() {
                put_uids(b, mentions);
            }
        }
        GroupOp::FileUrl { sha256, mime } => {
            b.put_u8(8);
            b.put_slice(sha256);
            put_str(b, mime);
        }
        GroupOp::Typing { state } => {
            b.put_u8(9);
            b.put_u8(*state);
        }
        GroupOp::Sync { after, limit } => {
            b.put_u8(10);
            b.put_u64(after.0);
            b.put_u16(*limit);
        }
        GroupOp::Members { after, limit } => {
            b.put_u8(11);
            b.put_u64(after.0);
            b.put_u16(*limit);
        }
        GroupOp::Head { read } => {
            b.put_u8(12);
            b.put_u64(read.0);
        }
        GroupOp::Posting { owner_only } => {
            b.put_u8(13);
            b.put_u8(*owner_only as u8);
        }
        GroupOp::Role { uid, role } => {
            b.put_u8(14);
            b.put_u64(uid.0);
            b.put_u8(*role);
        }
        GroupOp::Unsupported(k) => b.put_u8(*k),
        GroupOp::Heads { heads } => {
            b.put_u8(15);
            b.put_u32(heads.len() as u32);
            for (g, read) in heads {
                b.put_u64(g.0);
                b.put_u64(read.0);
            }
        }
        GroupOp::PostFile { seq } => {
            b.put_u8(16);
            b.put_u64(seq.0);
        }
        GroupOp::MentionFile {
            msg_id,
            time_ms,
            sha256,
            mime,
        } => {
            b.put_u8(17);
            b.put_u64(msg_id.0);
            b.put_u64(*time_ms);
            b.put_slice(sha256);
            put_str(b, mime);
        }
    }
}

fn decode_group(b: &mut Bytes) -> Result<GroupCall, PeerError> {
    fn string(b: &mut Bytes) -> Result<String, PeerError> {
        need(b, 2)?;
        let n = b.get_u16() as usize;
        need(b, n)?;
        String::from_utf8(b.split_to(n).to_vec()).map_err(|_| PeerError("group request string"))
    }
    fn uids(b: &mut Bytes) -> Result<Vec<UserId>, PeerError> {
        need(b, 2)?;
        let n = b.get_u16() as usize;
        need(b, n * 8)?;
        Ok((0..n).map(|_| UserId(b.get_u64())).collect())
    }
    need(b, 8 + 8 + 8 + 4 + 1)?;
    let group = GroupId(b.get_u64());
    let actor = UserId(b.get_u64());
    let conn = ConnId(b.get_u64());
    let req_id = b.get_u32();
    let op = match b.get_u8() {
        1 => GroupOp::Create {
            name: string(b)?,
            members: uids(b)?,
        },
        2 => GroupOp::Add(uids(b)?),
        3 => GroupOp::Remove(uids(b)?),
        4 => GroupOp::Leave,
        5 => GroupOp::Update {
            name: string(b)?,
            announcement: string(b)?,
        },
        6 => GroupOp::Info,
        7 => {
            need(b, 8 + 1 + 4)?;
            let client_msg_id = b.get_u64();
            let conv = b.get_u8();
            let n = b.get_u32() as usize;
            need(b, n)?;
            let body = b.split_to(n);
            // Mentions are a trailing field (absent from older senders and when empty).
            let mentions = if b.remaining() >= 2 {
                uids(b)?
            } else {
                Vec::new()
            };
            GroupOp::Post {
                client_msg_id,
                conv,
                body,
                mentions,
            }
        }
        8 => {
            need(b, 32)?;
            let mut sha256 = [0u8; 32];
            b.copy_to_slice(&mut sha256);
            GroupOp::FileUrl {
                sha256,
                mime: string(b)?,
            }
        }
        9 => {
            need(b, 1)?;
            GroupOp::Typing { state: b.get_u8() }
        }
        10 => {
            need(b, 10)?;
            GroupOp::Sync {
                after: Seq(b.get_u64()),
                limit: b.get_u16(),
            }
        }
        11 => {
            need(b, 10)?;
            GroupOp::Members {
                after: UserId(b.get_u64()),
                limit: b.get_u16(),
            }
        }
        12 => {
            need(b, 8)?;
            GroupOp::Head {
                read: Seq(b.get_u64()),
            }
        }
        13 => {
            need(b, 1)?;
            GroupOp::Posting {
                owner_only: b.get_u8() != 0,
            }
        }
        14 => {
            need(b, 9)?;
            GroupOp::Role {
                uid: UserId(b.get_u64()),
                role: b.get_u8(),
            }
        }
        15 => {
            need(b, 4)?;
            let n = b.get_u32() as usize;
            need(b, n.saturating_mul(16))?;
            GroupOp::Heads {
                heads: (0..n)
                    .map(|_| (GroupId(b.get_u64()), Seq(b.get_u64())))
                    .collect(),
            }
        }
        16 => {
            need(b, 8)?;
            GroupOp::PostFile {
                seq: Seq(b.get_u64()),
            }
        }
        17 => {
            need(b, 8 + 8 + 32)?;
            let msg_id = MsgId(b.get_u64());
            let time_ms = b.get_u64();
            let mut sha256 = [0u8; 32];
            b.copy_to_slice(&mut sha256);
            GroupOp::MentionFile {
                msg_id,
                time_ms,
                sha256,
                mime: string(b)?,
            }
        }
        k => {
            b.advance(b.remaining());
            GroupOp::Unsupported(k)
        }
    };
    Ok(GroupCall {
        group,
        actor,
        conn,
        req_id,
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            seq: Seq(3),
            prev_seq: Seq(2),
            msg_id: MsgId(9),
            conv: 1,
            from: UserId(1),
            to: UserId(2),
            client_msg_id: 7,
            server_time_ms: 5,
            body: Bytes::from_static(b"hi"),
        }
    }

    fn every_kind() -> Vec<PeerMsg> {
        let call = |op| {
            PeerMsg::Group(GroupCall {
                group: GroupId(77),
                actor: UserId(5),
                conn: ConnId(0x0001_0000_0000_0009),
                req_id: 42,
                op,
            })
        };
        vec![
            PeerMsg::Append(vec![AppendReq {
                recipient: UserId(2),
                shard: ShardId(4),
                msg: msg(),
                replay: true,
            }]),
            PeerMsg::AppendDone(vec![(ShardId(1), MsgId(2), UserId(3))]),
            PeerMsg::Delivered(vec![DeliveredNote {
                sender: UserId(1),
                msg_id: MsgId(2),
                recipient: UserId(3),
            }]),
            call(GroupOp::Create {
                name: "team ☕".into(),
                members: vec![UserId(1), UserId(2)],
            }),
            call(GroupOp::Add(vec![UserId(8)])),
            call(GroupOp::Remove(vec![UserId(8), UserId(9)])),
            call(GroupOp::Leave),
            call(GroupOp::Update {
                name: "n".into(),
                announcement: "a".into(),
            }),
            call(GroupOp::Info),
            call(GroupOp::Post {
                client_msg_id: 11,
                conv: 2,
                body: Bytes::from_static(b"post"),
                mentions: Vec::new(),
            }),
            call(GroupOp::Post {
                client_msg_id: 12,
                conv: 2,
                body: Bytes::from_static(b"@3"),
                mentions: vec![UserId(3), UserId(0)],
            }),
            call(GroupOp::FileUrl {
                sha256: [0xAB; 32],
                mime: "image/jpeg".into(),
            }),
            call(GroupOp::Typing { state: 1 }),
            call(GroupOp::Sync {
                after: Seq(5),
                limit: 100,
            }),
            call(GroupOp::Members {
                after: UserId(u64::MAX - 1),
                limit: 0,
            }),
            PeerMsg::GroupLive(vec![(GroupId(9), msg()), (GroupId(u64::MAX), msg())]),
            call(GroupOp::Head { read: Seq(7) }),
            call(GroupOp::Posting { owner_only: true }),
            call(GroupOp::Role {
                uid: UserId(u64::MAX),
                role: 1,
            }),
            call(GroupOp::Heads {
                heads: vec![(GroupId(9), Seq(3)), (GroupId(u64::MAX), Seq(0))],
            }),
            call(GroupOp::Heads { heads: vec![] }),
            call(GroupOp::PostFile { seq: Seq(u64::MAX) }),
            call(GroupOp::MentionFile {
                msg_id: MsgId(u64::MAX),
                time_ms: 1_700_000_000_000,
                sha256: [0xCD; 32],
                mime: "image/png".into(),
            }),
            PeerMsg::OrgPull {
                reply_to: 7,
                since: 1 << 40,
            },
            PeerMsg::OrgRecords(vec![crate::org::OrgRecord {
                version: 3,
                deleted: true,
                entity: crate::org::OrgEntity::Person(crate::org::OrgPerson {
                    uid: 9,
                    name: "名".into(),
                }),
            }]),
            PeerMsg::Typing(vec![TypingNote {
                to: vec![UserId(3), UserId(4)],
                from: UserId(5),
                conv: 2,
                peer: 77,
                state: 1,
            }]),
            PeerMsg::Watch(WatchReq {
                watcher: 3,
                on: vec![UserId(1)],
                off: vec![UserId(2), UserId(6)],
            }),
            PeerMsg::Presence(vec![PresenceEntry {
                uid: UserId(1),
                online: false,
                last_seen_ms: 1_700_000_000_000,
            }]),
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for (i, m) in every_kind().into_iter().enumerate() {
            let (w, back) = decode(encode(i as u16, m.as_ref())).unwrap();
            assert_eq!((w, &back), (i as u16, &m));
        }
    }

    #[test]
    fn every_truncation_is_refused_and_unknown_kinds_are_told_apart() {
        for m in every_kind() {
            let enc = encode(0, m.as_ref());
            // A post is complete before its optional mentions (one stray byte reads as none).
            let optional = match &m {
                PeerMsg::Group(GroupCall {
                    op: GroupOp::Post { mentions, .. },
                    ..
                }) if !mentions.is_empty() => Some(enc.len() - (2 + 8 * mentions.len())),
                _ => None,
            };
            for cut in 0..enc.len() {
                if optional.is_some_and(|at| cut == at || cut == at + 1) {
                    continue;
                }
                let e = decode(enc.slice(..cut)).expect_err(&format!("{m:?} cut at {cut}"));
                assert!(!e.is_unknown_kind(), "{m:?} cut at {cut}: {e}");
            }
        }
        let unknown = decode(Bytes::from_static(&[0, 0, 99, 0, 0, 0, 0])).unwrap_err();
        assert!(unknown.is_unknown_kind());
        // A newer node's group operation: decoded as such (with its own bytes skipped), so the
        // group's owner can refuse it and the link stays.
        let info = encode(0, every_kind()[8].as_ref()).to_vec();
        let PeerMsg::Group(GroupCall {
            op: GroupOp::Info, ..
        }) = decode(Bytes::from(info.clone())).unwrap().1
        else {
            panic!("every_kind()[8] is no longer an Info");
        };
        let mut newer = info;
        *newer.last_mut().unwrap() = 99;
        newer.extend_from_slice(&[1, 2, 3]);
        let (_, m) = decode(Bytes::from(newer)).unwrap();
        assert!(
            matches!(
                m,
                PeerMsg::Group(GroupCall {
                    op: GroupOp::Unsupported(99),
                    ..
                })
            ),
            "{m:?}"
        );
    }

    #[test]
    fn the_append_done_layout_is_the_documented_one() {
        let enc = encode(
            3,
            PeerMsgRef::AppendDone(&[(ShardId(0x0102), MsgId(7), UserId(9))]),
        );
        let want: &[u8] = &[
            0, 3, 2, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9,
        ];
        assert_eq!(&enc[..], want);
    }
}
