// The web chat page: login form, conversations, groups, messages with delivery ticks, and the
// organisation tree as a contact list.
// The protocol session lives in client.js; this file only renders it and forwards user input.

import { ImClient, convKind, convPeer } from './client.js';
import { DEV_SECRET, mintDevToken } from './token.js';

const $ = (sel) => document.querySelector(sel);
const SESSION_KEY = 'im.web.session'; // sessionStorage: {ws, uid, token} of this tab
const PREFS_KEY = 'im.web.prefs'; // localStorage: {ws, uid} to prefill the form
const DEVICE_KEY = 'im.web.device'; // localStorage: this browser's device id

const TICKS = { pending: '🕓', sent: '✓', delivered: '✓✓', read: '✓✓', failed: '⚠ retry' };
const TICK_TITLES = {
  pending: 'sending…',
  sent: 'sent: stored by the server',
  delivered: 'delivered to a device of the recipient',
  read: 'read',
  failed: 'not sent: click to retry',
};

let client = null;
let active = null; // the open conversation key
let renderQueued = false;
let toastTimer = null;
const expanded = new Set(); // department ids open in the contacts tree
let orgDirty = true; // the contacts need rendering again
let orgShown = false; // the tree has been shown once (its single top department opened)

function defaultWsUrl() {
  if (location.protocol === 'http:' || location.protocol === 'https:') {
    return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  }
  return 'ws://127.0.0.1:7001/ws';
}

function deviceId() {
  let id = localStorage.getItem(DEVICE_KEY);
  if (!id) {
    const b = crypto.getRandomValues(new Uint8Array(8));
    id = `web-${Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('')}`;
    localStorage.setItem(DEVICE_KEY, id);
  }
  return id;
}

function readJson(storage, key) {
  try {
    return JSON.parse(storage.getItem(key) ?? 'null');
  } catch {
    return null;
  }
}

function toast(text, ms = 4000) {
  const t = $('#toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    t.hidden = true;
  }, ms);
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function fmtTime(ms) {
  const d = new Date(ms);
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
}

// ---- login ------------------------------------------------------------------------------------

function showLogin(error = '') {
  $('#chat-view').hidden = true;
  $('#login-view').hidden = false;
  $('#login-error').textContent = error;
  $('#login-submit').disabled = false;
}

function showChat() {
  $('#login-view').hidden = true;
  $('#chat-view').hidden = false;
  $('#me-uid').textContent = client.me;
}

function start({ ws, uid, token }) {
  if (client) client.finish('replaced', '');
  $('#login-error').textContent = '';
  $('#login-submit').disabled = true;
  const c = new ImClient({ url: ws, uid, token, deviceId: deviceId(), storage: localStorage });
  client = c;
  window.im = c; // for the console and the browser test
  active = null;
  expanded.clear();
  fileUrls.clear(); // signed for the previous user
  orgDirty = true;
  orgShown = false;
  let shown = false;
  c.addEventListener('loggedin', () => {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify({ ws, uid: c.me, token }));
    localStorage.setItem(PREFS_KEY, JSON.stringify({ ws, uid: c.me }));
    if (!shown) {
      shown = true;
      showChat();
      const first = c.conversations()[0];
      openConv(first ? first.key : null);
    }
  });
  c.addEventListener('state', () => {
    if (!shown && c === client) {
      // Still on the login form: say what is going on, and let the user change the server.
      const waiting = { connecting: 'connecting…', offline: 'cannot reach the server; retrying…' };
      $('#login-error').textContent = waiting[c.state] ?? '';
      $('#login-submit').disabled = c.state === 'connecting';
    }
    render();
  });
  c.addEventListener('change', render);
  c.addEventListener('org', () => {
    // A tree with a single top department opens it the first time (nothing else to pick there).
    const roots = c.org.roots();
    if (!orgShown && roots.length) {
      orgShown = true;
      if (roots.length === 1) expanded.add(roots[0].id);
    }
    orgDirty = true;
    render();
  });
  c.addEventListener('notice', (e) => toast(e.detail.text));
  c.addEventListener('log', (e) => addLog(e.detail));
  c.addEventListener('stopped', (e) => {
    if (c !== client) return;
    const { reason, text } = e.detail;
    if (reason === 'logout' || reason === 'replaced') return;
    sessionStorage.removeItem(SESSION_KEY);
    if (!shown) {
      showLogin(text);
    } else {
      toast(text, 10_000);
      render();
    }
  });
  c.start();
  render();
}

async function onLoginSubmit(e) {
  e.preventDefault();
  const ws = $('#login-ws').value.trim();
  const uid = $('#login-uid').value.trim();
  const token = $('#login-token').value.trim();
  if (!/^[1-9][0-9]*$/.test(uid)) {
    $('#login-error').textContent = 'the user id is a positive number';
    return;
  }
  if (!token) {
    $('#login-error').textContent = 'a token is needed (paste one, or mint a development token)';
    return;
  }
  start({ ws, uid, token });
}

async function onMint() {
  const uid = $('#login-uid').value.trim();
  if (!/^[1-9][0-9]*$/.test(uid)) {
    $('#login-error').textContent = 'enter the user id first';
    return;
  }
  try {
    $('#login-token').value = await mintDevToken($('#mint-secret').value, uid);
    $('#login-error').textContent = '';
  } catch (err) {
    $('#login-error').textContent = err.message;
  }
}

async function onLogout() {
  sessionStorage.removeItem(SESSION_KEY);
  const c = client;
  if (c) await c.logout();
  client = null;
  fileUrls.clear();
  showLogin('');
  $('#login-token').value = '';
}

// ---- conversations ----------------------------------------------------------------------------

function openConv(key) {
  active = key;
  client.setActive(key);
  $('#group-info').hidden = true;
  render();
  if (key) $('#message-input').focus();
}

function onNewChat(e) {
  e.preventDefault();
  const v = $('#peer-input').value.trim();
  if (!/^[1-9][0-9]*$/.test(v)) {
    toast('a user id is a positive number');
    return;
  }
  $('#peer-input').value = '';
  openConv(`u:${v}`);
}

async function onNewGroup(e) {
  e.preventDefault();
  const name = $('#group-name').value.trim();
  const members = $('#group-members')
    .value.split(/[\s,;]+/)
    .filter(Boolean);
  if (members.some((m) => !/^[1-9][0-9]*$/.test(m))) {
    toast('members: user ids separated by commas');
    return;
  }
  try {
    const id = await client.createGroup(name, members);
    $('#group-name').value = '';
    $('#group-members').value = '';
    openConv(`g:${id}`);
  } catch (err) {
    toast(`group not created: ${err.message}`);
  }
}

async function onRefreshGroups() {
  try {
    const gs = await client.refreshGroups();
    toast(`${gs.length} group${gs.length === 1 ? '' : 's'}`, 1500);
  } catch (err) {
    toast(`could not list groups: ${err.message}`);
  }
}

async function onGroupInfo() {
  const box = $('#group-info');
  if (!box.hidden) {
    box.hidden = true;
    return;
  }
  try {
    const info = await client.groupInfo(convPeer(active));
    const names = info.members.map((m) => (m.role === 2 ? `${m.uid} (owner)` : m.uid));
    box.textContent = `${info.members.length} members: ${names.join(', ')}${
      info.announcement ? ` — ${info.announcement}` : ''
    }`;
    box.hidden = false;
  } catch (err) {
    toast(`group info: ${err.message}`);
  }
}

function onSend(e) {
  e.preventDefault();
  const input = $('#message-input');
  const text = input.value;
  if (!text.trim() || !active) return;
  try {
    client.sendText(active, text);
    client.typing(active, false);
    input.value = '';
  } catch (err) {
    toast(err.message);
  }
}

// ---- files ------------------------------------------------------------------------------------

/** Download URLs by `fileSource` key, reused for 50 minutes (a URL lives an hour). */
const fileUrls = new Map();

/**
 * Where the download URL of file message `r` is asked, or null while it has no place yet (being
 * sent). A large group's post: by its seq in the group's own timeline, `gseq`, and the group of
 * its conversation (`g:<group>`): GroupFileDownload. Otherwise a message of the user's own
 * timeline, the own entry's ack seq, or a mention entry (of a large group's post not synced from
 * the group yet): by that seq of the user's timeline (FileDownload). URLs are signed for the
 * user: the cache is emptied at logout and when another session starts.
 */
function fileSource(r) {
  if (r.gseq && r.convKey && convKind(r.convKey) === 'g') {
    const group = convPeer(r.convKey);
    return { key: `g:${group}:${r.gseq}`, ask: () => client.groupFileUrl(group, r.gseq) };
  }
  const seq = r.seq ?? r.ackSeq ?? r.mentionSeq;
  if (seq) return { key: `u:${seq}`, ask: () => client.fileUrl(seq) };
  return null;
}

function cachedUrl(src) {
  const hit = fileUrls.get(src.key);
  return hit && Date.now() - hit.at < 50 * 60_000 ? hit.url : null;
}

async function urlOf(src) {
  const known = cachedUrl(src);
  if (known) return known;
  const url = await src.ask();
  fileUrls.set(src.key, { url, at: Date.now() });
  return url;
}

/** What a file message shows: the picture itself, or a link that fetches the file. */
function fileView(r) {
  const f = r.file;
  if (!f) return null;
  const src = fileSource(r);
  if (!src) return el('span', { class: 'file pending' }, `${r.text} (sending…)`);
  if (f.kind === 1) {
    const img = el('img', { class: 'file-image', alt: f.name || 'picture', title: f.name });
    if (f.width && f.height) img.style.aspectRatio = `${f.width} / ${f.height}`;
    const known = cachedUrl(src);
    if (known) img.src = known;
    else
      urlOf(src)
        .then((u) => (img.src = u))
        .catch((e) => img.replaceWith(el('span', { class: 'file error' }, `${r.text}: ${e.message}`)));
    return img;
  }
  const kb = Math.max(1, Math.round(Number(f.size) / 1024));
  return el(
    'a',
    {
      href: '#',
      class: 'file link',
      onclick: async (e) => {
        e.preventDefault();
        try {
          window.open(await urlOf(src), '_blank', 'noopener');
        } catch (err) {
          toast(`file: ${err.message}`);
        }
      },
    },
    `⬇ ${f.name || 'file'} (${kb} KiB)`,
  );
}

async function onAttach(e) {
  const file = e.target.files?.[0];
  e.target.value = '';
  if (!file || !active) return;
  const mime = file.type || 'application/octet-stream';
  let width = 0;
  let height = 0;
  if (mime.startsWith('image/') && typeof createImageBitmap === 'function') {
    try {
      const bmp = await createImageBitmap(file);
      [width, height] = [bmp.width, bmp.height];
      bmp.close?.();
    } catch {
      /* not decodable here: sent without its size */
    }
  }
  try {
    await client.sendFile(active, file, { name: file.name, mime, width, height });
  } catch (err) {
    toast(`not sent: ${err.message}`);
  }
}

// ---- contacts ---------------------------------------------------------------------------------

function toggleDept(id) {
  if (expanded.has(id)) expanded.delete(id);
  else expanded.add(id);
  orgDirty = true;
  render();
}

/** Shows a department in the tree: opens it and every department above it. */
function revealDept(id) {
  for (const d of client.org.path(id)) expanded.add(d);
  $('#org-search').value = '';
  orgDirty = true;
  render();
  requestAnimationFrame(() =>
    document.querySelector(`#org-tree li[data-dept-id="${id}"]`)?.scrollIntoView({ block: 'nearest' }),
  );
}

function onOrgSearch() {
  orgDirty = true;
  render();
}

function deptNode(d) {
  const org = client.org;
  const open = expanded.has(d.id);
  const count = org.memberCount(d.id);
  const li = el(
    'li',
    { class: 'org-dept', dataset: { deptId: d.id }, role: 'treeitem', 'aria-expanded': String(open) },
    el(
      'button',
      { type: 'button', class: 'org-row', title: `department ${d.id}`, onclick: () => toggleDept(d.id) },
      el('span', { class: 'caret' }, open ? '▾' : '▸'),
      el('span', { class: 'name' }, d.name),
      count ? el('span', { class: 'count' }, String(count)) : null,
    ),
  );
  if (open) {
    const items = [...org.children(d.id).map(deptNode), ...org.membersOf(d.id).map((m) => personNode(m, m.title))];
    li.append(el('ul', { role: 'group' }, ...(items.length ? items : [el('li', { class: 'empty' }, 'Nobody here')])));
  }
  return li;
}

/** A person; a click opens the chat with them (as the "Chat" form does with a typed uid). */
function personNode(p, sub) {
  const me = p.uid === client.me;
  return el(
    'li',
    { class: me ? 'org-person me' : 'org-person', dataset: { uid: p.uid, dept: p.dept ?? '' }, role: 'treeitem' },
    el(
      'button',
      {
        type: 'button',
        class: 'org-row',
        title: me ? 'you' : `chat with user ${p.uid}`,
        onclick: me ? undefined : () => openConv(`u:${p.uid}`),
      },
      el('span', { class: 'caret' }, ''),
      el('span', { class: 'name' }, `${p.name || `User ${p.uid}`}${me ? ' (you)' : ''}`),
      sub ? el('span', { class: 'title' }, sub) : null,
    ),
  );
}

function renderContacts() {
  if (!orgDirty) return;
  orgDirty = false;
  const org = client.org;
  const tree = $('#org-tree');
  $('#org-count').textContent = org.people.size ? String(org.people.size) : '';
  const q = $('#org-search').value.trim();
  if (q) {
    const r = org.search(q, 50);
    const items = [
      ...r.depts.map((d) => {
        const path = org.path(d.id).slice(0, -1).map((id) => org.dept(id).name).join(' › ');
        return el(
          'li',
          { class: 'org-dept', dataset: { deptId: d.id }, role: 'treeitem' },
          el(
            'button',
            { type: 'button', class: 'org-row', title: 'show in the tree', onclick: () => revealDept(d.id) },
            el('span', { class: 'caret' }, '▸'),
            el('span', { class: 'name' }, d.name),
            path ? el('span', { class: 'title' }, path) : null,
          ),
        );
      }),
      ...r.people.map((p) => {
        const where = org.deptsOf(p.uid).map((d) => {
          const t = org.membership(p.uid, d.id)?.title;
          return t ? `${d.name} · ${t}` : d.name;
        });
        return personNode(p, where.join(', '));
      }),
    ];
    if (r.total > items.length) items.push(el('li', { class: 'empty' }, `${r.total - items.length} more…`));
    tree.replaceChildren(...(items.length ? items : [el('li', { class: 'empty' }, 'No match')]));
    return;
  }
  const roots = org.roots();
  let empty = null;
  if (!roots.length) {
    empty = org.synced ? 'No organisation tree' : org.error ? `Not loaded: ${org.error}` : 'Loading…';
  }
  tree.replaceChildren(...(empty ? [el('li', { class: 'empty' }, empty)] : roots.map(deptNode)));
}

// ---- rendering --------------------------------------------------------------------------------

function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    if (!client) return;
    renderStatus();
    renderLists();
    renderContacts();
    renderMessages();
  });
}

function renderStatus() {
  const s = $('#conn-status');
  const labels = {
    online: 'online',
    syncing: 'syncing…',
    connecting: 'connecting…',
    offline: 'offline — reconnecting',
    stopped: 'disconnected',
  };
  s.dataset.state = client.state;
  s.textContent = labels[client.state] ?? client.state;
  $('#seq-info').textContent = `seq ${client.lastSeq}`;
}

function preview(r) {
  if (!r) return '';
  if (r.recalled) return 'message recalled';
  const group = convKind(r.convKey) === 'g' && !r.system;
  const who = r.from === client.me && !r.system ? 'You: ' : group ? `User ${r.from}: ` : '';
  return who + r.text;
}

function convItem(c, title) {
  return el(
    'li',
    {
      class: c.key === active ? 'active' : '',
      dataset: { conv: c.key },
      onclick: () => openConv(c.key),
      title: c.key,
    },
    el('span', { class: 'name' }, title),
    c.unread || c.mentions
      ? el(
          'span',
          { class: c.mentions ? 'badge mention' : 'badge', title: c.mentions ? 'you were mentioned' : undefined },
          `${c.mentions ? '@ ' : ''}${c.unread || ''}`.trim(),
        )
      : el('span'),
    el('span', { class: 'preview' }, preview(c.last)),
  );
}

/** "online", "typing…", "last seen 14:05" (local time) or "" for the header of `key`. */
function convStatus(key) {
  const typing = client.typingIn(key);
  if (typing.length) {
    return convKind(key) === 'g' ? `User ${typing.join(', User ')} typing…` : 'typing…';
  }
  if (convKind(key) !== 'u') return '';
  const p = client.presenceOf(convPeer(key));
  if (!p) return '';
  if (p.online) return 'online';
  if (!p.lastSeenMs) return 'offline';
  const t = new Date(p.lastSeenMs);
  return `last seen ${String(t.getHours()).padStart(2, '0')}:${String(t.getMinutes()).padStart(2, '0')}`;
}

function renderLists() {
  const convs = client.conversations();
  const people = convs.filter((c) => convKind(c.key) !== 'g');
  // Follow the presence of the people one has conversations with (the newest 256).
  client
    .followPresence(people.filter((c) => convKind(c.key) === 'u').map((c) => convPeer(c.key)))
    .catch((e) => addLog({ dir: 'info', text: `presence: ${e.message}` }));
  const list = $('#conv-list');
  list.replaceChildren(
    ...(people.length
      ? people.map((c) => {
          const li = convItem(c, client.title(c.key));
          const p = convKind(c.key) === 'u' ? client.presenceOf(convPeer(c.key)) : undefined;
          if (p) {
            li.prepend(el('span', { class: `dot ${p.online ? 'online' : ''}`, title: p.online ? 'online' : 'offline' }, '●'));
            li.dataset.online = String(p.online);
          }
          return li;
        })
      : [el('li', { class: 'empty' }, 'No conversations yet')]),
  );
  // Groups: the ones MyGroups lists, and any group conversation with history.
  const byKey = new Map(convs.filter((c) => convKind(c.key) === 'g').map((c) => [c.key, c]));
  for (const [id, g] of client.groups) {
    const key = `g:${id}`;
    if (!byKey.has(key) && !g.left) byKey.set(key, { key, unread: 0, last: null });
  }
  const groups = [...byKey.values()];
  $('#group-list').replaceChildren(
    ...(groups.length
      ? groups.map((c) => {
          const li = convItem(c, client.title(c.key));
          li.dataset.groupId = convPeer(c.key);
          if (client.groups.get(convPeer(c.key))?.left) li.classList.add('left');
          return li;
        })
      : [el('li', { class: 'empty' }, 'No groups')]),
  );
}

function renderMessages() {
  const box = $('#messages');
  const input = $('#message-input');
  const send = $('#send-btn');
  const attach = $('#attach-btn');
  $('#chat-status').textContent = active ? convStatus(active) : '';
  if (!active) {
    $('#chat-title').textContent = 'Pick a conversation';
    $('#group-info-btn').hidden = true;
    box.replaceChildren(
      el('li', { class: 'msg system' }, 'Start a chat with a user id, or create a group.'),
    );
    input.disabled = send.disabled = attach.disabled = true;
    return;
  }
  const kind = convKind(active);
  $('#chat-title').textContent = client.title(active);
  $('#chat-title').dataset.conv = active;
  $('#group-info-btn').hidden = kind !== 'g';
  const canSend = kind === 'u' || (kind === 'g' && !client.groups.get(convPeer(active))?.left);
  input.disabled = send.disabled = attach.disabled = !canSend;

  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const items = client.messages(active).map((r) => {
    if (r.system) {
      return el('li', { class: 'msg system', dataset: { msgId: r.msgId ?? '' } }, r.text);
    }
    const mine = r.from === client.me;
    const cls = ['msg', mine ? 'mine' : 'theirs', r.recalled ? 'recalled' : '', r.mentioned ? 'mentioned' : '']
      .filter(Boolean)
      .join(' ');
    const tick = mine
      ? el(
          'span',
          {
            class: 'tick',
            title: r.error ? `${TICK_TITLES[r.status]} (${r.error})` : TICK_TITLES[r.status],
            onclick: r.status === 'failed' ? () => client.retry(r.rid) : undefined,
          },
          TICKS[r.status] ?? '',
        )
      : null;
    return el(
      'li',
      {
        class: cls,
        dataset: {
          rid: r.rid,
          msgId: r.msgId ?? '',
          clientMsgId: r.clientMsgId,
          seq: r.seq ?? '',
          gseq: r.gseq ?? '',
          status: mine ? r.status : 'received',
          from: r.from,
        },
      },
      kind !== 'u' && !mine
        ? el(
            'div',
            { class: 'from' },
            `User ${r.from}`,
            r.mentioned ? el('span', { class: 'mention-badge', title: 'you were mentioned' }, '@you') : null,
          )
        : null,
      el('div', { class: 'text' }, r.recalled ? 'message recalled' : (fileView(r) ?? r.text)),
      el('div', { class: 'meta' }, fmtTime(r.timeMs), tick),
    );
  });
  box.replaceChildren(
    ...(items.length ? items : [el('li', { class: 'msg system' }, 'No messages yet. Say hello!')]),
  );
  if (atBottom || items.length < 2) box.scrollTop = box.scrollHeight;
}

function addLog({ dir, text }) {
  const log = $('#log');
  log.append(el('li', { class: dir, title: text }, `${dir === 'in' ? '←' : dir === 'out' ? '→' : '·'} ${text}`));
  while (log.children.length > 300) log.firstElementChild.remove();
}

// ---- boot -------------------------------------------------------------------------------------

function boot() {
  const q = new URLSearchParams(location.search);
  const prefs = readJson(localStorage, PREFS_KEY) ?? {};
  $('#login-ws').value = q.get('ws') ?? prefs.ws ?? defaultWsUrl();
  $('#login-uid').value = q.get('uid') ?? prefs.uid ?? '';
  $('#mint-secret').value = DEV_SECRET;

  $('#login-form').addEventListener('submit', onLoginSubmit);
  $('#mint-btn').addEventListener('click', onMint);
  $('#logout-btn').addEventListener('click', onLogout);
  $('#hide-presence').addEventListener('change', async (e) => {
    const box = e.target;
    try {
      await client.setPresenceHidden(box.checked);
      toast(box.checked ? 'your presence is hidden' : 'your presence is shown');
    } catch (err) {
      box.checked = !box.checked;
      toast(`presence: ${err.message}`);
    }
  });
  $('#new-chat').addEventListener('submit', onNewChat);
  $('#new-group').addEventListener('submit', onNewGroup);
  $('#refresh-groups').addEventListener('click', onRefreshGroups);
  $('#group-info-btn').addEventListener('click', onGroupInfo);
  $('#composer').addEventListener('submit', onSend);
  $('#message-input').addEventListener('input', (e) => {
    if (active) client.typing(active, e.target.value.trim() !== '');
  });
  $('#attach-btn').addEventListener('click', () => $('#file-input').click());
  $('#file-input').addEventListener('change', onAttach);
  $('#org-search').addEventListener('input', onOrgSearch);
  $('#org-search').addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      e.target.value = '';
      onOrgSearch();
    }
  });
  window.addEventListener('online', () => client?.reconnectNow());
  window.addEventListener('pagehide', () => client?.save());

  // A reload of this tab logs in again with the same session and syncs what it missed.
  const s = readJson(sessionStorage, SESSION_KEY);
  if (s?.ws && s.uid && s.token) {
    if (q.get('ws')) s.ws = q.get('ws');
    start(s);
  }
}

boot();
