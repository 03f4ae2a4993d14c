//! A gate process of the distributed shape.

use std::net::SocketAddr;
use std::sync::Arc;

use im_gate::links::{Announce, TcpUpstream};
use im_gate::{Gate, GateHandle};

use crate::config::{gate_config, ws_url, ServerConfig};

/// A gate process of the distributed shape: client listener + TCP links to logic nodes.
/// Returns the gate and its links to logic (for their metrics).
pub fn start_gate(
    cfg: &ServerConfig,
    gate_id: u16,
    logic: Vec<SocketAddr>,
) -> anyhow::Result<(GateHandle, Arc<TcpUpstream>)> {
    im_gate::check_transport(&gate_config(cfg, gate_id))?;
    let gate = Gate::new(gate_config(cfg, gate_id));
    let announce = Arc::new(std::sync::OnceLock::new());
    let upstream = TcpUpstream::start(
        gate_id,
        announce.clone(),
        logic,
        gate.sink(),
        cfg.max_link_queued,
    );
    let gate = gate.start(upstream.clone())?;
    let _ = announce.set(Announce {
        client: gate.local_addr(),
        ws_url: gate.ws_addr().map(|a| ws_url(cfg, a)).unwrap_or_default(),
    });
    tracing::info!(addr = %gate.local_addr(), gate_id, "gate listening");
    Ok((gate, upstream))
}
