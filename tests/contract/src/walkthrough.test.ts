// The README's curl walkthrough, run by a client that other people's tools
// generated from openapi.yaml: types by openapi-typescript, calls by
// openapi-fetch. tsc type-checks every call against the contract (a wrong
// path, parameter or body field does not compile); at run time the contract
// middleware checks every response against the same file.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import createClient, { type Client } from 'openapi-fetch';
import type { paths, components } from '../generated/api.js';
import { startImd, type Imd } from './imd.js';
import { contract, mismatches } from './validate.js';

type Message = components['schemas']['Message'];
type Problem = components['schemas']['Problem'];

function api(baseUrl: string, token?: string): Client<paths> {
  const c = createClient<paths>({
    baseUrl,
    headers: token ? { Authorization: `Bearer ${token}` } : {},
    // The types carry no serialization styles: say what the spec says
    // (GET /v1/presence: user_ids is style form, explode false → a,b,c).
    querySerializer: { array: { style: 'form', explode: false } },
  });
  c.use(contract);
  return c;
}

// noMismatch fails the step that caused a contract mismatch, naming it.
function noMismatch(): void {
  const found = mismatches.splice(0);
  assert.deepEqual(found, [], 'responses that do not match openapi.yaml');
}

test('the README walkthrough through a generated client', { timeout: 120000 }, async (t) => {
  const imd: Imd = await startImd();
  t.after(() => imd.stop());
  const anon = api(imd.url);
  let alice!: Client<paths>;
  let bob!: Client<paths>;
  let bobToken = '';
  let cid = '';
  let first!: Message;

  t.afterEach(noMismatch);

  await t.test('register two users; each gets a bearer token', async () => {
    const a = await anon.POST('/v1/auth/register', {
      body: { username: 'alice', password: 'correct horse', display_name: 'Alice' },
    });
    assert.equal(a.response.status, 201);
    assert.ok(a.data);
    assert.equal(a.data.user.id, 'alice');
    assert.equal(a.data.user.display_name, 'Alice');
    assert.equal(a.data.token_type, 'Bearer');
    alice = api(imd.url, a.data.access_token);

    const b = await anon.POST('/v1/auth/register', { body: { username: 'bob', password: 'battery staple' } });
    assert.equal(b.response.status, 201);
    assert.ok(b.data);
    bobToken = b.data.access_token;
    bob = api(imd.url, bobToken);

    const again = await anon.POST('/v1/auth/register', { body: { username: 'alice', password: 'another one' } });
    assert.equal(again.response.status, 409);
    assert.equal(again.error?.code, 'conflict');
  });

  await t.test('alice opens a direct conversation with bob: 201, then 200', async () => {
    const c = await alice.POST('/v1/conversations', { body: { type: 'direct', member_ids: ['bob'] } });
    assert.equal(c.response.status, 201);
    assert.ok(c.data);
    assert.equal(c.data.type, 'direct');
    assert.equal(c.data.peer_id, 'bob');
    cid = c.data.id;
    const again = await alice.POST('/v1/conversations', { body: { type: 'direct', member_ids: ['bob'] } });
    assert.equal(again.response.status, 200);
    assert.equal(again.data?.id, cid);
  });

  await t.test('send with an Idempotency-Key; the replay returns the original (200)', async () => {
    const sent = await alice.POST('/v1/conversations/{conversationId}/messages', {
      params: { path: { conversationId: cid }, header: { 'Idempotency-Key': 'hello-1' } },
      body: { text: 'hello bob' },
    });
    assert.equal(sent.response.status, 201);
    assert.ok(sent.data);
    first = sent.data;
    assert.equal(first.seq, 1);
    assert.equal(first.sender_id, 'alice');
    assert.equal(first.text, 'hello bob');
    assert.equal(first.conversation_id, cid);

    const replay = await alice.POST('/v1/conversations/{conversationId}/messages', {
      params: { path: { conversationId: cid }, header: { 'Idempotency-Key': 'hello-1' } },
      body: { text: 'hello bob' },
    });
    assert.equal(replay.response.status, 200);
    assert.deepEqual(replay.data, first);
  });

  await t.test('the seed\'s shape: send to a user', async () => {
    const r = await bob.POST('/v1/users/{userId}/messages', {
      params: { path: { userId: 'alice' } },
      body: { text: 'hi alice' },
    });
    assert.equal(r.response.status, 201);
    assert.equal(r.data?.conversation_id, cid);
    assert.equal(r.data?.seq, 2);
  });

  await t.test('history, ascending by seq, paged by before_seq', async () => {
    const h = await bob.GET('/v1/conversations/{conversationId}/messages', {
      params: { path: { conversationId: cid }, query: { limit: 50 } },
    });
    assert.equal(h.response.status, 200);
    assert.deepEqual(h.data?.messages.map((m) => [m.seq, m.sender_id, m.text]), [
      [1, 'alice', 'hello bob'],
      [2, 'bob', 'hi alice'],
    ]);
    assert.equal(h.data?.has_more, false);
    const older = await bob.GET('/v1/conversations/{conversationId}/messages', {
      params: { path: { conversationId: cid }, query: { before_seq: 2, limit: 1 } },
    });
    assert.deepEqual(older.data?.messages.map((m) => m.seq), [1]);
    assert.equal(older.data?.has_more, false);
  });

  await t.test('the lists: replying moved bob\'s read position; alice has bob\'s reply unread', async () => {
    // (The README's comment on this step says bob's unread_count counts
    // alice's message; but bob replied after it, and sending marks one's own
    // message read, so the contract says 0.)
    const l = await bob.GET('/v1/conversations');
    assert.equal(l.response.status, 200);
    const c = l.data?.conversations.find((x) => x.id === cid);
    assert.ok(c, 'the conversation is listed');
    assert.equal(c.last_seq, 2);
    assert.equal(c.last_read_seq, 2);
    assert.equal(c.unread_count, 0);
    assert.equal(c.last_message?.text, 'hi alice');
    assert.equal(c.peer_id, 'alice');

    const a = await alice.GET('/v1/conversations', { params: { query: { limit: 10 } } });
    const ac = a.data?.conversations.find((x) => x.id === cid);
    assert.equal(ac?.last_read_seq, 1);
    assert.equal(ac?.unread_count, 1, 'bob\'s reply, not her own message');
    assert.equal(a.data?.next_cursor ?? null, null);
  });

  await t.test('mark read up to seq 2', async () => {
    const r = await bob.PUT('/v1/conversations/{conversationId}/read', {
      params: { path: { conversationId: cid } },
      body: { seq: 2 },
    });
    assert.equal(r.response.status, 200);
    assert.deepEqual(r.data, { last_read_seq: 2, unread_count: 0 });
    const a = await alice.PUT('/v1/conversations/{conversationId}/read', {
      params: { path: { conversationId: cid } },
      body: { seq: 2 },
    });
    assert.deepEqual(a.data, { last_read_seq: 2, unread_count: 0 });
    const beyond = await alice.PUT('/v1/conversations/{conversationId}/read', {
      params: { path: { conversationId: cid } },
      body: { seq: 99 },
    });
    assert.equal(beyond.response.status, 400);
    assert.deepEqual(beyond.error?.errors?.map((e) => e.field), ['seq']);
  });

  await t.test('poll the event stream, then resume from its position', async () => {
    const p = await bob.GET('/v1/events', { params: { query: { poll: true, timeout: 0 } } });
    assert.equal(p.response.status, 200);
    const first = p.data;
    assert.ok(first && typeof first === 'object', 'a JSON EventPoll');
    assert.deepEqual(first.events, []); // no position: live from now
    const sent = await alice.POST('/v1/conversations/{conversationId}/messages', {
      params: { path: { conversationId: cid } },
      body: { text: 'are you there?', client_msg_id: 'there-1' },
    });
    assert.equal(sent.response.status, 201);
    const next = await bob.GET('/v1/events', {
      params: { query: { poll: true, timeout: 10, last_event_id: first.last_event_id } },
    });
    assert.equal(next.response.status, 200);
    const poll = next.data;
    assert.ok(poll && typeof poll === 'object');
    const ev = poll.events.find((e) => e.type === 'message.created');
    assert.ok(ev, `a message.created event in ${JSON.stringify(poll.events)}`);
    assert.equal(typeof ev.id, 'string');
    assert.deepEqual(ev.data, sent.data);
  });

  await t.test('errors are problem+json naming the fields at fault', async () => {
    const r = await bob.POST('/v1/conversations/{conversationId}/messages', {
      params: { path: { conversationId: cid } },
      // @ts-expect-error — the generated types reject the typo at compile time, too
      body: { txt: 'typo' },
    });
    assert.equal(r.response.status, 400);
    assert.equal(r.response.headers.get('Content-Type'), 'application/problem+json');
    const problem: Problem | undefined = r.error;
    assert.equal(problem?.code, 'invalid_request');
    assert.deepEqual(problem?.errors?.map((e) => e.field).sort(), ['text', 'txt']);

    const anonymous = await anon.GET('/v1/me');
    assert.equal(anonymous.response.status, 401);
    assert.equal(anonymous.error?.code, 'unauthorized');

    const stranger = await anon.POST('/v1/auth/register', { body: { username: 'eve', password: 'eavesdrop' } });
    assert.ok(stranger.data);
    const eve = api(imd.url, stranger.data.access_token);
    const hidden = await eve.GET('/v1/conversations/{conversationId}/messages', { params: { path: { conversationId: cid } } });
    assert.equal(hidden.response.status, 404, 'a non-member learns nothing');
  });

  await t.test('login sets the session cookie; a stream ticket works once', async () => {
    const l = await anon.POST('/v1/auth/login', { body: { username: 'bob', password: 'battery staple' } });
    assert.equal(l.response.status, 200);
    const cookie = l.response.headers.getSetCookie().find((c) => c.startsWith('imd_session='));
    assert.ok(cookie, 'imd_session cookie');
    assert.match(cookie, /HttpOnly/i);
    assert.match(cookie, /SameSite=Lax/i);

    // The cross-origin EventSource flow: a ticket, then the stream with it
    // and no credentials at all.
    const tk = await bob.POST('/v1/auth/stream-tickets');
    assert.equal(tk.response.status, 201);
    assert.ok(tk.data);
    const ticket = tk.data.ticket;
    const withTicket = await anon.GET('/v1/events', { params: { query: { ticket, poll: true } } });
    assert.equal(withTicket.response.status, 200);
    const reused = await anon.GET('/v1/events', { params: { query: { ticket, poll: true } } });
    assert.equal(reused.response.status, 401, 'a ticket is single use');
  });

  await t.test('presence and typing', async () => {
    const p = await alice.GET('/v1/presence', { params: { query: { user_ids: ['bob', 'nobody-known'] } } });
    assert.equal(p.response.status, 200);
    assert.deepEqual(p.data?.presence.map((x) => x.user_id), ['bob']);
    const ty = await alice.POST('/v1/conversations/{conversationId}/typing', { params: { path: { conversationId: cid } } });
    assert.equal(ty.response.status, 204);
  });
});
