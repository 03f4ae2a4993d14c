//! TCP links from gate processes (the distributed shape): each gate opens one persistent link,
//! says `Hello`, then streams [`Up`] messages (many per write); logic answers with [`Down`]
//! batches for that gate. A link that drops takes its sessions with it: the workers forget every
//! connection of that gate, and the gate closes its clients, which log in again and sync.
//! The gate's end of these links is `gate/src/links.rs`. The same listener takes the inbound
//! links of the other logic nodes (their outbound end is [`crate::peer`]).

use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use im_shared::link::{self, Down, DownstreamSink, LinkMsg, Role, Up, UpstreamLink};
use im_shared::{Command, ErrorCode};

use crate::handle::LogicHandle;
use im_shared::link_writer::{LinkWriter, Sent};

/// A link is considered dead after this long without any byte (gates ping every few seconds).
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Default bytes of downstream data one gate link may hold queued for its writer
/// (`gate_link_queue_bytes`) (a gate that stops
/// reading fills it). Past it the link is reset: its connection is shut down, the workers forget
/// that gate's sessions and the gate closes its clients with the retryable `Unavailable`; they
/// log in again and sync, so nothing acknowledged is lost.
pub const MAX_GATE_QUEUE_BYTES: usize = 64 << 20;

/// Writer of one gate link (write-through, `im_shared::link_writer`), with the link's generation and what
/// the gate announced in its `Hello`: (client address, WebSocket URL).
struct LinkTx {
    gen: u64,
    w: Arc<LinkWriter>,
    /// Whether the gate announced [`link::CAP_SEND_MANY`].
    send_many: bool,
    announced: (String, String),
}

/// The writers of the connected gates, by gate id: logic's [`DownstreamSink`] in the
/// distributed shape.
pub struct GateLinks {
    links: Mutex<HashMap<u16, LinkTx>>,
    next: AtomicU64,
    max_queue_bytes: usize,
    /// Links reset because their queue passed the bound.
    resets: AtomicU64,
}

impl Default for GateLinks {
    fn default() -> Self {
        GateLinks {
            links: Mutex::default(),
            next: AtomicU64::new(0),
            max_queue_bytes: MAX_GATE_QUEUE_BYTES,
            resets: AtomicU64::new(0),
        }
    }
}

impl GateLinks {
    pub fn new() -> Arc<GateLinks> {
        Arc::new(GateLinks::default())
    }

    /// With another queue bound (`gate_link_queue_bytes`).
    pub fn with_queue_bound(max_queue_bytes: usize) -> Arc<GateLinks> {
        Arc::new(GateLinks {
            max_queue_bytes,
            ..GateLinks::default()
        })
    }

    /// Queued bytes per linked gate: `(gate, bytes)`, by gate id.
    pub fn queue_depths(&self) -> Vec<(u16, usize)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, l)| (*id, l.w.pending().1))
            .collect();
        v.sort_unstable();
        v
    }

    /// Links reset because their queue passed the bound.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Appends `im_logic_gate_queue_bytes{gate}` and `im_logic_gate_link_resets_total`.
    pub fn render(&self, out: &mut String) {
        im_shared::prom::labeled(
            out,
            "im_logic_gate_queue_bytes",
            "gauge",
            "Bytes queued for the link to a gate (bound: 64 MiB, then the link is reset).",
            "gate",
            self.queue_depths().into_iter().map(|(g, b)| (g, b as u64)),
        );
        im_shared::prom::metric(
            out,
            "im_logic_gate_link_resets_total",
            "counter",
            "Gate links reset because their queue passed its bound (the gate's clients reconnect).",
            self.resets(),
        );
    }

    /// Gates with a live link: id, client address and WebSocket URL (empty: none), as they
    /// announced them in `Hello`.
    pub fn connected(&self) -> Vec<(u16, String, String)> {
        let mut v: Vec<(u16, String, String)> = self
            .lock()
            .iter()
            .map(|(id, l)| (*id, l.announced.0.clone(), l.announced.1.clone()))
            .collect();
        v.sort_unstable();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, LinkTx>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DownstreamSink for GateLinks {
    fn send(&self, gate: u16, _core: u16, batch: Vec<Down>) {
        let (w, send_many) = {
            let links = self.lock();
            let Some(l) = links.get(&gate) else {
                return; // the gate's sessions are gone with its link
            };
            (l.w.clone(), l.send_many)
        };
        // Written by this thread when nothing waits (no writer thread to wake), else queued.
        let sent = w.send(None, |out| {
            for d in batch {
                encode_for_gate(&LinkMsg::Down(d), send_many, out);
            }
        });
        if sent == Sent::Overflow {
            // The gate does not read: reset its link (sessions dropped, clients reconnect).
            self.resets.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(gate, "gate link queue full: resetting the link");
            w.shut_down();
        }
    }
}

/// Accepts gate links on `listener` (a thread per link direction) until the process ends.
pub fn serve(
    listener: TcpListener,
    node_id: u16,
    links: Arc<GateLinks>,
    logic: Arc<LogicHandle>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("link-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (links, logic) = (links.clone(), logic.clone());
                let _ = std::thread::Builder::new()
                    .name("link-read".into())
                    .spawn(move || {
                        if let Err(e) = serve_link(stream, node_id, &links, &logic) {
                            tracing::warn!("gate link ended: {e}");
                        }
                    });
            }
        })
}

fn serve_link(
    mut stream: TcpStream,
    node_id: u16,
    links: &GateLinks,
    logic: &LogicHandle,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(LINK_IDLE_TIMEOUT))?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (gate, gate_addr, caps) = loop {
        match link::decode_msg(&mut buf).map_err(invalid)? {
            Some(LinkMsg::Hello {
                role: Role::Gate,
                id,
                addr,
                ws,
                caps,
                ..
            }) => break (id, (addr, ws), caps),
            Some(LinkMsg::Hello {
                role: Role::Logic,
                id,
                ..
            }) => return serve_peer(stream, buf, id, logic),
            Some(other) => return Err(invalid(format!("expected Hello, got {other:?}"))),
            None => read_more(&mut stream, &mut buf)?,
        }
    };
    let gen = links.next.fetch_add(1, Ordering::Relaxed);
    let w = LinkWriter::new(links.max_queue_bytes);
    w.attach(stream.try_clone()?, gen);
    w.send(None, |out| {
        link::encode_msg(
            &LinkMsg::Hello {
                role: Role::Logic,
                id: node_id,
                map_epoch: 0,
                addr: String::new(),
                ws: String::new(),
                caps: 0,
            },
            out,
        )
    });
    // A newer link of the same gate replaces an older one (whose writer then ends).
    links.lock().insert(
        gate,
        LinkTx {
            gen,
            w: w.clone(),
            send_many: caps & link::CAP_SEND_MANY != 0,
            announced: gate_addr,
        },
    );
    tracing::info!(gate, "gate link up");
    // Writes what the senders could not write at once (the gate reads slower than they send).
    let flusher = {
        let w = w.clone();
        std::thread::Builder::new()
            .name("link-write".into())
            .spawn(move || w.flush(gen, None))?
    };
    let res = read_loop(&mut stream, &mut buf, gate, &w, logic);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    {
        let mut l = links.lock();
        if l.get(&gate).is_some_and(|t| t.gen == gen) {
            l.remove(&gate);
        }
    }
    w.detach();
    let _ = flusher.join();
    // Sessions of this gate are gone with the link; its clients reconnect and sync.
    logic.gate_down(gate);
    tracing::warn!(gate, "gate link down");
    res
}

/// An inbound link from another logic node: worker messages for local workers.
fn serve_peer(
    mut stream: TcpStream,
    mut buf: BytesMut,
    peer: u16,
    logic: &LogicHandle,
) -> std::io::Result<()> {
    tracing::info!(peer, "peer link in");
    let mut unknown = 0u64;
    loop {
        while let Some(m) = link::decode_msg(&mut buf).map_err(invalid)? {
            match m {
                LinkMsg::Peer(p) => match crate::peer::decode(p) {
                    Ok((w, msg)) => logic.deliver_peer(w, msg),
                    // A newer node's message kind (rolling upgrade): skipped, the link stays
                    // (ended, the same message would come again after the resync).
                    Err(e) if e.is_unknown_kind() => {
                        unknown += 1;
                        if unknown.is_power_of_two() {
                            tracing::warn!(
                                peer,
                                skipped = unknown,
                                "peer message of a kind this build does not know: skipped"
                            );
                        }
                    }
                    Err(e) => return Err(invalid(e)),
                },
                LinkMsg::Ping | LinkMsg::Pong => {}
                other => return Err(invalid(format!("unexpected on a peer link: {other:?}"))),
            }
        }
        read_more(&mut stream, &mut buf)?;
    }
}

fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<()> {
    let mut tmp = [0u8; 64 * 1024];
    let n = loop {
        match stream.read(&mut tmp) {
            // A read with SO_RCVTIMEO is interrupted when the process is stopped and continued
            // (SIGSTOP/SIGCONT, a debugger): not an error of the link.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&tmp[..n]);
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

fn read_loop(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    gate: u16,
    w: &LinkWriter,
    logic: &LogicHandle,
) -> std::io::Result<()> {
    let mut lanes: HashMap<usize, Vec<Up>> = HashMap::new();
    loop {
        let mut refused = Vec::new();
        while let Some(m) = link::decode_msg(buf).map_err(invalid)? {
            match m {
                LinkMsg::Up(up) => {
                    if up.conn_gate() != gate {
                        return Err(invalid("connection id of another gate"));
                    }
                    let lane = logic.lane_of(up.uid());
                    if let Up::Frame { conn, req_id, .. } = &up {
                        // Fence: a gate with a stale shard map must not reach a non-owner.
                        if !logic.owns(up.uid()) {
                            refused.push(LinkMsg::Down(Down::Close {
                                conn: *conn,
                                data: Command::Error {
                                    code: ErrorCode::Unavailable,
                                    message: "user not owned by this logic node".into(),
                                }
                                .to_bytes(*req_id),
                            }));
                            continue;
                        }
                        // The gate admits by its own view; logic sheds here when its queue
                        // is full, with the same retryable error.
                        let unsent = lanes.get(&lane).map_or(0, Vec::len);
                        if let Err(code) = logic.admit(lane, unsent) {
                            refused.push(LinkMsg::Down(Down::Send {
                                conn: *conn,
                                data: Command::Error {
                                    code,
                                    message: "logic busy, retry later".into(),
                                }
                                .to_bytes(*req_id),
                            }));
                            continue;
                        }
                    }
                    lanes.entry(lane).or_default().push(up);
                }
                LinkMsg::UnknownUp {
                    conn,
                    uid,
                    cmd,
                    req_id,
                } => {
                    if conn.gate() != gate {
                        return Err(invalid("connection id of another gate"));
                    }
                    // A gate with a stale shard map: the same refusal as for a known command,
                    // so the client goes to the owner (which may know the command).
                    if !logic.owns(uid) {
                        refused.push(LinkMsg::Down(Down::Close {
                            conn,
                            data: Command::Error {
                                code: ErrorCode::Unavailable,
                                message: "user not owned by this logic node".into(),
                            }
                            .to_bytes(req_id),
                        }));
                        continue;
                    }
                    refused.push(LinkMsg::Down(Down::Send {
                        conn,
                        data: Command::Error {
                            code: ErrorCode::UnknownCommand,
                            message: format!(
                                "command 0x{cmd:02X} is not known to this logic node (an older \
                                 release); retry after the upgrade"
                            ),
                        }
                        .to_bytes(req_id),
                    }));
                }
                LinkMsg::Ping => {
                    w.send(None, |out| link::encode_msg(&LinkMsg::Pong, out));
                }
                LinkMsg::Pong => {}
                other => return Err(invalid(format!("unexpected on a gate link: {other:?}"))),
            }
        }
        for (lane, batch) in lanes.drain() {
            logic.send(lane, batch);
        }
        if !refused.is_empty() {
            w.send(None, |out| {
                for m in &refused {
                    link::encode_msg(m, out);
                }
            });
        }
        read_more(stream, buf)?;
    }
}

/// Encodes `m` for a gate; `send_many`: whether it announced [`link::CAP_SEND_MANY`] (a gate
/// that predates it gets a `Send` per connection instead).
fn encode_for_gate(m: &LinkMsg, send_many: bool, out: &mut BytesMut) {
    match m {
        LinkMsg::Down(Down::SendMany { conns, data }) if !send_many => {
            for &conn in conns {
                let d = Down::Send {
                    conn,
                    data: data.clone(),
                };
                link::encode_down(&d, out);
            }
        }
        m => link::encode_msg(m, out),
    }
}

/// Registration of a linked gate lasts this long unless refreshed.
pub const GATE_TTL_SECS: u64 = 15;
/// How often the linked gates are registered again.
const GATE_REFRESH: Duration = Duration::from_secs(5);

/// Registers the gates linked to this node in the directory's gate registry (for iplist), every
/// few seconds with a TTL, from a thread of its own. A gate that dies stops being refreshed and
/// drops out of the registry after [`GATE_TTL_SECS`].
#[cfg(feature = "redis")]
pub fn publish_gates(
    links: Arc<GateLinks>,
    redis_nodes: Vec<String>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use crate::directory::{Directory, GateInfo, RedisDirectory};
    std::thread::Builder::new()
        .name("gate-registry".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("gate registry runtime: {e}"),
            };
            rt.block_on(async move {
                let mut dir = None;
                loop {
                    if dir.is_none() {
                        match RedisDirectory::connect(redis_nodes.clone()).await {
                            Ok(d) => dir = Some(d),
                            Err(e) => tracing::warn!("gate registry: directory unavailable: {e}"),
                        }
                    }
                    if let Some(d) = &dir {
                        for (id, addr, ws) in links.connected() {
                            let g = GateInfo {
                                id,
                                tcp_addr: addr,
                                ws_addr: (!ws.is_empty()).then_some(ws),
                                conns: 0,
                            };
                            if let Err(e) = d.register_gate(g, GATE_TTL_SECS).await {
                                tracing::warn!(gate = id, "gate registry: {e}");
                            }
                        }
                    }
                    tokio::time::sleep(GATE_REFRESH).await;
                }
            })
        })
}

#[cfg(test)]
mod queue_bound_tests {
    use super::*;
    use im_shared::ConnId;

    /// Issue 14: downstream data for a gate whose link writer cannot write (the gate does not
    /// read) stays within the bound; past it the link's socket is shut down, which ends the link
    /// like any failure (sessions dropped, the gate's clients reconnect and sync).
    #[test]
    fn a_send_many_reaches_a_gate_that_predates_it_as_one_send_per_connection() {
        let (a, b) = (
            im_shared::ConnId::new(1, 0, 1),
            im_shared::ConnId::new(1, 0, 2),
        );
        let data = bytes::Bytes::from_static(b"post");
        let m = LinkMsg::Down(Down::SendMany {
            conns: vec![a, b],
            data: data.clone(),
        });
        let decoded = |send_many| {
            let mut out = BytesMut::new();
            encode_for_gate(&m, send_many, &mut out);
            let mut got = vec![];
            while let Some(d) = link::decode_down(&mut out).unwrap() {
                got.push(d);
            }
            got
        };
        assert_eq!(
            decoded(false),
            vec![
                Down::Send {
                    conn: a,
                    data: data.clone()
                },
                Down::Send {
                    conn: b,
                    data: data.clone()
                },
            ]
        );
        assert_eq!(
            decoded(true),
            vec![Down::SendMany {
                conns: vec![a, b],
                data
            }]
        );
    }

    #[test]
    fn a_gate_that_does_not_read_gets_its_link_reset_at_the_queue_bound() {
        const BOUND: usize = 64 * 1024;
        let links = GateLinks::with_queue_bound(BOUND);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = l.accept().unwrap();
        // The gate never reads: the socket fills, then the writer's queue (no flusher runs: as
        // if it were stuck writing to the gate).
        let w = LinkWriter::new(BOUND);
        w.attach(ours, 0);
        links.lock().insert(
            3,
            LinkTx {
                gen: 0,
                w: w.clone(),
                send_many: true,
                announced: (String::new(), String::new()),
            },
        );
        let down = || Down::Send {
            conn: ConnId::new(3, 0, 1),
            data: bytes::Bytes::from(vec![0u8; 1000]),
        };
        let mut sends = 0;
        while links.resets() == 0 {
            assert!(sends < 1_000_000, "never reset");
            links.send(3, 0, vec![down()]);
            sends += 1;
            assert!(w.pending().1 <= BOUND);
        }
        assert_eq!(links.queue_depths(), [(3, w.pending().1)]);
        // The gate's end sees the link closed, after what the socket had taken.
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            match theirs.read(&mut b).expect("link not shut down") {
                0 => break,
                n => got += n,
            }
            assert!(got <= sends * 1100, "more bytes than were sent");
        }
        let mut out = String::new();
        links.render(&mut out);
        assert!(out.contains("im_logic_gate_link_resets_total"), "{out}");
    }
}
