-- The image catalogue: every image a reimage can write, in the one form it is served in (the
-- raw disk image, zstd-compressed, a file under images_dir), with the sizes and digests the
-- deploy agent and operators check against. `image add` writes the file first and this row
-- last: the row is the commit point.
CREATE TABLE images (
    name           TEXT PRIMARY KEY NOT NULL,
    source_format  TEXT NOT NULL CHECK (source_format IN ('raw', 'qcow2', 'zstd', 'gzip', 'xz')),
    file           TEXT NOT NULL UNIQUE,
    raw_size       BIGINT NOT NULL CHECK (raw_size > 0),
    raw_sha256     TEXT NOT NULL,
    served_size    BIGINT NOT NULL CHECK (served_size > 0),
    served_sha256  TEXT NOT NULL,
    data_bytes     BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    last_used_at   BIGINT
);
-- The catalogue image a running operation writes (a reimage): the image cannot be removed
-- under it.
ALTER TABLE operations ADD COLUMN image TEXT;
CREATE INDEX operations_image ON operations (image) WHERE image IS NOT NULL;
CREATE INDEX hosts_image ON hosts (image) WHERE image IS NOT NULL;
