#!/usr/bin/env bash
# `make bench`: benchmarks whose figures go in docs/performance.md. Release builds, one run,
# on both database engines. Prints a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

pg_admin=$(./scripts/setup-test-deps.sh | tail -n1)
cargo build --release --locked -q -p nodekeeper-provisioner -p nodekeeper-guard
nk=./target/release/nodekeeper-provisioner
mkdir -p .bench
results=()

# --- instance import: 100,000 JSON lines into a fresh database, three runs each -----------
python3 - .bench/import-100k.jsonl <<'PY'
import sys, uuid
with open(sys.argv[1], "w") as f:
    for i in range(100_000):
        host = ("node-a", "node-b", "node-c")[i % 3]
        f.write('{"uuid":"%s","name":"vm-%d","host":"%s","ha":%s,"storage":"shared"}\n'
                % (uuid.uuid4(), i, host, "true" if i % 2 else "false"))
PY

pg_db_url() { local u=${pg_admin%/*}; echo "$u/$1"; }
psql_admin() { psql -q "$pg_admin" -c "$1" >/dev/null; }

# sqlite runs with synchronous = FULL (the default: every commit survives a power loss);
# sqlite-normal with NORMAL, to show what FULL costs.
for engine in sqlite sqlite-normal postgres; do
  for run in 1 2 3; do
    case $engine in
      sqlite) rm -f .bench/import.db*; url="sqlite://$PWD/.bench/import.db" ;;
      sqlite-normal) rm -f .bench/import.db*; url="sqlite://$PWD/.bench/import.db?synchronous=normal" ;;
      postgres) psql_admin "DROP DATABASE IF EXISTS nk_bench WITH (FORCE)"; psql_admin "CREATE DATABASE nk_bench"; url=$(pg_db_url nk_bench) ;;
    esac
    export NODEKEEPER_DATABASE_URL=$url
    $nk db migrate >/dev/null
    for h in node-a node-b node-c; do $nk host add $h >/dev/null; done
    start=$(date +%s.%N)
    $nk --json instance import .bench/import-100k.jsonl >/dev/null
    end=$(date +%s.%N)
    secs=$(python3 -c "print(f'{$end - $start:.2f}')")
    count=$($nk --json instance list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    [ "$count" = 100000 ] || { echo "bench: $engine import left $count rows" >&2; exit 1; }
    results+=("import 100,000 instances|$engine|run $run|$secs s")
  done
done
psql_admin "DROP DATABASE IF EXISTS nk_bench WITH (FORCE)"

# --- guard boot: N definitions, 40% owned elsewhere, 100 -> 10,000 -----------------------
echo
echo "== guard boot (median of ${RUNS:-5} runs; target: <= 1 s for 10,000)"
python3 scripts/bench_guard_boot.py ./target/release/nodekeeper-guard "$nk" "$PWD/.bench" "$pg_admin"

# --- network boot: HTTP vs nginx, TFTP vs tftpd-hpa, DHCP vs Kea and dnsmasq --------------
echo
echo "== network boot (ratios against the peers, same run)"
python3 scripts/bench_net.py ./target/release/nodekeeper-provisioner "$PWD/.bench/net"

# --- reimage executor: N reimages at once, fake BMCs and a stub agent (no peer: capacity) --
echo
echo "== reimage executor capacity (SQLite; fake BMCs, stub agent)"
cargo run --release --locked -q -p nodekeeper-provisioner --example reimage_load -- 100 1000 5000
echo "-- the same with synchronous = NORMAL (what FULL costs)"
NK_SQLITE_SYNC=normal cargo run --release --locked -q -p nodekeeper-provisioner --example reimage_load -- 100 1000 5000

# --- DHCP with synchronous = NORMAL: what FULL costs the lease writes ----------------------
echo
echo "== DHCP, nodekeeper only, synchronous = NORMAL (compare with the FULL rows above)"
BENCH=dhcp DHCP_SERVERS=nodekeeper NK_SQLITE_SYNC=normal python3 scripts/bench_net.py ./target/release/nodekeeper-provisioner "$PWD/.bench/net-normal"

echo
echo "== DHCP with the lease table of a 50,000-host fleet already there (each server's own store), nodekeeper and Kea"
BENCH=dhcp DHCP_SERVERS=nodekeeper,kea DHCP_PREFILL=50000 python3 scripts/bench_net.py ./target/release/nodekeeper-provisioner "$PWD/.bench/net-prefill"

# --- the fleet simulator: simulated guards on the real guard API of one serve -------------
echo
echo "== fleet simulator (heartbeats every 5 s, a full converge pass on change or every 45-60 s, grace 30 s; 1 % of hosts crash, then 60 % are cut off)"
cargo build --release --locked -q -p nodekeeper-lab
for hosts in ${SIM_HOSTS:-1000 10000}; do
  for engine in sqlite postgres; do
    ./target/release/nodekeeper-lab sim --hosts "$hosts" --engine "$engine" --crash $((hosts / 100)) --steady 70
  done
done
echo
echo "== fleet simulator, a row of racks: 5 % of the hosts crash at once, a tenth of them with BMCs that hang (their instances must stay)"
for hosts in ${SIM_HOSTS:-1000 10000}; do
  for engine in sqlite postgres; do
    ./target/release/nodekeeper-lab sim --hosts "$hosts" --engine "$engine" --crash $((hosts / 20)) --bmc-hang $((hosts / 200)) --partition 0 --steady 20
  done
done
echo
echo "== fleet simulator, the same with serve SIGKILLed while the fences run (started again 2 s later)"
./target/release/nodekeeper-lab sim --hosts 1000 --crash 50 --bmc-hang 5 --kill-serve --partition 0 --steady 15
echo
echo "== fleet simulator, two serve replicas on PostgreSQL, the leader SIGKILLed while the fences run (its guards go to the other)"
for hosts in ${SIM_HOSTS:-1000 10000}; do
  ./target/release/nodekeeper-lab sim --hosts "$hosts" --engine postgres --replicas 2 --crash $((hosts / 20)) --bmc-hang $((hosts / 200)) --kill-serve --partition 0 --steady 20
done
echo
echo "== fleet simulator, the same on PostgreSQL with the database stopped (immediate) while the fences run, started 3 s later"
./target/release/nodekeeper-lab sim --hosts 1000 --engine postgres --crash 50 --bmc-hang 5 --restart-db --partition 0 --steady 15

printf '\n%-28s %-9s %-6s %s\n' BENCHMARK ENGINE RUN RESULT
for r in "${results[@]}"; do IFS='|' read -r a b c d <<<"$r"; printf '%-28s %-9s %-6s %s\n' "$a" "$b" "$c" "$d"; done
