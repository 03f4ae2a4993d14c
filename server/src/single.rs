//! The single node: gate, logic workers and the embedded fjall store in one process.

use std::net::SocketAddr;
use std::sync::Arc;

use im_api::{ApiBackend, ApiServer, GateSource};
use im_gate::{Gate, GateHandle, GateStats};
use im_logic::directory::GateInfo;
use im_logic::store::FjallStore;
use im_logic::{LogicHandle, Services};
use im_shared::token::HmacTokens;

use crate::config::{gate_config, logic_config, ws_url, ServerConfig};
use crate::services::{drop_invalid_tokens, service_metrics, services};

/// A running single-node server.
pub struct Server {
    gate: GateHandle,
    logic: Arc<LogicHandle>,
    api: Option<ApiServer>,
    services: Services,
    /// Logic workers run on the gate cores' threads (`thread_per_core`).
    hosted: bool,
}

/// Opens the store, starts logic workers and gate cores.
pub fn start(cfg: &ServerConfig) -> anyhow::Result<Server> {
    im_gate::check_transport(&gate_config(cfg, 0))?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let store = FjallStore::open(&cfg.data_dir)?;
    store.set_handoff_linger(std::time::Duration::from_micros(cfg.handoff_linger_us));
    let gate = Gate::new(gate_config(cfg, 0));
    let tokens = Arc::new(HmacTokens::new(cfg.token_secret.as_bytes()));
    let services = services(cfg)?;
    let (lcfg, gcfg) = (logic_config(cfg), gate_config(cfg, 0));
    let files = lcfg.files.clone();
    let hosted = cfg.thread_per_core && lcfg.workers == gcfg.cores;
    let (logic, tasks) = if hosted {
        im_logic::start_hosted(lcfg, store, tokens.clone(), gate.sink(), services.clone())?
    } else {
        let l = im_logic::start_with(
            lcfg,
            store,
            tokens.clone(),
            gate.sink(),
            None,
            services.clone(),
        )?;
        (l, Vec::new())
    };
    let logic = Arc::new(logic);
    drop_invalid_tokens(&services, &logic);
    let gate = gate.start_hosting(logic.clone(), tasks)?;
    tracing::info!(addr = %gate.local_addr(), thread_per_core = hosted, "im-server listening");
    let api = match &cfg.api {
        Some(a) => {
            let me = GateInfo {
                id: 0,
                tcp_addr: gate.local_addr().to_string(),
                ws_addr: gate.ws_addr().map(|a| ws_url(cfg, a)),
                conns: 0,
            };
            let mut extra = service_metrics(&services);
            let stats = gate.stats_handle();
            extra.push(Arc::new(move |out: &mut String| stats.render(out)));
            let server = ApiServer::start(
                a.clone(),
                logic.clone() as Arc<dyn ApiBackend>,
                GateSource::Static(vec![me]),
                Some(tokens),
                extra,
                crate::files::http(cfg)?,
            )?;
            crate::files::announce(files.as_ref(), server.local_addr());
            Some(server)
        }
        None => None,
    };
    Ok(Server {
        gate,
        logic,
        api,
        services,
        hosted,
    })
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.gate.local_addr()
    }
    /// Address of the WebSocket listener, if configured.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.gate.ws_addr()
    }
    pub fn gate_stats(&self) -> GateStats {
        self.gate.stats()
    }
    pub fn logic(&self) -> &LogicHandle {
        &self.logic
    }
    /// Address of the HTTP API, if it runs.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|a| a.local_addr())
    }

    /// Stops the API, the gate (dropping every connection), then the logic workers after they
    /// finish what is queued, and closes the store and the c2s queue.
    pub fn shutdown(self) {
        if let Some(a) = self.api {
            a.shutdown();
        }
        if self.hosted {
            // The workers run on the cores' threads: they finish first, while the cores run.
            self.logic.shutdown();
            self.gate.shutdown();
        } else {
            self.gate.shutdown();
            self.logic.shutdown();
        }
        if let Some(c) = &self.services.c2s {
            c.shutdown();
        }
    }
}
