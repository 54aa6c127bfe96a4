#!/usr/bin/env bash
# Fuzzes the artifact loader, the image decoder + preprocessing, and the feature-cache and
# probe-cache readers with cargo-fuzz (libFuzzer,
# AddressSanitizer) for a bounded time each; docs/RELIABILITY.md records the output.
#
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 300)
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The stable toolchain is enough:
# RUSTC_BOOTSTRAP=1 lets it accept the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-300}
status=0
export RUSTC_BOOTSTRAP=1
cargo run --quiet --release --bin make_seeds
for target in artifact_load image_preprocess feature_cache probe_cache; do
  echo "== $target, ${seconds}s"
  cargo fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 -max_len=65536 -print_final_stats=1 2>&1 |
    grep -E "^(#[0-9]+ *DONE|Done|stat::|SUMMARY|==[0-9]+==ERROR|thread .* panicked|artifact_prefix|Test unit written)" || true
  if [ -n "$(find "artifacts/$target" -type f 2>/dev/null)" ]; then
    echo "FAILURES in $target:"; ls "artifacts/$target"
    status=1
  fi
done
exit $status
