//! Typed commands of protocol v1 and their body layouts (all integers big-endian;
//! `str` = u16 length + UTF-8; `bytes` = u32 length + raw bytes). Decoders ignore trailing bytes
//! so that later versions can append fields.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codes::ErrorCode;
use crate::frame::{encode_header, Cmd, Frame, HEADER_LEN};
use crate::ids::{DeviceType, MsgId, Seq, UserId};
pub use crate::wire::BodyError;
use crate::wire::{put_bytes, put_string, string_len, Reader};

/// Conversation kind of a [`Message`].
pub const CONV_C2C: u8 = 1;

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// One timeline entry as the recipient sees it. Also the storage record of the embedded store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Position in the receiving user's timeline.
    pub seq: Seq,
    /// Seq of the previous entry in the same timeline (0 for the first); a client whose last seq
    /// differs has a gap and should sync.
    pub prev_seq: Seq,
    pub msg_id: MsgId,
    /// [`CONV_C2C`].
    pub conv: u8,
    pub from: UserId,
    /// The peer user for c2c.
    pub to: UserId,
    pub client_msg_id: u64,
    pub server_time_ms: u64,
    pub body: Bytes,
}

impl Message {
    const FIXED: usize = 8 * 7 + 1 + 4;

    pub fn encoded_len(&self) -> usize {
        Self::FIXED + self.body.len()
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(self.seq.0);
        out.put_u64(self.prev_seq.0);
        out.put_u64(self.msg_id.0);
        out.put_u8(self.conv);
        out.put_u64(self.from.0);
        out.put_u64(self.to.0);
        out.put_u64(self.client_msg_id);
        out.put_u64(self.server_time_ms);
        put_bytes(out, &self.body);
    }

    fn read(r: &mut Reader) -> Result<Message, BodyError> {
        Ok(Message {
            seq: Seq(r.u64("seq")?),
            prev_seq: Seq(r.u64("prev_seq")?),
            msg_id: MsgId(r.u64("msg_id")?),
            conv: r.u8("conv")?,
            from: UserId(r.u64("from")?),
            to: UserId(r.u64("to")?),
            client_msg_id: r.u64("client_msg_id")?,
            server_time_ms: r.u64("server_time_ms")?,
            body: r.bytes("body")?,
        })
    }

    /// Parses one message from `buf` (a storage record or a `Deliver` body).
    pub fn decode(buf: Bytes) -> Result<Message, BodyError> {
        Self::read(&mut Reader::new(buf))
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }
}

/// Every command of protocol v1 with its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Login {
        uid: UserId,
        device_type: DeviceType,
        device_id: String,
        /// Highest seq this device already holds (0 for a fresh install).
        last_seq: Seq,
        token: String,
    },
    LoginResult {
        code: ErrorCode,
        server_time_ms: u64,
        /// Highest seq in the user's timeline; sync if above the device's last seq.
        max_seq: Seq,
        /// Send a heartbeat at least this often.
        heartbeat_secs: u16,
        message: String,
    },
    Logout,
    LogoutAck,
    Heartbeat,
    HeartbeatAck {
        server_time_ms: u64,
    },
    Kickout {
        reason: u8,
        message: String,
    },
    SendC2c {
        client_msg_id: u64,
        to: UserId,
        body: Bytes,
    },
    SendAck {
        code: ErrorCode,
        client_msg_id: u64,
        msg_id: MsgId,
        /// The message's seq in the sender's own timeline.
        seq: Seq,
        server_time_ms: u64,
        /// Seq of the entry before it in the sender's timeline: the sending device can place its
        /// own message without a sync when this equals its last seq.
        prev_seq: Seq,
    },
    Deliver(Message),
    DeliverAck {
        /// Highest seq this device holds without gaps.
        seq: Seq,
    },
    SyncRequest {
        after_seq: Seq,
        limit: u16,
    },
    SyncPage {
        max_seq: Seq,
        has_more: bool,
        messages: Vec<Message>,
    },
    Delivered {
        msg_id: MsgId,
        /// The recipient one of whose devices acknowledged the message.
        recipient: UserId,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Command {
    pub fn cmd(&self) -> Cmd {
        match self {
            Command::Login { .. } => Cmd::Login,
            Command::LoginResult { .. } => Cmd::LoginResult,
            Command::Logout => Cmd::Logout,
            Command::LogoutAck => Cmd::LogoutAck,
            Command::Heartbeat => Cmd::Heartbeat,
            Command::HeartbeatAck { .. } => Cmd::HeartbeatAck,
            Command::Kickout { .. } => Cmd::Kickout,
            Command::SendC2c { .. } => Cmd::SendC2c,
            Command::SendAck { .. } => Cmd::SendAck,
            Command::Deliver(_) => Cmd::Deliver,
            Command::DeliverAck { .. } => Cmd::DeliverAck,
            Command::SyncRequest { .. } => Cmd::SyncRequest,
            Command::SyncPage { .. } => Cmd::SyncPage,
            Command::Delivered { .. } => Cmd::Delivered,
            Command::Error { .. } => Cmd::Error,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Command::Login {
                device_id, token, ..
            } => 8 + 1 + string_len(device_id) + 8 + string_len(token),
            Command::LoginResult { message, .. } => 2 + 8 + 8 + 2 + string_len(message),
            Command::Logout | Command::LogoutAck | Command::Heartbeat => 0,
            Command::HeartbeatAck { .. } => 8,
            Command::Kickout { message, .. } => 1 + string_len(message),
            Command::SendC2c { body, .. } => 8 + 8 + 4 + body.len(),
            Command::SendAck { .. } => 2 + 8 + 8 + 8 + 8 + 8,
            Command::Deliver(m) => m.encoded_len(),
            Command::DeliverAck { .. } => 8,
            Command::SyncRequest { .. } => 8 + 2,
            Command::SyncPage { messages, .. } => {
                8 + 1 + 2 + messages.iter().map(Message::encoded_len).sum::<usize>()
            }
            Command::Delivered { .. } => 16,
            Command::Error { message, .. } => 2 + string_len(message),
        }
    }

    /// Appends the whole frame (header + body) to `out`.
    pub fn encode(&self, req_id: u32, out: &mut BytesMut) {
        let len = self.body_len();
        encode_header(out, self.cmd(), req_id, len);
        let start = out.len();
        match self {
            Command::Login {
                uid,
                device_type,
                device_id,
                last_seq,
                token,
            } => {
                out.put_u64(uid.0);
                out.put_u8(*device_type as u8);
                put_string(out, device_id);
                out.put_u64(last_seq.0);
                put_string(out, token);
            }
            Command::LoginResult {
                code,
                server_time_ms,
                max_seq,
                heartbeat_secs,
                message,
            } => {
                out.put_u16(*code as u16);
                out.put_u64(*server_time_ms);
                out.put_u64(max_seq.0);
                out.put_u16(*heartbeat_secs);
                put_string(out, message);
            }
            Command::Logout | Command::LogoutAck | Command::Heartbeat => {}
            Command::HeartbeatAck { server_time_ms } => out.put_u64(*server_time_ms),
            Command::Kickout { reason, message } => {
                out.put_u8(*reason);
                put_string(out, message);
            }
            Command::SendC2c {
                client_msg_id,
                to,
                body,
            } => {
                out.put_u64(*client_msg_id);
                out.put_u64(to.0);
                put_bytes(out, body);
            }
            Command::SendAck {
                code,
                client_msg_id,
                msg_id,
                seq,
                server_time_ms,
                prev_seq,
            } => {
                out.put_u16(*code as u16);
                out.put_u64(*client_msg_id);
                out.put_u64(msg_id.0);
                out.put_u64(seq.0);
                out.put_u64(*server_time_ms);
                out.put_u64(prev_seq.0);
            }
            Command::Deliver(m) => m.encode(out),
            Command::DeliverAck { seq } => out.put_u64(seq.0),
            Command::SyncRequest { after_seq, limit } => {
                out.put_u64(after_seq.0);
                out.put_u16(*limit);
            }
            Command::SyncPage {
                max_seq,
                has_more,
                messages,
            } => {
                out.put_u64(max_seq.0);
                out.put_u8(*has_more as u8);
                out.put_u16(messages.len() as u16);
                for m in messages {
                    m.encode(out);
                }
            }
            Command::Delivered { msg_id, recipient } => {
                out.put_u64(msg_id.0);
                out.put_u64(recipient.0);
            }
            Command::Error { code, message } => {
                out.put_u16(*code as u16);
                put_string(out, message);
            }
        }
        debug_assert_eq!(out.len() - start, len);
    }

    /// Encodes into a fresh buffer (header + body).
    pub fn to_bytes(&self, req_id: u32) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.body_len());
        self.encode(req_id, &mut b);
        b.freeze()
    }

    /// Encodes into a [`Frame`].
    pub fn to_frame(&self, req_id: u32) -> Frame {
        let mut b = self.to_bytes(req_id);
        let body = b.split_off(HEADER_LEN);
        Frame::new(self.cmd(), req_id, body)
    }

    /// Parses the body of `frame` according to its command.
    pub fn decode(frame: &Frame) -> Result<Command, BodyError> {
        Self::decode_body(frame.cmd, frame.body.clone())
    }

    pub fn decode_body(cmd: Cmd, body: Bytes) -> Result<Command, BodyError> {
        let mut r = Reader::new(body);
        let code = |v: u16| {
            ErrorCode::from_u16(v).ok_or(BodyError::Invalid {
                field: "code",
                value: v as u64,
            })
        };
        Ok(match cmd {
            Cmd::Login => {
                let uid = UserId(r.u64("uid")?);
                let dt = r.u8("device_type")?;
                let device_type = DeviceType::from_u8(dt).ok_or(BodyError::Invalid {
                    field: "device_type",
                    value: dt as u64,
                })?;
                Command::Login {
                    uid,
                    device_type,
                    device_id: r.string("device_id")?,
                    last_seq: Seq(r.u64("last_seq")?),
                    token: r.string("token")?,
                }
            }
            Cmd::LoginResult => Command::LoginResult {
                code: code(r.u16("code")?)?,
                server_time_ms: r.u64("server_time_ms")?,
                max_seq: Seq(r.u64("max_seq")?),
                heartbeat_secs: r.u16("heartbeat_secs")?,
                message: r.string("message")?,
            },
            Cmd::Logout => Command::Logout,
            Cmd::LogoutAck => Command::LogoutAck,
            Cmd::Heartbeat => Command::Heartbeat,
            Cmd::HeartbeatAck => Command::HeartbeatAck {
                server_time_ms: r.u64("server_time_ms")?,
            },
            Cmd::Kickout => Command::Kickout {
                reason: r.u8("reason")?,
                message: r.string("message")?,
            },
            Cmd::SendC2c => Command::SendC2c {
                client_msg_id: r.u64("client_msg_id")?,
                to: UserId(r.u64("to")?),
                body: r.bytes("body")?,
            },
            Cmd::SendAck => Command::SendAck {
                code: code(r.u16("code")?)?,
                client_msg_id: r.u64("client_msg_id")?,
                msg_id: MsgId(r.u64("msg_id")?),
                seq: Seq(r.u64("seq")?),
                server_time_ms: r.u64("server_time_ms")?,
                prev_seq: Seq(r.u64("prev_seq")?),
            },
            Cmd::Deliver => Command::Deliver(Message::read(&mut r)?),
            Cmd::DeliverAck => Command::DeliverAck {
                seq: Seq(r.u64("seq")?),
            },
            Cmd::SyncRequest => Command::SyncRequest {
                after_seq: Seq(r.u64("after_seq")?),
                limit: r.u16("limit")?,
            },
            Cmd::SyncPage => {
                let max_seq = Seq(r.u64("max_seq")?);
                let has_more = r.u8("has_more")? != 0;
                let n = r.u16("count")? as usize;
                // Each message needs at least Message::FIXED bytes: cap the allocation by what
                // the body can actually hold so a forged count cannot allocate much.
                let mut messages = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    messages.push(Message::read(&mut r)?);
                }
                Command::SyncPage {
                    max_seq,
                    has_more,
                    messages,
                }
            }
            Cmd::Delivered => Command::Delivered {
                msg_id: MsgId(r.u64("msg_id")?),
                recipient: UserId(r.u64("recipient")?),
            },
            Cmd::Error => Command::Error {
                code: code(r.u16("code")?)?,
                message: r.string("message")?,
            },
        })
    }
}

/// Reads only the user id of a `Login` body: the one field the gate looks at.
pub fn peek_login_uid(body: &[u8]) -> Option<UserId> {
    let b: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(UserId(u64::from_be_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameCodec;
    use proptest::prelude::*;

    fn msg(seq: u64, body: &'static [u8]) -> Message {
        Message {
            seq: Seq(seq),
            prev_seq: Seq(seq.saturating_sub(1)),
            msg_id: MsgId(99),
            conv: CONV_C2C,
            from: UserId(1),
            to: UserId(2),
            client_msg_id: 5,
            server_time_ms: 1234,
            body: Bytes::from_static(body),
        }
    }

    fn all_commands() -> Vec<Command> {
        vec![
            Command::Login {
                uid: UserId(7),
                device_type: DeviceType::Desktop,
                device_id: "dev-1".into(),
                last_seq: Seq(3),
                token: "v1.7.99.abc".into(),
            },
            Command::LoginResult {
                code: ErrorCode::Ok,
                server_time_ms: 1,
                max_seq: Seq(9),
                heartbeat_secs: 30,
                message: "welcome".into(),
            },
            Command::Logout,
            Command::LogoutAck,
            Command::Heartbeat,
            Command::HeartbeatAck { server_time_ms: 5 },
            Command::Kickout {
                reason: 1,
                message: "bye".into(),
            },
            Command::SendC2c {
                client_msg_id: 11,
                to: UserId(2),
                body: Bytes::from_static(b"hi"),
            },
            Command::SendAck {
                code: ErrorCode::Ok,
                client_msg_id: 11,
                msg_id: MsgId(12),
                seq: Seq(13),
                server_time_ms: 14,
                prev_seq: Seq(12),
            },
            Command::Deliver(msg(4, b"yo")),
            Command::DeliverAck { seq: Seq(4) },
            Command::SyncRequest {
                after_seq: Seq(1),
                limit: 100,
            },
            Command::SyncPage {
                max_seq: Seq(9),
                has_more: true,
                messages: vec![msg(2, b"a"), msg(3, b"")],
            },
            Command::Delivered {
                msg_id: MsgId(1),
                recipient: UserId(2),
            },
            Command::Error {
                code: ErrorCode::Overloaded,
                message: "later".into(),
            },
        ]
    }

    #[test]
    fn every_command_round_trips() {
        for c in all_commands() {
            let mut b = BytesMut::new();
            c.encode(77, &mut b);
            let f = FrameCodec::default().decode(&mut b).unwrap().unwrap();
            assert_eq!(f.req_id, 77);
            assert_eq!(Command::decode(&f).unwrap(), c);
            assert_eq!(c.to_frame(77), f);
        }
    }

    #[test]
    fn truncated_bodies_are_errors_not_panics() {
        for c in all_commands() {
            let f = c.to_frame(1);
            for cut in 0..f.body.len() {
                let short = Frame::new(f.cmd, 1, f.body.slice(..cut));
                assert!(Command::decode(&short).is_err(), "{c:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let c = Command::DeliverAck { seq: Seq(8) };
        let mut f = c.to_frame(1);
        let mut body = BytesMut::from(&f.body[..]);
        body.extend_from_slice(b"future fields");
        f.body = body.freeze();
        assert_eq!(Command::decode(&f).unwrap(), c);
    }

    #[test]
    fn peek_uid() {
        let f = all_commands()[0].to_frame(1);
        assert_eq!(peek_login_uid(&f.body), Some(UserId(7)));
        assert_eq!(peek_login_uid(&f.body[..7]), None);
    }

    proptest! {
        #[test]
        fn decode_body_never_panics(cmd in 0u8..=255, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Some(cmd) = Cmd::from_u8(cmd) {
                let _ = Command::decode_body(cmd, Bytes::from(body));
            }
        }

        #[test]
        fn c2c_round_trips(cmid: u64, to: u64, body in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let c = Command::SendC2c { client_msg_id: cmid, to: UserId(to), body: Bytes::from(body) };
            prop_assert_eq!(Command::decode(&c.to_frame(3)).unwrap(), c);
        }
    }
}
