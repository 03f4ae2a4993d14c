//! One client connection on its owner core: a reader task that parses headers and forwards
//! frames, and a writer task that drains a bounded queue of encoded frames (many per write).
//! The writer exists only while there is something to write: an idle connection parks its
//! write half in [`Conn`] and costs one task (the reader), not two.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use im_shared::frame::Cmd;
use im_shared::link::Up;
use im_shared::{Command, ConnId, ErrorCode, UserId};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use crate::core::Core;
use crate::transport::{self, Layers, Shared, Step};

/// Read buffer size for a connection with nothing pending: small, so idle connections park
/// little memory in their outstanding read.
const READ_IDLE: usize = 64;
/// Read buffer size while frames are streaming in.
const READ_BUSY: usize = 4096;

pub struct Conn {
    pub id: ConnId,
    fd: RawFd,
    /// The user claimed in the login frame.
    pub uid: Cell<UserId>,
    /// Logic lane of the user.
    pub lane: usize,
    /// The login frame was forwarded to logic (so logic must hear about the close).
    pub login_sent: Cell<bool>,
    /// Logic accepted the login.
    pub logged_in: Cell<bool>,
    /// Core second at which the connection was accepted.
    accepted_at: u32,
    /// Core second of the last complete frame received (bytes of a partial frame do not count,
    /// so a frame trickled in slowly is bounded by the idle timeout).
    pub last_active: Cell<u32>,
    out: RefCell<VecDeque<Bytes>>,
    /// Bytes in `out` (u32: `max_write_queue` above 4 GiB makes no sense, and the spare bytes
    /// hold `layered` without growing the struct).
    out_bytes: Cell<u32>,
    closing: Cell<bool>,
    /// The connection has TLS / WebSocket layers (in `Core::layered`), used by its writer.
    layered: Cell<bool>,
    /// Core second at which a graceful close began.
    closing_since: Cell<u32>,
    /// The write half while no writer task runs.
    wr: RefCell<Option<OwnedWriteHalf<TcpStream>>>,
    writer_running: Cell<bool>,
    /// Generation of this connection's current timer-wheel entry.
    pub wheel_gen: Cell<u32>,
    /// Admission of the socket (limits.rs); dropping it with the connection releases the counts.
    pub slot: std::cell::OnceCell<crate::limits::Slot>,
}

impl Conn {
    pub fn new(id: ConnId, stream: &TcpStream, uid: UserId, lane: usize, now: u32) -> Conn {
        Conn {
            id,
            fd: stream.as_raw_fd(),
            uid: Cell::new(uid),
            lane,
            login_sent: Cell::new(false),
            logged_in: Cell::new(false),
            accepted_at: now,
            last_active: Cell::new(now),
            out: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            closing: Cell::new(false),
            layered: Cell::new(false),
            closing_since: Cell::new(0),
            wr: RefCell::new(None),
            writer_running: Cell::new(false),
            wheel_gen: Cell::new(0),
            slot: std::cell::OnceCell::new(),
        }
    }

    /// Starts a writer task if there is something to do and none runs.
    fn wake_writer(self: &Rc<Self>, core: &Core) {
        if self.writer_running.get() {
            return; // the running writer looks at the queue again after each write
        }
        let io = if self.layered.get() {
            core.layered.borrow().get(&self.id.serial()).cloned()
        } else {
            None
        };
        // A layered connection may have transport output of its own (a pong, TLS records).
        let control = io.as_ref().is_some_and(|l| l.borrow().has_output());
        if self.out.borrow().is_empty() && !self.closing.get() && !control {
            return;
        }
        if let Some(wr) = self.wr.borrow_mut().take() {
            self.writer_running.set(true);
            monoio::spawn(writer(self.clone(), wr, io));
        }
    }

    /// Queues encoded frames. A client whose queue exceeds the limit does not read: it is
    /// disconnected instead of buffered forever.
    pub fn enqueue(self: &Rc<Self>, core: &Core, data: Bytes) {
        if data.is_empty() || self.closing.get() {
            return;
        }
        let n = self.out_bytes.get() as usize + data.len();
        if n > core.ctx.cfg.max_write_queue {
            core.ctx.stats.closed_slow.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.id.0, "slow consumer, closing");
            self.hard_close();
            return;
        }
        self.out_bytes.set(u32::try_from(n).unwrap_or(u32::MAX));
        self.out.borrow_mut().push_back(data);
        core.ctx.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        self.wake_writer(core);
    }

    /// Sends an error frame, then closes once it is flushed.
    pub fn close_with(self: &Rc<Self>, core: &Core, req_id: u32, code: ErrorCode, message: &str) {
        let frame = Command::Error {
            code,
            message: message.to_owned(),
        }
        .to_bytes(req_id);
        self.enqueue(core, frame);
        self.close_after_flush(core);
    }

    /// Closes after the queued frames are written.
    pub fn close_after_flush(self: &Rc<Self>, core: &Core) {
        if !self.closing.replace(true) {
            self.closing_since.set(core.now.get());
            // Make sure the wheel looks again soon, to force the close if the flush hangs.
            core.file(self, core.now.get() + CLOSE_GRACE.as_secs() as u32);
        }
        self.wake_writer(core);
    }

    /// Closes now: both directions are shut down, pending reads and writes fail, the reader
    /// cleans up.
    pub fn hard_close(&self) {
        self.closing.set(true);
        self.out.borrow_mut().clear();
        self.out_bytes.set(0);
        // SAFETY: plain syscall on a descriptor this connection owns until its tasks end.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }

    /// Timer wheel callback: closes the connection if a deadline passed, else returns when to
    /// look again.
    pub fn check_deadline(self: &Rc<Self>, core: &Core, now: u32) -> Option<u32> {
        let cfg = &core.ctx.cfg;
        if self.closing.get() {
            // A graceful close that could not flush in time becomes a hard one.
            let at = self.closing_since.get() + CLOSE_GRACE.as_secs() as u32;
            if now >= at {
                self.hard_close();
                return None;
            }
            return Some(at);
        }
        let (deadline, code, msg) = if self.logged_in.get() {
            (
                self.last_active.get() + cfg.idle_timeout.as_secs() as u32,
                ErrorCode::IdleTimeout,
                "idle timeout",
            )
        } else {
            (
                self.accepted_at + cfg.login_timeout.as_secs() as u32,
                ErrorCode::LoginTimeout,
                "login not completed within deadline",
            )
        };
        if now >= deadline {
            core.ctx
                .stats
                .closed_timeout
                .fetch_add(1, Ordering::Relaxed);
            self.close_with(core, 0, code, msg);
            None // close_with filed the connection for the forced close
        } else {
            Some(deadline)
        }
    }
}

/// Reader task; owns the connection's lifetime.
pub async fn run(core: Rc<Core>, c: Rc<Conn>, stream: TcpStream, mut buf: BytesMut) {
    let (mut rd, wr) = stream.into_split();
    *c.wr.borrow_mut() = Some(wr);
    c.wake_writer(&core);
    loop {
        if !drain_frames(&core, &c, &mut buf) {
            break;
        }
        if c.closing.get() {
            break;
        }
        if buf.is_empty() {
            if buf.capacity() != READ_IDLE {
                buf = BytesMut::with_capacity(READ_IDLE);
            }
        } else if buf.capacity() - buf.len() < READ_IDLE {
            // Grow as bytes arrive (never by what a header merely announces).
            buf.reserve(READ_BUSY.max(buf.len()));
        }
        // Read into the spare capacity after the bytes already buffered (monoio reads at the
        // slice start, so the slice begins at `len`).
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = rd.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        if let Ok(0) | Err(_) = res {
            break;
        }
    }
    // Stop reading; the writer flushes what is queued (e.g. the error frame) and shuts down.
    // A writer stuck on a client that does not read gets a bounded grace period, then the
    // socket is shut down under it.
    c.close_after_flush(&core);
    core.forget(&c);
    // The close tail waits with a timer; boxing it keeps the timer out of this future, which
    // every idle connection carries for its whole life.
    Box::pin(finish_close(core, c, rd)).await;
}

/// Decodes and handles the buffered frames. Returns false when the connection must stop reading.
fn drain_frames(core: &Core, c: &Rc<Conn>, buf: &mut BytesMut) -> bool {
    loop {
        match core.codec.decode(buf) {
            Ok(Some(f)) => {
                core.ctx.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                if !on_frame(core, c, f.cmd, f.req_id, f.body) {
                    return false;
                }
            }
            Ok(None) => return true,
            Err(e) => {
                core.ctx
                    .stats
                    .closed_protocol_error
                    .fetch_add(1, Ordering::Relaxed);
                c.close_with(core, 0, e.code(), &e.to_string());
                return false;
            }
        }
    }
}

/// Reader task of a TLS / WebSocket connection: [`run`] with the socket bytes passing through
/// the connection's [`Layers`] (transport/) before the frame codec. Its layers are registered in
/// `Core::layered` for the writer, which seals what it writes with them.
pub async fn run_layered(
    core: Rc<Core>,
    c: Rc<Conn>,
    stream: TcpStream,
    mut buf: BytesMut,
    layers: Box<Layers>,
) {
    let io: Shared = Rc::new(RefCell::new(*layers));
    core.layered.borrow_mut().insert(c.id.serial(), io.clone());
    c.layered.set(true);
    let (mut rd, wr) = stream.into_split();
    *c.wr.borrow_mut() = Some(wr);
    c.wake_writer(&core);
    let mut busy = false;
    loop {
        // Bytes carried over from the pre-login read, then each read's bytes.
        let step = io.borrow_mut().ingest(&mut buf);
        if io.borrow().has_output() {
            c.wake_writer(&core); // a pong, TLS records
        }
        if !drain_frames(&core, &c, &mut buf) {
            io.borrow_mut().set_close(transport::ws::close::POLICY, "");
            break;
        }
        match step {
            Step::Open => {}
            Step::Done => break,
            Step::Failed => {
                core.ctx
                    .stats
                    .closed_protocol_error
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        if c.closing.get() {
            break;
        }
        if buf.is_empty() && buf.capacity() > 0 {
            buf = BytesMut::new(); // frame bytes are copied in as they arrive
        }
        let mut raw = std::mem::take(&mut io.borrow_mut().raw);
        if raw.is_empty() {
            let want = if busy { READ_BUSY } else { READ_IDLE };
            if raw.capacity() != want {
                raw = BytesMut::with_capacity(want);
            }
        } else if raw.capacity() - raw.len() < READ_IDLE {
            raw.reserve(READ_BUSY.max(raw.len()));
        }
        let len = raw.len();
        let cap = raw.capacity();
        let (res, slice) = rd.read(raw.slice_mut(len..cap)).await;
        io.borrow_mut().raw = slice.into_inner();
        match res {
            Ok(0) | Err(_) => break,
            // A full buffer suggests more is coming (a TLS record, a large message).
            Ok(n) => busy = n == cap - len,
        }
    }
    c.close_after_flush(&core);
    core.forget(&c);
    let serial = c.id.serial();
    Box::pin(finish_close(core.clone(), c, rd)).await;
    let mut table = core.layered.borrow_mut();
    if table.get(&serial).is_some_and(|l| Rc::ptr_eq(l, &io)) {
        table.remove(&serial);
    }
}

/// Waits (bounded) for the writer to flush and stop, then releases the socket.
async fn finish_close(core: Rc<Core>, c: Rc<Conn>, rd: OwnedReadHalf<TcpStream>) {
    let deadline = std::time::Instant::now() + CLOSE_GRACE;
    while c.writer_running.get() {
        if std::time::Instant::now() >= deadline {
            c.hard_close(); // the blocked write fails and the writer exits
        }
        monoio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(rd);
    c.wr.borrow_mut().take();
    core.ctx.stats.sockets.fetch_sub(1, Ordering::Relaxed);
}

/// How long a closing connection may take to flush its last frames.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Handles one client frame. Returns false when the connection must stop reading.
fn on_frame(core: &Core, c: &Rc<Conn>, cmd: Cmd, req_id: u32, body: Bytes) -> bool {
    c.last_active.set(core.now.get());
    let deny = |code: ErrorCode, msg: &str| {
        core.ctx
            .stats
            .closed_protocol_error
            .fetch_add(1, Ordering::Relaxed);
        c.close_with(core, req_id, code, msg);
        false
    };
    match cmd {
        Cmd::Heartbeat => {
            c.enqueue(
                core,
                Command::HeartbeatAck {
                    server_time_ms: unix_ms(),
                }
                .to_bytes(req_id),
            );
            true
        }
        Cmd::Login => {
            c.enqueue(
                core,
                Command::Error {
                    code: ErrorCode::AlreadyLoggedIn,
                    message: "this connection already sent a login".into(),
                }
                .to_bytes(req_id),
            );
            true
        }
        _ if !cmd.is_client_cmd() => deny(ErrorCode::UnknownCommand, "not a client command"),
        _ if !c.logged_in.get() => deny(ErrorCode::NotLoggedIn, "wait for the login result"),
        _ => {
            if let Some(keep) = core.limit_frame(c, cmd, req_id) {
                return keep; // over the user's message rate (limits.rs)
            }
            if let Err(code) = core.ctx.link.admit(c.lane) {
                core.ctx.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                c.enqueue(
                    core,
                    Command::Error {
                        code,
                        message: "logic busy or unreachable, retry later".into(),
                    }
                    .to_bytes(req_id),
                );
                return true;
            }
            core.push_up(
                c.lane,
                Up::Frame {
                    conn: c.id,
                    uid: c.uid.get(),
                    cmd,
                    req_id,
                    body,
                },
            );
            true
        }
    }
}

/// Wall-clock Unix milliseconds (for heartbeat acks).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writer task: writes everything queued (many frames per write) until the queue is empty, then
/// parks the write half in the connection and ends; on close it shuts the socket down.
/// A layered connection's batch is sealed by its transport: one WebSocket message, TLS records.
async fn writer(c: Rc<Conn>, mut wr: OwnedWriteHalf<TcpStream>, io: Option<Shared>) {
    let mut scratch: Vec<u8> = Vec::new();
    loop {
        let batch: Vec<Bytes> = c.out.borrow_mut().drain(..).collect();
        c.out_bytes.set(0);
        let control = io.as_ref().is_some_and(|l| l.borrow().has_output());
        if batch.is_empty() && !control {
            if !c.closing.get() {
                *c.wr.borrow_mut() = Some(wr);
                c.writer_running.set(false);
                return;
            }
            // Closing and everything flushed: the transport's goodbye (WebSocket close frame,
            // TLS close_notify).
            if let Some(l) = &io {
                scratch.clear();
                l.borrow_mut().seal_close(&mut scratch);
                if !scratch.is_empty() {
                    let _ = wr.write_all(std::mem::take(&mut scratch)).await;
                }
            }
            break;
        }
        let res = if let Some(l) = &io {
            scratch.clear();
            l.borrow_mut().seal(&batch, &mut scratch);
            let (r, s) = wr.write_all(std::mem::take(&mut scratch)).await;
            scratch = s;
            r
        } else if batch.len() == 1 {
            let b = batch.into_iter().next().expect("one element");
            wr.write_all(b).await.0
        } else {
            scratch.clear();
            for b in &batch {
                scratch.extend_from_slice(b);
            }
            let (r, s) = wr.write_all(std::mem::take(&mut scratch)).await;
            scratch = s;
            r
        };
        if res.is_err() {
            break;
        }
    }
    c.closing.set(true);
    c.out.borrow_mut().clear();
    // SAFETY: plain syscall on the connection's descriptor, still open (we hold the write half).
    unsafe {
        libc::shutdown(c.fd, libc::SHUT_RDWR);
    }
    drop(wr);
    c.writer_running.set(false);
}

#[cfg(test)]
mod tests {
    /// The reader future lives as long as its connection: keep it small (a `Sleep` inside it
    /// would add over a kilobyte per idle connection).
    #[test]
    fn reader_future_is_small() {
        fn size_of_run() -> usize {
            // Never polled: only its size matters.
            fn sz<F: std::future::Future>(_: &F) -> usize {
                std::mem::size_of::<F>()
            }
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .build()
                .unwrap();
            rt.block_on(async {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let stream = monoio::net::TcpStream::from_std(s).unwrap();
                let core = crate::core::test_core();
                let c = std::rc::Rc::new(super::Conn::new(
                    im_shared::ConnId(1),
                    &stream,
                    im_shared::UserId(1),
                    0,
                    0,
                ));
                let f = super::run(core, c, stream, bytes::BytesMut::new());
                sz(&f)
            })
        }
        let n = size_of_run();
        assert!(n <= 512, "reader future is {n} bytes");
    }

    /// What a TLS / WebSocket connection carries besides a TCP one: the layered reader future
    /// (instead of the plain one) and its `Layers` (plus, with TLS, rustls' connection state
    /// and buffers on the heap). Run with `--nocapture` to see the numbers.
    #[test]
    fn layered_sizes() {
        fn sz<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let (plain, fut) = rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let stream = monoio::net::TcpStream::from_std(s).unwrap();
            let core = crate::core::test_core();
            let c = std::rc::Rc::new(super::Conn::new(
                im_shared::ConnId(1),
                &stream,
                im_shared::UserId(1),
                0,
                0,
            ));
            let plain = sz(&super::run(
                core.clone(),
                c.clone(),
                monoio::net::TcpStream::from_std(
                    std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap(),
                )
                .unwrap(),
                bytes::BytesMut::new(),
            ));
            let layers = core.ctx.transport.layers(true).unwrap().unwrap();
            let f = super::run_layered(core, c, stream, bytes::BytesMut::new(), layers);
            (plain, sz(&f))
        });
        let conn = std::mem::size_of::<super::Conn>();
        let layers = std::mem::size_of::<super::Layers>();
        let tls = std::mem::size_of::<rustls::ServerConnection>();
        println!(
            "Conn {conn} B, reader future {plain} B, layered reader future {fut} B, \
             Layers {layers} B, rustls::ServerConnection {tls} B"
        );
        assert!(fut <= 768, "layered reader future is {fut} bytes");
    }
}
