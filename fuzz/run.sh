#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_EACH seconds (default 600) with libFuzzer, one after the
# other, on the corpus in fuzz/corpus/TARGET, then minimises each corpus. Not part of CI.
#   bash fuzz/run.sh            # all targets, 10 minutes each
#   SECONDS_EACH=60 bash fuzz/run.sh path policy
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain take
# the -Z flags cargo-fuzz passes, so no nightly toolchain is needed. The targets are built once
# and then run directly, so editing the source meanwhile does not change what is fuzzed.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
each=${SECONDS_EACH:-600}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(path credential policy keys_reader rfc5424)
bash seed.sh
cargo fuzz build -O
bin=target/x86_64-unknown-linux-gnu/release
failed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${each}s"
  if "$bin/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$each" \
       -max_len=4096 -print_final_stats=1 > "logs-$t.txt" 2>&1; then
    grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units" "logs-$t.txt" || true
    "$bin/$t" -merge=1 "corpus/$t.min" "corpus/$t" > /dev/null 2>&1 && true
  else
    echo "$t FAILED:"; grep -E "panicked|SUMMARY|ERROR" "logs-$t.txt" | head -5
    failed=1
  fi
done
[ "$failed" = 0 ] && ! ls artifacts/*/ 2>/dev/null | grep -qE "crash|oom|timeout|leak" \
  && echo "no crashes" || { echo "crashes found (see fuzz/artifacts)"; exit 1; }
