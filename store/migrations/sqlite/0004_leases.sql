-- DHCP leases, so a restarted provisioner never hands one address to two clients.
CREATE TABLE leases (
    mac         TEXT PRIMARY KEY NOT NULL,
    ip          TEXT NOT NULL UNIQUE,
    expires_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
