//! Plain HTTP/1.1 over `std::net` for integration tests that play the business side: a client
//! for the signed HTTP API (and `/metrics`, `/healthz`, the iplist), a recording receiver for
//! c2s webhooks and the push gateway, and [`metric`] to read one Prometheus series.
//!
//! Written by hand rather than with an HTTP crate so that the tests see the wire as a business
//! server would and depend on nothing of the code under test.
//!
//! * [`http`] sends one request on a fresh connection (`Connection: close`) and reads the answer
//!   (a `Content-Length` body, or up to the end of the stream without one) into an [`HttpResp`];
//!   [`http_json`] is the `(status, JSON)` shorthand; [`try_http`] reports errors instead of
//!   panicking, for callers that poll a node which may not be up yet.
//! * [`Receiver`] is an HTTP/1.1 server on a free loopback port (keep-alive, `Content-Length`
//!   request bodies) that records every request as a [`Got`] and answers it with the status a
//!   closure picks.
//!
//! Every wait of the test thread has a deadline: the client connects within
//! [`Deadlines::connect`] and each read and write finishes within [`Deadlines::io`]
//! ([`CONNECT_TIMEOUT`] and [`IO_TIMEOUT`] by default); [`Receiver::wait`] takes its own bound.
//! The receiver's connection threads wait for the next request of a keep-alive connection
//! without one: the client under test owns that connection (an idle timeout here would race with
//! its connection pool), and the threads end when it closes it or the test process exits.
//!
//! Signing API requests needs `im_api::sign`; the signed helpers stay with the tests that use
//! them so that this crate does not depend on the API crate.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A JSON document (`serde_json::Value`).
pub type Json = serde_json::Value;

/// Default bound on connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on each read and write of a request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a request may wait on each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// Connecting (`TcpStream::connect_timeout`).
    pub connect: Duration,
    /// Each read and each write (socket read and write timeouts).
    pub io: Duration,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines {
            connect: CONNECT_TIMEOUT,
            io: IO_TIMEOUT,
        }
    }
}

/// Parses `text` as JSON; a test failure naming the text if it is not.
fn parse_json(text: &[u8]) -> Json {
    serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", String::from_utf8_lossy(text)))
}

/// Reads a request or status line and the headers (names lower-cased); `None` at end of stream,
/// on a read error or on a malformed header line.
fn read_head(r: &mut impl BufRead) -> Option<(String, HashMap<String, String>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let first = line.trim_end().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            return Some((first, headers));
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct HttpResp {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResp {
    /// The body as JSON; fails the test if it is not.
    pub fn json(&self) -> Json {
        parse_json(&self.body)
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header by its lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// `error.code` of an error answer (docs/API.md); fails the test if there is none.
    pub fn error_code(&self) -> String {
        let v = self.json();
        v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not a string: {:?}", v["error"]["code"]))
            .to_owned()
    }
}

/// One request on a fresh connection (`Connection: close`, `Host`, `Content-Length`, and
/// `Content-Type: application/json` when there is a body, then `headers`); every step bounded by
/// `deadlines`. An error if it cannot connect, send, or read a well-formed answer in time.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
    deadlines: Deadlines,
) -> io::Result<HttpResp> {
    let mut s = TcpStream::connect_timeout(&addr, deadlines.connect)?;
    s.set_read_timeout(Some(deadlines.io))?;
    s.set_write_timeout(Some(deadlines.io))?;
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut r = BufReader::new(s);
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let (line, headers) = read_head(&mut r).ok_or_else(|| invalid("no HTTP response".into()))?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))?;
    let mut body = Vec::new();
    match headers.get("content-length") {
        Some(n) => {
            let n = n
                .parse()
                .map_err(|_| invalid(format!("bad Content-Length {n:?}")))?;
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok(HttpResp {
        status,
        headers,
        body,
    })
}

/// [`try_http`] with the default [`Deadlines`]; fails the test on any error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResp {
    try_http(addr, method, target, headers, body, Deadlines::default())
        .unwrap_or_else(|e| panic!("{method} {target} on {addr}: {e}"))
}

/// [`http`] with a text body: (status, JSON body, or `Null` when the body is not JSON).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, Json) {
    let r = http(addr, method, target, headers, body.as_bytes());
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Json::Null),
    )
}

/// The value of one Prometheus series in a `/metrics` text (`name` or `name{labels}` exactly as
/// rendered); `None` if it is absent.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Receiver

/// A request a [`Receiver`] got.
#[derive(Clone, Debug)]
pub struct Got {
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// What it was answered.
    pub status: u16,
    /// When its body had been read.
    pub at: Instant,
}

impl Got {
    /// The body as JSON; fails the test if it is not.
    pub fn json(&self) -> Json {
        parse_json(&self.body)
    }

    /// A header by its lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

type Respond = dyn Fn(&Got) -> u16 + Send + Sync;

/// A webhook receiver: an HTTP/1.1 server (keep-alive, `Content-Length` bodies) on a free
/// loopback port that records every request and answers it with the status `respond` picks
/// (and the body `ok`). It serves until the test process exits.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    /// Starts serving on a thread of its own, one more thread per connection.
    pub fn start(respond: impl Fn(&Got) -> u16 + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Respond> = Arc::new(respond);
        let log = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (log, respond) = (log.clone(), respond.clone());
                std::thread::spawn(move || serve_http(stream, &log, &*respond));
            }
        });
        Receiver { addr, got }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived; fails the test if they do not within `within`.
    pub fn wait(&self, n: usize, within: Duration) -> Vec<Got> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests within {within:?}: {got:?}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Requests answered 2xx.
    pub fn delivered(&self) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| (200..300).contains(&g.status))
            .collect()
    }
}

/// Serves one connection: request after request until the client closes it.
fn serve_http(stream: TcpStream, log: &Mutex<Vec<Got>>, respond: &Respond) {
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    if w.set_write_timeout(Some(IO_TIMEOUT)).is_err() {
        return;
    }
    let mut r = BufReader::new(stream);
    while let Some((line, headers)) = read_head(&mut r) {
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let len: usize = headers
            .get("content-length")
            .map_or(0, |n| n.parse().expect("Content-Length"));
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let mut g = Got {
            method,
            path,
            headers,
            body,
            status: 0,
            at: Instant::now(),
        };
        g.status = respond(&g);
        let status = g.status;
        log.lock().unwrap().push(g);
        let answer = format!("HTTP/1.1 {status} Answer\r\nContent-Length: 2\r\n\r\nok");
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_receiver_round_trip() {
        let rx = Receiver::start(|g| if g.path == "/fail" { 503 } else { 200 });
        let hdr = [("X-Test", "yes".to_owned())];
        let r = http(rx.addr(), "POST", "/hook?a=1", &hdr, br#"{"n":1}"#);
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        assert_eq!(r.header("content-length"), Some("2"));
        let (status, v) = http_json(rx.addr(), "GET", "/fail", &[], "");
        assert_eq!((status, v), (503, Json::Null));
        let got = rx.wait(2, Duration::from_secs(5));
        assert_eq!(
            (got[0].method.as_str(), got[0].path.as_str()),
            ("POST", "/hook?a=1")
        );
        assert_eq!(got[0].header("x-test"), Some("yes"));
        assert_eq!(got[0].header("content-type"), Some("application/json"));
        assert_eq!(got[0].json()["n"], 1);
        assert_eq!(got[1].header("content-type"), None);
        assert_eq!(rx.delivered().len(), 1);
        assert_eq!(rx.url("/x"), format!("http://{}/x", rx.addr()));
    }

    #[test]
    fn try_http_reports_a_refused_connection() {
        // Handed out once in this process: a port from `bind(0)`, once dropped, could go to
        // another test's listener by its next `bind(0)`.
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], crate::ports::reserve()).into();
        assert!(try_http(addr, "GET", "/", &[], b"", Deadlines::default()).is_err());
    }

    #[test]
    fn metric_reads_one_series_exactly() {
        let text = "# TYPE a counter\na 3\na{k=\"v\"} 7\nab 9\n";
        assert_eq!(metric(text, "a"), Some(3));
        assert_eq!(metric(text, "a{k=\"v\"}"), Some(7));
        assert_eq!(metric(text, "ab"), Some(9));
        assert_eq!(metric(text, "b"), None);
    }
}
