//! Ports for the servers a test starts, below the kernel's ephemeral range.
//!
//! Binding port 0 and handing the number to a process that binds it a moment later races with
//! everything else on the machine: the kernel gives the same range to the source ports of
//! outgoing connections (a test's own clients) and to the next `bind(0)`, so two tests running
//! in parallel could get the same port, and a server process then failed to start or, worse, a
//! node of one test linked to a node of another. Ports handed out here come from a counter of
//! this test process, in a block below 32 768 (Linux's default `ip_local_port_range` starts
//! there) chosen by the process id, and are probed free before they are handed out.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out, and the size of each process's block.
const BASE: u32 = 20_000;
const BLOCK: u32 = 1_000;
/// Blocks between `BASE` and the ephemeral range (32 768).
const BLOCKS: u32 = 12;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port of 127.0.0.1 that was free a moment ago, never handed out before by this process, and
/// outside the range the kernel picks ephemeral ports from.
pub fn reserve() -> u16 {
    let start = BASE + (std::process::id() % BLOCKS) * BLOCK;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = start + n % BLOCK;
        assert!(
            n < 10 * BLOCK,
            "no free port left in {start}..{}",
            start + BLOCK
        );
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port as u16)).is_ok() {
            return port as u16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| reserve()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
        for p in ports {
            assert!((20_000..32_768).contains(&p), "{p}");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }
}
