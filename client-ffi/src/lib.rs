//! UniFFI bindings of the client core (`im_client::core`) and its blocking driver
//! (`im_client::session`): one reconnecting session object, [`ImSession`], that a Swift, Kotlin
//! or Python app drives with `start`, `send_c2c`/`send_c2g`, `next_event` and `close`. All the
//! client rules (login, heartbeat, reconnect with the iplist's backoff, dedup by seq, gap → sync,
//! retry with the same `client_msg_id`, delivery acks) are the core's; this crate only converts
//! types. Bindings: `cargo run -p im-client-ffi --bin uniffi-bindgen -- generate --library
//! target/debug/libim_client_ffi.so --language swift|kotlin|python --out-dir out` (docs/CLIENT.md).
//!
//! Threads: the object is `Send + Sync`. `next_event` holds the session's lock for at most
//! [`LOCK_SLICE`] at a time, so a send from another thread waits at most that long while a
//! thread blocks in `next_event`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use im_client::core::{self, Backoff, Config, Event, Gate};
use im_client::session::{Session, TlsSettings};
use im_shared::ids::{DeviceType, GroupId, Seq, UserId};
use im_shared::proto::Message;

uniffi::setup_scaffolding!();

/// Longest time `next_event` holds the session's lock in one go.
pub const LOCK_SLICE: Duration = Duration::from_millis(50);

/// A gate: its id (the rendezvous key of the iplist) and `host:port` address.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct GateAddr {
    pub id: u16,
    pub addr: String,
}

/// The device kinds of PROTOCOL.md §8 (one session per kind per user).
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum DeviceKind {
    Phone,
    Tablet,
    Desktop,
    Web,
}

/// Everything a session needs. Give `gates`, or `iplist_json` (the answer of
/// `GET /v1/iplist?uid=N`, docs/API.md: its gates and its backoff), or both (merged).
#[derive(Clone, Debug, uniffi::Record)]
pub struct SessionConfig {
    pub uid: u64,
    pub token: String,
    pub device: DeviceKind,
    /// Stable id of this installation, 1–64 bytes.
    pub device_id: String,
    /// Highest seq held with no gap before it (0: a fresh install). Persist
    /// `ImSession::last_seq` and give it back here.
    pub last_seq: u64,
    pub gates: Vec<GateAddr>,
    pub iplist_json: Option<String>,
    /// PEM of the certificate authorities to trust: the gates speak TLS (needs the `tls`
    /// feature of this crate).
    pub tls_ca_pem: Option<String>,
    /// The name the gates' certificate carries (default: the host of each address).
    pub tls_server_name: Option<String>,
    /// A send unanswered this long is sent again, same id (`None`: 10 s; 0: only after a
    /// reconnect).
    pub ack_timeout_ms: Option<u64>,
}

/// A timeline entry (PROTOCOL.md §5 "Message").
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ImMessage {
    pub seq: u64,
    pub prev_seq: u64,
    pub msg_id: u64,
    /// 1 c2c, 2 c2g, 3 s2c, 4 recall, 5 read receipt, 6 group event, 7 mention.
    pub conv: u8,
    pub sender: u64,
    /// The recipient user (c2c) or the group.
    pub recipient: u64,
    pub client_msg_id: u64,
    pub server_time_ms: u64,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ImGroupHead {
    pub group: u64,
    pub head: u64,
    pub read: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ImPresence {
    pub uid: u64,
    pub online: bool,
    pub last_seen_ms: u64,
}

/// What the session reports (the core's `Event`).
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ImEvent {
    Connecting {
        gate_id: u16,
        addr: String,
        attempt: u32,
    },
    LoggedIn {
        max_seq: u64,
        heartbeat_secs: u16,
        server_time_ms: u64,
    },
    /// `will_retry` false: the session stopped (bad or expired token).
    LoginFailed {
        code: u16,
        message: String,
        will_retry: bool,
    },
    /// A timeline entry, exactly once and in seq order (own c2c messages included).
    Message {
        message: ImMessage,
    },
    Synced {
        last_seq: u64,
    },
    SendAcked {
        client_msg_id: u64,
        msg_id: u64,
        seq: u64,
        server_time_ms: u64,
    },
    SendFailed {
        client_msg_id: u64,
        code: u16,
    },
    Delivered {
        msg_id: u64,
        recipient: u64,
    },
    Kicked {
        reason: u8,
        message: String,
        will_reconnect: bool,
    },
    Disconnected {
        why: String,
    },
    Reconnecting {
        after_ms: u64,
        attempt: u32,
    },
    LoggedOut,
    GroupHeads {
        heads: Vec<ImGroupHead>,
    },
    GroupPost {
        message: ImMessage,
    },
    Presence {
        entries: Vec<ImPresence>,
    },
    Typing {
        conv: u8,
        peer: u64,
        sender: u64,
        typing: bool,
    },
    OrgChanged {
        version: u64,
    },
    Error {
        code: u16,
        message: String,
    },
}

#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum ImError {
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("the session has stopped (kicked out, logged out or refused)")]
    Stopped,
}

/// One reconnecting session (see the crate documentation).
#[derive(uniffi::Object)]
pub struct ImSession {
    inner: Mutex<Session>,
}

impl std::fmt::Debug for ImSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImSession").finish_non_exhaustive()
    }
}

#[uniffi::export]
impl ImSession {
    #[uniffi::constructor]
    pub fn new(config: SessionConfig) -> Result<Arc<ImSession>, ImError> {
        let (cfg, tls) = to_config(config)?;
        let mut s = Session::new(cfg);
        if let Some(t) = tls {
            s = s.with_tls(t);
        }
        Ok(Arc::new(ImSession {
            inner: Mutex::new(s),
        }))
    }

    /// Starts connecting; progress comes through `next_event`.
    pub fn start(&self) {
        self.lock().start();
    }

    /// Sends a c2c message; returns its `client_msg_id` (a new random one when `None`). Kept
    /// and sent again with that id until `SendAcked` or `SendFailed`.
    pub fn send_c2c(
        &self,
        to: u64,
        client_msg_id: Option<u64>,
        body: Vec<u8>,
    ) -> Result<u64, ImError> {
        self.lock()
            .send_c2c(UserId(to), client_msg_id, body)
            .map_err(|_| ImError::Stopped)
    }

    /// Posts to a group (see `send_c2c`), mentioning `mentions`.
    pub fn send_c2g(
        &self,
        group: u64,
        client_msg_id: Option<u64>,
        body: Vec<u8>,
        mentions: Vec<u64>,
    ) -> Result<u64, ImError> {
        self.lock()
            .send_c2g(
                GroupId(group),
                client_msg_id,
                body,
                mentions.into_iter().map(UserId).collect(),
            )
            .map_err(|_| ImError::Stopped)
    }

    /// The next event, waiting up to `timeout_ms` (`None`: nothing happened meanwhile).
    pub fn next_event(&self, timeout_ms: u64) -> Option<ImEvent> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.lock().next_event(left.min(LOCK_SLICE));
            match event {
                Some(e) => {
                    if let Some(e) = to_event(e) {
                        return Some(e);
                    }
                }
                None if left <= LOCK_SLICE => return None,
                None => {}
            }
        }
    }

    /// Highest seq held with no gap before it: persist it for the next session.
    pub fn last_seq(&self) -> u64 {
        self.lock().core().last_seq().0
    }

    pub fn is_logged_in(&self) -> bool {
        self.lock().core().is_logged_in()
    }

    /// The `client_msg_id`s sent and not yet acknowledged.
    pub fn unacked(&self) -> Vec<u64> {
        self.lock().core().unacked().map(|(id, _)| id).collect()
    }

    /// Drops the connection as a lost network would: the session reconnects (call it when the
    /// OS reports a network change).
    pub fn drop_connection(&self) {
        self.lock().drop_connection("dropped by the application");
    }

    /// Logs out (waiting up to `timeout_ms` for the server) and stops the session.
    pub fn close(&self, timeout_ms: u64) {
        self.lock().logout(Duration::from_millis(timeout_ms));
    }
}

/// The wait before reconnect attempt `attempt` (docs/API.md "iplist"), `unit` uniform in
/// `[0, 1)`.
#[uniffi::export]
pub fn reconnect_wait_ms(
    initial_ms: u64,
    max_ms: u64,
    multiplier: f64,
    jitter: f64,
    attempt: u32,
    unit: f64,
) -> u64 {
    im_shared::iplist::reconnect_wait_ms(initial_ms, max_ms, multiplier, jitter, attempt, unit)
}

/// `gates` in `uid`'s order (rendezvous weight, highest first).
#[uniffi::export]
pub fn gate_order(uid: u64, gates: Vec<GateAddr>) -> Vec<GateAddr> {
    let mut g: Vec<Gate> = gates
        .into_iter()
        .map(|g| Gate {
            id: g.id,
            addr: g.addr,
        })
        .collect();
    core::gate_order(UserId(uid), &mut g);
    g.into_iter()
        .map(|g| GateAddr {
            id: g.id,
            addr: g.addr,
        })
        .collect()
}

impl ImSession {
    fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic in another caller leaves the session usable: its state is the core's.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The gates and backoff of an iplist answer.
fn parse_iplist(json: &str) -> Result<(Vec<Gate>, Option<Backoff>), ImError> {
    let bad = |m: &str| ImError::InvalidConfig(format!("iplist: {m}"));
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let mut gates = Vec::new();
    for g in v["gates"].as_array().ok_or_else(|| bad("no gates array"))? {
        let id = g["id"].as_u64().and_then(|i| u16::try_from(i).ok());
        let tcp = g["tcp"].as_str();
        match (id, tcp) {
            (Some(id), Some(tcp)) => gates.push(Gate {
                id,
                addr: tcp.to_owned(),
            }),
            _ => return Err(bad("a gate without id or tcp")),
        }
    }
    let b = &v["backoff"];
    let backoff = match (
        b["initial_ms"].as_u64(),
        b["max_ms"].as_u64(),
        b["multiplier"].as_f64(),
        b["jitter"].as_f64(),
    ) {
        (Some(initial_ms), Some(max_ms), Some(multiplier), Some(jitter)) => Some(Backoff {
            initial_ms,
            max_ms,
            multiplier,
            jitter,
        }),
        _ => None,
    };
    Ok((gates, backoff))
}

fn to_config(c: SessionConfig) -> Result<(Config, Option<TlsSettings>), ImError> {
    let mut gates: Vec<Gate> = c
        .gates
        .into_iter()
        .map(|g| Gate {
            id: g.id,
            addr: g.addr,
        })
        .collect();
    let mut backoff = None;
    if let Some(j) = &c.iplist_json {
        let (g, b) = parse_iplist(j)?;
        for g in g {
            if !gates.iter().any(|x| x.id == g.id) {
                gates.push(g);
            }
        }
        backoff = b;
    }
    if gates.is_empty() {
        return Err(ImError::InvalidConfig("no gate".into()));
    }
    if c.device_id.is_empty() || c.device_id.len() > im_shared::proto::MAX_DEVICE_ID_LEN {
        return Err(ImError::InvalidConfig(
            "device_id must be 1-64 bytes".into(),
        ));
    }
    let device = match c.device {
        DeviceKind::Phone => DeviceType::Phone,
        DeviceKind::Tablet => DeviceType::Tablet,
        DeviceKind::Desktop => DeviceType::Desktop,
        DeviceKind::Web => DeviceType::Web,
    };
    let mut cfg = Config::new(UserId(c.uid), c.token, device, c.device_id, gates);
    cfg.last_seq = Seq(c.last_seq);
    if let Some(b) = backoff {
        cfg.backoff = b;
    }
    if let Some(t) = c.ack_timeout_ms {
        cfg.ack_timeout_ms = t;
    }
    // Jitter and generated ids differ per device and run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    cfg.seed = nanos ^ u64::from(std::process::id()).rotate_left(32) ^ c.uid;
    let tls = c.tls_ca_pem.map(|pem| TlsSettings {
        ca_pem: pem.into_bytes(),
        server_name: c.tls_server_name,
    });
    Ok((cfg, tls))
}

fn to_message(m: Message) -> ImMessage {
    ImMessage {
        seq: m.seq.0,
        prev_seq: m.prev_seq.0,
        msg_id: m.msg_id.0,
        conv: m.conv,
        sender: m.from.0,
        recipient: m.to.0,
        client_msg_id: m.client_msg_id,
        server_time_ms: m.server_time_ms,
        body: m.body.to_vec(),
    }
}

/// The binding's event for a core event (`None`: answers to requests, which this API does not
/// make).
fn to_event(e: Event) -> Option<ImEvent> {
    Some(match e {
        Event::Connecting { gate, attempt } => ImEvent::Connecting {
            gate_id: gate.id,
            addr: gate.addr,
            attempt,
        },
        Event::LoggedIn {
            max_seq,
            heartbeat_secs,
            server_time_ms,
        } => ImEvent::LoggedIn {
            max_seq: max_seq.0,
            heartbeat_secs,
            server_time_ms,
        },
        Event::LoginFailed {
            code,
            message,
            will_retry,
        } => ImEvent::LoginFailed {
            code: code as u16,
            message,
            will_retry,
        },
        Event::Message(m) => ImEvent::Message {
            message: to_message(m),
        },
        Event::Synced { last_seq } => ImEvent::Synced {
            last_seq: last_seq.0,
        },
        Event::SendAcked {
            client_msg_id,
            msg_id,
            seq,
            server_time_ms,
        } => ImEvent::SendAcked {
            client_msg_id,
            msg_id: msg_id.0,
            seq: seq.0,
            server_time_ms,
        },
        Event::SendFailed {
            client_msg_id,
            code,
        } => ImEvent::SendFailed {
            client_msg_id,
            code: code as u16,
        },
        Event::Delivered { msg_id, recipient } => ImEvent::Delivered {
            msg_id: msg_id.0,
            recipient: recipient.0,
        },
        Event::Kicked {
            reason,
            message,
            will_reconnect,
        } => ImEvent::Kicked {
            reason,
            message,
            will_reconnect,
        },
        Event::Disconnected { why } => ImEvent::Disconnected { why },
        Event::Reconnecting { after_ms, attempt } => ImEvent::Reconnecting { after_ms, attempt },
        Event::LoggedOut => ImEvent::LoggedOut,
        Event::GroupHeads(h) => ImEvent::GroupHeads {
            heads: h
                .into_iter()
                .map(|h| ImGroupHead {
                    group: h.group.0,
                    head: h.head.0,
                    read: h.read.0,
                })
                .collect(),
        },
        Event::GroupPost(m) => ImEvent::GroupPost {
            message: to_message(m),
        },
        Event::Presence(e) => ImEvent::Presence {
            entries: e
                .into_iter()
                .map(|e| ImPresence {
                    uid: e.uid.0,
                    online: e.online,
                    last_seen_ms: e.last_seen_ms,
                })
                .collect(),
        },
        Event::Typing {
            conv,
            peer,
            from,
            typing,
        } => ImEvent::Typing {
            conv,
            peer,
            sender: from.0,
            typing,
        },
        Event::OrgChanged { version } => ImEvent::OrgChanged { version },
        Event::Error { code, message } => ImEvent::Error {
            code: code as u16,
            message,
        },
        Event::Response { .. } | Event::RequestLost { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iplist_answer_gives_the_gates_and_the_backoff() {
        let j = r#"{"uid":42,
         "gates":[{"id":2,"tcp":"10.0.0.2:7000","ws":"ws://10.0.0.2:7080/ws"},
                  {"id":1,"tcp":"10.0.0.1:7000","ws":null}],
         "backoff":{"initial_ms":250,"max_ms":8000,"multiplier":3.0,"jitter":0.25}}"#;
        let (g, b) = parse_iplist(j).unwrap();
        assert_eq!(g.iter().map(|g| g.id).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(g[1].addr, "10.0.0.1:7000");
        assert_eq!(
            b,
            Some(Backoff {
                initial_ms: 250,
                max_ms: 8000,
                multiplier: 3.0,
                jitter: 0.25
            })
        );
        assert!(parse_iplist(r#"{"gates":[{"id":1}]}"#).is_err());
        assert!(parse_iplist("nope").is_err());
    }

    #[test]
    fn a_config_needs_a_gate_and_a_device_id() {
        let c = SessionConfig {
            uid: 1,
            token: "t".into(),
            device: DeviceKind::Phone,
            device_id: "d".into(),
            last_seq: 0,
            gates: vec![],
            iplist_json: None,
            tls_ca_pem: None,
            tls_server_name: None,
            ack_timeout_ms: None,
        };
        assert!(matches!(
            ImSession::new(c.clone()),
            Err(ImError::InvalidConfig(_))
        ));
        let ok = SessionConfig {
            gates: vec![GateAddr {
                id: 1,
                addr: "127.0.0.1:1".into(),
            }],
            ..c.clone()
        };
        assert!(ImSession::new(ok.clone()).is_ok());
        assert!(ImSession::new(SessionConfig {
            device_id: String::new(),
            ..ok
        })
        .is_err());
    }

    #[test]
    fn the_helpers_are_the_shared_rules() {
        assert_eq!(reconnect_wait_ms(500, 30_000, 2.0, 0.0, 3, 0.9), 4000);
        let g: Vec<GateAddr> = (1..=4)
            .map(|id| GateAddr {
                id,
                addr: format!("h{id}:1"),
            })
            .collect();
        let o = gate_order(42, g.clone());
        let w: Vec<u64> = o
            .iter()
            .map(|g| im_shared::iplist::rendezvous_weight(UserId(42), g.id))
            .collect();
        assert!(w.windows(2).all(|p| p[0] >= p[1]), "{o:?}");
        assert_eq!(o.len(), 4);
    }
}
