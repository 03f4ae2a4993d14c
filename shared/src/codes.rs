//! Wire error codes and kickout reasons (a protocol enum, separate from internal errors).

/// Result / error code carried by `LoginResult`, `SendAck` and `Error` frames (u16, big-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    Ok = 0,
    /// The frame header or body could not be parsed. Connection is closed.
    Malformed = 1,
    /// Body length above the server's maximum. Connection is closed.
    FrameTooLarge = 2,
    /// Header version not supported; the `Error` frame's message names the supported version.
    UnsupportedVersion = 3,
    /// Command byte unknown or not valid from a client. Connection is closed.
    UnknownCommand = 4,
    /// A command other than login/heartbeat before a successful login. Connection is closed.
    NotLoggedIn = 5,
    /// A second login on a connection that is already logged in. Connection stays open.
    AlreadyLoggedIn = 6,
    /// Token missing, forged or for another user. Connection is closed.
    BadToken = 10,
    /// Token signature valid but expired. Connection is closed.
    TokenExpired = 11,
    /// No login within the login deadline. Connection is closed.
    LoginTimeout = 12,
    /// Bad field value (e.g. recipient 0, empty device id). Connection stays open.
    InvalidArgument = 13,
    /// Connection idle past the heartbeat timeout. Connection is closed.
    IdleTimeout = 14,
    /// The client does not read what the server writes. Connection is closed.
    SlowConsumer = 15,
    /// Internal failure; retry with the same `client_msg_id` is safe.
    Internal = 20,
    /// Server overloaded; retry later with the same `client_msg_id`. Connection stays open.
    Overloaded = 21,
    /// A backend (logic, store) is unavailable; retry later with the same `client_msg_id`.
    Unavailable = 22,
    /// Not allowed for this user (e.g. managing a group one does not own).
    Forbidden = 40,
    /// Posting to or reading a group the user is not a member of.
    NotMember = 41,
    /// The group (or message) does not exist.
    NotFound = 42,
    /// A recall after the recall window, or of a message the user did not send.
    RecallRefused = 43,
    /// The group would exceed its member limit.
    GroupFull = 44,
    /// The change conflicts with the current state (a department that still has members or
    /// sub-departments, a move that would make a loop).
    Conflict = 45,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            0 => Ok,
            1 => Malformed,
            2 => FrameTooLarge,
            3 => UnsupportedVersion,
            4 => UnknownCommand,
            5 => NotLoggedIn,
            6 => AlreadyLoggedIn,
            10 => BadToken,
            11 => TokenExpired,
            12 => LoginTimeout,
            13 => InvalidArgument,
            14 => IdleTimeout,
            15 => SlowConsumer,
            20 => Internal,
            21 => Overloaded,
            22 => Unavailable,
            40 => Forbidden,
            41 => NotMember,
            42 => NotFound,
            43 => RecallRefused,
            44 => GroupFull,
            45 => Conflict,
            _ => return None,
        })
    }

    /// Whether resending the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal | ErrorCode::Overloaded | ErrorCode::Unavailable
        )
    }
}

/// Why the server kicked a connection out (u8 in the `Kickout` frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum KickReason {
    /// The same user logged in on another device of the same type.
    SameDeviceType = 1,
    /// The server is shutting down; reconnect elsewhere.
    ServerShutdown = 2,
    /// Kicked by an administrator.
    Admin = 3,
}

impl KickReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => KickReason::SameDeviceType,
            2 => KickReason::ServerShutdown,
            3 => KickReason::Admin,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for v in 0..=u16::from(u8::MAX) {
            if let Some(c) = ErrorCode::from_u16(v) {
                assert_eq!(c as u16, v);
            }
        }
        assert!(ErrorCode::Overloaded.is_retryable());
        assert!(!ErrorCode::BadToken.is_retryable());
    }
}
