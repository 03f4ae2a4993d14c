//! The running server publishes device routes and presence to a real Redis Cluster, and keeps
//! chatting through a Redis master failover.

mod common;

use std::time::{Duration, Instant};

use common::*;
use im_logic::directory::{Directory, RedisDirectory};
use im_shared::{DeviceType, UserId};
use im_testkit::RedisCluster;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls the directory until `want(routes)` holds (bounded).
fn wait_routes(
    rt: &tokio::runtime::Runtime,
    dir: &RedisDirectory,
    uid: u64,
    want: impl Fn(usize) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = rt
            .block_on(dir.routes(UserId(uid)))
            .map(|r| r.len())
            .unwrap_or(usize::MAX);
        if n != usize::MAX && want(n) {
            return;
        }
        assert!(Instant::now() < deadline, "routes of {uid}: {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn routes_and_presence_follow_logins_and_survive_a_redis_failover() {
    let mut cluster =
        RedisCluster::start(3, 1).expect("redis cluster (apt-get install redis-server)");
    let nodes = cluster.nodes();
    let s = start_with(|c| c.redis_nodes = nodes.clone());
    // One runtime for the test's own directory client (its connection lives on it).
    let rt = rt();
    let dir = rt.block_on(RedisDirectory::connect(nodes.clone())).unwrap();

    let (_phone, _) = login_as(s.addr, 4001, DeviceType::Phone, "p");
    let (mut pc, _) = login_as(s.addr, 4001, DeviceType::Desktop, "d");
    wait_routes(&rt, &dir, 4001, |n| n == 2);
    assert!(rt.block_on(dir.is_online(UserId(4001))).unwrap());
    let routes = rt.block_on(dir.routes(UserId(4001))).unwrap();
    assert!(routes
        .iter()
        .any(|r| r.device_type == DeviceType::Desktop as u8 && r.device_id == "d"));
    pc.logout().unwrap();
    wait_routes(&rt, &dir, 4001, |n| n == 1);

    // Kill the master holding bob's keys: chat goes on (delivery never waits on Redis) and, after
    // the failover, bob's new login is published again.
    let mut alice = login(s.addr, 4002);
    let mut bob = login(s.addr, 4003);
    cluster.kill_master_of_key("r:{4003}").unwrap();
    for i in 1..=20u64 {
        let ack = alice
            .send_c2c(UserId(4003), i, format!("during failover {i}"))
            .unwrap();
        assert_eq!(next_deliver(&mut bob).msg_id, ack.msg_id);
    }
    cluster.wait_failover().unwrap();
    drop(bob);
    let _bob = login_as(s.addr, 4003, DeviceType::Tablet, "t");
    let dir = rt
        .block_on(RedisDirectory::connect(cluster.live_nodes()))
        .unwrap();
    wait_routes(&rt, &dir, 4003, |n| n >= 1);
}
