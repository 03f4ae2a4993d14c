//! The gate's WebSocket and TLS transports, tried with independent client implementations:
//! `tungstenite` (RFC 6455) and `rustls`, against certificates under `tests/fixtures/tls`
//! (a test CA and two server certificates for `localhost` / `127.0.0.1`, see `gen.sh` there).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use im_server::TlsPaths;
use im_shared::frame::FrameCodec;
use im_shared::proto::Message as ImMessage;
use im_shared::{Command, DeviceType, ErrorCode, Seq, UserId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame as WsFrame;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn tls_paths(n: u32) -> TlsPaths {
    TlsPaths {
        cert: fixture(&format!("server{n}.pem")),
        key: fixture(&format!("server{n}.key")),
    }
}

/// A server with a WebSocket listener (and whatever `f` adds).
fn start_ws(f: impl FnOnce(&mut im_server::ServerConfig)) -> (TestServer, SocketAddr) {
    let s = start_with(|c| {
        c.ws_listen = Some("127.0.0.1:0".parse().unwrap());
        f(c)
    });
    let ws = s.server.as_ref().unwrap().ws_addr().expect("ws listener");
    (s, ws)
}

// ---------------------------------------------------------------------------------------------
// Clients: protocol-v1 frames over a byte stream (TLS) or binary WebSocket messages.

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// The TCP socket under a stream, for read timeouts.
trait Sock: Read + Write {
    fn tcp(&self) -> &TcpStream;
}
impl Sock for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}
impl Sock for TlsStream {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// Carries frame bytes.
trait Wire {
    fn send(&mut self, bytes: Vec<u8>);
    /// Received bytes, `Ok(None)` after `wait` without any, `Err` once the connection ended.
    fn recv(&mut self, wait: Duration) -> Result<Option<Vec<u8>>, String>;
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Frames written as they are on a (TLS) byte stream.
struct Stream<S>(S);

impl<S: Sock> Wire for Stream<S> {
    fn send(&mut self, bytes: Vec<u8>) {
        self.0.write_all(&bytes).unwrap();
        self.0.flush().unwrap();
    }
    fn recv(&mut self, wait: Duration) -> Result<Option<Vec<u8>>, String> {
        self.0
            .tcp()
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        let mut tmp = [0u8; 16 * 1024];
        match self.0.read(&mut tmp) {
            Ok(0) => Err("closed".into()),
            Ok(n) => Ok(Some(tmp[..n].to_vec())),
            Err(e) if timed_out(&e) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Each send is one binary WebSocket message.
struct Ws<S>(WebSocket<S>);

impl<S: Sock> Wire for Ws<S> {
    fn send(&mut self, bytes: Vec<u8>) {
        self.0.send(Message::Binary(bytes.into())).unwrap();
    }
    fn recv(&mut self, wait: Duration) -> Result<Option<Vec<u8>>, String> {
        self.0
            .get_ref()
            .tcp()
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        match self.0.read() {
            Ok(Message::Binary(b)) => Ok(Some(b.to_vec())),
            Ok(Message::Close(f)) => Err(format!("close {f:?}")),
            Ok(_) => Ok(Some(Vec::new())), // ping / pong (tungstenite answers pings itself)
            Err(tungstenite::Error::Io(e)) if timed_out(&e) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A protocol-v1 session over any wire.
struct Session<W> {
    wire: W,
    codec: FrameCodec,
    buf: BytesMut,
    next_req: u32,
    pushes: Vec<Command>,
}

impl<W: Wire> Session<W> {
    fn new(wire: W) -> Self {
        Session {
            wire,
            codec: FrameCodec::new(16 << 20),
            buf: BytesMut::new(),
            next_req: 1,
            pushes: Vec::new(),
        }
    }

    fn send(&mut self, cmd: &Command) -> u32 {
        let req = self.next_req;
        self.next_req += 1;
        self.wire.send(cmd.to_bytes(req).to_vec());
        req
    }

    /// The next frame, or `None` after `wait`. Panics if the connection ends.
    fn next(&mut self, wait: Duration) -> Option<(u32, Command)> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
                return Some((f.req_id, Command::decode(&f).unwrap()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.wire.recv(left) {
                Ok(Some(b)) => self.buf.extend_from_slice(&b),
                Ok(None) => {}
                Err(e) => panic!("connection ended: {e}"),
            }
        }
    }

    /// The answer to `req`; pushes met on the way are kept.
    fn answer(&mut self, req: u32) -> Command {
        loop {
            let (r, c) = self
                .next(Duration::from_secs(10))
                .expect("no answer in 10 s");
            if r == req {
                return c;
            }
            self.pushes.push(c);
        }
    }

    fn login(&mut self, uid: u64) {
        let req = self.send(&Command::Login {
            uid: UserId(uid),
            device_type: DeviceType::Web,
            device_id: format!("web-{uid}"),
            last_seq: Seq(0),
            token: token(uid),
        });
        match self.answer(req) {
            Command::LoginResult {
                code: ErrorCode::Ok,
                ..
            } => {}
            other => panic!("login of {uid}: {other:?}"),
        }
    }

    fn send_c2c(&mut self, to: u64, id: u64, body: &str) {
        let req = self.send(&Command::SendC2c {
            client_msg_id: id,
            to: UserId(to),
            body: body.as_bytes().to_vec().into(),
        });
        match self.answer(req) {
            Command::SendAck {
                code: ErrorCode::Ok,
                ..
            } => {}
            other => panic!("send: {other:?}"),
        }
    }

    fn next_deliver(&mut self) -> ImMessage {
        if let Some(i) = self
            .pushes
            .iter()
            .position(|c| matches!(c, Command::Deliver(_)))
        {
            let Command::Deliver(m) = self.pushes.remove(i) else {
                unreachable!()
            };
            return m;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some((_, Command::Deliver(m))) = self.next(Duration::from_millis(200)) {
                return m;
            }
        }
        panic!("no deliver within 10 s");
    }
}

fn ws_connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/ws"), sock).unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS connection with its handshake done.
fn tls_connect(addr: SocketAddr) -> Result<TlsStream, std::io::Error> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls_config(), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

fn wss_connect(addr: SocketAddr) -> WebSocket<TlsStream> {
    let (ws, resp) = tungstenite::client(
        format!("ws://localhost:{}/ws", addr.port()),
        tls_connect(addr).unwrap(),
    )
    .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Reads until the server's close frame; returns its code (tungstenite answers it).
fn close_code<S: Sock>(ws: &mut WebSocket<S>) -> (u16, String) {
    ws.get_ref()
        .tcp()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

fn handshake_fails(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, name: &'static str) -> bool {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, ServerName::try_from(name).unwrap()).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            return true;
        }
    }
    false
}

/// One raw HTTP exchange: the whole response (the server closes after it).
fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// WebSocket

#[test]
fn ws_users_chat_with_tcp_users_both_ways() {
    let (s, ws_addr) = start_ws(|_| {});
    // Several pairs, so that WebSocket logins are accepted on one core and handed to another.
    for i in 0..4u64 {
        let (web, app) = (7000 + i, 8000 + i);
        let mut w = Session::new(Ws(ws_connect(ws_addr)));
        w.login(web);
        let mut t = login(s.addr, app);
        // The gate answers heartbeats itself, over WebSocket too.
        let req = w.send(&Command::Heartbeat);
        assert!(matches!(w.answer(req), Command::HeartbeatAck { .. }));
        w.send_c2c(app, 1, "from the web");
        let m = next_deliver(&mut t);
        assert_eq!((&m.body[..], m.from), (&b"from the web"[..], UserId(web)));
        t.send_c2c(UserId(web), 1, "from the app").unwrap();
        let m = w.next_deliver();
        assert_eq!((&m.body[..], m.from), (&b"from the app"[..], UserId(app)));
        // The web device acks: the app sees it delivered.
        w.send(&Command::DeliverAck { seq: m.seq });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no delivered notice");
            if let Some(Command::Delivered { recipient, .. }) =
                t.recv(Duration::from_millis(200)).unwrap()
            {
                assert_eq!(recipient, UserId(web));
                break;
            }
        }
    }
    assert!(s.server.as_ref().unwrap().gate_stats().handoffs > 0);
}

#[test]
fn ws_fragments_batches_ping_and_close() {
    let (_s, ws_addr) = start_ws(|_| {});
    let mut ws = ws_connect(ws_addr);
    // The login frame in three fragments, with a ping between two of them.
    let login = Command::Login {
        uid: UserId(7100),
        device_type: DeviceType::Web,
        device_id: "web".into(),
        last_seq: Seq(0),
        token: token(7100),
    }
    .to_bytes(1);
    let (a, rest) = login.split_at(5);
    let (b, c) = rest.split_at(20);
    ws.send(Message::Frame(WsFrame::message(
        a.to_vec(),
        OpCode::Data(Data::Binary),
        false,
    )))
    .unwrap();
    ws.send(Message::Frame(WsFrame::message(
        b.to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    ws.send(Message::Frame(WsFrame::message(
        c.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .unwrap();
    // The pong comes back (from the gate) with the ping's payload.
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got_pong = false;
    let mut frames = BytesMut::new();
    let codec = FrameCodec::new(1 << 20);
    let mut login_ok = false;
    while !(got_pong && login_ok) {
        match ws.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                got_pong = true;
            }
            Message::Binary(b) => {
                frames.extend_from_slice(&b);
                while let Some(f) = codec.decode(&mut frames).unwrap() {
                    if let Command::LoginResult { code, .. } = Command::decode(&f).unwrap() {
                        assert_eq!(code, ErrorCode::Ok);
                        login_ok = true;
                    }
                }
            }
            other => panic!("{other:?}"),
        }
    }
    // Two frames in one message: both answered.
    let mut two = Command::Heartbeat.to_bytes(2).to_vec();
    two.extend_from_slice(&Command::Heartbeat.to_bytes(3));
    ws.send(Message::Binary(two.into())).unwrap();
    let mut w = Session::new(Ws(ws));
    assert!(matches!(w.answer(2), Command::HeartbeatAck { .. }));
    assert!(matches!(w.answer(3), Command::HeartbeatAck { .. }));
    // The client closes: the gate echoes its code and closes the connection.
    let mut ws = w.wire.0;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    assert_eq!(close_code(&mut ws).0, 1000);
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)
    ));
}

#[test]
fn ws_violations_close_with_their_codes() {
    let (s, ws_addr) = start_ws(|c| c.max_body = 4096);
    // An unmasked client frame: 1002.
    let mut ws = ws_connect(ws_addr);
    ws.get_mut().write_all(&[0x82, 0x01, b'x']).unwrap();
    assert_eq!(close_code(&mut ws).0, 1002);
    // A text message: 1003.
    let mut ws = ws_connect(ws_addr);
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(close_code(&mut ws).0, 1003);
    // A message over max_body + one frame header: 1009, from the header.
    let mut ws = ws_connect(ws_addr);
    ws.send(Message::Binary(vec![0u8; 4096 + 12 + 1].into()))
        .unwrap();
    assert_eq!(close_code(&mut ws).0, 1009);
    // Also when it is only too big once its fragments add up. (Payloads reach the frame codec as
    // they arrive, so the first fragment starts a valid frame of a logged-in user: a header
    // announcing 4000 bytes, whose body is still incomplete when the limit is crossed.)
    let mut w = Session::new(Ws(ws_connect(ws_addr)));
    w.login(7202);
    let mut ws = w.wire.0;
    let mut first = b"IM\x01\x10\0\0\0\x05\0\0\x0f\xa0".to_vec();
    first.resize(3000, 0);
    for (fin, part) in [(false, first), (true, vec![0u8; 3000])] {
        ws.send(Message::Frame(WsFrame::message(
            part,
            OpCode::Data(if fin { Data::Continue } else { Data::Binary }),
            fin,
        )))
        .unwrap();
    }
    assert_eq!(close_code(&mut ws).0, 1009);
    // A protocol-v1 violation over WebSocket: the Error frame, then 1008.
    let mut w = Session::new(Ws(ws_connect(ws_addr)));
    let req = w.send(&Command::SendC2c {
        client_msg_id: 1,
        to: UserId(1),
        body: b"x".to_vec().into(),
    });
    assert!(matches!(
        w.answer(req),
        Command::Error {
            code: ErrorCode::NotLoggedIn,
            ..
        }
    ));
    assert_eq!(close_code(&mut w.wire.0).0, 1008);
    // After login too (a server-only command).
    let mut w = Session::new(Ws(ws_connect(ws_addr)));
    w.login(7200);
    w.wire.send(b"IM\x01\x81\0\0\0\x09\0\0\0\0".to_vec());
    assert!(matches!(
        w.next(Duration::from_secs(10)),
        Some((
            _,
            Command::Error {
                code: ErrorCode::UnknownCommand,
                ..
            }
        ))
    ));
    assert_eq!(close_code(&mut w.wire.0).0, 1008);
    // A violation after login: the gate's logged-in count goes back down.
    let mut w = Session::new(Ws(ws_connect(ws_addr)));
    w.login(7201);
    w.wire.0.get_mut().write_all(&[0x82, 0x01, b'x']).unwrap();
    assert_eq!(close_code(&mut w.wire.0).0, 1002);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.server.as_ref().unwrap().gate_stats().logged_in != 0 {
        assert!(Instant::now() < deadline, "connections not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ws_handshake_errors_and_origins() {
    let (_s, ws_addr) = start_ws(|c| c.ws_origins = vec!["https://chat.example".into()]);
    let upgrade = |extra: &str| {
        http(
            ws_addr,
            &format!(
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
            ),
        )
    };
    const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let r = upgrade(&format!("Sec-WebSocket-Version: 8\r\n{KEY}"));
    assert!(r.starts_with("HTTP/1.1 426 "), "{r}");
    assert!(r.contains("Sec-WebSocket-Version: 13\r\n"), "{r}");
    let r = upgrade(KEY);
    assert!(r.starts_with("HTTP/1.1 400 "), "missing version: {r}");
    let r = upgrade("Sec-WebSocket-Version: 13\r\n");
    assert!(r.starts_with("HTTP/1.1 400 "), "missing key: {r}");
    let r = upgrade("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n");
    assert!(r.starts_with("HTTP/1.1 400 "), "short key: {r}");
    let r = upgrade(&format!(
        "Sec-WebSocket-Version: 13\r\n{KEY}Origin: https://evil.example\r\n"
    ));
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
    let mut s = TcpStream::connect(ws_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{KEY}Origin: https://chat.example\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // Not HTTP at all (a TCP client on the WebSocket port).
    let r = http(ws_addr, "IM\x01\x03\0\0\0\x01\0\0\0\0");
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    // No web root: plain GETs are 404.
    assert!(http(ws_addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 404 "));
}

#[test]
fn web_root_is_served_without_escaping_it() {
    let web = tempfile::tempdir().unwrap();
    let root = web.path().join("www");
    std::fs::create_dir_all(root.join("static/js")).unwrap();
    std::fs::write(root.join("index.html"), "<!doctype html><title>im</title>").unwrap();
    std::fs::write(root.join("static/js/app.js"), "console.log(1)").unwrap();
    std::fs::write(web.path().join("secret.txt"), "secret").unwrap();
    let (_s, ws_addr) = start_ws(|c| c.web_root = Some(root.clone()));
    let get = |path: &str| http(ws_addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    let r = get("/");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/html; charset=utf-8\r\n"));
    assert!(r.ends_with("<!doctype html><title>im</title>"));
    let r = get("/static/js/app.js");
    assert!(
        r.contains("text/javascript") && r.ends_with("console.log(1)"),
        "{r}"
    );
    for bad in [
        "/static/../../secret.txt",
        "/static/%2e%2e/%2e%2e/secret.txt",
        "/static/..%2f..%2fsecret.txt",
        "/../secret.txt",
        "/secret.txt",
        "/static/js/nope.js",
    ] {
        let r = get(bad);
        assert!(r.starts_with("HTTP/1.1 404 "), "{bad}: {r}");
        assert!(!r.contains("secret"), "{bad}: {r}");
    }
    // A WebSocket still works on the same port.
    let mut w = Session::new(Ws(ws_connect(ws_addr)));
    w.login(7300);
}

// ---------------------------------------------------------------------------------------------
// TLS

#[test]
fn tls_and_wss_clients_log_in_and_chat() {
    let (s, ws_addr) = start_ws(|c| {
        c.tcp_tls = Some(tls_paths(1));
        c.ws_tls = Some(tls_paths(1));
    });
    let mut t = Session::new(Stream(tls_connect(s.addr).unwrap()));
    t.login(7400);
    let mut w = Session::new(Ws(wss_connect(ws_addr)));
    w.login(7401);
    t.send_c2c(7401, 1, "over tls");
    assert_eq!(&w.next_deliver().body[..], b"over tls");
    w.send_c2c(7400, 1, "over wss");
    assert_eq!(&t.next_deliver().body[..], b"over wss");
    // A WSS violation closes with its code inside TLS.
    let mut ws = w.wire.0;
    ws.send(Message::text("text")).unwrap();
    assert_eq!(close_code(&mut ws).0, 1003);
    // The TLS connection saw none of that.
    let req = t.send(&Command::Heartbeat);
    assert!(matches!(t.answer(req), Command::HeartbeatAck { .. }));
}

#[test]
fn plaintext_clients_on_tls_listeners_fail_cleanly() {
    let (s, ws_addr) = start_ws(|c| {
        c.tcp_tls = Some(tls_paths(1));
        c.ws_tls = Some(tls_paths(1));
    });
    // A logged-in TLS user first, who must not notice the others.
    let mut t = Session::new(Stream(tls_connect(s.addr).unwrap()));
    t.login(7500);
    // A plaintext protocol client: its login is not TLS, the gate answers with an alert and
    // closes.
    let mut plain = connect(s.addr);
    plain.timeout = Duration::from_secs(5);
    let err = plain
        .login(UserId(7501), &token(7501), DeviceType::Phone, "p", Seq(0))
        .unwrap_err();
    assert!(!matches!(err, im_client::ClientError::Timeout), "{err:?}");
    // A plaintext WebSocket upgrade on the wss port: no HTTP answer, just the close.
    let r = http(ws_addr, "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!r.starts_with("HTTP/"), "{r}");
    // A TLS client that does not trust the certificate fails its handshake, and so does one
    // that expects another name.
    let untrusting = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    );
    assert!(handshake_fails(s.addr, untrusting, "localhost"));
    assert!(handshake_fails(s.addr, tls_config(), "other.example"));
    // The TLS user still chats, and new TLS clients still get in.
    let req = t.send(&Command::Heartbeat);
    assert!(matches!(t.answer(req), Command::HeartbeatAck { .. }));
    let mut u = Session::new(Stream(tls_connect(s.addr).unwrap()));
    u.login(7502);
    u.send_c2c(7500, 1, "still fine");
    assert_eq!(&t.next_deliver().body[..], b"still fine");
    assert!(
        s.server
            .as_ref()
            .unwrap()
            .gate_stats()
            .closed_protocol_error
            >= 2
    );
}

#[test]
fn tls_certificate_is_reloaded_when_its_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let paths = TlsPaths {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let install = |n: u32| {
        // Write to temporaries and rename, as a certificate manager does.
        for (from, to) in [
            (fixture(&format!("server{n}.key")), &paths.key),
            (fixture(&format!("server{n}.pem")), &paths.cert),
        ] {
            let tmp = to.with_extension("tmp");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    };
    install(1);
    let s = start_with(|c| c.tcp_tls = Some(paths.clone()));
    let leaf = |n: u32| {
        CertificateDer::pem_file_iter(fixture(&format!("server{n}.pem")))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    };
    let served = || {
        let c = tls_connect(s.addr).unwrap();
        c.conn.peer_certificates().unwrap()[0].clone()
    };
    assert_eq!(served(), leaf(1));
    let mut t = Session::new(Stream(tls_connect(s.addr).unwrap()));
    t.login(7600);
    install(2);
    // Within the check interval (2 s) plus a margin, handshakes get the new certificate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while served() != leaf(2) {
        assert!(Instant::now() < deadline, "certificate not reloaded");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A broken file is not taken; the current certificate stays.
    std::fs::write(&paths.cert, "not a certificate").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(served(), leaf(2));
    // The connection made before the reload is unaffected.
    let req = t.send(&Command::Heartbeat);
    assert!(matches!(t.answer(req), Command::HeartbeatAck { .. }));
}

#[test]
fn missing_certificate_files_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.tcp_tls = Some(TlsPaths {
        cert: dir.path().join("nope.pem"),
        key: dir.path().join("nope.key"),
    });
    let err = im_server::start(&cfg).err().expect("start must fail");
    assert!(format!("{err:#}").contains("nope.pem"), "{err:#}");
    // A key that does not match the certificate, too (the check comes before the store opens,
    // so the same data directory can be used again).
    cfg.tcp_tls = Some(TlsPaths {
        cert: fixture("server1.pem"),
        key: fixture("server2.key"),
    });
    let err = im_server::start(&cfg).err().expect("start must fail");
    assert!(format!("{err:#}").contains("server2.key"), "{err:#}");
    // And a web root that does not exist.
    cfg.tcp_tls = None;
    cfg.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.web_root = Some(dir.path().join("no-such-dir"));
    let err = im_server::start(&cfg).err().expect("start must fail");
    assert!(format!("{err:#}").contains("no-such-dir"), "{err:#}");
}

/// Issue 14, over WebSocket: 3 000 requests pipelined in three binary messages (1 000 frames
/// each) are all answered; the gate pauses the layered reader in the middle of a message
/// instead of cutting the client.
#[test]
fn a_pipelining_ws_client_is_slowed_not_cut() {
    let (s, ws_addr) = start_ws(|_| {});
    let mut w = Session::new(Ws(ws_connect(ws_addr)));
    w.login(7100);
    // Writes never hang the test: the gate reads on as this side reads.
    w.wire
        .0
        .get_ref()
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for k in 0..3u64 {
        let mut msg = Vec::new();
        for i in 1..=1000u64 {
            let n = k * 1000 + i;
            let cmd = Command::SendC2c {
                client_msg_id: n,
                to: UserId(7101),
                body: format!("ws {n}").into_bytes().into(),
            };
            msg.extend_from_slice(&cmd.to_bytes(n as u32));
        }
        w.wire.send(msg);
    }
    let mut acked = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 3000 {
        assert!(Instant::now() < deadline, "{} of 3000 acked", acked.len());
        match w.next(Duration::from_secs(1)) {
            Some((
                _,
                Command::SendAck {
                    code: ErrorCode::Ok,
                    client_msg_id,
                    ..
                },
            )) => assert!(acked.insert(client_msg_id), "{client_msg_id} twice"),
            Some((_, other)) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    let stats = s.server.as_ref().unwrap().gate_stats();
    assert_eq!(stats.closed_slow, 0);
    assert!(stats.reads_paused > 0, "{stats:?}");
    // Still a working session afterwards.
    let req = w.send(&Command::Heartbeat);
    assert!(matches!(w.answer(req), Command::HeartbeatAck { .. }));
}
