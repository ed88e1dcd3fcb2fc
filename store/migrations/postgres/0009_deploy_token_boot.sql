-- The boot a deploy token was issued for ("OPERATION:PXE_BOOT"): one token per boot of a
-- reimage, handed to the first fetch of the iPXE script after power_on; a second fetch in the
-- same boot gets none (a hijack attempt, or a retry that must not orphan the first).
ALTER TABLE hosts ADD COLUMN deploy_token_boot TEXT;
