// The web client in a real browser (Debian's Chromium via playwright-core):
// alice and bob, each in their own browser context, chat through a live imd.
//
// Every step waits for what a person would see; message elements carry
// data-msg-id, so "exactly once" is checked by counting ids.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startImd, cleanupBuild, client, tcpProxy, OUT } from './imd.mjs';
import { T, launch, person, register, ids, until, send, bubble, row, openId, shot } from './browser.mjs';

test('alice and bob chat in the browser', { timeout: 240000 }, async (t) => {
  const imd = await startImd({ name: 'imd-chat' });
  const browser = await launch();
  const version = browser.version();
  await mkdir(OUT, { recursive: true });
  await writeFile(join(OUT, 'chromium-version.txt'), version + '\n');
  t.diagnostic(`chromium ${version}, imd at ${imd.url}`);
  const people = [];
  // Bob reaches imd through a TCP proxy the test can cut.
  const proxy = await tcpProxy(imd.url);
  t.after(async () => {
    await browser.close().catch(() => {});
    await proxy.close();
    await imd.stop();
    await cleanupBuild();
  });

  const alice = await person(browser, imd.url, 'alice');
  const bob = await person(browser, proxy.url, 'bob');
  people.push(alice, bob);
  // carol takes part through the API only, with a bearer token.
  let carol;
  let directId;
  let groupId;

  await t.test('both register in the UI and get a live stream', async () => {
    await register(alice, 'alice', 'Alice Liddell', 'wonderland-42');
    await register(bob, 'bob', 'Bob Marley', 'three-little-birds');
    assert.equal(await alice.page.locator('#me-name').textContent(), 'Alice Liddell');
    const reg = await client(imd.url)('POST', '/v1/auth/register', { username: 'carol', password: 'caroline-1969', display_name: 'Carol King' });
    carol = client(imd.url, reg.access_token);
  });

  await t.test('alice starts a direct conversation; bob sees it live with an unread badge', async () => {
    const { page } = alice;
    await page.locator('#new-chat').click();
    await page.locator('#new-form input[name=peer]').fill('bob');
    await page.locator('#new-submit').click();
    await until('the direct conversation to open', async () => (await page.locator('#chat-name').textContent()) === 'Bob Marley');
    directId = await openId(page);
    assert.ok(directId);
    await send(page, 'Hi Bob! Are we still on for the hike on Saturday?');

    const r = row(bob.page, directId);
    await r.waitFor({ timeout: T });
    await r.locator('.badge[data-unread="1"]').waitFor({ timeout: T });
    assert.equal(await r.locator('.conv-name').textContent(), 'Alice Liddell');
    // Bob's stream is live, so alice sees him online.
    await page.locator('#chat-sub[data-presence=online]').waitFor({ timeout: T });
    await row(page, directId).locator('.dot[data-presence=online]').waitFor({ timeout: T });
  });

  await t.test('bob opens it: the badge clears and alice sees "Seen"', async () => {
    await row(bob.page, directId).click();
    await bubble(bob.page, 'Are we still on').waitFor({ timeout: T });
    // The composer, hidden until now, is laid out at its one-row height.
    const box = await bob.page.locator('#composer-text').boundingBox();
    assert.ok(box && box.height >= 28, `composer height ${box && box.height}`);
    await row(bob.page, directId).locator('.badge').waitFor({ state: 'hidden', timeout: T });
    await alice.page.locator('.msg.own .receipt', { hasText: 'Seen' }).waitFor({ timeout: T });
  });

  await t.test('bob types, alice sees the typing indicator, then his message live', async () => {
    await bob.page.locator('#composer-text').pressSequentially('Yes! Trailhead at 9', { delay: 40 });
    await alice.page.locator('#typing .typing-text', { hasText: 'Bob Marley is typing' }).waitFor({ timeout: T });
    await row(alice.page, directId).locator('.conv-preview.is-typing').waitFor({ timeout: T });
    await bob.page.locator('#composer-text').press('Enter');
    await bubble(alice.page, 'Yes! Trailhead at 9').waitFor({ timeout: T });
    // The message ends the indicator.
    await alice.page.locator('#typing .typing-text').waitFor({ state: 'detached', timeout: T });

    await send(alice.page, 'Perfect. I will bring the map 🗺️');
    await bubble(bob.page, 'I will bring the map').waitFor({ timeout: T });
    await send(bob.page, 'Great, see you there 👋');
    await bubble(alice.page, 'see you there').waitFor({ timeout: T });
    // Bob has the conversation open and visible: alice's latest is seen.
    await until('alice\'s latest message to be seen', async () => {
      const last = alice.page.locator('.msg.own').last();
      return (await last.locator('.tick').getAttribute('data-seen')) === 'true';
    });
    assert.deepEqual(await ids(alice.page), await ids(bob.page));
    // For the screenshot: bob is typing again. (The server coalesces typing
    // signals to one per 2.5 s, so this one may only show on the client's
    // next signal: type for longer than that.)
    await bob.page.locator('#composer-text').pressSequentially('Should we bring a rope? The last part is steep', { delay: 70 });
    await alice.page.locator('#typing .typing-text').waitFor({ timeout: T });
    await shot(alice.page, 'chat-direct-alice.png');
    await shot(bob.page, 'chat-direct-bob.png');
    await bob.page.locator('#composer-text').fill('');
  });

  await t.test('alice creates a group; bob\'s badge appears and clears; everyone sees everything live', async () => {
    const { page } = alice;
    await page.locator('#new-chat').click();
    await page.locator('[data-new-tab=group]').click();
    await page.locator('#new-form input[name=title]').fill('Saturday hike');
    await page.locator('#new-form input[name=members]').fill('bob, carol');
    await page.locator('#new-submit').click();
    await until('the group to open', async () => (await page.locator('#chat-name').textContent()) === 'Saturday hike');
    groupId = await openId(page);
    assert.notEqual(groupId, directId);
    assert.equal(await page.locator('#chat-sub').textContent(), '3 members');
    await send(page, 'Group for Saturday! Who brings snacks?');

    // Bob is looking at the direct conversation: the group gets a badge.
    const r = row(bob.page, groupId);
    await r.locator('.badge[data-unread="1"]').waitFor({ timeout: T });
    // Ordered by activity: the group is now on top.
    assert.equal(await bob.page.locator('#conv-list [data-conv-id]').first().getAttribute('data-conv-id'), groupId);
    await carol('POST', `/v1/conversations/${groupId}/messages`, { text: 'I will bring trail mix 🥜' });
    await r.locator('.badge[data-unread="2"]').waitFor({ timeout: T });
    await r.click();
    await bubble(bob.page, 'trail mix').waitFor({ timeout: T });
    await r.locator('.badge').waitFor({ state: 'hidden', timeout: T });
    await send(bob.page, 'Sandwiches for everyone 🥪');
    await bubble(alice.page, 'Sandwiches for everyone').waitFor({ timeout: T });
    await bubble(alice.page, 'trail mix').waitFor({ timeout: T });
    // Sender names in a group.
    await alice.page.locator('.msg .sender', { hasText: 'Carol King' }).waitFor({ timeout: T });
    await send(alice.page, 'Amazing, thank you both!');
    await alice.page.locator('.msg.own .receipt', { hasText: 'Seen by Bob Marley' }).waitFor({ timeout: T });
    assert.deepEqual(await ids(alice.page), await ids(bob.page));
    await shot(alice.page, 'chat-group-alice.png');
    await shot(bob.page, 'chat-group-bob.png');
  });

  await t.test('bob reloads: the history is intact', async () => {
    const before = await ids(bob.page);
    await bob.page.reload();
    await bob.page.locator('#conn[data-state=live]').waitFor({ timeout: T });
    await until('the group to reopen after the reload', async () => (await ids(bob.page)).length === before.length);
    assert.deepEqual(await ids(bob.page), before);
    assert.equal(await openId(bob.page), groupId);
    assert.equal(await row(bob.page, groupId).locator('.badge').isHidden(), true);
  });

  await t.test('a network drop (connections cut) is recovered without losing or duplicating a message', async () => {
    await row(bob.page, directId).click();
    await bubble(bob.page, 'see you there').waitFor({ timeout: T });
    await until('alice to be in the direct conversation', async () => {
      await row(alice.page, directId).click();
      return (await openId(alice.page)) === directId;
    });
    const before = await ids(bob.page);

    // Every connection of bob's is cut mid-stream and new ones are refused;
    // the browser is not told (navigator.onLine stays true).
    proxy.down();
    await bob.page.locator('#conn[data-state=reconnecting]').waitFor({ timeout: T });
    const missed = ['While you were away (1)', 'While you were away (2)', 'While you were away (3)'];
    for (const text of missed) await send(alice.page, text);
    await new Promise((r) => setTimeout(r, 1500)); // bob's retries fail meanwhile
    proxy.up();

    await bob.page.locator('#conn[data-state=live]').waitFor({ timeout: T });
    for (const text of missed) await bubble(bob.page, text).waitFor({ timeout: T });
    const after = await ids(bob.page);
    assert.equal(after.length, before.length + missed.length, 'each missed message exactly once');
    assert.deepEqual(after, await ids(alice.page));

    // And the stream is live again: one more message, once.
    await send(alice.page, 'Back online?');
    await bubble(bob.page, 'Back online?').waitFor({ timeout: T });
    assert.equal(await bubble(bob.page, 'Back online?').count(), 1);
    assert.equal((await ids(bob.page)).length, after.length + 1);
    await alice.page.locator('.msg.own .receipt', { hasText: 'Seen' }).waitFor({ timeout: T });
  });

  await t.test('the browser goes offline and back: the replay counts each unread message once', async () => {
    // Now the browser knows (offline event); bob is on another conversation,
    // so the direct conversation's messages come back as unread.
    await row(bob.page, groupId).click();
    await bob.context.setOffline(true);
    await bob.page.locator('#conn[data-state=offline]').waitFor({ timeout: T });
    await send(alice.page, 'Ping 1');
    await send(alice.page, 'Ping 2');
    await bob.context.setOffline(false);
    await row(bob.page, directId).locator('.badge[data-unread="2"]').waitFor({ timeout: T });
    await row(bob.page, directId).click();
    await bubble(bob.page, 'Ping 2').waitFor({ timeout: T });
    assert.deepEqual(await ids(bob.page), await ids(alice.page));
  });

  await t.test('history pages with "Load older"', async () => {
    for (let i = 1; i <= 60; i++) {
      await carol('POST', '/v1/users/bob/messages', { text: `Update ${i} of 60` }, { 'Idempotency-Key': `update-${i}` });
    }
    const carolRow = bob.page.locator('#conv-list [data-conv-id]', { hasText: 'Carol King' });
    await carolRow.locator('.badge[data-unread="60"]').waitFor({ timeout: T });
    await carolRow.click();
    await bubble(bob.page, 'Update 60 of 60').waitFor({ timeout: T });
    assert.equal((await ids(bob.page)).length, 50);
    await bob.page.locator('#load-older').click();
    await bubble(bob.page, 'Update 1 of 60').waitFor({ timeout: T });
    const all = await ids(bob.page);
    assert.equal(all.length, 60);
    assert.equal(await bob.page.locator('#load-older').isHidden(), true);
    await carolRow.locator('.badge').waitFor({ state: 'hidden', timeout: T });
  });

  await t.test('errors from the API are shown to the person', async () => {
    const { page } = bob;
    await page.locator('#new-chat').click();
    await page.locator('#new-form input[name=peer]').fill('nobody-here');
    await page.locator('#new-submit').click();
    const err = page.locator('#new-form .form-error');
    await err.waitFor({ timeout: T });
    assert.match(await err.textContent(), /member_ids/);
    await shot(page, 'error-dialog.png');
    await page.locator('#new-cancel').click();

    // A message over the size limit: the server's detail in a toast.
    await row(page, directId).click();
    await page.locator('#composer-text').fill('x'.repeat(16385));
    await page.locator('#composer-text').press('Enter');
    const toast = page.locator('.toast.error[data-code=invalid_request]');
    await toast.waitFor({ timeout: T });
    assert.match(await toast.textContent(), /text/);
    // The text is given back, not lost.
    assert.equal((await page.locator('#composer-text').inputValue()).length, 16385);
    await page.locator('#composer-text').fill('');

    // A wrong password at sign-in.
    const stranger = await person(browser, imd.url, 'stranger');
    people.push(stranger);
    await stranger.page.locator('#login-form input[name=username]').fill('alice');
    await stranger.page.locator('#login-form input[name=password]').fill('not-her-password');
    await stranger.page.locator('#login-form button[type=submit]').click();
    const loginErr = stranger.page.locator('#login-form .form-error');
    await loginErr.waitFor({ timeout: T });
    assert.ok((await loginErr.textContent()).length > 5);
    await stranger.context.close();
  });

  await t.test('sign out and back in', async () => {
    const { page } = alice;
    await page.locator('#logout').click();
    await page.locator('#auth').waitFor({ timeout: T });
    await page.locator('#login-form input[name=username]').fill('alice');
    await page.locator('#login-form input[name=password]').fill('wonderland-42');
    await page.locator('#login-form button[type=submit]').click();
    await page.locator('#conn[data-state=live]').waitFor({ timeout: T });
    await until('both conversations to be listed again', async () => (await page.locator('#conv-list [data-conv-id]').count()) === 2);
  });

  await t.test('the narrow layout shows one pane at a time', async () => {
    const { page } = bob;
    await page.setViewportSize({ width: 390, height: 760 });
    // A conversation is open: it fills the screen, with a way back.
    await page.locator('#back').waitFor({ timeout: T });
    assert.equal(await page.locator('.sidebar').isHidden(), true);
    await shot(page, 'chat-mobile-bob.png');
    await page.locator('#back').click();
    await page.locator('.sidebar').waitFor({ timeout: T });
    assert.equal(await page.locator('.chat').isHidden(), true);
    await shot(page, 'list-mobile-bob.png');
    await row(page, groupId).click();
    await page.locator('#chat-name', { hasText: 'Saturday hike' }).waitFor({ timeout: T });
    assert.equal(await page.locator('.sidebar').isHidden(), true);
    await page.setViewportSize({ width: 1180, height: 760 });
  });

  await t.test('/docs renders the API reference from /openapi.yaml', async () => {
    const docs = await person(browser, imd.url + '/docs', 'docs');
    people.push(docs);
    await docs.page.locator('h1', { hasText: 'imd' }).first().waitFor({ timeout: 30000 });
    await docs.page.locator('h2', { hasText: 'Send a message' }).first().waitFor({ timeout: T });
    await shot(docs.page, 'docs.png');
    await docs.context.close();
  });

  await t.test('no page errors and no CSP violations', () => {
    // Redoc's footer links a logo on cdn.redoc.ly; /docs' CSP blocks it on
    // purpose (the page loads nothing from elsewhere).
    const problems = people.flatMap((p) => p.problems).filter((m) => !m.includes('https://cdn.redoc.ly/'));
    assert.deepEqual(problems, []);
  });
});
