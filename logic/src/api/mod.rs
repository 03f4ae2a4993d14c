//! HTTP server API of logic (being written).

mod backend;
pub use backend::{Accepted, ApiBackend, ApiError, BoxFut, PushTarget};
