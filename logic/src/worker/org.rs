//! The organisation tree in a worker: clients' reads from the node's cache, the owner worker's
//! changes (committed in a batch of their own, then applied to the cache), `OrgChanged` notices,
//! and the refresh of a node that does not own the tree (see `crate::org`).

use std::time::Duration;

use im_shared::org::{OrgError, OrgRecord, MAX_ORG_PAGE, MAX_SEARCH_LEN};
use im_shared::{Command, ConnId, ErrorCode, UserId};

use super::{error_frame, ApiOk, ApiReplyTx, Round, Worker, WorkerMsg};
use crate::api::ApiError;
use crate::org::{self, OrgChange, IMPORT_CHUNK};
use crate::store::{Store, StoreError, WriteBatch};

/// How often a worker that keeps a node's cache fresh looks for records other nodes wrote.
pub(crate) const ORG_REFRESH_EVERY: Duration = Duration::from_secs(1);

/// How long a pull waits for its answer before the next tick sends another.
pub(crate) const ORG_PULL_TIMEOUT_MS: u64 = 5000;

/// Least time between two `OrgChanged` notices to a connection.
pub(crate) const ORG_NOTICE_EVERY_MS: u64 = 1000;

/// The API error of a refused change.
pub(crate) fn org_error(e: OrgError) -> ApiError {
    match e {
        OrgError::Invalid(m) => ApiError::new(ErrorCode::InvalidArgument, m),
        OrgError::NotFound(m) => ApiError::new(ErrorCode::NotFound, m),
        OrgError::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
    }
}

impl<S: Store> Worker<S> {
    /// Whether this worker keeps its node's cache fresh (worker 0 of every node).
    pub(super) fn keeps_org(&self) -> bool {
        self.idx == 0
    }

    /// Brings the node's cache up to date: from the store on the node that owns the tree,
    /// otherwise by asking the owner over the peer link (each node of a cluster of embedded
    /// stores has only its own shards' data; with a shared store the owner's answer is the
    /// same). A failure is logged and retried at the next tick.
    pub(super) async fn org_refresh(&mut self) {
        if !self.router.owns(org::ORG_ROUTE) {
            // One pull at a time (an answer sends the next one at once); a lost one is
            // replaced after ORG_PULL_TIMEOUT_MS.
            if self
                .org_pulled_at
                .is_some_and(|at| self.now < at + ORG_PULL_TIMEOUT_MS)
            {
                return;
            }
            self.send_org_pull(self.services.org.version());
            return;
        }
        self.org_refresh_from_store().await;
    }

    /// Asks the tree's owner for its records above `since` (the pull in flight from now).
    fn send_org_pull(&mut self, since: u64) {
        self.org_pulled_at = Some(self.now);
        let owner = self.router.owner(org::ORG_ROUTE);
        let reply_to = self.router.global(self.idx);
        self.router
            .send(self.idx, owner, WorkerMsg::OrgPull { reply_to, since });
    }

    async fn org_refresh_from_store(&mut self) {
        let cache = self.services.org.clone();
        let before = cache.version();
        match org::refresh(&self.store, &cache).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(worker = self.idx, records = n, before, "org: refreshed");
                self.org_notify(cache.version());
            }
            Err(e) => tracing::warn!(worker = self.idx, "org: refresh failed, retrying: {e}"),
        }
    }

    /// On the owner: another node's worker asks for the records above `since`.
    pub(super) async fn on_org_pull(&mut self, reply_to: usize, since: u64) {
        let cache = self.services.org.clone();
        if !cache.loaded() {
            self.org_refresh_from_store().await;
            if !cache.loaded() {
                return; // the store failed: the asker asks again at its next tick
            }
        }
        let records: Vec<OrgRecord> = cache
            .read()
            .changes_since(since, IMPORT_CHUNK)
            .into_iter()
            .cloned()
            .collect();
        self.router
            .send(self.idx, reply_to, WorkerMsg::OrgRecords(records));
    }

    /// On a node that does not own the tree: the owner's answer. A non-empty answer is applied
    /// and followed at once by the next pull (until one comes back empty).
    pub(super) fn on_org_records(&mut self, records: Vec<OrgRecord>) {
        let cache = self.services.org.clone();
        if records.is_empty() {
            // Caught up with the owner: only now may reads (and the c2c policy) rely on it.
            self.org_pulled_at = None;
            cache.mark_loaded();
            return;
        }
        let version = cache.apply(records);
        self.org_notify(version);
        self.send_org_pull(version);
    }

    /// Tells every worker of this node that the tree is at `version`.
    fn org_notify(&self, version: u64) {
        for w in 0..self.cfg.workers.max(1) {
            let _ = self.router.local(w).send(WorkerMsg::OrgChanged(version));
        }
    }

    /// Sends the waiting `OrgChanged` notice to every connection of this worker, unless one went
    /// out less than [`ORG_NOTICE_EVERY_MS`] ago (then a later round sends it: a burst of changes,
    /// e.g. an HR system updating people one call at a time, costs each connection at most one
    /// notice a second, carrying the newest version).
    pub(super) fn org_notice_due(&mut self, round: &mut Round) {
        let (last, pending) = self.org_notice;
        let Some(version) = pending else { return };
        if self.now < last + ORG_NOTICE_EVERY_MS {
            return;
        }
        self.org_notice = (self.now, None);
        let frame = Command::OrgChanged { version }.to_bytes(0);
        for d in self.users.values().flat_map(|u| u.devices.iter()) {
            round.send(d.conn, frame.clone());
        }
    }

    /// A change from the HTTP API, on the worker that owns the tree.
    pub(super) async fn on_org_change(
        &mut self,
        change: OrgChange,
        reply: ApiReplyTx,
        round: &mut Round,
    ) {
        let r = self.org_change(change).await;
        round.api.push((reply, r.map(ApiOk::Org)));
    }

    async fn org_change(&mut self, change: OrgChange) -> Result<u64, ApiError> {
        let unavailable = |e: StoreError| {
            tracing::warn!("org: store: {e}");
            ApiError::new(ErrorCode::Unavailable, "store unavailable, retry")
        };
        let cache = self.services.org.clone();
        if !self.router.owns(org::ORG_ROUTE) {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "this node no longer owns the organisation tree, retry",
            ));
        }
        // Catch up first: a node that took the tree over from another sees its last records.
        org::refresh(&self.store, &cache)
            .await
            .map_err(unavailable)?;
        let planned = org::plan(&cache.read(), change).map_err(org_error)?;
        if planned.is_empty() {
            return Ok(cache.version());
        }
        for chunk in planned.chunks(IMPORT_CHUNK) {
            let mut batch = WriteBatch {
                ops: org::ops(chunk),
                writer: None,
            };
            if let Some(lease) = &self.cfg.lease {
                crate::ownership::wait_valid(lease, self.idx).await;
                batch.writer = Some(lease.writer());
            }
            match self.store.commit(batch).await {
                Ok(()) => {}
                Err(e @ StoreError::Fenced { .. }) => crate::ownership::exit_fenced(&e.to_string()),
                Err(e) if e.is_retryable() => return Err(unavailable(e)),
                Err(e) => {
                    tracing::error!(worker = self.idx, "org commit failed, aborting: {e}");
                    std::process::abort();
                }
            }
            cache.apply(chunk.iter().map(|(r, _)| r.clone()));
        }
        let version = cache.version();
        self.org_notify(version);
        Ok(version)
    }

    /// `OrgSync`, `OrgDept`, `OrgUser`, `OrgSearch` from a client: answered from the cache.
    pub(super) fn on_org_read(
        &mut self,
        conn: ConnId,
        uid: UserId,
        req_id: u32,
        cmd: Command,
        round: &mut Round,
    ) {
        let cache = self.services.org.clone();
        if !cache.loaded() {
            round.send(
                conn,
                error_frame(
                    ErrorCode::Unavailable,
                    req_id,
                    "the organisation tree is loading, retry",
                ),
            );
            return;
        }
        let tree = cache.read();
        let viewer = uid.0;
        let limit = |l: u16| usize::from(l).clamp(1, MAX_ORG_PAGE);
        let frame = match cmd {
            Command::OrgSync { since, limit: l } => {
                let version = tree.version();
                let page = tree.changes_since(since, limit(l));
                let next = page.last().map_or(version.max(since), |r| r.version);
                let more = next < version;
                // A removal, and what the viewer may not see, go out as the bare key.
                let records = page
                    .into_iter()
                    .map(|r| {
                        if !r.deleted && tree.record_visible_to(viewer, r) {
                            r.clone()
                        } else {
                            r.removal()
                        }
                    })
                    .collect();
                Command::OrgPage {
                    version,
                    next,
                    more,
                    records,
                }
            }
            Command::OrgDept {
                dept,
                offset,
                limit: l,
            } => match tree.dept_view(viewer, dept, offset as usize, limit(l)) {
                Some(v) => Command::OrgReply {
                    version: tree.version(),
                    total: v.members_total as u32,
                    records: v
                        .dept
                        .into_iter()
                        .chain(v.children)
                        .chain(v.members)
                        .collect(),
                },
                None => {
                    round.send(
                        conn,
                        error_frame(
                            ErrorCode::NotFound,
                            req_id,
                            &format!("no department {dept}"),
                        ),
                    );
                    return;
                }
            },
            Command::OrgUser { uid: who } => {
                let records = tree.user_view(viewer, who.0);
                if records.is_empty() {
                    round.send(
                        conn,
                        error_frame(
                            ErrorCode::NotFound,
                            req_id,
                            &format!("user {who} is not in the organisation tree"),
                        ),
                    );
                    return;
                }
                Command::OrgReply {
                    version: tree.version(),
                    total: 1,
                    records,
                }
            }
            Command::OrgSearch { query, limit: l } => {
                if query.trim().is_empty() || query.trim().len() > MAX_SEARCH_LEN {
                    round.send(
                        conn,
                        error_frame(
                            ErrorCode::InvalidArgument,
                            req_id,
                            &format!("the query must have 1..={MAX_SEARCH_LEN} bytes"),
                        ),
                    );
                    return;
                }
                let (records, total) = tree.search(viewer, query.trim(), limit(l));
                Command::OrgReply {
                    version: tree.version(),
                    total: total as u32,
                    records,
                }
            }
            _ => return,
        };
        drop(tree);
        round.send(conn, frame.to_bytes(req_id));
    }

    /// The c2c policy: with `org_visibility` on, a user may start a chat only with users it sees in
    /// the tree. `Err`: the error frame's code and message.
    pub(super) fn org_allows_c2c(
        &self,
        from: UserId,
        to: UserId,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.cfg.org_visibility {
            return Ok(());
        }
        let cache = &self.services.org;
        if !cache.loaded() {
            return Err((
                ErrorCode::Unavailable,
                "the organisation tree is loading, retry".into(),
            ));
        }
        if cache.read().user_visible_to(from.0, to.0) {
            Ok(())
        } else {
            Err((
                ErrorCode::Forbidden,
                format!("user {to} is not visible to you in the organisation tree"),
            ))
        }
    }
}
