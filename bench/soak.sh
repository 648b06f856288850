#!/usr/bin/env bash
# The soak: 10,000 concurrent mTLS connections (each a full handshake and one challenge GET,
# then held open) while keep-alive signed POSTs run beside them, for a bounded time; then every
# client goes away and the gate must come back near its baseline: RSS, open descriptors, the
# open-connections gauge. 127.0.0.1 only; the descriptor limits are raised for this script's
# processes only (soft limit up to the hard one; the machine's hard limit must allow it).
#
#   bench/soak.sh [connections (10000)] [hold seconds (20)]
#
# Prints one JSON line and a short table; exits 1 if descriptors leaked (more than 2 over the
# baseline, not counting the upstream client's pooled idle connections) or connections stayed
# open.
set -euo pipefail
CONNS=${1:-10000}
HOLD=${2:-20}
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"
BIN="$ROOT/target/release"
for b in hubgate examples/loadgen examples/upstream; do
  [ -x "$BIN/$b" ] || (cd "$ROOT" && cargo build --release --bins --examples)
done
# Descriptors: the soft limit up to the hard one, for this script's processes only.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CONNS + 1000)) ]; then
  echo "soak: $CONNS connections need more descriptors than the hard limit $(ulimit -Hn)" >&2
  exit 2
fi

WORK="$BENCH_DIR/work/soak"
DEDUPE_KEYS=20000
rm -rf "$WORK" && mkdir -p "$WORK"
BASE=${BENCH_PORT_BASE:-28740}
GATE_PORT=$((BASE + 3))
ADMIN_PORT=$((GATE_PORT + 1000))
UPSTREAM_ADDR="127.0.0.1:$((BASE + 10))"
new_pki "$WORK" soak
{
  render "$BENCH_DIR/conf/hubgate.toml.tmpl" "$GATE_PORT" | sed "s|^\[server\]|[server]\nmax_connections = $((CONNS + 2000))\nidle_timeout = \"120s\"|"
  printf '\n[admin]\nlisten = "127.0.0.1:%s"\n' "$ADMIN_PORT"
  # The in-memory de-duplication keys are state the gate is meant to keep (up to this many, for
  # sync_window): bounded so that the warm-up below fills them, and the baseline already holds
  # them (at the default 100,000 they are ~13 MiB, measured with heaptrack).
  printf '\n[dedupe]\nsync_max_entries = %s\n' "$DEDUPE_KEYS"
} >"$WORK/hubgate.toml"

trap cleanup_pids EXIT
start_upstream 1 "$UPSTREAM_ADDR" 600 "$WORK/upstream.log"
RUST_LOG=warn "$BIN/hubgate" run --config "$WORK/hubgate.toml" >"$WORK/hubgate.log" 2>&1 &
GATE=$!
PIDS+=("$GATE")
wait_port "$GATE_PORT"
LG=("$BIN/examples/loadgen")
COMMON=(--addr "127.0.0.1:$GATE_PORT" --pki "$PKI" --secret "$SECRET" --verify-token "$TOKEN")

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$GATE/status"; }
fds() { find "/proc/$GATE/fd" -mindepth 1 -maxdepth 1 | wc -l; }
# The gate's connections to the upstream: its client's pool keeps idle ones (up to 60 s).
pooled() { ss -Htnp state established "( dport = :${UPSTREAM_ADDR##*:} )" | grep -c "pid=$GATE," || true; }
gauge() { # NAME: a gauge from the admin listener
  python3 - "$ADMIN_PORT" "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(next((l.split()[-1] for l in text.splitlines() if l.startswith(sys.argv[2] + " ")), "0"))
PY
}

# Warm: the allocator and the TLS stack have served a little of everything first.
"${LG[@]}" load --mode post --body-bytes 1024 --connections 16 --warmup 1 --duration 3 "${COMMON[@]}" >"$WORK/warm.json"
warmed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ok_total"])' "$WORK/warm.json")
if [ "$warmed" -lt "$DEDUPE_KEYS" ]; then
  echo "soak: the warm-up delivered $warmed events, fewer than the $DEDUPE_KEYS de-duplication keys: the baseline is not steady" >&2
fi
sleep 2
rss0=$(rss)
fds0=$(fds)
pool0=$(pooled)
echo "[soak] baseline: RSS $((rss0 / 1024)) MiB, $fds0 descriptors ($pool0 pooled upstream connections)" >&2

# 10,000 held connections, and keep-alive POSTs beside them for the whole hold.
"${LG[@]}" load --mode post --body-bytes 1024 --connections 32 --warmup 1 --duration "$((HOLD + 30))" "${COMMON[@]}" >"$WORK/traffic.json" &
TRAFFIC=$!
"${LG[@]}" idle --connections "$CONNS" --hold "$HOLD" --pids "$GATE" "${COMMON[@]}" >"$WORK/idle.json" &
IDLE=$!
# The peak: sampled while the connections are held.
peak_rss=0
peak_fds=0
peak_open=0
while kill -0 "$IDLE" 2>/dev/null; do
  r=$(rss); f=$(fds); o=$(gauge hubgate_open_connections)
  [ "$r" -gt "$peak_rss" ] && peak_rss=$r
  [ "$f" -gt "$peak_fds" ] && peak_fds=$f
  [ "${o%.*}" -gt "$peak_open" ] && peak_open=${o%.*}
  sleep 1
done
wait "$IDLE" || true
kill "$TRAFFIC" 2>/dev/null || true
wait "$TRAFFIC" 2>/dev/null || true

# Everyone gone: the gate closes what the clients closed; give the allocator a moment.
sleep 5
rss1=$(rss)
fds1=$(fds)
pool1=$(pooled)
open1=$(gauge hubgate_open_connections)
parked1=$(gauge hubgate_parked_connections)
python3 - "$WORK/idle.json" "$CONNS" "$HOLD" "$rss0" "$fds0" "$peak_rss" "$peak_fds" "$peak_open" "$rss1" "$fds1" "$open1" "$parked1" "$pool0" "$pool1" <<'PY'
import json, sys
idle = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
conns, hold = int(sys.argv[2]), float(sys.argv[3])
rss0, fds0, prss, pfds, popen, rss1, fds1 = (int(x) for x in sys.argv[4:11])
open1, parked1 = float(sys.argv[11]), float(sys.argv[12])
pool0, pool1 = int(sys.argv[13]), int(sys.argv[14])
line = {"kind": "soak", "connections": conns, "opened": idle["opened"], "alive_after_hold": idle["alive_after_hold"],
        "hold_s": hold, "rss_baseline_kb": rss0, "rss_peak_kb": prss, "rss_after_kb": rss1,
        "fds_baseline": fds0, "fds_peak": pfds, "fds_after": fds1, "open_peak": popen,
        "open_after": open1, "parked_after": parked1,
        "upstream_pooled_baseline": pool0, "upstream_pooled_after": pool1}
print(json.dumps(line))
mib = lambda k: f"{k / 1024:.1f}"
print(f"| connections opened / alive after {hold:.0f} s | RSS baseline → peak → after (MiB) | descriptors baseline → peak → after | of which pooled upstream connections, baseline → after | open connections after |", file=sys.stderr)
print(f"| {idle['opened']} / {idle['alive_after_hold']} | {mib(rss0)} → {mib(prss)} → {mib(rss1)} | {fds0} → {pfds} → {fds1} | {pool0} → {pool1} | {open1:.0f} |", file=sys.stderr)
# Descriptors other than the upstream pool's idle connections must be back where they were.
ok = fds1 - pool1 <= fds0 - pool0 + 2 and open1 <= 1
sys.exit(0 if ok else 1)
PY
