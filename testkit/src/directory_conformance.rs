//! The conformance test-suite of [`Directory`]: [`MemoryDirectory`](super::MemoryDirectory) and
//! [`RedisDirectory`](super::RedisDirectory) must both pass [`run_all`]. Each check is a
//! `pub async fn` that panics on a violation.
//!
//! Every check touches only uids, gate ids and vshards derived from its `base` argument, so all
//! checks can share one directory and the suite can run again on the same directory with another
//! multiple of [`BASE_STRIDE`] ([`run_all_at`]). The TTL checks sleep a few seconds; [`run_all`]
//! runs them concurrently.

use std::time::Duration;

use im_shared::{ShardId, UserId};

use im_directory::{Directory, DirectoryError, GateInfo, RouteEntry};

/// Distance between two `base`s whose runs must not see each other's records.
pub const BASE_STRIDE: u64 = 1 << 20;

/// Uids available to one check inside a run.
const BLOCK: u64 = 1024;

/// Users written by [`many_users`].
pub const MANY_USERS: u64 = 600;

/// Uid `i` (< [`BLOCK`]) of check number `check` in the run at `base`. Never 0.
pub fn uid(base: u64, check: u64, i: u64) -> UserId {
    assert!(i < BLOCK);
    UserId(base + 1 + check * BLOCK + i)
}

/// Gate id `j` (< 8) of the run at `base`.
fn gate_id(base: u64, j: u64) -> u16 {
    ((base / BASE_STRIDE * 8 + j) % 65536) as u16
}

/// Vshard `j` (< 8) of the run at `base`.
fn vshard(base: u64, j: u64) -> ShardId {
    ShardId(((base / BASE_STRIDE * 8 + j) % 65536) as u16)
}

/// Check numbers (the `check` of [`uid`]).
const ROUTES: u64 = 0;
const REMOVE: u64 = 1;
const PRESENCE: u64 = 2;
const MANY: u64 = 3;

fn route(device_type: u8, conn: u64, epoch: u64) -> RouteEntry {
    RouteEntry {
        device_type,
        device_id: format!("dev-{device_type}-{conn}|:{{x}}"),
        gate: (conn % 7) as u16 + 1,
        core: (conn % 3) as u16,
        conn,
        epoch,
    }
}

/// Runs every check at base 0.
pub async fn run_all<D: Directory>(dir: &D) {
    run_all_at(dir, 0).await;
}

/// Runs every check with uids, gate ids and vshards derived from `base` (a multiple of
/// [`BASE_STRIDE`]).
pub async fn run_all_at<D: Directory>(dir: &D, base: u64) {
    routes_by_device_type(dir, base).await;
    remove_is_compare_and_delete(dir, base).await;
    shard_claims_are_fenced(dir, base).await;
    shard_leases(dir, base).await;
    many_users(dir, base).await;
    tokio::join!(
        presence_expires(dir, base),
        routes_follow_presence_ttl(dir, base),
        gates_expire(dir, base),
    );
}

/// Set, read and overwrite routes: one route per device type, sorted by device type.
pub async fn routes_by_device_type<D: Directory>(dir: &D, base: u64) {
    let u = uid(base, ROUTES, 0);
    assert_eq!(dir.routes(u).await.unwrap(), vec![], "no routes yet");

    let phone = route(1, (7 << 48) | (3 << 32) | 11, 1);
    let desktop = route(3, u64::MAX, 2);
    dir.set_route(u, desktop.clone()).await.unwrap();
    dir.set_route(u, phone.clone()).await.unwrap();
    assert_eq!(
        dir.routes(u).await.unwrap(),
        vec![phone.clone(), desktop.clone()]
    );

    // A second login of the same device type replaces the first; the other type stays.
    let phone2 = route(1, 12, 3);
    dir.set_route(u, phone2.clone()).await.unwrap();
    assert_eq!(dir.routes(u).await.unwrap(), vec![phone2, desktop.clone()]);

    // Another user is independent.
    let other = uid(base, ROUTES, 1);
    assert_eq!(dir.routes(other).await.unwrap(), vec![]);
    let web = route(4, 99, 1);
    dir.set_route(other, web.clone()).await.unwrap();
    assert_eq!(dir.routes(other).await.unwrap(), vec![web]);
    assert_eq!(dir.routes(u).await.unwrap().len(), 2);
}

/// `remove_route` deletes only the route that still names the given connection.
pub async fn remove_is_compare_and_delete<D: Directory>(dir: &D, base: u64) {
    let u = uid(base, REMOVE, 0);
    let old = route(1, 100, 1);
    let new = route(1, 200, 2);
    let tablet = route(2, 300, 1);
    dir.set_route(u, old.clone()).await.unwrap();
    dir.set_route(u, tablet.clone()).await.unwrap();
    // A second phone login replaces the first...
    dir.set_route(u, new.clone()).await.unwrap();
    // ...and the first connection's late logout must not delete the new route.
    assert!(!dir.remove_route(u, 1, old.conn).await.unwrap());
    assert_eq!(
        dir.routes(u).await.unwrap(),
        vec![new.clone(), tablet.clone()]
    );
    // The right conn under the wrong device type deletes nothing either.
    assert!(!dir.remove_route(u, 2, new.conn).await.unwrap());
    assert!(!dir.remove_route(u, 3, new.conn).await.unwrap());

    assert!(dir.remove_route(u, 1, new.conn).await.unwrap());
    assert_eq!(dir.routes(u).await.unwrap(), vec![tablet.clone()]);
    assert!(
        !dir.remove_route(u, 1, new.conn).await.unwrap(),
        "already gone"
    );
    assert!(dir.remove_route(u, 2, tablet.conn).await.unwrap());
    assert_eq!(dir.routes(u).await.unwrap(), vec![]);
    // Removing from a user without routes is a no-op.
    assert!(!dir.remove_route(uid(base, REMOVE, 1), 1, 1).await.unwrap());
    // A conn whose decimal form is a prefix of the stored one does not match.
    let long = route(1, 12345, 1);
    dir.set_route(u, long.clone()).await.unwrap();
    assert!(!dir.remove_route(u, 1, 1234).await.unwrap());
    assert!(!dir.remove_route(u, 1, 123).await.unwrap());
    assert_eq!(dir.routes(u).await.unwrap(), vec![long]);
}

/// Presence is set by `touch_presence`, refreshed by it, and expires after its TTL.
pub async fn presence_expires<D: Directory>(dir: &D, base: u64) {
    let short = uid(base, PRESENCE, 0);
    let refreshed = uid(base, PRESENCE, 1);
    let never = uid(base, PRESENCE, 2);
    assert!(!dir.is_online(never).await.unwrap());

    dir.touch_presence(short, 1).await.unwrap();
    dir.touch_presence(refreshed, 2).await.unwrap();
    assert!(dir.is_online(short).await.unwrap());
    assert!(dir.is_online(refreshed).await.unwrap());

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(!dir.is_online(short).await.unwrap(), "1 s presence expired");
    assert!(dir.is_online(refreshed).await.unwrap());
    dir.touch_presence(refreshed, 2).await.unwrap(); // heartbeat
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        dir.is_online(refreshed).await.unwrap(),
        "heartbeat extended the presence"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !dir.is_online(refreshed).await.unwrap(),
        "expired after the last heartbeat"
    );
    assert!(!dir.is_online(never).await.unwrap());
}

/// The route hash takes the presence TTL and expires with it; writing a route keeps the TTL.
pub async fn routes_follow_presence_ttl<D: Directory>(dir: &D, base: u64) {
    let u = uid(base, PRESENCE, 10);
    let kept = uid(base, PRESENCE, 11);
    dir.set_route(u, route(1, 1, 1)).await.unwrap();
    dir.set_route(kept, route(1, 2, 1)).await.unwrap();
    dir.touch_presence(u, 1).await.unwrap();
    dir.touch_presence(kept, 30).await.unwrap();
    // A route written after the heartbeat does not reset the hash's TTL.
    dir.set_route(u, route(3, 3, 1)).await.unwrap();
    assert_eq!(dir.routes(u).await.unwrap().len(), 2);

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(dir.routes(u).await.unwrap(), vec![], "routes expired");
    assert!(!dir.is_online(u).await.unwrap());
    assert!(!dir.remove_route(u, 1, 1).await.unwrap());
    assert_eq!(dir.routes(kept).await.unwrap(), vec![route(1, 2, 1)]);
    assert!(dir.is_online(kept).await.unwrap());

    // A login after expiry starts a fresh hash.
    dir.set_route(u, route(2, 4, 2)).await.unwrap();
    assert_eq!(dir.routes(u).await.unwrap(), vec![route(2, 4, 2)]);
}

/// Gates are listed while their registration lives; refreshing replaces the info.
pub async fn gates_expire<D: Directory>(dir: &D, base: u64) {
    let short = GateInfo {
        id: gate_id(base, 0),
        tcp_addr: "127.0.0.1:9000".into(),
        ws_addr: Some("ws://127.0.0.1:9001/ws".into()),
        conns: 10,
    };
    let long = GateInfo {
        id: gate_id(base, 1),
        tcp_addr: "[::1]:9100".into(),
        ws_addr: None,
        conns: 0,
    };
    let mine = |gs: Vec<GateInfo>| -> Vec<GateInfo> {
        gs.into_iter()
            .filter(|g| g.id == short.id || g.id == long.id)
            .collect()
    };
    dir.register_gate(short.clone(), 1).await.unwrap();
    dir.register_gate(long.clone(), 30).await.unwrap();
    let all = dir.gates().await.unwrap();
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "sorted by id");
    assert_eq!(mine(all), vec![short.clone(), long.clone()]);

    // Refresh with new load.
    let long2 = GateInfo {
        conns: 12345,
        ..long.clone()
    };
    dir.register_gate(long2.clone(), 30).await.unwrap();
    assert_eq!(
        mine(dir.gates().await.unwrap()),
        vec![short.clone(), long2.clone()]
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        mine(dir.gates().await.unwrap()),
        vec![long2.clone()],
        "gate 1 s TTL expired"
    );
    // A gate that comes back is listed again.
    dir.register_gate(short.clone(), 30).await.unwrap();
    assert_eq!(mine(dir.gates().await.unwrap()), vec![short, long2]);
}

/// Shard claims are compare-and-set on the epoch; a stale epoch is fenced.
pub async fn shard_claims_are_fenced<D: Directory>(dir: &D, base: u64) {
    let s = vshard(base, 0);
    let s2 = vshard(base, 1);
    assert_eq!(dir.shard_owner(s).await.unwrap(), None);

    assert_eq!(dir.claim_shard(s, 1, 0).await.unwrap(), 1);
    assert_eq!(dir.shard_owner(s).await.unwrap(), Some((1, 1)));
    // Node 2 with a stale view (never claimed) is refused and told the current epoch.
    assert_eq!(
        dir.claim_shard(s, 2, 0).await,
        Err(DirectoryError::Fenced { current: 1 })
    );
    // A future epoch is refused too.
    assert_eq!(
        dir.claim_shard(s, 2, 7).await,
        Err(DirectoryError::Fenced { current: 1 })
    );
    // Moving the shard: node 2 claims with the epoch it read.
    assert_eq!(dir.claim_shard(s, 2, 1).await.unwrap(), 2);
    assert_eq!(dir.shard_owner(s).await.unwrap(), Some((2, 2)));
    // The old owner's claim with its old epoch is fenced.
    let e = dir.claim_shard(s, 1, 1).await.unwrap_err();
    assert_eq!(e, DirectoryError::Fenced { current: 2 });
    assert!(!e.is_retryable());
    assert_eq!(dir.shard_owner(s).await.unwrap(), Some((2, 2)));

    // Concurrent claims with the same expected epoch: exactly one wins.
    let (a, b, c, d) = tokio::join!(
        dir.claim_shard(s2, 10, 0),
        dir.claim_shard(s2, 11, 0),
        dir.claim_shard(s2, 12, 0),
        dir.claim_shard(s2, 13, 0),
    );
    let results = [a, b, c, d];
    let winners: Vec<u16> = results
        .iter()
        .zip(10u16..)
        .filter_map(|(r, node)| r.as_ref().ok().map(|_| node))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one claim wins: {results:?}");
    for r in &results {
        match r {
            Ok(epoch) => assert_eq!(*epoch, 1),
            Err(e) => assert_eq!(*e, DirectoryError::Fenced { current: 1 }),
        }
    }
    assert_eq!(dir.shard_owner(s2).await.unwrap(), Some((winners[0], 1)));

    let map = dir.shard_map().await.unwrap();
    assert!(map.windows(2).all(|w| w[0].0 < w[1].0), "sorted by vshard");
    let mine: Vec<_> = map.into_iter().filter(|e| e.0 == s || e.0 == s2).collect();
    let mut expected = vec![(s, 2, 2), (s2, winners[0], 1)];
    expected.sort();
    assert_eq!(mine, expected);
}

/// Node id `j` (< 8) of the run at `base` for the lease checks.
fn lease_node(base: u64, j: u64) -> u16 {
    ((base / BASE_STRIDE * 8 + j) % 65536) as u16
}

/// Shard leases: a live lease holds its shards, an expired one is displaced (its renewals then
/// fail), a released one is taken at once, and a node's restart waits for its own old lease.
pub async fn shard_leases<D: Directory>(dir: &D, base: u64) {
    let (a, b) = (lease_node(base, 0), lease_node(base, 1));
    let s: Vec<ShardId> = (2..8).map(|j| vshard(base, j)).collect();
    let long = 60_000;
    let short = 300;

    // A takes s[0..3] under a short lease.
    let got = dir.acquire_shards(a, &s[..3], short).await.unwrap();
    assert_eq!(got.incarnation, 1);
    assert_eq!(got.epochs, vec![(s[0], 1), (s[1], 1), (s[2], 1)]);
    assert_eq!(got.displaced, vec![]);
    assert_eq!(dir.shard_owner(s[1]).await.unwrap(), Some((a, 1)));
    // Renewing keeps it: B is held off while A's lease is live.
    dir.renew_lease(a, 1, short).await.unwrap();
    assert_eq!(
        dir.acquire_shards(b, &s[2..4], long).await,
        Err(DirectoryError::Held {
            vshard: s[2].0,
            node: a
        })
    );
    assert_eq!(
        dir.shard_owner(s[3]).await.unwrap(),
        None,
        "nothing changed"
    );
    // A restart of A (new incarnation) waits for the old lease too.
    assert!(matches!(
        dir.acquire_shards(a, &s[..3], short).await,
        Err(DirectoryError::Held { node, .. }) if node == a
    ));

    // A's lease runs out: B takes s[2], s[3] and displaces A.
    tokio::time::sleep(std::time::Duration::from_millis(short * 2)).await;
    let got = dir.acquire_shards(b, &s[2..4], long).await.unwrap();
    assert_eq!(got.incarnation, 1);
    assert_eq!(got.epochs, vec![(s[2], 2), (s[3], 1)]);
    assert_eq!(got.displaced, vec![(a, 2)], "A's counter was raised to 2");
    assert_eq!(dir.shard_owner(s[2]).await.unwrap(), Some((b, 2)));
    // A (still incarnation 1) finds out when it renews, and keeps finding out.
    let e = dir.renew_lease(a, 1, short).await.unwrap_err();
    assert_eq!(e, DirectoryError::LeaseLost { current: 2 });
    assert!(!e.is_retryable());
    // A restarts: incarnation 3, takes s[0..2] back without waiting (its lease is gone) and
    // without displacing B.
    let got = dir.acquire_shards(a, &s[..2], long).await.unwrap();
    assert_eq!(got.incarnation, 3);
    assert_eq!(got.epochs, vec![(s[0], 2), (s[1], 2)]);
    assert_eq!(got.displaced, vec![]);
    dir.renew_lease(a, 3, long).await.unwrap();
    dir.renew_lease(b, 1, long).await.unwrap();

    // A lease that ran out without anyone taking the shards can be renewed.
    let c = lease_node(base, 2);
    let got = dir.acquire_shards(c, &s[4..], short).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(short * 2)).await;
    dir.renew_lease(c, got.incarnation, long).await.unwrap();
    // ... and is live again: another node cannot take C's shard.
    assert!(matches!(
        dir.acquire_shards(lease_node(base, 4), &s[4..], long).await,
        Err(DirectoryError::Held { node, .. }) if node == c
    ));

    // B gives s[3] up by re-acquiring only s[2] (a new incarnation, after releasing its lease):
    // A takes s[3] at once and displaces nobody, and B's previous incarnation is gone.
    dir.release_lease(b, 1).await.unwrap();
    let got = dir.acquire_shards(b, &s[2..3], long).await.unwrap();
    assert_eq!(got.incarnation, 2);
    let e = dir.renew_lease(b, 1, long).await.unwrap_err();
    assert_eq!(e, DirectoryError::LeaseLost { current: 2 });
    // A's acquire must name all of A's shards: a node's set is what it acquired last.
    dir.release_lease(a, 3).await.unwrap();
    let got = dir
        .acquire_shards(a, &[s[0], s[1], s[3]], long)
        .await
        .unwrap();
    assert_eq!(got.incarnation, 4);
    assert_eq!(got.epochs, vec![(s[0], 3), (s[1], 3), (s[3], 2)]);
    assert_eq!(got.displaced, vec![]);
    dir.renew_lease(b, 2, long).await.unwrap();
    // Releasing with a stale incarnation does nothing.
    dir.release_lease(b, 1).await.unwrap();
    assert_eq!(
        dir.acquire_shards(lease_node(base, 3), &s[2..3], long)
            .await,
        Err(DirectoryError::Held {
            vshard: s[2].0,
            node: b
        })
    );
    for n in [a, b, c] {
        let inc = match dir.renew_lease(n, 0, 1).await {
            Err(DirectoryError::LeaseLost { current }) => current,
            other => panic!("renewing incarnation 0 gave {other:?}"),
        };
        dir.release_lease(n, inc).await.unwrap();
    }
}

/// [`MANY_USERS`] users (their keys spread over every slot range of a cluster): every route,
/// presence and removal lands on the right user.
pub async fn many_users<D: Directory>(dir: &D, base: u64) {
    let users: Vec<UserId> = (0..MANY_USERS).map(|i| uid(base, MANY, i)).collect();
    for (i, &u) in users.iter().enumerate() {
        dir.set_route(u, route(1, 1_000 + i as u64, i as u64))
            .await
            .unwrap();
        if i % 2 == 0 {
            dir.set_route(u, route(3, 5_000 + i as u64, 1))
                .await
                .unwrap();
            dir.touch_presence(u, 60).await.unwrap();
        }
    }
    for (i, &u) in users.iter().enumerate() {
        let mut expected = vec![route(1, 1_000 + i as u64, i as u64)];
        if i % 2 == 0 {
            expected.push(route(3, 5_000 + i as u64, 1));
        }
        assert_eq!(dir.routes(u).await.unwrap(), expected, "user {u}");
        assert_eq!(dir.is_online(u).await.unwrap(), i % 2 == 0, "user {u}");
    }
    for (i, &u) in users.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
        assert!(dir.remove_route(u, 1, 1_000 + i as u64).await.unwrap());
    }
    for (i, &u) in users.iter().enumerate() {
        let n = dir.routes(u).await.unwrap().len();
        let expected = usize::from(i % 3 != 0) + usize::from(i % 2 == 0);
        assert_eq!(n, expected, "user {u}");
    }
}

/// The uids [`many_users`] writes in the run at `base`.
pub fn many_users_uids(base: u64) -> impl Iterator<Item = UserId> {
    (0..MANY_USERS).map(move |i| uid(base, MANY, i))
}
