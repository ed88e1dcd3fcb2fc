#!/usr/bin/env bash
# `make inventory-demo`: the quick demo, no QEMU, on the embedded SQLite database: build, migrate, register a
# small fleet, import its instances, show it, then evacuate node-a's HA instances as the
# recovery controller will. `make demo` runs the QEMU lab instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  step "installing the Rust toolchain"
  ./scripts/setup-test-deps.sh >/dev/null
fi

step "building nodekeeper (release)"
cargo build --release --locked -q -p nodekeeper-provisioner
nk() { ./target/release/nodekeeper-provisioner "$@"; }

mkdir -p .demo
rm -f .demo/nodekeeper.db .demo/nodekeeper.db-*
export NODEKEEPER_DATABASE_URL="sqlite://$PWD/.demo/nodekeeper.db"

step "migrating the embedded database at $NODEKEEPER_DATABASE_URL"
nk db migrate

step "registering three compute hosts"
nk host add node-a --mac 52:54:00:6e:6b:0a --ip 10.20.0.11 --bmc redfish+http://10.20.0.1:8000/redfish/v1/Systems/node-a
nk host add node-b --mac 52:54:00:6e:6b:0b --ip 10.20.0.12 --bmc redfish+http://10.20.0.1:8000/redfish/v1/Systems/node-b
nk host add node-c --mac 52:54:00:6e:6b:0c --ip 10.20.0.13 --bmc ipmi://10.20.0.1:6230
nk host list

step "importing the sample inventory (examples/inventory.jsonl)"
nk instance import examples/inventory.jsonl
nk instance list

step "node-a fails: an operator confirms it is off, then moves its HA instances to node-b (each generation +1)"
nk host mark-fenced node-a
mapfile -t ha < <(nk --json instance list --host node-a | python3 -c 'import json,sys; [print(i["uuid"]) for i in json.load(sys.stdin) if i["ha"] and not i["deleted"]]')
nk instance evacuate --to node-b "${ha[@]}"

step "the fleet now"
nk instance list
nk host show node-a

step "done: the database is at .demo/nodekeeper.db; try ./target/release/nodekeeper-provisioner --help"
