//! `im-server` wires one gate and the logic tier into a single process with embedded defaults:
//! the fjall store in a data directory and in-process routing between gate cores and logic
//! workers. No external service is needed. The same crate starts the processes of the
//! distributed shape: a gate node and a logic node.
//!
//! | file | owns |
//! |---|---|
//! | `config.rs` | `ServerConfig` (the TOML file) and the gate's and logic's configs derived from it |
//! | `single.rs` | `start` / `Server`: gate, logic and fjall in one process |
//! | `gate_node.rs` | `start_gate`: a gate with TCP links to logic nodes |
//! | `logic_node.rs` | `start_logic` / `LogicNode`: workers, store (fjall or ScyllaDB), shard lease, gate links |
//! | `services.rs` | the optional c2s queue and offline push, and their metrics |

pub mod check;
mod config;
pub mod files;
mod gate_node;
mod logic_node;
mod services;
mod single;

pub use config::{ServerConfig, TlsPaths, DEV_TOKEN_SECRET};
pub use gate_node::start_gate;
pub use logic_node::{start_logic, LogicNode};
pub use single::{start, Server};
