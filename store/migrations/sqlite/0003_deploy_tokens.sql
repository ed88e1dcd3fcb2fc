-- One-time deploy tokens: minted when a reimaging host fetches its iPXE script, checked and
-- burnt by the deploy agent's callbacks. Only a SHA-256 of the token is stored.
ALTER TABLE hosts ADD COLUMN deploy_token_sha256 TEXT;
ALTER TABLE hosts ADD COLUMN deploy_token_expires BIGINT;
