//! The blocking driver of the [`Core`]: std `TcpStream` (TLS with rustls under the `tls`
//! feature), a monotonic clock, and the loop that feeds the core its bytes and deadlines.
//!
//! [`Session`] is the reconnecting session of `im-cli` and of the bindings (`im-client-ffi`):
//! [`Session::next_event`] runs the connection until the core has something to say;
//! [`Session::call`] makes a request and waits for its answer, keeping the other events for
//! `next_event`. All the rules are the core's; this file only moves bytes and time.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::Bytes;

use im_shared::codes::ErrorCode;
use im_shared::ids::{GroupId, UserId};
use im_shared::proto::Command;

use crate::core::{CallError, Config, Core, Event, Gate, Io};
use crate::ClientError;

/// TLS to the gates (the gate's `[tcp_tls]`, README "Web clients (WebSocket) and TLS").
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// PEM certificates of the authorities to trust (the server's chain must lead to one).
    pub ca_pem: Vec<u8>,
    /// The name the certificate must carry; `None`: the host part of the gate's address.
    pub server_name: Option<String>,
}

/// A connection to a gate.
enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => &s.sock,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write_all(buf).and_then(|()| s.flush()),
        }
    }
}

/// A reconnecting session: the core plus sockets and a clock.
pub struct Session {
    core: Core,
    stream: Option<Stream>,
    epoch: Instant,
    /// Events taken from the core by [`Session::call`] while it waited for its answer.
    queued: VecDeque<Event>,
    tls: Option<TlsSettings>,
    /// Longest wait for a TCP connect (and a TLS handshake).
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("core", &self.core)
            .field("connected", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(cfg: Config) -> Session {
        Session {
            core: Core::new(cfg),
            stream: None,
            epoch: Instant::now(),
            queued: VecDeque::new(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Connects with TLS. Without the `tls` feature every connection attempt fails (and says
    /// why in [`Event::Disconnected`]).
    pub fn with_tls(mut self, tls: TlsSettings) -> Session {
        self.tls = Some(tls);
        self
    }

    /// The session's clock: milliseconds since it was made.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The core (read its state; calls made on it take effect at the next step).
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Starts connecting (the first [`Session::next_event`] does the work).
    pub fn start(&mut self) {
        let now = self.now_ms();
        self.core.start(now);
    }

    pub fn send_c2c(
        &mut self,
        to: UserId,
        client_msg_id: Option<u64>,
        body: impl Into<Bytes>,
    ) -> Result<u64, CallError> {
        let now = self.now_ms();
        let id = self.core.send_c2c(now, to, client_msg_id, body.into())?;
        self.flush();
        Ok(id)
    }

    pub fn send_c2g(
        &mut self,
        group: GroupId,
        client_msg_id: Option<u64>,
        body: impl Into<Bytes>,
        mentions: Vec<UserId>,
    ) -> Result<u64, CallError> {
        let now = self.now_ms();
        let id = self
            .core
            .send_c2g(now, group, client_msg_id, body.into(), mentions)?;
        self.flush();
        Ok(id)
    }

    /// Syncs now (see [`Core::sync`]).
    pub fn sync(&mut self) -> Result<(), CallError> {
        self.core.sync()?;
        self.flush();
        Ok(())
    }

    /// The next event, waiting up to `timeout` (`None`: nothing happened meanwhile).
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Some(e);
            }
            if let Some(e) = self.core.poll_event() {
                return Some(e);
            }
            if !self.step(deadline) {
                return self.core.poll_event();
            }
        }
    }

    /// Sends a request and waits up to `timeout` for its answer (an `Error` frame is
    /// [`ClientError::Server`]); other events wait for [`Session::next_event`].
    pub fn call(&mut self, cmd: &Command, timeout: Duration) -> Result<Command, ClientError> {
        let req = self.core.request(cmd).map_err(|e| match e {
            CallError::NotLoggedIn => ClientError::Server {
                code: ErrorCode::NotLoggedIn,
                message: "not logged in (reconnecting)".into(),
            },
            CallError::Stopped => ClientError::Closed,
        })?;
        self.flush();
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(e) = self.core.poll_event() {
                match e {
                    Event::Response { req_id, cmd } if req_id == req => {
                        return match cmd {
                            Command::Error { code, message } => {
                                Err(ClientError::Server { code, message })
                            }
                            c => Ok(c),
                        };
                    }
                    Event::RequestLost { req_id } if req_id == req => {
                        return Err(ClientError::Closed)
                    }
                    e => self.queued.push_back(e),
                }
            }
            if !self.step(deadline) && !self.core.has_event() {
                return Err(ClientError::Timeout);
            }
        }
    }

    /// Logs out and waits (up to `timeout`) for the server's answer.
    pub fn logout(&mut self, timeout: Duration) {
        let now = self.now_ms();
        self.core.logout(now);
        let deadline = Instant::now() + timeout;
        while !self.core.is_stopped() && self.step(deadline) {
            while let Some(e) = self.core.poll_event() {
                self.queued.push_back(e);
            }
        }
        self.stream = None;
    }

    /// Drops the connection at once, as a lost network would (the core reconnects).
    pub fn drop_connection(&mut self, why: &str) {
        if self.stream.take().is_some() {
            let now = self.now_ms();
            self.core.disconnected(now, why);
        }
    }

    /// Writes what the core wants written; a failed write is a lost connection.
    fn flush(&mut self) {
        while let Some(bytes) = self.core.poll_transmit() {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            if let Err(e) = s.write_all(&bytes) {
                self.stream = None;
                let now = self.now_ms();
                self.core.disconnected(now, &format!("write: {e}"));
            }
        }
    }

    /// One turn of the loop: transport requests, writes, then one read or timer wait (bounded
    /// by `deadline`). Returns false once `deadline` passed.
    fn step(&mut self, deadline: Instant) -> bool {
        while let Some(io) = self.core.poll_io() {
            match io {
                Io::Close => self.stream = None,
                Io::Connect(gate) => {
                    self.stream = None;
                    let now = self.now_ms();
                    match self.open(&gate) {
                        Ok(s) => {
                            self.stream = Some(s);
                            self.core.connected(now);
                        }
                        Err(e) => self
                            .core
                            .disconnected(now, &format!("connect to {}: {e}", gate.addr)),
                    }
                }
            }
        }
        self.flush();
        if self.core.has_event() {
            return true; // for the caller (`next_event` and `call` look first)
        }
        let now_i = Instant::now();
        if now_i >= deadline {
            return false;
        }
        let now = self.now_ms();
        let timer = self
            .core
            .poll_timeout()
            .map(|t| Duration::from_millis(t.saturating_sub(now)));
        let wait = timer
            .map_or(deadline - now_i, |t| t.min(deadline - now_i))
            .max(Duration::from_millis(1));
        match self.stream.as_mut() {
            None => std::thread::sleep(wait),
            Some(s) => {
                let mut buf = [0u8; 16 * 1024];
                let read = s
                    .tcp()
                    .set_read_timeout(Some(wait))
                    .and_then(|()| s.read(&mut buf));
                let now = self.now_ms();
                match read {
                    Ok(0) => {
                        self.stream = None;
                        self.core.disconnected(now, "closed by the server");
                    }
                    Ok(n) => self.core.handle_bytes(now, &buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        self.stream = None;
                        self.core.disconnected(now, &format!("read: {e}"));
                    }
                }
            }
        }
        let now = self.now_ms();
        self.core.handle_timeout(now);
        self.flush();
        true
    }

    fn open(&self, gate: &Gate) -> io::Result<Stream> {
        let addr = gate.addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing")
        })?;
        let tcp = TcpStream::connect_timeout(&addr, self.connect_timeout)?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(t) => self.tls_stream(tcp, gate, t),
        }
    }

    #[cfg(feature = "tls")]
    fn tls_stream(&self, tcp: TcpStream, gate: &Gate, t: &TlsSettings) -> io::Result<Stream> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        let bad = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&t.ca_pem) {
            roots
                .add(c.map_err(|e| bad(format!("CA PEM: {e}")))?)
                .map_err(|e| bad(format!("CA certificate: {e}")))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = match &t.server_name {
            Some(n) => n.clone(),
            None => gate
                .addr
                .rsplit_once(':')
                .map_or(gate.addr.as_str(), |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_owned(),
        };
        let name = ServerName::try_from(host).map_err(|e| bad(e.to_string()))?;
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)
            .map_err(|e| bad(e.to_string()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        // Handshake now, within the connect timeout, so a refused certificate is a failed
        // connect (and the core walks on to the next gate).
        s.sock.set_read_timeout(Some(self.connect_timeout))?;
        s.sock.set_write_timeout(Some(self.connect_timeout))?;
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        s.sock.set_write_timeout(None)?;
        Ok(Stream::Tls(Box::new(s)))
    }

    #[cfg(not(feature = "tls"))]
    fn tls_stream(&self, _: TcpStream, _: &Gate, _: &TlsSettings) -> io::Result<Stream> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TLS asked for but im-client was built without the `tls` feature",
        ))
    }
}
