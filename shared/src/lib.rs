//! `im-shared` owns everything both sides of the wire need: the protocol v1 frame codec (sans-io:
//! it never touches a socket and never panics on any input), the typed client commands, newtype
//! ids, wire error codes, the gate<->logic link protocol, the user→shard/core hash, the development
//! SSO token scheme, the msg-id generator and the base64 of the HTTP API. No I/O: the blocking
//! client SDK is the crate `im-client`.
//!
//! The byte layout of everything in this crate is specified in `docs/PROTOCOL.md`.

#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod b64;
pub mod codes;
pub mod errors;
pub mod fast;
pub mod files;
pub mod frame;
pub mod ids;
pub mod iplist;
pub mod link;
pub mod link_writer;
pub mod msgid;
pub mod org;
pub mod peer;
pub mod prom;
pub mod proto;
pub mod shard;
pub mod token;
pub mod url;
mod wire;

pub use codes::{ErrorCode, KickReason};
pub use frame::{Cmd, DecodeError, Frame, FrameCodec, HEADER_LEN, MAGIC, PROTOCOL_VERSION};
pub use ids::{ConnId, DeviceType, GroupId, MsgId, Seq, ShardId, UserId};
pub use proto::Command;
