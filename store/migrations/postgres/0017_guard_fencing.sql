-- How each guard says it fences itself (issue "Recovery when the BMC is gone": watchdog
-- fencing): its self-fence settings, the timeout of the hardware watchdog it keeps armed (if
-- any) and the cell its quorum rule counts. One row per host, replaced whenever the guard's
-- profile changes (at start, when its peer list changes, and on a clean stop, before it
-- disarms its watchdog). `profile` is JSON (store/src/reports.rs FencingProfile).
CREATE TABLE guard_fencing (
    host TEXT PRIMARY KEY NOT NULL REFERENCES hosts (name),
    at BIGINT NOT NULL,
    profile TEXT NOT NULL
);

-- Replaces the caller's fencing profile (as the guard API's PUT …/guard/fencing).
CREATE FUNCTION nk_guard_fencing(profile TEXT) RETURNS VOID
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE me TEXT := nk_guard_me();
BEGIN
    PERFORM CAST(profile AS JSON);
    IF length(profile) > 65536 THEN
        RAISE EXCEPTION 'a fencing profile of % bytes is too long', length(profile) USING ERRCODE = '22023';
    END IF;
    INSERT INTO guard_fencing (host, at, profile) VALUES (me, nk_now_ms(), profile)
    ON CONFLICT (host) DO UPDATE SET at = EXCLUDED.at, profile = EXCLUDED.profile;
END $$;

REVOKE EXECUTE ON FUNCTION nk_guard_fencing(TEXT) FROM PUBLIC;

-- Guard roles made before this migration may report too.
DO $$
DECLARE r RECORD;
BEGIN
    FOR r IN SELECT role FROM guard_roles LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.role) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION nk_guard_fencing(TEXT) TO %I', r.role);
        END IF;
    END LOOP;
END $$;
