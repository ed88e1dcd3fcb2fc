-- Services with n active copies (issue "Service failover with n leaders"): the seed's
-- "extended leader election service (with support for n leaders/active nodes)".
-- A host's labels (which services it may run).
CREATE TABLE host_labels (
    host TEXT NOT NULL REFERENCES hosts (name),
    label TEXT NOT NULL,
    PRIMARY KEY (host, label)
);

-- A service: how many copies run at once, on hosts with every one of `labels` (JSON array),
-- started, stopped and checked by these commands (JSON argv arrays) on the host; `exclusive`:
-- a copy leaves a failed host only once that host is confirmed off (fenced), as an HA instance.
CREATE TABLE services (
    name TEXT PRIMARY KEY,
    copies BIGINT NOT NULL CHECK (copies >= 0),
    labels TEXT NOT NULL,
    start_cmd TEXT NOT NULL,
    stop_cmd TEXT NOT NULL,
    check_cmd TEXT,
    exclusive BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Where each copy (slot 0..copies-1) runs: its host since `since`, with a generation that is
-- +1 on every move (a compare-and-set, as an instance's owner).
CREATE TABLE service_copies (
    service TEXT NOT NULL REFERENCES services (name),
    slot BIGINT NOT NULL,
    host TEXT NOT NULL REFERENCES hosts (name),
    generation BIGINT NOT NULL,
    since BIGINT NOT NULL,
    PRIMARY KEY (service, slot)
);
CREATE INDEX service_copies_host ON service_copies (host);

-- The copies assigned to the caller's host, with what starts, stops and checks them.
CREATE FUNCTION nk_guard_services()
RETURNS TABLE (service TEXT, slot BIGINT, generation BIGINT, start_cmd TEXT, stop_cmd TEXT, check_cmd TEXT,
               exclusive BIGINT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT c.service, c.slot, c.generation, s.start_cmd, s.stop_cmd, s.check_cmd,
           CAST(CASE WHEN s.exclusive THEN 1 ELSE 0 END AS BIGINT)
    FROM service_copies c JOIN services s ON s.name = c.service
    WHERE c.host = nk_guard_me() ORDER BY c.service, c.slot
$$;

REVOKE EXECUTE ON FUNCTION nk_guard_services() FROM PUBLIC;

-- Guard roles made before this migration may read theirs too.
DO $$
DECLARE r RECORD;
BEGIN
    FOR r IN SELECT role FROM guard_roles LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.role) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION nk_guard_services() TO %I', r.role);
        END IF;
    END LOOP;
END $$;
