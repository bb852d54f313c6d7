// The Node publisher (web/node/notifications.mjs) against the real server with a publish
// key, and the demo page asking for that key.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { NotifyError, createNotifier } from '../../web/node/notifications.mjs';
import { demoPage, launchBrowser, openStream, startServer } from './helpers.mjs';

const KEY = 'e2e-publish-key';

test('the Node publisher reaches streams and reports the server errors', async (t) => {
  const server = await startServer({ SSE_PUBLISH_KEY: KEY });
  t.after(() => server.dispose());
  const notifier = createNotifier({ baseUrl: `${server.baseUrl}/`, publishKey: KEY });
  const erin = await openStream(server.baseUrl, 'userId=erin&role=admin');
  const frank = await openStream(server.baseUrl, 'userId=frank&role=staff');
  t.after(() => {
    erin.close();
    frank.close();
  });
  assert.equal((await erin.next()).event, 'connected');
  assert.equal((await frank.next()).event, 'connected');

  const toErin = await notifier.notifyUser('erin', 'notification', { message: 'hello erin' });
  assert.equal(toErin.delivered, 1);
  assert.equal(toErin.pending, false);
  const got = await erin.next();
  assert.deepEqual(
    { event: got.event, id: got.id, data: got.data },
    { event: 'notification', id: String(toErin.eventId), data: { message: 'hello erin' } },
  );

  const toBoth = await notifier.notifyUser(['erin', 'frank'], 'notification', { message: 'hello both' });
  assert.equal(toBoth.delivered, 2);
  assert.equal((await erin.next()).data.message, 'hello both');
  assert.equal((await frank.next()).data.message, 'hello both');

  const toAdmins = await notifier.notifyWithMetadata({ role: 'admin' }, 'alert', { level: 'high' });
  assert.equal(toAdmins.delivered, 1);
  assert.deepEqual((await erin.next()).data, { level: 'high' });

  const toAll = await notifier.broadcast('announcement', { text: 'maintenance at 6' });
  assert.equal(toAll.delivered, 2);
  for (const stream of [erin, frank]) {
    const event = await stream.next();
    assert.equal(event.event, 'announcement');
    assert.equal(event.id, String(toAll.eventId));
  }

  const results = await notifier.batch([
    { filter: { userId: 'frank' }, event: 'notification', data: { n: 1 } },
    { event: 'alert', data: { n: 2 } },
  ]);
  assert.equal(results.length, 2);
  assert.ok(results[0].eventId < results[1].eventId);
  assert.deepEqual((await frank.next()).data, { n: 1 });
  assert.deepEqual((await frank.next()).data, { n: 2 });

  // The server's own refusals come back as NotifyErrors with its code.
  await assert.rejects(notifier.notifyUser('erin', 'bad name!', {}), (err) => {
    assert.ok(err instanceof NotifyError);
    assert.equal(err.status, 400);
    assert.match(err.code, /^invalid_/);
    return true;
  });
  const wrongKey = createNotifier({ baseUrl: server.baseUrl, publishKey: 'not-the-key' });
  await assert.rejects(wrongKey.notifyUser('erin', 'notification', { message: 'no' }), {
    name: 'NotifyError',
    status: 401,
    code: 'unauthorized',
  });
  const noKey = createNotifier({ baseUrl: server.baseUrl });
  await assert.rejects(noKey.broadcast('alert', {}), { code: 'unauthorized' });
});

test('the demo page asks for the publish key and then sends and shows stats', async (t) => {
  const server = await startServer({ SSE_PUBLISH_KEY: KEY });
  const browser = await launchBrowser();
  t.after(async () => {
    await browser.close();
    await server.dispose();
  });
  const page = await browser.newPage();
  await page.goto(`${server.baseUrl}/home?userId=gina`);
  const gina = demoPage(page);
  // The stream itself needs no key.
  await gina.connected();

  const keyInput = page.getByLabel('Publish key', { exact: true });
  await keyInput.waitFor({ timeout: 15000 });
  await keyInput.fill('wrong key');
  await page.getByRole('button', { name: 'Use key' }).click();
  await page.getByText('The server refused that key.').waitFor({ timeout: 15000 });

  await keyInput.fill(KEY);
  await page.getByRole('button', { name: 'Use key' }).click();
  await gina.waitForStat('totalClients', '1');
  await gina.waitForStat('clientsByUser', 'gina: 1');

  await gina.message.fill('sent with the key');
  await gina.send.click();
  await gina.waitForMessage('sent with the key');
  assert.equal(await keyInput.isVisible(), false);
});
