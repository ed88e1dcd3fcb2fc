#!/usr/bin/env bash
# Debian's signed UEFI boot chain, for Secure Boot: shim (signed by Microsoft's UEFI CA, with
# Debian's CA inside) and GRUB (signed by Debian), taken from the packages shim-signed and
# grub-efi-amd64-signed (apt-get download + dpkg-deb -x: nothing is installed on this machine).
# Writes to OUT (default images/efi/out):
#   shimx64.efi      the first stage, for disks (\EFI\BOOT\BOOTX64.EFI) and PXE alike
#   grubx64.efi      GRUB for disks (reads \EFI\debian\grub.cfg on the partition it came from)
#   grubnetx64.efi   GRUB for the network (reads /grub/grub.cfg from the TFTP server it came
#                    from): install it in the TFTP root as grubx64.efi, beside shimx64.efi
#   grubcdx64.efi    GRUB for CDs (finds the disc by /.disk/info, reads /boot/grub/grub.cfg):
#                    the deploy ISOs of virtual media boot shim → this one
# Cached in NK_CACHE (default /var/cache/nodekeeper), keyed by nothing but presence: delete
# $NK_CACHE/efi-boot to take newer packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-images/efi/out}
cache=${NK_CACHE:-/var/cache/nodekeeper}
efi=$cache/efi-boot
mkdir -p "$out" "$cache"
exec 8>"$cache/.efi-boot.lock"
flock 8
if [ ! -f "$efi/shimx64.efi" ] || [ ! -f "$efi/grubx64.efi" ] || [ ! -f "$efi/grubnetx64.efi" ] \
  || [ ! -f "$efi/grubcdx64.efi" ]; then
  rm -rf "$efi.tmp" && mkdir -p "$efi.tmp/x"
  get() { (cd "$efi.tmp" && apt-get download -q shim-signed grub-efi-amd64-signed) >/dev/null 2>&1; }
  get || { apt-get update -q >/dev/null 2>&1; get; } \
    || { echo "efi: cannot download shim-signed and grub-efi-amd64-signed (apt sources?)" >&2; exit 1; }
  for deb in "$efi.tmp"/*.deb; do dpkg-deb -x "$deb" "$efi.tmp/x"; done
  cp "$efi.tmp/x/usr/lib/shim/shimx64.efi.signed" "$efi.tmp/shimx64.efi"
  cp "$efi.tmp/x/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" "$efi.tmp/grubx64.efi"
  cp "$efi.tmp/x/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed" "$efi.tmp/grubnetx64.efi"
  cp "$efi.tmp/x/usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed" "$efi.tmp/grubcdx64.efi"
  (cd "$efi.tmp" && ls ./*.deb | xargs -n1 basename) > "$efi.tmp/packages"
  rm -rf "$efi.tmp/x" "$efi.tmp"/*.deb "$efi" && mv "$efi.tmp" "$efi"
fi
for f in shimx64.efi grubx64.efi grubnetx64.efi grubcdx64.efi packages; do
  cmp -s "$efi/$f" "$out/$f" 2>/dev/null || cp "$efi/$f" "$out/$f"
done
