// A browser app on another origin (http://localhost:<port>, cross-site from
// imd at http://127.0.0.1:<port>): CORS for the origin in IMD_CORS_ORIGINS,
// bearer tokens for fetch, and the stream-ticket flow for EventSource,
// including how it resumes (a ticket is single use, so a reconnect takes a
// new ticket and passes last_event_id). An origin not listed is refused.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { startImd, cleanupBuild, client } from './imd.mjs';
import { T, launch, until } from './browser.mjs';

// The app server only serves an empty page; the test scripts it.
async function appServer() {
  const server = createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>third-party app</title><p>app</p>');
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { port: server.address().port, close: () => new Promise((r) => server.close(r)) };
}

test('a cross-origin app: CORS, bearer tokens and stream tickets', { timeout: 120000 }, async (t) => {
  const app = await appServer();
  const appOrigin = `http://localhost:${app.port}`;
  const imd = await startImd({ name: 'imd-cors', env: { IMD_CORS_ORIGINS: appOrigin } });
  const browser = await launch();
  t.after(async () => {
    await browser.close().catch(() => {});
    await app.close();
    await imd.stop();
    await cleanupBuild();
  });
  const anon = client(imd.url);
  await anon('POST', '/v1/auth/register', { username: 'alice', password: 'wonderland-42' });
  const bobAuth = await anon('POST', '/v1/auth/register', { username: 'bob', password: 'three-little-birds' });
  const bob = client(imd.url, bobAuth.access_token);
  const conv = await bob('POST', '/v1/conversations', { type: 'direct', member_ids: ['alice'] });

  const context = await browser.newContext();
  const page = await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(appOrigin + '/');

  await t.test('fetch with a bearer token, including a preflighted send', async () => {
    const r = await page.evaluate(async ({ api, cid }) => {
      const login = await fetch(api + '/v1/auth/login', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ username: 'alice', password: 'wonderland-42' }),
      });
      const auth = await login.json();
      window.token = auth.access_token;
      const sent = await fetch(`${api}/v1/conversations/${cid}/messages`, {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + window.token, 'Content-Type': 'application/json', 'Idempotency-Key': 'xo-1' },
        body: JSON.stringify({ text: 'hello from another origin' }),
      });
      // A problem document is readable cross-origin, too.
      const bad = await fetch(`${api}/v1/conversations/${cid}/messages`, {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + window.token, 'Content-Type': 'application/json' },
        body: JSON.stringify({ txt: 'typo' }),
      });
      return { login: login.status, user: auth.user.id, sent: sent.status, bad: bad.status, problem: await bad.json() };
    }, { api: imd.url, cid: conv.id });
    assert.equal(r.login, 200);
    assert.equal(r.user, 'alice');
    assert.equal(r.sent, 201);
    assert.equal(r.bad, 400);
    assert.equal(r.problem.code, 'invalid_request');
  });

  let lastId = '';
  await t.test('EventSource with a single-use ticket', async () => {
    await page.evaluate(async ({ api }) => {
      window.events = [];
      window.openStream = async (lastEventId) => {
        const t = await fetch(api + '/v1/auth/stream-tickets', { method: 'POST', headers: { Authorization: 'Bearer ' + window.token } });
        const { ticket } = await t.json();
        let url = api + '/v1/events?ticket=' + encodeURIComponent(ticket);
        if (lastEventId) url += '&last_event_id=' + encodeURIComponent(lastEventId);
        const es = new EventSource(url);
        window.es = es;
        es.addEventListener('message.created', (e) => window.events.push({ ...JSON.parse(e.data), eventId: e.lastEventId }));
        await new Promise((resolve, reject) => {
          es.addEventListener('ready', resolve, { once: true });
          es.onerror = () => reject(new Error('stream failed, readyState ' + es.readyState));
        });
        return ticket;
      };
      window.firstTicket = await window.openStream('');
    }, { api: imd.url });
    await bob('POST', `/v1/conversations/${conv.id}/messages`, { text: 'live to the other origin' });
    await until('the event in the page', () => page.evaluate(() => window.events.some((e) => e.text === 'live to the other origin')));
    lastId = await page.evaluate(() => window.events.at(-1).eventId);
    assert.ok(lastId);
  });

  await t.test('a used ticket is refused; resume with a new ticket and last_event_id', async () => {
    const reused = await page.evaluate(async ({ api }) => {
      window.es.close();
      const r = await fetch(api + '/v1/events?poll=1&ticket=' + encodeURIComponent(window.firstTicket));
      return r.status;
    }, { api: imd.url });
    assert.equal(reused, 401);
    // Missed while closed:
    await bob('POST', `/v1/conversations/${conv.id}/messages`, { text: 'missed 1' });
    await bob('POST', `/v1/conversations/${conv.id}/messages`, { text: 'missed 2' });
    await page.evaluate((id) => window.openStream(id), lastId);
    await until('the replay', () => page.evaluate(() => window.events.filter((e) => e.text.startsWith('missed')).length === 2), T);
    const texts = await page.evaluate(() => window.events.map((e) => e.text));
    assert.deepEqual(texts, ['live to the other origin', 'missed 1', 'missed 2']);
  });

  await t.test('an origin that is not listed is refused by the browser', async () => {
    const other = await context.newPage();
    await other.goto(`http://127.0.0.1:${app.port}/`); // same server, another origin
    const outcome = await other.evaluate(async (api) => {
      try {
        await fetch(api + '/v1/auth/login', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ username: 'alice', password: 'wonderland-42' }),
        });
        return 'allowed';
      } catch (e) {
        return e.name;
      }
    }, imd.url);
    assert.equal(outcome, 'TypeError');
    await other.close();
    assert.deepEqual(pageErrors, []);
  });
  await context.close();
});
