//! The organisation tree's endpoints (docs/API.md "Organisation tree"): a business server
//! creates, moves, renames and deletes departments, puts users in them, imports a whole tree, and
//! reads a department or a user. Every change answers the tree's version after it.

use im_shared::org::{
    OrgChange, OrgDept, OrgEntity, OrgMember, OrgPerson, OrgRecord, OrgTree, ADMIN, MAX_ORG_PAGE,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::json::Id;
use super::server::{bad_request, call, ok, Fail, Resp, State};
use super::ApiError;

/// Largest body of `POST /v1/org/import` (a company of 100 000 people is ~10 MB of JSON).
pub const MAX_IMPORT_BODY: usize = 64 << 20;
/// Most departments plus users of one import.
pub const MAX_IMPORT_ITEMS: usize = 1_000_000;

/// `PUT /v1/org/departments/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeptReq {
    #[serde(default)]
    pub parent: Option<Id>,
    pub name: String,
    #[serde(default)]
    pub order: Option<u32>,
    #[serde(default)]
    pub hidden: Option<bool>,
}

/// One membership of a user in `PUT /v1/org/users/{uid}` and the import.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MembershipReq {
    pub dept: Id,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub order: Option<u32>,
}

/// `PUT /v1/org/users/{uid}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserReq {
    pub name: String,
    #[serde(default)]
    pub departments: Vec<MembershipReq>,
}

/// A department of the import.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportDept {
    pub id: Id,
    #[serde(default)]
    pub parent: Option<Id>,
    pub name: String,
    #[serde(default)]
    pub order: Option<u32>,
    #[serde(default)]
    pub hidden: Option<bool>,
}

/// A user of the import.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportUser {
    pub uid: Id,
    pub name: String,
    #[serde(default)]
    pub departments: Vec<MembershipReq>,
}

/// `POST /v1/org/import`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportReq {
    #[serde(default)]
    pub replace: Option<bool>,
    #[serde(default)]
    pub departments: Vec<ImportDept>,
    #[serde(default)]
    pub users: Vec<ImportUser>,
}

fn dept(
    id: u64,
    parent: Option<Id>,
    name: String,
    order: Option<u32>,
    hidden: Option<bool>,
) -> OrgDept {
    OrgDept {
        id,
        parent: parent.map_or(0, |p| p.0),
        order: order.unwrap_or(0),
        hidden: hidden.unwrap_or(false),
        name,
    }
}

fn memberships(uid: u64, list: Vec<MembershipReq>) -> Vec<OrgMember> {
    list.into_iter()
        .map(|m| OrgMember {
            uid,
            dept: m.dept.0,
            order: m.order.unwrap_or(0),
            title: m.title.unwrap_or_default(),
        })
        .collect()
}

async fn change(state: &State, c: OrgChange) -> Result<Resp, Fail> {
    let version = call(state.backend.org_change(c)).await?;
    Ok(ok(json!({ "version": version })))
}

pub(crate) async fn put_dept(state: &State, id: u64, body: &[u8]) -> Result<Resp, Fail> {
    let r: DeptReq = super::server::parse(body)?;
    change(
        state,
        OrgChange::PutDept(dept(id, r.parent, r.name, r.order, r.hidden)),
    )
    .await
}

pub(crate) async fn delete_dept(state: &State, id: u64) -> Result<Resp, Fail> {
    change(state, OrgChange::DeleteDept(id)).await
}

pub(crate) async fn put_user(state: &State, uid: u64, body: &[u8]) -> Result<Resp, Fail> {
    let r: UserReq = super::server::parse(body)?;
    let person = OrgPerson { uid, name: r.name };
    let depts = memberships(uid, r.departments);
    change(state, OrgChange::PutUser { person, depts }).await
}

pub(crate) async fn delete_user(state: &State, uid: u64) -> Result<Resp, Fail> {
    change(state, OrgChange::DeleteUser(uid)).await
}

pub(crate) async fn import(state: &State, body: &[u8]) -> Result<Resp, Fail> {
    let r: ImportReq = super::server::parse(body)?;
    if r.departments.len() + r.users.len() > MAX_IMPORT_ITEMS {
        return Err(bad_request(format!(
            "an import has at most {MAX_IMPORT_ITEMS} departments and users"
        )));
    }
    let depts = r
        .departments
        .into_iter()
        .map(|d| dept(d.id.0, d.parent, d.name, d.order, d.hidden))
        .collect();
    let users = r
        .users
        .into_iter()
        .map(|u| {
            let m = memberships(u.uid.0, u.departments);
            (
                OrgPerson {
                    uid: u.uid.0,
                    name: u.name,
                },
                m,
            )
        })
        .collect();
    change(
        state,
        OrgChange::Import {
            depts,
            users,
            replace: r.replace.unwrap_or(false),
        },
    )
    .await
}

fn read<T>(state: &State, f: impl FnOnce(&OrgTree) -> T) -> Result<T, Fail> {
    let mut f = Some(f);
    let mut out = None;
    state
        .backend
        .org_read(&mut |t: &OrgTree| {
            if let Some(f) = f.take() {
                out = Some(f(t));
            }
        })
        .map_err(|e: ApiError| super::server::api_error(&e))?;
    out.ok_or_else(|| bad_request("unreachable: the tree was not read"))
}

fn dept_json(d: &OrgDept) -> Value {
    json!({"id": d.id, "parent": d.parent, "name": d.name, "order": d.order, "hidden": d.hidden})
}

/// `GET /v1/org`: the version and the top-level departments.
pub(crate) fn top(state: &State) -> Result<Resp, Fail> {
    let v = read(state, |t| {
        let depts: Vec<Value> = t
            .children_of(0)
            .iter()
            .filter_map(|&id| t.dept(id).map(dept_json))
            .collect();
        json!({"version": t.version(), "departments": depts})
    })?;
    Ok(ok(v))
}

/// `GET /v1/org/departments/{id}?offset=&limit=`.
pub(crate) fn get_dept(state: &State, id: u64, query: &str) -> Result<Resp, Fail> {
    let (mut offset, mut limit) = (0usize, 100usize);
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let n = v
            .parse::<usize>()
            .map_err(|_| bad_request(format!("`{k}` must be a non-negative integer")))?;
        match k {
            "offset" => offset = n,
            "limit" => limit = n.clamp(1, MAX_ORG_PAGE),
            _ => return Err(bad_request(format!("unknown query parameter `{k}`"))),
        }
    }
    let v = read(state, |t| {
        let view = t.dept_view(ADMIN, id, offset, limit)?;
        let d = view.dept.as_ref().and_then(|r| match &r.entity {
            OrgEntity::Dept(d) => Some(dept_json(d)),
            _ => None,
        })?;
        let children: Vec<Value> = view
            .children
            .iter()
            .filter_map(|r| match &r.entity {
                OrgEntity::Dept(d) => Some(dept_json(d)),
                _ => None,
            })
            .collect();
        let members: Vec<Value> = view
            .members
            .iter()
            .filter_map(|r| match &r.entity {
                OrgEntity::Member(m) => Some(json!({
                    "uid": m.uid,
                    "name": t.person(m.uid).map(|p| p.name.as_str()),
                    "title": m.title,
                    "order": m.order,
                })),
                _ => None,
            })
            .collect();
        Some(json!({
            "version": t.version(),
            "department": d,
            "children": children,
            "members_total": view.members_total,
            "members": members,
        }))
    })?;
    match v {
        Some(v) => Ok(ok(v)),
        None => Err(super::server::api_error(&ApiError::new(
            im_shared::ErrorCode::NotFound,
            format!("department {id} does not exist"),
        ))),
    }
}

/// `GET /v1/org/users/{uid}`.
pub(crate) fn get_user(state: &State, uid: u64) -> Result<Resp, Fail> {
    let v = read(state, |t| {
        let records: Vec<OrgRecord> = t.user_view(ADMIN, uid);
        if records.is_empty() {
            return None;
        }
        let depts: Vec<Value> = t
            .depts_of(uid)
            .iter()
            .filter_map(|&d| {
                let m = t.membership(uid, d)?;
                let path: Vec<Value> = t
                    .path(d)
                    .iter()
                    .filter_map(|&p| t.dept(p).map(|x| json!({"id": x.id, "name": x.name})))
                    .collect();
                Some(json!({"dept": d, "title": m.title, "order": m.order, "path": path}))
            })
            .collect();
        Some(json!({
            "version": t.version(),
            "uid": uid,
            "name": t.person(uid).map(|p| p.name.as_str()),
            "departments": depts,
        }))
    })?;
    match v {
        Some(v) => Ok(ok(v)),
        None => Err(super::server::api_error(&ApiError::new(
            im_shared::ErrorCode::NotFound,
            format!("user {uid} is not in the organisation tree"),
        ))),
    }
}
