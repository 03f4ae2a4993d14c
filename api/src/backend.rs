//! What the HTTP API needs from the logic tier: [`ApiBackend`], implemented by
//! [`crate::LogicHandle`]. Every call is answered by the worker that owns the user or group, after
//! the worker's group commit (so an `Ok` means durable).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use im_shared::org::{OrgChange, OrgTree};
use im_shared::proto::GroupDesc;
use im_shared::{ErrorCode, GroupId, MsgId, UserId};

/// A boxed, `Send` future (the API server and the workers run on different runtimes).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the logic tier refused or failed a call: a protocol [`ErrorCode`] and a readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// A group and its `(member, role)` list.
pub type GroupWithMembers = (GroupDesc, Vec<(UserId, u8)>);

/// Recipients of a server push (s2c).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushTarget {
    /// One or more users (each gets the message in their timeline).
    Users(Vec<UserId>),
    /// Every member of a group (through the group's owner), mentioning these members (`@user`;
    /// uid 0 is `@all`; they matter in a large group only: PROTOCOL.md "SendC2g").
    Group(GroupId, Vec<UserId>),
}

/// A message the logic tier accepted (durably, with its fan-out recorded in the outbox).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub msg_id: MsgId,
    pub server_time_ms: u64,
}

/// The logic operations behind the HTTP API.
pub trait ApiBackend: Send + Sync + 'static {
    /// s2c: `from` (a business account id) sends `body` to `target`. `request_id` (non-zero) makes
    /// the call idempotent: a retry with the same `(from, request_id)` returns the first result.
    fn server_send(
        &self,
        from: UserId,
        target: PushTarget,
        body: Bytes,
        request_id: u64,
    ) -> BoxFut<'_, Result<Accepted, ApiError>>;
    /// Creates a group owned by `owner` with `members` (the owner is added). A non-zero
    /// `client_id` makes the create idempotent: the same owner and `client_id` answer the group
    /// the first call made.
    fn group_create(
        &self,
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        client_id: u64,
    ) -> BoxFut<'_, Result<GroupId, ApiError>>;
    /// Adds members (administrative: no owner check).
    fn group_add(&self, group: GroupId, members: Vec<UserId>) -> BoxFut<'_, Result<(), ApiError>>;
    /// Removes members (administrative; the owner cannot be removed).
    fn group_remove(
        &self,
        group: GroupId,
        members: Vec<UserId>,
    ) -> BoxFut<'_, Result<(), ApiError>>;
    /// The group and its `(member, role)` list.
    fn group_info(&self, group: GroupId) -> BoxFut<'_, Result<GroupWithMembers, ApiError>>;
    /// Groups `uid` belongs to, with their names.
    fn groups_of(&self, uid: UserId) -> BoxFut<'_, Result<Vec<(GroupId, String)>, ApiError>>;
    /// Appends the logic tier's metrics in Prometheus text format.
    fn metrics(&self, out: &mut String);
    /// Changes the organisation tree; the answer is the tree's version afterwards.
    fn org_change(&self, change: OrgChange) -> BoxFut<'_, Result<u64, ApiError>> {
        let _ = change;
        Box::pin(async { Err(no_org()) })
    }
    /// The tree as this node's cache has it, read by `f` (the API sees hidden departments too).
    fn org_read(&self, f: &mut dyn FnMut(&OrgTree)) -> Result<(), ApiError> {
        let _ = f;
        Err(no_org())
    }
}

fn no_org() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "no organisation tree here: it is on the logic nodes",
    )
}

/// The backend of a status-only server (a gate process): it has no logic tier, and its
/// server answers no business route (`ApiServer::start_status`), so these are never reached.
pub(crate) struct NoBackend;

impl NoBackend {
    fn none<T: Send + 'static>() -> BoxFut<'static, Result<T, ApiError>> {
        Box::pin(async {
            Err(ApiError::new(
                ErrorCode::Unavailable,
                "no logic tier here: the business API is on the logic nodes",
            ))
        })
    }
}

impl ApiBackend for NoBackend {
    fn server_send(
        &self,
        _: UserId,
        _: PushTarget,
        _: Bytes,
        _: u64,
    ) -> BoxFut<'_, Result<Accepted, ApiError>> {
        Self::none()
    }
    fn group_create(
        &self,
        _: UserId,
        _: String,
        _: Vec<UserId>,
        _: u64,
    ) -> BoxFut<'_, Result<GroupId, ApiError>> {
        Self::none()
    }
    fn group_add(&self, _: GroupId, _: Vec<UserId>) -> BoxFut<'_, Result<(), ApiError>> {
        Self::none()
    }
    fn group_remove(&self, _: GroupId, _: Vec<UserId>) -> BoxFut<'_, Result<(), ApiError>> {
        Self::none()
    }
    fn group_info(&self, _: GroupId) -> BoxFut<'_, Result<GroupWithMembers, ApiError>> {
        Self::none()
    }
    fn groups_of(&self, _: UserId) -> BoxFut<'_, Result<Vec<(GroupId, String)>, ApiError>> {
        Self::none()
    }
    fn metrics(&self, _: &mut String) {}
}
