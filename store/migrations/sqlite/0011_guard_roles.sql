-- Guard roles are a PostgreSQL feature (see ../postgres/0011_guard_roles.sql): on the
-- embedded SQLite, guards reach the database through the provisioner's guard API. The table
-- is kept for the same schema on both.
CREATE TABLE guard_roles (
    role TEXT PRIMARY KEY NOT NULL,
    host TEXT NOT NULL UNIQUE REFERENCES hosts (name) ON DELETE CASCADE
);
