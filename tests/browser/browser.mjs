// Helpers for driving the web client in Debian's Chromium (playwright-core;
// no browser download). Message elements carry data-msg-id, so "exactly
// once" is checked by counting ids.

import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { OUT } from './imd.mjs';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
export const T = 15000; // how long anything may take to show up

export async function launch() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
}

// person opens the client in a fresh context and records its problems.
export async function person(browser, url, name) {
  const context = await browser.newContext({ viewport: { width: 1180, height: 760 }, locale: 'en-US', timezoneId: 'UTC' });
  const page = await context.newPage();
  const problems = [];
  const logs = [];
  page.on('pageerror', (err) => problems.push(`${name}: page error: ${err.message}`));
  page.on('console', (msg) => {
    logs.push(msg.text());
    if (/Content Security Policy/i.test(msg.text())) problems.push(`${name}: ${msg.text()}`);
  });
  await page.goto(url);
  return { name, context, page, problems, logs };
}

export async function register(p, username, displayName, password) {
  const { page } = p;
  await page.locator('[data-auth-tab=register]').click();
  const f = page.locator('#register-form');
  await f.locator('input[name=username]').fill(username);
  await f.locator('input[name=display_name]').fill(displayName);
  await f.locator('input[name=password]').fill(password);
  await f.locator('button[type=submit]').click();
  await page.locator('#app').waitFor({ state: 'visible', timeout: T });
  await page.locator('#conn[data-state=live]').waitFor({ timeout: T });
}

export const msgs = (page) => page.locator('#msg-list [data-msg-id]');

// ids returns the message ids shown, in order, failing on a duplicate.
export async function ids(page) {
  const all = await msgs(page).evaluateAll((els) => els.map((e) => e.dataset.msgId));
  assert.equal(new Set(all).size, all.length, `duplicate message ids on screen: ${all}`);
  return all;
}

export async function until(what, fn, timeout = T) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${last && last.message ? last.message : last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function send(page, text) {
  await page.locator('#composer-text').fill(text);
  await page.locator('#composer-text').press('Enter');
  await page.locator('#msg-list [data-msg-id]', { hasText: text }).last().waitFor({ timeout: T });
}

export const bubble = (page, text) => page.locator('#msg-list [data-msg-id]', { hasText: text });
export const row = (page, id) => page.locator(`#conv-list [data-conv-id="${id}"]`);
export const openId = (page) => page.evaluate(() => decodeURIComponent(location.hash.replace(/^#\/c\//, '')));

export async function shot(page, name) {
  await mkdir(OUT, { recursive: true });
  await page.screenshot({ path: join(OUT, name) });
}


// startDirect opens (or creates) the direct conversation with peer in the UI
// and returns its id.
export async function startDirect(page, peer, peerName) {
  await page.locator('#new-chat').click();
  await page.locator('#new-form input[name=peer]').fill(peer);
  await page.locator('#new-submit').click();
  await until(`the conversation with ${peer} to open`, async () => (await page.locator('#chat-name').textContent()) === peerName);
  return openId(page);
}
