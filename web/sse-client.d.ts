// Types for sse-client.js, the browser client for nomey-sse streams.

/** Where the connection stands. */
export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface ConnectionStatus {
  readonly state: ConnectionState;
  /**
   * The reconnect attempt under way or scheduled (1-based); 0 for the first connection
   * and once the server has confirmed a stream with `connected`.
   */
  readonly attempt: number;
  /** `reconnecting`: how long until the next attempt, in milliseconds (backoff with jitter). */
  readonly delayMs?: number;
  /** `reconnecting`: when the next attempt starts (`Date.now()` clock). */
  readonly retryAt?: number;
  /**
   * `reconnecting`: `'error'` (the stream failed or ended) or `'timeout'` (no data, not
   * even a ping, for `heartbeatTimeout`).
   * `closed`: `'closed'` (close() was called), `'max-attempts'` (gave up) or
   * `'disconnected'` (the stream failed and `autoReconnect` is off).
   */
  readonly reason?: 'error' | 'timeout' | 'closed' | 'max-attempts' | 'disconnected';
  /** `connected`: the server's id for this stream. */
  readonly clientId?: string;
  /**
   * `connected`: true when the server could not replay everything after the last event
   * id (retention expired or too many events), so some events may be missing.
   */
  readonly historyGap?: boolean;
}

/** One event as listeners receive it. */
export interface SSEMessage<T = unknown> {
  /** The SSE event name, e.g. `notification`. */
  readonly type: string;
  /** The event's data, parsed as JSON (the raw string when it is not JSON). */
  readonly data: T;
  /** The stored event's id; null for `connected` and `ping`, which carry none. */
  readonly id: string | null;
  /** `Date.now()` when it arrived. */
  readonly receivedAt: number;
}

/** The data of the `connected` event that opens every stream. */
export interface ConnectedData {
  clientId: string;
  userId: string | null;
  sessionId: string | null;
  serverTime: string;
  historyGap: boolean;
}

export interface ConnectOptions {
  /** The stream route, absolute or relative to the page. Default `/api/sse`. */
  url?: string;
  userId?: string;
  sessionId?: string;
  /** Extra `key=value` pairs the server keeps as this stream's metadata (for filters). */
  metadata?: Record<string, string>;
  /** A subscriber JWT, sent as the `token` query parameter (when the server requires one). */
  token?: string;
  /** Reconnect after a failure or the end of the stream. Default true. */
  autoReconnect?: boolean;
  /** The first reconnect waits about this long (ms); each next one twice as long. Default 1000. */
  reconnectInterval?: number;
  /** The longest wait between attempts (ms). Default 30000. */
  maxReconnectInterval?: number;
  /** Attempts in a row before giving up (status `closed`, reason `max-attempts`). Default 10. */
  maxReconnectAttempts?: number;
  /**
   * Silence (ms) after which the stream counts as dead and is reopened. The server pings
   * every `PING_INTERVAL_MS`; keep this above it. Default 100000; 0 turns the check off.
   */
  heartbeatTimeout?: number;
  /** Send cookies on a cross-origin stream (e.g. an `sse_token` cookie). Default false. */
  withCredentials?: boolean;
  /** Remember the last event id in sessionStorage and resume from it. Default true. */
  resume?: boolean;
  /** Where the last event id is kept. Default: `nomey-sse:lastEventId:<origin+path>:<userId>`. */
  storageKey?: string;
  /** Storage for the last event id. Default `sessionStorage`. */
  storage?: Pick<Storage, 'getItem' | 'setItem'>;
  /** Called on every status change. */
  onStatus?: (status: ConnectionStatus) => void;
  /** An EventSource implementation, for environments without a global one. */
  EventSource?: typeof EventSource;
}

export interface SSEClient {
  /**
   * Calls `fn` for each event of that type (`notification`, `connected`, `ping`, …).
   * Listeners survive reconnects. Returns a function that removes the listener.
   * Connection changes are reported through `onStatus`, not `open`/`error` events.
   */
  addEventListener(type: 'connected', fn: (event: SSEMessage<ConnectedData>) => void): () => void;
  addEventListener<T = unknown>(type: string, fn: (event: SSEMessage<T>) => void): () => void;
  /** Closes the stream for good; the status becomes `closed`. */
  close(): void;
  readonly status: ConnectionStatus;
  /** The last event received other than `connected` and `ping`, or null. */
  readonly lastEvent: SSEMessage | null;
  /** The id the next connection resumes from, or null. */
  readonly lastEventId: string | null;
}

export function connect(options?: ConnectOptions): SSEClient;

/** The wait before reconnect attempt `attempt` (1-based), in ms. */
export function backoff(attempt: number, base?: number, max?: number): number;

/** A short text for a status: `Connected`, `Reconnecting in 2s (attempt 3)`, … */
export function describeStatus(status: ConnectionStatus): string;
