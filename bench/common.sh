# shellcheck shell=bash
# Helpers shared by bench/run.sh and bench/profile.sh (sourced, not run).

port_busy() { ss -Htln "sport = :$1" | grep -q .; }

wait_port() { # PORT -> waits up to 10 s for a listener
  for _ in $(seq 200); do port_busy "$1" && return 0; sleep 0.05; done
  return 1
}

# Fills a template's @PLACEHOLDERS@ from WORK, PKI, UPSTREAM_ADDR, TOKEN, SECRET, SECRET_B64, CN,
# NJS_MODULE, PG_PORT and LOGS (on: the access-log lines marked @LOG_ON@ are kept, those marked
# @LOG_OFF@ commented out; anything else: the other way round). Those a template does not use
# may be unset.
render() { # TEMPLATE PORT > OUT   (an admin listener, where a template has one: PORT + 1000)
  sed -e "s|@WORK@|$WORK|g" -e "s|@PKI@|$PKI|g" -e "s|@PORT@|$2|g" \
    -e "s|@UPSTREAM_ADDR@|$UPSTREAM_ADDR|g" -e "s|@TOKEN@|$TOKEN|g" \
    -e "s|@SECRET_B64@|${SECRET_B64:-}|g" -e "s|@SECRET@|$SECRET|g" \
    -e "s|@CN_RE@|${CN//./\\\\.}|g" -e "s|@CN@|$CN|g" -e "s|@NJS_MODULE@|${NJS_MODULE:-}|g" \
    -e "s|@PG_PORT@|${PG_PORT:-}|g" -e "s|@ADMIN_PORT@|$(($2 + 1000))|g" \
    -e "s|@LOG_ON@|$([ "${LOGS:-off}" = on ] || echo '# ')|g" \
    -e "s|@LOG_OFF@|$([ "${LOGS:-off}" = on ] && echo '# ')|g" "$1"
}

# A fresh benchmark PKI in DIR/pki and the names render() fills in: PKI, TOKEN, SECRET, CN.
new_pki() { # DIR PREFIX
  "$BENCH_DIR/pki.sh" "$1/pki" >/dev/null
  PKI="$1/pki"
  TOKEN="$2-token-$RANDOM$RANDOM"
  SECRET="$2-secret-$RANDOM$RANDOM$RANDOM"
  CN=client.webhooks.fbclientcerts.com
}

# Background processes to stop on exit (start_upstream adds to it; callers may too).
PIDS=()
cleanup_pids() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }

start_upstream() { # CORE ADDR MAX_SECONDS LOG: the benchmark upstream, pinned, waited for
  taskset -c "$1" "$BIN/examples/upstream" --listen "$2" --max-seconds "$3" >"$4" 2>&1 &
  PIDS+=($!)
  wait_port "${2##*:}"
}


# hubgate's spool counters from its admin listener: "stored commits commit_seconds".
spool_metrics() { # ADMIN_PORT
  python3 - "$1" <<'PY'
import sys, urllib.request
want = ["hubgate_spool_stored_events_total", "hubgate_spool_commits_total", "hubgate_spool_commit_seconds_total"]
got = {}
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            got[name] = value
except OSError:
    pass
print(" ".join(got.get(n, "0") for n in want))
PY
}
