-- Guards on PostgreSQL under a role that can do no more than the guard API (issue "Safe under
-- its own faults"): a compromised node must not rewrite ownership, read other hosts' domain
-- XML or the cell secret, or point a BMC URL at itself. Such a role (made by
-- `nodekeeper-provisioner db guard-role HOST`) holds no privilege on any table; it may only
-- call the functions below, which run as their owner (SECURITY DEFINER), find the caller's
-- host in `guard_roles` by `session_user`, and act for that host alone — the same answers,
-- checks and namespacing as the HTTP guard API (provisioner/src/http/guard_api.rs).

CREATE TABLE guard_roles (
    role TEXT PRIMARY KEY NOT NULL,
    host TEXT NOT NULL UNIQUE REFERENCES hosts (name) ON DELETE CASCADE
);

-- The caller's host, or NULL for a role that is not a guard's (what a guard asks first).
CREATE FUNCTION nk_guard_identity() RETURNS TEXT
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT host FROM guard_roles WHERE role = session_user
$$;

-- The caller's host; an error for any other role.
CREATE FUNCTION nk_guard_me() RETURNS TEXT
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE me TEXT;
BEGIN
    SELECT host INTO me FROM guard_roles WHERE role = session_user;
    IF me IS NULL THEN
        RAISE EXCEPTION 'role % is not a guard''s role', session_user USING ERRCODE = '42501';
    END IF;
    RETURN me;
END $$;

CREATE FUNCTION nk_now_ms() RETURNS BIGINT
LANGUAGE sql VOLATILE AS $$ SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) $$;

-- HMAC-SHA256 (RFC 2104) with the built-in sha256(): no extension needed.
CREATE FUNCTION nk_hmac_sha256(key BYTEA, message BYTEA) RETURNS BYTEA
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    k BYTEA := CASE WHEN length(key) > 64 THEN sha256(key) ELSE key END;
    ipad BYTEA;
    opad BYTEA;
BEGIN
    k := k || decode(repeat('00', 64 - length(k)), 'hex');
    ipad := k;
    opad := k;
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(k, i) # 54);
        opad := set_byte(opad, i, get_byte(k, i) # 92);
    END LOOP;
    RETURN sha256(opad || sha256(ipad || message));
END $$;

CREATE FUNCTION nk_guard_heartbeat() RETURNS BIGINT
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE now_ms BIGINT := nk_now_ms();
BEGIN
    UPDATE hosts SET last_heartbeat = now_ms WHERE name = nk_guard_me();
    RETURN now_ms;
END $$;

CREATE FUNCTION nk_guard_host_known() RETURNS BIGINT
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT COUNT(*) FROM hosts WHERE name = nk_guard_me()
$$;

-- Ownership of the listed instances (a JSON array of UUIDs), whoever owns them: what
-- `guard boot` asks. No domain XML.
CREATE FUNCTION nk_guard_ownership(uuids TEXT)
RETURNS TABLE (uuid TEXT, owner TEXT, generation BIGINT, deleted BIGINT, ha BIGINT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT i.uuid, i.owner, i.generation,
           CAST(CASE WHEN i.deleted THEN 1 ELSE 0 END AS BIGINT),
           CAST(CASE WHEN i.ha THEN 1 ELSE 0 END AS BIGINT)
    FROM instances i
    WHERE nk_guard_me() IS NOT NULL AND i.uuid IN (SELECT json_array_elements_text(CAST(uuids AS JSON)))
$$;

-- The instances assigned to the caller's host.
CREATE FUNCTION nk_guard_assigned()
RETURNS TABLE (uuid TEXT, name TEXT, generation BIGINT, ha BIGINT, deleted BIGINT, storage TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT i.uuid, i.name, i.generation,
           CAST(CASE WHEN i.ha THEN 1 ELSE 0 END AS BIGINT),
           CAST(CASE WHEN i.deleted THEN 1 ELSE 0 END AS BIGINT), i.storage
    FROM instances i WHERE i.owner = nk_guard_me() ORDER BY i.name, i.uuid
$$;

-- The domain XML of an instance assigned to the caller's host; NULL for any other.
CREATE FUNCTION nk_guard_domain_xml(instance TEXT) RETURNS TEXT
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT domain_xml FROM instances WHERE uuid = instance AND owner = nk_guard_me()
$$;

-- Replaces the caller's report (JSON, as the guard API's PUT …/guard/report).
CREATE FUNCTION nk_guard_report(domains TEXT) RETURNS VOID
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE me TEXT := nk_guard_me();
BEGIN
    PERFORM CAST(domains AS JSON);
    DELETE FROM guard_reports WHERE host = me;
    INSERT INTO guard_reports (host, at, domains) VALUES (me, nk_now_ms(), domains);
END $$;

-- Appends events (JSON [{"kind", "instance"?, "message", "key"?}]) as `guard:HOST` about
-- HOST, keys under `guard:HOST:`: the actor, the host and the key space cannot be chosen.
CREATE FUNCTION nk_guard_events(events TEXT) RETURNS VOID
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    me TEXT := nk_guard_me();
    actor TEXT := 'guard:' || nk_guard_me();
    e JSON;
    now_ms BIGINT := nk_now_ms();
BEGIN
    PERFORM pg_advisory_xact_lock(7271001);
    FOR e IN SELECT json_array_elements(CAST(events AS JSON)) LOOP
        IF NOT (e->>'kind' ~ '^[a-z0-9._-]{3,64}$' AND strpos(e->>'kind', '.') > 0)
           OR e->>'message' IS NULL OR length(e->>'message') > 4096 THEN
            RAISE EXCEPTION 'invalid event kind % or message', e->>'kind' USING ERRCODE = '22023';
        END IF;
        INSERT INTO events (at, actor, kind, host, instance, message, key)
        VALUES (now_ms, actor, e->>'kind', me, e->>'instance', e->>'message',
                CASE WHEN e->>'key' IS NULL THEN NULL ELSE actor || ':' || (e->>'key') END)
        ON CONFLICT (key) DO NOTHING;
    END LOOP;
END $$;

-- What the caller's peer list is made of: every other host with its state, addresses,
-- whether it ever heartbeated, and the key the pair shares (as store/src/guard_api.rs
-- peer_key: HMAC-SHA256 under the cell secret of "nodekeeper-peer-v1|LOW|HIGH"). The secret
-- itself never leaves. The list is cut and counted by the same code as the API's.
CREATE FUNCTION nk_guard_peer_material()
RETURNS TABLE (name TEXT, state TEXT, ip TEXT, leased_ip TEXT, heartbeated BIGINT, key TEXT)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    me TEXT := nk_guard_me();
    secret TEXT;
BEGIN
    SELECT value INTO secret FROM settings WHERE settings.name = 'cell_secret';
    IF secret IS NULL THEN
        INSERT INTO settings (name, value)
        VALUES ('cell_secret', replace(CAST(gen_random_uuid() AS TEXT), '-', '') || replace(CAST(gen_random_uuid() AS TEXT), '-', ''))
        ON CONFLICT ON CONSTRAINT settings_pkey DO NOTHING;
        SELECT value INTO secret FROM settings WHERE settings.name = 'cell_secret';
    END IF;
    RETURN QUERY
    SELECT h.name, h.state, h.ip, l.ip,
           CAST(CASE WHEN h.last_heartbeat IS NULL THEN 0 ELSE 1 END AS BIGINT),
           encode(nk_hmac_sha256(convert_to(secret, 'UTF8'),
                  convert_to('nodekeeper-peer-v1|' || LEAST(h.name COLLATE "C", me COLLATE "C") || '|' || GREATEST(h.name COLLATE "C", me COLLATE "C"), 'UTF8')), 'hex')
    FROM hosts h LEFT JOIN leases l ON l.mac = h.mac
    WHERE h.name <> me
    ORDER BY h.name;
END $$;

-- The caller vouches for `peer` (as POST …/guard/relay): a heartbeat for a watched peer,
-- and one event per relaying peer and minute. FALSE, and nothing recorded, otherwise.
CREATE FUNCTION nk_guard_relay(peer TEXT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    me TEXT := nk_guard_me();
    now_ms BIGINT := nk_now_ms();
BEGIN
    IF peer = me THEN
        RAISE EXCEPTION 'a host cannot relay its own heartbeat' USING ERRCODE = '22023';
    END IF;
    UPDATE hosts SET last_heartbeat = now_ms
    WHERE name = peer AND last_heartbeat IS NOT NULL AND state IN ('active', 'suspect');
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(7271001);
    INSERT INTO events (at, actor, kind, host, instance, message, key)
    VALUES (now_ms, 'guard:' || me, 'host.heartbeat_relayed', peer, NULL,
            peer || ' cannot reach the controller; its heartbeat is relayed by ' || me || '''s guard',
            'relay:' || peer || ':' || me || ':' || (now_ms / 60000))
    ON CONFLICT (key) DO NOTHING;
    RETURN 1;
END $$;

-- Security definer functions are callable by PUBLIC unless revoked: only guard roles (granted
-- one by one by `db guard-role`) may call them. nk_guard_identity stays public: it tells a
-- caller only its own mapping.
REVOKE EXECUTE ON FUNCTION nk_guard_me(), nk_guard_heartbeat(), nk_guard_host_known(),
    nk_guard_ownership(TEXT), nk_guard_assigned(), nk_guard_domain_xml(TEXT), nk_guard_report(TEXT),
    nk_guard_events(TEXT), nk_guard_peer_material(), nk_guard_relay(TEXT) FROM PUBLIC;
