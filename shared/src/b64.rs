//! Base64 as the HTTP API, the c2s webhooks and the push providers use it (the `base64` crate).

use base64::alphabet;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Standard alphabet with padding (RFC 4648 §4).
pub fn encode_std(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// URL-safe alphabet without padding (RFC 4648 §5, JWS RFC 7515 §2).
pub fn encode_url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Decodes the standard or the URL-safe alphabet, canonical padding or none; refuses
/// non-canonical trailing bits and any other character.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    STD_ANY_PAD
        .decode(s)
        .or_else(|_| URL_ANY_PAD.decode(s))
        .ok()
}
