//! The organisation tree (组织机构树): departments, the people in them, and who belongs where.
//!
//! Everything is a versioned [`OrgRecord`]: a department, a person (a user's display name) or a
//! membership (a user in a department, with a title). Every change writes a new record with the
//! next org version (one counter for the whole tree, owned by one logic worker); a removal writes
//! the record again with `deleted` set (a tombstone), so a client that synced up to version `v`
//! catches up by reading every record with a version above `v` (`OrgSync`, PROTOCOL.md §6.9).
//! The store keeps only the latest record of each [`OrgKey`], indexed by version.
//!
//! [`OrgTree`] is the in-memory model both sides can use: logic keeps one per node as its cache,
//! a client can keep one to apply its sync pages. It answers a department's children and members,
//! a user's departments and the path to the root, a search by name, the records changed since a
//! version, and the visibility rule of hidden departments, without scanning the whole tree (the
//! search by name is the one linear pass).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::{put_string, string_len, BodyError, Reader};

/// Longest department or person name, in bytes (UTF-8).
pub const MAX_ORG_NAME_LEN: usize = 256;
/// Longest title of a membership, in bytes.
pub const MAX_TITLE_LEN: usize = 128;
/// Most departments one user belongs to.
pub const MAX_USER_DEPTS: usize = 16;
/// Deepest department (levels below the top, the top level being 1).
pub const MAX_ORG_DEPTH: usize = 64;
/// Longest search query, in bytes.
pub const MAX_SEARCH_LEN: usize = 64;
/// Most records in one reply (`OrgPage`, `OrgReply`); a reply also stops before
/// [`ORG_PAGE_BYTES`].
pub const MAX_ORG_PAGE: usize = 1000;
/// Byte budget of the records of one reply, well under the 64 KiB a client accepts.
pub const ORG_PAGE_BYTES: usize = 48 * 1024;

/// The viewer that sees every department, hidden or not (the HTTP API; never a user: user ids
/// start at 1).
pub const ADMIN: u64 = 0;

const TAG_DEPT: u8 = 1;
const TAG_PERSON: u8 = 2;
const TAG_MEMBER: u8 = 3;

/// A department. `parent` 0: a top-level department.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgDept {
    pub id: u64,
    pub parent: u64,
    /// Position among its siblings (ascending; ties by id).
    pub order: u32,
    /// Seen only by the people inside it (its members and those of its sub-departments).
    pub hidden: bool,
    pub name: String,
}

/// A person of the tree: a user id and its display name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgPerson {
    pub uid: u64,
    pub name: String,
}

/// A user in a department.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgMember {
    pub uid: u64,
    pub dept: u64,
    /// Position among the department's members (ascending; ties by uid).
    pub order: u32,
    pub title: String,
}

/// What a record is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrgEntity {
    Dept(OrgDept),
    Person(OrgPerson),
    Member(OrgMember),
}

/// The identity of a record: a newer record with the same key replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OrgKey {
    Dept(u64),
    Person(u64),
    Member { uid: u64, dept: u64 },
}

/// One versioned change of the tree (also the storage record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgRecord {
    /// The org version this record was written at (unique, ≥ 1).
    pub version: u64,
    /// A tombstone: the entity was removed at `version`.
    pub deleted: bool,
    pub entity: OrgEntity,
}

impl OrgEntity {
    pub fn key(&self) -> OrgKey {
        match self {
            OrgEntity::Dept(d) => OrgKey::Dept(d.id),
            OrgEntity::Person(p) => OrgKey::Person(p.uid),
            OrgEntity::Member(m) => OrgKey::Member {
                uid: m.uid,
                dept: m.dept,
            },
        }
    }
}

impl OrgRecord {
    pub fn key(&self) -> OrgKey {
        self.entity.key()
    }

    /// The removal of this record's entity as a reader is told of it: the key, the version and
    /// `deleted`, every other field empty (a reader must not learn a hidden entity's name from its
    /// removal).
    pub fn removal(&self) -> OrgRecord {
        let entity = match &self.entity {
            OrgEntity::Dept(d) => OrgEntity::Dept(OrgDept {
                id: d.id,
                ..OrgDept::default()
            }),
            OrgEntity::Person(p) => OrgEntity::Person(OrgPerson {
                uid: p.uid,
                ..OrgPerson::default()
            }),
            OrgEntity::Member(m) => OrgEntity::Member(OrgMember {
                uid: m.uid,
                dept: m.dept,
                ..OrgMember::default()
            }),
        };
        OrgRecord {
            version: self.version,
            deleted: true,
            entity,
        }
    }

    pub fn encoded_len(&self) -> usize {
        1 + 8
            + 1
            + match &self.entity {
                OrgEntity::Dept(d) => 8 + 8 + 4 + 1 + string_len(&d.name),
                OrgEntity::Person(p) => 8 + string_len(&p.name),
                OrgEntity::Member(m) => 8 + 8 + 4 + string_len(&m.title),
            }
    }

    /// `tag:u8 version:u64 deleted:u8` then the entity's fields (PROTOCOL.md §6.9).
    pub fn encode(&self, out: &mut impl BufMut) {
        let tag = match &self.entity {
            OrgEntity::Dept(_) => TAG_DEPT,
            OrgEntity::Person(_) => TAG_PERSON,
            OrgEntity::Member(_) => TAG_MEMBER,
        };
        out.put_u8(tag);
        out.put_u64(self.version);
        out.put_u8(self.deleted as u8);
        match &self.entity {
            OrgEntity::Dept(d) => {
                out.put_u64(d.id);
                out.put_u64(d.parent);
                out.put_u32(d.order);
                out.put_u8(d.hidden as u8);
                put_string(out, &d.name);
            }
            OrgEntity::Person(p) => {
                out.put_u64(p.uid);
                put_string(out, &p.name);
            }
            OrgEntity::Member(m) => {
                out.put_u64(m.uid);
                out.put_u64(m.dept);
                out.put_u32(m.order);
                put_string(out, &m.title);
            }
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }

    pub fn decode(buf: Bytes) -> Result<OrgRecord, BodyError> {
        Self::read(&mut Reader::new(buf))
    }

    pub(crate) fn read(r: &mut Reader) -> Result<OrgRecord, BodyError> {
        let tag = r.u8("org record tag")?;
        let version = r.u64("version")?;
        let deleted = r.u8("deleted")? != 0;
        let entity = match tag {
            TAG_DEPT => OrgEntity::Dept(OrgDept {
                id: r.u64("dept")?,
                parent: r.u64("parent")?,
                order: r.u32("order")?,
                hidden: r.u8("hidden")? != 0,
                name: r.string("name")?,
            }),
            TAG_PERSON => OrgEntity::Person(OrgPerson {
                uid: r.u64("uid")?,
                name: r.string("name")?,
            }),
            TAG_MEMBER => OrgEntity::Member(OrgMember {
                uid: r.u64("uid")?,
                dept: r.u64("dept")?,
                order: r.u32("order")?,
                title: r.string("title")?,
            }),
            t => {
                return Err(BodyError::Invalid {
                    field: "org record tag",
                    value: t as u64,
                })
            }
        };
        Ok(OrgRecord {
            version,
            deleted,
            entity,
        })
    }
}

/// `count:u16` then that many records.
pub(crate) fn put_records(out: &mut impl BufMut, records: &[OrgRecord]) {
    out.put_u16(records.len() as u16);
    for r in records {
        r.encode(out);
    }
}

pub(crate) fn records_len(records: &[OrgRecord]) -> usize {
    2 + records.iter().map(OrgRecord::encoded_len).sum::<usize>()
}

pub(crate) fn read_records(r: &mut Reader) -> Result<Vec<OrgRecord>, BodyError> {
    let n = r.u16("count")? as usize;
    // A record is at least 23 bytes: cap the allocation by what the body can hold.
    let mut v = Vec::with_capacity(n.min(r.remaining() / 19));
    for _ in 0..n {
        v.push(OrgRecord::read(r)?);
    }
    Ok(v)
}

/// A change of the tree, as the HTTP API asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrgChange {
    /// Create, rename, move or reorder a department (`hidden` too).
    PutDept(OrgDept),
    /// Remove a department that has no sub-departments and no members.
    DeleteDept(u64),
    /// Set a user's name and departments (with title and order): memberships not listed end.
    PutUser {
        person: OrgPerson,
        depts: Vec<OrgMember>,
    },
    /// Remove a user from the tree (the person and every membership).
    DeleteUser(u64),
    /// Many departments and users at once; with `replace`, everything not listed is removed.
    Import {
        depts: Vec<OrgDept>,
        users: Vec<(OrgPerson, Vec<OrgMember>)>,
        replace: bool,
    },
}

/// Why a change of the tree is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrgError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// The tree in memory: the latest record of every key (tombstones too) and indexes of the live
/// ones.
#[derive(Clone, Debug, Default)]
pub struct OrgTree {
    version: u64,
    records: HashMap<OrgKey, OrgRecord>,
    by_version: BTreeMap<u64, OrgKey>,
    /// parent (0: the top) → `(order, id)` of its live sub-departments.
    children: HashMap<u64, BTreeSet<(u32, u64)>>,
    /// dept → `(order, uid)` of its live members.
    dept_members: HashMap<u64, BTreeSet<(u32, u64)>>,
    /// uid → depts of its live memberships.
    user_depts: HashMap<u64, BTreeSet<u64>>,
    /// The names searched by [`OrgTree::search`], built at the first search after a change.
    names: std::sync::OnceLock<NameIndex>,
}

/// Every live department's and person's name, lower-cased, in one string separated by `\0`
/// (departments first, then people, each in id order), and where each starts: a search is one
/// substring scan of contiguous memory instead of a walk over every record.
#[derive(Clone, Debug, Default)]
struct NameIndex {
    text: String,
    /// `(offset in text, key)`, ascending by offset.
    starts: Vec<(usize, OrgKey)>,
}

/// Most sub-departments an `OrgDept` answer lists (the first in order, within half the byte
/// budget of a reply); a client that synced the tree has them all.
pub const MAX_VIEW_CHILDREN: usize = 500;

/// Most matches a search counts (its `total`); past it the count says "at least this many".
pub const MAX_SEARCH_TOTAL: usize = 10_000;

/// A department with what a client shows of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeptView {
    pub dept: Option<OrgRecord>,
    pub children: Vec<OrgRecord>,
    pub members_total: usize,
    /// A page of members: each membership record followed by the person record (if any).
    pub members: Vec<OrgRecord>,
}

impl OrgTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest version applied (0: empty).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records held, tombstones included.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Live departments.
    pub fn dept_count(&self) -> usize {
        self.records
            .values()
            .filter(|r| !r.deleted && matches!(r.entity, OrgEntity::Dept(_)))
            .count()
    }

    /// The latest record of every key, tombstones included, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = &OrgRecord> {
        self.records.values()
    }

    /// The latest record of `key`, tombstone or not.
    pub fn record(&self, key: OrgKey) -> Option<&OrgRecord> {
        self.records.get(&key)
    }

    fn live(&self, key: OrgKey) -> Option<&OrgRecord> {
        self.records.get(&key).filter(|r| !r.deleted)
    }

    pub fn dept(&self, id: u64) -> Option<&OrgDept> {
        match &self.live(OrgKey::Dept(id))?.entity {
            OrgEntity::Dept(d) => Some(d),
            _ => None,
        }
    }

    pub fn person(&self, uid: u64) -> Option<&OrgPerson> {
        match &self.live(OrgKey::Person(uid))?.entity {
            OrgEntity::Person(p) => Some(p),
            _ => None,
        }
    }

    pub fn membership(&self, uid: u64, dept: u64) -> Option<&OrgMember> {
        match &self.live(OrgKey::Member { uid, dept })?.entity {
            OrgEntity::Member(m) => Some(m),
            _ => None,
        }
    }

    /// Live departments of `uid`, ascending.
    pub fn depts_of(&self, uid: u64) -> Vec<u64> {
        self.user_depts
            .get(&uid)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Live sub-departments of `parent` (0: the top level), in `(order, id)` order.
    pub fn children_of(&self, parent: u64) -> Vec<u64> {
        self.children
            .get(&parent)
            .map(|s| s.iter().map(|&(_, id)| id).collect())
            .unwrap_or_default()
    }

    /// Live members of `dept` in `(order, uid)` order.
    pub fn members_of(&self, dept: u64) -> impl Iterator<Item = u64> + '_ {
        self.dept_members
            .get(&dept)
            .into_iter()
            .flat_map(|s| s.iter().map(|&(_, uid)| uid))
    }

    pub fn member_count(&self, dept: u64) -> usize {
        self.dept_members.get(&dept).map_or(0, BTreeSet::len)
    }

    /// Applies one record: a record not newer than the one held for its key is ignored (so
    /// applying the same records twice, or out of order, ends in the same tree).
    pub fn apply(&mut self, rec: OrgRecord) {
        let key = rec.key();
        if let Some(old) = self.records.get(&key) {
            if old.version >= rec.version {
                return;
            }
            let old = old.clone();
            self.unindex(&old);
            self.by_version.remove(&old.version);
        }
        self.version = self.version.max(rec.version);
        self.names.take();
        self.by_version.insert(rec.version, key);
        if !rec.deleted {
            self.index(&rec);
        }
        self.records.insert(key, rec);
    }

    fn index(&mut self, rec: &OrgRecord) {
        match &rec.entity {
            OrgEntity::Dept(d) => {
                self.children
                    .entry(d.parent)
                    .or_default()
                    .insert((d.order, d.id));
            }
            OrgEntity::Person(_) => {}
            OrgEntity::Member(m) => {
                self.dept_members
                    .entry(m.dept)
                    .or_default()
                    .insert((m.order, m.uid));
                self.user_depts.entry(m.uid).or_default().insert(m.dept);
            }
        }
    }

    fn unindex(&mut self, rec: &OrgRecord) {
        if rec.deleted {
            return;
        }
        fn drop_from<K: std::hash::Hash + Eq, V: Ord>(
            m: &mut HashMap<K, BTreeSet<V>>,
            k: K,
            v: &V,
        ) {
            if let Some(s) = m.get_mut(&k) {
                s.remove(v);
                if s.is_empty() {
                    m.remove(&k);
                }
            }
        }
        match &rec.entity {
            OrgEntity::Dept(d) => drop_from(&mut self.children, d.parent, &(d.order, d.id)),
            OrgEntity::Person(_) => {}
            OrgEntity::Member(m) => {
                drop_from(&mut self.dept_members, m.dept, &(m.order, m.uid));
                drop_from(&mut self.user_depts, m.uid, &m.dept);
            }
        }
    }

    /// Records with a version above `after`, in version order, at most `limit` of them and
    /// within [`ORG_PAGE_BYTES`] (at least one).
    pub fn changes_since(&self, after: u64, limit: usize) -> Vec<&OrgRecord> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for key in self
            .by_version
            .range(after.saturating_add(1)..)
            .map(|(_, k)| k)
        {
            let r = &self.records[key];
            bytes += r.encoded_len();
            if out.len() >= limit.max(1) || (!out.is_empty() && bytes > ORG_PAGE_BYTES) {
                break;
            }
            out.push(r);
        }
        out
    }

    /// The departments from the top down to `dept` (both included); empty if `dept` is not
    /// live. Stops at [`MAX_ORG_DEPTH`] levels (a loop cannot be built through [`Self::check`]).
    pub fn path(&self, dept: u64) -> Vec<u64> {
        let mut path = Vec::new();
        let mut at = dept;
        while at != 0 && path.len() < MAX_ORG_DEPTH + 1 {
            let Some(d) = self.dept(at) else {
                return Vec::new();
            };
            path.push(at);
            at = d.parent;
        }
        path.reverse();
        path
    }

    /// Whether `viewer` may see department `dept`: every hidden department on its path must
    /// contain one of the viewer's departments (be the department or an ancestor of it).
    pub fn dept_visible_to(&self, viewer: u64, dept: u64) -> bool {
        let path = self.path(dept);
        if path.is_empty() {
            return false;
        }
        if viewer == ADMIN {
            return true;
        }
        let mut inside: Option<BTreeSet<u64>> = None;
        for id in path {
            if self.dept(id).is_some_and(|d| d.hidden) {
                let set = inside.get_or_insert_with(|| {
                    self.depts_of(viewer)
                        .into_iter()
                        .flat_map(|d| self.path(d))
                        .collect()
                });
                if !set.contains(&id) {
                    return false;
                }
            }
        }
        true
    }

    /// Whether `viewer` may see user `uid`: the user is in at least one department the viewer
    /// sees. A user sees itself; [`ADMIN`] sees everyone in the tree.
    pub fn user_visible_to(&self, viewer: u64, uid: u64) -> bool {
        if viewer == ADMIN {
            return self.person(uid).is_some() || self.user_depts.contains_key(&uid);
        }
        viewer == uid
            || self
                .user_depts
                .get(&uid)
                .is_some_and(|ds| ds.iter().any(|&d| self.dept_visible_to(viewer, d)))
    }

    /// Whether `viewer` may see the entity of `rec`.
    pub fn record_visible_to(&self, viewer: u64, rec: &OrgRecord) -> bool {
        match &rec.entity {
            OrgEntity::Dept(d) => self.dept_visible_to(viewer, d.id),
            OrgEntity::Person(p) => self.user_visible_to(viewer, p.uid),
            OrgEntity::Member(m) => m.uid == viewer || self.dept_visible_to(viewer, m.dept),
        }
    }

    /// A department (0: the top level, with no record), its visible sub-departments and a page of
    /// its members (`offset`, at most `limit`), each member's membership record followed by the
    /// person record. `None`: no such live department, or not visible to `viewer`.
    pub fn dept_view(
        &self,
        viewer: u64,
        dept: u64,
        offset: usize,
        limit: usize,
    ) -> Option<DeptView> {
        let rec = if dept == 0 {
            None
        } else {
            if !self.dept_visible_to(viewer, dept) {
                return None;
            }
            self.live(OrgKey::Dept(dept)).cloned()
        };
        let mut bytes = rec.as_ref().map_or(0, OrgRecord::encoded_len);
        let mut children = Vec::new();
        for id in self.children_of(dept) {
            if children.len() >= MAX_VIEW_CHILDREN {
                break;
            }
            if self.dept_visible_to(viewer, id) {
                let r = self.records[&OrgKey::Dept(id)].clone();
                if bytes + r.encoded_len() > ORG_PAGE_BYTES / 2 {
                    break;
                }
                bytes += r.encoded_len();
                children.push(r);
            }
        }
        let mut members = Vec::new();
        for (taken, uid) in self.members_of(dept).skip(offset).enumerate() {
            if taken >= limit || children.len() + members.len() + 2 > MAX_ORG_PAGE {
                break;
            }
            let m = self.records[&OrgKey::Member { uid, dept }].clone();
            let p = self.live(OrgKey::Person(uid)).cloned();
            let add = m.encoded_len() + p.as_ref().map_or(0, OrgRecord::encoded_len);
            if taken > 0 && bytes + add > ORG_PAGE_BYTES {
                break;
            }
            bytes += add;
            members.push(m);
            members.extend(p);
        }
        Some(DeptView {
            dept: rec,
            children,
            members_total: self.member_count(dept),
            members,
        })
    }

    /// What a client shows of a user: the person record, the memberships and every department on
    /// the paths from the top to them (each once), all visible to `viewer`. Empty if the user is
    /// not in the tree or not visible.
    pub fn user_view(&self, viewer: u64, uid: u64) -> Vec<OrgRecord> {
        if !self.user_visible_to(viewer, uid) {
            return Vec::new();
        }
        let mut out: Vec<OrgRecord> = self
            .live(OrgKey::Person(uid))
            .cloned()
            .into_iter()
            .collect();
        let mut seen = BTreeSet::new();
        for dept in self.depts_of(uid) {
            if !self.dept_visible_to(viewer, dept) {
                continue;
            }
            out.push(self.records[&OrgKey::Member { uid, dept }].clone());
            for id in self.path(dept) {
                if seen.insert(id) {
                    out.push(self.records[&OrgKey::Dept(id)].clone());
                }
            }
            if out.len() >= MAX_ORG_PAGE {
                out.truncate(MAX_ORG_PAGE);
                break;
            }
        }
        out
    }

    /// Departments and people whose name contains `query` (case-insensitive), visible to
    /// `viewer`: departments first, then people, each in id order; at most `limit` records, and the
    /// number of matches (counted up to [`MAX_SEARCH_TOTAL`]).
    pub fn search(&self, viewer: u64, query: &str, limit: usize) -> (Vec<OrgRecord>, usize) {
        let q = query.to_lowercase();
        let (mut out, mut total, mut bytes) = (Vec::new(), 0, 0);
        if q.is_empty() || q.contains('\0') {
            return (out, 0);
        }
        let idx = self.names.get_or_init(|| self.name_index());
        let mut from = 0;
        while let Some(at) = idx.text[from..].find(&q) {
            let at = from + at;
            // The name the match is in: the last start at or before it.
            let i = idx.starts.partition_point(|&(o, _)| o <= at) - 1;
            let key = idx.starts[i].1;
            from = idx.starts.get(i + 1).map_or(idx.text.len(), |&(o, _)| o);
            let visible = match key {
                OrgKey::Dept(id) => self.dept_visible_to(viewer, id),
                OrgKey::Person(uid) => self.user_visible_to(viewer, uid),
                OrgKey::Member { .. } => false,
            };
            if !visible {
                continue;
            }
            total += 1;
            if out.len() < limit {
                let r = &self.records[&key];
                bytes += r.encoded_len();
                if bytes <= ORG_PAGE_BYTES {
                    out.push(r.clone());
                }
            }
            if total >= MAX_SEARCH_TOTAL {
                break;
            }
        }
        (out, total)
    }

    fn name_index(&self) -> NameIndex {
        let mut depts = Vec::new();
        let mut people = Vec::new();
        for r in self.records.values().filter(|r| !r.deleted) {
            match &r.entity {
                OrgEntity::Dept(d) => depts.push((d.id, OrgKey::Dept(d.id), d.name.as_str())),
                OrgEntity::Person(p) => {
                    people.push((p.uid, OrgKey::Person(p.uid), p.name.as_str()))
                }
                OrgEntity::Member(_) => {}
            }
        }
        depts.sort_unstable_by_key(|e| e.0);
        people.sort_unstable_by_key(|e| e.0);
        let mut idx = NameIndex::default();
        for (_, key, name) in depts.into_iter().chain(people) {
            idx.starts.push((idx.text.len(), key));
            idx.text.extend(
                name.to_lowercase()
                    .chars()
                    .map(|c| if c == '\0' { ' ' } else { c }),
            );
            idx.text.push('\0');
        }
        idx
    }

    /// Checks that `entity` may be written (created, moved, renamed) over the tree as it is.
    pub fn check(&self, entity: &OrgEntity) -> Result<(), OrgError> {
        match entity {
            OrgEntity::Dept(d) => {
                if d.id == 0 {
                    return Err(OrgError::Invalid("department id must not be 0".into()));
                }
                check_name("department name", &d.name, MAX_ORG_NAME_LEN)?;
                if d.parent == d.id {
                    return Err(OrgError::Invalid(format!(
                        "department {} cannot be its own parent",
                        d.id
                    )));
                }
                if d.parent != 0 {
                    let path = self.path(d.parent);
                    if path.is_empty() {
                        return Err(OrgError::NotFound(format!(
                            "parent department {} does not exist",
                            d.parent
                        )));
                    }
                    if path.contains(&d.id) {
                        return Err(OrgError::Conflict(format!(
                            "moving department {} under {} would make a loop: {} is inside it",
                            d.id, d.parent, d.parent
                        )));
                    }
                    if path.len() + 1 + self.height(d.id) > MAX_ORG_DEPTH {
                        return Err(OrgError::Invalid(format!(
                            "the tree would be deeper than {MAX_ORG_DEPTH} levels"
                        )));
                    }
                }
                Ok(())
            }
            OrgEntity::Person(p) => {
                if p.uid == 0 {
                    return Err(OrgError::Invalid("user id must not be 0".into()));
                }
                check_name("user name", &p.name, MAX_ORG_NAME_LEN)
            }
            OrgEntity::Member(m) => {
                if m.uid == 0 {
                    return Err(OrgError::Invalid("user id must not be 0".into()));
                }
                if m.title.len() > MAX_TITLE_LEN {
                    return Err(OrgError::Invalid(format!(
                        "title is {} bytes, at most {MAX_TITLE_LEN}",
                        m.title.len()
                    )));
                }
                if self.dept(m.dept).is_none() {
                    return Err(OrgError::NotFound(format!(
                        "department {} does not exist",
                        m.dept
                    )));
                }
                Ok(())
            }
        }
    }

    /// Levels of live departments below `dept` (0: none).
    fn height(&self, dept: u64) -> usize {
        let mut h = 0;
        let mut level = vec![dept];
        while !level.is_empty() && h <= MAX_ORG_DEPTH {
            level = level.iter().flat_map(|&d| self.children_of(d)).collect();
            if !level.is_empty() {
                h += 1;
            }
        }
        h
    }
}

fn check_name(what: &str, name: &str, max: usize) -> Result<(), OrgError> {
    if name.trim().is_empty() {
        return Err(OrgError::Invalid(format!("{what} must not be empty")));
    }
    if name.len() > max {
        return Err(OrgError::Invalid(format!(
            "{what} is {} bytes, at most {max}",
            name.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dept(version: u64, id: u64, parent: u64, name: &str) -> OrgRecord {
        OrgRecord {
            version,
            deleted: false,
            entity: OrgEntity::Dept(OrgDept {
                id,
                parent,
                order: 0,
                hidden: false,
                name: name.into(),
            }),
        }
    }

    fn member(version: u64, uid: u64, dept: u64) -> OrgRecord {
        OrgRecord {
            version,
            deleted: false,
            entity: OrgEntity::Member(OrgMember {
                uid,
                dept,
                order: 0,
                title: "engineer".into(),
            }),
        }
    }

    fn person(version: u64, uid: u64, name: &str) -> OrgRecord {
        OrgRecord {
            version,
            deleted: false,
            entity: OrgEntity::Person(OrgPerson {
                uid,
                name: name.into(),
            }),
        }
    }

    /// Company(1) ⊃ Eng(2) ⊃ Storage(3); Company ⊃ Board(4, hidden).
    fn company() -> OrgTree {
        let mut t = OrgTree::new();
        t.apply(dept(1, 1, 0, "Company"));
        t.apply(dept(2, 2, 1, "Engineering"));
        t.apply(dept(3, 3, 2, "Storage"));
        let mut board = dept(4, 4, 1, "Board");
        if let OrgEntity::Dept(d) = &mut board.entity {
            d.hidden = true;
        }
        t.apply(board);
        t.apply(person(5, 10, "Alice Storage"));
        t.apply(member(6, 10, 3));
        t.apply(person(7, 11, "Bob Chair"));
        t.apply(member(8, 11, 4));
        t
    }

    #[test]
    fn every_record_kind_round_trips_and_garbage_is_refused() {
        for r in [
            dept(1, 7, 3, "Eng ✓"),
            person(2, 9, "名字"),
            member(u64::MAX, 9, 7),
        ] {
            assert_eq!(OrgRecord::decode(r.to_bytes()).unwrap(), r);
            assert_eq!(r.to_bytes().len(), r.encoded_len());
            let b = r.to_bytes();
            for cut in 0..b.len() {
                assert!(OrgRecord::decode(b.slice(..cut)).is_err(), "cut at {cut}");
            }
        }
        let mut bad = dept(1, 1, 0, "x").to_bytes().to_vec();
        bad[0] = 9;
        assert!(matches!(
            OrgRecord::decode(Bytes::from(bad)),
            Err(BodyError::Invalid { value: 9, .. })
        ));
    }

    #[test]
    fn a_newer_record_replaces_an_older_one_and_an_older_one_is_ignored() {
        let mut t = company();
        t.apply(dept(9, 3, 1, "Storage moved"));
        assert_eq!(t.children_of(1), vec![2, 3, 4]);
        assert_eq!(t.children_of(2), Vec::<u64>::new());
        t.apply(dept(5, 3, 2, "stale"));
        assert_eq!(t.dept(3).unwrap().name, "Storage moved");
        assert_eq!(t.version(), 9);
        // One record per key in the version index: the old version is gone.
        let v: Vec<u64> = t.changes_since(0, 100).iter().map(|r| r.version).collect();
        assert_eq!(v, vec![1, 2, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_tombstone_removes_the_entity_from_every_index_and_is_synced() {
        let mut t = company();
        let mut gone = member(9, 10, 3);
        gone.deleted = true;
        t.apply(gone);
        assert_eq!(t.members_of(3).count(), 0);
        assert!(t.depts_of(10).is_empty());
        let since = t.changes_since(8, 10);
        assert_eq!(since.len(), 1);
        assert!(since[0].deleted);
    }

    #[test]
    fn changes_since_pages_by_count_and_by_bytes() {
        let mut t = OrgTree::new();
        let long = "x".repeat(MAX_ORG_NAME_LEN);
        for v in 1..=500 {
            t.apply(person(v, v, &long));
        }
        assert_eq!(t.changes_since(0, 10).len(), 10);
        let page = t.changes_since(0, 1000);
        let bytes: usize = page.iter().map(|r| r.encoded_len()).sum();
        assert!(
            bytes <= ORG_PAGE_BYTES && page.len() < 500,
            "{}",
            page.len()
        );
        assert_eq!(page[0].version, 1);
        assert_eq!(t.changes_since(500, 10).len(), 0);
    }

    #[test]
    fn a_hidden_department_is_seen_only_from_inside() {
        let t = company();
        assert!(t.dept_visible_to(10, 2));
        assert!(!t.dept_visible_to(10, 4), "outsider sees the board");
        assert!(t.dept_visible_to(11, 4));
        assert!(!t.user_visible_to(10, 11));
        assert!(t.user_visible_to(11, 10));
        assert!(t.user_visible_to(11, 11));
        let top = t.dept_view(10, 1, 0, 10).unwrap();
        let ids: Vec<_> = top.children.iter().map(OrgRecord::key).collect();
        assert_eq!(ids, vec![OrgKey::Dept(2)]);
        assert!(t.dept_view(10, 4, 0, 10).is_none());
        assert!(t.user_view(10, 11).is_empty());
        assert_eq!(t.search(10, "chair", 10).1, 0);
        assert_eq!(t.search(11, "chair", 10).1, 1);
    }

    #[test]
    fn a_user_view_has_the_path_to_the_top() {
        let t = company();
        let keys: Vec<_> = t.user_view(10, 10).iter().map(OrgRecord::key).collect();
        assert_eq!(
            keys,
            vec![
                OrgKey::Person(10),
                OrgKey::Member { uid: 10, dept: 3 },
                OrgKey::Dept(1),
                OrgKey::Dept(2),
                OrgKey::Dept(3)
            ]
        );
    }

    #[test]
    fn a_department_view_pages_its_members() {
        let mut t = company();
        for uid in 100..150 {
            t.apply(person(uid, uid, "p"));
            t.apply(member(uid + 1000, uid, 2));
        }
        let v = t.dept_view(10, 2, 10, 5).unwrap();
        assert_eq!(v.members_total, 50);
        assert_eq!(v.members.len(), 10, "membership + person each");
        assert_eq!(v.members[0].key(), OrgKey::Member { uid: 110, dept: 2 });
        assert_eq!(v.children.len(), 1);
        let top = t.dept_view(10, 0, 0, 10).unwrap();
        assert!(top.dept.is_none());
        assert_eq!(top.children.len(), 1);
    }

    #[test]
    fn a_department_view_lists_at_most_so_many_children_and_still_pages_members() {
        let mut t = OrgTree::new();
        t.apply(dept(1, 1, 0, "top"));
        for i in 0..600u64 {
            t.apply(dept(10 + i, 100 + i, 1, &"n".repeat(10)));
        }
        for uid in 1..=300u64 {
            t.apply(member(1000 + uid, uid, 1));
        }
        let v = t.dept_view(ADMIN, 1, 0, 1000).unwrap();
        assert_eq!(v.children.len(), MAX_VIEW_CHILDREN);
        assert!(
            !v.members.is_empty(),
            "members still fit beside the children"
        );
        let n = 1 + v.children.len() + v.members.len();
        assert!(n <= MAX_ORG_PAGE, "{n}");
        let bytes: usize = v
            .children
            .iter()
            .chain(&v.members)
            .map(|r| r.encoded_len())
            .sum();
        assert!(bytes <= ORG_PAGE_BYTES, "{bytes}");
    }

    #[test]
    fn a_removal_is_the_bare_key() {
        let r = member(7, 9, 3).removal();
        assert!(r.deleted && r.version == 7);
        assert_eq!(r.key(), OrgKey::Member { uid: 9, dept: 3 });
        let OrgEntity::Member(m) = &r.entity else {
            panic!()
        };
        assert!(m.title.is_empty() && m.order == 0);
        let d = dept(5, 2, 1, "Secret board").removal();
        assert_eq!(d.encoded_len(), 1 + 8 + 1 + 8 + 8 + 4 + 1 + 2);
    }

    #[test]
    fn a_move_that_would_make_a_loop_or_an_orphan_is_refused() {
        let t = company();
        let mv = |id, parent| {
            OrgEntity::Dept(OrgDept {
                id,
                parent,
                order: 0,
                hidden: false,
                name: "n".into(),
            })
        };
        assert!(matches!(t.check(&mv(1, 3)), Err(OrgError::Conflict(_))));
        assert!(matches!(t.check(&mv(2, 2)), Err(OrgError::Invalid(_))));
        assert!(matches!(t.check(&mv(5, 99)), Err(OrgError::NotFound(_))));
        assert!(t.check(&mv(3, 4)).is_ok());
        assert!(t.check(&mv(5, 3)).is_ok());
        let empty = OrgEntity::Dept(OrgDept {
            id: 5,
            parent: 0,
            order: 0,
            hidden: false,
            name: "  ".into(),
        });
        assert!(matches!(t.check(&empty), Err(OrgError::Invalid(_))));
        let nowhere = OrgEntity::Member(OrgMember {
            uid: 1,
            dept: 77,
            order: 0,
            title: String::new(),
        });
        assert!(matches!(t.check(&nowhere), Err(OrgError::NotFound(_))));
    }

    #[test]
    fn the_depth_is_bounded() {
        let mut t = OrgTree::new();
        for id in 1..=MAX_ORG_DEPTH as u64 {
            t.apply(dept(id, id, id - 1, "d"));
        }
        let deeper = OrgEntity::Dept(OrgDept {
            id: 1000,
            parent: MAX_ORG_DEPTH as u64,
            order: 0,
            hidden: false,
            name: "d".into(),
        });
        assert!(matches!(t.check(&deeper), Err(OrgError::Invalid(_))));
        assert_eq!(t.path(MAX_ORG_DEPTH as u64).len(), MAX_ORG_DEPTH);
    }

    #[test]
    fn search_counts_a_name_once_and_sees_changes_after_it_was_indexed() {
        let mut t = company();
        t.apply(person(20, 12, "Anna Annabel"));
        t.apply(member(21, 12, 2));
        assert_eq!(t.search(10, "ann", 10).1, 1, "two hits in one name");
        t.apply(person(22, 12, "Zed"));
        assert_eq!(t.search(10, "ann", 10).1, 0, "the index follows the change");
        assert_eq!(t.search(10, "zed", 10).0[0].key(), OrgKey::Person(12));
        assert_eq!(t.search(10, "", 10).1, 0);
    }

    #[test]
    fn search_folds_case_and_pages() {
        let t = company();
        let (r, total) = t.search(10, "STOR", 10);
        assert_eq!(total, 2, "Storage dept and Alice Storage");
        assert_eq!(r[0].key(), OrgKey::Dept(3));
        assert_eq!(r[1].key(), OrgKey::Person(10));
        assert_eq!(t.search(10, "stor", 1).0.len(), 1);
    }
}
