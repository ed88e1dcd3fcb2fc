#!/usr/bin/env bash
# `make deb`: Debian packages of the provisioner and the guard, with dpkg-deb (no debhelper):
# binaries, systemd units, default configs under /etc/nodekeeper (conffiles), the docs, and a
# system user for the provisioner (made by its postinst). Depends are read off the binaries'
# shared libraries (the packages that own them here), as dpkg-shlibdeps would.
#
#   NK_DEB_BIN_DIR  the binaries to package (default: a release build, made here)
#   NK_DEB_OUT      where the .deb files go (default target/deb)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${NK_DEB_OUT:-target/deb}
bin=${NK_DEB_BIN_DIR:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -q -p nodekeeper-provisioner -p nodekeeper-guard
  bin=target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
mkdir -p "$out"

# The paths of the libraries BINARY itself needs (its DT_NEEDED, not theirs).
needed() {
  local names
  names=$(LC_ALL=C readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  ldd "$1" | awk -v names="$names" 'BEGIN { n = split(names, a, "\n"); for (i = 1; i <= n; i++) want[a[i]] = 1 }
    /=> \// && ($1 in want) { print $3 }'
}

# The packages owning the shared libraries BINARY links, comma-separated.
depends() {
  local pkgs=()
  while read -r lib; do
    [ -n "$lib" ] || continue
    local real
    real=$(readlink -f "$lib")
    local owner
    owner=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$real" 2>/dev/null || true)
    owner=${owner%%:*}
    [ -n "$owner" ] && pkgs+=("$owner")
  done < <(needed "$1")
  printf '%s\n' "${pkgs[@]}" | sort -u | paste -sd, - | sed 's/,/, /g'
}

# package NAME DESCRIPTION EXTRA-CONTROL-LINES: stages $stage/NAME and builds it.
package() {
  local name=$1 description=$2 extra=$3 root=$4
  install -d "$root/DEBIAN"
  local deps
  deps=$(depends "$root/usr/bin/$name")
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  cat > "$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: nodekeeper developers <dev@nodekeeper.dev>
Installed-Size: $size
Depends: $deps
$extra
Section: admin
Priority: optional
Homepage: https://nodekeeper.dev
Description: $description
CONTROL
  (cd "$root" && find etc -type f -printf '/%p\n' | sort) > "$root/DEBIAN/conffiles"
  dpkg-deb --root-owner-group --build "$root" "$out/${name}_${version}_${arch}.deb" >/dev/null
  echo "$out/${name}_${version}_${arch}.deb"
}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

p="$stage/nodekeeper-provisioner"
install -D -m 0755 "$bin/nodekeeper-provisioner" "$p/usr/bin/nodekeeper-provisioner"
install -D -m 0644 packaging/provisioner/nodekeeper-provisioner.service "$p/usr/lib/systemd/system/nodekeeper-provisioner.service"
install -D -m 0644 packaging/provisioner/provisioner.toml "$p/etc/nodekeeper/provisioner.toml"
install -D -m 0755 packaging/provisioner/postinst "$p/DEBIAN/postinst"
install -D -m 0755 packaging/provisioner/postrm "$p/DEBIAN/postrm"
install -d "$p/usr/share/doc/nodekeeper-provisioner" "$p/usr/share/nodekeeper"
install -m 0644 docs/provisioner.md docs/cli.md docs/api.md docs/console.md README.md "$p/usr/share/doc/nodekeeper-provisioner/"
cp -r monitoring "$p/usr/share/nodekeeper/monitoring"
package nodekeeper-provisioner \
  "nodekeeper provisioner: network boot, BMC power, reimage, recovery
 Serves DHCP, TFTP and HTTP on the provisioning network, drives host power through
 BMCs (Redfish, IPMI) and PDUs, reimages hosts, detects failed hosts, fences them and
 moves their HA instances; the admin API, the web console and the admin CLI." \
  "Recommends: ipxe, qemu-utils, xorriso, openssh-client" "$p"

g="$stage/nodekeeper-guard"
install -D -m 0755 "$bin/nodekeeper-guard" "$g/usr/bin/nodekeeper-guard"
for unit in systemd/*.service; do
  install -D -m 0644 "$unit" "$g/usr/lib/systemd/system/$(basename "$unit")"
done
install -D -m 0600 packaging/guard/guard.toml "$g/etc/nodekeeper/guard.toml"
install -D -m 0755 packaging/guard/postinst "$g/DEBIAN/postinst"
install -D -m 0755 packaging/guard/postrm "$g/DEBIAN/postrm"
install -d "$g/usr/share/doc/nodekeeper-guard"
install -m 0644 docs/guard.md README.md "$g/usr/share/doc/nodekeeper-guard/"
package nodekeeper-guard \
  "nodekeeper guard: keeps a libvirt compute host safe through failure
 At boot, before libvirtd, quarantines the definitions of instances recovered elsewhere
 while the host was down; as a service, heartbeats, converges the instances the database
 assigns, watches libvirtd and its peers and fences itself when cut off." \
  "Recommends: libvirt-daemon-system" "$g"
