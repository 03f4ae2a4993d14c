//! The gate ↔ logic link protocol.
//!
//! A gate multiplexes all of its client connections onto a few links to logic. Upstream
//! ([`Up`]) it forwards client frames *undecoded* (command byte + body) tagged with the
//! connection and the user the connection claimed at login; downstream ([`Down`]) logic sends
//! fully encoded client frames tagged with the connection, so the gate only copies bytes.
//!
//! The transports are traits ([`UpstreamLink`], [`DownstreamSink`]): the single-node server
//! wires them in-process (typed values over channels, no encoding); a TCP transport uses the
//! byte layout below ([`encode_up`], [`decode_up`], ...), many messages per write.
//!
//! ```text
//! link message := len:u32 (bytes after this field) | kind:u8 | fields
//! Up::Frame   kind 1: conn:u64 uid:u64 cmd:u8 req_id:u32 body...(rest)
//! Up::Closed  kind 2: conn:u64 uid:u64
//! Down::Send  kind 16: conn:u64 data...(rest)
//! Down::Bind  kind 17: conn:u64 uid:u64 data...(rest)
//! Down::Close kind 18: conn:u64 data...(rest)
//! Down::SendMany kind 19: count:u32 (≥ 1) conn:u64*count data...(rest)
//! Hello       kind 32: role:u8 (1 gate, 2 logic) id:u16 map_epoch:u64 [addr:str [ws:str [caps:u8]]]
//! Ping        kind 33: (empty)
//! Pong        kind 34: (empty)
//! Peer        kind 48: payload...(rest)   logic↔logic messages, layout in [`crate::peer`]
//! ```
//!
//! A link starts with a `Hello` from the connecting side, answered by a `Hello` of the accepting
//! side (`caps`: what the sender understands beyond the first version, [`CAP_SEND_MANY`]; older
//! peers send none and ignore it, so a logic node sends `SendMany` only to a gate that has
//! announced it, and gates and logic nodes can be upgraded in any order); either side sends `Ping` when it has been silent for a while and the peer answers `Pong`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::Cmd;
use crate::ids::{ConnId, UserId};

/// Gate → logic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Up {
    /// A client frame, body not decoded by the gate.
    Frame {
        conn: ConnId,
        /// The user this connection claimed in its login frame (verified by logic).
        uid: UserId,
        cmd: Cmd,
        req_id: u32,
        body: Bytes,
    },
    /// The connection is gone (client closed, timeout, kicked, error).
    Closed { conn: ConnId, uid: UserId },
}

impl Up {
    /// `cmd` sent by a client on `conn` as request `req_id`, as the gate forwards it (command and
    /// encoded body; the gate does not decode bodies).
    pub fn request(conn: ConnId, uid: UserId, req_id: u32, cmd: &crate::proto::Command) -> Up {
        let f = cmd.to_frame(req_id);
        Up::Frame {
            conn,
            uid,
            cmd: f.cmd,
            req_id,
            body: f.body,
        }
    }

    /// The gate that holds the connection.
    pub fn conn_gate(&self) -> u16 {
        match self {
            Up::Frame { conn, .. } | Up::Closed { conn, .. } => conn.gate(),
        }
    }

    pub fn uid(&self) -> UserId {
        match self {
            Up::Frame { uid, .. } | Up::Closed { uid, .. } => *uid,
        }
    }
}

/// Logic → gate. `data` holds zero or more encoded client frames to write as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Down {
    /// Write `data` to the connection.
    Send { conn: ConnId, data: Bytes },
    /// Login accepted: the connection is now logged in as `uid`; write `data` (the login result).
    Bind {
        conn: ConnId,
        uid: UserId,
        data: Bytes,
    },
    /// Write `data` (e.g. a kickout or error frame), then close the connection.
    Close { conn: ConnId, data: Bytes },
    /// Write the same `data` to every connection in `conns` (at least one, all of one gate
    /// core): a post of a large group to the devices of its online members crosses the link
    /// once per gate core instead of once per device, and the core fans it out.
    SendMany { conns: Vec<ConnId>, data: Bytes },
}

impl Down {
    /// The connection, or for [`Down::SendMany`] the first one (all of its connections are
    /// on the same gate core, which is what callers route by).
    pub fn conn(&self) -> ConnId {
        match self {
            Down::Send { conn, .. } | Down::Bind { conn, .. } | Down::Close { conn, .. } => *conn,
            Down::SendMany { conns, .. } => conns.first().copied().unwrap_or(ConnId(0)),
        }
    }

    /// The frames this message writes.
    pub fn data(&self) -> &Bytes {
        match self {
            Down::Send { data, .. }
            | Down::Bind { data, .. }
            | Down::Close { data, .. }
            | Down::SendMany { data, .. } => data,
        }
    }
}

/// Where a gate core sends upstream messages.
pub trait UpstreamLink: Send + Sync + 'static {
    /// Lane (logic worker or link) of a user. All messages of one user use one lane, so their
    /// order is kept.
    fn lane_of(&self, uid: UserId) -> usize;
    /// Whether the lane accepts new client work now, counting `unsent` messages the caller
    /// holds for it and has not handed over yet (a batch being built counts against the same
    /// bound as the queue it goes to). `Err` carries the retryable code the gate answers with
    /// (`Overloaded` when queues are full, `Unavailable` when the link is down).
    fn admit(&self, lane: usize, unsent: usize) -> Result<(), crate::ErrorCode>;
    /// Hands over a batch for one lane. Never drops: `Closed` messages must always arrive.
    fn send(&self, lane: usize, batch: Vec<Up>);
}

/// Where logic sends downstream messages: one batch for one core of one gate.
pub trait DownstreamSink: Send + Sync + 'static {
    fn send(&self, gate: u16, core: u16, batch: Vec<Down>);

    /// Whether `core` can take more without its producer waiting. A producer that runs on a
    /// gate core's own thread (a hosted logic worker) must not block in [`DownstreamSink::send`]:
    /// it asks first and waits asynchronously, so the core it shares a thread with keeps
    /// draining.
    fn has_room(&self, _core: u16) -> bool {
        true
    }
}

/// Longest a producer waits for a gate core whose downstream backlog is full before handing its
/// batch over anyway: a core that applies nothing for this long is stuck (a bug), and waiting
/// forever would stop logic with it.
pub const DOWN_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A task that a gate core runs on its own thread beside its connections (a logic worker in a
/// single-node server, see `Gate::start_hosting`): called once on the core's thread, inside its
/// runtime, and the future it returns is spawned there. The future may use tokio's timers only
/// through a handle it enters itself (the core's runtime is not tokio's).
pub type HostedTask =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>;

/// Who is at the other end of a link (in `Hello`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Gate = 1,
    Logic = 2,
}

/// Any message on a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkMsg {
    Up(Up),
    Down(Down),
    Hello {
        role: Role,
        id: u16,
        map_epoch: u64,
        /// A gate's client address (`host:port`) for the gate registry; empty otherwise.
        addr: String,
        /// A gate's WebSocket URL (`ws://host:port/ws` or `wss://…`) for the gate registry;
        /// empty when it has no WebSocket listener (and from senders that predate the field).
        ws: String,
        /// Capabilities, a bit set ([`CAP_SEND_MANY`]); 0 from senders that predate the field.
        caps: u8,
    },
    Ping,
    Pong,
    /// Opaque logic↔logic payload.
    Peer(Bytes),
    /// A client frame whose command byte this build does not know: a gate of a newer release
    /// forwarded a command added since. Logic answers the request `Error UnknownCommand` and
    /// keeps the link (ending it would close every connection of the gate's lane). Decoded,
    /// never sent by this build (its encoding is the `Up::Frame` it came as, without the body).
    UnknownUp {
        conn: ConnId,
        uid: UserId,
        cmd: u8,
        req_id: u32,
    },
}

/// Why link bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("link message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("link message truncated")]
    Truncated,
    #[error("unknown link message kind {0}")]
    UnknownKind(u8),
    #[error("unknown client command 0x{0:02x} in link message")]
    UnknownCommand(u8),
    #[error("unexpected link message kind {0} here")]
    Unexpected(u8),
    #[error("SendMany link message for no connection")]
    NoConnections,
}

/// `Hello` capability: the sender (a gate) applies [`Down::SendMany`].
pub const CAP_SEND_MANY: u8 = 1;

/// Largest link message (a client frame plus link header).
pub const MAX_LINK_MSG: usize = 16 * 1024 * 1024;

fn put_len_kind(out: &mut BytesMut, payload: usize, kind: u8) {
    out.reserve(5 + payload);
    out.put_u32((1 + payload) as u32);
    out.put_u8(kind);
}

pub fn encode_up(m: &Up, out: &mut BytesMut) {
    match m {
        Up::Frame {
            conn,
            uid,
            cmd,
            req_id,
            body,
        } => {
            put_len_kind(out, 8 + 8 + 1 + 4 + body.len(), 1);
            out.put_u64(conn.0);
            out.put_u64(uid.0);
            out.put_u8(*cmd as u8);
            out.put_u32(*req_id);
            out.put_slice(body);
        }
        Up::Closed { conn, uid } => {
            put_len_kind(out, 16, 2);
            out.put_u64(conn.0);
            out.put_u64(uid.0);
        }
    }
}

pub fn encode_down(m: &Down, out: &mut BytesMut) {
    match m {
        Down::Send { conn, data } => {
            put_len_kind(out, 8 + data.len(), 16);
            out.put_u64(conn.0);
            out.put_slice(data);
        }
        Down::Bind { conn, uid, data } => {
            put_len_kind(out, 16 + data.len(), 17);
            out.put_u64(conn.0);
            out.put_u64(uid.0);
            out.put_slice(data);
        }
        Down::Close { conn, data } => {
            put_len_kind(out, 8 + data.len(), 18);
            out.put_u64(conn.0);
            out.put_slice(data);
        }
        Down::SendMany { conns, data } => {
            put_len_kind(out, 4 + 8 * conns.len() + data.len(), 19);
            out.put_u32(conns.len() as u32);
            for c in conns {
                out.put_u64(c.0);
            }
            out.put_slice(data);
        }
    }
}

/// Appends any link message.
pub fn encode_msg(m: &LinkMsg, out: &mut BytesMut) {
    match m {
        LinkMsg::Up(u) => encode_up(u, out),
        LinkMsg::Down(d) => encode_down(d, out),
        LinkMsg::Hello {
            role,
            id,
            map_epoch,
            addr,
            ws,
            caps,
        } => {
            let a = &addr.as_bytes()[..addr.len().min(u16::MAX as usize)];
            let w = &ws.as_bytes()[..ws.len().min(u16::MAX as usize)];
            put_len_kind(out, 11 + 2 + a.len() + 2 + w.len() + 1, 32);
            out.put_u8(*role as u8);
            out.put_u16(*id);
            out.put_u64(*map_epoch);
            out.put_u16(a.len() as u16);
            out.put_slice(a);
            out.put_u16(w.len() as u16);
            out.put_slice(w);
            out.put_u8(*caps);
        }
        LinkMsg::Ping => put_len_kind(out, 0, 33),
        LinkMsg::Pong => put_len_kind(out, 0, 34),
        LinkMsg::Peer(p) => {
            put_len_kind(out, p.len(), 48);
            out.put_slice(p);
        }
        LinkMsg::UnknownUp {
            conn,
            uid,
            cmd,
            req_id,
        } => {
            put_len_kind(out, 8 + 8 + 1 + 4, 1);
            out.put_u64(conn.0);
            out.put_u64(uid.0);
            out.put_u8(*cmd);
            out.put_u32(*req_id);
        }
    }
}

/// Takes one complete link message of any kind off `buf`.
pub fn decode_msg(buf: &mut BytesMut) -> Result<Option<LinkMsg>, LinkError> {
    let Some((kind, mut b)) = take_msg(buf)? else {
        return Ok(None);
    };
    Ok(Some(match kind {
        1 if b.len() >= 21 && Cmd::from_u8(b[16]).is_none() => LinkMsg::UnknownUp {
            conn: ConnId(b.get_u64()),
            uid: UserId(b.get_u64()),
            cmd: b.get_u8(),
            req_id: b.get_u32(),
        },
        1 | 2 => LinkMsg::Up(up_body(kind, b)?),
        16..=19 => LinkMsg::Down(down_body(kind, b)?),
        32 => {
            need(&b, 11)?;
            let role = match b.get_u8() {
                1 => Role::Gate,
                2 => Role::Logic,
                _ => return Err(LinkError::UnknownKind(kind)),
            };
            let id = b.get_u16();
            let map_epoch = b.get_u64();
            // The addresses are optional (older peers end after map_epoch, or after addr).
            let mut opt_str = || -> Result<String, LinkError> {
                if b.remaining() < 2 {
                    return Ok(String::new());
                }
                let n = b.get_u16() as usize;
                need(&b, n)?;
                String::from_utf8(b.split_to(n).to_vec()).map_err(|_| LinkError::Truncated)
            };
            let addr = opt_str()?;
            let ws = opt_str()?;
            let caps = if b.has_remaining() { b.get_u8() } else { 0 };
            LinkMsg::Hello {
                role,
                id,
                map_epoch,
                addr,
                ws,
                caps,
            }
        }
        33 => LinkMsg::Ping,
        34 => LinkMsg::Pong,
        48 => LinkMsg::Peer(b),
        k => return Err(LinkError::UnknownKind(k)),
    }))
}

/// Splits one complete link message (kind + payload) off `buf`.
fn take_msg(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, LinkError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_LINK_MSG {
        return Err(LinkError::TooLarge(len));
    }
    if len == 0 {
        return Err(LinkError::Truncated);
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let mut m = buf.split_to(len).freeze();
    let kind = m.get_u8();
    Ok(Some((kind, m)))
}

fn need(b: &Bytes, n: usize) -> Result<(), LinkError> {
    if b.len() < n {
        Err(LinkError::Truncated)
    } else {
        Ok(())
    }
}

pub fn decode_up(buf: &mut BytesMut) -> Result<Option<Up>, LinkError> {
    let Some((kind, b)) = take_msg(buf)? else {
        return Ok(None);
    };
    up_body(kind, b).map(Some)
}

fn up_body(kind: u8, mut b: Bytes) -> Result<Up, LinkError> {
    Ok(match kind {
        1 => {
            need(&b, 21)?;
            let conn = ConnId(b.get_u64());
            let uid = UserId(b.get_u64());
            let c = b.get_u8();
            let cmd = Cmd::from_u8(c).ok_or(LinkError::UnknownCommand(c))?;
            let req_id = b.get_u32();
            Up::Frame {
                conn,
                uid,
                cmd,
                req_id,
                body: b,
            }
        }
        2 => {
            need(&b, 16)?;
            Up::Closed {
                conn: ConnId(b.get_u64()),
                uid: UserId(b.get_u64()),
            }
        }
        k => return Err(LinkError::UnknownKind(k)),
    })
}

pub fn decode_down(buf: &mut BytesMut) -> Result<Option<Down>, LinkError> {
    let Some((kind, b)) = take_msg(buf)? else {
        return Ok(None);
    };
    down_body(kind, b).map(Some)
}

fn down_body(kind: u8, mut b: Bytes) -> Result<Down, LinkError> {
    Ok(match kind {
        16 => {
            need(&b, 8)?;
            Down::Send {
                conn: ConnId(b.get_u64()),
                data: b,
            }
        }
        17 => {
            need(&b, 16)?;
            Down::Bind {
                conn: ConnId(b.get_u64()),
                uid: UserId(b.get_u64()),
                data: b,
            }
        }
        18 => {
            need(&b, 8)?;
            Down::Close {
                conn: ConnId(b.get_u64()),
                data: b,
            }
        }
        19 => {
            need(&b, 4)?;
            let count = b.get_u32() as usize;
            if count == 0 {
                return Err(LinkError::NoConnections);
            }
            need(&b, count.saturating_mul(8))?;
            let conns = (0..count).map(|_| ConnId(b.get_u64())).collect();
            Down::SendMany { conns, data: b }
        }
        k => return Err(LinkError::UnknownKind(k)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn batch_round_trip() {
        let ups = vec![
            Up::Frame {
                conn: ConnId::new(1, 2, 3),
                uid: UserId(9),
                cmd: Cmd::SendC2c,
                req_id: 4,
                body: Bytes::from_static(b"body"),
            },
            Up::Closed {
                conn: ConnId(5),
                uid: UserId(6),
            },
        ];
        let downs = vec![
            Down::Send {
                conn: ConnId(1),
                data: Bytes::from_static(b"x"),
            },
            Down::Bind {
                conn: ConnId(2),
                uid: UserId(3),
                data: Bytes::new(),
            },
            Down::Close {
                conn: ConnId(4),
                data: Bytes::from_static(b"bye"),
            },
            Down::SendMany {
                conns: vec![ConnId::new(1, 2, 3), ConnId::new(1, 2, 9)],
                data: Bytes::from_static(b"post"),
            },
            Down::SendMany {
                conns: vec![ConnId(7)],
                data: Bytes::new(),
            },
        ];
        let mut b = BytesMut::new();
        ups.iter().for_each(|u| encode_up(u, &mut b));
        let mut got = vec![];
        while let Some(u) = decode_up(&mut b).unwrap() {
            got.push(u);
        }
        assert_eq!(got, ups);
        ups.iter().for_each(|u| encode_up(u, &mut b));
        let mut half = b.split_to(b.len() - 3);
        assert!(decode_up(&mut half).unwrap().is_some());
        assert_eq!(decode_up(&mut half).unwrap(), None);

        let mut b = BytesMut::new();
        downs.iter().for_each(|d| encode_down(d, &mut b));
        let mut got = vec![];
        while let Some(d) = decode_down(&mut b).unwrap() {
            got.push(d);
        }
        assert_eq!(got, downs);
    }

    #[test]
    fn errors() {
        let mut b = BytesMut::from(&[0, 0, 0, 1, 9][..]);
        assert_eq!(decode_up(&mut b), Err(LinkError::UnknownKind(9)));
        let mut b = BytesMut::from(&[0, 0, 0, 2, 1, 0][..]);
        assert_eq!(decode_up(&mut b), Err(LinkError::Truncated));
        let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode_down(&mut b), Err(LinkError::TooLarge(_))));
        // SendMany: no connection; more connections than bytes.
        let mut b = BytesMut::from(&[0, 0, 0, 5, 19, 0, 0, 0, 0][..]);
        assert_eq!(decode_down(&mut b), Err(LinkError::NoConnections));
        let mut b = BytesMut::from(&[0, 0, 0, 13, 19, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(decode_down(&mut b), Err(LinkError::Truncated));
        let mut b = BytesMut::from(&[0, 0, 0, 5, 19, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(decode_down(&mut b), Err(LinkError::Truncated));
    }

    #[test]
    fn control_and_peer_messages_round_trip() {
        let mut msgs = vec![
            LinkMsg::Hello {
                role: Role::Gate,
                id: 3,
                map_epoch: 9,
                addr: "127.0.0.1:7000".into(),
                ws: "wss://127.0.0.1:7443/ws".into(),
                caps: CAP_SEND_MANY,
            },
            LinkMsg::Hello {
                role: Role::Logic,
                id: 4,
                map_epoch: 0,
                addr: String::new(),
                ws: String::new(),
                caps: 0,
            },
            LinkMsg::Ping,
            LinkMsg::Pong,
            LinkMsg::Peer(Bytes::from_static(b"peer payload")),
            LinkMsg::Up(Up::Closed {
                conn: ConnId(1),
                uid: UserId(2),
            }),
            LinkMsg::Down(Down::Send {
                conn: ConnId(1),
                data: Bytes::from_static(b"d"),
            }),
            LinkMsg::Down(Down::SendMany {
                conns: vec![ConnId(1), ConnId(2)],
                data: Bytes::from_static(b"d"),
            }),
            // A command byte of a newer release, body left behind.
            LinkMsg::UnknownUp {
                conn: ConnId(3),
                uid: UserId(4),
                cmd: 0x7E,
                req_id: 5,
            },
        ];
        let mut b = BytesMut::new();
        msgs.iter().for_each(|m| encode_msg(m, &mut b));
        // The same, sent as a gate sends it, with a body: decoded without the body.
        encode_up(
            &Up::Frame {
                conn: ConnId(3),
                uid: UserId(4),
                cmd: Cmd::Heartbeat,
                req_id: 5,
                body: Bytes::from_static(b"body"),
            },
            &mut b,
        );
        let at = b.len() - 4 - 5; // the command byte: before req_id and the body
        b[at] = 0x7E;
        msgs.push(msgs.last().unwrap().clone());
        let mut got = vec![];
        while let Some(m) = decode_msg(&mut b).unwrap() {
            got.push(m);
        }
        assert_eq!(got, msgs);
        let mut b = BytesMut::from(&[0, 0, 0, 12, 32, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode_msg(&mut b), Err(LinkError::UnknownKind(32)));
    }

    #[test]
    fn a_hello_of_an_older_peer_without_addresses_or_without_ws_decodes_with_empty_ones() {
        // role 1, id 7, map_epoch 5, then nothing.
        let mut head = vec![1, 0, 7, 0, 0, 0, 0, 0, 0, 0, 5];
        let frame = |body: &[u8]| {
            let mut b = BytesMut::new();
            b.put_u32(1 + body.len() as u32);
            b.put_u8(32);
            b.put_slice(body);
            b
        };
        let hello = |addr: &str, ws: &str| LinkMsg::Hello {
            role: Role::Gate,
            id: 7,
            map_epoch: 5,
            addr: addr.into(),
            ws: ws.into(),
            caps: 0,
        };
        assert_eq!(decode_msg(&mut frame(&head)).unwrap(), Some(hello("", "")));
        head.extend_from_slice(&[0, 3]);
        head.extend_from_slice(b"a:1");
        assert_eq!(
            decode_msg(&mut frame(&head)).unwrap(),
            Some(hello("a:1", ""))
        );
        // A ws length with its bytes missing is an error, not an empty URL.
        head.extend_from_slice(&[0, 9, b'w']);
        assert_eq!(decode_msg(&mut frame(&head)), Err(LinkError::Truncated));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_up(&mut b) {}
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_down(&mut b) {}
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_msg(&mut b) {}
        }
    }
}
