# shellcheck shell=bash
# A throwaway PostgreSQL 15 for the spool-pg scenario of bench/run.sh (sourced, not run), plus
# the readings taken around a timed run: CPU ticks of hubgate and of PostgreSQL (postmaster and
# every backend), and the database's own counters.
#
# Uses PG_BIN, PG_DIR (data in PG_DIR/data, log in PG_DIR/postgres.log), PG_PORT and PG_CORE.

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PID=

# As root, the server runs as the `postgres` user (initdb and postgres refuse to run as root).
pg_as() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Stops a server left running in PG_DIR by an earlier, interrupted run (before PG_DIR is removed).
pg_stop_stale() {
  local dir=$1 pid
  [ -f "$dir/data/postmaster.pid" ] || return 0
  pid=$(head -1 "$dir/data/postmaster.pid")
  if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = postgres ]; then
    pg_as "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w -t 20 stop >/dev/null 2>&1 || kill -KILL "$pid" 2>/dev/null || true
  fi
}

pg_start() {
  mkdir -p "$PG_DIR"
  chown postgres: "$PG_DIR" 2>/dev/null || true
  pg_as "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    --no-instructions >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  # Defaults otherwise (wal_sync_method fdatasync, full_page_writes on, checkpoint_timeout 5min,
  # max_wal_size 1GB, autovacuum on). See bench/README.md.
  cat >>"$PG_DIR/data/postgresql.conf" <<EOF

# --- bench/run.sh (spool-pg) ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 100
fsync = on
synchronous_commit = on
shared_buffers = 128MB
track_wal_io_timing = on   # pg_stat_wal.wal_sync_time: the mean WAL flush time
EOF
  # The server and all its backends inherit the pinning of pg_ctl.
  pg_as taskset -c "$PG_CORE" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 30 \
    start >/dev/null || { cat "$PG_DIR/postgres.log" >&2; return 1; }
  PG_PID=$(head -1 "$PG_DIR/data/postmaster.pid")
  pg_sql postgres "CREATE DATABASE hubgate" >/dev/null
}

pg_stop() {
  [ -n "$PG_PID" ] || return 0
  pg_as "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  if kill -0 "$PG_PID" 2>/dev/null; then
    pg_as "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
    kill -KILL "$PG_PID" 2>/dev/null || true
  fi
  PG_PID=
}

# pg_sql DB SQL: one psql on core 1 (the load generator's), unaligned output, no psqlrc.
pg_sql() {
  taskset -c 1 psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" -XqAt -F ' ' -v ON_ERROR_STOP=1 -c "$2"
}

# CPU ticks (utime + stime, 1/100 s) of one process, all its threads.
proc_ticks() {
  local s a
  s=$(cat /proc/"$1"/stat 2>/dev/null) || { echo 0; return; }
  read -r -a a <<<"${s##*) }"
  echo $((a[11] + a[12]))
}

# CPU ticks of PostgreSQL: the postmaster, its live children (backends, WAL writer, checkpointer,
# autovacuum, …) and, through the postmaster's cutime + cstime, the children that have exited.
pg_ticks() {
  local s a total kid
  s=$(cat /proc/"$PG_PID"/stat 2>/dev/null) || { echo 0; return; }
  read -r -a a <<<"${s##*) }"
  total=$((a[11] + a[12] + a[13] + a[14]))
  for kid in $(pgrep -P "$PG_PID"); do total=$((total + $(proc_ticks "$kid"))); done
  echo "$total"
}

# One reading of the database, exact where PostgreSQL allows:
#   xid_next     next transaction id (each transaction that writes takes one: exact count of
#                write transactions, i.e. of COMMITs that must flush WAL)
#   events_seq   last id handed out by hubgate.events' sequence (exact count of accepted events)
#   backlog      events in the table (pending, in flight or dead)
#   wal_bytes    pg_current_wal_lsn() (exact)
#   xact_commit, wal_write, wal_sync, wal_write_time, wal_sync_time (ms): the statistics system's
#                counters; backends publish them at most once a second, so a window's delta is
#                good to about a second's worth of activity at each end.
PG_SNAPSHOT_SQL="SELECT pg_snapshot_xmax(pg_current_snapshot()),
  (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM hubgate.events_id_seq),
  (SELECT count(*) FROM hubgate.events),
  pg_current_wal_lsn() - '0/0'::pg_lsn,
  (SELECT xact_commit FROM pg_stat_database WHERE datname = 'hubgate'),
  w.wal_write, w.wal_sync, round(w.wal_write_time), round(w.wal_sync_time)
FROM pg_stat_wal w"
pg_snapshot() { pg_sql hubgate "$PG_SNAPSHOT_SQL"; }

# The database sessions of the gates (not this psql), by what they are doing now: `idle`, `CPU`
# (active, no wait event) or the wait event (`Lock:object`, `IO:WALSync`, `LWLock:WALWrite`, …),
# as "what=count" lines.
pg_waits() {
  pg_sql hubgate "SELECT CASE WHEN state = 'idle' THEN 'idle'
      ELSE coalesce(wait_event_type || ':' || wait_event, 'CPU') END AS what, count(*)
    FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
    GROUP BY 1 ORDER BY 2 DESC" | sed 's/ /=/'
}
