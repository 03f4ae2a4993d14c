//! Shared by the `push_*` tests: a real local HTTP server (HTTP/1.1, or HTTP/2 with prior
//! knowledge) on 127.0.0.1 that records every request and answers through a handler.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use im_push::PushNotification;
use im_shared::{MsgId, UserId};

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// What the server answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    /// Wait this long before answering (the request is recorded on arrival).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            body: String::new(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            body: body.to_string(),
            headers: vec![("content-type", "application/json".into())],
            ..Reply::status(status)
        }
    }

    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }

    pub fn header(mut self, k: &'static str, v: &str) -> Reply {
        self.headers.push((k, v.into()));
        self
    }
}

pub type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

pub struct TestServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts on the current tokio runtime.
    pub async fn start(http2: bool, handler: Handler) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (handler, reqs) = (handler.clone(), reqs.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (handler, reqs) = (handler.clone(), reqs.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            let rec = Recorded {
                                method: parts.method.to_string(),
                                path: parts
                                    .uri
                                    .path_and_query()
                                    .map_or("/".into(), |p| p.to_string()),
                                version: parts.version,
                                headers: parts.headers,
                                body,
                            };
                            let reply = handler(&rec);
                            reqs.lock().unwrap().push(rec);
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            let mut resp = Response::builder().status(reply.status);
                            for (k, v) in reply.headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, hyper::Error>(
                                resp.body(Full::new(Bytes::from(reply.body))).unwrap(),
                            )
                        }
                    });
                    let io = TokioIo::new(stream);
                    let _ = if http2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    };
                });
            }
        });
        TestServer {
            addr,
            requests,
            task,
        }
    }

    /// Answers with `replies` in order, then 200 with an empty body.
    pub async fn scripted(http2: bool, replies: Vec<Reply>) -> TestServer {
        let queue = Mutex::new(VecDeque::from(replies));
        TestServer::start(
            http2,
            Arc::new(move |_| {
                queue
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(|| Reply::status(200))
            }),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `f` every 10 ms until it holds or `timeout` passes; whether it held.
pub async fn wait_until(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A notification with recognizable fields.
pub fn notification(provider: u8, token: &str, preview: &str) -> PushNotification {
    PushNotification {
        uid: UserId(42),
        device_id: "phone".into(),
        provider,
        token: token.into(),
        msg_id: MsgId(1_234_567_890_123_456_789),
        from: UserId(7),
        conv: im_shared::proto::CONV_C2C,
        to: 42,
        preview: preview.into(),
        unread: 3,
    }
}

/// Lowercase hex HMAC-SHA256, computed independently of the code under test.
pub fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Splits a compact JWT into its decoded header, claims, the signing input and the signature.
pub fn split_jwt(jwt: &str) -> (serde_json::Value, serde_json::Value, String, Vec<u8>) {
    use im_push::jwt::b64_decode;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS has three parts: {jwt}");
    for p in &parts {
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "base64url without padding: {p}"
        );
    }
    let header = serde_json::from_slice(&b64_decode(parts[0]).unwrap()).unwrap();
    let claims = serde_json::from_slice(&b64_decode(parts[1]).unwrap()).unwrap();
    let sig = b64_decode(parts[2]).unwrap();
    (header, claims, format!("{}.{}", parts[0], parts[1]), sig)
}
