//! Business integration end to end through a real single-node server: s2c messages, group
//! administration, tokens, iplist, health and metrics over the signed HTTP API; c2s reports
//! delivered to a real webhook; offline push notifications to a real push-gateway webhook.
//!
//! Everything goes over real sockets and real HTTP/1.1. The business side (the webhook receivers
//! and the API caller) is `im_testkit::http` over `std::net`: a tiny HTTP/1.1 client, a tiny
//! HTTP/1.1 server reading `Content-Length` bodies (keep-alive); the small JSON reader is here.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use im_c2s::{signature_hex, C2sConfig};
use im_client::{Client, ClientError, Timeline};
use im_push::{PushConfig, WebhookConfig, PROVIDER_WEBHOOK};
use im_server::ServerConfig;
use im_shared::proto::{
    GroupEvent, GroupEventKind, Message, CONV_C2C, CONV_C2G, CONV_GROUP_EVENT, CONV_S2C,
    ROLE_MEMBER, ROLE_OWNER,
};
use im_shared::token::now_secs;
use im_shared::{DeviceType, ErrorCode, MsgId, Seq, UserId};
use im_testkit::http::{http, metric, Got, HttpResp, Json, Receiver};

/// API key id and secret of the business server.
const KEY_ID: &str = "biz";
const SECRET: &str = "s3cret";
/// The business account s2c messages are sent from.
const BIZ: u64 = 9000;
const C2S_SECRET: &str = "c2s-secret";
const PUSH_SECRET: &str = "push-secret";
/// Push delay of the push tests.
const PUSH_DELAY: Duration = Duration::from_millis(500);
/// How long after the delay a push may take (worker check every 250 ms, dispatcher, HTTP).
const PUSH_SLACK: Duration = Duration::from_millis(2500);
/// How long to wait before concluding that no push comes.
const NO_PUSH_WAIT: Duration = Duration::from_millis(1000);

// ---------------------------------------------------------------------------------------------
// JSON answers, read with serde_json; a wrong shape fails the test with what was found.

trait JsonExt {
    fn parse(text: &[u8]) -> Json;
    fn u64(&self) -> u64;
    fn str(&self) -> &str;
    fn arr(&self) -> &[Json];
    /// The object's keys, sorted.
    fn keys(&self) -> Vec<&str>;
}

impl JsonExt for Json {
    fn parse(text: &[u8]) -> Json {
        serde_json::from_slice(text)
            .unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", String::from_utf8_lossy(text)))
    }
    fn u64(&self) -> u64 {
        self.as_u64()
            .unwrap_or_else(|| panic!("not a u64: {self:?}"))
    }
    fn str(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self:?}"))
    }
    fn arr(&self) -> &[Json] {
        self.as_array()
            .unwrap_or_else(|| panic!("not an array: {self:?}"))
    }
    fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {self:?}"))
            .keys()
            .map(|k| k.as_str())
            .collect();
        k.sort_unstable();
        k
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP API (client, webhook receiver and `metric` from `im_testkit::http`).

/// The HTTP API of the server under test, called as the business server.
struct Api(SocketAddr);

impl Api {
    /// A request signed with the business key (docs/API.md).
    fn signed(&self, method: &str, target: &str, body: &str) -> HttpResp {
        self.signed_with(KEY_ID, SECRET, now_secs(), method, target, body)
    }

    fn signed_with(
        &self,
        key: &str,
        secret: &str,
        ts: u64,
        method: &str,
        target: &str,
        body: &str,
    ) -> HttpResp {
        signed_request(self.0, (key, secret), ts, method, target, body)
    }

    /// An unsigned request.
    fn plain(&self, method: &str, target: &str, body: &str) -> HttpResp {
        http(self.0, method, target, &[], body.as_bytes())
    }

    /// A signed call expected to answer `200`; returns the JSON.
    fn ok(&self, method: &str, target: &str, body: &str) -> Json {
        let r = self.signed(method, target, body);
        assert_eq!(r.status, 200, "{method} {target} {body}: {}", r.text());
        r.json()
    }

    /// s2c; returns the msg_id.
    fn send(&self, body: &str) -> MsgId {
        MsgId(self.ok("POST", "/v1/messages", body)["msg_id"].u64())
    }

    fn metrics(&self) -> String {
        let r = self.plain("GET", "/metrics", "");
        assert_eq!(r.status, 200);
        r.text()
    }

    /// Polls `/metrics` until `series` has the value `want` (5 s at most).
    fn wait_metric(&self, series: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = metric(&self.metrics(), series);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {got:?}, want {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server and client helpers.

/// A server with the business API key configured (plus whatever `f` sets).
fn start_biz(f: impl FnOnce(&mut ServerConfig)) -> (TestServer, Api) {
    let (s, api) = start_with_api_key((KEY_ID, SECRET), f);
    (s, Api(api))
}

/// Embedded c2s queue posting every topic to `rx` `/c2s`, signed, with fast retries.
fn c2s_to(rx: &Receiver) -> C2sConfig {
    C2sConfig::Embedded {
        webhooks: BTreeMap::new(),
        default_url: Some(rx.url("/c2s")),
        secret: Some(C2S_SECRET.into()),
        retry_initial_ms: 100,
        retry_max_ms: 400,
        timeout_ms: 2000,
    }
}

/// Offline push to the gateway webhook `rx` `/push`, after [`PUSH_DELAY`].
fn push_to(rx: &Receiver) -> PushConfig {
    PushConfig {
        delay_ms: PUSH_DELAY.as_millis() as u64,
        webhook: Some(WebhookConfig {
            url: rx.url("/push"),
            auth_header: Some("Bearer gw-key".into()),
            secret: Some(PUSH_SECRET.into()),
            timeout_ms: 2000,
        }),
        retry_base_ms: 50,
        retry_max_ms: 200,
        ..PushConfig::default()
    }
}

/// Next delivered message of kind `conv` (acking everything on the way).
fn next_of(c: &mut Client, conv: u8) -> Message {
    loop {
        let m = next_deliver(c);
        c.deliver_ack(m.seq).unwrap();
        if m.conv == conv {
            return m;
        }
    }
}

fn code(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("not a server refusal: {e}"))
}

/// Logs `uid` in on a device, registers a gateway push token for it and logs out.
fn register_token_and_leave(addr: SocketAddr, uid: u64, dt: DeviceType, device: &str, tok: &str) {
    let (mut c, _) = login_as(addr, uid, dt, device);
    c.register_push(PROVIDER_WEBHOOK, tok).unwrap();
    c.logout().unwrap();
}

/// Members of `GET /v1/groups/{id}` as `(uid, role)`.
fn members_of(info: &Json) -> Vec<(u64, String)> {
    info["members"]
        .arr()
        .iter()
        .map(|m| (m["uid"].u64(), m["role"].str().to_owned()))
        .collect()
}

/// `GET /v1/users/{uid}/groups` as `(group, name)`.
fn groups_of(api: &Api, uid: u64) -> Vec<(u64, String)> {
    let j = api.ok("GET", &format!("/v1/users/{uid}/groups"), "");
    assert_eq!(j["uid"].u64(), uid);
    j["groups"]
        .arr()
        .iter()
        .map(|g| (g["group"].u64(), g["name"].str().to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// s2c and the rest of the HTTP API.

#[test]
fn s2c_to_one_online_user_arrives_at_once_from_the_business_account() {
    let (s, api) = start_biz(|_| {});
    let mut u = login(s.addr, 51001);
    let j = api.ok(
        "POST",
        "/v1/messages",
        r#"{"from":9000,"to_users":[51001],"body":"Your order shipped"}"#,
    );
    assert_eq!(j.keys(), vec!["msg_id", "server_time_ms"]);
    let sent = Instant::now();
    let m = next_deliver(&mut u);
    assert!(sent.elapsed() < Duration::from_secs(2), "not at once");
    assert_eq!(
        (m.conv, m.from, m.to, m.client_msg_id),
        (CONV_S2C, UserId(BIZ), UserId(51001), 0)
    );
    assert_eq!(
        (m.msg_id, m.server_time_ms),
        (MsgId(j["msg_id"].u64()), j["server_time_ms"].u64())
    );
    assert_eq!((m.seq, m.prev_seq), (Seq(1), Seq(0)));
    assert_eq!(&m.body[..], b"Your order shipped");
    // Ids as decimal strings and a binary body in base64 work the same way.
    let id = api.send(r#"{"from":"9000","to_users":["51001"],"body_base64":"AAEC/w=="}"#);
    let m = next_deliver(&mut u);
    assert_eq!((m.msg_id, m.conv, m.from), (id, CONV_S2C, UserId(BIZ)));
    assert_eq!((m.seq, m.prev_seq), (Seq(2), Seq(1)));
    assert_eq!(&m.body[..], &[0, 1, 2, 255]);
    assert_no_deliver(&mut u, Duration::from_millis(200));
}

#[test]
fn s2c_to_several_users_reaches_online_ones_now_and_an_offline_one_after_login() {
    let (s, api) = start_biz(|_| {});
    let mut a = login(s.addr, 51011);
    let mut b = login(s.addr, 51012);
    // 51013 is offline; 51011 is listed twice (duplicates are dropped).
    let id = api.send(
        r#"{"from":9000,"to_users":[51011,51012,51011,51013],"body":"maintenance at 2am","request_id":5}"#,
    );
    for c in [&mut a, &mut b] {
        let m = next_deliver(c);
        assert_eq!(
            (m.msg_id, m.conv, m.from, m.to, m.client_msg_id),
            (id, CONV_S2C, UserId(BIZ), UserId(0), 5),
            "several recipients: `to` is 0"
        );
        assert_eq!(&m.body[..], b"maintenance at 2am");
        assert_no_deliver(c, Duration::from_millis(200));
    }
    let (mut c, info) = login_as(s.addr, 51013, DeviceType::Phone, "phone");
    assert_eq!(info.max_seq, Seq(1));
    let mut tl = Timeline::new(Seq(0));
    assert_eq!(tl.sync(&mut c).unwrap(), 1);
    let m = &tl.messages[0];
    assert_eq!(
        (m.msg_id, m.conv, m.from, m.to),
        (id, CONV_S2C, UserId(BIZ), UserId(0))
    );
    assert_eq!(&m.body[..], b"maintenance at 2am");
}

#[test]
fn s2c_to_a_group_created_over_the_api_reaches_every_member_once() {
    let (s, api) = start_biz(|_| {});
    let (o, m1, m2) = (51021, 51022, 51023);
    let mut clients = [login(s.addr, o), login(s.addr, m1), login(s.addr, m2)];
    let j = api.ok(
        "POST",
        "/v1/groups",
        r#"{"owner":51021,"name":"ops","members":[51022,"51023"]}"#,
    );
    assert_eq!(j.keys(), vec!["group"]);
    let g = j["group"].u64();
    assert_ne!(g, 0);
    for c in clients.iter_mut() {
        let e = next_of(c, CONV_GROUP_EVENT);
        assert_eq!(e.to.0, g);
        let ev = GroupEvent::decode(e.body).unwrap();
        assert_eq!(ev.kind, GroupEventKind::Created);
        assert_eq!(ev.users, vec![UserId(o), UserId(m1), UserId(m2)]);
    }
    let body = format!(r#"{{"from":9000,"to_group":{g},"body":"deploy done","request_id":77}}"#);
    let id = api.send(&body);
    for c in clients.iter_mut() {
        let m = next_of(c, CONV_S2C);
        assert_eq!(
            (m.msg_id, m.from, m.to, m.client_msg_id),
            (id, UserId(BIZ), UserId(g), 77)
        );
        assert_eq!(&m.body[..], b"deploy done");
    }
    // A retry (same from + request_id) answers the same msg_id and delivers nothing new.
    assert_eq!(api.send(&body), id);
    for c in clients.iter_mut() {
        assert_no_deliver(c, Duration::from_millis(300));
    }
    // A member added over the API while offline syncs the event and the later post only.
    let j = api.ok(
        "POST",
        &format!("/v1/groups/{g}/members"),
        r#"{"add":[51024]}"#,
    );
    assert_eq!(j["group"].u64(), g);
    let id2 = api.send(&format!(
        r#"{{"from":9000,"to_group":"{g}","body":"second"}}"#
    ));
    assert_ne!(id2, id);
    for c in clients.iter_mut() {
        let e = next_of(c, CONV_GROUP_EVENT);
        assert_eq!(
            GroupEvent::decode(e.body).unwrap(),
            GroupEvent {
                kind: GroupEventKind::MembersAdded,
                users: vec![UserId(51024)]
            }
        );
        assert_eq!(next_of(c, CONV_S2C).msg_id, id2);
    }
    let (mut late, _) = login_as(s.addr, 51024, DeviceType::Phone, "phone");
    let mut tl = Timeline::new(Seq(0));
    tl.sync(&mut late).unwrap();
    let got: Vec<(u8, MsgId)> = tl.messages.iter().map(|m| (m.conv, m.msg_id)).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, CONV_GROUP_EVENT);
    assert_eq!(
        GroupEvent::decode(tl.messages[0].body.clone())
            .unwrap()
            .kind,
        GroupEventKind::MembersAdded
    );
    assert_eq!(got[1], (CONV_S2C, id2));
    // Refusals for groups: unknown group, both targets, group 0.
    let r = api.signed(
        "POST",
        "/v1/messages",
        r#"{"from":9000,"to_group":987654321987,"body":"x"}"#,
    );
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = api.signed(
        "POST",
        "/v1/messages",
        &format!(r#"{{"from":9000,"to_group":{g},"to_users":[51021],"body":"x"}}"#),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_argument")
    );
    let r = api.signed(
        "POST",
        "/v1/messages",
        r#"{"from":9000,"to_group":0,"body":"x"}"#,
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_argument")
    );
    for c in clients.iter_mut() {
        assert_no_deliver(c, Duration::from_millis(100));
    }
}

#[test]
fn api_refuses_unsigned_badly_signed_and_bad_requests_and_delivers_nothing() {
    let (s, api) = start_biz(|_| {});
    let mut u = login(s.addr, 51031);
    let body = r#"{"from":9000,"to_users":[51031],"body":"pay now"}"#;
    let now = now_secs();
    let unauthorized = |r: HttpResp, want: &str| {
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (401, want),
            "{}",
            r.text()
        );
        assert_eq!(r.header("www-authenticate"), Some("IM-HMAC-SHA256"));
    };
    unauthorized(api.plain("POST", "/v1/messages", body), "missing_auth");
    unauthorized(
        api.signed_with(KEY_ID, "wrong-secret", now, "POST", "/v1/messages", body),
        "bad_signature",
    );
    // Signed over one body, sent with another.
    let sig = im_api::sign(SECRET, "POST", "/v1/messages", now, body.as_bytes());
    let tampered = body.replace("pay now", "pay more");
    unauthorized(
        http(
            api.0,
            "POST",
            "/v1/messages",
            &[
                ("X-IM-Key", KEY_ID.into()),
                ("X-IM-Timestamp", now.to_string()),
                ("X-IM-Signature", sig),
            ],
            tampered.as_bytes(),
        ),
        "bad_signature",
    );
    unauthorized(
        api.signed_with("other", SECRET, now, "POST", "/v1/messages", body),
        "unknown_key",
    );
    unauthorized(
        api.signed_with(KEY_ID, SECRET, now - 1000, "POST", "/v1/messages", body),
        "timestamp_skew",
    );
    unauthorized(
        api.plain("GET", "/v1/users/51031/groups", ""),
        "missing_auth",
    );
    assert_no_deliver(&mut u, Duration::from_millis(300));
    // Signed but wrong.
    let r = api.signed(
        "POST",
        "/v1/messages",
        r#"{"from":9000,"to_user":[51031],"body":"x"}"#,
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "bad_json"));
    let r = api.signed(
        "POST",
        "/v1/messages",
        r#"{"from":0,"to_users":[51031],"body":"x"}"#,
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_argument")
    );
    let r = api.signed("GET", "/v1/groups/987654321987", "");
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = api.signed("GET", "/v1/messages", "");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (405, "method_not_allowed")
    );
    assert_no_deliver(&mut u, Duration::from_millis(200));
    let m = api.metrics();
    for (reason, n) in [
        ("missing_auth", 2),
        ("bad_signature", 2),
        ("unknown_key", 1),
        ("timestamp_skew", 1),
        ("bad_timestamp", 0),
    ] {
        let series = format!("im_api_auth_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &series), Some(n), "{series}");
    }
    // The same request, signed: delivered exactly once.
    let id = api.send(body);
    let m = next_deliver(&mut u);
    assert_eq!((m.msg_id, &m.body[..]), (id, &b"pay now"[..]));
}

#[test]
fn s2c_request_id_makes_a_retry_return_the_same_msg_id_and_deliver_once() {
    let (s, api) = start_biz(|_| {});
    let mut u = login(s.addr, 51091);
    let body = r#"{"from":9000,"to_users":[51091],"body":"invoice","request_id":4242}"#;
    let first = api.ok("POST", "/v1/messages", body);
    let again = api.ok("POST", "/v1/messages", body);
    assert_eq!(first, again, "the retry answers the first result");
    let m = next_deliver(&mut u);
    assert_eq!(m.msg_id, MsgId(first["msg_id"].u64()));
    assert_no_deliver(&mut u, Duration::from_millis(400));
    // Another request id is another message; without one, every call is a new message.
    let other = api.send(r#"{"from":9000,"to_users":[51091],"body":"invoice","request_id":4243}"#);
    assert_ne!(other, m.msg_id);
    assert_eq!(next_deliver(&mut u).msg_id, other);
    let plain = r#"{"from":9000,"to_users":[51091],"body":"ping"}"#;
    let (p1, p2) = (api.send(plain), api.send(plain));
    assert_ne!(p1, p2);
    assert_eq!(next_deliver(&mut u).msg_id, p1);
    assert_eq!(next_deliver(&mut u).msg_id, p2);
    assert_no_deliver(&mut u, Duration::from_millis(200));
}

#[test]
fn group_endpoints_reflect_client_side_changes_and_clients_see_api_side_changes() {
    let (s, api) = start_biz(|_| {});
    let (o, b, c, d) = (51041, 51042, 51043, 51044);
    let mut owner = login(s.addr, o);
    let mut bc = login(s.addr, b);
    let mut cc = login(s.addr, c);
    let g = owner.create_group("club", &[UserId(b)]).unwrap();
    assert_eq!(groups_of(&api, b), vec![(g.0, "club".to_owned())]);
    assert_eq!(groups_of(&api, c), vec![]);
    let info = api.ok("GET", &format!("/v1/groups/{}", g.0), "");
    assert_eq!(info["group"].u64(), g.0);
    assert_eq!(info["name"].str(), "club");
    assert_eq!((info["owner"].u64(), info["creator"].u64()), (o, o));
    assert_eq!(
        members_of(&info),
        vec![(o, "owner".to_owned()), (b, "member".to_owned())]
    );
    // Client-side changes show in the API.
    owner.group_add(g, &[UserId(c)]).unwrap();
    owner.group_update(g, "club2", "hello all").unwrap();
    bc.group_leave(g).unwrap();
    let info = api.ok("GET", &format!("/v1/groups/{}", g.0), "");
    assert_eq!(
        (info["name"].str(), info["announcement"].str()),
        ("club2", "hello all")
    );
    assert_eq!(
        members_of(&info),
        vec![(o, "owner".to_owned()), (c, "member".to_owned())]
    );
    assert_eq!(groups_of(&api, b), vec![]);
    assert_eq!(groups_of(&api, c), vec![(g.0, "club2".to_owned())]);
    // API-side changes show to clients.
    api.ok(
        "POST",
        &format!("/v1/groups/{}/members", g.0),
        &format!(r#"{{"add":[{d}]}}"#),
    );
    api.ok(
        "DELETE",
        &format!("/v1/groups/{}/members", g.0),
        &format!(r#"{{"remove":[{c}]}}"#),
    );
    let (desc, members) = owner.group_info(g).unwrap();
    assert_eq!(desc.name, "club2");
    assert_eq!(
        members,
        vec![(UserId(o), ROLE_OWNER), (UserId(d), ROLE_MEMBER)]
    );
    assert_eq!(cc.my_groups().unwrap(), vec![]);
    assert_eq!(
        code(cc.send_c2g(g, 1, "still here?").unwrap_err()),
        ErrorCode::NotMember
    );
    let mut dc = login(s.addr, d);
    assert_eq!(dc.my_groups().unwrap(), vec![(g, "club2".to_owned())]);
    // The owner cannot be removed.
    let r = api.signed(
        "DELETE",
        &format!("/v1/groups/{}/members", g.0),
        &format!(r#"{{"remove":[{o}]}}"#),
    );
    assert_eq!((r.status, r.error_code().as_str()), (403, "forbidden"));
    assert_eq!(
        members_of(&api.ok("GET", &format!("/v1/groups/{}", g.0), "")).len(),
        2
    );
}

#[test]
fn tokens_endpoint_mints_a_token_a_client_logs_in_with() {
    let (s, api) = start_biz(|_| {});
    let j = api.ok("POST", "/v1/tokens", r#"{"uid":51051,"ttl_secs":60}"#);
    assert_eq!(j["uid"].u64(), 51051);
    let exp = j["expires_at"].u64();
    let now = now_secs();
    assert!(
        (now + 58..=now + 61).contains(&exp),
        "expires_at {exp}, now {now}"
    );
    let token = j["token"].str().to_owned();
    let mut c = connect(s.addr);
    let info = c
        .login(UserId(51051), &token, DeviceType::Phone, "phone", Seq(0))
        .unwrap();
    assert_eq!(info.max_seq, Seq(0));
    c.heartbeat().unwrap();
    // It is 51051's token only.
    let mut other = connect(s.addr);
    let e = other
        .login(UserId(51052), &token, DeviceType::Phone, "phone", Seq(0))
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadToken);
    // Default lifetime 1 h; limits.
    let j = api.ok("POST", "/v1/tokens", r#"{"uid":"51052"}"#);
    let exp = j["expires_at"].u64();
    assert!((now + 3598..=now + 3602).contains(&exp), "{exp}");
    for bad in [
        r#"{"uid":51051,"ttl_secs":0}"#,
        r#"{"uid":51051,"ttl_secs":2592001}"#,
        r#"{"uid":0}"#,
    ] {
        let r = api.signed("POST", "/v1/tokens", bad);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_argument"),
            "{bad}"
        );
    }
}

#[test]
fn iplist_names_the_gate_and_a_client_connects_through_it() {
    let (s, api) = start_biz(|_| {});
    let r = api.plain("GET", "/v1/iplist?uid=51061", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["uid"].u64(), 51061);
    let gates = j["gates"].arr();
    assert_eq!(gates.len(), 1);
    assert_eq!(gates[0]["id"].u64(), 0);
    assert_eq!(gates[0]["tcp"].str(), s.addr.to_string());
    assert_eq!(gates[0]["ws"], Json::Null);
    assert_eq!(
        (
            j["backoff"]["initial_ms"].u64(),
            j["backoff"]["max_ms"].u64()
        ),
        (500, 30_000)
    );
    let addr: SocketAddr = gates[0]["tcp"].str().parse().unwrap();
    let mut c = connect(addr);
    c.login(
        UserId(51061),
        &token(51061),
        DeviceType::Phone,
        "phone",
        Seq(0),
    )
    .unwrap();
    c.heartbeat().unwrap();
    let id = api.send(r#"{"from":9000,"to_users":[51061],"body":"welcome"}"#);
    assert_eq!(next_deliver(&mut c).msg_id, id);
    for bad in ["/v1/iplist", "/v1/iplist?uid=0", "/v1/iplist?uid=abc"] {
        let r = api.plain("GET", bad, "");
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_argument"),
            "{bad}"
        );
    }
}

#[test]
fn healthz_and_metrics_show_message_counters_and_gate_gauges() {
    let (s, api) = start_biz(|_| {});
    let r = api.plain("GET", "/healthz", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), Json::parse(br#"{"status":"ok"}"#));
    let r = api.plain("GET", "/metrics", "");
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.header("content-type")
    );
    let m = r.text();
    assert_eq!(
        metric(&m, "im_messages_accepted_total{kind=\"c2c\"}"),
        Some(0)
    );
    assert_eq!(
        metric(&m, "im_messages_accepted_total{kind=\"s2c\"}"),
        Some(0)
    );
    assert_eq!(metric(&m, "im_gate_logged_in"), Some(0));
    let mut a = login(s.addr, 51071);
    let mut b = login(s.addr, 51072);
    a.send_c2c(UserId(51072), 1, "hi").unwrap();
    api.send(r#"{"from":9000,"to_users":[51071,51072],"body":"news"}"#);
    next_deliver(&mut b);
    next_deliver(&mut b);
    next_deliver(&mut a);
    api.wait_metric("im_messages_accepted_total{kind=\"c2c\"}", 1);
    api.wait_metric("im_messages_accepted_total{kind=\"s2c\"}", 1);
    api.wait_metric("im_messages_accepted_total{kind=\"c2g\"}", 0);
    api.wait_metric("im_gate_logged_in", 2);
    api.wait_metric("im_gate_connections", 2);
    // Latency histograms: the c2c and the s2c message each took a round and a commit, and the
    // embedded store synced its log for them (a round is counted just after its effects left).
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = api.plain("GET", "/metrics", "").text();
        if metric(&m, "im_logic_round_seconds_count").is_some_and(|c| c >= 2)
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for h in [
        "im_logic_round_seconds",
        "im_store_commit_seconds",
        "im_store_log_sync_seconds",
    ] {
        assert!(
            m.contains(&format!("# TYPE {h} histogram\n")),
            "{h} missing:\n{m}"
        );
        let count = metric(&m, &format!("{h}_count"));
        assert!(count.is_some_and(|c| c >= 2), "{h}_count {count:?}");
        assert_eq!(metric(&m, &format!("{h}_bucket{{le=\"+Inf\"}}")), count);
    }
    // The gate's own histograms: both logins; one send in 16 (15 more make the 16th).
    for i in 2..=16 {
        a.send_c2c(UserId(51072), i, "more").unwrap();
    }
    let m = api.plain("GET", "/metrics", "").text();
    for (h, n) in [
        ("im_gate_login_seconds", 2),
        ("im_gate_send_ack_seconds", 1),
    ] {
        assert!(
            m.contains(&format!("# TYPE {h} histogram\n")),
            "{h} missing"
        );
        assert_eq!(metric(&m, &format!("{h}_count")), Some(n), "{h}");
    }
    // Caches and queues (issue 14): both users are cached, nothing waits anywhere now.
    api.wait_metric("im_users_cached", 2);
    api.wait_metric("im_users_evicted_total", 0);
    api.wait_metric("im_logic_inbox{worker=\"0\"}", 0);
    api.wait_metric("im_logic_worker_backlog{worker=\"0\"}", 0);
    api.wait_metric("im_logic_admission_held_total", 0);
    api.wait_metric("im_gate_core_mailbox{core=\"0\"}", 0);
    api.wait_metric(
        "im_api_requests_total{method=\"POST\",route=\"/v1/messages\",status=\"200\"}",
        1,
    );
    drop(b);
    api.wait_metric("im_gate_logged_in", 1);
    api.wait_metric("im_gate_connections", 1);
}

#[test]
fn metrics_count_successful_logins() {
    let (s, api) = start_biz(|_| {});
    api.wait_metric("im_logins_total", 0);
    let _a = login(s.addr, 51073);
    let _b = login(s.addr, 51074);
    api.wait_metric("im_logins_total", 2);
}

// ---------------------------------------------------------------------------------------------
// c2s

#[test]
fn c2s_report_is_acked_and_posted_to_the_webhook_with_the_documented_json() {
    let rx = Receiver::start(|_| 200);
    let (s, api) = start_biz(|cfg| cfg.c2s = Some(c2s_to(&rx)));
    let mut u = login(s.addr, 51081);
    let text = r#"{"sku":"A-1","qty":2}"#;
    let ack = u.report("orders", 17, text).unwrap();
    assert_eq!(
        (ack.client_msg_id, ack.seq, ack.prev_seq),
        (17, Seq(0), Seq(0))
    );
    assert_ne!(ack.msg_id, MsgId(0));
    let ack2 = u.report("orders", 18, vec![0xffu8, 0x00, 0x61]).unwrap();
    let got = rx.wait(2, Duration::from_secs(5));
    let g = &got[0];
    assert_eq!((g.method.as_str(), g.path.as_str()), ("POST", "/c2s"));
    assert_eq!(g.header("content-type"), Some("application/json"));
    let id = ack.msg_id.0.to_string();
    assert_eq!(g.header("idempotency-key"), Some(id.as_str()));
    assert_eq!(g.header("x-im-topic"), Some("orders"));
    assert_eq!(g.header("x-im-attempt"), Some("1"));
    let sig = format!("sha256={}", signature_hex(C2S_SECRET.as_bytes(), &g.body));
    assert_eq!(g.header("x-im-signature"), Some(sig.as_str()));
    let j = g.json();
    // Exactly the documented keys, in the documented order.
    let documented = [
        "v",
        "id",
        "from",
        "client_msg_id",
        "topic",
        "time_ms",
        "encoding",
        "body",
    ];
    let mut sorted = documented.to_vec();
    sorted.sort_unstable();
    assert_eq!(j.keys(), sorted);
    let raw = String::from_utf8_lossy(&g.body);
    let at: Vec<usize> = documented
        .iter()
        .map(|k| raw.find(&format!("\"{k}\":")).expect(k))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "key order: {raw}");
    assert_eq!(j["v"].u64(), 1);
    assert_eq!(j["id"].str(), id);
    assert_eq!(j["from"].str(), "51081");
    assert_eq!(j["client_msg_id"].str(), "17");
    assert_eq!(j["topic"].str(), "orders");
    assert_eq!(j["time_ms"].u64(), ack.server_time_ms);
    assert_eq!((j["encoding"].str(), j["body"].str()), ("utf8", text));
    // The second (binary) report, after the first.
    let j = got[1].json();
    assert_eq!(j["id"].str(), ack2.msg_id.0.to_string());
    assert_eq!(j["client_msg_id"].str(), "18");
    assert_eq!((j["encoding"].str(), j["body"].str()), ("base64", "/wBh"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.got().len(), 2, "each record once");
    api.wait_metric("im_c2s_queued_total", 2);
    api.wait_metric("im_c2s_delivered_total", 2);
    api.wait_metric("im_c2s_pending", 0);
    api.wait_metric("im_c2s_enqueued_total", 2);
}

#[test]
fn c2s_webhook_answering_500_then_200_gets_the_record_again_and_nothing_is_lost() {
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let rx = Receiver::start(move |_| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            500
        } else {
            200
        }
    });
    let (s, api) = start_biz(|cfg| cfg.c2s = Some(c2s_to(&rx)));
    let mut u = login(s.addr, 51082);
    let acks: Vec<MsgId> = (1..=3)
        .map(|i| u.report("orders", i, format!("event {i}")).unwrap().msg_id)
        .collect();
    let got = rx.wait(4, Duration::from_secs(10));
    let seen: Vec<(u64, u16, String)> = got
        .iter()
        .map(|g| {
            (
                g.header("idempotency-key").unwrap().parse().unwrap(),
                g.status,
                g.header("x-im-attempt").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (acks[0].0, 500, "1".to_owned()),
            (acks[0].0, 200, "2".to_owned()),
            (acks[1].0, 200, "1".to_owned()),
            (acks[2].0, 200, "1".to_owned()),
        ]
    );
    assert_eq!(got[0].body, got[1].body, "a retry posts the same record");
    let bodies: Vec<String> = rx
        .delivered()
        .iter()
        .map(|g| g.json()["body"].str().to_owned())
        .collect();
    assert_eq!(bodies, vec!["event 1", "event 2", "event 3"]);
    api.wait_metric("im_c2s_retries_total", 1);
    api.wait_metric("im_c2s_delivered_total", 3);
    api.wait_metric("im_c2s_pending", 0);
    api.wait_metric("im_c2s_dead_letters", 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.got().len(), 4, "nothing more once delivered");
}

#[test]
fn c2s_invalid_topic_is_refused_and_the_connection_stays_usable() {
    let rx = Receiver::start(|_| 200);
    let (s, api) = start_biz(|cfg| cfg.c2s = Some(c2s_to(&rx)));
    let mut u = login(s.addr, 51083);
    assert_eq!(
        code(u.report("", 1, "x").unwrap_err()),
        ErrorCode::InvalidArgument
    );
    let long = "t".repeat(129);
    assert_eq!(
        code(u.report(&long, 2, "x").unwrap_err()),
        ErrorCode::InvalidArgument
    );
    // Still logged in: the limit itself (128 bytes) and another topic go through.
    u.heartbeat().unwrap();
    let max = "t".repeat(128);
    let a1 = u.report(&max, 3, "edge").unwrap();
    let a2 = u.report("orders", 4, "ok").unwrap();
    let got = rx.wait(2, Duration::from_secs(5));
    let topics: BTreeSet<(String, String)> = got
        .iter()
        .map(|g| {
            let j = g.json();
            (j["topic"].str().to_owned(), j["id"].str().to_owned())
        })
        .collect();
    assert_eq!(
        topics,
        BTreeSet::from([
            (max.clone(), a1.msg_id.0.to_string()),
            ("orders".to_owned(), a2.msg_id.0.to_string())
        ])
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rx.got().len(), 2);
    api.wait_metric("im_c2s_queued_total", 2);
    api.wait_metric("im_c2s_dead_lettered_total", 0);
}

#[test]
fn c2s_without_a_queue_refuses_reports_with_unavailable() {
    let (s, api) = start_biz(|cfg| cfg.c2s = None);
    let mut u = login(s.addr, 51084);
    let mut peer = login(s.addr, 51085);
    assert_eq!(
        code(u.report("orders", 1, "x").unwrap_err()),
        ErrorCode::Unavailable
    );
    // The connection stays usable, and the refusal repeats.
    let ack = u.send_c2c(UserId(51085), 2, "still here").unwrap();
    assert_eq!(next_deliver(&mut peer).msg_id, ack.msg_id);
    assert_eq!(
        code(u.report("orders", 3, "x").unwrap_err()),
        ErrorCode::Unavailable
    );
    assert!(!api.metrics().contains("im_c2s_queued_total"));
}

#[test]
fn c2s_topic_without_a_webhook_is_refused_not_dead_lettered() {
    let rx = Receiver::start(|_| 200);
    let (s, api) = start_biz(|cfg| {
        cfg.c2s = Some(C2sConfig::Embedded {
            webhooks: BTreeMap::from([("orders".to_owned(), rx.url("/orders"))]),
            default_url: None,
            secret: None,
            retry_initial_ms: 100,
            retry_max_ms: 400,
            timeout_ms: 2000,
        })
    });
    let mut u = login(s.addr, 51086);
    let ack = u.report("orders", 1, "routed").unwrap();
    let got = rx.wait(1, Duration::from_secs(5));
    assert_eq!(got[0].path, "/orders");
    assert_eq!(got[0].json()["id"].str(), ack.msg_id.0.to_string());
    // docs/C2S.md: `check_topic` keeps workers from queuing reports of a topic without a
    // webhook; PROTOCOL.md: `Unavailable` if the queue is not configured.
    let refused = u.report("billing", 2, "unrouted");
    std::thread::sleep(Duration::from_millis(300));
    let m = api.metrics();
    assert_eq!(
        (
            metric(&m, "im_c2s_queued_total"),
            metric(&m, "im_c2s_dead_lettered_total")
        ),
        (Some(1), Some(0)),
        "the unroutable report was queued: {refused:?}"
    );
    let e = refused.expect_err("a report without a webhook must be refused");
    assert!(
        matches!(code(e), ErrorCode::Unavailable | ErrorCode::InvalidArgument),
        "refused with an unexpected code"
    );
    u.heartbeat().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Offline push

/// Checks the common part of a gateway notification.
fn assert_push(g: &Got, uid: u64, device: &str, token: &str) -> Json {
    assert_eq!((g.method.as_str(), g.path.as_str()), ("POST", "/push"));
    assert_eq!(g.header("content-type"), Some("application/json"));
    assert_eq!(g.header("authorization"), Some("Bearer gw-key"));
    let sig = format!("sha256={}", signature_hex(PUSH_SECRET.as_bytes(), &g.body));
    assert_eq!(g.header("x-im-signature"), Some(sig.as_str()));
    let j = g.json();
    assert_eq!(j["v"].u64(), 1);
    assert_eq!(j["uid"].str(), uid.to_string());
    assert_eq!(j["device_id"].str(), device);
    assert_eq!(j["provider"].u64(), u64::from(PROVIDER_WEBHOOK));
    assert_eq!(j["token"].str(), token);
    j
}

#[test]
fn offline_push_reaches_the_gateway_once_for_a_logged_out_recipient() {
    let rx = Receiver::start(|_| 200);
    let (s, api) = start_biz(|cfg| cfg.push = Some(push_to(&rx)));
    let (b, a) = (51101, 51102);
    register_token_and_leave(s.addr, b, DeviceType::Phone, "b-phone", "gw-b");
    let mut ac = login(s.addr, a);
    let t0 = Instant::now();
    let ack = ac.send_c2c(UserId(b), 1, "hello bob").unwrap();
    let got = rx.wait(1, PUSH_DELAY + PUSH_SLACK);
    let took = got[0].at - t0;
    assert!(
        took + Duration::from_millis(50) >= PUSH_DELAY,
        "pushed after {took:?}, before the delay"
    );
    let j = assert_push(&got[0], b, "b-phone", "gw-b");
    assert_eq!(j["msg_id"].str(), ack.msg_id.0.to_string());
    assert_eq!(j["from"].str(), a.to_string());
    assert_eq!(j["conv"].u64(), u64::from(CONV_C2C));
    assert_eq!(j["preview"].str(), "hello bob");
    assert_eq!(j["unread"].u64(), 1);
    std::thread::sleep(NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 1, "exactly one notification");
    api.wait_metric("im_push_submitted_total", 1);
    api.wait_metric("im_push_sent_total{provider=\"webhook\"}", 1);
    // An s2c message to the offline user is pushed too (from the business account).
    let id = api.send(r#"{"from":9000,"to_users":[51101],"body":"your parcel is here"}"#);
    let got = rx.wait(2, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[1], b, "b-phone", "gw-b");
    assert_eq!(j["msg_id"].str(), id.0.to_string());
    assert_eq!(j["from"].str(), BIZ.to_string());
    assert_eq!(j["conv"].u64(), u64::from(CONV_S2C));
    assert_eq!(j["preview"].str(), "your parcel is here");
    assert_eq!(j["unread"].u64(), 2, "both messages are unacknowledged");
}

#[test]
fn push_to_field_is_the_recipient_for_c2c_as_documented() {
    let rx = Receiver::start(|_| 200);
    let (s, api) = start_biz(|cfg| cfg.push = Some(push_to(&rx)));
    let (b, a) = (51151, 51152);
    register_token_and_leave(s.addr, b, DeviceType::Phone, "b-phone", "gw-to");
    let mut ac = login(s.addr, a);
    ac.send_c2c(UserId(b), 1, "hi").unwrap();
    let got = rx.wait(1, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[0], b, "b-phone", "gw-to");
    // docs/PUSH.md: `to` is "the message's peer: the recipient (c2c, s2c) or the group id"
    // (example: uid 42, from 7, to 42).
    assert_eq!(j["from"].str(), a.to_string());
    assert_eq!(j["to"].str(), b.to_string());
    // s2c too ("the recipient (c2c, s2c)").
    api.send(r#"{"from":9000,"to_users":[51151],"body":"s2c"}"#);
    let got = rx.wait(2, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[1], b, "b-phone", "gw-to");
    assert_eq!(j["from"].str(), BIZ.to_string());
    assert_eq!(j["to"].str(), b.to_string());
}

#[test]
fn no_push_when_a_device_acknowledges_in_time_but_one_when_it_does_not() {
    let rx = Receiver::start(|_| 200);
    let (s, _api) = start_biz(|cfg| cfg.push = Some(push_to(&rx)));
    let (b, a) = (51111, 51112);
    let mut bc = login(s.addr, b);
    bc.register_push(PROVIDER_WEBHOOK, "gw-b2").unwrap();
    let mut ac = login(s.addr, a);
    // Online and acking at once: no push.
    let mut tl = Timeline::new(Seq(0));
    let ack1 = ac.send_c2c(UserId(b), 1, "are you there").unwrap();
    let m = next_deliver(&mut bc);
    assert_eq!(m.msg_id, ack1.msg_id);
    assert_eq!(tl.on_deliver(&mut bc, &m).unwrap(), 1);
    std::thread::sleep(PUSH_DELAY + NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 0, "acknowledged in time: {:?}", rx.got());
    // Online but not acking: pushed.
    let ack2 = ac.send_c2c(UserId(b), 2, "hello?").unwrap();
    assert_eq!(next_deliver(&mut bc).msg_id, ack2.msg_id);
    let got = rx.wait(1, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[0], b, &format!("phone-{b}"), "gw-b2");
    assert_eq!(j["msg_id"].str(), ack2.msg_id.0.to_string());
    assert_eq!(j["unread"].u64(), 1, "the first one was acknowledged");
    // Logged out: pushed.
    bc.logout().unwrap();
    let ack3 = ac.send_c2c(UserId(b), 3, "ping").unwrap();
    let got = rx.wait(2, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[1], b, &format!("phone-{b}"), "gw-b2");
    assert_eq!(j["msg_id"].str(), ack3.msg_id.0.to_string());
    assert_eq!(j["unread"].u64(), 2);
    std::thread::sleep(NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 2);
}

#[test]
fn muted_peer_and_mute_all_suppress_the_push() {
    let rx = Receiver::start(|_| 200);
    let (s, api) = start_biz(|cfg| cfg.push = Some(push_to(&rx)));
    let (b1, b2, a, c) = (51121, 51122, 51123, 51124);
    for (uid, tok, peer) in [(b1, "gw-m1", a), (b2, "gw-m2", 0)] {
        let (mut cl, _) = login_as(s.addr, uid, DeviceType::Phone, "phone");
        cl.register_push(PROVIDER_WEBHOOK, tok).unwrap();
        cl.set_mute(peer, true).unwrap();
        cl.logout().unwrap();
    }
    let mut ac = login(s.addr, a);
    let mut cc = login(s.addr, c);
    ac.send_c2c(UserId(b1), 1, "from a to b1").unwrap();
    ac.send_c2c(UserId(b2), 2, "from a to b2").unwrap();
    cc.send_c2c(UserId(b2), 1, "from c to b2").unwrap();
    std::thread::sleep(PUSH_DELAY + NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 0, "muted: {:?}", rx.got());
    api.wait_metric("im_push_muted_total", 2);
    api.wait_metric("im_push_submitted_total", 0);
    // b1 muted only a: c's message is pushed (with a's still unacknowledged in the badge).
    let ack = cc.send_c2c(UserId(b1), 2, "from c to b1").unwrap();
    let got = rx.wait(1, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[0], b1, "phone", "gw-m1");
    assert_eq!(j["msg_id"].str(), ack.msg_id.0.to_string());
    assert_eq!(j["from"].str(), c.to_string());
    assert_eq!(j["unread"].u64(), 2);
    std::thread::sleep(NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 1);
}

/// A large group pushes no post (members read its timeline), but a member it mentions gets a
/// push of its mention entry, also when it muted the group (PROTOCOL.md "Large groups").
#[test]
fn a_mention_in_a_large_group_is_pushed_through_the_groups_mute() {
    let rx = Receiver::start(|_| 200);
    let (s, _api) = start_biz(|cfg| {
        cfg.push = Some(push_to(&rx));
        cfg.large_group_threshold = 2;
    });
    let (a, b, c) = (51161, 51162, 51163);
    let mut ac = login(s.addr, a);
    let g = ac.create_group("all hands", &[UserId(b)]).unwrap();
    ac.group_add(g, &[UserId(c)]).unwrap();
    {
        let (mut bc, _) = login_as(s.addr, b, DeviceType::Phone, "b-phone");
        bc.register_push(PROVIDER_WEBHOOK, "gw-l").unwrap();
        bc.set_mute(g.0, true).unwrap();
        bc.logout().unwrap();
    }
    ac.send_c2g(g, 1, "no mention").unwrap();
    std::thread::sleep(PUSH_DELAY + NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 0, "a large group's post is not pushed");
    let ack = ac
        .send_c2g_mentioning(g, 2, "@b please look", &[UserId(b)])
        .unwrap();
    let got = rx.wait(1, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[0], b, "b-phone", "gw-l");
    assert_eq!(j["msg_id"].str(), ack.msg_id.0.to_string());
    assert_eq!(j["conv"].u64(), u64::from(im_shared::proto::CONV_MENTION));
    assert_eq!(
        j["to"].str(),
        g.0.to_string(),
        "the conversation is the group"
    );
    assert_eq!(j["preview"].str(), "@b please look");
    std::thread::sleep(NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 1);
}

#[test]
fn group_post_to_an_offline_member_with_a_token_is_pushed_to_that_member_only() {
    let rx = Receiver::start(|_| 200);
    let (s, _api) = start_biz(|cfg| cfg.push = Some(push_to(&rx)));
    let (a, b, c) = (51131, 51132, 51133);
    register_token_and_leave(s.addr, b, DeviceType::Phone, "b-phone", "gw-g");
    let mut ac = login(s.addr, a);
    ac.register_push(PROVIDER_WEBHOOK, "gw-a").unwrap();
    let mut cc = login(s.addr, c);
    cc.register_push(PROVIDER_WEBHOOK, "gw-c").unwrap();
    let g = ac.create_group("standup", &[UserId(b), UserId(c)]).unwrap();
    next_of(&mut cc, CONV_GROUP_EVENT);
    let ack = ac.send_c2g(g, 1, "standup in 5").unwrap();
    // c acknowledges at once; a is the sender.
    assert_eq!(next_of(&mut cc, CONV_C2G).msg_id, ack.msg_id);
    let got = rx.wait(1, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[0], b, "b-phone", "gw-g");
    assert_eq!(j["msg_id"].str(), ack.msg_id.0.to_string());
    assert_eq!(j["from"].str(), a.to_string());
    assert_eq!(j["conv"].u64(), u64::from(CONV_C2G));
    assert_eq!(j["to"].str(), g.0.to_string());
    assert_eq!(j["preview"].str(), "standup in 5");
    assert_eq!(j["unread"].u64(), 1, "the group event does not count");
    std::thread::sleep(NO_PUSH_WAIT);
    assert_eq!(rx.got().len(), 1, "{:?}", rx.got());
}

#[test]
fn gateway_410_drops_the_token_and_later_messages_skip_it() {
    let rx = Receiver::start(|g| {
        if Json::parse(&g.body)["token"].str() == "gw-dead" {
            410
        } else {
            200
        }
    });
    let (s, api) = start_biz(|cfg| cfg.push = Some(push_to(&rx)));
    let (b, a) = (51141, 51142);
    register_token_and_leave(s.addr, b, DeviceType::Phone, "b-phone", "gw-dead");
    register_token_and_leave(s.addr, b, DeviceType::Tablet, "b-tablet", "gw-live");
    let mut ac = login(s.addr, a);
    let ack1 = ac.send_c2c(UserId(b), 1, "one").unwrap();
    let got = rx.wait(2, PUSH_DELAY + PUSH_SLACK);
    let mut first: Vec<(String, String, u16)> = got
        .iter()
        .map(|g| {
            let j = g.json();
            assert_eq!(j["msg_id"].str(), ack1.msg_id.0.to_string());
            (
                j["device_id"].str().to_owned(),
                j["token"].str().to_owned(),
                g.status,
            )
        })
        .collect();
    first.sort();
    assert_eq!(
        first,
        vec![
            ("b-phone".to_owned(), "gw-dead".to_owned(), 410),
            ("b-tablet".to_owned(), "gw-live".to_owned(), 200)
        ]
    );
    api.wait_metric("im_push_invalid_tokens_total", 1);
    api.wait_metric("im_push_failed_total{provider=\"webhook\"}", 1);
    let ack2 = ac.send_c2c(UserId(b), 2, "two").unwrap();
    let got = rx.wait(3, PUSH_DELAY + PUSH_SLACK);
    let j = assert_push(&got[2], b, "b-tablet", "gw-live");
    assert_eq!(j["msg_id"].str(), ack2.msg_id.0.to_string());
    std::thread::sleep(NO_PUSH_WAIT);
    let tokens: Vec<String> = rx
        .got()
        .iter()
        .map(|g| g.json()["token"].str().to_owned())
        .collect();
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    assert_eq!(
        tokens.iter().filter(|t| *t == "gw-dead").count(),
        1,
        "the dropped token got nothing more"
    );
    api.wait_metric("im_push_sent_total{provider=\"webhook\"}", 2);
}

/// Issue 14: a group create over the API with a `client_id`, retried, answers the first group,
/// and a client's `GroupCreate` retried with its `client_id` on a new connection does the same.
#[test]
fn group_creates_with_a_client_id_are_idempotent_over_the_api_and_the_protocol() {
    let (s, api) = start_biz(|_| {});
    let (o, m) = (51041, 51042);
    let mut member = login(s.addr, m);
    let body = r#"{"owner":51041,"name":"ops","members":[51042],"client_id":"9"}"#;
    let g = api.ok("POST", "/v1/groups", body)["group"].u64();
    assert_eq!(api.ok("POST", "/v1/groups", body)["group"].u64(), g);
    // Without a key every call is a new group.
    let plain = r#"{"owner":51041,"name":"ops","members":[51042]}"#;
    let p1 = api.ok("POST", "/v1/groups", plain)["group"].u64();
    let p2 = api.ok("POST", "/v1/groups", plain)["group"].u64();
    assert!(p1 != p2 && p1 != g && p2 != g);
    // Over the protocol: the answer "was lost", the client reconnects and sends it again.
    let mut c = login(s.addr, o);
    let g2 = c.create_group_with_id("team", &[UserId(m)], 10).unwrap();
    drop(c);
    let mut c = login(s.addr, o);
    assert_eq!(
        c.create_group_with_id("team", &[UserId(m)], 10).unwrap(),
        g2
    );
    // The member saw exactly one `Created` event per group.
    let mut created = Vec::new();
    for _ in 0..4 {
        created.push(next_of(&mut member, CONV_GROUP_EVENT).to.0);
    }
    created.sort_unstable();
    let mut want = vec![g, p1, p2, g2.0];
    want.sort_unstable();
    assert_eq!(created, want);
    assert_no_deliver(&mut member, Duration::from_millis(300));
}

/// A business message to a large group may mention members, `@all` (0) included: every member
/// gets it as a mention entry in its own timeline; the metrics count the fan-out.
#[test]
fn a_business_message_to_a_large_group_mentions_all_members() {
    let (s, api) = start_biz(|cfg| cfg.large_group_threshold = 2);
    let (a, b, c) = (51171, 51172, 51173);
    let mut ac = login(s.addr, a);
    let g = ac.create_group("company", &[UserId(b)]).unwrap();
    ac.group_add(g, &[UserId(c)]).unwrap();
    let mut bc = login(s.addr, b);
    let body = format!(
        r#"{{"from":9000,"to_group":{},"body":"office closed","mentions":[0]}}"#,
        g.0
    );
    let id = api.send(&body);
    let m = next_of(&mut bc, im_shared::proto::CONV_MENTION);
    assert_eq!((m.msg_id, m.from, m.to.0), (id, UserId(9000), g.0));
    assert_eq!(&m.body[..], b"office closed");
    // Offline c and the owner a get it too (the sender is not a member).
    for u in [a, c] {
        let mut uc = login(s.addr, u);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (page, _, _) = uc.sync_page(Seq(0), 100).unwrap();
            let got: Vec<MsgId> = page
                .iter()
                .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
                .map(|m| m.msg_id)
                .collect();
            if !got.is_empty() {
                assert_eq!(got, vec![id], "user {u}");
                break;
            }
            assert!(Instant::now() < deadline, "no mention for {u}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    api.wait_metric("im_mention_all_entries_total", 3);
    api.wait_metric("im_mention_all_running", 0);
    api.wait_metric("im_messages_accepted_total{kind=\"mention\"}", 1);
    // Mentions go with a group only.
    let r = api.signed(
        "POST",
        "/v1/messages",
        r#"{"from":9000,"to_users":[51172],"body":"x","mentions":[51172]}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
}
