// sse-client.js: a dependency-free browser client for nomey-sse streams.
//
// It wraps EventSource and adds what EventSource leaves out:
// - reconnection with exponential backoff and jitter, also after the failures on which
//   EventSource gives up by itself (a 503 or 429, a refused connection at open);
// - a heartbeat watchdog: a stream that stays silent longer than `heartbeatTimeout`
//   (the server pings every PING_INTERVAL_MS) is treated as dead and reopened;
// - resumption across page reloads: the id of the last stored event is kept in
//   sessionStorage and sent as `lastEventId`, so the server replays what was missed.
//
// Usage:
//   import { connect } from '/sse-client.js';
//   const sse = connect({ userId: 'alice', onStatus: (s) => console.log(s.state) });
//   const off = sse.addEventListener('notification', (e) => console.log(e.data.message));

/** Events that every stream sends and that carry no id. */
const CONNECTED = 'connected';
const PING = 'ping';

const DEFAULTS = {
  url: '/api/sse',
  autoReconnect: true,
  reconnectInterval: 1000,
  maxReconnectInterval: 30000,
  maxReconnectAttempts: 10,
  // The server's default CLIENT_TIMEOUT_MS (90 s) plus a margin: its heartbeats come
  // every PING_INTERVAL_MS (45 s by default), so two missed pings mean a dead stream.
  heartbeatTimeout: 100000,
  withCredentials: false,
  resume: true,
};

/**
 * Opens a stream and keeps it open.
 * @param {import('./sse-client').ConnectOptions} [options]
 * @returns {import('./sse-client').SSEClient}
 */
export function connect(options = {}) {
  const opts = { ...DEFAULTS, ...stripUndefined(options) };
  const EventSourceImpl = opts.EventSource || globalThis.EventSource;
  if (typeof EventSourceImpl !== 'function') {
    throw new Error('sse-client: EventSource is not available here');
  }
  const baseUrl = new URL(opts.url, globalThis.location ? globalThis.location.href : undefined);
  const storage = opts.resume ? opts.storage || safeSessionStorage() : null;
  const storageKey =
    opts.storageKey || `nomey-sse:lastEventId:${baseUrl.origin}${baseUrl.pathname}:${opts.userId ?? ''}`;

  /** @type {Map<string, Set<Function>>} */
  const listeners = new Map();
  /** Types with a dispatcher on the current EventSource. */
  const attached = new Set();
  let source = null;
  let status = { state: 'connecting', attempt: 0 };
  let lastEvent = null;
  let lastEventId = readStoredId();
  let attempt = 0;
  let retryTimer = null;
  let watchdog = null;
  let closed = false;

  function readStoredId() {
    if (!storage) return null;
    try {
      const value = storage.getItem(storageKey);
      return value && /^\d+$/.test(value) ? value : null;
    } catch {
      return null;
    }
  }

  function rememberId(id) {
    if (!id || id === lastEventId) return;
    lastEventId = id;
    if (!storage) return;
    try {
      storage.setItem(storageKey, id);
    } catch {
      // Storage full or denied: resumption within this page still works.
    }
  }

  function setStatus(next) {
    status = Object.freeze({ ...next });
    if (typeof opts.onStatus === 'function') {
      try {
        opts.onStatus(status);
      } catch (err) {
        reportError(err);
      }
    }
  }

  function streamUrl() {
    const url = new URL(baseUrl);
    const set = (key, value) => {
      if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, String(value));
    };
    set('userId', opts.userId);
    set('sessionId', opts.sessionId);
    for (const [key, value] of Object.entries(opts.metadata || {})) set(key, value);
    set('token', opts.token);
    // Only the first request of an EventSource uses this: its own reconnects send the
    // Last-Event-ID header, which the server prefers.
    set('lastEventId', lastEventId);
    return url.toString();
  }

  function open() {
    clearTimers();
    if (closed) return;
    setStatus({ state: 'connecting', attempt });
    const es = new EventSourceImpl(streamUrl(), { withCredentials: !!opts.withCredentials });
    source = es;
    attached.clear();
    es.addEventListener(CONNECTED, (event) => onConnected(es, event));
    es.addEventListener(PING, () => es === source && armWatchdog());
    es.addEventListener('error', () => onError(es));
    for (const type of listeners.keys()) attach(type);
    armWatchdog();
  }

  function onConnected(es, event) {
    if (es !== source) return;
    attempt = 0;
    const info = parse(event.data);
    armWatchdog();
    setStatus({
      state: 'connected',
      attempt: 0,
      clientId: info && info.clientId,
      historyGap: !!(info && info.historyGap),
    });
    dispatch(CONNECTED, event, info);
  }

  function onError(es) {
    if (es !== source || closed) return;
    // Whatever EventSource would do next (retry at the `retry:` pace, or give up for
    // good on a 503), take over: close it and come back with backoff.
    dropSource();
    scheduleReconnect('error');
  }

  function scheduleReconnect(reason) {
    if (closed) return;
    if (!opts.autoReconnect) {
      setStatus({ state: 'closed', attempt, reason: 'disconnected' });
      return;
    }
    if (attempt >= opts.maxReconnectAttempts) {
      setStatus({ state: 'closed', attempt, reason: 'max-attempts' });
      return;
    }
    attempt += 1;
    const delayMs = backoff(attempt, opts.reconnectInterval, opts.maxReconnectInterval);
    setStatus({ state: 'reconnecting', attempt, delayMs, retryAt: Date.now() + delayMs, reason });
    retryTimer = setTimeout(open, delayMs);
  }

  function armWatchdog() {
    if (watchdog) clearTimeout(watchdog);
    if (!(opts.heartbeatTimeout > 0)) return;
    watchdog = setTimeout(() => {
      watchdog = null;
      if (!source || closed) return;
      dropSource();
      scheduleReconnect('timeout');
    }, opts.heartbeatTimeout);
  }

  function attach(type) {
    if (!source || attached.has(type) || type === CONNECTED) return;
    attached.add(type);
    const es = source;
    es.addEventListener(type, (event) => {
      if (es !== source) return;
      dispatch(type, event, parse(event.data));
    });
  }

  function dispatch(type, event, data) {
    // A MessageEvent's lastEventId is the stream's last id so far; `connected` and
    // `ping` carry none of their own, and an empty one is never stored.
    if (type !== CONNECTED && type !== PING) {
      armWatchdog();
      rememberId(event.lastEventId);
    }
    const message = Object.freeze({
      type,
      data,
      id: type === CONNECTED || type === PING ? null : event.lastEventId || null,
      receivedAt: Date.now(),
    });
    if (type !== CONNECTED && type !== PING) lastEvent = message;
    const fns = listeners.get(type);
    if (!fns) return;
    for (const fn of [...fns]) {
      try {
        fn(message);
      } catch (err) {
        reportError(err);
      }
    }
  }

  function dropSource() {
    if (source) {
      source.close();
      source = null;
    }
    attached.clear();
  }

  function clearTimers() {
    if (retryTimer) clearTimeout(retryTimer);
    if (watchdog) clearTimeout(watchdog);
    retryTimer = null;
    watchdog = null;
  }

  // Back online after a network outage: no need to wait out the backoff.
  function onOnline() {
    if (!closed && retryTimer) open();
  }
  if (typeof globalThis.addEventListener === 'function') globalThis.addEventListener('online', onOnline);

  open();

  return {
    addEventListener(type, fn) {
      if (typeof fn !== 'function') throw new TypeError('sse-client: listener must be a function');
      if (type === 'open' || type === 'error') {
        throw new TypeError(`sse-client: use onStatus to follow the connection, not '${type}' events`);
      }
      if (!listeners.has(type)) listeners.set(type, new Set());
      listeners.get(type).add(fn);
      attach(type);
      return () => {
        const fns = listeners.get(type);
        if (fns) fns.delete(fn);
      };
    },
    close() {
      if (closed) return;
      closed = true;
      clearTimers();
      dropSource();
      if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', onOnline);
      setStatus({ state: 'closed', attempt, reason: 'closed' });
    },
    get status() {
      return status;
    },
    get lastEvent() {
      return lastEvent;
    },
    get lastEventId() {
      return lastEventId;
    },
  };
}

/**
 * The wait before reconnect attempt `attempt` (1-based): `base * 2^(attempt-1)`, capped,
 * then drawn from its upper half so that clients cut off together come back spread out.
 */
export function backoff(attempt, base = DEFAULTS.reconnectInterval, max = DEFAULTS.maxReconnectInterval) {
  const ceiling = Math.min(max, base * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

/** A short text for a status, as the demo page shows it. */
export function describeStatus(status) {
  switch (status.state) {
    case 'connected':
      return 'Connected';
    case 'connecting':
      return status.attempt > 0 ? `Reconnecting… (attempt ${status.attempt})` : 'Connecting…';
    case 'reconnecting':
      return `Reconnecting in ${Math.max(1, Math.round(status.delayMs / 1000))}s (attempt ${status.attempt})`;
    case 'closed':
      return status.reason === 'max-attempts' ? `Gave up after ${status.attempt} attempts` : 'Disconnected';
    default:
      return String(status.state);
  }
}

function parse(data) {
  try {
    return JSON.parse(data);
  } catch {
    return data;
  }
}

function safeSessionStorage() {
  try {
    return globalThis.sessionStorage || null;
  } catch {
    // Access can throw where storage is blocked.
    return null;
  }
}

function stripUndefined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined));
}

function reportError(err) {
  setTimeout(() => {
    throw err;
  });
}
