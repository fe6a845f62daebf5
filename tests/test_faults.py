"""Fault injection: the real `sdpo train` CLI, killed with SIGKILL at exact points in every phase
(scoring and caching, inside an optimizer step, after a step, while a checkpoint is written,
after it is renamed, while old ones are pruned, between sDPO steps, before the reports) and
resumed with --resume, again and again, ends with the same bits as an uninterrupted run; and
after every kill each checkpoint folder on disk is complete and holds the weights the
uninterrupted run had at that step.

Kill points are ``sdpo.engine.resume.fault_point`` names reached through the documented test
hook ``SDPO_FAULT_AT="<point>:<count>[:<SIGNAL>]"``. Every killed process must have died by the
signal (return code -9), so a point that is never reached fails the test. The two chains of
processes and the uninterrupted baseline run side by side (one CPU thread each). Each run is a
process of its own, forked from a server that imported torch once (``tests/cli_processes.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdpo.engine.resume import MANIFEST_NAME, list_checkpoints, verify_checkpoint
from tests.cli_processes import run_sdpo
from tests.conftest import write_two_source_run

KILLED = -9
STOPPED = 75

# (SDPO_FAULT_AT, expected return code) per process; the last process of a chain runs clean.
CHAIN_A = [
    ("score_done:1", KILLED),  # initial scoring done, cache not yet written
    ("micro_batch:3", KILLED),  # between two micro-batches of one optimizer step
    ("ckpt_write:1", KILLED),  # checkpoint files written, manifest not yet
    ("step_saved:1", KILLED),  # step-1/ saved, its end-of-step checkpoint not yet
    ("cache_saved:1", KILLED),  # step 2's reference cache just written
    ("micro_batch:4", KILLED),  # inside sDPO step 2
    ("reports:1", KILLED),  # all training done, reports not yet written
    (None, 0),
]
CHAIN_B = [  # keeps only 2 checkpoints, so pruning is exercised too
    ("cache_saved:1", KILLED),  # the initial cache written, no training yet
    ("train_step:3:TERM", STOPPED),  # graceful stop: finish the step, checkpoint, exit 75
    ("ckpt_done:1", KILLED),  # checkpoint renamed into place, old ones not yet pruned
    ("prune:1", KILLED),  # an old checkpoint half deleted
    ("step_start:1", KILLED),  # between sDPO steps (step 1 finished before it)
    ("score_done:1", KILLED),  # step 2's reference scored, not cached
    ("train_step:2", KILLED),  # after an optimizer step, before its checkpoint
    (None, 0),
]


def _setup(root: Path) -> Path:
    return write_two_source_run(
        root,
        train="max_tokens_per_batch = 128\nepochs = 2\nsave_every = 2",
        sdpo="report_scoring = false",
    )


def _train(
    cfg: Path, out: Path, *, fault: str | None, extra: list[str]
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("SDPO_FAULT_AT", None)
    if fault is not None:
        env["SDPO_FAULT_AT"] = fault
    args = ["--config", str(cfg), "--set", f"output_dir={out}", "--no-progress", *extra]
    return run_sdpo(["train", *args], env=env, timeout=300)


def _model_sha(ckpt: Path) -> str | None:
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    entry = manifest["files"].get("model/model.safetensors")
    return entry["sha256"] if entry else None


def _checkpoint_states(out: Path) -> dict[str, str | None]:
    """{checkpoint name: sha256 of its weights} after checking every folder is complete."""
    states = {}
    for _, ckpt in list_checkpoints(out / "checkpoints"):
        reason = verify_checkpoint(ckpt)
        assert reason is None, f"{ckpt.name} is on disk but incomplete: {reason}"
        states[ckpt.name] = _model_sha(ckpt)
    return states


def _run_chain(cfg: Path, out: Path, chain: list, extra: list[str]) -> list[dict[str, str | None]]:
    seen = []
    for i, (fault, expected) in enumerate(chain):
        proc = _train(cfg, out, fault=fault, extra=extra + (["--resume"] if i else []))
        assert proc.returncode == expected, (fault, proc.returncode, proc.stderr[-3000:])
        if expected == STOPPED:
            assert "--resume" in proc.stderr and "stopped on request" in proc.stderr
        seen.append(_checkpoint_states(out))
    return seen


def _metrics_without_timing(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_runs_killed_anywhere_and_resumed_end_bitwise_equal(tmp_path):
    cfg = _setup(tmp_path)
    base_out, out_a, out_b = tmp_path / "base", tmp_path / "a", tmp_path / "b"
    with ThreadPoolExecutor(max_workers=3) as pool:
        # the baseline checkpoints every step, so every checkpoint of a chain has its twin
        base = pool.submit(_train, cfg, base_out, fault=None, extra=["--set", "train.save_every=1"])
        chain_a = pool.submit(_run_chain, cfg, out_a, CHAIN_A, [])
        chain_b = pool.submit(
            _run_chain, cfg, out_b, CHAIN_B, ["--set", "train.keep_checkpoints=2"]
        )
        base_proc = base.result()
        seen = chain_a.result() + chain_b.result()
    assert base_proc.returncode == 0, base_proc.stderr[-3000:]
    truth = _checkpoint_states(base_out)
    assert len(truth) == 12  # 2 sDPO steps x 2 epochs x 3 optimizer steps

    # every checkpoint that ever sat complete on disk holds the uninterrupted run's weights
    for states in seen:
        for name, sha in states.items():
            assert name in truth and sha == truth[name], name

    # the final weights are bitwise those of the uninterrupted run
    for out in (out_a, out_b):
        for t in (1, 2):
            want = load_file(base_out / f"step-{t}" / "model.safetensors")
            got = load_file(out / f"step-{t}" / "model.safetensors")
            assert want.keys() == got.keys()
            for name in want:
                assert torch.equal(want[name], got[name]), (out.name, t, name)
        # no step logged twice or lost
        assert _metrics_without_timing(out) == _metrics_without_timing(base_out)
        assert (out / "sdpo_report.json").is_file()
    # keep_checkpoints = 2 left the newest two, nothing half deleted
    assert sorted(os.listdir(out_b / "checkpoints")) == ["ckpt-00000010", "ckpt-00000012"]
