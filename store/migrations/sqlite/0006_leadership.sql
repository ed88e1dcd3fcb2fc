-- Who runs the controller: one row per role, held by one provisioner replica until it
-- expires. A replica renews it while alive; another takes it only once it has expired.
-- `term` grows by one on every change of holder (fencing token for the controller's writes).
CREATE TABLE leadership (
    role TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL
);
