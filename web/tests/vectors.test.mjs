// The web codec against the machine-readable vectors of docs/vectors/server-frames.json: every
// frame the server encodes (written by shared/tests/vectors.rs from the Rust encoder) decodes
// here to the fields the vector states (written by hand from PROTOCOL.md).
// Run: node --test web/tests/
import './node-globals.mjs';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { decode } from '../static/proto.js';

const file = new URL('../../docs/vectors/server-frames.json', import.meta.url);
const { vectors } = JSON.parse(readFileSync(file, 'utf8'));

function bytes(hex) {
  return Uint8Array.from(hex.match(/../g) ?? [], (h) => parseInt(h, 16));
}

/** The vectors' conventions: u64 (BigInt) as a decimal string, bytes as lower-case hex. */
function norm(v) {
  if (typeof v === 'bigint') return v.toString();
  if (v instanceof Uint8Array) return Array.from(v, (b) => b.toString(16).padStart(2, '0')).join('');
  if (Array.isArray(v)) return v.map(norm);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)]));
  return v;
}

test('there are vectors of every kind of server frame a client handles', () => {
  const kinds = new Set(vectors.map((v) => v.cmd));
  for (const k of ['LoginResult', 'SendAck', 'Deliver', 'SyncPage', 'Delivered', 'Kickout', 'Error', 'FileUrl', 'OrgPage']) {
    assert.ok(kinds.has(k), `no vector of ${k}`);
  }
});

for (const v of vectors) {
  test(`vector: ${v.name}`, () => {
    const { type, reqId, ...fields } = decode(bytes(v.hex));
    assert.equal(type, v.cmd);
    assert.equal(reqId, v.reqId);
    assert.deepEqual(norm(fields), v.fields);
  });
}
