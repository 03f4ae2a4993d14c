//! The organisation tree at the size of a large company: 100 000 people in 10 110 departments
//! (10 divisions × 10 groups × 100 teams, plus their parents), each person in one team and every
//! tenth in a second one: 210 110 records.
//!
//! Run: `cargo bench -p im-benches --bench org` (add `-- --quick` for a fast pass).
//!
//! - `org/import_plan`: what the tree's owner does with a whole-company import into an empty tree
//!   (checks, ordering, versions);
//! - `org/apply_all`: building a node's cache from every record;
//! - `org/load_from_store`: a node's start: every record read from the embedded store (fjall,
//!   committed beforehand) and applied;
//! - `org/sync_first_page`, `org/sync_incremental`: a phone's first `OrgSync` page (1 000 records)
//!   and its sync after 10 changes;
//! - `org/dept_view_team`, `org/dept_view_top`: a team with its 10–11 members, and a division
//!   (10 sub-departments, no members);
//! - `org/user_view`: a person with the path to the top;
//! - `org/search`: a search by name that matches a few (one substring scan of the name index),
//!   `org/search_broad` one that matches every person (counted up to 10 000), and
//!   `org/search_after_a_change` the first search after a change (the index is rebuilt).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use im_logic::org::{self, OrgCache};
use im_logic::store::{FjallStore, Store, WriteBatch};
use im_shared::org::{OrgChange, OrgDept, OrgMember, OrgPerson, OrgRecord, OrgTree};

const DIVISIONS: u64 = 10;
const GROUPS: u64 = 10;
const TEAMS: u64 = 100;
const PEOPLE: u64 = 100_000;

/// Department ids: divisions 1..=10, groups 100.., teams 10 000...
fn company() -> OrgChange {
    let mut depts = Vec::new();
    let mut teams = Vec::new();
    for d in 1..=DIVISIONS {
        depts.push(dept(d, 0, format!("Division {d}")));
        for g in 0..GROUPS {
            let gid = 100 + d * GROUPS + g;
            depts.push(dept(gid, d, format!("Group {gid}")));
            for t in 0..TEAMS {
                let tid = 10_000 + gid * TEAMS + t;
                depts.push(dept(tid, gid, format!("Team {tid}")));
                teams.push(tid);
            }
        }
    }
    let users = (1..=PEOPLE)
        .map(|uid| {
            let n = teams.len() as u64;
            let mut m = vec![member(uid, teams[(uid % n) as usize])];
            if uid % 10 == 0 {
                // Another team than the first.
                m.push(member(uid, teams[((uid + n / 2) % n) as usize]));
            }
            (
                OrgPerson {
                    uid,
                    name: format!("Person {uid} Surname"),
                },
                m,
            )
        })
        .collect();
    OrgChange::Import {
        depts,
        users,
        replace: false,
    }
}

fn dept(id: u64, parent: u64, name: String) -> OrgDept {
    OrgDept {
        id,
        parent,
        order: (id % 7) as u32,
        hidden: false,
        name,
    }
}

fn member(uid: u64, dept: u64) -> OrgMember {
    OrgMember {
        uid,
        dept,
        order: (uid % 13) as u32,
        title: "engineer".into(),
    }
}

fn records() -> Vec<OrgRecord> {
    org::plan(&OrgTree::new(), company())
        .expect("the company plans")
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}

fn tree(records: &[OrgRecord]) -> OrgTree {
    let mut t = OrgTree::new();
    for r in records {
        t.apply(r.clone());
    }
    t
}

fn bench_org(c: &mut Criterion) {
    let recs = records();
    println!(
        "org: {} records, {} departments",
        recs.len(),
        tree(&recs).dept_count()
    );
    let mut g = c.benchmark_group("org");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("import_plan", |b| {
        b.iter(|| black_box(org::plan(&OrgTree::new(), company()).unwrap().len()))
    });
    g.bench_function("apply_all", |b| b.iter(|| black_box(tree(&recs).len())));

    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path()).expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for chunk in recs.chunks(org::IMPORT_CHUNK) {
            let planned: Vec<_> = chunk.iter().map(|r| (r.clone(), None)).collect();
            store
                .commit(WriteBatch {
                    ops: org::ops(&planned),
                    writer: None,
                })
                .await
                .expect("commit");
        }
    });
    g.bench_function("load_from_store", |b| {
        b.iter_custom(|n| {
            let start = Instant::now();
            for _ in 0..n {
                let cache = OrgCache::default();
                let got = rt.block_on(org::refresh(&store, &cache)).expect("load");
                assert_eq!(got, recs.len());
            }
            start.elapsed()
        })
    });
    g.finish();

    let t = tree(&recs);
    let head = t.version();
    let mut g = c.benchmark_group("org");
    g.bench_function("sync_first_page", |b| {
        b.iter(|| black_box(t.changes_since(0, 1000).len()))
    });
    g.bench_function("sync_incremental", |b| {
        b.iter(|| black_box(t.changes_since(head - 10, 1000).len()))
    });
    let team = 10_000 + (100 + GROUPS) * TEAMS; // the first team of division 1
    g.bench_function("dept_view_team", |b| {
        b.iter(|| black_box(t.dept_view(1, team, 0, 100).unwrap().members.len()))
    });
    g.bench_function("dept_view_top", |b| {
        b.iter(|| black_box(t.dept_view(1, 1, 0, 100).unwrap().children.len()))
    });
    g.bench_function("user_view", |b| {
        b.iter(|| black_box(t.user_view(1, 4242).len()))
    });
    g.sample_size(20);
    g.bench_function("search", |b| {
        b.iter(|| black_box(t.search(1, "person 4242 ", 20).1))
    });
    // Every person matches: the count stops at MAX_SEARCH_TOTAL.
    g.bench_function("search_broad", |b| {
        b.iter(|| black_box(t.search(1, "surname", 20).1))
    });
    g.finish();
    // The first search after a change rebuilds the name index.
    let mut g = c.benchmark_group("org");
    g.sample_size(10);
    let mut changed = t.clone();
    let mut v = changed.version();
    g.bench_function("search_after_a_change", |b| {
        b.iter(|| {
            v += 1;
            changed.apply(OrgRecord {
                version: v,
                deleted: false,
                entity: im_shared::org::OrgEntity::Person(OrgPerson {
                    uid: 7,
                    name: format!("Renamed {v}"),
                }),
            });
            black_box(changed.search(1, "person 4242 ", 20).1)
        })
    });
    g.finish();

    // Pages and bytes of a phone's first full sync (printed, for BENCHMARKS.md).
    let (mut since, mut pages, mut bytes) = (0, 0, 0usize);
    loop {
        let page = t.changes_since(since, 1000);
        if page.is_empty() {
            break;
        }
        pages += 1;
        bytes += page.iter().map(|r| r.encoded_len()).sum::<usize>();
        since = page.last().unwrap().version;
    }
    println!("org: a full sync is {pages} pages, {bytes} bytes of records");
}

criterion_group!(benches, bench_org);
criterion_main!(benches);
