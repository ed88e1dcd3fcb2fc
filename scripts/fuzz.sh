#!/usr/bin/env bash
# `make fuzz`: every fuzz target for a bounded time (FUZZ_SECONDS each, default 60), with
# libFuzzer + AddressSanitizer through cargo-fuzz. Stable toolchain: cargo-fuzz needs nightly
# flags, which RUSTC_BOOTSTRAP=1 enables. Seeds live in fuzz/seeds/<target>/; the working
# corpus (fuzz/corpus/) and any crash (fuzz/artifacts/) stay out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in $(cargo fuzz list); do
  mkdir -p "fuzz/corpus/$target"
  echo "== fuzz $target for ${seconds}s"
  # dhcp_respond runs as deployed (-O, no debug assertions): dhcproto debug-asserts on some
  # hostile options, which the server survives (dhcp::decode) but libFuzzer's abort cannot.
  flags=(); [ "$target" = dhcp_respond ] && flags=(-O)
  cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::new_units_added|==[0-9]+==ERROR|SUMMARY)' || true
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $target found a crash: $(ls fuzz/artifacts/$target/crash-*)" >&2
    exit 1
  fi
done
