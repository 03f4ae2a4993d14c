#!/usr/bin/env python3
"""The organisation tree end to end against a running server: a company of PEOPLE people in
10 110 departments imported over the signed HTTP API, then a client written from
docs/PROTOCOL.md alone (nothing of the Rust SDK) logs in, syncs the whole tree page by page,
changes one department over the API, waits for the OrgChanged push and syncs incrementally.
Pages refused `Overloaded` (the user's message rate, 50/s by default) are asked again after
100 ms, as a client should. Prints the times; exits non-zero when anything is off (a missing record, a wrong count).

    im-server run --config CFG &     (CFG: [api] listen, and [api.keys] biz = "s3cret")
    benches/scripts/org-e2e.py --api 127.0.0.1:8080 --gate 127.0.0.1:7000 [--people 100000]

The token is minted with the development secret (IM_TOKEN_SECRET, default the server's).
"""
import argparse
import hashlib
import hmac
import http.client
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import improto  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--api", required=True)
ap.add_argument("--gate", required=True)
ap.add_argument("--people", type=int, default=100_000)
ap.add_argument("--key", default="biz")
ap.add_argument("--secret", default="s3cret")
ap.add_argument("--uid", type=int, default=1)
args = ap.parse_args()


def signed(method, target, body=b""):
    host, port = args.api.rsplit(":", 1)
    ts = str(int(time.time()))
    s2s = "\n".join([method, target, ts, hashlib.sha256(body).hexdigest()])
    sig = hmac.new(args.secret.encode(), s2s.encode(), hashlib.sha256).hexdigest()
    c = http.client.HTTPConnection(host, int(port), timeout=300)
    c.request(method, target, body=body, headers={
        "X-IM-Key": args.key, "X-IM-Timestamp": ts, "X-IM-Signature": sig,
        "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"{method} {target}: {r.status} {data[:300]!r}")
    return json.loads(data)


# --- the company: 10 divisions x 10 groups x 100 teams; each person in one team, every tenth in two
depts, teams = [], []
for d in range(1, 11):
    depts.append({"id": d, "name": f"Division {d}"})
    for g in range(10):
        gid = 100 + d * 10 + g
        depts.append({"id": gid, "parent": d, "name": f"Group {gid}"})
        for t in range(100):
            tid = 10_000 + gid * 100 + t
            depts.append({"id": tid, "parent": gid, "name": f"Team {tid}", "order": t})
            teams.append(tid)
users = []
for uid in range(1, args.people + 1):
    m = [{"dept": teams[uid % len(teams)], "title": "engineer"}]
    if uid % 10 == 0:
        m.append({"dept": teams[(uid + len(teams) // 2) % len(teams)]})
    users.append({"uid": uid, "name": f"Person {uid} Surname", "departments": m})
body = json.dumps({"departments": depts, "users": users}).encode()
t0 = time.monotonic()
version = signed("POST", "/v1/org/import", body)["version"]
t_import = time.monotonic() - t0
records = len(depts) + len(users) + sum(len(u["departments"]) for u in users)
print(f"import: {len(body) / 1e6:.1f} MB JSON, {records} records, version {version}, "
      f"{t_import * 1000:.0f} ms ({records / t_import:.0f} records/s)")
again = time.monotonic()
v2 = signed("POST", "/v1/org/import", body)["version"]
print(f"the same import again: version {v2} (unchanged: {v2 == version}), "
      f"{(time.monotonic() - again) * 1000:.0f} ms")
if v2 != version:
    sys.exit("a repeated import wrote records")

# --- a client from PROTOCOL.md (improto.py)
conn = improto.Conn(args.gate, args.uid, "org-e2e")
send, reply = conn.send, conn.reply


def frame():
    # A push that arrived while a request waited is taken first.
    if conn.pushes:
        cmd, b = conn.pushes.pop(0)
        return cmd, 0, b
    return conn.frame()


def records_of(b, off):
    n = struct.unpack(">H", b[off:off + 2])[0]
    off += 2
    out = []
    for _ in range(n):
        tag, ver, deleted = b[off], struct.unpack(">Q", b[off + 1:off + 9])[0], b[off + 9]
        off += 10
        if tag == 1:
            i, parent, order, hidden = struct.unpack(">QQIB", b[off:off + 21])
            off += 21
            key = ("d", i)
        elif tag == 2:
            (i,) = struct.unpack(">Q", b[off:off + 8])
            off += 8
            key = ("p", i)
        elif tag == 3:
            u, d, order = struct.unpack(">QQI", b[off:off + 20])
            off += 20
            key = ("m", u, d)
        else:
            sys.exit(f"unknown record tag {tag}")
        ln = struct.unpack(">H", b[off:off + 2])[0]
        off += 2 + ln
        out.append((key, ver, deleted))
    return out


held = {}
since, pages, nbytes, refused = 0, 0, 0, 0
t0 = time.monotonic()
while True:
    rid = send(0x20, struct.pack(">QH", since, 1000))
    b = reply(rid, 0x97)
    if b is None:
        refused += 1
        time.sleep(0.1)
        continue
    ver, nxt, more = struct.unpack(">QQB", b[:17])
    for key, v, deleted in records_of(b, 17):
        if deleted:
            held.pop(key, None)
        else:
            held[key] = v
    pages += 1
    nbytes += len(b)
    since = nxt
    if not more:
        break
t_sync = time.monotonic() - t0
print(f"first sync: {pages} pages, {nbytes / 1e6:.1f} MB, {len(held)} records, "
      f"{t_sync * 1000:.0f} ms ({refused} pages refused Overloaded by the message rate and asked again)")
if len(held) != records:
    sys.exit(f"synced {len(held)} records, imported {records}")

time.sleep(2)  # let the user's message-rate bucket refill
t0 = time.monotonic()
rid = send(0x21, struct.pack(">QIH", teams[0], 0, 100))
b = reply(rid, 0x98)
total = struct.unpack(">I", b[8:12])[0]
print(f"a team: {total} members, {len(records_of(b, 12))} records, "
      f"{(time.monotonic() - t0) * 1000:.2f} ms")

t0 = time.monotonic()
v3 = signed("PUT", f"/v1/org/departments/{teams[0]}",
            json.dumps({"parent": 110, "name": "Team renamed", "order": 0}).encode())["version"]
while True:
    cmd, r, b = frame()
    if cmd == 0x99 and struct.unpack(">Q", b[:8])[0] == v3:
        break
t_notice = time.monotonic() - t0
b = None
while b is None:
    rid = send(0x20, struct.pack(">QH", since, 1000))
    b = reply(rid, 0x97)
    if b is None:
        time.sleep(0.1)
got = records_of(b, 17)
print(f"a rename: OrgChanged after {t_notice * 1000:.1f} ms, then an incremental sync of "
      f"{len(got)} record(s) ({len(b)} bytes)")
if [k for k, _, _ in got] != [("d", teams[0])]:
    sys.exit(f"incremental sync brought {got}")
