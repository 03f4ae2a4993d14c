//! The core driven with byte vectors and a fake clock: one test per rule, each failing if the
//! rule breaks.

use super::*;

use im_shared::frame::FrameCodec;

const GATES: [(u16, &str); 3] = [
    (1, "10.0.0.1:7000"),
    (2, "10.0.0.2:7000"),
    (3, "10.0.0.3:7000"),
];

fn config() -> Config {
    let gates = GATES
        .iter()
        .map(|&(id, addr)| Gate {
            id,
            addr: addr.into(),
        })
        .collect();
    let mut c = Config::new(UserId(42), "tok", DeviceType::Phone, "dev-1", gates);
    c.backoff.jitter = 0.0; // exact waits; the jitter has its own test
    c
}

/// The server side of a test: decodes what the core wrote, encodes what it answers.
struct Peer {
    core: Core,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Peer {
    fn new(cfg: Config) -> Peer {
        Peer {
            core: Core::new(cfg),
            codec: FrameCodec::new(1 << 24),
            buf: BytesMut::new(),
        }
    }

    /// Started, connected and logged in at `now` (heartbeat 30 s, `max_seq`).
    fn logged_in(cfg: Config, now: u64, max_seq: u64) -> Peer {
        let mut p = Peer::new(cfg);
        p.core.start(now);
        assert!(matches!(p.core.poll_io(), Some(Io::Connect(_))));
        p.core.connected(now);
        p.login_ok(now, max_seq);
        p
    }

    fn login_ok(&mut self, now: u64, max_seq: u64) {
        let (req, login) = self.sent_one();
        assert!(matches!(login, Command::Login { .. }), "{login:?}");
        self.push(
            now,
            req,
            Command::LoginResult {
                code: ErrorCode::Ok,
                server_time_ms: 1,
                max_seq: Seq(max_seq),
                heartbeat_secs: 30,
                message: String::new(),
            },
        );
        assert!(matches!(
            self.events().first(),
            Some(Event::LoggedIn { .. })
        ));
    }

    /// Every frame the core wrote since the last call.
    fn sent(&mut self) -> Vec<(u32, Command)> {
        while let Some(b) = self.core.poll_transmit() {
            self.buf.extend_from_slice(&b);
        }
        let mut out = Vec::new();
        while let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
            out.push((f.req_id, Command::decode(&f).unwrap()));
        }
        out
    }

    fn sent_one(&mut self) -> (u32, Command) {
        let mut s = self.sent();
        assert_eq!(s.len(), 1, "{s:?}");
        s.pop().unwrap()
    }

    fn push(&mut self, now: u64, req: u32, cmd: Command) {
        self.core.handle_bytes(now, &cmd.to_bytes(req));
    }

    /// The events since the last call, but [`Event::Connecting`] (checked on its own).
    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event())
            .filter(|e| !matches!(e, Event::Connecting { .. }))
            .collect()
    }

    fn ios(&mut self) -> Vec<Io> {
        std::iter::from_fn(|| self.core.poll_io()).collect()
    }
}

fn msg(seq: u64, prev: u64) -> Message {
    Message {
        seq: Seq(seq),
        prev_seq: Seq(prev),
        msg_id: MsgId(1000 + seq),
        conv: CONV_C2C,
        from: UserId(7),
        to: UserId(42),
        client_msg_id: seq,
        server_time_ms: 5,
        body: Bytes::from(format!("m{seq}")),
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.seq.0),
            _ => None,
        })
        .collect()
}

fn count(sent: &[(u32, Command)], f: impl Fn(&Command) -> bool) -> usize {
    sent.iter().filter(|(_, c)| f(c)).count()
}

#[test]
fn it_logs_in_with_the_last_seq_and_heartbeats_every_heartbeat_secs() {
    let mut cfg = config();
    cfg.last_seq = Seq(17);
    let mut p = Peer::new(cfg);
    p.core.start(0);
    let Some(Io::Connect(g)) = p.core.poll_io() else {
        panic!("no connect")
    };
    assert_eq!(g, p.core.gates()[0]);
    assert_eq!(
        p.core.poll_event(),
        Some(Event::Connecting {
            gate: g.clone(),
            attempt: 0
        })
    );
    p.core.connected(0);
    let (_, login) = p.sent_one();
    assert_eq!(
        login,
        Command::Login {
            uid: UserId(42),
            device_type: DeviceType::Phone,
            device_id: "dev-1".into(),
            last_seq: Seq(17),
            token: "tok".into(),
        }
    );
    // No heartbeat before the login is answered; the login's own deadline is the timer.
    assert_eq!(p.core.poll_timeout(), Some(10_000));
    p.core.handle_bytes(
        0,
        &Command::LoginResult {
            code: ErrorCode::Ok,
            server_time_ms: 1,
            max_seq: Seq(17),
            heartbeat_secs: 20,
            message: String::new(),
        }
        .to_bytes(1),
    );
    assert!(p.core.is_logged_in());
    assert!(matches!(
        p.events()[..],
        [Event::LoggedIn {
            heartbeat_secs: 20,
            ..
        }]
    ));
    assert!(
        p.sent().is_empty(),
        "nothing to sync at max_seq == last_seq"
    );
    assert_eq!(p.core.poll_timeout(), Some(20_000));
    p.core.handle_timeout(19_999);
    assert!(p.sent().is_empty());
    p.core.handle_timeout(20_000);
    let (req, beat) = p.sent_one();
    assert_eq!(beat, Command::Heartbeat);
    p.push(20_050, req, Command::HeartbeatAck { server_time_ms: 9 });
    assert_eq!(p.core.poll_timeout(), Some(40_000));
    p.core.handle_timeout(40_000);
    assert_eq!(p.sent_one().1, Command::Heartbeat);
    // This one is never answered: one interval later the connection counts as dead.
    p.core.handle_timeout(59_999);
    assert!(p.ios().is_empty());
    p.core.handle_timeout(60_000);
    assert_eq!(p.ios(), vec![Io::Close]);
    let ev = p.events();
    assert!(
        matches!(&ev[..], [Event::Disconnected { why }, Event::Reconnecting { .. }] if why.contains("heartbeat")),
        "{ev:?}"
    );
}

#[test]
fn duplicates_are_dropped_and_entries_reported_once_in_order() {
    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(1, 0, Command::Deliver(msg(5, 0)));
    p.push(2, 0, Command::Deliver(msg(5, 0)));
    p.push(3, 0, Command::Deliver(msg(3, 0)));
    p.push(4, 0, Command::Deliver(msg(9, 5)));
    p.push(5, 0, Command::Deliver(msg(9, 5)));
    assert_eq!(seqs(&p.events()), [5, 9]);
    assert_eq!(p.core.last_seq(), Seq(9));
    assert_eq!(
        count(&p.sent(), |c| matches!(c, Command::SyncRequest { .. })),
        0
    );
}

#[test]
fn a_gap_starts_exactly_one_sync_from_the_last_seq() {
    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(1, 0, Command::Deliver(msg(4, 0)));
    assert_eq!(seqs(&p.events()), [4]);
    // 6 is missing before 8: one sync, and the next gapped push asks for no other.
    p.push(2, 0, Command::Deliver(msg(8, 6)));
    p.push(3, 0, Command::Deliver(msg(9, 8)));
    let sent = p.sent();
    let syncs: Vec<_> = sent
        .iter()
        .filter_map(|(r, c)| match c {
            Command::SyncRequest { after_seq, .. } => Some((*r, *after_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(syncs.len(), 1, "{sent:?}");
    assert_eq!(syncs[0].1, Seq(4));
    assert!(
        seqs(&p.events()).is_empty(),
        "nothing past a gap is reported"
    );
    p.push(
        4,
        syncs[0].0,
        Command::SyncPage {
            max_seq: Seq(9),
            has_more: false,
            messages: vec![msg(6, 4), msg(8, 6), msg(9, 8)],
        },
    );
    let ev = p.events();
    assert_eq!(seqs(&ev), [6, 8, 9]);
    assert!(matches!(
        ev.last(),
        Some(Event::Synced { last_seq: Seq(9) })
    ));
    let sent = p.sent();
    assert_eq!(
        count(&sent, |c| matches!(c, Command::SyncRequest { .. })),
        0
    );
    // The sync's end acknowledges what it brought.
    assert_eq!(sent, vec![(sent[0].0, Command::DeliverAck { seq: Seq(9) })]);
}

#[test]
fn a_push_dropped_during_a_sync_is_fetched_by_one_more_sync() {
    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(1, 0, Command::Deliver(msg(8, 6)));
    let (req, _) = p.sent_one();
    // 12 follows 10, which the page (read before 10 and 12 existed) does not bring.
    p.push(2, 0, Command::Deliver(msg(12, 10)));
    p.push(
        3,
        req,
        Command::SyncPage {
            max_seq: Seq(8),
            has_more: false,
            messages: vec![msg(6, 0), msg(8, 6)],
        },
    );
    let (req, again) = p.sent_one();
    assert_eq!(
        again,
        Command::SyncRequest {
            after_seq: Seq(8),
            limit: 200
        }
    );
    p.push(
        4,
        req,
        Command::SyncPage {
            max_seq: Seq(12),
            has_more: false,
            messages: vec![msg(10, 8), msg(12, 10)],
        },
    );
    assert_eq!(seqs(&p.events()), [6, 8, 10, 12]);
    assert_eq!(p.sent_one().1, Command::DeliverAck { seq: Seq(12) });
}

#[test]
fn a_login_behind_max_seq_syncs_page_by_page() {
    let mut cfg = config();
    cfg.last_seq = Seq(2);
    let mut p = Peer::logged_in(cfg, 0, 7);
    let (r1, s1) = p.sent_one();
    assert_eq!(
        s1,
        Command::SyncRequest {
            after_seq: Seq(2),
            limit: 200
        }
    );
    p.push(
        1,
        r1,
        Command::SyncPage {
            max_seq: Seq(7),
            has_more: true,
            messages: vec![msg(3, 2), msg(5, 3)],
        },
    );
    let (r2, s2) = p.sent_one();
    assert_eq!(
        s2,
        Command::SyncRequest {
            after_seq: Seq(5),
            limit: 200
        }
    );
    p.push(
        2,
        r2,
        Command::SyncPage {
            max_seq: Seq(7),
            has_more: false,
            messages: vec![msg(7, 5)],
        },
    );
    assert_eq!(seqs(&p.events()), [3, 5, 7]);
    assert_eq!(p.sent_one().1, Command::DeliverAck { seq: Seq(7) });
}

#[test]
fn delivery_acks_are_coalesced_into_one_of_the_last_contiguous_seq() {
    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(1_000, 0, Command::Deliver(msg(1, 0)));
    p.push(1_030, 0, Command::Deliver(msg(2, 1)));
    p.push(1_060, 0, Command::Deliver(msg(4, 3))); // a gap: not held, not acknowledged
    let sync = p.sent();
    assert_eq!(
        count(&sync, |c| matches!(c, Command::SyncRequest { .. })),
        1
    );
    assert_eq!(p.core.poll_timeout(), Some(1_100));
    p.core.handle_timeout(1_099);
    assert!(p.sent().is_empty());
    p.core.handle_timeout(1_100);
    assert_eq!(p.sent_one().1, Command::DeliverAck { seq: Seq(2) });
    p.core.handle_timeout(5_000);
    assert!(p.sent().is_empty(), "no second ack of the same seq");
}

fn sends(sent: &[(u32, Command)]) -> Vec<(u32, u64)> {
    sent.iter()
        .filter_map(|(r, c)| match c {
            Command::SendC2c { client_msg_id, .. } => Some((*r, *client_msg_id)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_send_is_retried_with_the_same_id_after_an_ack_timeout_and_a_reconnect() {
    let mut p = Peer::logged_in(config(), 0, 0);
    let id = p
        .core
        .send_c2c(100, UserId(7), None, Bytes::from_static(b"hi"))
        .unwrap();
    let first = sends(&p.sent());
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, id);
    // No answer for the ack timeout: written again, same id, a new request id.
    assert_eq!(p.core.poll_timeout(), Some(10_100));
    p.core.handle_timeout(10_100);
    let second = sends(&p.sent());
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].1, id);
    assert_ne!(second[0].0, first[0].0);
    // The connection drops: after the backoff and a new login, the same id again.
    p.core.disconnected(11_000, "reset");
    p.events();
    p.core.handle_timeout(11_500);
    assert!(matches!(p.ios()[..], [Io::Connect(_)]));
    p.core.connected(11_600);
    let (req, _) = p.sent_one();
    p.push(
        11_700,
        req,
        Command::LoginResult {
            code: ErrorCode::Ok,
            server_time_ms: 1,
            max_seq: Seq(0),
            heartbeat_secs: 30,
            message: String::new(),
        },
    );
    let third = sends(&p.sent());
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].1, id, "a reconnect never picks a new id");
    // A retryable refusal: again after a pause, same id.
    p.push(
        11_800,
        third[0].0,
        Command::Error {
            code: ErrorCode::Overloaded,
            message: String::new(),
        },
    );
    p.core.handle_timeout(12_300);
    let fourth = sends(&p.sent());
    assert_eq!(fourth.iter().map(|s| s.1).collect::<Vec<_>>(), [id]);
    // Accepted: reported, placed in the sender's own timeline, and never sent again.
    p.events();
    p.push(
        12_400,
        fourth[0].0,
        Command::SendAck {
            code: ErrorCode::Ok,
            client_msg_id: id,
            msg_id: MsgId(77),
            seq: Seq(1),
            server_time_ms: 3,
            prev_seq: Seq(0),
        },
    );
    let ev = p.events();
    assert!(
        matches!(&ev[..], [Event::Message(m), Event::SendAcked { client_msg_id, msg_id: MsgId(77), .. }]
            if m.from == UserId(42) && m.body == "hi" && *client_msg_id == id),
        "{ev:?}"
    );
    assert_eq!(p.core.last_seq(), Seq(1));
    assert_eq!(p.core.unacked().count(), 0);
    p.core.handle_timeout(60_000);
    assert!(sends(&p.sent()).is_empty());
}

#[test]
fn a_send_before_the_login_waits_and_a_refused_one_is_reported() {
    let mut p = Peer::new(config());
    let id = p
        .core
        .send_c2c(0, UserId(7), Some(99), Bytes::from_static(b"x"))
        .unwrap();
    assert_eq!(id, 99);
    p.core.start(0);
    p.ios();
    p.core.connected(0);
    p.login_ok(1, 0);
    let s = sends(&p.sent());
    assert_eq!(s.iter().map(|s| s.1).collect::<Vec<_>>(), [99]);
    p.push(
        2,
        s[0].0,
        Command::SendAck {
            code: ErrorCode::InvalidArgument,
            client_msg_id: 99,
            msg_id: MsgId(0),
            seq: Seq(0),
            server_time_ms: 0,
            prev_seq: Seq(0),
        },
    );
    assert_eq!(
        p.events(),
        vec![Event::SendFailed {
            client_msg_id: 99,
            code: ErrorCode::InvalidArgument
        }]
    );
    p.core.handle_timeout(100_000);
    assert!(sends(&p.sent()).is_empty());
}

fn waits(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { after_ms, .. } => Some(*after_ms),
            _ => None,
        })
        .collect()
}

#[test]
fn the_backoff_grows_walks_the_gates_and_resets_after_a_stable_connection() {
    let mut p = Peer::new(config());
    let order: Vec<u16> = p.core.gates().iter().map(|g| g.id).collect();
    let mut expect = GATES.iter().map(|g| g.0).collect::<Vec<_>>();
    expect.sort_by_key(|&g| std::cmp::Reverse(im_shared::iplist::rendezvous_weight(UserId(42), g)));
    assert_eq!(order, expect, "gates in the user's rendezvous order");
    p.core.start(0);
    let mut now = 0;
    let mut tried = Vec::new();
    let mut all = Vec::new();
    for _ in 0..5 {
        let Some(Io::Connect(g)) = p.core.poll_io() else {
            panic!("no connect")
        };
        tried.push(g.id);
        p.core.disconnected(now, "refused");
        let ev = p.events();
        all.extend(waits(&ev));
        now = p.core.poll_timeout().unwrap();
        p.core.handle_timeout(now - 1);
        assert!(p.core.poll_io().is_none(), "not before the backoff");
        p.core.handle_timeout(now);
    }
    assert_eq!(all, [500, 1000, 2000, 4000, 8000]);
    assert_eq!(tried, [order[0], order[1], order[2], order[0], order[1]]);
    // Logged in for less than 10 s: the backoff goes on growing.
    let Some(Io::Connect(_)) = p.core.poll_io() else {
        panic!()
    };
    p.core.connected(now);
    p.login_ok(now, 0);
    p.core.disconnected(now + 9_999, "reset");
    assert_eq!(waits(&p.events()), [16_000]);
    now = p.core.poll_timeout().unwrap();
    p.core.handle_timeout(now);
    p.ios();
    // Logged in for 10 s: starts over.
    p.core.connected(now);
    p.login_ok(now, 0);
    p.core.handle_timeout(now + 10_000);
    p.sent();
    p.core.disconnected(now + 10_000, "reset");
    assert_eq!(waits(&p.events()), [500]);
}

#[test]
fn the_jitter_comes_from_the_seed() {
    let run = |seed| {
        let mut cfg = config();
        cfg.backoff.jitter = 0.5;
        cfg.seed = seed;
        let mut p = Peer::new(cfg);
        p.core.start(0);
        let mut w = Vec::new();
        let mut now = 0;
        for _ in 0..6 {
            p.ios();
            p.core.disconnected(now, "x");
            w.extend(waits(&p.events()));
            now = p.core.poll_timeout().unwrap();
            p.core.handle_timeout(now);
        }
        w
    };
    let a = run(1);
    assert_eq!(a, run(1), "same seed, same waits");
    assert_ne!(a, run(2));
    for (n, w) in a.iter().enumerate() {
        let base = (500u64 << n).min(30_000) as f64;
        assert!((base * 0.5..=base * 1.5).contains(&(*w as f64)), "{n}: {w}");
    }
}

#[test]
fn a_kickout_stops_reconnecting_but_a_shutdown_does_not() {
    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(
        5,
        0,
        Command::Kickout {
            reason: 1,
            message: "another phone".into(),
        },
    );
    assert_eq!(p.ios(), vec![Io::Close]);
    assert_eq!(
        p.events(),
        vec![Event::Kicked {
            reason: 1,
            message: "another phone".into(),
            will_reconnect: false
        }]
    );
    assert!(p.core.is_stopped());
    assert_eq!(p.core.poll_timeout(), None);
    p.core.disconnected(6, "closed");
    p.core.handle_timeout(1_000_000);
    assert!(p.ios().is_empty() && p.events().is_empty());
    assert_eq!(
        p.core.send_c2c(7, UserId(1), None, Bytes::new()),
        Err(CallError::Stopped)
    );

    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(
        5,
        0,
        Command::Kickout {
            reason: 2,
            message: "draining".into(),
        },
    );
    assert_eq!(p.ios(), vec![Io::Close]);
    let ev = p.events();
    assert!(matches!(
        ev[0],
        Event::Kicked {
            will_reconnect: true,
            ..
        }
    ));
    assert_eq!(waits(&ev), [500]);
    p.core.handle_timeout(505);
    assert!(matches!(p.ios()[..], [Io::Connect(_)]));
}

#[test]
fn a_bad_token_stops_and_an_overloaded_login_retries() {
    let mut p = Peer::new(config());
    p.core.start(0);
    p.ios();
    p.core.connected(0);
    let (req, _) = p.sent_one();
    p.push(
        1,
        req,
        Command::Error {
            code: ErrorCode::Overloaded,
            message: "busy".into(),
        },
    );
    assert_eq!(p.ios(), vec![Io::Close]);
    assert_eq!(waits(&p.events()), [500]);
    p.core.handle_timeout(501);
    p.ios();
    p.core.connected(502);
    let (req, _) = p.sent_one();
    p.push(
        503,
        req,
        Command::LoginResult {
            code: ErrorCode::BadToken,
            server_time_ms: 0,
            max_seq: Seq(0),
            heartbeat_secs: 0,
            message: "bad".into(),
        },
    );
    assert!(p.core.is_stopped());
    assert!(matches!(
        p.events()[..],
        [Event::LoginFailed {
            code: ErrorCode::BadToken,
            will_retry: false,
            ..
        }]
    ));
}

#[test]
fn a_login_without_answer_is_given_up_and_retried() {
    let mut p = Peer::new(config());
    p.core.start(0);
    p.ios();
    p.core.connected(0);
    p.sent();
    p.core.handle_timeout(10_000);
    assert_eq!(p.ios(), vec![Io::Close]);
    assert_eq!(waits(&p.events()), [500]);
}

#[test]
fn requests_are_answered_by_id_and_lost_with_their_connection() {
    let mut p = Peer::logged_in(config(), 0, 0);
    let a = p.core.request(&Command::MyGroups).unwrap();
    let b = p.core.request(&Command::MyGroups).unwrap();
    p.sent();
    p.push(1, a, Command::GroupList { groups: vec![] });
    assert_eq!(
        p.events(),
        vec![Event::Response {
            req_id: a,
            cmd: Command::GroupList { groups: vec![] }
        }]
    );
    p.core.disconnected(2, "reset");
    assert_eq!(p.events()[0], Event::RequestLost { req_id: b });
    assert_eq!(
        p.core.request(&Command::MyGroups),
        Err(CallError::NotLoggedIn)
    );
}

#[test]
fn logout_stops_the_session() {
    let mut p = Peer::logged_in(config(), 0, 0);
    p.push(1, 0, Command::Deliver(msg(3, 0)));
    p.events();
    p.core.logout(2);
    let sent = p.sent();
    assert_eq!(sent[0].1, Command::DeliverAck { seq: Seq(3) });
    assert_eq!(sent[1].1, Command::Logout);
    p.push(3, sent[1].0, Command::LogoutAck);
    assert_eq!(p.events(), vec![Event::LoggedOut]);
    assert_eq!(p.ios(), vec![Io::Close]);
    assert!(p.core.is_stopped());
}

#[test]
fn the_rule_pieces_on_their_own() {
    assert_eq!(classify(Seq(5), Seq(5), Seq(0)), Offer::Duplicate);
    assert_eq!(classify(Seq(5), Seq(9), Seq(5)), Offer::Accepted);
    assert_eq!(classify(Seq(5), Seq(9), Seq(3)), Offer::Accepted);
    assert_eq!(classify(Seq(5), Seq(9), Seq(7)), Offer::Gap);
    let mut a = Attempts::default();
    assert_eq!([a.on_end(0), a.on_end(0), a.on_end(9_999)], [0, 1, 2]);
    assert_eq!(a.on_end(STABLE_MS), 0);
    assert!(!resend_due(100, 10_099, 10_000));
    assert!(resend_due(100, 10_100, 10_000));
    assert!(!resend_due(0, u64::MAX, 0));
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every server frame of docs/vectors/server-frames.json, fed to a logged-in core as bytes:
/// pushes become their events (fields checked), answers are routed to the request of the same id,
/// and none of them breaks the connection.
#[test]
fn the_server_frame_vectors_decode_into_events() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/vectors/server-frames.json"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 20);
    let u = |v: &serde_json::Value| v.as_str().unwrap().parse::<u64>().unwrap();
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let cmd = v["cmd"].as_str().unwrap();
        let req = v["reqId"].as_u64().unwrap() as u32;
        let f = &v["fields"];
        let bytes = unhex(v["hex"].as_str().unwrap());
        if cmd == "LoginResult" {
            let mut p = Peer::new(config());
            p.core.start(0);
            p.ios();
            p.core.connected(0);
            assert_eq!(p.sent_one().0, req);
            p.core.handle_bytes(1, &bytes);
            let ev = p.events();
            match f["code"].as_u64().unwrap() {
                0 => assert!(
                    matches!(&ev[0], Event::LoggedIn { max_seq, heartbeat_secs, .. }
                        if max_seq.0 == u(&f["maxSeq"]) && u64::from(*heartbeat_secs) == f["heartbeatSecs"].as_u64().unwrap()),
                    "{name}: {ev:?}"
                ),
                c => assert!(
                    matches!(&ev[0], Event::LoginFailed { code, message, .. }
                        if *code as u64 == c && message == f["message"].as_str().unwrap()),
                    "{name}: {ev:?}"
                ),
            }
            continue;
        }
        let mut cfg = config();
        if cmd == "Deliver" {
            // Held up to the pushed entry's prev_seq: it is next in order.
            cfg.last_seq = Seq(u(&f["message"]["prevSeq"]));
        }
        let mut p = Peer::logged_in(cfg, 0, 0);
        if req != 0 {
            // An answer: make the request it answers (same id).
            loop {
                let r = p.core.request(&Command::MyGroups).unwrap();
                if r == req {
                    break;
                }
                assert!(r < req, "{name}: request id {req} passed");
            }
        }
        // Split in two reads: a frame may arrive in pieces.
        let (a, b) = bytes.split_at(bytes.len() / 2);
        p.core.handle_bytes(1, a);
        p.core.handle_bytes(1, b);
        let ev = p.events();
        assert!(p.core.is_logged_in() || cmd == "Kickout", "{name}: {ev:?}");
        assert_eq!(ev.len(), 1, "{name}: {ev:?}");
        let e = &ev[0];
        if req != 0 {
            assert!(
                matches!(e, Event::Response { req_id, cmd: c } if *req_id == req && format!("{:?}", c.cmd()) == cmd),
                "{name}: {e:?}"
            );
            continue;
        }
        let ok = match (cmd, e) {
            ("Deliver", Event::Message(m)) | ("GroupDeliver", Event::GroupPost(m)) => {
                m.seq.0 == u(&f["message"]["seq"])
                    && m.msg_id.0 == u(&f["message"]["msgId"])
                    && m.body == unhex(f["message"]["body"].as_str().unwrap())
            }
            (
                "Kickout",
                Event::Kicked {
                    reason, message, ..
                },
            ) => {
                u64::from(*reason) == f["reason"].as_u64().unwrap()
                    && message == f["message"].as_str().unwrap()
            }
            ("Delivered", Event::Delivered { msg_id, recipient }) => {
                msg_id.0 == u(&f["msgId"]) && recipient.0 == u(&f["recipient"])
            }
            ("OrgChanged", Event::OrgChanged { version }) => *version == u(&f["version"]),
            (
                "TypingNotice",
                Event::Typing {
                    from, peer, typing, ..
                },
            ) => from.0 == u(&f["from"]) && *peer == u(&f["peer"]) && *typing,
            ("PresenceNotice", Event::Presence(e)) => {
                e.len() == 2 && e[0].online && e[1].last_seen_ms == 1_767_225_000_000
            }
            ("GroupHeads", Event::GroupHeads(h)) => h.len() == 1 && h[0].head.0 == 4,
            _ => false,
        };
        assert!(ok, "{name}: {e:?}");
    }
}
