"""A protocol-v1 client written from docs/PROTOCOL.md alone (nothing of the Rust SDK), for the
end-to-end scripts in this directory: framing, login with a development token, request/answer
matching by req_id."""
import hashlib
import hmac
import os
import socket
import struct
import sys
import time

TOKEN_SECRET = os.environ.get("IM_TOKEN_SECRET", "dev-secret-change-me")


def s16(s):
    """`str`: u16 length + UTF-8."""
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def token(uid, secret=TOKEN_SECRET):
    """A development SSO token (PROTOCOL.md section 11), valid for an hour."""
    payload = f"v1.{uid}.{int(time.time()) + 3600}"
    return payload + "." + hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


class Conn:
    """One logged-in connection."""

    def __init__(self, gate, uid, device="e2e", src=None):
        host, port = gate.rsplit(":", 1)
        # `src`: a source address (e.g. 127.0.0.2), for many connections past a gate's per-IP caps.
        self.sock = socket.create_connection((host, int(port)), timeout=30,
                                             source_address=(src, 0) if src else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as every real client does
        self.buf = b""
        self.req = 0
        self.pushes = []
        rid = self.send(0x01, struct.pack(">QB", uid, 1) + s16(device) + struct.pack(">Q", 0) + s16(token(uid)))
        lr = self.reply(rid, 0x81)
        if lr is None or struct.unpack(">H", lr[:2])[0] != 0:
            sys.exit(f"login of {uid} refused: {lr!r}")

    def send(self, cmd, body):
        self.req += 1
        self.sock.sendall(b"IM" + bytes([1, cmd]) + struct.pack(">II", self.req, len(body)) + body)
        return self.req

    def frame(self):
        """The next frame: (cmd, req_id, body)."""
        while True:
            if len(self.buf) >= 12:
                n = struct.unpack(">I", self.buf[8:12])[0]
                if len(self.buf) >= 12 + n:
                    cmd, rid = self.buf[3], struct.unpack(">I", self.buf[4:8])[0]
                    b, self.buf = self.buf[12:12 + n], self.buf[12 + n:]
                    return cmd, rid, b
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                sys.exit("server closed the connection")
            self.buf += chunk

    def reply(self, rid, want):
        """The answer `want` to request `rid`; None if refused Overloaded (back off, ask again);
        exits on any other refusal. Pushes meanwhile are kept in `pushes`."""
        while True:
            cmd, r, b = self.frame()
            if r == rid and cmd == want:
                return b
            if r == rid and cmd == 0xFF:
                code = struct.unpack(">H", b[:2])[0]
                if code == 21:  # Overloaded: over the user's message rate
                    return None
                sys.exit(f"error {code}: {b[4:].decode()}")
            if r == 0:
                self.pushes.append((cmd, b))
