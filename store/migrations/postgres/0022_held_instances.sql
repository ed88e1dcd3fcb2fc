-- Drain (issue "The operator's surface"): an instance `held` is kept stopped by its owner's
-- guard (shut down cleanly if it runs, never started) until a drain gives it a new owner
-- (which clears the flag in the same statement) or lets it go.
ALTER TABLE instances ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE;

-- The held instances of the caller's host (beside nk_guard_assigned, whose row type stays).
CREATE FUNCTION nk_guard_held()
RETURNS TABLE (uuid TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT i.uuid FROM instances i WHERE i.owner = nk_guard_me() AND i.held ORDER BY i.uuid
$$;

REVOKE EXECUTE ON FUNCTION nk_guard_held() FROM PUBLIC;

-- Guard roles made before this migration may read it too.
DO $$
DECLARE r RECORD;
BEGIN
    FOR r IN SELECT role FROM guard_roles LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.role) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION nk_guard_held() TO %I', r.role);
        END IF;
    END LOOP;
END $$;
