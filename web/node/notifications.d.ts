// Types for notifications.mjs, the Node publisher for nomey-sse.

export interface NotifierOptions {
  /** Where the service listens, e.g. `http://sse.internal:8000` (no trailing path). */
  baseUrl: string;
  /** The service's `SSE_PUBLISH_KEY`, sent as `Authorization: Bearer`; omit for an open server. */
  publishKey?: string;
  /** Per request; 0 waits forever. Default 10000. */
  timeoutMs?: number;
  /** A fetch implementation. Default the global one (Node 18+). */
  fetch?: typeof fetch;
}

/** Which clients an event goes to; every given field must match. At least one is required. */
export interface Filter {
  userId?: string;
  userIds?: string[];
  sessionId?: string;
  clientIds?: string[];
  metadata?: Record<string, string>;
}

export interface PublishResult {
  /** The stored event's id, as clients see it in `id:`. */
  eventId: number;
  /** Streams on the instance that took the request which were handed the event. */
  delivered: number;
  /** Some targeted user had no open stream; the event waits for them. */
  pending: boolean;
}

export interface BatchEvent {
  /** Omitted: a broadcast. */
  filter?: Filter;
  event: string;
  data: unknown;
}

export interface Notifier {
  notify(filter: Filter, event: string, data: unknown): Promise<PublishResult>;
  /** One user's streams, or several users' given an array. */
  notifyUser(userId: string | string[], event: string, data: unknown): Promise<PublishResult>;
  notifyWithMetadata(metadata: Record<string, string>, event: string, data: unknown): Promise<PublishResult>;
  broadcast(event: string, data: unknown): Promise<PublishResult>;
  /** 1 to 1000 events stored together, all or none; one result per event, in order. */
  batch(events: BatchEvent[]): Promise<PublishResult[]>;
}

export declare class NotifyError extends Error {
  name: 'NotifyError';
  /** The HTTP status, or null when no answer came. */
  status: number | null;
  /**
   * The server's error code (`unauthorized`, `invalid_body`, `payload_too_large`, …),
   * `http_<status>` for an answer without one, `network_error` or `timeout`.
   */
  code: string;
}

export function createNotifier(options: NotifierOptions): Notifier;
export default createNotifier;
