// Shared by the end-to-end tests: the real server binary on a free port with its own
// SQLite file, headless Chromium, and a small SSE reader for Node.

import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const E2E_DIR = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(E2E_DIR, '../..');

/** How long a test waits for something that should happen before it fails. */
export const PATIENCE_MS = 15000;

const SERVER_BIN = resolve(E2E_DIR, process.env.NOMEY_SSE_BIN || '../../target/debug/nomey-sse');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** A port nobody listens on right now. */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolvePort(port));
    });
  });
}

/**
 * Starts the server binary and waits for `/healthz`. `env` adds to the defaults: a free
 * port, a fresh SQLite file, no logs, a heartbeat every second.
 */
export async function startServer(env = {}) {
  if (!existsSync(SERVER_BIN)) {
    throw new Error(`no server binary at ${SERVER_BIN}: run \`cargo build --bin nomey-sse\` or set NOMEY_SSE_BIN`);
  }
  const port = await freePort();
  const dbFile = join(tmpdir(), `nomey-sse-e2e-${randomUUID()}.db`);
  const server = {
    port,
    dbFile,
    baseUrl: `http://127.0.0.1:${port}`,
    env: {
      BIND_ADDR: `127.0.0.1:${port}`,
      DATABASE_URL: `sqlite://${dbFile}`,
      ENABLE_LOGGING: 'false',
      PING_INTERVAL_MS: '1000',
      ...env,
    },
    process: null,
    output: '',
  };
  await launch(server);
  return {
    get port() {
      return server.port;
    },
    baseUrl: server.baseUrl,
    /** Everything the process wrote, for failure messages. */
    get output() {
      return server.output;
    },
    /** SIGTERM, then waits for the exit; resolves with the exit code. */
    stop: () => terminate(server),
    /** Starts it again on the same port and database. */
    start: () => launch(server),
    /** Stops it and removes its database. */
    async dispose() {
      await terminate(server);
      for (const suffix of ['', '-wal', '-shm']) rmSync(`${server.dbFile}${suffix}`, { force: true });
    },
  };
}

async function launch(server) {
  const child = spawn(SERVER_BIN, [], {
    env: { ...process.env, ...server.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const collect = (chunk) => {
    server.output = (server.output + chunk).slice(-20000);
  };
  child.stdout.on('data', collect);
  child.stderr.on('data', collect);
  child.exited = new Promise((done) => child.once('exit', (code, signal) => done(code ?? signal)));
  server.process = child;
  const deadline = Date.now() + PATIENCE_MS;
  let exitCode;
  child.exited.then((code) => {
    exitCode = code;
  });
  for (;;) {
    if (exitCode !== undefined) {
      throw new Error(`the server exited (${exitCode}) before it was healthy:\n${server.output}`);
    }
    try {
      const response = await fetch(`${server.baseUrl}/healthz`);
      if (response.ok) return;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the server was not healthy within ${PATIENCE_MS} ms:\n${server.output}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function terminate(server) {
  const child = server.process;
  if (!child || child.exitCode !== null || child.signalCode !== null) return child?.exitCode ?? null;
  child.kill('SIGTERM');
  let timer;
  const timeout = new Promise((r) => {
    timer = setTimeout(() => r('timeout'), 12000);
  });
  const result = await Promise.race([child.exited, timeout]);
  clearTimeout(timer);
  if (result === 'timeout') {
    child.kill('SIGKILL');
    await child.exited;
    throw new Error(`the server did not exit within 12 s of SIGTERM:\n${server.output}`);
  }
  return result;
}

/** Headless Chromium from Debian's package. */
export function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true });
}

/** POSTs JSON; resolves with `{ status, body }`. */
export async function postJson(url, body, { key } = {}) {
  const headers = { 'Content-Type': 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(url, { method: 'POST', headers, body: JSON.stringify(body) });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** Sends the demo's `notification` to `userId` through `POST /api/sse/test`, expecting 202. */
export async function sendTest(baseUrl, userId, message, options) {
  const { status, body } = await postJson(`${baseUrl}/api/sse/test`, { userId, message }, options);
  if (status !== 202) throw new Error(`POST /api/sse/test answered ${status}: ${JSON.stringify(body)}`);
  return body;
}

/**
 * Opens `GET /api/sse?query` from Node. `next()` resolves with the next event that is not
 * a ping (`{ event, id, data }`, data parsed), failing after PATIENCE_MS.
 */
export async function openStream(baseUrl, query) {
  const abort = new AbortController();
  const response = await fetch(`${baseUrl}/api/sse?${query}`, { signal: abort.signal });
  if (response.status !== 200) throw new Error(`GET /api/sse answered ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';

  async function readFrame() {
    for (;;) {
      const end = buffer.search(/\r?\n\r?\n/);
      if (end >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
        return frame;
      }
      const { value, done } = await reader.read();
      if (done) return null;
      buffer += value;
    }
  }

  async function nextAny() {
    for (;;) {
      const frame = await readFrame();
      if (frame === null) return null;
      const event = { event: 'message', id: null, data: '' };
      const data = [];
      for (const line of frame.split(/\r?\n/)) {
        const colon = line.indexOf(':');
        if (colon === 0) continue;
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event.event = value;
        else if (field === 'id') event.id = value;
        else if (field === 'data') data.push(value);
      }
      if (data.length === 0) continue; // a `retry:` frame
      event.data = JSON.parse(data.join('\n'));
      return event;
    }
  }

  return {
    async next() {
      for (;;) {
        let timer;
        const timeout = new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no event within ${PATIENCE_MS} ms`)), PATIENCE_MS);
        });
        let event;
        try {
          event = await Promise.race([nextAny(), timeout]);
        } finally {
          clearTimeout(timer);
        }
        if (event === null) throw new Error('the stream ended');
        if (event.event !== 'ping') return event;
      }
    },
    close() {
      abort.abort();
      reader.cancel().catch(() => {});
    },
  };
}

/** Locators by accessible name, as a person using a screen reader finds things. */
export function demoPage(page) {
  const stats = page.getByRole('region', { name: 'Connection stats', exact: true });
  return {
    page,
    status: page.getByRole('status', { name: 'Connection status', exact: true }),
    target: page.getByRole('textbox', { name: 'Target user ID', exact: true }),
    message: page.getByRole('textbox', { name: 'Message', exact: true }),
    send: page.getByRole('button', { name: 'Send Notification', exact: true }),
    list: page.getByRole('list', { name: 'Received notifications', exact: true }),
    stats,
    stat: (name) => stats.locator(`[data-stat="${name}"]`),
    /** Waits until the status reads exactly `Connected`. */
    async connected() {
      await page
        .getByRole('status', { name: 'Connection status', exact: true })
        .filter({ hasText: /^Connected$/ })
        .waitFor({ timeout: PATIENCE_MS });
    },
    /** The messages in the list, oldest first. */
    async messages() {
      const texts = await page
        .getByRole('list', { name: 'Received notifications', exact: true })
        .getByRole('listitem')
        .locator('.msg')
        .allTextContents();
      return texts.reverse();
    },
    /** Waits until the list holds `count` items. */
    async waitForCount(count) {
      try {
        await page.waitForFunction(
          (n) => document.querySelectorAll('#received > li').length >= n,
          count,
          { timeout: PATIENCE_MS },
        );
      } catch (err) {
        const shown = await this.messages().catch(() => []);
        throw new Error(`expected ${count} notifications, the page shows ${shown.length}: ${shown.join(', ')}`, {
          cause: err,
        });
      }
    },
    /** Waits until an item shows `text`. */
    async waitForMessage(text) {
      await page
        .getByRole('list', { name: 'Received notifications', exact: true })
        .getByRole('listitem')
        .filter({ hasText: text })
        .first()
        .waitFor({ timeout: PATIENCE_MS });
    },
    /** Waits until a stat reads `text` (a string for an exact match, or a RegExp). */
    async waitForStat(name, text) {
      const pattern = typeof text === 'string' ? new RegExp(`^${escapeRegExp(text)}$`) : text;
      await stats.locator(`[data-stat="${name}"]`).filter({ hasText: pattern }).waitFor({ timeout: PATIENCE_MS });
    },
  };
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
