//! `logins`: how many logins per second the server answers, with the TCP handshakes kept out of
//! the measured window (issue 15: "≥ 30 000 logins/s into one gate core pair with token
//! verification").
//!
//! The `idle` scenario connects and logs in at once, and on this 2-CPU machine a loopback
//! `connect` costs its caller ~50 µs (the whole handshake, both ends' softirq work included),
//! more than the server's side of a login: the loadgen, not the server, sets the rate there
//! (docs/BENCHMARKS.md "Logins: what one costs each side"). Here one thread, without glommio:
//! 1. connects N sockets (from the `--src-ips`, to the gates in turn) and waits until every
//!    handshake is done: not timed;
//! 2. encodes N `Login` frames with fresh tokens: not timed;
//! 3. writes them all, one `send` each, and reads until every connection has its `LoginResult`:
//!    the window. Logins/s = N / (last result − first send); each login's latency is from its
//!    own send to its result; the server's CPU (`--server-pid`, utime + stime from /proc) and
//!    this process's CPU over the window give each side's cost per login;
//! 4. closes them (the server logs them out) and waits a second before the next round.
//!
//! Every round uses new users (`uid-base + round × N + i`), so each login loads a user the
//! server has not seen, as in a morning's first logins. Every wait has a deadline.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use im_shared::frame::{Cmd, FrameCodec};
use im_shared::proto::Command;
use im_shared::token::HmacTokens;
use im_shared::{DeviceType, ErrorCode, Seq, UserId};

use crate::net::{errno_name, start_connect};
use crate::worker::cpu_ticks;
use crate::Common;

/// One round's result.
#[derive(Debug, serde::Serialize)]
pub struct Round {
    pub logins: u32,
    pub ok: u32,
    /// Refusals by error code name.
    pub refused: HashMap<String, u32>,
    /// First send to last result.
    pub secs: f64,
    pub logins_per_sec: f64,
    /// Send → `LoginResult` of each login, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU of the `--server-pid` processes over the window, per login (None without a pid).
    pub server_cpu_us_per_login: Option<f64>,
    /// This process's CPU over the window, per login.
    pub loadgen_cpu_us_per_login: f64,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf takes a plain integer.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// This process's CPU time (user + system), seconds.
fn own_cpu() -> f64 {
    // SAFETY: `ru` is a plain struct on the stack that getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Epoll(RawFd);

impl Epoll {
    fn new() -> anyhow::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, tag: u64) -> anyhow::Result<()> {
        let mut ev = libc::epoll_event { events, u64: tag };
        // SAFETY: both descriptors are open; `ev` lives on the stack.
        if unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) } < 0 {
            bail!("epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits at most 100 ms; the tags of the ready descriptors, with their event bits.
    fn wait(&self, evs: &mut [libc::epoll_event]) -> Vec<(u64, u32)> {
        // SAFETY: `evs` is a valid buffer of its length.
        let n = unsafe { libc::epoll_wait(self.0, evs.as_mut_ptr(), evs.len() as i32, 100) };
        evs[..n.max(0) as usize]
            .iter()
            .map(|e| (e.u64, e.events))
            .collect()
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// The sockets of a round, closed when dropped (also on an error).
struct Socks(Vec<RawFd>);

impl Drop for Socks {
    fn drop(&mut self) {
        for &fd in &self.0 {
            // SAFETY: descriptors opened by `start_connect`, owned here.
            unsafe { libc::close(fd) };
        }
    }
}

fn so_error(fd: RawFd) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open; `v` and `len` live on the stack.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    v
}

/// Connects `n` sockets and waits until every handshake completed (30 s at most).
fn connect_all(n: u32, servers: &[SocketAddr], src: &[Ipv4Addr]) -> anyhow::Result<Socks> {
    let ep = Epoll::new()?;
    let mut socks = Socks(Vec::with_capacity(n as usize));
    for i in 0..n as usize {
        let server = servers[i % servers.len()];
        let from = (!src.is_empty()).then(|| src[(i / servers.len()) % src.len()]);
        let fd = start_connect(from, server)
            .map_err(|e| anyhow::anyhow!("connect {i} to {server}: {}", errno_name(&e)))?;
        socks.0.push(fd);
        ep.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLOUT as u32, i as u64)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = n as usize;
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    while left > 0 {
        if Instant::now() > deadline {
            bail!("{left} of {n} connects not done after 30 s");
        }
        for (i, _) in ep.wait(&mut evs) {
            let fd = socks.0[i as usize];
            let e = so_error(fd);
            if e != 0 {
                bail!("connect {i}: {}", std::io::Error::from_raw_os_error(e));
            }
            ep.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)?;
            left -= 1;
        }
    }
    Ok(socks)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One round: `n` new users `first..first + n` log in on connections made beforehand.
fn round(c: &Common, n: u32, first: u64, src: &[Ipv4Addr]) -> anyhow::Result<Round> {
    let socks = connect_all(n, &c.server, src)?;
    let tokens = HmacTokens::new(c.token_secret.clone());
    let exp = im_shared::token::now_secs() + 3600;
    let frames: Vec<bytes::Bytes> = (0..n as u64)
        .map(|i| {
            let uid = UserId(first + i);
            Command::Login {
                uid,
                device_type: DeviceType::Phone,
                device_id: format!("lb-{}", uid.0),
                token: tokens.mint(uid, exp),
                last_seq: Seq(0),
            }
            .to_bytes(1)
        })
        .collect();
    let ep = Epoll::new()?;
    for (i, &fd) in socks.0.iter().enumerate() {
        let ev = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        ep.ctl(libc::EPOLL_CTL_ADD, fd, ev, i as u64)?;
    }
    let tps = ticks_per_sec();
    let server_ticks = || -> anyhow::Result<u64> {
        c.server_pid
            .iter()
            .map(|p| cpu_ticks(&p.to_string()).with_context(|| format!("server pid {p}")))
            .sum()
    };
    let server0 = if c.server_pid.is_empty() {
        None
    } else {
        Some(server_ticks()?)
    };
    let cpu0 = own_cpu();
    let t0 = Instant::now();
    let mut sent_at = Vec::with_capacity(n as usize);
    for (i, f) in frames.iter().enumerate() {
        let fd = socks.0[i];
        // SAFETY: `f` is valid for reads of its length; `fd` is an open, connected socket.
        let r = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), libc::MSG_NOSIGNAL) };
        if r != f.len() as isize {
            bail!("send of login {i}: {}", std::io::Error::last_os_error());
        }
        sent_at.push(t0.elapsed());
    }
    let codec = FrameCodec::new(1 << 20);
    let mut bufs: HashMap<u64, BytesMut> = HashMap::new();
    let mut lat = Vec::with_capacity(n as usize);
    let mut refused: HashMap<String, u32> = HashMap::new();
    let mut done = vec![false; n as usize];
    let mut left = n as usize;
    let mut last = t0.elapsed();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut scratch = vec![0u8; 4096];
    let deadline = t0 + Duration::from_secs(60);
    while left > 0 {
        if Instant::now() > deadline {
            bail!("{left} of {n} logins unanswered after 60 s");
        }
        for (i, bits) in ep.wait(&mut evs) {
            if done[i as usize] {
                continue;
            }
            let fd = socks.0[i as usize];
            // SAFETY: `scratch` is valid for writes of its length; `fd` is open.
            let r = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), 0) };
            if r <= 0 {
                let hup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                if r == 0 || bits & hup != 0 {
                    bail!("connection {i} closed before its LoginResult");
                }
                continue;
            }
            let buf = bufs.entry(i).or_default();
            buf.extend_from_slice(&scratch[..r as usize]);
            while let Some(f) = codec.decode(buf).context("a frame from the server")? {
                if f.cmd != Cmd::LoginResult {
                    continue;
                }
                let at = t0.elapsed();
                last = at;
                lat.push((at - sent_at[i as usize]).as_secs_f64() * 1e3);
                match Command::decode_body(Cmd::LoginResult, f.body)? {
                    Command::LoginResult {
                        code: ErrorCode::Ok,
                        ..
                    } => {}
                    Command::LoginResult { code, .. } => {
                        *refused.entry(format!("{code:?}")).or_default() += 1;
                    }
                    _ => unreachable!("decoded as a LoginResult"),
                }
                done[i as usize] = true;
                left -= 1;
                bufs.remove(&i);
                break;
            }
        }
    }
    let secs = last.as_secs_f64().max(1e-9);
    let server_cpu = match server0 {
        None => None,
        Some(s0) => Some((server_ticks()? - s0) as f64 / tps * 1e6 / n as f64),
    };
    let own = (own_cpu() - cpu0) * 1e6 / n as f64;
    drop(socks);
    lat.sort_by(f64::total_cmp);
    let ok = n - refused.values().sum::<u32>();
    Ok(Round {
        logins: n,
        ok,
        refused,
        secs,
        logins_per_sec: n as f64 / secs,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        server_cpu_us_per_login: server_cpu,
        loadgen_cpu_us_per_login: own,
    })
}

/// Runs `rounds` rounds of `n` logins; prints one line per round (JSON lines with `--json`).
/// Fails when a login was refused.
pub fn main(c: &Common, n: u32, rounds: u32) -> anyhow::Result<()> {
    if n == 0 || n > 19_000 {
        bail!("--conns must be 1..=19000 (one process holds them, 20 000 open files at most)");
    }
    let src = if c.src_ips == "none" {
        Vec::new()
    } else {
        crate::srcip::parse_src_ips(&c.src_ips)?
    };
    let mut all = Vec::new();
    for r in 0..rounds {
        let first = c.uid_base + r as u64 * n as u64;
        let res = round(c, n, first, &src)?;
        if c.json {
            println!("{}", serde_json::to_string(&res)?);
        } else {
            let server = res
                .server_cpu_us_per_login
                .map_or("-".into(), |v| format!("{v:.1} µs"));
            eprintln!(
                "round {r}: {}/{} logged in in {:.3} s = {:.0} logins/s; send->result p50 {:.1} ms p99 {:.1} ms max {:.1} ms; CPU per login: server {server}, loadgen {:.1} µs; refused {:?}",
                res.ok, res.logins, res.secs, res.logins_per_sec, res.p50_ms, res.p99_ms, res.max_ms,
                res.loadgen_cpu_us_per_login, res.refused
            );
        }
        all.push(res);
        // The server's logouts of this round's connections, outside the next window.
        std::thread::sleep(Duration::from_secs(1));
    }
    let refused: u32 = all.iter().map(|r| r.logins - r.ok).sum();
    if refused > 0 {
        bail!("{refused} logins refused");
    }
    Ok(())
}
