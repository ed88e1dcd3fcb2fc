#!/usr/bin/env bash
# `make demo`: the main job, in the QEMU lab. Installs what it needs (apt, Rust, the BMC venv,
# libvirtd), builds nodekeeper and the images, then runs the failover scenario with a
# narrative on a mixed fleet (node-a a UEFI server with an e1000e NIC and SATA + NVMe disks,
# node-b BIOS with virtio): the provisioner (embedded SQLite) installs both over PXE, HA
# instances run on node-a, node-a is cut off, fenced through its BMC, its HA instances
# recovered on node-b, and node-a back with its stale definitions quarantined. Ends in a
# summary table. ~15 min under TCG; needs root. `make inventory-demo` is the quick one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "installing what the lab needs (apt, Rust, sushy-tools, libvirtd; cached)"
./scripts/setup-test-deps.sh >/dev/null
step "building nodekeeper (release)"
cargo build --release --locked -q -p nodekeeper-provisioner -p nodekeeper-guard -p nodekeeper-lab
step "the lab: failover"
exec ./target/release/nodekeeper-lab demo
