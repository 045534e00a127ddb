#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for SECONDS each (default 20) and fails on a crash.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
# Needs the nightly toolchain; installs cargo-fuzz when it is missing. Each target starts from
# fuzz/seeds/<target> and keeps what it finds in fuzz/corpus/<target> (not committed); a crash
# leaves its input in fuzz/artifacts/<target>/ and the log's tail on the terminal.
set -euo pipefail
secs="${1:-20}"
cd "$(dirname "$0")/.."

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build
logs="$(mktemp -d)"
failed=()
for target in $(cargo +nightly fuzz list); do
  mkdir -p "fuzz/corpus/$target"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  log="$logs/$target.log"
  # malloc_limit_mb: no input this small may make a decoder allocate that much.
  if cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "${seeds[@]}" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
      -print_final_stats=1 >"$log" 2>&1; then
    execs="$(grep -o 'number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
    echo "$target: ok, $execs runs in ${secs}s"
  else
    echo "$target: FAILED"
    tail -n 40 "$log"
    failed+=("$target")
  fi
done
rm -rf "$logs"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that failed: ${failed[*]}"
  exit 1
fi
