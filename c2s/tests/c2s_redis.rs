//! The Redis Streams c2s backend against a real Redis Cluster of 3 masters (started by
//! `im-testkit` from the local `redis-server`): records land in one stream per topic, spread
//! over the masters; a business consumer group reads them with `XREADGROUP`, and when a consumer
//! "crashes" before its `XACK` another one takes its entries over with `XAUTOCLAIM`
//! (at-least-once). Fails, not skips, when `redis-server` is missing: CI installs it.

#[cfg(feature = "redis")]
mod redis_streams {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use im_c2s::{stream_key, C2sConfig, C2sError, C2sHub, C2sRecord};
    use im_shared::msgid::MsgIdGen;
    use im_shared::UserId;
    use im_testkit::RedisCluster;
    use redis::cluster_async::ClusterConnection;

    const GROUP: &str = "billing";

    /// One stream entry: (entry id, fields).
    type Entry = (String, Vec<Vec<u8>>);
    /// `XPENDING key group`: count, lowest id, highest id, (consumer, count) pairs.
    type XPendingSummary = (
        i64,
        Option<String>,
        Option<String>,
        Option<Vec<(String, String)>>,
    );

    fn start_cluster() -> RedisCluster {
        let t = Instant::now();
        let cluster = RedisCluster::start(3, 0).unwrap_or_else(|e| {
            panic!("cannot start a Redis Cluster (CI installs redis-server): {e}")
        });
        eprintln!("redis cluster 3x0 ready in {:?}", t.elapsed());
        cluster
    }

    async fn raw_connection(cluster: &RedisCluster) -> ClusterConnection {
        redis::cluster::ClusterClient::new(cluster.nodes())
            .expect("client")
            .get_async_connection()
            .await
            .expect("connect")
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    fn record(gen: &mut MsgIdGen, from: u64, topic: &str, cmid: u64, body: &[u8]) -> C2sRecord {
        let now = now_ms();
        C2sRecord {
            id: gen.next(now),
            from: UserId(from),
            client_msg_id: cmid,
            topic: topic.to_owned(),
            body: Bytes::copy_from_slice(body),
            time_ms: now,
        }
    }

    fn fields(e: &Entry) -> HashMap<String, Vec<u8>> {
        e.1.chunks(2)
            .map(|kv| (String::from_utf8(kv[0].clone()).unwrap(), kv[1].clone()))
            .collect()
    }

    fn field_u64(e: &Entry, name: &str) -> u64 {
        String::from_utf8(fields(e)[name].clone())
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The record an entry carries (the topic is the stream's).
    fn decode(topic: &str, e: &Entry) -> C2sRecord {
        C2sRecord {
            id: im_shared::MsgId(field_u64(e, "id")),
            from: UserId(field_u64(e, "from")),
            client_msg_id: field_u64(e, "cmid"),
            topic: topic.to_owned(),
            body: Bytes::from(fields(e)["body"].clone()),
            time_ms: field_u64(e, "time_ms"),
        }
    }

    /// `XREADGROUP GROUP <GROUP> <consumer> COUNT n STREAMS <key> <from>`: `>` for new entries,
    /// `0` for the consumer's own pending ones.
    async fn read_group(
        con: &mut ClusterConnection,
        key: &str,
        consumer: &str,
        from: &str,
    ) -> Vec<Entry> {
        let r: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(key)
            .arg(from)
            .query_async(con)
            .await
            .expect("XREADGROUP");
        r.into_iter().flatten().flat_map(|(_, es)| es).collect()
    }

    async fn ack(con: &mut ClusterConnection, key: &str, ids: &[&str]) -> i64 {
        redis::cmd("XACK")
            .arg(key)
            .arg(GROUP)
            .arg(ids)
            .query_async(con)
            .await
            .expect("XACK")
    }

    /// Entries of `key` pending in the group (delivered, not acknowledged), per consumer.
    async fn pending(con: &mut ClusterConnection, key: &str) -> (i64, BTreeMap<String, i64>) {
        let (n, _, _, per): XPendingSummary = redis::cmd("XPENDING")
            .arg(key)
            .arg(GROUP)
            .query_async(con)
            .await
            .expect("XPENDING");
        let per = per
            .unwrap_or_default()
            .into_iter()
            .map(|(c, k)| (c, k.parse().unwrap()))
            .collect();
        (n, per)
    }

    fn start_hub(cfg: &C2sConfig) -> Arc<C2sHub> {
        C2sHub::start(cfg, Path::new("/nonexistent-unused")).expect("start hub")
    }

    #[tokio::test]
    async fn c2s_redis_streams_consumer_group_at_least_once() {
        let mut cluster = start_cluster();
        // Three topics whose streams live on three different masters.
        let mut topics: BTreeMap<usize, String> = BTreeMap::new();
        for i in 0.. {
            let t = format!("topic-{i}");
            let m = cluster.master_of_key(&stream_key(&t)).unwrap();
            topics.entry(m).or_insert(t);
            if topics.len() == 3 {
                break;
            }
        }
        let topics: Vec<String> = topics.into_values().collect();
        let mut raw = raw_connection(&cluster).await;
        // The business side creates its group first (from the start of each stream).
        for t in &topics {
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream_key(t))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut raw)
                .await
                .expect("XGROUP CREATE");
        }

        let hub = start_hub(&C2sConfig::redis_streams(cluster.nodes()));
        assert!(hub.check_topic(&topics[0]).is_ok());
        let q = hub.queue().await.expect("connect");
        let mut gen = MsgIdGen::new(1);
        // Several rounds, each with records of all three topics (one pipeline per stream).
        let mut sent: HashMap<String, Vec<C2sRecord>> = HashMap::new();
        for round in 0..4u64 {
            let mut recs = Vec::new();
            for (i, t) in topics.iter().enumerate() {
                for k in 0..(i as u64 + 1) {
                    let body: Vec<u8> = format!("{t} r{round} k{k}").into_bytes();
                    recs.push(record(&mut gen, 40 + i as u64, t, round * 10 + k, &body));
                }
            }
            // A binary body goes through as is.
            recs.push(record(
                &mut gen,
                99,
                &topics[0],
                1000 + round,
                b"\x00\xff\x80",
            ));
            q.enqueue(&recs).await.expect("enqueue");
            for r in recs {
                sent.entry(r.topic.clone()).or_default().push(r);
            }
        }
        let total: usize = sent.values().map(Vec::len).sum();
        assert_eq!(hub.stats().queued, total as u64);
        let mut metrics = String::new();
        hub.metrics(&mut metrics);
        assert!(
            metrics.contains(&format!("\nim_c2s_queued_total {total}\n")),
            "{metrics}"
        );
        assert!(
            !metrics.contains("im_c2s_pending"),
            "no delivery series for redis"
        );

        // One stream per topic, holding exactly that topic's records, in order.
        for t in &topics {
            let all: Vec<Entry> = redis::cmd("XRANGE")
                .arg(stream_key(t))
                .arg("-")
                .arg("+")
                .query_async(&mut raw)
                .await
                .unwrap();
            let got: Vec<C2sRecord> = all.iter().map(|e| decode(t, e)).collect();
            assert_eq!(got, sent[t], "stream of {t}");
        }

        // Consumer "a" reads the first topic's records, acknowledges two, then crashes.
        let key = stream_key(&topics[0]);
        let want = &sent[&topics[0]];
        let read_a = read_group(&mut raw, &key, "a", ">").await;
        assert_eq!(read_a.len(), want.len());
        let acked: Vec<&str> = read_a[..2].iter().map(|e| e.0.as_str()).collect();
        assert_eq!(ack(&mut raw, &key, &acked).await, 2);
        let (n, per) = pending(&mut raw, &key).await;
        assert_eq!(n as usize, want.len() - 2);
        assert_eq!(per, BTreeMap::from([("a".to_owned(), n)]));
        // Nothing new for another consumer: the entries belong to "a" until claimed.
        assert!(read_group(&mut raw, &key, "b", ">").await.is_empty());
        // A restarted "a" would find its own unacknowledged entries with id 0.
        assert_eq!(
            read_group(&mut raw, &key, "a", "0").await.len(),
            want.len() - 2
        );

        // "a" never comes back: "b" claims what stayed pending longer than 100 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (next, claimed, deleted): (String, Vec<Entry>, Vec<String>) = redis::cmd("XAUTOCLAIM")
            .arg(&key)
            .arg(GROUP)
            .arg("b")
            .arg(100)
            .arg("0-0")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut raw)
            .await
            .expect("XAUTOCLAIM");
        assert_eq!(next, "0-0", "one call claimed everything");
        assert!(deleted.is_empty());
        let claimed_recs: Vec<C2sRecord> = claimed.iter().map(|e| decode(&topics[0], e)).collect();
        assert_eq!(
            claimed_recs,
            want[2..],
            "b got every unacknowledged record, intact"
        );
        let (_, per) = pending(&mut raw, &key).await;
        assert_eq!(
            per,
            BTreeMap::from([("b".to_owned(), (want.len() - 2) as i64)])
        );
        let ids: Vec<&str> = claimed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(ack(&mut raw, &key, &ids).await as usize, want.len() - 2);
        assert_eq!(pending(&mut raw, &key).await.0, 0);
        // Every record was processed at least once: 2 by "a", the rest by "b".
        let mut processed: BTreeSet<u64> = read_a[..2].iter().map(|e| field_u64(e, "id")).collect();
        processed.extend(claimed.iter().map(|e| field_u64(e, "id")));
        assert_eq!(processed, want.iter().map(|r| r.id.0).collect());

        // The other topics' groups are untouched and read their own streams only.
        for t in &topics[1..] {
            let es = read_group(&mut raw, &stream_key(t), "a", ">").await;
            let got: Vec<C2sRecord> = es.iter().map(|e| decode(t, e)).collect();
            assert_eq!(got, sent[t]);
        }

        // A topic whose key holds something else: not retryable.
        let _: () = redis::cmd("SET")
            .arg(stream_key("not-a-stream"))
            .arg("x")
            .query_async(&mut raw)
            .await
            .unwrap();
        let e = q
            .enqueue(&[record(&mut gen, 1, "not-a-stream", 1, b"x")])
            .await
            .unwrap_err();
        assert!(
            matches!(e, C2sError::Invalid(_)) && !e.is_retryable(),
            "{e:?}"
        );
        // An invalid topic is refused before anything is sent.
        let e = q
            .enqueue(&[record(&mut gen, 1, "", 1, b"x")])
            .await
            .unwrap_err();
        assert!(matches!(e, C2sError::Invalid(_)), "{e:?}");
        assert!(hub.check_topic("").is_err());
        assert_eq!(hub.stats().enqueue_errors, 2);
        drop(cluster);
    }

    #[tokio::test]
    async fn c2s_redis_streams_maxlen_and_one_connection_per_worker_runtime() {
        let cluster = start_cluster();
        let hub = start_hub(&C2sConfig::RedisStreams {
            nodes: cluster.nodes(),
            maxlen: Some(50),
        });
        // Four "workers", each on its own current-thread runtime with its own connection.
        let mut threads = Vec::new();
        for w in 0..4u64 {
            let hub = hub.clone();
            threads.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let q = hub.queue().await.expect("connect");
                    let mut gen = MsgIdGen::new(w as u16);
                    for round in 0..25u64 {
                        let recs: Vec<C2sRecord> = (0..10)
                            .map(|k| record(&mut gen, w, "capped", round * 10 + k, b"x"))
                            .collect();
                        q.enqueue(&recs).await.expect("enqueue");
                    }
                })
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(hub.stats().queued, 1000);
        let mut raw = raw_connection(&cluster).await;
        let len: u64 = redis::cmd("XLEN")
            .arg(stream_key("capped"))
            .query_async(&mut raw)
            .await
            .unwrap();
        // `MAXLEN ~` trims whole radix-tree nodes (100 entries by default): about 50, never 1000.
        assert!((50..=200).contains(&len), "XLEN {len}");
    }

    #[tokio::test]
    async fn c2s_redis_streams_unreachable_cluster_is_retryable() {
        assert!(matches!(
            C2sHub::start(
                &C2sConfig::redis_streams(Vec::<String>::new()),
                Path::new("/x")
            ),
            Err(C2sError::Config(_))
        ));
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", free.local_addr().unwrap());
        drop(free);
        let hub = start_hub(&C2sConfig::redis_streams([url]));
        match hub.queue().await {
            Err(e) => assert!(e.is_retryable(), "{e:?}"),
            Ok(_) => panic!("connected to nothing"),
        }
    }
}
