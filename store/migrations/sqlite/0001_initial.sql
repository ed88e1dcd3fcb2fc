-- nodekeeper initial schema (SQLite). Keep in step with ../postgres/0001_initial.sql:
-- same tables, same columns, same constraints; only the dialect differs.
-- Timestamps are milliseconds since the Unix epoch (UTC), written by the application.

CREATE TABLE hosts (
    name            TEXT PRIMARY KEY NOT NULL,
    mac             TEXT UNIQUE,
    ip              TEXT,
    bmc_url         TEXT,
    bmc_credentials TEXT,
    state           TEXT NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'suspect', 'fenced', 'reimaging', 'maintenance')),
    last_heartbeat  BIGINT,
    image           TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE instances (
    uuid        TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL REFERENCES hosts (name),
    generation  BIGINT NOT NULL DEFAULT 1 CHECK (generation >= 0),
    ha          BOOLEAN NOT NULL DEFAULT FALSE,
    storage     TEXT NOT NULL CHECK (storage IN ('shared', 'volume', 'local')),
    deleted     BOOLEAN NOT NULL DEFAULT FALSE,
    domain_xml  TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX instances_owner ON instances (owner);

CREATE TABLE operations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    target      TEXT NOT NULL,
    step        TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    attempts    BIGINT NOT NULL DEFAULT 0,
    deadline    BIGINT,
    last_error  TEXT,
    data        TEXT NOT NULL DEFAULT '{}',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- At most one running operation of a kind per target (one reimage per host, ...).
CREATE UNIQUE INDEX operations_one_running ON operations (kind, target) WHERE status = 'running';

CREATE TABLE events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    host      TEXT,
    instance  TEXT,
    message   TEXT NOT NULL
);
CREATE INDEX events_host ON events (host, id);
CREATE INDEX events_instance ON events (instance, id);
