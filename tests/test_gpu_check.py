"""``benchmarks/gpu_check.sh`` is the one call a GPU gets: a renamed flag or a refused argument
combination in it would waste that call. Here the script runs for real on the CPU (bash, its
sections, budget and summary), with a stand-in for ``python`` that records each command instead
of running it; every ``benchmarks/throughput.py`` command is then parsed by the benchmark's own
parser and settled by its own argument checks (``settle_step_args``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.test_speed_paths import load_throughput

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

# A stand-in for the interpreter the script calls as "$PYTHON": it appends its arguments to
# $SHIM_LOG as one JSON line, writes "{{}}" where a --json flag points (as a benchmark writes its
# results there) and succeeds (no torch import, so the whole script takes a second).
SHIM = """#!{python}
import json, os, sys
with open(os.environ["SHIM_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        f.write("{{}}")
"""

# The fewest files from $OUT a job runner that collects it may bring back (gpu_check.sh's header).
OUT_FILES = 8


def run_script(script_text: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``script_text`` as benchmarks/gpu_check.sh of a scratch repository (no ``.whl``
    folder, so nothing is installed) with the recording stand-in as its python."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    script = repo / "benchmarks" / "gpu_check.sh"
    script.write_text(script_text)
    shim = tmp_path / "python"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "SHIM_LOG": str(log), "OUT": str(out)}
    env.pop("SDPO_GPU_CHECK_BUDGET", None)
    env.pop("SDPO_GPU_CHECK_MIXED", None)
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def settle(throughput, argv: list[str]) -> argparse.Namespace:
    """What ``throughput.py ARGV`` would run with on a one-GPU machine, or SystemExit."""
    args = throughput.build_parser().parse_args(argv)
    if args.section == "step":
        throughput.settle_step_args(args, world=1)
    return args


def benchmark_commands(text: str) -> int:
    """How many ``"$PY" benchmarks/throughput.py`` commands the script runs (comments excluded)."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return len(re.findall(r'"\$PY"\s+benchmarks/throughput\.py\s', code))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_gpu_check_command_is_one_the_benchmark_accepts(tmp_path):
    text = SCRIPT.read_text()
    proc, calls = run_script(text, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "== done" in summary
    assert "skipped" not in summary and "timed out" not in summary, summary

    bench = [c[1:] for c in calls if c[:1] == ["benchmarks/throughput.py"]]
    assert len(bench) == benchmark_commands(text) >= 5, calls
    throughput = load_throughput()
    sections = []
    for argv in bench:
        try:
            args = settle(throughput, argv)
        except SystemExit as exc:
            pytest.fail(f"gpu_check.sh runs `throughput.py {' '.join(argv)}`, refused: {exc}")
        sections.append(args.section)
    assert sections[0] == "kernels" and "step" in sections
    # The end-to-end row of issue 6: the anchor workload with TRL in the same process.
    anchor = [a for a in bench if "--compare-trl" in a]
    assert len(anchor) == 1
    args = settle(throughput, anchor[0])
    assert (args.preset, args.precision, args.pairs_per_step) == ("llama-1b-32k", "bf16", 4)
    assert (args.prompt_len, args.completion_min, args.completion_max) == (128, 448, 896)

    # Most important first: the kernel table, the anchor step against TRL (with the scoring
    # pass and the sDPO run), then the GPU-marked tests, under a marker pyproject.toml declares.
    pytest_calls = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(pytest_calls) == 1
    runs = [c for c in calls if c[:1] == ["benchmarks/throughput.py"] or c[:2] == ["-m", "pytest"]]
    assert runs[:3] == [
        ["benchmarks/throughput.py", *bench[0]],
        ["benchmarks/throughput.py", *anchor[0]],
        pytest_calls[0],
    ], runs
    assert "--sdpo-run" in anchor[0] and "--json" in anchor[0]
    # a test module that cannot be imported on the device (a package it lacks) must not stop
    # the GPU tests of every other module (pytest's default: no test runs at all)
    assert "--continue-on-collection-errors" in pytest_calls[0]
    marker = pytest_calls[0][pytest_calls[0].index("-m", 2) + 1]
    assert re.search(rf'"{marker}:', (ROOT / "pyproject.toml").read_text())
    # ... and those three can never be cut short by the budget: their limits fit in it with
    # the remainder to spare for the set-up before them
    limits = [int(m) for m in re.findall(r"^== .* \(limit (\d+) s,", summary, re.M)]
    assert sum(limits[:3]) <= 560 - 30, limits


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_log_and_json_of_the_gpu_check_comes_back_in_few_files(tmp_path):
    """The check writes about twenty files (each section's output, each benchmark's JSON,
    nvidia-smi's), more than the call that runs it returns: $OUT holds the summary and one
    archive of them all, packed after each section, so every one comes back."""
    text = SCRIPT.read_text()
    proc, calls = run_script(text, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    returned = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert returned == ["gpu_check.tar.gz", "summary.txt"], returned
    assert len(returned) <= OUT_FILES
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        packed = {Path(m.name).name for m in archive.getmembers() if m.isfile()}
    jsons = [c[c.index("--json") + 1] for c in calls if "--json" in c]
    logs = re.findall(r'^\s*section "[^"]*"\s*(?:\\\n\s*)?(\S+)', text, re.M)
    assert len(jsons) == benchmark_commands(text) and len(logs) == len(jsons) + 1, (jsons, logs)
    wanted = {Path(j).name for j in jsons} | set(logs) | {"nvidia-smi.txt"}
    assert wanted <= packed, sorted(wanted - packed)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_misspelt_or_refused_gpu_check_command_is_caught(tmp_path):
    throughput = load_throughput()
    text = SCRIPT.read_text()
    for broken, why in (
        (text.replace("--sdpo-run", "--sdpo-runs", 1), "unknown flag"),
        (text.replace("--lora-rank 16", "--lora-rank 16 --compare-trl", 1), "refused pair"),
    ):
        assert broken != text, why
        case = tmp_path / why.replace(" ", "_")
        proc, calls = run_script(broken, case)
        assert proc.returncode == 0  # the script itself cannot know; the parse must
        failures = []
        for call in calls:
            if call[:1] == ["benchmarks/throughput.py"]:
                try:
                    settle(throughput, call[1:])
                except SystemExit as exc:
                    failures.append(exc)
        assert len(failures) == 1, why


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_PYTHON_every_command_runs_on_python3(tmp_path):
    """The device's image names its torch interpreter ``python3`` (the one the wheels in .whl
    are installed for); a ``python`` there may be missing or another interpreter. Here a
    ``python`` that fails stands first on PATH beside the recording ``python3``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(SHIM.format(python=sys.executable))
    (bin_dir / "python").write_text('#!/bin/sh\necho "python $*" >> "$SHIM_LOG.wrong"\nexit 1\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "benchmarks" / "gpu_check.sh").write_text(SCRIPT.read_text())
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_LOG": str(log)}
    env |= {"OUT": str(tmp_path / "out")}
    for name in ("PYTHON", "SDPO_GPU_CHECK_BUDGET", "SDPO_GPU_CHECK_MIXED"):
        env.pop(name, None)
    proc = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not Path(f"{log}.wrong").exists(), Path(f"{log}.wrong").read_text()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(c[:1] == ["benchmarks/throughput.py"] for c in calls) >= 5, calls


def tiny_reference_problem():
    """The benchmark module, a 4-sequence head problem of 11 tokens' vocabulary on the CPU and a
    one-iteration timer: what the reference-pass tests measure."""
    throughput = load_throughput()
    cpu = torch.device("cpu")
    p = throughput.make_head_problem(
        num_seqs=4, seq_len=6, hidden=8, vocab=11, dtype=torch.float32, device=cpu
    )
    return throughput, p, throughput.Timer(device=cpu, warmup=0, iters=1)


def test_a_failing_reference_pass_is_a_row_not_the_end_of_the_kernel_table():
    """A reference pass that raises (a compile error or API drift on the device, here labels
    outside the vocabulary) becomes an error row, as a failing head variant does: the kernels
    section goes on to its next pass and vocabulary instead of losing the table."""
    throughput, p, timer = tiny_reference_problem()
    good = throughput.measure_reference_pass(p, impl="torch", timer=timer)
    assert [r["variant"] for r in good] == [
        "reference pass: sdpo sequence_logprobs (torch)",
        "reference pass: torch eager",
    ]
    assert all("error" not in r and r["total_ms"] > 0 for r in good)
    p.labels[3] = 50
    bad = throughput.measure_reference_pass(p, impl="torch", timer=timer)
    assert [r["variant"] for r in bad] == [r["variant"] for r in good]
    assert bad[0]["error"].startswith("ValueError: labels[3] = 50 is outside the vocabulary")
    assert "total_ms" not in bad[0] and "error" in bad[1]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="Triton on CPU tensors needs its interpreter (no GPU)"
)
def test_the_reference_passes_of_the_gpu_kernel_table_run_with_the_triton_impl():
    """On the GPU the kernel table resolves impl to "triton", which adds the fused reference
    pass (``fused_sequence_logprobs``) beside the chunked one: the same calls here, the
    kernels interpreted, each pass a row without an error."""
    throughput, p, timer = tiny_reference_problem()
    rows = throughput.measure_reference_pass(p, impl="triton", timer=timer)
    assert [r["variant"] for r in rows] == [
        "reference pass: sdpo sequence_logprobs (triton)",
        "reference pass: sdpo fused_head (triton)",
        "reference pass: torch eager",
    ]
    assert all("error" not in r and r["total_ms"] > 0 for r in rows), rows


def test_the_kernel_table_is_on_disk_before_each_row_is_printed(tmp_path):
    """A kernels run cut short (the check's timeout) keeps every row it measured: the JSON is
    rewritten before each variant's progress line, so when the first line appears its row is
    already in the file."""
    out = tmp_path / "kernels.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "kernels", "--smoke"]
    command += ["--impl", "torch", "--vocab", "97", "--json", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = next(line for line in proc.stdout if line.startswith("  V=97 "))
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    name = first[len("  V=97 ") :].split(": {")[0]
    payload = json.loads(out.read_text())
    assert not payload["complete"] and payload["section"] == "kernels"
    rows = {r["variant"]: r for r in payload["results"]}
    assert name == "torch eager" and rows[name]["total_ms"] > 0 and rows[name]["vocab"] == 97
    assert rows["floor (6NHV at matmul rate)"]["x_floor"] == 1.0


def test_the_kernels_smoke_run_writes_the_whole_table(tmp_path):
    """The kernels command of gpu_check.sh (chunk sweep included) in its CPU smoke mode: every
    row of both vocabularies in the final JSON, each with its multiple of the floor."""
    throughput = load_throughput()
    out = tmp_path / "kernels.json"
    argv = ["kernels", "--smoke", "--impl", "torch", "--warmup", "0", "--iters", "1"]
    throughput.main([*argv, "--chunk-tokens", "16", "64", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert payload["complete"] and {r["vocab"] for r in payload["results"]} == {97, 1031}
    for vocab in (97, 1031):
        rows = {r["variant"]: r for r in payload["results"] if r["vocab"] == vocab}
        for name in (
            "sdpo linear_pair_loss (torch, dW fp32, chunk_tokens=16)",
            "sdpo linear_pair_loss (torch, dW in weight dtype)",
            "sdpo linear_pair_loss (torch, dW fp32, token metrics)",
            "reference pass: sdpo sequence_logprobs (torch)",
        ):
            assert "error" not in rows[name] and rows[name]["x_floor"] > 0, rows[name]
