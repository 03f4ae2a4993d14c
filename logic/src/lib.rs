//! `im-logic` owns the logic tier: login with SSO tokens, kickout, logout, c2c with dedup and an
//! outbox, per-user timelines with seq segments, delivery acks and sync, on top of a [`store::Store`].
pub mod store;
