//! TCP links to logic nodes (the distributed shape): one persistent link per logic node. A gate
//! core writes its round's upstream messages to the link itself when nothing waits to be written
//! before them (write-through, `im_shared::link_writer`: no thread to wake); the link's thread
//! writes what the socket did not take at once, pings when idle and reconnects; a reader thread
//! routes downstream batches to the gate cores. Virtual shards are split evenly over the
//! configured nodes (the same map on every gate).
//!
//! While a link is down its lane refuses new work with the retryable `Unavailable`; frames that
//! were queued but not written are answered with `Unavailable` too (the client retries with the
//! same `client_msg_id`); connections whose users live on that node are closed so that they log
//! in again (and sync) once the link is back.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use im_shared::link::{self, Down, DownstreamSink, LinkMsg, Role, Up, UpstreamLink};
use im_shared::link_writer::{LinkWriter, Sent};
use im_shared::shard::{owner_of_vshard, vshard_of};
use im_shared::{Command, ConnId, ErrorCode, UserId};

use crate::GateSink;

/// How often a gate repeats the warning about a logic node it cannot reach.
const UNREACHABLE_WARN_EVERY: Duration = Duration::from_secs(30);

/// Send a `Ping` after this long without writing.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Declare the link dead after this long without reading anything.
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Upstream client frames queued per link before new work is refused with `Overloaded`, unless
/// configured (`max_link_queued`).
pub const MAX_QUEUED: usize = 100_000;

struct NodeLink {
    /// Tagged with the client frames (connection, `req_id`) of bytes not written yet.
    w: Arc<LinkWriter<(ConnId, u32)>>,
    up: AtomicBool,
    /// The link's `Ping` in flight (reset with every connection).
    ping: PingClock,
    /// Frames sent while the link had no connection: the link's thread answers them.
    unsent: Mutex<Vec<(ConnId, u32)>>,
}

impl NodeLink {
    fn new() -> NodeLink {
        NodeLink {
            w: LinkWriter::new(usize::MAX),
            up: AtomicBool::new(false),
            ping: PingClock::default(),
            unsent: Mutex::default(),
        }
    }

    /// Client frames written to neither the socket nor the flusher's bytes yet (read for every
    /// frame admitted: no lock).
    fn queued(&self) -> usize {
        self.w.waiting()
    }
}

/// The gate's upstream over TCP: one lane per logic node.
/// What a gate tells logic nodes about itself in `Hello`, for the gate registry (iplist).
#[derive(Clone, Debug)]
pub struct Announce {
    /// The client listener (`host:port`).
    pub client: SocketAddr,
    /// The WebSocket URL (`ws://host:port/ws`, `wss://…`); empty without a WebSocket listener.
    pub ws_url: String,
}

pub struct TcpUpstream {
    nodes: Vec<NodeLink>,
    /// Client frames queued per link before new ones are refused with `Overloaded`.
    max_queued: usize,
}

impl TcpUpstream {
    /// Starts one link per logic node address; they connect (and reconnect) in the background.
    /// `client_addr` (set once the listeners are bound) is announced to logic in `Hello` for
    /// the gate registry; links wait for it before connecting.
    pub fn start(
        gate_id: u16,
        client_addr: Arc<std::sync::OnceLock<Announce>>,
        logic: Vec<SocketAddr>,
        sink: Arc<GateSink>,
        max_queued: usize,
    ) -> Arc<TcpUpstream> {
        let nodes = logic.iter().map(|_| NodeLink::new()).collect();
        let me = Arc::new(TcpUpstream { nodes, max_queued });
        for (lane, addr) in logic.into_iter().enumerate() {
            let (me, sink, client_addr) = (me.clone(), sink.clone(), client_addr.clone());
            std::thread::Builder::new()
                .name(format!("link-{lane}"))
                .spawn(move || {
                    let client_addr = loop {
                        if let Some(a) = client_addr.get() {
                            break a.clone();
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    };
                    me.run_link(lane, gate_id, client_addr, addr, sink)
                })
                .expect("spawn link thread");
        }
        me
    }

    /// Whether the link of `lane` is connected.
    pub fn is_up(&self, lane: usize) -> bool {
        self.nodes[lane].up.load(Ordering::Relaxed)
    }

    /// Appends `im_gate_link_queued{node}` and `im_gate_link_up{node}` (Prometheus text).
    pub fn render(&self, out: &mut String) {
        im_shared::prom::labeled(
            out,
            "im_gate_link_queued",
            "gauge",
            "Client frames queued for a logic node's link and not written yet (bound: \
             max_link_queued, then new ones are refused with Overloaded).",
            "node",
            self.nodes.iter().map(|n| n.queued() as u64).enumerate(),
        );
        im_shared::prom::labeled(
            out,
            "im_gate_link_up",
            "gauge",
            "Whether the gate's link to a logic node is connected (1) or not (0: its users' \
             requests are refused with Unavailable).",
            "node",
            self.nodes
                .iter()
                .map(|n| u64::from(n.up.load(Ordering::Relaxed)))
                .enumerate(),
        );
    }

    fn run_link(
        self: &Arc<Self>,
        lane: usize,
        gate_id: u16,
        client_addr: Announce,
        addr: SocketAddr,
        sink: Arc<GateSink>,
    ) {
        let node = &self.nodes[lane];
        let mut backoff = Duration::from_millis(50);
        let mut epoch = 0u64;
        let ping = |out: &mut BytesMut| node.ping.maybe_ping(out);
        // Failed connects since the link was last up: the first and then one every
        // `UNREACHABLE_WARN_EVERY` are warnings (an operator must see a node the gate cannot
        // reach), the rest debug.
        let mut failing: Option<(std::time::Instant, std::time::Instant)> = None;
        loop {
            match connect(addr, gate_id, &client_addr) {
                Ok(stream) => {
                    backoff = Duration::from_millis(50);
                    failing = None;
                    epoch += 1;
                    node.ping.reset();
                    let theirs = stream.try_clone();
                    node.w.attach(stream, epoch);
                    let reader = theirs.map(|s| {
                        let (sink, me) = (sink.clone(), self.clone());
                        std::thread::spawn(move || {
                            let node = &me.nodes[lane];
                            read_loop(s, gate_id, &sink, &node.ping, &node.w)
                        })
                    });
                    tracing::info!(lane, %addr, "logic link up");
                    node.up.store(true, Ordering::Relaxed);
                    // Frames that found no connection just before this one (admitted while the
                    // last one was up) are answered now rather than at the next failure.
                    self.fail(lane, Vec::new(), &sink, gate_id);
                    // Until the connection fails (a write here or of a sender, or the reader's end).
                    let _ = node.w.flush(epoch, Some((PING_EVERY, &ping)));
                    node.up.store(false, Ordering::Relaxed);
                    node.w.shut_down();
                    if let Ok(r) = reader {
                        let _ = r.join();
                    }
                    tracing::warn!(lane, %addr, "logic link down");
                    let unwritten = node.w.detach();
                    self.fail(lane, unwritten, &sink, gate_id);
                    sink.lane_down(lane);
                }
                Err(e) => {
                    // Work cannot wait for a node that is not there.
                    self.fail(lane, Vec::new(), &sink, gate_id);
                    let now = std::time::Instant::now();
                    match &mut failing {
                        None => {
                            tracing::warn!(lane, %addr, "cannot reach logic node (retrying): {e}");
                            failing = Some((now, now));
                        }
                        Some((since, warned))
                            if now.duration_since(*warned) >= UNREACHABLE_WARN_EVERY =>
                        {
                            tracing::warn!(
                                lane,
                                %addr,
                                secs = now.duration_since(*since).as_secs(),
                                "still cannot reach logic node: {e}"
                            );
                            *warned = now;
                        }
                        Some(_) => tracing::debug!(lane, %addr, "connecting to logic: {e}"),
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Answers the client frames that were never written (`unwritten`, and those sent while
    /// the link had no connection) with the retryable `Unavailable`.
    fn fail(&self, lane: usize, mut unwritten: Vec<(ConnId, u32)>, sink: &GateSink, gate_id: u16) {
        unwritten.append(
            &mut self.nodes[lane]
                .unsent
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut per_core: HashMap<u16, Vec<Down>> = HashMap::new();
        for (conn, req_id) in unwritten {
            per_core.entry(conn.core()).or_default().push(Down::Send {
                conn,
                data: Command::Error {
                    code: ErrorCode::Unavailable,
                    message: "logic link down, retry".into(),
                }
                .to_bytes(req_id),
            });
        }
        for (core, downs) in per_core {
            sink.send(gate_id, core, downs);
        }
    }
}

fn connect(addr: SocketAddr, gate_id: u16, me: &Announce) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    let mut out = BytesMut::new();
    link::encode_msg(
        &LinkMsg::Hello {
            role: Role::Gate,
            id: gate_id,
            map_epoch: 0,
            addr: me.client.to_string(),
            ws: me.ws_url.clone(),
            caps: link::CAP_SEND_MANY,
        },
        &mut out,
    );
    s.write_all(&out)?;
    Ok(s)
}

/// The `Ping` of a link in flight, for its round trip (`im_gate_link_rtt_seconds`).
struct PingClock {
    base: std::time::Instant,
    /// Nanoseconds after `base` when the outstanding `Ping` was written; 0: none.
    sent_ns: AtomicU64,
    /// When the last `Ping` was written (`sent_ns` may already be cleared by its `Pong`).
    last_ns: AtomicU64,
}

impl Default for PingClock {
    fn default() -> Self {
        PingClock {
            base: std::time::Instant::now(),
            sent_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        }
    }
}

impl PingClock {
    /// A new connection: no `Ping` in flight, one due at once.
    fn reset(&self) {
        self.sent_ns.store(0, Ordering::Relaxed);
        self.last_ns.store(0, Ordering::Relaxed);
    }

    fn now_ns(&self) -> u64 {
        (self.base.elapsed().as_nanos() as u64).max(1)
    }

    /// Appends a `Ping` to `out` if none was written for [`PING_EVERY`] and none is in flight.
    fn maybe_ping(&self, out: &mut BytesMut) {
        let now = self.now_ns();
        let last = self.last_ns.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= PING_EVERY.as_nanos() as u64;
        if due && self.sent_ns.load(Ordering::Relaxed) == 0 {
            link::encode_msg(&LinkMsg::Ping, out);
            self.sent_ns.store(now, Ordering::Relaxed);
            self.last_ns.store(now, Ordering::Relaxed);
        }
    }

    /// A `Pong` arrived: its round trip, if a `Ping` was in flight.
    fn pong(&self) -> Option<Duration> {
        let sent = self.sent_ns.swap(0, Ordering::Relaxed);
        (sent != 0).then(|| Duration::from_nanos(self.now_ns().saturating_sub(sent)))
    }
}

fn read_loop(
    mut s: TcpStream,
    gate_id: u16,
    sink: &GateSink,
    ping: &PingClock,
    w: &LinkWriter<(ConnId, u32)>,
) {
    let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut tmp = vec![0u8; 64 * 1024];
    let mut per_core: HashMap<u16, Vec<Down>> = HashMap::new();
    loop {
        match s.read(&mut tmp) {
            // SO_RCVTIMEO reads are interrupted by SIGSTOP/SIGCONT: retry.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
        loop {
            match link::decode_msg(&mut buf) {
                Ok(Some(LinkMsg::Down(d))) => {
                    per_core.entry(d.conn().core()).or_default().push(d);
                }
                Ok(Some(LinkMsg::Pong)) => {
                    if let Some(rtt) = ping.pong() {
                        sink.latency.link_rtt.observe(rtt);
                    }
                }
                Ok(Some(LinkMsg::Hello { .. } | LinkMsg::Ping)) => {}
                Ok(Some(other)) => {
                    tracing::warn!("unexpected link message from logic: {other:?}");
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("bad link bytes from logic: {e}");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        for (core, downs) in per_core.drain() {
            sink.send(gate_id, core, downs);
        }
    }
    // Make the link's thread notice too (it may be waiting for something to write).
    w.shut_down();
}

impl UpstreamLink for TcpUpstream {
    fn lane_of(&self, uid: UserId) -> usize {
        owner_of_vshard(vshard_of(uid), self.nodes.len())
    }

    fn admit(&self, lane: usize, unsent: usize) -> Result<(), ErrorCode> {
        let n = &self.nodes[lane];
        if !n.up.load(Ordering::Relaxed) {
            Err(ErrorCode::Unavailable)
        } else if n.queued() + unsent >= self.max_queued {
            Err(ErrorCode::Overloaded)
        } else {
            Ok(())
        }
    }

    fn send(&self, lane: usize, batch: Vec<Up>) {
        let n = &self.nodes[lane];
        // Written by this core's thread when nothing waits; a busy link is timed too: a `Ping`
        // rides with the batch when one is due.
        let (sent, unsent) = n.w.send_tagged(None, |out, frames| {
            n.ping.maybe_ping(out);
            for up in &batch {
                if let Up::Frame { conn, req_id, .. } = up {
                    frames.push((*conn, *req_id));
                }
                link::encode_up(up, out);
            }
        });
        if sent == Sent::Dropped {
            // No connection (it failed after `admit`): the link's thread answers them.
            n.unsent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(unsent);
        }
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    /// An upstream of one link connected to a logic end that never reads, whose socket is
    /// already full: what is sent now waits for the flusher (none runs here).
    fn upstream(max_queued: usize) -> (TcpUpstream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        let node = NodeLink::new();
        node.w.attach(ours, 1);
        node.up.store(true, Ordering::Relaxed);
        let mut filled = 0;
        while node
            .w
            .send_tagged(None, |out, _| out.extend_from_slice(&[0; 64 * 1024]))
            .0
            == Sent::Written
        {
            filled += 1;
            assert!(filled < 10_000, "the socket never filled");
        }
        (
            TcpUpstream {
                nodes: vec![node],
                max_queued,
            },
            theirs,
        )
    }

    fn frame(i: u32) -> Up {
        Up::request(
            im_shared::ConnId::new(1, 0, i),
            UserId(7),
            i,
            &Command::Heartbeat,
        )
    }

    /// A link holds at most `max_link_queued` unwritten client frames: past it new work is
    /// refused `Overloaded` (counting what the caller has not handed over yet), and a link down
    /// refuses with `Unavailable`; the depth is on `/metrics`.
    #[test]
    fn a_link_refuses_past_its_configured_bound_and_shows_its_depth() {
        let (up, _logic) = upstream(3);
        assert_eq!(up.admit(0, 0), Ok(()));
        up.send(0, vec![frame(1), frame(2)]);
        assert_eq!(up.admit(0, 0), Ok(()));
        assert_eq!(up.admit(0, 1), Err(ErrorCode::Overloaded));
        up.send(0, vec![frame(3)]);
        assert_eq!(up.admit(0, 0), Err(ErrorCode::Overloaded));
        let mut out = String::new();
        up.render(&mut out);
        assert!(
            out.contains("\nim_gate_link_queued{node=\"0\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("\nim_gate_link_up{node=\"0\"} 1\n"), "{out}");
        up.nodes[0].up.store(false, Ordering::Relaxed);
        assert_eq!(up.admit(0, 0), Err(ErrorCode::Unavailable));
        // The link fails: the frames never written come back, for the link's thread to answer
        // them `Unavailable`.
        let unwritten = up.nodes[0].w.detach();
        assert_eq!(unwritten.iter().map(|f| f.1).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(up.nodes[0].queued(), 0);
        // So does a frame sent while the link has no connection (it failed after `admit`).
        up.send(0, vec![frame(4)]);
        let unsent = up.nodes[0].unsent.lock().unwrap().clone();
        assert_eq!(unsent.iter().map(|f| f.1).collect::<Vec<_>>(), [4]);
    }
}
