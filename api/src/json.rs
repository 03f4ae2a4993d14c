//! Request bodies of the JSON endpoints and their validation.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Most users one `POST /v1/messages` may address in `to_users`.
pub const MAX_RECIPIENTS: usize = 1000;
/// Most users in one member list of the group endpoints (create, add, remove).
pub const MAX_LIST_LEN: usize = im_shared::proto::MAX_GROUP_MEMBERS;
/// Largest message body (after base64 decoding), in bytes: it must fit in one protocol frame.
pub const MAX_MESSAGE_BODY: usize = 60 * 1024;
/// Longest lifetime of a token from `POST /v1/tokens` (30 days).
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// Lifetime of a token when `ttl_secs` is not given (1 hour).
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// A u64 id: a JSON number, or a decimal string (for clients whose JSON numbers are doubles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Id(pub u64);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an unsigned 64-bit integer (a number or a decimal string)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                u64::try_from(v)
                    .map(Id)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                v.parse()
                    .map(Id)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// An optional field that may be absent but not `null`: the fields whose "exactly one of" rules
/// (`to_users`/`to_group`, `body`/`body_base64`) look at presence, as docs/openapi.yaml states.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `POST /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendReq {
    pub from: Id,
    #[serde(default, deserialize_with = "present")]
    pub to_users: Option<Vec<Id>>,
    #[serde(default, deserialize_with = "present")]
    pub to_group: Option<Id>,
    #[serde(default, deserialize_with = "present")]
    pub body: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub body_base64: Option<String>,
    /// `null` is the same as absent (as for every other optional field).
    #[serde(default)]
    pub request_id: Option<Id>,
    /// With `to_group`: members mentioned (0 = `@all`), at most [`MAX_MENTIONS`].
    #[serde(default, deserialize_with = "present")]
    pub mentions: Option<Vec<Id>>,
}

/// Most `mentions` of one `POST /v1/messages` (the protocol's limit for one post).
pub const MAX_MENTIONS: usize = im_shared::proto::MAX_MENTIONS;

/// `POST /v1/groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateGroupReq {
    pub owner: Id,
    pub name: String,
    #[serde(default)]
    pub members: Vec<Id>,
    /// Idempotency key (optional): a retry with the same owner and `client_id` answers the
    /// group the first call created.
    #[serde(default)]
    pub client_id: Option<Id>,
}

/// `POST /v1/groups/{id}/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddMembersReq {
    pub add: Vec<Id>,
}

/// `DELETE /v1/groups/{id}/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RemoveMembersReq {
    pub remove: Vec<Id>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenReq {
    pub uid: Id,
    #[serde(default)]
    pub ttl_secs: Option<Id>,
}

/// Why a list of user ids is refused (the text is the `invalid_argument` message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListError {
    #[error("`{0}` must not be empty")]
    Empty(String),
    #[error("`{field}` has {len} entries; at most {max} are allowed per request")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("`{0}` contains user id 0, which is never valid")]
    Zero(String),
}

/// Checks a list of user ids (`field` names it in messages): not empty unless `allow_empty`, at
/// most `max`, no 0; duplicates are dropped keeping the first occurrence.
pub(crate) fn user_list(
    field: &str,
    ids: &[Id],
    max: usize,
    allow_empty: bool,
) -> Result<Vec<u64>, ListError> {
    if ids.is_empty() && !allow_empty {
        return Err(ListError::Empty(field.to_owned()));
    }
    if ids.len() > max {
        return Err(ListError::TooLong {
            field: field.to_owned(),
            len: ids.len(),
            max,
        });
    }
    if ids.iter().any(|i| i.0 == 0) {
        return Err(ListError::Zero(field.to_owned()));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    Ok(ids
        .iter()
        .map(|i| i.0)
        .filter(|u| seen.insert(*u))
        .collect())
}

/// Decodes standard base64 (RFC 4648 §4, padding optional, no whitespace); also accepts the
/// URL-safe alphabet.
pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    im_shared::b64::decode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("AP8=").unwrap(), [0, 255]);
        assert_eq!(base64_decode("AP-_").unwrap(), [0, 255, 191]);
        assert_eq!(base64_decode("AP+/").unwrap(), [0, 255, 191]);
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("YR==").is_none());
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("aGk*").is_none());
        assert!(base64_decode("aG=").is_none());
        assert!(base64_decode("aGk=aGk=").is_none());
    }

    #[test]
    fn ids() {
        let v: Vec<Id> = serde_json::from_str(r#"[1, "2", 18446744073709551615]"#).unwrap();
        assert_eq!(v, [Id(1), Id(2), Id(u64::MAX)]);
        for bad in [
            "-1",
            "1.5",
            r#""x""#,
            r#""""#,
            r#""-3""#,
            "18446744073709551616",
            "null",
        ] {
            assert!(serde_json::from_str::<Id>(bad).is_err(), "{bad}");
        }
    }
}
