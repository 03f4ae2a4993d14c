//! The directory conformance suite against [`MemoryDirectory`] and against [`RedisDirectory`] on
//! a real Redis Cluster (3 masters with 1 replica each, started by `im-testkit` from the local
//! `redis-server`), plus a master failover test. The Redis tests fail, not skip, when
//! `redis-server` is missing: CI installs it.

use im_directory::MemoryDirectory;
use im_testkit::directory_conformance as conformance;

#[tokio::test]
async fn memory_directory_passes_conformance() {
    let dir = MemoryDirectory::new();
    conformance::run_all(&dir).await;
    conformance::run_all_at(&dir.clone(), conformance::BASE_STRIDE).await;
}

/// Everything that needs the `redis` feature (default on) and a local `redis-server`.
#[cfg(feature = "redis")]
mod redis_cluster {
    use super::*;

    use std::collections::{BTreeSet, HashMap};
    use std::future::Future;
    use std::time::{Duration, Instant};

    use im_directory::{Directory, DirectoryError, GateInfo, RedisDirectory, RouteEntry};
    use im_shared::{ShardId, UserId};
    use im_testkit::{key_slot, RedisCluster};
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

    fn start_cluster() -> RedisCluster {
        let t = Instant::now();
        let cluster = RedisCluster::start(3, 1).unwrap_or_else(|e| {
            panic!("cannot start a Redis Cluster (CI installs redis-server): {e}")
        });
        eprintln!("redis cluster 3x1 ready in {:?}", t.elapsed());
        cluster
    }

    fn routes_key(uid: UserId) -> String {
        format!("r:{{{}}}", uid.0)
    }

    async fn raw_connection(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(cluster.nodes())
            .expect("client")
            .get_async_connection()
            .await
            .expect("connect")
    }

    #[tokio::test]
    async fn redis_directory_passes_conformance() {
        let mut cluster = start_cluster();
        let dir = RedisDirectory::connect(cluster.nodes())
            .await
            .expect("connect to the cluster");
        let t = Instant::now();
        conformance::run_all(&dir).await;
        conformance::run_all_at(&dir.clone(), conformance::BASE_STRIDE).await;
        eprintln!("conformance x2 on redis took {:?}", t.elapsed());

        // The many-users check really spread its users over every master.
        let mut masters = BTreeSet::new();
        for u in conformance::many_users_uids(0) {
            let slot = key_slot(routes_key(u).as_bytes());
            masters.insert(cluster.master_of_slot(slot).expect("master of slot"));
        }
        assert_eq!(masters.len(), 3, "users on every master: {masters:?}");

        // Shard claims sent `WAIT` to the master of `{shards}` (in the claim's pipeline).
        let shards_master = cluster.master_of_key("{shards}:map").unwrap();
        let stats = redis::cmd("INFO").arg("commandstats").clone();
        let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: "127.0.0.1".into(),
            port: cluster.ports()[shards_master],
        });
        let mut raw = raw_connection(&cluster).await;
        let stats: String =
            redis::from_redis_value(raw.route_command(stats, to).await.unwrap()).unwrap();
        assert!(
            stats.contains("cmdstat_wait:calls="),
            "no WAIT on the {{shards}} master: {stats}"
        );

        // Key layout: one hash per user, with the presence TTL after a heartbeat.
        let u = UserId(9_000_001);
        let r = RouteEntry {
            device_type: 1,
            device_id: "phone-1".into(),
            gate: 2,
            core: 3,
            conn: 44,
            epoch: 5,
        };
        dir.set_route(u, r.clone()).await.unwrap();
        let ttl: i64 = redis::cmd("TTL")
            .arg(routes_key(u))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!((1..=300).contains(&ttl), "default route TTL, got {ttl}");
        dir.touch_presence(u, 40).await.unwrap();
        let ttl: i64 = redis::cmd("TTL")
            .arg(routes_key(u))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(
            (1..=40).contains(&ttl),
            "presence TTL on the hash, got {ttl}"
        );
        let stored: String = redis::cmd("HGET")
            .arg(routes_key(u))
            .arg(1)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(stored, "1|44|5|2|3|phone-1");

        // A record that cannot be decoded, or a key of the wrong type, is Corrupt (not retryable).
        let _: () = redis::cmd("HSET")
            .arg(routes_key(u))
            .arg(2)
            .arg("garbage")
            .query_async(&mut raw)
            .await
            .unwrap();
        let e = dir.routes(u).await.unwrap_err();
        assert!(
            matches!(e, DirectoryError::Corrupt(_)) && !e.is_retryable(),
            "{e:?}"
        );
        let w = UserId(9_000_002);
        let _: () = redis::cmd("SET")
            .arg(routes_key(w))
            .arg("x")
            .query_async(&mut raw)
            .await
            .unwrap();
        let e = dir.routes(w).await.unwrap_err();
        assert!(matches!(e, DirectoryError::Corrupt(_)), "{e:?}");
    }

    /// Retries `op` while it fails with a retryable error, until `deadline`. Returns the value and the
    /// number of failed attempts.
    async fn retry<T, F, Fut>(deadline: Instant, what: &str, mut op: F) -> (T, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DirectoryError>>,
    {
        let mut failures = 0;
        loop {
            match op().await {
                Ok(v) => return (v, failures),
                Err(e) => {
                    assert!(e.is_retryable(), "{what}: non-retryable {e:?}");
                    assert!(
                        Instant::now() < deadline,
                        "{what}: still failing at the deadline: {e}"
                    );
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn phone(uid: UserId, conn: u64) -> RouteEntry {
        RouteEntry {
            device_type: 1,
            device_id: format!("phone-of-{uid}"),
            gate: 1,
            core: (uid.0 % 4) as u16,
            conn,
            epoch: conn,
        }
    }

    #[tokio::test]
    async fn redis_directory_survives_master_failover() {
        let mut cluster = start_cluster();
        let dir = RedisDirectory::connect(cluster.nodes())
            .await
            .expect("connect to the cluster");

        let users: Vec<UserId> = (1..=200).map(|i| UserId(50_000 + i)).collect();
        for &u in &users {
            dir.set_route(u, phone(u, u.0 * 10)).await.unwrap();
            dir.touch_presence(u, 120).await.unwrap();
        }
        let gate = GateInfo {
            id: 7,
            tcp_addr: "127.0.0.1:7000".into(),
            ws_addr: None,
            conns: 1,
        };
        dir.register_gate(gate.clone(), 120).await.unwrap();
        let shard = ShardId(5);
        assert_eq!(dir.claim_shard(shard, 1, 0).await.unwrap(), 1);

        // Kill the master of the first user's slot; remember which users lived there.
        let victim = users[0];
        let mut master_of: HashMap<UserId, usize> = HashMap::new();
        for &u in &users {
            let slot = key_slot(routes_key(u).as_bytes());
            master_of.insert(u, cluster.master_of_slot(slot).unwrap());
        }
        let killed = cluster.kill_master_of_key(&routes_key(victim)).unwrap();
        let t_kill = Instant::now();
        let deadline = t_kill + Duration::from_secs(30);
        let on_killed: Vec<UserId> = users
            .iter()
            .copied()
            .filter(|u| master_of[u] == killed)
            .collect();
        assert!(!on_killed.is_empty());

        // What a client sees: an operation on the dead master's slot fails with retryable errors
        // until a replica took over.
        let (_, failures) = retry(deadline, "set_route on the failed slot", || {
            dir.set_route(victim, phone(victim, 1))
        })
        .await;
        let client_recovery = t_kill.elapsed();
        let remaining = deadline.saturating_duration_since(Instant::now());
        cluster
            .wait_failover_within(remaining)
            .expect("the replica takes over within 30 s");
        let failover = t_kill.elapsed();
        eprintln!(
            "master {killed} killed: first directory write on its slot after {client_recovery:?} \
             ({failures} retryable failures); cluster settled after {failover:?}"
        );
        assert_ne!(cluster.master_of_key(&routes_key(victim)).unwrap(), killed);

        // Reads may have lost the last writes before the kill; count what survived (informational).
        let mut survived = 0;
        for &u in on_killed.iter().skip(1) {
            let (routes, _) = retry(deadline, "routes", || dir.routes(u)).await;
            survived += usize::from(routes == vec![phone(u, u.0 * 10)]);
        }
        eprintln!(
            "{survived}/{} pre-kill routes on the failed master survived",
            on_killed.len() - 1
        );

        // Every operation works again, and what is written after the failover is readable.
        let mut late_failures = 0;
        for &u in &users {
            let (_, f) = retry(deadline, "set_route", || {
                dir.set_route(u, phone(u, u.0 * 10 + 1))
            })
            .await;
            late_failures += f;
            let (_, f) = retry(deadline, "touch_presence", || dir.touch_presence(u, 120)).await;
            late_failures += f;
        }
        for &u in &users {
            let (routes, _) = retry(deadline, "routes", || dir.routes(u)).await;
            assert_eq!(routes, vec![phone(u, u.0 * 10 + 1)], "user {u}");
            let (online, _) = retry(deadline, "is_online", || dir.is_online(u)).await;
            assert!(online, "user {u}");
        }
        for &u in users.iter().take(20) {
            let (stale, _) = retry(deadline, "remove stale", || {
                dir.remove_route(u, 1, u.0 * 10)
            })
            .await;
            assert!(!stale, "a stale conn removes nothing");
            let (removed, _) =
                retry(deadline, "remove", || dir.remove_route(u, 1, u.0 * 10 + 1)).await;
            assert!(removed);
            let (routes, _) = retry(deadline, "routes", || dir.routes(u)).await;
            assert_eq!(routes, vec![]);
        }
        let gate2 = GateInfo {
            conns: 2,
            ..gate.clone()
        };
        retry(deadline, "register_gate", || {
            dir.register_gate(gate2.clone(), 120)
        })
        .await;
        let (gates, _) = retry(deadline, "gates", || dir.gates()).await;
        assert_eq!(gates, vec![gate2]);

        // The shard claim may have been lost only if it never reached the replica; either way the
        // CAS keeps working from the epoch that is there now, and a stale epoch stays fenced.
        let (owner, _) = retry(deadline, "shard_owner", || dir.shard_owner(shard)).await;
        eprintln!("shard claim after failover: {owner:?}");
        let current = owner.map_or(0, |(_, e)| e);
        let (epoch, _) = retry(deadline, "claim", || dir.claim_shard(shard, 2, current)).await;
        assert_eq!(epoch, current + 1);
        let (stale, _) = retry(deadline, "stale claim", || async {
            match dir.claim_shard(shard, 1, current).await {
                Err(DirectoryError::Fenced { current }) => Ok(Some(current)),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await;
        assert_eq!(stale, Some(epoch), "stale claim fenced");
        let (map, _) = retry(deadline, "shard_map", || dir.shard_map()).await;
        assert_eq!(map, vec![(shard, 2, epoch)]);
        eprintln!(
            "after failover: all operations ok ({late_failures} retryable failures on writes), \
             total {:?} since the kill",
            t_kill.elapsed()
        );
        assert!(t_kill.elapsed() < Duration::from_secs(30));
    }
}
