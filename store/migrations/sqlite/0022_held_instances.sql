-- Drain (issue "The operator's surface"): an instance `held` is kept stopped by its owner's
-- guard (shut down cleanly if it runs, never started) until a drain gives it a new owner
-- (which clears the flag in the same statement) or lets it go.
ALTER TABLE instances ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;
