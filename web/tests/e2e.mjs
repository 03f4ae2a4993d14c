// Browser test of the web page against a running server: two Chromium pages (users A and B)
// log in, chat with each other (✓ then ✓✓), B goes away and syncs what it missed when it comes
// back, both chat with a TCP client C, the three share a group, and A sends B a picture (uploaded
// over HTTP, shown on both pages from its signed URL). With an HTTP API (--api-url and
// a key), it also imports an organisation tree there and checks A's Contacts panel: the imported
// department and person show up (pushed by OrgChanged), the search finds the person, and a click on
// the person opens the chat with them. Without --api-url that part is skipped.
//
// It starts nothing but Chromium. The server and the TCP client C are provided by the caller
// (server/tests/web_browser.rs), which talks to this script through lines:
//   this script → stdout:  READY | STEP <name> [key=value …] | PASS
//   caller → stdin:        OK <name> | FAIL <name> <reason>
// Diagnostics go to stderr. With --no-tcp the C steps are skipped (no caller needed).
//
// Options (flags, or the environment variables in brackets):
//   --page-url URL     the page, e.g. http://127.0.0.1:7001/            [IM_PAGE_URL] (required)
//   --ws-url URL       the WebSocket URL; default: ws://<page host>/ws  [IM_WS_URL]
//   --uid-a/-b/-c N    user ids of A, B and the TCP client C            [IM_UID_A, IM_UID_B, IM_UID_C]
//   --im-server PATH   mint tokens with `PATH token --uid N`            [IM_SERVER_BIN]
//   --token-secret S   else mint them here with this secret (default: the dev secret) [IM_TOKEN_SECRET]
//   --chromium PATH    default /usr/bin/chromium                        [IM_CHROMIUM]
//   --out DIR          screenshots; default <repo>/target/web-e2e       [IM_E2E_OUT]
//   --no-tcp           skip the steps with C
//   --api-url URL      the server's HTTP API, e.g. http://127.0.0.1:8080 [IM_API_URL]
//   --api-key ID       a key id of its [api.keys]                      [IM_API_KEY]
//   --api-secret S     that key's secret                               [IM_API_SECRET]
import './node-globals.mjs';
import { execFileSync } from 'node:child_process';
import { createHash, createHmac } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { deflateSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { DEV_SECRET, mintDevToken } from '../static/token.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..', '..');

// ---- options ----------------------------------------------------------------------------------

function options() {
  const o = {
    pageUrl: process.env.IM_PAGE_URL,
    wsUrl: process.env.IM_WS_URL,
    uidA: process.env.IM_UID_A ?? '101',
    uidB: process.env.IM_UID_B ?? '102',
    uidC: process.env.IM_UID_C ?? '103',
    imServer: process.env.IM_SERVER_BIN,
    tokenSecret: process.env.IM_TOKEN_SECRET ?? DEV_SECRET,
    chromium: process.env.IM_CHROMIUM ?? '/usr/bin/chromium',
    out: process.env.IM_E2E_OUT ?? path.join(repo, 'target', 'web-e2e'),
    apiUrl: process.env.IM_API_URL,
    apiKey: process.env.IM_API_KEY,
    apiSecret: process.env.IM_API_SECRET,
    tcp: true,
  };
  const names = {
    '--page-url': 'pageUrl',
    '--ws-url': 'wsUrl',
    '--uid-a': 'uidA',
    '--uid-b': 'uidB',
    '--uid-c': 'uidC',
    '--im-server': 'imServer',
    '--token-secret': 'tokenSecret',
    '--chromium': 'chromium',
    '--out': 'out',
    '--api-url': 'apiUrl',
    '--api-key': 'apiKey',
    '--api-secret': 'apiSecret',
  };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--no-tcp') o.tcp = false;
    else if (names[a] && i + 1 < argv.length) o[names[a]] = argv[++i];
    else throw new Error(`unknown argument ${a}`);
  }
  if (!o.pageUrl) throw new Error('--page-url (or IM_PAGE_URL) is required');
  if (o.apiUrl && !(o.apiKey && o.apiSecret)) throw new Error('--api-url needs --api-key and --api-secret');
  if (!o.wsUrl) {
    const u = new URL(o.pageUrl);
    o.wsUrl = `${u.protocol === 'https:' ? 'wss' : 'ws'}://${u.host}/ws`;
  }
  return o;
}

const opt = options();
const log = (...a) => console.error('[e2e]', ...a);
const nonce = Math.random().toString(36).slice(2, 7);
const WAIT = 15_000;

async function token(uid) {
  if (opt.imServer) {
    return execFileSync(opt.imServer, ['token', '--uid', String(uid)], { encoding: 'utf8' }).trim();
  }
  return mintDevToken(opt.tokenSecret, uid);
}

// ---- the line protocol with the caller --------------------------------------------------------

const stdinLines = [];
const stdinWaiters = [];
let stdinClosed = false;
if (opt.tcp) {
  const rl = createInterface({ input: process.stdin });
  rl.on('line', (l) => {
    const w = stdinWaiters.shift();
    if (w) w(l);
    else stdinLines.push(l);
  });
  rl.on('close', () => {
    stdinClosed = true;
    for (const w of stdinWaiters.splice(0)) w(null);
  });
}

function nextLine(ms) {
  if (stdinLines.length) return Promise.resolve(stdinLines.shift());
  if (stdinClosed) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      stdinWaiters.splice(stdinWaiters.indexOf(w), 1);
      reject(new Error(`no answer from the caller within ${ms} ms`));
    }, ms);
    const w = (l) => {
      clearTimeout(t);
      resolve(l);
    };
    stdinWaiters.push(w);
  });
}

/** Announces a step to the caller and waits for its `OK <name>`. */
async function step(name, args = {}) {
  if (!opt.tcp) return false;
  const kv = Object.entries(args).map(([k, v]) => `${k}=${v}`);
  console.log(['STEP', name, ...kv].join(' '));
  const l = await nextLine(30_000);
  if (l === null) throw new Error(`caller closed stdin during step ${name}`);
  const [word, n, ...rest] = l.trim().split(' ');
  if (word === 'OK' && n === name) return true;
  throw new Error(`step ${name}: caller answered ${JSON.stringify(l)}${rest.length ? '' : ''}`);
}

// ---- page helpers -----------------------------------------------------------------------------

function pageUrl() {
  const u = new URL(opt.pageUrl);
  u.searchParams.set('ws', opt.wsUrl);
  return u.toString();
}

async function online(page) {
  await page.locator('#conn-status[data-state="online"]').waitFor({ timeout: WAIT });
}

async function login(page, uid) {
  await page.goto(pageUrl());
  await page.fill('#login-uid', String(uid));
  await page.fill('#login-token', await token(uid));
  await page.click('#login-submit');
  await page.locator('#chat-view').waitFor({ state: 'visible', timeout: WAIT });
  await online(page);
}

/** Opens the conversation with a user (through the "Chat" form). */
async function openChat(page, uid) {
  await page.fill('#peer-input', String(uid));
  await page.press('#peer-input', 'Enter');
  await page.locator(`#chat-title[data-conv="u:${uid}"]`).waitFor({ timeout: WAIT });
}

/** Opens a conversation from the side lists once it shows up there. */
async function openConv(page, key) {
  const item = page.locator(`li[data-conv="${key}"]`);
  await item.waitFor({ timeout: WAIT });
  await item.click();
  await page.locator(`#chat-title[data-conv="${key}"]`).waitFor({ timeout: WAIT });
}

async function send(page, text) {
  await page.fill('#message-input', text);
  await page.press('#message-input', 'Enter');
  await mine(page, text).waitFor({ timeout: WAIT });
}

const mine = (page, text, status) =>
  page.locator(`#messages li.msg.mine${status ? `[data-status="${status}"]` : ''}`, { hasText: text });

const theirs = (page, text) => page.locator('#messages li.msg.theirs', { hasText: text });

async function sees(page, text) {
  await theirs(page, text).waitFor({ timeout: WAIT });
}

async function ticks(page, text, status, tick) {
  const m = mine(page, text, status);
  await m.waitFor({ timeout: WAIT });
  const t = (await m.locator('.tick').textContent()).trim();
  if (t !== tick) throw new Error(`"${text}": tick ${JSON.stringify(t)}, want ${tick}`);
}

async function evalIm(page, f) {
  return page.evaluate(f);
}

// ---- the HTTP API (docs/API.md, "Authentication of business servers") ------------------------

const sha256hex = (b) => createHash('sha256').update(b).digest('hex');

/** X-IM-Signature: hex HMAC-SHA256(secret, "METHOD\npath_and_query\ntimestamp\nhex(sha256(body))"). */
function apiSignature(secret, method, target, ts, body) {
  return createHmac('sha256', secret)
    .update([method, target, String(ts), sha256hex(Buffer.from(body, 'utf8'))].join('\n'))
    .digest('hex');
}

/** A signed API call; resolves with the JSON answer, throws unless 200. */
async function api(method, target, body = '') {
  const ts = Math.floor(Date.now() / 1000);
  const res = await fetch(new URL(target, opt.apiUrl), {
    method,
    headers: {
      'X-IM-Key': opt.apiKey,
      'X-IM-Timestamp': String(ts),
      'X-IM-Signature': apiSignature(opt.apiSecret, method, target, ts, body),
      ...(body ? { 'Content-Type': 'application/json' } : {}),
    },
    body: body || undefined,
  });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`${method} ${target}: ${res.status} ${text}`);
  return JSON.parse(text);
}

/**
 * The Contacts panel of A's page: a department and its people imported over the API reach the
 * page (OrgChanged, then an incremental OrgSync), search finds a person, a click opens the chat.
 */
async function contacts(page, A, B) {
  const vector = apiSignature('s3cret', 'POST', '/v1/messages', 1700000000, '{"from":1,"to_users":[2],"body":"hi"}');
  if (vector !== 'bf48d4e25582901b595e3b5811c510b68b1016a467a39591f2e02cd75934febd') {
    throw new Error(`the request signature does not match docs/API.md's test vector: ${vector}`);
  }
  const top = 700_000 + Math.floor(Math.random() * 100_000) * 2;
  const team = top + 1;
  const [nameA, nameB] = [`Alice ${nonce}`, `Bob ${nonce}`];
  const imported = await api(
    'POST',
    '/v1/org/import',
    JSON.stringify({
      departments: [
        { id: top, name: `E2E company ${nonce}` },
        { id: team, parent: top, name: `Chat team ${nonce}`, order: 1 },
      ],
      users: [
        { uid: Number(A), name: nameA, departments: [{ dept: team, title: 'tester' }] },
        { uid: Number(B), name: nameB, departments: [{ dept: team, title: 'peer', order: 1 }] },
      ],
    }),
  );
  log(`org tree imported at version ${imported.version}`);
  /** Opens a department of the tree (once it is shown) unless it is open already. */
  const open = async (id, name) => {
    const li = page.locator(`#org-tree li.org-dept[data-dept-id="${id}"]`);
    await li.filter({ hasText: name }).first().waitFor({ timeout: WAIT });
    if ((await li.getAttribute('aria-expanded')) !== 'true') await li.locator(':scope > .org-row').click();
    await page.locator(`#org-tree li.org-dept[data-dept-id="${id}"][aria-expanded="true"]`).waitFor({ timeout: WAIT });
  };
  await open(top, `E2E company ${nonce}`);
  await open(team, `Chat team ${nonce}`);
  const bob = page.locator(`#org-tree li.org-person[data-uid="${B}"][data-dept="${team}"]`);
  await bob.filter({ hasText: nameB }).filter({ hasText: 'peer' }).waitFor({ timeout: WAIT });
  await page.locator(`#org-tree li.org-person.me[data-uid="${A}"]`, { hasText: nameA }).waitFor({ timeout: WAIT });
  const version = await evalIm(page, () => String(window.im.org.version));
  if (BigInt(version) < BigInt(imported.version)) throw new Error(`A's tree is at ${version}, want ${imported.version}`);

  log('contacts: search, then a click on the person opens the chat');
  await page.fill('#org-search', `bob ${nonce}`);
  await page.locator(`#org-tree li.org-person[data-uid="${B}"]`, { hasText: `Chat team ${nonce} · peer` }).waitFor({ timeout: WAIT });
  if ((await page.locator('#org-tree li.org-dept').count()) !== 0) throw new Error('the search lists departments');
  await page.fill('#org-search', '');
  await bob.click();
  const title = page.locator(`#chat-title[data-conv="u:${B}"]`);
  await title.waitFor({ timeout: WAIT });
  if ((await title.textContent()) !== nameB) throw new Error(`chat title ${await title.textContent()}, want ${nameB}`);
  await page.locator(`#conv-list li[data-conv="u:${B}"]`, { hasText: nameB }).waitFor({ timeout: WAIT });
}

// ---- the scenario -----------------------------------------------------------------------------

/** A valid `w`×`h` RGB PNG (a gradient), built here: zlib from Node, CRC-32 by hand. */
function png(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (b) => {
    let c = 0xffffffff;
    for (const x of b) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const t = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const sum = Buffer.alloc(4);
    sum.writeUInt32BE(crc(t));
    return Buffer.concat([len, t, sum]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8 bits, RGB
  const rows = [];
  for (let y = 0; y < h; y++) {
    rows.push(0); // filter: none
    for (let x = 0; x < w; x++) rows.push((x * 2) & 0xff, (y * 3) & 0xff, 200);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(Buffer.from(rows))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

async function run(browser) {
  const { uidA: A, uidB: B, uidC: C } = opt;
  const ctxA = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const ctxB = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const pa = await ctxA.newPage();
  let pb = await ctxB.newPage();
  for (const [p, n] of [
    [pa, 'A'],
    [pb, 'B'],
  ]) {
    p.on('pageerror', (e) => log(`page ${n} error:`, e.message));
    p.on('console', (m) => m.type() === 'error' && log(`page ${n} console:`, m.text()));
  }
  const pages = { pa, get pb() { return pb; } };

  try {
    log('A and B log in');
    await login(pa, A);
    await login(pb, B);

    log('A → B, ✓✓');
    const t1 = `hello B, from A ${nonce}`;
    await openChat(pa, B);
    await send(pa, t1);
    await openConv(pb, `u:${A}`);
    await sees(pb, t1);
    await ticks(pa, t1, 'delivered', '✓✓');

    log('B → A, ✓✓');
    const t2 = `hi A, B here ${nonce}`;
    await send(pb, t2);
    await sees(pa, t2);
    await ticks(pb, t2, 'delivered', '✓✓');

    log('presence and typing: A sees B online, then typing, then hidden and shown');
    await pa.locator(`#conv-list li[data-conv="u:${B}"][data-online="true"]`).waitFor({ timeout: WAIT });
    await pa.locator('#chat-status', { hasText: 'online' }).waitFor({ timeout: WAIT });
    await pb.type('#message-input', 'typ');
    await pa.locator('#chat-status', { hasText: 'typing…' }).waitFor({ timeout: WAIT });
    await pb.fill('#message-input', '');
    await pa.locator('#chat-status', { hasText: /^online$/ }).waitFor({ timeout: WAIT });
    await pb.check('#hide-presence');
    await pa.locator(`#conv-list li[data-conv="u:${B}"][data-online="false"]`).waitFor({ timeout: WAIT });
    await pb.uncheck('#hide-presence');
    await pa.locator(`#conv-list li[data-conv="u:${B}"][data-online="true"]`).waitFor({ timeout: WAIT });

    log('B leaves; A sends while B is away');
    const seqBefore = BigInt(await evalIm(pb, () => String(window.im.lastSeq)));
    await pb.goto('about:blank');
    const away = [`while you were away 1 ${nonce}`, `while you were away 2 ${nonce}`];
    for (const t of away) {
      await send(pa, t);
      await ticks(pa, t, 'sent', '✓');
    }
    // B's presence: offline once the server's offline delay (5 s) has passed.
    await pa.locator(`#conv-list li[data-conv="u:${B}"][data-online="false"]`).waitFor({ timeout: WAIT });
    await step('b_offline'); // C sends to B (offline) and to A
    if (opt.tcp) {
      await openConv(pa, `u:${C}`);
      await sees(pa, `hello A, from C`);
    }

    log('B comes back: the reload logs in again and syncs');
    await pb.goto(pageUrl());
    await online(pb);
    const seqAfter = BigInt(await evalIm(pb, () => String(window.im.lastSeq)));
    if (!(seqAfter > seqBefore)) throw new Error(`B's last seq did not move: ${seqBefore} → ${seqAfter}`);
    await openConv(pb, `u:${A}`);
    for (const t of [t1, ...away]) await pb.locator('#messages li.msg', { hasText: t }).waitFor({ timeout: WAIT });
    await ticks(pb, t2, 'delivered', '✓✓'); // the local history survived the reload
    await openConv(pa, `u:${B}`);
    for (const t of away) await ticks(pa, t, 'delivered', '✓✓');
    const stored = await evalIm(pb, () => localStorage.getItem(`im.v1.${window.im.me}.state`));
    if (!stored || !JSON.parse(stored).lastSeq) throw new Error('B keeps no last seq in localStorage');

    if (opt.tcp) {
      log('both chat with the TCP client C');
      await openConv(pb, `u:${C}`);
      await sees(pb, `hello B, from C`);
      await openConv(pa, `u:${C}`);
      await send(pa, `hello C, from A ${nonce}`);
      await send(pb, `hello C, from B ${nonce}`);
      await step('to_c', { a: `hello C, from A ${nonce}`.replaceAll(' ', '_'), b: `hello C, from B ${nonce}`.replaceAll(' ', '_') });
      await ticks(pa, `hello C, from A ${nonce}`, 'delivered', '✓✓');
      await ticks(pb, `hello C, from B ${nonce}`, 'delivered', '✓✓');
    }

    log('groups: A creates one with B (and C), everyone posts');
    const gname = `team ${nonce}`;
    await pa.fill('#group-name', gname);
    await pa.fill('#group-members', opt.tcp ? `${B}, ${C}` : `${B}`);
    await pa.press('#group-members', 'Enter');
    const title = pa.locator('#chat-title[data-conv^="g:"]');
    await title.waitFor({ timeout: WAIT });
    const gid = (await title.getAttribute('data-conv')).slice(2);
    if ((await title.textContent()) !== gname) throw new Error(`group title ${await title.textContent()}`);
    await pa.locator('#messages li.msg.system', { hasText: 'you created the group' }).waitFor({ timeout: WAIT });
    const g1 = `hello team, A here ${nonce}`;
    await send(pa, g1);
    await ticks(pa, g1, 'sent', '✓');
    await openConv(pb, `g:${gid}`);
    await pb.locator(`#group-list li[data-group-id="${gid}"]`, { hasText: gname }).waitFor({ timeout: WAIT });
    await sees(pb, g1);
    const g2 = `B in the team ${nonce}`;
    await send(pb, g2);
    await sees(pa, g2);
    if (await step('group', { gid, text: g1.replaceAll(' ', '_') })) {
      await sees(pa, 'C in the team');
      await sees(pb, 'C in the team');
    }
    log('B lists its groups (MyGroups)');
    await pb.click('#refresh-groups');
    await pb.locator(`#group-list li[data-group-id="${gid}"]`, { hasText: gname }).waitFor({ timeout: WAIT });
    const listed = await evalIm(pb, () => [...window.im.groups.keys()]);
    if (!listed.includes(gid)) throw new Error(`MyGroups of B lacks ${gid}: ${listed}`);

    // Heartbeats kept both connections up: no reconnect on A, one login on B's new page.
    const logins = [await evalIm(pa, () => window.im.logins), await evalIm(pb, () => window.im.logins)];
    if (logins[0] !== 1 || logins[1] !== 1) throw new Error(`unexpected reconnects: logins ${logins}`);

    log('pictures: A sends a PNG to B; both pages show it, loaded from its signed URL');
    await openConv(pa, `u:${B}`);
    const picture = `dot-${nonce}.png`;
    await pa.setInputFiles('#file-input', { name: picture, mimeType: 'image/png', buffer: png(120, 80) });
    await openConv(pb, `u:${A}`);
    for (const p of [pb, pa]) {
      await p.waitForFunction(
        (alt) => {
          const i = document.querySelector(`#messages img.file-image[alt="${alt}"]`);
          return i && i.complete && i.naturalWidth === 120 && i.naturalHeight === 80;
        },
        picture,
        { timeout: WAIT },
      );
    }

    if (opt.apiUrl) {
      log('contacts: an organisation tree imported over the API');
      await contacts(pa, A, B);
    } else {
      log('contacts: skipped (no --api-url)');
    }

    log('screenshots');
    mkdirSync(opt.out, { recursive: true });
    await openConv(pa, `u:${B}`);
    await pa.screenshot({ path: path.join(opt.out, 'chat.png') });
    await pb.screenshot({ path: path.join(opt.out, 'group.png') });
    log(`saved ${path.join(opt.out, 'chat.png')}`);
  } catch (e) {
    try {
      mkdirSync(opt.out, { recursive: true });
      await pages.pa.screenshot({ path: path.join(opt.out, 'failure-a.png') });
      await pages.pb.screenshot({ path: path.join(opt.out, 'failure-b.png') });
      log(`failure screenshots in ${opt.out}`);
    } catch {
      /* the page may be gone */
    }
    throw e;
  }
}

async function main() {
  log(`page ${opt.pageUrl}, ws ${opt.wsUrl}, users A=${opt.uidA} B=${opt.uidB} C=${opt.uidC}`);
  // launch() gives Chromium a fresh temporary profile (--user-data-dir) of its own; each
  // browser context below is isolated from the other (own localStorage).
  const profile = mkdtempSync(path.join(tmpdir(), 'im-e2e-'));
  const browser = await chromium.launch({
    executablePath: opt.chromium,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage', // small /dev/shm in containers
    ],
    env: { ...process.env, HOME: profile },
    timeout: 60_000,
  });
  console.log('READY');
  try {
    await run(browser);
  } finally {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  }
  console.log('PASS');
}

main().then(
  () => process.exit(0),
  (e) => {
    log('FAILED:', e.stack ?? e);
    console.log(`FAIL ${String(e.message ?? e).split('\n')[0]}`);
    process.exit(1);
  },
);
