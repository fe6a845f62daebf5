"""Faults of a data-parallel run under the real launcher: ``python -m torch.distributed.run
--standalone --nproc_per_node=2 -m sdpo.cli train`` (gloo on CPU, a tiny model), in
subprocesses, compared with one uninterrupted two-rank run of the same config.

- Both ranks SIGKILLed at the same point (``SDPO_FAULT_AT`` reaches every rank through the
  environment): between sDPO steps, between two micro-batches of an optimizer step, and (rank 0
  alone, the writer) while a checkpoint is written. torchrun reports the failure, every file
  under a real name is complete, and ``--resume`` under torchrun ends with bitwise the same step
  checkpoints and metrics.
- SIGTERM to one rank only: the ranks agree the stop in the next step's all-reduce, both exit
  with the graceful-stop code after the same step, the checkpoint resumes to the same bits.
- One rank SIGKILLed alone: torchrun ends the run (no hang), earlier checkpoints stay intact and
  the run resumes to the same bits.
- Out of memory on rank 0 alone (a failure its peer does not share): it exits with its code at
  once and the run ends (no hang in the closing barrier).

A signal meant for one rank is sent to that worker process itself. To deliver it at an exact
place, both workers first stop themselves there (``SDPO_FAULT_AT="<point>:<count>:STOP"``); the
test finds them among torchrun's children in ``/proc``, signals the one, and lets them go on
(SIGCONT). Every run keeps every checkpoint (``save_every = 1``) so each one on disk has a twin
in the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import torch
import torch.distributed
from safetensors.torch import load_file

from sdpo.cli import EXIT_OUT_OF_MEMORY, EXIT_STOPPED
from sdpo.engine.resume import list_checkpoints, verify_checkpoint
from tests.conftest import torchrun_env, write_two_source_run

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
KILLED = -signal.SIGKILL
# a safety net against a hang, not a timing assertion: a run here takes seconds
RUN_TIMEOUT_S = 120
# torchrun's failure summary: one block per failed rank
_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def _setup(root: Path) -> Path:
    # 2 sDPO steps of 3 optimizer steps each, one micro-batch per rank per step
    return write_two_source_run(
        root,
        train="max_tokens_per_batch = 64\nsave_every = 1",
        sdpo="report_scoring = false",
    )


@dataclass(kw_only=True)
class Launch:
    returncode: int  # torchrun's own
    output: str
    failed: dict[int, int]  # rank -> exit code, for every rank torchrun reports as failed
    root_cause: int | None  # the rank torchrun observed failing first

    def explain(self) -> str:
        return f"torchrun returned {self.returncode}; output:\n{self.output[-4000:]}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1])


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (its children with RANK set)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (_proc_stat(int(entry)) or ("", 0))[1] != launcher:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(entry)
    return found


def _wait_until_stopped(proc: subprocess.Popen, log: Path) -> dict[int, int]:
    """The workers' pids once every rank has stopped itself (state T) at the fault point."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before its ranks stopped at the fault point:\n"
                f"{log.read_text()[-4000:]}"
            )
        workers = _workers(proc.pid)
        if len(workers) == WORLD and all(
            (_proc_stat(pid) or ("",))[0] == "T" for pid in workers.values()
        ):
            return workers
        time.sleep(0.05)
    raise AssertionError(f"the ranks never stopped at the fault point:\n{log.read_text()[-4000:]}")


def _launch(
    cfg: Path,
    out: Path,
    *,
    fault: str | None = None,
    resume: bool = False,
    on_stopped: Callable[[dict[int, int]], None] | None = None,
) -> Launch:
    """One torchrun run of ``sdpo.cli train``. ``on_stopped(workers)`` is called once both ranks
    have stopped themselves at ``fault`` (a ``...:STOP`` spec) with {rank: pid}."""
    env = torchrun_env("SDPO_FAULT_AT")
    if fault is not None:
        env["SDPO_FAULT_AT"] = fault
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own
        f"--nproc_per_node={WORLD}",
        "-m",
        "sdpo.cli",
        "train",
        "--config",
        str(cfg),
        "--set",
        f"output_dir={out}",
        "--no-progress",
        *(["--resume"] if resume else []),
    ]
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log"
    with log.open("w") as sink:  # a file, not a pipe: nothing blocks on a full pipe
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    workers: dict[int, int] = {}
    try:
        if on_stopped is not None:
            workers = _wait_until_stopped(proc, log)
            on_stopped(workers)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the run did not end within {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            ) from None
    finally:
        if proc.poll() is None:  # only after a failure above: end what this test started
            for pid in workers.values():
                if (_proc_stat(pid) or ("", 0))[1] == proc.pid:  # still torchrun's child
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    output = log.read_text()
    failed = {int(r): int(c) for r, c in _FAILED_RANK.findall(output)}
    cause = _FAILED_RANK.search(output, output.find("Root Cause"))
    return Launch(
        returncode=proc.returncode,
        output=output,
        failed=failed,
        root_cause=int(cause.group(1)) if "Root Cause" in output and cause else None,
    )


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]


def _real_files(out: Path) -> list[Path]:
    """Files under real names (no path component is a temporary ``.name``), relative."""
    return sorted(
        p.relative_to(out)
        for p in out.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)
    )


def _assert_no_half_written_file(out: Path, reference: Path) -> None:
    """Every file under a real name is whole: each checkpoint folder matches its manifest, each
    file parses, and every tensor file the uninterrupted run also wrote holds its exact tensors
    (weights of checkpoints and steps, reference and token caches); metrics.jsonl is a prefix
    of the uninterrupted run's."""
    for _, ckpt in list_checkpoints(out / "checkpoints"):
        reason = verify_checkpoint(ckpt)
        assert reason is None, f"{ckpt.name} stands under its real name but is not: {reason}"
    for rel in _real_files(out):
        path = out / rel
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            if (reference / rel).is_file():
                want = load_file(reference / rel)
                assert tensors.keys() == want.keys(), rel
                for name, value in want.items():
                    assert torch.equal(tensors[name], value), (rel, name)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=False)
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), rel
    if (out / "metrics.jsonl").is_file():
        got, want = _metrics(out), _metrics(reference)
        assert got == want[: len(got)], "metrics.jsonl is not a prefix of the uninterrupted run's"


def _assert_same_result(out: Path, reference: Path) -> None:
    """The finished run is bitwise the uninterrupted one: step weights, metrics, the files."""
    for t in (1, 2):
        want = load_file(reference / f"step-{t}" / "model.safetensors")
        got = load_file(out / f"step-{t}" / "model.safetensors")
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert torch.equal(got[name], value), (t, name)
    assert _metrics(out) == _metrics(reference)  # no step logged twice or lost
    assert _real_files(out) == _real_files(reference)
    _assert_no_half_written_file(out, reference)


@dataclass(kw_only=True)
class Reference:
    cfg: Path
    out: Path
    root: Path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """The uninterrupted two-rank run every case is compared with."""
    root = tmp_path_factory.mktemp("dist_faults")
    cfg = _setup(root)
    out = root / "reference"
    run = _launch(cfg, out)
    assert run.returncode == 0, run.explain()
    # the step table's last row: rank 0's output is complete although it leaves without the
    # interpreter's finalization (sdpo.cli.entry)
    assert re.search(r"^ +2 +\d+ +near ", run.output, re.MULTILINE), run.explain()
    # the log says the run is data parallel, which its other lines do not tell from one process
    assert "data parallel over 2 ranks (gloo, cpu): each holds" in run.output, run.explain()
    names = [p.name for _, p in list_checkpoints(out / "checkpoints")]
    assert len(names) == 6 and len(_metrics(out)) == 6  # 2 sDPO steps x 3 optimizer steps
    return Reference(cfg=cfg, out=out, root=root)


# (SDPO_FAULT_AT, ranks that reach it and die by SIGKILL); each run resumes the one before
KILL_CHAIN = [
    ("step_start:2", (0, 1)),  # between sDPO steps: step-1/ saved, step 2 not begun
    ("micro_batch:2", (0, 1)),  # inside sDPO step 2's 2nd optimizer step, before its all-reduce
    ("ckpt_write:1", (0,)),  # checkpoint files written, manifest not (rank 0 alone writes)
]


def test_both_ranks_killed_at_one_point_resume_under_torchrun_to_the_same_bits(reference):
    out = reference.root / "killed"
    for i, (fault, dying) in enumerate(KILL_CHAIN):
        run = _launch(reference.cfg, out, fault=fault, resume=i > 0)
        assert run.returncode != 0, (fault, run.explain())
        assert run.root_cause in dying, (fault, run.explain())
        for r in dying:  # every rank that reaches the point dies there, whatever torchrun does
            assert run.failed.get(r) == KILLED, (fault, r, run.explain())
        assert set(run.failed) == set(range(WORLD)), (fault, run.explain())  # none lingers on
        _assert_no_half_written_file(out, reference.out)
    # the last kill hit the write of step 5's checkpoint: it stands under a temporary name only
    assert not (out / "checkpoints" / "ckpt-00000005").exists()
    assert list((out / "checkpoints").glob(".ckpt-00000005.*"))
    run = _launch(reference.cfg, out, resume=True)
    assert run.returncode == 0, run.explain()
    assert "removing .ckpt-" in run.output  # resume cleared the interrupted write
    _assert_same_result(out, reference.out)


def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_resumes(reference):
    out = reference.root / "stopped"

    def terminate_rank_1(workers: dict[int, int]) -> None:
        # both ranks stand after optimizer step 1; only rank 1 is asked to stop
        os.kill(workers[1], signal.SIGTERM)
        for pid in workers.values():
            os.kill(pid, signal.SIGCONT)

    run = _launch(reference.cfg, out, fault="train_step:1:STOP", on_stopped=terminate_rank_1)
    assert run.returncode != 0, run.explain()  # torchrun counts any nonzero worker as failed
    # both ranks took the graceful stop (a rank left in a collective would have failed)
    assert run.failed == {0: EXIT_STOPPED, 1: EXIT_STOPPED}, run.explain()
    # the stop was agreed in step 2's all-reduce: both stopped after step 2, saved by rank 0
    assert "stopped on request after optimizer step 2" in run.output, run.explain()
    assert "--resume" in run.output
    newest = list_checkpoints(out / "checkpoints")[0][1]
    assert newest.name == "ckpt-00000002" and verify_checkpoint(newest) is None
    assert not json.loads((newest / "progress.json").read_text())["step_finished"]
    assert len(_metrics(out)) == 2
    _assert_no_half_written_file(out, reference.out)

    run = _launch(reference.cfg, out, resume=True)
    assert run.returncode == 0, run.explain()
    _assert_same_result(out, reference.out)


def test_one_rank_killed_alone_ends_the_run_and_resumes_to_the_same_bits(reference):
    out = reference.root / "one_dead"

    def kill_rank_1(workers: dict[int, int]) -> None:
        # both ranks stand after optimizer step 4 (inside sDPO step 2); rank 1 dies alone and
        # rank 0 goes on into its checkpoint and the next step's collectives
        os.kill(workers[1], signal.SIGKILL)
        os.kill(workers[0], signal.SIGCONT)

    run = _launch(reference.cfg, out, fault="train_step:4:STOP", on_stopped=kill_rank_1)
    assert run.returncode != 0, run.explain()
    assert run.root_cause == 1 and run.failed[1] == KILLED, run.explain()
    assert run.failed.get(0, 0) != 0, run.explain()  # rank 0 was ended too, not left running
    # the checkpoints written before the death are intact and hold the uninterrupted weights
    names = [p.name for _, p in list_checkpoints(out / "checkpoints")]
    assert {"ckpt-00000001", "ckpt-00000002", "ckpt-00000003"} <= set(names)
    _assert_no_half_written_file(out, reference.out)

    run = _launch(reference.cfg, out, resume=True)
    assert run.returncode == 0, run.explain()
    _assert_same_result(out, reference.out)


def test_a_failure_on_one_rank_alone_ends_the_run_instead_of_hanging(tmp_path):
    # out of memory on rank 0 alone, right after it wrote the initial reference cache (a point
    # only the writing rank reaches), while rank 1 has gone on into the next collective: rank 0
    # must not wait for rank 1 in the closing barrier (both would hang until the group timeout)
    cfg = _setup(tmp_path)
    run = _launch(cfg, tmp_path / "out", fault="cache_saved:1:OOM")
    assert run.root_cause == 0 and run.failed[0] == EXIT_OUT_OF_MEMORY, run.explain()
    assert run.failed.get(1, 0) != 0, run.explain()  # ended too, not left waiting
    assert "[rank 0] sdpo: the GPU ran out of memory" in run.output, run.explain()
    assert "--resume" in run.output
