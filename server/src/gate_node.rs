//! A gate process of the distributed shape.

use std::net::SocketAddr;
use std::sync::Arc;

use im_gate::{Gate, GateHandle};

use crate::config::{gate_config, ServerConfig};

/// A gate process of the distributed shape: client listener + TCP links to logic nodes.
pub fn start_gate(
    cfg: &ServerConfig,
    gate_id: u16,
    logic: Vec<SocketAddr>,
) -> anyhow::Result<GateHandle> {
    im_gate::check_transport(&gate_config(cfg, gate_id))?;
    let gate = Gate::new(gate_config(cfg, gate_id));
    let client_addr = Arc::new(std::sync::OnceLock::new());
    let upstream =
        im_gate::links::TcpUpstream::start(gate_id, client_addr.clone(), logic, gate.sink());
    let gate = gate.start(upstream)?;
    let _ = client_addr.set(gate.local_addr());
    tracing::info!(addr = %gate.local_addr(), gate_id, "gate listening");
    Ok(gate)
}
