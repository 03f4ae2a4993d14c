//! The HTTP API over real HTTP/1.1 (raw `TcpStream` client) against an [`ApiServer`] whose
//! backend is an in-test [`ApiBackend`] that records every call: auth, validation, the error-code
//! mapping, every endpoint's exact JSON, the iplist's rendezvous ordering (also read from a real
//! Redis Cluster), `/metrics` and `/healthz`. End-to-end tests through the real logic workers live
//! with the server.
//!
//! Everything is in `mod api` so that `cargo test -p im-logic api` selects these tests.

mod api {
    use std::collections::{BTreeMap, HashMap};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use im_api::{
        sign, Accepted, ApiBackend, ApiConfig, ApiError, ApiServer, BackoffConfig, BoxFut,
        GateSource, MetricsFn, PushTarget,
    };
    use im_directory::GateInfo;
    use im_shared::proto::{GroupDesc, ROLE_MEMBER, ROLE_OWNER};
    use im_shared::token::{now_secs, HmacTokens, TokenVerifier};
    use im_shared::{ErrorCode, GroupId, MsgId, UserId};
    use serde_json::{json, Value};

    const KEY: &str = "biz";
    const SECRET: &str = "s3cret";

    // ---------------------------------------------------------------------------------------------
    // The recording backend

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Send {
            from: u64,
            target: PushTarget,
            body: Vec<u8>,
            request_id: u64,
        },
        Create {
            owner: u64,
            name: String,
            members: Vec<u64>,
            client_id: u64,
        },
        Add(u64, Vec<u64>),
        Remove(u64, Vec<u64>),
        Info(u64),
        GroupsOf(u64),
    }

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Call>>,
        /// When set, every call fails with it.
        fail: Mutex<Option<ApiError>>,
    }

    impl Recorder {
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn record<T: Send + 'static>(&self, call: Call, ok: T) -> BoxFut<'_, Result<T, ApiError>> {
            self.calls.lock().unwrap().push(call);
            let fail = self.fail.lock().unwrap().clone();
            Box::pin(async move {
                match fail {
                    Some(e) => Err(e),
                    None => Ok(ok),
                }
            })
        }
    }

    impl ApiBackend for Recorder {
        fn server_send(
            &self,
            from: UserId,
            target: PushTarget,
            body: Bytes,
            request_id: u64,
        ) -> BoxFut<'_, Result<Accepted, ApiError>> {
            let call = Call::Send {
                from: from.0,
                target,
                body: body.to_vec(),
                request_id,
            };
            self.record(
                call,
                Accepted {
                    msg_id: MsgId(0xABCD_0000_0001),
                    server_time_ms: 1_700_000_000_123,
                },
            )
        }

        fn group_create(
            &self,
            owner: UserId,
            name: String,
            members: Vec<UserId>,
            client_id: u64,
        ) -> BoxFut<'_, Result<GroupId, ApiError>> {
            let call = Call::Create {
                owner: owner.0,
                name,
                members: members.iter().map(|u| u.0).collect(),
                client_id,
            };
            self.record(call, GroupId(77))
        }

        fn group_add(
            &self,
            group: GroupId,
            members: Vec<UserId>,
        ) -> BoxFut<'_, Result<(), ApiError>> {
            self.record(
                Call::Add(group.0, members.iter().map(|u| u.0).collect()),
                (),
            )
        }

        fn group_remove(
            &self,
            group: GroupId,
            members: Vec<UserId>,
        ) -> BoxFut<'_, Result<(), ApiError>> {
            self.record(
                Call::Remove(group.0, members.iter().map(|u| u.0).collect()),
                (),
            )
        }

        fn group_info(
            &self,
            group: GroupId,
        ) -> BoxFut<'_, Result<(GroupDesc, Vec<(UserId, u8)>), ApiError>> {
            if group.0 != 77 {
                self.calls.lock().unwrap().push(Call::Info(group.0));
                return Box::pin(async move {
                    Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("group {group} not found"),
                    ))
                });
            }
            let desc = GroupDesc {
                group,
                name: "team".into(),
                creator: UserId(1),
                owner: UserId(1),
                announcement: "hello all".into(),
                created_ms: 1_700_000_000_000,
            };
            let members = vec![(UserId(1), ROLE_OWNER), (UserId(2), ROLE_MEMBER)];
            self.record(Call::Info(group.0), (desc, members))
        }

        fn groups_of(&self, uid: UserId) -> BoxFut<'_, Result<Vec<(GroupId, String)>, ApiError>> {
            self.record(
                Call::GroupsOf(uid.0),
                vec![(GroupId(77), "team".into()), (GroupId(78), "ops".into())],
            )
        }

        fn metrics(&self, out: &mut String) {
            out.push_str("# TYPE im_logic_test_gauge gauge\nim_logic_test_gauge 42\n");
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Servers

    fn config() -> ApiConfig {
        let mut cfg = ApiConfig::new("127.0.0.1:0".parse().unwrap());
        cfg.keys = BTreeMap::from([
            (KEY.to_string(), SECRET.to_string()),
            ("other".to_string(), "other-secret".to_string()),
        ]);
        cfg
    }

    fn gate(id: u16) -> GateInfo {
        GateInfo {
            id,
            tcp_addr: format!("10.0.0.{id}:7000"),
            ws_addr: id
                .is_multiple_of(2)
                .then(|| format!("ws://10.0.0.{id}:7080/ws")),
            conns: 0,
        }
    }

    struct Api {
        server: ApiServer,
        backend: Arc<Recorder>,
    }

    impl Api {
        fn start_with(cfg: ApiConfig, gates: GateSource, tokens: Option<Arc<HmacTokens>>) -> Api {
            let backend = Arc::new(Recorder::default());
            let extra: Vec<MetricsFn> = vec![Arc::new(|out| {
                out.push_str("# TYPE im_gate_test_conns gauge\nim_gate_test_conns 3\n")
            })];
            let server =
                ApiServer::start(cfg, backend.clone(), gates, tokens, extra, None).expect("start");
            Api { server, backend }
        }

        fn start() -> Api {
            Api::start_with(
                config(),
                GateSource::Static((1..=4).map(gate).collect()),
                None,
            )
        }

        fn addr(&self) -> SocketAddr {
            self.server.local_addr()
        }

        fn get(&self, path: &str) -> Reply {
            request(self.addr(), "GET", path, &[], b"")
        }

        /// A request signed with [`KEY`] at the current time.
        fn signed(&self, method: &str, path: &str, body: &str) -> Reply {
            let ts = now_secs();
            let sig = sign(SECRET, method, path, ts, body.as_bytes());
            request(
                self.addr(),
                method,
                path,
                &[
                    ("X-IM-Key", KEY),
                    ("X-IM-Timestamp", &ts.to_string()),
                    ("X-IM-Signature", &sig),
                ],
                body.as_bytes(),
            )
        }

        fn metrics(&self) -> String {
            let r = self.get("/metrics");
            assert_eq!(r.status, 200);
            String::from_utf8(r.body).unwrap()
        }
    }

    // ---------------------------------------------------------------------------------------------
    // A minimal HTTP/1.1 client

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            assert_eq!(
                self.header("content-type"),
                Some("application/json"),
                "{self:?}"
            );
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
            })
        }

        /// Asserts an error reply: status, `error.code`, and a non-empty message; returns the message.
        fn assert_error(&self, status: u16, code: &str) -> String {
            let v = self.json();
            assert_eq!(
                (self.status, v["error"]["code"].as_str()),
                (status, Some(code)),
                "{v}"
            );
            let msg = v["error"]["message"].as_str().expect("message").to_string();
            assert!(!msg.is_empty());
            assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
            assert_eq!(v["error"].as_object().unwrap().len(), 2, "{v}");
            msg
        }
    }

    /// A keep-alive connection.
    struct Conn {
        r: BufReader<TcpStream>,
    }

    impl Conn {
        fn open(addr: SocketAddr) -> Conn {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.set_nodelay(true).unwrap();
            Conn {
                r: BufReader::new(s),
            }
        }

        fn send_raw(&mut self, bytes: &[u8]) {
            self.r.get_mut().write_all(bytes).expect("write");
        }

        fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
            let mut req = format!(
                "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
                body.len()
            );
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            let mut bytes = req.into_bytes();
            bytes.extend_from_slice(body);
            self.send_raw(&bytes);
        }

        fn read_reply(&mut self) -> Reply {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("status line");
            let mut parts = line.trim_end().splitn(3, ' ');
            assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {line:?}");
            let status: u16 = parts.next().unwrap().parse().unwrap();
            let mut headers = Vec::new();
            loop {
                line.clear();
                self.r.read_line(&mut line).expect("header");
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').expect("header line");
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .expect("content-length");
            let mut body = vec![0; len];
            self.r.read_exact(&mut body).expect("body");
            Reply {
                status,
                headers,
                body,
            }
        }

        fn request(
            &mut self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &[u8],
        ) -> Reply {
            self.send(method, path, headers, body);
            self.read_reply()
        }
    }

    fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        Conn::open(addr).request(method, path, headers, body)
    }

    // ---------------------------------------------------------------------------------------------
    // Health, metrics, routing

    #[test]
    fn a_key_over_its_rate_gets_429_rate_limited_with_retry_after_and_other_keys_do_not() {
        let mut cfg = config();
        cfg.rate_per_key = 1;
        cfg.burst_per_key = 3;
        let api = Api::start_with(cfg, GateSource::Static(vec![]), None);
        for _ in 0..3 {
            assert_eq!(api.signed("GET", "/v1/groups/77", "").status, 200);
        }
        let r = api.signed("GET", "/v1/groups/77", "");
        let msg = r.assert_error(429, "rate_limited");
        assert!(msg.contains("1 requests/s"), "{msg}");
        let secs: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!((1..=2).contains(&secs), "Retry-After {secs}");
        // The backend never saw the refused request.
        assert_eq!(api.backend.calls().len(), 3);
        // Another key has a bucket of its own.
        let ts = now_secs();
        let sig = sign("other-secret", "GET", "/v1/groups/77", ts, b"");
        let other = request(
            api.addr(),
            "GET",
            "/v1/groups/77",
            &[
                ("X-IM-Key", "other"),
                ("X-IM-Timestamp", &ts.to_string()),
                ("X-IM-Signature", &sig),
            ],
            b"",
        );
        assert_eq!(other.status, 200);
        // Unsigned endpoints are not limited; the refusal is counted.
        assert_eq!(api.get("/healthz").status, 200);
        assert!(api.metrics().contains("im_api_rate_limited_total 1\n"));
        // A bad signature is a 401, not a 429, and uses no token of the key.
        let ts = now_secs();
        let bad = request(
            api.addr(),
            "GET",
            "/v1/groups/77",
            &[
                ("X-IM-Key", KEY),
                ("X-IM-Timestamp", &ts.to_string()),
                ("X-IM-Signature", "00"),
            ],
            b"",
        );
        assert_eq!(bad.status, 401);
        // Within the deadline a token is back (1 per second).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = api.signed("GET", "/v1/groups/77", "");
            if r.status == 200 {
                break;
            }
            assert_eq!(r.status, 429);
            assert!(
                std::time::Instant::now() < deadline,
                "no token back in 10 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    #[test]
    fn healthz_is_ok_without_auth() {
        let api = Api::start();
        let r = api.get("/healthz");
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), json!({"status": "ok"}));
    }

    /// HEAD of an unsigned GET route answers like the GET, without a body; a signed route does
    /// not take HEAD.
    #[test]
    fn head_of_healthz_is_ok_without_a_body() {
        use std::io::{Read, Write};
        let api = Api::start();
        let head = |path: &str| {
            let mut s = std::net::TcpStream::connect(api.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                s,
                "HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).unwrap();
            got
        };
        let got = head("/healthz");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        let (headers, body) = got.split_once("\r\n\r\n").unwrap();
        assert!(body.is_empty(), "a HEAD answer has no body: {body:?}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{headers}"
        );
        assert!(head("/metrics").starts_with("HTTP/1.1 200"));
        assert!(head("/v1/groups/77").starts_with("HTTP/1.1 405"));
    }

    #[test]
    fn metrics_have_backend_extra_and_api_counters() {
        let api = Api::start();
        assert_eq!(api.get("/healthz").status, 200);
        assert_eq!(api.get("/healthz").status, 200);
        assert_eq!(api.get("/nope").status, 404);
        assert_eq!(api.signed("GET", "/v1/groups/77", "").status, 200);
        assert_eq!(api.signed("GET", "/v1/groups/5", "").status, 404);
        assert_eq!(api.signed("GET", "/v1/groups/x7", "").status, 400);
        let r = request(
            api.addr(),
            "GET",
            "/v1/groups/77",
            &[("X-IM-Key", KEY)],
            b"",
        );
        assert_eq!(r.status, 401);
        let r = api.get("/metrics");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = String::from_utf8(r.body).unwrap();
        for line in [
            "im_logic_test_gauge 42",
            "im_gate_test_conns 3",
            "# TYPE im_api_requests_total counter",
            r#"im_api_requests_total{method="GET",route="/healthz",status="200"} 2"#,
            r#"im_api_requests_total{method="GET",route="unmatched",status="404"} 1"#,
            r#"im_api_requests_total{method="GET",route="/v1/groups/{id}",status="200"} 1"#,
            r#"im_api_requests_total{method="GET",route="/v1/groups/{id}",status="404"} 1"#,
            r#"im_api_requests_total{method="GET",route="/v1/groups/{id}",status="401"} 1"#,
            // A bad id on a known route is counted under that route, not as unmatched.
            r#"im_api_requests_total{method="GET",route="/v1/groups/{id}",status="400"} 1"#,
            "# TYPE im_api_auth_failures_total counter",
            r#"im_api_auth_failures_total{reason="missing_auth"} 1"#,
            r#"im_api_auth_failures_total{reason="bad_signature"} 0"#,
            "im_api_iplist_source_errors_total 0",
            // The seven requests before this one, timed.
            "# TYPE im_api_request_seconds histogram",
            "im_api_request_seconds_count 7",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_start_time_seconds gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // The build: the crate's version and the git commit it was built from (12 hex digits in a
        // checkout, "unknown" outside one).
        let build = text
            .lines()
            .find(|l| l.starts_with("im_build_info{"))
            .expect("im_build_info");
        let want = format!(
            "im_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        );
        assert!(
            build.starts_with(&want) && build.ends_with("\"} 1"),
            "{build}"
        );
        let commit = &build[want.len()..build.len() - 4];
        assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{build}"
        );
        // The process series hold this test process's real values.
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_threads") >= 2.0);
        assert!(value("process_cpu_seconds_total") >= 0.0); // whole clock ticks: 0 in a young process
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 2.0 && start > now - 3600.0,
            "start {start}, now {now}"
        );
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        // Every sample line is `name{labels} value` or `name value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').expect(l);
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn unknown_routes_are_404_and_wrong_methods_405() {
        let api = Api::start();
        for path in [
            "/",
            "/v1",
            "/v1/nope",
            "/v1/groups/7/other",
            "/healthz/x",
            "/v2/messages",
        ] {
            api.get(path).assert_error(404, "not_found");
        }
        // Unknown routes are answered before auth.
        api.signed("POST", "/v1/nothing", "{}")
            .assert_error(404, "not_found");
        for (method, path, allow) in [
            ("POST", "/healthz", "GET"),
            ("DELETE", "/metrics", "GET"),
            ("POST", "/v1/iplist?uid=1", "GET"),
            ("GET", "/v1/messages", "POST"),
            ("PUT", "/v1/groups", "POST"),
            ("POST", "/v1/groups/7", "GET"),
            ("GET", "/v1/groups/7/members", "POST, DELETE"),
            ("POST", "/v1/users/1/groups", "GET"),
            ("GET", "/v1/tokens", "POST"),
        ] {
            let r = request(api.addr(), method, path, &[], b"");
            r.assert_error(405, "method_not_allowed");
            assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        }
        // Bad ids in paths.
        for path in [
            "/v1/groups/abc",
            "/v1/groups/0",
            "/v1/users/-1/groups",
            "/v1/groups/99999999999999999999",
        ] {
            let msg = api
                .signed("GET", path, "")
                .assert_error(400, "invalid_argument");
            assert!(msg.contains("expected a positive decimal integer"), "{msg}");
        }
        assert!(api.backend.calls().is_empty());
    }

    // ---------------------------------------------------------------------------------------------
    // Auth

    /// Sends `GET /v1/groups/77` with the given auth headers.
    fn with_headers(api: &Api, headers: &[(&str, &str)]) -> Reply {
        request(api.addr(), "GET", "/v1/groups/77", headers, b"")
    }

    #[test]
    fn missing_auth_headers_are_401() {
        let api = Api::start();
        let ts = now_secs().to_string();
        let sig = sign(SECRET, "GET", "/v1/groups/77", now_secs(), b"");
        let all = [
            ("X-IM-Key", KEY),
            ("X-IM-Timestamp", ts.as_str()),
            ("X-IM-Signature", sig.as_str()),
        ];
        for skip in 0..3 {
            let headers: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, h)| *h)
                .collect();
            let r = with_headers(&api, &headers);
            let msg = r.assert_error(401, "missing_auth");
            assert!(msg.contains(all[skip].0), "{msg}");
            assert_eq!(r.header("www-authenticate"), Some("IM-HMAC-SHA256"));
        }
        let r = with_headers(&api, &[]);
        let msg = r.assert_error(401, "missing_auth");
        assert!(
            msg.contains("X-IM-Key, X-IM-Timestamp, X-IM-Signature"),
            "{msg}"
        );
        // Every signed endpoint needs auth.
        for (method, path) in [
            ("POST", "/v1/messages"),
            ("POST", "/v1/groups"),
            ("GET", "/v1/groups/77"),
            ("POST", "/v1/groups/77/members"),
            ("DELETE", "/v1/groups/77/members"),
            ("GET", "/v1/users/1/groups"),
            ("POST", "/v1/tokens"),
        ] {
            request(api.addr(), method, path, &[], b"{}").assert_error(401, "missing_auth");
        }
        assert!(api.backend.calls().is_empty());
        assert!(api
            .metrics()
            .contains("im_api_auth_failures_total{reason=\"missing_auth\"} 11\n"));
    }

    #[test]
    fn unknown_key_is_401() {
        let api = Api::start();
        let ts = now_secs();
        let sig = sign(SECRET, "GET", "/v1/groups/77", ts, b"");
        let r = with_headers(
            &api,
            &[
                ("X-IM-Key", "nobody"),
                ("X-IM-Timestamp", &ts.to_string()),
                ("X-IM-Signature", &sig),
            ],
        );
        let msg = r.assert_error(401, "unknown_key");
        assert!(msg.contains("nobody"), "{msg}");
        assert!(api.backend.calls().is_empty());
    }

    #[test]
    fn bad_signatures_are_401() {
        let api = Api::start();
        let ts = now_secs();
        let tss = ts.to_string();
        let body = r#"{"from":1,"to_users":[2],"body":"hi"}"#;
        let good = sign(SECRET, "POST", "/v1/messages", ts, body.as_bytes());
        let cases: Vec<(&str, String, String, &str, &str, String)> = vec![
            // (what, key, signature, path sent, body sent, timestamp header)
            (
                "wrong secret",
                KEY.into(),
                sign("wrong", "POST", "/v1/messages", ts, body.as_bytes()),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "another key's id",
                "other".into(),
                good.clone(),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "tampered body",
                KEY.into(),
                good.clone(),
                "/v1/messages",
                r#"{"from":1,"to_users":[3],"body":"hi"}"#,
                tss.clone(),
            ),
            (
                "tampered query",
                KEY.into(),
                good.clone(),
                "/v1/messages?x=1",
                body,
                tss.clone(),
            ),
            (
                "signed for another method",
                KEY.into(),
                sign(SECRET, "PUT", "/v1/messages", ts, body.as_bytes()),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "signed for another timestamp",
                KEY.into(),
                good.clone(),
                "/v1/messages",
                body,
                (ts - 1).to_string(),
            ),
            (
                "not hex",
                KEY.into(),
                "zz".repeat(32),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "truncated",
                KEY.into(),
                good[..62].to_string(),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "odd length",
                KEY.into(),
                good[..63].to_string(),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "empty",
                KEY.into(),
                String::new(),
                "/v1/messages",
                body,
                tss.clone(),
            ),
            (
                "signature of an empty body",
                KEY.into(),
                sign(SECRET, "POST", "/v1/messages", ts, b""),
                "/v1/messages",
                body,
                tss.clone(),
            ),
        ];
        for (what, key, sig, path, sent_body, ts_header) in &cases {
            let r = request(
                api.addr(),
                "POST",
                path,
                &[
                    ("X-IM-Key", key),
                    ("X-IM-Timestamp", ts_header),
                    ("X-IM-Signature", sig),
                ],
                sent_body.as_bytes(),
            );
            assert_eq!(r.status, 401, "{what}: {r:?}");
            r.assert_error(401, "bad_signature");
        }
        assert!(api.backend.calls().is_empty());
        assert!(api.metrics().contains(&format!(
            "im_api_auth_failures_total{{reason=\"bad_signature\"}} {}\n",
            cases.len()
        )));
        // The good signature works, in lower or upper case hex.
        for sig in [good.clone(), good.to_uppercase()] {
            let r = request(
                api.addr(),
                "POST",
                "/v1/messages",
                &[
                    ("X-IM-Key", KEY),
                    ("X-IM-Timestamp", &tss),
                    ("X-IM-Signature", sig.as_str()),
                ],
                body.as_bytes(),
            );
            assert_eq!(r.status, 200, "{r:?}");
        }
    }

    #[test]
    fn timestamps_outside_the_skew_are_401() {
        let mut cfg = config();
        cfg.max_skew_secs = 60;
        let api = Api::start_with(cfg, GateSource::Static(vec![]), None);
        let now = now_secs();
        for (ts, code) in [
            ((now - 120).to_string(), "timestamp_skew"),
            ((now + 120).to_string(), "timestamp_skew"),
            ("0".to_string(), "timestamp_skew"),
            ("abc".to_string(), "bad_timestamp"),
            ((now as f64 + 0.5).to_string(), "bad_timestamp"),
            (format!("-{now}"), "bad_timestamp"),
            (format!("{now}000"), "timestamp_skew"), // milliseconds by mistake
            ("".to_string(), "bad_timestamp"),
        ] {
            let sig = sign(SECRET, "GET", "/v1/groups/77", 0, b"");
            let r = with_headers(
                &api,
                &[
                    ("X-IM-Key", KEY),
                    ("X-IM-Timestamp", &ts),
                    ("X-IM-Signature", &sig),
                ],
            );
            r.assert_error(401, code);
        }
        // Within the skew, both directions, correctly signed: accepted.
        for ts in [now - 50, now + 50] {
            let sig = sign(SECRET, "GET", "/v1/groups/77", ts, b"");
            let r = with_headers(
                &api,
                &[
                    ("X-IM-Key", KEY),
                    ("X-IM-Timestamp", &ts.to_string()),
                    ("X-IM-Signature", &sig),
                ],
            );
            assert_eq!(r.status, 200, "{r:?}");
        }
        assert_eq!(api.backend.calls(), [Call::Info(77), Call::Info(77)]);
    }

    // ---------------------------------------------------------------------------------------------
    // Messages

    #[test]
    fn send_to_users_returns_the_accepted_id() {
        let api = Api::start();
        let r = api.signed(
            "POST",
            "/v1/messages",
            r#"{"from":1000,"to_users":[2,3,2],"body":"héllo","request_id":9}"#,
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.json(),
            json!({"msg_id": 0xABCD_0000_0001u64, "server_time_ms": 1_700_000_000_123u64})
        );
        assert_eq!(
            api.backend.calls(),
            [Call::Send {
                from: 1000,
                target: PushTarget::Users(vec![UserId(2), UserId(3)]),
                body: "héllo".as_bytes().to_vec(),
                request_id: 9,
            }]
        );
    }

    #[test]
    fn send_to_group_with_base64_body_and_string_ids() {
        let api = Api::start();
        let r = api.signed(
            "POST",
            "/v1/messages",
            r#"{"from":"18446744073709551615","to_group":"77","body_base64":"AP8BAg=="}"#,
        );
        assert_eq!(r.status, 200, "{r:?}");
        // `request_id: null` is the same as absent (openapi.yaml: nullable).
        let r2 = api.signed(
            "POST",
            "/v1/messages",
            r#"{"from":5,"to_users":["6"],"body":"","request_id":null}"#,
        );
        assert_eq!(r2.status, 200, "{r2:?}");
        assert_eq!(
            api.backend.calls(),
            [
                Call::Send {
                    from: u64::MAX,
                    target: PushTarget::Group(GroupId(77), vec![]),
                    body: vec![0, 255, 1, 2],
                    request_id: 0,
                },
                Call::Send {
                    from: 5,
                    target: PushTarget::Users(vec![UserId(6)]),
                    body: vec![],
                    request_id: 0,
                }
            ]
        );
    }

    /// A group message may mention members (0 = `@all`), repeated ones once.
    #[test]
    fn send_to_group_with_mentions() {
        let api = Api::start();
        let r = api.signed(
            "POST",
            "/v1/messages",
            r#"{"from":1000,"to_group":77,"body":"all hands at 10","mentions":[0,"12",12]}"#,
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            api.backend.calls(),
            [Call::Send {
                from: 1000,
                target: PushTarget::Group(GroupId(77), vec![UserId(0), UserId(12)]),
                body: b"all hands at 10".to_vec(),
                request_id: 0,
            }]
        );
    }

    #[test]
    fn invalid_messages_are_400_with_clear_messages() {
        let api = Api::start();
        let many: Vec<u64> = (1..=1001).collect();
        let many = json!({"from": 1, "to_users": many, "body": "x"}).to_string();
        let big =
            json!({"from": 1, "to_users": [2], "body": "x".repeat(60 * 1024 + 1)}).to_string();
        let cases: Vec<(String, &str, &str)> = vec![
            ("".into(), "bad_json", "EOF"),
            ("not json".into(), "bad_json", "invalid JSON body"),
            ("[]".into(), "bad_json", "invalid JSON body"),
            (
                r#"{"to_users":[2],"body":"x"}"#.into(),
                "bad_json",
                "missing field `from`",
            ),
            (
                r#"{"from":1,"to_users":[2],"body":"x","extra":1}"#.into(),
                "bad_json",
                "unknown field `extra`",
            ),
            (
                r#"{"from":-1,"to_users":[2],"body":"x"}"#.into(),
                "bad_json",
                "unsigned 64-bit integer",
            ),
            (
                r#"{"from":1.5,"to_users":[2],"body":"x"}"#.into(),
                "bad_json",
                "unsigned 64-bit integer",
            ),
            (
                r#"{"from":"1x","to_users":[2],"body":"x"}"#.into(),
                "bad_json",
                "unsigned 64-bit integer",
            ),
            (
                r#"{"from":1,"to_users":[2],"body":7}"#.into(),
                "bad_json",
                "invalid type",
            ),
            (
                r#"{"from":0,"to_users":[2],"body":"x"}"#.into(),
                "invalid_argument",
                "`from`",
            ),
            (
                r#"{"from":1,"body":"x"}"#.into(),
                "invalid_argument",
                "exactly one of `to_users` and `to_group`",
            ),
            (
                r#"{"from":1,"to_users":[2],"to_group":3,"body":"x"}"#.into(),
                "invalid_argument",
                "not both",
            ),
            (
                r#"{"from":1,"to_users":[2],"body":"x","mentions":[2]}"#.into(),
                "invalid_argument",
                "`mentions` go with `to_group` only",
            ),
            (
                json!({"from": 1, "to_group": 3, "body": "x", "mentions": (1..=21).collect::<Vec<u64>>()})
                    .to_string(),
                "invalid_argument",
                "`mentions` lists 21 users; at most 20 are allowed",
            ),
            (
                r#"{"from":1,"to_group":3,"body":"x","mentions":null}"#.into(),
                "bad_json",
                "invalid type",
            ),
            (
                r#"{"from":1,"to_users":[],"body":"x"}"#.into(),
                "invalid_argument",
                "must not be empty",
            ),
            (
                r#"{"from":1,"to_users":[2,0],"body":"x"}"#.into(),
                "invalid_argument",
                "user id 0",
            ),
            (
                r#"{"from":1,"to_group":0,"body":"x"}"#.into(),
                "invalid_argument",
                "`to_group`",
            ),
            (many, "invalid_argument", "at most 1000"),
            (
                r#"{"from":1,"to_users":[2]}"#.into(),
                "invalid_argument",
                "one of `body` and `body_base64`",
            ),
            (
                r#"{"from":1,"to_users":[2],"body":"x","body_base64":"eA=="}"#.into(),
                "invalid_argument",
                "not both",
            ),
            (
                r#"{"from":1,"to_users":[2],"body_base64":"not base64!"}"#.into(),
                "invalid_argument",
                "not valid base64",
            ),
            (big, "invalid_argument", "at most 61440"),
            // The exclusive fields may be absent but not null (openapi.yaml says the same).
            (
                r#"{"from":1,"to_users":[2],"to_group":null,"body":"x"}"#.into(),
                "bad_json",
                "invalid type: null",
            ),
            (
                r#"{"from":1,"to_users":[2],"body":"x","body_base64":null}"#.into(),
                "bad_json",
                "invalid type: null",
            ),
        ];
        for (body, code, needle) in &cases {
            let r = api.signed("POST", "/v1/messages", body);
            let msg = r.assert_error(400, code);
            assert!(msg.contains(needle), "{body:.80}: {msg}");
        }
        assert!(api.backend.calls().is_empty());
    }

    #[test]
    fn bodies_over_the_limit_are_413() {
        let mut cfg = config();
        cfg.max_body = 1024;
        let api = Api::start_with(cfg, GateSource::Static(vec![]), None);
        let body = json!({"from": 1, "to_users": [2], "body": "x".repeat(1100)}).to_string();
        // Declared by Content-Length: refused before the body is read.
        let r = api.signed("POST", "/v1/messages", &body);
        let msg = r.assert_error(413, "payload_too_large");
        assert!(msg.contains("1024"), "{msg}");
        // Chunked: refused while reading.
        let mut c = Conn::open(api.addr());
        let ts = now_secs();
        let sig = sign(SECRET, "POST", "/v1/messages", ts, body.as_bytes());
        let mut raw = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nX-IM-Key: {KEY}\r\n\
         X-IM-Timestamp: {ts}\r\nX-IM-Signature: {sig}\r\n\r\n"
    )
        .into_bytes();
        for chunk in body.as_bytes().chunks(300) {
            raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            raw.extend_from_slice(chunk);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        c.send_raw(&raw);
        c.read_reply().assert_error(413, "payload_too_large");
        // A body under the limit is accepted.
        let small = json!({"from": 1, "to_users": [2], "body": "x".repeat(900)}).to_string();
        assert_eq!(api.signed("POST", "/v1/messages", &small).status, 200);
        assert_eq!(api.backend.calls().len(), 1);
    }

    #[test]
    fn backend_error_codes_map_to_http_statuses() {
        let api = Api::start();
        for (code, status, name, retry_after) in [
            (ErrorCode::InvalidArgument, 400, "invalid_argument", false),
            (ErrorCode::Malformed, 400, "malformed", false),
            (ErrorCode::Forbidden, 403, "forbidden", false),
            (ErrorCode::NotMember, 403, "not_member", false),
            (ErrorCode::NotFound, 404, "not_found", false),
            (ErrorCode::GroupFull, 409, "group_full", false),
            (ErrorCode::Overloaded, 429, "overloaded", true),
            (ErrorCode::Unavailable, 503, "unavailable", true),
            (ErrorCode::Internal, 500, "internal", false),
            (ErrorCode::RecallRefused, 500, "recall_refused", false),
        ] {
            *api.backend.fail.lock().unwrap() =
                Some(ApiError::new(code, format!("because {name}")));
            for (method, path, body) in [
                (
                    "POST",
                    "/v1/messages",
                    r#"{"from":1,"to_group":77,"body":"x"}"#,
                ),
                (
                    "POST",
                    "/v1/groups",
                    r#"{"owner":1,"name":"g","members":[2]}"#,
                ),
                ("POST", "/v1/groups/77/members", r#"{"add":[3]}"#),
                ("DELETE", "/v1/groups/77/members", r#"{"remove":[3]}"#),
                ("GET", "/v1/groups/77", ""),
                ("GET", "/v1/users/1/groups", ""),
            ] {
                let r = api.signed(method, path, body);
                let msg = r.assert_error(status, name);
                assert_eq!(msg, format!("because {name}"));
                assert_eq!(
                    r.header("retry-after"),
                    retry_after.then_some("1"),
                    "{code:?} {method} {path}"
                );
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Groups

    #[test]
    fn group_endpoints_happy_paths() {
        let api = Api::start();
        let r = api.signed(
            "POST",
            "/v1/groups",
            r#"{"owner":1,"name":"team","members":[2,3,"4"]}"#,
        );
        assert_eq!((r.status, r.json()), (200, json!({"group": 77})));
        let r = api.signed(
            "POST",
            "/v1/groups",
            r#"{"owner":1,"name":"solo","client_id":"18446744073709551615"}"#,
        );
        assert_eq!((r.status, r.json()), (200, json!({"group": 77})));
        let r = api.signed("GET", "/v1/groups/77", "");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            json!({
                "group": 77, "name": "team", "creator": 1, "owner": 1,
                "announcement": "hello all", "created_ms": 1_700_000_000_000u64,
                "members": [{"uid": 1, "role": "owner"}, {"uid": 2, "role": "member"}],
            })
        );
        let r = api.signed("POST", "/v1/groups/77/members", r#"{"add":[5,6]}"#);
        assert_eq!((r.status, r.json()), (200, json!({"group": 77})));
        let r = api.signed("DELETE", "/v1/groups/77/members", r#"{"remove":[6]}"#);
        assert_eq!((r.status, r.json()), (200, json!({"group": 77})));
        let r = api.signed("GET", "/v1/users/2/groups", "");
        assert_eq!(
            (r.status, r.json()),
            (
                200,
                json!({"uid": 2, "groups": [{"group": 77, "name": "team"}, {"group": 78, "name": "ops"}]})
            )
        );
        let r = api.signed("GET", "/v1/groups/5", "");
        let msg = r.assert_error(404, "not_found");
        assert_eq!(msg, "group 5 not found");
        assert_eq!(
            api.backend.calls(),
            [
                Call::Create {
                    owner: 1,
                    name: "team".into(),
                    members: vec![2, 3, 4],
                    client_id: 0,
                },
                Call::Create {
                    owner: 1,
                    name: "solo".into(),
                    members: vec![],
                    client_id: u64::MAX,
                },
                Call::Info(77),
                Call::Add(77, vec![5, 6]),
                Call::Remove(77, vec![6]),
                Call::GroupsOf(2),
                Call::Info(5),
            ]
        );
    }

    #[test]
    fn invalid_group_requests_are_400() {
        let api = Api::start();
        let long = json!({"owner": 1, "name": "n".repeat(257)}).to_string();
        let many = json!({"add": (1..=2001).collect::<Vec<u64>>()}).to_string();
        for (method, path, body, code, needle) in [
            (
                "POST",
                "/v1/groups",
                r#"{"name":"x"}"#,
                "bad_json",
                "missing field `owner`",
            ),
            (
                "POST",
                "/v1/groups",
                r#"{"owner":1}"#,
                "bad_json",
                "missing field `name`",
            ),
            (
                "POST",
                "/v1/groups",
                r#"{"owner":0,"name":"x"}"#,
                "invalid_argument",
                "`owner`",
            ),
            (
                "POST",
                "/v1/groups",
                r#"{"owner":1,"name":"  "}"#,
                "invalid_argument",
                "`name` must not be empty",
            ),
            (
                "POST",
                "/v1/groups",
                long.as_str(),
                "invalid_argument",
                "at most 256",
            ),
            (
                "POST",
                "/v1/groups",
                r#"{"owner":1,"name":"x","members":[0]}"#,
                "invalid_argument",
                "user id 0",
            ),
            (
                "POST",
                "/v1/groups/77/members",
                r#"{"add":[]}"#,
                "invalid_argument",
                "`add` must not be empty",
            ),
            (
                "POST",
                "/v1/groups/77/members",
                r#"{"remove":[1]}"#,
                "bad_json",
                "unknown field `remove`",
            ),
            (
                "POST",
                "/v1/groups/77/members",
                many.as_str(),
                "invalid_argument",
                "at most 2000",
            ),
            (
                "DELETE",
                "/v1/groups/77/members",
                r#"{"remove":[]}"#,
                "invalid_argument",
                "`remove` must not be empty",
            ),
            (
                "DELETE",
                "/v1/groups/77/members",
                r#"{"add":[1]}"#,
                "bad_json",
                "unknown field `add`",
            ),
            ("DELETE", "/v1/groups/77/members", "", "bad_json", "EOF"),
        ] {
            let msg = api.signed(method, path, body).assert_error(400, code);
            assert!(msg.contains(needle), "{method} {path} {body:.60}: {msg}");
        }
        assert!(api.backend.calls().is_empty());
    }

    // ---------------------------------------------------------------------------------------------
    // Tokens

    #[test]
    fn tokens_are_404_when_not_configured() {
        let api = Api::start();
        let msg = api
            .signed("POST", "/v1/tokens", r#"{"uid":42,"ttl_secs":60}"#)
            .assert_error(404, "not_found");
        assert!(msg.contains("not configured"), "{msg}");
    }

    #[test]
    fn tokens_are_minted_and_verify() {
        let tokens = Arc::new(HmacTokens::new("dev-secret"));
        let api = Api::start_with(config(), GateSource::Static(vec![]), Some(tokens.clone()));
        let before = now_secs();
        let r = api.signed("POST", "/v1/tokens", r#"{"uid":"42","ttl_secs":60}"#);
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
        assert_eq!(v["uid"], 42);
        let exp = v["expires_at"].as_u64().unwrap();
        assert!((before + 60..=now_secs() + 60).contains(&exp), "{v}");
        let tok = v["token"].as_str().unwrap();
        assert_eq!(tokens.verify(UserId(42), tok, now_secs()), Ok(()));
        assert!(tokens.verify(UserId(42), tok, exp).is_err());
        assert!(tokens.verify(UserId(43), tok, now_secs()).is_err());
        // Default lifetime 1 h, also for `ttl_secs: null` (openapi.yaml: nullable).
        let v = api.signed("POST", "/v1/tokens", r#"{"uid":7}"#).json();
        assert!(v["expires_at"].as_u64().unwrap() >= before + 3600);
        let v = api
            .signed("POST", "/v1/tokens", r#"{"uid":7,"ttl_secs":null}"#)
            .json();
        assert!(v["expires_at"].as_u64().unwrap() >= before + 3600, "{v}");
        for (body, needle) in [
            (r#"{"uid":0,"ttl_secs":60}"#, "`uid`"),
            (r#"{"uid":1,"ttl_secs":0}"#, "`ttl_secs`"),
            (r#"{"uid":1,"ttl_secs":2592001}"#, "`ttl_secs`"),
        ] {
            let msg = api
                .signed("POST", "/v1/tokens", body)
                .assert_error(400, "invalid_argument");
            assert!(msg.contains(needle), "{msg}");
        }
        api.signed("POST", "/v1/tokens", r#"{"ttl_secs":1}"#)
            .assert_error(400, "bad_json");
    }

    // ---------------------------------------------------------------------------------------------
    // iplist

    /// Gate ids in `uid`'s iplist order, over one keep-alive connection.
    fn order_over(conn: &mut Conn, uid: u64) -> Vec<u16> {
        let r = conn.request("GET", &format!("/v1/iplist?uid={uid}"), &[], b"");
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["gates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_u64().unwrap() as u16)
            .collect()
    }

    #[test]
    fn iplist_exact_json_and_deterministic_order() {
        let mut cfg = config();
        cfg.backoff = BackoffConfig {
            initial_ms: 1500,
            max_ms: 20_000,
            multiplier: 1.5,
            jitter: 0.25,
        };
        let api = Api::start_with(cfg, GateSource::Static((1..=4).map(gate).collect()), None);
        let r = api.get("/v1/iplist?uid=42");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let v = r.json();
        let mut expected = (1..=4).map(gate).collect::<Vec<_>>();
        im_api::order_gates(UserId(42), &mut expected);
        let gates: Vec<Value> = expected
            .iter()
            .map(|g| json!({"id": g.id, "tcp": g.tcp_addr, "ws": g.ws_addr}))
            .collect();
        assert_eq!(
            v,
            json!({
                "uid": 42,
                "gates": gates,
                "backoff": {"initial_ms": 1500, "max_ms": 20000, "multiplier": 1.5, "jitter": 0.25},
            })
        );
        // Even-numbered test gates have a WebSocket address, odd ones have `null`.
        for g in v["gates"].as_array().unwrap() {
            assert_eq!(g["ws"].is_null(), g["id"].as_u64().unwrap() % 2 == 1, "{g}");
        }
        // The same order on every call and from another server with the gates listed differently.
        let other = Api::start_with(
            config(),
            GateSource::Static((1..=4).rev().map(gate).collect()),
            None,
        );
        let (mut a, mut b) = (Conn::open(api.addr()), Conn::open(other.addr()));
        for uid in 1..300 {
            let first = order_over(&mut a, uid);
            assert_eq!(first.len(), 4);
            assert_eq!(order_over(&mut a, uid), first);
            assert_eq!(order_over(&mut b, uid), first, "uid {uid}");
        }
        // Extra query parameters are ignored; the uid is required and must be a positive integer.
        assert_eq!(api.get("/v1/iplist?v=2&uid=42").json(), v);
        for q in [
            "", "?", "?uid=", "?uid=0", "?uid=abc", "?uid=-1", "?uid=+1", "?user=1",
        ] {
            api.get(&format!("/v1/iplist{q}"))
                .assert_error(400, "invalid_argument");
        }
    }

    #[test]
    fn iplist_spreads_users_evenly_and_a_removed_gate_moves_only_its_users() {
        let four = Api::start_with(
            config(),
            GateSource::Static((1..=4).map(gate).collect()),
            None,
        );
        let three = Api::start_with(
            config(),
            GateSource::Static([1, 2, 4].into_iter().map(gate).collect()),
            None,
        );
        let (mut c4, mut c3) = (Conn::open(four.addr()), Conn::open(three.addr()));
        let mut first: HashMap<u16, usize> = HashMap::new();
        let mut moved_to: HashMap<u16, usize> = HashMap::new();
        const USERS: u64 = 10_000;
        for uid in 1..=USERS {
            let o4 = order_over(&mut c4, uid);
            let o3 = order_over(&mut c3, uid);
            *first.entry(o4[0]).or_default() += 1;
            // Removing gate 3 keeps the relative order of the others.
            let without_3: Vec<u16> = o4.iter().copied().filter(|g| *g != 3).collect();
            assert_eq!(o3, without_3, "uid {uid}");
            if o4[0] == 3 {
                *moved_to.entry(o3[0]).or_default() += 1;
            } else {
                assert_eq!(o3[0], o4[0], "uid {uid} moved although its gate stayed");
            }
        }
        eprintln!("first choices: {first:?}; gate 3's users moved to {moved_to:?}");
        // 2500 expected per gate; 10 000 Bernoulli(1/4) draws have σ ≈ 43, so ±250 is ~6σ.
        for g in 1..=4 {
            let n = first[&g];
            assert!(
                (2250..=2750).contains(&n),
                "gate {g} is first for {n} users"
            );
        }
        // Gate 3's ~2500 users spread over the 3 others (≈833 each, σ ≈ 24).
        let moved: usize = moved_to.values().sum();
        assert_eq!(moved, first[&3]);
        for g in [1, 2, 4] {
            let n = moved_to[&g];
            assert!(
                (moved / 3 - 150..=moved / 3 + 150).contains(&n),
                "{n} of {moved} moved to gate {g}"
            );
        }
    }

    #[test]
    fn iplist_without_gates_is_503_with_retry_after() {
        let mut cfg = config();
        cfg.backoff.initial_ms = 2500;
        let api = Api::start_with(cfg, GateSource::Static(vec![]), None);
        let r = api.get("/v1/iplist?uid=1");
        r.assert_error(503, "no_gate");
        assert_eq!(r.header("retry-after"), Some("3"));
    }

    #[test]
    fn shutdown_stops_serving() {
        let api = Api::start();
        let addr = api.addr();
        let mut idle = Conn::open(addr);
        assert_eq!(idle.request("GET", "/healthz", &[], b"").status, 200);
        api.server.shutdown();
        // The idle keep-alive connection is closed and nothing listens any more.
        let mut buf = [0u8; 1];
        assert_eq!(idle.r.read(&mut buf).unwrap_or(0), 0);
        assert!(TcpStream::connect(addr).is_err());
    }

    #[cfg(feature = "redis")]
    #[test]
    fn iplist_reads_live_gates_from_redis_cluster() {
        use im_directory::{Directory, RedisDirectory};
        use std::time::Instant;

        let cluster = im_testkit::RedisCluster::start(3, 0).unwrap_or_else(|e| {
            panic!("cannot start a Redis Cluster (CI installs redis-server): {e}")
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = rt
            .block_on(RedisDirectory::connect(cluster.nodes()))
            .expect("connect");
        let api = Api::start_with(config(), GateSource::Redis(cluster.nodes()), None);

        // Nothing registered yet: 503.
        let r = api.get("/v1/iplist?uid=9");
        r.assert_error(503, "no_gate");
        assert_eq!(r.header("retry-after"), Some("1"));

        rt.block_on(async {
            dir.register_gate(gate(1), 60).await.unwrap();
            dir.register_gate(gate(2), 60).await.unwrap();
            dir.register_gate(gate(3), 2).await.unwrap(); // expires in 2 s
        });
        // The empty list may be cached for up to ~1 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        let v = loop {
            let r = api.get("/v1/iplist?uid=9");
            if r.status == 200 && r.json()["gates"].as_array().unwrap().len() == 3 {
                break r.json();
            }
            assert!(Instant::now() < deadline, "gates never appeared: {r:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut expected: Vec<GateInfo> = (1..=3).map(gate).collect();
        im_api::order_gates(UserId(9), &mut expected);
        let ids: Vec<u64> = v["gates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ids,
            expected.iter().map(|g| g.id as u64).collect::<Vec<_>>()
        );
        let g2 = v["gates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == 2)
            .unwrap();
        assert_eq!(
            g2,
            &json!({"id": 2, "tcp": "10.0.0.2:7000", "ws": "ws://10.0.0.2:7080/ws"})
        );

        // Gate 3 is not refreshed: it drops out of the list (TTL 2 s + cache 1 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = api.get("/v1/iplist?uid=9").json();
            let ids: Vec<u64> = v["gates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["id"].as_u64().unwrap())
                .collect();
            if !ids.contains(&3) {
                assert_eq!(ids.len(), 2);
                break;
            }
            assert!(Instant::now() < deadline, "gate 3 never expired");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(api
            .metrics()
            .contains("im_api_iplist_source_errors_total 0\n"));

        // Redis gone: the last list is served for a while, then 503 (no hanging requests).
        drop(cluster);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let t = Instant::now();
            let r = api.get("/v1/iplist?uid=9");
            assert!(
                t.elapsed() < Duration::from_secs(6),
                "iplist hung {:?}",
                t.elapsed()
            );
            if r.status == 503 {
                r.assert_error(503, "unavailable");
                assert!(r.header("retry-after").is_some());
                break;
            }
            assert_eq!(r.status, 200);
            assert!(Instant::now() < deadline, "stale list served forever");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!api
            .metrics()
            .contains("im_api_iplist_source_errors_total 0\n"));
    }
}
