#!/usr/bin/env bash
# One-call GPU check: the GPU-marked tests, then the benchmarks. "$OUT" (or ./gpu_out) receives
# two files: summary.txt, the headline lines, and gpu_check.tar.gz, every log and JSON (about
# twenty files: nvidia-smi's, each section's output and each benchmark's JSON), packed anew after
# each section. A job runner that collects "$OUT" may bring back only a few files (8 at the
# least we allow for), so the files themselves are written to a folder of their own and only
# packed there.
#
# The whole script keeps to one deadline, SDPO_GPU_CHECK_BUDGET seconds (default 560, so that a
# 600 s call limit still returns its files). Each section has its own timeout, cut to what is
# left of the budget; a section that would get less than 45 s (too little to compile a model)
# is skipped and says so. The sections run in order of importance: the kernel table, the
# end-to-end step against TRL (with the scoring pass and the sDPO run ratio), the GPU-marked
# tests, then two micro-batches per step (memory without recomputation), shared prompts, the
# compiler's activation memory budget, fp32 master weights, LoRA and transformers' own model of
# the same weights (model.implementation). The first three ask for at most 490 s together, so
# no earlier section can squeeze a later one of them. (The kernels' register and shared-memory
# report needs no GPU: benchmarks/kernel_resources.py gives it on a CPU with the device's
# Triton, see benchmarks/RESULTS.md.) The script keeps going when a section fails or times out, and every
# benchmark writes its JSON as it goes, so a section cut short still leaves the rows it measured
# (packed with its log when the section ends).
# An earlier, smaller version took about 250 s on an H100 with a cold start (2026-11-26).
set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
# python3 unless PYTHON names another (a bare machine need not have a `python` at all, or may
# have it name another interpreter); the wheels below are installed for it
PY="${PYTHON:-python3}"
# Optional packages for the comparisons (trl, datasets, dill, multiprocess, liger-kernel) as
# wheels in .whl/ (`make gpu-wheels`): installed offline into /tmp/site, which then shadows the
# system copies.
if [ -d .whl ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site
    else
        echo "warning: installing .whl/ for $PY failed (wheels for another Python? see make gpu-wheels GPU_PYTHON=...); the TRL and Liger comparisons will not run" >&2
    fi
fi
OUT_DIR="${OUT:-./gpu_out}"
mkdir -p "$OUT_DIR"
# the logs and JSON, packed into $OUT_DIR/gpu_check.tar.gz by pack (a temporary file renamed
# into place, so the archive there is always whole)
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sdpo-gpu-check.XXXXXX")"
trap 'rm -rf "$RUN_DIR"' EXIT
pack() {
    tar -czf "$OUT_DIR/.gpu_check.tar.gz.part" -C "$RUN_DIR" . \
        && mv -f "$OUT_DIR/.gpu_check.tar.gz.part" "$OUT_DIR/gpu_check.tar.gz"
}
BUDGET="${SDPO_GPU_CHECK_BUDGET:-560}"
SUMMARY="$OUT_DIR/summary.txt"
status=0

echo "== environment" | tee "$SUMMARY"
nvidia-smi > "$RUN_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$SUMMARY"

# sdpo.kernels lives in kernels/ and is mapped into the sdpo namespace by package-dir,
# which needs an install; editable, offline, no dependency resolution.
if ! "$PY" -c "import sdpo.kernels" > /dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-build-isolation -e . > "$RUN_DIR/pip_install.log" 2>&1
    if ! "$PY" -c "import sdpo.kernels" > /dev/null 2>&1; then
        echo "FATAL: 'import sdpo.kernels' fails even after 'pip install --no-deps --no-build-isolation -e .'; see pip_install.log in gpu_check.tar.gz" | tee -a "$SUMMARY"
        pack
        exit 2
    fi
fi

# section NAME LOG TIMEOUT COMMAND...: runs COMMAND with stdout+stderr in $RUN_DIR/LOG under
# min(TIMEOUT, what is left of the budget), then packs; sets $rc (124 = timed out, 125 = skipped).
section() {
    local name="$1" log="$2" want="$3"
    shift 3
    local left=$((BUDGET - SECONDS))
    local limit=$((want < left ? want : left))
    echo "== $name (limit ${limit} s, ${SECONDS} s elapsed)" | tee -a "$SUMMARY"
    if [ "$limit" -lt 45 ]; then
        echo "skipped: the budget of ${BUDGET} s is spent" | tee -a "$SUMMARY"
        rc=125
        return
    fi
    # SIGTERM at the limit, SIGKILL 10 s later if the process is still there
    timeout -k 10 "$limit" "$@" > "$RUN_DIR/$log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "timed out after ${limit} s" | tee -a "$SUMMARY"
    [ "$rc" -ne 0 ] && status=1
    pack
}

# the tables of a step run, without the compiler's warnings
step_tail() { [ -f "$RUN_DIR/$1" ] && sed -n '/^llama-1b-32k/,$p' "$RUN_DIR/$1" | grep -v '^W1' | tee -a "$SUMMARY"; }

# N=16,384, H=4,096, V in {32,000, 128,256}: every head variant (Liger when importable), the
# capped head, other chunk sizes (the chunk rule's measurement) and the fused reference pass
# beside the chunked one.
section "benchmarks/throughput.py kernels" kernels.txt 150 \
    "$PY" benchmarks/throughput.py kernels --warmup 1 --iters 3 --chunk-tokens 2048 8192 16384 \
    --json "$RUN_DIR/kernels.json"
grep -v '^  V=' "$RUN_DIR/kernels.txt" | tail -n 60 | tee -a "$SUMMARY"
echo "kernels benchmark exit code: $rc" | tee -a "$SUMMARY"

# (On a node with several GPUs, not this script's one-GPU machine, the same step runs data
# parallel or sharded: torchrun --nproc-per-node N benchmarks/throughput.py step --preset
# llama-1b-32k --compile [--fsdp] --json step_multi.json.)

# End to end: the anchor workload (llama-1b-32k, 4 pairs/step, prompt 128, completions
# 448-896), 4 warm-up + 12 timed steps on both sides, TRL in the same process afterwards
# (its timed batches twice: first pass and repeat pass), and 2 steps of each under
# torch.profiler (device busy share of a step, top kernels and host ops).
section "step: bf16, compiled, + sDPO run, + TRL" step_bf16.txt 220 \
    "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16 --compile \
    --warmup-steps 4 --steps 12 --sdpo-run --compare-trl --trl-profile-steps 2 \
    --torch-profile-steps 2 --json "$RUN_DIR/step_bf16.json"
step_tail step_bf16.txt
grep -E "Traceback|Error:|'error'|trl comparison" "$RUN_DIR/step_bf16.txt" | tail -n 5 | tee -a "$SUMMARY"
echo "step bf16 benchmark exit code: $rc" | tee -a "$SUMMARY"

# Correctness on the device: the Triton kernels and attention backends against float64, the
# compiled layers, the runner on CUDA. -v names each test as it starts and gives its outcome as
# it ends (a test that hangs into the timeout has no outcome); --durations sizes this section. A
# test module that fails to import (a package the device lacks) is an error in the summary,
# not the end of every other module's GPU tests.
section "pytest -m gpu" pytest_gpu.log 120 \
    "$PY" -m pytest -m gpu -v --durations=10 --continue-on-collection-errors -p no:cacheprovider tests
grep -E "::|^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped|deselected)" "$RUN_DIR/pytest_gpu.log" \
    | tail -n 50 | tee -a "$SUMMARY"
echo "pytest -m gpu exit code: $rc" | tee -a "$SUMMARY"

# Memory without recomputation: the same 4 pairs per optimizer step in 2 micro-batches of 2
# pairs (train.max_tokens_per_batch = 4,096, the longest two pairs of this workload), so the
# activations held at once are those of at most 4,096 tokens instead of up to 8,192. Weights,
# gradients and AdamW states are 8.8 of the 16.14 GB measured with one micro-batch on an H100
# (2026-11-26); the memory target is <= 13.7 GB (0.6 x TRL's 22.8 GB).
section "step: bf16, compiled, 2 micro-batches per step" step_micro.txt 70 \
    "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16 --compile \
    --max-tokens-per-batch 4096 --warmup-steps 4 --steps 8 --json "$RUN_DIR/step_micro.json"
step_tail step_micro.txt
echo "step 2-micro-batch benchmark exit code: $rc" | tee -a "$SUMMARY"

# Each pair's prompt computed once (train.share_prompt): the same workload and token count.
section "step: bf16, compiled, shared prompts" step_shared.txt 70 \
    "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16 --compile \
    --share-prompt --warmup-steps 4 --steps 8 --json "$RUN_DIR/step_shared.json"
step_tail step_shared.txt
echo "step shared-prompt benchmark exit code: $rc" | tee -a "$SUMMARY"

# Memory: the compiler keeps half of each layer's intermediate values and recomputes the rest
# (model.activation_memory_budget = 0.5); every 2nd layer recomputed measured 57,646 tokens/s
# at 12.03 GB on an H100 (2026-11-26), the comparison for this one.
section "step: bf16, compiled, activation memory budget 0.5" step_budget.txt 70 \
    "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16 --compile \
    --activation-memory-budget 0.5 --warmup-steps 4 --steps 8 \
    --json "$RUN_DIR/step_budget.json"
step_tail step_budget.txt
echo "step activation-memory-budget benchmark exit code: $rc" | tee -a "$SUMMARY"

# fp32 master weights, compiled. Its first compiled attempt did not finish within 70 s on an
# H100: q/k were promoted to fp32 and attention fell back to a per-sequence loop (fixed since).
# SDPO_GPU_CHECK_MIXED=0 skips it.
if [ "${SDPO_GPU_CHECK_MIXED:-1}" != "0" ]; then
    section "step: bf16-mixed (fp32 master weights), compiled" step_bf16_mixed.txt 80 \
        "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16-mixed \
        --compile --warmup-steps 3 --steps 6 --profile-steps 2 \
        --json "$RUN_DIR/step_bf16_mixed.json"
    step_tail step_bf16_mixed.txt
    echo "step bf16-mixed benchmark exit code: $rc" | tee -a "$SUMMARY"
fi

# LoRA (rank 16 on every projection), the same workload: last, so it runs only when the budget
# has room left.
section "step: bf16, compiled, LoRA rank 16" step_lora.txt 60 \
    "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16 --compile \
    --lora-rank 16 --warmup-steps 4 --steps 8 --json "$RUN_DIR/step_lora.json"
step_tail step_lora.txt
echo "step LoRA benchmark exit code: $rc" | tee -a "$SUMMARY"

section "step: bf16, transformers' model of the same weights (model.implementation)" \
    step_transformers.txt 60 \
    "$PY" benchmarks/throughput.py step --preset llama-1b-32k --precision bf16 --no-compile \
    --implementation transformers --warmup-steps 3 --steps 6 \
    --json "$RUN_DIR/step_transformers.json"
step_tail step_transformers.txt
echo "step transformers benchmark exit code: $rc" | tee -a "$SUMMARY"

echo "== done in ${SECONDS} s" | tee -a "$SUMMARY"
pack
exit "$status"
