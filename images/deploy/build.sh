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
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
cp "$agent" "$root/bin/nodekeeper-deploy"
strip "$root/bin/nodekeeper-deploy" 2>/dev/null || true

# virtio PCI, network and block drivers, dependencies first.
resolve() {
  local m=$1 d
  for d in $(modinfo -k "$kver" -F depends "$m" | tr ',' ' '); do resolve "$d"; done
  echo "$m"
}
for m in virtio_pci virtio_net virtio_blk; do resolve "$m"; done | awk '!seen[$0]++' > "$root/lib/modules/order"
while read -r m; do
  f=$(modinfo -k "$kver" -F filename "$m")
  case $f in
    *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) echo "deploy: module $m not found for $kver" >&2; exit 1 ;;
  esac
done < "$root/lib/modules/order"

cat > "$root/bin/udhcpc-script" <<'SCRIPT'
#!/bin/busybox sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
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
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
ip link set lo up
iface=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
  for n in /sys/class/net/*; do n=${n##*/}; [ "$n" != lo ] && iface=$n && break; done
  [ -n "$iface" ] && break
  sleep 1
done
ip link set "$iface" up
udhcpc -i "$iface" -n -q -t 10 -T 2 -s /bin/udhcpc-script || echo "nodekeeper deploy ramdisk: no DHCP lease"
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
