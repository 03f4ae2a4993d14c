//! One client connection on its owner core: a reader task that parses headers and forwards
//! frames, and a writer task that drains a bounded queue of encoded frames (many per write).
//! The writer exists only while there is something to write: an idle connection parks its
//! write half in [`Conn`] and costs one task (the reader), not two.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use bytes::{Bytes, BytesMut};
use im_shared::frame::{Cmd, HEADER_LEN};
use im_shared::link::Up;
use im_shared::{Command, ConnId, ErrorCode, UserId};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use crate::core::Core;
use crate::transport::{self, Layers, Shared, Step};

/// Least spare room for a read into a buffer that holds part of a frame (and the read size of a
/// TLS / WebSocket connection with nothing pending).
const READ_IDLE: usize = 64;
/// Read buffer size while frames are streaming in.
const READ_BUSY: usize = 4096;
/// Size of a core's scratch buffer, which a plain connection with no partial frame receives into.
pub const READ_SCRATCH: usize = 64 * 1024;

pub struct Conn {
    pub id: ConnId,
    fd: RawFd,
    /// The user claimed in the login frame.
    pub uid: Cell<UserId>,
    /// Logic lane of the user.
    pub lane: u16,
    /// The login frame was forwarded to logic (so logic must hear about the close).
    pub login_sent: Cell<bool>,
    /// Logic accepted the login.
    pub logged_in: Cell<bool>,
    /// Core second at which the connection was accepted.
    accepted_at: u32,
    /// Core second of the last complete frame received (bytes of a partial frame do not count,
    /// so a frame trickled in slowly is bounded by the idle timeout).
    pub last_active: Cell<u32>,
    pub(crate) out: RefCell<VecDeque<Bytes>>,
    /// Bytes in `out` (u32: `max_write_queue` above 4 GiB makes no sense, and the spare bytes
    /// hold `layered` without growing the struct).
    out_bytes: Cell<u32>,
    closing: Cell<bool>,
    /// The connection has TLS / WebSocket layers (in `Core::layered`), used by its writer.
    layered: Cell<bool>,
    /// Core second at which a graceful close began.
    closing_since: Cell<u32>,
    /// The write half while no writer task runs.
    wr: Cell<Option<OwnedWriteHalf<TcpStream>>>,
    writer_running: Cell<bool>,
    /// Generation of this connection's current timer-wheel entry.
    pub wheel_gen: Cell<u32>,
    /// Admission of the socket (limits.rs); dropping it with the connection releases the counts.
    pub slot: std::cell::OnceCell<crate::limits::Slot>,
    /// Requests forwarded to logic and not answered yet (heavy ones excluded).
    inflight: Cell<u16>,
    /// `req_id` of the heavy request (sync, group info, group list) awaiting its answer.
    heavy: Cell<Option<u32>>,
    /// Reading stopped because the pending output passed the high-water mark; it resumes
    /// below the low-water mark.
    out_paused: Cell<bool>,
    /// Core second at which the reader last paused (for the in-flight escape).
    paused_at: Cell<u32>,
    /// The paused reader, woken when it may go on.
    resume: Cell<Option<Waker>>,
    /// A plain TCP connection's socket (poller.rs), until it is finalized; `None` for a layered
    /// one, whose reader and writer tasks own theirs.
    sock: Cell<Option<std::os::fd::OwnedFd>>,
    /// A plain connection's bytes of a frame not complete yet (boxed: rarely there, and the
    /// record stays small).
    pub(crate) rbuf: Cell<Option<Box<BytesMut>>>,
    /// A plain connection's socket may hold bytes not read yet (it paused or used its turn).
    pub(crate) unread: Cell<bool>,
    /// On the core's list for the sender.
    pub(crate) dirty: Cell<bool>,
    /// A write did not fit: the sender waits for `EPOLLOUT`.
    pub(crate) write_blocked: Cell<bool>,
    /// A plain connection's end was handled (poller.rs `finalize`).
    pub(crate) finalized: Cell<bool>,
}

/// Whether a client command's answer may be large (a sync page, a member or group list): at
/// most one such request is in flight per connection, so the answers to what one connection may
/// have outstanding stay below its write queue bound.
pub fn is_heavy(cmd: Cmd) -> bool {
    matches!(
        cmd,
        Cmd::SyncRequest
            | Cmd::GroupInfo
            | Cmd::MyGroups
            | Cmd::OrgSync
            | Cmd::OrgDept
            | Cmd::OrgUser
            | Cmd::OrgSearch
            | Cmd::GroupSync
            | Cmd::GroupMembers
    )
}

/// How long a paused reader waits for the answers to its connection's requests before it
/// forgets them and reads on (logic restarted and lost them; the client retries on its own).
pub const INFLIGHT_TIMEOUT_SECS: u32 = 10;

/// Why a connection's reader waits before taking the next frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// `max_inflight` requests, or the one heavy request, await their answers.
    Inflight,
    /// The pending output is above the high-water mark (`max_write_queue / 4`).
    Output,
}

impl Conn {
    pub fn new(id: ConnId, fd: RawFd, uid: UserId, lane: usize, now: u32) -> Conn {
        Conn {
            id,
            fd,
            uid: Cell::new(uid),
            lane: u16::try_from(lane).expect("fewer than 65 536 lanes"),
            login_sent: Cell::new(false),
            logged_in: Cell::new(false),
            accepted_at: now,
            last_active: Cell::new(now),
            out: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            closing: Cell::new(false),
            layered: Cell::new(false),
            closing_since: Cell::new(0),
            wr: Cell::new(None),
            writer_running: Cell::new(false),
            wheel_gen: Cell::new(0),
            slot: std::cell::OnceCell::new(),
            inflight: Cell::new(0),
            heavy: Cell::new(None),
            out_paused: Cell::new(false),
            paused_at: Cell::new(u32::MAX),
            resume: Cell::new(None),
            sock: Cell::new(None),
            rbuf: Cell::new(None),
            unread: Cell::new(false),
            dirty: Cell::new(false),
            write_blocked: Cell::new(false),
            finalized: Cell::new(false),
        }
    }

    /// Makes this a plain TCP connection that owns `fd` (read and written by poller.rs).
    pub fn set_sock(&self, fd: std::os::fd::OwnedFd) {
        self.sock.set(Some(fd));
    }

    pub(crate) fn take_sock(&self) -> Option<std::os::fd::OwnedFd> {
        self.sock.take()
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Marks a connection with TLS / WebSocket layers (before anything is queued for it).
    pub fn set_layered(&self) {
        self.layered.set(true);
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.get()
    }

    /// Whether the reader must wait before its next frame.
    pub(crate) fn reader_paused(&self, core: &Core) -> bool {
        self.logged_in.get() && self.pause(core).is_some()
    }

    /// Who to wake when a paused reader may go on.
    pub(crate) fn set_reader_waker(&self, w: Option<Waker>) {
        self.resume.set(w);
    }

    /// The first `n` queued bytes were written.
    pub(crate) fn written(&self, n: usize) {
        let mut out = self.out.borrow_mut();
        crate::poller::advance(&mut out, n);
        if out.is_empty() {
            *out = VecDeque::new(); // an idle connection keeps no queue allocation
        }
        drop(out);
        self.out_bytes.set(
            self.out_bytes
                .get()
                .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX)),
        );
        if self.out_paused.get() {
            self.wake_reader(); // it may be below the low-water mark now
        }
    }

    /// Why the reader may not take the next frame now, if it may not.
    pub fn pause(&self, core: &Core) -> Option<Pause> {
        let cfg = &core.ctx.cfg;
        if self.out_paused.get() {
            if self.out_bytes.get() as usize > cfg.max_write_queue / 8 {
                return Some(Pause::Output);
            }
            self.out_paused.set(false);
        }
        if self.out_bytes.get() as usize > cfg.max_write_queue / 4 {
            self.out_paused.set(true);
            return Some(Pause::Output);
        }
        if usize::from(self.inflight.get()) >= cfg.max_inflight.max(1) || self.heavy.get().is_some()
        {
            return Some(Pause::Inflight);
        }
        None
    }

    /// Counts a request forwarded to logic.
    fn forwarded(&self, cmd: Cmd, req_id: u32) {
        if is_heavy(cmd) {
            self.heavy.set(Some(req_id));
        } else if cmd != Cmd::DeliverAck {
            self.inflight.set(self.inflight.get().saturating_add(1));
        }
    }

    /// Counts the answers among the frames logic sends (`data` holds whole frames), and wakes a
    /// reader that waited for them.
    pub fn answered(&self, data: &[u8]) {
        let mut at = 0;
        let mut any = false;
        while let Some(h) = data.get(at..at + HEADER_LEN) {
            let req_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
            at += HEADER_LEN + len;
            let heavy_answer = match Cmd::from_u8(h[3]) {
                Some(
                    Cmd::SyncPage
                    | Cmd::GroupInfoReply
                    | Cmd::GroupList
                    | Cmd::OrgPage
                    | Cmd::OrgReply
                    | Cmd::GroupSyncPage
                    | Cmd::GroupMembersPage,
                ) => true,
                // A refusal answers the heavy request if it carries its id.
                Some(Cmd::OpResult | Cmd::Error) if self.heavy.get() == Some(req_id) => true,
                Some(
                    Cmd::SendAck
                    | Cmd::OpResult
                    | Cmd::LogoutAck
                    | Cmd::Error
                    | Cmd::FileTicket
                    | Cmd::FileUrl,
                ) => false,
                _ => continue, // a push
            };
            if heavy_answer {
                self.heavy.set(None);
            } else {
                self.inflight.set(self.inflight.get().saturating_sub(1));
            }
            any = true;
        }
        if any {
            self.wake_reader();
        }
    }

    /// Wakes the reader if it waits.
    fn wake_reader(&self) {
        if let Some(w) = self.resume.take() {
            w.wake();
        }
    }

    /// Whether the reader waits.
    fn reader_waits(&self) -> bool {
        let w = self.resume.take();
        let waits = w.is_some();
        self.resume.set(w);
        waits
    }

    /// Starts a writer task if there is something to do and none runs.
    fn wake_writer(self: &Rc<Self>, core: &Core) {
        if !self.layered.get() {
            crate::poller::mark_dirty(core, self);
            return;
        }
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
        if let Some(wr) = self.wr.take() {
            self.writer_running.set(true);
            monoio::spawn(writer(self.clone(), wr, io));
        }
    }

    /// Queues encoded frames. A client whose queue would exceed `max_write_queue` does not read
    /// what it is sent (its reader stopped taking requests at a quarter of that, so its own
    /// answers cannot fill it): the frame is dropped, `Error SlowConsumer` is queued after what
    /// is already there, and the connection closes once that is flushed, or after
    /// [`CLOSE_GRACE`] if it never is.
    pub fn enqueue(self: &Rc<Self>, core: &Core, data: Bytes) {
        if data.is_empty() || self.closing.get() {
            return;
        }
        let n = self.out_bytes.get() as usize + data.len();
        if n > core.ctx.cfg.max_write_queue {
            core.ctx.stats.closed_slow.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.id.0, "slow consumer, closing");
            let bye = Command::Error {
                code: ErrorCode::SlowConsumer,
                message: "the client does not read what it is sent".into(),
            }
            .to_bytes(0);
            self.push(core, bye);
            self.close_after_flush(core);
            return;
        }
        self.push(core, data);
    }

    fn push(self: &Rc<Self>, core: &Core, data: Bytes) {
        let n = self.out_bytes.get() as usize + data.len();
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
        self.wake_reader();
    }

    /// Closes now: both directions are shut down, pending reads and writes fail, the reader
    /// cleans up.
    pub fn hard_close(&self) {
        self.closing.set(true);
        self.out.borrow_mut().clear();
        self.out_bytes.set(0);
        self.wake_reader();
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
        // A reader paused on requests logic never answered (lost in a logic restart) forgets them.
        let mut escape = None;
        if self.reader_waits() && self.pause(core) == Some(Pause::Inflight) {
            let at = self.paused_at.get().saturating_add(INFLIGHT_TIMEOUT_SECS);
            if now >= at {
                self.inflight.set(0);
                self.heavy.set(None);
                self.wake_reader();
            } else {
                escape = Some(at);
            }
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
            Some(escape.map_or(deadline, |e: u32| e.min(deadline)))
        }
    }
}

/// What one [`recv_now`] got.
pub(crate) enum Recv {
    /// The peer closed its side.
    Closed,
    /// `n` bytes were appended; `full`: as many as were asked for (more may be waiting).
    Got { n: usize, full: bool },
    /// Nothing was there (`EAGAIN`).
    Nothing,
}

/// Receives what the socket holds, without blocking, and appends it to `buf`. With nothing
/// buffered (the usual case: frames arrive whole) the bytes land in the core's scratch buffer
/// and `buf` gets an allocation of exactly their size, so a connection owns no buffer between
/// its frames; with a partial frame buffered they land in `buf`'s spare room.
pub(crate) fn recv_now(core: &Core, fd: RawFd, buf: &mut BytesMut) -> std::io::Result<Recv> {
    fn recv(fd: RawFd, to: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<Option<usize>> {
        loop {
            // SAFETY: `to` is writable memory of its length; the descriptor is this
            // connection's, open while its reader runs.
            let n = unsafe { libc::recv(fd, to.as_mut_ptr().cast(), to.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }
    let got = if buf.is_empty() {
        let mut scratch = core.scratch.borrow_mut();
        if scratch.capacity() < READ_SCRATCH {
            *scratch = Vec::with_capacity(READ_SCRATCH);
        }
        let want = scratch.capacity(); // the scratch buffer is always empty between reads
        let Some(n) = recv(fd, scratch.spare_capacity_mut())? else {
            return Ok(Recv::Nothing);
        };
        // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
        let bytes = unsafe { std::slice::from_raw_parts(scratch.as_ptr(), n) };
        *buf = BytesMut::from(bytes);
        (n, want)
    } else {
        if buf.capacity() - buf.len() < READ_IDLE {
            // Grow as bytes arrive (never by what a header merely announces).
            buf.reserve(READ_BUSY.max(buf.len()));
        }
        let spare = buf.spare_capacity_mut();
        let want = spare.len();
        let Some(n) = recv(fd, spare)? else {
            return Ok(Recv::Nothing);
        };
        // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        (n, want)
    };
    Ok(match got {
        (0, _) => Recv::Closed,
        (n, want) => Recv::Got { n, full: n == want },
    })
}

/// What the reader does after [`drain_frames`].
pub(crate) enum Drain {
    /// Every complete frame was handled: read more.
    More,
    /// Frames (or reads) must wait: [`Resume`] (a layered reader) or the core's `paused` list (a
    /// plain connection, poller.rs) says when.
    Paused,
    /// A protocol error or a refusal that closes: the connection stops reading.
    Stop,
}

/// Decodes and handles the buffered frames, until none is complete, the connection must stop,
/// or it must wait (backpressure: too many requests in flight, or too much output pending; the
/// frames not taken stay in `buf` and in the socket, and TCP slows the client down).
pub(crate) fn drain_frames(core: &Core, c: &Rc<Conn>, buf: &mut BytesMut) -> Drain {
    loop {
        if c.closing.get() {
            return Drain::More; // the caller sees `closing` and stops
        }
        if c.logged_in.get() {
            if let Some(why) = c.pause(core) {
                core.ctx.stats.reads_paused.fetch_add(1, Ordering::Relaxed);
                let now = core.now.get();
                // The wheel looks for the in-flight escape (at most one new entry a second).
                if why == Pause::Inflight && c.paused_at.replace(now) != now {
                    core.file(c, now + INFLIGHT_TIMEOUT_SECS);
                }
                c.paused_at.set(now);
                return Drain::Paused;
            }
        }
        match core.codec.decode(buf) {
            Ok(Some(f)) => {
                core.ctx.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                if !on_frame(core, c, f.cmd, f.req_id, f.body) {
                    return Drain::Stop;
                }
            }
            Ok(None) => return Drain::More,
            Err(e) => {
                core.ctx
                    .stats
                    .closed_protocol_error
                    .fetch_add(1, Ordering::Relaxed);
                c.close_with(core, 0, e.code(), &e.to_string());
                return Drain::Stop;
            }
        }
    }
}

/// Resolves when a paused reader may take the next frame (or must stop: the connection closes).
struct Resume<'a> {
    core: &'a Core,
    c: &'a Conn,
}

impl std::future::Future for Resume<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.c.closing.get() || self.c.pause(self.core).is_none() {
            return Poll::Ready(());
        }
        self.c.resume.set(Some(cx.waker().clone()));
        Poll::Pending
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
    c.wr.set(Some(wr));
    c.wake_writer(&core);
    let mut busy = false;
    loop {
        // Bytes carried over from the pre-login read, then each read's bytes.
        let step = io.borrow_mut().ingest(&mut buf);
        if io.borrow().has_output() {
            c.wake_writer(&core); // a pong, TLS records
        }
        match drain_frames(&core, &c, &mut buf) {
            Drain::Stop => {
                io.borrow_mut().set_close(transport::ws::close::POLICY, "");
                break;
            }
            // The peer's close or a transport failure ends the connection now.
            Drain::Paused if matches!(step, Step::Open) => {
                Resume { core: &core, c: &c }.await;
                continue;
            }
            Drain::Paused | Drain::More => {}
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
    c.wr.take();
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
            if let Err(code) = core.admit_up(usize::from(c.lane)) {
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
            c.forwarded(cmd, req_id);
            if matches!(cmd, Cmd::SendC2c | Cmd::SendC2g) {
                core.time_request(c.id.serial(), req_id, false);
            }
            core.push_up(
                usize::from(c.lane),
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
        if c.out_paused.get() {
            c.wake_reader(); // the output is below the low-water mark now
        }
        let control = io.as_ref().is_some_and(|l| l.borrow().has_output());
        if batch.is_empty() && !control {
            if !c.closing.get() {
                c.wr.set(Some(wr));
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
    use super::*;

    /// A connection (on a real socket, for its descriptor) and a core with default limits.
    fn with_conn(f: impl FnOnce(&Rc<Core>, &Rc<Conn>)) {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let stream = TcpStream::from_std(s).unwrap();
            let core = crate::core::test_core();
            let c = Rc::new(Conn::new(
                ConnId(1),
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                UserId(1),
                0,
                0,
            ));
            c.logged_in.set(true);
            f(&core, &c);
        });
    }

    fn frames(cmds: &[(Command, u32)]) -> Vec<u8> {
        cmds.iter()
            .flat_map(|(c, r)| c.to_bytes(*r).to_vec())
            .collect()
    }

    fn ack(req: u32) -> (Command, u32) {
        let a = Command::SendAck {
            code: ErrorCode::Ok,
            client_msg_id: u64::from(req),
            msg_id: im_shared::MsgId(1),
            seq: im_shared::Seq(1),
            server_time_ms: 0,
            prev_seq: im_shared::Seq(0),
        };
        (a, req)
    }

    #[test]
    fn reader_pauses_at_max_inflight_and_resumes_on_an_answer() {
        with_conn(|core, c| {
            let max = core.ctx.cfg.max_inflight;
            for r in 1..max as u32 {
                c.forwarded(Cmd::SendC2c, r);
                assert_eq!(c.pause(core), None, "{r} in flight");
            }
            // DeliverAck has no answer: it is not counted.
            c.forwarded(Cmd::DeliverAck, 0);
            assert_eq!(c.pause(core), None);
            c.forwarded(Cmd::SendC2c, max as u32);
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            // Pushes answer nothing.
            let deliver = Command::Kickout {
                reason: 1,
                message: String::new(),
            };
            c.answered(&frames(&[(deliver, 0)]));
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            // One answer, in a batch with a push, frees one place.
            let delivered = Command::Delivered {
                msg_id: im_shared::MsgId(3),
                recipient: UserId(2),
            };
            c.answered(&frames(&[(delivered, 0), ack(1)]));
            assert_eq!(c.pause(core), None);
            // A refusal is an answer too.
            c.forwarded(Cmd::SendC2c, 99);
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            let refusal = Command::Error {
                code: ErrorCode::Overloaded,
                message: "busy".into(),
            };
            c.answered(&frames(&[(refusal, 99)]));
            assert_eq!(c.pause(core), None);
        });
    }

    #[test]
    fn one_heavy_request_at_a_time_answered_by_its_reply_or_its_refusal() {
        with_conn(|core, c| {
            c.forwarded(Cmd::SendC2c, 1);
            c.forwarded(Cmd::SyncRequest, 2);
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            // The light request's answer does not free the heavy slot.
            c.answered(&frames(&[ack(1)]));
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            let page = Command::SyncPage {
                messages: Vec::new(),
                has_more: false,
                max_seq: im_shared::Seq(0),
            };
            c.answered(&frames(&[(page, 2)]));
            assert_eq!(c.pause(core), None);
            assert_eq!(c.inflight.get(), 0);
            // GroupInfo refused with an OpResult carrying its id.
            c.forwarded(Cmd::GroupInfo, 7);
            c.forwarded(Cmd::SendC2c, 8);
            let refused = Command::OpResult {
                code: ErrorCode::Forbidden,
                id: 0,
                message: "not a member".into(),
            };
            c.answered(&frames(&[(refused, 7)]));
            assert_eq!(c.heavy.get(), None);
            assert_eq!(c.inflight.get(), 1, "the light request is still out");
        });
    }

    #[test]
    fn the_answer_of_every_large_group_and_file_request_frees_its_place() {
        with_conn(|core, c| {
            let url = || Command::FileUrl {
                url: "u".into(),
                expires_ms: 1,
            };
            let cases = [
                (
                    Cmd::GroupSync,
                    Command::GroupSyncPage {
                        group: im_shared::GroupId(9),
                        head: im_shared::Seq(3),
                        has_more: false,
                        messages: Vec::new(),
                    },
                ),
                (
                    Cmd::GroupMembers,
                    Command::GroupMembersPage {
                        group: im_shared::GroupId(9),
                        total: 2,
                        more: false,
                        members: vec![(UserId(1), 0)],
                    },
                ),
                (Cmd::FileDownload, url()),
                (Cmd::GroupFileDownload, url()),
                (
                    Cmd::FileUpload,
                    Command::FileTicket {
                        url: "u".into(),
                        ticket: "t".into(),
                        expires_ms: 1,
                    },
                ),
            ];
            for (req, answer) in cases {
                // As many as a connection may have in flight, answered one by one: the reader
                // never stays paused once every answer is out.
                let max = core.ctx.cfg.max_inflight as u32;
                for r in 1..=max {
                    c.forwarded(req, r);
                    c.answered(&frames(&[(answer.clone(), r)]));
                    assert_eq!(c.pause(core), None, "{req:?}: {r} answered");
                }
                assert_eq!((c.inflight.get(), c.heavy.get()), (0, None), "{req:?}");
            }
            // A sync page of a large group may be 64 KiB: one at a time, like a timeline's.
            c.forwarded(Cmd::GroupSync, 5);
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            let refused = Command::OpResult {
                code: ErrorCode::NotMember,
                id: 0,
                message: "not a member".into(),
            };
            c.answered(&frames(&[(refused, 5)]));
            assert_eq!(c.pause(core), None);
        });
    }

    #[test]
    fn output_above_a_quarter_of_the_queue_pauses_until_below_an_eighth() {
        with_conn(|core, c| {
            let max = core.ctx.cfg.max_write_queue;
            c.out_bytes.set((max / 4 + 1) as u32);
            assert_eq!(c.pause(core), Some(Pause::Output));
            c.out_bytes.set((max / 8 + 1) as u32);
            assert_eq!(c.pause(core), Some(Pause::Output), "hysteresis");
            c.out_bytes.set((max / 8) as u32);
            assert_eq!(c.pause(core), None);
        });
    }

    #[test]
    fn a_reader_waiting_on_unanswered_requests_reads_on_after_the_timeout() {
        with_conn(|core, c| {
            for r in 0..core.ctx.cfg.max_inflight as u32 {
                c.forwarded(Cmd::SendC2c, r + 1);
            }
            c.paused_at.set(100);
            c.last_active.set(100);
            c.resume.set(Some(Waker::noop().clone()));
            let idle = core.ctx.cfg.idle_timeout.as_secs() as u32;
            // Before the timeout the wheel comes back at the escape time.
            assert_eq!(
                c.check_deadline(core, 101),
                Some(100 + INFLIGHT_TIMEOUT_SECS)
            );
            assert_eq!(c.pause(core), Some(Pause::Inflight));
            c.last_active.set(100 + INFLIGHT_TIMEOUT_SECS);
            assert_eq!(
                c.check_deadline(core, 100 + INFLIGHT_TIMEOUT_SECS),
                Some(100 + INFLIGHT_TIMEOUT_SECS + idle)
            );
            assert_eq!(c.pause(core), None, "the unanswered requests are forgotten");
            assert!(!c.reader_waits(), "the reader was woken");
        });
    }

    #[test]
    fn an_overflowing_queue_ends_with_slow_consumer_not_a_silent_cut() {
        with_conn(|core, c| {
            let max = core.ctx.cfg.max_write_queue;
            // No writer runs (the write half is not parked here), so frames stay queued.
            let big = Bytes::from(vec![0u8; max - 10]);
            c.enqueue(core, big);
            c.enqueue(core, Bytes::from(vec![1u8; 100]));
            assert!(c.closing.get());
            let out = c.out.borrow();
            assert_eq!(
                out.len(),
                2,
                "the overflowing frame is dropped, the error queued"
            );
            let mut last = BytesMut::from(&out[1][..]);
            let f = core.codec.decode(&mut last).unwrap().unwrap();
            assert_eq!(
                Command::decode(&f).unwrap(),
                Command::Error {
                    code: ErrorCode::SlowConsumer,
                    message: "the client does not read what it is sent".into()
                }
            );
            drop(out);
            assert_eq!(core.ctx.stats.closed_slow.load(Ordering::Relaxed), 1);
            // Nothing more is queued once closing.
            c.enqueue(core, Bytes::from_static(b"x"));
            assert_eq!(c.out.borrow().len(), 2);
        });
    }

    /// A plain connection has no task and no buffer while it waits: its record is most of what
    /// it costs the gate (issue 15: at most 500 B of RSS per idle connection in all). Keep it
    /// small; `Conn` plus its `Rc` counts must fit mimalloc's 192 B size class.
    #[test]
    fn a_connection_record_is_small() {
        let n = std::mem::size_of::<super::Conn>();
        assert!(n + 16 <= 192, "Conn is {n} bytes");
    }

    /// What a TLS / WebSocket connection carries besides a TCP one: the layered reader task
    /// (a plain one has none) and its `Layers` (plus, with TLS, rustls' connection state
    /// and buffers on the heap). Run with `--nocapture` to see the numbers.
    #[test]
    fn layered_sizes() {
        fn sz<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let fut = rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let stream = monoio::net::TcpStream::from_std(s).unwrap();
            let core = crate::core::test_core();
            let c = std::rc::Rc::new(super::Conn::new(
                im_shared::ConnId(1),
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                im_shared::UserId(1),
                0,
                0,
            ));
            let layers = core.ctx.transport.layers(true).unwrap().unwrap();
            let f = super::run_layered(core, c, stream, bytes::BytesMut::new(), layers);
            sz(&f)
        });
        let conn = std::mem::size_of::<super::Conn>();
        let layers = std::mem::size_of::<super::Layers>();
        let tls = std::mem::size_of::<rustls::ServerConnection>();
        println!(
            "Conn {conn} B, layered reader future {fut} B, \
             Layers {layers} B, rustls::ServerConnection {tls} B"
        );
        assert!(fut <= 768, "layered reader future is {fut} bytes");
    }
}
