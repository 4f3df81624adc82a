#!/usr/bin/env bash
# Prepares, on the development machine, what bench/gpu_check.sh installs on the device machine,
# which has no package registry and takes at most 64 MiB of working tree per call:
#
#   .gpu/ort0 .. .gpu/ortN   an xz tar of onnxruntime-gpu's package, trimmed (no TensorRT provider,
#                            no C-API libonnxruntime.so, no transformers/quantization tools), split
#                            into parts of PART_BYTES (54,000,000: one part + the ~9.3 MB tracked
#                            tree fits one call)
#   .gpu/whl                 cp312 wheels the device lacks (FastAPI stack, uvicorn, faiss-cpu ...)
#                            and ort.tar.xz.sha256, which gpu_check.sh checks the joined parts against
#
#   bash bench/gpu_carry.sh [path/to/onnxruntime_gpu-*.whl]     # default: /tmp/whl/onnxruntime_gpu-1.31.1-*.whl
#
# Then, on the device, one `run` per part, back to back (the machine goes back after 30 s idle and
# the parts left by earlier calls survive only while it stays warm), the last with the wheels and
# the script (bench/results/gpu_check.md, "How to run it"). The .gpu/ folder must be ignored:
# `echo /.gpu/ >> .git/info/exclude`. xz -9 of the 300 MB trimmed package takes ~4 min on 2 cores
# (194 MB: the CUDA kernels barely compress). XZ_LEVEL, PART_BYTES and DEST override.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=${1:-$(ls /tmp/whl/onnxruntime_gpu-1.31.1-*.whl 2>/dev/null | head -1)}
DEST=${DEST:-.gpu}
XZ_LEVEL=${XZ_LEVEL:-9}
PART_BYTES=${PART_BYTES:-54000000}
[ -f "$WHEEL" ] || { echo "no onnxruntime-gpu wheel (download: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d /tmp/whl onnxruntime-gpu==1.31.1)"; exit 2; }
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || [ "$DEST" != .gpu ] || echo '/.gpu/' >>.git/info/exclude

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unzip -q "$WHEEL" -d "$tmp/pkg"
rm -f "$tmp"/pkg/onnxruntime/capi/libonnxruntime.so.* "$tmp"/pkg/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
rm -rf "$tmp"/pkg/onnxruntime/transformers "$tmp"/pkg/onnxruntime/quantization
du -sh "$tmp/pkg"
(cd "$tmp/pkg" && tar cf - onnxruntime onnxruntime_gpu-*.dist-info) | xz -T2 "-$XZ_LEVEL" >"$tmp/ort.tar.xz"
ls -la "$tmp/ort.tar.xz"

rm -rf "$DEST"/ort[0-9]*
mkdir -p "$DEST/whl"
(cd "$tmp" && split -b "$PART_BYTES" -d -a 1 ort.tar.xz part)
i=0
for part in "$tmp"/part*; do
  mkdir -p "$DEST/ort$i"
  mv "$part" "$DEST/ort$i/"
  i=$((i + 1))
done
sha256sum "$tmp/ort.tar.xz" | cut -d' ' -f1 >"$DEST/whl/ort.tar.xz.sha256"

# The serving stack at the versions of the project's .venv (the device has anyio, h11, click, idna,
# numpy, packaging, httpx, prometheus-client, threadpoolctl, uvloop, pyarrow, pyyaml already).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$DEST/whl" \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  uvicorn==0.55.0 httptools==0.9.0 orjson==3.13.0 crc32c==2.9.post0 faiss-cpu==1.15.1
du -sb "$DEST"/ort* "$DEST/whl"
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
last=$(du -sb "$(ls -d "$DEST"/ort* | tail -1)" | cut -f1)
whl=$(du -sb "$DEST/whl" | cut -f1)
echo "working tree that travels with every call: $tree bytes (limit 67108864 a call with the carried paths)"
if [ $((tree + last + whl)) -lt 66000000 ]; then
  echo "carry, one call each: $(ls -d "$DEST"/ort* | tr '\n' ' ')(the last together with $DEST/whl)"
else
  echo "the last part and the wheels do not fit one call: carry $DEST/whl in a call of its own before the last part"
fi
