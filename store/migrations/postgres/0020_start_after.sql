-- Restart order (issue "… recovery by policy"): the instances (a JSON array of UUIDs) that must
-- run before this one is moved to a new host during a recovery ("start db before web").
ALTER TABLE instances ADD COLUMN start_after TEXT;
