#!/usr/bin/env bash
# The project's GPU paths, run once on a CUDA machine, with their figures (bench/gpu_check.py).
#
#   OUT=DIR bash bench/gpu_check.sh 2>&1 | tee DIR/log     # OUT defaults to .gpu/out
#
# Steps, each under its own timeout (one hang costs only its own step): nvidia-smi; versions and
# providers; the GPU tests (pytest); the synthetic default written to disk; the default preset
# trained on CUDA with the CLI (python -m training train) and exported; training steps/s on CUDA
# vs CPU (default and paper presets); the exported encoders under CUDAExecutionProvider vs
# CPUExecutionProvider (index.embedder.Embedder: max |diff|, rows/s at batch 1, 64, 4096); the
# index job with --device cuda; the service with AVSEARCH_DEVICE=cuda and 1 and 2 workers (info,
# a search, the workers answering, latency), and on the CPU for comparison. Where there is no
# CUDA (torch or ONNX Runtime) every step still runs, on the CPU, and the figures say so.
#
# Carried packages, with INSTALL_CARRIED=1 (the device machine has no registry): .gpu/ort*/part* (an xz tar of an
# onnxruntime-gpu install, split) and .gpu/whl/*.whl are installed into /tmp/site, first on
# PYTHONPATH, so they shadow the machine's CPU onnxruntime. The CUDA libraries ONNX Runtime needs
# (cuBLAS, cuDNN, cuFFT, cuRAND, NVRTC, cudart 13) come from the machine's nvidia-* Python packages,
# put on LD_LIBRARY_PATH.
#
# Knobs: INSTALL_CARRIED (0), PY (python3), WORK (/tmp/avsearch-gpu-check), STEPS (200), CPU_BUDGET (s per CPU training
# run, 20), REQUESTS (per latency phase, 300), SKIP (space-separated step names to skip).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export OUT=${OUT:-$REPO/.gpu/out}
mkdir -p "$OUT"
PY=${PY:-python3}
WORK=${WORK:-/tmp/avsearch-gpu-check}
STEPS=${STEPS:-200}
CPU_BUDGET=${CPU_BUDGET:-20}
REQUESTS=${REQUESTS:-300}
SKIP=${SKIP:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
: >"$OUT/steps.txt"

step() { # step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  if [[ " $SKIP " == *" $name "* ]]; then
    echo "=== [$name] skipped (SKIP)"
    echo "$name skipped" >>"$OUT/steps.txt"
    return 0
  fi
  local t=$(date +%s%N)
  echo
  echo "=== [$name] (timeout ${limit}s) $*"
  timeout -k 5 "$limit" "$@"
  local rc=$?
  local ms=$((($(date +%s%N) - t) / 1000000))
  local note=""
  [[ $rc == 124 || $rc == 137 ]] && note=" TIMED OUT"
  echo "=== [$name] rc=$rc$note in $((ms / 1000)).$((ms % 1000 / 100))s (script at $(($(date +%s) - T0))s)"
  echo "$name rc=$rc$note $((ms / 1000)).$((ms % 1000 / 100))s" >>"$OUT/steps.txt"
  return 0
}

# --- carried packages ------------------------------------------------------------------------------
if [ "${INSTALL_CARRIED:-0}" = 1 ] && compgen -G ".gpu/ort*/part*" >/dev/null; then
  mkdir -p /tmp/site
  step unpack-onnxruntime-gpu 120 bash -c '
    want=$(cat .gpu/whl/ort.tar.xz.sha256 2>/dev/null)
    got=$(cat $(ls .gpu/ort*/part* | sort) | sha256sum | cut -d" " -f1)
    echo "parts: $(ls .gpu/ort*/part* | sort | tr "\n" " ") sha256 $got (want $want)"
    [ -z "$want" ] || [ "$want" = "$got" ] || { echo "checksum mismatch: a part is missing or stale"; exit 3; }
    cat $(ls .gpu/ort*/part* | sort) | xz -d -T0 | tar x -C /tmp/site && ls /tmp/site /tmp/site/onnxruntime/capi'
fi
if [ "${INSTALL_CARRIED:-0}" = 1 ] && compgen -G ".gpu/whl/*.whl" >/dev/null; then
  mkdir -p /tmp/site
  step install-wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# The nvidia-* packages' library folders (cu13 consolidated layout or one folder per library).
NVLIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = {os.path.dirname(p) for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
[ -n "$NVLIBS" ] && export LD_LIBRARY_PATH=$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "PYTHONPATH=${PYTHONPATH:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

# --- what is here ----------------------------------------------------------------------------------
step nvidia-smi 20 bash -c 'nvidia-smi || echo "no nvidia-smi (no GPU here)"'
step env 90 "$PY" bench/gpu_check.py env
HAS_TORCH_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
TDEV=cpu
[ "$HAS_TORCH_CUDA" = 1 ] && TDEV=cuda
echo "torch training device: $TDEV"

# --- tests that touch the GPU ----------------------------------------------------------------------
# tests/training/test_recipe.py: the one @pytest.mark.gpu test (resume on CUDA) and the CUDA RNG
# states; tests/index/test_store.py: the Embedder's provider choice (CUDA or said fallback) and the
# FAISS search device.
step pytest-gpu 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/training/test_recipe.py tests/index/test_store.py -k "gpu or cuda or search_device"

# --- training with the CLI -------------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK"
step make-data 90 "$PY" -m training make-data --out "$WORK/data"
"$PY" bench/gpu_check.py config --preset default --device "$TDEV" --steps "$STEPS" --eval-every 100 --out "$WORK/train_$TDEV.yaml"
step train-cli-$TDEV 240 "$PY" -m training train --config "$WORK/train_$TDEV.yaml" --data "$WORK/data" --out "$WORK/run" --quiet
step export 120 "$PY" -m training export --run "$WORK/run" --out "$WORK/model"

# --- training steps/s, CUDA vs CPU (same config, same data) ----------------------------------------
if [ "$TDEV" = cuda ]; then
  step speed-default-cuda 90 "$PY" bench/gpu_check.py train-speed --preset default --device cuda --steps "$STEPS" --budget-s 60 --data "$WORK/data"
  step speed-paper-cuda 90 "$PY" bench/gpu_check.py train-speed --preset paper --device cuda --steps "$STEPS" --budget-s 60 --data "$WORK/data"
  step speed-paper-cuda-amp 90 "$PY" bench/gpu_check.py train-speed --preset paper --device cuda --amp --steps "$STEPS" --budget-s 60 --data "$WORK/data"
else
  echo "no CUDA for torch: the CUDA training figures are not measured"
fi
step speed-default-cpu $((CPU_BUDGET + 60)) "$PY" bench/gpu_check.py train-speed --preset default --device cpu --steps "$STEPS" --budget-s "$CPU_BUDGET" --data "$WORK/data"
step speed-paper-cpu $((CPU_BUDGET + 60)) "$PY" bench/gpu_check.py train-speed --preset paper --device cpu --threads 0 --chunk 10 --steps "$STEPS" --budget-s "$CPU_BUDGET" --data "$WORK/data"

# --- exported encoders: CUDA vs CPU provider -------------------------------------------------------
step embed 150 "$PY" bench/gpu_check.py embed --model "$WORK/model" --data "$WORK/data"

# --- index job and service -------------------------------------------------------------------------
ODEV=$("$PY" -c 'import onnxruntime as o; print("cuda" if "CUDAExecutionProvider" in o.get_available_providers() else "auto")' 2>/dev/null || echo auto)
step index-build 150 "$PY" -m index build --model "$WORK/model" --data "$WORK/data" --out "$WORK/index" --device "$ODEV" --no-progress
step service-cuda-w1 120 "$PY" bench/gpu_check.py service --model "$WORK/model" --index "$WORK/index" --data "$WORK/data" --device cuda --workers 1 --requests "$REQUESTS" --port 8765
step service-cuda-w2 120 "$PY" bench/gpu_check.py service --model "$WORK/model" --index "$WORK/index" --data "$WORK/data" --device cuda --workers 2 --requests "$REQUESTS" --port 8766
step service-cpu-w1 120 "$PY" bench/gpu_check.py service --model "$WORK/model" --index "$WORK/index" --data "$WORK/data" --device cpu --workers 1 --requests "$REQUESTS" --port 8767

# --- report ----------------------------------------------------------------------------------------
step report 30 "$PY" bench/gpu_check.py report
echo "metrics.json of the CLI run:"
cat "$WORK/run/metrics.json" 2>/dev/null
echo
echo "steps:"
cat "$OUT/steps.txt"
echo "gpu_check.sh done in $(($(date +%s) - T0))s"
