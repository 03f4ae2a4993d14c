//! The optional services of a logic node: the c2s queue and offline push.

use std::sync::Arc;

use im_api::MetricsFn;
use im_c2s::C2sHub;
use im_logic::{LogicHandle, PushService, Services};
use im_push::PushDispatcher;

use crate::config::ServerConfig;

/// The optional services of a logic node, started from the config.
pub(crate) fn services(cfg: &ServerConfig) -> anyhow::Result<Services> {
    let c2s = match &cfg.c2s {
        Some(c) => Some(C2sHub::start(c, &cfg.data_dir)?),
        None => None,
    };
    let push = match &cfg.push {
        Some(p) => Some(PushService {
            dispatcher: PushDispatcher::start(p)?,
            delay_ms: p.delay_ms,
        }),
        None => None,
    };
    Ok(Services {
        push,
        c2s,
        ..Services::default()
    })
}

/// Metrics of the services, for the API's `/metrics`.
pub(crate) fn service_metrics(s: &Services) -> Vec<MetricsFn> {
    let mut v: Vec<MetricsFn> = Vec::new();
    if let Some(c) = s.c2s.clone() {
        v.push(Arc::new(move |out: &mut String| c.metrics(out)));
    }
    if let Some(p) = s.push.clone() {
        v.push(Arc::new(move |out: &mut String| p.dispatcher.metrics(out)));
    }
    v
}

/// Removes a push token the provider reported invalid (through the user's worker).
pub(crate) fn drop_invalid_tokens(s: &Services, logic: &Arc<LogicHandle>) {
    if let Some(p) = &s.push {
        let weak = Arc::downgrade(logic);
        p.dispatcher.on_invalid_token(move |n| {
            if let Some(l) = weak.upgrade() {
                l.drop_push_token(n.uid, n.device_id.clone());
            }
        });
    }
}
