#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian 12 (run as root).
# Idempotent: a second run only checks. Prints the PostgreSQL test URL on its last line.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs packages, starts PostgreSQL)"; exit 1
  fi
}

# Debian packages the tests use: PostgreSQL (the production database engine); libvirt with
# the QEMU driver and its headers (the guard's post-libvirt pass links libvirt through `virt`).
# Real network-boot clients and peers: tftp-hpa, curl, atftp (RFC 7440 windowsize), busybox
# udhcpc, ISC dhclient, dnsmasq (the DHCP server beside proxy mode), iPXE binaries; iproute2
# for the network namespaces the tests build.
# busybox-static (udhcpc, and the static shell of the test initramfs), a Debian kernel and
# cpio for the QEMU PXE-boot test. debootstrap, mtools, syslinux, dosfstools, fdisk and
# e2fsprogs build the node image (images/node/build.sh) without loop devices or mounts.
PACKAGES=(postgresql libvirt-daemon-system libvirt-dev qemu-system-x86 qemu-utils pkg-config tftp-hpa curl atftp
  busybox-static isc-dhcp-client dnsmasq-base ipxe iproute2 python3 linux-image-amd64 cpio file
  kea-dhcp4-server kea-admin tftpd-hpa nginx-light
  python3-libvirt python3-venv ipmitool faketime ovmf snmp openssh-server openssh-client prometheus
  debootstrap mtools syslinux syslinux-common dosfstools fdisk e2fsprogs xorriso isolinux
  chromium chromium-driver)
# (Kea's perfdhcp, kea-dhcp4, tftpd-hpa and nginx are the peers `make bench` measures against;
# faketime runs a guard whose clock is a minute off, against the database's clock; ovmf is
# the UEFI firmware the UEFI PXE test boots; xorriso and isolinux build the deploy ISOs of
# virtual media; snmp — net-snmp's snmpget/snmpset — drives SNMP PDU outlets, against snmpsim;
# openssh-server runs as a node's sshd for the repair over SSH, ssh and ssh-keygen drive it;
# prometheus brings promtool, which checks the alert rules and a live /metrics; chromium and
# chromium-driver run the web console's test in a real headless browser, over WebDriver.)

# Two passes: installing one package can remove another that was there (a backported
# qemu-utils gives way to the one qemu-system-x86 depends on), so look again after the first.
for pass in 1 2; do
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || break
  need_root
  log "apt-get install ${missing[*]} (pass $pass)"
  export DEBIAN_FRONTEND=noninteractive
  [ "$pass" = 1 ] && apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
done

# The Rust toolchain (the machine image has it; a bare Debian gets rustup).
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "installing Rust with rustup"
  command -v curl >/dev/null || { apt-get update -qq >&2; apt-get install -y -qq curl ca-certificates >&2; }
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt >&2
fi

# PostgreSQL: start the cluster if it is down (no systemd here: pg_ctlcluster directly).
PG_VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n1)
if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
  need_root
  if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main"' | grep -q .; then
    log "creating PostgreSQL $PG_VERSION cluster"
    pg_createcluster "$PG_VERSION" main >&2
  fi
  log "starting PostgreSQL $PG_VERSION"
  pg_ctlcluster "$PG_VERSION" main start >&2
fi
for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 0.2
done
pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL did not come up"; exit 1; }

# The chaos campaign runs one libvirtd per simulated host as session daemons of this user.
if ! id nkchaos >/dev/null 2>&1; then
  log "adding the user nkchaos (the chaos campaign's libvirtds)"
  useradd --system --no-create-home --shell /usr/sbin/nologin nkchaos
fi

# libvirtd (no systemd here): start virtlogd and libvirtd as daemons when they are not running.
if [ ! -S /run/libvirt/libvirt-sock ] || ! pgrep -x libvirtd >/dev/null; then
  need_root
  pgrep -x virtlogd >/dev/null || virtlogd -d
  log "starting libvirtd"
  libvirtd -d
  for _ in $(seq 1 50); do
    [ -S /run/libvirt/libvirt-sock ] && break
    sleep 0.2
  done
  [ -S /run/libvirt/libvirt-sock ] || { log "libvirtd did not come up"; exit 1; }
fi

# The BMC emulators (sushy-tools for Redfish, VirtualBMC for IPMI) and the PDU's (snmpsim,
# with pysmi, which it imports without declaring) in a venv over Debian's python3 and its
# python3-libvirt, as the tests expect at NODEKEEPER_BMC_VENV.
BMC_VENV=${NODEKEEPER_BMC_VENV:-/opt/nk-bmc-venv}
if [ ! -x "$BMC_VENV/bin/sushy-emulator" ] || [ ! -x "$BMC_VENV/bin/vbmcd" ] \
  || [ ! -x "$BMC_VENV/bin/snmpsim-command-responder" ] || ! "$BMC_VENV/bin/python3" -c 'import pysmi' 2>/dev/null; then
  need_root
  log "installing sushy-tools, virtualbmc and snmpsim into $BMC_VENV"
  /usr/bin/python3 -m venv --system-site-packages "$BMC_VENV" >&2
  "$BMC_VENV/bin/pip" install -q sushy-tools virtualbmc snmpsim pysmi >&2
fi

# A role that may create the throwaway databases each test makes for itself, and the guard
# roles the guard-role test makes (CREATEROLE, as `db guard-role` needs).
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres >&2 <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nodekeeper_test') THEN
    CREATE ROLE nodekeeper_test LOGIN CREATEDB CREATEROLE PASSWORD 'nodekeeper_test';
  END IF;
END $$;
ALTER ROLE nodekeeper_test CREATEROLE;
SQL
echo "postgres://nodekeeper_test:nodekeeper_test@127.0.0.1:5432/postgres"
