//! The Redis Streams backend: `XADD c2s:{<topic>} [MAXLEN ~ n] * id .. from .. cmid .. time_ms ..
//! body ..`, one pipeline per topic (one stream, one slot), sent concurrently for the topics of a
//! round. Consumption by the business side is described in `docs/C2S.md`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::RedisError;

use super::{add, check_records, stream_key, C2sError, C2sQueue, C2sRecord, Counters};

pub(super) struct RedisStreams {
    client: ClusterClient,
    maxlen: Option<u64>,
    counters: Arc<Counters>,
}

impl RedisStreams {
    pub fn new(
        nodes: &[String],
        maxlen: Option<u64>,
        counters: Arc<Counters>,
    ) -> Result<Self, C2sError> {
        if nodes.is_empty() {
            return Err(C2sError::Config(
                "redis_streams: no Redis Cluster seed nodes configured".into(),
            ));
        }
        // The directory's defaults: 1 s connect and per-attempt timeouts, 5 s per operation
        // including the client's own retries (MOVED/ASK, reconnects, TRYAGAIN, CLUSTERDOWN).
        let client = ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .overall_response_timeout(Some(Duration::from_secs(5)))
            .retries(20)
            .min_retry_wait(20)
            .max_retry_wait(500)
            .build()
            .map_err(|e| C2sError::Config(format!("redis_streams: {e}")))?;
        Ok(RedisStreams {
            client,
            maxlen,
            counters,
        })
    }

    /// A cluster connection driven by the calling runtime.
    pub async fn connect(&self) -> Result<RedisQueue, C2sError> {
        let con = self.client.get_async_connection().await.map_err(map_err)?;
        Ok(RedisQueue {
            con,
            maxlen: self.maxlen,
            counters: self.counters.clone(),
        })
    }
}

fn map_err(e: RedisError) -> C2sError {
    let msg = e.to_string();
    // A pipeline reports its commands' server errors together.
    let wrong_type = e
        .into_server_errors()
        .is_some_and(|errs| errs.iter().any(|(_, s)| s.code() == "WRONGTYPE"));
    if wrong_type {
        // Something else lives under the stream's key: retrying will not help.
        return C2sError::Invalid(msg);
    }
    C2sError::Unavailable(msg)
}

/// One worker's queue: a cluster connection of that worker's runtime.
pub(super) struct RedisQueue {
    con: ClusterConnection,
    maxlen: Option<u64>,
    counters: Arc<Counters>,
}

impl RedisQueue {
    fn pipeline(&self, topic: &str, recs: &[&C2sRecord]) -> redis::Pipeline {
        let key = stream_key(topic);
        let mut p = redis::pipe();
        for r in recs {
            let c = p.cmd("XADD").arg(&key);
            if let Some(n) = self.maxlen {
                c.arg("MAXLEN").arg("~").arg(n);
            }
            c.arg("*")
                .arg("id")
                .arg(r.id.0)
                .arg("from")
                .arg(r.from.0)
                .arg("cmid")
                .arg(r.client_msg_id)
                .arg("time_ms")
                .arg(r.time_ms)
                .arg("body")
                .arg(&r.body[..])
                .ignore();
        }
        p
    }

    async fn xadd(&self, recs: &[C2sRecord]) -> Result<(), C2sError> {
        let mut by_topic: BTreeMap<&str, Vec<&C2sRecord>> = BTreeMap::new();
        for r in recs {
            by_topic.entry(&r.topic).or_default().push(r);
        }
        let pipes: Vec<redis::Pipeline> = by_topic
            .iter()
            .map(|(t, rs)| self.pipeline(t, rs))
            .collect();
        if pipes.len() == 1 {
            let mut con = self.con.clone();
            return pipes[0].query_async::<()>(&mut con).await.map_err(map_err);
        }
        // One pipeline per stream (a cluster pipeline must stay in one slot), concurrently.
        let mut set = tokio::task::JoinSet::new();
        for p in pipes {
            let mut con = self.con.clone();
            set.spawn(async move { p.query_async::<()>(&mut con).await });
        }
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            let r = match r {
                Ok(r) => r.map_err(map_err),
                Err(e) => Err(C2sError::Unavailable(format!("XADD task failed: {e}"))),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl C2sQueue for RedisQueue {
    fn enqueue<'a>(
        &'a self,
        recs: &'a [C2sRecord],
    ) -> Pin<Box<dyn Future<Output = Result<(), C2sError>> + Send + 'a>> {
        Box::pin(async move {
            if recs.is_empty() {
                return Ok(());
            }
            let r = match check_records(recs) {
                Ok(()) => self.xadd(recs).await,
                Err(e) => Err(e),
            };
            match &r {
                Ok(()) => add(&self.counters.queued, recs.len() as u64),
                Err(_) => add(&self.counters.enqueue_errors, 1),
            }
            r
        })
    }
}
