-- Live migration in drains (issue "The operator's surface"): an instance a drain migrates
-- live keeps its owner until the move is seen done — `migrating_to` names the host it goes
-- to, `migration_uri` that host's libvirt (as its guard announced it), `migration_started_at`
-- when the intent was written (a guard report must be newer to count). The source's guard
-- migrates it; the target's guard leaves the incoming domain alone; the controller gives the
-- instance its new owner once the target reports it running and the source no longer does.
-- A move of the owner (recovery, evacuation, the move itself) clears the three columns.
ALTER TABLE instances ADD COLUMN migrating_to TEXT;
ALTER TABLE instances ADD COLUMN migration_uri TEXT;
ALTER TABLE instances ADD COLUMN migration_started_at BIGINT;
CREATE INDEX instances_migrating ON instances (migrating_to) WHERE migrating_to IS NOT NULL;

-- The target's guard must look (its revision moves) when an instance starts or stops coming.
CREATE TRIGGER instances_revision_migrating AFTER UPDATE OF migrating_to ON instances
WHEN OLD.migrating_to IS NOT NEW.migrating_to BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name IN (OLD.migrating_to, NEW.migrating_to);
END;
