//! Plain TCP connections without a task each: one epoll set per core tells which sockets have
//! bytes or room, one **poller** task reads them and one **sender** task writes them.
//!
//! A logged-in connection that says nothing (almost all of a gate's connections, almost all of
//! the time) then costs its [`Conn`] record, its entries in the core's maps and the kernel's
//! socket: no task, no future, no read buffer, no operation in flight. Edge-triggered epoll
//! (`EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`, registered once when the connection is adopted)
//! reports a socket when it becomes readable or, after a write that did not fit, writable; the
//! epoll set's own descriptor is awaited through the core's io_uring (a `PollAdd`), so the core
//! still sleeps in one place.
//!
//! - **Reading** ([`read_ready`]): frames are handled as they are decoded; the socket is read
//!   (`recv` with `MSG_DONTWAIT`, through the core's scratch buffer, conn.rs `recv_now`) until it
//!   is empty, as edge triggering requires, or until the connection must pause (backpressure:
//!   requests in flight, output pending). A paused connection keeps its unread bytes in the
//!   socket; it is put on the core's `paused` list and read again when it may go on.
//! - **Writing** ([`flush`]): `Conn::enqueue` marks the connection dirty; the sender writes every
//!   dirty connection's queue with one `sendmsg` of up to [`MAX_IOV`] frames, after the round of
//!   tasks that queued them (so a round's frames to one connection leave in one write). A write
//!   that does not fit waits for `EPOLLOUT`.
//! - **Closing**: a closing connection is flushed, then finalized here (logic is told, the socket
//!   is shut down and closed), or after `CLOSE_GRACE` if the flush hangs (the timer wheel
//!   shuts the socket down and the resulting event finalizes it).
//!
//! TLS and WebSocket connections keep their reader and writer tasks (conn.rs `run_layered`).

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Buf;

use crate::conn::{self, Conn, Drain};
use crate::core::Core;

/// Frames written with one `sendmsg` at most (`IOV_MAX` is 1024; a round rarely has more than a
/// few for one connection).
pub const MAX_IOV: usize = 64;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;
/// Bytes one connection may have read in one turn before the others get theirs.
const READ_BUDGET: usize = 256 * 1024;

/// A core's epoll set.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> std::io::Result<Epoll> {
        // SAFETY: plain syscall; the descriptor it returns is owned by the `OwnedFd`.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` (a connection's socket) for readability, writability after a full write,
    /// and hang-ups, edge-triggered, tagged with the connection's serial.
    pub fn add(&self, fd: RawFd, serial: u32) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: u64::from(serial),
        };
        // SAFETY: plain syscall on descriptors this core owns; `ev` outlives the call.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The events ready now (no waiting), into `out`.
    fn ready(&self, out: &mut [libc::epoll_event]) -> usize {
        loop {
            // SAFETY: `out` is writable for its length.
            let n = unsafe {
                libc::epoll_wait(self.fd.as_raw_fd(), out.as_mut_ptr(), out.len() as i32, 0)
            };
            if n >= 0 {
                return n as usize;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return 0;
            }
        }
    }
}

/// The poller task of a core: waits until its epoll set has events (or a paused connection may
/// go on) and reads the connections concerned.
pub async fn poller(core: Rc<Core>) {
    // The epoll set is awaited through the runtime, which only polls sockets: a duplicate of its
    // descriptor is wrapped as one (only `readable` is ever called on it: a `PollAdd`).
    // SAFETY: plain syscall; the duplicate is owned by the wrapper below.
    let dup = unsafe { libc::fcntl(core.epoll.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        tracing::error!(
            core = core.ctx.core,
            "epoll: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let std_ep = unsafe { std::os::unix::net::UnixStream::from_raw_fd(dup) };
    let ep = match monoio::net::UnixStream::from_std(std_ep) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(core = core.ctx.core, "epoll: {e}");
            return;
        }
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        // Connections that paused and may go on now, and those that used up their turn, in the
        // order they stopped; the ones still paused stay on the list, waiting to be woken.
        let again = std::mem::take(&mut *core.paused.borrow_mut());
        for c in again {
            if may_read(&core, &c) {
                read_ready(&core, &c);
            } else {
                c.set_reader_waker(core.poller_waker.borrow().clone());
                core.paused.borrow_mut().push(c);
            }
        }
        loop {
            let n = core.epoll.ready(&mut events);
            for ev in &events[..n] {
                let (bits, serial) = (ev.events, ev.u64 as u32);
                let Some(c) = core.conns.borrow().get(&serial).cloned() else {
                    continue;
                };
                on_event(&core, &c, bits);
            }
            if n < EVENTS {
                break;
            }
        }
        if core.stopping.get() {
            return;
        }
        let mut ready = std::pin::pin!(ep.readable(false));
        std::future::poll_fn(|cx| {
            *core.poller_waker.borrow_mut() = Some(cx.waker().clone());
            if core.paused.borrow().iter().any(|c| may_read(&core, c)) {
                return Poll::Ready(());
            }
            ready.as_mut().poll(cx).map(|_| ())
        })
        .await;
    }
}

/// Whether a connection on the `paused` list may be read now (or must be looked at: it closes).
fn may_read(core: &Core, c: &Conn) -> bool {
    c.closing() || !c.reader_paused(core)
}

fn on_event(core: &Core, c: &Rc<Conn>, bits: u32) {
    const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
    if c.closing() {
        mark_dirty(core, c); // the sender finishes it once its output is out (or cannot be)
        return;
    }
    if bits & libc::EPOLLOUT as u32 != 0 && c.write_blocked.replace(false) {
        mark_dirty(core, c);
    }
    if bits & READ != 0 && !c.unread.get() {
        read_ready(core, c);
    }
}

/// Reads and handles what `c`'s socket holds: until it is empty, the connection must pause or
/// stop, or it used its turn.
pub fn read_ready(core: &Core, c: &Rc<Conn>) {
    if c.finalized.get() {
        return;
    }
    let mut buf = c.rbuf.take().map(|b| *b).unwrap_or_default();
    let mut budget = READ_BUDGET;
    // The last `recv` was short: it took everything there was. What arrives later is a new edge
    // (every segment queued on a socket wakes its epoll entry), so the `recv` that would only
    // say EAGAIN is skipped.
    let mut emptied = false;
    let fd = c.raw_fd();
    loop {
        match conn::drain_frames(core, c, &mut buf) {
            Drain::Stop => break,
            Drain::Paused => {
                // The rest stays in `buf` and in the socket; TCP slows the client down.
                c.unread.set(true);
                c.set_reader_waker(core.poller_waker.borrow().clone());
                core.paused.borrow_mut().push(c.clone());
                break;
            }
            Drain::More => {}
        }
        if c.closing() {
            break;
        }
        if emptied {
            c.unread.set(false);
            break;
        }
        if budget == 0 {
            // More may be there: after the others (edge triggering reports it no more).
            c.unread.set(true);
            core.paused.borrow_mut().push(c.clone());
            break;
        }
        match conn::recv_now(core, fd, &mut buf) {
            Ok(conn::Recv::Got { n, full }) => {
                budget = budget.saturating_sub(n);
                emptied = !full;
            }
            Ok(conn::Recv::Nothing) => {
                c.unread.set(false);
                break;
            }
            Ok(conn::Recv::Closed) | Err(_) => {
                // The client is gone (or closed its side): what is queued still goes out.
                c.close_after_flush(core);
                break;
            }
        }
    }
    if c.closing() {
        c.unread.set(false);
        mark_dirty(core, c);
    }
    if !buf.is_empty() {
        c.rbuf.set(Some(Box::new(buf))); // else nothing pending: no buffer held while waiting
    }
}

/// Queues `c` for the sender (once).
pub fn mark_dirty(core: &Core, c: &Rc<Conn>) {
    if c.dirty.replace(true) {
        return;
    }
    core.dirty.borrow_mut().push(c.clone());
    if let Some(w) = core.sender_waker.borrow_mut().take() {
        w.wake();
    }
}

/// The sender task of a core: writes the queues of the connections marked dirty.
pub async fn sender(core: Rc<Core>) {
    loop {
        std::future::poll_fn(|cx| {
            if core.dirty.borrow().is_empty() {
                *core.sender_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let dirty = std::mem::take(&mut *core.dirty.borrow_mut());
        for c in dirty {
            c.dirty.set(false);
            flush(&core, &c);
        }
    }
}

/// Writes what `c` has queued, as far as the socket takes it; finalizes a closing connection
/// once everything is out (or cannot be).
pub fn flush(core: &Core, c: &Rc<Conn>) {
    if c.finalized.get() {
        return;
    }
    let fd = c.raw_fd();
    loop {
        let written = {
            let out = c.out.borrow();
            if out.is_empty() {
                break;
            }
            let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let mut k = 0;
            for b in out.iter().take(MAX_IOV) {
                iov[k] = libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                };
                k += 1;
            }
            // SAFETY: a zeroed msghdr is valid; the iovecs point into `out`'s frames, borrowed
            // for the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = k as _;
            // SAFETY: plain syscall on the connection's socket (open until finalized).
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n >= 0 {
                Ok(n as usize)
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        match written {
            Ok(n) => c.written(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Full: `EPOLLOUT` brings it back.
                c.write_blocked.set(true);
                return;
            }
            Err(_) => {
                // The client is gone: nothing queued can reach it.
                c.hard_close();
                break;
            }
        }
    }
    if c.closing() {
        finalize(core, c);
    }
}

/// The end of a plain connection: logic is told, the socket is shut down and closed.
fn finalize(core: &Core, c: &Rc<Conn>) {
    if c.finalized.replace(true) {
        return;
    }
    core.forget(c);
    if let Some(fd) = c.take_sock() {
        // SAFETY: plain syscall on a descriptor we own until the drop below closes it.
        unsafe {
            libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
        }
        drop(fd); // closing it also removes it from the epoll set
        core.ctx.stats.sockets.fetch_sub(1, Ordering::Relaxed);
    }
    c.rbuf.take();
}

/// Drops the first `n` bytes of the queue `out` (whole frames, then part of one).
pub fn advance(out: &mut std::collections::VecDeque<bytes::Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = out.front_mut() else {
            return;
        };
        if front.len() <= n {
            n -= front.len();
            out.pop_front();
        } else {
            front.advance(n);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    /// A partial write leaves the unwritten tail of the frame it stopped in, and whole frames
    /// after it, in order.
    #[test]
    fn advance_drops_whole_frames_then_part_of_one() {
        let mut q: VecDeque<Bytes> = [&b"abc"[..], b"defg", b"hi"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        super::advance(&mut q, 5);
        assert_eq!(q, [Bytes::from_static(b"fg"), Bytes::from_static(b"hi")]);
        super::advance(&mut q, 2);
        assert_eq!(q, [Bytes::from_static(b"hi")]);
        super::advance(&mut q, 10);
        assert!(q.is_empty());
    }
}
