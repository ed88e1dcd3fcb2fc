-- Fleet scale (issue "Fleet scale"): a host's revision, +1 on every change of what its guard
-- converges on — the instances it owns or owned (owner, generation, tombstone, HA, storage,
-- XML, hold), the service copies it runs, the services' definitions, the host's own state.
-- A heartbeat answers it, so a guard fetches its assignments again only when they changed
-- (and at least every so often): the converge traffic is proportional to change, not to the
-- fleet. Triggers, so that no write path can forget it. A heartbeat does not change it.
ALTER TABLE hosts ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;

CREATE TRIGGER instances_revision_insert AFTER INSERT ON instances BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name = NEW.owner;
END;
CREATE TRIGGER instances_revision_update AFTER UPDATE ON instances BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name IN (OLD.owner, NEW.owner);
END;
CREATE TRIGGER instances_revision_delete AFTER DELETE ON instances BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name = OLD.owner;
END;

CREATE TRIGGER service_copies_revision_insert AFTER INSERT ON service_copies BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name = NEW.host;
END;
CREATE TRIGGER service_copies_revision_update AFTER UPDATE ON service_copies BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name IN (OLD.host, NEW.host);
END;
CREATE TRIGGER service_copies_revision_delete AFTER DELETE ON service_copies BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name = OLD.host;
END;

CREATE TRIGGER services_revision_update AFTER UPDATE ON services BEGIN
    UPDATE hosts SET revision = revision + 1
    WHERE name IN (SELECT host FROM service_copies WHERE service = NEW.name);
END;

CREATE TRIGGER hosts_revision_state AFTER UPDATE OF state ON hosts
WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name = NEW.name;
END;
