"""The Triton kernels compile for a real GPU (sm_90: H100/H200) ahead of time, without one.

The other kernel tests run under the Triton interpreter, which never compiles: a kernel that
does not lower for a GPU passes them all. This test runs ``benchmarks/kernel_resources.py
--smoke`` for sm_90 in one subprocess with ``TRITON_INTERPRET=0`` (this session's Triton is
fixed in interpreter mode): both row kernels (bf16 logits, V = 50,257, a vocabulary tail) and
the fused head for one config of every distinct tile shape in its autotune list, in bf16 and
fp32 (tf32), plus fp32 "ieee" for one tile. Every variant must produce a cubin, with its
register count read from ptxas. It skips only where this Triton has no NVIDIA backend or no
ptxas. Shared memory above the chip's limit is a report finding, not a failure here (the
autotuner drops such configs at run time), but each dtype must keep at least one config that
fits, or the autotuned launch would have nothing to run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.kernels.fused_head import CONFIGS, FP32_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sm90_smoke(tmp_path_factory) -> list[dict]:
    """The rows of ``kernel_resources.py --smoke --targets sm_90`` (compiled once per module)."""
    out = tmp_path_factory.mktemp("aot") / "resources.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "kernel_resources.py"),
        "--smoke",
        "--targets",
        "sm_90",
        "--jobs",
        "2",
        "--json",
        str(out),
    ]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if not out.exists():
        pytest.fail(f"kernel_resources.py wrote no JSON (exit {done.returncode}):\n{done.stderr}")
    payload = json.loads(out.read_text())
    if payload["unavailable"]:
        pytest.skip(f"no ahead-of-time NVIDIA compile here: {payload['unavailable']}")
    return payload["rows"]


def test_every_smoke_variant_compiles_for_sm90_to_a_cubin_with_ptxas_numbers(sm90_smoke):
    assert sm90_smoke, "the smoke run compiled nothing"
    for row in sm90_smoke:
        where = f"{row['kernel']} [{row['variant']}] on {row['target']}"
        assert row["error"] is None, f"{where} does not compile: {row['error']}"
        assert row["cubin_bytes"] > 0, f"{where} produced no cubin"
        assert isinstance(row["registers"], int) and row["registers"] > 0, (
            f"{where}: no register count in Triton's ptxas log"
        )
        assert row["spill_stores"] is not None and row["shared"] is not None, where


def test_smoke_covers_both_row_kernels_and_every_fused_head_tile_shape(sm90_smoke):
    rows = {(r["kernel"], r["variant"]) for r in sm90_smoke}
    for kernel in ("logprobs_fwd_kernel", "logprobs_bwd_kernel"):
        assert any(k == kernel and v.startswith("bf16 V=50,257") for k, v in rows), kernel
    assert ("logprobs_fwd_kernel", "bf16 V=50,257 BLOCK_V=4096 w8 WITH_LSQ") in rows  # WPO
    # the trainer's forward, with its token metrics (and under WPO)
    assert ("logprobs_fwd_kernel", "bf16 V=50,257 BLOCK_V=4096 w8 WITH_STATS") in rows
    assert ("logprobs_fwd_kernel", "bf16 V=50,257 BLOCK_V=4096 w8 WITH_LSQ WITH_STATS") in rows

    def shapes(configs) -> set[str]:
        return {
            "{}x{}x{}".format(*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
            for c in configs
        }

    for dtype, configs in (("bf16 ", CONFIGS), ("fp32/tf32 ", FP32_CONFIGS)):
        covered = {
            v.split()[1] for k, v in rows if k == "_fused_head_kernel" and v.startswith(dtype)
        }
        assert covered == shapes(configs), (
            f"{dtype.strip()}: tile shapes {sorted(shapes(configs) - covered)} not compiled"
        )
    assert any(v.startswith("fp32/ieee ") for _, v in rows), "no fp32 'ieee' variant compiled"


def test_each_fused_head_dtype_keeps_a_config_that_fits_sm90_shared_memory(sm90_smoke):
    by_dtype: dict[str, list[dict]] = {}
    for row in sm90_smoke:
        if row["kernel"] == "_fused_head_kernel":
            by_dtype.setdefault(row["variant"].split()[0], []).append(row)
    for dtype, rows in by_dtype.items():
        fitting = [r["variant"] for r in rows if r["shared"] <= r["shared_limit"]]
        assert fitting, (
            f"fused head {dtype}: no compiled config fits sm_90's shared memory "
            f"({[(r['variant'], r['shared']) for r in rows]})"
        )
