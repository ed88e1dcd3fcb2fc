-- Recovery by policy (issue "Recovery when the BMC is gone, and recovery by policy"): per
-- instance, its priority (higher placed first when room is short), its anti-affinity group
-- (members never share a host, also during recovery), how many automatic recoveries it may
-- have (max_relocate; NULL: no limit) and has had, and its size from its domain XML; per
-- host, its capacity (NULL: not known, not limited) and whether it is a reserved (standby)
-- host that recovered instances go to first.
ALTER TABLE instances ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN anti_affinity TEXT;
ALTER TABLE instances ADD COLUMN max_relocate BIGINT;
ALTER TABLE instances ADD COLUMN relocations BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN memory_mib BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN vcpus BIGINT;
ALTER TABLE hosts ADD COLUMN memory_mib BIGINT;
ALTER TABLE hosts ADD COLUMN reserved BOOLEAN NOT NULL DEFAULT FALSE;
