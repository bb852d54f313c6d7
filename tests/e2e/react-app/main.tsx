// A tiny React app for the end-to-end test: useSSE and TrackConnections as an app would
// use them, against a server on another origin (`?api=`).

import { StrictMode, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { useSSE } from '../../../web/react/useSSE';
import { TrackConnections } from '../../../web/react/TrackConnections';

const params = new URLSearchParams(location.search);
const api = params.get('api') ?? '';
const userId = params.get('userId') ?? 'dora';

function Notifications() {
  const { isConnected, status, lastEvent, addEventListener } = useSSE({ url: `${api}/api/sse`, userId });
  const [messages, setMessages] = useState<string[]>([]);

  useEffect(
    () =>
      addEventListener<{ message: string }>('notification', (event) => {
        setMessages((list) => [...list, event.data.message]);
      }),
    [addEventListener],
  );

  const last = lastEvent?.data as { message?: string } | undefined;
  return (
    <section aria-labelledby="hook-title">
      <h2 id="hook-title">Notifications</h2>
      <p role="status" aria-label="Hook connection">
        {isConnected ? 'connected' : status.state}
      </p>
      <p aria-label="Last event" data-testid="last-event">
        {last?.message ?? 'none'}
      </p>
      <ul aria-label="Hook notifications">
        {messages.map((message, i) => (
          <li key={i}>{message}</li>
        ))}
      </ul>
    </section>
  );
}

createRoot(document.getElementById('root')!).render(
  // StrictMode mounts effects twice: listeners must still fire once per event.
  <StrictMode>
    <Notifications />
    <TrackConnections url={`${api}/api/sse/stats`} refreshInterval={500} />
  </StrictMode>,
);
