#!/usr/bin/env bash
# Cross-compiles graft-run for aarch64-unknown-linux-gnu, runs it under qemu-user on the fixture
# artifacts (f32 and int8), and checks that it gives the same top-k and probabilities (within 1e-4)
# as on x86-64.
# Installs what it needs (Debian's gcc-aarch64-linux-gnu and qemu-user, the Rust target).
#
# usage: scripts/aarch64.sh [PROFILE]      (default: release; "edge" for the size-tuned build)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
target=aarch64-unknown-linux-gnu

if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
fi
rustup target list --installed | grep -q "^$target\$" || rustup target add "$target"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cargo build --locked --profile "$profile" --target "$target" -p graft-runtime --bin graft-run
cargo build --locked --profile "$profile" -p graft-runtime --bin graft-run
cargo build --locked --release -p graft-compiler --bin graft
dir=$(if [ "$profile" = dev ]; then echo debug; else echo "$profile"; fi)
out=${CARGO_TARGET_DIR:-target}
arm=$out/$target/$dir/graft-run
x86=$out/$dir/graft-run

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
images=(fixtures/hymenoptera-mini/val/ants/11381045_b352a47d8c.jpg fixtures/hymenoptera-mini/val/bees/1181173278_23c36fac71.jpg
        fixtures/hymenoptera-mini/val/bees/177677657_a38c97e572.jpg fixtures/odd-images/cmyk.jpg)
# An f32 and an int8 artifact: on aarch64 graft's kernels run their portable level, on x86-64 the
# best one the CPU has; the int8 integers are identical across levels, the f32 sums are not.
for precision in f32 int8; do
  "$out/release/graft" compile --quiet --backbone fixtures/efficientnet_lite0.onnx --precision "$precision" \
    --data fixtures/hymenoptera-mini --out "$work/bees-$precision.graft" --normalize tf --no-verify --no-cache >/dev/null
  "$x86" "$work/bees-$precision.graft" "${images[@]}" --json --threads 1 >"$work/x86.json"
  start=$(date +%s%N)
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm" "$work/bees-$precision.graft" "${images[@]}" --json --threads 1 >"$work/arm.json"
  end=$(date +%s%N)
  python3 - "$work/x86.json" "$work/arm.json" "$precision" <<'PY'
import json, sys
x86, arm = (json.load(open(p)) for p in sys.argv[1:3])
assert len(x86["predictions"]) == len(arm["predictions"]) == 4, "4 images expected"
worst = 0.0
for a, b in zip(x86["predictions"], arm["predictions"]):
    assert a["path"] == b["path"]
    assert [s["label"] for s in a["top_k"]] == [s["label"] for s in b["top_k"]], (a, b)
    for s, t in zip(a["top_k"], b["top_k"]):
        worst = max(worst, abs(s["probability"] - t["probability"]))
assert worst <= 1e-4, f"probabilities differ by {worst}"
print(f"{sys.argv[3]}: aarch64 (qemu) agrees with x86-64 on {len(arm['predictions'])} images: same top-k, max |dp| = {worst:.2e}")
PY
  echo "qemu run ($precision): $(( (end - start) / 1000000 )) ms for load + 4 images"
done
size() { stat -c %s "$1"; }
cp "$arm" "$work/arm-stripped" && aarch64-linux-gnu-strip "$work/arm-stripped"
cp "$x86" "$work/x86-stripped" && strip "$work/x86-stripped"
echo "graft-run ($profile): x86-64 $(size "$x86") bytes ($(size "$work/x86-stripped") stripped), aarch64 $(size "$arm") bytes ($(size "$work/arm-stripped") stripped)"
