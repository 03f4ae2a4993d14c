//! SSO tokens. Logic verifies a login token through [`TokenVerifier`], so a company SSO can plug in;
//! [`HmacTokens`] is the built-in development issuer and verifier:
//! `v1.<uid>.<expiry unix secs>.<hex HMAC-SHA256(secret, "v1.<uid>.<expiry>")>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::UserId;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token was issued for another user")]
    WrongUser,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// Checks that `token` proves `uid` at time `now_secs` (Unix seconds).
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, uid: UserId, token: &str, now_secs: u64) -> Result<(), TokenError>;
}

/// HMAC-SHA256 token issuer and verifier sharing one secret.
#[derive(Clone)]
pub struct HmacTokens {
    secret: Vec<u8>,
}

impl std::fmt::Debug for HmacTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacTokens { secret: <redacted> }")
    }
}

impl HmacTokens {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        HmacTokens {
            secret: secret.into(),
        }
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key size");
        m.update(payload.as_bytes());
        m
    }

    /// Mints a token for `uid` valid until `expires_at_secs`.
    pub fn mint(&self, uid: UserId, expires_at_secs: u64) -> String {
        let payload = format!("v1.{}.{}", uid.0, expires_at_secs);
        let sig = self.mac(&payload).finalize().into_bytes();
        let mut out = payload;
        out.push('.');
        for b in sig {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

impl TokenVerifier for HmacTokens {
    fn verify(&self, uid: UserId, token: &str, now_secs: u64) -> Result<(), TokenError> {
        let (payload, sig_hex) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut parts = payload.split('.');
        let (Some("v1"), Some(tuid), Some(exp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let tuid: u64 = tuid.parse().map_err(|_| TokenError::Malformed)?;
        let exp: u64 = exp.parse().map_err(|_| TokenError::Malformed)?;
        let sig = decode_hex(sig_hex).ok_or(TokenError::Malformed)?;
        self.mac(payload)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if tuid != uid.0 {
            return Err(TokenError::WrongUser);
        }
        if now_secs >= exp {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Current Unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_verify() {
        let t = HmacTokens::new("s3cret");
        let tok = t.mint(UserId(42), 1000);
        assert_eq!(t.verify(UserId(42), &tok, 999), Ok(()));
        assert_eq!(t.verify(UserId(42), &tok, 1000), Err(TokenError::Expired));
        assert_eq!(t.verify(UserId(43), &tok, 1), Err(TokenError::WrongUser));
        let other = HmacTokens::new("other");
        assert_eq!(
            other.verify(UserId(42), &tok, 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn forged_and_malformed() {
        let t = HmacTokens::new("s3cret");
        let tok = t.mint(UserId(42), 1000);
        // Extending the expiry without re-signing must fail.
        let forged = tok.replacen(".1000.", ".9999.", 1);
        assert_eq!(
            t.verify(UserId(42), &forged, 1),
            Err(TokenError::BadSignature)
        );
        for bad in [
            "",
            "v1",
            "v1.42.1000",
            "v2.42.1000.00",
            "v1.x.1000.00",
            "v1.42.1000.zz",
            "v1.42.1000.0",
        ] {
            assert_eq!(
                t.verify(UserId(42), bad, 1),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }
}
