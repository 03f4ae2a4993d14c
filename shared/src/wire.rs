//! Field-level helpers for body layouts: big-endian integers, `u16`-length strings and
//! `u32`-length byte strings. The reader never panics: every read checks the remaining length.

use bytes::{Buf, BufMut, Bytes};

/// Why a body could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body truncated while reading {0}")]
    Truncated(&'static str),
    #[error("field {0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("field {field} has invalid value {value}")]
    Invalid { field: &'static str, value: u64 },
}

/// Reads fields from a body. Trailing bytes after the known fields are ignored, so a newer peer
/// may append fields (forward compatibility).
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }
    fn need(&self, n: usize, what: &'static str) -> Result<(), BodyError> {
        if self.buf.remaining() < n {
            Err(BodyError::Truncated(what))
        } else {
            Ok(())
        }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, BodyError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, BodyError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, BodyError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, BodyError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    /// `u16` length, then that many UTF-8 bytes.
    pub fn string(&mut self, what: &'static str) -> Result<String, BodyError> {
        let n = self.u16(what)? as usize;
        self.need(n, what)?;
        let b = self.buf.split_to(n);
        String::from_utf8(b.to_vec()).map_err(|_| BodyError::Utf8(what))
    }
    /// `u32` length, then that many bytes (zero copy).
    pub fn bytes(&mut self, what: &'static str) -> Result<Bytes, BodyError> {
        let n = self.u32(what)? as usize;
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
}

pub(crate) fn put_string(out: &mut impl BufMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

pub(crate) fn put_bytes(out: &mut impl BufMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

pub(crate) fn string_len(s: &str) -> usize {
    2 + s.len().min(u16::MAX as usize)
}
