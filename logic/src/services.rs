//! Process-wide services the workers use: offline push and the c2s queue (optional), and the
//! node's cache of the organisation tree.

use std::sync::Arc;

use crate::c2s::C2sHub;
use crate::push::{PushDispatcher, PushNotification};

/// Offline push: the dispatcher and how long a message may stay unacknowledged before a push.
#[derive(Clone)]
pub struct PushService {
    pub dispatcher: Arc<PushDispatcher>,
    pub delay_ms: u64,
}

impl PushService {
    pub fn delay_ms(&self) -> u64 {
        self.delay_ms
    }
    pub fn submit(&self, n: PushNotification) {
        self.dispatcher.submit(n);
    }
}

/// What a logic node was started with besides its store (all optional).
#[derive(Clone, Default)]
pub struct Services {
    pub push: Option<PushService>,
    /// The c2s queue; without it `Report` is refused with `Unavailable`.
    pub c2s: Option<Arc<C2sHub>>,
    /// The node's copy of the organisation tree (one per node, shared by its workers and API).
    pub org: Arc<crate::org::OrgCache>,
}
