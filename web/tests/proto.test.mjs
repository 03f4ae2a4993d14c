// Unit tests of the protocol v1 codec (web/proto.js) against the worked examples of
// docs/PROTOCOL.md section 12 and round trips of every command. Run: node --test web/tests/
import './node-globals.mjs';
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  CMD,
  FILE_KIND,
  decodeFileRef,
  encodeFileRef,
  CMD_NAME,
  CONV,
  DEVICE,
  ERR,
  FrameReader,
  GROUP_EVENT,
  HEADER_LEN,
  MAX_MENTIONS,
  ORG_TAG,
  ProtoError,
  decode,
  decodeBody,
  decodeGroupEvent,
  decodeHeader,
  decodeMarker,
  decodeOrgRecord,
  encode,
  encodeGroupEvent,
  encodeMarker,
  encodeMessage,
  encodeOrgRecord,
  errName,
  hex,
  isRetryable,
  msgIdTimeMs,
  text,
  toU64,
  utf8,
} from '../static/proto.js';
import { DEV_SECRET, mintDevToken } from '../static/token.js';

/** Bytes of a hex dump in the document's format (`0000: 49 4d …` lines). */
function fromDump(dump) {
  const bytes = [];
  for (const line of dump.trim().split('\n')) {
    const [, rest] = line.split(':');
    for (const h of rest.trim().split(/\s+/)) bytes.push(parseInt(h, 16));
  }
  return Uint8Array.from(bytes);
}

const DOC_TOKEN =
  'v1.42.1767225600.af4d0fba8583e1a637dc219746301b3dc1d9fb7213f27bd259638dd614e4475f';

const LOGIN_DUMP = `
0000: 49 4d 01 01 00 00 00 01 00 00 00 6b 00 00 00 00
0010: 00 00 00 2a 01 00 05 69 6f 73 2d 31 00 00 00 00
0020: 00 00 00 00 00 51 76 31 2e 34 32 2e 31 37 36 37
0030: 32 32 35 36 30 30 2e 61 66 34 64 30 66 62 61 38
0040: 35 38 33 65 31 61 36 33 37 64 63 32 31 39 37 34
0050: 36 33 30 31 62 33 64 63 31 64 39 66 62 37 32 31
0060: 33 66 32 37 62 64 32 35 39 36 33 38 64 64 36 31
0070: 34 65 34 34 37 35 66
`;

const SEND_DUMP = `
0000: 49 4d 01 10 00 00 00 02 00 00 00 16 00 00 00 00
0010: 00 00 00 01 00 00 00 00 00 00 00 2b 00 00 00 02
0020: 68 69
`;

test('section 12: Login encodes byte for byte', () => {
  const want = fromDump(LOGIN_DUMP);
  assert.equal(want.length, 119);
  const got = encode(
    {
      type: 'Login',
      uid: 42n,
      deviceType: DEVICE.Phone,
      deviceId: 'ios-1',
      lastSeq: 0n,
      token: DOC_TOKEN,
    },
    1,
  );
  assert.equal(hex(got), hex(want));
});

test('section 12: Login decodes to its fields', () => {
  const c = decode(fromDump(LOGIN_DUMP));
  assert.deepEqual(c, {
    type: 'Login',
    reqId: 1,
    uid: 42n,
    deviceType: 1,
    deviceId: 'ios-1',
    lastSeq: 0n,
    token: DOC_TOKEN,
  });
  const h = decodeHeader(fromDump(LOGIN_DUMP));
  assert.deepEqual(h, { cmd: CMD.Login, reqId: 1, bodyLen: 107 });
});

test('section 12: SendC2c encodes byte for byte, numbers or BigInts', () => {
  const want = fromDump(SEND_DUMP);
  assert.equal(want.length, 34);
  const a = encode({ type: 'SendC2c', clientMsgId: 1n, to: 43n, body: utf8('hi') }, 2);
  const b = encode({ type: 'SendC2c', clientMsgId: 1, to: 43, body: 'hi' }, 2);
  assert.equal(hex(a), hex(want));
  assert.equal(hex(b), hex(want));
  const c = decode(want);
  assert.equal(c.type, 'SendC2c');
  assert.equal(c.reqId, 2);
  assert.equal(c.clientMsgId, 1n);
  assert.equal(c.to, 43n);
  assert.equal(text(c.body), 'hi');
});

test('section 12: SendC2g with mentions encodes byte for byte', () => {
  const want = fromDump(`
0000: 49 4d 01 13 00 00 00 03 00 00 00 28 00 00 00 00
0010: 00 00 00 05 00 00 00 00 00 00 00 07 00 00 00 02
0020: 68 69 00 02 00 00 00 00 00 00 00 00 00 00 00 00
0030: 00 00 00 0c`);
  assert.equal(want.length, 52);
  const a = encode({ type: 'SendC2g', clientMsgId: 5n, group: 7n, body: 'hi', mentions: [0n, 12n] }, 3);
  assert.equal(hex(a), hex(want));
  const c = decode(want);
  assert.equal(c.type, 'SendC2g');
  assert.deepEqual([c.clientMsgId, c.group, c.mentions], [5n, 7n, [0n, 12n]]);
});

test('section 11: the development token of the example', async () => {
  assert.equal(await mintDevToken('dev-secret', 42, 1767225600), DOC_TOKEN);
  const t = await mintDevToken(DEV_SECRET, 7n);
  assert.match(t, /^v1\.7\.\d+\.[0-9a-f]{64}$/);
});

const msg = (over = {}) => ({
  seq: 1001n,
  prevSeq: 1000n,
  msgId: (123456789n << 22n) | 77n,
  conv: CONV.C2C,
  from: 1n,
  to: 2n,
  clientMsgId: 0xfedcba9876543210n,
  serverTimeMs: 1_767_225_600_000n,
  body: utf8('héllo ✓'),
  ...over,
});

/** One organisation-tree record of each kind (and a tombstone), with non-trivial values. */
const ORG_RECORDS = [
  { kind: 'dept', version: 1n, deleted: false, id: 7n, parent: 0n, order: 3, hidden: true, name: 'Eng ✓' },
  { kind: 'person', version: 2n, deleted: false, uid: 2n ** 64n - 1n, name: '名字' },
  { kind: 'member', version: 2n ** 64n - 1n, deleted: false, uid: 9n, dept: 7n, order: 0xffffffff, title: 'lead' },
  { kind: 'member', version: 12n, deleted: true, uid: 9n, dept: 8n, order: 0, title: '' },
];

/** One sample of every command, with non-trivial values. */
const SAMPLES = [
  { type: 'Login', uid: 2n ** 64n - 1n, deviceType: DEVICE.Web, deviceId: 'web-x', lastSeq: 9n, token: 't' },
  { type: 'Logout' },
  { type: 'Heartbeat' },
  { type: 'SendC2c', clientMsgId: 5n, to: 6n, body: new Uint8Array([0, 1, 255]) },
  { type: 'DeliverAck', seq: 77n },
  { type: 'SyncRequest', afterSeq: 12n, limit: 200 },
  { type: 'SendC2g', clientMsgId: 1n, group: 99n, body: utf8('to the group') },
  { type: 'Recall', clientMsgId: 3n, conv: CONV.C2C, peer: 4n, msgId: 5n },
  { type: 'ReadReport', clientMsgId: 3n, conv: CONV.C2G, peer: 4n, msgId: 5n },
  { type: 'Report', clientMsgId: 8n, topic: 'orders', body: utf8('{}') },
  { type: 'GroupCreate', name: 'team ☕', members: [2n, 3n], clientId: 9n },
  { type: 'GroupAdd', group: 10n, members: [4n] },
  { type: 'GroupRemove', group: 10n, members: [] },
  { type: 'GroupLeave', group: 10n },
  { type: 'GroupInfo', group: 10n },
  { type: 'MyGroups' },
  { type: 'SetMute', peer: 0n, muted: true },
  { type: 'RegisterPush', provider: 2, token: 'fcm-token' },
  { type: 'GroupUpdate', group: 10n, name: 'n', announcement: 'a' },
  { type: 'OrgSync', since: 0x0102030405060708n, limit: 1000 },
  { type: 'OrgDept', dept: 0n, offset: 70000, limit: 100 },
  { type: 'OrgUser', uid: 102n },
  { type: 'OrgSearch', query: 'Stör', limit: 20 },
  { type: 'LoginResult', code: ERR.Ok, serverTimeMs: 1n, maxSeq: 2n, heartbeatSecs: 30, message: '' },
  { type: 'LogoutAck' },
  { type: 'HeartbeatAck', serverTimeMs: 1_767_225_600_123n },
  { type: 'Kickout', reason: 1, message: 'another web device logged in' },
  { type: 'SendAck', code: ERR.Ok, clientMsgId: 5n, msgId: 6n, seq: 7n, serverTimeMs: 8n, prevSeq: 4n },
  { type: 'Deliver', message: msg() },
  { type: 'SyncPage', maxSeq: 2000n, hasMore: true, messages: [msg(), msg({ seq: 1002n, prevSeq: 1001n, body: new Uint8Array(0) })] },
  { type: 'SyncPage', maxSeq: 0n, hasMore: false, messages: [] },
  { type: 'Delivered', msgId: 6n, recipient: 2n },
  { type: 'OpResult', code: ERR.NotMember, id: 10n, message: 'not a member' },
  {
    type: 'GroupInfoReply',
    group: 10n,
    name: 'team',
    creator: 1n,
    owner: 1n,
    announcement: '',
    createdMs: 5n,
    members: [
      { uid: 1n, role: 2 },
      { uid: 2n, role: 0 },
    ],
  },
  { type: 'GroupList', groups: [{ group: 10n, name: 'team' }, { group: 11n, name: '' }] },
  { type: 'OrgPage', version: 12n, next: 3n, more: true, records: ORG_RECORDS },
  { type: 'OrgPage', version: 0n, next: 0n, more: false, records: [] },
  { type: 'OrgReply', version: 12n, total: 70000, records: ORG_RECORDS.slice(0, 3) },
  { type: 'OrgChanged', version: 13n },
  { type: 'FileUpload', kind: 1, size: 1234n, sha256: new Uint8Array(32).fill(0xab), mime: 'image/png' },
  { type: 'FileDownload', seq: 77n },
  { type: 'FileTicket', url: 'http://127.0.0.1:8080/v1/files/uploads', ticket: '5.ab.1.2.cd', expiresMs: 99n },
  { type: 'FileUrl', url: 'http://127.0.0.1:8080/v1/files/ab?u=5', expiresMs: 99n },
  { type: 'Typing', conv: CONV.C2G, peer: 7n, state: 1 },
  { type: 'PresenceSubscribe', users: [2n, 3n] },
  { type: 'PresencePrivacy', hidden: true },
  { type: 'TypingNotice', conv: CONV.C2C, peer: 5n, from: 5n, state: 0, ttlMs: 6000 },
  {
    type: 'PresenceNotice',
    entries: [
      { uid: 2n, online: true, lastSeenMs: 0n },
      { uid: 3n, online: false, lastSeenMs: 1_700_000_000_000n },
    ],
  },
  { type: 'GroupSync', group: 9n, afterSeq: 3n, limit: 50 },
  { type: 'GroupRead', group: 9n, seq: 4n },
  { type: 'GroupMembers', group: 9n, after: 7n, limit: 0 },
  { type: 'GroupPosting', group: 9n, ownerOnly: true },
  { type: 'GroupRole', group: 9n, uid: 7n, role: 1 },
  { type: 'GroupFileDownload', group: 9n, seq: 5n },
  { type: 'GroupDeliver', message: msg({ seq: 4n, prevSeq: 3n, conv: CONV.C2G }) },
  { type: 'GroupSyncPage', group: 9n, head: 4n, hasMore: false, messages: [msg()] },
  { type: 'GroupHeads', heads: [{ group: 9n, head: 5n, read: 3n }] },
  {
    type: 'GroupMembersPage',
    group: 9n,
    total: 3,
    more: true,
    members: [
      { uid: 5n, role: 2 },
      { uid: 7n, role: 0 },
    ],
  },
  { type: 'Error', code: ERR.BadToken, message: 'bad token' },
];

test('every command round-trips through encode/decode', () => {
  const seen = new Set();
  for (const [i, c] of SAMPLES.entries()) {
    const reqId = i * 1000 + 1;
    const bytes = encode(c, reqId);
    assert.equal(bytes[3], CMD[c.type], c.type);
    const h = decodeHeader(bytes);
    assert.equal(h.bodyLen, bytes.length - HEADER_LEN, c.type);
    assert.deepEqual(decode(bytes), { ...c, reqId }, c.type);
    seen.add(c.type);
  }
  assert.deepEqual([...seen].sort(), Object.keys(CMD).sort(), 'a sample of every command');
});

test('the typing and presence worked examples (section 12) are the documented bytes', () => {
  const hex = (b) => [...b].map((x) => x.toString(16).padStart(2, '0')).join(' ');
  assert.equal(
    hex(encode({ type: 'Typing', conv: CONV.C2G, peer: 7n, state: 1 }, 5)),
    '49 4d 01 26 00 00 00 05 00 00 00 0a 02 00 00 00 00 00 00 00 07 01',
  );
  const notice = encode(
    {
      type: 'PresenceNotice',
      entries: [
        { uid: 2n, online: true, lastSeenMs: 0n },
        { uid: 3n, online: false, lastSeenMs: 1_700_000_000_000n },
      ],
    },
    0,
  );
  assert.equal(
    hex(notice),
    '49 4d 01 9d 00 00 00 00 00 00 00 24 00 02 00 00 00 00 00 00 00 02 01 00 00 00 00 00 00 00 00 00 ' +
      '00 00 00 00 00 00 03 00 00 00 01 8b cf e5 68 00',
  );
});

test('body sizes match the document', () => {
  const len = (c) => encode(c, 1).length - HEADER_LEN;
  assert.equal(len({ type: 'SendAck', code: 0, clientMsgId: 0, msgId: 0, seq: 0, serverTimeMs: 0, prevSeq: 0 }), 42);
  assert.equal(len({ type: 'Deliver', message: msg({ body: new Uint8Array(0) }) }), 61);
  assert.equal(len({ type: 'SendC2c', clientMsgId: 0, to: 1, body: '' }), 20);
  assert.equal(len({ type: 'Delivered', msgId: 1, recipient: 1 }), 16);
  assert.equal(len({ type: 'SyncRequest', afterSeq: 0, limit: 1 }), 10);
  assert.equal(len({ type: 'Heartbeat' }), 0);
});

test('Message field offsets (section 5)', () => {
  const b = encodeMessage(msg({ body: utf8('xy') }));
  const v = new DataView(b.buffer);
  assert.equal(v.getBigUint64(0), 1001n); // seq
  assert.equal(v.getBigUint64(8), 1000n); // prev_seq
  assert.equal(b[24], CONV.C2C); // conv
  assert.equal(v.getBigUint64(25), 1n); // from
  assert.equal(v.getBigUint64(33), 2n); // to
  assert.equal(v.getBigUint64(41), 0xfedcba9876543210n); // client_msg_id
  assert.equal(v.getUint32(57), 2); // body length
  assert.equal(text(b.subarray(61)), 'xy');
});

test('decoders ignore trailing bytes (section 13)', () => {
  const c = { type: 'SendAck', code: 0, clientMsgId: 5n, msgId: 6n, seq: 7n, serverTimeMs: 8n, prevSeq: 4n };
  const frame = encode(c, 3);
  const body = new Uint8Array([...frame.subarray(HEADER_LEN), 1, 2, 3]);
  assert.deepEqual(decodeBody(CMD.SendAck, body), c);
});

test('truncated bodies throw ProtoError, never something else', () => {
  for (const c of SAMPLES) {
    const full = encode(c, 1).subarray(HEADER_LEN);
    for (let n = 0; n < full.length; n++) {
      // Every strict prefix of a body with fields is invalid, except where what is cut off
      // is an empty tail (no such layout: every layout ends with a fixed field or a length).
      assert.throws(() => decodeBody(CMD[c.type], full.slice(0, n)), ProtoError, `${c.type} cut at ${n}`);
    }
  }
});

test('bad UTF-8 in a str field is refused', () => {
  // Error { code: 1, message: <0xff> }
  const body = new Uint8Array([0, 1, 0, 1, 0xff]);
  assert.throws(() => decodeBody(CMD.Error, body), /UTF-8/);
});

test('unknown error codes decode as numbers', () => {
  const c = decodeBody(CMD.Error, new Uint8Array([0x12, 0x34, 0, 0]));
  assert.equal(c.code, 0x1234);
  assert.equal(errName(0x1234), 'code 4660');
  assert.equal(errName(ERR.NotMember), 'NotMember');
  assert.ok(isRetryable(ERR.Unavailable) && !isRetryable(ERR.BadToken));
});

test('headers: bad magic, bad version, unknown command', () => {
  const good = encode({ type: 'Heartbeat' }, 1);
  const bad = (i, v) => {
    const b = good.slice();
    b[i] = v;
    return b;
  };
  assert.throws(() => decodeHeader(bad(0, 0x48)), /magic/);
  assert.throws(() => decodeHeader(bad(2, 2)), /version 2/);
  assert.throws(() => decode(bad(3, 0x7f)), /unknown command/);
  assert.throws(() => decodeHeader(good.subarray(0, 11)), /truncated/);
  assert.throws(() => decode(new Uint8Array([...good, 0])), /does not match/);
  assert.equal(CMD_NAME[0x92], 'SyncPage');
});

test('encoders refuse out-of-range values', () => {
  assert.throws(() => encode({ type: 'DeliverAck', seq: -1n }), ProtoError);
  assert.throws(() => encode({ type: 'DeliverAck', seq: 2n ** 64n }), ProtoError);
  assert.throws(() => encode({ type: 'DeliverAck', seq: 1.5 }), ProtoError);
  assert.throws(() => encode({ type: 'DeliverAck' }), /missing field seq/);
  assert.throws(() => encode({ type: 'SyncRequest', afterSeq: 0, limit: 70000 }), ProtoError);
  assert.throws(() => encode({ type: 'Nope' }), /unknown command/);
  assert.throws(() => encode({ type: 'Heartbeat' }, -1), ProtoError);
  assert.throws(() => encode({ type: 'Kickout', reason: 1, message: 'x'.repeat(70000) }), /65535/);
  assert.equal(toU64('18446744073709551615'), 2n ** 64n - 1n);
});

test('FrameReader splits a stream at any chunk boundary', () => {
  const frames = SAMPLES.map((c, i) => encode(c, i + 1));
  const stream = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
  let off = 0;
  for (const f of frames) {
    stream.set(f, off);
    off += f.length;
  }
  for (const chunk of [1, 5, 12, 13, 64, stream.length]) {
    const r = new FrameReader();
    const got = [];
    for (let i = 0; i < stream.length; i += chunk) {
      for (const f of r.push(stream.subarray(i, i + chunk))) {
        got.push({ ...decodeBody(f.cmd, f.body), reqId: f.reqId });
      }
    }
    assert.equal(r.pending(), 0);
    assert.deepEqual(got, SAMPLES.map((c, i) => ({ ...c, reqId: i + 1 })), `chunk ${chunk}`);
  }
});

test('FrameReader refuses oversized bodies and corrupt headers', () => {
  const r = new FrameReader(16);
  const big = encode({ type: 'Kickout', reason: 1, message: 'x'.repeat(20) }, 0);
  assert.throws(() => r.push(big), /above 16/);
  assert.throws(() => new FrameReader().push(new Uint8Array(12)), /magic/);
});

test('marker and group event bodies', () => {
  const m = { conv: CONV.C2G, msgId: 0x0102030405060708n };
  const b = encodeMarker(m);
  assert.equal(hex(b), '02 01 02 03 04 05 06 07 08');
  assert.deepEqual(decodeMarker(b), m);
  const e = { kind: GROUP_EVENT.Created, users: [1001n, 1002n] };
  const eb = encodeGroupEvent(e);
  assert.equal(eb.length, 3 + 16);
  assert.deepEqual(decodeGroupEvent(eb), e);
});

test('msg id timestamps (section 10)', () => {
  assert.equal(msgIdTimeMs(0n), 1_704_067_200_000);
  assert.equal(msgIdTimeMs((1000n << 22n) | 0x3fffffn), 1_704_067_201_000);
});

/** Bytes of a hex string: spaces and `|` separators are ignored. */
const bytesOf = (h) => Uint8Array.from(h.replace(/[\s|]+/g, '').match(/../g), (x) => parseInt(x, 16));

test('OrgSync encodes byte for byte', () => {
  const want = bytesOf(`
    49 4d 01 20 | 00 00 00 07 | 00 00 00 0a
    00 00 00 00 00 00 00 2a | 03 e8`);
  assert.equal(hex(encode({ type: 'OrgSync', since: 42n, limit: 1000 }, 7)), hex(want));
  assert.equal(hex(encode({ type: 'OrgSync', since: 42, limit: 1000 }, 7)), hex(want), 'a Number since');
  assert.deepEqual(decode(want), { type: 'OrgSync', reqId: 7, since: 42n, limit: 1000 });
  const len = (c) => encode(c, 1).length - HEADER_LEN;
  assert.equal(len({ type: 'OrgDept', dept: 1, offset: 0, limit: 1 }), 14);
  assert.equal(len({ type: 'OrgUser', uid: 1 }), 8);
  assert.equal(len({ type: 'OrgSearch', query: 'ab', limit: 1 }), 6);
  assert.equal(len({ type: 'OrgChanged', version: 1 }), 8);
});

test('a hand-built OrgPage decodes: a department, a person, a membership tombstone', () => {
  const frame = bytesOf(`
    49 4d 01 97 | 00 00 00 05 | 00 00 00 7c
    00 00 00 00 00 00 00 0b | 00 00 00 00 00 00 00 03 | 01 | 00 03
    01 | 00 00 00 00 00 00 00 01 | 00 | 00 00 00 00 00 00 00 01 | 00 00 00 00 00 00 00 00
       | 00 00 00 00 | 00 | 00 07 43 6f 6d 70 61 6e 79
    02 | 00 00 00 00 00 00 00 02 | 00 | 00 00 00 00 00 00 00 65 | 00 09 41 6c 69 63 65 20 e2 9c 93
    03 | 00 00 00 00 00 00 00 03 | 01 | 00 00 00 00 00 00 00 65 | 00 00 00 00 00 00 00 01
       | 00 00 00 02 | 00 04 6c 65 61 64`);
  assert.equal(frame.length, HEADER_LEN + 0x7c);
  const page = decode(frame);
  assert.deepEqual(page, {
    type: 'OrgPage',
    reqId: 5,
    version: 11n,
    next: 3n,
    more: true,
    records: [
      { kind: 'dept', version: 1n, deleted: false, id: 1n, parent: 0n, order: 0, hidden: false, name: 'Company' },
      { kind: 'person', version: 2n, deleted: false, uid: 101n, name: 'Alice ✓' },
      { kind: 'member', version: 3n, deleted: true, uid: 101n, dept: 1n, order: 2, title: 'lead' },
    ],
  });
  // And back to the same bytes.
  assert.equal(hex(encode(page, 5)), hex(frame));
});

test('every org record kind round-trips; tags, sizes and refusals', () => {
  for (const r of ORG_RECORDS) {
    const b = encodeOrgRecord(r);
    assert.equal(b[0], ORG_TAG[r.kind]);
    assert.equal(b[9], r.deleted ? 1 : 0, 'deleted after tag and version');
    assert.deepEqual(decodeOrgRecord(b), r);
    for (let n = 0; n < b.length; n++) assert.throws(() => decodeOrgRecord(b.slice(0, n)), ProtoError);
  }
  // Sizes with an empty string (shared/src/org.rs encoded_len): 10 + 21 / 8 / 20, + 2 for the length.
  assert.equal(encodeOrgRecord({ ...ORG_RECORDS[0], name: '' }).length, 33);
  assert.equal(encodeOrgRecord({ ...ORG_RECORDS[1], name: '' }).length, 20);
  assert.equal(encodeOrgRecord({ ...ORG_RECORDS[2], title: '' }).length, 32);
  const bad = encodeOrgRecord(ORG_RECORDS[0]);
  bad[0] = 9;
  assert.throws(() => decodeOrgRecord(bad), /unknown org record tag 9/);
  assert.throws(() => encodeOrgRecord({ ...ORG_RECORDS[0], kind: 'team' }), /unknown org record kind/);
  assert.throws(() => encodeOrgRecord({ kind: 'person', version: 1n, deleted: false, uid: 1n }), /missing field name/);
  // A count larger than the records that follow is truncation, not garbage.
  const reply = encode({ type: 'OrgReply', version: 1n, total: 1, records: [ORG_RECORDS[1]] }, 1);
  const body = reply.slice(HEADER_LEN);
  body[13] = 2; // count 1 → 2
  assert.throws(() => decodeBody(CMD.OrgReply, body), ProtoError);
  assert.equal(CMD_NAME[0x99], 'OrgChanged');
});

test('section 12: the FileUpload example, byte for byte', () => {
  const bytes = encode(
    { type: 'FileUpload', kind: 1, size: 1234n, sha256: new Uint8Array(32).fill(0xab), mime: 'image/png' },
    4,
  );
  const want = [0x49, 0x4d, 0x01, 0x24, 0, 0, 0, 4, 0, 0, 0, 0x34, 1, 0, 0, 0, 0, 0, 0, 0x04, 0xd2];
  want.push(...new Array(32).fill(0xab), 0, 9, ...new TextEncoder().encode('image/png'));
  assert.deepEqual([...bytes], want);
});

test('GroupFileDownload (0x2E) encodes byte for byte: the PROTOCOL.md example', () => {
  // group 9, seq 5, req_id 42: header, then group:u64 seq:u64 big-endian (16 bytes).
  const want = bytesOf(`
    49 4d 01 2e | 00 00 00 2a | 00 00 00 10
    00 00 00 00 00 00 00 09 | 00 00 00 00 00 00 00 05`);
  assert.equal(CMD.GroupFileDownload, 0x2e);
  assert.equal(CMD_NAME[0x2e], 'GroupFileDownload');
  assert.equal(hex(encode({ type: 'GroupFileDownload', group: 9n, seq: 5n }, 42)), hex(want));
  assert.equal(hex(encode({ type: 'GroupFileDownload', group: 9, seq: '5' }, 42)), hex(want), 'Numbers and strings');
  assert.equal(encode({ type: 'GroupFileDownload', group: 9n, seq: 5n }, 42).length - HEADER_LEN, 16);
  assert.deepEqual(decode(want), { type: 'GroupFileDownload', reqId: 42, group: 9n, seq: 5n });
  assert.throws(() => encode({ type: 'GroupFileDownload', group: 9n }), /missing field seq/);
});

test('a file reference is the typed body the server checks; text is not typed', () => {
  const f = {
    kind: FILE_KIND.Image,
    sha256: new Uint8Array(32).fill(7),
    size: 1234n,
    key: new Uint8Array(16).fill(9),
    mime: 'image/png',
    name: 'cat.png',
    width: 640,
    height: 480,
    durationMs: 0,
    thumb: new TextEncoder().encode('tiny'),
  };
  const body = encodeFileRef(f);
  // 0xFF kind sha256[32] size:u64 key[16] mime:str name:str width height duration thumb:bytes
  assert.equal(body.length, 2 + 32 + 8 + 16 + 11 + 9 + 12 + 8);
  assert.deepEqual([...body.subarray(0, 3)], [0xff, 1, 7]);
  assert.deepEqual([...body.subarray(34, 42)], [0, 0, 0, 0, 0, 0, 0x04, 0xd2]);
  assert.deepEqual(decodeFileRef(body), f);
  assert.equal(decodeFileRef(new TextEncoder().encode('hello')), null);
  assert.equal(decodeFileRef(new Uint8Array(0)), null);
  assert.throws(() => decodeFileRef(new Uint8Array([0xff, 1, 0])), /truncated/);
  assert.throws(() => decodeFileRef(encodeFileRef({ ...f, kind: 9 })), /unknown kind 9/);
  assert.throws(() => encodeFileRef({ ...f, key: new Uint8Array(3) }), /16 bytes/);
});

test('SendC2g: the optional trailing mentions (count:u16 uid:u64*, uid 0 = @all)', () => {
  const c = { type: 'SendC2g', clientMsgId: 1n, group: 9n, body: utf8('hi'), mentions: [0n, 7n] };
  const bytes = encode(c, 3);
  assert.equal(
    hex(bytes),
    '49 4d 01 13 00 00 00 03 00 00 00 28 ' + // header, body 40 bytes
      '00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 09 00 00 00 02 68 69 ' + // cid, group, body
      '00 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 07', // 2 mentions: 0 (@all), 7
  );
  assert.deepEqual(decode(bytes), { ...c, reqId: 3 });
  // None: the field is left out (the body as before), whether absent or empty.
  const plain = encode({ type: 'SendC2g', clientMsgId: 1n, group: 9n, body: utf8('hi') }, 3);
  assert.equal(plain.length - HEADER_LEN, 22);
  assert.equal(hex(encode({ ...c, mentions: [] }, 3)), hex(plain));
  assert.equal(decode(plain).mentions, undefined);
  // As the server reads it: one stray byte after the body is no mentions; a cut list is truncated.
  const body = plain.slice(HEADER_LEN);
  assert.equal(decodeBody(CMD.SendC2g, new Uint8Array([...body, 0])).mentions, undefined);
  assert.deepEqual(decodeBody(CMD.SendC2g, new Uint8Array([...body, 0, 0])).mentions, []);
  assert.throws(() => decodeBody(CMD.SendC2g, bytes.slice(HEADER_LEN, -1)), ProtoError);
  assert.equal(CONV.MENTION, 7);
  assert.equal(MAX_MENTIONS, 20);
});
