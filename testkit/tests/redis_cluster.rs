//! Starts a real 3-master cluster with one replica each, kills a master and waits for its
//! replica to take over. Fails (does not skip) when redis-server is not installed.

use std::time::{Duration, Instant};

use im_testkit::{key_slot, RedisCluster};

#[test]
fn cluster_starts_fails_over_and_cleans_up() {
    let t = Instant::now();
    let mut cluster = RedisCluster::start(3, 1).expect("start a 3x1 Redis Cluster");
    eprintln!("cluster of 6 nodes ready in {:?}", t.elapsed());
    assert_eq!(cluster.nodes().len(), 6);
    assert!(cluster.nodes()[0].starts_with("redis://127.0.0.1:"));
    let dir = cluster.dir().to_path_buf();
    assert!(dir.exists());

    let key = "{user:42}:routes";
    let old = cluster.master_of_key(key).expect("master of key");
    assert_eq!(
        cluster.master_of_slot(key_slot(key.as_bytes())).unwrap(),
        old
    );
    let killed = cluster.kill_master_of_key(key).expect("kill master");
    assert_eq!(killed, old);
    assert_eq!(cluster.live_nodes().len(), 5);
    let took = cluster.wait_failover().expect("failover");
    eprintln!("failover took {took:?}");
    let new = cluster.master_of_key(key).expect("new master");
    assert_ne!(new, old, "a replica took over the slot");

    // The old master comes back as a replica; the cluster stays ok.
    cluster.restart_node(old).expect("restart");
    let took = cluster
        .wait_healthy(Duration::from_secs(60))
        .expect("healthy after restart");
    eprintln!("old master back as a synced replica after {took:?}");
    assert_eq!(cluster.live_nodes().len(), 6);
    assert_eq!(cluster.master_of_key(key).unwrap(), new, "no failback");

    drop(cluster);
    assert!(!dir.exists(), "data directory removed on drop");
}
