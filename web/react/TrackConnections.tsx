// TrackConnections: a panel of the service's connection stats (GET /api/sse/stats) that
// refreshes itself. React is a peer dependency (18 or later, for useId).

import { useEffect, useId, useState } from 'react';

/** The body of `GET /api/sse/stats`. */
export interface SSEStats {
  totalClients: number;
  clientsByUser: Record<string, number>;
  averageConnectionDurationMs: number;
  totalEventsSent: number;
  lastEventTimestamp: string | null;
  totalConnections: number;
  pendingNotifications: number;
  instances: number;
}

export interface StatsOptions {
  /** The stats route. Default `/api/sse/stats` (same origin). */
  url?: string;
  /** Milliseconds between refreshes. Default 5000. */
  refreshInterval?: number;
  /**
   * The server's publish key, when it has one. It grants publishing too, so pass it only
   * in admin tools, never in pages that ordinary users load.
   */
  publishKey?: string;
  /** Extra request headers, e.g. your own proxy's auth. */
  headers?: Record<string, string>;
  /** fetch's credentials mode, for a cross-origin server behind cookies. */
  credentials?: RequestCredentials;
}

export interface StatsState {
  stats: SSEStats | null;
  /** The last refresh's failure, or null once one succeeds. */
  error: { status?: number; code?: string; message: string } | null;
  updatedAt: Date | null;
}

/** Fetches the stats now and every `refreshInterval` ms while mounted. */
export function useSSEStats(options: StatsOptions = {}): StatsState {
  const { url = '/api/sse/stats', refreshInterval = 5000, publishKey, headers, credentials } = options;
  const [state, setState] = useState<StatsState>({ stats: null, error: null, updatedAt: null });
  const headersKey = JSON.stringify(headers ?? {});

  useEffect(() => {
    let stopped = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let inFlight: AbortController | undefined;

    async function refresh() {
      inFlight = new AbortController();
      try {
        const requestHeaders: Record<string, string> = { ...JSON.parse(headersKey) };
        if (publishKey) requestHeaders.Authorization = `Bearer ${publishKey}`;
        const response = await fetch(url, {
          headers: requestHeaders,
          credentials,
          signal: inFlight.signal,
        });
        const body = await response.json().catch(() => null);
        if (stopped) return;
        if (!response.ok) {
          const message =
            response.status === 401
              ? 'The stats need the publish key.'
              : body?.error?.message ?? `HTTP ${response.status}`;
          setState((s) => ({
            ...s,
            error: { status: response.status, code: body?.error?.code, message },
          }));
        } else {
          setState({ stats: body as SSEStats, error: null, updatedAt: new Date() });
        }
      } catch (err) {
        if (stopped) return;
        setState((s) => ({ ...s, error: { message: (err as Error).message || 'network error' } }));
      }
      if (!stopped) timer = setTimeout(refresh, refreshInterval);
    }

    refresh();
    return () => {
      stopped = true;
      clearTimeout(timer);
      inFlight?.abort();
    };
  }, [url, refreshInterval, publishKey, headersKey, credentials]);

  return state;
}

export interface TrackConnectionsProps extends StatsOptions {
  /** The panel's heading and accessible name. Default `Connection stats`. */
  title?: string;
  className?: string;
}

/**
 * The stats panel: total clients, clients per user, average connection duration, events
 * sent and the last event's time, refreshed every `refreshInterval` ms.
 *
 * ```tsx
 * <TrackConnections url="https://sse.example.com/api/sse/stats" refreshInterval={3000} />
 * ```
 */
export function TrackConnections({ title = 'Connection stats', className, ...options }: TrackConnectionsProps) {
  const { stats, error, updatedAt } = useSSEStats(options);
  const headingId = useId();
  const users = stats ? Object.entries(stats.clientsByUser).sort(([a], [b]) => a.localeCompare(b)) : [];
  const dash = '–';

  return (
    <section aria-labelledby={headingId} className={className}>
      <h2 id={headingId}>{title}</h2>
      <dl>
        <dt>Total clients</dt>
        <dd data-stat="totalClients">{stats ? stats.totalClients : dash}</dd>
        <dt>Clients per user</dt>
        <dd data-stat="clientsByUser">
          {!stats ? dash : users.length ? users.map(([user, n]) => `${user}: ${n}`).join(', ') : 'none'}
        </dd>
        <dt>Average connection duration</dt>
        <dd data-stat="averageConnectionDuration">
          {stats ? formatDuration(stats.averageConnectionDurationMs) : dash}
        </dd>
        <dt>Events sent</dt>
        <dd data-stat="totalEventsSent">{stats ? stats.totalEventsSent : dash}</dd>
        <dt>Last event time</dt>
        <dd data-stat="lastEventTime">
          {!stats ? dash : stats.lastEventTimestamp ? new Date(stats.lastEventTimestamp).toLocaleString() : 'none yet'}
        </dd>
      </dl>
      {error ? (
        <p role="alert">{error.message}</p>
      ) : updatedAt ? (
        <p>Updated {updatedAt.toLocaleTimeString()}</p>
      ) : null}
    </section>
  );
}

/** `850 ms`, `12.4 s`, `3 min 5 s`, `2 h 10 min`. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export default TrackConnections;
