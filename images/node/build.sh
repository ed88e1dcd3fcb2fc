#!/usr/bin/env bash
# Builds the compute-node disk image into OUT (default images/node/out/node.img): Debian 12
# (debootstrap, then apt without recommends) with systemd, libvirt-daemon-system with the QEMU
# driver, nodekeeper-guard and its units, and the first-boot unit that reports to the
# provisioner. A raw MBR disk: partition 1 (FAT, syslinux, kernel + initramfs), partition 2
# (ext4, the root file system) — both made from directories, with no loop device and no mount.
#
# Two caches, both keyed by their inputs: the root file system after apt (the slow part,
# minutes of downloads) as a tarball in NK_CACHE (default /var/cache/nodekeeper), and the image
# itself (out/stamp). Set NK_PROVISIONER_URL to bake another provisioner address.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
out=${1:-images/node/out}
cache=${NK_CACHE:-/var/cache/nodekeeper}
mirror=${NK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
provisioner_url=${NK_PROVISIONER_URL:-http://10.20.0.1:8080}
suite=bookworm
packages="linux-image-amd64 initramfs-tools systemd-sysv dbus udev kmod iproute2 curl ca-certificates \
libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils"
mkdir -p "$out" "$cache"
# One build at a time (tests that need the image may call this side by side).
exec 9>"$out/.build.lock"
flock 9

for tool in debootstrap mke2fs mformat mcopy syslinux sfdisk; do
  command -v "$tool" >/dev/null || { echo "node image: $tool is missing (scripts/setup-test-deps.sh installs it)" >&2; exit 1; }
done

cargo build --release --locked -q -p nodekeeper-guard
guard=target/release/nodekeeper-guard

base_key=$(echo "$suite $mirror $packages v1" | sha256sum | cut -c1-16)
base=$cache/node-rootfs-$base_key.tar
stamp="$base_key $(sha256sum "$guard" images/node/build.sh images/node/firstboot systemd/*.service \
  | sha256sum | cut -c1-16) $provisioner_url"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/node.img" ]; then
  echo "node image up to date in $out"
  exit 0
fi

work=$(mktemp -d /var/tmp/nk-node.XXXXXX)
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
root=$work/root
mkdir -p "$root"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }

if [ -f "$base" ]; then
  echo "node image: root file system from $base"
  tar -C "$root" -xf "$base"
else
  echo "node image: debootstrap $suite (minutes: downloads every package once, then cached)"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,udev "$suite" "$root" "$mirror" \
    > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
  # No daemon may start inside the chroot while packages install.
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  mount -t sysfs sys "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
  echo "deb $mirror $suite main" > "$root/etc/apt/sources.list"
  in_root apt-get update -q > "$work/apt.log" 2>&1 || { tail -30 "$work/apt.log" >&2; exit 1; }
  # shellcheck disable=SC2086
  in_root apt-get install -y -q --no-install-recommends $packages >> "$work/apt.log" 2>&1 \
    || { tail -30 "$work/apt.log" >&2; exit 1; }
  in_root apt-get clean
  for m in dev/pts dev sys proc; do umount -l "$root/$m"; done
  rm -f "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -cf "$base.tmp" . && mv "$base.tmp" "$base"
fi

# Drivers a compute node has no use for (graphics, media, sound, radios, InfiniBand): smaller
# image, faster write. The initramfs was built before, with what booting needs.
kver=$(ls "$root/usr/lib/modules" | sort -V | tail -n1)
for d in drivers/gpu drivers/media drivers/infiniband drivers/iio drivers/staging drivers/net/wireless \
  drivers/bluetooth sound net/wireless net/bluetooth net/mac80211; do
  rm -rf "$root/usr/lib/modules/$kver/kernel/$d"
done
depmod -b "$root" "$kver"

# --- nodekeeper's part: the guard, its units, the first-boot report, the network, a console.
install -m 755 "$guard" "$root/usr/bin/nodekeeper-guard"
strip "$root/usr/bin/nodekeeper-guard" 2>/dev/null || true
install -d "$root/etc/nodekeeper" "$root/var/lib/nodekeeper" "$root/etc/systemd/system/multi-user.target.wants"
for unit in systemd/*.service; do install -m 644 "$unit" "$root/etc/systemd/system/"; done
install -m 755 images/node/firstboot "$root/usr/lib/nodekeeper-firstboot"
echo "$provisioner_url" > "$root/etc/nodekeeper/provisioner-url"
cat > "$root/etc/systemd/system/nodekeeper-firstboot.service" <<'UNIT'
[Unit]
Description=nodekeeper: report the first boot from disk to the provisioner
Wants=network-online.target
After=network-online.target
Before=nodekeeper-guard-boot.service nodekeeper-guard.service libvirtd.service
ConditionPathExists=!/var/lib/nodekeeper/firstboot.done

[Service]
Type=oneshot
ExecStart=/usr/lib/nodekeeper-firstboot
RemainAfterExit=yes
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
UNIT
ln -sf ../nodekeeper-firstboot.service "$root/etc/systemd/system/multi-user.target.wants/"
# The guard: the boot pass before libvirtd, the pass after it, and the service. Their config
# (/etc/nodekeeper/guard.toml) and node token are written by the first boot.
for unit in nodekeeper-guard-boot nodekeeper-guard-post-libvirt nodekeeper-guard; do
  ln -sf ../$unit.service "$root/etc/systemd/system/multi-user.target.wants/"
done
cat > "$root/etc/systemd/network/80-provisioning.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
NET
ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service \
  "$root/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service" 2>/dev/null \
  || { install -d "$root/etc/systemd/system/network-online.target.wants"
       ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$root/etc/systemd/system/network-online.target.wants/"; }
# Serial console for the lab's logs; root has no password (locked), as in a cloud image.
install -d "$root/etc/systemd/system/getty.target.wants"
ln -sf /lib/systemd/system/serial-getty@.service "$root/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"
echo node > "$root/etc/hostname"
printf 'PARTUUID=6e6b6e6f-02 / ext4 errors=remount-ro 0 1\n' > "$root/etc/fstab"
: > "$root/etc/machine-id"

# --- the disk: p1 FAT /boot for syslinux, p2 ext4 root.
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
boot_mib=96
root_mib=$(( $(du -sm "$root" | cut -f1) * 115 / 100 + 256 ))
total_mib=$(( 1 + boot_mib + root_mib ))

mformat_img=$work/boot.fat
truncate -s "${boot_mib}M" "$mformat_img"
mkfs.vfat -n NKBOOT -i 6e6b0001 "$mformat_img" >/dev/null
cat > "$work/syslinux.cfg" <<CFG
DEFAULT node
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL node
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND root=PARTUUID=6e6b6e6f-02 ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 quiet
CFG
MTOOLS_SKIP_CHECK=1 mcopy -i "$mformat_img" "$kernel" ::/vmlinuz
MTOOLS_SKIP_CHECK=1 mcopy -i "$mformat_img" "$initrd" ::/initrd.img
MTOOLS_SKIP_CHECK=1 mcopy -i "$mformat_img" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$mformat_img"

mke2fs -q -t ext4 -L nkroot -U 6e6b6e6f-0000-4000-8000-000000000002 -E root_owner=0:0 \
  -d "$root" "$work/root.ext4" "${root_mib}M"

img=$work/node.img
truncate -s "${total_mib}M" "$img"
sfdisk -q "$img" <<PART
label: dos
label-id: 0x6e6b6e6f
start=1MiB, size=${boot_mib}MiB, type=c, bootable
start=$(( 1 + boot_mib ))MiB, size=${root_mib}MiB, type=83
PART
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$img" conv=notrunc bs=440 count=1 status=none
dd if="$mformat_img" of="$img" conv=notrunc bs=1M seek=1 status=none
dd if="$work/root.ext4" of="$img" conv=notrunc bs=1M seek=$(( 1 + boot_mib )) status=none
mv "$img" "$out/node.img"
echo "$stamp" > "$out/stamp"
echo "node image: $out/node.img ($(du -h --apparent-size "$out/node.img" | cut -f1), kernel $(basename "$kernel"))"
