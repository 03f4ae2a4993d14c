//! Newtype ids. All are plain integers on the wire (big-endian), see `docs/PROTOCOL.md`.

use std::fmt;

macro_rules! id {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id!(
    /// A user. `0` is never a valid user.
    UserId(u64)
);
id!(
    /// A group. Allocated from the msg-id generator, so unique cluster-wide and never 0; sharded
    /// like a user id (the worker owning `vshard_of(UserId(gid))` owns the group).
    GroupId(u64)
);
id!(
    /// Server-assigned message id: unique and time ordered (see [`MsgId::timestamp_ms`]).
    MsgId(u64)
);
id!(
    /// Position of an entry in one user's timeline; strictly increasing, not dense.
    Seq(u64)
);
id!(
    /// A virtual shard of the user id space (see [`crate::shard`]).
    ShardId(u16)
);

impl MsgId {
    /// Bits of the per-millisecond counter.
    pub const COUNTER_BITS: u32 = 12;
    /// Bits of the generator (logic worker / node) id.
    pub const NODE_BITS: u32 = 10;
    /// Milliseconds since [`MsgId::EPOCH_MS`] at which the id was made.
    pub fn timestamp_ms(self) -> u64 {
        (self.0 >> (Self::COUNTER_BITS + Self::NODE_BITS)) + Self::EPOCH_MS
    }
    /// 2024-01-01T00:00:00Z in Unix milliseconds.
    pub const EPOCH_MS: u64 = 1_704_067_200_000;
}

/// Identifies one client connection on one gate core: `gate:16 | core:16 | serial:32`.
/// Logic addresses every downstream frame with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    pub fn new(gate: u16, core: u16, serial: u32) -> Self {
        ConnId(((gate as u64) << 48) | ((core as u64) << 32) | serial as u64)
    }
    pub fn gate(self) -> u16 {
        (self.0 >> 48) as u16
    }
    pub fn core(self) -> u16 {
        (self.0 >> 32) as u16
    }
    pub fn serial(self) -> u32 {
        self.0 as u32
    }
}

/// Kind of device. One device of each kind may be online per user: a second login of the same
/// kind kicks the first out; different kinds stay online together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DeviceType {
    /// iOS or Android phone app.
    Phone = 1,
    /// Tablet app.
    Tablet = 2,
    /// Desktop (PC/Mac) app.
    Desktop = 3,
    /// H5 / web page.
    Web = 4,
}

impl DeviceType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => DeviceType::Phone,
            2 => DeviceType::Tablet,
            3 => DeviceType::Desktop,
            4 => DeviceType::Web,
            _ => return None,
        })
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "phone" | "ios" | "android" => DeviceType::Phone,
            "tablet" | "pad" => DeviceType::Tablet,
            "desktop" | "pc" => DeviceType::Desktop,
            "web" | "h5" => DeviceType::Web,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_packs_fields() {
        let c = ConnId::new(7, 3, 0xdead_beef);
        assert_eq!((c.gate(), c.core(), c.serial()), (7, 3, 0xdead_beef));
    }

    #[test]
    fn device_type_round_trips() {
        for v in 0..=255u8 {
            if let Some(d) = DeviceType::from_u8(v) {
                assert_eq!(d as u8, v);
            }
        }
        assert_eq!(DeviceType::parse("ios"), Some(DeviceType::Phone));
        assert_eq!(DeviceType::parse("fridge"), None);
    }
}
