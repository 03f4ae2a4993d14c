// Unit tests of the page's session logic (web/static/client.js) against a scripted fake
// WebSocket: login with the stored last seq, sync pages, gap detection by prev_seq, dedup,
// batched DeliverAck, the SendAck prev_seq rule, delivery ticks, refusals, kickout, the
// organisation tree's local model (apply by version, tombstones, paged and incremental sync),
// file messages (resumable upload against a fake fetch, the reference sent, URLs cached), and
// large groups (GroupDeliver, GroupHeads → GroupSync pages, GroupRead, GroupFileDownload) with
// mentions.
// Run: node --test web/tests/
import './node-globals.mjs';
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { GROUP_FIRST_SYNC_SPAN, ImClient, OrgModel, parseMentions } from '../static/client.js';
import {
  CONV,
  ERR,
  FILE_KIND,
  KICK,
  decode,
  decodeFileRef,
  encode,
  encodeFileRef,
  encodeGroupEvent,
  encodeMarker,
  utf8,
} from '../static/proto.js';

const ME = 5n;
const PEER = 6n;

class MemStorage {
  constructor() {
    this.m = new Map();
  }
  getItem(k) {
    return this.m.has(k) ? this.m.get(k) : null;
  }
  setItem(k, v) {
    this.m.set(k, String(v));
  }
  removeItem(k) {
    this.m.delete(k);
  }
}

/** A WebSocket the test drives: records what the client sends, injects server frames. */
class FakeWS {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.waiters = [];
    FakeWS.all.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.();
    }, 0);
  }
  send(bytes) {
    const c = decode(bytes);
    this.sent.push(c);
    for (const w of this.waiters.splice(0)) w();
  }
  close() {
    this.readyState = 3;
  }
  /** Server → client frame. */
  push(cmd, reqId = 0) {
    const b = encode(cmd, reqId);
    this.onmessage?.({ data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) });
  }
  /** Waits (up to 2 s) for the next client frame of `type` not taken yet. */
  async next(type) {
    const deadline = Date.now() + 2000;
    for (;;) {
      const c = this.sent.find((x) => x.type === type && !x.taken);
      if (c) {
        c.taken = true;
        return c;
      }
      if (Date.now() >= deadline) throw new Error(`the client sent no ${type}`);
      await new Promise((r) => {
        const t = setTimeout(r, deadline - Date.now());
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }
  frames(type) {
    return this.sent.filter((c) => c.type === type);
  }
}

const tick = (ms = 60) => new Promise((r) => setTimeout(r, ms));

let seqMsgId = 1000n;
function entry(seq, prevSeq, over = {}) {
  return {
    seq,
    prevSeq,
    msgId: (seqMsgId += 1n),
    conv: CONV.C2C,
    from: PEER,
    to: ME,
    clientMsgId: seq * 7n,
    serverTimeMs: 1_767_225_600_000n,
    body: utf8(`message ${seq}`),
    ...over,
  };
}

/** A client logged in; the initial sync answered with `backlog` (entries after `stored`). */
async function loggedIn({ storage = new MemStorage(), maxSeq = 0n, backlog = [], fetch } = {}) {
  FakeWS.all = [];
  const c = new ImClient({
    url: 'ws://test/ws',
    uid: ME,
    token: 't',
    deviceId: 'web-test',
    storage,
    WebSocket: FakeWS,
    fetch,
  });
  c.start();
  await tick(5);
  const ws = FakeWS.all.at(-1);
  const login = await ws.next('Login');
  ws.push(
    { type: 'LoginResult', code: 0, serverTimeMs: 1n, maxSeq, heartbeatSecs: 30, message: '' },
    login.reqId,
  );
  const sync = await ws.next('SyncRequest');
  ws.push({ type: 'SyncPage', maxSeq, hasMore: false, messages: backlog }, sync.reqId);
  const groups = await ws.next('MyGroups');
  ws.push({ type: 'GroupList', groups: [] }, groups.reqId);
  await tick();
  return { c, ws, login, sync, storage };
}

test('login: web device, protocol im.v1, sync from 0, then DeliverAck of the backlog', async () => {
  const { c, ws, login, sync } = await loggedIn({
    maxSeq: 20n,
    backlog: [entry(10n, 0n), entry(20n, 10n)],
  });
  assert.deepEqual(ws.protocols, ['im.v1']);
  assert.equal(login.uid, ME);
  assert.equal(login.deviceType, 4);
  assert.equal(login.deviceId, 'web-test');
  assert.equal(login.lastSeq, 0n);
  assert.equal(sync.afterSeq, 0n);
  assert.equal(c.state, 'online');
  assert.equal(c.lastSeq, 20n);
  assert.deepEqual(
    ws.frames('DeliverAck').map((a) => a.seq),
    [20n],
  );
  assert.deepEqual(
    c.messages(`u:${PEER}`).map((r) => r.text),
    ['message 10', 'message 20'],
  );
  c.finish('test', '');
});

test('sync follows has_more pages', async () => {
  FakeWS.all = [];
  const c = new ImClient({ url: 'u', uid: ME, token: 't', deviceId: 'd', storage: new MemStorage(), WebSocket: FakeWS });
  c.start();
  await tick(5);
  const ws = FakeWS.all[0];
  const login = await ws.next('Login');
  ws.push({ type: 'LoginResult', code: 0, serverTimeMs: 1n, maxSeq: 30n, heartbeatSecs: 30, message: '' }, login.reqId);
  const s1 = await ws.next('SyncRequest');
  ws.push({ type: 'SyncPage', maxSeq: 30n, hasMore: true, messages: [entry(10n, 0n)] }, s1.reqId);
  const s2 = await ws.next('SyncRequest');
  assert.equal(s2.afterSeq, 10n);
  ws.push({ type: 'SyncPage', maxSeq: 30n, hasMore: false, messages: [entry(30n, 10n)] }, s2.reqId);
  await tick();
  assert.equal(c.lastSeq, 30n);
  c.finish('test', '');
});

test('pushes: in order applied and acked once per burst, duplicates dropped, a gap syncs', async () => {
  const { c, ws } = await loggedIn();
  ws.push({ type: 'Deliver', message: entry(3n, 0n) });
  ws.push({ type: 'Deliver', message: entry(5n, 3n) });
  ws.push({ type: 'Deliver', message: entry(5n, 3n) }); // duplicate
  await tick();
  assert.equal(c.lastSeq, 5n);
  assert.deepEqual(ws.frames('DeliverAck').map((a) => a.seq), [5n]);
  assert.equal(c.messages(`u:${PEER}`).length, 2);
  assert.equal(c.conversations()[0].unread, 2);

  // prev_seq 8 > last seq 5: entries are missing; the client syncs from 5.
  ws.push({ type: 'Deliver', message: entry(9n, 8n) });
  const s = await ws.next('SyncRequest');
  assert.equal(s.afterSeq, 5n);
  assert.equal(c.lastSeq, 5n, 'the gap entry is not applied by itself');
  ws.push({ type: 'SyncPage', maxSeq: 9n, hasMore: false, messages: [entry(8n, 5n), entry(9n, 8n)] }, s.reqId);
  await tick();
  assert.equal(c.lastSeq, 9n);
  assert.equal(ws.frames('DeliverAck').at(-1).seq, 9n);
  assert.equal(c.messages(`u:${PEER}`).length, 4);
  c.finish('test', '');
});

test('sending: ✓ on SendAck, own seq taken when prev_seq matches, ✓✓ on Delivered', async () => {
  const { c, ws } = await loggedIn({ maxSeq: 4n, backlog: [entry(4n, 0n)] });
  const r = c.sendText(`u:${PEER}`, 'hi');
  assert.equal(r.status, 'pending');
  const send = await ws.next('SendC2c');
  assert.equal(send.to, PEER);
  assert.equal(new TextDecoder().decode(send.body), 'hi');
  ws.push(
    { type: 'SendAck', code: 0, clientMsgId: send.clientMsgId, msgId: 77n, seq: 6n, serverTimeMs: 2n, prevSeq: 4n },
    send.reqId,
  );
  await tick();
  assert.equal(r.status, 'sent');
  assert.equal(c.lastSeq, 6n, 'prev_seq equals last seq: the own entry is next');
  ws.push({ type: 'Delivered', msgId: 77n, recipient: PEER });
  await tick();
  assert.equal(r.status, 'delivered');

  // prev_seq ahead of last seq: last seq stays; the entry comes later in a sync, deduplicated.
  const r2 = c.sendText(`u:${PEER}`, 'again');
  const s2 = await ws.next('SendC2c');
  ws.push({ type: 'Delivered', msgId: 99n, recipient: PEER }); // before the ack
  ws.push(
    { type: 'SendAck', code: 0, clientMsgId: s2.clientMsgId, msgId: 99n, seq: 9n, serverTimeMs: 3n, prevSeq: 8n },
    s2.reqId,
  );
  await tick();
  assert.equal(c.lastSeq, 6n);
  assert.equal(r2.status, 'delivered', 'an early Delivered is kept');
  ws.push({ type: 'Deliver', message: entry(10n, 9n) });
  const s = await ws.next('SyncRequest');
  assert.equal(s.afterSeq, 6n);
  const own = entry(9n, 8n, { from: ME, to: PEER, msgId: 99n, clientMsgId: BigInt(s2.clientMsgId) });
  ws.push({ type: 'SyncPage', maxSeq: 10n, hasMore: false, messages: [entry(8n, 6n), own, entry(10n, 9n)] }, s.reqId);
  await tick();
  assert.equal(c.lastSeq, 10n);
  const texts = c.messages(`u:${PEER}`).map((m) => m.text);
  assert.deepEqual(texts, ['message 4', 'hi', 'message 8', 'again', 'message 10']);
  c.finish('test', '');
});

test('refusals: retryable codes resend the same client_msg_id, others fail', async () => {
  const { c, ws } = await loggedIn();
  const r = c.sendText('g:50', 'to the group');
  const s1 = await ws.next('SendC2g');
  ws.push({ type: 'Error', code: ERR.Overloaded, message: 'slow down' }, s1.reqId);
  const s2 = await ws.next('SendC2g');
  assert.equal(s2.clientMsgId, s1.clientMsgId);
  ws.push({ type: 'Error', code: ERR.NotMember, message: 'not a member' }, s2.reqId);
  await tick();
  assert.equal(r.status, 'failed');
  assert.match(r.error, /NotMember/);
  c.finish('test', '');
});

test('groups: create, events, own post merged with its Deliver', async () => {
  const { c, ws } = await loggedIn();
  const p = c.createGroup('team', ['6', '7']);
  const gc = await ws.next('GroupCreate');
  assert.deepEqual(gc.members, [6n, 7n]);
  assert.ok(typeof gc.clientId === 'bigint' && gc.clientId !== 0n, 'an idempotency key');
  ws.push({ type: 'OpResult', code: 0, id: 50n, message: '' }, gc.reqId);
  assert.equal(await p, '50');
  ws.push({
    type: 'Deliver',
    message: entry(2n, 0n, { conv: CONV.GROUP_EVENT, from: ME, to: 50n, clientMsgId: 0n, body: encodeGroupEvent({ kind: 1, users: [ME, 6n, 7n] }) }),
  });
  const r = c.sendText('g:50', 'hello team');
  const s = await ws.next('SendC2g');
  ws.push({ type: 'SendAck', code: 0, clientMsgId: s.clientMsgId, msgId: 500n, seq: 0n, serverTimeMs: 1n, prevSeq: 0n }, s.reqId);
  ws.push({ type: 'Deliver', message: entry(3n, 2n, { conv: CONV.C2G, from: ME, to: 50n, msgId: 500n, clientMsgId: BigInt(s.clientMsgId) }) });
  await tick();
  const ms = c.messages('g:50');
  assert.equal(ms.length, 2);
  assert.equal(ms[0].system, true);
  assert.match(ms[0].text, /you created the group with user 6, user 7/);
  assert.equal(ms[1].rid, r.rid);
  assert.equal(ms[1].seq, '3');
  assert.equal(c.lastSeq, 3n);
  assert.equal(c.title('g:50'), 'team');
  c.finish('test', '');
});

test('the history and last seq survive a reload; login sends the stored last seq', async () => {
  const storage = new MemStorage();
  const first = await loggedIn({ storage, maxSeq: 7n, backlog: [entry(7n, 0n)] });
  first.c.finish('test', '');
  const again = await loggedIn({ storage, maxSeq: 7n });
  assert.equal(again.login.lastSeq, 7n);
  assert.equal(again.sync.afterSeq, 7n);
  assert.deepEqual(again.c.messages(`u:${PEER}`).map((m) => m.text), ['message 7']);
  again.c.finish('test', '');
});

test('kickout by another web device ends the session without reconnecting', async () => {
  const { c, ws } = await loggedIn();
  let stopped = null;
  c.addEventListener('stopped', (e) => {
    stopped = e.detail;
  });
  ws.push({ type: 'Kickout', reason: KICK.SameDeviceType, message: 'another web device' });
  await tick(700);
  assert.equal(c.state, 'stopped');
  assert.equal(stopped.reason, 'kicked');
  assert.equal(FakeWS.all.length, 1, 'no reconnect');
});

test('a lost connection reconnects and logs in with the last seq', async () => {
  const { c, ws } = await loggedIn({ maxSeq: 3n, backlog: [entry(3n, 0n)] });
  ws.readyState = 3;
  ws.onclose({ code: 1006, reason: '' });
  assert.equal(c.state, 'offline');
  await tick(900); // first back-off: 250–750 ms
  const ws2 = FakeWS.all.at(-1);
  assert.notEqual(ws2, ws);
  const login = await ws2.next('Login');
  assert.equal(login.lastSeq, 3n);
  c.finish('test', '');
});

// ---- organisation tree ------------------------------------------------------------------------

const dept = (version, id, parent, name, over = {}) => ({
  kind: 'dept', version, deleted: false, id, parent, order: 0, hidden: false, name, ...over,
});
const person = (version, uid, name, over = {}) => ({ kind: 'person', version, deleted: false, uid, name, ...over });
const member = (version, uid, deptId, title, over = {}) => ({
  kind: 'member', version, deleted: false, uid, dept: deptId, order: 0, title, ...over,
});
const ids = (ds) => ds.map((d) => d.id);

test('org model: apply, a newer version replaces, an older one is ignored, tombstones remove', () => {
  const m = new OrgModel();
  assert.equal(m.apply(dept(1n, 1n, 0n, 'Company')), true);
  assert.equal(m.apply(dept(2n, 2n, 1n, 'Engineering', { order: 5 })), true);
  assert.equal(m.apply(dept(3n, 3n, 1n, 'Sales', { order: 1 })), true);
  assert.equal(m.apply(dept(4n, 10n, 1n, 'Legal', { order: 1 })), true);
  m.apply(person(5n, 101n, 'Alice Smith'));
  m.apply(member(6n, 101n, 2n, 'lead', { order: 2 }));
  m.apply(person(7n, 102n, 'Bob Jones'));
  m.apply(member(8n, 102n, 2n, 'dev', { order: 1 }));
  m.apply(member(9n, 102n, 3n, ''));
  assert.deepEqual(ids(m.roots()), ['1']);
  assert.deepEqual(ids(m.children('1')), ['3', '10', '2'], 'by order, then id (numerically)');
  assert.deepEqual(
    m.membersOf('2').map((x) => [x.uid, x.name, x.title]),
    [['102', 'Bob Jones', 'dev'], ['101', 'Alice Smith', 'lead']],
  );
  assert.deepEqual(ids(m.deptsOf('102')), ['2', '3']);
  assert.deepEqual(m.path('2'), ['1', '2']);

  // A newer record of a key replaces it (a move and a rename); an older or equal one is ignored.
  assert.equal(m.apply(dept(11n, 2n, 0n, 'Engineering (top)', { order: 0 })), true);
  assert.deepEqual(ids(m.roots()), ['1', '2']);
  assert.deepEqual(ids(m.children('1')), ['3', '10']);
  assert.equal(m.apply(dept(2n, 2n, 1n, 'Engineering')), false);
  assert.equal(m.apply(dept(11n, 2n, 1n, 'same version')), false);
  assert.equal(m.dept('2').name, 'Engineering (top)');
  assert.equal(m.apply(member(12n, 101n, 2n, 'manager', { order: 2 })), true);
  assert.equal(m.membership('101', '2').title, 'manager');

  // Tombstones: a membership, a person, a department; a stale record cannot bring them back.
  assert.equal(m.apply(member(13n, 102n, 2n, '', { deleted: true })), true);
  assert.deepEqual(m.membersOf('2').map((x) => x.uid), ['101']);
  assert.deepEqual(ids(m.deptsOf('102')), ['3']);
  m.apply(person(14n, 101n, '', { deleted: true }));
  assert.equal(m.person('101'), null);
  assert.equal(m.membersOf('2')[0].name, '', 'a membership without its person');
  m.apply(dept(15n, 10n, 0n, '', { deleted: true }));
  assert.equal(m.dept('10'), null);
  assert.deepEqual(ids(m.children('1')), ['3']);
  assert.equal(m.apply(dept(4n, 10n, 1n, 'Legal')), false, 'older than the tombstone');
  assert.equal(m.apply(dept(16n, 10n, 1n, 'Legal again', { order: 1 })), true, 'newer than the tombstone');
  assert.deepEqual(ids(m.children('1')), ['3', '10']);

  // Search by name, case-insensitive, departments first.
  m.apply(person(17n, 103n, 'Carol Legalson'));
  const r = m.search('LEGAL');
  assert.deepEqual([ids(r.depts), r.people.map((p) => p.uid), r.total], [['10'], ['103'], 2]);
  assert.equal(m.search('legal', 1).people.length, 0);
  assert.equal(m.search('  ').total, 0);
});

test('org sync: pages with more=1 then more=0, retries Unavailable, then OrgChanged syncs incrementally', async () => {
  const { c, ws } = await loggedIn();
  const events = [];
  c.addEventListener('org', (e) => events.push(e.detail));

  // The tree is still loading on the server: retried from the same version.
  const s0 = await ws.next('OrgSync');
  assert.equal(s0.since, 0n);
  ws.push({ type: 'Error', code: ERR.Unavailable, message: 'loading' }, s0.reqId);
  const s1 = await ws.next('OrgSync');
  assert.equal(s1.since, 0n);
  assert.equal(s1.limit, 1000);
  ws.push(
    {
      type: 'OrgPage',
      version: 6n,
      next: 3n,
      more: true,
      records: [dept(1n, 1n, 0n, 'Company'), dept(2n, 2n, 1n, 'Engineering', { order: 2 }), dept(3n, 3n, 1n, 'Sales', { order: 1 })],
    },
    s1.reqId,
  );
  const s2 = await ws.next('OrgSync');
  assert.equal(s2.since, 3n, 'the next page from `next`');
  assert.equal(events.length, 0, 'no event before the last page');
  ws.push(
    {
      type: 'OrgPage',
      version: 6n,
      next: 6n,
      more: false,
      records: [person(4n, PEER, 'Bob Jones'), member(5n, PEER, 2n, 'dev'), person(6n, 7n, 'Carol')],
    },
    s2.reqId,
  );
  await tick();
  assert.equal(c.org.version, 6n);
  assert.equal(c.org.synced, true);
  assert.deepEqual(events, [{ version: 6n, changed: 6 }]);
  assert.deepEqual(ids(c.org.roots()), ['1']);
  assert.deepEqual(ids(c.org.children('1')), ['3', '2']);
  assert.deepEqual(c.org.membersOf('2').map((x) => [x.uid, x.name, x.title]), [[`${PEER}`, 'Bob Jones', 'dev']]);
  assert.equal(c.title(`u:${PEER}`), 'Bob Jones', 'a chat is titled with the name from the tree');
  assert.equal(c.title('u:99'), 'User 99');

  // The server says the tree changed: one sync from the version held.
  ws.push({ type: 'OrgChanged', version: 8n });
  const s3 = await ws.next('OrgSync');
  assert.equal(s3.since, 6n);
  ws.push(
    {
      type: 'OrgPage',
      version: 8n,
      next: 8n,
      more: false,
      records: [member(7n, PEER, 2n, '', { deleted: true }), dept(8n, 2n, 0n, 'Engineering')],
    },
    s3.reqId,
  );
  await tick();
  assert.equal(c.org.version, 8n);
  assert.deepEqual(c.org.membersOf('2'), []);
  assert.deepEqual(ids(c.org.roots()), ['1', '2']);
  assert.deepEqual(events.at(-1), { version: 8n, changed: 2 });

  // A notice of a version already held asks nothing.
  ws.push({ type: 'OrgChanged', version: 8n });
  await tick();
  assert.equal(ws.frames('OrgSync').length, 4);
  c.finish('test', '');
});

test('org sync: an OrgChanged during a sync makes it sync once more; a reconnect syncs from the version held', async () => {
  const { c, ws } = await loggedIn();
  const s1 = await ws.next('OrgSync');
  ws.push({ type: 'OrgChanged', version: 3n });
  await tick(10);
  assert.equal(ws.frames('OrgSync').length, 1, 'joins the sync in progress');
  ws.push({ type: 'OrgPage', version: 2n, next: 2n, more: false, records: [dept(2n, 1n, 0n, 'Company')] }, s1.reqId);
  const s2 = await ws.next('OrgSync');
  assert.equal(s2.since, 2n);
  ws.push({ type: 'OrgPage', version: 3n, next: 3n, more: false, records: [person(3n, PEER, 'Bob')] }, s2.reqId);
  await tick();
  assert.equal(c.org.version, 3n);

  ws.readyState = 3;
  ws.onclose({ code: 1006, reason: '' });
  await tick(900);
  const ws2 = FakeWS.all.at(-1);
  const login = await ws2.next('Login');
  ws2.push({ type: 'LoginResult', code: 0, serverTimeMs: 1n, maxSeq: 0n, heartbeatSecs: 30, message: '' }, login.reqId);
  const sync = await ws2.next('SyncRequest');
  ws2.push({ type: 'SyncPage', maxSeq: 0n, hasMore: false, messages: [] }, sync.reqId);
  const s3 = await ws2.next('OrgSync');
  assert.equal(s3.since, 3n, 'the model survives a reconnect');
  c.finish('test', '');
});

test('org requests: a department, a search, and a refusal with its code', async () => {
  const { c, ws } = await loggedIn();
  const pd = c.orgDept(2, 0, 10);
  const rd = await ws.next('OrgDept');
  assert.deepEqual([rd.dept, rd.offset, rd.limit], [2n, 0, 10]);
  ws.push(
    {
      type: 'OrgReply',
      version: 9n,
      total: 2,
      records: [
        dept(2n, 2n, 1n, 'Engineering'),
        dept(3n, 3n, 2n, 'Storage'),
        member(5n, 101n, 2n, 'lead'),
        person(4n, 101n, 'Alice'),
        member(6n, 102n, 2n, 'dev'),
        person(7n, 102n, 'Bob'),
      ],
    },
    rd.reqId,
  );
  const d = await pd;
  assert.equal(d.total, 2);
  assert.equal(d.dept.name, 'Engineering');
  assert.deepEqual(ids(d.children), ['3']);
  assert.deepEqual(d.members.map((m) => [m.uid, m.name, m.title]), [['101', 'Alice', 'lead'], ['102', 'Bob', 'dev']]);

  const pt = c.orgDept(0);
  const rt = await ws.next('OrgDept');
  ws.push({ type: 'OrgReply', version: 9n, total: 0, records: [dept(1n, 1n, 0n, 'Company')] }, rt.reqId);
  const top = await pt;
  assert.equal(top.dept, null, 'the top level is no department');
  assert.deepEqual(ids(top.children), ['1']);

  const ps = c.orgSearch('bo', 5);
  const rs = await ws.next('OrgSearch');
  assert.deepEqual([rs.query, rs.limit], ['bo', 5]);
  ws.push({ type: 'OrgReply', version: 9n, total: 2, records: [dept(8n, 8n, 1n, 'Board'), person(7n, 102n, 'Bob')] }, rs.reqId);
  const found = await ps;
  assert.deepEqual([found.total, ids(found.depts), found.people], [2, ['8'], [{ uid: '102', name: 'Bob' }]]);

  const pe = c.orgDept(4);
  const re = await ws.next('OrgDept');
  ws.push({ type: 'Error', code: ERR.NotFound, message: 'no department 4' }, re.reqId);
  await assert.rejects(pe, (e) => e.code === ERR.NotFound && /NotFound: no department 4/.test(e.message));
  c.finish('test', '');
});

test('files: sendFile uploads in chunks, resumes at the server offset, sends the reference; received files and URLs', async () => {
  const bytes = new Uint8Array(1_500_000).map((_, i) => (i * 7) % 251);
  const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  const sha = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  const http = [];
  let refusedOnce = false;
  let stored = 0;
  const fetch = async (url, init) => {
    http.push({ url, method: init.method, headers: init.headers, size: init.body?.length ?? 0 });
    assert.equal(init.headers.Authorization, 'Ticket tk');
    if (init.method === 'POST') return new Response(JSON.stringify({ upload: 'u1', offset: 0, size: bytes.length }), { status: 201 });
    const off = Number(init.headers['Upload-Offset']);
    if (off === 1 << 20 && !refusedOnce) {
      // The first try of the second chunk is refused: the server has less than the client thinks.
      refusedOnce = true;
      stored = 1000;
      return new Response('{"error":{"code":"offset_mismatch"}}', { status: 409, headers: { 'Upload-Offset': '1000' } });
    }
    assert.equal(off, stored, 'each chunk starts where the server is');
    stored += init.body.length;
    if (stored < bytes.length) return new Response(null, { status: 204, headers: { 'Upload-Offset': String(stored) } });
    return new Response(JSON.stringify({ sha256: hex(sha), size: bytes.length, key: 'ab'.repeat(16) }), { status: 201 });
  };
  const { c, ws } = await loggedIn({ fetch });
  const done = c.sendFile(`u:${PEER}`, bytes, { name: 'cat.png', mime: 'image/png', width: 2, height: 3 });
  const t = await ws.next('FileUpload');
  assert.deepEqual([t.kind, t.size, t.mime], [FILE_KIND.Image, 1_500_000n, 'image/png']);
  assert.deepEqual([...t.sha256], [...sha]);
  ws.push({ type: 'FileTicket', url: 'http://api/v1/files/uploads', ticket: 'tk', expiresMs: 9n }, t.reqId);
  const r = await done;
  assert.deepEqual(
    http.map((h) => `${h.method} ${h.url} ${h.headers['Upload-Offset'] ?? ''}`),
    [
      'POST http://api/v1/files/uploads ',
      'PATCH http://api/v1/files/uploads/u1 0',
      'PATCH http://api/v1/files/uploads/u1 1048576',
      'PATCH http://api/v1/files/uploads/u1 1000',
      'PATCH http://api/v1/files/uploads/u1 1049576',
    ],
  );
  assert.equal(r.text, '[image cat.png]');
  const send = await ws.next('SendC2c');
  const f = decodeFileRef(send.body);
  assert.deepEqual([f.kind, f.size, f.name, f.width, f.height], [1, 1_500_000n, 'cat.png', 2, 3]);
  assert.equal(hex(f.key), 'ab'.repeat(16));
  ws.push({ type: 'SendAck', code: 0, clientMsgId: send.clientMsgId, msgId: 70n, seq: 1n, serverTimeMs: 2n, prevSeq: 0n }, send.reqId);
  await tick();
  assert.equal(r.status, 'sent');

  // A received file message keeps its file; its URL is asked once and cached.
  const body = encodeFileRef({ ...f, name: 'dog.jpg' });
  ws.push({ type: 'Deliver', message: entry(2n, 1n, { body }) });
  await tick();
  const got = c.messages(`u:${PEER}`).at(-1);
  assert.equal(got.text, '[image dog.jpg]');
  assert.equal(got.file.name, 'dog.jpg');
  const u1 = c.fileUrl(got.seq);
  const dl = await ws.next('FileDownload');
  assert.equal(dl.seq, 2n);
  ws.push({ type: 'FileUrl', url: 'http://api/v1/files/x?s=1', expiresMs: BigInt(Date.now() + 3_600_000) }, dl.reqId);
  assert.equal(await u1, 'http://api/v1/files/x?s=1');
  assert.equal(await c.fileUrl(got.seq), 'http://api/v1/files/x?s=1');
  assert.equal(ws.frames('FileDownload').length, 1, 'cached');

  // A refused ticket rejects with the server's reason.
  const bad = c.sendFile(`u:${PEER}`, new Uint8Array(5), { name: 'x', mime: 'image/png' });
  const t2 = await ws.next('FileUpload');
  ws.push({ type: 'Error', code: ERR.InvalidArgument, message: 'a image has 1 to 33554432 bytes' }, t2.reqId);
  await assert.rejects(bad, /InvalidArgument: a image has/);
  c.finish('test', '');
});

test('presence: followed once per list, notices update the state, a new connection follows again', async () => {
  const { c, ws } = await loggedIn();
  const p = c.followPresence([PEER, 7n, PEER]);
  const sub = await ws.next('PresenceSubscribe');
  assert.deepEqual(sub.users, [6n, 7n]);
  ws.push({ type: 'OpResult', code: ERR.Ok, id: 0n, message: '' }, sub.reqId);
  await p;
  // The same list again sends nothing.
  await c.followPresence([7n, PEER]);
  assert.equal(ws.frames('PresenceSubscribe').length, 1);
  let changes = 0;
  c.addEventListener('change', () => changes++);
  ws.push({
    type: 'PresenceNotice',
    entries: [
      { uid: PEER, online: true, lastSeenMs: 0n },
      { uid: 7n, online: false, lastSeenMs: 1_700_000_000_000n },
    ],
  });
  await tick(5);
  assert.deepEqual(c.presenceOf(PEER), { online: true, lastSeenMs: 0 });
  assert.deepEqual(c.presenceOf(7n), { online: false, lastSeenMs: 1_700_000_000_000 });
  assert.equal(c.presenceOf(8n), undefined);
  assert.ok(changes >= 1);
  // A refusal is reported and the list is sent again next time.
  const bad = c.followPresence([0n]);
  const sub2 = await ws.next('PresenceSubscribe');
  ws.push({ type: 'Error', code: ERR.InvalidArgument, message: 'presence: user 0 does not exist' }, sub2.reqId);
  await assert.rejects(bad, /user 0/);
  assert.equal(c.presenceList, null);
  c.finish('test', '');
});

test('typing: sent on the first keystroke, repeated at most every 3 s, stopped once; notices expire', async () => {
  const { c, ws } = await loggedIn();
  c.typing(`u:${PEER}`, true);
  c.typing(`u:${PEER}`, true); // within 3 s: not repeated
  const t1 = await ws.next('Typing');
  assert.deepEqual([t1.conv, t1.peer, t1.state], [CONV.C2C, PEER, 1]);
  ws.push({ type: 'OpResult', code: ERR.Ok, id: 0n, message: '' }, t1.reqId);
  c.typing(`u:${PEER}`, false);
  c.typing(`u:${PEER}`, false); // already stopped: nothing
  const t2 = await ws.next('Typing');
  assert.equal(t2.state, 0);
  ws.push({ type: 'OpResult', code: ERR.Ok, id: 0n, message: '' }, t2.reqId);
  c.typing('g:9', true);
  const t3 = await ws.next('Typing');
  assert.deepEqual([t3.conv, t3.peer, t3.state], [CONV.C2G, 9n, 1]);
  await tick(20);
  assert.equal(ws.frames('Typing').length, 3);
  // Notices: keyed by the conversation as this user sees it, cleared by a stop or their ttl.
  ws.push({ type: 'TypingNotice', conv: CONV.C2C, peer: PEER, from: PEER, state: 1, ttlMs: 6000 });
  ws.push({ type: 'TypingNotice', conv: CONV.C2G, peer: 9n, from: 8n, state: 1, ttlMs: 30 });
  await tick(5);
  assert.deepEqual(c.typingIn(`u:${PEER}`), [String(PEER)]);
  assert.deepEqual(c.typingIn('g:9'), ['8']);
  ws.push({ type: 'TypingNotice', conv: CONV.C2C, peer: PEER, from: PEER, state: 0, ttlMs: 6000 });
  await tick(60);
  assert.deepEqual(c.typingIn(`u:${PEER}`), []);
  assert.deepEqual(c.typingIn('g:9'), [], 'expired by its ttl');
  c.finish('test', '');
});

test('presence privacy: the setting is sent and a refusal rejects', async () => {
  const { c, ws } = await loggedIn();
  const p = c.setPresenceHidden(true);
  const r = await ws.next('PresencePrivacy');
  assert.equal(r.hidden, true);
  ws.push({ type: 'OpResult', code: ERR.Ok, id: 0n, message: '' }, r.reqId);
  await p;
  const p2 = c.setPresenceHidden(false);
  const r2 = await ws.next('PresencePrivacy');
  assert.equal(r2.hidden, false);
  ws.push({ type: 'Error', code: ERR.Unavailable, message: 'store unavailable' }, r2.reqId);
  await assert.rejects(p2, /store unavailable/);
  c.finish('test', '');
});

// ---- large groups and mentions ----------------------------------------------------------------

const GROUP = 50n;
/** A post of a large group's own timeline (its seqs are the group's). */
const post = (seq, prevSeq, over = {}) =>
  entry(seq, prevSeq, { conv: CONV.C2G, to: GROUP, body: utf8(`post ${seq}`), ...over });
const texts = (c, key = `g:${GROUP}`) => c.messages(key).map((r) => r.text);

/** A client logged in whose user timeline holds seq 11, told that group 50 is at head = read = 10. */
async function inLargeGroup(opts = {}) {
  const s = await loggedIn({ maxSeq: 11n, backlog: [entry(11n, 0n)], ...opts });
  s.ws.push({ type: 'GroupHeads', heads: [{ group: GROUP, head: 10n, read: 10n }] });
  await tick(5);
  return s;
}

test('large groups: a GroupDeliver is shown once in the group, never acked, the user timeline untouched', async () => {
  const { c, ws } = await inLargeGroup();
  assert.equal(ws.frames('GroupSync').length, 0, 'head = read: nothing to fetch');
  const acks = ws.frames('DeliverAck').length;
  ws.push({ type: 'GroupDeliver', message: post(11n, 10n) });
  ws.push({ type: 'GroupDeliver', message: post(11n, 10n) }); // duplicate
  await tick();
  assert.deepEqual(texts(c), ['post 11']);
  assert.equal(c.messages(`g:${GROUP}`)[0].gseq, '11');
  assert.equal(c.messages(`g:${GROUP}`)[0].seq, undefined, 'no seq of the user timeline');
  assert.equal(c.large.get('50').seq, 11n);
  assert.equal(c.lastSeq, 11n);
  assert.equal(ws.frames('DeliverAck').length, acks, 'GroupDeliver is not acked');
  assert.equal(ws.frames('SyncRequest').length, 1, 'no sync of the user timeline');
  assert.equal(ws.frames('GroupSync').length, 0);
  assert.equal(c.conversations().find((x) => x.key === `g:${GROUP}`).unread, 1);

  // An own post: the ack's seq / prev_seq are the group's, even when prev_seq equals the user's
  // last seq (11 in both timelines here); the post coming back live is a duplicate.
  const r = c.sendText(`g:${GROUP}`, 'mine');
  const s = await ws.next('SendC2g');
  ws.push({ type: 'SendAck', code: 0, clientMsgId: s.clientMsgId, msgId: 900n, seq: 12n, serverTimeMs: 2n, prevSeq: 11n }, s.reqId);
  await tick();
  assert.equal(r.status, 'sent');
  assert.equal(r.gseq, '12');
  assert.equal(r.ackSeq, undefined);
  assert.equal(c.lastSeq, 11n, 'the user timeline did not move');
  assert.equal(c.large.get('50').seq, 12n, 'next in the group timeline');
  ws.push({ type: 'GroupDeliver', message: post(12n, 11n, { from: ME, msgId: 900n, clientMsgId: BigInt(s.clientMsgId), body: utf8('mine') }) });
  await tick();
  assert.deepEqual(texts(c), ['post 11', 'mine']);
  assert.equal(ws.frames('DeliverAck').length, acks);
  c.finish('test', '');
});

test('large groups: a GroupDeliver after a gap syncs the group from the last seq held', async () => {
  const { c, ws } = await inLargeGroup();
  ws.push({ type: 'GroupDeliver', message: post(11n, 10n) });
  ws.push({ type: 'GroupDeliver', message: post(15n, 14n) }); // 12..14 missing
  const gs = await ws.next('GroupSync');
  assert.deepEqual([gs.group, gs.afterSeq, gs.limit], [GROUP, 11n, 200]);
  assert.deepEqual(texts(c), ['post 11'], 'the gap post is not shown by itself');
  ws.push({ type: 'GroupDeliver', message: post(16n, 15n) }); // during the sync: a gap still
  ws.push(
    { type: 'GroupSyncPage', group: GROUP, head: 15n, hasMore: false, messages: [post(13n, 11n), post(15n, 13n)] },
    gs.reqId,
  );
  // The gap seen during the sync makes it go once more, from the seq now held.
  const gs2 = await ws.next('GroupSync');
  assert.equal(gs2.afterSeq, 15n);
  ws.push({ type: 'GroupSyncPage', group: GROUP, head: 16n, hasMore: false, messages: [post(16n, 15n)] }, gs2.reqId);
  await tick();
  assert.deepEqual(texts(c), ['post 11', 'post 13', 'post 15', 'post 16']);
  assert.equal(c.large.get('50').seq, 16n);
  assert.equal(c.lastSeq, 11n);
  assert.equal(ws.frames('SyncRequest').length, 1);
  assert.equal(ws.frames('GroupSync').length, 2);
  c.finish('test', '');
});

test('large groups: GroupHeads after login syncs from the read cursor page after page; events and recalls apply', async () => {
  const { c, ws, storage } = await loggedIn({ maxSeq: 3n, backlog: [entry(3n, 0n)] });
  ws.push({
    type: 'GroupHeads',
    heads: [
      { group: 60n, head: 30n, read: 20n },
      { group: 61n, head: 5n, read: 5n }, // read up to its head: nothing to fetch
    ],
  });
  const p1 = await ws.next('GroupSync');
  assert.deepEqual([p1.group, p1.afterSeq], [60n, 20n], 'nothing held: from the read cursor');
  const updated = post(25n, 21n, { conv: CONV.GROUP_EVENT, to: 60n, clientMsgId: 0n, body: encodeGroupEvent({ kind: 5, users: [] }) });
  const p21 = post(21n, 20n, { to: 60n });
  ws.push({ type: 'GroupSyncPage', group: 60n, head: 30n, hasMore: true, messages: [p21, updated] }, p1.reqId);
  const p2 = await ws.next('GroupSync');
  assert.equal(p2.afterSeq, 25n, 'the next page after the last seq received');
  const recall = post(30n, 25n, { conv: CONV.RECALL, to: 60n, from: PEER, body: encodeMarker({ conv: CONV.C2G, msgId: p21.msgId }) });
  ws.push(
    { type: 'GroupSyncPage', group: 60n, head: 30n, hasMore: false, messages: [post(28n, 25n, { to: 60n }), recall] },
    p2.reqId,
  );
  await tick();
  assert.equal(ws.frames('GroupSync').length, 2, 'has_more 0: done; group 61 not synced');
  const ms = c.messages('g:60');
  assert.deepEqual(ms.map((r) => r.text), ['', 'user 6 updated the group', 'post 28']);
  assert.equal(ms[0].recalled, true, 'a recall marker of the group timeline');
  assert.equal(ms[1].system, true);
  assert.equal(c.large.get('60').seq, 30n);
  assert.equal(c.lastSeq, 3n);
  assert.ok(c.isLarge(61n) && c.isLarge('60'));

  // The last group seq held survives a reload: the next GroupHeads syncs from it.
  c.finish('test', '');
  const again = await loggedIn({ storage, maxSeq: 3n });
  assert.equal(again.c.large.get('60').seq, 30n);
  again.ws.push({ type: 'GroupHeads', heads: [{ group: 60n, head: 33n, read: 20n }] });
  const p3 = await again.ws.next('GroupSync');
  assert.deepEqual([p3.group, p3.afterSeq], [60n, 30n]);
  again.ws.push({ type: 'GroupSyncPage', group: 60n, head: 33n, hasMore: false, messages: [post(33n, 30n, { to: 60n })] }, p3.reqId);
  await tick();
  assert.deepEqual(texts(again.c, 'g:60'), ['', 'user 6 updated the group', 'post 28', 'post 33']);
  again.c.finish('test', '');
});

test('large groups: a group never read is synced from its latest seqs only', async () => {
  const { c, ws } = await loggedIn();
  ws.push({ type: 'GroupHeads', heads: [{ group: 70n, head: 5000n, read: 0n }] });
  const p = await ws.next('GroupSync');
  assert.equal(p.afterSeq, 5000n - GROUP_FIRST_SYNC_SPAN);
  ws.push({ type: 'GroupSyncPage', group: 70n, head: 5000n, hasMore: false, messages: [] }, p.reqId);
  await tick();
  c.finish('test', '');
});

test('large groups: GroupRead when the group is viewed, once per change; not for a small group', async () => {
  const { c, ws } = await inLargeGroup();
  ws.push({ type: 'GroupDeliver', message: post(11n, 10n) });
  ws.push({ type: 'GroupDeliver', message: post(12n, 11n) });
  await tick();
  assert.equal(ws.frames('GroupRead').length, 0, 'not viewed yet');
  c.setActive(`g:${GROUP}`);
  const r1 = await ws.next('GroupRead');
  assert.deepEqual([r1.group, r1.seq], [GROUP, 12n]);
  ws.push({ type: 'OpResult', code: ERR.Ok, id: GROUP, message: '' }, r1.reqId);
  assert.equal(c.conversations().find((x) => x.key === `g:${GROUP}`).unread, 0);
  c.setActive(`g:${GROUP}`); // viewed again, nothing new
  await tick();
  assert.equal(ws.frames('GroupRead').length, 1);
  // A post while the group is viewed moves the cursor again, once.
  ws.push({ type: 'GroupDeliver', message: post(14n, 12n) });
  const r2 = await ws.next('GroupRead');
  assert.equal(r2.seq, 14n);
  ws.push({ type: 'OpResult', code: ERR.Ok, id: GROUP, message: '' }, r2.reqId);
  await tick();
  assert.equal(ws.frames('GroupRead').length, 2);
  // A small group (posts in the user's own timeline) sends none.
  ws.push({ type: 'Deliver', message: entry(12n, 11n, { conv: CONV.C2G, to: 77n }) });
  c.setActive('g:77');
  await tick();
  assert.deepEqual(texts(c, 'g:77'), ['message 12']);
  assert.equal(ws.frames('GroupRead').length, 2);
  c.finish('test', '');
});

test('large groups: file URLs of posts by group and group seq (GroupFileDownload), cached; refusals reject', async () => {
  const { c, ws } = await inLargeGroup();
  const file = {
    kind: FILE_KIND.File,
    sha256: new Uint8Array(32).fill(1),
    size: 2048n,
    key: new Uint8Array(16).fill(2),
    mime: 'application/pdf',
    name: 'plan.pdf',
    width: 0,
    height: 0,
    durationMs: 0,
    thumb: new Uint8Array(0),
  };
  ws.push({ type: 'GroupDeliver', message: post(11n, 10n, { body: encodeFileRef(file) }) });
  await tick();
  const r = c.messages(`g:${GROUP}`).at(-1);
  assert.equal(r.file.name, 'plan.pdf');
  assert.deepEqual([r.convKey, r.to, r.gseq, r.seq], [`g:${GROUP}`, String(GROUP), '11', undefined]);

  // Asked by the group of the post's conversation and its group seq, never by FileDownload.
  const u1 = c.groupFileUrl(r.convKey.slice(2), r.gseq);
  const dl = await ws.next('GroupFileDownload');
  assert.deepEqual([dl.group, dl.seq], [GROUP, 11n]);
  ws.push({ type: 'FileUrl', url: 'http://api/v1/files/g?s=1', expiresMs: BigInt(Date.now() + 3_600_000) }, dl.reqId);
  assert.equal(await u1, 'http://api/v1/files/g?s=1');
  assert.equal(await c.groupFileUrl(GROUP, 11n), 'http://api/v1/files/g?s=1', 'cached (BigInt arguments, same key)');
  await tick(5);
  assert.equal(ws.frames('GroupFileDownload').length, 1, 'the second call sent nothing');
  assert.equal(ws.frames('FileDownload').length, 0);

  // The same seq in another group is another file.
  const other = c.groupFileUrl(51n, 11n);
  const dl2 = await ws.next('GroupFileDownload');
  assert.deepEqual([dl2.group, dl2.seq], [51n, 11n]);
  ws.push({ type: 'Error', code: ERR.NotMember, message: 'not a member of group 51' }, dl2.reqId);
  await assert.rejects(other, /NotMember: not a member of group 51/);

  // Refusals reject with the server's reason and are not cached.
  const gone = c.groupFileUrl(GROUP, 12n);
  const dl3 = await ws.next('GroupFileDownload');
  ws.push({ type: 'Error', code: ERR.NotFound, message: 'no file post 12' }, dl3.reqId);
  await assert.rejects(gone, /NotFound: no file post 12/);
  const again = c.groupFileUrl(GROUP, 12n);
  const dl4 = await ws.next('GroupFileDownload');
  assert.equal(dl4.seq, 12n);
  ws.push({ type: 'Error', code: ERR.InvalidArgument, message: 'the group is not large' }, dl4.reqId);
  await assert.rejects(again, /InvalidArgument/);
  assert.equal(ws.frames('GroupFileDownload').length, 4);
  c.finish('test', '');
});

test('mentions: an entry marks the post shown, or adds it once, unread; acked like any entry', async () => {
  const { c, ws } = await inLargeGroup();
  const p11 = post(11n, 10n);
  ws.push({ type: 'GroupDeliver', message: p11 });
  await tick();
  // Mention entries are the user's own timeline's: the post's content, msg id and from, to = the group.
  const mention = (seq, prevSeq, p) =>
    entry(seq, prevSeq, { conv: CONV.MENTION, from: p.from, to: GROUP, msgId: p.msgId, clientMsgId: p.clientMsgId, body: p.body });
  ws.push({ type: 'Deliver', message: mention(12n, 11n, p11) });
  await tick();
  let ms = c.messages(`g:${GROUP}`);
  assert.equal(ms.length, 1, 'the post is not shown twice');
  assert.equal(ms[0].mentioned, true);
  assert.equal(c.lastSeq, 12n);
  assert.equal(ws.frames('DeliverAck').at(-1).seq, 12n, 'acked as usual');
  let conv = c.conversations().find((x) => x.key === `g:${GROUP}`);
  assert.deepEqual([conv.unread, conv.mentions], [1, 1], 'the post counted once');

  // A mention of a post not shown yet: added, marked, unread; the post itself later is the same record.
  const p13 = post(13n, 11n, { body: utf8('hey @5') });
  ws.push({ type: 'Deliver', message: mention(13n, 12n, p13) });
  ws.push({ type: 'Deliver', message: mention(13n, 12n, p13) }); // duplicate entry
  await tick();
  ms = c.messages(`g:${GROUP}`);
  assert.deepEqual(ms.map((r) => [r.text, !!r.mentioned]), [['post 11', true], ['hey @5', true]]);
  conv = c.conversations().find((x) => x.key === `g:${GROUP}`);
  assert.deepEqual([conv.unread, conv.mentions], [2, 2]);
  ws.push({ type: 'GroupDeliver', message: post(12n, 11n) });
  ws.push({ type: 'GroupDeliver', message: p13 });
  await tick();
  ms = c.messages(`g:${GROUP}`);
  assert.deepEqual(ms.map((r) => r.text), ['post 11', 'post 12', 'hey @5'], 'in the group order, once');
  assert.equal(ms[2].gseq, '13');
  conv = c.conversations().find((x) => x.key === `g:${GROUP}`);
  assert.deepEqual([conv.unread, conv.mentions], [3, 2]);
  c.setActive(`g:${GROUP}`);
  conv = c.conversations().find((x) => x.key === `g:${GROUP}`);
  assert.deepEqual([conv.unread, conv.mentions], [0, 0]);
  c.finish('test', '');
});

test('mentions: @all and @uid words of a group post become the SendC2g mentions', async () => {
  assert.deepEqual(parseMentions('hi @all, @7 and @7 again; mail x@8, @0 @012 @9x (@42) @ALL'), ['0', '7', '42']);
  assert.deepEqual(parseMentions('no one'), []);
  const many = Array.from({ length: 30 }, (_, i) => `@${i + 1}`).join(' ');
  assert.equal(parseMentions(many).length, 20, 'at most 20');

  const { c, ws } = await loggedIn();
  const r = c.sendText(`g:${GROUP}`, '@all meeting at 3, @7 @7 bring @12');
  const s1 = await ws.next('SendC2g');
  assert.deepEqual(s1.mentions, [0n, 7n, 12n]);
  assert.deepEqual(r.mentions, ['0', '7', '12']);
  // A retry sends the same mentions.
  ws.push({ type: 'Error', code: ERR.Overloaded, message: 'later' }, s1.reqId);
  const s2 = await ws.next('SendC2g');
  assert.deepEqual([s2.clientMsgId, s2.mentions], [s1.clientMsgId, [0n, 7n, 12n]]);
  ws.push({ type: 'SendAck', code: 0, clientMsgId: s2.clientMsgId, msgId: 901n, seq: 0n, serverTimeMs: 2n, prevSeq: 0n }, s2.reqId);
  c.sendText(`g:${GROUP}`, 'plain');
  const s3 = await ws.next('SendC2g');
  assert.equal(s3.mentions, undefined, 'no mentions: the field is left out');
  c.sendText(`u:${PEER}`, 'hi @7');
  const s4 = await ws.next('SendC2c');
  assert.equal(s4.mentions, undefined);
  // A small group's post from someone else that says @<me> or @all is marked from its text.
  ws.push({ type: 'Deliver', message: entry(1n, 0n, { conv: CONV.C2G, to: 77n, body: utf8(`@${ME} look`) }) });
  await tick();
  assert.equal(c.messages('g:77')[0].mentioned, true);
  c.finish('test', '');
});

test('large groups: a post before anything is known is shown; the GroupHeads then fills from the read cursor', async () => {
  const { c, ws } = await loggedIn({ maxSeq: 3n, backlog: [entry(3n, 0n)] });
  // The group becomes large now: BecameLarge in the user's timeline, then its first live post.
  const became = entry(4n, 3n, { conv: CONV.GROUP_EVENT, to: 80n, clientMsgId: 0n, body: encodeGroupEvent({ kind: 6, users: [] }) });
  const p2 = post(2n, 1n, { to: 80n });
  ws.push({ type: 'Deliver', message: became });
  ws.push({ type: 'GroupDeliver', message: p2 });
  await tick();
  assert.ok(c.isLarge('80'));
  assert.equal(ws.frames('GroupSync').length, 0);
  assert.deepEqual(texts(c, 'g:80'), ['the group is large now: its posts are read from the group', 'post 2']);
  // The heads tell the read cursor (0): what is before the post is fetched; the group timeline's
  // own BecameLarge (seq 1) is not shown a second time, nor post 2.
  ws.push({ type: 'GroupHeads', heads: [{ group: 80n, head: 2n, read: 0n }] });
  const gs = await ws.next('GroupSync');
  assert.deepEqual([gs.group, gs.afterSeq], [80n, 0n]);
  const own = post(1n, 0n, { to: 80n, conv: CONV.GROUP_EVENT, clientMsgId: 0n, body: encodeGroupEvent({ kind: 6, users: [] }) });
  ws.push({ type: 'GroupSyncPage', group: 80n, head: 2n, hasMore: false, messages: [own, p2] }, gs.reqId);
  await tick();
  assert.deepEqual(texts(c, 'g:80'), ['the group is large now: its posts are read from the group', 'post 2']);
  assert.equal(c.large.get('80').seq, 2n);
  // From now on the usual rules: the next post is next in order.
  ws.push({ type: 'GroupDeliver', message: post(3n, 2n, { to: 80n }) });
  await tick();
  assert.equal(texts(c, 'g:80').at(-1), 'post 3');
  assert.equal(ws.frames('GroupSync').length, 1);
  assert.equal(c.lastSeq, 4n);
  c.finish('test', '');
});
