// notifications.mjs: publish to nomey-sse from your own server (Node 18+, no dependencies).
//
//   import { createNotifier } from './notifications.mjs';
//   const notifier = createNotifier({ baseUrl: 'http://sse.internal:8000', publishKey: process.env.SSE_PUBLISH_KEY });
//   await notifier.notifyUser('alice', 'notification', { message: 'Your order shipped' });
//
// Every call resolves with the server's answer (`{ eventId, delivered, pending }`, or a list
// of them for `batch`) and rejects with a NotifyError carrying the server's error code.

/** A refused or failed publish. `code` is the server's (`unauthorized`, `invalid_body`, …). */
export class NotifyError extends Error {
  constructor(message, { status = null, code = 'request_failed', cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'NotifyError';
    this.status = status;
    this.code = code;
  }
}

/**
 * @param {import('./notifications').NotifierOptions} options
 * @returns {import('./notifications').Notifier}
 */
export function createNotifier({ baseUrl, publishKey, timeoutMs = 10000, fetch: fetchImpl } = {}) {
  if (!baseUrl) throw new TypeError('createNotifier: baseUrl is required');
  const doFetch = fetchImpl || globalThis.fetch;
  if (typeof doFetch !== 'function') throw new TypeError('createNotifier: no fetch here (Node 18+ has one)');
  const root = String(baseUrl).replace(/\/+$/, '');

  async function post(path, body) {
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    if (publishKey) headers.Authorization = `Bearer ${publishKey}`;
    let response;
    try {
      response = await doFetch(`${root}${path}`, {
        method: 'POST',
        headers,
        body: JSON.stringify(body),
        signal: timeoutMs > 0 ? AbortSignal.timeout(timeoutMs) : undefined,
      });
    } catch (err) {
      const timedOut = err && (err.name === 'TimeoutError' || err.name === 'AbortError');
      throw new NotifyError(
        timedOut ? `POST ${path} timed out after ${timeoutMs} ms` : `POST ${path} failed: ${err.message}`,
        { code: timedOut ? 'timeout' : 'network_error', cause: err },
      );
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      // Not JSON (a proxy's error page, say): reported below by status.
    }
    if (!response.ok) {
      const error = json && json.error;
      throw new NotifyError(error?.message || `POST ${path} answered ${response.status}`, {
        status: response.status,
        code: error?.code || `http_${response.status}`,
      });
    }
    return json;
  }

  const notifier = {
    /** Sends to the clients matching `filter` (see the service's README for its fields). */
    notify(filter, event, data) {
      return post('/api/sse/notify', { filter, event, data });
    },
    /** Sends to one user's streams, or to several users' given an array of ids. */
    notifyUser(userId, event, data) {
      const filter = Array.isArray(userId) ? { userIds: userId } : { userId };
      return notifier.notify(filter, event, data);
    },
    /** Sends to the streams whose metadata has every given pair, e.g. `{ role: 'admin' }`. */
    notifyWithMetadata(metadata, event, data) {
      return notifier.notify({ metadata }, event, data);
    },
    /** Sends to every open stream. */
    broadcast(event, data) {
      return post('/api/sse/broadcast', { event, data });
    },
    /**
     * Stores many events at once, all or none: `[{ filter?, event, data }]`, where an event
     * without a filter is a broadcast. Resolves with one result per event, in order.
     */
    async batch(events) {
      if (!Array.isArray(events)) throw new TypeError('batch: events must be an array');
      const body = await post('/api/sse/batch', { events });
      return body.results;
    },
  };
  return notifier;
}

export default createNotifier;
