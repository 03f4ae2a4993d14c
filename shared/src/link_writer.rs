//! The writing end of the distributed shape's TCP links (gate → logic: `gate/src/links.rs`;
//! logic → gate: `logic/src/links.rs`; logic → logic: `logic/src/peer.rs`): **write-through**.
//! The only I/O of this crate. A sender (a gate core or a logic worker) encodes its messages into
//! the link's buffer and, when nothing is waiting to be written before them, writes them itself
//! at once with a non-blocking `send`; only what the socket does not take is left to the link's
//! flusher thread, which writes it with blocking writes and keeps the order.
//!
//! Before this, every batch went through a channel to a writer thread of its own: one thread
//! wake-up per batch on each side of every hop (on the project's 2-vCPU VM a wake-up of an idle
//! thread costs ~15 µs, more than the write), and a message crossing gate → logic → logic →
//! gate woke four such threads (`docs/BENCHMARKS.md`, "The distributed shape").
//!
//! Order: the buffer is non-empty exactly while the flusher owns the socket (`flushing`); a
//! sender that finds it so appends behind the flusher's bytes, and never writes itself. Bytes
//! leave in the order they were appended, under one lock.
//!
//! Bound: the bytes waiting in the buffer are at most `max_pending`; a send that would pass it is
//! refused whole ([`Sent::Overflow`]) and the caller resets the link (its peer does not read).
//!
//! Tags: a send may leave tags with its bytes (the gate's: the client frames in them, to answer
//! them `Unavailable` if the link fails before they are written). They count as waiting until
//! the flusher takes the bytes; [`LinkWriter::detach`] hands back those of bytes never taken.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

/// What became of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Written to the socket (or nothing to write).
    Written,
    /// Left to the flusher, behind bytes that wait.
    Queued,
    /// No connection (of that epoch): dropped.
    Dropped,
    /// The bound would be passed: refused, nothing of it appended.
    Overflow,
}

/// Encodes a ping into the buffer (or declines: nothing appended).
pub type Ping<'a> = dyn Fn(&mut BytesMut) + 'a;

/// One link's writer (one connection at a time; see the module docs).
pub struct LinkWriter<T = ()> {
    st: Mutex<St<T>>,
    cv: Condvar,
    max_pending: usize,
    /// `st.tags.len()`, readable without the lock (the gate asks it for every client frame).
    waiting: AtomicUsize,
}

struct St<T> {
    /// The connection written to, and its epoch; `None` while there is none.
    sock: Option<(Arc<TcpStream>, u64)>,
    /// Bytes that wait for the flusher (non-empty exactly while `flushing`).
    out: BytesMut,
    /// Tags of the bytes in `out`.
    tags: Vec<T>,
    /// The flusher owns the socket's writes.
    flushing: bool,
    /// A write failed: the connection is over (the flusher returns).
    broken: bool,
    /// When bytes last went out (the flusher pings after a quiet `ping_every`).
    wrote_at: Instant,
}

impl LinkWriter<()> {
    /// Encodes with `encode` and writes it now if nothing waits, else behind what waits (one
    /// tag: the send). With `epoch`, only on the connection of that epoch (else dropped).
    pub fn send(&self, epoch: Option<u64>, encode: impl FnOnce(&mut BytesMut)) -> Sent {
        self.send_tagged(epoch, |out, tags| {
            encode(out);
            tags.push(());
        })
        .0
    }

    /// [`LinkWriter::send`] that keeps what waits within `limit` bytes, except that it always
    /// takes a send when nothing waits; past it the send is refused as [`Sent::Overflow`] and,
    /// unlike a send past the writer's own bound, nothing is wrong with the link: the caller
    /// tries again once the flusher has written some (a replay paced to the link).
    pub fn send_within(
        &self,
        epoch: Option<u64>,
        limit: usize,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Sent {
        self.send_inner(epoch, Some(limit), |out, tags| {
            encode(out);
            tags.push(());
        })
        .0
    }
}

impl<T> LinkWriter<T> {
    pub fn new(max_pending: usize) -> Arc<LinkWriter<T>> {
        Arc::new(LinkWriter {
            st: Mutex::new(St {
                sock: None,
                out: BytesMut::new(),
                tags: Vec::new(),
                flushing: false,
                broken: false,
                wrote_at: Instant::now(),
            }),
            cv: Condvar::new(),
            max_pending,
            waiting: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, St<T>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes from now on go to `sock` (a new connection, of `epoch`); whatever waited for an
    /// earlier one is dropped. A partition ends the connection within [`UNACKED_MAX`], not TCP's
    /// minutes ([`bound_unacked`]; should the option fail, which no Linux since 2.6.37 does, the
    /// link still works, with TCP's own timeouts).
    pub fn attach(&self, sock: TcpStream, epoch: u64) {
        let _ = bound_unacked(&sock, UNACKED_MAX);
        let mut st = self.lock();
        st.sock = Some((Arc::new(sock), epoch));
        st.out.clear();
        st.tags.clear();
        self.waiting.store(0, Ordering::Relaxed);
        st.flushing = false;
        st.broken = false;
        st.wrote_at = Instant::now();
        self.cv.notify_all();
    }

    /// No connection any more: what waits is dropped (its tags are returned), later sends are
    /// dropped, the flusher returns.
    pub fn detach(&self) -> Vec<T> {
        let mut st = self.lock();
        st.sock = None;
        st.out.clear();
        st.flushing = false;
        self.cv.notify_all();
        self.waiting.store(0, Ordering::Relaxed);
        std::mem::take(&mut st.tags)
    }

    /// Shuts the connection down (a reset: its peer does not read); the flusher returns, and
    /// the link's reader sees the end.
    pub fn shut_down(&self) {
        let mut st = self.lock();
        if let Some((s, _)) = &st.sock {
            let _ = s.shutdown(Shutdown::Both);
        }
        st.broken = true;
        st.out.clear();
        st.flushing = false;
        self.cv.notify_all();
    }

    /// Tags waiting for the flusher, without taking the writer's lock.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// `(tags, bytes)` waiting for the flusher.
    pub fn pending(&self) -> (usize, usize) {
        let st = self.lock();
        (st.tags.len(), st.out.len())
    }

    /// Encodes with `encode` (bytes, and tags for them) and writes them now if nothing waits,
    /// else behind what waits. With `epoch`, only on the connection of that epoch. A send that is
    /// not kept (dropped, refused) hands its tags back.
    pub fn send_tagged(
        &self,
        epoch: Option<u64>,
        encode: impl FnOnce(&mut BytesMut, &mut Vec<T>),
    ) -> (Sent, Vec<T>) {
        self.send_inner(epoch, None, encode)
    }

    /// `send_tagged`, and with `within`, [`LinkWriter::send_within`]'s limit.
    fn send_inner(
        &self,
        epoch: Option<u64>,
        within: Option<usize>,
        encode: impl FnOnce(&mut BytesMut, &mut Vec<T>),
    ) -> (Sent, Vec<T>) {
        let mut st = self.lock();
        let mut tags = Vec::new();
        let sock = match &st.sock {
            Some((s, e)) if !st.broken && epoch.is_none_or(|want| want == *e) => s.clone(),
            _ => {
                encode(&mut BytesMut::new(), &mut tags);
                return (Sent::Dropped, tags);
            }
        };
        let before = st.out.len();
        encode(&mut st.out, &mut tags);
        if st.out.len() == before {
            return (Sent::Written, Vec::new());
        }
        let over = match within {
            Some(limit) => before > 0 && st.out.len() > limit.min(self.max_pending),
            None => st.out.len() > self.max_pending,
        };
        if over {
            st.out.truncate(before);
            return (Sent::Overflow, tags);
        }
        if st.flushing {
            st.tags.append(&mut tags);
            self.waiting.store(st.tags.len(), Ordering::Relaxed);
            return (Sent::Queued, Vec::new());
        }
        match write_now(&sock, &st.out) {
            Ok(n) if n == st.out.len() => {
                st.out.clear();
                st.wrote_at = Instant::now();
                (Sent::Written, Vec::new())
            }
            Ok(n) => {
                st.out.advance(n);
                st.tags.append(&mut tags);
                self.waiting.store(st.tags.len(), Ordering::Relaxed);
                st.flushing = true;
                self.cv.notify_all();
                (Sent::Queued, Vec::new())
            }
            Err(_) => {
                // Part of it may have arrived: as with a failed write of the flusher, its tags
                // are not handed back (the client times out and retries).
                let _ = sock.shutdown(Shutdown::Both);
                st.broken = true;
                st.out.clear();
                self.cv.notify_all();
                (Sent::Dropped, Vec::new())
            }
        }
    }

    /// The flusher of the connection of `epoch`: writes what senders left, with blocking writes,
    /// until that connection is detached, replaced or broken (then `Err`). With `ping`, encodes a
    /// ping after `every` without a write.
    pub fn flush(&self, epoch: u64, ping: Option<(Duration, &Ping)>) -> std::io::Result<()> {
        let over = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let mut st = self.lock();
        loop {
            let sock = match &st.sock {
                Some((s, e)) if *e == epoch && !st.broken => s.clone(),
                Some((_, e)) if *e == epoch => return Err(over()),
                _ => return Ok(()),
            };
            if !st.flushing {
                let wait = match ping {
                    Some((every, encode)) => {
                        let quiet = st.wrote_at.elapsed();
                        if quiet >= every {
                            // (The encoder may decline: then the next try is `every` later.)
                            encode(&mut st.out);
                            st.wrote_at = Instant::now();
                            st.flushing = !st.out.is_empty();
                            continue;
                        }
                        every - quiet
                    }
                    None => Duration::from_secs(3600),
                };
                st = self
                    .cv
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let chunk = st.out.split();
            st.tags.clear();
            self.waiting.store(0, Ordering::Relaxed);
            drop(st);
            let r = (&*sock).write_all(&chunk);
            st = self.lock();
            st.wrote_at = Instant::now();
            if r.is_err() {
                let _ = sock.shutdown(Shutdown::Both);
                if st.sock.as_ref().is_some_and(|(_, e)| *e == epoch) {
                    st.broken = true;
                    st.out.clear();
                    st.flushing = false;
                }
                return Err(over());
            }
            if st.out.is_empty() {
                st.flushing = false;
            }
        }
    }
}

/// How long the bytes a link sent may stay unacknowledged by the peer's kernel before the
/// connection is aborted ([`bound_unacked`]). A partition (packets dropped, no reset) otherwise
/// holds a link "up" for TCP's whole retransmission schedule (about 15 minutes), and after the
/// heal its backlog waits for the next retransmission, which backs off exponentially: 5 s after
/// a 7 s partition in a chaos run (issue 16's partitions), minutes after a long one.
pub const UNACKED_MAX: Duration = Duration::from_secs(5);

/// Aborts `sock`'s connection once bytes it sent stay unacknowledged for `max`
/// (`TCP_USER_TIMEOUT`, RFC 5482; the kernel also shortens the retransmission backoff to fit in
/// it). A link's next write (or its flusher's blocking one) then fails, and the link reconnects
/// in a new epoch: the senders' replays take over (`logic/src/peer.rs`), or a gate answers what
/// it did not write with `Unavailable` and closes its users of that node (`gate/src/links.rs`).
/// Links that are quiet still send a `Ping` every few seconds, so a partition of a quiet link is
/// found too.
pub fn bound_unacked(sock: &TcpStream, max: Duration) -> std::io::Result<()> {
    let ms = libc::c_uint::try_from(max.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the option value is a `c_uint` that lives across the call; the descriptor is the
    // stream's.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One non-blocking `send` of `buf` (the socket itself stays blocking for the flusher): the
/// bytes the socket took, 0 if it had no room.
fn write_now(sock: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is readable for its length; the descriptor is the stream's.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn read_exact_within(s: &mut TcpStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut v = vec![0u8; n];
        s.read_exact(&mut v).expect("bytes within 10 s");
        v
    }

    #[test]
    fn a_send_with_nothing_waiting_is_written_by_the_sender_itself() {
        let (a, mut b) = pair();
        let w = LinkWriter::new(1 << 20);
        w.attach(a, 1);
        // No flusher runs: the bytes can only have been written by `send`.
        assert_eq!(
            w.send(None, |o| o.extend_from_slice(b"hello")),
            Sent::Written
        );
        assert_eq!(
            w.send(Some(1), |o| o.extend_from_slice(b" you")),
            Sent::Written
        );
        assert_eq!(read_exact_within(&mut b, 9), b"hello you");
        assert_eq!(w.pending(), (0, 0));
        assert_eq!(
            w.send(Some(2), |o| o.extend_from_slice(b"x")),
            Sent::Dropped
        );
        w.detach();
        assert_eq!(w.send(None, |o| o.extend_from_slice(b"x")), Sent::Dropped);
    }

    /// A reader that stops makes the socket full: later sends queue behind the flusher's bytes
    /// (never written past them), the bound refuses a send whole, and once the reader reads
    /// everything arrives once, in order.
    #[test]
    fn what_the_socket_does_not_take_leaves_in_order_through_the_flusher() {
        let (a, mut b) = pair();
        const BOUND: usize = 4 << 20;
        let w = LinkWriter::new(BOUND);
        w.attach(a, 7);
        let mut sent = 0u32;
        let mut queued = false;
        let mut overflow = false;
        // 1 KiB records numbered in order, until the bound refuses one.
        while !overflow {
            assert!(sent < 1_000_000, "the bound never refused a send");
            let r = w.send(None, |o| {
                o.extend_from_slice(&sent.to_be_bytes());
                o.extend_from_slice(&[0xAB; 1020]);
            });
            match r {
                Sent::Written => assert!(!queued, "written past queued bytes"),
                Sent::Queued => queued = true,
                Sent::Overflow => overflow = true,
                Sent::Dropped => panic!("dropped"),
            }
            if r != Sent::Overflow {
                sent += 1;
            }
        }
        let (_, bytes) = w.pending();
        assert!(bytes <= BOUND && bytes > 0, "{bytes} pending");
        let flusher = {
            let w = w.clone();
            std::thread::spawn(move || w.flush(7, None))
        };
        for i in 0..sent {
            let rec = read_exact_within(&mut b, 1024);
            assert_eq!(u32::from_be_bytes(rec[..4].try_into().unwrap()), i);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.pending() != (0, 0) {
            assert!(Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(5));
        }
        w.detach();
        assert!(flusher.join().unwrap().is_ok());
    }

    /// A peer whose kernel acknowledges nothing more for [`bound_unacked`]'s time (here: it
    /// stops reading, so its window stays shut, as a stopped or partitioned node's would) has
    /// its connection aborted: the flusher's blocking write fails and a sender is dropped, so the
    /// link reconnects. Without the bound the flusher would wait in its write for TCP's ~15
    /// minutes.
    #[test]
    fn a_connection_whose_peer_acknowledges_nothing_is_aborted_after_the_bound() {
        let (a, _b) = pair(); // never read
        let same = a.try_clone().unwrap();
        let w = LinkWriter::new(64 << 20);
        w.attach(a, 3);
        // Shorter than `attach`'s UNACKED_MAX, for the test's sake.
        bound_unacked(&same, Duration::from_millis(500)).unwrap();
        // Until the socket takes no more (the peer's window and our send buffer are full).
        let mut n = 0;
        while w.send(None, |o| o.extend_from_slice(&[7; 64 * 1024])) == Sent::Written {
            n += 1;
            assert!(n < 10_000, "the socket never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let w = w.clone();
            std::thread::spawn(move || tx.send(w.flush(3, None)));
        }
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the flusher's write still blocks 20 s later: the connection was not aborted");
        assert!(r.is_err(), "{r:?}");
        assert_eq!(w.send(None, |o| o.extend_from_slice(b"x")), Sent::Dropped);
    }

    /// The gate's tags (client frames) of bytes that never left come back at a detach, to be
    /// answered; those of written bytes do not, nor those of a send into no connection.
    #[test]
    fn tags_of_bytes_never_taken_come_back_at_a_detach() {
        let (a, _b) = pair(); // never read
        let w: Arc<LinkWriter<u32>> = LinkWriter::new(64 << 20);
        w.attach(a, 1);
        let mut i = 0u32;
        loop {
            assert!(i < 100_000, "the socket never filled");
            let (r, back) = w.send_tagged(None, |o, t| {
                o.extend_from_slice(&[0; 4096]);
                t.push(i);
            });
            assert!(back.is_empty());
            i += 1;
            match r {
                Sent::Written => {}
                Sent::Queued => break,
                other => panic!("{other:?}"),
            }
        }
        let (r, _) = w.send_tagged(None, |o, t| {
            o.extend_from_slice(b"x");
            t.push(i);
        });
        assert_eq!(r, Sent::Queued);
        assert_eq!(w.pending().0, 2);
        assert_eq!(w.detach(), vec![i - 1, i]);
        assert_eq!(w.pending(), (0, 0));
        let (r, back) = w.send_tagged(None, |o, t| {
            o.extend_from_slice(b"y");
            t.push(99);
        });
        assert_eq!((r, back), (Sent::Dropped, vec![99]));
    }

    #[test]
    fn the_flusher_pings_a_quiet_link_and_returns_when_it_is_shut_down() {
        let (a, mut b) = pair();
        let w = LinkWriter::new(1 << 20);
        w.attach(a, 1);
        let flusher = {
            let w = w.clone();
            std::thread::spawn(move || {
                let ping = |o: &mut BytesMut| o.extend_from_slice(b"P");
                w.flush(1, Some((Duration::from_millis(20), &ping)))
            })
        };
        assert_eq!(read_exact_within(&mut b, 2), b"PP");
        w.shut_down();
        assert!(
            flusher.join().unwrap().is_err(),
            "a shut-down link is an error"
        );
        assert_eq!(w.send(None, |o| o.extend_from_slice(b"x")), Sent::Dropped);
    }

    /// `send_within` refuses past its limit while bytes wait (the link stays usable: the next
    /// send goes through), takes anything when nothing waits, and never passes the bound.
    #[test]
    fn a_send_within_a_limit_is_refused_past_it_and_the_link_stays() {
        let (a, mut b) = pair();
        let w = LinkWriter::new(4 << 20);
        w.attach(a, 3);
        // Nothing waits: taken even above the limit (written, or partly queued).
        let big = w.send_within(Some(3), 1024, |o| o.extend_from_slice(&[1; 8192]));
        assert!(matches!(big, Sent::Written | Sent::Queued), "{big:?}");
        // Fill the socket until bytes wait, then a send past the limit is refused whole.
        while w.pending().1 == 0 {
            w.send(Some(3), |o| o.extend_from_slice(&[2; 65536]));
        }
        let (_, before) = w.pending();
        let limit = before + 100;
        assert_eq!(
            w.send_within(Some(3), limit, |o| o.extend_from_slice(&[3; 200])),
            Sent::Overflow
        );
        assert_eq!(w.pending().1, before, "nothing of it kept");
        assert_eq!(
            w.send_within(Some(3), limit, |o| o.extend_from_slice(&[4; 50])),
            Sent::Queued,
            "within the limit"
        );
        assert_eq!(w.send_within(Some(4), usize::MAX, |_| {}), Sent::Dropped);
        // The link is fine: a flusher writes everything once the reader reads.
        let flusher = {
            let w = w.clone();
            std::thread::spawn(move || w.flush(3, None))
        };
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let mut last = 0u8;
        while w.pending().1 > 0 || got == 0 || last != 4 {
            let n = b.read(&mut buf).expect("bytes within 10 s");
            assert!(n > 0);
            got += n;
            last = buf[n - 1];
        }
        assert_eq!(last, 4, "the last send arrived last");
        w.detach();
        let _ = flusher.join().unwrap();
    }
}
