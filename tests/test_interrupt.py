"""Ctrl-C that ends a command at once (before training starts, or a second one during a graceful
stop): the real CLI gets a real SIGINT at an exact point (the ``SDPO_FAULT_AT`` hook,
``tests/cli_processes.py``) and must exit 130 with one line, no traceback, no temporary file
left, and an earlier run's outputs untouched. A first Ctrl-C while the model loads or a
reference pass scores is a graceful stop (exit 75) that says so and stops before the next
optimizer step; one during a train.eval_every pass says the pass finishes, then the stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.runner import _interrupt_deferred
from tests.cli_processes import run_sdpo
from tests.conftest import write_two_source_run

INTERRUPTED = 130
STOPPED = 75


def _env(fault: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SDPO_FAULT_AT": fault}


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with a file's bytes (None for a folder)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("sdpo: interrupted")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_ctrl_c_while_reading_data_leaves_an_earlier_run_untouched(tmp_path):
    cfg = write_two_source_run(tmp_path)
    out = tmp_path / "out"
    (out / "step-1").mkdir(parents=True)  # an earlier run's outputs, to be replaced
    (out / "step-1" / "model.safetensors").write_bytes(b"earlier weights")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(out)
    args = ["train", "--config", str(cfg), "--set", f"output_dir={out}", "--no-progress"]
    proc = run_sdpo([*args, "--overwrite"], env=_env("data_read:1:INT"), timeout=120)
    assert proc.returncode == INTERRUPTED, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line == f"sdpo: interrupted (Ctrl-C) before the run wrote anything in {out}"
    assert _tree(out) == before


def test_second_ctrl_c_during_the_graceful_stop_aborts_without_leftovers(tmp_path):
    """The first SIGINT asks for a graceful stop; the second strikes inside the stop's
    checkpoint write: the temporary checkpoint folder is removed, the process exits 130 naming
    the resume command."""
    cfg = write_two_source_run(tmp_path, train="save_every = 0", sdpo="report_scoring = false")
    out = tmp_path / "out"
    args = ["train", "--config", str(cfg), "--set", f"output_dir={out}", "--no-progress"]
    proc = run_sdpo(args, env=_env("train_step:1:INT,ckpt_write:1:INT"), timeout=120)
    assert proc.returncode == INTERRUPTED, proc.stderr[-3000:]
    assert "SIGINT received: finishing the current optimizer step" in proc.stdout + proc.stderr
    line = _one_line(proc.stderr)
    assert "no training checkpoint yet" in line and line.endswith("--no-progress --resume")
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert (out / "config.toml").is_file()  # what --resume continues from


BEFORE_TRAINING = "before any optimizer step; no training checkpoint yet"


@pytest.mark.parametrize(
    ("fault", "doing", "caches", "stopped"),
    [
        # the model loads; the run stops before the initial model's pass
        ("model_load:1:INT", "loading the model", [], BEFORE_TRAINING),
        # the initial model's pass (step 1's reference values)
        ("score_batch:1:INT", "scoring 22 pairs", ["initial"], BEFORE_TRAINING),
        # step 2's reference pass (after step 1's end and its scoring), before step 2 trains
        (
            "score_batch:3:INT",
            "scoring 10 pairs",
            ["initial", "step-2"],
            "after optimizer step 3; checkpoint {ckpt} is saved",
        ),
    ],
    ids=["model_load", "initial_reference_pass", "step_2_reference_pass"],
)
def test_ctrl_c_outside_training_finishes_what_is_under_way_and_stops_before_the_next_step(
    tmp_path, fault, doing, caches, stopped
):
    """A first Ctrl-C while the model loads or a reference pass scores: the log names that and
    says the run stops before the next optimizer step (not that an optimizer step finishes);
    the pass's values are cached for --resume, and no optimizer step follows (exit 75)."""
    cfg = write_two_source_run(tmp_path)
    out = tmp_path / "out"
    args = ["train", "--config", str(cfg), "--set", f"output_dir={out}", "--no-progress"]
    proc = run_sdpo(args, env=_env(fault), timeout=120)
    assert proc.returncode == STOPPED, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "finishing the current optimizer step" not in said
    assert f"[sdpo] SIGINT received while {doing}" in said
    assert "finishing that, then stopping before the next optimizer step" in said
    ckpt = out / "checkpoints" / "ckpt-00000003"
    line = f"sdpo: stopped on request {stopped.format(ckpt=ckpt)}. Continue with: "
    assert line in proc.stderr and proc.stderr.rstrip().endswith("--no-progress --resume")
    assert sorted(p.stem for p in (out / "cache").glob("*.safetensors")) == sorted(
        ["tokens-train", *caches]
    )
    records = [r for r in map(json.loads, _lines(out / "metrics.jsonl")) if "loss" in r]
    assert len(records) == (3 if "step-2" in caches else 0)  # step 1's three, none of step 2


def test_ctrl_c_during_an_eval_pass_inside_a_step_says_the_eval_finishes_then_the_stop(tmp_path):
    """A first Ctrl-C while the train.eval_every pass after optimizer step 1 scores: the
    optimizer step is done, so the log says the evaluation finishes, then a checkpoint is
    saved and the run stops (not that an optimizer step finishes); it does so (exit 75)."""
    cfg = write_two_source_run(
        tmp_path, data="eval_fraction = 0.2", train="eval_every = 1", sdpo="report_scoring = false"
    )
    out = tmp_path / "out"
    args = ["train", "--config", str(cfg), "--set", f"output_dir={out}", "--no-progress"]
    # scoring batches: the initial model's pass, the held-out pairs' initial one, the eval
    proc = run_sdpo(args, env=_env("score_batch:3:INT"), timeout=120)
    assert proc.returncode == STOPPED, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "finishing the current optimizer step" not in said
    assert (
        "[sdpo] SIGINT received while evaluating 4 held-out pairs after optimizer step 1 "
        "(train.eval_every): finishing the evaluation, then saving a checkpoint and stopping"
    ) in said
    records = [json.loads(line) for line in _lines(out / "metrics.jsonl")]
    assert [(r["step"], "eval/loss" in r) for r in records] == [(1, False), (1, True)]
    ckpt = out / "checkpoints" / "ckpt-00000001"
    assert f"sdpo: stopped on request after optimizer step 1; checkpoint {ckpt} is saved" in said


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_ctrl_c_while_scoring_writes_no_out_file(tmp_path):
    write_two_source_run(tmp_path)  # the tiny model and a data file
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "far.jsonl")]
    args += ["--out", str(out), "--no-progress", "--impl", "torch", "--max-tokens-per-batch", "64"]
    proc = run_sdpo(args, env=_env("score_batch:1:INT"), timeout=120)
    assert proc.returncode == INTERRUPTED, proc.stderr[-3000:]
    assert _one_line(proc.stderr) == "sdpo: interrupted (Ctrl-C); nothing was written"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupt_deferred_raises_at_the_end_of_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt), _interrupt_deferred():
        signal.raise_signal(signal.SIGINT)
        done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_the_import_of_torch_says_one_line(tmp_path):
    """A Ctrl-C in the first seconds of `sdpo train` lands, most likely, in `import torch`: one
    line and 130, not a traceback of the message's own import of a half-imported torch."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'output_dir = "{tmp_path / "out"}"\n[model]\npath = "m"\n[data]\npath = "d"\n')
    code = (
        "import sys\n"
        "class Interrupt:\n"  # the SIGINT, each time torch is imported
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from sdpo.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(cfg)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == INTERRUPTED, proc.stderr[-3000:]
    assert _one_line(proc.stderr) == "sdpo: interrupted (Ctrl-C); nothing was written"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_last_step_saves_says_the_run_is_complete(tmp_path):
    """A first Ctrl-C while the last sDPO step's model folder is written: no optimizer step is
    left, so the run ends whole (exit 0) and says so in one line, rather than leaving the
    user to believe it stopped and may be resumed."""
    cfg = write_two_source_run(tmp_path, sdpo="report_scoring = false")
    out = tmp_path / "out"
    args = ["train", "--config", str(cfg), "--set", f"output_dir={out}", "--no-progress"]
    args += ["--set", "sdpo.steps=1"]
    proc = run_sdpo(args, env=_env("step_saved:1:INT"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "[sdpo] SIGINT received while saving sDPO step 1's results" in said
    complete = [line for line in said.splitlines() if "the run is complete" in line]
    assert complete == [
        "[sdpo] the stop asked for came after the run's last optimizer step: the run is "
        f"complete, its outputs are in {out} (nothing to resume)"
    ], said[-3000:]
    assert (out / "step-1" / "model.safetensors").is_file()
    assert (out / "sdpo_report.json").is_file()
