-- The virtual-media image the provisioner inserted into a host's BMC and has not seen ejected
-- yet (its URL): whoever runs the reimage executor ejects it once no reimage of the host runs,
-- also after a restart.
ALTER TABLE hosts ADD COLUMN media_inserted TEXT;
