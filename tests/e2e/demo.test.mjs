// The demo page (/home) in headless Chromium against the real server: two users, a reload
// under load, and a server restart.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { E2E_DIR, PATIENCE_MS, demoPage, launchBrowser, sendTest, startServer } from './helpers.mjs';

const SCREENSHOT = process.env.E2E_SCREENSHOT || join(E2E_DIR, 'artifacts', 'demo.png');
const VIEWPORT = { width: 1000, height: 700 };

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/** A server and a browser context for one test, both gone when it ends. */
async function setUp(t, env) {
  const server = await startServer(env);
  const context = await browser.newContext({ viewport: VIEWPORT });
  t.after(async () => {
    await context.close();
    await server.dispose();
  });
  return { server, context };
}

/** Opens /home?query; `errors` collects the page's uncaught exceptions. */
async function openDemo(context, baseUrl, query) {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.goto(`${baseUrl}/home?${query}`);
  return { ...demoPage(page), errors };
}

/** Polls a condition of this process (not of the page) until it holds. */
async function until(what, check) {
  const deadline = Date.now() + PATIENCE_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const isStream = (url) => url.pathname === '/api/sse';

test('a notification sent from one page reaches the other user only, and the stats follow', async (t) => {
  const { server, context } = await setUp(t);
  const alice = await openDemo(context, server.baseUrl, 'userId=alice');
  const bob = await openDemo(context, server.baseUrl, 'userId=bob');
  await alice.connected();
  await bob.connected();
  assert.equal(await alice.target.inputValue(), 'alice', 'the target defaults to the page user');

  await alice.target.fill('bob');
  await alice.message.fill('Hello Bob');
  await alice.send.click();
  await bob.waitForMessage('Hello Bob');

  // Each page's next message is published after bob's: had bob's gone to alice as well,
  // her stream would have had it first.
  await alice.target.fill('alice');
  await alice.message.fill('Note to self');
  await alice.send.click();
  await alice.waitForMessage('Note to self');
  await alice.target.fill('bob');
  await alice.message.fill('Lunch at noon?');
  await alice.send.click();
  await bob.waitForMessage('Lunch at noon?');
  assert.deepEqual(await alice.messages(), ['Note to self']);
  assert.deepEqual(await bob.messages(), ['Hello Bob', 'Lunch at noon?']);

  // The panel refreshes itself: no reload, no click.
  await bob.waitForStat('totalClients', '2');
  await bob.waitForStat('clientsByUser', 'alice: 1, bob: 1');
  await bob.waitForStat('totalEventsSent', '3');
  await bob.waitForStat('lastEventTime', /\d/);
  await bob.waitForStat('averageConnectionDuration', /\d/);

  // A few more for the screenshot.
  await alice.message.fill('The deploy finished ✔');
  await alice.send.click();
  await bob.waitForMessage('The deploy finished');
  await bob.waitForStat('totalEventsSent', '4');
  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await bob.page.screenshot({ path: SCREENSHOT });
  assert.deepEqual([...alice.errors, ...bob.errors], []);
});

test('a reload while notifications are being sent loses none and repeats none', async (t) => {
  const { server, context } = await setUp(t);
  // Two tabs of bob: while the first reloads, bob still has an open stream, so what is
  // sent meanwhile is not kept as pending for him. The reloaded tab gets it only by
  // resuming from the last id it saw.
  const tab = await openDemo(context, server.baseUrl, 'userId=bob');
  const other = await openDemo(context, server.baseUrl, 'userId=bob');
  await tab.connected();
  await other.connected();

  const sent = [];
  let stopAt = Infinity;
  const sender = (async () => {
    for (let n = 1; sent.length < stopAt; n += 1) {
      const message = `update ${n}`;
      await sendTest(server.baseUrl, 'bob', message);
      sent.push(message);
      // A steady stream, as an app would send: keeps the count modest.
      await new Promise((r) => setTimeout(r, 20));
    }
  })();

  await tab.waitForCount(3);
  // Hold the reloaded page's stream until three more notifications have gone out, so the
  // reload surely misses some.
  const streams = [];
  await tab.page.route(isStream, async (route) => {
    const from = sent.length;
    streams.push(new URL(route.request().url()));
    await until('three notifications during the reload', () => sent.length >= from + 3);
    await route.continue();
  }, { times: 1 });
  await tab.page.reload({ waitUntil: 'domcontentloaded' });
  await tab.connected();
  stopAt = sent.length + 3;
  await sender;

  await tab.waitForCount(sent.length);
  await other.waitForCount(sent.length);
  assert.deepEqual(await tab.messages(), sent, 'the reloaded tab has each notification once, in order');
  assert.deepEqual(await other.messages(), sent);
  assert.equal(streams.length, 1);
  assert.match(streams[0].searchParams.get('lastEventId') ?? '', /^\d+$/, 'the stream resumed from an id');
  assert.deepEqual([...tab.errors, ...other.errors], []);
});

test('after a server restart the page reconnects with backoff and gets what it missed', async (t) => {
  const { server, context } = await setUp(t);
  const carol = await openDemo(context, server.baseUrl, 'userId=carol');
  await carol.connected();
  await sendTest(server.baseUrl, 'carol', 'before the restart');
  await carol.waitForMessage('before the restart');
  await carol.page.evaluate(() => {
    const status = document.getElementById('status');
    window.statusLog = [];
    new MutationObserver(() => window.statusLog.push(status.textContent)).observe(status, {
      childList: true,
      characterData: true,
      subtree: true,
    });
  });

  assert.equal(await server.stop(), 0, 'a clean exit on SIGTERM');
  // The second attempt is scheduled only after the first one failed: backoff at work.
  await carol.status.filter({ hasText: /^Reconnecting in \d+s \(attempt 2\)$/ }).waitFor({ timeout: PATIENCE_MS });

  // Keep the page away until the server is back and the messages are sent.
  let release;
  const released = new Promise((r) => {
    release = r;
  });
  await carol.page.route(isStream, async (route) => {
    await released;
    await route.continue();
  }, { times: 1 });
  await server.start();
  const whileAway = ['sent while away 1', 'sent while away 2'];
  for (const message of whileAway) {
    const result = await sendTest(server.baseUrl, 'carol', message);
    assert.equal(result.delivered, 0, 'carol has no open stream');
  }
  assert.notEqual(await carol.status.textContent(), 'Connected');
  release();

  await carol.connected();
  await carol.waitForCount(3);
  assert.deepEqual(await carol.messages(), ['before the restart', ...whileAway]);
  const log = await carol.page.evaluate(() => window.statusLog);
  assert.ok(log.some((s) => /^Reconnecting in \d+s \(attempt 1\)$/.test(s)), log.join(' | '));
  assert.ok(log.some((s) => /^Reconnecting in \d+s \(attempt 2\)$/.test(s)), log.join(' | '));
  assert.equal(log.at(-1), 'Connected');
  assert.deepEqual(carol.errors, []);
});
