//! Test helpers shared by the workspace's integration tests (a dev-dependency only).
//!
//! [`RedisCluster`] starts a real Redis Cluster of `redis-server` processes (Debian's
//! `redis-server` package, as CI installs it) on free loopback ports, waits until it serves every
//! slot, and can kill masters and wait for a replica to take over. Everything it starts is killed
//! and its data directory removed when it is dropped.
//!
//! Tests that need Redis must fail, not skip, when `redis-server` is missing: [`RedisCluster::start`]
//! then returns an error saying how to install it.

//!
//! [`store_conformance`] and [`directory_conformance`] are the shared test-suites every backend of
//! `im_store::Store` and of `im_directory::Directory` passes; [`FaultyStore`] wraps a real store
//! and fails its commits on demand (retryable, fatal, fenced) for tests of the commit path;
//! [`RecordingSink`] records and decodes what logic sends to gates when a test has no gate.
//!
//! [`http`] is plain HTTP/1.1 for tests that play the business side: a client for the HTTP API,
//! a recording webhook / push-gateway receiver, and a reader of one Prometheus series.
//!
//! [`s3s::S3sFs`] runs a real S3-compatible server (`s3s-fs`) for the file service's tests.

pub mod directory_conformance;
mod downstream;
mod faulty_store;
pub mod http;
pub mod ports;
mod redis_cluster;
mod resp;
pub mod s3s;
pub mod store_conformance;

pub use downstream::{DownFrame, RecordingSink};
pub use faulty_store::{CommitAttempt, FaultyStore};
pub use redis_cluster::{key_slot, ClusterOptions, RedisCluster, SLOTS};
