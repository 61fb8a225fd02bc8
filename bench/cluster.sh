#!/usr/bin/env bash
# One, two and three wxgate nodes over one PostgreSQL database, on this machine. Each
# node gets its own wrk (CONNECTIONS split between the nodes) and its own distinct
# pushes (safe-mode QR subscribes by default); the totals, the CPU each push costs in
# wxgate and in PostgreSQL, and the commit batch sizes are printed.
#
#   bench/cluster.sh                         # NODES="1 2 3" DURATION=10 RUNS=3
#   DATABASE=postgres://postgres@127.0.0.1:5432/test WORKLOAD=plain bench/cluster.sh
#
# Uses its own database (wxgate_bench, dropped and created again) on the server of
# DATABASE; needs wrk and psql. Only loopback is used.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-"1 2 3"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
WORKLOAD=${WORKLOAD:-safe}
COUNT=${COUNT:-300000}
SERVER=${DATABASE:-postgres://postgres@127.0.0.1:5432/test}
SERVER=${SERVER%/*}
DB="$SERVER/wxgate_bench"
WORK=$(mktemp -d /tmp/wxgate-cluster.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT

command -v wrk >/dev/null || { echo "bench: wrk is missing (apt-get install wrk)" >&2; exit 1; }
echo "bench: building" >&2
cargo build --release --quiet --bin wxgate --example wrk_requests

# CPU seconds (user + system) used so far by the given processes.
cpu() { for p in "$@"; do [ -r "/proc/$p/stat" ] && awk '{print $14 + $15}' "/proc/$p/stat"; done | awk -v hz="$(getconf CLK_TCK)" '{s += $1} END {printf "%.2f", s / hz}'; }
postgres_pids() { pgrep -d ' ' -x postgres || true; }
lines=()
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

printf '| nodes | requests/s | p99 (worst node) | errors | wxgate CPU per push | PostgreSQL CPU per push | mean commit batch |\n'
printf '| --- | --- | --- | --- | --- | --- | --- |\n'
for n in $NODES; do
  rps_runs=()
  for run in $(seq "$RUNS"); do
    psql -q "$SERVER/postgres" -c "DROP DATABASE IF EXISTS wxgate_bench WITH (FORCE)" -c "CREATE DATABASE wxgate_bench" >/dev/null
    pids=(); urls=()
    for i in $(seq "$n"); do
      port=$((18600 + i))
      mkdir -p "$WORK/n$i"
      { echo "database = \"$DB\""; echo "metrics_listen = \"127.0.0.1:$((18700 + i))\""; sed "s#^data_dir = .*#data_dir = \"$WORK/n$i/data\"#" wxgate.toml; } > "$WORK/n$i/wxgate.toml"
      ${CARGO_TARGET_DIR:-target}/release/wxgate serve --config "$WORK/n$i/wxgate.toml" --listen "127.0.0.1:$port" 2>"$WORK/n$i/log" &
      pids+=($!); urls+=("http://127.0.0.1:$port")
      [ -f "$WORK/req$i.tsv" ] || ${CARGO_TARGET_DIR:-target}/release/examples/wrk_requests "$WORKLOAD" "$COUNT" $((i * 10000000)) > "$WORK/req$i.tsv"
      [ -f "$WORK/warm$i.tsv" ] || ${CARGO_TARGET_DIR:-target}/release/examples/wrk_requests "$WORKLOAD" 20000 $((900000000 + i * 10000000)) > "$WORK/warm$i.tsv"
    done
    for u in "${urls[@]}"; do for _ in $(seq 100); do curl -s -o /dev/null "$u/healthz" && break; sleep 0.1; done; done
    warm=()
    for i in $(seq "$n"); do
      WRK_THREADS=1 wrk -t1 -c$((CONNECTIONS / n)) -d1s -s bench/requests.lua "${urls[$((i - 1))]}" -- "$WORK/warm$i.tsv" >/dev/null 2>&1 &
      warm+=($!)
    done
    wait "${warm[@]}" || true
    c0=$(cpu "${pids[@]}"); p0=$(cpu $(postgres_pids))
    loads=()
    for i in $(seq "$n"); do
      WRK_THREADS=1 wrk -t1 -c$((CONNECTIONS / n)) -d"${DURATION}s" -s bench/requests.lua "${urls[$((i - 1))]}" -- "$WORK/req$i.tsv" > "$WORK/out$i" 2>&1 &
      loads+=($!)
    done
    wait "${loads[@]}" || true
    c1=$(cpu "${pids[@]}"); p1=$(cpu $(postgres_pids))
    total=0; reqs=0; worst=0; errs=0
    for i in $(seq "$n"); do
      r=$(awk '/Requests\/sec/ {print $2}' "$WORK/out$i"); total=$(awk -v a="$total" -v b="$r" 'BEGIN {print a + b}')
      q=$(awk '/requests in/ {print $1}' "$WORK/out$i"); reqs=$((reqs + q))
      p=$(sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' "$WORK/out$i"); [ "$p" -gt "$worst" ] && worst=$p
      e=$(awk '/Non-2xx/ {s += $NF} /Socket errors/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i} END {print s + 0}' "$WORK/out$i"); errs=$((errs + e))
    done
    batch=$(for i in $(seq "$n"); do curl -s "http://127.0.0.1:$((18700 + i))/metrics"; done | awk '/^wxgate_store_commits_total/ {c += $2} /^wxgate_store_records_total/ {r += $2} END {printf "%.1f", (c ? r / c : 0)}')
    kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
    rps_runs+=("$total")
    line=$(awk -v n="$n" -v t="$total" -v w="$worst" -v e="$errs" -v q="$reqs" -v c="$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')" -v p="$(awk -v a="$p0" -v b="$p1" 'BEGIN {print b - a}')" -v b="$batch" \
      'BEGIN {printf "| %d | %.0f | %d µs | %d | %.1f µs | %.1f µs | %s |", n, t, w, e, c * 1e6 / q, p * 1e6 / q, b}')
    echo "bench: run $run: $line" >&2
    lines+=("$line")
  done
  # The run with the median throughput stands for this node count.
  med=$(printf '%s\n' "${rps_runs[@]}" | median)
  for l in "${lines[@]}"; do
    t=$(echo "$l" | awk -F'|' '{gsub(/ /, "", $3); print $3}')
    if awk -v a="$t" -v b="$med" 'BEGIN {exit !(a - b < 1 && b - a < 1)}'; then echo "$l"; break; fi
  done
  lines=()
done
psql -q "$SERVER/postgres" -c "DROP DATABASE IF EXISTS wxgate_bench WITH (FORCE)" >/dev/null
