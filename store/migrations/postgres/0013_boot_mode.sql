-- How a host's firmware boots: bios, uefi or uefi-secureboot. NULL: unknown (the BMC's boot
-- override is sent without a mode, and a UEFI PXE client gets iPXE).
ALTER TABLE hosts ADD COLUMN boot_mode TEXT CHECK (boot_mode IN ('bios', 'uefi', 'uefi-secureboot'));
