-- How a host's deploy ramdisk reaches it: pxe (TFTP for the first loader), http (UEFI HTTP
-- boot) or virtual-media (a per-reimage ISO attached by the BMC).
ALTER TABLE hosts ADD COLUMN boot_path TEXT NOT NULL DEFAULT 'pxe' CHECK (boot_path IN ('pxe', 'http', 'virtual-media'));
