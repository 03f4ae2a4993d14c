//! Source address lists: `127.0.0.2-127.0.0.9`, `127.0.0.2,127.0.0.5`, or a mix of both.

use std::net::Ipv4Addr;

/// Parses a comma-separated list of IPv4 addresses and inclusive ranges `a-b`.
pub fn parse_src_ips(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                return Err(format!("empty range {part}"));
            }
            if b - a >= 65_536 {
                return Err(format!("range {part} is larger than 65536 addresses"));
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(part.parse().map_err(|e| format!("{part}: {e}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source address given".into());
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
        assert!(parse_src_ips("").is_err());
        assert!(parse_src_ips("127.0.0.5-127.0.0.2").is_err());
        assert!(parse_src_ips("127.0.0.x").is_err());
        assert!(parse_src_ips("10.0.0.0-10.255.255.255").is_err());
    }
}
