-- What each guard last saw in its libvirt: one row per host, replaced on every converge pass.
-- `domains` is JSON: [{"uuid": "...", "running": true, "generation": 3}, ...]. The
-- controller's GC pass compares it with the database's assignments.
CREATE TABLE guard_reports (
    host TEXT PRIMARY KEY REFERENCES hosts (name),
    at BIGINT NOT NULL,
    domains TEXT NOT NULL
);
