#!/usr/bin/env bash
# Photo to label at camera resolution: graft against Pillow + onnxruntime, one thread.
# docs/PERFORMANCE.md quotes the output.
#
# 1. Makes 12 photos of 4000x3000 (JPEG quality 92) from the first 12 hymenoptera val images
#    (Pillow, bicubic upscale), and all 153 val images upscaled to 12 megapixels (aspect kept).
# 2. Compiles the default hymenoptera artifact (f32 and int8; fast preprocessing pipeline).
# 3. Times, alternately, ROUNDS times:
#      graft    `graft-run predict --threads 1` on the 12 photos; its own "classified N images in
#               X s" (read, decode, preprocess, classify; artifact load excluded) and the whole
#               process wall time (load included)
#      pillow   Pillow draft decode (libjpeg DCT scaling to >= 256 px) + resize (the artifact's
#               bilinear, and bicubic) + centre crop + normalise + onnxruntime, one thread
#               (session creation excluded), on the original Lite0 ONNX (f32) and on onnxruntime's
#               static int8 model made by scripts/bench_vs_onnxruntime.sh's recipe
# 4. `graft-run bench` preprocessing and decoding latency on a 500x375 JPEG and a 4000x3000 one.
# 5. Top-1 agreement and accuracy of the fast and the reference (full-size decode) pipelines on
#    the 153 upscaled val photos and on the original ones, same artifact
#    (runtime/examples/pipelines.rs).
# 6. Feature extraction speed (2 threads, no cache) and validation accuracy of full compiles of
#    hymenoptera and flowers5 with each pipeline (reference = the path before the fast one).
#
# usage: scripts/photo_to_label.sh [ROUNDS=3] [SHARED=../shared]
# Installs onnxruntime, onnx, numpy, Pillow and sympy into target/bench-venv (pip), unless
# BENCH_PYTHON names a Python that has them.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shared=${2:-../shared}
source scripts/bench_python.sh
cargo build --release --quiet -p graft-compiler --bin graft -p graft-runtime --bin graft-run --example pipelines
graft=./target/release/graft
graft_run=./target/release/graft-run
out=target/bench-photos
backbone=$shared/backbones/efficientnet_lite0.onnx
data=$shared/datasets/hymenoptera
mkdir -p "$out"
image_size() { "$python" -c 'import sys; from PIL import Image; print("x".join(map(str, Image.open(sys.argv[1]).size)))' "$1"; }

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(grep -m1 '^flags' /proc/cpuinfo | grep -ow 'avx2\|avx512f\|avx512_vnni\|avx_vnni' | xargs)"
"$python" scripts/photo_bench.py make "$data/val" "$out/photos12" 12
"$python" scripts/photo_bench.py make "$data/val" "$out/val12mp"
for precision in f32 int8; do
  [ -f "$out/graft_$precision.graft" ] || "$graft" compile --quiet --backbone "$backbone" --data "$data" \
    --precision "$precision" --cache-dir "$out/cache" --out "$out/graft_$precision.graft" >/dev/null
done
# The path before the fast pipeline, for the "before" row.
[ -f "$out/graft_reference_f32.graft" ] || "$graft" compile --quiet --backbone "$backbone" --data "$data" \
  --pipeline reference --cache-dir "$out/cache" --out "$out/graft_reference_f32.graft" >/dev/null
[ -f "$out/ort_int8.onnx" ] || "$python" scripts/ort_bench.py quantize "$backbone" "$data/train" "$out/ort_int8.onnx"
mapfile -t photos < <(find "$out/photos12" -name '*.jpg' | sort)
size=$(image_size "${photos[0]}")
echo "== ${#photos[@]} photos of $size"

results=$out/results.txt
: >"$results"
predict() {  # NAME ARTIFACT: seconds (graft's own figure, load excluded), process wall in ms
  local start end line
  start=$(date +%s%N)
  line=$("$graft_run" predict "$2" "${photos[@]}" --threads 1 2>&1 >/dev/null | grep -o 'in [0-9.]* s' | grep -o '[0-9.]*')
  end=$(date +%s%N)
  echo "$1 $line $(( (end - start) / 1000000 ))" | tee -a "$results"
}
for round in $(seq "$rounds"); do
  predict graft_reference_f32 "$out/graft_reference_f32.graft"
  for precision in f32 int8; do
    predict "graft_$precision" "$out/graft_$precision.graft"
    onnx=$([ "$precision" = f32 ] && echo "$backbone" || echo "$out/ort_int8.onnx")
    for filter in bilinear bicubic; do
      ms=$("$python" scripts/photo_bench.py time "$onnx" "$filter" "${photos[@]}" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["ms"])')
      echo "pillow_${filter}_$precision $ms" | tee -a "$results"
    done
  done
done
"$python" - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, *values = line.split()
    rows.setdefault(name, []).append([float(v) for v in values])
# graft's first value is in seconds, the others in ms
med = {k: statistics.median(v[0] * (1000 if k.startswith("graft") else 1) for v in vs)
       for k, vs in rows.items()}
wall = {k: statistics.median(v[1] for v in vs) for k, vs in rows.items() if len(vs[0]) > 1}
print("== medians over rounds, 12 photos, one thread (ms for all 12)")
r = med["graft_reference_f32"]
print(f"reference pipeline (before), f32: graft {r:.0f} (process wall {wall['graft_reference_f32']:.0f}); "
      f"graft / pillow bilinear = {r / med['pillow_bilinear_f32']:.2f}x")
for p in ("f32", "int8"):
    g = med[f"graft_{p}"]
    print(f"{p}: graft {g:.0f} (process wall, load included: {wall[f'graft_{p}']:.0f}); "
          f"pillow+onnxruntime bilinear {med[f'pillow_bilinear_{p}']:.0f}, bicubic {med[f'pillow_bicubic_{p}']:.0f}; "
          f"graft / pillow bilinear = {g / med[f'pillow_bilinear_{p}']:.2f}x, "
          f"/ bicubic = {g / med[f'pillow_bicubic_{p}']:.2f}x, "
          f"process wall / bilinear = {wall[f'graft_{p}'] / med[f'pillow_bilinear_{p}']:.2f}x")
PY
echo "== graft-run bench: preprocessing and decoding of a 500x375 JPEG and of a 4000x3000 one (f32 artifact)"
for photo in "$data/val/ants/10308379_1b6c72e180.jpg" "${photos[0]}"; do
  size=$(image_size "$photo")
  "$graft_run" bench "$out/graft_f32.graft" "$photo" --iterations 200 | grep -E '^(preprocess|decode) ' \
    | sed "s|^|$size: |"
done
echo "== fast vs reference pipeline, same f32 artifact, 153 val photos at 12 megapixels"
./target/release/examples/pipelines "$out/graft_f32.graft" "$out/val12mp"
echo "== the same on the original val images"
./target/release/examples/pipelines "$out/graft_f32.graft" "$data/val"
echo "== feature extraction (2 threads, no cache) and validation accuracy, reference vs fast pipeline"
for dataset in hymenoptera flowers5; do
  for pipeline in reference fast; do
    "$graft" compile --backbone "$backbone" --data "$shared/datasets/$dataset" --pipeline "$pipeline" \
      --no-cache --out "$out/${dataset}_$pipeline.graft" 2>&1 \
      | grep -E '^(features|validation accuracy)' | sed "s/^/$dataset $pipeline: /"
  done
done
