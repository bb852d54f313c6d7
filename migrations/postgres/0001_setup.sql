-- Durable state of nomey-sse. Times are Unix milliseconds (bigint), the same on every
-- backend; the API formats them as RFC 3339.

-- One row. Ids are taken from it under its row lock, which publishing transactions hold
-- until they commit: ids therefore become visible in order, with no gaps, so "every event
-- after N" can never skip one that commits late.
create table event_counter (
    event_counter_id integer primary key check (event_counter_id = 1),
    last_event_id    bigint not null,
    -- Retention has deleted every event up to this id (historyGap).
    retained_through bigint not null
);
insert into event_counter values (1, 0, 0);

-- The event log: what replay and pending delivery read.
create table event (
    event_id   bigint primary key,
    kind       text   not null,
    -- The published JSON value, serialized exactly as it goes on the wire.
    data       text   not null,
    -- The target as JSON (see Filter), null for a broadcast.
    filter     text,
    created_at bigint not null
);
create index event_created_at on event (created_at);

-- Events addressed to users who had no open stream anywhere when they were published.
create table pending (
    user_id  text   not null,
    event_id bigint not null,
    primary key (user_id, event_id)
);
create index pending_event_id on pending (event_id);

-- Running instances; a row whose heartbeat is older than CLIENT_TIMEOUT_MS is stale.
create table instance (
    instance_id  text   primary key,
    started_at   bigint not null,
    heartbeat_at bigint not null
);

-- One row per stream, open or closed.
create table client_session (
    client_id       text   primary key,
    instance_id     text   not null,
    user_id         text,
    session_id      text,
    metadata        text   not null,
    connected_at    bigint not null,
    disconnected_at bigint,
    last_event_at   bigint,
    events_sent     bigint not null
);
create index client_session_open on client_session (instance_id) where disconnected_at is null;
create index client_session_open_user on client_session (user_id) where disconnected_at is null;

-- Running totals for /api/sse/stats; sessions are pruned, these are not.
create table stat (
    stat_id            integer primary key check (stat_id = 1),
    total_events_sent  bigint not null,
    total_connections  bigint not null,
    closed_connections bigint not null,
    closed_duration_ms bigint not null,
    last_event_at      bigint
);
insert into stat values (1, 0, 0, 0, 0, null);
