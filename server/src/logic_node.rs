//! A logic node of the distributed shape.

use std::net::SocketAddr;
use std::sync::Arc;

use im_api::{ApiBackend, ApiServer, GateSource};
use im_logic::store::FjallStore;
use im_logic::{LogicHandle, Services};
use im_shared::token::HmacTokens;

use crate::config::{logic_config, ServerConfig};
use crate::services::{drop_invalid_tokens, service_metrics, services};

/// A running logic node of the distributed shape.
pub struct LogicNode {
    pub logic: Arc<LogicHandle>,
    /// Where gates and peer nodes connect.
    pub link_addr: SocketAddr,
    api: Option<ApiServer>,
    services: Services,
    /// The shard lease (with a Redis directory).
    lease: Option<im_logic::ownership::Holder>,
}

impl LogicNode {
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|a| a.local_addr())
    }

    pub fn shutdown(self) {
        if let Some(a) = self.api {
            a.shutdown();
        }
        self.logic.shutdown();
        if let Some(c) = &self.services.c2s {
            c.shutdown();
        }
        if let Some(l) = self.lease {
            l.release();
        }
    }
}

/// A logic node of the distributed shape: workers + store, accepting gate links on `link_listen`.
/// `nodes` is the cluster's list of logic link addresses (empty for a lone node); this node is
/// `nodes[node_id]`. Its HTTP API takes the iplist's gates from the Redis gate registry.
pub fn start_logic(
    cfg: &ServerConfig,
    node_id: u16,
    link_listen: SocketAddr,
    nodes: Vec<SocketAddr>,
) -> anyhow::Result<LogicNode> {
    anyhow::ensure!(
        nodes.is_empty() || (node_id as usize) < nodes.len(),
        "--node-id {node_id} is not an index of the {} nodes",
        nodes.len()
    );
    std::fs::create_dir_all(&cfg.data_dir)?;
    if cfg.scylla_nodes.is_empty() {
        let store = FjallStore::open(&cfg.data_dir)?;
        store.set_handoff_linger(std::time::Duration::from_micros(cfg.handoff_linger_us));
        return start_logic_on(cfg, node_id, link_listen, nodes, store);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = rt
        .block_on(im_logic::store::ScyllaStore::connect(
            &cfg.scylla_nodes,
            &cfg.scylla_keyspace,
        ))
        .map_err(|e| anyhow::anyhow!("connecting to ScyllaDB {:?}: {e}", cfg.scylla_nodes))?;
    tracing::info!(nodes = ?cfg.scylla_nodes, keyspace = %cfg.scylla_keyspace, "store: ScyllaDB");
    start_logic_on(cfg, node_id, link_listen, nodes, store)
}

fn start_logic_on<S: im_logic::store::Store + Send + Sync>(
    cfg: &ServerConfig,
    node_id: u16,
    link_listen: SocketAddr,
    nodes: Vec<SocketAddr>,
    store: S,
) -> anyhow::Result<LogicNode> {
    let links = im_logic::links::GateLinks::with_queue_bound(cfg.gate_link_queue_bytes);
    let tokens = Arc::new(HmacTokens::new(cfg.token_secret.as_bytes()));
    let mut lc = logic_config(cfg);
    lc.node_id = node_id;
    let files = lc.files.clone();
    // Bind first, so that peers and gates can connect as soon as the workers run.
    let listener = std::net::TcpListener::bind(link_listen)?;
    let cluster = if nodes.is_empty() {
        None
    } else {
        Some(im_logic::Cluster {
            node: node_id as usize,
            nodes,
        })
    };
    let services = services(cfg)?;
    // Hold this node's shards before serving anything (docs/ARCHITECTURE.md, "Shard ownership").
    let lease = if cfg.redis_nodes.is_empty() {
        None
    } else {
        let redis = cfg.redis_nodes.clone();
        let shards = im_logic::ownership::shards_of(
            node_id as usize,
            cluster.as_ref().map_or(1, |c| c.nodes.len()),
        );
        let holder = im_logic::ownership::hold(
            move || im_logic::directory::RedisDirectory::connect(redis.clone()),
            store.clone(),
            node_id,
            shards,
            cfg.shard_lease_ms,
        )
        .map_err(|e| anyhow::anyhow!("acquiring the shard lease: {e}"))?;
        lc.lease = Some(holder.lease.clone());
        Some(holder)
    };
    let logic = Arc::new(im_logic::start_with(
        lc,
        store,
        tokens.clone(),
        links.clone(),
        cluster,
        services.clone(),
    )?);
    drop_invalid_tokens(&services, &logic);
    let addr = listener.local_addr()?;
    if !cfg.redis_nodes.is_empty() {
        im_logic::links::publish_gates(links.clone(), cfg.redis_nodes.clone())?;
    }
    let links_for_metrics = links.clone();
    im_logic::links::serve(listener, node_id, links, logic.clone())?;
    tracing::info!(%addr, node_id, "logic node accepting gate links");
    let api = match &cfg.api {
        Some(a) => {
            let gates = if cfg.redis_nodes.is_empty() {
                GateSource::Static(Vec::new())
            } else {
                GateSource::Redis(cfg.redis_nodes.clone())
            };
            let mut extra = service_metrics(&services);
            let gl = links_for_metrics.clone();
            extra.push(Arc::new(move |out: &mut String| gl.render(out)));
            let server = ApiServer::start(
                a.clone(),
                logic.clone() as Arc<dyn ApiBackend>,
                gates,
                Some(tokens),
                extra,
                crate::files::http(cfg)?,
            )?;
            crate::files::announce(files.as_ref(), server.local_addr());
            Some(server)
        }
        None => None,
    };
    Ok(LogicNode {
        logic,
        link_addr: addr,
        api,
        services,
        lease,
    })
}
