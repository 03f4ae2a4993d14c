//! Large groups (read diffusion). A group with more than `large_group_threshold` members keeps
//! one timeline of its own, written once per post by its owner ([`Op::GroupAppend`]), instead of
//! an append to every member's timeline. Members:
//! - get the posts live while online: the owner sends each round's posts once to every worker
//!   of the cluster ([`WorkerMsg::GroupLive`]), and each worker hands them to the devices of its
//!   own online members of the group ([`LargeIndex`]), one frame shared by all;
//! - learn at login where each of their large groups stands (`GroupHeads`, from each group's
//!   owner, with the read cursor their own shard keeps) and read what they missed with
//!   `GroupSync`; mark what they read with `GroupRead`.
//!
//! A user's shard knows which of its user's groups are large from the user's own timeline: the
//! `BecameLarge` event (sent to every member at the switch, and to every member added later)
//! sets the user's `uid → large group` index entry in the batch that appends it, and the event of
//! the user's removal clears it (`large_event_appended`). So the index lives with the user, in
//! its node's store, written durably in order with its timeline, whatever node owns the group.
//!
//! A member who muted a large group (`SetMute` with the group) gets no live posts of it: its
//! worker notes the group's new head instead and pushes the heads of all such groups of the user
//! in one `GroupHeads` at most every [`MUTED_HEADS_EVERY_MS`] (a member of 500 busy groups gets
//! one push a second, not 500).
//!
//! The switch happens inside one owner round, at the add that takes the group past the
//! threshold: every member up to then gets a last write-diffused event (`BecameLarge`) after
//! every earlier post (the owner orders all of a group's messages and fans them out FIFO), and
//! the group's own timeline starts at seq 1 with the same marker. A post is therefore in exactly
//! one place for every member: before the marker in its own timeline, after it in the group's.
//! Membership changes of a large group cost O(changed members): the members concerned get a
//! personal event, nobody else is told (the member list is paged on demand).

use std::collections::{HashMap, HashSet};

use im_shared::files::FileRef;
use im_shared::proto::{
    GroupEvent, GroupEventKind, GroupHead, MarkerBody, CONV_C2G, CONV_MENTION, CONV_RECALL,
    ROLE_ADMIN, ROLE_MEMBER,
};
use im_shared::shard::vshard_of;
use im_store::MemberRecord;

use super::*;

/// Members per `GroupMembersPage` when the client asks for 0, and the most it may ask for; also
/// the members a `GroupInfoReply` lists for a large group.
pub const MEMBERS_PAGE: usize = 1000;

/// How often a member gets the heads of the large groups it muted that moved (one push for all).
pub const MUTED_HEADS_EVERY_MS: u64 = 1_000;

/// Posts read per step of a recall's walk back through a large group's timeline.
const RECALL_PAGE: usize = 256;
/// Steps of that walk at most (65 536 posts: the default rate limit, 100 posts a second, over the
/// default recall window of 120 s is 12 000).
const RECALL_PAGES: usize = 256;
/// How much older than the recalled post a page may be before the walk gives up (ids of a later
/// owner's clock may be slightly behind an earlier owner's).
const RECALL_SKEW_MS: u64 = 10_000;

/// This worker's online users in large groups, both ways.
#[derive(Default)]
pub(super) struct LargeIndex {
    /// Online users of this worker in each large group.
    online: HashMap<GroupId, HashSet<UserId>>,
    /// The large groups of each online user of this worker.
    of: HashMap<UserId, Vec<GroupId>>,
    /// Large groups an online user muted: heads instead of live posts.
    muted: HashSet<(UserId, GroupId)>,
    /// Muted groups that moved since the last heads push, with their newest head, by user.
    moved: HashMap<UserId, HashMap<GroupId, u64>>,
    /// When the last heads push of muted groups went out.
    pushed_at: u64,
    /// Owner side: whether posts of large groups whose files members asked for were recalled
    /// (a post's file is asked for by many members, and each check reads the recall window
    /// after the post). Set to true when this owner accepts a post's recall: all of a group's
    /// recalls go through its owner. Past [`RECALL_VERDICTS`] at a round's end, forgotten at
    /// once.
    pub(super) recalls: HashMap<(GroupId, MsgId), bool>,
}

/// Most recall verdicts an owner worker keeps after a round ([`LargeIndex::recalls`]).
const RECALL_VERDICTS: usize = 4096;

/// How far before a mention entry's time its post is looked for in the group's timeline when
/// it is not found within [`RECALL_SKEW_MS`] (a larger clock step between the group's owners).
const WIDE_SKEW_MS: u64 = 600_000;

impl LargeIndex {
    /// After a round's commit: forgets the recall verdicts once there are too many (a verdict
    /// set by an accepted recall is kept until its marker is in the store).
    pub(super) fn trim_recalls(&mut self) {
        if self.recalls.len() > RECALL_VERDICTS {
            self.recalls.clear();
        }
    }
}

impl LargeIndex {
    fn add(&mut self, uid: UserId, g: GroupId) {
        let gs = self.of.entry(uid).or_default();
        if !gs.contains(&g) {
            gs.push(g);
        }
        self.online.entry(g).or_default().insert(uid);
    }

    fn remove(&mut self, uid: UserId, g: GroupId) {
        self.muted.remove(&(uid, g));
        if let Some(m) = self.moved.get_mut(&uid) {
            m.remove(&g);
        }
        if let Some(gs) = self.of.get_mut(&uid) {
            gs.retain(|x| *x != g);
        }
        if let Some(us) = self.online.get_mut(&g) {
            us.remove(&uid);
            if us.is_empty() {
                self.online.remove(&g);
            }
        }
    }

    /// Mutes (or unmutes) `g` for `uid`, if it is one of its large groups.
    pub(super) fn set_muted(&mut self, uid: UserId, g: GroupId, muted: bool) {
        if !self.groups_of(uid).contains(&g) {
            return;
        }
        if muted {
            self.muted.insert((uid, g));
        } else {
            self.muted.remove(&(uid, g));
            if let Some(m) = self.moved.get_mut(&uid) {
                m.remove(&g);
            }
        }
    }

    pub(super) fn has_moved(&self) -> bool {
        !self.moved.is_empty()
    }

    /// `uid`'s last device went away.
    pub(super) fn offline(&mut self, uid: UserId) {
        self.moved.remove(&uid);
        self.muted.retain(|(u, _)| *u != uid);
        for g in self.of.remove(&uid).unwrap_or_default() {
            if let Some(us) = self.online.get_mut(&g) {
                us.remove(&uid);
                if us.is_empty() {
                    self.online.remove(&g);
                }
            }
        }
    }

    /// The large groups of an online user (none for an offline one).
    pub(super) fn groups_of(&self, uid: UserId) -> &[GroupId] {
        self.of.get(&uid).map(Vec::as_slice).unwrap_or(&[])
    }

    pub(super) fn is_online(&self, uid: UserId) -> bool {
        self.of.contains_key(&uid)
    }

    /// Online users of this worker in `g`.
    #[cfg(test)]
    pub(super) fn online_in(&self, g: GroupId) -> usize {
        self.online.get(&g).map_or(0, HashSet::len)
    }
}

/// Most members one membership event of a large group lists (and goes to): an add or removal of
/// more is told in several events, each to the members it lists.
pub(super) const MEMBER_EVENT_CHUNK: usize = 64;

/// Members one chunk of an `@all` fan-out names: the chunk's outbox entry lists them, and the
/// next chunk is written when all of them confirmed.
/// (A handful in unit tests, so a small group spans several chunks.)
pub(super) const MENTION_ALL_CHUNK: usize = if cfg!(test) { 4 } else { 1_000 };

/// An `@all` post of a large group whose mention entries are still being fanned out: the
/// members up to `after` (in uid order) have had theirs sent.
pub(super) struct MentionAll {
    pub(super) group: GroupId,
    /// The [`CONV_MENTION`] copy of the post.
    pub(super) msg: Message,
    pub(super) after: UserId,
}

/// A large group's state on its owner.
#[derive(Clone, Copy, Debug)]
pub(super) struct Large {
    /// Seq of the group timeline's last post.
    pub(super) head: u64,
    /// Posting rate limit (GCRA): the theoretical arrival time of the next post, in µs.
    tat_us: u64,
}

impl Large {
    pub(super) fn at(head: u64) -> Large {
        Large { head, tat_us: 0 }
    }

    /// Whether a post at `now_ms` fits `per_sec` posts a second with a burst of as many.
    fn admit(&mut self, now_ms: u64, per_sec: u32) -> bool {
        let per_sec = u64::from(per_sec.max(1));
        let interval = 1_000_000 / per_sec;
        let now = now_ms.saturating_mul(1000);
        // The next arrival time is never more than a burst (a second) ahead of the clock, unless
        // the wall clock stepped back: then it starts from the clock again, instead of refusing
        // every post until the clock has caught up.
        if self.tat_us > now + interval * per_sec {
            self.tat_us = now;
        }
        let tat = self.tat_us.max(now);
        if tat - now > interval * (per_sec - 1) {
            return false;
        }
        self.tat_us = tat + interval;
        true
    }
}

impl<S: Store> Worker<S> {
    /// The large groups of `uid` (from the index when it is online here, else the store) with
    /// `uid`'s read cursor in each and whether it muted it: what a device that logs in is told
    /// about (`GroupHeads`).
    pub(super) async fn large_reads(
        &self,
        uid: UserId,
    ) -> Result<Vec<(GroupId, Seq, bool)>, StoreError> {
        let groups = if self.large.is_online(uid) {
            self.large.groups_of(uid).to_vec()
        } else {
            self.store.large_groups_of(uid).await?
        };
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mutes = self.store.mutes(uid).await?;
        let mut out = Vec::with_capacity(groups.len());
        for group in groups {
            let read = self.store.group_read(uid, group).await?;
            out.push((group, read, mutes.contains(&group.0)));
        }
        Ok(out)
    }

    /// A device of `uid` logged in on `conn`: index the user's large groups (first device) and
    /// ask each group's owner to push the device its head, after the `LoginResult`.
    pub(super) fn large_login(
        &mut self,
        uid: UserId,
        conn: ConnId,
        reads: Vec<(GroupId, Seq, bool)>,
        first: bool,
        round: &mut Round,
    ) {
        for (group, read, muted) in reads {
            if first {
                self.large.add(uid, group);
                self.large.set_muted(uid, group, muted);
            }
            round.heads_out.push(GroupReq {
                group,
                actor: uid,
                admin: false,
                reply: Reply::Conn { conn, req_id: 0 },
                op: GroupOp::Head { read },
            });
        }
    }

    /// Owner side: the head of a large group for a member's device that logged in.
    pub(super) fn large_head(
        &mut self,
        group: GroupId,
        read: Seq,
        reply: Reply,
        round: &mut Round,
    ) {
        let Some(l) = self.groups[&group].large else {
            return;
        };
        if let Reply::Conn { conn, .. } = reply {
            let heads = vec![GroupHead {
                group,
                head: Seq(l.head),
                read,
            }];
            round.send(conn, Command::GroupHeads { heads }.to_bytes(0));
        }
    }

    /// Owner side: the heads of several large groups (all of this worker) for a member's device
    /// that logged in, in one `GroupHeads` push. A group that cannot be loaded, is not large or
    /// does not have `actor` as a member is left out (its `GroupSync` still tells the head).
    pub(super) async fn large_heads(
        &mut self,
        actor: UserId,
        heads: Vec<(GroupId, Seq)>,
        reply: Reply,
        round: &mut Round,
    ) {
        let mut out = Vec::with_capacity(heads.len());
        for (group, read) in heads {
            if !matches!(self.load_group(group).await, Ok(true)) {
                continue;
            }
            let g = &self.groups[&group];
            if let (Some(l), true) = (g.large, g.members.contains_key(&actor)) {
                out.push(GroupHead {
                    group,
                    head: Seq(l.head),
                    read,
                });
            }
        }
        if let (Reply::Conn { conn, .. }, false) = (reply, out.is_empty()) {
            out.sort_unstable_by_key(|h| h.group);
            round.send(conn, Command::GroupHeads { heads: out }.to_bytes(0));
        }
    }

    /// User side: a group event reached `r`'s timeline (in this round's batch). `BecameLarge`
    /// makes `r` a member of a large group, the event of `r`'s removal ends it: the user's index
    /// entry is written with the event, and live posts reach `r`'s devices from now on (or no
    /// longer). The owner sends its posts after the event on the same FIFO channel.
    pub(super) fn large_event_appended(&mut self, r: UserId, m: &Message, round: &mut Round) {
        let Ok(e) = GroupEvent::decode(m.body.clone()) else {
            return;
        };
        let group = GroupId(m.to.0);
        let on = match e.kind {
            GroupEventKind::BecameLarge => true,
            GroupEventKind::MembersRemoved | GroupEventKind::MemberLeft if e.users.contains(&r) => {
                false
            }
            _ => return,
        };
        round.batch.push(Op::LargeMember { group, uid: r, on });
        if !self.online(r) {
            return;
        }
        if on {
            self.large.add(r, group);
        } else {
            self.large.remove(r, group);
        }
    }

    /// Owner side: `g` passes the threshold. Its members so far get the `BecameLarge` marker
    /// as the last entry of their timelines for this group, and the group's timeline starts
    /// with it; their workers learn that they are members of a large group.
    pub(super) fn make_large(&mut self, group: GroupId, actor: UserId, round: &mut Round) {
        let members: Vec<UserId> = self.groups[&group].members.keys().copied().collect();
        let g = self.groups.get_mut(&group).expect("loaded");
        g.large = Some(Large::at(0));
        Metrics::inc(&self.metrics.groups_made_large);
        tracing::info!(
            group = group.0,
            members = members.len(),
            "group is now large"
        );
        self.group_event(
            group,
            actor,
            GroupEventKind::BecameLarge,
            Vec::new(),
            members,
            round,
        );
        self.large_event(group, actor, GroupEventKind::BecameLarge, Vec::new(), round);
    }

    /// Owner side: adds members to a large group (the caller checked the limits).
    pub(super) fn large_add(
        &mut self,
        group: GroupId,
        actor: UserId,
        new: Vec<UserId>,
        round: &mut Round,
    ) {
        let now = self.now;
        for &u in &new {
            self.groups
                .get_mut(&group)
                .expect("loaded")
                .members
                .insert(u, ROLE_MEMBER);
            round.batch.push(Op::MemberPut {
                group,
                member: MemberRecord {
                    uid: u,
                    role: ROLE_MEMBER,
                    joined_ms: now,
                },
            });
        }
        // The new members learn it in their own timelines (that they were added, then that this
        // group's posts are in its own timeline). Nobody else is told: in a group of 100 000 a
        // join announced to every member costs as much as a post (an add of 2 000 listed 16 KB
        // of uids to every online member); the member list and its count are paged on demand
        // (`GroupMembers`). Each event lists the members it goes to, [`MEMBER_EVENT_CHUNK`] at
        // most: one listing all 2 000 of an add was 16 KB in every new member's timeline, 32 MB
        // of appends per add.
        for part in new.chunks(MEMBER_EVENT_CHUNK) {
            self.group_event(
                group,
                actor,
                GroupEventKind::MembersAdded,
                part.to_vec(),
                part.to_vec(),
                round,
            );
        }
        self.group_event(
            group,
            actor,
            GroupEventKind::BecameLarge,
            Vec::new(),
            new.clone(),
            round,
        );
    }

    /// Owner side: members of a large group are gone (`MemberDelete`s already in the batch):
    /// they get the event in their timelines; nobody else is told (as for an add).
    pub(super) fn large_removed(
        &mut self,
        group: GroupId,
        actor: UserId,
        gone: Vec<UserId>,
        kind: GroupEventKind,
        round: &mut Round,
    ) {
        for part in gone.chunks(MEMBER_EVENT_CHUNK) {
            self.group_event(group, actor, kind, part.to_vec(), part.to_vec(), round);
        }
    }

    /// Owner side: a group event stored once in a large group's timeline and sent live.
    pub(super) fn large_event(
        &mut self,
        group: GroupId,
        actor: UserId,
        kind: GroupEventKind,
        users: Vec<UserId>,
        round: &mut Round,
    ) {
        let msg = self.event_msg(group, actor, kind, users);
        self.large_append(group, msg, round);
    }

    /// Owner side: `msg` becomes the next post of large group `group`'s timeline (in this round's
    /// batch) and goes live to the online members after the commit. Returns its seq and the
    /// previous one.
    pub(super) fn large_append(
        &mut self,
        group: GroupId,
        mut msg: Message,
        round: &mut Round,
    ) -> (Seq, Seq) {
        let g = self.groups.get_mut(&group).expect("loaded");
        let l = g.large.as_mut().expect("a large group");
        msg.prev_seq = Seq(l.head);
        l.head += 1;
        msg.seq = Seq(l.head);
        let at = (msg.seq, msg.prev_seq);
        round.batch.push(Op::GroupAppend {
            group,
            msg: msg.clone(),
        });
        round.live.push((group, msg));
        at
    }

    /// Owner side: the members of large group `group` that post `msg` mentions (not the poster,
    /// not a non-member) get it as a [`CONV_MENTION`] entry in their own timelines, through the
    /// outbox like any fan-out: live, synced, and pushed when no device acknowledges it.
    pub(super) fn mention(
        &mut self,
        group: GroupId,
        actor: UserId,
        msg: &Message,
        mentions: Vec<UserId>,
        round: &mut Round,
    ) {
        let g = &self.groups[&group];
        let mut to: Vec<UserId> = mentions
            .into_iter()
            .filter(|u| *u != actor && g.members.contains_key(u))
            .collect();
        to.sort_unstable();
        to.dedup();
        if to.is_empty() {
            return;
        }
        let m = Message {
            conv: CONV_MENTION,
            ..msg.clone()
        };
        self.metrics.accepted(CONV_MENTION);
        self.fan_out(vshard_of(UserId(group.0)), &m, to, round);
    }

    /// Owner side: whether large group `group` may start an `@all` now: not while the last one
    /// is still being fanned out, nor within `large_group_mention_all_secs` of its start. A
    /// start stamped after now (the wall clock stepped back) counts from now: the interval is
    /// kept from the step on instead of refusing until the clock catches up with the stamp.
    pub(super) fn mention_all_refusal(&mut self, group: GroupId) -> Option<ApiError> {
        if self.mention_all.values().any(|j| j.group == group) {
            return Some(ApiError::new(
                ErrorCode::Overloaded,
                "the group's last @all is still being delivered; retry later",
            ));
        }
        let every = self.cfg.large_group_mention_all_secs;
        let now = self.now;
        let last = self.mention_all_at.get_mut(&group).map(|t| {
            *t = (*t).min(now);
            *t
        });
        if last.is_some_and(|t| now < t.saturating_add(every.saturating_mul(1000))) {
            return Some(ApiError::new(
                ErrorCode::Overloaded,
                format!("a large group takes at most one @all every {every} s; retry later"),
            ));
        }
        None
    }

    /// Owner side: `@all` in large group `group`: every member but the poster gets post `msg`
    /// as a [`CONV_MENTION`] entry in its own timeline (live, synced, pushed like any mention),
    /// fanned out [`MENTION_ALL_CHUNK`] members at a time in uid order. Each chunk is the
    /// post's outbox entry, marked as a chunk of an `@all` ([`outbox::ALL_MARK`]); when all its
    /// members confirmed, the next chunk replaces it (`on_append_done`), and a restart resumes
    /// from the stored chunk ([`Worker::resume_mention_all`]). So the cost is a write per
    /// member, spread over rounds, with one chunk of appends in flight per post.
    pub(super) fn mention_all(&mut self, group: GroupId, msg: &Message, round: &mut Round) {
        let now = self.now;
        let every = self.cfg.large_group_mention_all_secs.saturating_mul(1000);
        self.mention_all_at
            .retain(|_, t| (*t).min(now).saturating_add(every) > now);
        self.mention_all_at.insert(group, now);
        self.metrics.accepted(CONV_MENTION);
        let job = MentionAll {
            group,
            msg: Message {
                conv: CONV_MENTION,
                ..msg.clone()
            },
            after: UserId(0),
        };
        self.mention_all_chunk(job, round);
    }

    /// The next chunk of `job`: up to [`MENTION_ALL_CHUNK`] members after `job.after`, not the
    /// poster, fanned out in this round. False when no member is left (or the group is gone).
    pub(super) fn mention_all_chunk(&mut self, job: MentionAll, round: &mut Round) -> bool {
        use std::ops::Bound::{Excluded, Unbounded};
        let Some(g) = self.groups.get(&job.group) else {
            return false;
        };
        let from = job.msg.from;
        let chunk: Vec<UserId> = g
            .members
            .range((Excluded(job.after), Unbounded))
            .map(|(u, _)| *u)
            .filter(|u| *u != from)
            .take(MENTION_ALL_CHUNK)
            .collect();
        let Some(&last) = chunk.last() else {
            return false;
        };
        let shard = vshard_of(UserId(job.group.0));
        self.metrics
            .mention_all_entries
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        self.fan_out_marked(shard, &job.msg, chunk, true, round);
        self.mention_all
            .insert((shard, job.msg.msg_id), MentionAll { after: last, ..job });
        true
    }

    /// At a replay of an `@all` chunk read from the store (`recipients` without the mark): the
    /// fan-out goes on after this chunk once it is confirmed. Loads the group (retrying a
    /// failing store, as the outbox read does); a group that is gone ends the fan-out with this
    /// chunk.
    pub(super) async fn resume_mention_all(
        &mut self,
        shard: ShardId,
        msg: &Message,
        recipients: &[UserId],
    ) {
        let group = GroupId(msg.to.0);
        let Some(&after) = recipients.iter().max() else {
            return;
        };
        if self.mention_all.contains_key(&(shard, msg.msg_id)) {
            return;
        }
        loop {
            match self.load_group(group).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(worker = self.idx, "@all of {group}: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    // As for an unreadable outbox: this chunk is replayed, the rest needs an
                    // operator (the entry stays).
                    tracing::error!(worker = self.idx, "@all of {group} stops here: {e}");
                    return;
                }
            }
        }
        let job = MentionAll {
            group,
            msg: msg.clone(),
            after,
        };
        self.mention_all.insert((shard, msg.msg_id), job);
    }

    /// Owner side: whether `actor` may recall, in large group `group`, the post that the recall
    /// marker `body` names. The post must be one of the group's timeline (a post made before the
    /// group became large is in the members' own timelines: `NotFound`), a post (not an event or
    /// a marker), within the recall window, and `actor`'s own, or `actor` the group's owner or an
    /// admin (moderation of a channel). The timeline is walked back from its head a page at a
    /// time: ids grow with seq, so the walk ends at the first page that is older than the post
    /// by more than [`RECALL_SKEW_MS`], and after [`RECALL_PAGES`] pages in any case (the posting
    /// rate limit times the recall window is far below that at the defaults).
    pub(super) async fn large_recall_check(
        &self,
        group: GroupId,
        actor: UserId,
        body: &Bytes,
    ) -> Result<(), ApiError> {
        let Ok(marker) = MarkerBody::decode(body.clone()) else {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "bad recall marker",
            ));
        };
        let target = marker.msg_id;
        let window = self.cfg.recall_window_secs * 1000;
        if self.now.saturating_sub(target.timestamp_ms()) > window {
            return Err(ApiError::new(
                ErrorCode::RecallRefused,
                "recall window has passed",
            ));
        }
        let g = &self.groups[&group];
        let head = g.large.map_or(0, |l| l.head);
        let moderator = actor == g.desc.owner || g.members.get(&actor) == Some(&ROLE_ADMIN);
        let mut end = head;
        for _ in 0..RECALL_PAGES {
            if end == 0 {
                break;
            }
            let from = end.saturating_sub(RECALL_PAGE as u64);
            let page = self
                .store
                .group_timeline(group, Seq(from), RECALL_PAGE)
                .await
                .map_err(|e| super::groups::unavailable(&e))?;
            if let Some(m) = page.iter().find(|m| m.msg_id == target) {
                if m.conv != CONV_C2G {
                    return Err(ApiError::new(
                        ErrorCode::RecallRefused,
                        "only a post can be recalled",
                    ));
                }
                if m.from != actor && !moderator {
                    return Err(ApiError::new(
                        ErrorCode::RecallRefused,
                        "not your message in this conversation",
                    ));
                }
                return Ok(());
            }
            let newest = page.iter().map(|m| m.server_time_ms).max().unwrap_or(0);
            if newest.saturating_add(RECALL_SKEW_MS) < target.timestamp_ms() {
                break;
            }
            end = from;
        }
        Err(ApiError::new(ErrorCode::NotFound, "no such message"))
    }

    /// Owner side of a `FileDownload` of a mention entry (`GroupOp::MentionFile`, the member
    /// checked by the caller): the file's URL unless the post was recalled in large group
    /// `group`'s timeline.
    pub(super) async fn mention_file_url(
        &mut self,
        group: GroupId,
        actor: UserId,
        op: GroupOp,
        reply: Reply,
        round: &mut Round,
    ) {
        let GroupOp::MentionFile {
            msg_id,
            time_ms,
            ref sha256,
            ref mime,
        } = op
        else {
            unreachable!("called with a MentionFile");
        };
        let (conn, req_id) = match reply {
            Reply::Conn { conn, req_id } => (conn, req_id),
            reply => {
                let e = ApiError::new(ErrorCode::InvalidArgument, "file URLs go to clients");
                return self.refuse(reply, &op, e, round);
            }
        };
        let Some(p) = self.cfg.files.clone() else {
            let why = "the file service is not configured on this server";
            return round.send(conn, error_frame(ErrorCode::Unavailable, req_id, why));
        };
        if self.groups[&group].large.is_some() {
            match self.large_recalled_once(group, msg_id, time_ms, None).await {
                Ok(Some(false)) => {}
                Ok(Some(true)) => {
                    let why = format!("message {msg_id} was recalled");
                    return round.send(conn, error_frame(ErrorCode::NotFound, req_id, &why));
                }
                Ok(None) => {
                    // Not where its time says (nor 10 minutes before): no verdict, no file.
                    let why = format!("message {msg_id} is not in the group's timeline");
                    return round.send(conn, error_frame(ErrorCode::NotFound, req_id, &why));
                }
                Err(e) => {
                    tracing::warn!("file download of group {group}: {e}");
                    let why = "store unavailable, retry";
                    return round.send(conn, error_frame(ErrorCode::Unavailable, req_id, why));
                }
            }
        }
        let url = files::file_url(&p, self.now, actor, sha256, mime, req_id);
        round.send(conn, url);
    }

    /// Owner side: [`Self::large_recalled`], remembered ([`LargeIndex::recalls`]). `at`: the
    /// post's seq, if known; else the scan starts where the post's time is
    /// ([`Self::large_seq_at`]).
    async fn large_recalled_once(
        &mut self,
        group: GroupId,
        msg_id: MsgId,
        time_ms: u64,
        at: Option<Seq>,
    ) -> Result<Option<bool>, StoreError> {
        if let Some(v) = self.large.recalls.get(&(group, msg_id)) {
            return Ok(Some(*v));
        }
        let v = match at {
            Some(s) => {
                self.large_recalled(group, msg_id, time_ms, s, false)
                    .await?
            }
            None => {
                // From where the post's time is; the post itself must be met on the way (a
                // clock step back between owners larger than the margin: once more from
                // further back, then no verdict).
                let mut v = None;
                for skew in [RECALL_SKEW_MS, WIDE_SKEW_MS] {
                    let start = self.large_seq_at(group, time_ms, skew).await?;
                    v = self
                        .large_recalled(group, msg_id, time_ms, start, true)
                        .await?;
                    if v.is_some() {
                        break;
                    }
                }
                v
            }
        };
        // Kept at most until the round's end ([`LargeIndex::trim_recalls`]): a verdict set by a
        // recall of this round must not be forgotten before its marker is in the store.
        if let Some(v) = v {
            self.large.recalls.insert((group, msg_id), v);
        }
        Ok(v)
    }

    /// Owner side: the seq of large group `group`'s timeline before the first entry made at
    /// most `skew` before `time_ms` (entries are in time order, give or take the
    /// clock steps between the nodes that owned the group): a binary search, one entry read per
    /// step.
    async fn large_seq_at(
        &self,
        group: GroupId,
        time_ms: u64,
        skew: u64,
    ) -> Result<Seq, StoreError> {
        let head = self.groups[&group].large.map_or(0, |l| l.head);
        let t = time_ms.saturating_sub(skew);
        // The first seq in lo..=hi whose entry is at or after `t` (hi + 1: none).
        let (mut lo, mut hi) = (1u64, head);
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let at = self.store.group_timeline(group, Seq(mid - 1), 1).await?;
            match at.first() {
                Some(m) if m.server_time_ms < t => lo = mid + 1,
                _ => hi = mid - 1,
            }
        }
        Ok(Seq(lo - 1))
    }

    /// Owner side: whether post `msg_id` (made at `time_ms`) of large group `group` was
    /// recalled. Its recall marker is an entry after it, accepted within the recall window of
    /// the post, so the entries after seq `after` are read until that window ends (plus a
    /// margin for clock steps), at most [`RECALL_PAGE`] × [`RECALL_PAGES`] of them (the most a
    /// group takes in a window at the posting limit, see [`RECALL_PAGES`]). `find_post`: the
    /// scan starts before the post, which it must meet for a "not recalled" (`None` if it
    /// does not: the start was wrong).
    pub(super) async fn large_recalled(
        &self,
        group: GroupId,
        msg_id: MsgId,
        time_ms: u64,
        mut after: Seq,
        find_post: bool,
    ) -> Result<Option<bool>, StoreError> {
        let until = time_ms + self.cfg.recall_window_secs * 1000 + RECALL_SKEW_MS;
        let mut met = !find_post;
        let not_recalled = |met: bool| Ok(met.then_some(false));
        for _ in 0..RECALL_PAGES {
            let page = self.store.group_timeline(group, after, RECALL_PAGE).await?;
            let Some(last) = page.last() else {
                return not_recalled(met);
            };
            after = last.seq;
            for e in &page {
                if e.conv == CONV_RECALL {
                    if MarkerBody::decode(e.body.clone()).is_ok_and(|r| r.msg_id == msg_id) {
                        return Ok(Some(true));
                    }
                } else if e.msg_id == msg_id {
                    met = true;
                }
            }
            if last.server_time_ms > until || page.len() < RECALL_PAGE {
                return not_recalled(met);
            }
        }
        not_recalled(met)
    }

    /// Owner side: whether large group `group` takes one more post now.
    pub(super) fn large_admit(&mut self, group: GroupId) -> bool {
        let (now, rate) = (self.now, self.cfg.large_group_posts_per_sec);
        let g = self.groups.get_mut(&group).expect("loaded");
        g.large.as_mut().is_none_or(|l| l.admit(now, rate))
    }

    /// Posts of large groups from their owners: to the devices of this worker's online members.
    pub(super) fn on_group_live(&mut self, posts: Vec<(GroupId, Message)>, round: &mut Round) {
        for (g, msg) in posts {
            let Some(users) = self.large.online.get(&g) else {
                continue;
            };
            let seq = msg.seq.0;
            let frame = Command::GroupDeliver(msg).to_bytes(0);
            let mut conns = Vec::with_capacity(users.len());
            for u in users {
                if self.large.muted.contains(&(*u, g)) {
                    let head = self
                        .large
                        .moved
                        .entry(*u)
                        .or_default()
                        .entry(g)
                        .or_default();
                    *head = (*head).max(seq);
                    continue;
                }
                conns.extend(devices_of(&self.users, *u).iter().map(|d| d.conn));
            }
            self.metrics
                .large_delivered
                .fetch_add(conns.len() as u64, Ordering::Relaxed);
            round.send_many(conns, frame);
        }
    }

    /// The heads of muted large groups that moved, one `GroupHeads` per user (all its groups)
    /// to each of its devices, at most every [`MUTED_HEADS_EVERY_MS`].
    pub(super) async fn muted_heads_due(&mut self, round: &mut Round) {
        if !self.large.has_moved() || self.now < self.large.pushed_at + MUTED_HEADS_EVERY_MS {
            return;
        }
        self.large.pushed_at = self.now;
        for (uid, moved) in std::mem::take(&mut self.large.moved) {
            let mut heads = Vec::with_capacity(moved.len());
            for (group, head) in moved {
                // The cursor is only informative here: a failed read reports 0.
                let read = self.store.group_read(uid, group).await.unwrap_or_default();
                heads.push(GroupHead {
                    group,
                    head: Seq(head),
                    read,
                });
            }
            heads.sort_unstable_by_key(|h| h.group);
            let frame = Command::GroupHeads { heads }.to_bytes(0);
            for d in devices_of(&self.users, uid) {
                round.send(d.conn, frame.clone());
            }
        }
    }

    /// `GroupRead`: `uid` has read large group `group` up to `seq` (never lowered). The cursor is
    /// the user's own (its shard keeps it, the group's owner may be on another node): it is not
    /// checked against the group's head.
    pub(super) async fn on_group_read(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        group: GroupId,
        seq: Seq,
        round: &mut Round,
    ) {
        if !self.large.groups_of(uid).contains(&group) {
            let e = ApiError::new(
                ErrorCode::NotMember,
                format!("not a member of a large group {group}"),
            );
            return round.send(conn, op_err(req_id, &e));
        }
        match self.store.group_read(uid, group).await {
            Ok(stored) => {
                // A cursor raised earlier in this round is not in the store yet.
                let pending = round.batch.ops.iter().filter_map(|op| match op {
                    Op::GroupRead {
                        uid: u,
                        group: g,
                        seq,
                    } if *u == uid && *g == group => Some(*seq),
                    _ => None,
                });
                let stored = pending.fold(stored, Seq::max);
                if seq > stored {
                    round.batch.push(Op::GroupRead { uid, group, seq });
                }
                round.send(conn, op_ok(req_id, group.0));
            }
            Err(e) => {
                tracing::warn!("group read of {uid}: {e}");
                let e = ApiError::new(ErrorCode::Unavailable, "store unavailable, retry");
                round.send(conn, op_err(req_id, &e));
            }
        }
    }

    /// Owner side: a member reads the group's timeline (`GroupSync`).
    pub(super) async fn large_sync(
        &mut self,
        group: GroupId,
        after: Seq,
        limit: u16,
        reply: Reply,
        round: &mut Round,
    ) {
        let op = GroupOp::Sync { after, limit };
        let Some(head) = self.groups[&group].large.map(|l| l.head) else {
            let e = ApiError::new(
                ErrorCode::InvalidArgument,
                format!("group {group} is not large: its posts are in the members' timelines"),
            );
            return self.refuse(reply, &op, e, round);
        };
        let max = self.cfg.sync_page_max.max(1);
        let limit = if limit == 0 { max } else { limit.min(max) };
        let msgs = match self
            .store
            .group_timeline(group, after, limit as usize)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("group sync of {group}: {e}");
                let e = ApiError::new(ErrorCode::Unavailable, "store unavailable, retry");
                return self.refuse(reply, &op, e, round);
            }
        };
        // The same byte budget as a timeline page, at least one post.
        let mut bytes = 0usize;
        let mut messages = Vec::with_capacity(msgs.len());
        for m in msgs {
            bytes += m.encoded_len();
            if !messages.is_empty() && bytes > self.cfg.sync_page_bytes {
                break;
            }
            messages.push(m);
        }
        let has_more = messages.last().is_some_and(|m| m.seq.0 < head);
        if let Reply::Conn { conn, req_id } = reply {
            let page = Command::GroupSyncPage {
                group,
                head: Seq(head),
                has_more,
                messages,
            };
            round.send(conn, page.to_bytes(req_id));
        }
    }

    /// Owner side of `GroupFileDownload`: a download URL for the file of post `seq` of large
    /// group `group`'s own timeline, for member `actor` (the caller checked the membership, so a
    /// removed member gets `NotMember`). `NotFound` when there is no such post, it is not a file
    /// message, or it was recalled (a recalled file is handed out to nobody), as `FileDownload`.
    pub(super) async fn large_file_url(
        &mut self,
        group: GroupId,
        actor: UserId,
        seq: Seq,
        reply: Reply,
        round: &mut Round,
    ) {
        let op = GroupOp::PostFile { seq };
        let (conn, req_id) = match reply {
            Reply::Conn { conn, req_id } => (conn, req_id),
            reply => {
                let e = ApiError::new(ErrorCode::InvalidArgument, "file URLs go to clients");
                return self.refuse(reply, &op, e, round);
            }
        };
        let refuse = |round: &mut Round, code: ErrorCode, why: &str| {
            round.send(conn, error_frame(code, req_id, why));
        };
        if self.groups[&group].large.is_none() {
            let why = format!(
                "group {group} is not large: its posts are in your own timeline (FileDownload)"
            );
            return refuse(round, ErrorCode::InvalidArgument, &why);
        }
        let Some(p) = self.cfg.files.clone() else {
            let why = "the file service is not configured on this server";
            return refuse(round, ErrorCode::Unavailable, why);
        };
        let found = match self
            .store
            .group_timeline(group, Seq(seq.0.saturating_sub(1)), 1)
            .await
        {
            Ok(v) => v.into_iter().next().filter(|m| m.seq == seq && seq.0 != 0),
            Err(e) => {
                tracing::warn!("file download of group {group}: {e}");
                return refuse(round, ErrorCode::Unavailable, "store unavailable, retry");
            }
        };
        let Some(m) = found else {
            let why = format!("no post {} in group {group}", seq.0);
            return refuse(round, ErrorCode::NotFound, &why);
        };
        let file = match FileRef::from_body(&m.body) {
            Ok(Some(f)) if m.conv != CONV_RECALL => f,
            _ => {
                let why = format!("post {} is not a file message", seq.0);
                return refuse(round, ErrorCode::NotFound, &why);
            }
        };
        match self
            .large_recalled_once(group, m.msg_id, m.server_time_ms, Some(m.seq))
            .await
        {
            Ok(Some(false)) => {}
            Ok(_) => {
                let why = format!("post {} was recalled", seq.0);
                return refuse(round, ErrorCode::NotFound, &why);
            }
            Err(e) => {
                tracing::warn!("file download of group {group}: {e}");
                return refuse(round, ErrorCode::Unavailable, "store unavailable, retry");
            }
        }
        let url = files::file_url(&p, self.now, actor, &file.sha256, &file.mime, req_id);
        round.send(conn, url);
    }

    /// Owner side: a page of the member list (`GroupMembers`).
    pub(super) fn members_page(
        &mut self,
        group: GroupId,
        after: UserId,
        limit: u16,
        reply: Reply,
        round: &mut Round,
    ) {
        let limit = match limit as usize {
            0 => MEMBERS_PAGE,
            n => n.min(MEMBERS_PAGE),
        };
        let g = &self.groups[&group];
        let from = std::ops::Bound::Excluded(after);
        let mut it = g.members.range((from, std::ops::Bound::Unbounded));
        let members: Vec<(UserId, u8)> = it.by_ref().take(limit).map(|(u, r)| (*u, *r)).collect();
        let more = it.next().is_some();
        let total = g.members.len() as u32;
        if let Reply::Conn { conn, req_id } = reply {
            let page = Command::GroupMembersPage {
                group,
                total,
                more,
                members,
            };
            round.send(conn, page.to_bytes(req_id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Large;

    #[test]
    fn the_posting_limit_takes_a_burst_then_the_rate_and_survives_a_clock_step_back() {
        let mut l = Large::at(0);
        let t = 1_700_000_000_000;
        assert!((0..10).all(|_| l.admit(t, 10)), "a burst of 10");
        assert!(!l.admit(t, 10), "the 11th in the same ms");
        assert!(l.admit(t + 100, 10), "one more 100 ms later");
        assert!(!l.admit(t + 100, 10));
        // The wall clock steps back a minute: posts go on at the rate instead of being refused
        // until the clock has caught up.
        assert!((0..10).all(|_| l.admit(t - 60_000, 10)));
        assert!(!l.admit(t - 60_000, 10));
    }
}
