// imd web client: plain ES modules, no framework, no build step.
//
// Data flow. Sign-in sets an HttpOnly session cookie; every request is a
// same-origin fetch carrying it, and one EventSource on /v1/events delivers
// everything live. The stream is opened first; once it says `ready`, the
// conversation list is fetched, and events that arrive meanwhile are queued
// and applied after it, so nothing falls between the two. Every message is
// kept by id (a replay after a reconnect can never show it twice) and counted
// by seq (a conversation's unread count only moves for a seq it has not seen).
//
// Reconnection. After a drop the client reopens the stream itself with
// ?last_event_id=<position>: the id of the last durable event, or the
// position a `ready` event reported. (EventSource's own retry would resend
// only the last `id:` line it saw, which is nothing while no durable event has
// arrived yet, and it gives up for good on a non-200 answer.) A `resync`
// event, sent when the position can no longer be served, refetches the list
// and catches the open conversation up with after_seq.

import { api, ApiError, uuid, enc } from './api.js';

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const PAGE = 50; // messages per history page
const TYPING_EVERY_MS = 2500; // the server coalesces typing to one per 2.5 s
const DURABLE = new Set([
  'message.created', 'conversation.created', 'conversation.updated',
  'member.added', 'member.removed', 'member.updated', 'receipt.read',
]);

// ---- state -----------------------------------------------------------------

let S = freshState();

function freshState() {
  return {
    me: null,
    convs: new Map(), // id → conversation (the server's view for this user)
    users: new Map(), // id → user, or a Promise while it loads
    presence: new Map(), // user id → {user_id, online, last_seen_at}
    hist: new Map(), // conversation id → {msgs: Map(id → message), pending: Map(key → draft), hasMore, loaded}
    reads: new Map(), // conversation id → Map(user id → read seq) from receipt.read
    typing: new Map(), // conversation id → Map(user id → expiry time ms)
    openId: null,
    loaded: false, // the conversation list has been fetched once
    queue: null, // events held while the list (re)loads
    lastEventId: '',
    es: null,
    retries: 0,
    retryTimer: 0,
    marking: false,
    markAgain: false,
    lastTypingSent: 0,
  };
}

const histOf = (id) => {
  let h = S.hist.get(id);
  if (!h) {
    h = { msgs: new Map(), pending: new Map(), hasMore: false, loaded: false, loading: false };
    S.hist.set(id, h);
  }
  return h;
};

// ---- boot, sign-in, sign-out ---------------------------------------------------

async function boot() {
  try {
    S.me = await api('GET', '/v1/me');
  } catch (e) {
    showAuth(e.status === 401 ? '' : describe(e));
    return;
  }
  S.users.set(S.me.id, S.me);
  showApp();
  connect();
}

function showAuth(message = '') {
  $('app').hidden = true;
  $('auth').hidden = false;
  selectAuthTab('login');
  document.title = 'imd — sign in';
  const err = document.querySelector('#login-form .form-error');
  err.textContent = message;
  err.hidden = !message;
  const first = document.querySelector('#auth form:not([hidden]) input');
  if (first) first.focus();
}

function showApp() {
  $('auth').hidden = true;
  $('app').hidden = false;
  $('me-name').textContent = S.me.display_name || S.me.id;
  $('me-name').title = '@' + S.me.id;
  paintAvatar($('me-avatar'), S.me.id, S.me.display_name);
  setConn('connecting');
  renderAll();
}

function signedOut(message) {
  if (S.es) S.es.close();
  clearTimeout(S.retryTimer);
  S = freshState();
  $('conv-list').replaceChildren();
  $('msg-list').replaceChildren();
  document.body.classList.remove('chat-open');
  if (location.hash) history.replaceState(null, '', location.pathname);
  showAuth(message);
}

function selectAuthTab(which, focus = false) {
  for (const t of document.querySelectorAll('[data-auth-tab]')) t.setAttribute('aria-selected', String(t.dataset.authTab === which));
  $('login-form').hidden = which !== 'login';
  $('register-form').hidden = which !== 'register';
  const first = $(which + '-form').querySelector('input');
  if (focus && first) first.focus();
}

function setupAuthForms() {
  for (const tab of document.querySelectorAll('[data-auth-tab]')) {
    tab.addEventListener('click', () => selectAuthTab(tab.dataset.authTab, true));
  }
  const run = (form, fn) => form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const btn = form.querySelector('button[type=submit]');
    const err = form.querySelector('.form-error');
    err.hidden = true;
    btn.disabled = true;
    try {
      await fn(Object.fromEntries(new FormData(form)));
      form.reset();
      await boot();
    } catch (e) {
      err.textContent = describe(e);
      err.hidden = false;
    } finally {
      btn.disabled = false;
    }
  });
  run($('login-form'), ({ username, password }) =>
    api('POST', '/v1/auth/login', { body: { username: username.trim(), password } }));
  run($('register-form'), async ({ username, display_name, password }) => {
    const body = { username: username.trim(), password };
    if (display_name.trim()) body.display_name = display_name.trim();
    await api('POST', '/v1/auth/register', { body });
    // Register returns a token but sets no cookie; log in for the session.
    await api('POST', '/v1/auth/login', { body: { username: body.username, password } });
  });
  $('logout').addEventListener('click', async () => {
    try {
      await api('POST', '/v1/auth/logout');
    } catch (e) {
      if (e.status !== 401) toast(e);
    }
    signedOut('');
  });
}

// ---- the event stream -------------------------------------------------------------

const handlers = {
  'message.created': onMessage,
  'conversation.created': onConversation,
  'conversation.updated': onConversation,
  'member.added': onMember,
  'member.removed': onMemberRemoved,
  'member.updated': onMember,
  'receipt.read': onReceipt,
  typing: onTyping,
  presence: onPresence,
  ready: onReady,
  resync: onResync,
};

function connect() {
  clearTimeout(S.retryTimer);
  S.retryTimer = 0;
  if (S.es) S.es.close();
  const url = '/v1/events' + (S.lastEventId ? '?last_event_id=' + enc(S.lastEventId) : '');
  const es = new EventSource(url); // same origin: the session cookie authenticates it
  S.es = es;
  for (const [type, fn] of Object.entries(handlers)) {
    es.addEventListener(type, (e) => receive(es, type, fn, e));
  }
  es.onerror = () => {
    if (S.es !== es) return;
    es.close();
    S.es = null;
    setConn(navigator.onLine === false ? 'offline' : 'reconnecting');
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  if (S.retryTimer || !S.me) return;
  const n = S.retries++;
  // EventSource cannot tell "refused" (401: signed out elsewhere) from a
  // network error; after a few failures ask the API which one it is.
  if (n >= 2) checkSession();
  const delay = Math.min(15000, 1000 * 2 ** Math.min(n, 4)) * (0.8 + Math.random() * 0.4);
  S.retryTimer = setTimeout(() => {
    S.retryTimer = 0;
    connect();
  }, delay);
}

async function checkSession() {
  try {
    await api('GET', '/v1/me');
  } catch (e) {
    if (e.status === 401) signedOut('Your session has ended. Please sign in again.');
  }
}

function receive(es, type, fn, e) {
  if (S.es !== es) return; // a stream replaced since
  let data;
  try {
    data = JSON.parse(e.data);
  } catch {
    console.error('imd: malformed event', type, e.data);
    return;
  }
  if (DURABLE.has(type) && e.lastEventId) S.lastEventId = e.lastEventId;
  if (S.queue && type !== 'ready' && type !== 'resync') {
    S.queue.push([fn, data]);
    return;
  }
  try {
    fn(data);
  } catch (err) {
    console.error('imd: event', type, err);
  }
}

function onReady(d) {
  if (d.last_event_id) S.lastEventId = d.last_event_id;
  S.retries = 0;
  setConn('live');
  if (!S.loaded) {
    reload(false);
  } else {
    refreshPresence(); // presence is ephemeral: what changed while away was not replayed
  }
}

function onResync(d) {
  console.info('imd: resync', d.reason);
  if (S.loaded) reload(true);
}

// reload fetches the conversation list while events queue, then applies
// them. With repair, cached histories are dropped and the open one caught up.
async function reload(repair) {
  if (S.queue) return; // already reloading; its queue catches what comes
  S.queue = [];
  const me = S.me;
  try {
    await loadConversations();
    if (repair) {
      for (const id of [...S.hist.keys()]) if (id !== S.openId) S.hist.delete(id);
      if (S.openId && S.convs.has(S.openId)) await catchUp(S.openId);
    }
    S.loaded = true;
  } catch (e) {
    toast(e);
    if (S.me === me) setTimeout(() => S.me === me && !S.loaded && reload(false), 3000);
  } finally {
    const q = S.queue || [];
    S.queue = null;
    for (const [fn, data] of q) {
      try {
        fn(data);
      } catch (err) {
        console.error('imd: queued event', err);
      }
    }
  }
  if (S.me !== me) return;
  if (S.openId && !S.convs.has(S.openId)) closeConversation();
  refreshPresence();
  renderAll();
  if (!S.openId) openFromHash();
  else markRead(); // the fresh list counts what the open conversation shows as unread
}

// ---- events ------------------------------------------------------------------------

function onMessage(m) {
  const c = S.convs.get(m.conversation_id);
  if (!c) {
    fetchConversation(m.conversation_id); // its view includes this message
    return;
  }
  applyMessage(m);
}

// applyMessage records a message from the stream or a send response; either
// may come first, and a replay may repeat it.
function applyMessage(m) {
  const c = S.convs.get(m.conversation_id);
  const h = S.hist.get(m.conversation_id);
  if (h && (h.loaded || h.loading)) addMessages(h, [m]);
  if (h && m.client_msg_id && m.sender_id === S.me.id) h.pending.delete(m.client_msg_id);
  stopTyping(m.conversation_id, m.sender_id);
  if (c && m.seq > c.last_seq) {
    c.last_seq = m.seq;
    c.last_message = m;
    c.last_activity_at = m.created_at;
    if (m.sender_id === S.me.id) {
      c.last_read_seq = Math.max(c.last_read_seq, m.seq);
    } else if (!(S.openId === c.id && pageVisible())) {
      c.unread_count += 1;
    }
  }
  if (c && S.openId === c.id && m.sender_id !== S.me.id) markRead();
  if (m.sender_id !== S.me.id) ensureUsers([m.sender_id]);
  render({ list: true, msgs: S.openId === m.conversation_id, typing: true });
}

function onConversation(view) {
  upsertConversation(view);
  ensureUsers(view.peer_id ? [view.peer_id] : []);
  if (view.peer_id && !S.presence.has(view.peer_id)) refreshPresence();
  render({ list: true, head: true });
}

function upsertConversation(view) {
  const old = S.convs.get(view.id);
  // An event's view may be older than what later messages already told us.
  if (old && old.last_seq > view.last_seq) {
    const { last_seq, last_read_seq, unread_count, last_message, last_activity_at } = old;
    S.convs.set(view.id, { ...view, last_seq, last_read_seq, unread_count, last_message, last_activity_at });
  } else {
    S.convs.set(view.id, view);
  }
}

async function fetchConversation(id) {
  try {
    onConversation(await api('GET', `/v1/conversations/${enc(id)}`));
  } catch (e) {
    if (e.status === 404) forgetConversation(id);
    else toast(e);
  }
}

function onMember(d) {
  fetchConversation(d.conversation_id); // member_count (or our own role) changed
}

function onMemberRemoved(d) {
  if (d.user_id !== S.me.id) {
    onMember(d);
    return;
  }
  const c = S.convs.get(d.conversation_id);
  forgetConversation(d.conversation_id);
  if (c && d.by !== S.me.id) toast(`You were removed from “${convName(c)}”.`, 'info');
}

function onReceipt(d) {
  const c = S.convs.get(d.conversation_id);
  if (!c) return;
  if (d.user_id === S.me.id) {
    // Read on another device.
    if (d.seq > c.last_read_seq) {
      c.last_read_seq = d.seq;
      if (d.seq >= c.last_seq) c.unread_count = 0;
      else fetchConversation(c.id);
    }
  } else {
    let m = S.reads.get(c.id);
    if (!m) S.reads.set(c.id, (m = new Map()));
    m.set(d.user_id, Math.max(m.get(d.user_id) || 0, d.seq));
  }
  render({ list: true, msgs: S.openId === c.id });
}

function onTyping(d) {
  if (d.user_id === S.me.id) return;
  let m = S.typing.get(d.conversation_id);
  if (!m) S.typing.set(d.conversation_id, (m = new Map()));
  const ms = Math.max(500, Number(d.expires_in_ms) || 5000);
  m.set(d.user_id, Date.now() + ms);
  ensureUsers([d.user_id]);
  setTimeout(() => render({ list: true, typing: true }), ms + 50);
  render({ list: true, typing: true });
}

function stopTyping(cid, uid) {
  const m = S.typing.get(cid);
  if (m) m.delete(uid);
}

function typingUsers(cid) {
  const m = S.typing.get(cid);
  if (!m) return [];
  const now = Date.now();
  const out = [];
  for (const [uid, until] of m) {
    if (until > now) out.push(uid);
    else m.delete(uid);
  }
  return out;
}

function onPresence(p) {
  S.presence.set(p.user_id, p);
  render({ list: true, head: true });
}

// ---- loading -----------------------------------------------------------------

async function loadConversations() {
  const all = [];
  let cursor = null;
  do {
    const page = await api('GET', '/v1/conversations', { query: { limit: 200, cursor } });
    all.push(...page.conversations);
    cursor = page.next_cursor;
  } while (cursor && all.length < 5000);
  S.convs = new Map(all.map((c) => [c.id, c]));
  const ids = new Set();
  for (const c of all) {
    if (c.peer_id) ids.add(c.peer_id);
    if (c.last_message) ids.add(c.last_message.sender_id);
  }
  ensureUsers([...ids]);
}

async function refreshPresence() {
  const peers = [...new Set([...S.convs.values()].filter((c) => c.peer_id).map((c) => c.peer_id))];
  for (let i = 0; i < peers.length; i += 200) {
    try {
      const r = await api('GET', '/v1/presence', { query: { user_ids: peers.slice(i, i + 200).join(',') } });
      for (const p of r.presence) S.presence.set(p.user_id, p);
    } catch (e) {
      toast(e);
      return;
    }
  }
  render({ list: true, head: true });
}

function ensureUsers(ids) {
  for (const id of ids) {
    if (!id || S.users.has(id)) continue;
    const p = api('GET', `/v1/users/${enc(id)}`).then(
      (u) => S.users.set(id, u),
      (e) => {
        S.users.set(id, { id, display_name: id });
        if (e.status !== 404) toast(e);
      },
    ).finally(() => render({ list: true, head: true, msgs: true, typing: true }));
    S.users.set(id, p);
  }
}

function addMessages(h, msgs) {
  for (const m of msgs) {
    h.msgs.set(m.id, m);
    if (m.client_msg_id) h.pending.delete(m.client_msg_id);
  }
}

async function loadLatest(id) {
  const h = histOf(id);
  if (h.loading) return;
  h.loading = true;
  try {
    const r = await api('GET', `/v1/conversations/${enc(id)}/messages`, { query: { limit: PAGE } });
    addMessages(h, r.messages);
    h.hasMore = r.has_more;
    h.loaded = true;
    ensureUsers(r.messages.map((m) => m.sender_id));
  } catch (e) {
    S.hist.delete(id);
    if (e.status === 404) forgetConversation(id);
    throw e;
  } finally {
    h.loading = false;
  }
}

async function loadOlder() {
  const id = S.openId;
  const h = S.hist.get(id);
  if (!h || !h.hasMore) return;
  const first = Math.min(...[...h.msgs.values()].map((m) => m.seq));
  const btn = $('load-older');
  btn.disabled = true;
  btn.textContent = 'Loading…';
  try {
    const r = await api('GET', `/v1/conversations/${enc(id)}/messages`, { query: { before_seq: first, limit: PAGE } });
    addMessages(h, r.messages);
    h.hasMore = r.has_more;
    h.keepBottomOffset = true;
    ensureUsers(r.messages.map((m) => m.sender_id));
  } catch (e) {
    toast(e);
  } finally {
    btn.disabled = false;
    btn.textContent = 'Load older messages';
    if (S.openId === id) render({ msgs: true });
  }
}

// catchUp fetches what the open conversation missed (after a resync).
async function catchUp(id) {
  const h = S.hist.get(id);
  if (!h || !h.loaded) return;
  let after = Math.max(0, ...[...h.msgs.values()].map((m) => m.seq));
  for (let i = 0; i < 40; i++) {
    const r = await api('GET', `/v1/conversations/${enc(id)}/messages`, { query: { after_seq: after, limit: 200 } });
    addMessages(h, r.messages);
    if (!r.has_more || r.messages.length === 0) return;
    after = r.messages[r.messages.length - 1].seq;
  }
}

function forgetConversation(id) {
  S.convs.delete(id);
  S.hist.delete(id);
  S.reads.delete(id);
  S.typing.delete(id);
  if (S.openId === id) closeConversation();
  render({ list: true });
}

// ---- actions ---------------------------------------------------------------------

function openFromHash() {
  const m = /^#\/c\/(.+)$/.exec(location.hash);
  const id = m ? decodeURIComponent(m[1]) : null;
  if (!id) {
    if (S.openId) closeConversation();
    return;
  }
  if (!S.loaded || id === S.openId) return;
  if (!S.convs.has(id)) {
    toast('That conversation does not exist, or you are not a member of it.');
    history.replaceState(null, '', location.pathname);
    return;
  }
  openConversation(id);
}

async function openConversation(id) {
  if (location.hash !== '#/c/' + enc(id)) {
    history.pushState(null, '', '#/c/' + enc(id));
  }
  S.openId = id;
  S.lastTypingSent = 0;
  document.body.classList.add('chat-open');
  const h = histOf(id);
  h.stick = true;
  renderAll();
  const composer = $('composer-text');
  composer.value = drafts.get(id) || '';
  autosize();
  if (window.matchMedia('(pointer: fine)').matches) composer.focus();
  if (!h.loaded) {
    try {
      await loadLatest(id);
    } catch (e) {
      toast(e);
      return;
    }
    if (S.openId !== id) return;
    h.stick = true;
    render({ msgs: true, head: true });
  }
  markRead();
}

function closeConversation() {
  S.openId = null;
  document.body.classList.remove('chat-open');
  if (location.hash) history.pushState(null, '', location.pathname);
  renderAll();
}

const drafts = new Map();

async function markRead() {
  const c = S.convs.get(S.openId);
  if (!c || !pageVisible() || (c.last_read_seq >= c.last_seq && c.unread_count === 0)) return;
  if (S.marking) {
    S.markAgain = true;
    return;
  }
  S.marking = true;
  try {
    const r = await api('PUT', `/v1/conversations/${enc(c.id)}/read`, { body: { seq: c.last_seq } });
    const now = S.convs.get(c.id);
    if (now) {
      now.last_read_seq = Math.max(now.last_read_seq, r.last_read_seq);
      now.unread_count = now.last_seq > r.last_read_seq ? Math.max(r.unread_count, 0) : 0;
    }
    render({ list: true });
  } catch (e) {
    if (e.status === 404) forgetConversation(c.id);
    else toast(e);
  } finally {
    S.marking = false;
    if (S.markAgain) {
      S.markAgain = false;
      markRead();
    }
  }
}

function pageVisible() {
  return document.visibilityState === 'visible';
}

async function send(text) {
  const id = S.openId;
  const h = histOf(id);
  const draft = { key: uuid(), convId: id, text, created_at: new Date().toISOString(), state: 'sending', error: '' };
  h.pending.set(draft.key, draft);
  h.stick = true;
  S.lastTypingSent = 0;
  render({ msgs: true });
  await deliver(draft);
}

// deliver POSTs a draft; a retry reuses its Idempotency-Key, so a send that
// did reach the server is not stored twice.
async function deliver(draft) {
  const h = histOf(draft.convId);
  draft.state = 'sending';
  draft.error = '';
  render({ msgs: true });
  try {
    const m = await api('POST', `/v1/conversations/${enc(draft.convId)}/messages`, {
      body: { text: draft.text },
      headers: { 'Idempotency-Key': draft.key },
    });
    h.pending.delete(draft.key);
    applyMessage(m);
  } catch (e) {
    if (e.status === 404) {
      h.pending.delete(draft.key);
      toast(e);
      forgetConversation(draft.convId);
    } else if (e.status >= 400 && e.status < 500 && e.status !== 429 && e.status !== 408) {
      // Refused for good (too long, invalid…): give the text back.
      h.pending.delete(draft.key);
      toast(e);
      const box = $('composer-text');
      if (S.openId === draft.convId && !box.value) {
        box.value = draft.text;
        autosize();
      }
    } else {
      draft.state = 'failed';
      draft.error = describe(e);
      toast(e);
    }
  }
  render({ msgs: true });
}

async function typing() {
  const id = S.openId;
  const now = Date.now();
  if (!id || now - S.lastTypingSent < TYPING_EVERY_MS) return;
  S.lastTypingSent = now;
  try {
    await api('POST', `/v1/conversations/${enc(id)}/typing`);
  } catch (e) {
    if (e.status !== 429 && e.status !== 0) toast(e);
  }
}

function setupChat() {
  const form = $('composer');
  const box = $('composer-text');
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = box.value.replace(/^\s*\n|\s+$/g, '');
    if (!text.trim() || !S.openId) return;
    box.value = '';
    drafts.delete(S.openId);
    autosize();
    send(text);
  });
  box.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  box.addEventListener('input', () => {
    autosize();
    if (S.openId) drafts.set(S.openId, box.value);
    if (box.value.trim()) typing();
  });
  $('load-older').addEventListener('click', loadOlder);
  $('back').addEventListener('click', () => closeConversation());
  $('conv-list').addEventListener('click', (ev) => {
    const b = ev.target.closest('[data-conv-id]');
    if (b) openConversation(b.dataset.convId);
  });
  $('msg-list').addEventListener('click', (ev) => {
    const b = ev.target.closest('[data-action]');
    if (!b) return;
    const h = S.hist.get(S.openId);
    const draft = h && h.pending.get(b.closest('[data-pending-key]').dataset.pendingKey);
    if (!draft) return;
    if (b.dataset.action === 'retry') deliver(draft);
    else {
      h.pending.delete(draft.key);
      render({ msgs: true });
    }
  });
  $('messages').addEventListener('scroll', () => {
    const h = S.hist.get(S.openId);
    if (h) h.stick = atBottom();
  });
  window.addEventListener('popstate', openFromHash);
  document.addEventListener('visibilitychange', () => {
    if (!pageVisible() || !S.me) return;
    markRead();
    if (!S.es && !S.retryTimer) connect();
  });
  window.addEventListener('focus', () => S.me && markRead());
  // The browser knows the network is gone: the stream is dead (or soon
  // will be), so stop it and its retries, and resume when the network is back.
  window.addEventListener('offline', () => {
    if (!S.me) return;
    if (S.es) S.es.close();
    S.es = null;
    clearTimeout(S.retryTimer);
    S.retryTimer = 0;
    setConn('offline');
  });
  window.addEventListener('online', () => {
    if (S.me && !S.es) {
      S.retries = 0;
      connect();
    }
  });
  setInterval(() => S.me && render({ head: true }), 30000); // "last seen 5 min ago"
}

function autosize() {
  const box = $('composer-text');
  box.style.height = 'auto';
  // Hidden (no layout yet): keep the natural one-row height; renderHead
  // calls this again once the composer shows.
  if (box.scrollHeight > 0) box.style.height = Math.min(box.scrollHeight, 160) + 'px';
}

// ---- new conversation dialog --------------------------------------------------------

function setupNewDialog() {
  const dlg = $('new-dialog');
  const form = $('new-form');
  const err = form.querySelector('.form-error');
  let mode = 'direct';
  const select = (which) => {
    mode = which;
    for (const t of form.querySelectorAll('[data-new-tab]')) t.setAttribute('aria-selected', String(t.dataset.newTab === which));
    for (const p of form.querySelectorAll('[data-new-pane]')) p.hidden = p.dataset.newPane !== which;
    $('new-submit').textContent = which === 'direct' ? 'Start chat' : 'Create group';
    err.hidden = true;
    const first = form.querySelector(`[data-new-pane="${which}"] input`);
    if (first) first.focus();
  };
  for (const t of form.querySelectorAll('[data-new-tab]')) t.addEventListener('click', () => select(t.dataset.newTab));
  $('new-chat').addEventListener('click', () => {
    form.reset();
    dlg.showModal();
    select('direct');
  });
  $('new-cancel').addEventListener('click', () => dlg.close());
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    let body;
    if (mode === 'direct') {
      body = { type: 'direct', member_ids: [data.peer.trim().toLowerCase()] };
    } else {
      const members = data.members.split(/[\s,;]+/).map((s) => s.trim().toLowerCase()).filter(Boolean);
      body = { type: 'group', title: data.title.trim(), member_ids: members };
    }
    const btn = $('new-submit');
    btn.disabled = true;
    err.hidden = true;
    try {
      const c = await api('POST', '/v1/conversations', { body });
      upsertConversation(c);
      ensureUsers(c.peer_id ? [c.peer_id] : []);
      if (c.peer_id) refreshPresence();
      dlg.close();
      openConversation(c.id);
    } catch (e) {
      err.textContent = describe(e);
      err.hidden = false;
    } finally {
      btn.disabled = false;
    }
  });
}

// ---- rendering ------------------------------------------------------------------

const dirty = { list: false, head: false, msgs: false, typing: false };
let frame = 0;

function render(parts) {
  for (const k of Object.keys(parts)) if (parts[k]) dirty[k] = true;
  if (!frame) frame = requestAnimationFrame(flush);
}

function renderAll() {
  render({ list: true, head: true, msgs: true, typing: true });
}

function flush() {
  frame = 0;
  if (!S.me) return;
  const d = { ...dirty };
  for (const k of Object.keys(dirty)) dirty[k] = false;
  if (d.list) renderList();
  if (d.head) renderHead();
  if (d.msgs) renderMessages();
  if (d.typing || d.msgs) renderTyping();
}

function convName(c) {
  if (c.type === 'direct') return c.peer_id ? userName(c.peer_id) : 'Direct conversation';
  return c.title || 'Untitled group';
}

function userName(id) {
  if (id === S.me?.id) return 'You';
  const u = S.users.get(id);
  return (u && !(u instanceof Promise) && u.display_name) || id;
}

function sortedConversations() {
  return [...S.convs.values()].sort((a, b) =>
    a.last_activity_at < b.last_activity_at ? 1 : a.last_activity_at > b.last_activity_at ? -1 : a.id < b.id ? -1 : 1);
}

function renderList() {
  const list = $('conv-list');
  const convs = sortedConversations();
  const seen = new Set();
  let total = 0;
  convs.forEach((c, i) => {
    seen.add(c.id);
    let li = list.querySelector(`:scope > li[data-id="${CSS.escape(c.id)}"]`);
    if (!li) {
      li = el('li');
      li.dataset.id = c.id;
      li.innerHTML = `<button type="button" class="conv"><span class="avatar"></span><span class="conv-main">
        <span class="conv-top"><span class="conv-name"></span><time class="conv-time"></time></span>
        <span class="conv-bottom"><span class="conv-preview"></span><span class="badge"></span></span></span></button>`;
      li.firstElementChild.dataset.convId = c.id;
    }
    const btn = li.firstElementChild;
    const name = convName(c);
    btn.setAttribute('aria-current', String(c.id === S.openId));
    btn.dataset.type = c.type;
    paintAvatar(btn.querySelector('.avatar'), c.type === 'direct' ? c.peer_id || c.id : c.id, name, c.type,
      c.type === 'direct' ? presenceOf(c.peer_id) : null);
    btn.querySelector('.conv-name').textContent = name;
    const t = btn.querySelector('.conv-time');
    t.textContent = shortTime(c.last_activity_at);
    t.dateTime = c.last_activity_at;
    const prev = btn.querySelector('.conv-preview');
    const typers = typingUsers(c.id);
    prev.classList.toggle('is-typing', typers.length > 0);
    if (typers.length) {
      prev.textContent = c.type === 'direct' ? 'typing…' : `${userName(typers[0])} is typing…`;
    } else if (c.last_message) {
      const who = c.last_message.sender_id === S.me.id ? 'You: ' : c.type === 'group' ? userName(c.last_message.sender_id) + ': ' : '';
      prev.textContent = who + oneLine(c.last_message.text);
    } else {
      prev.textContent = c.type === 'group' ? `${c.member_count} members` : 'No messages yet';
    }
    const badge = btn.querySelector('.badge');
    const n = Math.max(0, c.unread_count | 0);
    total += n;
    badge.textContent = n > 99 ? '99+' : String(n);
    badge.hidden = n === 0;
    badge.dataset.unread = String(n);
    btn.classList.toggle('unread', n > 0);
    btn.setAttribute('aria-label', `${name}${n ? `, ${n} unread` : ''}`);
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  for (const li of [...list.children]) if (!seen.has(li.dataset.id)) li.remove();
  $('conv-empty').hidden = !S.loaded || convs.length > 0;
  document.title = total ? `(${total}) imd` : 'imd';
}

function presenceOf(uid) {
  const p = uid && S.presence.get(uid);
  return p ? (p.online ? 'online' : 'offline') : 'unknown';
}

function renderHead() {
  const c = S.convs.get(S.openId);
  $('placeholder').hidden = !!c;
  $('chat-head').hidden = !c;
  $('messages').hidden = !c;
  $('composer').hidden = !c;
  if (!c) return;
  const name = convName(c);
  $('chat-name').textContent = name;
  paintAvatar($('chat-avatar'), c.type === 'direct' ? c.peer_id || c.id : c.id, name, c.type,
    c.type === 'direct' ? presenceOf(c.peer_id) : null);
  const sub = $('chat-sub');
  if (c.type === 'direct') {
    const p = S.presence.get(c.peer_id);
    sub.textContent = !p ? '@' + c.peer_id : p.online ? 'Online' : p.last_seen_at ? `Last seen ${ago(p.last_seen_at)}` : 'Offline';
    sub.dataset.presence = presenceOf(c.peer_id);
  } else {
    sub.textContent = `${c.member_count} member${c.member_count === 1 ? '' : 's'}`;
    delete sub.dataset.presence;
  }
  $('composer-text').placeholder = `Message ${name}`;
  autosize();
}

// readSeq is how far another member has read: their receipts, and at least
// their own latest message (sending marks it read).
function readSeq(cid, uid, msgs) {
  let seq = (S.reads.get(cid) && S.reads.get(cid).get(uid)) || 0;
  for (const m of msgs) if (m.sender_id === uid && m.seq > seq) seq = m.seq;
  return seq;
}

function renderMessages() {
  const list = $('msg-list');
  const scroller = $('messages');
  const c = S.convs.get(S.openId);
  const h = c && S.hist.get(c.id);
  if (!c || !h) {
    list.replaceChildren();
    $('load-older').hidden = true;
    return;
  }
  const prevHeight = scroller.scrollHeight;
  const prevTop = scroller.scrollTop;
  const msgs = [...h.msgs.values()].sort((a, b) => a.seq - b.seq);
  const me = S.me.id;

  // Who has read what: direct → the peer; group → everyone we have heard from.
  const others = new Set();
  if (c.type === 'direct' && c.peer_id) others.add(c.peer_id);
  for (const m of msgs) if (m.sender_id !== me) others.add(m.sender_id);
  for (const uid of (S.reads.get(c.id) || new Map()).keys()) others.add(uid);
  const reads = [...others].map((uid) => [uid, readSeq(c.id, uid, msgs)]);
  const lastOwn = [...msgs].reverse().find((m) => m.sender_id === me);

  const frag = document.createDocumentFragment();
  let prevDay = '';
  let prev = null;
  for (const m of msgs) {
    const day = dayKey(m.created_at);
    if (day !== prevDay) {
      frag.append(el('li', 'day', dayLabel(m.created_at)));
      prevDay = day;
      prev = null;
    }
    const own = m.sender_id === me;
    const cont = prev && prev.sender_id === m.sender_id && Date.parse(m.created_at) - Date.parse(prev.created_at) < 5 * 60e3;
    const li = el('li', `msg${own ? ' own' : ''}${cont ? ' cont' : ''}`);
    li.dataset.msgId = m.id;
    li.dataset.seq = String(m.seq);
    li.dataset.sender = m.sender_id;
    if (!own && !cont && c.type === 'group') li.append(el('span', 'sender', userName(m.sender_id)));
    const bubble = el('div', 'bubble');
    bubble.append(el('span', 'text', m.text));
    const meta = el('span', 'meta');
    const t = el('time', '', clock(m.created_at));
    t.dateTime = m.created_at;
    t.title = new Date(m.created_at).toLocaleString();
    meta.append(t);
    if (own) {
      const seen = reads.some(([, s]) => s >= m.seq);
      const tick = el('span', 'tick', seen ? '✓✓' : '✓');
      tick.dataset.seen = String(seen);
      tick.title = seen ? 'Seen' : 'Sent';
      meta.append(tick);
    }
    bubble.append(meta);
    li.append(bubble);
    if (own && m === lastOwn) {
      const readers = reads.filter(([, s]) => s >= m.seq).map(([uid]) => uid);
      if (readers.length) {
        const r = el('span', 'receipt', c.type === 'direct' ? 'Seen' : 'Seen by ' + readers.map(userName).join(', '));
        r.dataset.seen = 'true';
        li.append(r);
      }
    }
    frag.append(li);
    prev = m;
  }
  for (const d of h.pending.values()) {
    const li = el('li', `msg own pending${d.state === 'failed' ? ' failed' : ''}`);
    li.dataset.pendingKey = d.key;
    const bubble = el('div', 'bubble');
    bubble.append(el('span', 'text', d.text));
    const meta = el('span', 'meta', d.state === 'failed' ? 'Not sent' : 'Sending…');
    bubble.append(meta);
    li.append(bubble);
    if (d.state === 'failed') {
      const actions = el('span', 'pending-actions');
      const retry = el('button', 'link', 'Retry');
      retry.type = 'button';
      retry.dataset.action = 'retry';
      const discard = el('button', 'link', 'Discard');
      discard.type = 'button';
      discard.dataset.action = 'discard';
      actions.append(el('span', 'pending-error', d.error), retry, discard);
      li.append(actions);
    }
    frag.append(li);
  }
  list.replaceChildren(frag);
  if (!msgs.length && !h.pending.size) {
    list.append(el('li', 'empty-chat', h.loaded ? 'No messages yet. Say hello!' : 'Loading…'));
  }
  $('load-older').hidden = !h.hasMore;

  if (h.keepBottomOffset) {
    scroller.scrollTop = scroller.scrollHeight - prevHeight + prevTop;
    h.keepBottomOffset = false;
  } else if (h.stick) {
    scroller.scrollTop = scroller.scrollHeight;
  }
}

function atBottom() {
  const s = $('messages');
  return s.scrollHeight - s.scrollTop - s.clientHeight < 40;
}

function renderTyping() {
  const box = $('typing');
  const users = S.openId ? typingUsers(S.openId) : [];
  box.replaceChildren();
  if (!users.length) {
    box.hidden = true;
    return;
  }
  const names = users.map(userName);
  const text = names.length === 1 ? `${names[0]} is typing` : names.length === 2 ? `${names[0]} and ${names[1]} are typing` : 'Several people are typing';
  const dots = el('span', 'dots');
  dots.append(el('i'), el('i'), el('i'));
  box.append(dots, el('span', 'typing-text', text + '…'));
  box.hidden = false;
}

function paintAvatar(node, key, name, type = 'direct', presence = null) {
  const label = (name || key || '?').trim();
  const words = label.split(/\s+/).filter(Boolean);
  const initials = (words.length > 1 ? words[0][0] + words[1][0] : label.slice(0, 2)).toUpperCase();
  node.textContent = initials;
  node.style.setProperty('--hue', String(hue(key || label)));
  node.classList.toggle('group', type === 'group');
  if (presence) {
    const dot = el('i', 'dot');
    dot.dataset.presence = presence;
    dot.title = presence === 'online' ? 'Online' : presence === 'offline' ? 'Offline' : '';
    node.append(dot);
  }
}

function hue(s) {
  let h = 0;
  for (const ch of s) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function setConn(state) {
  const c = $('conn');
  c.dataset.state = state;
  c.querySelector('span').textContent =
    { connecting: 'Connecting…', live: 'Online', reconnecting: 'Reconnecting…', offline: 'Offline — waiting for the network' }[state];
}

// ---- toasts ------------------------------------------------------------------------

function describe(e) {
  return e instanceof ApiError ? e.describe() : String((e && e.message) || e);
}

function toast(what, kind = 'error') {
  const box = $('toasts');
  const text = typeof what === 'string' ? what : describe(what);
  for (const t of box.children) if (t.dataset.text === text) t.remove(); // no stacks of the same error
  const t = el('div', `toast ${kind}`);
  t.dataset.text = text;
  if (what instanceof ApiError) t.dataset.code = what.code;
  t.append(el('span', '', text));
  const x = el('button', 'icon', '×');
  x.type = 'button';
  x.setAttribute('aria-label', 'Dismiss');
  x.addEventListener('click', () => t.remove());
  t.append(x);
  box.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 10000 : 5000);
  if (kind === 'error') console.warn('imd:', text);
}

// ---- time ---------------------------------------------------------------------------

const fmtClock = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const fmtDay = new Intl.DateTimeFormat(undefined, { weekday: 'long', month: 'long', day: 'numeric' });
const fmtShort = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

const clock = (iso) => fmtClock.format(new Date(iso));
const dayKey = (iso) => new Date(iso).toDateString();

function dayLabel(iso) {
  const d = new Date(iso);
  const today = new Date();
  const yesterday = new Date(Date.now() - 864e5);
  if (d.toDateString() === today.toDateString()) return 'Today';
  if (d.toDateString() === yesterday.toDateString()) return 'Yesterday';
  return fmtDay.format(d);
}

function shortTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return d.toDateString() === new Date().toDateString() ? fmtClock.format(d) : fmtShort.format(d);
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return 'on ' + fmtShort.format(new Date(iso));
}

const oneLine = (s) => s.replace(/\s+/g, ' ').trim();

// ---- start ---------------------------------------------------------------------------

setupAuthForms();
setupChat();
setupNewDialog();
boot();
