#!/usr/bin/env python3
"""File messages end to end against a running server, from docs/PROTOCOL.md ("File messages") and
docs/API.md ("Files") alone (improto.py; nothing of the Rust SDK): tickets over the binary
protocol, uploads and downloads over HTTP, file references sent as c2c messages. Measures

  1. small images one after another on one connection: ticket + begin + one chunk + the message's
     SendAck, per image (p50/p99) and images/s;
  2. the same from THREADS users at once (the API serves them on one thread): images/s, MB/s;
  3. one large file in CHUNK_MB chunks (each chunk synced before its answer): MB/s, and meanwhile
     the latency of `GET /healthz` on the same API (what the upload costs the API's other callers);
  4. the recipient's FileDownload → FileUrl, a whole GET (checked by SHA-256) in MB/s, and ranged
     GETs of 64 KiB at random offsets (p50/p99).

Exits non-zero when anything is off.

    im-server run &
    benches/scripts/files-e2e.py --gate 127.0.0.1:7000 [--images 300] [--big-mb 64]
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import struct
import sys
import threading
import time
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import improto  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--gate", required=True)
ap.add_argument("--images", type=int, default=300)
ap.add_argument("--image-kb", type=int, default=60)
ap.add_argument("--threads", type=int, default=4)
ap.add_argument("--big-mb", type=int, default=64)
ap.add_argument("--chunk-mb", type=int, default=1)
args = ap.parse_args()


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))]


class Http:
    """One kept-alive HTTP connection to the host of the first URL it is given."""

    def __init__(self):
        self.c = None

    def req(self, method, url, body=b"", headers=None):
        u = urlsplit(url)
        if self.c is None:
            self.c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        target = u.path + ("?" + u.query if u.query else "")
        self.c.request(method, target, body=body, headers=headers or {})
        r = self.c.getresponse()
        return r.status, r.getheaders(), r.read()


def upload(conn, web, kind, mime, data, chunk):
    """Ticket, begin, chunks: returns the file reference body to send."""
    sha = hashlib.sha256(data).digest()
    rid = conn.send(0x24, struct.pack(">BQ", kind, len(data)) + sha + improto.s16(mime))
    b = conn.reply(rid, 0x9A)
    if b is None:
        sys.exit("FileUpload refused Overloaded")
    n = struct.unpack(">H", b[:2])[0]
    url = b[2:2 + n].decode()
    m = struct.unpack(">H", b[2 + n:4 + n])[0]
    ticket = b[4 + n:4 + n + m].decode()
    auth = {"Authorization": f"Ticket {ticket}"}
    st, _, body = web.req("POST", url, b"", auth)
    if st != 201:
        sys.exit(f"begin: {st} {body[:200]!r}")
    up = f"{url}/{json.loads(body)['upload']}"
    off = 0
    while True:
        piece = data[off:off + chunk]
        st, hdrs, body = web.req("PATCH", up, piece, {**auth, "Upload-Offset": str(off)})
        if st == 201:
            key = bytes.fromhex(json.loads(body)["key"])
            break
        if st != 204:
            sys.exit(f"chunk at {off}: {st} {body[:200]!r}")
        off = int(dict((k.lower(), v) for k, v in hdrs)["upload-offset"])
    # 0xFF kind sha256 size key mime name width height duration thumb (PROTOCOL.md)
    return (bytes([0xFF, kind]) + sha + struct.pack(">Q", len(data)) + key + improto.s16(mime)
            + improto.s16("f") + struct.pack(">IIII", 0, 0, 0, 0))


def send_c2c(conn, to, cmid, body):
    rid = conn.send(0x10, struct.pack(">QQI", cmid, to, len(body)) + body)
    a = conn.reply(rid, 0x90)
    if a is None or struct.unpack(">H", a[:2])[0] != 0:
        sys.exit(f"SendC2c refused: {a!r}")


def images(uid, to, n, out, times):
    conn, web = improto.Conn(args.gate, uid), Http()
    for i in range(n):
        data = os.urandom(args.image_kb * 1024)
        t0 = time.monotonic()
        body = upload(conn, web, 1, "image/jpeg", data, 1 << 20)
        send_c2c(conn, to, i + 1, body)
        times.append(time.monotonic() - t0)
        out.append(len(data))


# 1. one after another
lat, sizes = [], []
t0 = time.monotonic()
images(1, 2, args.images, sizes, lat)
el = time.monotonic() - t0
print(f"images, 1 connection: {args.images} × {args.image_kb} KiB in {el:.2f} s = "
      f"{args.images / el:.0f} images/s; per image (ticket + upload + SendAck) "
      f"p50 {pct(lat, .5) * 1000:.2f} ms, p99 {pct(lat, .99) * 1000:.2f} ms")

# 2. THREADS users at once
lat2, sizes2 = [], []
ths = [threading.Thread(target=images, args=(100 + t, 2, args.images, sizes2, lat2))
       for t in range(args.threads)]
t0 = time.monotonic()
for t in ths:
    t.start()
for t in ths:
    t.join()
el = time.monotonic() - t0
if len(sizes2) != args.threads * args.images:
    sys.exit("a concurrent uploader failed")
print(f"images, {args.threads} connections at once: {len(sizes2)} in {el:.2f} s = "
      f"{len(sizes2) / el:.0f} images/s, {sum(sizes2) / el / 1e6:.1f} MB/s; "
      f"p50 {pct(lat2, .5) * 1000:.2f} ms, p99 {pct(lat2, .99) * 1000:.2f} ms")

# 3. one large file
a = improto.Conn(args.gate, 3, "big")
b = improto.Conn(args.gate, 4, "big")
big = os.urandom(args.big_mb << 20)
web = Http()
probe, probing = [], [True]
api_base = None


def probe_api():
    h = Http()
    while probing[0]:
        if api_base:
            t = time.monotonic()
            st, _, _ = h.req("GET", api_base + "/healthz")
            probe.append(time.monotonic() - t)
            if st != 200:
                sys.exit(f"healthz: {st}")
        time.sleep(0.005)


# The API's address: from a ticket (the file endpoints are on its listener).
rid = a.send(0x24, struct.pack(">BQ", 4, 1) + bytes(32) + improto.s16("text/plain"))
tb = a.reply(rid, 0x9A)
api_base = tb[2:2 + struct.unpack(">H", tb[:2])[0]].decode().split("/v1/")[0]
pt = threading.Thread(target=probe_api)
pt.start()
t0 = time.monotonic()
body = upload(a, web, 4, "application/octet-stream", big, args.chunk_mb << 20)
el = time.monotonic() - t0
probing[0] = False
pt.join()
print(f"one {args.big_mb} MiB file in {args.chunk_mb} MiB chunks: {el:.2f} s = "
      f"{args.big_mb / el:.0f} MiB/s (hash checked at the end); GET /healthz meanwhile: "
      f"{len(probe)} calls, p50 {pct(probe, .5) * 1000:.2f} ms, max {max(probe) * 1000:.1f} ms")
send_c2c(a, 4, 1, body)

# 4. the recipient downloads it
seq = None
deadline = time.monotonic() + 30
while seq is None:
    if time.monotonic() > deadline:
        sys.exit("the file message was not delivered")
    for cmd, m in b.pushes:
        if cmd == 0x91 and m[-(len(body)):] == body:
            seq = struct.unpack(">Q", m[:8])[0]
    b.pushes.clear()
    if seq is None:
        cmd, r, m = b.frame()
        b.pushes.append((cmd, m))
t0 = time.monotonic()
rid = b.send(0x25, struct.pack(">Q", seq))
u = b.reply(rid, 0x9B)
n = struct.unpack(">H", u[:2])[0]
url = u[2:2 + n].decode()
t_url = time.monotonic() - t0
web2 = Http()
t0 = time.monotonic()
st, _, got = web2.req("GET", url)
el = time.monotonic() - t0
if st != 200 or hashlib.sha256(got).digest() != hashlib.sha256(big).digest():
    sys.exit(f"download: {st}, {len(got)} bytes, not the file")
print(f"download: FileUrl in {t_url * 1000:.2f} ms; GET of {args.big_mb} MiB in {el:.2f} s = "
      f"{args.big_mb / el:.0f} MiB/s (SHA-256 matches)")
rl = []
for _ in range(200):
    o = random.randrange(0, len(big) - 65536)
    t0 = time.monotonic()
    st, _, got = web2.req("GET", url, headers={"Range": f"bytes={o}-{o + 65535}"})
    rl.append(time.monotonic() - t0)
    if st != 206 or got != big[o:o + 65536]:
        sys.exit(f"range at {o}: {st}")
print(f"ranged GETs of 64 KiB: p50 {pct(rl, .5) * 1000:.2f} ms, p99 {pct(rl, .99) * 1000:.2f} ms")
