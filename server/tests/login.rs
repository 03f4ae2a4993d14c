//! Login, token refusal, login deadline, kickout, logout, heartbeat.

mod common;

use std::time::Duration;

use common::*;
use im_client::ClientError;
use im_shared::token::{now_secs, HmacTokens};
use im_shared::{Command, DeviceType, ErrorCode, KickReason, Seq, UserId};

#[test]
fn login_ok_and_heartbeat() {
    let s = start();
    let (mut c, info) = login_as(s.addr, 1, DeviceType::Phone, "p1");
    assert_eq!(info.max_seq, Seq(0));
    assert_eq!(info.heartbeat_secs, 30);
    assert!(c.heartbeat().unwrap() > 0);
}

fn refused(addr: std::net::SocketAddr, uid: u64, token: &str) -> ErrorCode {
    let mut c = connect(addr);
    let err = c
        .login(UserId(uid), token, DeviceType::Phone, "p", Seq(0))
        .unwrap_err();
    // The server closes the connection after refusing.
    assert!(c.read_until_closed(Duration::from_secs(5)).is_ok());
    err.code().expect("a server refusal")
}

#[test]
fn bad_forged_and_expired_tokens_are_refused() {
    let s = start();
    let good = token(5);
    assert_eq!(refused(s.addr, 5, "garbage"), ErrorCode::BadToken);
    // Signed with another secret.
    let other = HmacTokens::new("not-the-secret").mint(UserId(5), now_secs() + 60);
    assert_eq!(refused(s.addr, 5, &other), ErrorCode::BadToken);
    // A valid token of user 5 does not log in user 6.
    assert_eq!(refused(s.addr, 6, &good), ErrorCode::BadToken);
    // Expiry moved forward without re-signing (the expiry is read from the token: recomputing
    // it from the clock fails when a second ticks between the two).
    let exp: u64 = good.split('.').nth(2).unwrap().parse().unwrap();
    let forged = good.replacen(&format!(".{exp}."), &format!(".{}.", exp + 999), 1);
    assert_ne!(forged, good);
    assert_eq!(refused(s.addr, 5, &forged), ErrorCode::BadToken);
    let expired = HmacTokens::new(im_server::DEV_TOKEN_SECRET).mint(UserId(5), now_secs() - 1);
    assert_eq!(refused(s.addr, 5, &expired), ErrorCode::TokenExpired);
    // After all that, the right token still works.
    login(s.addr, 5);
}

#[test]
fn no_login_within_deadline_is_closed() {
    let s = start_with(|c| c.login_timeout_secs = 1);
    let mut silent = connect(s.addr);
    let got = silent.read_until_closed(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(
            got.as_slice(),
            [Command::Error {
                code: ErrorCode::LoginTimeout,
                ..
            }]
        ),
        "{got:?}"
    );
    // A partial login frame does not extend the deadline either.
    let mut slow = connect(s.addr);
    slow.send_raw(b"IM\x01\x01").unwrap();
    let got = slow.read_until_closed(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        got.as_slice(),
        [Command::Error {
            code: ErrorCode::LoginTimeout,
            ..
        }]
    ));
}

#[test]
fn heartbeat_before_login_is_answered() {
    let s = start();
    let mut c = connect(s.addr);
    assert!(c.heartbeat().unwrap() > 0);
    c.login(UserId(15), &token(15), DeviceType::Web, "w", Seq(0))
        .unwrap();
}

#[test]
fn oversized_login_frame_is_refused() {
    let s = start();
    let mut c = connect(s.addr);
    // The default limit before login is 8 KiB of body.
    let err = c
        .login(UserId(16), &"x".repeat(9000), DeviceType::Web, "w", Seq(0))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge));
}

#[test]
fn a_login_with_a_token_of_several_kib_is_read_and_judged_by_its_token() {
    let s = start();
    // A company SSO token of ~6 KB fits the default pre-login limit: the server reads the frame
    // and answers on the token (a forged one here), not with FrameTooLarge.
    assert_eq!(refused(s.addr, 17, &"t".repeat(6000)), ErrorCode::BadToken);
    // Right below the limit (8 192 bytes of body) is read too.
    let body_rest = 8 + 1 + (2 + 1) + 8 + 2;
    assert_eq!(
        refused(s.addr, 17, &"t".repeat(8192 - body_rest)),
        ErrorCode::BadToken
    );
    assert_eq!(
        refused(s.addr, 17, &"t".repeat(8193 - body_rest)),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn the_pre_login_limit_is_configurable_and_capped_by_max_body() {
    let s = start_with(|c| c.max_login_body = 2048);
    assert_eq!(refused(s.addr, 18, &"t".repeat(1500)), ErrorCode::BadToken);
    assert_eq!(
        refused(s.addr, 18, &"t".repeat(3000)),
        ErrorCode::FrameTooLarge
    );
    // Never more than max_body.
    let s = start_with(|c| {
        c.max_body = 1024;
        c.max_login_body = 8192;
    });
    assert_eq!(
        refused(s.addr, 18, &"t".repeat(1500)),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn commands_before_login_are_refused() {
    let s = start();
    let mut c = connect(s.addr);
    c.send_cmd(&Command::SyncRequest {
        after_seq: Seq(0),
        limit: 10,
    })
    .unwrap();
    let got = c.read_until_closed(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        got.as_slice(),
        [Command::Error {
            code: ErrorCode::NotLoggedIn,
            ..
        }]
    ));
}

#[test]
fn same_device_type_is_kicked_other_types_coexist() {
    let s = start();
    let (mut phone1, _) = login_as(s.addr, 7, DeviceType::Phone, "phone-a");
    let (mut desktop, _) = login_as(s.addr, 7, DeviceType::Desktop, "pc");
    let (mut phone2, _) = login_as(s.addr, 7, DeviceType::Phone, "phone-b");
    let got = phone1.read_until_closed(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(got.as_slice(), [Command::Kickout { reason, .. }] if *reason == KickReason::SameDeviceType as u8),
        "{got:?}"
    );
    // Both remaining devices get a message for user 7.
    let mut bob = login(s.addr, 8);
    bob.send_c2c(UserId(7), 1, "hi both").unwrap();
    assert_eq!(&next_deliver(&mut desktop).body[..], b"hi both");
    assert_eq!(&next_deliver(&mut phone2).body[..], b"hi both");
}

#[test]
fn logout_closes_and_unroutes() {
    let s = start();
    let mut a = login(s.addr, 11);
    a.logout().unwrap();
    assert!(a
        .read_until_closed(Duration::from_secs(5))
        .unwrap()
        .is_empty());
    // Messages to a logged-out user wait for the next login.
    let mut b = login(s.addr, 12);
    let ack = b.send_c2c(UserId(11), 1, "later").unwrap();
    assert!(ack.seq > Seq(0));
    let mut a = login(s.addr, 11);
    let (msgs, more, _) = a.sync_page(Seq(0), 10).unwrap();
    assert!(!more);
    assert_eq!(msgs.len(), 1);
    assert_eq!(&msgs[0].body[..], b"later");
}

#[test]
fn second_login_on_same_connection_is_refused_but_connection_lives() {
    let s = start();
    let mut a = login(s.addr, 13);
    let err = a
        .login(
            UserId(13),
            &token(13),
            DeviceType::Phone,
            "phone-13",
            Seq(0),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ClientError::Server {
            code: ErrorCode::AlreadyLoggedIn,
            ..
        }
    ));
    assert!(a.heartbeat().is_ok());
}

#[test]
fn idle_connection_is_closed() {
    let s = start_with(|c| c.idle_timeout_secs = 2);
    let mut a = login(s.addr, 14);
    let got = a.read_until_closed(Duration::from_secs(10)).unwrap();
    assert!(
        matches!(
            got.as_slice(),
            [Command::Error {
                code: ErrorCode::IdleTimeout,
                ..
            }]
        ),
        "{got:?}"
    );
}

/// A second server on the address of a running one fails to start (issue 19): with
/// `SO_REUSEPORT` alone it started and split the clients between two unrelated servers.
#[test]
fn a_second_server_on_a_busy_address_fails_to_start() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.listen = s.addr;
    let e = match im_server::start(&cfg) {
        Ok(_) => panic!("a second server started on {}", s.addr),
        Err(e) => e,
    };
    assert!(format!("{e:#}").contains("already in use"), "{e:#}");
    // The first one still serves.
    let mut c = login(s.addr, 100);
    c.send_c2c(UserId(100), 1, "still here").unwrap();
}
