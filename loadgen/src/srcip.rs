//! Source address lists: `127.0.0.2-127.0.0.9`, `127.0.0.2,127.0.0.5`, or a mix of both.

use std::net::Ipv4Addr;

/// Why a source address list is refused.
#[derive(Debug, thiserror::Error)]
pub enum SrcIpError {
    #[error("{0:?} is not an IPv4 address")]
    Addr(String, #[source] std::net::AddrParseError),
    #[error("empty range {0}")]
    EmptyRange(String),
    #[error("range {0} is larger than 65536 addresses")]
    TooLarge(String),
    #[error("no source address given")]
    Empty,
}

fn addr(s: &str) -> Result<Ipv4Addr, SrcIpError> {
    let s = s.trim();
    s.parse().map_err(|e| SrcIpError::Addr(s.to_owned(), e))
}

/// Parses a comma-separated list of IPv4 addresses and inclusive ranges `a-b`.
pub fn parse_src_ips(s: &str) -> Result<Vec<Ipv4Addr>, SrcIpError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (u32::from(addr(a)?), u32::from(addr(b)?));
            if b < a {
                return Err(SrcIpError::EmptyRange(part.to_owned()));
            }
            if b - a >= 65_536 {
                return Err(SrcIpError::TooLarge(part.to_owned()));
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(addr(part)?);
        }
    }
    if out.is_empty() {
        return Err(SrcIpError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_lists() {
        let v = parse_src_ips("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(
            v,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        let v = parse_src_ips("127.0.0.9, 127.0.1.255-127.0.2.0").unwrap();
        assert_eq!(
            v,
            vec![
                Ipv4Addr::new(127, 0, 0, 9),
                Ipv4Addr::new(127, 0, 1, 255),
                Ipv4Addr::new(127, 0, 2, 0)
            ]
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(parse_src_ips(""), Err(SrcIpError::Empty)));
        assert!(matches!(
            parse_src_ips("127.0.0.5-127.0.0.2"),
            Err(SrcIpError::EmptyRange(_))
        ));
        assert!(matches!(
            parse_src_ips("127.0.0.x"),
            Err(SrcIpError::Addr(a, _)) if a == "127.0.0.x"
        ));
        assert!(matches!(
            parse_src_ips("10.0.0.0-10.255.255.255"),
            Err(SrcIpError::TooLarge(_))
        ));
    }
}
