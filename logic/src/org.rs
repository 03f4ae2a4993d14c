//! The organisation tree on the logic side: the node's cache, and how a change becomes records.
//!
//! One logic worker owns the tree: the owner of [`ORG_ROUTE`] (as a group is owned by the owner of
//! its id). The HTTP API's changes go to it ([`crate::LogicHandle`] answers `Unavailable` naming the
//! owning node elsewhere, as for groups). It turns a change into versioned records ([`plan`]),
//! commits them in a batch of its own, and only then applies them to its node's cache and tells
//! the node's workers, which send `OrgChanged` to their connections. Every other node's worker 0
//! asks the owner for the records above its cache's version once a second (`OrgPull` over the
//! peer link: in a cluster of embedded stores only the owner's store has the tree) and does the
//! same with what it gets. Clients' reads (`OrgSync`, `OrgDept`, `OrgUser`, `OrgSearch`) and the
//! optional c2c visibility policy are answered from the node's cache.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

pub use im_shared::org::OrgChange;
#[cfg(test)]
use im_shared::org::OrgKey;
use im_shared::org::{
    OrgDept, OrgEntity, OrgError, OrgMember, OrgPerson, OrgRecord, OrgTree, MAX_USER_DEPTS,
};
use im_shared::UserId;

use crate::store::{Op, Store, StoreError};

/// The routing key of the tree's owner worker (not a user).
pub const ORG_ROUTE: UserId = UserId(u64::MAX);

/// Most records one commit of an import carries; a larger import commits in several batches
/// (each durable before the next; an import that failed half-way is finished by sending it again).
pub const IMPORT_CHUNK: usize = 1000;

/// The node's copy of the tree, shared by its workers and its HTTP API.
#[derive(Debug, Default)]
pub struct OrgCache {
    tree: RwLock<OrgTree>,
    loaded: AtomicBool,
}

impl OrgCache {
    /// The tree as last applied (read lock: hold it briefly).
    pub fn read(&self) -> RwLockReadGuard<'_, OrgTree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the tree was read from the store since the process started.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn version(&self) -> u64 {
        self.read().version()
    }

    /// The cache holds what the tree's owner had (a node that does not own it, after an answer).
    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Applies committed records; returns the version afterwards.
    pub fn apply(&self, records: impl IntoIterator<Item = OrgRecord>) -> u64 {
        let mut t = self.tree.write().unwrap_or_else(|p| p.into_inner());
        for r in records {
            t.apply(r);
        }
        t.version()
    }
}

/// Reads every record above the cache's version from the store and applies it; marks the cache
/// loaded. Returns how many records were applied.
pub async fn refresh<S: Store>(store: &S, cache: &OrgCache) -> Result<usize, StoreError> {
    let mut n = 0;
    loop {
        let page = store.org_records(cache.version(), IMPORT_CHUNK).await?;
        if page.is_empty() {
            break;
        }
        n += page.len();
        cache.apply(page);
    }
    cache.mark_loaded();
    Ok(n)
}

/// One record to commit and the version of the record of the same key it replaces.
pub type Planned = (OrgRecord, Option<u64>);

/// The records that make `change` over `tree`, versioned from `tree.version() + 1` on, in an
/// order a client can apply one by one (a department before what is in it; removals of what is
/// inside before the department's). Empty when the change changes nothing.
pub fn plan(tree: &OrgTree, change: OrgChange) -> Result<Vec<Planned>, OrgError> {
    let mut out = Plan::new(tree);
    match change {
        OrgChange::PutDept(d) => {
            let e = OrgEntity::Dept(d);
            tree.check(&e)?;
            out.put(e);
        }
        OrgChange::DeleteDept(id) => {
            let Some(d) = tree.dept(id) else {
                return Err(OrgError::NotFound(format!(
                    "department {id} does not exist"
                )));
            };
            let (subs, members) = (tree.children_of(id).len(), tree.member_count(id));
            if subs + members > 0 {
                return Err(OrgError::Conflict(format!(
                    "department {id} has {subs} sub-departments and {members} members: move or \
                     remove them first"
                )));
            }
            out.delete(OrgEntity::Dept(d.clone()));
        }
        OrgChange::PutUser { person, depts } => {
            check_user(tree, &person, &depts, |id| tree.dept(id).is_some())?;
            out.user(person, depts);
        }
        OrgChange::DeleteUser(uid) => {
            if tree.person(uid).is_none() && tree.depts_of(uid).is_empty() {
                return Err(OrgError::NotFound(format!("user {uid} is not in the tree")));
            }
            out.remove_user(uid);
        }
        OrgChange::Import {
            depts,
            users,
            replace,
        } => plan_import(tree, &mut out, depts, users, replace)?,
    }
    out.visibility_followups();
    Ok(out.records)
}

fn check_user(
    tree: &OrgTree,
    person: &OrgPerson,
    depts: &[OrgMember],
    dept_exists: impl Fn(u64) -> bool,
) -> Result<(), OrgError> {
    tree.check(&OrgEntity::Person(person.clone()))?;
    if depts.len() > MAX_USER_DEPTS {
        return Err(OrgError::Invalid(format!(
            "user {} is in {} departments, at most {MAX_USER_DEPTS}",
            person.uid,
            depts.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for m in depts {
        if m.uid != person.uid {
            return Err(OrgError::Invalid("a membership names another user".into()));
        }
        if !seen.insert(m.dept) {
            return Err(OrgError::Invalid(format!(
                "department {} is listed twice for user {}",
                m.dept, person.uid
            )));
        }
        if m.title.len() > im_shared::org::MAX_TITLE_LEN {
            return Err(OrgError::Invalid(format!(
                "title is {} bytes, at most {}",
                m.title.len(),
                im_shared::org::MAX_TITLE_LEN
            )));
        }
        if !dept_exists(m.dept) {
            return Err(OrgError::NotFound(format!(
                "department {} does not exist",
                m.dept
            )));
        }
    }
    Ok(())
}

fn plan_import(
    tree: &OrgTree,
    out: &mut Plan<'_>,
    depts: Vec<OrgDept>,
    users: Vec<(OrgPerson, Vec<OrgMember>)>,
    replace: bool,
) -> Result<(), OrgError> {
    // The tree the import leaves: the departments as they will be (the import's over the kept
    // ones), checked as a whole for missing parents, loops and depth.
    let mut next: BTreeMap<u64, OrgDept> = BTreeMap::new();
    if !replace {
        for id in all_depts(tree) {
            if let Some(d) = tree.dept(id) {
                next.insert(id, d.clone());
            }
        }
    }
    let mut listed = BTreeSet::new();
    for d in depts {
        if !listed.insert(d.id) {
            return Err(OrgError::Invalid(format!(
                "department {} is listed twice",
                d.id
            )));
        }
        // Name, id and self-parent checks of a single department.
        OrgTree::new().check(&OrgEntity::Dept(OrgDept {
            parent: 0,
            ..d.clone()
        }))?;
        if d.parent == d.id {
            return Err(OrgError::Invalid(format!(
                "department {} cannot be its own parent",
                d.id
            )));
        }
        next.insert(d.id, d);
    }
    // Depth of every department, parents first; a parent missing or a loop is an error.
    let mut depth: BTreeMap<u64, usize> = BTreeMap::new();
    let mut order = Vec::with_capacity(next.len());
    for &id in next.keys() {
        let mut chain = Vec::new();
        let mut at = id;
        while at != 0 && !depth.contains_key(&at) {
            let Some(d) = next.get(&at) else {
                let child = chain.last().copied().unwrap_or(id);
                return Err(OrgError::NotFound(format!(
                    "department {child} has parent {at}, which does not exist"
                )));
            };
            if chain.contains(&at) || chain.len() > im_shared::org::MAX_ORG_DEPTH {
                return Err(OrgError::Conflict(format!(
                    "the departments above {id} make a loop or are deeper than {} levels",
                    im_shared::org::MAX_ORG_DEPTH
                )));
            }
            chain.push(at);
            at = d.parent;
        }
        let mut level = if at == 0 { 0 } else { depth[&at] };
        for &c in chain.iter().rev() {
            level += 1;
            if level > im_shared::org::MAX_ORG_DEPTH {
                return Err(OrgError::Invalid(format!(
                    "the tree would be deeper than {} levels",
                    im_shared::org::MAX_ORG_DEPTH
                )));
            }
            depth.insert(c, level);
            order.push(c);
        }
    }
    for &id in &order {
        if listed.contains(&id) {
            out.put(OrgEntity::Dept(next[&id].clone()));
        }
    }
    let mut listed_users = BTreeSet::new();
    for (person, memberships) in users {
        if !listed_users.insert(person.uid) {
            return Err(OrgError::Invalid(format!(
                "user {} is listed twice",
                person.uid
            )));
        }
        check_user(tree, &person, &memberships, |d| next.contains_key(&d))?;
        out.user(person, memberships);
    }
    if replace {
        for uid in all_users(tree) {
            if !listed_users.contains(&uid) {
                out.remove_user(uid);
            }
        }
        // Deepest first, so a department's removal follows its sub-departments'.
        let mut gone: Vec<(usize, u64)> = all_depts(tree)
            .into_iter()
            .filter(|id| !next.contains_key(id))
            .map(|id| (tree.path(id).len(), id))
            .collect();
        gone.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in gone {
            if let Some(d) = tree.dept(id) {
                out.delete(OrgEntity::Dept(d.clone()));
            }
        }
    }
    Ok(())
}

/// Live departments of `tree`, top-down.
fn all_depts(tree: &OrgTree) -> Vec<u64> {
    let mut out = Vec::new();
    let mut level = tree.children_of(0);
    while !level.is_empty() {
        out.extend(&level);
        level = level.iter().flat_map(|&d| tree.children_of(d)).collect();
    }
    out
}

/// Users with a person record or a membership in `tree`.
fn all_users(tree: &OrgTree) -> BTreeSet<u64> {
    tree.records()
        .filter(|r| !r.deleted)
        .filter_map(|r| match &r.entity {
            OrgEntity::Person(p) => Some(p.uid),
            OrgEntity::Member(m) => Some(m.uid),
            OrgEntity::Dept(_) => None,
        })
        .collect()
}

/// Records being planned over a tree.
struct Plan<'a> {
    tree: &'a OrgTree,
    next: u64,
    records: Vec<Planned>,
    /// Keys with a record in `records`.
    keys: std::collections::HashSet<im_shared::org::OrgKey>,
}

impl<'a> Plan<'a> {
    fn new(tree: &'a OrgTree) -> Self {
        Plan {
            tree,
            next: tree.version() + 1,
            records: Vec::new(),
            keys: Default::default(),
        }
    }

    /// Writes an unchanged live record again with a new version, so that a reader whose view of
    /// it changed (it was sent as a removal, or must be now) gets it in an incremental sync.
    fn touch(&mut self, key: im_shared::org::OrgKey) {
        if self.keys.contains(&key) {
            return;
        }
        if let Some(r) = self.tree.record(key).filter(|r| !r.deleted) {
            let (entity, old) = (r.entity.clone(), r.version);
            self.keys.insert(key);
            self.records.push((
                OrgRecord {
                    version: self.next,
                    deleted: false,
                    entity,
                },
                Some(old),
            ));
            self.next += 1;
        }
    }

    /// Who may see what depends on the tree, not only on a record: after a change that alters it,
    /// the records whose visibility may have changed are written again (see [`Plan::touch`]).
    /// - a department hidden or shown, or moved: its whole subtree (departments, memberships, the
    ///   people in them);
    /// - a membership begun or ended in a hidden subtree: that subtree (its new or former member
    ///   sees it, or no longer does);
    /// - a user whose memberships changed: its person record (seen through its departments).
    fn visibility_followups(&mut self) {
        use im_shared::org::OrgKey;
        let mut subtrees = BTreeSet::new();
        let mut users = BTreeSet::new();
        for (r, _) in &self.records {
            match &r.entity {
                OrgEntity::Dept(d) if !r.deleted => {
                    if let Some(old) = self.tree.dept(d.id) {
                        if old.hidden != d.hidden || old.parent != d.parent {
                            subtrees.insert(d.id);
                        }
                    }
                }
                OrgEntity::Member(m) => {
                    users.insert(m.uid);
                    if let Some(&h) = self
                        .tree
                        .path(m.dept)
                        .iter()
                        .find(|&&d| self.tree.dept(d).is_some_and(|x| x.hidden))
                    {
                        subtrees.insert(h);
                    }
                }
                _ => {}
            }
        }
        for root in subtrees {
            let mut level = vec![root];
            while !level.is_empty() {
                let mut next = Vec::new();
                for d in level {
                    self.touch(OrgKey::Dept(d));
                    let members: Vec<u64> = self.tree.members_of(d).collect();
                    for uid in members {
                        self.touch(OrgKey::Member { uid, dept: d });
                        self.touch(OrgKey::Person(uid));
                    }
                    next.extend(self.tree.children_of(d));
                }
                level = next;
            }
        }
        for uid in users {
            self.touch(OrgKey::Person(uid));
        }
    }

    fn push(&mut self, entity: OrgEntity, deleted: bool) {
        let old = self.tree.record(entity.key());
        if let Some(old) = old {
            if old.deleted == deleted && old.entity == entity {
                return; // unchanged: no record
            }
        } else if deleted {
            return;
        }
        self.keys.insert(entity.key());
        self.records.push((
            OrgRecord {
                version: self.next,
                deleted,
                entity,
            },
            old.map(|r| r.version),
        ));
        self.next += 1;
    }

    fn put(&mut self, entity: OrgEntity) {
        self.push(entity, false);
    }

    fn delete(&mut self, entity: OrgEntity) {
        if self.tree.record(entity.key()).is_some_and(|r| !r.deleted) {
            self.push(entity, true);
        }
    }

    /// The person and exactly `depts` as memberships (the others end).
    fn user(&mut self, person: OrgPerson, depts: Vec<OrgMember>) {
        let uid = person.uid;
        self.put(OrgEntity::Person(person));
        let keep: BTreeSet<u64> = depts.iter().map(|m| m.dept).collect();
        for m in depts {
            self.put(OrgEntity::Member(m));
        }
        for d in self.tree.depts_of(uid) {
            if !keep.contains(&d) {
                self.end_membership(uid, d);
            }
        }
    }

    fn end_membership(&mut self, uid: u64, dept: u64) {
        if let Some(m) = self.tree.membership(uid, dept) {
            self.delete(OrgEntity::Member(m.clone()));
        }
    }

    fn remove_user(&mut self, uid: u64) {
        for d in self.tree.depts_of(uid) {
            self.end_membership(uid, d);
        }
        if let Some(p) = self.tree.person(uid) {
            self.delete(OrgEntity::Person(p.clone()));
        }
    }
}

/// The store ops of planned records.
pub fn ops(planned: &[Planned]) -> Vec<Op> {
    planned
        .iter()
        .map(|(record, replaces)| Op::OrgPut {
            record: record.clone(),
            replaces: *replaces,
        })
        .collect()
}

/// Keys of the records, for tests.
#[cfg(test)]
fn keys(planned: &[Planned]) -> Vec<(OrgKey, bool)> {
    planned.iter().map(|(r, _)| (r.key(), r.deleted)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dept(id: u64, parent: u64, name: &str) -> OrgDept {
        OrgDept {
            id,
            parent,
            order: 0,
            hidden: false,
            name: name.into(),
        }
    }

    fn person(uid: u64) -> OrgPerson {
        OrgPerson {
            uid,
            name: format!("user {uid}"),
        }
    }

    fn member(uid: u64, dept: u64) -> OrgMember {
        OrgMember {
            uid,
            dept,
            order: 0,
            title: "t".into(),
        }
    }

    fn applied(tree: &mut OrgTree, change: OrgChange) -> Vec<Planned> {
        let p = plan(tree, change).expect("plan");
        for (r, _) in &p {
            tree.apply(r.clone());
        }
        p
    }

    fn company() -> OrgTree {
        let mut t = OrgTree::new();
        applied(
            &mut t,
            OrgChange::Import {
                depts: vec![dept(3, 2, "Storage"), dept(2, 1, "Eng"), dept(1, 0, "Co")],
                users: vec![
                    (person(10), vec![member(10, 3)]),
                    (person(11), vec![member(11, 2), member(11, 3)]),
                ],
                replace: false,
            },
        );
        t
    }

    #[test]
    fn an_import_writes_parents_before_children_and_people_after_their_departments() {
        let t = company();
        let k = keys(
            &plan(
                &OrgTree::new(),
                OrgChange::Import {
                    depts: vec![dept(3, 2, "Storage"), dept(2, 1, "Eng"), dept(1, 0, "Co")],
                    users: vec![(person(10), vec![member(10, 3)])],
                    replace: false,
                },
            )
            .unwrap(),
        );
        assert_eq!(
            k,
            vec![
                (OrgKey::Dept(1), false),
                (OrgKey::Dept(2), false),
                (OrgKey::Dept(3), false),
                (OrgKey::Person(10), false),
                (OrgKey::Member { uid: 10, dept: 3 }, false),
            ]
        );
        assert_eq!(t.version(), 8);
        assert_eq!(t.depts_of(11), vec![2, 3]);
    }

    #[test]
    fn the_same_import_again_writes_nothing() {
        let t = company();
        let again = plan(
            &t,
            OrgChange::Import {
                depts: vec![dept(3, 2, "Storage"), dept(2, 1, "Eng"), dept(1, 0, "Co")],
                users: vec![
                    (person(10), vec![member(10, 3)]),
                    (person(11), vec![member(11, 2), member(11, 3)]),
                ],
                replace: true,
            },
        )
        .unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_replacing_import_removes_what_it_does_not_list_inside_out() {
        let mut t = company();
        let p = applied(
            &mut t,
            OrgChange::Import {
                depts: vec![dept(1, 0, "Co")],
                users: vec![(person(10), vec![member(10, 1)])],
                replace: true,
            },
        );
        assert_eq!(
            keys(&p),
            vec![
                (OrgKey::Member { uid: 10, dept: 1 }, false),
                (OrgKey::Member { uid: 10, dept: 3 }, true),
                (OrgKey::Member { uid: 11, dept: 2 }, true),
                (OrgKey::Member { uid: 11, dept: 3 }, true),
                (OrgKey::Person(11), true),
                (OrgKey::Dept(3), true),
                (OrgKey::Dept(2), true),
                // Its memberships changed: seen through other departments now.
                (OrgKey::Person(10), false),
            ]
        );
        // Each record replaces the one of its key.
        assert!(p.iter().all(|(r, old)| old.is_some() || !r.deleted));
        assert_eq!(t.children_of(1), Vec::<u64>::new());
    }

    #[test]
    fn an_import_with_a_loop_or_a_missing_parent_is_refused_whole() {
        let t = company();
        let looped = plan(
            &t,
            OrgChange::Import {
                depts: vec![dept(5, 6, "a"), dept(6, 5, "b")],
                users: vec![],
                replace: false,
            },
        );
        assert!(matches!(looped, Err(OrgError::Conflict(_))), "{looped:?}");
        let orphan = plan(
            &t,
            OrgChange::Import {
                depts: vec![dept(5, 99, "a")],
                users: vec![],
                replace: false,
            },
        );
        assert!(matches!(orphan, Err(OrgError::NotFound(_))), "{orphan:?}");
        let dup = plan(
            &t,
            OrgChange::Import {
                depts: vec![dept(5, 1, "a"), dept(5, 1, "a")],
                users: vec![],
                replace: false,
            },
        );
        assert!(matches!(dup, Err(OrgError::Invalid(_))), "{dup:?}");
        // A replacing import that drops a parent its kept child needs.
        let cut = plan(
            &t,
            OrgChange::Import {
                depts: vec![dept(3, 2, "Storage")],
                users: vec![],
                replace: true,
            },
        );
        assert!(matches!(cut, Err(OrgError::NotFound(_))), "{cut:?}");
    }

    #[test]
    fn a_department_with_people_or_sub_departments_is_not_deleted() {
        let mut t = company();
        assert!(matches!(
            plan(&t, OrgChange::DeleteDept(2)),
            Err(OrgError::Conflict(_))
        ));
        assert!(matches!(
            plan(&t, OrgChange::DeleteDept(99)),
            Err(OrgError::NotFound(_))
        ));
        applied(&mut t, OrgChange::DeleteUser(10));
        applied(&mut t, OrgChange::DeleteUser(11));
        let p = applied(&mut t, OrgChange::DeleteDept(3));
        assert_eq!(keys(&p), vec![(OrgKey::Dept(3), true)]);
        assert!(matches!(
            plan(&t, OrgChange::DeleteUser(10)),
            Err(OrgError::NotFound(_))
        ));
    }

    #[test]
    fn putting_a_user_moves_it_and_ends_the_memberships_it_does_not_list() {
        let mut t = company();
        let p = applied(
            &mut t,
            OrgChange::PutUser {
                person: person(11),
                depts: vec![member(11, 1)],
            },
        );
        assert_eq!(
            keys(&p),
            vec![
                (OrgKey::Member { uid: 11, dept: 1 }, false),
                (OrgKey::Member { uid: 11, dept: 2 }, true),
                (OrgKey::Member { uid: 11, dept: 3 }, true),
                (OrgKey::Person(11), false),
            ]
        );
        assert_eq!(t.depts_of(11), vec![1]);
        let bad = plan(
            &t,
            OrgChange::PutUser {
                person: person(12),
                depts: vec![member(12, 77)],
            },
        );
        assert!(matches!(bad, Err(OrgError::NotFound(_))));
        let too_many = plan(
            &t,
            OrgChange::PutUser {
                person: person(12),
                depts: (0..=MAX_USER_DEPTS as u64)
                    .map(|d| member(12, d + 1))
                    .collect(),
            },
        );
        assert!(matches!(too_many, Err(OrgError::Invalid(_))));
    }

    #[test]
    fn hiding_a_department_writes_its_whole_subtree_again() {
        let mut t = company();
        let before = t.version();
        let p = applied(
            &mut t,
            OrgChange::PutDept(OrgDept {
                hidden: true,
                ..dept(2, 1, "Eng")
            }),
        );
        let mut k = keys(&p);
        k.sort();
        assert_eq!(
            k,
            vec![
                (OrgKey::Dept(2), false),
                (OrgKey::Dept(3), false),
                (OrgKey::Person(10), false),
                (OrgKey::Person(11), false),
                (OrgKey::Member { uid: 10, dept: 3 }, false),
                (OrgKey::Member { uid: 11, dept: 2 }, false),
                (OrgKey::Member { uid: 11, dept: 3 }, false),
            ]
        );
        // Every record replaces its older version; versions stay unique and increasing.
        assert!(p.iter().all(|(r, old)| old.is_some() && r.version > before));
        assert_eq!(t.changes_since(before, 100).len(), p.len());
        // Renaming it (still hidden) writes the department only.
        let p = applied(
            &mut t,
            OrgChange::PutDept(OrgDept {
                hidden: true,
                ..dept(2, 1, "Engineering")
            }),
        );
        assert_eq!(keys(&p), vec![(OrgKey::Dept(2), false)]);
    }

    #[test]
    fn joining_a_hidden_department_writes_it_again_for_the_new_member() {
        let mut t = company();
        applied(
            &mut t,
            OrgChange::PutDept(OrgDept {
                hidden: true,
                ..dept(3, 2, "Storage")
            }),
        );
        let p = applied(
            &mut t,
            OrgChange::PutUser {
                person: person(12),
                depts: vec![member(12, 3)],
            },
        );
        let k: std::collections::BTreeSet<_> = keys(&p).into_iter().collect();
        for want in [
            OrgKey::Person(12),
            OrgKey::Member { uid: 12, dept: 3 },
            OrgKey::Dept(3),
            OrgKey::Member { uid: 10, dept: 3 },
            OrgKey::Person(10),
        ] {
            assert!(k.contains(&(want, false)), "{want:?} not in {k:?}");
        }
        // Changing a visible membership re-puts the person only.
        let p = applied(
            &mut t,
            OrgChange::PutUser {
                person: person(11),
                depts: vec![member(11, 1)],
            },
        );
        assert!(keys(&p).contains(&(OrgKey::Person(11), false)));
        assert!(!keys(&p).contains(&(OrgKey::Dept(1), false)));
    }

    #[test]
    fn a_move_under_its_own_subtree_is_refused() {
        let t = company();
        let r = plan(&t, OrgChange::PutDept(dept(1, 3, "Co")));
        assert!(matches!(r, Err(OrgError::Conflict(_))), "{r:?}");
        let same = plan(&t, OrgChange::PutDept(dept(2, 1, "Eng"))).unwrap();
        assert!(same.is_empty(), "an unchanged department writes nothing");
    }
}
