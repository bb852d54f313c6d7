// useSSE: a React hook over sse-client.js. Copy this folder and sse-client.js (with its
// .d.ts) into your app, keeping `../sse-client.js` reachable, or change the import below.
// React is a peer dependency (16.8 or later).

import { useCallback, useEffect, useRef, useState } from 'react';
import { connect } from '../sse-client.js';
import type { ConnectOptions, ConnectionStatus, SSEMessage } from '../sse-client.js';

export type { ConnectionStatus, SSEMessage } from '../sse-client.js';

export interface UseSSEOptions extends Omit<ConnectOptions, 'onStatus'> {
  /** Event types whose arrival updates `lastEvent`. Default `['notification', 'message']`. */
  events?: string[];
  /** Set false to stay disconnected, e.g. until the user id is known. Default true. */
  enabled?: boolean;
  /** Called on every status change, besides updating `status` and `isConnected`. */
  onStatus?: (status: ConnectionStatus) => void;
}

export interface UseSSEResult {
  /** True while the stream is open (the server has sent `connected`). */
  isConnected: boolean;
  /** The full status: state, reconnect attempt and delay, historyGap. */
  status: ConnectionStatus;
  /** The last event of one of `options.events`, or null. */
  lastEvent: SSEMessage | null;
  /**
   * Calls `fn` for each event of `type`, across reconnects and option changes.
   * Returns a function that removes the listener (handy as an effect's cleanup).
   */
  addEventListener<T = unknown>(type: string, fn: (event: SSEMessage<T>) => void): () => void;
}

type Listener = (event: SSEMessage<never>) => void;

const DEFAULT_EVENTS = ['notification', 'message'];
const IDLE: ConnectionStatus = Object.freeze({ state: 'closed', attempt: 0, reason: 'closed' });

/**
 * Opens a stream while the component is mounted and reopens it when a connection option
 * changes. Reconnection, heartbeat checks and resuming after a reload are sse-client's.
 *
 * ```tsx
 * const { isConnected, lastEvent, addEventListener } = useSSE({ userId });
 * useEffect(() => addEventListener('notification', (e) => toast(e.data.message)), [addEventListener]);
 * ```
 */
export function useSSE(options: UseSSEOptions = {}): UseSSEResult {
  const { events = DEFAULT_EVENTS, enabled = true, onStatus, ...connectOptions } = options;
  const [status, setStatus] = useState<ConnectionStatus>(
    enabled ? { state: 'connecting', attempt: 0 } : IDLE,
  );
  const [lastEvent, setLastEvent] = useState<SSEMessage | null>(null);

  // Listeners live here, not on a client, so they outlast a reconnect with new options.
  const listeners = useRef(new Map<string, Set<Listener>>());
  const forward = useRef<(type: string) => void>(() => {});
  const onStatusRef = useRef(onStatus);
  onStatusRef.current = onStatus;

  // The options that need a new connection, as one comparable value.
  const key = JSON.stringify([connectOptions, events, enabled]);

  useEffect(() => {
    if (!enabled) {
      setStatus(IDLE);
      return undefined;
    }
    const sse = connect({
      ...connectOptions,
      onStatus(next) {
        setStatus(next);
        onStatusRef.current?.(next);
      },
    });
    const forwarded = new Set<string>();
    const tracked = new Set(events);
    forward.current = (type) => {
      if (forwarded.has(type)) return;
      forwarded.add(type);
      sse.addEventListener(type, (event) => {
        if (tracked.has(type)) setLastEvent(event);
        for (const fn of [...(listeners.current.get(type) ?? [])]) fn(event as SSEMessage<never>);
      });
    };
    for (const type of tracked) forward.current(type);
    for (const type of listeners.current.keys()) forward.current(type);
    return () => {
      forward.current = () => {};
      sse.close();
    };
    // `key` stands for the options it serializes.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [key]);

  const addEventListener = useCallback(
    <T = unknown>(type: string, fn: (event: SSEMessage<T>) => void) => {
      const listener = fn as Listener;
      let fns = listeners.current.get(type);
      if (!fns) {
        fns = new Set();
        listeners.current.set(type, fns);
      }
      fns.add(listener);
      forward.current(type);
      return () => {
        listeners.current.get(type)?.delete(listener);
      };
    },
    [],
  );

  return { isConnected: status.state === 'connected', status, lastEvent, addEventListener };
}

export default useSSE;
