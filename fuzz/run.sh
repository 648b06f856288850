#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) with nightly Rust and
# cargo-fuzz (installed from crates.io if missing), starting from the seeds in fuzz/seeds/
# (real payload shapes) and the corpus grown by earlier runs (fuzz/corpus/, not committed).
# Prints each target's executions and coverage; a crash stops the script with its input in
# fuzz/artifacts/<target>/ — turn it into a regression test.
#
#   fuzz/run.sh [seconds per target] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
shift || true
TARGETS=${*:-"challenge_query signature_header proxy_header identity_headers config batch_split"}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
for t in $TARGETS; do
  mkdir -p "fuzz/corpus/$t"
  log=$(mktemp)
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$SECS" -print_final_stats=1 -max_len=65536 >"$log" 2>&1 || {
    tail -40 "$log"
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/)"
    exit 1
  }
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  echo "fuzz: $t: ${execs:-?} executions in ${SECS} s, coverage ${cov:-?} edges (${ft:-?} features), corpus $corpus inputs, no crash"
  rm -f "$log"
done
