#!/usr/bin/env python3
"""Soak: touch many distinct users and watch the single-node server's RSS (issue 14).

    benches/scripts/soak-users.py BIN_DIR [--users 10000000] [--batch 1000] [--cached 500000]
                                  [--logins 200000] [--out DIR]

Starts `BIN_DIR/im-server run` on a fresh data directory with `max_cached_users = --cached`,
then
  1. s2c through the HTTP API (POST /v1/messages, signed as docs/API.md says) to --users
     distinct users, --batch recipients per request: every recipient's state is loaded on its
     logic worker and a message appended to its timeline;
  2. logins of --logins further distinct users with `im-loadgen idle` (15 000 at a time: one
     server process holds at most 20 000 open files here).
Every 100 requests (and after each login wave) it samples the server's RSS (/proc/PID/status
VmRSS), the users touched so far and the server's im_users_cached / im_users_evicted_total
metrics, and writes them to OUT/soak.csv. Prints the CSV path and a summary. Every step has a
deadline; the server is killed at the end (or on any failure).
"""
import argparse
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

KEY, SECRET = "soak", "soak-secret"


def sign(method, target, ts, body):
    h = hashlib.sha256(body).hexdigest()
    msg = f"{method}\n{target}\n{ts}\n{h}".encode()
    return hmac.new(SECRET.encode(), msg, hashlib.sha256).hexdigest()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(api, name):
    # A fresh connection: the API closes idle keep-alive connections.
    host, port = api.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.M)
    return int(m.group(1)) if m else -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--users", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--cached", type=int, default=500_000)
    ap.add_argument("--logins", type=int, default=200_000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="im-soak-")
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data")
    conf = os.path.join(out, "soak.toml")
    with open(conf, "w") as f:
        f.write(
            f'max_cached_users = {a.cached}\n'
            # The soak sends far more than a business server would: no per-key rate limit.
            f'[api]\nlisten = "127.0.0.1:0"\nrate_per_key = 1000000\nburst_per_key = 1000000\n'
            f'[api.keys]\n{KEY} = "{SECRET}"\n'
        )
    log = open(os.path.join(out, "server.log"), "w")
    srv = subprocess.Popen(
        [os.path.join(a.bin, "im-server"), "run", "--config", conf, "--listen", "127.0.0.1:0",
         "--data-dir", data],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        gate = None
        deadline = time.time() + 30
        while gate is None:
            if time.time() > deadline:
                sys.exit("server did not start")
            line = srv.stdout.readline()
            m = re.search(r"listening on (\S+)", line)
            if m:
                gate = m.group(1)
        api = None
        while api is None:
            if time.time() > deadline:
                sys.exit("no api address in the server log")
            with open(os.path.join(out, "server.log")) as f:
                m = re.search(r"api: listening on http://(\S+)", re.sub(r"\x1b\[[0-9;]*m", "", f.read()))
            if m:
                api = m.group(1)
            else:
                time.sleep(0.1)
        host, port = api.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        csv = open(os.path.join(out, "soak.csv"), "w")
        csv.write("secs,users_touched,rss_kib,users_cached,users_evicted\n")
        t0 = time.time()

        def sample(touched):
            row = (f"{time.time() - t0:.1f},{touched},{rss_kib(srv.pid)},"
                   f"{metric(api, 'im_users_cached')},{metric(api, 'im_users_evicted_total')}")
            csv.write(row + "\n")
            csv.flush()
            return row

        base = 10_000_000_000
        touched = 0
        n = 0
        while touched < a.users:
            k = min(a.batch, a.users - touched)
            to = list(range(base + touched, base + touched + k))
            body = json.dumps({"from": 9, "to_users": to, "body": "soak"}).encode()
            ts = str(int(time.time()))
            target = "/v1/messages"
            for attempt in range(20):
                conn.request("POST", target, body, {
                    "Content-Type": "application/json", "X-IM-Key": KEY, "X-IM-Timestamp": ts,
                    "X-IM-Signature": sign("POST", target, ts, body)})
                r = conn.getresponse()
                rb = r.read()
                if r.status == 200:
                    break
                if r.status in (429, 503):
                    time.sleep(0.2)
                    continue
                sys.exit(f"POST /v1/messages: {r.status} {rb[:200]!r}")
            else:
                sys.exit("POST /v1/messages kept being refused")
            touched += k
            n += 1
            if n % 100 == 0:
                print(sample(touched), flush=True)
        print(sample(touched), flush=True)
        # Logins of further users, 15 000 at a time.
        lbase = base + a.users
        done = 0
        while done < a.logins:
            k = min(15_000, a.logins - done)
            subprocess.run(
                [os.path.join(a.bin, "im-loadgen"), "idle", "-n", str(k), "--hold-secs", "1",
                 "--server", gate, "--uid-base", str(lbase + done)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=True)
            done += k
            touched += k
            print(sample(touched), flush=True)
        time.sleep(3)  # the last connections' close notices
        print(sample(touched), flush=True)
        print(f"csv: {os.path.join(out, 'soak.csv')}  ({time.time() - t0:.0f} s)")
    finally:
        srv.send_signal(signal.SIGKILL)
        srv.wait(timeout=30)


if __name__ == "__main__":
    main()
