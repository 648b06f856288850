#!/usr/bin/env bash
# What PostgreSQL spends its time on under the spool-pg load: starts a throwaway PostgreSQL 15
# with pg_stat_statements on core 0 (as bench/run.sh does), hubgate with the spool-pg
# configuration on core 0, the upstream and the load generator on core 1, loads it for
# DUR seconds (default 5), waits DRAIN seconds (default 3) and prints the load generator's
# figures, the statements by total time, and the events left per state.
#
#   bench/pg_probe.sh            # needs bench/work/ from a bench/run.sh with spool-pg
#   HUB=/path/to/hubgate bench/pg_probe.sh       # another build (an A/B)
#   PERF=1 bench/pg_probe.sh     # also perf record core 0 for 3 s into bench/work/pg_probe.perf
#
# Stops everything it started. Uses the PKI, secret and token bench/run.sh left in bench/work.
set -u
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
cd "$ROOT" || exit 1
HUB=${HUB:-target/release/hubgate}
DUR=${DUR:-5}
CONF=bench/work/hubgate-spool-pg.toml
[ -f "$CONF" ] || { echo "pg_probe: $CONF is missing: run bench/run.sh --scenarios spool-pg first" >&2; exit 1; }
PG_DIR=$BENCH_DIR/work/pg_probe
PG_PORT=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\)\/hubgate.*/\1/p' "$CONF")
PG_CORE=0
# shellcheck source=bench/pg.sh
. "$BENCH_DIR/pg.sh"
pg_stop_stale "$PG_DIR"
rm -rf "$PG_DIR"
pg_start || exit 1
echo "shared_preload_libraries = 'pg_stat_statements'" >>"$PG_DIR/data/postgresql.conf"
pg_as "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w restart >/dev/null
PG_PID=$(head -1 "$PG_DIR/data/postmaster.pid")
pg_sql hubgate "CREATE EXTENSION pg_stat_statements" >/dev/null
SECRET=$(sed -n 's/^app_secrets = \["\(.*\)"\]/\1/p' "$CONF")
TOKEN=$(sed -n 's/^verify_token = "\(.*\)"/\1/p' "$CONF")
LISTEN=$(sed -n 's/^listen = "\(.*\)"/\1/p' "$CONF" | head -1)
UP=$(sed -n 's|^upstream = "http://\([^/]*\)/.*|\1|p' "$CONF")
taskset -c 1 target/release/examples/upstream --listen "$UP" --max-seconds 200 >/dev/null 2>&1 &
UP_PID=$!
env TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$HUB" run --config "$CONF" \
  >"$BENCH_DIR/work/pg_probe-hubgate.log" 2>&1 &
HG_PID=$!
trap 'kill $HG_PID $UP_PID 2>/dev/null; wait $HG_PID $UP_PID 2>/dev/null; pg_stop' EXIT
sleep 1.5
pg_sql hubgate "SELECT pg_stat_statements_reset()" >/dev/null
if [ -n "${PERF:-}" ]; then
  (sleep 2; perf record -q -C 0 -g -o "$BENCH_DIR/work/pg_probe.perf" -- sleep 3 >/dev/null 2>&1) &
fi
timeout 120 taskset -c 1 target/release/examples/loadgen load --addr "$LISTEN" --pki bench/work/pki \
  --secret "$SECRET" --verify-token "$TOKEN" --mode post --body-bytes 1024 --connections 50 \
  --warmup 1 --duration "$DUR" --pids "$HG_PID" --upstream-pid "$UP_PID" --upstream-addr "$UP" \
  >"$BENCH_DIR/work/pg_probe-load.json"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('rps', 'p99_ms', 'errors')})" \
  "$BENCH_DIR/work/pg_probe-load.json"
sleep "${DRAIN:-3}"
echo "calls  total_ms  ms_per_call  rows  statement"
pg_sql hubgate "SELECT calls, round(total_exec_time::numeric, 1), round((total_exec_time / calls)::numeric, 3), rows,
  left(regexp_replace(query, '\s+', ' ', 'g'), 90) FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12"
echo "events left:"
pg_sql hubgate "SELECT state, count(*) FROM hubgate.events GROUP BY 1"
