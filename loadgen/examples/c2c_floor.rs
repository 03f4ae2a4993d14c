//! What this machine's loopback TCP alone allows for acknowledged one-to-one chat: no store, no
//! protocol parsing beyond fixed 32-byte frames, no routing beyond an index. It is the floor under
//! the c2c targets of issue 13 (server CPU per message, p99 send→deliver, the `max` rate).
//!
//! A broker process accepts N connections, one per user, and answers the five frames of a c2c
//! message as the gate and logic do together: a `Send` from A to B is answered with an `Ack` to A
//! and a `Deliver` to B; B's `DeliverAck` is answered with a `Delivered` to A. Its threads
//! (like the gate's cores) each own an edge-triggered epoll set of a share of the users, read every
//! ready socket, and write what a wake-up produced once per destination socket (the best any
//! server can do: one `send` per socket per wake-up). A client process (like the loadgen) holds the
//! N connections on one thread, sends messages between random pairs on a 1 ms tick (every message
//! due), acknowledges a connection's deliveries 100 ms after the first of them in one write (as
//! the loadgen and a phone do), and records send → deliver latency.
//!
//! ```sh
//! cargo build --release -p im-loadgen --example c2c_floor
//! target/release/examples/c2c_floor 2000 20000 10 2   # users, messages/s, seconds, broker threads
//! ```
//!
//! Latency is from the moment the message was queued for its `send` (CLOCK_MONOTONIC, both
//! processes) to the `recv` that returned its `Deliver`; CPU is each process's utime+stime over
//! the run, per message. BENCHMARKS.md, "What loopback TCP alone allows for c2c", has the numbers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{IntoRawFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod floor_util;
use floor_util::{arg, cpu_secs, mono_ns};

/// How long a client connection waits after a delivery before acknowledging it with every
/// delivery that came meanwhile (the loadgen's `ACK_DELAY`).
const ACK_DELAY: Duration = Duration::from_millis(100);

const FRAME: usize = 32;
const HELLO: u8 = 0;
const SEND: u8 = 1;
const ACK: u8 = 2;
const DELIVER: u8 = 3;
const DELIVER_ACK: u8 = 4;
const DELIVERED: u8 = 5;

/// kind, from, to, id, scheduled send time (ns).
#[derive(Clone, Copy)]
struct Frame {
    kind: u8,
    from: u32,
    to: u32,
    id: u64,
    at: u64,
}

impl Frame {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; FRAME];
        b[0] = self.kind;
        b[4..8].copy_from_slice(&self.from.to_le_bytes());
        b[8..12].copy_from_slice(&self.to.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.at.to_le_bytes());
        out.extend_from_slice(&b);
    }
    fn decode(b: &[u8]) -> Frame {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Frame {
            kind: b[0],
            from: u32_at(4),
            to: u32_at(8),
            id: u64_at(16),
            at: u64_at(24),
        }
    }
}

fn epoll_with(fds: &[(usize, RawFd)]) -> RawFd {
    // SAFETY: plain syscalls on descriptors this process owns.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    for &(user, fd) in fds {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: user as u64,
        };
        // SAFETY: as above; `ev` is a valid in-parameter.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(r, 0, "epoll_ctl");
    }
    ep
}

/// Reads everything `fd` holds (edge-triggered) into `carry`, then hands each whole frame to `f`.
/// Returns false once the peer closed.
fn drain(fd: RawFd, buf: &mut [u8], carry: &mut Vec<u8>, mut f: impl FnMut(Frame)) -> bool {
    let mut open = true;
    loop {
        // SAFETY: `buf` is valid for writes of its length; the fd is open.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r == 0 {
            open = false;
            break;
        }
        if r < 0 {
            break; // EAGAIN: read it all
        }
        carry.extend_from_slice(&buf[..r as usize]);
        if (r as usize) < buf.len() {
            break;
        }
    }
    let whole = carry.len() / FRAME * FRAME;
    for b in carry[..whole].chunks_exact(FRAME) {
        f(Frame::decode(b));
    }
    carry.drain(..whole);
    open
}

/// What one wake-up produced, one buffer per destination; `flush` writes each with one `send`.
struct Outbox {
    bufs: Vec<Vec<u8>>,
    dirty: Vec<usize>,
}

impl Outbox {
    fn new(users: usize) -> Outbox {
        Outbox {
            bufs: vec![Vec::new(); users],
            dirty: Vec::new(),
        }
    }
    fn push(&mut self, user: usize, f: Frame) {
        if self.bufs[user].is_empty() {
            self.dirty.push(user);
        }
        f.encode(&mut self.bufs[user]);
    }
    fn flush(&mut self, fds: &[RawFd]) {
        for user in self.dirty.drain(..) {
            let b = &mut self.bufs[user];
            // SAFETY: `b` is valid for reads of its length; the fd is open.
            let r = unsafe {
                libc::send(
                    fds[user],
                    b.as_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            assert_eq!(r, b.len() as isize, "a short or failed send");
            b.clear();
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        return client(&args);
    }
    let users = arg(&args, 1, 2000) as usize;
    let rate = arg(&args, 2, 5000);
    let secs = arg(&args, 3, 10);
    let threads = arg(&args, 4, 2).max(1) as usize;
    let msgs = rate * secs;
    assert!(users >= 2, "a message needs two users");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args([
            "--client",
            &addr.to_string(),
            &users.to_string(),
            &rate.to_string(),
            &secs.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client");
    let mut fds: Vec<RawFd> = vec![-1; users];
    for _ in 0..users {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut hello = [0u8; FRAME];
        s.read_exact(&mut hello).expect("hello");
        let h = Frame::decode(&hello);
        assert_eq!(h.kind, HELLO, "the first frame is a hello");
        s.set_nonblocking(true).expect("nonblocking");
        fds[h.from as usize] = s.into_raw_fd();
    }
    assert!(fds.iter().all(|&fd| fd >= 0), "a user connected twice");
    let stop = AtomicBool::new(false);
    let cpu0 = cpu_secs();
    let wall = Instant::now();
    let report = std::thread::scope(|s| {
        for t in 0..threads {
            let mine: Vec<(usize, RawFd)> =
                (t..users).step_by(threads).map(|u| (u, fds[u])).collect();
            let (fds, stop) = (&fds, &stop);
            s.spawn(move || broker(epoll_with(&mine), fds, stop));
        }
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "go").expect("go");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("the client's report");
        stop.store(true, Ordering::Relaxed);
        line
    });
    let cpu = cpu_secs() - cpu0;
    child.wait().expect("client exit");
    println!(
        "c2c floor: {users} users, {rate} msgs/s for {secs} s ({msgs} messages), {threads} broker thread(s)"
    );
    println!(
        "  broker cpu {cpu:.2} s over {:.1} s = {:.2} us per message",
        wall.elapsed().as_secs_f64(),
        cpu * 1e6 / msgs as f64
    );
    print!("  {report}");
}

fn broker(ep: RawFd, fds: &[RawFd], stop: &AtomicBool) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<Vec<u8>> = vec![Vec::new(); fds.len()];
    let mut out = Outbox::new(fds.len());
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` has room for its length; `ep` is this thread's epoll set.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        for ev in &events[..n.max(0) as usize] {
            let user = ev.u64 as usize;
            drain(fds[user], &mut buf, &mut carry[user], |f| match f.kind {
                SEND => {
                    out.push(f.from as usize, Frame { kind: ACK, ..f });
                    out.push(f.to as usize, Frame { kind: DELIVER, ..f });
                }
                DELIVER_ACK => out.push(
                    f.from as usize,
                    Frame {
                        kind: DELIVERED,
                        ..f
                    },
                ),
                k => panic!("unexpected frame {k} from user {user}"),
            });
        }
        out.flush(fds);
    }
}

/// A small xorshift: the pairs need not be good random numbers, only spread.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn client(args: &[String]) {
    let addr = args[2].clone();
    let users: usize = args[3].parse().expect("users");
    let rate: u64 = args[4].parse().expect("rate");
    let secs: u64 = args[5].parse().expect("secs");
    let msgs = rate * secs;
    let fds: Vec<RawFd> = (0..users)
        .map(|u| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut hello = Vec::new();
            Frame {
                kind: HELLO,
                from: u as u32,
                to: 0,
                id: 0,
                at: 0,
            }
            .encode(&mut hello);
            s.write_all(&hello).expect("hello");
            s.set_nonblocking(true).expect("nonblocking");
            s.into_raw_fd()
        })
        .collect();
    let ep = epoll_with(&fds.iter().copied().enumerate().collect::<Vec<_>>());
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go).expect("go");

    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<Vec<u8>> = vec![Vec::new(); users];
    let mut out = Outbox::new(users);
    // Deliveries not yet acknowledged, by connection, and the connections in the order of their
    // first unacknowledged delivery: as the loadgen (and a phone) does, a connection acknowledges
    // everything it got ACK_DELAY after the first of it, in one write.
    let mut unacked: Vec<Vec<u8>> = vec![Vec::new(); users];
    let mut dirty: std::collections::VecDeque<(Instant, usize)> = Default::default();
    let mut lat: Vec<u32> = Vec::with_capacity(msgs as usize);
    let (mut acks, mut delivered, mut sent) = (0u64, 0u64, 0u64);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let mut idle_since = Instant::now();
    while acks < msgs || delivered < msgs || (lat.len() as u64) < msgs {
        // Every due message, as the loadgen's sender does on its 1 ms tick.
        let target = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(msgs);
        while sent < target {
            let a = (next(&mut x) % users as u64) as usize;
            let b = (a + 1 + (next(&mut x) % (users as u64 - 1)) as usize) % users;
            let f = Frame {
                kind: SEND,
                from: a as u32,
                to: b as u32,
                id: sent,
                at: mono_ns(),
            };
            out.push(a, f);
            sent += 1;
        }
        let now = Instant::now();
        while let Some(&(first, user)) = dirty.front() {
            if now.duration_since(first) < ACK_DELAY {
                break;
            }
            dirty.pop_front();
            let b = std::mem::take(&mut unacked[user]);
            if out.bufs[user].is_empty() {
                out.dirty.push(user);
            }
            out.bufs[user].extend_from_slice(&b);
        }
        out.flush(&fds);
        // SAFETY: `events` has room for its length; `ep` is this thread's epoll set.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 1) };
        if n > 0 {
            idle_since = Instant::now();
        } else if sent == msgs && idle_since.elapsed() >= ACK_DELAY * 50 {
            break; // nothing for 5 s after the last send: report what came
        }
        for ev in &events[..n.max(0) as usize] {
            let user = ev.u64 as usize;
            drain(fds[user], &mut buf, &mut carry[user], |f| match f.kind {
                ACK => acks += 1,
                DELIVER => {
                    lat.push((mono_ns().saturating_sub(f.at) / 1000) as u32);
                    if unacked[user].is_empty() {
                        dirty.push_back((Instant::now(), user));
                    }
                    Frame {
                        kind: DELIVER_ACK,
                        ..f
                    }
                    .encode(&mut unacked[user]);
                }
                DELIVERED => delivered += 1,
                k => panic!("unexpected frame {k} to user {user}"),
            });
        }
    }
    let cpu = cpu_secs() - cpu0;
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |v| *v as f64 / 1000.0)
    };
    println!(
        "client: sent {sent}, acked {acks}, delivered {} (notices {delivered}); send→deliver p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms; cpu {cpu:.2} s = {:.2} us per message",
        lat.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        lat.last().map_or(0.0, |v| *v as f64 / 1000.0),
        cpu * 1e6 / sent.max(1) as f64
    );
    std::io::stdout().flush().expect("flush");
}
