-- Node tokens: the credential a host's guard presents to the provisioner's guard API (when the
-- guard does not reach the database directly, e.g. with the embedded SQLite). The node makes
-- it at first boot and sends it with the deploy agent's "up" report, authenticated by the
-- one-time deploy token; an operator can also mint one (`host token NAME`). Only a SHA-256 is
-- stored. A reimage replaces it.
ALTER TABLE hosts ADD COLUMN node_token_sha256 TEXT;
