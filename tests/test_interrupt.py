"""Ctrl-C that ends a command at once (before training starts, or a second one during a graceful
stop): the real CLI gets a real SIGINT at an exact point (the ``SDPO_FAULT_AT`` hook,
``tests/cli_processes.py``) and must exit 130 with one line, no traceback, no temporary file
left, and an earlier run's outputs untouched."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from sdpo.runner import _interrupt_deferred
from tests.cli_processes import run_sdpo
from tests.conftest import write_two_source_run

INTERRUPTED = 130


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
