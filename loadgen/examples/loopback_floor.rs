//! What this machine's loopback TCP alone allows for a large group's fan-out: no server, no
//! protocol, no store. A sender process writes one small frame per "post" to each of N sockets
//! (as a gate core writes one `GroupDeliver` per online member: one `send` per socket), and a
//! reader process reads them (as the loadgen does: edge-triggered epoll, one `recv` per ready
//! socket) and records post → read latency. Posts are paced evenly, like the loadgen's.
//!
//! ```sh
//! cargo run --release -p im-loadgen --example loopback_floor -- 10000 10 20 2 1
//! #                                        connections, posts/s, seconds, sender threads, reader threads
//! ```
//!
//! The two processes split the sockets (the open-file limit is per process). Latency is from the
//! post's scheduled time (CLOCK_MONOTONIC, shared by both processes) to the `recv` that returned
//! it; CPU is each process's utime+stime over the run. BENCHMARKS.md, "Large groups", has the
//! numbers and how they bound the large-group target.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod floor_util;
use floor_util::{arg, cpu_secs, mono_ns};
const FRAME: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--reader") {
        return reader(&args);
    }
    let conns = arg(&args, 1, 10_000) as usize;
    let rate = arg(&args, 2, 10);
    let secs = arg(&args, 3, 20);
    let senders = arg(&args, 4, 2).max(1) as usize;
    let readers = arg(&args, 5, 1).max(1);
    let posts = rate * secs;

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args([
            "--reader",
            &addr.to_string(),
            &conns.to_string(),
            &posts.to_string(),
            &readers.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the reader");
    let mut accepted: Vec<TcpStream> = Vec::with_capacity(conns);
    while accepted.len() < conns {
        let (s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        s.set_nonblocking(true).expect("nonblocking");
        accepted.push(s);
    }
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert_eq!(line.trim(), "ready", "the reader did not get ready");

    let fds: Vec<RawFd> = accepted.iter().map(|s| s.as_raw_fd()).collect();
    let start = mono_ns() + 50_000_000;
    let period = 1_000_000_000 / rate.max(1);
    let cpu0 = cpu_secs();
    let wall = Instant::now();
    std::thread::scope(|s| {
        for part in fds.chunks(conns.div_ceil(senders)) {
            s.spawn(move || {
                let mut frame = [0u8; FRAME];
                for k in 0..posts {
                    let at = start + k * period;
                    let now = mono_ns();
                    if at > now {
                        std::thread::sleep(Duration::from_nanos(at - now));
                    }
                    frame[..8].copy_from_slice(&at.to_le_bytes());
                    for &fd in part {
                        // SAFETY: `fd` is an open socket of `accepted`; `frame` outlives the call.
                        let r = unsafe {
                            libc::send(
                                fd,
                                frame.as_ptr().cast(),
                                FRAME,
                                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                            )
                        };
                        assert_eq!(r, FRAME as isize, "a short or failed send");
                    }
                }
            });
        }
    });
    let sender_cpu = cpu_secs() - cpu0;
    let sender_wall = wall.elapsed().as_secs_f64();
    line.clear();
    out.read_line(&mut line).expect("the reader's report");
    child.wait().expect("reader exit");
    let copies = posts as f64 * conns as f64;
    println!(
        "loopback floor: {conns} sockets, {rate} posts/s for {secs} s ({posts} posts, {copies} copies), {senders} sender thread(s), {readers} reader thread(s)"
    );
    println!(
        "  sender cpu {sender_cpu:.2} s over {sender_wall:.1} s = {:.2} us per copy",
        sender_cpu * 1e6 / copies
    );
    print!("  {line}");
    drop(accepted);
}

fn reader(args: &[String]) {
    let addr = args[2].clone();
    let conns: usize = args[3].parse().expect("conns");
    let posts: u64 = args[4].parse().expect("posts");
    let readers: usize = args[5].parse().expect("readers");
    let streams: Vec<TcpStream> = (0..conns)
        .map(|_| {
            let s = TcpStream::connect(&addr).expect("connect");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let fds: Vec<RawFd> = streams.into_iter().map(|s| s.into_raw_fd()).collect();
    let expected = posts * conns as u64;
    let cpu0 = cpu_secs();
    let mut lat: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = fds
            .chunks(conns.div_ceil(readers))
            .map(|part| {
                // SAFETY: plain syscalls on descriptors this process owns.
                let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                for (i, &fd) in part.iter().enumerate() {
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                        u64: i as u64,
                    };
                    let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                    assert_eq!(r, 0, "epoll_ctl");
                }
                let want = posts * part.len() as u64;
                s.spawn(move || read_part(ep, part, want))
            })
            .collect();
        println!("ready");
        std::io::stdout().flush().expect("flush");
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("reader thread"))
            .collect()
    });
    let cpu = cpu_secs() - cpu0;
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |v| *v as f64 / 1000.0)
    };
    println!(
        "reader: {} of {expected} copies, post→read p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms, cpu {cpu:.2} s = {:.2} us per copy",
        lat.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        lat.last().map_or(0.0, |v| *v as f64 / 1000.0),
        cpu * 1e6 / lat.len().max(1) as f64
    );
}

/// Reads `part` (registered in `ep`) until `want` frames arrived or nothing came for 5 s;
/// returns each frame's latency in µs.
fn read_part(ep: RawFd, part: &[RawFd], want: u64) -> Vec<u32> {
    let mut lat = Vec::with_capacity(want as usize);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<Vec<u8>> = vec![Vec::new(); part.len()];
    while (lat.len() as u64) < want {
        // SAFETY: `events` has room for its length; `ep` is this thread's epoll set.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 5000) };
        if n == 0 {
            break; // nothing for 5 s: report what came
        }
        for ev in &events[..n.max(0) as usize] {
            let i = ev.u64 as usize;
            loop {
                // SAFETY: `buf` is valid for writes of its length; the fd is open.
                let r = unsafe { libc::recv(part[i], buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r <= 0 {
                    break;
                }
                let now = mono_ns();
                let c = &mut carry[i];
                if c.is_empty() && r as usize % FRAME == 0 {
                    for f in buf[..r as usize].chunks_exact(FRAME) {
                        let at = u64::from_le_bytes(f[..8].try_into().expect("8 bytes"));
                        lat.push((now.saturating_sub(at) / 1000) as u32);
                    }
                    if (r as usize) < buf.len() {
                        break;
                    }
                    continue;
                }
                c.extend_from_slice(&buf[..r as usize]);
                let whole = c.len() / FRAME * FRAME;
                for f in c[..whole].chunks_exact(FRAME) {
                    let at = u64::from_le_bytes(f[..8].try_into().expect("8 bytes"));
                    lat.push((now.saturating_sub(at) / 1000) as u32);
                }
                c.drain(..whole);
                if (r as usize) < buf.len() {
                    break;
                }
            }
        }
    }
    lat
}
