#!/usr/bin/env bash
# Installs the iPXE binaries from Debian's `ipxe` package into the provisioner's TFTP root:
# undionly.kpxe (BIOS), ipxe.efi (x86-64 UEFI), snponly.efi (UEFI, the firmware's own driver).
# Debian's amd64 package has no arm64 build: put an ipxe-arm64.efi there yourself for arm64.
# usage: install-tftp-root.sh [ROOT]   (default /var/lib/nodekeeper/tftp). Idempotent.
set -euo pipefail
root=${1:-/var/lib/nodekeeper/tftp}
if [ ! -f /usr/lib/ipxe/undionly.kpxe ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ipxe >&2
fi
install -d -m 0755 "$root"
for f in undionly.kpxe ipxe.efi snponly.efi; do
  install -m 0644 "/usr/lib/ipxe/$f" "$root/$f"
done
echo "iPXE binaries installed in $root:"
ls -l "$root"
