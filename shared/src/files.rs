//! File messages: the typed body that references a stored file ([`FileRef`]), and the signatures
//! of the file service ([`FileKeys`]): the file key a message must carry, upload tickets and
//! expiring download URLs. Layouts and rules: docs/PROTOCOL.md, "File messages".
//!
//! A message body whose first byte is [`TYPED_BODY`] (0xFF, never the first byte of UTF-8 text)
//! is typed: the next byte says what follows. Kinds 1–4 are file references; other kinds are
//! refused. Any other body is opaque to the server, as before.
//!
//! The server checks a file reference when it is sent: its key must be
//! HMAC-SHA256(secret, "im-file-key" ‖ sha256)[..16], which the file service hands out only to
//! the client that uploaded the bytes (and a message passes on to its recipients). Knowing a
//! file's hash is therefore not enough to send it, or to fetch it.

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::UserId;
use crate::wire::{put_bytes, put_string, BodyError, Reader};

/// First byte of a typed message body.
pub const TYPED_BODY: u8 = 0xFF;
/// Largest inline thumbnail (image preview, video poster) in a file message.
pub const MAX_THUMB: usize = 8 * 1024;
/// Longest MIME type and file name, in bytes.
pub const MAX_MIME_LEN: usize = 127;
pub const MAX_FILE_NAME_LEN: usize = 255;

/// What a file message shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FileKind {
    /// A picture: `width`, `height`, an inline `thumb` (≤ 8 KiB, e.g. a tiny JPEG).
    Image = 1,
    /// A voice clip: `duration_ms`.
    Voice = 2,
    /// A video: `duration_ms`, `width`, `height`, a poster frame in `thumb`.
    Video = 3,
    /// Any document: `name`, `size`, `mime`.
    File = 4,
}

impl FileKind {
    pub fn from_u8(v: u8) -> Option<FileKind> {
        Some(match v {
            1 => FileKind::Image,
            2 => FileKind::Voice,
            3 => FileKind::Video,
            4 => FileKind::File,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FileKind::Image => "image",
            FileKind::Voice => "voice",
            FileKind::Video => "video",
            FileKind::File => "file",
        }
    }

    /// The MIME top-level types a file of this kind may declare (`File`: any).
    fn mime_ok(self, mime: &str) -> bool {
        let top = mime.split('/').next().unwrap_or("");
        match self {
            FileKind::Image => top == "image",
            FileKind::Voice => top == "audio",
            FileKind::Video => top == "video",
            FileKind::File => true,
        }
    }
}

/// A message body that references a stored file:
/// `0xFF kind:u8 sha256:[32] size:u64 key:[16] mime:str name:str width:u32 height:u32
/// duration_ms:u32 thumb:bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub kind: FileKind,
    pub sha256: [u8; 32],
    pub size: u64,
    /// The file key the uploader got from the file service.
    pub key: [u8; 16],
    pub mime: String,
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub duration_ms: u32,
    pub thumb: Bytes,
}

impl FileRef {
    pub fn to_body(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(
            2 + 32 + 8 + 16 + 4 + self.mime.len() + self.name.len() + 16 + self.thumb.len(),
        );
        b.put_u8(TYPED_BODY);
        b.put_u8(self.kind as u8);
        b.put_slice(&self.sha256);
        b.put_u64(self.size);
        b.put_slice(&self.key);
        put_string(&mut b, &self.mime);
        put_string(&mut b, &self.name);
        b.put_u32(self.width);
        b.put_u32(self.height);
        b.put_u32(self.duration_ms);
        put_bytes(&mut b, &self.thumb);
        b.freeze()
    }

    /// `Ok(None)`: not a typed body (plain text or opaque bytes). `Err`: a typed body that is
    /// not a valid file reference (the server refuses it).
    pub fn from_body(body: &Bytes) -> Result<Option<FileRef>, String> {
        if body.first() != Some(&TYPED_BODY) {
            return Ok(None);
        }
        let mut r = Reader::new(body.slice(1..));
        let bad = |e: BodyError| format!("file message: {e}");
        let k = r.u8("kind").map_err(bad)?;
        let kind = FileKind::from_u8(k).ok_or_else(|| {
            format!("typed body of unknown kind {k} (1 image, 2 voice, 3 video, 4 file)")
        })?;
        let mut sha256 = [0u8; 32];
        for b in &mut sha256 {
            *b = r.u8("sha256").map_err(bad)?;
        }
        let size = r.u64("size").map_err(bad)?;
        let mut key = [0u8; 16];
        for b in &mut key {
            *b = r.u8("key").map_err(bad)?;
        }
        let f = FileRef {
            kind,
            sha256,
            size,
            key,
            mime: r.string("mime").map_err(bad)?,
            name: r.string("name").map_err(bad)?,
            width: r.u32("width").map_err(bad)?,
            height: r.u32("height").map_err(bad)?,
            duration_ms: r.u32("duration_ms").map_err(bad)?,
            thumb: r.bytes("thumb").map_err(bad)?,
        };
        f.check_fields()?;
        Ok(Some(f))
    }

    /// The rules a file reference obeys apart from its key (docs/PROTOCOL.md).
    pub fn check_fields(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("file message: size 0".into());
        }
        check_mime(self.kind, &self.mime)?;
        if self.name.len() > MAX_FILE_NAME_LEN || self.name.chars().any(char::is_control) {
            return Err(format!(
                "file message: name of at most {MAX_FILE_NAME_LEN} bytes without control characters"
            ));
        }
        if self.thumb.len() > MAX_THUMB {
            return Err(format!(
                "file message: thumbnail of {} bytes, at most {MAX_THUMB}",
                self.thumb.len()
            ));
        }
        Ok(())
    }
}

/// `type/subtype`, printable ASCII without spaces, at most [`MAX_MIME_LEN`] bytes, and of the
/// kind's top-level type (`image/…` for an image, `audio/…` for voice, `video/…` for video).
pub fn check_mime(kind: FileKind, mime: &str) -> Result<(), String> {
    let well_formed = mime.len() <= MAX_MIME_LEN
        && mime
            .split_once('/')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        && mime
            .bytes()
            .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'\\');
    if !well_formed {
        return Err(format!(
            "file message: MIME type {mime:?} is not type/subtype (printable ASCII, at most {MAX_MIME_LEN} bytes)"
        ));
    }
    if !kind.mime_ok(mime) {
        return Err(format!(
            "file message: a {} cannot have MIME type {mime}",
            kind.name()
        ));
    }
    Ok(())
}

/// Why a ticket or a download URL was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("malformed")]
    Malformed,
    #[error("signature does not match")]
    BadSignature,
    #[error("expired")]
    Expired,
}

/// An upload ticket's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub uid: UserId,
    pub sha256: [u8; 32],
    pub size: u64,
    pub expires_ms: u64,
}

/// The file service's signatures, from one secret shared by every logic node.
#[derive(Clone)]
pub struct FileKeys {
    secret: Vec<u8>,
}

impl std::fmt::Debug for FileKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKeys { secret: <redacted> }")
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// 64 hex characters (either case) → 32 bytes.
pub fn sha256_from_hex(s: &str) -> Option<[u8; 32]> {
    unhex::<32>(s)
}

/// 32 hex characters → a file key.
pub fn key_from_hex(s: &str) -> Option<[u8; 16]> {
    unhex::<16>(s)
}

impl FileKeys {
    pub fn new(secret: impl Into<Vec<u8>>) -> FileKeys {
        FileKeys {
            secret: secret.into(),
        }
    }

    fn mac(&self, domain: &str, payload: &[u8]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key size");
        m.update(domain.as_bytes());
        m.update(&[0]);
        m.update(payload);
        m
    }

    /// The key of a stored file: what a message must carry to reference it.
    pub fn file_key(&self, sha256: &[u8; 32]) -> [u8; 16] {
        let full = self.mac("im-file-key", sha256).finalize().into_bytes();
        let mut k = [0u8; 16];
        k.copy_from_slice(&full[..16]);
        k
    }

    /// Whether `key` is the file's key (constant time).
    pub fn key_ok(&self, sha256: &[u8; 32], key: &[u8; 16]) -> bool {
        self.mac("im-file-key", sha256)
            .verify_truncated_left(key)
            .is_ok()
    }

    /// `<uid>.<sha256 hex>.<size>.<expires_ms>.<signature hex>`.
    pub fn ticket(&self, t: &Ticket) -> String {
        let payload = format!("{}.{}.{}.{}", t.uid.0, hex(&t.sha256), t.size, t.expires_ms);
        let sig = self
            .mac("im-upload", payload.as_bytes())
            .finalize()
            .into_bytes();
        format!("{payload}.{}", hex(&sig))
    }

    pub fn check_ticket(&self, s: &str, now_ms: u64) -> Result<Ticket, SignedError> {
        let (payload, sig) = s.rsplit_once('.').ok_or(SignedError::Malformed)?;
        let sig = unhex::<32>(sig).ok_or(SignedError::Malformed)?;
        let mut it = payload.split('.');
        let (Some(uid), Some(file), Some(size), Some(exp), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(SignedError::Malformed);
        };
        let t = Ticket {
            uid: UserId(uid.parse().map_err(|_| SignedError::Malformed)?),
            sha256: unhex::<32>(file).ok_or(SignedError::Malformed)?,
            size: size.parse().map_err(|_| SignedError::Malformed)?,
            expires_ms: exp.parse().map_err(|_| SignedError::Malformed)?,
        };
        self.mac("im-upload", payload.as_bytes())
            .verify_slice(&sig)
            .map_err(|_| SignedError::BadSignature)?;
        if now_ms > t.expires_ms {
            return Err(SignedError::Expired);
        }
        Ok(t)
    }

    fn download_payload(sha256: &[u8; 32], uid: UserId, expires_ms: u64, mime: &str) -> String {
        format!("{}\n{}\n{}\n{}", hex(sha256), uid.0, expires_ms, mime)
    }

    /// The query string of a download URL of `sha256` for `uid`, valid until `expires_ms`,
    /// served as `mime`: `u=<uid>&e=<expires_ms>&m=<mime, %-encoded>&s=<signature hex>`.
    pub fn download_query(
        &self,
        sha256: &[u8; 32],
        uid: UserId,
        expires_ms: u64,
        mime: &str,
    ) -> String {
        let payload = Self::download_payload(sha256, uid, expires_ms, mime);
        let sig = self
            .mac("im-download", payload.as_bytes())
            .finalize()
            .into_bytes();
        format!(
            "u={}&e={expires_ms}&m={}&s={}",
            uid.0,
            crate::url::percent_encode(mime),
            hex(&sig)
        )
    }

    /// Checks a download URL's query for `sha256`; returns the MIME type to serve.
    pub fn check_download(
        &self,
        sha256: &[u8; 32],
        query: &str,
        now_ms: u64,
    ) -> Result<String, SignedError> {
        let (mut u, mut e, mut m, mut s) = (None, None, None, None);
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let slot = match k {
                "u" => &mut u,
                "e" => &mut e,
                "m" => &mut m,
                "s" => &mut s,
                _ => continue,
            };
            if slot.is_some() {
                return Err(SignedError::Malformed);
            }
            *slot = Some(v);
        }
        let (Some(u), Some(e), Some(m), Some(s)) = (u, e, m, s) else {
            return Err(SignedError::Malformed);
        };
        let uid = UserId(u.parse().map_err(|_| SignedError::Malformed)?);
        let expires_ms: u64 = e.parse().map_err(|_| SignedError::Malformed)?;
        let mime = crate::url::percent_decode(m).ok_or(SignedError::Malformed)?;
        let sig = unhex::<32>(s).ok_or(SignedError::Malformed)?;
        let payload = Self::download_payload(sha256, uid, expires_ms, &mime);
        self.mac("im-download", payload.as_bytes())
            .verify_slice(&sig)
            .map_err(|_| SignedError::BadSignature)?;
        if now_ms > expires_ms {
            return Err(SignedError::Expired);
        }
        Ok(mime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> FileRef {
        FileRef {
            kind: FileKind::Image,
            sha256: [7; 32],
            size: 1234,
            key: [9; 16],
            mime: "image/png".into(),
            name: "cat.png".into(),
            width: 640,
            height: 480,
            duration_ms: 0,
            thumb: Bytes::from_static(b"tiny"),
        }
    }

    #[test]
    fn a_file_reference_round_trips_and_text_is_not_typed() {
        let f = image();
        let body = f.to_body();
        assert_eq!(body[0], TYPED_BODY);
        assert_eq!(FileRef::from_body(&body).unwrap(), Some(f));
        assert_eq!(
            FileRef::from_body(&Bytes::from_static(b"hello")).unwrap(),
            None
        );
        assert_eq!(FileRef::from_body(&Bytes::new()).unwrap(), None);
    }

    #[test]
    fn bad_typed_bodies_are_refused_with_the_reason() {
        let err = |f: FileRef| FileRef::from_body(&f.to_body()).unwrap_err();
        assert!(FileRef::from_body(&Bytes::from_static(&[0xFF, 9]))
            .unwrap_err()
            .contains("unknown kind 9"));
        assert!(FileRef::from_body(&Bytes::from_static(&[0xFF, 1, 0]))
            .unwrap_err()
            .contains("truncated"));
        let mut f = image();
        f.mime = "audio/ogg".into();
        assert!(err(f).contains("cannot have MIME type"));
        let mut f = image();
        f.mime = "image".into();
        assert!(err(f).contains("type/subtype"));
        let mut f = image();
        f.thumb = Bytes::from(vec![0; MAX_THUMB + 1]);
        assert!(err(f).contains("thumbnail"));
        let mut f = image();
        f.name = "a\nb".into();
        assert!(err(f).contains("name"));
        let mut f = image();
        f.size = 0;
        assert!(err(f).contains("size 0"));
        let mut f = image();
        f.kind = FileKind::File;
        f.mime = "application/pdf".into();
        assert_eq!(FileRef::from_body(&f.to_body()).unwrap(), Some(f));
    }

    #[test]
    fn keys_tickets_and_urls_verify_and_refuse_forgeries_and_expiry() {
        let k = FileKeys::new(b"secret".to_vec());
        let other = FileKeys::new(b"other".to_vec());
        let f = [3u8; 32];
        let key = k.file_key(&f);
        assert!(k.key_ok(&f, &key));
        assert!(!k.key_ok(&[4u8; 32], &key));
        assert!(!other.key_ok(&f, &key));

        let t = Ticket {
            uid: UserId(5),
            sha256: f,
            size: 10,
            expires_ms: 1_000,
        };
        let s = k.ticket(&t);
        assert_eq!(k.check_ticket(&s, 999), Ok(t));
        assert_eq!(k.check_ticket(&s, 1_001), Err(SignedError::Expired));
        assert_eq!(other.check_ticket(&s, 0), Err(SignedError::BadSignature));
        let forged = s.replacen("5.", "6.", 1);
        assert_eq!(k.check_ticket(&forged, 0), Err(SignedError::BadSignature));
        assert_eq!(k.check_ticket("x.y", 0), Err(SignedError::Malformed));

        let q = k.download_query(&f, UserId(5), 2_000, "image/svg+xml");
        assert!(q.contains("m=image%2Fsvg%2Bxml"), "{q}");
        assert_eq!(
            k.check_download(&f, &q, 1_999).as_deref(),
            Ok("image/svg+xml")
        );
        assert_eq!(k.check_download(&f, &q, 2_001), Err(SignedError::Expired));
        assert_eq!(
            k.check_download(&[4u8; 32], &q, 0),
            Err(SignedError::BadSignature)
        );
        let longer = q.replace("e=2000", "e=9000");
        assert_eq!(
            k.check_download(&f, &longer, 0),
            Err(SignedError::BadSignature)
        );
        let html = q.replace("m=image%2Fsvg%2Bxml", "m=text%2Fhtml");
        assert_eq!(
            k.check_download(&f, &html, 0),
            Err(SignedError::BadSignature)
        );
        assert_eq!(
            k.check_download(&f, &format!("{q}&u=1"), 0),
            Err(SignedError::Malformed)
        );
        assert_eq!(k.check_download(&f, "u=5", 0), Err(SignedError::Malformed));
    }
}
