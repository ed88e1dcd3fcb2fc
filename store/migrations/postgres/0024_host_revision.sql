-- Fleet scale (issue "Fleet scale"): a host's revision, +1 on every change of what its guard
-- converges on — the instances it owns or owned (owner, generation, tombstone, HA, storage,
-- XML, hold), the service copies it runs, the services' definitions, the host's own state.
-- A heartbeat answers it, so a guard fetches its assignments again only when they changed
-- (and at least every so often): the converge traffic is proportional to change, not to the
-- fleet. Triggers, so that no write path can forget it. A heartbeat does not change it.
-- Keep in step with ../sqlite/0024_host_revision.sql.
ALTER TABLE hosts ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION nk_revision_instances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        UPDATE hosts SET revision = revision + 1 WHERE name = OLD.owner;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.owner IS DISTINCT FROM OLD.owner) THEN
        UPDATE hosts SET revision = revision + 1 WHERE name = NEW.owner;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER instances_revision AFTER INSERT OR UPDATE OR DELETE ON instances
    FOR EACH ROW EXECUTE FUNCTION nk_revision_instances();

CREATE FUNCTION nk_revision_service_copies() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        UPDATE hosts SET revision = revision + 1 WHERE name = OLD.host;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.host IS DISTINCT FROM OLD.host) THEN
        UPDATE hosts SET revision = revision + 1 WHERE name = NEW.host;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER service_copies_revision AFTER INSERT OR UPDATE OR DELETE ON service_copies
    FOR EACH ROW EXECUTE FUNCTION nk_revision_service_copies();

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
