#!/usr/bin/env bash
# hubgate vs HAProxy vs nginx+njs, on loopback, each doing the whole Meta-webhook job:
# mTLS with a verified chain, Meta's CN, the hub.challenge GET, X-Hub-Signature-256 over the
# raw body, forwarding to the same trivial upstream. See bench/README.md.
#
#   bench/run.sh            # full run, ~12 minutes
#   bench/run.sh --quick    # ~3 minutes
#
# Options: --quick, --reps N, --duration S, --warmup S, --no-build, --no-install,
#          --systems "haproxy nginx hubgate",
#          --scenarios "ka1k ka64k newconn get spool1k spool-pg idle ready size micro"
#          (default: all). spool-pg needs PostgreSQL 15 (Debian's postgresql-15).
#          --topologies "split sidecar": split, the upstream on the load generator's core (every
#          scenario); sidecar, the upstream on the system's core, as an application sharing a
#          sidecar's CPU (ka1k ka64k get spool1k). --logs "off on": access logs off for all, or
#          on for all (ka1k get), each written to a file the way it runs in production.
#          Environment: BENCH_PORT_BASE (default 28440), BENCH_PG_CORE (default 0: PostgreSQL on
#          hubgate's core), BENCH_COUNT_FSYNC=1 (count fsync/fdatasync calls of the spool rows
#          with perf: adds tracing overhead to those rows, so off by default).
# Output: the markdown report on stdout and in bench/results/latest.md; raw JSON lines in
# bench/results/latest.jsonl. Work files (PKI, configs, logs) in bench/work/.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/common.sh
. "$BENCH_DIR/common.sh"
# shellcheck source=bench/pg.sh
. "$BENCH_DIR/pg.sh"
WORK="$BENCH_DIR/work"
RESULTS_DIR="$BENCH_DIR/results"

MODE=full
REPS=5
DURATION=6
WARMUP=2
IDLE_REPS=3
IDLE_HOLD=3
READY_REPS=5
MICRO_MS=900
BUILD=1
INSTALL=1
SYSTEMS="haproxy nginx hubgate"
SCENARIOS="ka1k ka64k newconn get spool1k spool-pg idle ready size micro"
TOPOLOGIES="split sidecar"
LOGS_SETTINGS="off on"
CONNS=50         # keep-alive connections, each one request at a time
NEWCONN_CONNS=50 # concurrent new-connection clients
IDLE_CONNS=1000
SPOOL_DRAIN=30   # seconds at most to wait after a spool run until everything is delivered
BUDGET_S=$((42 * 60))

while [ $# -gt 0 ]; do
  case "$1" in
    --quick)
      MODE=quick REPS=3 DURATION=2 WARMUP=1 IDLE_REPS=2 IDLE_HOLD=2 READY_REPS=3 MICRO_MS=300
      SPOOL_DRAIN=15
      BUDGET_S=$((8 * 60))
      ;;
    --reps) REPS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-install) INSTALL=0 ;;
    --systems) SYSTEMS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --topologies) TOPOLOGIES=$2; shift ;;
    --logs) LOGS_SETTINGS=$2; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
has idle || IDLE_REPS=0
has ready || READY_REPS=0

T_START=$(date +%s)
log() { printf '[bench %4ss] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
over_budget() { [ $(($(date +%s) - T_START)) -ge "${1:-$BUDGET_S}" ]; }

if [ "$(nproc)" -lt 2 ]; then
  echo "bench: needs at least 2 cores (systems on core 0, load generator on core 1)" >&2
  exit 1
fi

# --- packages -----------------------------------------------------------------------------
NJS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so
if [ "$INSTALL" = 1 ]; then
  need=()
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v nginx >/dev/null || need+=(nginx)
  [ -f "$NJS_MODULE" ] || need+=(libnginx-mod-http-js)
  command -v openssl >/dev/null || need+=(openssl)
  command -v taskset >/dev/null || need+=(util-linux)
  command -v ss >/dev/null || need+=(iproute2)
  command -v strip >/dev/null || need+=(binutils)
  if has spool-pg; then
    [ -x "$PG_BIN/pg_ctl" ] || need+=(postgresql-15)
    command -v psql >/dev/null || need+=(postgresql-client-15)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q "${need[@]}" >&2
  fi
fi
for tool in haproxy nginx openssl taskset ss; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing" >&2; exit 1; }
done
[ -f "$NJS_MODULE" ] || { echo "bench: $NJS_MODULE is missing (libnginx-mod-http-js)" >&2; exit 1; }

# --- build ---------------------------------------------------------------------------------
# The revision being measured, taken before building (edits made while the benchmark runs do
# not change the binary).
rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=""
[ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml 2>/dev/null)" ] && dirty=' + uncommitted changes in src/'

if [ "$BUILD" = 1 ]; then
  log "cargo build --release --bins --examples"
  (cd "$ROOT" && cargo build --release --bins --examples >&2)
fi
HUBGATE="${BENCH_HUBGATE:-$ROOT/target/release/hubgate}" # BENCH_HUBGATE: another build, for an A/B
LOADGEN="$ROOT/target/release/examples/loadgen"
UPSTREAM="$ROOT/target/release/examples/upstream"
MICROBENCH="$ROOT/target/release/examples/microbench"
for b in "$HUBGATE" "$LOADGEN" "$UPSTREAM" "$MICROBENCH"; do
  [ -x "$b" ] || { echo "bench: $b is missing (cargo build --release --bins --examples)" >&2; exit 1; }
done
T_START=$(date +%s) # the time budget counts from here: installing and building are not timed

# --- ports -----------------------------------------------------------------------------------
BASE=${BENCH_PORT_BASE:-28440}
for _ in 1 2 3 4 5 6 7 8 9 10; do
  busy=0
  for off in 1 2 3 4 5 6 10 11 12; do port_busy $((BASE + off)) && busy=1; done
  [ $busy = 0 ] && break
  BASE=$((BASE + 100))
done
[ $busy = 0 ] || { echo "bench: no free ports found near ${BENCH_PORT_BASE:-28440}" >&2; exit 1; }
declare -A PORT=([haproxy]=$((BASE + 1)) [nginx]=$((BASE + 2)) [hubgate]=$((BASE + 3)) [hubgate-spool]=$((BASE + 4)) [hubgate-spool-pg]=$((BASE + 5)) [hubgate-log]=$((BASE + 6)))
UPSTREAM_ADDR="127.0.0.1:$((BASE + 10))"
SIDECAR_UPSTREAM_ADDR="127.0.0.1:$((BASE + 12))"
PG_PORT=$((BASE + 11))
PG_CORE=${BENCH_PG_CORE:-0}
PG_DIR="$WORK/pg"

# --- work folder, PKI, configs ------------------------------------------------------------------
pg_stop_stale "$PG_DIR" # a server left by an interrupted run (the trap normally stops it)
rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS_DIR"
log "generating the test PKI (RSA 2048)"
"$BENCH_DIR/pki.sh" "$WORK/pki"
PKI="$WORK/pki"
TOKEN="bench-verify-token-$RANDOM$RANDOM"
SECRET="bench-app-secret-$RANDOM$RANDOM$RANDOM"
SECRET_B64=$(printf '%s' "$SECRET" | base64 -w0)
CN=client.webhooks.fbclientcerts.com

# Every system's configuration for one topology and log setting, in CONF (a folder of WORK):
# the same templates, the upstream address and the access-log lines changed.
CONF="$WORK"
HUBGATE_LOG=warn
render_configs() { # FOLDER UPSTREAM_ADDR LOGS
  local UPSTREAM_ADDR=$2 LOGS=$3
  mkdir -p "$1"
  render "$BENCH_DIR/conf/haproxy.cfg.tmpl" "${PORT[haproxy]}" >"$1/haproxy.cfg"
  render "$BENCH_DIR/conf/nginx.conf.tmpl" "${PORT[nginx]}" >"$1/nginx.conf"
  render "$BENCH_DIR/conf/meta.js.tmpl" 0 >"$1/meta.js"
  render "$BENCH_DIR/conf/hubgate.toml.tmpl" "${PORT[hubgate]}" >"$1/hubgate.toml"
  render "$BENCH_DIR/conf/hubgate.toml.tmpl" "${PORT[hubgate-log]}" >"$1/hubgate-log.toml"
  render "$BENCH_DIR/conf/hubgate-spool.toml.tmpl" "${PORT[hubgate-spool]}" >"$1/hubgate-spool.toml"
  render "$BENCH_DIR/conf/hubgate-spool-pg.toml.tmpl" "${PORT[hubgate-spool-pg]}" >"$1/hubgate-spool-pg.toml"
}
render_configs "$WORK" "$UPSTREAM_ADDR" off
mkdir -p "$WORK/spool"
haproxy -c -q -f "$WORK/haproxy.cfg" >&2
nginx -q -t -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log" >&2
"$HUBGATE" check --config "$WORK/hubgate.toml" >/dev/null
# hubgate's spool delivery (durable acceptance) is timed too, as an extra hubgate-only row,
# when this build of hubgate has it.
SPOOL=0
has spool1k && case " $SYSTEMS " in
  *" hubgate "*)
    if "$HUBGATE" check --config "$WORK/hubgate-spool.toml" >/dev/null 2>&1; then
      SPOOL=1
    else
      log "this hubgate has no spool delivery: the spool row stays a placeholder"
    fi
    ;;
esac
# The same with the spool in PostgreSQL (a throwaway server, started below).
SPOOL_PG=0
has spool-pg && case " $SYSTEMS " in
  *" hubgate "*)
    if [ ! -x "$PG_BIN/pg_ctl" ] || ! command -v psql >/dev/null; then
      log "PostgreSQL 15 is missing ($PG_BIN, psql): no spool-pg row"
    elif "$HUBGATE" check --config "$WORK/hubgate-spool-pg.toml" >/dev/null 2>"$WORK/check-spool-pg-config.txt"; then
      SPOOL_PG=1
    else
      log "this hubgate has no PostgreSQL spool (see $WORK/check-spool-pg-config.txt): no spool-pg row"
    fi
    ;;
esac

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Command lines: every system on core 0 with one worker, configured from CONF; hubgate logs at
# HUBGATE_LOG (warn: no access log; info: its default, an access line per request). Each
# system's output (HAProxy's access log is its stdout, hubgate's its stderr) goes to a file.
sys_cmd() {
  case "$1" in
    haproxy) echo "taskset -c 0 haproxy -db -f $CONF/haproxy.cfg" ;;
    nginx) echo "taskset -c 0 nginx -c $CONF/nginx.conf -p $WORK -e $WORK/nginx-error.log" ;;
    hubgate) echo "env TOKIO_WORKER_THREADS=1 RUST_LOG=$HUBGATE_LOG taskset -c 0 $HUBGATE run --config $CONF/hubgate.toml" ;;
    hubgate-log) echo "env TOKIO_WORKER_THREADS=1 RUST_LOG=info taskset -c 0 $HUBGATE run --config $CONF/hubgate-log.toml" ;;
    hubgate-spool) echo "env TOKIO_WORKER_THREADS=1 RUST_LOG=$HUBGATE_LOG taskset -c 0 $HUBGATE run --config $CONF/hubgate-spool.toml" ;;
    hubgate-spool-pg) echo "env TOKIO_WORKER_THREADS=1 RUST_LOG=$HUBGATE_LOG taskset -c 0 $HUBGATE run --config $CONF/hubgate-spool-pg.toml" ;;
  esac
}

declare -A PID=()
UPSTREAM_PID=
SIDECAR_UPSTREAM_PID=
cleanup() {
  for p in ${LG_BG:-} ${PERF_BG:-}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PID[@]}" $UPSTREAM_PID $SIDECAR_UPSTREAM_PID; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PID[@]}" $UPSTREAM_PID $SIDECAR_UPSTREAM_PID; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  pg_stop # after the gates, which hold connections to it
}
trap cleanup EXIT
trap 'exit 130' INT TERM


start_sys() {
  local s=$1
  # shellcheck disable=SC2046
  $(sys_cmd "$s") >>"$WORK/$s.log" 2>&1 &
  PID[$s]=$!
  wait_port "${PORT[$s]}" || { log "$s did not start (see $WORK/$s.log)"; return 1; }
}

stop_sys() {
  local s=$1 p=${PID[$1]:-}
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "PID[$s]"
  for _ in $(seq 100); do port_busy "${PORT[$s]}" || break; sleep 0.05; done
}

# The processes whose CPU/RSS count: the system's pid and its children (nginx's worker).
sys_pids() {
  local p=${PID[$1]} kids
  kids=$(pgrep -P "$p" | paste -sd, -)
  echo "$p${kids:+,$kids}"
}

LG() { timeout 120 taskset -c 1 "$LOADGEN" "$@"; }

# The machine may be shared: before a timed run, wait (bounded) for other work to calm down.
# Between runs our own processes are idle, so the machine's busy share is other work's.
QUIET_PCT=${BENCH_QUIET_PCT:-20}
QUIET_WAIT_PER_RUN=8     # seconds at most before one run
QUIET_WAIT_TOTAL=$((BUDGET_S / 10)) # seconds at most over the whole benchmark
QUIET_WAITED=0
busy_pct() { # machine-wide busy % over 0.5 s
  local a b
  read -r -a a < <(grep '^cpu ' /proc/stat)
  sleep 0.5
  read -r -a b < <(grep '^cpu ' /proc/stat)
  local busy=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8])))
  local idle=$(((b[4] + b[5]) - (a[4] + a[5])))
  echo $((busy * 100 / (busy + idle + 1)))
}
wait_quiet() {
  local start=$SECONDS pct
  while :; do
    pct=$(busy_pct)
    [ "$pct" -le "$QUIET_PCT" ] && break
    if [ $((SECONDS - start)) -ge $QUIET_WAIT_PER_RUN ] || [ $((QUIET_WAITED + SECONDS - start)) -ge $QUIET_WAIT_TOTAL ]; then
      log "machine busy with other work (${pct}% of all cores): running anyway"
      break
    fi
  done
  QUIET_WAITED=$((QUIET_WAITED + SECONDS - start))
}
common() { # SYSTEM -> target arguments
  echo "--addr 127.0.0.1:${PORT[$1]} --pki $PKI --secret $SECRET --verify-token $TOKEN --label system=$1"
}

RESULTS="$RESULTS_DIR/latest.jsonl"
: >"$RESULTS"

json_escape() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '%s' "${s//$'\n'/ }"; }

# --- upstream and systems ------------------------------------------------------------------------
log "starting the upstream on core 1 ($UPSTREAM_ADDR) and the systems on core 0"
taskset -c 1 "$UPSTREAM" --listen "$UPSTREAM_ADDR" --max-seconds $((BUDGET_S + 300)) \
  >"$WORK/upstream.log" 2>&1 &
UPSTREAM_PID=$!
wait_port "${UPSTREAM_ADDR##*:}" || { log "the upstream did not start"; exit 1; }
if [[ " $TOPOLOGIES " == *" sidecar "* ]]; then
  log "starting the sidecar topology's upstream on core 0 ($SIDECAR_UPSTREAM_ADDR)"
  taskset -c 0 "$UPSTREAM" --listen "$SIDECAR_UPSTREAM_ADDR" --max-seconds $((BUDGET_S + 300)) \
    >"$WORK/upstream-sidecar.log" 2>&1 &
  SIDECAR_UPSTREAM_PID=$!
  wait_port "${SIDECAR_UPSTREAM_ADDR##*:}" || { log "the sidecar upstream did not start"; exit 1; }
fi
# The upstream of the phase being run (bench phases below).
CUR_UP=$UPSTREAM_ADDR
CUR_UP_PID=$UPSTREAM_PID

read -r -a SYS_LIST <<<"$SYSTEMS"
RUN_LIST=("${SYS_LIST[@]}")
# hubgate with its access log on (its default), timed beside hubgate with it off in the same
# phases (ka1k and get), so that the log's cost is measured pair by pair, back to back.
[[ " $SYSTEMS " == *" hubgate "* && " $LOGS_SETTINGS " == *" on "* ]] && RUN_LIST+=(hubgate-log)
[ "$SPOOL" = 1 ] && RUN_LIST+=(hubgate-spool)
if [ "$SPOOL_PG" = 1 ]; then
  log "starting PostgreSQL 15 on core $PG_CORE (127.0.0.1:$PG_PORT, data in $PG_DIR)"
  if pg_start; then
    RUN_LIST+=(hubgate-spool-pg)
  else
    log "PostgreSQL did not start (see $PG_DIR/postgres.log): no spool-pg row"
    SPOOL_PG=0
  fi
fi
for s in "${RUN_LIST[@]}"; do start_sys "$s" || true; done
sleep 0.5

hubgate_threads="not running"
if [ -n "${PID[hubgate]:-}" ]; then
  hp=${PID[hubgate]}
  workers=$(cat /proc/"$hp"/task/*/comm 2>/dev/null | grep -c '^tokio-r' || true)
  total=$(ls /proc/"$hp"/task | wc -l)
  hubgate_threads="$workers tokio worker thread(s), $total threads in all"
  log "hubgate runs with $hubgate_threads"
fi

# --- admission checks ------------------------------------------------------------------------------
PASSED=()
SPOOL_OK=0
SPOOL_PG_OK=0
LOG_OK=0
for s in "${RUN_LIST[@]}"; do
  log "checking that $s does the whole job"
  extra=""
  case "$s" in hubgate-spool | hubgate-spool-pg) extra="--deferred --upstream-addr $UPSTREAM_ADDR" ;; esac
  # shellcheck disable=SC2046
  if [ -n "${PID[$s]:-}" ] && LG check $(common "$s") $extra >>"$RESULTS" 2>"$WORK/check-$s.txt"; then
    case "$s" in
      hubgate-spool) SPOOL_OK=1 ;;
      hubgate-spool-pg) SPOOL_PG_OK=1 ;;
      hubgate-log) LOG_OK=1 ;;
      *) PASSED+=("$s") ;;
    esac
  else
    [ -n "${PID[$s]:-}" ] || echo "{\"kind\":\"check\",\"system\":\"$s\",\"ok\":false,\"failed\":\"did not start\"}" >>"$RESULTS"
    log "$s FAILED the admission checks, it will not be timed:"
    sed 's/^/    /' "$WORK/check-$s.txt" >&2
  fi
done

# --- load scenarios (interleaved: repetition i of every system back to back) --------------------------
scenario_args() {
  case "$1" in
    ka1k) echo "--mode post --body-bytes 1024 --connections $CONNS" ;;
    ka64k) echo "--mode post --body-bytes 65536 --connections $CONNS" ;;
    newconn) echo "--mode post --body-bytes 1024 --new-conn --connections $NEWCONN_CONNS" ;;
    get) echo "--mode get --connections $CONNS" ;;
    spool1k | spool-pg) echo "--mode post --body-bytes 1024 --connections $CONNS --drain-wait $SPOOL_DRAIN" ;;
  esac
}
# One spool row: the load generator in the background, and around its timed window (after the
# warm-up) readings of hubgate's and PostgreSQL's CPU ticks and of the database's counters,
# written as a "spoolstat" line next to the load line. For the SQLite row, hubgate's own spool
# counters from its admin listener (stored events, durable commits and their time), and fsync
# calls with BENCH_COUNT_FSYNC=1.
LG_BG=
PERF_BG=
spool_run() { # SCENARIO SYSTEM REP (SCENARIO may carry the phase's suffix)
  local sc=$1 s=$2 rep=$3 hp=${PID[$2]} t0 t1 h0 h1 p0=0 p1=0 db0="" db1="" out="$WORK/load-$1-$3.json"
  local fsyncs=""
  # Not through LG(): $! must be timeout's pid, so that the trap can stop it.
  # shellcheck disable=SC2046
  timeout 120 taskset -c 1 "$LOADGEN" load $(common "$s") --label "scenario=$sc" --label "rep=$rep" \
    $(scenario_args "${sc%%[@+]*}") --warmup "$WARMUP" --duration "$DURATION" --pids "$hp" \
    --upstream-pid "$CUR_UP_PID" --upstream-addr "$CUR_UP" >"$out" &
  LG_BG=$!
  sleep "$WARMUP"
  if [ "${BENCH_COUNT_FSYNC:-0}" = 1 ]; then
    local fpids=$hp
    [ "$s" = hubgate-spool-pg ] && fpids="$hp,$PG_PID,$(pgrep -P "$PG_PID" | paste -sd, -)"
    perf stat -x, -o "$WORK/fsync-$sc-$rep.csv" -p "$fpids" \
      -e 'syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync' -- sleep "$DURATION" >/dev/null 2>&1 &
    PERF_BG=$!
  fi
  local m0="" m1=""
  [ "$s" = hubgate-spool ] && m0=$(spool_metrics "$((PORT[$s] + 1000))")
  t0=$(date +%s%N)
  h0=$(proc_ticks "$hp")
  local waits=""
  if [ "$s" = hubgate-spool-pg ]; then
    p0=$(pg_ticks)
    db0=$(pg_snapshot)
    # What hubgate's database sessions are doing, sampled at 1/4, 1/2 and 3/4 of the window.
    local q i
    q=$(awk -v d="$DURATION" 'BEGIN {print d / 4}')
    for i in 1 2 3; do
      sleep "$q"
      waits+="$(pg_waits | paste -sd, -),"
    done
    sleep "$q"
  else
    sleep "$DURATION"
  fi
  t1=$(date +%s%N)
  h1=$(proc_ticks "$hp")
  [ "$s" = hubgate-spool ] && m1=$(spool_metrics "$((PORT[$s] + 1000))")
  if [ "$s" = hubgate-spool-pg ]; then p1=$(pg_ticks); db1=$(pg_snapshot); fi
  local rc=0
  wait "$LG_BG" || rc=$?
  LG_BG=
  if [ -n "$PERF_BG" ]; then
    wait "$PERF_BG" || true
    PERF_BG=
    fsyncs=$(awk -F, '$3 ~ /sys_enter_f(data)?sync/ {n += $1} END {print n + 0}' "$WORK/fsync-$sc-$rep.csv")
  fi
  cat "$out" >>"$RESULTS"
  {
    printf '{"kind":"spoolstat","system":"%s","scenario":"%s","rep":"%s","window_ns":%s,"hubgate_ticks":%s' \
      "$s" "$sc" "$rep" "$((t1 - t0))" "$((h1 - h0))"
    [ -n "$fsyncs" ] && printf ',"fsync_calls":%s' "$fsyncs"
    if [ -n "$m0" ] && [ -n "$m1" ]; then
      python3 -c 'import sys; a, b = (list(map(float, x.split())) for x in sys.argv[1:]); print(",\"hub_stored\":%d,\"hub_commits\":%d,\"hub_commit_s\":%.6f" % tuple(y - x for x, y in zip(a, b)), end="")' "$m0" "$m1"
    fi
    [ -n "$waits" ] && printf ',"pg_waits":"%s"' "$(json_escape "${waits%,}")"
    if [ -n "$db0" ] && [ -n "$db1" ]; then
      local a b k i
      read -r -a a <<<"$db0"
      read -r -a b <<<"$db1"
      printf ',"pg_ticks":%s' "$((p1 - p0))"
      i=0
      for k in xids events backlog wal_bytes xact_commit wal_write wal_sync wal_write_ms wal_sync_ms; do
        printf ',"pg_%s":%s' "$k" "$((b[i] - a[i]))"
        i=$((i + 1))
      done
    fi
    printf '}\n'
  } >>"$RESULTS"
  if [ "$s" = hubgate-spool-pg ]; then
    # Housekeeping between runs, outside any timed window: what this run left for autovacuum and
    # the checkpointer is done now, so that it does not land in the next row's window on core 0.
    pg_sql hubgate "VACUUM (ANALYZE) hubgate.events" >/dev/null 2>&1 || true
    pg_sql hubgate "VACUUM (ANALYZE) hubgate.dedupe" >/dev/null 2>&1 || true
    pg_sql hubgate "CHECKPOINT" >/dev/null 2>&1 || true
  fi
  return "$rc"
}

# The phases: today's topology with access logs off first (every scenario), then the others
# that were asked for, each with its own scenarios (see the header). Systems restart between
# phases with that phase's configuration.
PHASES=()
for topo in split sidecar; do
  [[ " $TOPOLOGIES " == *" $topo "* ]] || continue
  for lg in off on; do
    [[ " $LOGS_SETTINGS " == *" $lg "* ]] && PHASES+=("$topo:$lg")
  done
done
phase_has() { # PHASE SCENARIO: is the scenario run in this phase?
  has "$2" || return 1
  case "$1" in
    split:off) return 0 ;;
    sidecar:off) [[ " ka1k ka64k get spool1k " == *" $2 "* ]] ;;
    *) [[ " ka1k get " == *" $2 "* ]] ;;
  esac
}

for phase in "${PHASES[@]}"; do
  topo=${phase%%:*} logs=${phase##*:}
  suffix=""
  [ "$topo" = sidecar ] && suffix="@sidecar"
  [ "$logs" = on ] && suffix="$suffix+log"
  if [ "$phase" != split:off ]; then
    if over_budget $((BUDGET_S * 4 / 5)); then log "time budget reached: skipping phase $phase"; break; fi
    for s in "${RUN_LIST[@]}"; do stop_sys "$s"; done
    CONF="$WORK/$topo-$logs"
    CUR_UP=$UPSTREAM_ADDR CUR_UP_PID=$UPSTREAM_PID
    [ "$topo" = sidecar ] && CUR_UP=$SIDECAR_UPSTREAM_ADDR CUR_UP_PID=$SIDECAR_UPSTREAM_PID
    HUBGATE_LOG=warn
    [ "$logs" = on ] && HUBGATE_LOG=info
    render_configs "$CONF" "$CUR_UP" "$logs"
    log "phase $phase: upstream $CUR_UP, access logs $logs"
    for s in "${PASSED[@]}"; do start_sys "$s" || true; done
    [ "$LOG_OK" = 1 ] && [ "$logs" = off ] && { start_sys hubgate-log || true; }
    [ "$SPOOL_OK" = 1 ] && phase_has "$phase" spool1k && { start_sys hubgate-spool || true; }
    sleep 0.5
  fi
  for rep in $(seq "$REPS"); do
    for sc in ka1k ka64k newconn get; do
      phase_has "$phase" "$sc" || continue
      timed=("${PASSED[@]}")
      [ "$LOG_OK" = 1 ] && [ "$logs" = off ] && [[ " ka1k get " == *" $sc "* ]] && timed+=(hubgate-log)
      n=${#timed[@]}
      for i in $(seq 0 $((n - 1))); do
        s=${timed[$(((i + rep - 1) % n))]} # rotate the order each repetition
        # Leave time for the idle, ready and micro-benchmark phases.
        if over_budget $((BUDGET_S * 4 / 5)); then log "time budget reached: skipping the rest"; break 3; fi
        [ -n "${PID[$s]:-}" ] || continue
        wait_quiet
        log "rep $rep/$REPS  $sc$suffix  $s"
        # shellcheck disable=SC2046
        LG load $(common "$s") --label "scenario=$sc$suffix" --label "rep=$rep" $(scenario_args "$sc") \
          --warmup "$WARMUP" --duration "$DURATION" --pids "$(sys_pids "$s")" \
          --upstream-pid "$CUR_UP_PID" --upstream-addr "$CUR_UP" >>"$RESULTS" \
          || log "load run failed: $s $sc$suffix rep $rep"
      done
    done
    # The spool rows, SQLite then PostgreSQL on odd repetitions, the other way round on even ones.
    spool_rows=()
    [ "$SPOOL_OK" = 1 ] && phase_has "$phase" spool1k && spool_rows+=("spool1k hubgate-spool")
    [ "$SPOOL_PG_OK" = 1 ] && phase_has "$phase" spool-pg && spool_rows+=("spool-pg hubgate-spool-pg")
    [ $((rep % 2)) = 0 ] && [ ${#spool_rows[@]} = 2 ] && spool_rows=("${spool_rows[1]}" "${spool_rows[0]}")
    for row in "${spool_rows[@]}"; do
      if over_budget $((BUDGET_S * 4 / 5)); then log "time budget reached: skipping the rest"; break 2; fi
      read -r sc s <<<"$row"
      [ -n "${PID[$s]:-}" ] || continue
      wait_quiet
      log "rep $rep/$REPS  $sc$suffix  $s"
      spool_run "$sc$suffix" "$s" "$rep" || log "load run failed: $s $sc$suffix rep $rep"
    done
  done
done
for s in "${RUN_LIST[@]}"; do stop_sys "$s"; done
pg_stop
# The idle, ready and size parts run with today's configuration (access logs off).
CONF="$WORK"
HUBGATE_LOG=warn

# --- 1,000 idle mTLS connections, each system freshly started -------------------------------------------
for rep in $(seq "$IDLE_REPS"); do
  for s in "${PASSED[@]}"; do
    if over_budget; then log "time budget reached: skipping idle runs"; break 2; fi
    log "idle connections rep $rep/$IDLE_REPS  $s"
    start_sys "$s" || continue
    sleep 0.3
    # shellcheck disable=SC2046
    LG idle $(common "$s") --label "rep=$rep" --connections "$IDLE_CONNS" --hold "$IDLE_HOLD" \
      --pids "$(sys_pids "$s")" >>"$RESULTS" || log "idle run failed: $s"
    stop_sys "$s"
  done
done

# --- start to ready ------------------------------------------------------------------------------------
for rep in $(seq "$READY_REPS"); do
  for s in "${PASSED[@]}"; do
    if over_budget; then break 2; fi
    # shellcheck disable=SC2046
    LG ready $(common "$s") --label "rep=$rep" --timeout 15 -- $(sys_cmd "$s") >>"$RESULTS" \
      || log "ready run failed: $s"
    for _ in $(seq 100); do port_busy "${PORT[$s]}" || break; sleep 0.05; done
  done
done
log "start-to-ready measured"

# --- size on disk ---------------------------------------------------------------------------------------
size_line() { # NAME FILE...: the files plus the non-libc shared libraries they load
  local name=$1; shift
  local -A seen=()
  local bin=0 total=0 files=() f lib
  bin=$(stat -L -c %s "$1")
  for f in "$@"; do
    seen[$(readlink -f "$f")]=1
    files+=("$(basename "$f")")
    for lib in $(ldd "$f" 2>/dev/null | awk '/=>/ {print $3}'); do
      case "$(basename "$lib")" in
        libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | ld-linux* | libresolv.so*) continue ;;
      esac
      seen[$(readlink -f "$lib")]=1
    done
  done
  for f in "${!seen[@]}"; do total=$((total + $(stat -c %s "$f"))); done
  local libs
  libs=$(for f in "${!seen[@]}"; do basename "$f"; done | sort | paste -sd' ' -)
  echo "{\"kind\":\"size\",\"system\":\"$name\",\"files\":\"$(json_escape "$libs")\",\"binary_bytes\":$bin,\"total_bytes\":$total}" >>"$RESULTS"
}
if has size; then
  size_line haproxy "$(command -v haproxy)"
  size_line "nginx + njs" "$(command -v nginx)" "$NJS_MODULE"
  size_line "hubgate (as built)" "$HUBGATE"
  strip -o "$WORK/hubgate.stripped" "$HUBGATE"
  size_line "hubgate (stripped)" "$WORK/hubgate.stripped"
fi

# --- micro-benchmark ---------------------------------------------------------------------------------------
if has micro; then
  log "micro-benchmark (core 0)"
  MICROBENCH_MS=$MICRO_MS timeout 120 taskset -c 0 "$MICROBENCH" --json >>"$RESULTS" || log "microbench failed"
fi

# --- report --------------------------------------------------------------------------------------------------
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
machine="$(nproc) cores ($cpu), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME")"
njs=$(dpkg-query -W -f='${Version}' libnginx-mod-http-js 2>/dev/null || echo '?')
[ "$BUILD" = 1 ] || dirty="$dirty; binary not rebuilt by this run, built $(date -u -r "$HUBGATE" '+%H:%M UTC')"
versions="$(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), $(nginx -v 2>&1 | sed 's|.*nginx/|nginx |') with njs $njs, $("$HUBGATE" --version) (git $rev$dirty), $(openssl version | awk '{print "OpenSSL " $2}')"
{
  printf '{"kind":"meta","date":"%s","mode":"%s","reps":"%s","duration":"%s","warmup":"%s",' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$MODE" "$REPS" "$DURATION" "$WARMUP"
  printf '"connections":"%s","newconn_connections":"%s","systems":"%s","machine":"%s",' \
    "$CONNS" "$NEWCONN_CONNS" "$(IFS=,; echo "${RUN_LIST[*]/hubgate-spool-pg/}" | sed 's/,,*/,/g; s/,$//')" "$(json_escape "$machine")"
  printf '"versions":"%s","hubgate_threads":"%s","elapsed_s":"%s"}\n' \
    "$(json_escape "$versions")" "$(json_escape "$hubgate_threads")" "$(($(date +%s) - T_START))"
} >>"$RESULTS"

rm -rf "$WORK/spool" "$PG_DIR/data" # hundreds of MB of accepted test events (the logs stay)
"$LOADGEN" report --results "$RESULTS" --out "$RESULTS_DIR/latest.md"
# The spool rows against sync hubgate, and the spool-pg readings (loadgen report knows only the
# SQLite spool row, compared with HAProxy): appended to the report.
if [ "$SPOOL" = 1 ] || [ "$SPOOL_PG" = 1 ]; then
  python3 "$BENCH_DIR/spool_report.py" "$RESULTS" "$PG_CORE" | tee -a "$RESULTS_DIR/latest.md"
fi
log "done in $(($(date +%s) - T_START)) s: $RESULTS_DIR/latest.md"
