#!/usr/bin/env bash
# Builds the deploy ramdisk into OUT (default images/deploy/out): `vmlinuz` (Debian's kernel)
# and `initrd.img` (busybox-static, the virtio modules with their dependencies, and the static
# nodekeeper-deploy agent). Reproducible: sorted file list, fixed timestamps, no host paths.
# The result is cached: rebuilt only when an input changed (see the stamp file).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
out=${1:-images/deploy/out}
mkdir -p "$out"
# One build at a time (tests that need the ramdisk may call this side by side).
exec 9>"$out/.build.lock"
flock 9

kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1)
[ -n "$kernel" ] || { echo "deploy: no kernel in /boot (apt-get install linux-image-amd64)" >&2; exit 1; }
kver=${kernel#/boot/vmlinuz-}
busybox=$(command -v busybox)
file -L "$busybox" | grep -q 'statically linked' || { echo "deploy: $busybox is not static (apt-get install busybox-static)" >&2; exit 1; }

RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -q -p nodekeeper-deploy \
  --target x86_64-unknown-linux-gnu --target-dir target/static
agent=target/static/x86_64-unknown-linux-gnu/release/nodekeeper-deploy

stamp="$kver $(sha256sum "$busybox" "$agent" images/deploy/build.sh | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initrd.img" ]; then
  echo "deploy ramdisk up to date in $out"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
cp "$agent" "$root/bin/nodekeeper-deploy"
strip "$root/bin/nodekeeper-deploy" 2>/dev/null || true

# The drivers real servers need, and QEMU's: storage (NVMe, AHCI/SATA, SAS/RAID, virtio) and
# NICs (Intel, Broadcom, Mellanox, virtio), with every module they depend on, in the kernel's
# own tree under /lib/modules/$kver so that depmod writes modules.dep and modules.alias for
# them. At boot the init loads, by each present device's modalias, only what the machine has
# (coldplug, as udev does); no fixed list to keep in step with hardware.
drivers="virtio_pci virtio_net virtio_blk virtio_scsi sd_mod nvme ahci ata_piix megaraid_sas mpt3sas smartpqi
  e1000 e1000e igb ixgbe i40e ice bnxt_en mlx5_core tg3"
resolve() {
  local m=$1 d
  for d in $(modinfo -k "$kver" -F depends "$m" | tr ',' ' '); do resolve "$d"; done
  echo "$m"
}
mods=$root/lib/modules/$kver
mkdir -p "$mods"
firmware=0
for m in $drivers; do resolve "$m"; done | awk '!seen[$0]++' > "$root/lib/modules/order"
while read -r m; do
  f=$(modinfo -k "$kver" -F filename "$m")
  [ -f "$f" ] || { echo "deploy: module $m not found for $kver" >&2; exit 1; }
  rel=${f#/lib/modules/$kver/}
  mkdir -p "$mods/$(dirname "$rel")"
  case $f in
    *.ko) cp "$f" "$mods/$rel" ;;
    *.ko.xz) xz -dc "$f" > "$mods/${rel%.xz}" ;;
    *.ko.zst) zstd -qdc "$f" > "$mods/${rel%.zst}" ;;
  esac
  # Firmware the driver asks for, where Debian's firmware packages put it on this machine.
  for fw in $(modinfo -k "$kver" -F firmware "$m"); do
    if [ -f "/lib/firmware/$fw" ]; then
      mkdir -p "$root/lib/firmware/$(dirname "$fw")"
      cp "/lib/firmware/$fw" "$root/lib/firmware/$fw"
      firmware=$((firmware + 1))
    fi
  done
done < "$root/lib/modules/order"
cp "/lib/modules/$kver/modules.builtin" "/lib/modules/$kver/modules.builtin.modinfo" "/lib/modules/$kver/modules.order" "$mods/" 2>/dev/null || true
depmod -b "$root" "$kver"
echo "deploy ramdisk: $(wc -l < "$root/lib/modules/order") modules, $firmware firmware files"

cat > "$root/bin/udhcpc-script" <<'SCRIPT'
#!/bin/busybox sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    for d in $dns; do echo "nameserver $d"; done > /etc/resolv.conf
    ;;
esac
exit 0
SCRIPT
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1
echo "nodekeeper deploy ramdisk: starting"
# Coldplug: the driver of every device present, by its modalias (twice: a controller's
# driver makes new devices, SCSI disks behind a RAID or SAS HBA). sd_mod has no alias.
for _ in 1 2; do
  for a in $(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u); do modprobe -q "$a" 2>/dev/null; done
done
modprobe -q sd_mod 2>/dev/null
ip link set lo up
# The NIC the provisioner knows (nk.mac, the host's boot MAC), not the first one by name.
mac=$(sed -n 's/.*nk\.mac=\([0-9a-fA-F:]*\).*/\1/p' /proc/cmdline | tr 'A-F' 'a-f')
iface=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
  for n in /sys/class/net/*; do
    n=${n##*/}
    [ "$n" = lo ] && continue
    if [ -z "$mac" ] || [ "$(cat /sys/class/net/$n/address)" = "$mac" ]; then iface=$n; break; fi
  done
  [ -n "$iface" ] && break
  sleep 1
done
if [ -z "$iface" ]; then
  # Say so, and try the first NIC rather than none (the provisioner's record may be stale).
  echo "nodekeeper deploy ramdisk: no NIC with MAC $mac; NICs seen:"
  for n in /sys/class/net/*; do [ "${n##*/}" != lo ] && echo "  ${n##*/} $(cat $n/address)" && iface=${iface:-${n##*/}}; done
fi
echo "nodekeeper deploy ramdisk: NIC $iface ($(cat /sys/class/net/$iface/address 2>/dev/null)), drivers: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
ip link set "$iface" up
# The address: static when the boot carries one (a virtual-media ISO, from the host's record:
# nk.ip=ADDR/PREFIX nk.gateway=GW nk.dns=A,B), else DHCP (ours, or the site's).
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline; }
static=$(arg nk.ip)
if [ -n "$static" ]; then
  ip addr add "$static" dev "$iface"
  gw=$(arg nk.gateway)
  [ -n "$gw" ] && ip route add default via "$gw" dev "$iface"
  for d in $(arg nk.dns | tr ',' ' '); do echo "nameserver $d"; done > /etc/resolv.conf
  echo "nodekeeper deploy ramdisk: address $static${gw:+, gateway $gw} (from the boot's parameters)"
else
  udhcpc -i "$iface" -n -q -t 10 -T 2 -s /bin/udhcpc-script || echo "nodekeeper deploy ramdisk: no DHCP lease"
fi
/bin/nodekeeper-deploy
echo "nodekeeper deploy ramdisk: agent exited $?; powering off"
sync
poweroff -f
INIT
chmod 0755 "$root/init" "$root/bin/udhcpc-script"
mknod -m 600 "$root/dev/console" c 5 1

find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible --quiet) | gzip -n -9 > "$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
cp "$kernel" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "deploy ramdisk: $out/vmlinuz ($kver), $out/initrd.img ($(du -h "$out/initrd.img" | cut -f1))"
