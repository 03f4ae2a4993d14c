"""Two users chat through the generated Python bindings of im-client-ffi against a real server.

Run by client-ffi/tests/python.rs: python3 chat.py <module dir> <json {"gate": ..., "tokens": {uid: token}}>.
Every wait has a deadline; any failed check exits non-zero with the events seen.
"""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])
import im_client_ffi as im  # noqa: E402

CONF = json.loads(sys.argv[2])
DEADLINE = time.monotonic() + 90


def fail(msg, *peers):
    for p in peers:
        print(f"--- events of {p.name}:", file=sys.stderr)
        for e in p.log:
            print(f"    {e}", file=sys.stderr)
    raise SystemExit(f"chat.py: FAILED: {msg}")


class Peer:
    def __init__(self, name, uid, device=im.DeviceKind.PHONE, device_id=None):
        self.name, self.uid, self.log = name, uid, []
        self.seen = 0  # events before this index were looked at by `wait`
        self.s = im.ImSession(im.SessionConfig(
            uid=uid, token=CONF["tokens"][str(uid)], device=device,
            device_id=device_id or f"py-{name}", last_seq=0,
            gates=[im.GateAddr(id=1, addr=CONF["gate"])], iplist_json=None,
            tls_ca_pem=None, tls_server_name=None, ack_timeout_ms=None))
        self.s.start()

    def pump(self, ms):
        """Collects events for `ms` milliseconds."""
        end = time.monotonic() + ms / 1000
        while time.monotonic() < end:
            e = self.s.next_event(50)
            if e is not None:
                self.log.append(e)

    def wait(self, pred, what, *others, timeout=20):
        """Waits for an event matching `pred` (looking at events not yet seen); returns it.
        The sessions of `others` are driven meanwhile (a session only moves in next_event)."""
        end = min(time.monotonic() + timeout, DEADLINE)
        while True:
            while self.seen < len(self.log):
                self.seen += 1
                if pred(self.log[self.seen - 1]):
                    return self.log[self.seen - 1]
            if time.monotonic() > end:
                fail(f"{self.name}: no {what}", self, *others)
            e = self.s.next_event(50)
            if e is not None:
                self.log.append(e)
            for o in others:
                e = o.s.next_event(10)
                if e is not None:
                    o.log.append(e)

    def messages(self):
        return [e.message for e in self.log if e.is_message()]


def from_(peer, msgs):
    return [m for m in msgs if m.sender == peer.uid]


alice, bob = Peer("alice", 1), Peer("bob", 2)
alice.wait(lambda e: e.is_logged_in(), "login", alice)
bob.wait(lambda e: e.is_logged_in(), "login", bob)

# c2c both ways: each message arrives once, in order.
sent = [alice.s.send_c2c(2, None, f"a{i}".encode()) for i in range(5)]
for cmid in sent:
    alice.wait(lambda e, c=cmid: e.is_send_acked() and e.client_msg_id == c, f"ack of {cmid}", alice)
for i in range(5):
    bob.wait(lambda e, i=i: e.is_message() and e.message.body == f"a{i}".encode(), f"a{i}", bob)
for i in range(3):
    bob.s.send_c2c(1, None, f"b{i}".encode())
for i in range(3):
    alice.wait(lambda e, i=i: e.is_message() and e.message.body == f"b{i}".encode(), f"b{i}", alice)
bob.pump(300)
got = [m.body for m in from_(alice, bob.messages())]
if got != [f"a{i}".encode() for i in range(5)]:
    fail(f"bob got {got}", bob)
got = [m.body for m in from_(bob, alice.messages())]
if got != [f"b{i}".encode() for i in range(3)]:
    fail(f"alice got {got}", alice)
for p in (alice, bob):
    seqs = [m.seq for m in p.messages()]
    if seqs != sorted(set(seqs)):
        fail(f"{p.name}'s timeline is not in order once: {seqs}", p)

# A send whose connection drops before its ack is read: the session reconnects, logs in again
# and sends it again with the same client_msg_id; the server answers the one message.
cmid = alice.s.send_c2c(2, None, b"r1")
if alice.s.unacked() != [cmid]:
    fail(f"unacked {alice.s.unacked()} after sending {cmid}", alice)
mark = len(alice.log)
alice.s.drop_connection()
alice.wait(lambda e: e.is_reconnecting(), "reconnecting", alice)
alice.wait(lambda e: e.is_logged_in(), "login after the drop", alice)
ack = alice.wait(lambda e: e.is_send_acked(), "ack after the reconnect", alice)
if ack.client_msg_id != cmid:
    fail(f"the resend used id {ack.client_msg_id}, not {cmid}", alice)
if not any(e.is_disconnected() for e in alice.log[mark:]):
    fail("no disconnected event", alice)
if alice.s.unacked():
    fail(f"still unacked: {alice.s.unacked()}", alice)
bob.wait(lambda e: e.is_message() and e.message.body == b"r1", "r1", bob)
# Sending it again by hand with the same id: the same message, no copy for bob.
alice.s.send_c2c(2, cmid, b"r1")
again = alice.wait(lambda e: e.is_send_acked() and e.client_msg_id == cmid, "ack of the retry", alice)
if again.msg_id != ack.msg_id or again.seq != ack.seq:
    fail(f"the retry made another message: {again} vs {ack}", alice)
bob.pump(1000)
r1 = [m for m in bob.messages() if m.body == b"r1"]
if len(r1) != 1 or r1[0].client_msg_id != cmid:
    fail(f"bob got r1 {len(r1)} times", bob)

# A second phone of bob's kicks the first one out: it stops and does not reconnect. The new one
# starts from seq 0 and syncs the whole timeline, in order, once.
bob2 = Peer("bob2", 2, device_id="py-bob-2")
k = bob.wait(lambda e: e.is_kicked(), "kickout", bob, bob2)
if k.reason != 1 or k.will_reconnect:
    fail(f"kickout {k}", bob)
bob2.wait(lambda e: e.is_synced(), "sync of the new phone", bob2)
mark = len(bob.log)
bob.pump(2000)
bob2.pump(200)
if any(e.is_connecting() or e.is_reconnecting() for e in bob.log[mark:]):
    fail("the kicked session reconnects", bob)
try:
    bob.s.send_c2c(1, None, b"nope")
    fail("a stopped session accepted a send", bob)
except im.ImError:
    pass
mine = [m.body for m in from_(alice, bob2.messages())]
if mine != [f"a{i}".encode() for i in range(5)] + [b"r1"]:
    fail(f"bob2 synced {mine}", bob2)
seqs = [m.seq for m in bob2.messages()]
if seqs != sorted(set(seqs)) or bob2.s.last_seq() != seqs[-1]:
    fail(f"bob2 seqs {seqs}, last {bob2.s.last_seq()}", bob2)

alice.s.close(5000)
alice.pump(100)
if not any(e.is_logged_out() for e in alice.log):
    fail("no logged-out event", alice)
bob2.s.close(5000)
print(f"chat.py: ok ({len(alice.log)} + {len(bob.log)} + {len(bob2.log)} events)")
