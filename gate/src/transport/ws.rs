//! RFC 6455 WebSocket, server side, sans-io: the opening handshake (validation of an HTTP/1.1
//! upgrade request, `Sec-WebSocket-Accept`), a streaming frame decoder for client frames and the
//! encoders of the few frames a server sends.
//!
//! The decoder never buffers a data frame: it unmasks payload bytes as they arrive and appends
//! them to the caller's output (the protocol-v1 frame buffer), so a WebSocket connection holds no
//! more than a TCP one besides a partial frame header. Control frames (at most 125 bytes) are
//! handled once whole. No extension is negotiated, so the reserved bits must be zero.

use base64::Engine as _;
use bytes::{Buf, BytesMut};

/// Continuation, text, binary, close, ping and pong opcodes.
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close status codes the gate sends (RFC 6455 §7.4.1).
pub mod close {
    /// Normal closure (logout, kickout, idle timeout, or an echo of the client's close).
    pub const NORMAL: u16 = 1000;
    /// A WebSocket protocol violation (unmasked frame, reserved bits, bad opcode, bad lengths…).
    pub const PROTOCOL: u16 = 1002;
    /// A text message: the gate speaks binary frames only.
    pub const UNSUPPORTED: u16 = 1003;
    /// A close reason that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A protocol-v1 violation, or a refusal (login timeout, …); an `Error` frame precedes it.
    pub const POLICY: u16 = 1008;
    /// A message larger than the configured limit.
    pub const TOO_BIG: u16 = 1009;
}

/// The GUID of RFC 6455 §1.3, appended to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The subprotocol name a client may offer; the gate selects it when offered.
pub const SUBPROTOCOL: &str = "im.v1";

/// Largest control-frame payload.
const MAX_CONTROL: usize = 125;

/// A violation of the WebSocket protocol by the client: the connection is closed with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsError {
    pub code: u16,
    pub reason: &'static str,
}

impl WsError {
    const fn new(code: u16, reason: &'static str) -> WsError {
        WsError { code, reason }
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "websocket {}: {}", self.code, self.reason)
    }
}

/// A control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Control<'a> {
    Ping(&'a [u8]),
    Pong,
    /// The client started the closing handshake; `None` when it sent no status code.
    Close(Option<u16>),
}

/// Decoder state between calls.
#[derive(Debug)]
pub struct Decoder {
    /// Largest message (sum of its fragments' payloads).
    max_message: u64,
    /// The data frame whose payload is being streamed.
    cur: Option<DataFrame>,
    /// A fragmented message is in progress: only continuation (and control) frames may follow.
    in_message: bool,
    /// Payload bytes of the message in progress, before the current frame.
    msg_len: u64,
}

#[derive(Debug, Clone, Copy)]
struct DataFrame {
    remaining: u64,
    mask: [u8; 4],
    /// Offset into the mask of the next payload byte.
    pos: u8,
}

/// What [`Decoder::decode`] stopped at.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// All complete input was consumed; more is needed.
    NeedMore,
    /// A close frame was received: nothing after it is read.
    Closed(Option<u16>),
}

impl Decoder {
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message: max_message as u64,
            cur: None,
            in_message: false,
            msg_len: 0,
        }
    }

    /// Consumes frames from `input`: binary payloads are unmasked and appended to `out`, pings
    /// and pongs are passed to `on_control` (whose return value is ignored for them). A close
    /// frame ends decoding with [`Status::Closed`] and is also passed to `on_control`.
    pub fn decode(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        mut on_control: impl FnMut(Control<'_>),
    ) -> Result<Status, WsError> {
        loop {
            if let Some(cur) = &mut self.cur {
                let n = (input.len() as u64).min(cur.remaining) as usize;
                if n == 0 && cur.remaining > 0 {
                    return Ok(Status::NeedMore);
                }
                let start = out.len();
                out.extend_from_slice(&input[..n]);
                input.advance(n);
                unmask(&mut out[start..], cur.mask, cur.pos as usize);
                cur.pos = ((cur.pos as usize + n) & 3) as u8;
                cur.remaining -= n as u64;
                if cur.remaining == 0 {
                    self.cur = None;
                }
                continue;
            }
            let Some(h) = parse_header(input)? else {
                return Ok(Status::NeedMore);
            };
            if h.opcode & 0x8 != 0 {
                // Control frame: handled once complete (at most 125 bytes of payload).
                let total = h.header_len + h.len as usize;
                if input.len() < total {
                    return Ok(Status::NeedMore);
                }
                input.advance(h.header_len);
                let mut payload = [0u8; MAX_CONTROL];
                let p = &mut payload[..h.len as usize];
                p.copy_from_slice(&input[..h.len as usize]);
                input.advance(h.len as usize);
                unmask(p, h.mask, 0);
                match h.opcode {
                    OP_PING => on_control(Control::Ping(p)),
                    OP_PONG => on_control(Control::Pong),
                    _ => {
                        let code = parse_close(p)?;
                        on_control(Control::Close(code));
                        return Ok(Status::Closed(code));
                    }
                }
                continue;
            }
            // Data frame.
            match h.opcode {
                OP_TEXT => {
                    return Err(WsError::new(
                        close::UNSUPPORTED,
                        "text messages are not supported; send binary frames",
                    ))
                }
                OP_CONT if !self.in_message => {
                    return Err(WsError::new(
                        close::PROTOCOL,
                        "continuation frame without a message",
                    ))
                }
                OP_BINARY if self.in_message => {
                    return Err(WsError::new(
                        close::PROTOCOL,
                        "new message inside a fragmented one",
                    ))
                }
                _ => {}
            }
            let total = self.msg_len.saturating_add(h.len);
            if total > self.max_message {
                return Err(WsError::new(close::TOO_BIG, "message too big"));
            }
            input.advance(h.header_len);
            if h.fin {
                self.in_message = false;
                self.msg_len = 0;
            } else {
                self.in_message = true;
                self.msg_len = total;
            }
            if h.len > 0 {
                self.cur = Some(DataFrame {
                    remaining: h.len,
                    mask: h.mask,
                    pos: 0,
                });
            }
        }
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: [u8; 4],
    header_len: usize,
}

/// Parses (without consuming) a client frame header; `None` until it is complete. Every check
/// that the first two bytes allow is made as soon as they arrive.
fn parse_header(b: &[u8]) -> Result<Option<Header>, WsError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if b[0] & 0x70 != 0 {
        return Err(WsError::new(close::PROTOCOL, "reserved bits set"));
    }
    let opcode = b[0] & 0x0F;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::new(close::PROTOCOL, "unknown opcode"));
    }
    if b[1] & 0x80 == 0 {
        return Err(WsError::new(close::PROTOCOL, "client frame not masked"));
    }
    let len7 = b[1] & 0x7F;
    if opcode & 0x8 != 0 {
        if !fin {
            return Err(WsError::new(close::PROTOCOL, "fragmented control frame"));
        }
        if len7 as usize > MAX_CONTROL {
            return Err(WsError::new(close::PROTOCOL, "control frame too long"));
        }
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext + 4;
    if b.len() < header_len {
        return Ok(None);
    }
    let len = match len7 {
        126 => {
            let l = u16::from_be_bytes([b[2], b[3]]) as u64;
            if l < 126 {
                return Err(WsError::new(close::PROTOCOL, "non-minimal length"));
            }
            l
        }
        127 => {
            let l = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 {
                return Err(WsError::new(close::PROTOCOL, "length with the top bit set"));
            }
            if l <= 0xFFFF {
                return Err(WsError::new(close::PROTOCOL, "non-minimal length"));
            }
            l
        }
        l => l as u64,
    };
    let mask = b[2 + ext..header_len].try_into().expect("4 bytes");
    Ok(Some(Header {
        fin,
        opcode,
        len,
        mask,
        header_len,
    }))
}

/// Validates a close payload; returns its status code.
fn parse_close(p: &[u8]) -> Result<Option<u16>, WsError> {
    match p.len() {
        0 => Ok(None),
        1 => Err(WsError::new(close::PROTOCOL, "close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            // 1004-1006 and 1015 are reserved and never sent; 1016-2999 are unassigned.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(WsError::new(close::PROTOCOL, "invalid close code"));
            }
            if std::str::from_utf8(&p[2..]).is_err() {
                return Err(WsError::new(
                    close::INVALID_DATA,
                    "close reason is not UTF-8",
                ));
            }
            Ok(Some(code))
        }
    }
}

/// XORs `buf` with `mask`, starting at mask offset `pos`.
fn unmask(buf: &mut [u8], mask: [u8; 4], pos: usize) {
    let m = [
        mask[pos & 3],
        mask[(pos + 1) & 3],
        mask[(pos + 2) & 3],
        mask[(pos + 3) & 3],
    ];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Appends the header of an unmasked server frame.
pub fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a close frame with `code` and a (truncated) reason.
pub fn put_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut r = reason.as_bytes();
    if r.len() > MAX_CONTROL - 2 {
        let mut n = MAX_CONTROL - 2;
        while !reason.is_char_boundary(n) {
            n -= 1;
        }
        r = &r[..n];
    }
    put_header(out, OP_CLOSE, 2 + r.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(r);
}

/// Appends a pong echoing a ping's payload.
pub fn put_pong(out: &mut Vec<u8>, payload: &[u8]) {
    put_header(out, OP_PONG, payload.len());
    out.extend_from_slice(payload);
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// The answer to an upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// `101 Switching Protocols`: the response to send, then WebSocket frames.
    Accept(Vec<u8>),
    /// An HTTP error response to send before closing.
    Refuse(Vec<u8>),
}

/// Whether a request asks for a WebSocket upgrade (`Upgrade: websocket`).
pub fn wants_upgrade(req: &super::http::Request) -> bool {
    req.header("upgrade")
        .is_some_and(|v| has_token(v, "websocket"))
}

/// Validates an upgrade request (RFC 6455 §4.2.1) and builds the response. `origins`: the allowed
/// `Origin` values, empty for any.
pub fn handshake(req: &super::http::Request, origins: &[String]) -> Upgrade {
    use super::http::error_response;
    if req.method != "GET" {
        return Upgrade::Refuse(error_response(
            400,
            "Bad Request",
            "websocket upgrade must be a GET",
            &[],
        ));
    }
    if !req
        .header("connection")
        .is_some_and(|v| has_token(v, "upgrade"))
    {
        return Upgrade::Refuse(error_response(
            400,
            "Bad Request",
            "Connection: Upgrade missing",
            &[],
        ));
    }
    match req.header("sec-websocket-version") {
        None => {
            return Upgrade::Refuse(error_response(
                400,
                "Bad Request",
                "Sec-WebSocket-Version missing",
                &[("Sec-WebSocket-Version", "13")],
            ))
        }
        Some(v) if v.trim_ascii() != b"13" => {
            // RFC 6455 §4.2.2: name the version the server speaks.
            return Upgrade::Refuse(error_response(
                426,
                "Upgrade Required",
                "unsupported Sec-WebSocket-Version",
                &[("Sec-WebSocket-Version", "13")],
            ));
        }
        Some(_) => {}
    }
    let key = match req.header("sec-websocket-key") {
        Some(k) => k.trim_ascii(),
        None => {
            return Upgrade::Refuse(error_response(
                400,
                "Bad Request",
                "Sec-WebSocket-Key missing",
                &[],
            ))
        }
    };
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if decoded.map(|k| k.len()) != Ok(16) {
        return Upgrade::Refuse(error_response(
            400,
            "Bad Request",
            "Sec-WebSocket-Key is not 16 bytes in base64",
            &[],
        ));
    }
    if !origins.is_empty() {
        // Browsers always send Origin; other clients may omit it (nothing to forge there).
        if let Some(o) = req.header("origin") {
            if !origins.iter().any(|a| a.as_bytes() == o.trim_ascii()) {
                return Upgrade::Refuse(error_response(
                    403,
                    "Forbidden",
                    "origin not allowed",
                    &[],
                ));
            }
        }
    }
    let mut resp = Vec::with_capacity(160);
    resp.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    resp.extend_from_slice(b"Sec-WebSocket-Accept: ");
    resp.extend_from_slice(accept_key(key).as_bytes());
    resp.extend_from_slice(b"\r\n");
    if req
        .header("sec-websocket-protocol")
        .is_some_and(|v| has_token(v, SUBPROTOCOL))
    {
        resp.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        resp.extend_from_slice(SUBPROTOCOL.as_bytes());
        resp.extend_from_slice(b"\r\n");
    }
    resp.extend_from_slice(b"\r\n");
    Upgrade::Accept(resp)
}

/// Whether a comma-separated header value contains `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let n = payload.len();
        if n < 126 {
            out.push(0x80 | n as u8);
        } else if n <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        data: Vec<u8>,
        pings: Vec<Vec<u8>>,
        pongs: usize,
        closes: Vec<Option<u16>>,
    }

    /// Feeds `bytes` in pieces of `step` bytes.
    fn run(dec: &mut Decoder, bytes: &[u8], step: usize) -> (Seen, Result<Status, WsError>) {
        let mut seen = Seen::default();
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut last = Ok(Status::NeedMore);
        for piece in bytes.chunks(step.max(1)) {
            input.extend_from_slice(piece);
            last = dec.decode(&mut input, &mut out, |c| match c {
                Control::Ping(p) => seen.pings.push(p.to_vec()),
                Control::Pong => seen.pongs += 1,
                Control::Close(c) => seen.closes.push(c),
            });
            if !matches!(last, Ok(Status::NeedMore)) {
                break;
            }
        }
        seen.data = out.to_vec();
        (seen, last)
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn unmasks_binary_payloads_at_any_split() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let mut bytes = client_frame(true, OP_BINARY, &payload, [1, 2, 3, 4]);
        bytes.extend(client_frame(true, OP_BINARY, b"tail", [9, 8, 7, 6]));
        for step in [1, 2, 3, 5, 7, 64, 1000] {
            let mut dec = Decoder::new(1 << 20);
            let (seen, st) = run(&mut dec, &bytes, step);
            assert_eq!(st, Ok(Status::NeedMore));
            let mut want = payload.clone();
            want.extend_from_slice(b"tail");
            assert_eq!(seen.data, want, "step {step}");
        }
    }

    #[test]
    fn large_lengths_are_decoded() {
        let payload = vec![0xAB; 70_000];
        let bytes = client_frame(true, OP_BINARY, &payload, [0xFF, 0, 0x0F, 0xF0]);
        assert_eq!(bytes[1] & 0x7F, 127);
        let mut dec = Decoder::new(1 << 20);
        let (seen, _) = run(&mut dec, &bytes, 4096);
        assert_eq!(seen.data, payload);
    }

    #[test]
    fn fragments_are_reassembled_with_controls_between() {
        let mut bytes = client_frame(false, OP_BINARY, b"hel", [1, 1, 1, 1]);
        bytes.extend(client_frame(true, OP_PING, b"p", [2, 2, 2, 2]));
        bytes.extend(client_frame(false, OP_CONT, b"", [3, 3, 3, 3]));
        bytes.extend(client_frame(true, OP_CONT, b"lo", [4, 4, 4, 4]));
        bytes.extend(client_frame(true, OP_PONG, b"", [5, 5, 5, 5]));
        for step in [1, 3, 100] {
            let mut dec = Decoder::new(5);
            let (seen, st) = run(&mut dec, &bytes, step);
            assert_eq!(st, Ok(Status::NeedMore));
            assert_eq!(seen.data, b"hello");
            assert_eq!(seen.pings, vec![b"p".to_vec()]);
            assert_eq!(seen.pongs, 1);
        }
    }

    #[test]
    fn message_size_counts_all_fragments() {
        let mut bytes = client_frame(false, OP_BINARY, b"abc", [1, 2, 3, 4]);
        bytes.extend(client_frame(true, OP_CONT, b"def", [1, 2, 3, 4]));
        let mut dec = Decoder::new(5);
        let (seen, st) = run(&mut dec, &bytes, 100);
        assert_eq!(st.unwrap_err().code, close::TOO_BIG);
        assert_eq!(seen.data, b"abc");
        // Detected from the header alone, before the payload arrives.
        let big = client_frame(true, OP_BINARY, &[0; 200], [0; 4]);
        let mut dec = Decoder::new(100);
        let (_, st) = run(&mut dec, &big[..8], 100);
        assert_eq!(st.unwrap_err().code, close::TOO_BIG);
        // A message exactly at the limit passes.
        let mut dec = Decoder::new(6);
        let mut ok = client_frame(false, OP_BINARY, b"abc", [1, 2, 3, 4]);
        ok.extend(client_frame(true, OP_CONT, b"def", [1, 2, 3, 4]));
        ok.extend(client_frame(true, OP_BINARY, b"ghijkl", [1, 2, 3, 4]));
        let (seen, st) = run(&mut dec, &ok, 100);
        assert_eq!(st, Ok(Status::NeedMore));
        assert_eq!(seen.data, b"abcdefghijkl");
    }

    #[test]
    fn violations_have_their_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // unmasked
            (vec![0x82, 0x01, b'x'], close::PROTOCOL),
            // reserved bit
            (
                client_frame(true, OP_BINARY | 0x40, b"x", [0; 4]),
                close::PROTOCOL,
            ),
            // unknown opcode
            (client_frame(true, 0x3, b"x", [0; 4]), close::PROTOCOL),
            (client_frame(true, 0xB, b"x", [0; 4]), close::PROTOCOL),
            // text
            (
                client_frame(true, OP_TEXT, b"hi", [0; 4]),
                close::UNSUPPORTED,
            ),
            // continuation without start
            (client_frame(true, OP_CONT, b"x", [0; 4]), close::PROTOCOL),
            // fragmented control
            (client_frame(false, OP_PING, b"x", [0; 4]), close::PROTOCOL),
            // control too long
            (
                client_frame(true, OP_PING, &[0; 126], [0; 4]),
                close::PROTOCOL,
            ),
            // close with one byte
            (client_frame(true, OP_CLOSE, &[3], [0; 4]), close::PROTOCOL),
            // reserved close code
            (
                client_frame(true, OP_CLOSE, &1005u16.to_be_bytes(), [0; 4]),
                close::PROTOCOL,
            ),
            // close reason not utf-8
            (
                client_frame(true, OP_CLOSE, &[0x03, 0xE8, 0xFF], [0; 4]),
                close::INVALID_DATA,
            ),
            // non-minimal 16-bit length
            (vec![0x82, 0x80 | 126, 0, 5, 0, 0, 0, 0], close::PROTOCOL),
            // 64-bit length with the top bit
            (
                vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
                close::PROTOCOL,
            ),
        ];
        for (bytes, code) in cases {
            let mut dec = Decoder::new(1 << 20);
            let (_, st) = run(&mut dec, &bytes, 1);
            assert_eq!(st.unwrap_err().code, code, "{bytes:02x?}");
        }
        // A new binary message inside a fragmented one.
        let mut bytes = client_frame(false, OP_BINARY, b"a", [0; 4]);
        bytes.extend(client_frame(true, OP_BINARY, b"b", [0; 4]));
        let (_, st) = run(&mut Decoder::new(100), &bytes, 100);
        assert_eq!(st.unwrap_err().code, close::PROTOCOL);
    }

    #[test]
    fn close_stops_decoding() {
        let mut bytes = client_frame(true, OP_BINARY, b"ab", [7; 4]);
        bytes.extend(client_frame(true, OP_CLOSE, &1000u16.to_be_bytes(), [7; 4]));
        bytes.extend(client_frame(true, OP_BINARY, b"after", [7; 4]));
        let (seen, st) = run(&mut Decoder::new(100), &bytes, 1000);
        assert_eq!(st, Ok(Status::Closed(Some(1000))));
        assert_eq!(seen.data, b"ab");
        assert_eq!(seen.closes, vec![Some(1000)]);
        let (_, st) = run(
            &mut Decoder::new(100),
            &client_frame(true, OP_CLOSE, b"", [7; 4]),
            1,
        );
        assert_eq!(st, Ok(Status::Closed(None)));
    }

    #[test]
    fn server_frames_encode_lengths() {
        for (len, hdr) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
        ] {
            let mut out = Vec::new();
            put_header(&mut out, OP_BINARY, len);
            assert_eq!(out.len(), hdr, "len {len}");
            assert_eq!(out[0], 0x82);
        }
        let mut out = Vec::new();
        put_close(&mut out, 1009, &"é".repeat(100));
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(out.len() - 2 <= MAX_CONTROL);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
