-- Replay reads only what a client could match: each event is filed under one audience
-- key taken from its filter ('*' broadcast, 'u:<user>', 's:<session>', 'x' for filters
-- that name several users or only metadata, which every replay scans, and 'c' for
-- client-id filters, which a resuming stream, having a new id, never matches).
alter table event add column audience text not null default 'x';
update event set audience = '*' where filter is null;
create index event_audience on event (audience, event_id);
