#!/usr/bin/env python3
"""Presence fan-out: the cost of one presence change of a user that FOLLOWERS connections follow
(issue 18: "bounded cost per change, a user with 10 000 subscribers").

    benches/scripts/presence-fanout.py BIN_DIR [followers] [rounds]     (defaults 10000, 20)

Starts a fresh single-node release server (`BIN_DIR/im-server run`, 2 gate cores + 2 workers,
presence_offline_delay_ms 0), logs in FOLLOWERS connections (users 200000…) that each follow user
1, then ROUNDS times: user 1 logs in, and the time until every follower has its `PresenceNotice`
(online) is measured; user 1 logs out and every follower gets the offline notice. Prints the
online notice's spread (first / median / last follower, ms after the login answer), and the
server's CPU time (utime+stime from /proc) per change and per notice delivered. The client is this
Python process (epoll over all sockets); its own reading adds to the times, so they are upper
bounds. Written from docs/PROTOCOL.md (improto.py), not from the Rust SDK."""
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import improto  # noqa: E402

bin_dir = sys.argv[1] if len(sys.argv) > 1 else sys.exit(__doc__)
followers = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 20
port = 7480
tck = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck


def frames(c):
    """Complete frames buffered on connection `c` (cmd, req_id, body); reads what is there."""
    try:
        chunk = c.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        if not chunk:
            sys.exit("server closed a follower")
        c.buf += chunk
    except BlockingIOError:
        pass
    out = []
    while len(c.buf) >= 12:
        n = struct.unpack(">I", c.buf[8:12])[0]
        if len(c.buf) < 12 + n:
            break
        out.append((c.buf[3], struct.unpack(">I", c.buf[4:8])[0], c.buf[12:12 + n]))
        c.buf = c.buf[12 + n:]
    return out


def presence_of(body):
    n = struct.unpack(">H", body[:2])[0]
    return [struct.unpack(">QBQ", body[2 + 17 * i:19 + 17 * i]) for i in range(n)]


with tempfile.TemporaryDirectory() as d:
    cfg = os.path.join(d, "im.toml")
    open(cfg, "w").write("presence_offline_delay_ms = 0\n")
    log = open(os.path.join(d, "server.log"), "w")
    srv = subprocess.Popen([f"{bin_dir}/im-server", "run", "--config", cfg, "--listen", f"127.0.0.1:{port}",
                            "--data-dir", os.path.join(d, "data")], stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while "listening" not in open(os.path.join(d, "server.log")).read():
            if time.time() > deadline or srv.poll() is not None:
                sys.exit("server did not start: " + open(os.path.join(d, "server.log")).read())
            time.sleep(0.1)
        gate = f"127.0.0.1:{port}"
        t0 = time.time()
        conns = []
        for i in range(followers):
            # Spread over source addresses: a gate caps connections and their rate per IP.
            c = improto.Conn(gate, 200_000 + i, src=f"127.0.{1 + i // 200 % 200}.{2 + i % 200}")
            rid = c.send(0x27, struct.pack(">HQ", 1, 1))  # PresenceSubscribe [1]
            conns.append((c, rid))
        print(f"{followers} followers logged in and subscribed in {time.time() - t0:.1f} s")
        ep = select.epoll()
        by_fd = {}
        for c, _ in conns:
            c.sock.setblocking(False)
            ep.register(c.sock.fileno(), select.EPOLLIN)
            by_fd[c.sock.fileno()] = c

        def wait_all(online, deadline_s=30):
            """Reads until every follower got a notice of user 1 with this `online`; returns the
            arrival times."""
            got = {}
            end = time.time() + deadline_s
            while len(got) < followers:
                if time.time() > end:
                    sys.exit(f"only {len(got)} of {followers} followers told within {deadline_s} s")
                for fd, _ in ep.poll(0.1):
                    c = by_fd[fd]
                    for cmd, _, body in frames(c):
                        if cmd == 0x9D and any(u == 1 and o == online for u, o, _ in presence_of(body)):
                            got.setdefault(fd, time.time())
            return sorted(got.values())

        wait_all(0)  # everyone's initial state: offline
        c0 = cpu(srv.pid)
        spreads = []
        for r in range(rounds):
            x = improto.Conn(gate, 1)
            t = time.time()
            times = wait_all(1)
            spreads.append([1000 * (times[0] - t), 1000 * (times[len(times) // 2] - t), 1000 * (times[-1] - t)])
            x.sock.close()
            wait_all(0)
        c1 = cpu(srv.pid)
        med = sorted(s[1] for s in spreads)[len(spreads) // 2]
        last = sorted(s[2] for s in spreads)
        per_change = (c1 - c0) / (2 * rounds)
        print(f"online notice to {followers} followers, over {rounds} changes: "
              f"median follower {med:.1f} ms, last follower p50 {last[len(last) // 2]:.1f} ms max {last[-1]:.1f} ms")
        print(f"server cpu {1000 * per_change:.1f} ms per change (login/logout of user 1 included) = "
              f"{1e6 * per_change / followers:.2f} us per notice delivered")
    finally:
        srv.kill()
        srv.wait()
