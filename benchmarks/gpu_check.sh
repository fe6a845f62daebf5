#!/usr/bin/env bash
# One-call GPU check: the GPU-marked tests, then the benchmarks, logs and JSON into "$OUT"
# (or ./gpu_out). Sized for about 8 minutes on an H100: tests <= 3 min, kernels <= 5 min.
# Keeps going when a step fails, so one broken test still leaves benchmark numbers behind.
set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
status=0

echo "== environment" | tee "$OUT_DIR/summary.txt"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT_DIR/summary.txt"

# sdpo.kernels lives in kernels/ and is mapped into the sdpo namespace by package-dir,
# which needs an install; editable, offline, no dependency resolution.
if ! "$PY" -c "import sdpo.kernels" > /dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/pip_install.log" 2>&1
    if ! "$PY" -c "import sdpo.kernels" > /dev/null 2>&1; then
        echo "FATAL: 'import sdpo.kernels' fails even after 'pip install --no-deps --no-build-isolation -e .'; see $OUT_DIR/pip_install.log" | tee -a "$OUT_DIR/summary.txt"
        exit 2
    fi
fi

echo "== pytest -m gpu" | tee -a "$OUT_DIR/summary.txt"
timeout 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT_DIR/pytest_gpu.log" 2>&1
rc=$?
tail -n 15 "$OUT_DIR/pytest_gpu.log" | tee -a "$OUT_DIR/summary.txt"
echo "pytest -m gpu exit code: $rc" | tee -a "$OUT_DIR/summary.txt"
[ "$rc" -ne 0 ] && status=1

echo "== benchmarks/throughput.py kernels" | tee -a "$OUT_DIR/summary.txt"
timeout 300 "$PY" benchmarks/throughput.py kernels --json "$OUT_DIR/kernels.json" > "$OUT_DIR/kernels.txt" 2>&1
rc=$?
grep -v '^  V=' "$OUT_DIR/kernels.txt" | tail -n 40 | tee -a "$OUT_DIR/summary.txt"
echo "kernels benchmark exit code: $rc" | tee -a "$OUT_DIR/summary.txt"
[ "$rc" -ne 0 ] && status=1

# (the end-to-end `step` section of throughput.py goes here once it exists)

exit "$status"
