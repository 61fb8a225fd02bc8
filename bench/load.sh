#!/usr/bin/env bash
# The side-by-side load benchmark: in one run, the same pushes against
#   ceiling   a minimal hyper server that reads the body and answers a fixed reply,
#   wxgate    the release build, durable storage on (SQLite, synchronous = FULL),
#   wechatpy  wechatpy 1.8 as a WSGI app behind granian (2 workers),
#   werobot   WeRoBot 1.13 behind granian (2 workers),
#   node      node-webot/wechat 2.1 behind express, one worker per core,
# for two workloads: `plain` (plaintext text message -> text reply) and `safe` (safe-mode
# QR subscribe -> encrypted text reply), every push distinct. wrk drives each for
# DURATION seconds at CONNECTIONS connections, RUNS times; the medians are printed.
#
#   bench/load.sh                      # RUNS=5 DURATION=10 CONNECTIONS=32
#   RUNS=1 DURATION=5 bench/load.sh    # a quick look
#   PEERS="ceiling wxgate" bench/load.sh
#
# Needs wrk (apt-get install wrk), python3 with venv, node and npm; it installs the
# peers into bench/.venv and bench/peers/node/node_modules. Only loopback is used.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
PEERS=${PEERS:-"ceiling wxgate wechatpy werobot node"}
COUNT=${COUNT:-600000}
WORK=$(mktemp -d /tmp/wxgate-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

command -v wrk >/dev/null || { echo "bench: wrk is missing (apt-get install wrk)" >&2; exit 1; }
echo "bench: building" >&2
cargo build --release --quiet --bin wxgate --example ceiling --example wrk_requests
for w in plain safe; do
  ${CARGO_TARGET_DIR:-target}/release/examples/wrk_requests "$w" "$COUNT" > "$WORK/$w.tsv"
  # Warm-up pushes of their own, so that the measured run sends none twice.
  ${CARGO_TARGET_DIR:-target}/release/examples/wrk_requests "$w" 60000 900000000 > "$WORK/$w.warm.tsv"
done

if [[ " $PEERS " == *" wechatpy "* || " $PEERS " == *" werobot "* ]]; then
  [ -x bench/.venv/bin/granian ] || {
    echo "bench: installing the Python peers" >&2
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install --quiet wechatpy==1.8.18 werobot==1.13.1 granian==2.8.9 cryptography
  }
fi
if [[ " $PEERS " == *" node "* ]]; then
  [ -d bench/peers/node/node_modules ] || { echo "bench: installing the node peer" >&2; (cd bench/peers/node && npm install --silent --no-audit --no-fund); }
fi

port=18400
start() { # name -> starts it, sets PID and URL
  port=$((port + 1))
  case $1 in
    ceiling) ${CARGO_TARGET_DIR:-target}/release/examples/ceiling "127.0.0.1:$port" 2>/dev/null & ;;
    wxgate)
      mkdir -p "$WORK/wx"
      sed "s#^data_dir = .*#data_dir = \"$WORK/wx/data-$port\"#" wxgate.toml > "$WORK/wx/wxgate.toml"
      ${CARGO_TARGET_DIR:-target}/release/wxgate serve --config "$WORK/wx/wxgate.toml" --listen "127.0.0.1:$port" 2>"$WORK/wx/log" & ;;
    wechatpy) (cd bench/peers && exec ../.venv/bin/granian --interface wsgi --host 127.0.0.1 --port "$port" --workers 2 --no-ws wechatpy_app:app) >/dev/null 2>&1 & ;;
    werobot) (cd bench/peers && exec ../.venv/bin/granian --interface wsgi --host 127.0.0.1 --port "$port" --workers 2 --no-ws werobot_app:app) >/dev/null 2>&1 & ;;
    node) node bench/peers/node/server.js "$port" >/dev/null 2>&1 & ;;
  esac
  PID=$!
  URL="http://127.0.0.1:$port"
  for _ in $(seq 100); do curl -s -o /dev/null "$URL/" && return 0; sleep 0.1; done
  echo "bench: $1 did not start" >&2; return 1
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

declare -A RPS P50 P99 ERR RSS
for name in $PEERS; do
  for workload in plain safe; do
    rps=(); p50=(); p99=(); errs=0
    for run in $(seq "$RUNS"); do
      start "$name"
      # A short warm-up, then the measured run.
      WRK_THREADS=2 wrk -t2 -c"$CONNECTIONS" -d1s -s bench/requests.lua "$URL" -- "$WORK/$workload.warm.tsv" >/dev/null 2>&1 || true
      out=$(WRK_THREADS=2 wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s bench/requests.lua "$URL" -- "$WORK/$workload.tsv" 2>&1)
      rps+=("$(echo "$out" | awk '/Requests\/sec/ {print $2}')")
      p50+=("$(echo "$out" | sed -n 's/.*p50_us=\([0-9]*\).*/\1/p')")
      p99+=("$(echo "$out" | sed -n 's/.*p99_us=\([0-9]*\).*/\1/p')")
      e=$(echo "$out" | awk '/Non-2xx/ {s += $NF} /Socket errors/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i} END {print s + 0}')
      errs=$((errs + ${e:-0}))
      [ "$name" = wxgate ] && RSS[$workload]=$(ps -o rss= -p "$PID" | tr -d ' ')
      kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true
      pkill -P "$PID" 2>/dev/null || true
      sleep 0.5
    done
    RPS[$name.$workload]=$(printf '%s\n' "${rps[@]}" | median)
    P50[$name.$workload]=$(printf '%s\n' "${p50[@]}" | median)
    P99[$name.$workload]=$(printf '%s\n' "${p99[@]}" | median)
    ERR[$name.$workload]=$errs
    echo "bench: $name $workload: ${RPS[$name.$workload]} req/s (runs: ${rps[*]})" >&2
  done
done

printf '\n%s runs of %ss, %s connections, wrk -t2, medians\n\n' "$RUNS" "$DURATION" "$CONNECTIONS"
printf '| server | workload | requests/s | vs ceiling | p50 | p99 | errors |\n| --- | --- | --- | --- | --- | --- | --- |\n'
for workload in plain safe; do
  for name in $PEERS; do
    c=${RPS[ceiling.$workload]:-}
    r=${RPS[$name.$workload]}
    ratio=$( [ -n "$c" ] && awk -v r="$r" -v c="$c" 'BEGIN {printf "%.2f", r / c}' || echo "-")
    printf '| %s | %s | %.0f | %s | %s µs | %s µs | %s |\n' "$name" "$workload" "$r" "$ratio" "${P50[$name.$workload]}" "${P99[$name.$workload]}" "${ERR[$name.$workload]}"
  done
done
[ -n "${RSS[plain]:-}" ] && printf '\nwxgate RSS after the runs: plain %s KiB, safe %s KiB\n' "${RSS[plain]}" "${RSS[safe]}"
