//! Groups (c2g) with write diffusion. A group is owned by the worker that owns
//! `vshard_of(UserId(group))`: that worker holds its members, checks rights, gives the group's
//! messages one order, and fans every message out to each member's timeline through the outbox
//! (so a crash between the ack and the appends loses nothing). Requests reach the owner as
//! [`WorkerMsg::Group`], from the requesting user's worker (any node) or from the HTTP API.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use im_shared::peer::{GroupCall, GroupOp};
use im_shared::proto::{
    GroupDesc, GroupEvent, GroupEventKind, Message, CONV_GROUP_EVENT, MAX_ANNOUNCEMENT_LEN,
    MAX_NAME_LEN, ROLE_ADMIN, ROLE_MEMBER, ROLE_OWNER,
};
use im_shared::shard::vshard_of;
use im_shared::{Command, ErrorCode, GroupId, UserId};

use super::{ack_frame, error_frame, op_err, op_ok, ApiOk, Reply, Round, Worker, WorkerMsg};
use crate::api::{Accepted, ApiError};
use crate::metrics::Metrics;
use crate::store::{DedupEntry, MemberRecord, Op, Store, StoreError};

/// A post, for [`Worker::refuse`] (which answers by the kind of request only).
const POST: GroupOp = GroupOp::Post {
    client_msg_id: 0,
    conv: 0,
    body: Bytes::new(),
    mentions: Vec::new(),
};

/// Client message ids remembered per group for dedup before the store is asked.
const GROUP_DEDUP_WINDOW: usize = 1024;

/// A request for the owner of `group`.
pub struct GroupReq {
    pub group: GroupId,
    /// The user asking (the poster, the member leaving, …); 0 for the API.
    pub actor: UserId,
    /// Administrative (HTTP API): no membership or owner checks.
    pub admin: bool,
    pub reply: Reply,
    pub op: GroupOp,
}

impl GroupReq {
    /// The peer-link form of a client's request (`None` for an API request, which never crosses
    /// nodes: its reply is a channel of this process).
    pub(crate) fn to_call(&self) -> Option<GroupCall> {
        let Reply::Conn { conn, req_id } = self.reply else {
            return None;
        };
        Some(GroupCall {
            group: self.group,
            actor: self.actor,
            conn,
            req_id,
            op: self.op.clone(),
        })
    }

    /// A client's request that came over a peer link.
    pub(crate) fn from_call(c: GroupCall) -> GroupReq {
        GroupReq {
            group: c.group,
            actor: c.actor,
            admin: false,
            reply: Reply::Conn {
                conn: c.conn,
                req_id: c.req_id,
            },
            op: c.op,
        }
    }
}

/// The group and operation of a client's group-management command (`None` for other commands).
pub(super) fn group_op(cmd: Command) -> Option<(GroupId, GroupOp)> {
    Some(match cmd {
        Command::GroupAdd { group, members } => (group, GroupOp::Add(members)),
        Command::GroupRemove { group, members } => (group, GroupOp::Remove(members)),
        Command::GroupLeave { group } => (group, GroupOp::Leave),
        Command::GroupUpdate {
            group,
            name,
            announcement,
        } => (group, GroupOp::Update { name, announcement }),
        Command::GroupInfo { group } => (group, GroupOp::Info),
        Command::GroupPosting { group, owner_only } => (group, GroupOp::Posting { owner_only }),
        Command::GroupRole { group, uid, role } => (group, GroupOp::Role { uid, role }),
        _ => return None,
    })
}

/// Live state of a group on its owner.
pub(super) struct GroupState {
    /// Second of the last use (LRU stamp for `trim_caches`).
    pub(super) touched: u32,
    pub(super) desc: GroupDesc,
    pub(super) members: BTreeMap<UserId, u8>,
    /// `Some` for a large group (read diffusion, `worker/large.rs`).
    pub(super) large: Option<super::large::Large>,
    /// Only the owner posts (a broadcast channel; `GroupPosting`).
    owner_posts: bool,
    dedup: HashMap<(UserId, u64), DedupEntry>,
    dedup_order: VecDeque<(UserId, u64)>,
}

pub(super) fn unavailable(e: &StoreError) -> ApiError {
    tracing::warn!("group store access: {e}");
    ApiError::new(ErrorCode::Unavailable, "store unavailable, retry")
}

/// Distinct, non-zero ids.
fn clean(mut v: Vec<UserId>) -> Vec<UserId> {
    v.retain(|u| u.0 != 0);
    v.sort_unstable();
    v.dedup();
    v
}

impl<S: Store> Worker<S> {
    /// Sends a group request to the group's owner (possibly on another node).
    pub(super) fn forward_group(
        &mut self,
        actor: UserId,
        group: GroupId,
        op: GroupOp,
        reply: Reply,
        round: &mut Round,
    ) {
        self.forward_group_req(
            GroupReq {
                group,
                actor,
                admin: false,
                reply,
                op,
            },
            round,
        );
    }

    pub(super) fn forward_group_req(&mut self, req: GroupReq, round: &mut Round) {
        if req.group.0 == 0 {
            let e = ApiError::new(ErrorCode::InvalidArgument, "group must not be 0");
            return self.refuse(req.reply, &req.op, e, round);
        }
        let owner = self.router.owner(UserId(req.group.0));
        if matches!(req.reply, Reply::Api(_)) && self.router.node_of(owner) != self.router.node {
            let e = ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "group {} is owned by logic node {}: call that node's API",
                    req.group,
                    self.router.node_of(owner)
                ),
            );
            return self.refuse(req.reply, &req.op, e, round);
        }
        // A request for a node whose link is down would be dropped unanswered: say so now, so
        // the client retries (PROTOCOL.md: `Unavailable` is retryable) instead of waiting out
        // its own timeout.
        let node = self.router.node_of(owner);
        if node != self.router.node && self.router.peers().is_some_and(|p| !p.is_up(node)) {
            let e = ApiError::new(
                ErrorCode::Unavailable,
                format!("the group's logic node {node} is unreachable; retry"),
            );
            return self.refuse(req.reply, &req.op, e, round);
        }
        self.router.send(self.idx, owner, WorkerMsg::Group(req));
    }

    /// Answers a refused request: `Error` for a post (like a refused c2c send), `OpResult` for
    /// management commands.
    pub(super) fn refuse(&mut self, reply: Reply, op: &GroupOp, e: ApiError, round: &mut Round) {
        if matches!(op, GroupOp::Head { .. } | GroupOp::Heads { .. }) {
            // A login's head request: no request of the client's to answer.
            return;
        }
        let frame = |req_id: u32| match op {
            GroupOp::Post { .. }
            | GroupOp::FileUrl { .. }
            | GroupOp::PostFile { .. }
            | GroupOp::MentionFile { .. }
            | GroupOp::Typing { .. } => error_frame(e.code, req_id, &e.message),
            _ => op_err(req_id, &e),
        };
        match reply {
            Reply::Conn { conn, req_id } => round.send(conn, frame(req_id)),
            Reply::Api(tx) => round.api.push((tx, Err(e))),
        }
    }

    /// A user (or the API) creates a group: allocate its id here, let its owner create it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_group_create(
        &mut self,
        actor: UserId,
        name: String,
        members: Vec<UserId>,
        client_id: u64,
        reply: Reply,
        round: &mut Round,
    ) {
        let op = GroupOp::Create { name, members };
        let GroupOp::Create { name, members } = &op else {
            unreachable!()
        };
        if name.len() > MAX_NAME_LEN {
            let e = ApiError::new(ErrorCode::InvalidArgument, "group name too long");
            return self.refuse(reply, &op, e, round);
        }
        let distinct = {
            let mut m = clean(members.clone());
            m.retain(|u| *u != actor);
            m.len()
        };
        if actor.0 == 0 {
            let e = ApiError::new(ErrorCode::InvalidArgument, "the owner must not be 0");
            return self.refuse(reply, &op, e, round);
        }
        let most = self
            .cfg
            .large_group_threshold
            .min(self.cfg.max_group_members)
            .max(1);
        if distinct + 1 > most {
            let e = ApiError::new(
                ErrorCode::GroupFull,
                format!("a group is created with at most {most} members (add more later)"),
            );
            return self.refuse(reply, &op, e, round);
        }
        // An API call must land on a group of this node (it cannot wait for another node's
        // answer): draw ids until one is owned here; about `nodes` draws on average. With a
        // client id the draws are derived from it, so a retry finds the same group.
        let api = matches!(reply, Reply::Api(_));
        let mut attempt = 0u32;
        let group = loop {
            let g = if client_id == 0 {
                GroupId(self.ids.next(self.now).0)
            } else {
                attempt += 1;
                derived_group_id(actor, client_id, attempt - 1)
            };
            if !api || self.router.node_of(self.router.owner(UserId(g.0))) == self.router.node {
                break g;
            }
        };
        self.forward_group(actor, group, op, reply, round);
    }

    pub(super) async fn load_group(&mut self, g: GroupId) -> Result<bool, StoreError> {
        let touched = self.now_secs();
        if let Some(s) = self.groups.get_mut(&g) {
            s.touched = touched;
            return Ok(true);
        }
        let Some(desc) = self.store.group(g).await? else {
            return Ok(false);
        };
        let members = self.store.members(g).await?;
        // A large group's timeline starts with the switch's marker: a head means large.
        let head = self.store.group_head(g).await?.0;
        let owner_posts = self
            .store
            .user_flags(UserId(g.0))
            .await?
            .contains(&im_store::FLAG_GROUP_OWNER_POSTS);
        self.groups.insert(
            g,
            GroupState {
                touched,
                desc,
                members: members.into_iter().map(|m| (m.uid, m.role)).collect(),
                large: (head > 0).then(|| super::large::Large::at(head)),
                owner_posts,
                dedup: HashMap::new(),
                dedup_order: VecDeque::new(),
            },
        );
        Ok(true)
    }

    /// A group event message (membership or info change) to `recipients`.
    pub(super) fn group_event(
        &mut self,
        group: GroupId,
        actor: UserId,
        kind: GroupEventKind,
        users: Vec<UserId>,
        recipients: Vec<UserId>,
        round: &mut Round,
    ) {
        let msg = self.event_msg(group, actor, kind, users);
        self.fan_out(vshard_of(UserId(group.0)), &msg, recipients, round);
    }

    /// A new group event message of `actor` about `users` (counted as accepted).
    pub(super) fn event_msg(
        &mut self,
        group: GroupId,
        actor: UserId,
        kind: GroupEventKind,
        users: Vec<UserId>,
    ) -> Message {
        let now = self.now;
        self.metrics.accepted(CONV_GROUP_EVENT);
        Message {
            seq: im_shared::Seq(0),
            prev_seq: im_shared::Seq(0),
            msg_id: self.ids.next(now),
            conv: CONV_GROUP_EVENT,
            from: actor,
            to: UserId(group.0),
            client_msg_id: 0,
            server_time_ms: now,
            body: GroupEvent { kind, users }.to_bytes(),
        }
    }

    pub(super) async fn on_group(&mut self, req: GroupReq, round: &mut Round) {
        let GroupReq {
            group,
            actor,
            admin,
            reply,
            op,
        } = req;
        if let GroupOp::Heads { heads } = op {
            return self.large_heads(actor, heads, reply, round).await;
        }
        if let GroupOp::Unsupported(kind) = op {
            // A newer node's operation, in a rolling upgrade: its client gets a clear refusal.
            let e = ApiError::new(
                ErrorCode::UnknownCommand,
                format!("group operation {kind} is not supported by the group's logic node yet"),
            );
            return self.refuse(reply, &op, e, round);
        }
        if let GroupOp::Create { name, members } = op {
            // A retried create (same derived id) finds the group in memory or in the store.
            return match self.load_group(group).await {
                Ok(false) => self.create(group, actor, name, members, reply, round),
                Ok(true) if self.groups[&group].desc.creator == actor => {
                    round.reply(reply, ApiOk::Group(group), |r| op_ok(r, group.0))
                }
                Ok(true) => {
                    let e = ApiError::new(ErrorCode::InvalidArgument, "group id already in use");
                    let op = GroupOp::Create { name, members };
                    self.refuse(reply, &op, e, round)
                }
                Err(e) => {
                    let op = GroupOp::Create { name, members };
                    self.refuse(reply, &op, unavailable(&e), round)
                }
            };
        }
        match self.load_group(group).await {
            Ok(true) => {}
            Ok(false) => {
                let e = ApiError::new(ErrorCode::NotFound, format!("no group {group}"));
                return self.refuse(reply, &op, e, round);
            }
            Err(e) => return self.refuse(reply, &op, unavailable(&e), round),
        }
        let (owner, is_member, is_admin) = {
            let g = &self.groups[&group];
            let role = g.members.get(&actor).copied();
            (g.desc.owner, role.is_some(), role == Some(ROLE_ADMIN))
        };
        if let GroupOp::Head { read } = op {
            // A push that nobody asked for by a request: nothing on a refusal.
            if is_member {
                self.large_head(group, read, reply, round);
            }
            return;
        }
        let not_member = ApiError::new(ErrorCode::NotMember, format!("not a member of {group}"));
        let needs_owner = matches!(
            op,
            GroupOp::Add(_) | GroupOp::Remove(_) | GroupOp::Update { .. } | GroupOp::Posting { .. }
        );
        // The owner's admins manage members and settings too; roles are the owner's alone.
        if !admin && needs_owner && actor != owner && !is_admin {
            let e = ApiError::new(
                ErrorCode::Forbidden,
                "only the group owner or an admin may do this",
            );
            return self.refuse(reply, &op, e, round);
        }
        if !admin && matches!(op, GroupOp::Role { .. }) && actor != owner {
            let e = ApiError::new(ErrorCode::Forbidden, "only the group owner sets roles");
            return self.refuse(reply, &op, e, round);
        }
        let needs_member = matches!(
            op,
            GroupOp::Post { .. }
                | GroupOp::Info
                | GroupOp::Leave
                | GroupOp::FileUrl { .. }
                | GroupOp::PostFile { .. }
                | GroupOp::MentionFile { .. }
                | GroupOp::Typing { .. }
                | GroupOp::Sync { .. }
                | GroupOp::Members { .. }
        );
        if needs_member && !admin && !is_member {
            return self.refuse(reply, &op, not_member, round);
        }
        match op {
            GroupOp::Create { .. } => unreachable!("handled above"),
            GroupOp::Post {
                client_msg_id,
                conv,
                body,
                mentions,
            } => {
                let manager = admin || actor == owner || is_admin;
                if self.groups[&group].large.is_some() && mentions.contains(&UserId(0)) && !manager
                {
                    let e = ApiError::new(
                        ErrorCode::Forbidden,
                        "only the owner and admins may mention @all (uid 0) in a large group",
                    );
                    return self.refuse(reply, &POST, e, round);
                }
                if self.groups[&group].owner_posts && !manager {
                    let e = ApiError::new(
                        ErrorCode::Forbidden,
                        "only the owner and admins post in this group",
                    );
                    return self.refuse(reply, &POST, e, round);
                }
                // A business push to a group arrives here without the sender worker's check.
                if let Err((code, why)) = self.check_body(&body) {
                    return self.refuse(reply, &POST, ApiError::new(code, why), round);
                }
                self.post(
                    group,
                    actor,
                    client_msg_id,
                    conv,
                    body,
                    mentions,
                    reply,
                    round,
                )
                .await
            }
            GroupOp::Add(new) => self.add(group, actor, new, reply, round),
            GroupOp::Remove(gone) => {
                if gone.contains(&owner) {
                    let e = ApiError::new(ErrorCode::Forbidden, "the owner cannot be removed");
                    return self.refuse(reply, &GroupOp::Info, e, round);
                }
                let members = &self.groups[&group].members;
                if !admin
                    && actor != owner
                    && gone.iter().any(|u| members.get(u) == Some(&ROLE_ADMIN))
                {
                    let e = ApiError::new(ErrorCode::Forbidden, "only the owner removes an admin");
                    return self.refuse(reply, &GroupOp::Info, e, round);
                }
                self.remove(
                    group,
                    actor,
                    gone,
                    GroupEventKind::MembersRemoved,
                    reply,
                    round,
                )
            }
            GroupOp::Leave => {
                if actor == owner {
                    let e = ApiError::new(ErrorCode::Forbidden, "the owner cannot leave");
                    return self.refuse(reply, &GroupOp::Info, e, round);
                }
                self.remove(
                    group,
                    actor,
                    vec![actor],
                    GroupEventKind::MemberLeft,
                    reply,
                    round,
                )
            }
            GroupOp::Update { name, announcement } => {
                if name.len() > MAX_NAME_LEN || announcement.len() > MAX_ANNOUNCEMENT_LEN {
                    let e =
                        ApiError::new(ErrorCode::InvalidArgument, "name or announcement too long");
                    return self.refuse(reply, &GroupOp::Info, e, round);
                }
                let g = self.groups.get_mut(&group).expect("loaded");
                g.desc.name = name;
                g.desc.announcement = announcement;
                round.batch.push(Op::GroupPut(g.desc.clone()));
                self.announce_update(group, actor, round);
                round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
            }
            GroupOp::Info => {
                let g = &self.groups[&group];
                let desc = g.desc.clone();
                // A large group's list is paged (`GroupMembers`): the first page only.
                let most = if g.large.is_some() {
                    super::large::MEMBERS_PAGE
                } else {
                    usize::MAX
                };
                let members: Vec<(UserId, u8)> =
                    g.members.iter().take(most).map(|(u, r)| (*u, *r)).collect();
                let (d, m) = (desc.clone(), members.clone());
                round.reply(reply, ApiOk::Info(desc, members), move |r| {
                    Command::GroupInfoReply {
                        group: d,
                        members: m,
                    }
                    .to_bytes(r)
                });
            }
            GroupOp::FileUrl { sha256, mime } => match (reply, self.cfg.files.clone()) {
                (Reply::Conn { conn, req_id }, Some(p)) => round.send(
                    conn,
                    super::files::file_url(&p, self.now, actor, &sha256, &mime, req_id),
                ),
                (reply, _) => {
                    let e = ApiError::new(
                        ErrorCode::Unavailable,
                        "the file service is not configured on this server",
                    );
                    self.refuse(reply, &GroupOp::FileUrl { sha256, mime }, e, round)
                }
            },
            GroupOp::Typing { state } => self.group_typing(group, actor, state, reply, round),
            GroupOp::Sync { after, limit } => {
                self.large_sync(group, after, limit, reply, round).await
            }
            GroupOp::PostFile { seq } => self.large_file_url(group, actor, seq, reply, round).await,
            op @ GroupOp::MentionFile { .. } => {
                self.mention_file_url(group, actor, op, reply, round).await
            }
            GroupOp::Members { after, limit } => {
                self.members_page(group, after, limit, reply, round)
            }
            GroupOp::Head { .. } | GroupOp::Heads { .. } | GroupOp::Unsupported(_) => {
                unreachable!("handled above")
            }
            GroupOp::Role { uid, role } => self.set_role(group, actor, uid, role, reply, round),
            GroupOp::Posting { owner_only } => {
                let g = self.groups.get_mut(&group).expect("loaded");
                if g.owner_posts != owner_only {
                    g.owner_posts = owner_only;
                    round.batch.push(Op::UserFlag {
                        uid: UserId(group.0),
                        flag: im_store::FLAG_GROUP_OWNER_POSTS,
                        on: owner_only,
                    });
                    self.announce_update(group, actor, round);
                }
                round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
            }
        }
    }

    fn create(
        &mut self,
        group: GroupId,
        actor: UserId,
        name: String,
        members: Vec<UserId>,
        reply: Reply,
        round: &mut Round,
    ) {
        let now = self.now;
        let desc = GroupDesc {
            group,
            name,
            creator: actor,
            owner: actor,
            announcement: String::new(),
            created_ms: now,
        };
        let mut all = clean(members);
        all.retain(|u| *u != actor);
        let mut map = BTreeMap::new();
        map.insert(actor, ROLE_OWNER);
        for u in &all {
            map.insert(*u, ROLE_MEMBER);
        }
        round.batch.push(Op::GroupPut(desc.clone()));
        for (u, role) in &map {
            round.batch.push(Op::MemberPut {
                group,
                member: MemberRecord {
                    uid: *u,
                    role: *role,
                    joined_ms: now,
                },
            });
        }
        let everyone: Vec<UserId> = map.keys().copied().collect();
        self.groups.insert(
            group,
            GroupState {
                touched: self.now_secs(),
                desc,
                members: map,
                large: None,
                owner_posts: false,
                dedup: HashMap::new(),
                dedup_order: VecDeque::new(),
            },
        );
        Metrics::inc(&self.metrics.groups_created);
        self.group_event(
            group,
            actor,
            GroupEventKind::Created,
            everyone.clone(),
            everyone,
            round,
        );
        round.reply(reply, ApiOk::Group(group), |r| op_ok(r, group.0));
    }

    fn add(
        &mut self,
        group: GroupId,
        actor: UserId,
        new: Vec<UserId>,
        reply: Reply,
        round: &mut Round,
    ) {
        let g = self.groups.get_mut(&group).expect("loaded");
        let new: Vec<UserId> = clean(new)
            .into_iter()
            .filter(|u| !g.members.contains_key(u))
            .collect();
        let max = self.cfg.max_group_members;
        if g.members.len() + new.len() > max {
            let e = ApiError::new(
                ErrorCode::GroupFull,
                format!("a group has at most {max} members"),
            );
            return self.refuse(reply, &GroupOp::Info, e, round);
        }
        let large = g.large.is_some();
        if !new.is_empty()
            && (large || g.members.len() + new.len() > self.cfg.large_group_threshold)
        {
            if !large {
                self.make_large(group, actor, round);
            }
            self.large_add(group, actor, new, round);
            return round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
        }
        let g = self.groups.get_mut(&group).expect("loaded");
        let now = self.now;
        for u in &new {
            g.members.insert(*u, ROLE_MEMBER);
            round.batch.push(Op::MemberPut {
                group,
                member: MemberRecord {
                    uid: *u,
                    role: ROLE_MEMBER,
                    joined_ms: now,
                },
            });
        }
        if !new.is_empty() {
            let all = g.members.keys().copied().collect();
            self.group_event(group, actor, GroupEventKind::MembersAdded, new, all, round);
        }
        round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
    }

    /// Removes members; the event reaches the remaining members and those who left.
    fn remove(
        &mut self,
        group: GroupId,
        actor: UserId,
        gone: Vec<UserId>,
        kind: GroupEventKind,
        reply: Reply,
        round: &mut Round,
    ) {
        let g = self.groups.get_mut(&group).expect("loaded");
        let gone: Vec<UserId> = clean(gone)
            .into_iter()
            .filter(|u| g.members.remove(u).is_some())
            .collect();
        for u in &gone {
            round.batch.push(Op::MemberDelete { group, uid: *u });
        }
        if !gone.is_empty() && g.large.is_some() {
            self.large_removed(group, actor, gone, kind, round);
        } else if !gone.is_empty() {
            let mut to: Vec<UserId> = g.members.keys().copied().collect();
            to.extend(&gone);
            self.group_event(group, actor, kind, gone, to, round);
        }
        round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
    }

    /// An `Updated` event: in a large group's timeline, else to every member.
    /// `GroupRole`: the owner makes member `uid` an admin or a plain member again; every member
    /// is told (a large group: one entry in the group's timeline).
    fn set_role(
        &mut self,
        group: GroupId,
        actor: UserId,
        uid: UserId,
        role: u8,
        reply: Reply,
        round: &mut Round,
    ) {
        let op = GroupOp::Role { uid, role };
        if role != ROLE_ADMIN && role != ROLE_MEMBER {
            let e = ApiError::new(
                ErrorCode::InvalidArgument,
                format!("role {role}: 0 (member) or 1 (admin)"),
            );
            return self.refuse(reply, &op, e, round);
        }
        let g = self.groups.get_mut(&group).expect("loaded");
        let Some(&was) = g.members.get(&uid) else {
            let e = ApiError::new(
                ErrorCode::NotMember,
                format!("{uid} is not a member of {group}"),
            );
            return self.refuse(reply, &op, e, round);
        };
        if was == ROLE_OWNER {
            let e = ApiError::new(ErrorCode::Forbidden, "the owner's role does not change");
            return self.refuse(reply, &op, e, round);
        }
        if was != role {
            g.members.insert(uid, role);
            round.batch.push(Op::MemberPut {
                group,
                member: MemberRecord {
                    uid,
                    role,
                    joined_ms: self.now,
                },
            });
            let kind = if role == ROLE_ADMIN {
                GroupEventKind::AdminAdded
            } else {
                GroupEventKind::AdminRemoved
            };
            if g.large.is_some() {
                self.large_event(group, actor, kind, vec![uid], round);
            } else {
                let all = g.members.keys().copied().collect();
                self.group_event(group, actor, kind, vec![uid], all, round);
            }
        }
        round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
    }

    fn announce_update(&mut self, group: GroupId, actor: UserId, round: &mut Round) {
        let g = &self.groups[&group];
        if g.large.is_some() {
            self.large_event(group, actor, GroupEventKind::Updated, Vec::new(), round);
        } else {
            let all = g.members.keys().copied().collect();
            self.group_event(
                group,
                actor,
                GroupEventKind::Updated,
                Vec::new(),
                all,
                round,
            );
        }
    }

    /// A message to every member, in the group's order.
    #[allow(clippy::too_many_arguments)]
    async fn post(
        &mut self,
        group: GroupId,
        actor: UserId,
        client_msg_id: u64,
        conv: u8,
        body: Bytes,
        mentions: Vec<UserId>,
        reply: Reply,
        round: &mut Round,
    ) {
        let ack = |e: DedupEntry, req_id: u32| ack_frame(client_msg_id, e, req_id);
        let accepted = |e: DedupEntry| {
            ApiOk::Accepted(Accepted {
                msg_id: e.msg_id,
                server_time_ms: e.server_time_ms,
            })
        };
        if client_msg_id != 0 {
            let cached = self.groups[&group]
                .dedup
                .get(&(actor, client_msg_id))
                .copied();
            let found = match cached {
                Some(e) => Some(e),
                None => match self.stored_dedup(actor, client_msg_id).await {
                    Ok(e) => e,
                    Err(e) => {
                        return self.refuse(reply, &POST, unavailable(&e), round);
                    }
                },
            };
            if let Some(e) = found {
                return round.reply(reply, accepted(e), |r| ack(e, r));
            }
        }
        let large = self.groups[&group].large.is_some();
        if large && conv == im_shared::proto::CONV_RECALL {
            // The recalling member's shard could not check: the post is in the group's timeline.
            if let Err(e) = self.large_recall_check(group, actor, &body).await {
                return self.refuse(reply, &POST, e, round);
            }
        }
        let all = large && mentions.contains(&UserId(0));
        if all {
            if let Some(e) = self.mention_all_refusal(group) {
                return self.refuse(reply, &POST, e, round);
            }
        }
        if !self.large_admit(group) {
            let rate = self.cfg.large_group_posts_per_sec;
            let e = ApiError::new(
                ErrorCode::Overloaded,
                format!("this group takes at most {rate} posts a second; retry later"),
            );
            return self.refuse(reply, &POST, e, round);
        }
        if large && conv == im_shared::proto::CONV_RECALL {
            // Accepted: the recalled post's file goes to nobody from now on (its marker is in
            // this round's batch; a worker whose commit fails halts and forgets this).
            if let Ok(r) = im_shared::proto::MarkerBody::decode(body.clone()) {
                self.large.recalls.insert((group, r.msg_id), true);
            }
        }
        let now = self.now;
        let msg = Message {
            seq: im_shared::Seq(0),
            prev_seq: im_shared::Seq(0),
            msg_id: self.ids.next(now),
            conv,
            from: actor,
            to: UserId(group.0),
            client_msg_id,
            server_time_ms: now,
            body,
        };
        let mut entry = DedupEntry {
            msg_id: msg.msg_id,
            seq: im_shared::Seq(0),
            prev_seq: im_shared::Seq(0),
            server_time_ms: now,
        };
        // A large group: one entry in the group's timeline; the ack carries its place there.
        // The members it mentions get it in their own timelines too (the offline push with it).
        if large {
            (entry.seq, entry.prev_seq) = self.large_append(group, msg.clone(), round);
            if all {
                self.mention_all(group, &msg, round);
            } else {
                self.mention(group, actor, &msg, mentions, round);
            }
        }
        let g = self.groups.get_mut(&group).expect("loaded");
        if client_msg_id != 0 {
            round.batch.push(Op::Dedup {
                uid: actor,
                client_msg_id,
                entry,
            });
            let key = (actor, client_msg_id);
            if g.dedup.insert(key, entry).is_none() {
                g.dedup_order.push_back(key);
                if g.dedup_order.len() > GROUP_DEDUP_WINDOW {
                    if let Some(old) = g.dedup_order.pop_front() {
                        g.dedup.remove(&old);
                    }
                }
            }
        }
        self.metrics.accepted(conv);
        if !large {
            let members = g.members.keys().copied().collect();
            self.fan_out(vshard_of(UserId(group.0)), &msg, members, round);
        }
        round.reply(reply, accepted(entry), |r| ack(entry, r));
    }

    /// The groups of `uid`, with names.
    pub(super) async fn on_my_groups(&mut self, uid: UserId, reply: Reply, round: &mut Round) {
        let res: Result<Vec<(GroupId, String)>, StoreError> = async {
            let mut out = Vec::new();
            for g in self.store.groups_of(uid).await? {
                let name = match self.groups.get(&g) {
                    Some(s) => s.desc.name.clone(),
                    None => self
                        .store
                        .group(g)
                        .await?
                        .map(|d| d.name)
                        .unwrap_or_default(),
                };
                out.push((g, name));
            }
            Ok(out)
        }
        .await;
        match res {
            Ok(groups) => {
                let f = groups.clone();
                round.reply(reply, ApiOk::Groups(groups), move |r| {
                    Command::GroupList { groups: f }.to_bytes(r)
                })
            }
            Err(e) => self.refuse(reply, &GroupOp::Info, unavailable(&e), round),
        }
    }
}

/// The id of the group `actor` creates with idempotency key `client_id` (draw `attempt`): a hash,
/// so a retried create (after a lost answer, a reconnect, a restart) names the same group and
/// finds it, and another user cannot aim at an id someone else will create (SHA-256, not
/// invertible). 63 bits, never 0, like the ids drawn from the message id generator, which it
/// meets with the odds of a random 63-bit collision.
pub(super) fn derived_group_id(actor: UserId, client_id: u64, attempt: u32) -> GroupId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"im group create v1");
    h.update(actor.0.to_be_bytes());
    h.update(client_id.to_be_bytes());
    h.update(attempt.to_be_bytes());
    let d = h.finalize();
    let v = u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) >> 1;
    GroupId(v.max(1))
}
