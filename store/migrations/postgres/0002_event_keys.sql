-- Idempotency keys for events written by retried work (the guard's journaled quarantines):
-- an event with a key is recorded once, however often the work is replayed after a crash.
ALTER TABLE events ADD COLUMN key TEXT;
CREATE UNIQUE INDEX events_key ON events (key);
