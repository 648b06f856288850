#!/usr/bin/env bash
# Does pg_notify in the accepting transaction cost PostgreSQL its group commit? A/B on a
# throwaway PostgreSQL 15 set up as bench/run.sh's spool-pg one (bench/pg.sh: core 0, fsync on,
# synchronous_commit on), without hubgate: pgbench, 16 clients (hubgate's pool_size) on core 1,
# each transaction one autocommit INSERT of a 1 KiB row, (A) alone, (B) with
# pg_notify('hubgate_spool', …) in the same statement as hubgate's accept does. Prints tps,
# mean latency, PostgreSQL CPU per transaction and transactions per WAL flush.
#
#   bench/pg_notify_ab.sh [SECONDS]      (default 5; two rounds of A and B)
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/pg.sh
. "$BENCH_DIR/pg.sh"
SECS=${1:-5}
PG_DIR="$BENCH_DIR/work/pg-notify-ab" PG_PORT=$((${BENCH_PORT_BASE:-28440} + 12)) PG_CORE=0
pg_stop_stale "$PG_DIR"
rm -rf "$PG_DIR"
trap 'pg_stop; rm -rf "$PG_DIR/data"' EXIT
pg_start
pg_sql hubgate "CREATE TABLE ev (id bigserial PRIMARY KEY, body bytea)"
echo "INSERT INTO ev (body) VALUES (convert_to(repeat('x', 1024), 'UTF8'));" >"$PG_DIR/a.sql"
echo "WITH e AS (INSERT INTO ev (body) VALUES (convert_to(repeat('x', 1024), 'UTF8')) RETURNING id)
SELECT id, pg_notify('hubgate_spool', '/webhook')::text FROM e;" >"$PG_DIR/b.sql"
wal() { pg_sql hubgate "SELECT wal_sync FROM pg_stat_wal"; }
for round in 1 2; do
  for ab in a b; do
    t0=$(pg_ticks); x0=$(pg_sql hubgate "SELECT count(*) FROM ev"); w0=$(wal)
    r=$(taskset -c 1 pgbench -n -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 16 -j 2 -T "$SECS" \
      -f "$PG_DIR/$ab.sql" hubgate 2>&1 | grep -E '^tps|latency average' | paste -sd' ' -)
    sleep 1.2 # pg_stat_wal is published at most once a second
    t1=$(pg_ticks); x1=$(pg_sql hubgate "SELECT count(*) FROM ev"); w1=$(wal)
    n=$((x1 - x0))
    printf '%s round %s: %s; PostgreSQL CPU %s µs/tx; %s tx per WAL flush\n' \
      "$([ $ab = a ] && echo 'A INSERT         ' || echo 'B INSERT + notify')" "$round" \
      "$(echo "$r" | sed 's/ (without initial connection time)//')" \
      "$(awk -v t=$((t1 - t0)) -v n=$n 'BEGIN {printf "%.0f", t * 10000 / n}')" \
      "$(awk -v w=$((w1 - w0)) -v n=$n 'BEGIN {printf "%.2f", n / (w > 0 ? w : 1)}')"
  done
done
