#!/usr/bin/env bash
# The stable yardstick: CPU instructions per request (valgrind's callgrind), which do not move
# with the machine's noise the way requests/s does. hubgate runs alone under callgrind with one
# tokio worker; the upstream runs natively; the load generator sends a fixed number of requests
# over keep-alive connections after a warm-up, and only those are counted (callgrind's counters
# are zeroed after the warm-up and dumped once every response, and for the spool every
# delivery, is in). Every thread of the gate counts: the log writer's and the spool's too.
#
#   bench/cost.sh                      # every case, access log off and on; about 3 minutes
#   bench/cost.sh --cases "ka1k get" --logs off --requests 4000 --no-build
#
# Cases: ka1k, ka64k (keep-alive POST of distinct signed 1 KiB / 64 KiB events, forwarded),
#        get (the hub.challenge answer), spool1k (a 1 KiB event accepted into the SQLite spool
#        and delivered from it: the figure is accept + delivery).
# Logs:  off (RUST_LOG=warn: no access log), on (the default: one access line per request,
#        stderr to a file).
# COST_ENV="VAR=value ..." adds to the gate's environment (e.g. HUBGATE_INSPECTOR=1 to price
# the inspector); COST_HUBGATE=path measures another hubgate binary (an older build).
# Output: a markdown table on stdout and in bench/results/cost-latest.md, JSON lines in
# bench/results/cost-latest.jsonl. Needs valgrind (Debian's package; installed if missing).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"

CASES="ka1k ka64k get spool1k"
LOGS="off on"
REQUESTS=2000
CONNS=8
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) CASES=$2; shift ;;
    --logs) LOGS=$2; shift ;;
    --requests) REQUESTS=$2; shift ;;
    --connections) CONNS=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v callgrind_control >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >&2
fi
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --bins --examples >&2)
fi
BIN="$ROOT/target/release"
WORK="$BENCH_DIR/work/cost"
RESULTS_DIR="$BENCH_DIR/results"
rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS_DIR"

BASE=${BENCH_PORT_BASE:-28640}
GATE_PORT=$((BASE + 3))
UPSTREAM_ADDR="127.0.0.1:$((BASE + 10))"
new_pki "$WORK" cost

trap cleanup_pids EXIT
start_upstream 1 "$UPSTREAM_ADDR" 1800 "$WORK/upstream.log"

RESULTS="$RESULTS_DIR/cost-latest.jsonl"
: >"$RESULTS"
rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
[ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml 2>/dev/null)" ] && rev="$rev + uncommitted changes"

for case in $CASES; do
  template=hubgate.toml.tmpl
  load=(--mode post --body-bytes 1024)
  case "$case" in
    ka1k) ;;
    ka64k) load=(--mode post --body-bytes 65536) ;; # an eighth of the requests (see below)
    get) load=(--mode get) ;;
    spool1k) template=hubgate-spool.toml.tmpl load+=(--upstream-addr "$UPSTREAM_ADDR") ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
  for logs in $LOGS; do
    case "$logs" in off) level=warn ;; on) level=info ;; *) echo "unknown logs $logs" >&2; exit 2 ;; esac
    rm -rf "$WORK/spool" && mkdir -p "$WORK/spool"
    render "$BENCH_DIR/conf/$template" "$GATE_PORT" >"$WORK/hubgate.toml"
    out="$WORK/callgrind-$case-$logs.out"
    read -r -a extra_env <<<"${COST_ENV:-COST=1}"
    env "${extra_env[@]}" TOKIO_WORKER_THREADS=1 RUST_LOG=$level taskset -c 0 \
      valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no \
      "${COST_HUBGATE:-$BIN/hubgate}" run --config "$WORK/hubgate.toml" >"$WORK/gate-$case-$logs.log" 2>&1 &
    vpid=$!
    PIDS+=("$vpid")
    for _ in $(seq 600); do port_busy "$GATE_PORT" && break; sleep 0.1; done
    port_busy "$GATE_PORT" || { echo "cost: the gate did not start (see $WORK/gate-$case-$logs.log)" >&2; exit 1; }
    n_req=$REQUESTS
    [ "$case" = ka64k ] && n_req=$((REQUESTS / 8)) # 64 times the bytes: fewer requests suffice
    echo "[cost] $case, access log $logs: $n_req requests" >&2
    taskset -c 1 "$BIN/examples/loadgen" count --addr "127.0.0.1:$GATE_PORT" --pki "$PKI" \
      --secret "$SECRET" --verify-token "$TOKEN" "${load[@]}" --connections "$CONNS" \
      --requests "$n_req" --before "callgrind_control --zero $vpid >/dev/null 2>&1" \
      --after "callgrind_control --dump=counted $vpid >/dev/null 2>&1" >"$WORK/count.json"
    kill -TERM "$vpid"
    wait "$vpid" || true
    # The dump made by --after: the first numbered part (the final dump at exit is the last).
    ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$out.1")
    n=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["requests"]))' "$WORK/count.json")
    # SHA-256's block function, inclusive: valgrind hides the CPU's SHA extensions, so the
    # HMAC (and the spool's de-duplication hash) run in software here, several times slower
    # than natively. Reported apart so that it does not hide the rest.
    sha=$(callgrind_annotate --inclusive=yes "$out.1" 2>/dev/null |
      awk '/sha256::soft::compress |sha256::compress256 |sha256_block_data_order/ {gsub(",", "", $1); if ($1 > m) m = $1} END {printf "%d\n", m}')
    printf '{"kind":"cost","case":"%s","access_log":"%s","requests":%s,"instructions":%s,"per_request":%s,"sha256_per_request":%s,"rev":"%s"}\n' \
      "$case" "$logs" "$n" "$ir" "$((ir / n))" "$((sha / n))" "$rev" >>"$RESULTS"
  done
done

python3 - "$RESULTS" <<'PY' | tee "$RESULTS_DIR/cost-latest.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["case"], r["access_log"]): r for r in rows}
cases = list(dict.fromkeys(r["case"] for r in rows))
names = {"ka1k": "POST 1 KiB, forwarded", "ka64k": "POST 64 KiB, forwarded",
         "get": "GET hub.challenge", "spool1k": "POST 1 KiB, spool accept + delivery"}
import os
extra = os.environ.get("COST_ENV")
print(f"Instructions per request (callgrind, 1 worker; git {rows[0]['rev']}; {rows[0]['requests']} requests per case, an eighth for 64 KiB{'; gate environment: ' + extra if extra else ''})\n")
print("| case | access log off | access log on | log's share | of which SHA-256 (software under valgrind) | off, without SHA-256 |")
print("|---|---:|---:|---:|---:|---:|")
for c in cases:
    off, on = by.get((c, "off")), by.get((c, "on"))
    f = lambda r: f"{r['per_request']:,}" if r else "–"
    share = f"{(on['per_request'] - off['per_request']) / on['per_request'] * 100:.1f} %" if off and on else "–"
    any_ = off or on
    sha = f"{any_['sha256_per_request']:,}"
    rest = f"{off['per_request'] - off['sha256_per_request']:,}" if off else "–"
    print(f"| {names.get(c, c)} | {f(off)} | {f(on)} | {share} | {sha} | {rest} |")
PY
