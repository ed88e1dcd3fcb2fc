-- Admin tokens (issue "The operator's surface"): who may use the admin API, and as what.
-- `sha256` is the hex SHA-256 of the token (256 random bits: a plain digest is enough, as for
-- node tokens); the token itself is shown once, at `token create`, and never stored.
-- A revoked token keeps its row (its name stays taken, the events name it); times are
-- milliseconds since the epoch.
CREATE TABLE admin_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    sha256 TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);
