//! `im-logic` owns the logic tier: login with SSO tokens, kickout, logout, c2c with dedup and an
//! outbox, per-user timelines with seq segments, delivery acks and sync, on top of a
//! [`store::Store`].
//!
//! The user id space is split into virtual shards ([`im_shared::shard::VSHARDS`]) mapped onto
//! workers; each worker is a thread with its own current-thread tokio runtime and owns the live
//! state of its users (seq counter, device routes, dedup window), so the hot path takes no lock.
//! A worker drains its inbox, applies a whole round of requests, commits their writes in one
//! durable batch (group commit) and only then releases acks and deliveries.

mod config;
mod handle;
pub mod links;
pub mod metrics;
pub mod org;
pub mod ownership;
pub mod peer;
mod publish;
mod router;
mod services;
pub mod worker;

// The crates logic is built on, under the paths logic's users know.
/// The HTTP server API (crate `im-api`).
pub use im_api as api;
/// The c2s queue to business servers (crate `im-c2s`).
pub use im_c2s as c2s;
/// The directory (crate `im-directory`).
pub use im_directory as directory;
/// Offline push (crate `im-push`).
pub use im_push as push;
/// The message store (crate `im-store`).
pub use im_store as store;

pub use config::{FilesPolicy, LogicConfig, MAX_IMAGE_SIZE, MAX_VOICE_SIZE};
pub use handle::{start, start_hosted, start_node, start_with, Cluster, LogicHandle};
pub use im_shared::msgid::MsgIdGen;
pub use services::{PushService, Services};
