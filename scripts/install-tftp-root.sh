#!/usr/bin/env bash
# Installs the iPXE binaries from Debian's `ipxe` package into the provisioner's TFTP root:
# undionly.kpxe (BIOS), ipxe.efi (x86-64 UEFI), snponly.efi (UEFI, the firmware's own driver).
# Debian's amd64 package has no arm64 build: put an ipxe-arm64.efi there yourself for arm64.
# For Secure Boot hosts (`host add --boot-mode uefi-secureboot`), Debian's signed chain:
# shimx64.efi and, as grubx64.efi, the network GRUB (images/efi/fetch.sh downloads both).
# For the deploy ISOs of virtual media (`host add --boot virtual-media`): the CD GRUB as
# grubcdx64.efi (with shimx64.efi, for UEFI), and ISOLINUX's isolinux.bin and ldlinux.c32 (BIOS);
# xorriso builds the ISOs.
# usage: install-tftp-root.sh [ROOT]   (default /var/lib/nodekeeper/tftp). Idempotent.
set -euo pipefail
root=${1:-/var/lib/nodekeeper/tftp}
if [ ! -f /usr/lib/ipxe/undionly.kpxe ] || [ ! -f /usr/lib/ISOLINUX/isolinux.bin ] \
  || [ ! -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || ! command -v xorriso >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ipxe isolinux syslinux-common \
    xorriso mtools dosfstools >&2
fi
install -d -m 0755 "$root"
for f in undionly.kpxe ipxe.efi snponly.efi; do
  install -m 0644 "/usr/lib/ipxe/$f" "$root/$f"
done
efi=$(mktemp -d)
"$(dirname "$0")/../images/efi/fetch.sh" "$efi"
install -m 0644 "$efi/shimx64.efi" "$root/shimx64.efi"
install -m 0644 "$efi/grubnetx64.efi" "$root/grubx64.efi"
install -m 0644 "$efi/grubcdx64.efi" "$root/grubcdx64.efi"
install -m 0644 /usr/lib/ISOLINUX/isolinux.bin "$root/isolinux.bin"
install -m 0644 /usr/lib/syslinux/modules/bios/ldlinux.c32 "$root/ldlinux.c32"
rm -rf "$efi"
echo "iPXE binaries, the signed shim + GRUB (network and CD) and ISOLINUX installed in $root:"
ls -l "$root"
