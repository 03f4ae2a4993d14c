//! Request signatures of the business endpoints.
//!
//! ```text
//! X-IM-Key:       <key id>
//! X-IM-Timestamp: <unix seconds>
//! X-IM-Signature: hex(HMAC-SHA256(secret, METHOD "\n" path_and_query "\n" timestamp "\n" hex(SHA-256(body))))
//! ```

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Header naming the key id.
pub const HEADER_KEY: &str = "x-im-key";
/// Header carrying the request time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "x-im-timestamp";
/// Header carrying the lowercase hex HMAC-SHA256 signature.
pub const HEADER_SIGNATURE: &str = "x-im-signature";

/// The `X-IM-Signature` of a request: lowercase hex HMAC-SHA256 keyed with `secret` over
/// `METHOD + "\n" + path_and_query + "\n" + timestamp + "\n" + hex(SHA-256(body))`.
///
/// `method` is the upper-case HTTP method, `path_and_query` the request target exactly as sent
/// (e.g. `/v1/groups/7` or `/v1/x?a=1`), `timestamp` the value of `X-IM-Timestamp`.
pub fn sign(
    secret: &str,
    method: &str,
    path_and_query: &str,
    timestamp: u64,
    body: &[u8],
) -> String {
    hex(&mac(
        secret.as_bytes(),
        method,
        path_and_query,
        &timestamp.to_string(),
        body,
    )
    .finalize()
    .into_bytes())
}

fn mac(
    secret: &[u8],
    method: &str,
    path_and_query: &str,
    timestamp: &str,
    body: &[u8],
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key size");
    m.update(method.as_bytes());
    m.update(b"\n");
    m.update(path_and_query.as_bytes());
    m.update(b"\n");
    m.update(timestamp.as_bytes());
    m.update(b"\n");
    m.update(hex(&Sha256::digest(body)).as_bytes());
    m
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Why a signed request was refused (all answered `401`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// A header is missing or not valid text.
    MissingHeader,
    /// The key id is not configured.
    UnknownKey,
    /// The timestamp is not a decimal number of seconds.
    BadTimestamp,
    /// The timestamp is further from the server clock than the allowed skew.
    Skew,
    /// The signature is not hex, or does not match.
    BadSignature,
}

impl AuthFailure {
    pub(crate) const ALL: [AuthFailure; 5] = [
        AuthFailure::MissingHeader,
        AuthFailure::UnknownKey,
        AuthFailure::BadTimestamp,
        AuthFailure::Skew,
        AuthFailure::BadSignature,
    ];

    /// The `error.code` of the response and the `reason` label of the metric.
    pub(crate) fn code(self) -> &'static str {
        match self {
            AuthFailure::MissingHeader => "missing_auth",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadTimestamp => "bad_timestamp",
            AuthFailure::Skew => "timestamp_skew",
            AuthFailure::BadSignature => "bad_signature",
        }
    }
}

/// The auth headers of one request, as received.
pub(crate) struct Credentials<'a> {
    pub key: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Checks a request's credentials against `keys` at `now_secs`; returns the key id on success
/// and a readable message with the failure otherwise.
pub(crate) fn verify<'a>(
    keys: &BTreeMap<String, String>,
    max_skew_secs: u64,
    now_secs: u64,
    creds: &Credentials<'a>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> Result<&'a str, (AuthFailure, String)> {
    let (Some(key), Some(ts), Some(sig)) = (creds.key, creds.timestamp, creds.signature) else {
        let missing: Vec<&str> = [
            ("X-IM-Key", creds.key.is_none()),
            ("X-IM-Timestamp", creds.timestamp.is_none()),
            ("X-IM-Signature", creds.signature.is_none()),
        ]
        .into_iter()
        .filter_map(|(h, m)| m.then_some(h))
        .collect();
        return Err((
            AuthFailure::MissingHeader,
            format!("missing or invalid header(s): {}", missing.join(", ")),
        ));
    };
    let Some(secret) = keys.get(key) else {
        return Err((
            AuthFailure::UnknownKey,
            format!("unknown API key id {key:?}"),
        ));
    };
    let Some(t) = (!ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit()))
        .then(|| ts.parse::<u64>().ok())
        .flatten()
    else {
        return Err((
            AuthFailure::BadTimestamp,
            "X-IM-Timestamp must be Unix time in whole seconds".into(),
        ));
    };
    if t.abs_diff(now_secs) > max_skew_secs {
        return Err((
            AuthFailure::Skew,
            format!(
                "X-IM-Timestamp {t} is {}s from the server clock ({now_secs}); at most {max_skew_secs}s allowed",
                t.abs_diff(now_secs)
            ),
        ));
    }
    let bad_sig = || {
        (
            AuthFailure::BadSignature,
            "X-IM-Signature does not match the request (see docs/API.md for the string to sign)"
                .to_string(),
        )
    };
    let sig = unhex(sig).ok_or_else(bad_sig)?;
    mac(secret.as_bytes(), method, path_and_query, ts, body)
        .verify_slice(&sig)
        .map_err(|_| bad_sig())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // Computed independently with `openssl dgst -sha256 -hmac` (see docs/API.md).
        let body = br#"{"from":1,"to_users":[2],"body":"hi"}"#;
        let s = sign("s3cret", "POST", "/v1/messages", 1_700_000_000, body);
        assert_eq!(
            s,
            "bf48d4e25582901b595e3b5811c510b68b1016a467a39591f2e02cd75934febd"
        );
        let keys = BTreeMap::from([("k1".to_string(), "s3cret".to_string())]);
        let creds = Credentials {
            key: Some("k1"),
            timestamp: Some("1700000000"),
            signature: Some(&s),
        };
        assert_eq!(
            verify(
                &keys,
                300,
                1_700_000_100,
                &creds,
                "POST",
                "/v1/messages",
                body
            ),
            Ok("k1")
        );
        assert_eq!(
            verify(
                &keys,
                300,
                1_700_000_100,
                &creds,
                "POST",
                "/v1/messages",
                b"{}"
            )
            .unwrap_err()
            .0,
            AuthFailure::BadSignature
        );
    }

    #[test]
    fn hex_roundtrip() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00ABff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
