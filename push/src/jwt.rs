//! Compact JWS (JWT) signing with ring: ES256 for the APNs provider token, RS256 for the FCM
//! service-account assertion; plus the base64url and PEM helpers they need.

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};

/// Base64url without padding (RFC 7515 §2).
pub fn b64url(data: &[u8]) -> String {
    im_shared::b64::encode_url(data)
}

/// Decodes standard or url-safe base64, with or without padding; ASCII whitespace is skipped
/// (PEM bodies). `None` on any other character or a dangling bit.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    im_shared::b64::decode(&compact)
}

/// Standard base64 with padding.
pub fn b64_std(data: &[u8]) -> String {
    im_shared::b64::encode_std(data)
}

/// The DER bytes of the first PEM block labelled `label` (e.g. `PRIVATE KEY`).
pub fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    b64_decode(&pem[start..stop])
}

/// `b64url(header) . b64url(claims)`.
pub fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let h = serde_json::to_vec(header).expect("a JSON value serializes");
    let c = serde_json::to_vec(claims).expect("a JSON value serializes");
    format!("{}.{}", b64url(&h), b64url(&c))
}

/// Why a key could not be loaded or a JWT not signed.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// No PEM block with one of the expected labels, or its base64 is invalid.
    #[error("no `-----BEGIN {0}-----` PEM block with valid base64")]
    NoPemBlock(&'static str),
    /// The DER is not a key of the expected kind (ring's reason follows).
    #[error("not {expected}: {reason}")]
    KeyRejected {
        expected: &'static str,
        reason: ring::error::KeyRejected,
    },
    /// ring refused to sign (it does not say why).
    #[error("{0} signing failed")]
    Sign(&'static str),
}

/// A P-256 key signing ES256 JWTs.
pub struct Es256Key {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Es256Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Es256Key(..)")
    }
}

impl Es256Key {
    /// From a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as in Apple's `.p8` files). The
    /// PKCS#8 must carry the public key (Apple's and OpenSSL's do).
    pub fn from_pem(pem: &str) -> Result<Self, JwtError> {
        let der = pem_block(pem, "PRIVATE KEY").ok_or(JwtError::NoPemBlock("PRIVATE KEY"))?;
        Self::from_pkcs8(&der)
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|reason| JwtError::KeyRejected {
                expected: "a PKCS#8 P-256 private key (with public key)",
                reason,
            })?;
        Ok(Es256Key { key, rng })
    }

    /// The uncompressed public point (65 bytes), for verification.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// The signed compact JWT: `input . b64url(r || s)`.
    pub fn sign(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, JwtError> {
        let input = signing_input(header, claims);
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| JwtError::Sign("ES256"))?;
        Ok(format!("{input}.{}", b64url(sig.as_ref())))
    }
}

/// An RSA key signing RS256 (PKCS#1 v1.5, SHA-256) JWTs.
pub struct Rs256Key {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Rs256Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rs256Key(..)")
    }
}

impl Rs256Key {
    /// From a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as in Google service-account files)
    /// or a PKCS#1 PEM (`-----BEGIN RSA PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<Self, JwtError> {
        let key = if let Some(der) = pem_block(pem, "PRIVATE KEY") {
            RsaKeyPair::from_pkcs8(&der)
        } else if let Some(der) = pem_block(pem, "RSA PRIVATE KEY") {
            RsaKeyPair::from_der(&der)
        } else {
            return Err(JwtError::NoPemBlock("PRIVATE KEY` or `RSA PRIVATE KEY"));
        }
        .map_err(|reason| JwtError::KeyRejected {
            expected: "an RSA private key ring accepts (2048..=4096 bits)",
            reason,
        })?;
        Ok(Rs256Key {
            key,
            rng: SystemRandom::new(),
        })
    }

    /// The signed compact JWT: `input . b64url(signature)`.
    pub fn sign(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, JwtError> {
        let input = signing_input(header, claims);
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &self.rng,
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| JwtError::Sign("RS256"))?;
        Ok(format!("{input}.{}", b64url(&sig)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_known_vectors() {
        // RFC 4648 §10.
        for (plain, std) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64_std(plain.as_bytes()), std);
            assert_eq!(b64url(plain.as_bytes()), std.trim_end_matches('='));
            assert_eq!(b64_decode(std).unwrap(), plain.as_bytes());
            assert_eq!(
                b64_decode(std.trim_end_matches('=')).unwrap(),
                plain.as_bytes()
            );
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(b64_decode(&b64url(&all)).unwrap(), all);
        assert_eq!(b64_decode(&b64_std(&all)).unwrap(), all);
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert!(b64_decode("Zm9v!").is_none());
        assert!(b64_decode("Zg=x").is_none());
        assert!(b64_decode("Zh").is_none(), "non-zero dangling bits");
        assert!(b64_decode("Z").is_none());
        assert_eq!(b64_decode("Zm9v\n YmFy\r\n").unwrap(), b"foobar");
    }

    #[test]
    fn pem_blocks() {
        let pem = "junk\n-----BEGIN PRIVATE KEY-----\nZm9v\nYmFy\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_block(pem, "PRIVATE KEY").unwrap(), b"foobar");
        assert!(pem_block(pem, "RSA PRIVATE KEY").is_none());
        assert!(pem_block("-----BEGIN PRIVATE KEY-----\nZm9v", "PRIVATE KEY").is_none());
    }

    #[test]
    fn es256_signature_verifies() {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64_std(doc.as_ref())
        );
        let key = Es256Key::from_pem(&pem).unwrap();
        let jwt = key
            .sign(
                &serde_json::json!({"alg": "ES256", "kid": "K"}),
                &serde_json::json!({"iss": "T", "iat": 1}),
            )
            .unwrap();
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let sig = b64_decode(sig).unwrap();
        assert_eq!(sig.len(), 64, "r || s, fixed width");
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, key.public_key())
            .verify(input.as_bytes(), &sig)
            .unwrap();
        assert!(Es256Key::from_pem("nope").is_err());
        assert!(Es256Key::from_pkcs8(b"garbage").is_err());
    }
}
