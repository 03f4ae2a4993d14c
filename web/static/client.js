// The chat session of one user on one web device, without any DOM: the WebSocket connection,
// login and reconnects, heartbeats, the local timeline (last seq, gap detection by prev_seq,
// sync pages, DeliverAck), sending with retries, delivery ticks, groups and the organisation tree
// (contacts), large groups (their own timelines: GroupDeliver, GroupHeads, GroupSync, GroupRead)
// and mentions. docs/PROTOCOL.md sections 9 and 10 and "Large groups" describe the rules
// implemented here; the organisation tree's records and their rules are shared/src/org.rs.
//
// Events (EventTarget): 'state' (detail: the new state), 'change' (the timeline, conversations
// or groups changed), 'org' (detail: {version, changed} when the organisation tree was synced,
// {version, error} when a sync failed),
// 'notice' (detail: {level, text} for the user), 'stopped' (detail: {reason, text}: the session
// ended and will not reconnect), 'log' (detail: {dir, text}).

import * as P from './proto.js';

const SYNC_LIMIT = 200;
const ORG_SYNC_LIMIT = P.MAX_ORG_PAGE;
const ORG_RETRIES = 8; // retryable refusals (Unavailable while the tree loads) before giving up
const REQUEST_TIMEOUT_MS = 10_000;
/** While the user types, `Typing` is repeated at most this often (a notice stands for 6 s). */
export const TYPING_REPEAT_MS = 3_000;
const MAX_RECORDS = 5000;
/** Retryable refusals of one GroupSync (Unavailable, Overloaded) before that sync gives up. */
const GROUP_SYNC_RETRIES = 5;
/**
 * A large group never read (read cursor 0) of which the page holds nothing is synced from this
 * many seqs below its head at most: its latest posts, not its whole history.
 */
export const GROUP_FIRST_SYNC_SPAN = 1000n;
const U64_MAX = (1n << 64n) - 1n;
const STATUS_RANK = { '': 0, failed: 0, pending: 1, sent: 2, delivered: 3, read: 4 };

/** A random non-zero u64 as a decimal string (client_msg_id, section 10). */
export function randomU64() {
  const a = new BigUint64Array(1);
  do globalThis.crypto.getRandomValues(a);
  while (a[0] === 0n);
  return a[0].toString();
}

/** `u:<uid>` (c2c), `g:<group>` (c2g), `s:<account>` (s2c). */
export function convKind(key) {
  return key.slice(0, 1);
}

export function convPeer(key) {
  return key.slice(2);
}

/** Orders decimal id strings numerically (no leading zeros: shorter is smaller). */
export function cmpId(a, b) {
  return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
}

const byOrderThenId = (idOf) => (a, b) => a.order - b.order || cmpId(idOf(a), idOf(b));

/**
 * The users a post mentions, from its text: `@<uid>` words and `@all` (uid 0), as decimal
 * strings in order of appearance, without duplicates, at most `P.MAX_MENTIONS` (SendC2g).
 */
export function parseMentions(text) {
  const out = [];
  if (typeof text !== 'string') return out;
  const re = /(?<![\p{L}\p{N}_@])@(all|[1-9][0-9]*)(?![\p{L}\p{N}_])/giu;
  for (const m of text.matchAll(re)) {
    const word = m[1].toLowerCase();
    const uid = word === 'all' ? '0' : word;
    if (word !== 'all' && BigInt(uid) > U64_MAX) continue;
    if (out.includes(uid)) continue;
    out.push(uid);
    if (out.length === P.MAX_MENTIONS) break;
  }
  return out;
}

/**
 * What the page keeps of one large group's own timeline (PROTOCOL.md "Large groups"), seqs of
 * that timeline as BigInt: `seq` the last one held (0: none), `read` the user's read cursor as
 * last known, `head` the group's last seq as last known, `top` the highest seq shown, `readSent`
 * the highest GroupRead sent, `known` whether a GroupHeads told the cursor, `adopted` whether
 * `seq` was taken from a push that came before anything else was known.
 */
function largeState(s = {}) {
  const big = (v) => BigInt(v ?? '0');
  return {
    seq: big(s.seq),
    read: big(s.read),
    head: big(s.head),
    top: big(s.top),
    readSent: 0n,
    known: !!s.known,
    adopted: !!s.adopted,
    running: null, // the GroupSync loop in progress
    resync: false, // a gap was seen while it ran: go once more
  };
}

/** Copies the timeline place of `from` (user seq and/or group seq) onto record `r`. */
function place(r, from) {
  if (from.seq) r.seq = from.seq;
  if (from.gseq) r.gseq = from.gseq;
}

/**
 * Display order within a conversation: entries of the same timeline by seq (the user's, or a
 * large group's own), entries of different timelines by msg id (time ordered), unplaced ones
 * (pending sends) last in the order they were made.
 */
function byPlace(a, b) {
  const ka = a.gseq ? 'g' : a.seq ? 'u' : '';
  const kb = b.gseq ? 'g' : b.seq ? 'u' : '';
  if (ka && kb) {
    if (ka === kb) {
      const x = BigInt(ka === 'g' ? a.gseq : a.seq);
      const y = BigInt(kb === 'g' ? b.gseq : b.seq);
      if (x !== y) return x < y ? -1 : 1;
    } else if (a.msgId && b.msgId && a.msgId !== b.msgId) {
      return cmpId(a.msgId, b.msgId);
    }
    return a.order - b.order;
  }
  if (ka) return -1;
  if (kb) return 1;
  return a.order - b.order;
}

/** The identity of an org record: a newer record of the same key replaces it. */
export function orgKey(rec) {
  switch (rec.kind) {
    case 'dept':
      return `d:${rec.id}`;
    case 'person':
      return `p:${rec.uid}`;
    case 'member':
      return `m:${rec.uid}/${rec.dept}`;
    default:
      throw new Error(`unknown org record kind ${rec.kind}`);
  }
}

function addTo(index, k, v) {
  let s = index.get(k);
  if (!s) {
    s = new Set();
    index.set(k, s);
  }
  s.add(v);
}

function dropFrom(index, k, v) {
  const s = index.get(k);
  if (!s) return;
  s.delete(v);
  if (s.size === 0) index.delete(k);
}

/**
 * The organisation tree as this user sees it (the client side of shared/src/org.rs `OrgTree`):
 * the latest record of every key, applied by version (an older or equal version is ignored, a
 * tombstone removes the entity), with indexes for the tree view. Ids are decimal strings, like
 * the rest of this file; versions are BigInt.
 */
export class OrgModel {
  constructor() {
    /** Sync cursor: every record up to this version is held (the next OrgSync's `since`). */
    this.version = 0n;
    /** A complete sync has been done at least once. */
    this.synced = false;
    /** Why the last sync failed ('' after a complete one). */
    this.error = '';
    this.versions = new Map(); // key → version of its latest record, tombstones included
    this.depts = new Map(); // id → {id, parent, order, hidden, name, version}
    this.people = new Map(); // uid → {uid, name, version}
    this.members = new Map(); // `${uid}/${dept}` → {uid, dept, order, title, version}
    this.childIdx = new Map(); // parent → Set of dept ids
    this.memberIdx = new Map(); // dept → Set of uids
    this.userIdx = new Map(); // uid → Set of dept ids
  }

  /**
   * Applies one record (as decoded by proto.js: u64 fields BigInt or anything toU64 takes).
   * @returns {boolean} whether the model changed (false: not newer than the record held)
   */
  apply(rec) {
    const key = orgKey(rec);
    const version = P.toU64(rec.version, 'version');
    const held = this.versions.get(key);
    if (held !== undefined && held >= version) return false;
    this.versions.set(key, version);
    this.remove(rec);
    if (!rec.deleted) this.insert(rec, version);
    return true;
  }

  /** Removes the live entity of `rec`'s key, if any. */
  remove(rec) {
    switch (rec.kind) {
      case 'dept': {
        const id = String(rec.id);
        const old = this.depts.get(id);
        if (!old) return;
        this.depts.delete(id);
        dropFrom(this.childIdx, old.parent, id);
        return;
      }
      case 'person':
        this.people.delete(String(rec.uid));
        return;
      case 'member': {
        const uid = String(rec.uid);
        const dept = String(rec.dept);
        if (!this.members.delete(`${uid}/${dept}`)) return;
        dropFrom(this.memberIdx, dept, uid);
        dropFrom(this.userIdx, uid, dept);
        return;
      }
      default:
    }
  }

  insert(rec, version) {
    switch (rec.kind) {
      case 'dept': {
        const d = {
          id: String(rec.id),
          parent: String(rec.parent),
          order: rec.order,
          hidden: !!rec.hidden,
          name: rec.name,
          version,
        };
        this.depts.set(d.id, d);
        addTo(this.childIdx, d.parent, d.id);
        return;
      }
      case 'person': {
        const p = { uid: String(rec.uid), name: rec.name, version };
        this.people.set(p.uid, p);
        return;
      }
      case 'member': {
        const m = {
          uid: String(rec.uid),
          dept: String(rec.dept),
          order: rec.order,
          title: rec.title,
          version,
        };
        this.members.set(`${m.uid}/${m.dept}`, m);
        addTo(this.memberIdx, m.dept, m.uid);
        addTo(this.userIdx, m.uid, m.dept);
        return;
      }
      default:
    }
  }

  /** Forgets everything (the next sync starts from version 0). */
  clear() {
    Object.assign(this, new OrgModel());
  }

  dept(id) {
    return this.depts.get(String(id)) ?? null;
  }

  person(uid) {
    return this.people.get(String(uid)) ?? null;
  }

  membership(uid, dept) {
    return this.members.get(`${uid}/${dept}`) ?? null;
  }

  /** Sub-departments of `parent` ('0': the top level), by order, then id. */
  children(parent = '0') {
    const ids = this.childIdx.get(String(parent));
    if (!ids) return [];
    return [...ids].map((id) => this.depts.get(id)).sort(byOrderThenId((d) => d.id));
  }

  /**
   * The top of the tree: departments whose parent is 0, and any whose parent this user does not
   * hold (not expected from the server; shown rather than lost).
   */
  roots() {
    const out = this.children('0');
    for (const [parent, ids] of this.childIdx) {
      if (parent === '0' || this.depts.has(parent)) continue;
      for (const id of ids) out.push(this.depts.get(id));
    }
    return out.sort(byOrderThenId((d) => d.id));
  }

  /** Members of `dept` by order, then uid: `{uid, dept, order, title, name}`. */
  membersOf(dept) {
    const uids = this.memberIdx.get(String(dept));
    if (!uids) return [];
    return [...uids]
      .map((uid) => {
        const m = this.members.get(`${uid}/${dept}`);
        return { ...m, name: this.people.get(uid)?.name ?? '' };
      })
      .sort(byOrderThenId((m) => m.uid));
  }

  memberCount(dept) {
    return this.memberIdx.get(String(dept))?.size ?? 0;
  }

  /** Departments of `uid`, by id. */
  deptsOf(uid) {
    const ids = this.userIdx.get(String(uid));
    if (!ids) return [];
    return [...ids].sort(cmpId).map((id) => this.depts.get(id) ?? { id, name: '' });
  }

  /** Department ids from the top down to `dept`, both included (as far as they are held). */
  path(dept) {
    const out = [];
    const seen = new Set();
    for (let d = this.depts.get(String(dept)); d && !seen.has(d.id); d = this.depts.get(d.parent)) {
      seen.add(d.id);
      out.unshift(d.id);
    }
    return out;
  }

  /**
   * Departments and people whose name contains `query` (case-insensitive), each by id, at most
   * `limit` of both together (departments first), like the server's OrgSearch; and the number
   * of matches.
   */
  search(query, limit = 50) {
    const q = query.trim().toLowerCase();
    if (!q) return { depts: [], people: [], total: 0 };
    const depts = [...this.depts.values()].filter((d) => d.name.toLowerCase().includes(q));
    const people = [...this.people.values()].filter((p) => p.name.toLowerCase().includes(q));
    depts.sort((a, b) => cmpId(a.id, b.id));
    people.sort((a, b) => cmpId(a.uid, b.uid));
    const total = depts.length + people.length;
    const d = depts.slice(0, limit);
    return { depts: d, people: people.slice(0, Math.max(0, limit - d.length)), total };
  }
}

/** An Error of a refused request, with the protocol's error code. */
function refused(res, want) {
  const code = res?.code;
  const e = new Error(
    res?.type === 'Error'
      ? `${P.errName(code)}${res.message ? `: ${res.message}` : ''}`
      : `unexpected ${res?.type} (wanted ${want})`,
  );
  e.code = code;
  return e;
}

/** Splits the records of an OrgReply to OrgDept: the department, sub-departments, members. */
function deptReply(id, res) {
  let dept = null;
  const children = [];
  const members = [];
  for (const r of res.records) {
    if (r.kind === 'dept') {
      const d = { id: r.id.toString(), parent: r.parent.toString(), order: r.order, hidden: r.hidden, name: r.name };
      if (!dept && d.id === id && id !== '0') dept = d;
      else children.push(d);
    } else if (r.kind === 'member') {
      members.push({ uid: r.uid.toString(), dept: r.dept.toString(), order: r.order, title: r.title, name: '' });
    } else if (r.kind === 'person') {
      const m = members.at(-1);
      if (m && m.uid === r.uid.toString()) m.name = r.name;
    }
  }
  return { version: res.version, total: res.total, dept, children, members, records: res.records };
}

export class ImClient extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.url WebSocket URL of the gate
   * @param {string|number|bigint} o.uid
   * @param {string} o.token
   * @param {string} o.deviceId stable id of this browser
   * @param {Storage} o.storage localStorage or anything with getItem/setItem
   * @param {typeof WebSocket} [o.WebSocket]
   */
  constructor({
    url,
    uid,
    token,
    deviceId,
    storage,
    WebSocket: WS = globalThis.WebSocket,
    fetch: fetchFn = globalThis.fetch?.bind(globalThis),
  }) {
    super();
    this.url = url;
    this.uid = P.toU64(typeof uid === 'string' ? uid.trim() : uid, 'uid');
    this.me = this.uid.toString();
    this.token = token;
    this.deviceId = deviceId;
    this.storage = storage;
    this.WS = WS;
    this.storeKey = `im.v1.${this.me}.state`;

    this.state = 'offline'; // offline | connecting | syncing | online | stopped
    this.ws = null;
    this.nextReq = 1;
    this.requests = new Map(); // req_id → {resolve, reject, timer}
    this.heartbeatSecs = 30;
    this.heartbeatTimer = null;
    this.reconnectTimer = null;
    this.attempt = 0;
    this.everLoggedIn = false;
    this.logins = 0; // successful logins of this session (reconnects included)

    this.lastSeq = 0n;
    this.ackedSeq = 0n;
    this.ackTimer = null;
    this.syncing = false;
    this.resyncWanted = false;

    this.records = new Map(); // rid → record
    this.byMsgId = new Map(); // msg id → rid
    this.ownByCid = new Map(); // client_msg_id of this user's messages → rid
    this.earlyDelivered = new Set(); // Delivered before we knew the msg id
    this.inFlight = new Set(); // rids with a send request outstanding
    this.urls = new Map(); // seq → {url, expiresMs} of files of the user's timeline
    this.groupUrls = new Map(); // `g:<group>:<seq>` → {url, expiresMs} of files of large groups' posts
    // fetch() for the file service's HTTP endpoints (a test passes its own).
    this.fetch = fetchFn;
    this.groups = new Map(); // group id → {name, left}
    this.convs = new Map(); // conv key → {unread, mentions}
    this.large = new Map(); // group id → largeState() of each large group
    this.presence = new Map(); // uid (string) → {online, lastSeenMs} from PresenceNotice
    this.typers = new Map(); // conv key → Map(uid string → local ms its notice expires)
    this.presenceList = null; // the users followed on this connection (sorted, joined)
    this.typingSentAt = new Map(); // conv key → local ms of the last Typing(1) sent
    this.order = 0;
    this.activeConv = null;
    this.groupsTimer = null;

    this.org = new OrgModel(); // the organisation tree (in memory: synced again after a reload)
    this.orgRunning = null; // the orgSyncAll in progress
    this.orgResync = false;

    this.load();
  }

  // ---- persistence ---------------------------------------------------------------------------

  load() {
    let s;
    try {
      s = JSON.parse(this.storage.getItem(this.storeKey) ?? 'null');
    } catch {
      s = null;
    }
    if (!s || s.v !== 1) return;
    this.lastSeq = BigInt(s.lastSeq ?? '0');
    for (const r of s.records ?? []) this.index(r);
    for (const [id, g] of Object.entries(s.groups ?? {})) this.groups.set(id, g);
    for (const [k, c] of Object.entries(s.convs ?? {})) this.convs.set(k, c);
    for (const [id, g] of Object.entries(s.large ?? {})) this.large.set(id, largeState(g));
    this.order = s.order ?? this.records.size;
  }

  save() {
    let recs = [...this.records.values()];
    if (recs.length > MAX_RECORDS) {
      recs.sort((a, b) => a.order - b.order);
      for (const r of recs.slice(0, recs.length - MAX_RECORDS)) this.unindex(r);
      recs = recs.slice(recs.length - MAX_RECORDS);
    }
    const s = {
      v: 1,
      lastSeq: this.lastSeq.toString(),
      order: this.order,
      records: recs,
      groups: Object.fromEntries(this.groups),
      convs: Object.fromEntries(this.convs),
      large: Object.fromEntries(
        [...this.large].map(([id, g]) => [
          id,
          {
            seq: g.seq.toString(),
            read: g.read.toString(),
            head: g.head.toString(),
            top: g.top.toString(),
            known: g.known,
            adopted: g.adopted,
          },
        ]),
      ),
    };
    try {
      this.storage.setItem(this.storeKey, JSON.stringify(s));
    } catch (e) {
      this.notice('warn', `could not save the local history: ${e.message}`);
    }
  }

  /** Forgets this user's local history (the next login syncs everything again). */
  clearLocal() {
    this.storage.removeItem(this.storeKey);
  }

  index(r) {
    this.records.set(r.rid, r);
    if (r.msgId) this.byMsgId.set(r.msgId, r.rid);
    if (r.from === this.me && r.clientMsgId && !r.system) this.ownByCid.set(r.clientMsgId, r.rid);
    if (!this.convs.has(r.convKey)) this.convs.set(r.convKey, { unread: 0 });
  }

  unindex(r) {
    this.records.delete(r.rid);
    if (r.msgId) this.byMsgId.delete(r.msgId);
    if (r.clientMsgId) this.ownByCid.delete(r.clientMsgId);
  }

  // ---- events --------------------------------------------------------------------------------

  changed() {
    if (this.changePending) return;
    this.changePending = true;
    queueMicrotask(() => {
      this.changePending = false;
      this.readActiveGroup();
      this.save();
      this.dispatchEvent(new CustomEvent('change'));
    });
  }

  notice(level, text) {
    this.dispatchEvent(new CustomEvent('notice', { detail: { level, text } }));
  }

  log(dir, text) {
    this.dispatchEvent(new CustomEvent('log', { detail: { dir, text } }));
  }

  setState(s) {
    if (this.state === s) return;
    this.state = s;
    this.dispatchEvent(new CustomEvent('state', { detail: s }));
  }

  // ---- connection ----------------------------------------------------------------------------

  /** Connects and logs in; reconnects by itself until stop() or a final refusal. */
  start() {
    if (this.state !== 'offline' && this.state !== 'stopped') return;
    this.stopped = false;
    this.connect();
  }

  connect() {
    clearTimeout(this.reconnectTimer);
    this.setState('connecting');
    let ws;
    try {
      ws = new this.WS(this.url, ['im.v1']);
    } catch (e) {
      this.finish('error', `cannot open ${this.url}: ${e.message}`);
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.reader = new P.FrameReader();
    ws.onopen = () => {
      if (ws === this.ws) this.login();
    };
    ws.onmessage = (e) => {
      if (ws === this.ws) this.onData(e.data);
    };
    ws.onclose = (e) => {
      if (ws === this.ws) this.onClosed(e);
    };
    ws.onerror = () => {}; // a close event follows
  }

  /** Closes the socket (if any) without ending the session: a reconnect follows. */
  drop(why) {
    this.log('info', `closing: ${why}`);
    const ws = this.ws;
    if (!ws) return;
    try {
      ws.close();
    } catch {
      /* already closing */
    }
    this.onClosed({ code: 0, reason: why });
  }

  onClosed(e) {
    const wasLoggedIn = this.state === 'online' || this.state === 'syncing';
    this.ws = null;
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    for (const [, r] of this.requests) {
      clearTimeout(r.timer);
      r.reject(new Error('disconnected'));
    }
    this.requests.clear();
    this.inFlight.clear();
    this.syncing = false;
    if (this.stopped) {
      this.setState('stopped');
      return;
    }
    this.setState('offline');
    this.log('info', `connection closed (${e.code ?? ''} ${e.reason ?? ''})`);
    if (wasLoggedIn) this.attempt = 0;
    const base = Math.min(30_000, 500 * 2 ** this.attempt);
    const delay = Math.round(base * (0.5 + Math.random()));
    this.attempt = Math.min(this.attempt + 1, 10);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  /** Ends the session for good (no reconnect). */
  finish(reason, text) {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.save();
    if (this.ws) {
      try {
        this.ws.close();
      } catch {
        /* closing */
      }
      this.onClosed({ code: 0, reason });
    } else {
      this.setState('stopped');
    }
    this.dispatchEvent(new CustomEvent('stopped', { detail: { reason, text } }));
  }

  /** Logs out (LogoutAck or 2 s), then ends the session. */
  async logout() {
    if (this.ws && (this.state === 'online' || this.state === 'syncing')) {
      try {
        await this.request({ type: 'Logout' }, 2000);
      } catch {
        /* closing anyway */
      }
    }
    this.finish('logout', 'logged out');
  }

  /** Reconnects now (e.g. when the browser comes back online). */
  reconnectNow() {
    if (this.state === 'offline' && !this.stopped) {
      this.attempt = 0;
      this.connect();
    }
  }

  /** The next request id: a counter from 1, wrapping and skipping 0 (section 6). */
  reqId() {
    const id = this.nextReq;
    this.nextReq = this.nextReq >= 0xffffffff ? 1 : this.nextReq + 1;
    return id;
  }

  sendFrame(cmd, reqId) {
    const bytes = P.encode(cmd, reqId);
    this.ws.send(bytes);
    if (cmd.type !== 'Heartbeat') this.log('out', describe(cmd, reqId));
  }

  /** Sends a request and resolves with its response (typed, or an Error frame). */
  request(cmd, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (!this.ws || this.ws.readyState !== 1) return Promise.reject(new Error('not connected'));
    const reqId = this.reqId();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(reqId);
        reject(new Error(`${cmd.type} timed out`));
      }, timeoutMs);
      this.requests.set(reqId, { resolve, reject, timer });
      try {
        this.sendFrame(cmd, reqId);
      } catch (e) {
        clearTimeout(timer);
        this.requests.delete(reqId);
        reject(e);
      }
    });
  }

  onData(data) {
    if (typeof data === 'string') {
      this.drop('text message from the server');
      return;
    }
    let frames;
    try {
      frames = this.reader.push(new Uint8Array(data));
    } catch (e) {
      this.drop(`corrupt stream: ${e.message}`);
      return;
    }
    for (const f of frames) {
      let cmd;
      try {
        cmd = P.decodeBody(f.cmd, f.body);
      } catch (e) {
        this.drop(`bad ${P.CMD_NAME[f.cmd] ?? f.cmd} frame: ${e.message}`);
        return;
      }
      if (cmd.type !== 'HeartbeatAck') this.log('in', describe(cmd, f.reqId));
      const pending = f.reqId !== 0 ? this.requests.get(f.reqId) : undefined;
      const push = cmd.type === 'Deliver' || cmd.type === 'Delivered' || cmd.type === 'GroupDeliver' || cmd.type === 'GroupHeads';
      if (pending && !push) {
        clearTimeout(pending.timer);
        this.requests.delete(f.reqId);
        pending.resolve(cmd);
        continue;
      }
      this.onPush(cmd);
    }
  }

  onPush(cmd) {
    switch (cmd.type) {
      case 'Deliver':
        this.onDeliver(cmd.message);
        break;
      case 'Delivered':
        this.onDelivered(cmd.msgId.toString(), cmd.recipient.toString());
        break;
      case 'GroupDeliver':
        this.onGroupDeliver(cmd.message);
        break;
      case 'GroupHeads':
        this.onGroupHeads(cmd.heads);
        break;
      case 'PresenceNotice':
        for (const e of cmd.entries) {
          this.presence.set(e.uid.toString(), { online: e.online, lastSeenMs: Number(e.lastSeenMs) });
        }
        this.dispatchEvent(new CustomEvent('change'));
        break;
      case 'TypingNotice': {
        const key = cmd.conv === P.CONV.C2G ? `g:${cmd.peer}` : `u:${cmd.from}`;
        const who = this.typers.get(key) ?? new Map();
        if (cmd.state === 1) {
          who.set(cmd.from.toString(), Date.now() + cmd.ttlMs);
          // Redrawn when it expires unless repeated.
          const t = setTimeout(() => this.dispatchEvent(new CustomEvent('change')), cmd.ttlMs + 20);
          t.unref?.();
        } else {
          who.delete(cmd.from.toString());
        }
        this.typers.set(key, who);
        this.dispatchEvent(new CustomEvent('change'));
        break;
      }
      case 'OrgChanged':
        // The tree changed: fetch what is newer than the version held.
        if (cmd.version > this.org.version || !this.org.synced) {
          this.orgSyncAll().catch((e) => this.log('info', `org sync: ${e.message}`));
        }
        break;
      case 'Kickout': {
        const text = `kicked out: ${cmd.message || `reason ${cmd.reason}`}`;
        if (cmd.reason === P.KICK.ServerShutdown) {
          this.notice('warn', `${text}; reconnecting`);
        } else {
          // Another web device of this user took over, or an administrator: do not come back.
          this.finish('kicked', text);
        }
        break;
      }
      case 'Error':
        this.notice('error', `server: ${P.errName(cmd.code)} ${cmd.message}`);
        break;
      default:
        break; // a late response to a request that timed out
    }
  }

  async login() {
    let r;
    try {
      r = await this.request({
        type: 'Login',
        uid: this.uid,
        deviceType: P.DEVICE.Web,
        deviceId: this.deviceId,
        lastSeq: this.lastSeq,
        token: this.token,
      });
    } catch (e) {
      this.drop(`login: ${e.message}`);
      return;
    }
    const code = r.code;
    if (r.type === 'LoginResult' && code === P.ERR.Ok) {
      this.everLoggedIn = true;
      // A new connection follows nobody and has told nobody it types.
      this.presenceList = null;
      this.typingSentAt.clear();
      this.logins++;
      this.attempt = 0;
      this.heartbeatSecs = r.heartbeatSecs || 30;
      this.startHeartbeats();
      this.ackedSeq = 0n;
      this.setState('syncing');
      this.dispatchEvent(new CustomEvent('loggedin', { detail: { maxSeq: r.maxSeq } }));
      this.resendPending();
      this.refreshGroups().catch(() => {});
      await this.sync();
      if (this.state === 'syncing') this.setState('online');
      // The contacts: everything on the first login, what changed while away on a reconnect.
      this.orgSyncAll().catch((e) => this.log('info', `org sync: ${e.message}`));
      return;
    }
    const text = `login refused: ${P.errName(code)}${r.message ? ` (${r.message})` : ''}`;
    if (code === P.ERR.BadToken || code === P.ERR.TokenExpired) {
      this.finish('auth', text);
    } else if (P.isRetryable(code)) {
      this.notice('warn', `${text}; retrying`);
      this.drop(text);
    } else {
      this.finish('refused', text);
    }
  }

  startHeartbeats() {
    clearInterval(this.heartbeatTimer);
    const every = Math.max(1, this.heartbeatSecs / 2) * 1000;
    this.heartbeatTimer = setInterval(() => {
      this.request({ type: 'Heartbeat' }, this.heartbeatSecs * 1000).catch((e) => {
        if (this.ws) this.drop(`heartbeat: ${e.message}`);
      });
    }, every);
  }

  // ---- timeline ------------------------------------------------------------------------------

  /**
   * Applies one timeline entry by the rules of section 10. `forced` (sync pages): apply any entry
   * above last seq, since the page holds everything after the seq the sync started from.
   * @returns {'dup'|'gap'|'applied'}
   */
  offer(m, forced = false) {
    if (m.seq <= this.lastSeq) return 'dup';
    if (!forced && m.prevSeq > this.lastSeq) return 'gap';
    this.lastSeq = m.seq;
    this.ingest(m);
    return 'applied';
  }

  onDeliver(m) {
    const r = this.offer(m);
    if (r === 'applied') {
      this.changed();
      this.scheduleAck();
    } else if (r === 'gap') {
      this.log('info', `gap: prev_seq ${m.prevSeq} > last seq ${this.lastSeq}; syncing`);
      this.sync();
    }
  }

  /** Pulls everything after last seq in pages, then acknowledges (section 10). */
  async sync() {
    if (this.syncing) {
      this.resyncWanted = true;
      return;
    }
    this.syncing = true;
    const wasOnline = this.state === 'online';
    if (wasOnline) this.setState('syncing');
    try {
      do {
        this.resyncWanted = false;
        for (;;) {
          const page = await this.request({
            type: 'SyncRequest',
            afterSeq: this.lastSeq,
            limit: SYNC_LIMIT,
          });
          if (page.type !== 'SyncPage' && P.isRetryable(page.code)) {
            await new Promise((r) => setTimeout(r, 500 + Math.random() * 1000));
            continue;
          }
          if (page.type !== 'SyncPage') {
            throw new Error(`sync refused: ${P.errName(page.code)} ${page.message ?? ''}`);
          }
          let n = 0;
          for (const m of page.messages) if (this.offer(m, true) === 'applied') n++;
          if (n) this.changed();
          if (!page.hasMore || page.messages.length === 0) break;
        }
      } while (this.resyncWanted);
      this.syncing = false;
      this.flushAck();
    } catch (e) {
      this.syncing = false;
      if (this.ws) this.drop(`sync: ${e.message}`);
      return;
    }
    if (wasOnline && this.state === 'syncing') this.setState('online');
  }

  scheduleAck() {
    if (this.ackTimer || this.syncing) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      this.flushAck();
    }, 30);
  }

  /** DeliverAck of last seq, once per burst; the history is saved first. */
  flushAck() {
    if (!this.ws || this.ws.readyState !== 1) return;
    if (this.lastSeq <= this.ackedSeq && this.ackedSeq !== 0n) return;
    if (this.lastSeq === 0n) return;
    this.save();
    try {
      this.sendFrame({ type: 'DeliverAck', seq: this.lastSeq }, this.reqId());
      this.ackedSeq = this.lastSeq;
    } catch {
      /* the close handler reconnects */
    }
  }

  /**
   * Stores an applied entry in the conversation it belongs to. `gid`: the entry is one of that
   * large group's own timeline (its seq is the group's: kept as `gseq`, not as the user's `seq`).
   */
  ingest(m, gid = null) {
    const from = m.from.toString();
    const to = m.to.toString();
    const base = {
      msgId: m.msgId.toString(),
      conv: m.conv,
      from,
      to,
      clientMsgId: m.clientMsgId.toString(),
      timeMs: Number(m.serverTimeMs),
    };
    if (gid) base.gseq = m.seq.toString();
    else base.seq = m.seq.toString();
    if (gid) {
      const g = this.largeGroup(gid);
      if (m.seq > g.top) g.top = m.seq;
      switch (m.conv) {
        case P.CONV.C2G:
        case P.CONV.S2C: // a business push to the group
          // Posts at or below the read cursor were read on some device of this user.
          this.upsert({ ...base, conv: P.CONV.C2G, convKey: `g:${gid}`, ...bodyContent(m.body) }, m.seq <= g.read);
          return;
        case P.CONV.RECALL:
        case P.CONV.GROUP_EVENT:
          break; // as in the user's timeline
        default:
          return; // a kind this page does not know
      }
    }
    const content = bodyContent(m.body);
    switch (m.conv) {
      case P.CONV.C2C:
        this.upsert({ ...base, convKey: `u:${from === this.me ? to : from}`, ...content });
        break;
      case P.CONV.C2G: {
        this.knowGroup(to);
        // A small group: every member gets the post, mentions are read from the text.
        const said = from !== this.me ? parseMentions(content.text) : [];
        const mentioned = said.includes('0') || said.includes(this.me);
        this.upsert({ ...base, convKey: `g:${to}`, ...content, ...(mentioned ? { mentioned } : {}) });
        break;
      }
      case P.CONV.S2C:
        this.upsert({ ...base, convKey: `s:${from}`, ...content });
        break;
      case P.CONV.MENTION:
        // The user was mentioned in a large group's post: the post's content, msg id and from.
        this.knowGroup(to);
        this.largeGroup(to);
        this.mention({ ...base, conv: P.CONV.C2G, convKey: `g:${to}`, ...content });
        break;
      case P.CONV.RECALL: {
        const mk = safe(() => P.decodeMarker(m.body));
        const rid = mk && this.byMsgId.get(mk.msgId.toString());
        const r = rid && this.records.get(rid);
        if (r) {
          r.recalled = true;
          r.text = '';
        }
        break;
      }
      case P.CONV.READ: {
        const mk = safe(() => P.decodeMarker(m.body));
        if (!mk || mk.conv !== P.CONV.C2C) break;
        if (from === this.me) {
          // Another device of mine read the conversation with `to`.
          const c = this.convs.get(`u:${to}`);
          if (c) c.unread = 0;
          break;
        }
        for (const r of this.records.values()) {
          if (r.convKey === `u:${from}` && r.from === this.me && r.msgId && BigInt(r.msgId) <= mk.msgId) {
            upgrade(r, 'read');
          }
        }
        break;
      }
      case P.CONV.GROUP_EVENT:
        this.groupEvent(m, base);
        break;
      default:
        break; // a kind this page does not know: kept in seq order, not shown
    }
  }

  /** Adds a message, or places one already held (by msg id, or by client_msg_id if own). */
  upsert(rec, quiet = false) {
    if (rec.from === this.me) {
      const rid = this.ownByCid.get(rec.clientMsgId) ?? this.byMsgId.get(rec.msgId);
      const r = rid && this.records.get(rid);
      if (r) {
        r.msgId = rec.msgId;
        place(r, rec);
        r.timeMs = rec.timeMs;
        this.byMsgId.set(r.msgId, r.rid);
        upgrade(r, 'sent');
        if (this.earlyDelivered.delete(r.msgId)) upgrade(r, 'delivered');
        return;
      }
      // Sent by another device of this user.
      this.add({ ...rec, rid: `c:${rec.clientMsgId}`, status: 'sent' });
      return;
    }
    const rid = this.byMsgId.get(rec.msgId);
    const held = rid && this.records.get(rid);
    if (held) {
      place(held, rec);
      return;
    }
    this.add({ ...rec, rid: `m:${rec.msgId}`, status: '' });
    if (rec.convKey !== this.activeConv && !quiet) {
      const c = this.conv(rec.convKey);
      c.unread++;
      if (rec.mentioned) c.mentions = (c.mentions ?? 0) + 1;
    }
  }

  /**
   * A mention entry (kind 7): marks the post it repeats when it is shown, else shows it (marked)
   * in the group's conversation, unread like a message. Never shown twice (same msg id).
   */
  mention(rec) {
    const rid = this.byMsgId.get(rec.msgId);
    const r = rid && this.records.get(rid);
    const c = this.conv(rec.convKey);
    if (r) {
      r.mentionSeq = rec.seq;
      if (!r.mentioned) {
        r.mentioned = true;
        if (r.convKey !== this.activeConv && !r.recalled) c.mentions = (c.mentions ?? 0) + 1;
      }
      return;
    }
    // The entry's seq (the user's timeline) places it until the group's timeline brings the post.
    this.add({ ...rec, rid: `m:${rec.msgId}`, status: '', mentioned: true, mentionSeq: rec.seq });
    if (rec.convKey !== this.activeConv) {
      c.unread++;
      c.mentions = (c.mentions ?? 0) + 1;
    }
  }

  add(r) {
    r.order = ++this.order;
    this.index(r);
  }

  conv(key) {
    let c = this.convs.get(key);
    if (!c) {
      c = { unread: 0, mentions: 0 };
      this.convs.set(key, c);
    }
    return c;
  }

  knowGroup(id) {
    if (!this.groups.has(id)) {
      this.groups.set(id, { name: '', left: false });
      this.refreshGroupsSoon();
    }
  }

  groupEvent(m, base) {
    const ev = safe(() => P.decodeGroupEvent(m.body));
    const gid = base.to;
    if (!ev) return;
    const shown = this.records.get(this.byMsgId.get(base.msgId));
    if (shown) {
      place(shown, base); // the same event again (a large group's timeline synced twice)
      return;
    }
    if (ev.kind === P.GROUP_EVENT.BecameLarge) {
      // From now on the group's posts come from its own timeline.
      this.largeGroup(gid);
      if (
        base.gseq &&
        [...this.records.values()].some((r) => r.convKey === `g:${gid}` && r.event === P.GROUP_EVENT.BecameLarge)
      ) {
        return; // the first entry of the group's timeline, already told in the user's own
      }
    }
    const users = ev.users.map((u) => u.toString());
    const mine = users.includes(this.me);
    const who = (u) => (u === this.me ? 'you' : `user ${u}`);
    const actor = who(base.from);
    const others = users.filter((u) => u !== base.from);
    const list = (others.length ? others : users).map(who).join(', ');
    let text;
    switch (ev.kind) {
      case P.GROUP_EVENT.Created:
        text = `${actor} created the group with ${list}`;
        break;
      case P.GROUP_EVENT.MembersAdded:
        text = `${actor} added ${list}`;
        break;
      case P.GROUP_EVENT.MembersRemoved:
        text = `${actor} removed ${list}`;
        break;
      case P.GROUP_EVENT.MemberLeft:
        text = `${list} left`;
        break;
      case P.GROUP_EVENT.Updated:
        text = `${actor} updated the group`;
        break;
      case P.GROUP_EVENT.BecameLarge:
        text = 'the group is large now: its posts are read from the group';
        break;
      case P.GROUP_EVENT.AdminAdded:
        text = `${actor} made ${list} admin`;
        break;
      case P.GROUP_EVENT.AdminRemoved:
        text = `${actor} made ${list} a member again`;
        break;
      default:
        text = `group event ${ev.kind}`;
    }
    const g = this.groups.get(gid) ?? { name: '', left: false };
    if (ev.kind === P.GROUP_EVENT.Created || ev.kind === P.GROUP_EVENT.MembersAdded) {
      if (mine) g.left = false;
    } else if (ev.kind === P.GROUP_EVENT.MembersRemoved || ev.kind === P.GROUP_EVENT.MemberLeft) {
      if (mine) g.left = true;
    }
    this.groups.set(gid, g);
    this.add({ ...base, rid: `m:${base.msgId}`, convKey: `g:${gid}`, text, system: true, event: ev.kind, status: '' });
    this.refreshGroupsSoon();
  }

  onDelivered(msgId, recipient) {
    const rid = this.byMsgId.get(msgId);
    const r = rid && this.records.get(rid);
    if (!r) {
      this.earlyDelivered.add(msgId);
      return;
    }
    if (!r.deliveredTo) r.deliveredTo = [];
    if (!r.deliveredTo.includes(recipient)) r.deliveredTo.push(recipient);
    upgrade(r, 'delivered');
    this.changed();
  }

  // ---- large groups (read diffusion) ---------------------------------------------------------

  /** The state kept of large group `gid` (string), made when the page first learns of it. */
  largeGroup(gid) {
    let g = this.large.get(gid);
    if (!g) {
      g = largeState();
      this.large.set(gid, g);
    }
    return g;
  }

  isLarge(gid) {
    return this.large.has(String(gid));
  }

  /**
   * A live post of a large group (its own timeline's seq / prev_seq, section 10's rules against
   * the last group seq held): a duplicate is dropped, the next one shown, a gap synced. Not
   * acknowledged; the user's own timeline (last seq, acks, sync) is not touched.
   */
  onGroupDeliver(m) {
    const gid = m.to.toString();
    this.knowGroup(gid);
    const g = this.largeGroup(gid);
    if (g.seq > 0n && m.seq <= g.seq) return; // duplicate
    if (g.seq === 0n && !g.known) {
      // Nothing held and no read cursor known yet (a push before the group's GroupHeads, or the
      // group became large just now): shown and taken as the place to go on from; a GroupHeads
      // that follows syncs from the read cursor what is before it.
      g.adopted = true;
    } else {
      const held = g.seq > 0n ? g.seq : g.read;
      if (m.seq <= held) return;
      if (m.prevSeq > held) {
        this.log('info', `group ${gid}: gap: prev_seq ${m.prevSeq} > ${held}; syncing`);
        this.groupSync(gid);
        return;
      }
    }
    g.seq = m.seq;
    this.ingest(m, gid);
    this.changed();
  }

  /**
   * GroupHeads (after the login; later for muted groups): each group's head and the user's read
   * cursor. A group whose head is above what the page holds is synced.
   */
  onGroupHeads(heads) {
    for (const h of heads) {
      const gid = h.group.toString();
      this.knowGroup(gid);
      const g = this.largeGroup(gid);
      g.known = true;
      if (h.read > g.read) g.read = h.read;
      if (h.read > g.readSent) g.readSent = h.read;
      if (h.head > g.head) g.head = h.head;
      if (h.head > this.groupStart(g)) this.groupSync(gid);
      else g.adopted = false;
    }
    this.changed();
  }

  /**
   * Where a GroupSync of `g` starts: the last seq held; when nothing is held, the read cursor
   * (showing what was not read is enough), or for a group never read the last
   * GROUP_FIRST_SYNC_SPAN seqs below its head; for a place taken from a lone push, the read
   * cursor if that is below it.
   */
  groupStart(g) {
    let from = g.read;
    if (from === 0n && g.head > GROUP_FIRST_SYNC_SPAN) from = g.head - GROUP_FIRST_SYNC_SPAN;
    if (g.seq === 0n) return from;
    if (g.adopted && g.known && from < g.seq) return from;
    return g.seq;
  }

  /**
   * Pulls a large group's posts after `groupStart` with GroupSync, page after page while
   * `has_more`, each page shown in order (duplicates by msg id). A gap seen meanwhile makes it
   * go once more. Resolves when done (a refusal or a lost connection is logged: the next
   * GroupHeads or gap starts again).
   */
  groupSync(gid) {
    const g = this.largeGroup(gid);
    if (g.running) {
      g.resync = true;
      return g.running;
    }
    const run = async () => {
      let tries = 0;
      do {
        g.resync = false;
        let after = this.groupStart(g);
        for (;;) {
          const page = await this.request({ type: 'GroupSync', group: BigInt(gid), afterSeq: after, limit: SYNC_LIMIT });
          if (page.type !== 'GroupSyncPage') {
            if (P.isRetryable(page.code) && ++tries < GROUP_SYNC_RETRIES) {
              await sleep(Math.min(5000, 300 * 2 ** tries) * (0.5 + Math.random()));
              continue;
            }
            throw refused(page, 'GroupSyncPage');
          }
          tries = 0;
          if (page.head > g.head) g.head = page.head;
          for (const m of page.messages) {
            if (m.seq > g.seq) g.seq = m.seq;
            this.ingest(m, gid);
          }
          if (page.messages.length) {
            after = page.messages.at(-1).seq;
            this.changed();
          }
          if (!page.hasMore || page.messages.length === 0) break;
        }
        g.adopted = false;
      } while (g.resync);
    };
    g.running = run()
      .catch((e) => this.log('info', `group ${gid} sync: ${e.message}`))
      .finally(() => {
        g.running = null;
      });
    return g.running;
  }

  /** The ack of an own post to a large group: its place in the group's timeline. */
  ownGroupPost(r, ack) {
    const g = this.largeGroup(r.to);
    r.gseq = ack.seq.toString();
    if (ack.seq > g.top) g.top = ack.seq;
    // Next in order (as a GroupDeliver would be): the group's last seq moves there.
    const held = g.seq > 0n ? g.seq : g.known ? g.read : null;
    if (held !== null && ack.prevSeq <= held && ack.seq > held) g.seq = ack.seq;
  }

  /**
   * GroupRead of the large group the user views, up to the highest group seq shown, when that
   * moved since the last one sent (or since the cursor the server reported).
   */
  readActiveGroup() {
    const key = this.activeConv;
    if (!key || convKind(key) !== 'g') return;
    const gid = convPeer(key);
    const g = this.large.get(gid);
    if (!g || g.top <= g.readSent || g.top <= g.read) return;
    if ((this.state !== 'online' && this.state !== 'syncing') || !this.ws || this.ws.readyState !== 1) return;
    if (this.groups.get(gid)?.left) return;
    const seq = g.top;
    const before = g.readSent;
    g.readSent = seq;
    const undo = () => {
      if (g.readSent === seq) g.readSent = before;
    };
    this.request({ type: 'GroupRead', group: BigInt(gid), seq }).then(
      (res) => {
        if (res.type === 'OpResult' && res.code === P.ERR.Ok) {
          if (seq > g.read) g.read = seq;
          return;
        }
        this.log('info', `group ${gid} read: ${refusal(res)}`);
        if (P.isRetryable(res.code)) undo();
      },
      undo,
    );
  }

  // ---- sending -------------------------------------------------------------------------------

  /** Queues a text message to a conversation (`u:<uid>` or `g:<group>`); returns its record. */
  sendText(convKey, text) {
    return this.queue(convKey, { text });
  }

  /**
   * Uploads a file (a `Blob`/`File` or bytes) and queues a message that references it: the
   * ticket over the connection, the bytes over HTTP in resumable chunks (PROTOCOL.md "File
   * messages", API.md "Files"). Resolves with the message's record; rejects with the server's
   * reason when the upload is refused.
   */
  async sendFile(convKey, data, { name = 'file', mime = 'application/octet-stream', width = 0, height = 0 } = {}) {
    const bytes = data instanceof Uint8Array ? data : new Uint8Array(await data.arrayBuffer());
    const kind = mime.startsWith('image/') ? P.FILE_KIND.Image : P.FILE_KIND.File;
    const sha256 = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
    const t = await this.request({ type: 'FileUpload', kind, size: BigInt(bytes.length), sha256, mime });
    if (t.type !== 'FileTicket') throw new Error(refusal(t));
    const up = await uploadBytes(this.fetch, t.url, t.ticket, bytes);
    const file = {
      kind,
      sha256: hexOf(up.sha256),
      size: String(bytes.length),
      key: up.key,
      mime,
      name,
      width,
      height,
      durationMs: 0,
    };
    return this.queue(convKey, { text: fileText(file), file });
  }

  /** A download URL of the file of message `seq` (cached until shortly before it expires). */
  async fileUrl(seq) {
    const hit = this.urls.get(String(seq));
    if (hit && hit.expiresMs - 60_000 > Date.now()) return hit.url;
    const res = await this.request({ type: 'FileDownload', seq: P.toU64(seq, 'seq') });
    if (res.type !== 'FileUrl') throw new Error(refusal(res));
    this.urls.set(String(seq), { url: res.url, expiresMs: Number(res.expiresMs) });
    return res.url;
  }

  /**
   * A download URL of the file of post `seq` of large group `group`'s own timeline (its `gseq`:
   * GroupFileDownload), cached like fileUrl's.
   */
  async groupFileUrl(group, seq) {
    const g = P.toU64(group, 'group');
    const n = P.toU64(seq, 'seq');
    const key = `g:${g}:${n}`;
    const hit = this.groupUrls.get(key);
    if (hit && hit.expiresMs - 60_000 > Date.now()) return hit.url;
    const res = await this.request({ type: 'GroupFileDownload', group: g, seq: n });
    if (res.type !== 'FileUrl') throw new Error(refusal(res));
    this.groupUrls.set(key, { url: res.url, expiresMs: Number(res.expiresMs) });
    return res.url;
  }

  /** A message to `convKey` with `content` (`{text}` or `{text, file}`), queued and sent. */
  queue(convKey, content) {
    const kind = convKind(convKey);
    if (kind !== 'u' && kind !== 'g') throw new Error(`cannot send to ${convKey}`);
    const cid = randomU64();
    const r = {
      rid: `c:${cid}`,
      msgId: null,
      seq: null,
      conv: kind === 'g' ? P.CONV.C2G : P.CONV.C2C,
      from: this.me,
      to: convPeer(convKey),
      convKey,
      clientMsgId: cid,
      timeMs: Date.now(),
      ...content,
      status: 'pending',
    };
    // `@<uid>` and `@all` in a group post's text: its mentions (kept for the retries).
    const mentions = kind === 'g' && !content.file ? parseMentions(content.text) : [];
    if (mentions.length) r.mentions = mentions;
    this.add(r);
    this.changed();
    this.trySend(r);
    return r;
  }

  /** Sends again a message that failed. */
  retry(rid) {
    const r = this.records.get(rid);
    if (!r || r.status !== 'failed') return;
    r.status = 'pending';
    delete r.error;
    this.changed();
    this.trySend(r);
  }

  resendPending() {
    const pend = [...this.records.values()].filter((r) => r.status === 'pending');
    pend.sort((a, b) => a.order - b.order);
    for (const r of pend) this.trySend(r);
  }

  async trySend(r) {
    if (this.state !== 'online' && this.state !== 'syncing') return;
    if (this.inFlight.has(r.rid)) return;
    this.inFlight.add(r.rid);
    const body = r.file ? fileBody(r.file) : r.text;
    const cmd =
      r.conv === P.CONV.C2G
        ? { type: 'SendC2g', clientMsgId: r.clientMsgId, group: r.to, body }
        : { type: 'SendC2c', clientMsgId: r.clientMsgId, to: r.to, body };
    if (r.conv === P.CONV.C2G && r.mentions?.length) cmd.mentions = r.mentions.map((u) => BigInt(u));
    let res;
    try {
      res = await this.request(cmd);
    } catch (e) {
      // Timed out or disconnected: the same client_msg_id is sent again (the server dedups).
      this.inFlight.delete(r.rid);
      if (this.ws && r.status === 'pending') setTimeout(() => this.trySend(r), 1000);
      return;
    }
    this.inFlight.delete(r.rid);
    if (res.type === 'SendAck' && res.code === P.ERR.Ok) {
      this.onSendAck(r, res);
    } else if (P.isRetryable(res.code)) {
      setTimeout(() => this.trySend(r), 1000 + Math.random() * 1000);
    } else {
      r.status = 'failed';
      r.error = `${P.errName(res.code)}${res.message ? `: ${res.message}` : ''}`;
      this.notice('error', `message not sent: ${r.error}`);
      this.changed();
    }
  }

  onSendAck(r, ack) {
    r.msgId = ack.msgId.toString();
    // The own entry's seq (c2c; 0 for a group post, a large group's seq is not the user's), even
    // when it is not next in order yet: a file message's download URL is asked by it.
    if (ack.seq !== 0n && r.conv !== P.CONV.C2G) r.ackSeq = ack.seq.toString();
    r.timeMs = Number(ack.serverTimeMs);
    this.byMsgId.set(r.msgId, r.rid);
    upgrade(r, 'sent');
    if (this.earlyDelivered.delete(r.msgId)) upgrade(r, 'delivered');
    if (r.conv === P.CONV.C2G) {
      // A small group's ack carries seq 0 (the post comes back as a Deliver); a large group's
      // carries the post's place in the group's own timeline, never the user's.
      if (ack.seq !== 0n) this.ownGroupPost(r, ack);
    } else if (ack.seq !== 0n && ack.prevSeq === this.lastSeq && ack.seq > this.lastSeq) {
      // c2c: the own entry is next in order when prev_seq is our last seq (section 5, SendAck);
      // otherwise a later push shows the gap and a sync brings it.
      this.lastSeq = ack.seq;
      r.seq = ack.seq.toString();
      this.scheduleAck();
    }
    this.changed();
  }

  // ---- groups --------------------------------------------------------------------------------

  /** Creates a group with `members` (uids); resolves with its id (string). */
  async createGroup(name, members) {
    const res = await this.request({
      type: 'GroupCreate',
      name,
      members: members.map((m) => P.toU64(m, 'member')),
      clientId: randomU64(), // idempotency key (the page does not retry a create yet)
    });
    if ((res.type !== 'OpResult' && res.type !== 'Error') || res.code !== P.ERR.Ok) {
      throw new Error(`${P.errName(res.code)}${res.message ? `: ${res.message}` : ''}`);
    }
    const id = res.id.toString();
    const g = this.groups.get(id) ?? { left: false };
    this.groups.set(id, { ...g, name, left: false });
    this.conv(`g:${id}`);
    this.changed();
    return id;
  }

  /** MyGroups → the group list (names). */
  async refreshGroups() {
    const res = await this.request({ type: 'MyGroups' });
    if (res.type !== 'GroupList') {
      throw new Error(`${P.errName(res.code)}${res.message ? `: ${res.message}` : ''}`);
    }
    const now = new Set();
    for (const { group, name } of res.groups) {
      const id = group.toString();
      now.add(id);
      this.groups.set(id, { name, left: false });
    }
    for (const [id, g] of this.groups) if (!now.has(id)) g.left = true;
    this.changed();
    return res.groups;
  }

  refreshGroupsSoon() {
    clearTimeout(this.groupsTimer);
    this.groupsTimer = setTimeout(() => {
      if (this.state === 'online' || this.state === 'syncing') this.refreshGroups().catch(() => {});
    }, 300);
  }

  /** GroupInfo → {name, owner, members: [{uid, role}]}. */
  async groupInfo(id) {
    const res = await this.request({ type: 'GroupInfo', group: id });
    if (res.type !== 'GroupInfoReply') {
      throw new Error(`${P.errName(res.code)}${res.message ? `: ${res.message}` : ''}`);
    }
    return {
      name: res.name,
      owner: res.owner.toString(),
      announcement: res.announcement,
      members: res.members.map((m) => ({ uid: m.uid.toString(), role: m.role })),
    };
  }

  // ---- organisation tree (contacts) ----------------------------------------------------------

  /**
   * One OrgSync request: records with a version above `since`, in version order. Resolves with
   * the OrgPage `{version, next, more, records}` (sync again from `next` while `more`); rejects
   * with an Error carrying `code` when refused. Does not touch the local model (orgSyncAll does).
   */
  async orgSync(since, limit = ORG_SYNC_LIMIT) {
    const res = await this.request({ type: 'OrgSync', since: P.toU64(since, 'since'), limit });
    if (res.type !== 'OrgPage') throw refused(res, 'OrgPage');
    return res;
  }

  /**
   * Brings the local model (`this.org`) up to date: OrgSync from the version held, page by page
   * while `more`, each record applied by version; then an 'org' event. Calls while one runs join
   * it (and make it sync once more). Retryable refusals (Unavailable while the server loads the
   * tree) are retried with a back-off. Resolves with the version reached.
   */
  orgSyncAll() {
    if (this.orgRunning) {
      this.orgResync = true;
      return this.orgRunning;
    }
    const run = async () => {
      let changed = 0;
      do {
        this.orgResync = false;
        let tries = 0;
        for (;;) {
          const since = this.org.version;
          let page;
          try {
            page = await this.orgSync(since);
          } catch (e) {
            if (P.isRetryable(e.code) && ++tries < ORG_RETRIES) {
              await sleep(Math.min(5000, 300 * 2 ** tries) * (0.5 + Math.random()));
              continue;
            }
            throw e;
          }
          tries = 0;
          for (const r of page.records) if (this.org.apply(r)) changed++;
          this.org.version = page.next;
          if (!page.more) break;
          if (page.next <= since) throw new Error(`OrgSync from ${since} made no progress`);
        }
      } while (this.orgResync);
      const first = !this.org.synced || this.org.error;
      this.org.synced = true;
      this.org.error = '';
      if (changed || first) {
        this.dispatchEvent(
          new CustomEvent('org', { detail: { version: this.org.version, changed } }),
        );
      }
      return this.org.version;
    };
    this.orgRunning = run()
      .catch((e) => {
        this.org.error = e.message;
        this.dispatchEvent(new CustomEvent('org', { detail: { version: this.org.version, error: e.message } }));
        throw e;
      })
      .finally(() => {
        this.orgRunning = null;
      });
    return this.orgRunning;
  }

  /**
   * A department (`0`: the top level) from the server: `{version, total, dept, children,
   * members: [{uid, dept, order, title, name}], records}`; `total` counts its members, of which
   * `members` holds the page from `offset`.
   */
  async orgDept(id, offset = 0, limit = 100) {
    const dept = P.toU64(id, 'dept');
    const res = await this.request({ type: 'OrgDept', dept, offset, limit });
    if (res.type !== 'OrgReply') throw refused(res, 'OrgReply');
    return deptReply(dept.toString(), res);
  }

  /** A user from the server: `{version, records}` (person, memberships, departments above). */
  async orgUser(uid) {
    const res = await this.request({ type: 'OrgUser', uid: P.toU64(uid, 'uid') });
    if (res.type !== 'OrgReply') throw refused(res, 'OrgReply');
    return { version: res.version, records: res.records };
  }

  /**
   * Departments and people whose name contains `query` (case-insensitive), from the server:
   * `{version, total, depts: [{id, parent, name, …}], people: [{uid, name}], records}`.
   */
  async orgSearch(query, limit = 50) {
    const res = await this.request({ type: 'OrgSearch', query, limit });
    if (res.type !== 'OrgReply') throw refused(res, 'OrgReply');
    const depts = [];
    const people = [];
    for (const r of res.records) {
      if (r.kind === 'dept') {
        depts.push({ id: r.id.toString(), parent: r.parent.toString(), order: r.order, hidden: r.hidden, name: r.name });
      } else if (r.kind === 'person') {
        people.push({ uid: r.uid.toString(), name: r.name });
      }
    }
    return { version: res.version, total: res.total, depts, people, records: res.records };
  }

  // ---- queries for the UI --------------------------------------------------------------------

  /**
   * The conversation the user views: its unread count and mentions are cleared, and a large
   * group's read cursor is moved to the highest post shown (GroupRead, once per change).
   */
  setActive(key) {
    this.activeConv = key;
    if (key) {
      const c = this.conv(key);
      c.unread = 0;
      c.mentions = 0;
      this.readActiveGroup();
      this.changed();
    }
  }

  /**
   * A conversation's records in display order: timeline order (seq; a large group's own seq for
   * its posts, msg id between the two timelines), unsequenced (pending) last.
   */
  messages(key) {
    const rs = [...this.records.values()].filter((r) => r.convKey === key);
    rs.sort(byPlace);
    return rs;
  }

  /** Conversations with their last record and unread count, most recent first. */
  conversations() {
    const last = new Map();
    for (const r of this.records.values()) {
      const l = last.get(r.convKey);
      if (!l || r.order > l.order) last.set(r.convKey, r);
    }
    const out = [];
    for (const [key, c] of this.convs) {
      out.push({ key, unread: c.unread, mentions: c.mentions ?? 0, last: last.get(key) ?? null });
    }
    out.sort((a, b) => (b.last?.order ?? 0) - (a.last?.order ?? 0));
    return out;
  }

  /**
   * Follows the presence of these users (at most 256: the server's limit per connection); their
   * states arrive as 'change' events (see `presenceOf`). Sent only when the list changed since
   * the last one this connection sent.
   */
  followPresence(uids) {
    const list = [...new Set(uids.map(String))].slice(0, 256).sort();
    const key = list.join(',');
    if (key === this.presenceList || this.state !== 'online') return Promise.resolve();
    this.presenceList = key;
    return this.request({ type: 'PresenceSubscribe', users: list.map(BigInt) }).then(
      (r) => {
        if (r.type !== 'OpResult' || r.code !== P.ERR.Ok) {
          this.presenceList = null;
          throw new Error(refusal(r));
        }
      },
      (e) => {
        this.presenceList = null;
        throw e;
      },
    );
  }

  /** Hides this user's presence from everyone (`true`) or shows it; stored by the server. */
  async setPresenceHidden(hidden) {
    const r = await this.request({ type: 'PresencePrivacy', hidden });
    if (r.type !== 'OpResult' || r.code !== P.ERR.Ok) throw new Error(refusal(r));
  }

  /** `{online, lastSeenMs}` of a followed user, or undefined while not known. */
  presenceOf(uid) {
    return this.presence.get(String(uid));
  }

  /**
   * Tells the other side of `convKey` that this user types (`on`; repeated at most every
   * TYPING_REPEAT_MS) or stopped (sent only after a `true`). Refusals are logged, not raised.
   */
  typing(convKey, on) {
    const kind = convKind(convKey);
    if ((kind !== 'u' && kind !== 'g') || this.state !== 'online') return;
    const now = Date.now();
    if (on) {
      if (now - (this.typingSentAt.get(convKey) ?? -Infinity) < TYPING_REPEAT_MS) return;
      this.typingSentAt.set(convKey, now);
    } else {
      if (!this.typingSentAt.has(convKey)) return;
      this.typingSentAt.delete(convKey);
    }
    const cmd = {
      type: 'Typing',
      conv: kind === 'g' ? P.CONV.C2G : P.CONV.C2C,
      peer: BigInt(convPeer(convKey)),
      state: on ? 1 : 0,
    };
    this.request(cmd).then(
      (r) => {
        if (r.type === 'Error') this.log('info', `typing: ${refusal(r)}`);
      },
      () => {},
    );
  }

  /** The users (uid strings) typing in `convKey` now. */
  typingIn(convKey) {
    const now = Date.now();
    return [...(this.typers.get(convKey) ?? [])].filter(([, until]) => until > now).map(([u]) => u);
  }

  title(key) {
    const id = convPeer(key);
    switch (convKind(key)) {
      case 'u': {
        const p = this.org.person(id);
        return p?.name ? p.name : `User ${id}`;
      }
      case 'g': {
        const g = this.groups.get(id);
        return g?.name ? g.name : `Group ${id}`;
      }
      case 's':
        return `Service ${id}`;
      default:
        return key;
    }
  }
}

function upgrade(r, status) {
  if ((STATUS_RANK[status] ?? 0) > (STATUS_RANK[r.status] ?? 0)) r.status = status;
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// ---- file messages -----------------------------------------------------------------------------

const UPLOAD_CHUNK = 1 << 20;

function hexOf(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function bytesOf(hex) {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function refusal(res) {
  return `${P.errName(res.code)}${res.message ? `: ${res.message}` : ''}`;
}

const KIND_NAME = { 1: 'image', 2: 'voice', 3: 'video', 4: 'file' };

/** The line shown for a file message (and its fallback text). */
export function fileText(f) {
  return `[${KIND_NAME[f.kind] ?? 'file'} ${f.name}]`.replace(' ]', ']');
}

/** A record's JSON-safe file (hex ids, size as a string) → the message body. */
export function fileBody(f) {
  return P.encodeFileRef({
    kind: f.kind,
    sha256: bytesOf(f.sha256),
    size: BigInt(f.size),
    key: bytesOf(f.key),
    mime: f.mime,
    name: f.name,
    width: f.width,
    height: f.height,
    durationMs: f.durationMs,
    thumb: new Uint8Array(0),
  });
}

/** What a record holds of a message body: `{text}`, or `{text, file}` for a file message. */
export function bodyContent(body) {
  let f = null;
  try {
    f = P.decodeFileRef(body);
  } catch (e) {
    return { text: `[unreadable file message: ${e.message}]` };
  }
  if (!f) return { text: P.text(body) };
  const file = {
    kind: f.kind,
    sha256: hexOf(f.sha256),
    size: f.size.toString(),
    key: hexOf(f.key),
    mime: f.mime,
    name: f.name,
    width: f.width,
    height: f.height,
    durationMs: f.durationMs,
  };
  return { text: fileText(file), file };
}

/**
 * The HTTP part of an upload: begin with the ticket, then `PATCH` the bytes in chunks, going on
 * from the server's `Upload-Offset` after a refused chunk. Resolves with `{sha256, key}`.
 */
export async function uploadBytes(fetchFn, url, ticket, bytes) {
  const auth = { Authorization: `Ticket ${ticket}` };
  const fail = async (what, r) => {
    let why = `HTTP ${r.status}`;
    try {
      why = (await r.json()).error?.message ?? why;
    } catch {
      /* not JSON */
    }
    return new Error(`${what}: ${why}`);
  };
  const begun = await fetchFn(url, { method: 'POST', headers: auth });
  if (begun.status !== 201) throw await fail('upload refused', begun);
  const { upload } = await begun.json();
  const at = `${url}/${upload}`;
  let offset = 0;
  for (let refused = 0; refused < 8; ) {
    const piece = bytes.subarray(offset, offset + UPLOAD_CHUNK);
    const r = await fetchFn(at, {
      method: 'PATCH',
      headers: { ...auth, 'Upload-Offset': String(offset), 'Content-Type': 'application/offset+octet-stream' },
      body: piece,
    });
    if (r.status === 201) {
      const done = await r.json();
      return { sha256: bytesOf(done.sha256), key: done.key };
    }
    if (r.status !== 204 && r.status !== 409) throw await fail('upload failed', r);
    if (r.status === 409) refused++;
    offset = Number(r.headers.get('Upload-Offset'));
  }
  throw new Error('upload failed: the server kept refusing the chunks');
}

function safe(f) {
  try {
    return f();
  } catch {
    return null;
  }
}

/** One line for the protocol log. */
export function describe(cmd, reqId) {
  const parts = [];
  for (const [k, v] of Object.entries(cmd)) {
    if (k === 'type') continue;
    if (k === 'token') parts.push('token=…');
    else if (v instanceof Uint8Array) parts.push(`${k}=${JSON.stringify(P.text(v)).slice(0, 40)}`);
    else if (k === 'message' && typeof v === 'object') parts.push(`seq=${v.seq} prev=${v.prevSeq} conv=${v.conv} from=${v.from}`);
    else if (Array.isArray(v)) parts.push(`${k}=[${v.length}]`);
    else parts.push(`${k}=${v}`);
  }
  return `${cmd.type}#${reqId} ${parts.join(' ')}`;
}
