// Protocol v1 codec (docs/PROTOCOL.md): frame header, every command's body, message kinds.
//
// Sans-io and dependency-free: runs in browsers and in Node. Conventions:
// - u64 fields (ids, seqs, times in ms) are BigInt when decoded; encoders take BigInt or a
//   non-negative safe integer Number;
// - u8/u16/u32 fields are Numbers, bool fields are booleans, `str` fields are strings,
//   `bytes` fields are Uint8Array (encoders also take a string, written as UTF-8);
// - a command is a plain object `{ type: 'SendC2c', clientMsgId, to, body }`; field names are
//   the document's names in camelCase;
// - decoders ignore trailing bytes (section 13) and throw ProtoError on truncated bodies, bad
//   UTF-8, bad magic or version.

export const HEADER_LEN = 12;
export const VERSION = 1;
export const MAGIC = [0x49, 0x4d]; // "IM"
/** Largest server body this client accepts (the server may send big SyncPages). */
export const MAX_SERVER_BODY = 16 * 1024 * 1024;
/** The server's default limit on client bodies. */
export const DEFAULT_MAX_CLIENT_BODY = 64 * 1024;

export const CMD = Object.freeze({
  Login: 0x01,
  Logout: 0x02,
  Heartbeat: 0x03,
  SendC2c: 0x10,
  DeliverAck: 0x11,
  SyncRequest: 0x12,
  SendC2g: 0x13,
  Recall: 0x14,
  ReadReport: 0x15,
  Report: 0x16,
  GroupCreate: 0x17,
  GroupAdd: 0x18,
  GroupRemove: 0x19,
  GroupLeave: 0x1a,
  GroupInfo: 0x1b,
  MyGroups: 0x1c,
  SetMute: 0x1d,
  RegisterPush: 0x1e,
  GroupUpdate: 0x1f,
  OrgSync: 0x20,
  OrgDept: 0x21,
  OrgUser: 0x22,
  OrgSearch: 0x23,
  FileUpload: 0x24,
  FileDownload: 0x25,
  Typing: 0x26,
  PresenceSubscribe: 0x27,
  PresencePrivacy: 0x28,
  GroupSync: 0x29,
  GroupRead: 0x2a,
  GroupMembers: 0x2b,
  GroupPosting: 0x2c,
  GroupRole: 0x2d,
  GroupFileDownload: 0x2e,
  LoginResult: 0x81,
  LogoutAck: 0x82,
  HeartbeatAck: 0x83,
  Kickout: 0x84,
  SendAck: 0x90,
  Deliver: 0x91,
  SyncPage: 0x92,
  Delivered: 0x93,
  OpResult: 0x94,
  GroupInfoReply: 0x95,
  GroupList: 0x96,
  OrgPage: 0x97,
  OrgReply: 0x98,
  OrgChanged: 0x99,
  FileTicket: 0x9a,
  FileUrl: 0x9b,
  TypingNotice: 0x9c,
  PresenceNotice: 0x9d,
  GroupDeliver: 0x9e,
  GroupSyncPage: 0x9f,
  GroupHeads: 0xa0,
  GroupMembersPage: 0xa1,
  Error: 0xff,
});

/** Command byte → name. */
export const CMD_NAME = Object.freeze(
  Object.fromEntries(Object.entries(CMD).map(([k, v]) => [v, k])),
);

/** Message kinds (`Message.conv`). */
export const CONV = Object.freeze({
  C2C: 1,
  C2G: 2,
  S2C: 3,
  RECALL: 4,
  READ: 5,
  GROUP_EVENT: 6,
  MENTION: 7,
});

/** Most users one post mentions (`SendC2g` mentions; uid 0 = `@all`). */
export const MAX_MENTIONS = 20;

/** Error codes (section 7). Unknown codes decode as plain numbers too. */
export const ERR = Object.freeze({
  Ok: 0,
  Malformed: 1,
  FrameTooLarge: 2,
  UnsupportedVersion: 3,
  UnknownCommand: 4,
  NotLoggedIn: 5,
  AlreadyLoggedIn: 6,
  BadToken: 10,
  TokenExpired: 11,
  LoginTimeout: 12,
  InvalidArgument: 13,
  IdleTimeout: 14,
  SlowConsumer: 15,
  Internal: 20,
  Overloaded: 21,
  Unavailable: 22,
  Forbidden: 40,
  NotMember: 41,
  NotFound: 42,
  RecallRefused: 43,
  GroupFull: 44,
});

export const ERR_NAME = Object.freeze(
  Object.fromEntries(Object.entries(ERR).map(([k, v]) => [v, k])),
);

/** Codes after which the same request may be retried (with the same client_msg_id). */
export function isRetryable(code) {
  return code === ERR.Internal || code === ERR.Overloaded || code === ERR.Unavailable;
}

/** Human-readable name of an error code. */
export function errName(code) {
  return ERR_NAME[code] ?? `code ${code}`;
}

export const DEVICE = Object.freeze({ Phone: 1, Tablet: 2, Desktop: 3, Web: 4 });
export const KICK = Object.freeze({ SameDeviceType: 1, ServerShutdown: 2, Admin: 3 });
export const GROUP_EVENT = Object.freeze({
  Created: 1,
  MembersAdded: 2,
  MembersRemoved: 3,
  MemberLeft: 4,
  Updated: 5,
  BecameLarge: 6,
  AdminAdded: 7,
  AdminRemoved: 8,
});
export const ROLE = Object.freeze({ Member: 0, Admin: 1, Owner: 2 });
/** Kinds of organisation-tree records (the record's tag byte): `record.kind` is the key. */
export const ORG_TAG = Object.freeze({ dept: 1, person: 2, member: 3 });
/** Most records the server puts in one OrgPage or OrgReply (a larger limit is capped). */
export const MAX_ORG_PAGE = 1000;

/** Milliseconds since 2024-01-01T00:00:00Z at the top of a msg id (section 10). */
export const MSG_ID_EPOCH_MS = 1_704_067_200_000n;

/** Unix milliseconds at which a msg id was made. */
export function msgIdTimeMs(msgId) {
  return Number((BigInt(msgId) >> 22n) + MSG_ID_EPOCH_MS);
}

export class ProtoError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ProtoError';
  }
}

const U64_MAX = (1n << 64n) - 1n;
const utf8Enc = new TextEncoder();
const utf8Dec = new TextDecoder('utf-8', { fatal: true });

/** UTF-8 bytes of a string. */
export function utf8(s) {
  return utf8Enc.encode(s);
}

/** Text of UTF-8 bytes; invalid sequences become U+FFFD (for displaying message bodies). */
export function text(bytes) {
  return new TextDecoder('utf-8').decode(bytes);
}

// ---------------------------------------------------------------------------------------------
// Field types. Each has `size(value)`, `put(writer, value)` and `get(reader, field)`.

class Writer {
  constructor(len) {
    this.buf = new Uint8Array(len);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }
  u8(v) {
    this.view.setUint8(this.pos, v);
    this.pos += 1;
  }
  u16(v) {
    this.view.setUint16(this.pos, v);
    this.pos += 2;
  }
  u32(v) {
    this.view.setUint32(this.pos, v);
    this.pos += 4;
  }
  u64(v) {
    this.view.setBigUint64(this.pos, v);
    this.pos += 8;
  }
  raw(b) {
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }
}

class Reader {
  constructor(bytes) {
    this.buf = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  need(n, field) {
    if (this.buf.length - this.pos < n) {
      throw new ProtoError(`body truncated while reading ${field}`);
    }
  }
  remaining() {
    return this.buf.length - this.pos;
  }
  u8(f) {
    this.need(1, f);
    return this.view.getUint8(this.pos++);
  }
  u16(f) {
    this.need(2, f);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }
  u32(f) {
    this.need(4, f);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }
  u64(f) {
    this.need(8, f);
    const v = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return v;
  }
  raw(n, f) {
    this.need(n, f);
    const b = this.buf.slice(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }
}

function checkInt(v, max, field) {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw new ProtoError(`field ${field}: ${v} is not an integer in 0..${max}`);
  }
  return v;
}

/** BigInt of a u64 field value (BigInt, safe integer Number, or decimal string). */
export function toU64(v, field = 'u64') {
  let b;
  if (typeof v === 'bigint') b = v;
  else if (typeof v === 'number' && Number.isSafeInteger(v)) b = BigInt(v);
  else if (typeof v === 'string' && /^[0-9]+$/.test(v)) b = BigInt(v);
  else throw new ProtoError(`field ${field}: ${String(v)} is not a u64`);
  if (b < 0n || b > U64_MAX) throw new ProtoError(`field ${field}: ${b} is out of the u64 range`);
  return b;
}

function asBytes(v, field) {
  if (v instanceof Uint8Array) return v;
  if (typeof v === 'string') return utf8(v);
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  throw new ProtoError(`field ${field}: expected Uint8Array or string`);
}

function strBytes(v, field) {
  if (typeof v !== 'string') throw new ProtoError(`field ${field}: expected a string`);
  const b = utf8(v);
  if (b.length > 0xffff) throw new ProtoError(`field ${field}: longer than 65535 bytes`);
  return b;
}

// Each type: [size(v, f), put(w, v, f), get(r, f)].
const T = {
  u8: {
    size: () => 1,
    put: (w, v, f) => w.u8(checkInt(v, 0xff, f)),
    get: (r, f) => r.u8(f),
  },
  u16: {
    size: () => 2,
    put: (w, v, f) => w.u16(checkInt(v, 0xffff, f)),
    get: (r, f) => r.u16(f),
  },
  u32: {
    size: () => 4,
    put: (w, v, f) => w.u32(checkInt(v, 0xffffffff, f)),
    get: (r, f) => r.u32(f),
  },
  u64: {
    size: () => 8,
    put: (w, v, f) => w.u64(toU64(v, f)),
    get: (r, f) => r.u64(f),
  },
  bool: {
    size: () => 1,
    put: (w, v) => w.u8(v ? 1 : 0),
    get: (r, f) => r.u8(f) !== 0,
  },
  str: {
    size: (v, f) => 2 + strBytes(v, f).length,
    put: (w, v, f) => {
      const b = strBytes(v, f);
      w.u16(b.length);
      w.raw(b);
    },
    get: (r, f) => {
      const n = r.u16(f);
      const b = r.raw(n, f);
      try {
        return utf8Dec.decode(b);
      } catch {
        throw new ProtoError(`field ${f} is not valid UTF-8`);
      }
    },
  },
  bytes: {
    size: (v, f) => 4 + asBytes(v, f).length,
    put: (w, v, f) => {
      const b = asBytes(v, f);
      w.u32(b.length);
      w.raw(b);
    },
    get: (r, f) => r.raw(r.u32(f), f),
  },
};

/** `n` raw bytes (a SHA-256, a file key). */
function fixed(n) {
  return {
    size: () => n,
    put: (w, v, f) => {
      const b = asBytes(v, f);
      if (b.length !== n) throw new ProtoError(`field ${f}: expected ${n} bytes, got ${b.length}`);
      w.raw(b);
    },
    get: (r, f) => r.raw(n, f),
  };
}

/**
 * An optional field at the end of a body (section 13): an absent or empty value is not written,
 * and a body that ends before it (or with fewer than `minBytes` left) decodes without the field.
 */
function trailing(t, minBytes) {
  const none = (v) => v === undefined || v === null || (Array.isArray(v) && v.length === 0);
  return {
    optional: true,
    size: (v, f) => (none(v) ? 0 : t.size(v, f)),
    put: (w, v, f) => {
      if (!none(v)) t.put(w, v, f);
    },
    get: (r, f) => (r.remaining() < minBytes ? undefined : t.get(r, f)),
  };
}

/** A record type from a field list `[[name, type], …]`. */
function record(fields) {
  const value = (v, name, f, t) => (t.optional ? v?.[name] : field(v, name, f));
  return {
    size(v, f) {
      let n = 0;
      for (const [name, t] of fields) n += t.size(value(v, name, f, t), name);
      return n;
    },
    put(w, v, f) {
      for (const [name, t] of fields) t.put(w, value(v, name, f, t), name);
    },
    get(r) {
      const o = {};
      for (const [name, t] of fields) {
        const x = t.get(r, name);
        if (x !== undefined || !t.optional) o[name] = x;
      }
      return o;
    },
  };
}

function field(obj, name, parent) {
  if (obj === null || typeof obj !== 'object' || !(name in obj)) {
    throw new ProtoError(`missing field ${name}${parent ? ` in ${parent}` : ''}`);
  }
  return obj[name];
}

/** A list with a count of type `countType` (u16 or u32) followed by items of type `item`. */
function list(countType, item) {
  const max = countType === T.u16 ? 0xffff : 0xffffffff;
  return {
    size(v, f) {
      if (!Array.isArray(v)) throw new ProtoError(`field ${f}: expected an array`);
      if (v.length > max) throw new ProtoError(`field ${f}: more than ${max} items`);
      let n = countType.size();
      for (const x of v) n += item.size(x, f);
      return n;
    },
    put(w, v, f) {
      countType.put(w, v.length, f);
      for (const x of v) item.put(w, x, f);
    },
    get(r, f) {
      const n = countType.get(r, `${f} count`);
      const out = [];
      for (let i = 0; i < n; i++) out.push(item.get(r, f));
      return out;
    },
  };
}

/** One timeline entry (section 5, "Message"): 61 fixed bytes and the body. */
const MESSAGE = record([
  ['seq', T.u64],
  ['prevSeq', T.u64],
  ['msgId', T.u64],
  ['conv', T.u8],
  ['from', T.u64],
  ['to', T.u64],
  ['clientMsgId', T.u64],
  ['serverTimeMs', T.u64],
  ['body', T.bytes],
]);

const UIDS = list(T.u16, T.u64);

/**
 * One record of the organisation tree (shared/src/org.rs, `OrgRecord`):
 * `tag:u8 version:u64 deleted:u8` then the fields of its kind. Decoded as
 * `{kind: 'dept', version, deleted, id, parent, order, hidden, name}`,
 * `{kind: 'person', version, deleted, uid, name}` or
 * `{kind: 'member', version, deleted, uid, dept, order, title}`.
 */
const ORG_HEAD = record([
  ['version', T.u64],
  ['deleted', T.bool],
]);
const ORG_BODY = {
  dept: record([
    ['id', T.u64],
    ['parent', T.u64],
    ['order', T.u32],
    ['hidden', T.bool],
    ['name', T.str],
  ]),
  person: record([
    ['uid', T.u64],
    ['name', T.str],
  ]),
  member: record([
    ['uid', T.u64],
    ['dept', T.u64],
    ['order', T.u32],
    ['title', T.str],
  ]),
};
const ORG_KIND = Object.fromEntries(Object.entries(ORG_TAG).map(([k, v]) => [v, k]));

function orgBody(v, f) {
  const body = ORG_BODY[v?.kind];
  if (!body) throw new ProtoError(`field ${f}: unknown org record kind ${v?.kind}`);
  return body;
}

const ORG_RECORD = {
  size: (v, f) => 1 + ORG_HEAD.size(v, f) + orgBody(v, f).size(v, f),
  put(w, v, f) {
    const body = orgBody(v, f);
    w.u8(ORG_TAG[v.kind]);
    ORG_HEAD.put(w, v, f);
    body.put(w, v, f);
  },
  get(r) {
    const tag = r.u8('org record tag');
    const head = ORG_HEAD.get(r);
    const kind = ORG_KIND[tag];
    if (!kind) throw new ProtoError(`unknown org record tag ${tag}`);
    return { kind, ...head, ...ORG_BODY[kind].get(r) };
  },
};

const ORG_RECORDS = list(T.u16, ORG_RECORD);

/** Body layouts by command name, fields in wire order. */
const LAYOUT = {
  Login: [
    ['uid', T.u64],
    ['deviceType', T.u8],
    ['deviceId', T.str],
    ['lastSeq', T.u64],
    ['token', T.str],
  ],
  Logout: [],
  Heartbeat: [],
  SendC2c: [
    ['clientMsgId', T.u64],
    ['to', T.u64],
    ['body', T.bytes],
  ],
  DeliverAck: [['seq', T.u64]],
  SyncRequest: [
    ['afterSeq', T.u64],
    ['limit', T.u16],
  ],
  // `mentions` (optional, trailing): `count:u16 uid:u64*`, uid 0 = @all; omitted when empty.
  // Decoded only when at least its count is there (like the server: one stray byte reads as none).
  SendC2g: [
    ['clientMsgId', T.u64],
    ['group', T.u64],
    ['body', T.bytes],
    ['mentions', trailing(list(T.u16, T.u64), 2)],
  ],
  Recall: [
    ['clientMsgId', T.u64],
    ['conv', T.u8],
    ['peer', T.u64],
    ['msgId', T.u64],
  ],
  ReadReport: [
    ['clientMsgId', T.u64],
    ['conv', T.u8],
    ['peer', T.u64],
    ['msgId', T.u64],
  ],
  Report: [
    ['clientMsgId', T.u64],
    ['topic', T.str],
    ['body', T.bytes],
  ],
  GroupCreate: [
    ['name', T.str],
    ['members', UIDS],
    ['clientId', T.u64],
  ],
  GroupAdd: [
    ['group', T.u64],
    ['members', UIDS],
  ],
  GroupRemove: [
    ['group', T.u64],
    ['members', UIDS],
  ],
  GroupLeave: [['group', T.u64]],
  GroupInfo: [['group', T.u64]],
  MyGroups: [],
  SetMute: [
    ['peer', T.u64],
    ['muted', T.bool],
  ],
  RegisterPush: [
    ['provider', T.u8],
    ['token', T.str],
  ],
  GroupUpdate: [
    ['group', T.u64],
    ['name', T.str],
    ['announcement', T.str],
  ],
  OrgSync: [
    ['since', T.u64],
    ['limit', T.u16],
  ],
  OrgDept: [
    ['dept', T.u64],
    ['offset', T.u32],
    ['limit', T.u16],
  ],
  OrgUser: [['uid', T.u64]],
  OrgSearch: [
    ['query', T.str],
    ['limit', T.u16],
  ],
  LoginResult: [
    ['code', T.u16],
    ['serverTimeMs', T.u64],
    ['maxSeq', T.u64],
    ['heartbeatSecs', T.u16],
    ['message', T.str],
  ],
  LogoutAck: [],
  HeartbeatAck: [['serverTimeMs', T.u64]],
  Kickout: [
    ['reason', T.u8],
    ['message', T.str],
  ],
  SendAck: [
    ['code', T.u16],
    ['clientMsgId', T.u64],
    ['msgId', T.u64],
    ['seq', T.u64],
    ['serverTimeMs', T.u64],
    ['prevSeq', T.u64],
  ],
  Deliver: [['message', MESSAGE]],
  SyncPage: [
    ['maxSeq', T.u64],
    ['hasMore', T.bool],
    ['messages', list(T.u16, MESSAGE)],
  ],
  Delivered: [
    ['msgId', T.u64],
    ['recipient', T.u64],
  ],
  OpResult: [
    ['code', T.u16],
    ['id', T.u64],
    ['message', T.str],
  ],
  GroupInfoReply: [
    ['group', T.u64],
    ['name', T.str],
    ['creator', T.u64],
    ['owner', T.u64],
    ['announcement', T.str],
    ['createdMs', T.u64],
    [
      'members',
      list(
        T.u32,
        record([
          ['uid', T.u64],
          ['role', T.u8],
        ]),
      ),
    ],
  ],
  GroupList: [
    [
      'groups',
      list(
        T.u16,
        record([
          ['group', T.u64],
          ['name', T.str],
        ]),
      ),
    ],
  ],
  OrgPage: [
    ['version', T.u64],
    ['next', T.u64],
    ['more', T.bool],
    ['records', ORG_RECORDS],
  ],
  OrgReply: [
    ['version', T.u64],
    ['total', T.u32],
    ['records', ORG_RECORDS],
  ],
  OrgChanged: [['version', T.u64]],
  FileUpload: [
    ['kind', T.u8],
    ['size', T.u64],
    ['sha256', fixed(32)],
    ['mime', T.str],
  ],
  FileDownload: [['seq', T.u64]],
  FileTicket: [
    ['url', T.str],
    ['ticket', T.str],
    ['expiresMs', T.u64],
  ],
  FileUrl: [
    ['url', T.str],
    ['expiresMs', T.u64],
  ],
  Typing: [
    ['conv', T.u8],
    ['peer', T.u64],
    ['state', T.u8],
  ],
  PresenceSubscribe: [['users', UIDS]],
  PresencePrivacy: [['hidden', T.bool]],
  GroupSync: [
    ['group', T.u64],
    ['afterSeq', T.u64],
    ['limit', T.u16],
  ],
  GroupRead: [
    ['group', T.u64],
    ['seq', T.u64],
  ],
  GroupMembers: [
    ['group', T.u64],
    ['after', T.u64],
    ['limit', T.u16],
  ],
  GroupPosting: [
    ['group', T.u64],
    ['ownerOnly', T.bool],
  ],
  GroupRole: [
    ['group', T.u64],
    ['uid', T.u64],
    ['role', T.u8],
  ],
  GroupFileDownload: [
    ['group', T.u64],
    ['seq', T.u64],
  ],
  GroupDeliver: [['message', MESSAGE]],
  GroupSyncPage: [
    ['group', T.u64],
    ['head', T.u64],
    ['hasMore', T.bool],
    ['messages', list(T.u16, MESSAGE)],
  ],
  GroupHeads: [
    [
      'heads',
      list(
        T.u16,
        record([
          ['group', T.u64],
          ['head', T.u64],
          ['read', T.u64],
        ]),
      ),
    ],
  ],
  GroupMembersPage: [
    ['group', T.u64],
    ['total', T.u32],
    ['more', T.bool],
    [
      'members',
      list(
        T.u16,
        record([
          ['uid', T.u64],
          ['role', T.u8],
        ]),
      ),
    ],
  ],
  TypingNotice: [
    ['conv', T.u8],
    ['peer', T.u64],
    ['from', T.u64],
    ['state', T.u8],
    ['ttlMs', T.u32],
  ],
  PresenceNotice: [
    [
      'entries',
      list(
        T.u16,
        record([
          ['uid', T.u64],
          ['online', T.bool],
          ['lastSeenMs', T.u64],
        ]),
      ),
    ],
  ],
  Error: [
    ['code', T.u16],
    ['message', T.str],
  ],
};

const BODY = Object.fromEntries(Object.entries(LAYOUT).map(([k, f]) => [k, record(f)]));

// ---------------------------------------------------------------------------------------------
// Frames.

/**
 * Encodes a command as one frame (header + body).
 * @param {{type: string}} cmd e.g. `{ type: 'SendC2c', clientMsgId: 1n, to: 43n, body: 'hi' }`
 * @param {number} reqId request id (section 6); 0 for pushes
 * @returns {Uint8Array}
 */
export function encode(cmd, reqId = 0) {
  const code = CMD[cmd?.type];
  const body = BODY[cmd?.type];
  if (code === undefined || !body) throw new ProtoError(`unknown command ${cmd?.type}`);
  const len = body.size(cmd, cmd.type);
  const w = new Writer(HEADER_LEN + len);
  w.u8(MAGIC[0]);
  w.u8(MAGIC[1]);
  w.u8(VERSION);
  w.u8(code);
  w.u32(checkInt(reqId, 0xffffffff, 'req_id'));
  w.u32(len);
  body.put(w, cmd, cmd.type);
  return w.buf;
}

/**
 * Parses the 12-byte header at the start of `bytes`.
 * @returns {{cmd: number, reqId: number, bodyLen: number}}
 */
export function decodeHeader(bytes) {
  if (bytes.length < HEADER_LEN) throw new ProtoError('header truncated');
  if (bytes[0] !== MAGIC[0] || bytes[1] !== MAGIC[1]) throw new ProtoError('bad magic');
  if (bytes[2] !== VERSION) throw new ProtoError(`unsupported protocol version ${bytes[2]}`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_LEN);
  return { cmd: bytes[3], reqId: v.getUint32(4), bodyLen: v.getUint32(8) };
}

/**
 * Decodes a body of command byte `cmd`. Trailing bytes are ignored.
 * @returns {{type: string}} the command object
 */
export function decodeBody(cmd, body) {
  const type = CMD_NAME[cmd];
  if (!type) throw new ProtoError(`unknown command byte 0x${cmd.toString(16)}`);
  const o = BODY[type].get(new Reader(body));
  return { type, ...o };
}

/**
 * Decodes one complete frame. Bytes after the frame's body are not allowed here (use
 * FrameReader for a stream).
 * @returns {{type: string, reqId: number}} the command with its request id
 */
export function decode(bytes) {
  const h = decodeHeader(bytes);
  if (bytes.length !== HEADER_LEN + h.bodyLen) {
    throw new ProtoError(
      `frame length ${bytes.length} does not match body_len ${h.bodyLen} + ${HEADER_LEN}`,
    );
  }
  return { ...decodeBody(h.cmd, bytes.subarray(HEADER_LEN)), reqId: h.reqId };
}

/**
 * Splits a byte stream into frames. Chunks may hold part of a frame or several frames (as TCP
 * reads do; a WebSocket message carries whole frames, which this handles the same way).
 */
export class FrameReader {
  constructor(maxBody = MAX_SERVER_BODY) {
    this.maxBody = maxBody;
    this.buf = new Uint8Array(0);
  }

  /**
   * Appends a chunk and returns the frames it completed, each `{cmd, reqId, body}` with the raw
   * body. Throws ProtoError on a bad header or a body above the limit (the stream is corrupt).
   */
  push(chunk) {
    const c = chunk instanceof Uint8Array ? chunk : new Uint8Array(chunk);
    if (this.buf.length === 0) {
      this.buf = c;
    } else {
      const b = new Uint8Array(this.buf.length + c.length);
      b.set(this.buf);
      b.set(c, this.buf.length);
      this.buf = b;
    }
    const frames = [];
    let pos = 0;
    while (this.buf.length - pos >= HEADER_LEN) {
      const h = decodeHeader(this.buf.subarray(pos, pos + HEADER_LEN));
      if (h.bodyLen > this.maxBody) {
        throw new ProtoError(`frame body of ${h.bodyLen} bytes is above ${this.maxBody}`);
      }
      const end = pos + HEADER_LEN + h.bodyLen;
      if (end > this.buf.length) break;
      frames.push({ cmd: h.cmd, reqId: h.reqId, body: this.buf.slice(pos + HEADER_LEN, end) });
      pos = end;
    }
    this.buf = this.buf.slice(pos);
    return frames;
  }

  /** Bytes buffered for an incomplete frame. */
  pending() {
    return this.buf.length;
  }
}

// ---------------------------------------------------------------------------------------------
// Bodies of the non-content message kinds.

const MARKER = record([
  ['conv', T.u8],
  ['msgId', T.u64],
]);

/** Body of a recall (kind 4) or read receipt (kind 5): `{conv, msgId}`. */
export function decodeMarker(body) {
  return MARKER.get(new Reader(body));
}

export function encodeMarker(m) {
  const w = new Writer(MARKER.size(m));
  MARKER.put(w, m);
  return w.buf;
}

const GROUP_EVENT_BODY = record([
  ['kind', T.u8],
  ['users', UIDS],
]);

/** Body of a group event (kind 6): `{kind, users: [BigInt…]}`. */
export function decodeGroupEvent(body) {
  return GROUP_EVENT_BODY.get(new Reader(body));
}

export function encodeGroupEvent(e) {
  const w = new Writer(GROUP_EVENT_BODY.size(e));
  GROUP_EVENT_BODY.put(w, e);
  return w.buf;
}

/** File kinds of a file message (PROTOCOL.md, "File messages"). */
export const FILE_KIND = Object.freeze({ Image: 1, Voice: 2, Video: 3, File: 4 });

/** First byte of a typed message body. */
export const TYPED_BODY = 0xff;

const FILE_REF = record([
  ['kind', T.u8],
  ['sha256', fixed(32)],
  ['size', T.u64],
  ['key', fixed(16)],
  ['mime', T.str],
  ['name', T.str],
  ['width', T.u32],
  ['height', T.u32],
  ['durationMs', T.u32],
  ['thumb', T.bytes],
]);

/**
 * The body of a file message: `0xFF` then `{kind, sha256, size, key, mime, name, width, height,
 * durationMs, thumb}` (sha256 32 bytes, key 16, size a BigInt).
 */
export function encodeFileRef(f) {
  const w = new Writer(1 + FILE_REF.size(f, 'file'));
  w.u8(TYPED_BODY);
  FILE_REF.put(w, f, 'file');
  return w.buf;
}

/**
 * A message body as a file reference; `null` when it is not a typed body (text). Throws
 * ProtoError for a typed body that is not a valid file reference.
 */
export function decodeFileRef(body) {
  if (!body || body.length === 0 || body[0] !== TYPED_BODY) return null;
  const r = new Reader(body.subarray(1));
  const f = FILE_REF.get(r);
  if (f.kind < 1 || f.kind > 4) throw new ProtoError(`typed body of unknown kind ${f.kind}`);
  return f;
}

/** Encodes one Message (as stored or in a Deliver body), e.g. for tests. */
export function encodeMessage(m) {
  const w = new Writer(MESSAGE.size(m));
  MESSAGE.put(w, m);
  return w.buf;
}

/** Encodes one organisation-tree record (`{kind, version, deleted, …}`), e.g. for tests. */
export function encodeOrgRecord(rec) {
  const w = new Writer(ORG_RECORD.size(rec, 'record'));
  ORG_RECORD.put(w, rec, 'record');
  return w.buf;
}

/** Decodes one organisation-tree record; trailing bytes are ignored. */
export function decodeOrgRecord(bytes) {
  return ORG_RECORD.get(new Reader(bytes));
}

/** Hex dump helper: `49 4d 01 …`. */
export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join(' ');
}
