-- Cell-wide settings made once and shared by every provisioner replica: `cell_secret`, the
-- key from which the guards' per-pair peer keys are derived (see store/src/guard_api.rs).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
