//! File messages from the client's side (docs/PROTOCOL.md "File messages", docs/API.md "Files"):
//! ask for an upload ticket over the connection, upload the bytes over HTTP in resumable chunks,
//! send a message that references the file, and fetch a file of a received message by a signed
//! URL. The HTTP part is a small blocking HTTP/1.1 client for `http://` URLs (a TLS endpoint needs
//! a client of its own).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use im_shared::files::{hex, key_from_hex, sha256_from_hex, FileKind, FileRef};
use im_shared::{Command, GroupId, Seq};
use sha2::{Digest, Sha256};

use crate::{Client, ClientError};

/// An upload ticket (`FileTicket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadTicket {
    pub url: String,
    pub ticket: String,
    pub expires_ms: u64,
}

/// What a finished upload answers: the file's id, size and the key a message needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uploaded {
    pub sha256: [u8; 32],
    pub size: u64,
    pub key: [u8; 16],
}

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json_str(&self, field: &str) -> Option<String> {
        // The answers are flat JSON objects written by the server: `"field":"value"`.
        let body = std::str::from_utf8(&self.body).ok()?;
        let at = body.find(&format!("\"{field}\":\""))? + field.len() + 4;
        let end = body[at..].find('"')?;
        Some(body[at..at + end].to_owned())
    }
}

fn http_err(m: impl Into<String>) -> ClientError {
    ClientError::Io(io::Error::other(m.into()))
}

/// One request over a new connection (`Connection: close`); `url` is `http://host:port/path?q`.
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| http_err(format!("only http:// URLs are supported here, not {url}")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| http_err(format!("cannot resolve {host}")))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| http_err(format!("bad HTTP status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((n, v)) = line.trim_end().split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut body = Vec::new();
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    if method != "HEAD" {
        match len {
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body)?;
            }
            None => {
                r.read_to_end(&mut body)?;
            }
        }
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

impl Client {
    /// Asks for a ticket to upload `size` bytes hashing to `sha256`.
    pub fn file_ticket(
        &mut self,
        kind: FileKind,
        size: u64,
        sha256: [u8; 32],
        mime: &str,
    ) -> Result<UploadTicket, ClientError> {
        let req = self.send_cmd(&Command::FileUpload {
            kind: kind as u8,
            size,
            sha256,
            mime: mime.to_owned(),
        })?;
        self.wait_for(|r, c| match c {
            Command::FileTicket {
                url,
                ticket,
                expires_ms,
            } if r == req => Some(UploadTicket {
                url: url.clone(),
                ticket: ticket.clone(),
                expires_ms: *expires_ms,
            }),
            _ => None,
        })
    }

    /// A download URL for the file of message `seq` of this user's timeline: `(url, expires_ms)`.
    pub fn file_url(&mut self, seq: Seq) -> Result<(String, u64), ClientError> {
        let req = self.send_cmd(&Command::FileDownload { seq })?;
        self.wait_for(|r, c| match c {
            Command::FileUrl { url, expires_ms } if r == req => Some((url.clone(), *expires_ms)),
            _ => None,
        })
    }

    /// Uploads `data` (ticket, then the bytes in `chunk`-sized pieces) and returns the file
    /// reference to send, with `name` and no media fields (set them for an image, voice, video).
    pub fn upload_file(
        &mut self,
        kind: FileKind,
        mime: &str,
        name: &str,
        data: &[u8],
        chunk: usize,
    ) -> Result<FileRef, ClientError> {
        let sha256: [u8; 32] = Sha256::digest(data).into();
        let t = self.file_ticket(kind, data.len() as u64, sha256, mime)?;
        let up = upload(&t, data, chunk, self.timeout)?;
        Ok(FileRef {
            kind,
            sha256: up.sha256,
            size: up.size,
            key: up.key,
            mime: mime.to_owned(),
            name: name.to_owned(),
            width: 0,
            height: 0,
            duration_ms: 0,
            thumb: Bytes::new(),
        })
    }

    /// A download URL for the file of post `seq` of large group `group`'s own timeline (members
    /// only): `(url, expires_ms)`.
    pub fn group_file_url(
        &mut self,
        group: GroupId,
        seq: Seq,
    ) -> Result<(String, u64), ClientError> {
        let req = self.send_cmd(&Command::GroupFileDownload { group, seq })?;
        // A group's node of an older release answers `OpResult UnknownCommand`.
        self.wait_for(|r, c| match c {
            Command::FileUrl { url, expires_ms } if r == req => {
                Some(Ok((url.clone(), *expires_ms)))
            }
            Command::OpResult { code, message, .. } if r == req => Some(Err(ClientError::Server {
                code: *code,
                message: message.clone(),
            })),
            _ => None,
        })?
    }

    /// Fetches the file of message `seq` whole (a URL, then the bytes).
    pub fn fetch_file(&mut self, seq: Seq) -> Result<Vec<u8>, ClientError> {
        let (url, _) = self.file_url(seq)?;
        self.get_file(&url)
    }

    /// Fetches the file of post `seq` of large group `group` whole.
    pub fn fetch_group_file(&mut self, group: GroupId, seq: Seq) -> Result<Vec<u8>, ClientError> {
        let (url, _) = self.group_file_url(group, seq)?;
        self.get_file(&url)
    }

    fn get_file(&self, url: &str) -> Result<Vec<u8>, ClientError> {
        let r = http_request("GET", url, &[], &[], self.timeout)?;
        if r.status != 200 {
            return Err(http_err(format!(
                "GET of the file: HTTP {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )));
        }
        Ok(r.body)
    }
}

/// Uploads `data` with ticket `t`: begins, then sends the chunks, resuming at the offset the
/// server has after a refused chunk (`409` names it).
pub fn upload(
    t: &UploadTicket,
    data: &[u8],
    chunk: usize,
    timeout: Duration,
) -> Result<Uploaded, ClientError> {
    let auth = ("Authorization", format!("Ticket {}", t.ticket));
    let r = http_request("POST", &t.url, std::slice::from_ref(&auth), &[], timeout)?;
    if r.status != 201 {
        return Err(http_err(format!(
            "upload begin: HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )));
    }
    let id = r
        .json_str("upload")
        .ok_or_else(|| http_err("upload begin: no upload id"))?;
    let url = format!("{}/{id}", t.url.trim_end_matches('/'));
    resume(&url, &t.ticket, data, 0, chunk, timeout)
}

/// Sends `data` from `offset` to the upload at `url` (`…/v1/files/uploads/{id}`).
pub fn resume(
    url: &str,
    ticket: &str,
    data: &[u8],
    mut offset: u64,
    chunk: usize,
    timeout: Duration,
) -> Result<Uploaded, ClientError> {
    let auth = ("Authorization", format!("Ticket {ticket}"));
    let mut refusals = 0;
    loop {
        let end = (offset as usize + chunk.max(1)).min(data.len());
        let piece = &data[offset as usize..end];
        let r = http_request(
            "PATCH",
            url,
            &[auth.clone(), ("Upload-Offset", offset.to_string())],
            piece,
            timeout,
        )?;
        match r.status {
            201 => {
                let sha256 = r
                    .json_str("sha256")
                    .and_then(|h| sha256_from_hex(&h))
                    .ok_or_else(|| http_err("upload: no sha256 in the answer"))?;
                let key = r
                    .json_str("key")
                    .and_then(|h| key_from_hex(&h))
                    .ok_or_else(|| http_err("upload: no key in the answer"))?;
                return Ok(Uploaded {
                    sha256,
                    size: data.len() as u64,
                    key,
                });
            }
            204 | 409 if refusals < 8 => {
                if r.status == 409 {
                    refusals += 1;
                }
                offset = r
                    .header("upload-offset")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| http_err("upload: no Upload-Offset in the answer"))?;
            }
            s => {
                return Err(http_err(format!(
                    "upload chunk at {offset}: HTTP {s} {}",
                    String::from_utf8_lossy(&r.body)
                )))
            }
        }
    }
}

/// Lower-case hex of a file id (what URLs carry).
pub fn file_hex(sha256: &[u8; 32]) -> String {
    hex(sha256)
}
