//! Frame layer of protocol v1: a fixed 12-byte header and an opaque body.
//!
//! ```text
//! 0       2       3       4               8               12
//! +-------+-------+-------+---------------+---------------+------------
//! | magic | ver   | cmd   | req_id (u32)  | body_len (u32)| body ...
//! | "IM"  | 0x01  |       | big-endian    | big-endian    |
//! ```
//!
//! The gate works at this layer only: it checks the header, then forwards `body` (a
//! [`bytes::Bytes`] slice of the read buffer, no copy) to logic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"IM";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Default maximum body size (64 KiB); servers may configure a different limit.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// Command bytes. Values below `0x80` are sent by clients, `0x80` and above by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cmd {
    Login = 0x01,
    Logout = 0x02,
    Heartbeat = 0x03,
    SendC2c = 0x10,
    DeliverAck = 0x11,
    SyncRequest = 0x12,
    SendC2g = 0x13,
    Recall = 0x14,
    ReadReport = 0x15,
    Report = 0x16,
    GroupCreate = 0x17,
    GroupAdd = 0x18,
    GroupRemove = 0x19,
    GroupLeave = 0x1A,
    GroupInfo = 0x1B,
    MyGroups = 0x1C,
    SetMute = 0x1D,
    RegisterPush = 0x1E,
    GroupUpdate = 0x1F,
    OrgSync = 0x20,
    OrgDept = 0x21,
    OrgUser = 0x22,
    OrgSearch = 0x23,
    FileUpload = 0x24,
    FileDownload = 0x25,
    Typing = 0x26,
    PresenceSubscribe = 0x27,
    PresencePrivacy = 0x28,
    GroupSync = 0x29,
    GroupRead = 0x2A,
    GroupMembers = 0x2B,
    GroupPosting = 0x2C,
    GroupRole = 0x2D,
    GroupFileDownload = 0x2E,

    LoginResult = 0x81,
    LogoutAck = 0x82,
    HeartbeatAck = 0x83,
    Kickout = 0x84,
    SendAck = 0x90,
    Deliver = 0x91,
    SyncPage = 0x92,
    Delivered = 0x93,
    OpResult = 0x94,
    GroupInfoReply = 0x95,
    GroupList = 0x96,
    OrgPage = 0x97,
    OrgReply = 0x98,
    OrgChanged = 0x99,
    FileTicket = 0x9A,
    FileUrl = 0x9B,
    TypingNotice = 0x9C,
    PresenceNotice = 0x9D,
    GroupDeliver = 0x9E,
    GroupSyncPage = 0x9F,
    GroupHeads = 0xA0,
    GroupMembersPage = 0xA1,
    Error = 0xFF,
}

impl Cmd {
    pub fn from_u8(v: u8) -> Option<Cmd> {
        use Cmd::*;
        Some(match v {
            0x01 => Login,
            0x02 => Logout,
            0x03 => Heartbeat,
            0x10 => SendC2c,
            0x11 => DeliverAck,
            0x12 => SyncRequest,
            0x13 => SendC2g,
            0x14 => Recall,
            0x15 => ReadReport,
            0x16 => Report,
            0x17 => GroupCreate,
            0x18 => GroupAdd,
            0x19 => GroupRemove,
            0x1A => GroupLeave,
            0x1B => GroupInfo,
            0x1C => MyGroups,
            0x1D => SetMute,
            0x1E => RegisterPush,
            0x1F => GroupUpdate,
            0x20 => OrgSync,
            0x21 => OrgDept,
            0x22 => OrgUser,
            0x23 => OrgSearch,
            0x24 => FileUpload,
            0x25 => FileDownload,
            0x26 => Typing,
            0x27 => PresenceSubscribe,
            0x28 => PresencePrivacy,
            0x29 => GroupSync,
            0x2A => GroupRead,
            0x2B => GroupMembers,
            0x2C => GroupPosting,
            0x2D => GroupRole,
            0x2E => GroupFileDownload,
            0x81 => LoginResult,
            0x82 => LogoutAck,
            0x83 => HeartbeatAck,
            0x84 => Kickout,
            0x90 => SendAck,
            0x91 => Deliver,
            0x92 => SyncPage,
            0x93 => Delivered,
            0x94 => OpResult,
            0x95 => GroupInfoReply,
            0x96 => GroupList,
            0x97 => OrgPage,
            0x98 => OrgReply,
            0x99 => OrgChanged,
            0x9A => FileTicket,
            0x9B => FileUrl,
            0x9C => TypingNotice,
            0x9D => PresenceNotice,
            0x9E => GroupDeliver,
            0x9F => GroupSyncPage,
            0xA0 => GroupHeads,
            0xA1 => GroupMembersPage,
            0xFF => Error,
            _ => return None,
        })
    }

    /// Whether a client may send this command.
    pub fn is_client_cmd(self) -> bool {
        (self as u8) < 0x80
    }
}

/// One frame: header fields plus the undecoded body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub cmd: Cmd,
    /// Chosen by the client for requests and echoed in the response; `0` for server pushes.
    pub req_id: u32,
    pub body: Bytes,
}

impl Frame {
    pub fn new(cmd: Cmd, req_id: u32, body: Bytes) -> Self {
        Frame { cmd, req_id, body }
    }

    /// Appends header and body to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        encode_header(out, self.cmd, self.req_id, self.body.len());
        out.put_slice(&self.body);
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.body.len());
        self.encode(&mut b);
        b.freeze()
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Writes a header for a body of `body_len` bytes that the caller appends next.
pub fn encode_header(out: &mut BytesMut, cmd: Cmd, req_id: u32, body_len: usize) {
    out.reserve(HEADER_LEN + body_len);
    out.put_slice(&MAGIC);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(cmd as u8);
    out.put_u32(req_id);
    out.put_u32(body_len as u32);
}

/// Why bytes could not be decoded into a frame. Every variant means the stream is unusable and
/// the connection must be closed after an `Error` frame with [`DecodeError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("bad magic {0:02x?}, not an IM protocol stream")]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {0} (this server speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown command 0x{0:02x}")]
    UnknownCommand(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

impl DecodeError {
    /// The wire error code to send before closing.
    pub fn code(&self) -> crate::ErrorCode {
        use crate::ErrorCode;
        match self {
            DecodeError::BadMagic(_) => ErrorCode::Malformed,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownCommand(_) => ErrorCode::UnknownCommand,
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        }
    }
}

/// Stateless frame decoder with a body size limit.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    pub max_body: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// A parsed header (the body may not have arrived yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub cmd: Cmd,
    pub req_id: u32,
    pub body_len: usize,
}

impl FrameCodec {
    pub fn new(max_body: usize) -> Self {
        FrameCodec { max_body }
    }

    /// Validates the header at the start of `buf`. `Ok(None)` when fewer than
    /// [`HEADER_LEN`] bytes are present. Errors are reported as soon as the offending byte
    /// arrives, so garbage is rejected without waiting for a full header.
    pub fn check_header(&self, buf: &[u8]) -> Result<Option<Header>, DecodeError> {
        let n = buf.len();
        if n >= 1 && buf[0] != MAGIC[0] || n >= 2 && buf[1] != MAGIC[1] {
            let mut m = [0u8; 2];
            m[..n.min(2)].copy_from_slice(&buf[..n.min(2)]);
            return Err(DecodeError::BadMagic(m));
        }
        if n >= 3 && buf[2] != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion(buf[2]));
        }
        if n >= 4 && Cmd::from_u8(buf[3]).is_none() {
            return Err(DecodeError::UnknownCommand(buf[3]));
        }
        if n < HEADER_LEN {
            return Ok(None);
        }
        let cmd = Cmd::from_u8(buf[3]).ok_or(DecodeError::UnknownCommand(buf[3]))?;
        let req_id = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let body_len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if body_len > self.max_body {
            return Err(DecodeError::TooLarge {
                len: body_len,
                max: self.max_body,
            });
        }
        Ok(Some(Header {
            cmd,
            req_id,
            body_len,
        }))
    }

    /// Takes one complete frame off the front of `buf`. `Ok(None)` means more bytes are needed
    /// (not an error); the body is split off without copying.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(h) = self.check_header(buf)? else {
            return Ok(None);
        };
        if buf.len() < HEADER_LEN + h.body_len {
            // No reserve for the announced body here: a peer could announce a large body and
            // send nothing; the caller grows its buffer as bytes actually arrive.
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let body = buf.split_to(h.body_len).freeze();
        Ok(Some(Frame {
            cmd: h.cmd,
            req_id: h.req_id,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_incomplete() {
        let f = Frame::new(Cmd::SendC2c, 42, Bytes::from_static(b"hello"));
        let enc = f.to_bytes();
        let codec = FrameCodec::default();
        for cut in 0..enc.len() {
            let mut b = BytesMut::from(&enc[..cut]);
            assert_eq!(codec.decode(&mut b), Ok(None), "cut at {cut}");
        }
        let mut b = BytesMut::from(&enc[..]);
        b.extend_from_slice(&enc);
        assert_eq!(codec.decode(&mut b).unwrap(), Some(f.clone()));
        assert_eq!(codec.decode(&mut b).unwrap(), Some(f));
        assert!(b.is_empty());
    }

    #[test]
    fn rejects_garbage_early() {
        let codec = FrameCodec::default();
        let mut b = BytesMut::from(&b"G"[..]);
        assert!(matches!(
            codec.decode(&mut b),
            Err(DecodeError::BadMagic(_))
        ));
        let mut b = BytesMut::from(&b"IM\x02"[..]);
        assert_eq!(
            codec.decode(&mut b),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut b = BytesMut::from(&b"IM\x01\x55"[..]);
        assert_eq!(codec.decode(&mut b), Err(DecodeError::UnknownCommand(0x55)));
    }

    #[test]
    fn rejects_oversized_before_body_arrives() {
        let codec = FrameCodec::new(16);
        let mut b = BytesMut::new();
        encode_header(&mut b, Cmd::SendC2c, 1, 17);
        assert_eq!(
            codec.decode(&mut b),
            Err(DecodeError::TooLarge { len: 17, max: 16 })
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let codec = FrameCodec::new(128);
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = codec.decode(&mut b) {}
        }

        #[test]
        fn frames_round_trip(cmd in prop::sample::select(vec![Cmd::Login, Cmd::SendC2c, Cmd::Deliver, Cmd::Error]),
                             req_id: u32, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let f = Frame::new(cmd, req_id, Bytes::from(body));
            let mut b = BytesMut::new();
            f.encode(&mut b);
            prop_assert_eq!(FrameCodec::default().decode(&mut b).unwrap(), Some(f));
            prop_assert!(b.is_empty());
        }
    }
}
