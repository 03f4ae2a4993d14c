//! The HTTP/1.1 side of the WebSocket port: one request per connection, either a WebSocket upgrade
//! or a `GET`/`HEAD` of a static file of the web chat page. Responses close the connection.

use std::path::{Path, PathBuf};

use im_shared::url::percent_decode;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;
/// Largest static file served (larger ones answer 404 and log a warning).
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The value of a header (name in lower case); the first one if repeated.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Outcome of parsing the bytes received so far.
#[derive(Debug)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head of `len` bytes.
    Complete(usize, Request),
    /// Not HTTP, or over a limit: the error response to send before closing.
    Invalid(Vec<u8>),
}

/// Parses a request head from the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Parsed::Invalid(error_response(
            431,
            "Request Header Fields Too Large",
            "request head too large",
            &[],
        )),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(len)) => {
            if req.version != Some(1) {
                return Parsed::Invalid(error_response(
                    505,
                    "HTTP Version Not Supported",
                    "HTTP/1.1 only",
                    &[],
                ));
            }
            let r = Request {
                method: req.method.unwrap_or("").to_owned(),
                path: req.path.unwrap_or("").to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                    .collect(),
            };
            Parsed::Complete(len, r)
        }
        Err(httparse::Error::TooManyHeaders) => Parsed::Invalid(error_response(
            431,
            "Request Header Fields Too Large",
            "too many headers",
            &[],
        )),
        Err(_) => Parsed::Invalid(error_response(400, "Bad Request", "malformed request", &[])),
    }
}

/// A complete response with a short text body and `Connection: close`.
pub fn error_response(status: u16, reason: &str, body: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len() + 1
    );
    for (n, v) in extra {
        h.push_str(n);
        h.push_str(": ");
        h.push_str(v);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.push_str(body);
    h.push('\n');
    h.into_bytes()
}

/// Answers a plain (non-upgrade) request: a static file of `root` (already canonical) for `GET /`
/// (`index.html`) and `GET /static/…` (the same path under `root`), 404 otherwise.
pub fn serve(req: &Request, root: Option<&Path>) -> Vec<u8> {
    let head = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return error_response(
                405,
                "Method Not Allowed",
                "method not allowed",
                &[("Allow", "GET, HEAD")],
            )
        }
    };
    let not_found = || error_response(404, "Not Found", "not found", &[]);
    let Some(root) = root else {
        return not_found();
    };
    let Some(path) = resolve(root, &req.path) else {
        return not_found();
    };
    let body = match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() <= MAX_FILE => match std::fs::read(&path) {
            Ok(b) => b,
            Err(_) => return not_found(),
        },
        Ok(m) if m.is_file() => {
            tracing::warn!(?path, size = m.len(), "static file too large to serve");
            return not_found();
        }
        _ => return not_found(),
    };
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        content_type(&path),
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(&body);
    }
    out
}

/// Maps a request target to a file under `root`, or `None`. Each path segment is percent-decoded
/// on its own and must not be empty, start with a dot (`.`, `..`, hidden files) or contain a
/// separator or NUL; the result must still lie under `root` after symlinks are resolved.
pub fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let rel: PathBuf = if path == "/" || path == "/index.html" {
        PathBuf::from("index.html")
    } else if let Some(rest) = path.strip_prefix("/static/") {
        let mut p = PathBuf::from("static");
        for seg in rest.split('/') {
            let seg = percent_decode(seg)?;
            if seg.is_empty()
                || seg.starts_with('.')
                || seg.contains(['/', '\\', '\0'])
                || seg.contains(':')
            {
                return None;
            }
            p.push(seg);
        }
        p
    } else {
        return None;
    };
    let full = root.join(rel).canonicalize().ok()?;
    full.starts_with(root).then_some(full)
}

fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::create_dir_all(d.path().join("static/js")).unwrap();
        std::fs::write(d.path().join("static/js/app.js"), "1").unwrap();
        std::fs::write(d.path().join("static/.secret"), "x").unwrap();
        std::fs::write(d.path().join("secret.txt"), "x").unwrap();
        let canon = d.path().canonicalize().unwrap();
        (d, canon)
    }

    #[test]
    fn resolves_only_inside_the_root() {
        let (_d, r) = root();
        assert_eq!(resolve(&r, "/"), Some(r.join("index.html")));
        assert_eq!(resolve(&r, "/?x=1"), Some(r.join("index.html")));
        assert_eq!(
            resolve(&r, "/static/js/app.js"),
            Some(r.join("static/js/app.js"))
        );
        assert_eq!(
            resolve(&r, "/static/js/%61pp.js"),
            Some(r.join("static/js/app.js"))
        );
        for bad in [
            "/secret.txt",
            "/static/../secret.txt",
            "/static/js/../../secret.txt",
            "/static/%2e%2e/secret.txt",
            "/static/..%2fsecret.txt",
            "/static/js%2f..%2f..%2fsecret.txt",
            "/static/.secret",
            "/static//js/app.js",
            "/static/js/app.js%00",
            "/static/%zz",
            "/static/",
            "/static",
            "/../secret.txt",
            "/static/js/missing.js",
        ] {
            assert_eq!(resolve(&r, bad), None, "{bad}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let (d, r) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.js"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("x.js"), d.path().join("static/x.js"))
            .unwrap();
        assert_eq!(resolve(&r, "/static/x.js"), None);
    }

    #[test]
    fn serves_files_and_404s() {
        let (_d, r) = root();
        let get = |path: &str, method: &str| {
            let raw = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            match parse(raw.as_bytes()) {
                Parsed::Complete(n, req) => {
                    assert_eq!(n, raw.len());
                    String::from_utf8(serve(&req, Some(&r))).unwrap()
                }
                p => panic!("{p:?}"),
            }
        };
        let ok = get("/", "GET");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/html; charset=utf-8\r\n"));
        assert!(ok.ends_with("\r\n\r\n<h1>hi</h1>"));
        let head = get("/static/js/app.js", "HEAD");
        assert!(head.contains("Content-Length: 1\r\n") && head.ends_with("\r\n\r\n"));
        assert!(get("/nope", "GET").starts_with("HTTP/1.1 404 "));
        assert!(get("/static/../secret.txt", "GET").starts_with("HTTP/1.1 404 "));
        assert!(get("/", "POST").starts_with("HTTP/1.1 405 "));
    }

    #[test]
    fn parse_limits() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(parse(b"\x16\x03\x01\x02\x00"), Parsed::Invalid(_)));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(big.as_bytes()), Parsed::Invalid(_)));
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..40 {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(parse(many.as_bytes()), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"GET / HTTP/1.0\r\n\r\n"),
            Parsed::Invalid(_)
        ));
    }
}
