// useSSE and TrackConnections rendered by React in headless Chromium: the test bundles a
// tiny app from the npm packages with esbuild, serves it from its own origin, and points
// it at the real server (which allows that origin through CORS_ORIGINS).

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { test } from 'node:test';
import { build } from 'esbuild';
import { E2E_DIR, PATIENCE_MS, launchBrowser, sendTest, startServer } from './helpers.mjs';

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>useSSE test</title></head>
<body><div id="root"></div><script type="module" src="/app.js"></script></body></html>`;

async function bundleApp() {
  const result = await build({
    entryPoints: [join(E2E_DIR, 'react-app', 'main.tsx')],
    bundle: true,
    write: false,
    format: 'esm',
    jsx: 'automatic',
    target: 'es2022',
    // web/react imports `react` as a peer dependency: resolve it from the test's packages.
    nodePaths: [join(E2E_DIR, 'node_modules')],
    define: { 'process.env.NODE_ENV': '"development"' },
    logLevel: 'silent',
  });
  return result.outputFiles[0].text;
}

/** Serves the page and its bundle on a free port; resolves with the origin. */
async function serveApp(t, script) {
  const server = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (path === '/') {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' }).end(PAGE);
    } else if (path === '/app.js') {
      res.writeHead(200, { 'Content-Type': 'text/javascript; charset=utf-8' }).end(script);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  return `http://127.0.0.1:${server.address().port}`;
}

test('useSSE reports the stream and its events, and TrackConnections shows the stats', async (t) => {
  const origin = await serveApp(t, await bundleApp());
  const sse = await startServer({ CORS_ORIGINS: origin });
  const browser = await launchBrowser();
  t.after(async () => {
    await browser.close();
    await sse.dispose();
  });
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (msg) => msg.type() === 'error' && errors.push(msg.text()));

  await page.goto(`${origin}/?api=${encodeURIComponent(sse.baseUrl)}&userId=dora`);
  const wait = (locator) => locator.waitFor({ timeout: PATIENCE_MS });
  await wait(page.getByRole('status', { name: 'Hook connection' }).filter({ hasText: /^connected$/ }));

  await sendTest(sse.baseUrl, 'dora', 'first from the server');
  await sendTest(sse.baseUrl, 'dora', 'second from the server');
  await wait(page.getByTestId('last-event').filter({ hasText: /^second from the server$/ }));
  const items = page.getByRole('list', { name: 'Hook notifications' }).getByRole('listitem');
  await wait(items.nth(1));
  assert.deepEqual(await items.allTextContents(), ['first from the server', 'second from the server']);

  const stats = page.getByRole('region', { name: 'Connection stats', exact: true });
  const stat = (name, text) => wait(stats.locator(`[data-stat="${name}"]`).filter({ hasText: text }));
  await stat('totalClients', /^1$/);
  await stat('clientsByUser', /^dora: 1$/);
  await stat('totalEventsSent', /^2$/);
  await stat('lastEventTime', /\d/);
  assert.deepEqual(errors, [], 'no errors in the page');
});
