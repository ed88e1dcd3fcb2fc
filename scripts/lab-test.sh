#!/usr/bin/env bash
# `make lab-test`: the QEMU lab's scenarios (failover, db-down-at-boot, provisioner-outage, power-loss) as tests, one at a
# time. Installs what they need first. ~25 min under TCG; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./scripts/setup-test-deps.sh >/dev/null
cargo build --locked -q -p nodekeeper-provisioner -p nodekeeper-guard
cargo nextest run --locked -p nodekeeper-lab --run-ignored only --no-capture
