#!/usr/bin/env bash
# Builds the compute-node disk image into OUT (default images/node/out/node.img): Debian 12
# (debootstrap, then apt without recommends) with systemd, libvirt-daemon-system with the QEMU
# driver, nodekeeper-guard and its units, and the first-boot unit that reports to the
# provisioner. A raw GPT disk that boots on both firmwares, as Debian's cloud images do:
# partition 1 is the EFI system partition (FAT32) with the kernel and initramfs, Debian's signed
# shim at the removable path \EFI\BOOT\BOOTX64.EFI and Debian's signed GRUB beside it (UEFI,
# with or without Secure Boot, no NVRAM entry needed), and syslinux for BIOS (gptmbr.bin in the
# protective MBR chains to the partition marked legacy-BIOS-bootable); partition 2 is the ext4
# root. Both file systems are made from directories: no loop device, no mount.
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
libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils openssh-server"
mkdir -p "$out" "$cache"
# One build at a time (tests that need the image may call this side by side).
exec 9>"$out/.build.lock"
flock 9

for tool in debootstrap mke2fs mformat mcopy mmd syslinux sfdisk dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "node image: $tool is missing (scripts/setup-test-deps.sh installs it)" >&2; exit 1; }
done

cargo build --release --locked -q -p nodekeeper-guard
guard=target/release/nodekeeper-guard

base_key=$(echo "$suite $mirror $packages v1" | sha256sum | cut -c1-16)
base=$cache/node-rootfs-$base_key.tar
# Debian's signed boot chain for UEFI (Secure Boot included): shim and GRUB.
efi=$out/efi
images/efi/fetch.sh "$efi"

stamp="$base_key $(sha256sum "$guard" "$efi"/*.efi images/node/build.sh images/node/firstboot systemd/*.service \
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

# No host keys in the image (every node would share them): the first boot makes its own.
rm -f "$root"/etc/ssh/ssh_host_*

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
Before=nodekeeper-guard-boot.service nodekeeper-guard.service libvirtd.service ssh.service
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
root_partuuid=6e6b6e6f-0000-4000-8000-000000000002
printf 'PARTUUID=%s / ext4 errors=remount-ro 0 1\n' "$root_partuuid" > "$root/etc/fstab"
: > "$root/etc/machine-id"

# --- the disk: p1 the EFI system partition (FAT32: kernel, initramfs, shim + GRUB, syslinux),
# p2 the ext4 root.
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
esp_mib=128
root_mib=$(( $(du -sm "$root" | cut -f1) * 115 / 100 + 256 ))
# 1 MiB before the first partition, 1 MiB after the last one for the backup GPT.
total_mib=$(( 1 + esp_mib + root_mib + 1 ))
cmdline="root=PARTUUID=$root_partuuid ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 quiet"

esp=$work/esp.fat
truncate -s "${esp_mib}M" "$esp"
# -h 2048: the partition's offset in sectors, which syslinux's boot sector reads.
mkfs.vfat -F 32 -h 2048 -n NKBOOT -i 6e6b0001 "$esp" >/dev/null
cat > "$work/syslinux.cfg" <<CFG
DEFAULT node
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL node
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $cmdline
CFG
# Debian's signed GRUB reads \EFI\debian\grub.cfg (its built-in prefix on the partition it
# was loaded from), else grub.cfg beside itself: both get the same one.
cat > "$work/grub.cfg" <<CFG
set timeout=0
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
menuentry 'nodekeeper node' {
  linux /vmlinuz $cmdline
  initrd /initrd.img
}
CFG
mt() { MTOOLS_SKIP_CHECK=1 "$@"; }
mt mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
mt mcopy -i "$esp" "$efi/shimx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mt mcopy -i "$esp" "$efi/grubx64.efi" ::/EFI/BOOT/grubx64.efi
mt mcopy -i "$esp" "$work/grub.cfg" ::/EFI/BOOT/grub.cfg
mt mcopy -i "$esp" "$work/grub.cfg" ::/EFI/debian/grub.cfg
mt mcopy -i "$esp" "$kernel" ::/vmlinuz
mt mcopy -i "$esp" "$initrd" ::/initrd.img
mt mcopy -i "$esp" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$esp"

mke2fs -q -t ext4 -L nkroot -U 6e6b6e6f-0000-4000-8000-0000000000f2 -E root_owner=0:0 \
  -d "$root" "$work/root.ext4" "${root_mib}M"

img=$work/node.img
truncate -s "${total_mib}M" "$img"
sfdisk -q "$img" <<PART
label: gpt
label-id: 6e6b6e6f-0000-4000-8000-000000000000
start=1MiB, size=${esp_mib}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=6e6b6e6f-0000-4000-8000-000000000001, name="EFI system partition", attrs="LegacyBIOSBootable"
start=$(( 1 + esp_mib ))MiB, size=${root_mib}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_partuuid, name="root"
PART
# BIOS: syslinux's GPT-aware MBR code in the protective MBR (its partition record untouched).
dd if=/usr/lib/syslinux/mbr/gptmbr.bin of="$img" conv=notrunc bs=440 count=1 status=none
dd if="$esp" of="$img" conv=notrunc bs=1M seek=1 status=none
dd if="$work/root.ext4" of="$img" conv=notrunc bs=1M seek=$(( 1 + esp_mib )) status=none
mv "$img" "$out/node.img"
echo "$stamp" > "$out/stamp"
echo "node image: $out/node.img ($(du -h --apparent-size "$out/node.img" | cut -f1), kernel $(basename "$kernel"), GPT: UEFI shim+GRUB, BIOS syslinux)"
