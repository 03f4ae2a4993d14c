//! Presence and typing indicators over real sockets against a real server: subscriptions,
//! changes pushed (offline after the delay), typing in c2c and groups, and every refusal.

mod common;

use std::time::{Duration, Instant};

use common::*;
use im_client::{Client, ClientError};
use im_shared::proto::{PresenceEntry, CONV_C2C, CONV_C2G, MAX_PRESENCE_SUBSCRIPTIONS};
use im_shared::{Command, DeviceType, ErrorCode, UserId};

/// The next push matching `want` within 10 s (other frames are skipped).
fn next_push<T>(c: &mut Client, mut want: impl FnMut(&Command) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(cmd) = c.recv(Duration::from_millis(100)).unwrap() {
            if let Some(t) = want(&cmd) {
                return t;
            }
        }
    }
    panic!("no matching push within 10 s");
}

/// Presence entries pushed to `c` until `n` have arrived (10 s at most).
fn presence(c: &mut Client, n: usize) -> Vec<PresenceEntry> {
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(next_push(c, |cmd| match cmd {
            Command::PresenceNotice { entries } => Some(entries.clone()),
            _ => None,
        }));
    }
    got.sort_by_key(|e| e.uid);
    got
}

/// `(conv, peer, from, state)` of the next typing notice pushed to `c`.
fn typing_notice(c: &mut Client) -> (u8, u64, UserId, u8) {
    next_push(c, |cmd| match cmd {
        Command::TypingNotice {
            conv,
            peer,
            from,
            state,
            ..
        } => Some((*conv, *peer, *from, *state)),
        _ => None,
    })
}

/// Nothing of this kind arrives within `wait`.
fn quiet(c: &mut Client, wait: Duration, what: impl Fn(&Command) -> bool) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Some(cmd) = c.recv(Duration::from_millis(50)).unwrap() {
            assert!(!what(&cmd), "unexpected {cmd:?}");
        }
    }
}

fn refusal(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Server { code, message } => (code, message),
        e => panic!("not a refusal: {e}"),
    }
}

#[test]
fn presence_is_answered_then_changes_are_pushed_and_offline_waits_for_the_delay() {
    let s = start_with(|c| c.presence_offline_delay_ms = 400);
    let mut w = login(s.addr, 5001);
    let mut a = login(s.addr, 5002);
    w.presence_subscribe(&[UserId(5002), UserId(5003)]).unwrap();
    let got = presence(&mut w, 2);
    assert_eq!(
        got.iter()
            .map(|e| (e.uid.0, e.online, e.last_seen_ms))
            .collect::<Vec<_>>(),
        vec![(5002, true, 0), (5003, false, 0)]
    );
    // 5003 logs in: pushed at once.
    let b = login(s.addr, 5003);
    let got = presence(&mut w, 1);
    assert_eq!((got[0].uid, got[0].online), (UserId(5003), true));
    // 5003 logs out: pushed after the delay, with the time it left.
    let before = im_shared::token::now_secs() * 1000;
    drop(b);
    let left_at = Instant::now();
    let got = presence(&mut w, 1);
    assert!(left_at.elapsed() >= Duration::from_millis(350), "too early");
    assert_eq!((got[0].uid, got[0].online), (UserId(5003), false));
    assert!(got[0].last_seen_ms >= before, "{got:?}");
    // A second device of 5002 changes nothing; its last device leaving does.
    let a2 = login_as(s.addr, 5002, DeviceType::Desktop, "desk").0;
    drop(a2);
    quiet(&mut w, Duration::from_millis(800), |c| {
        matches!(c, Command::PresenceNotice { .. })
    });
    a.logout().unwrap();
    let got = presence(&mut w, 1);
    assert_eq!((got[0].uid, got[0].online), (UserId(5002), false));
    // Unsubscribed: nothing more.
    w.presence_subscribe(&[]).unwrap();
    let _a = login(s.addr, 5002);
    quiet(&mut w, Duration::from_millis(500), |c| {
        matches!(c, Command::PresenceNotice { .. })
    });
}

#[test]
fn a_user_who_hides_its_presence_is_seen_offline_until_it_shows_it_again() {
    let s = start();
    let mut w = login(s.addr, 5301);
    let mut a = login(s.addr, 5302);
    w.presence_subscribe(&[UserId(5302)]).unwrap();
    assert!(presence(&mut w, 1)[0].online);
    a.set_presence_hidden(true).unwrap();
    let got = presence(&mut w, 1);
    assert_eq!((got[0].online, got[0].last_seen_ms), (false, 0));
    // Another device of a logging in reveals nothing; a new follower sees it offline too.
    let _a2 = login_as(s.addr, 5302, DeviceType::Desktop, "desk").0;
    quiet(&mut w, Duration::from_millis(500), |c| {
        matches!(c, Command::PresenceNotice { .. })
    });
    let mut w2 = login(s.addr, 5303);
    w2.presence_subscribe(&[UserId(5302)]).unwrap();
    assert!(!presence(&mut w2, 1)[0].online);
    a.set_presence_hidden(false).unwrap();
    assert!(presence(&mut w, 1)[0].online);
    assert!(presence(&mut w2, 1)[0].online);
}

#[test]
fn bad_presence_lists_are_refused_and_the_connection_stays_usable() {
    let s = start();
    let mut w = login(s.addr, 5101);
    let too_many: Vec<UserId> = (0..=MAX_PRESENCE_SUBSCRIPTIONS as u64)
        .map(|i| UserId(6000 + i))
        .collect();
    let (code, msg) = refusal(w.presence_subscribe(&too_many).unwrap_err());
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(msg.contains("at most 256"), "{msg}");
    let (code, msg) = refusal(w.presence_subscribe(&[UserId(0)]).unwrap_err());
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(msg.contains("user 0"), "{msg}");
    // Exactly the limit is fine.
    w.presence_subscribe(&too_many[..MAX_PRESENCE_SUBSCRIPTIONS])
        .unwrap();
    assert_eq!(presence(&mut w, MAX_PRESENCE_SUBSCRIPTIONS).len(), 256);
}

#[test]
fn typing_reaches_the_peer_and_group_members_and_bad_or_too_fast_typing_is_refused() {
    let s = start();
    let mut a = login(s.addr, 5201);
    let mut b = login(s.addr, 5202);
    let mut c = login(s.addr, 5203);
    a.typing(CONV_C2C, 5202, true).unwrap();
    assert_eq!(typing_notice(&mut b), (CONV_C2C, 5201, UserId(5201), 1));
    a.typing(CONV_C2C, 5202, false).unwrap();
    assert_eq!(typing_notice(&mut b), (CONV_C2C, 5201, UserId(5201), 0));
    let g = a
        .create_group("typists", &[UserId(5202), UserId(5203)])
        .unwrap();
    b.typing(CONV_C2G, g.0, true).unwrap();
    for m in [&mut a, &mut c] {
        assert_eq!(typing_notice(m), (CONV_C2G, g.0, UserId(5202), 1));
    }
    // Refusals: each names its reason and leaves the connection open.
    let stranger_g = {
        let mut d = login(s.addr, 5204);
        d.create_group("other", &[UserId(5205)]).unwrap()
    };
    std::thread::sleep(Duration::from_millis(600)); // the rate limit's budget back
    for (conv, peer, state, want, why) in [
        (CONV_C2C, 5202, 2, ErrorCode::InvalidArgument, "state"),
        (
            CONV_C2C,
            5201,
            1,
            ErrorCode::InvalidArgument,
            "another user",
        ),
        (7, 5202, 1, ErrorCode::InvalidArgument, "conv must be"),
        (
            CONV_C2G,
            stranger_g.0,
            1,
            ErrorCode::NotMember,
            "not a member",
        ),
    ] {
        let cmd = Command::Typing { conv, peer, state };
        let (code, msg) = refusal(a.op(&cmd).unwrap_err());
        assert_eq!(code, want, "{msg}");
        assert!(msg.contains(why), "{msg}");
    }
    // Too fast: a burst of 5 passes, then Overloaded until the budget refills.
    std::thread::sleep(Duration::from_millis(2_600));
    // (Written at once, so no time passes between them on the server's clock.)
    for _ in 0..6 {
        a.send_cmd(&Command::Typing {
            conv: CONV_C2C,
            peer: 5203,
            state: 1,
        })
        .unwrap();
    }
    let answers: Vec<Command> = (0..6)
        .map(|_| {
            next_push(&mut a, |cmd| match cmd {
                Command::OpResult { .. } | Command::Error { .. } => Some(cmd.clone()),
                _ => None,
            })
        })
        .collect();
    for (i, ans) in answers[..5].iter().enumerate() {
        assert!(
            matches!(
                ans,
                Command::OpResult {
                    code: ErrorCode::Ok,
                    ..
                }
            ),
            "typing {i} of the burst: {ans:?}"
        );
    }
    match &answers[5] {
        Command::Error { code, message } => {
            assert_eq!(*code, ErrorCode::Overloaded);
            assert!(message.contains("at most 2 a second"), "{message}");
        }
        other => panic!("the sixth passed: {other:?}"),
    }
    a.heartbeat().unwrap();
}
