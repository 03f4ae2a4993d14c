//! A minimal blocking RESP2 client: enough to ask one node `PING`, `CLUSTER INFO`,
//! `CLUSTER NODES` and `INFO replication` without depending on a Redis crate.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// One reply of a Redis server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text: a simple or bulk string; a server error becomes an `io::Error`.
    pub(crate) fn into_text(self) -> io::Result<String> {
        match self {
            Reply::Simple(s) => Ok(s),
            Reply::Bulk(Some(b)) => String::from_utf8(b).map_err(|e| invalid(e.to_string())),
            Reply::Error(e) => Err(io::Error::other(format!("redis error: {e}"))),
            other => Err(invalid(format!("expected a string reply, got {other:?}"))),
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Sends one command to `127.0.0.1:port` on a fresh connection and reads its reply.
pub(crate) fn query(port: u16, args: &[&str]) -> io::Result<Reply> {
    let mut replies = query_all(port, &[args])?;
    Ok(replies.remove(0))
}

/// Sends `cmds` in order on one fresh connection to `127.0.0.1:port` and reads their replies.
pub(crate) fn query_all(port: u16, cmds: &[&[&str]]) -> io::Result<Vec<Reply>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    let mut req = Vec::new();
    for args in cmds {
        req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in *args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
    }
    (&stream).write_all(&req)?;
    let mut r = BufReader::new(&stream);
    cmds.iter().map(|_| read_reply(&mut r)).collect()
}

/// [`query`] that expects a text reply.
pub(crate) fn query_text(port: u16, args: &[&str]) -> io::Result<String> {
    query(port, args)?.into_text()
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "redis closed the connection",
        ));
    }
    if !line.ends_with("\r\n") {
        return Err(invalid(format!("unterminated RESP line {line:?}")));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_len(s: &str) -> io::Result<i64> {
    s.parse()
        .map_err(|_| invalid(format!("bad RESP length {s:?}")))
}

fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(1.min(line.len()));
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Int(parse_len(rest)?)),
        "$" => {
            let n = parse_len(rest)?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n as usize);
            Ok(Reply::Bulk(Some(buf)))
        }
        "*" => {
            let n = parse_len(rest)?;
            if n < 0 {
                return Ok(Reply::Array(None));
            }
            let items = (0..n).map(|_| read_reply(r)).collect::<io::Result<_>>()?;
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(invalid(format!("unexpected RESP line {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_replies() {
        let raw = b"*4\r\n+OK\r\n:-7\r\n$3\r\nabc\r\n*2\r\n$-1\r\n-ERR no\r\n";
        let reply = read_reply(&mut &raw[..]).unwrap();
        assert_eq!(
            reply,
            Reply::Array(Some(vec![
                Reply::Simple("OK".into()),
                Reply::Int(-7),
                Reply::Bulk(Some(b"abc".to_vec())),
                Reply::Array(Some(vec![Reply::Bulk(None), Reply::Error("ERR no".into())])),
            ]))
        );
        assert!(Reply::Error("ERR x".into()).into_text().is_err());
    }
}
