//! Client sockets: bound to a chosen source address before a non-blocking connect.
//!
//! glommio's `TcpStream::connect` cannot bind a source address, so the socket is made here with
//! socket2: `SO_REUSEADDR` and `IP_BIND_ADDRESS_NO_PORT` (the kernel picks the port at connect
//! time, per 4-tuple, so each source address has its own ~28 000 ephemeral ports towards one
//! server port instead of sharing one pool), `bind(src:0)`, then a **non-blocking** `connect`
//! that returns `EINPROGRESS`. The executor registers the fd with its epoll set (exec.rs: no
//! glommio stream per connection); its sender's `send` of the `Login` frame gets `EAGAIN` while
//! the socket is still in `SYN_SENT` and is retried on the `EPOLLOUT` edge that the completed
//! handshake brings, and a refused connect surfaces as that `send`'s or the next `recv`'s error
//! (`ECONNREFUSED`). Nothing blocks the executor thread.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// `IP_BIND_ADDRESS_NO_PORT` from `<linux/in.h>` (libc has it on Linux; spelled out for clarity).
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: fd is a valid socket owned by the caller; the option value is a c_int on the stack.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Starts a non-blocking connect from `src` to `server`; returns the raw fd (owned by the caller)
/// whose handshake may still be in progress.
pub fn start_connect(src: Option<Ipv4Addr>, server: SocketAddr) -> io::Result<RawFd> {
    let domain = if server.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    sock.set_nodelay(true)?;
    if let (Some(src), true) = (src, server.is_ipv4()) {
        sock.set_reuse_address(true)?;
        set_int_opt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            1,
        )?;
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    }
    match sock.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into_raw_fd())
}

/// Short name of an I/O error for the failure tables (`ECONNREFUSED`, `EADDRNOTAVAIL`, …).
pub fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        Some(libc::EADDRINUSE) => "EADDRINUSE",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::EPIPE) => "EPIPE",
        Some(libc::ENOBUFS) => "ENOBUFS",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(n) => return format!("errno {n}"),
        None => return format!("{:?}", e.kind()),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    #[test]
    fn binds_source_address_and_connects() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd = start_connect(Some(Ipv4Addr::new(127, 0, 0, 3)), addr).unwrap();
        let (mut acc, peer) = l.accept().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        // SAFETY: fd came from start_connect and is owned here.
        let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        s.set_nonblocking(false).unwrap();
        std::io::Write::write_all(&mut &s, b"x").unwrap();
        let mut b = [0u8; 1];
        acc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        acc.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn refused_connect_is_reported() {
        // Bind then drop a listener: the port is (almost certainly) closed now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = start_connect(None, addr);
        if let Ok(fd) = r {
            // SAFETY: fd came from start_connect and is owned here.
            let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
            std::thread::sleep(Duration::from_millis(50));
            let e = s.take_error().unwrap().expect("refused");
            assert_eq!(errno_name(&e), "ECONNREFUSED");
        }
    }
}
