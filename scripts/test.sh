#!/usr/bin/env bash
# `make test`: installs what the tests need on a fresh Debian 12 (as root), starts a real
# PostgreSQL, then runs the format check, clippy, and every test on both database engines.
# The last line printed is the test runner's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

pg_url=$(./scripts/setup-test-deps.sh | tail -n1)
export NODEKEEPER_TEST_POSTGRES_URL="$pg_url"
export NODEKEEPER_REQUIRE_POSTGRES=1
export NODEKEEPER_REQUIRE_LIBVIRT=1
export NODEKEEPER_REQUIRE_NETNS=1
export NODEKEEPER_REQUIRE_QEMU=1
export NODEKEEPER_REQUIRE_BMC=1

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== images (cached; the node image's first build downloads Debian packages)"
./images/deploy/build.sh
./images/node/build.sh
echo "== tests (SQLite and PostgreSQL at ${pg_url//:nodekeeper_test@/:***@})"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci
else
  cargo test --workspace --locked
fi
