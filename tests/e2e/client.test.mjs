// sse-client.js on its own, in headless Chromium: the failures EventSource does not
// recover from by itself, a silent stream, and giving up.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { PATIENCE_MS, freePort, launchBrowser, openStream, startServer } from './helpers.mjs';

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/**
 * A page on the server's origin that loads the client the server serves and connects
 * with `options`; `window.statuses` records every status.
 */
async function connectInPage(t, server, options) {
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await context.newPage();
  await page.goto(`${server.baseUrl}/healthz`);
  await page.evaluate(async (opts) => {
    const { connect } = await import('/sse-client.js');
    window.statuses = [];
    window.sse = connect({ ...opts, onStatus: (s) => window.statuses.push(s) });
  }, options);
  return page;
}

/** Waits until some recorded status matches all of `fields`; resolves with the list. */
async function waitForStatus(page, fields) {
  try {
    await page.waitForFunction(
      (want) => window.statuses.some((s) => Object.entries(want).every(([k, v]) => s[k] === v)),
      fields,
      { timeout: PATIENCE_MS },
    );
  } catch (err) {
    const seen = await page.evaluate(() => JSON.stringify(window.statuses));
    throw new Error(`no status ${JSON.stringify(fields)}; saw ${seen}`, { cause: err });
  }
  return page.evaluate(() => window.statuses);
}

test('a stream refused with 503 is retried with backoff until a slot frees up', async (t) => {
  const server = await startServer({ MAX_CLIENTS: '1' });
  t.after(() => server.dispose());
  const holder = await openStream(server.baseUrl, 'userId=holder');
  await holder.next();

  const page = await connectInPage(t, server, { userId: 'waiting', reconnectInterval: 200 });
  // EventSource closes for good on a 503; the client must still come back.
  await waitForStatus(page, { state: 'reconnecting', attempt: 2 });
  holder.close();
  const statuses = await waitForStatus(page, { state: 'connected' });
  const waits = statuses.filter((s) => s.state === 'reconnecting').map((s) => s.delayMs);
  assert.ok(waits[0] >= 100 && waits[0] <= 200, `first wait in [100, 200]: ${waits}`);
  assert.ok(waits[1] >= 200 && waits[1] <= 400, `second wait in [200, 400]: ${waits}`);
});

test('a stream silent for longer than heartbeatTimeout is reopened', async (t) => {
  // Pings far apart: the stream stays open but says nothing.
  const server = await startServer({ PING_INTERVAL_MS: '600000' });
  t.after(() => server.dispose());
  const page = await connectInPage(t, server, { userId: 'quiet', heartbeatTimeout: 800, reconnectInterval: 50 });
  await waitForStatus(page, { state: 'reconnecting', reason: 'timeout' });
  const statuses = await page.evaluate(() => window.statuses);
  const timeout = statuses.findIndex((s) => s.reason === 'timeout');
  assert.equal(statuses[timeout - 1].state, 'connected', 'it had been connected');
  await page.waitForFunction(() => window.statuses.at(-1).state === 'connected', null, { timeout: PATIENCE_MS });
});

test('after maxReconnectAttempts failures in a row the client gives up', async (t) => {
  const server = await startServer();
  t.after(() => server.dispose());
  const deadPort = await freePort();
  const page = await connectInPage(t, server, {
    url: `http://127.0.0.1:${deadPort}/api/sse`,
    userId: 'nobody',
    reconnectInterval: 20,
    maxReconnectAttempts: 3,
  });
  const statuses = await waitForStatus(page, { state: 'closed', reason: 'max-attempts' });
  assert.deepEqual(
    statuses.filter((s) => s.state === 'reconnecting').map((s) => s.attempt),
    [1, 2, 3],
  );
  assert.equal(statuses.at(-1).state, 'closed');
});
