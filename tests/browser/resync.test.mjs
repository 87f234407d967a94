// `resync`: when a client's resume position is no longer in its event log
// (here the log keeps only 5 events), the stream starts with `resync`; the
// client must repair from the REST API — the conversation list and the open
// conversation's history by after_seq — and still show every message once.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startImd, cleanupBuild, client, tcpProxy } from './imd.mjs';
import { T, launch, person, register, ids, until, send, bubble, row, startDirect, shot } from './browser.mjs';

test('a resync repairs the list and the open conversation', { timeout: 120000 }, async (t) => {
  const imd = await startImd({ name: 'imd-resync', env: { IMD_LOG_CAP: '5' } });
  const proxy = await tcpProxy(imd.url);
  const browser = await launch();
  t.after(async () => {
    await browser.close().catch(() => {});
    await proxy.close();
    await imd.stop();
    await cleanupBuild();
  });

  const alice = await person(browser, imd.url, 'alice');
  const bob = await person(browser, proxy.url, 'bob');
  await register(alice, 'alice', 'Alice', 'wonderland-42');
  await register(bob, 'bob', 'Bob', 'three-little-birds');
  const directId = await startDirect(alice.page, 'bob', 'Bob');
  await send(alice.page, 'Before the gap');
  await row(bob.page, directId).click();
  await bubble(bob.page, 'Before the gap').waitFor({ timeout: T });

  // Carol writes to bob in a group bob has never opened.
  const reg = await client(imd.url)('POST', '/v1/auth/register', { username: 'carol', password: 'caroline-1969' });
  const carol = client(imd.url, reg.access_token);
  const group = await carol('POST', '/v1/conversations', { type: 'group', title: 'Book club', member_ids: ['bob'] });
  await row(bob.page, group.id).waitFor({ timeout: T });

  proxy.down();
  await bob.page.locator('#conn[data-state=reconnecting]').waitFor({ timeout: T });
  // Far more events than bob's log keeps: his position falls out of it.
  for (let i = 1; i <= 8; i++) await send(alice.page, `During the gap ${i}`);
  for (let i = 1; i <= 4; i++) await carol('POST', `/v1/conversations/${group.id}/messages`, { text: `Chapter ${i}` });
  proxy.up();

  await bob.page.locator('#conn[data-state=live]').waitFor({ timeout: T });
  await until('the client to report the resync', async () => bob.logs.some((l) => l.includes('resync')));
  await bubble(bob.page, 'During the gap 8').waitFor({ timeout: T });
  assert.deepEqual(await ids(bob.page), await ids(alice.page), 'the open conversation caught up, each message once');
  await row(bob.page, group.id).locator('.badge[data-unread="4"]').waitFor({ timeout: T });
  // The open conversation is read: no badge after the reload of the list.
  await row(bob.page, directId).locator('.badge').waitFor({ state: 'hidden', timeout: T });
  await shot(bob.page, 'resync-bob.png');

  // Live again afterwards.
  await send(alice.page, 'After the gap');
  await bubble(bob.page, 'After the gap').waitFor({ timeout: T });
  assert.equal(await bubble(bob.page, 'After the gap').count(), 1);
  await row(bob.page, group.id).click();
  await bubble(bob.page, 'Chapter 4').waitFor({ timeout: T });
  assert.equal((await ids(bob.page)).length, 4);
  assert.deepEqual([...alice.problems, ...bob.problems], []);
});
