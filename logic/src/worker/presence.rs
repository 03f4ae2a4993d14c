//! Presence and typing indicators: ephemeral, never stored, never answered from the store.
//!
//! **Presence.** A connection follows up to [`MAX_PRESENCE_SUBSCRIPTIONS`] users
//! (`PresenceSubscribe` replaces its list). The worker of the connection (the *watcher*) keeps,
//! per followed user, its local followers and the last state it heard; it asks each followed
//! user's owner worker to `Watch` that user once, whatever the number of its local followers,
//! and tells the owner when its last local follower is gone. The owner keeps, per user of its
//! own, the set of watcher workers, and sends each of them one `Presence` message per change.
//! So a change costs one message per watcher worker (at most the cluster's worker count) plus
//! one frame per following connection, whatever the number of followers elsewhere.
//!
//! A user is online while one of its devices is logged in. When the last one leaves, followers
//! are told only once it has stayed away for `presence_offline_delay_ms` (a phone that
//! reconnects within it, e.g. switching networks, never appears offline), with the time it
//! left (`last_seen_ms`). That time is known only for users who left while this process ran
//! (and whose state is still cached): otherwise 0, "not known".
//!
//! **Privacy.** A user may hide its presence (`PresencePrivacy`, stored as
//! [`im_store::FLAG_PRESENCE_HIDDEN`]): its followers then see it offline with no last-seen time,
//! whatever its devices do. The owner reads the setting from the store when the user gets its
//! first watcher (a read that fails counts as hidden, and is tried again at the next watch) and
//! keeps it while the user is watched.
//!
//! Watches live in memory. A watcher whose connection closes drops its watches; after a peer
//! link changed (the other node may have restarted), the watcher sends its watches for that
//! node's users again, and the owner answers the current state. An owner that tells a watcher
//! about a user nobody there follows any more is told to stop (`Watch` off).
//!
//! **Typing.** `Typing` in a c2c conversation goes to the peer's owner, which tells the peer's
//! devices; in a group, to the group's owner, which checks membership and tells the online
//! devices of every other member (groups of at most [`MAX_TYPING_GROUP`] members). A connection
//! may send [`TYPING_BURST`] at once and one every [`TYPING_EVERY_MS`] on average; above that
//! the command is refused `Overloaded` and nothing is forwarded. A notice stands for
//! [`TYPING_TTL_MS`] unless repeated, so a client that vanishes mid-typing clears by itself.

use im_shared::proto::{
    PresenceEntry, CONV_C2C, CONV_C2G, MAX_PRESENCE_SUBSCRIPTIONS, MAX_TYPING_GROUP, TYPING_TTL_MS,
};

use super::*;

/// How often a worker looks for offline changes whose delay ran out.
pub(super) const PRESENCE_CHECK_EVERY: Duration = Duration::from_millis(250);
/// A connection may send one `Typing` per this many ms on average ...
pub(crate) const TYPING_EVERY_MS: u64 = 500;
/// ... and this many at once.
pub(crate) const TYPING_BURST: u64 = 5;

#[derive(Default)]
pub(super) struct Presence {
    /// Watcher side: the users each local connection follows.
    subs: HashMap<ConnId, Vec<UserId>>,
    /// Watcher side: the local connections following each user.
    followers: HashMap<UserId, Vec<ConnId>>,
    /// Watcher side: the last state the owner sent of each followed user.
    known: HashMap<UserId, PresenceEntry>,
    /// Owner side: the global workers following each user of this worker.
    watchers: HashMap<UserId, Vec<u32>>,
    /// Owner side: the privacy setting of watched users of this worker (true: hidden).
    hidden: HashMap<UserId, bool>,
    /// Owner side: when users of this worker last left (ms), while this process ran.
    last_seen: HashMap<UserId, u64>,
    /// Owner side: users whose last device left and whose followers have not been told yet ...
    going: HashSet<UserId>,
    /// ... and when they are told, in order.
    going_due: VecDeque<(u64, UserId)>,
}

impl Presence {
    /// Whether an offline change waits for its delay (the worker's presence timer runs).
    pub(super) fn offline_pending(&self) -> bool {
        !self.going_due.is_empty()
    }

    /// Forgets when evicted users left and the privacy of evicted users nobody watches (they are
    /// no longer cached: see `trim_caches`).
    pub(super) fn retain_last_seen(&mut self, cached: impl Fn(&UserId) -> bool) {
        self.last_seen.retain(|u, _| cached(u));
        let watchers = &self.watchers;
        self.hidden
            .retain(|u, _| cached(u) || watchers.contains_key(u));
    }

    /// Local followers and known states held (for tests).
    #[cfg(test)]
    pub(super) fn sizes(&self) -> (usize, usize, usize) {
        (self.subs.len(), self.followers.len(), self.watchers.len())
    }
}

/// Watch changes for one owner worker: users to start and to stop following.
type WatchOut = HashMap<usize, (Vec<UserId>, Vec<UserId>)>;

impl<S: Store> Worker<S> {
    /// `PresenceSubscribe`: the connection now follows exactly `users`.
    pub(super) fn on_presence_subscribe(
        &mut self,
        conn: ConnId,
        req_id: u32,
        mut users: Vec<UserId>,
        round: &mut Round,
    ) {
        if users.len() > MAX_PRESENCE_SUBSCRIPTIONS {
            let why = format!("presence: at most {MAX_PRESENCE_SUBSCRIPTIONS} users");
            return round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, &why));
        }
        if users.contains(&UserId(0)) {
            let why = "presence: user 0 does not exist";
            return round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, why));
        }
        users.sort_unstable();
        users.dedup();
        let old = self.presence.subs.remove(&conn).unwrap_or_default();
        let mut out = WatchOut::new();
        for u in old.iter().filter(|u| users.binary_search(u).is_err()) {
            self.unfollow(conn, *u, &mut out);
        }
        let mut now_known = Vec::new();
        for u in users.iter().filter(|u| old.binary_search(u).is_err()) {
            let fs = self.presence.followers.entry(*u).or_default();
            fs.push(conn);
            if fs.len() == 1 {
                out.entry(self.owner(*u)).or_default().0.push(*u);
            } else if let Some(e) = self.presence.known.get(u) {
                now_known.push(*e);
            }
        }
        if !users.is_empty() {
            self.presence.subs.insert(conn, users);
        }
        self.send_watches(out);
        round.send(conn, op_ok(req_id, 0));
        if !now_known.is_empty() {
            let notice = Command::PresenceNotice { entries: now_known };
            round.send(conn, notice.to_bytes(0));
        }
    }

    /// A closed connection follows nobody any more.
    pub(super) fn unsubscribe_all(&mut self, conn: ConnId) {
        let Some(old) = self.presence.subs.remove(&conn) else {
            return;
        };
        let mut out = WatchOut::new();
        for u in old {
            self.unfollow(conn, u, &mut out);
        }
        self.send_watches(out);
    }

    /// Drops `conn` from the followers of `u`; the last one gone stops the watch.
    fn unfollow(&mut self, conn: ConnId, u: UserId, out: &mut WatchOut) {
        let Some(fs) = self.presence.followers.get_mut(&u) else {
            return;
        };
        fs.retain(|c| *c != conn);
        if fs.is_empty() {
            self.presence.followers.remove(&u);
            self.presence.known.remove(&u);
            out.entry(self.owner(u)).or_default().1.push(u);
        }
    }

    fn send_watches(&self, out: WatchOut) {
        let watcher = self.router.global(self.idx) as u32;
        for (w, (on, off)) in out {
            let req = WatchReq { watcher, on, off };
            self.router.send(self.idx, w, WorkerMsg::Watch(req));
        }
    }

    /// After a link to `node` changed: watch that node's followed users again.
    pub(super) fn rewatch(&mut self, node: usize) {
        let mut out = WatchOut::new();
        for u in self.presence.followers.keys() {
            let w = self.owner(*u);
            if self.router.node_of(w) == node {
                out.entry(w).or_default().0.push(*u);
            }
        }
        self.send_watches(out);
    }

    /// Owner side: a watcher starts or stops following users of this worker; the ones it
    /// starts get their current state.
    pub(super) async fn on_watch(&mut self, req: WatchReq) {
        let p = &mut self.presence;
        for u in &req.off {
            if let Some(ws) = p.watchers.get_mut(u) {
                ws.retain(|w| *w != req.watcher);
                if ws.is_empty() {
                    p.watchers.remove(u);
                    p.hidden.remove(u);
                }
            }
        }
        let mut states = Vec::with_capacity(req.on.len());
        for u in req.on {
            if !self.presence.hidden.contains_key(&u) {
                match self.store.user_flags(u).await {
                    Ok(f) => {
                        let hidden = f.contains(&im_store::FLAG_PRESENCE_HIDDEN);
                        self.presence.hidden.insert(u, hidden);
                    }
                    Err(e) => {
                        // Shown as hidden this time (never reveal what the user may have hidden).
                        tracing::warn!("presence setting of {u}: {e}");
                    }
                }
            }
            let ws = self.presence.watchers.entry(u).or_default();
            if !ws.contains(&req.watcher) {
                ws.push(req.watcher);
            }
            states.push(self.presence_of(u));
        }
        if !states.is_empty() {
            let to = req.watcher as usize;
            self.router.send(self.idx, to, WorkerMsg::Presence(states));
        }
    }

    /// Owner side: the state followers see of `u`, a user of this worker (offline, not known,
    /// for a hidden user or one whose setting could not be read).
    fn presence_of(&self, u: UserId) -> PresenceEntry {
        if self.presence.hidden.get(&u) != Some(&false) {
            return PresenceEntry {
                uid: u,
                online: false,
                last_seen_ms: 0,
            };
        }
        let online = self.online(u) || self.presence.going.contains(&u);
        PresenceEntry {
            uid: u,
            online,
            last_seen_ms: if online {
                0
            } else {
                self.presence.last_seen.get(&u).copied().unwrap_or(0)
            },
        }
    }

    /// Owner side: tells every watcher of these users their state.
    fn announce(&self, users: &[UserId]) {
        let mut by_worker: HashMap<u32, Vec<PresenceEntry>> = HashMap::new();
        for u in users {
            if let Some(ws) = self.presence.watchers.get(u) {
                let e = self.presence_of(*u);
                for w in ws {
                    by_worker.entry(*w).or_default().push(e);
                }
            }
        }
        for (w, entries) in by_worker {
            self.router
                .send(self.idx, w as usize, WorkerMsg::Presence(entries));
        }
    }

    /// Owner side: the first device of `uid` logged in.
    pub(super) fn came_online(&mut self, uid: UserId) {
        if self.presence.going.remove(&uid) {
            // Back within the delay: its followers never saw it leave.
            return;
        }
        self.announce(&[uid]);
    }

    /// Owner side: the last device of `uid` left; followers are told after the delay.
    pub(super) fn went_offline(&mut self, uid: UserId) {
        let p = &mut self.presence;
        p.last_seen.insert(uid, self.now);
        if p.going.insert(uid) {
            let due = self.now + self.cfg.presence_offline_delay_ms;
            p.going_due.push_back((due, uid));
        }
    }

    /// Owner side: announces the users that stayed away for the whole delay.
    pub(super) fn presence_due(&mut self, now: u64) {
        let mut gone = Vec::new();
        while let Some(&(due, u)) = self.presence.going_due.front() {
            if due > now {
                break;
            }
            self.presence.going_due.pop_front();
            if self.presence.going.remove(&u) && !self.online(u) {
                gone.push(u);
            }
        }
        if !gone.is_empty() {
            self.announce(&gone);
        }
    }

    /// Watcher side: states from an owner, for the local connections that follow those users.
    pub(super) fn on_presence(&mut self, entries: Vec<PresenceEntry>, round: &mut Round) {
        let mut per_conn: HashMap<ConnId, Vec<PresenceEntry>> = HashMap::new();
        let mut out = WatchOut::new();
        for e in entries {
            let Some(fs) = self.presence.followers.get(&e.uid) else {
                // Nobody here follows this user any more (a watch that crossed its stop).
                out.entry(self.owner(e.uid)).or_default().1.push(e.uid);
                continue;
            };
            if self.presence.known.insert(e.uid, e) == Some(e) {
                continue;
            }
            for c in fs {
                per_conn.entry(*c).or_default().push(e);
            }
        }
        self.send_watches(out);
        for (conn, entries) in per_conn {
            round.send(conn, Command::PresenceNotice { entries }.to_bytes(0));
        }
    }

    /// `PresencePrivacy` of `uid` (a user of this worker): stored, then its followers see the
    /// result.
    pub(super) fn on_presence_privacy(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        hidden: bool,
        round: &mut Round,
    ) {
        round.batch.push(Op::UserFlag {
            uid,
            flag: im_store::FLAG_PRESENCE_HIDDEN,
            on: hidden,
        });
        round.send(conn, op_ok(req_id, 0));
        // Kept even while nobody watches: a watch later in this round must not read the store's
        // older value before this round commits.
        self.presence.hidden.insert(uid, hidden);
        self.announce(&[uid]);
    }

    /// `Typing` from a logged-in connection of `uid`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_typing(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        conv: u8,
        peer: u64,
        state: u8,
        round: &mut Round,
    ) {
        let refuse = |round: &mut Round, code: ErrorCode, why: &str| {
            round.send(conn, error_frame(code, req_id, why));
        };
        if state > 1 {
            return refuse(
                round,
                ErrorCode::InvalidArgument,
                "typing: state must be 0 or 1",
            );
        }
        let target = match conv {
            CONV_C2C if peer != 0 && peer != uid.0 => Ok(UserId(peer)),
            CONV_C2C => {
                return refuse(
                    round,
                    ErrorCode::InvalidArgument,
                    "typing: peer must be another user",
                )
            }
            CONV_C2G if peer != 0 => Err(GroupId(peer)),
            CONV_C2G => return refuse(round, ErrorCode::InvalidArgument, "typing: group 0"),
            _ => {
                return refuse(
                    round,
                    ErrorCode::InvalidArgument,
                    "typing: conv must be 1 (c2c) or 2 (c2g)",
                )
            }
        };
        // GCRA: at most TYPING_BURST at once, one per TYPING_EVERY_MS on average.
        let now = self.now;
        let Some(s) = self.device(uid, conn) else {
            return;
        };
        let tat = s.typing_tat.max(now);
        if tat > now + (TYPING_BURST - 1) * TYPING_EVERY_MS {
            Metrics::inc(&self.metrics.typing_refused);
            let why = format!(
                "typing: at most {} a second (burst {TYPING_BURST})",
                1000 / TYPING_EVERY_MS
            );
            return refuse(round, ErrorCode::Overloaded, &why);
        }
        s.typing_tat = tat + TYPING_EVERY_MS;
        match target {
            Ok(to) => {
                if let Err((code, why)) = self.org_allows_c2c(uid, to) {
                    return refuse(round, code, &why);
                }
                Metrics::inc(&self.metrics.typing_sent);
                round.typing_out[self.owner(to)].push(TypingNote {
                    to: vec![to],
                    from: uid,
                    conv,
                    peer: uid.0,
                    state,
                });
                round.send(conn, op_ok(req_id, 0));
            }
            Err(group) => {
                let op = GroupOp::Typing { state };
                self.forward_group(uid, group, op, Reply::Conn { conn, req_id }, round);
            }
        }
    }

    /// Group owner side: `actor` (a member) types in `group`: tell every other member's worker.
    pub(super) fn group_typing(
        &mut self,
        group: GroupId,
        actor: UserId,
        state: u8,
        reply: Reply,
        round: &mut Round,
    ) {
        let members = &self.groups[&group].members;
        if members.len() > MAX_TYPING_GROUP {
            let e = ApiError::new(
                ErrorCode::InvalidArgument,
                format!("typing is not shown in groups of more than {MAX_TYPING_GROUP} members"),
            );
            return self.refuse(reply, &GroupOp::Typing { state }, e, round);
        }
        let mut to: Vec<Vec<UserId>> = vec![Vec::new(); round.typing_out.len()];
        for m in members.keys().filter(|m| **m != actor) {
            to[self.router.owner(*m)].push(*m);
        }
        for (w, users) in to.into_iter().enumerate() {
            if !users.is_empty() {
                round.typing_out[w].push(TypingNote {
                    to: users,
                    from: actor,
                    conv: CONV_C2G,
                    peer: group.0,
                    state,
                });
            }
        }
        Metrics::inc(&self.metrics.typing_sent);
        round.reply(reply, ApiOk::Done, |r| op_ok(r, group.0));
    }

    /// Typing notices for users of this worker: to each of their online devices.
    pub(super) fn on_typing_notes(&mut self, notes: Vec<TypingNote>, round: &mut Round) {
        for n in notes {
            let frame = Command::TypingNotice {
                conv: n.conv,
                peer: n.peer,
                from: n.from,
                state: n.state,
                ttl_ms: TYPING_TTL_MS,
            }
            .to_bytes(0);
            for u in &n.to {
                for d in devices_of(&self.users, *u) {
                    round.send(d.conn, frame.clone());
                }
            }
        }
    }
}
