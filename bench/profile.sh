#!/usr/bin/env bash
# Profiles hubgate alone in one benchmark scenario, the way bench/run.sh runs it (hubgate on
# core 0 with one worker, load generator and upstream on core 1), to see where the time or the
# memory goes. Writes to bench/work/profile/ (recreated each run).
#
#   bench/profile.sh SCENARIO TOOL [SECONDS]
#   SCENARIO: ka1k | ka64k | spool1k | idle
#   TOOL:     perf      perf record -g over the timed window, then the top symbols
#             syscalls  system calls per request (perf stat on syscall tracepoints)
#             io        bytes read and written per event (/proc/PID/io), for spool1k
#             heaptrack live heap by allocation site (use with idle)
#             none      just the load generator's JSON line
#
# PROFILE_ENV="VAR=value ..." adds to the gate's environment (e.g. RUST_LOG=info);
# PROFILE_HUBGATE=path runs another hubgate binary (an A/B against an older build).
# Needs perf (linux-perf) or heaptrack for those tools; builds the release binaries if missing
# (and, for heaptrack, a build with the system allocator in target/system-alloc).
set -euo pipefail
SCENARIO=${1:?scenario: ka1k | ka64k | spool1k | idle}
TOOL=${2:?tool: perf | syscalls | io | heaptrack | none}
case "$TOOL" in perf | syscalls | io | heaptrack | none) ;; *) echo "unknown tool $TOOL" >&2; exit 2 ;; esac
SECONDS_TIMED=${3:-6}
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"
WORK="$BENCH_DIR/work/profile"
BIN="$ROOT/target/release"
for b in hubgate examples/loadgen examples/upstream; do
  [ -x "$BIN/$b" ] || (cd "$ROOT" && cargo build --release --bins --examples)
done

BASE=${BENCH_PORT_BASE:-28540}
GATE_ADDR="127.0.0.1:$((BASE + 3))"
UPSTREAM_ADDR="127.0.0.1:$((BASE + 10))"
rm -rf "$WORK"
mkdir -p "$WORK/spool"
"$BENCH_DIR/pki.sh" "$WORK/pki" >/dev/null
PKI="$WORK/pki"
TOKEN="profile-token-$RANDOM$RANDOM"
SECRET="profile-secret-$RANDOM$RANDOM$RANDOM"
CN=client.webhooks.fbclientcerts.com
TEMPLATE=hubgate.toml.tmpl
[ "$SCENARIO" = spool1k ] && TEMPLATE=hubgate-spool.toml.tmpl
render "$BENCH_DIR/conf/$TEMPLATE" "${GATE_ADDR##*:}" >"$WORK/hubgate.toml"

trap cleanup_pids EXIT

start_upstream 1 "$UPSTREAM_ADDR" 300 "$WORK/upstream.log"
GATE=("${PROFILE_HUBGATE:-$BIN/hubgate}" run --config "$WORK/hubgate.toml")
if [ "$TOOL" = heaptrack ]; then
  # heaptrack sees malloc, not mimalloc: profile a build with the system allocator.
  (cd "$ROOT" && cargo build --release --no-default-features --bin hubgate --target-dir target/system-alloc)
  GATE=(heaptrack -o "$WORK/heaptrack" "$ROOT/target/system-alloc/release/hubgate" run --config "$WORK/hubgate.toml")
fi
read -r -a EXTRA_ENV <<<"${PROFILE_ENV:-PROFILE=1}"
env "${EXTRA_ENV[@]}" TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "${GATE[@]}" >"$WORK/hubgate.log" 2>&1 &
PIDS+=($!)
wait_port "${GATE_ADDR##*:}"
HP=${PIDS[1]} # env and taskset exec into the gate (or into heaptrack, which starts it)
if [ "$TOOL" = heaptrack ]; then HP=$(pgrep -x hubgate -P "${PIDS[1]}"); fi

LG=(taskset -c 1 "$BIN/examples/loadgen")
COMMON=(--addr "$GATE_ADDR" --pki "$WORK/pki" --secret "$SECRET" --verify-token "$TOKEN")
case "$SCENARIO" in
  ka1k) LOAD=(load --mode post --body-bytes 1024 --connections 50) ;;
  ka64k) LOAD=(load --mode post --body-bytes 65536 --connections 50) ;;
  spool1k) LOAD=(load --mode post --body-bytes 1024 --connections 50 --upstream-addr "$UPSTREAM_ADDR" --drain-wait 15) ;;
  idle) LOAD=(idle --connections 1000 --hold 3) ;;
  *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
esac
[ "$SCENARIO" = idle ] || LOAD+=(--warmup 2 --duration "$SECONDS_TIMED")

# The tool watches the middle of the timed window (after the warm-up).
WINDOW=$((SECONDS_TIMED > 3 ? SECONDS_TIMED - 2 : 1))
case "$TOOL" in
  perf) (sleep 3; perf record -F 1999 -g -p "$HP" -o "$WORK/perf.data" -- sleep "$WINDOW" >/dev/null 2>&1) & ;;
  syscalls) (sleep 3; perf stat -x, -o "$WORK/syscalls.csv" -p "$HP" \
      -e 'syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_pwrite64,syscalls:sys_enter_pread64' \
      -- sleep "$WINDOW" >/dev/null 2>&1) & ;;
  io) cat "/proc/$HP/io" >"$WORK/io.before" ;;
esac
TOOLPID=$!
"${LG[@]}" "${LOAD[@]}" "${COMMON[@]}" --pids "$HP" >"$WORK/result.json"
cat "$WORK/result.json"
case "$TOOL" in
  perf)
    wait "$TOOLPID" || true
    perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
      grep '%' | grep -v '^#' | awk 'NR <= 40' | sed 's/  \+-  \+-  *$//'
    echo "full report: perf report -i $WORK/perf.data" ;;
  syscalls)
    wait "$TOOLPID" || true
    python3 - "$WORK/result.json" "$WORK/syscalls.csv" "$WINDOW" <<'PY'
import json, sys
rps = json.load(open(sys.argv[1]))["rps"]
requests = rps * float(sys.argv[3])
for line in open(sys.argv[2]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].isdigit() and int(f[0]) > 0:
        print(f"{f[2].split(':')[-1]:<24} {int(f[0]) / requests:8.2f} per request")
PY
    ;;
  io)
    cat "/proc/$HP/io" >"$WORK/io.after"
    python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
read = lambda f: dict(l.split(": ") for l in open(f"{w}/{f}").read().splitlines() if l)
b, a, n = read("io.before"), read("io.after"), json.load(open(f"{w}/result.json"))["ok_total"]
print(f"{n} events; wchar and rchar include the sockets' traffic, write_bytes is the disk's")
for k in ("wchar", "rchar", "write_bytes"):
    print(f"{k:<12} {(int(a[k]) - int(b[k])) / n / 1024:8.1f} KiB per event")
for k in ("syscw", "syscr"):
    print(f"{k:<12} {(int(a[k]) - int(b[k])) / n:8.1f} per event")
PY
    ;;
  heaptrack)
    kill "$HP"
    wait "${PIDS[1]}" || true # heaptrack writes its file when the gate exits
    # The largest live-heap sites at the peak (all connections open), one line each.
    heaptrack_print -f "$WORK"/heaptrack*.zst --print-peaks 1 --print-allocators 0 --print-temporary 0 \
      --print-leaks 0 --peak-limit 15 2>/dev/null | sed -n '/PEAK MEMORY/,$p' |
      awk '/peak memory consumed over/ {getline site; sub(/::h[0-9a-f]+$/, "", site); print $1 "\t" $6 " calls\t" site}
           /^peak heap memory consumption/ {print}' ;;
esac
