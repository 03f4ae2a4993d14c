//! Transports that carry protocol-v1 frames besides plain TCP: TLS (rustls) on either listener,
//! and WebSocket (RFC 6455, binary messages) on the WebSocket listener, which also serves the
//! static files of the web chat page.
//!
//! Everything here is sans-io: a connection's [`Layers`] turn raw socket bytes into frame bytes
//! ([`Layers::ingest`]) and queued frames into raw bytes ([`Layers::seal`]). The socket stays a
//! plain `TcpStream`, so the gate's machinery is unchanged: the pre-login read, the fd hand-off to
//! the owning core (the layers travel with the fd, TLS session included), the split reader and
//! writer tasks, the timer wheel and the bounded write queue. A plain TCP connection has no
//! layers and pays nothing for them.
//!
//! ```text
//!  socket ─raw─► [TLS: rustls ServerConnection] ─plain─► [WebSocket: HTTP upgrade, then
//!                                                          unmasked binary payloads] ─► frame buffer
//!  socket ◄────── [TLS] ◄── [one binary message per write batch, pongs, close frame] ◄── out queue
//! ```

pub mod http;
pub mod tls;
pub mod ws;

use std::cell::RefCell;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::config::GateConfig;
use crate::core::Core;

pub use tls::TlsFiles;

/// Layers of a logged-in connection, shared by its reader and writer tasks.
pub type Shared = Rc<RefCell<Layers>>;

/// Transport settings of a gate, built once at start and shared by its cores.
#[derive(Debug)]
pub struct Transport {
    tcp_tls: Option<Arc<rustls::ServerConfig>>,
    ws_tls: Option<Arc<rustls::ServerConfig>>,
    ws: Arc<WsSettings>,
}

#[derive(Debug)]
struct WsSettings {
    /// Canonical path of the static files, if any.
    web_root: Option<PathBuf>,
    origins: Vec<String>,
    /// Largest WebSocket message: one frame of the largest accepted body.
    max_message: usize,
}

impl Transport {
    /// Loads certificates and checks the web root. Listeners that share certificate files share
    /// one TLS configuration (and its reloading).
    pub fn new(cfg: &GateConfig) -> std::io::Result<Transport> {
        let tcp_tls = cfg.tcp_tls.as_ref().map(tls::server_config).transpose()?;
        let ws_tls = match (&cfg.ws_tls, &cfg.tcp_tls, &tcp_tls) {
            (Some(w), Some(t), Some(c)) if w == t => Some(c.clone()),
            (Some(w), _, _) => Some(tls::server_config(w)?),
            (None, _, _) => None,
        };
        let web_root = match &cfg.web_root {
            Some(p) => Some(p.canonicalize().map_err(|e| {
                std::io::Error::new(e.kind(), format!("web_root {}: {e}", p.display()))
            })?),
            None => None,
        };
        Ok(Transport {
            tcp_tls,
            ws_tls,
            ws: Arc::new(WsSettings {
                web_root,
                origins: cfg.ws_origins.clone(),
                max_message: cfg.max_body + im_shared::frame::HEADER_LEN,
            }),
        })
    }

    /// Fresh layers for a connection accepted on the TCP (`ws = false`) or WebSocket listener;
    /// `None` for plain TCP.
    pub fn layers(&self, ws: bool) -> Result<Option<Box<Layers>>, rustls::Error> {
        let tls_cfg = if ws { &self.ws_tls } else { &self.tcp_tls };
        let tls = match tls_cfg {
            Some(c) => {
                let mut s = rustls::ServerConnection::new(c.clone())?;
                // The gate bounds what it queues itself (max_write_queue).
                s.set_buffer_limit(None);
                Some(Box::new(s))
            }
            None => None,
        };
        if tls.is_none() && !ws {
            return Ok(None);
        }
        Ok(Some(Box::new(Layers {
            tls,
            ws: ws.then(|| Ws::Http(self.ws.clone())),
            raw: BytesMut::new(),
            mid: BytesMut::new(),
            ctl: Vec::new(),
            pong: Vec::new(),
            close: None,
            close_sent: false,
        })))
    }
}

/// The transport state of one connection.
pub struct Layers {
    tls: Option<Box<rustls::ServerConnection>>,
    ws: Option<Ws>,
    /// Socket bytes not consumed yet (part of a WebSocket header on a plain `ws` connection).
    pub raw: BytesMut,
    /// TLS plaintext not yet consumed by the WebSocket layer.
    mid: BytesMut,
    /// An HTTP response to send before anything else.
    ctl: Vec<u8>,
    /// The pong answering the latest ping (RFC 6455 §5.5.3 allows answering only the latest one,
    /// so a ping flood queues one pong).
    pong: Vec<u8>,
    /// WebSocket close code and reason for the closing handshake.
    close: Option<(u16, &'static str)>,
    close_sent: bool,
}

enum Ws {
    /// Waiting for the HTTP request.
    Http(Arc<WsSettings>),
    /// Upgraded: WebSocket frames.
    Open(ws::Decoder),
    /// An HTTP response was the whole exchange.
    Done,
}

/// What [`Layers::ingest`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep reading.
    Open,
    /// The peer ended the session (WebSocket close, TLS close_notify) or an HTTP response ends
    /// the exchange: send what is queued, then close.
    Done,
    /// A transport protocol violation: send what is queued (alert, close frame, HTTP error), then
    /// close.
    Failed,
}

impl Layers {
    /// Moves the bytes in `raw` through TLS and WebSocket; frame bytes are appended to `out`.
    pub fn ingest(&mut self, out: &mut BytesMut) -> Step {
        let mut peer_closed = false;
        if let Some(tls) = self.tls.as_deref_mut() {
            let dst = if self.ws.is_some() {
                &mut self.mid
            } else {
                &mut *out
            };
            match tls_ingest(tls, &mut self.raw, dst) {
                Ok(closed) => peer_closed = closed,
                Err(e) => {
                    tracing::debug!(error = &e as &dyn std::error::Error, "client TLS failed");
                    return Step::Failed;
                }
            }
        }
        if let Some(w) = &mut self.ws {
            let input = if self.tls.is_some() {
                &mut self.mid
            } else {
                &mut self.raw
            };
            let step = ws_ingest(
                w,
                input,
                out,
                &mut self.ctl,
                &mut self.pong,
                &mut self.close,
            );
            if step != Step::Open {
                return step;
            }
        }
        if peer_closed {
            Step::Done
        } else {
            Step::Open
        }
    }

    /// Whether control output (handshake, alert, HTTP response, pong) waits to be sent.
    pub fn has_output(&self) -> bool {
        !self.ctl.is_empty()
            || !self.pong.is_empty()
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Sets the WebSocket close code, unless one is set already.
    pub fn set_close(&mut self, code: u16, reason: &'static str) {
        self.close.get_or_insert((code, reason));
    }

    /// Appends to `out` the socket bytes for the queued control output followed by `frames`
    /// (as one binary WebSocket message on a WebSocket connection).
    pub fn seal(&mut self, frames: &[Bytes], out: &mut Vec<u8>) {
        let data = match &self.ws {
            None => true,
            Some(Ws::Open(_)) => !self.close_sent,
            Some(_) => false, // no frames on a plain HTTP exchange
        };
        let total: usize = if data {
            frames.iter().map(|f| f.len()).sum()
        } else {
            0
        };
        let mut plain_buf = Vec::new();
        // Without TLS the plaintext goes straight to `out`; with it, into one buffer encrypted
        // with a single write (one TLS record per 16 KiB rather than one per piece).
        let plain = if self.tls.is_some() {
            plain_buf.reserve(self.ctl.len() + self.pong.len() + 10 + total);
            &mut plain_buf
        } else {
            &mut *out
        };
        plain.extend_from_slice(&self.ctl);
        plain.extend_from_slice(&self.pong);
        self.ctl = Vec::new();
        self.pong = Vec::new();
        if total > 0 {
            if self.ws.is_some() {
                ws::put_header(plain, ws::OP_BINARY, total);
            }
            for f in frames {
                plain.extend_from_slice(f);
            }
        }
        self.encrypt(&plain_buf, out);
    }

    /// Appends to `out` the socket bytes that end the session: queued control output, the
    /// WebSocket close frame (once, on an upgraded connection) and the TLS close_notify.
    pub fn seal_close(&mut self, out: &mut Vec<u8>) {
        self.seal(&[], out);
        let mut plain = Vec::new();
        if matches!(self.ws, Some(Ws::Open(_))) && !self.close_sent {
            let (code, reason) = self.close.unwrap_or((ws::close::NORMAL, ""));
            ws::put_close(&mut plain, code, reason);
            self.close_sent = true;
        }
        if self.tls.is_none() {
            out.extend_from_slice(&plain);
            return;
        }
        self.encrypt(&plain, out);
        if let Some(t) = self.tls.as_deref_mut() {
            t.send_close_notify();
        }
        self.encrypt(&[], out);
    }

    /// Passes plaintext through TLS (if any) and appends the records (and any pending handshake
    /// or alert bytes) to `out`.
    fn encrypt(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        let Some(t) = self.tls.as_deref_mut() else {
            return;
        };
        if !plain.is_empty() {
            // Never short with no buffer limit; before the handshake ends rustls buffers it.
            let _ = t.writer().write_all(plain);
        }
        while t.wants_write() {
            match t.write_tls(out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Why TLS bytes from a client could not be taken.
#[derive(Debug, thiserror::Error)]
enum TlsIngestError {
    /// rustls could not buffer the records (e.g. a record over its size limit).
    #[error("reading TLS records")]
    Read(#[source] std::io::Error),
    /// A TLS protocol error: bad record, failed handshake, decryption failure.
    #[error("TLS protocol")]
    Protocol(#[source] rustls::Error),
    /// The plaintext rustls announced could not be read.
    #[error("reading TLS plaintext")]
    Plaintext(#[source] std::io::Error),
}

/// Feeds ciphertext to rustls and appends the plaintext to `dst`. Returns whether the peer sent
/// close_notify.
fn tls_ingest(
    tls: &mut rustls::ServerConnection,
    raw: &mut BytesMut,
    dst: &mut BytesMut,
) -> Result<bool, TlsIngestError> {
    while !raw.is_empty() {
        let mut rd: &[u8] = raw;
        let n = tls.read_tls(&mut rd).map_err(TlsIngestError::Read)?;
        raw.advance(n);
        let st = tls
            .process_new_packets()
            .map_err(TlsIngestError::Protocol)?;
        let pending = st.plaintext_bytes_to_read();
        if pending > 0 {
            let at = dst.len();
            dst.resize(at + pending, 0);
            tls.reader()
                .read_exact(&mut dst[at..])
                .map_err(TlsIngestError::Plaintext)?;
        }
        if st.peer_has_closed() {
            raw.clear();
            return Ok(true);
        }
        if n == 0 {
            break;
        }
    }
    Ok(false)
}

fn ws_ingest(
    w: &mut Ws,
    input: &mut BytesMut,
    out: &mut BytesMut,
    ctl: &mut Vec<u8>,
    pong: &mut Vec<u8>,
    close: &mut Option<(u16, &'static str)>,
) -> Step {
    loop {
        match w {
            Ws::Http(settings) => match http::parse(input) {
                http::Parsed::Partial => return Step::Open,
                http::Parsed::Invalid(resp) => {
                    *ctl = resp;
                    *w = Ws::Done;
                    return Step::Failed;
                }
                http::Parsed::Complete(len, req) => {
                    if !ws::wants_upgrade(&req) {
                        *ctl = http::serve(&req, settings.web_root.as_deref());
                        *w = Ws::Done;
                        return Step::Done;
                    }
                    match ws::handshake(&req, &settings.origins) {
                        ws::Upgrade::Accept(resp) => {
                            *ctl = resp;
                            input.advance(len);
                            *w = Ws::Open(ws::Decoder::new(settings.max_message));
                        }
                        ws::Upgrade::Refuse(resp) => {
                            *ctl = resp;
                            *w = Ws::Done;
                            return Step::Failed;
                        }
                    }
                }
            },
            Ws::Open(dec) => {
                let r = dec.decode(input, out, |c| {
                    if let ws::Control::Ping(p) = c {
                        pong.clear();
                        ws::put_pong(pong, p);
                    }
                });
                return match r {
                    Ok(ws::Status::NeedMore) => Step::Open,
                    Ok(ws::Status::Closed(code)) => {
                        // Echo the client's code (RFC 6455 §5.5.1).
                        close.get_or_insert((code.unwrap_or(ws::close::NORMAL), ""));
                        input.clear();
                        Step::Done
                    }
                    Err(e) => {
                        tracing::debug!("{e}");
                        close.get_or_insert((e.code, e.reason));
                        input.clear();
                        Step::Failed
                    }
                };
            }
            Ws::Done => {
                input.clear();
                return Step::Done;
            }
        }
    }
}

/// Pre-login read: reads from the socket once and appends the frame bytes it carries to `buf`.
/// Handshake bytes, HTTP responses and pongs are written back right away. Returns false when the
/// connection is over (closed by the peer, a transport error, an HTTP exchange answered); what
/// had to be sent before closing has been sent then.
pub async fn read_more(
    core: &Core,
    stream: &mut TcpStream,
    io: &mut Option<Box<Layers>>,
    buf: &mut BytesMut,
) -> bool {
    // Plain TCP: read into the spare capacity after the bytes already buffered (monoio reads at
    // the slice start, so the slice begins at `len`).
    let Some(l) = io else {
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = stream.read(std::mem::take(buf).slice_mut(len..cap)).await;
        *buf = slice.into_inner();
        return matches!(res, Ok(n) if n > 0);
    };
    let mut raw = std::mem::take(&mut l.raw);
    if raw.capacity() - raw.len() < 256 {
        raw.reserve(1024);
    }
    let (len, cap) = (raw.len(), raw.capacity());
    let (res, slice) = stream.read(raw.slice_mut(len..cap)).await;
    l.raw = slice.into_inner();
    if !matches!(res, Ok(n) if n > 0) {
        return false;
    }
    let step = l.ingest(buf);
    let mut out = Vec::new();
    l.seal(&[], &mut out);
    if step != Step::Open {
        if step == Step::Failed {
            core.ctx
                .stats
                .closed_protocol_error
                .fetch_add(1, Ordering::Relaxed);
        }
        l.seal_close(&mut out);
        let _ = monoio::time::timeout(CLOSE_WRITE, async {
            let _ = stream.write_all(out).await;
            let _ = stream.shutdown().await;
        })
        .await;
        return false;
    }
    out.is_empty() || stream.write_all(out).await.0.is_ok()
}

/// How long a pre-login connection may take to receive its last bytes.
const CLOSE_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pre-login write of one frame. Returns false when the socket failed.
pub async fn write_frame(
    stream: &mut TcpStream,
    io: &mut Option<Box<Layers>>,
    frame: Bytes,
) -> bool {
    match io {
        None => stream.write_all(frame).await.0.is_ok(),
        Some(l) => {
            let mut out = Vec::new();
            l.seal(&[frame], &mut out);
            out.is_empty() || stream.write_all(out).await.0.is_ok()
        }
    }
}

/// Pre-login refusal: writes `frame` (an `Error`) and the transport's closing bytes (a WebSocket
/// close 1008, a TLS close_notify) within a second, then shuts the socket down.
pub async fn write_last(stream: &mut TcpStream, io: &mut Option<Box<Layers>>, frame: Bytes) {
    let out = match io {
        None => frame.to_vec(),
        Some(l) => {
            let mut out = Vec::new();
            l.seal(&[frame], &mut out);
            l.set_close(ws::close::POLICY, "");
            l.seal_close(&mut out);
            out
        }
    };
    let _ = monoio::time::timeout(CLOSE_WRITE, stream.write_all(out)).await;
    let _ = stream.shutdown().await;
}

/// A counting allocator for the memory tests below: counts, per thread, the bytes allocated
/// and freed inside [`heap::counted`] only.
#[cfg(test)]
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    fn add(n: isize) {
        let _ = ON.try_with(|on| {
            if on.get() {
                let _ = LIVE.try_with(|l| l.set(l.get() + n));
            }
        });
    }

    pub struct Counting;

    // SAFETY: forwards to the system allocator unchanged; the counters are plain thread-locals
    // with const initialisers (no allocation, no destructor).
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            // SAFETY: same contract as ours.
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                add(l.size() as isize);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            // SAFETY: same contract as ours.
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                add(l.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: same contract as ours.
            unsafe { System.dealloc(p, l) };
            add(-(l.size() as isize));
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            // SAFETY: same contract as ours.
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                add(new as isize - l.size() as isize);
            }
            q
        }
    }

    #[global_allocator]
    static A: Counting = Counting;

    /// Runs `f` with counting on.
    pub fn counted<R>(f: impl FnOnce() -> R) -> R {
        ON.with(|o| o.set(true));
        let r = f();
        ON.with(|o| o.set(false));
        r
    }

    /// Bytes allocated and not freed inside `counted` on this thread.
    pub fn live() -> isize {
        LIVE.with(|l| l.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws_layers(max_body: usize) -> Box<Layers> {
        let cfg = GateConfig {
            max_body,
            ..GateConfig::default()
        };
        Transport::new(&cfg).unwrap().layers(true).unwrap().unwrap()
    }

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | opcode, 0x80 | payload.len() as u8, 1, 2, 3, 4];
        v.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        v
    }

    const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chat, im.v1\r\n\r\n";

    #[test]
    fn upgrade_then_frames_in_one_read() {
        let mut l = ws_layers(100);
        l.raw.extend_from_slice(UPGRADE);
        l.raw.extend_from_slice(&masked(ws::OP_BINARY, b"IM-frame"));
        l.raw.extend_from_slice(&masked(ws::OP_PING, b"hb"));
        let mut buf = BytesMut::new();
        assert_eq!(l.ingest(&mut buf), Step::Open);
        assert_eq!(&buf[..], b"IM-frame");
        assert!(l.has_output());
        let mut out = Vec::new();
        l.seal(&[Bytes::from_static(b"reply")], &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: im.v1\r\n"));
        let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        // pong, then one binary message with the frames
        assert_eq!(&out[head_end..], b"\x8a\x02hb\x82\x05reply");
        assert!(!l.has_output());
        let mut out = Vec::new();
        l.seal_close(&mut out);
        assert_eq!(out, b"\x88\x02\x03\xe8");
        // Only once.
        let mut out = Vec::new();
        l.seal_close(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn close_is_echoed_and_errors_set_the_code() {
        let mut l = ws_layers(100);
        l.raw.extend_from_slice(UPGRADE);
        l.raw
            .extend_from_slice(&masked(ws::OP_CLOSE, &4000u16.to_be_bytes()));
        let mut buf = BytesMut::new();
        assert_eq!(l.ingest(&mut buf), Step::Done);
        let mut out = Vec::new();
        l.seal_close(&mut out);
        assert!(out.ends_with(b"\x88\x02\x0f\xa0"));

        let mut l = ws_layers(4);
        l.raw.extend_from_slice(UPGRADE);
        l.raw.extend_from_slice(&masked(ws::OP_BINARY, &[0; 17]));
        assert_eq!(l.ingest(&mut buf), Step::Failed);
        let mut out = Vec::new();
        l.seal_close(&mut out);
        let at = out.iter().rposition(|&b| b == 0x88).unwrap();
        assert_eq!(&out[at + 2..at + 4], b"\x03\xf1"); // 1009
        assert_eq!(&out[at + 4..], b"message too big");
    }

    #[test]
    fn plain_http_gets_a_response_and_no_frames() {
        let mut l = ws_layers(100);
        l.raw
            .extend_from_slice(b"GET /static/x.js HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = BytesMut::new();
        assert_eq!(l.ingest(&mut buf), Step::Done);
        let mut out = Vec::new();
        l.seal(&[Bytes::from_static(b"frame")], &mut out);
        l.seal_close(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.ends_with("not found\n"));
    }

    #[test]
    fn bad_handshakes_are_refused() {
        for (req, status) in [
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                "426",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                "400",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
                "400",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n",
                "400",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                "400",
            ),
            ("IM\x01\x01\0\0\0\0\0\0\0\0", "400"),
        ] {
            let mut l = ws_layers(100);
            l.raw.extend_from_slice(req.as_bytes());
            let mut buf = BytesMut::new();
            assert_eq!(l.ingest(&mut buf), Step::Failed, "{req}");
            let mut out = Vec::new();
            l.seal_close(&mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{req}: {text}");
        }
    }

    #[test]
    fn origin_allow_list() {
        let cfg = GateConfig {
            ws_origins: vec!["https://chat.example".into()],
            ..GateConfig::default()
        };
        let t = Transport::new(&cfg).unwrap();
        let req = |origin: &str| {
            let mut l = t.layers(true).unwrap().unwrap();
            l.raw.extend_from_slice(
                format!("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n").as_bytes(),
            );
            l.ingest(&mut BytesMut::new())
        };
        assert_eq!(req("Origin: https://chat.example\r\n"), Step::Open);
        assert_eq!(req("Origin: https://evil.example\r\n"), Step::Failed);
        assert_eq!(req(""), Step::Open);
    }

    /// Heap held by an idle connection's layers after its handshakes and a frame each way:
    /// TLS, WebSocket, both. Only the server side is counted. (`--nocapture` shows the numbers.)
    #[test]
    fn idle_layers_heap() {
        use heap::{counted, live};
        use rustls::pki_types::pem::PemObject;
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/fixtures/tls");
        let files = TlsFiles {
            cert: fixtures.join("server1.pem"),
            key: fixtures.join("server1.key"),
        };
        let cfg = GateConfig {
            tcp_tls: Some(files.clone()),
            ws_tls: Some(files),
            ..GateConfig::default()
        };
        let t = Transport::new(&cfg).unwrap();
        let plain = Transport::new(&GateConfig::default()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(fixtures.join("ca.pem")).unwrap()
        {
            roots.add(c.unwrap()).unwrap();
        }
        let client_cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let frame = Bytes::from(vec![7u8; 100]);
        for (name, ws, tls) in [
            ("ws", true, false),
            ("tls", false, true),
            ("wss", true, true),
        ] {
            let base = live();
            let mut l = counted(|| if tls { &t } else { &plain }.layers(ws).unwrap().unwrap());
            let mut client = tls.then(|| {
                rustls::ClientConnection::new(
                    client_cfg.clone(),
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                )
                .unwrap()
            });
            // One exchange: client bytes in, server bytes out (to the client).
            let exchange = |l: &mut Box<Layers>,
                            client: &mut Option<rustls::ClientConnection>,
                            plain: &[u8]|
             -> Vec<u8> {
                let mut c2s = Vec::new();
                match client {
                    Some(c) => {
                        if !plain.is_empty() {
                            c.writer().write_all(plain).unwrap();
                        }
                        while c.wants_write() {
                            c.write_tls(&mut c2s).unwrap();
                        }
                    }
                    None => c2s.extend_from_slice(plain),
                }
                let mut s2c = Vec::with_capacity(1 << 16);
                counted(|| {
                    l.raw.extend_from_slice(&c2s);
                    let mut buf = BytesMut::new();
                    assert_eq!(l.ingest(&mut buf), Step::Open);
                    let mut out = Vec::new();
                    let frames: &[Bytes] = if buf.is_empty() {
                        &[]
                    } else {
                        std::slice::from_ref(&frame)
                    };
                    l.seal(frames, &mut out);
                    s2c.extend_from_slice(&out);
                });
                match client {
                    Some(c) => {
                        let mut rd = &s2c[..];
                        while !rd.is_empty() {
                            c.read_tls(&mut rd).unwrap();
                            c.process_new_packets().unwrap();
                        }
                        let mut got = Vec::new();
                        let _ = c.reader().read_to_end(&mut got);
                        got
                    }
                    None => s2c,
                }
            };
            while client.as_ref().is_some_and(|c| c.is_handshaking()) {
                exchange(&mut l, &mut client, b"");
            }
            if ws {
                let resp = exchange(&mut l, &mut client, UPGRADE);
                assert!(resp.starts_with(b"HTTP/1.1 101"), "{name}");
                let back = exchange(&mut l, &mut client, &masked(ws::OP_BINARY, b"IM-frame"));
                assert_eq!(back.len(), 2 + 100, "{name}");
            } else {
                let back = exchange(&mut l, &mut client, b"IM-frame");
                assert_eq!(back.len(), 100, "{name}");
            }
            // Idle: the reader holds its own (64-byte) read buffer instead of `raw`.
            counted(|| l.raw = BytesMut::new());
            let held = live() - base;
            println!("{name}: {held} bytes of heap in the idle layers (Layers box included)");
            assert!(held < 48 * 1024, "{name}: {held}");
            counted(move || drop(l));
        }
    }
}
