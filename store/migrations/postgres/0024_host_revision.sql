-- Fleet scale (issue "Fleet scale"): a host's revision, +1 on every change of what its guard
-- converges on — the instances it owns or owned (owner, generation, tombstone, HA, storage,
-- XML, hold), the service copies it runs, the services' definitions, the host's own state.
-- A heartbeat answers it, so a guard fetches its assignments again only when they changed
-- (and at least every so often): the converge traffic is proportional to change, not to the
-- fleet. Triggers, so that no write path can forget it. A heartbeat does not change it.
-- Keep in step with ../sqlite/0024_host_revision.sql.
ALTER TABLE hosts ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;

-- A row that names a host in the column TG_ARGV[0] (an instance's owner, a copy's host):
-- the old host's revision and, when it differs, the new one's.
CREATE FUNCTION nk_revision_of_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    old_host TEXT;
    new_host TEXT;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_host := to_jsonb(OLD) ->> TG_ARGV[0];
        UPDATE hosts SET revision = revision + 1 WHERE name = old_host;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_host := to_jsonb(NEW) ->> TG_ARGV[0];
        IF new_host IS DISTINCT FROM old_host THEN
            UPDATE hosts SET revision = revision + 1 WHERE name = new_host;
        END IF;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER instances_revision AFTER INSERT OR UPDATE OR DELETE ON instances
    FOR EACH ROW EXECUTE FUNCTION nk_revision_of_row('owner');
CREATE TRIGGER service_copies_revision AFTER INSERT OR UPDATE OR DELETE ON service_copies
    FOR EACH ROW EXECUTE FUNCTION nk_revision_of_row('host');

CREATE FUNCTION nk_revision_services() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE hosts SET revision = revision + 1
    WHERE name IN (SELECT host FROM service_copies WHERE service = NEW.name);
    RETURN NULL;
END $$;
CREATE TRIGGER services_revision AFTER UPDATE ON services
    FOR EACH ROW EXECUTE FUNCTION nk_revision_services();

CREATE FUNCTION nk_revision_host_state() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE hosts SET revision = revision + 1 WHERE name = NEW.name;
    RETURN NULL;
END $$;
CREATE TRIGGER hosts_revision_state AFTER UPDATE OF state ON hosts
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION nk_revision_host_state();
