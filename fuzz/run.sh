#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600) with libFuzzer, one after the other,
# on the corpus in fuzz/corpus/TARGET, then minimises each corpus. Not part of CI (too long).
#   bash fuzz/run.sh            # all targets, 10 minutes each
#   SECONDS_EACH=60 bash fuzz/run.sh path policy
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain take
# the -Z flags cargo-fuzz passes, so no nightly toolchain is needed.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
each=${SECONDS_EACH:-600}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(path credential policy keys_reader rfc5424)
bash seed.sh
cargo fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${each}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$each" -max_len=4096 \
    -print_final_stats=1 2>&1 | tee "logs-$t.txt" | grep -E "^(#[0-9]+ +DONE|Done|stat::|==|SUMMARY)" || true
  cargo fuzz cmin -O "$t" "corpus/$t" -- -max_len=4096 >/dev/null 2>&1 || true
done
ls artifacts/*/ 2>/dev/null | grep -E "crash|oom|timeout" && { echo "crashes found"; exit 1; }
echo "no crashes"
