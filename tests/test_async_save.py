"""Asynchronous checkpoint writes (``train.async_save``): the background writer's files are the
synchronous run's (bitwise, or tensor for tensor where a format embeds an unordered map), a
write that is held while training goes on still holds the weights and optimizer state of its own
step (full fine-tuning and LoRA), a kill while a write is in flight resumes to the uninterrupted
run's bits, a failing write stops the run with exit code 74 (at the next save, at the run's end,
or instead of a graceful stop) and leaves the previous checkpoint intact, and a sharded two-rank
run writes what its synchronous twin writes.

Writes are held in flight with the documented test hook ``SDPO_FAULT_AT="<point>:<n>:HOLD"``
(``sdpo.engine.async_save``): the writer thread stops at that point until the training thread
waits for the write, i.e. after training has gone on by at least one optimizer step.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdpo.engine.resume as resume_mod
import sdpo.runner as runner_mod
from sdpo.cli import EXIT_WRITE, main
from sdpo.config import load_config
from sdpo.engine.async_save import BackgroundWriter, HostSnapshot
from sdpo.engine.resume import (
    MANIFEST_NAME,
    checkpoint_name,
    fault_point,
    list_checkpoints,
    verify_checkpoint,
)
from sdpo.engine.trainer import TrainingStopped
from sdpo.runner import CheckpointWriteError, run_training
from tests.cli_processes import run_sdpo
from tests.conftest import write_two_source_run
from tests.test_distributed import _spawn

KILLED = -9
# two sDPO steps of 3 optimizer steps each, a checkpoint after every one; the optimizer is kept
# across steps, so end-of-step checkpoints hold its state too; held-out pairs are scored after
# each step (metrics lines logged between the step's training and its checkpoint)
TRAIN = "max_tokens_per_batch = 128\nsave_every = 1"
SDPO = "report_scoring = false\nreset_optimizer = false"
DATA = "eval_fraction = 0.1"
CHECKPOINTS = [f"ckpt-{i:08d}" for i in range(1, 7)]
TIMING = ("tokens_per_s", "train_seconds", "scoring_seconds")
SETTINGS = ("async_save", "output_dir")  # the config keys two compared runs differ in


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    return write_two_source_run(tmp_path_factory.mktemp("async"), train=TRAIN, sdpo=SDPO, data=DATA)


def _run(cfg: Path, out: Path, *overrides: str, resume: bool = False) -> None:
    """One run in this process, on one CPU thread (as the CLI subprocesses below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(cfg, [f"output_dir={out}", *overrides])
        run_training(config, progress=False, resume=resume)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sync_out(run_cfg) -> Path:
    out = run_cfg.parent / "sync"
    _run(run_cfg, out)
    return out


@pytest.fixture(scope="module")
def lora_cfg(tmp_path_factory) -> Path:
    """LoRA: a mid-step checkpoint holds the adapter and the trainer state, step-<t>/ the
    merged weights and the adapter in PEFT's layout (the optimizer is never kept)."""
    root = tmp_path_factory.mktemp("async-lora")
    sdpo = "report_scoring = false"
    return write_two_source_run(root, train=TRAIN, sdpo=sdpo, data=DATA, tail="[lora]\nrank = 4")


def _cli(cfg: Path, out: Path, *, fault: str | None, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("SDPO_FAULT_AT", None)
    if fault is not None:
        env["SDPO_FAULT_AT"] = fault
    args = ["--config", str(cfg), "--set", f"output_dir={out}", "--set", "train.async_save=true"]
    return run_sdpo(
        ["train", *args, "--no-progress", *(["--resume"] if resume else [])], env=env, timeout=300
    )


# -- comparing two runs' outputs ----------------------------------------------------------------
def _drop(obj, keys: tuple[str, ...]):
    """``obj`` without the given keys at any depth (timings, SETTINGS)."""
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def _plain(obj):
    """Tensors as nested lists (dtype kept), for equality of nested states."""
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), obj.tolist())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _content(path: Path, *, same_process: bool = True):
    """What of a file must be equal between a synchronous and an asynchronous run: the bytes,
    except for the files that name the output folder, the async_save switch or timings, and the
    tensors and metadata of the reference/token caches, whose safetensors header stores its
    metadata map in no fixed order. Across processes a trainer state is compared without
    Python's RNG state, which no run seeds."""
    name = path.name
    if name == "config.toml":
        return [x for x in path.read_text().splitlines() if not x.startswith(SETTINGS)]
    if name in ("progress.json", "sdpo_report.json"):
        content = _drop(json.loads(path.read_text()), (*TIMING, *SETTINGS))
        if "metrics_bytes" in content:  # as lines: their timing fields vary in length
            logged = (path.parents[2] / "metrics.jsonl").read_bytes()[: content["metrics_bytes"]]
            assert logged.endswith(b"\n") or not logged, path
            content["metrics_bytes"] = logged.count(b"\n")
        return content
    if name == MANIFEST_NAME:  # progress.json differs as above; every other file bitwise
        manifest = json.loads(path.read_text())
        manifest["files"].pop("progress.json")
        if not same_process:
            manifest["files"].pop("trainer_state.pt", None)
        return manifest
    if name == "trainer_state.pt" and not same_process:
        # Python's global RNG (saved, never seeded by the run) starts differently per process
        state = torch.load(path, weights_only=True)
        state.get("rng", {}).pop("python", None)
        return _plain(state)
    if name == "metrics.jsonl":
        return [_drop(json.loads(x), TIMING) for x in path.read_text().splitlines()]
    if name == "adapter_config.json":  # LoRA: names its base, step-<t-1>/ of its own run
        config = json.loads(path.read_text())
        base = config["base_model_name_or_path"]
        config["base_model_name_or_path"] = base.removeprefix(str(path.parents[2]))
        return config
    if name == "sdpo_steps.png":  # a plot of the same values; its encoder is not ours
        return None
    if path.parent.name == "cache":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        return metadata, {k: v.tolist() for k, v in load_file(str(path)).items()}
    return path.read_bytes()


def _assert_same_outputs(a: Path, b: Path, *, only: str = "", same_process: bool = True) -> None:
    def files(root: Path) -> list[Path]:
        if (root / only).is_file():
            return [Path(only)]
        return sorted(p.relative_to(root) for p in (root / only).rglob("*") if p.is_file())

    files_a, files_b = files(a), files(b)
    assert files_a == files_b  # the same files, no leftovers of temporary ones
    for rel in files_a:
        want = _content(a / rel, same_process=same_process)
        assert want == _content(b / rel, same_process=same_process), rel


def _checkpoint_names(out: Path) -> list[str]:
    """The checkpoints on disk, oldest first, after checking that each one is complete."""
    names = []
    for _, path in list_checkpoints(out / "checkpoints"):
        assert verify_checkpoint(path) is None, path.name
        names.append(path.name)
    return sorted(names)


# -- the parts ---------------------------------------------------------------------------------
def test_host_snapshot_is_a_copy_that_reuses_its_buffers():
    gen = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(7, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    shared = (0.9, 0.999)
    state = {"optimizer": {"groups": [{"betas": shared}, {"betas": shared}]}, "w": weights}
    snapshot = HostSnapshot()
    first = snapshot.copy(state, key="s")
    saved = {k: v.clone() for k, v in weights.items()}
    for v in weights.values():
        v.mul_(2.0).add_(1.0)  # training goes on in place
    for k, v in first["w"].items():
        assert torch.equal(v, saved[k]), k
    groups = first["optimizer"]["groups"]
    assert groups[0]["betas"] is groups[1]["betas"]  # shared stays shared (same pickle)
    second = snapshot.copy(state, key="s")  # the next save reuses the buffers
    assert all(second["w"][k].data_ptr() == first["w"][k].data_ptr() for k in weights)
    assert all(torch.equal(second["w"][k], weights[k]) for k in weights)
    assert snapshot.nbytes == 4 * (7 * 5 + 3)


def test_held_write_stays_in_flight_until_waited_for_and_its_error_is_raised_once(monkeypatch):
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "probe:1:HOLD")
    writer = BackgroundWriter()
    done: list[int] = []
    try:

        def write() -> int:
            fault_point("probe")
            return 7

        writer.submit(write, done=done.append)
        torch.randn(200, 200) @ torch.randn(200, 200)  # the training thread works meanwhile
        assert writer.busy and not writer._pending.future.done() and not done
        writer.wait()
        assert done == [7] and not writer.busy

        def failing() -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        writer.submit(failing)
        with pytest.raises(OSError, match="No space left"):
            writer.wait()
        writer.wait()  # raised once; nothing pending now
    finally:
        writer.close()


# -- whole runs --------------------------------------------------------------------------------
def test_async_run_writes_what_the_synchronous_run_writes(run_cfg, sync_out, monkeypatch):
    """Also the order of each save's calls: the write before it waited for (its buffers are
    reused), the host copies, ``ready()`` (copies from a GPU have landed), and only then the
    write handed to the writer thread; the run's end waits for the last write."""
    calls: list[str] = []
    for cls, name, letter in (
        (BackgroundWriter, "wait", "W"),
        (HostSnapshot, "copy", "C"),
        (HostSnapshot, "ready", "R"),
        (BackgroundWriter, "submit", "S"),
    ):
        real = getattr(cls, name)

        def spy(self, *a, _real=real, _letter=letter, **k):
            if _letter != "W" or self.busy:  # a wait with a write to wait for
                calls.append(_letter)
            return _real(self, *a, **k)

        monkeypatch.setattr(cls, name, spy)
    out = run_cfg.parent / "async"
    _run(run_cfg, out, "train.async_save=true")
    assert re.fullmatch(r"C+RS(WC+RS)*W", "".join(calls)), calls
    assert calls.count("S") == len(CHECKPOINTS)
    assert _checkpoint_names(out) == CHECKPOINTS
    _assert_same_outputs(sync_out, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_each_write_holds_its_save_points_weights_though_its_copies_were_queued(
    run_cfg, monkeypatch
):
    """On CUDA the snapshot is copied into pinned memory asynchronously. Each save is entered
    with the device kept busy (``torch.cuda._sleep``), so its copies are still queued when the
    training thread would hand the write over, and the writer thread starts at once. Every
    write (4 mid-step checkpoints, step-1/ and step-2/) holds the weights the model had at its
    save point (copied synchronously there): none read its buffers before they had landed
    (``HostSnapshot.ready``). (That a write held until training has gone on still holds its
    own step's weights is checked on any device by the held-writes test below.)"""
    at_save: dict[str, dict[str, torch.Tensor]] = {}

    def weights_now(model) -> dict[str, torch.Tensor]:
        weights = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
        torch.cuda._sleep(400_000_000)  # about 0.2 s on an H100, before the snapshot's copies
        return weights

    mid, end = runner_mod.StepwiseRunner._save_mid_step, runner_mod.StepwiseRunner._save_step_end

    def save_mid_step(self, trainer, *, base):
        name = checkpoint_name(base["run_step_base"] + trainer.position["step_in_run"])
        at_save[f"checkpoints/{name}/model"] = weights_now(trainer.model)
        return mid(self, trainer, base=base)

    def save_step_end(self, model, *, t, **kw):
        at_save[f"step-{t}"] = weights_now(model)
        return end(self, model, t=t, **kw)

    monkeypatch.setattr(runner_mod.StepwiseRunner, "_save_mid_step", save_mid_step)
    monkeypatch.setattr(runner_mod.StepwiseRunner, "_save_step_end", save_step_end)
    monkeypatch.delenv("SDPO_FAULT_AT", raising=False)
    out = run_cfg.parent / "cuda"
    _run(run_cfg, out, "train.async_save=true")
    assert len(at_save) == len(CHECKPOINTS)
    for folder, weights in at_save.items():
        written = load_file(str(out / folder / "model.safetensors"))
        assert written and set(written) <= set(weights), folder
        for name, value in written.items():
            assert torch.equal(value, weights[name]), (folder, name)
    assert not torch.equal(at_save["step-1"]["lm_head.weight"], at_save["step-2"]["lm_head.weight"])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_writes_held_while_training_goes_on_hold_their_own_steps_state(
    kind, run_cfg, sync_out, lora_cfg, monkeypatch
):
    """Each held write finishes only after training changed the weights (and optimizer state)
    in place: a mid-step checkpoint of step 1 and of step 2, and the end of step 1 (step-1/ and
    its checkpoint, held between the two). Every write also starts only then: it is held before
    it writes its first weights (the model, a LoRA adapter), so no checkpoint's files can be
    written before training goes on."""
    cfg, want = run_cfg, sync_out
    if kind == "lora":
        cfg, want = lora_cfg, lora_cfg.parent / "sync"
        _run(cfg, want)
    out = cfg.parent / "held"
    for name in ("save_pretrained", "safetensors_bytes"):  # a write's first weights
        write = getattr(runner_mod, name)

        def held(*a, _write=write, **kw):
            fault_point("weights")
            return _write(*a, **kw)

        monkeypatch.setattr(runner_mod, name, held)
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    holds = ["ckpt_write:1:HOLD", "step_saved:1:HOLD", "ckpt_write:5:HOLD"]
    holds += [f"weights:{n}:HOLD" for n in range(1, 7)]
    monkeypatch.setenv("SDPO_FAULT_AT", ",".join(holds))
    _run(cfg, out, "train.async_save=true")
    assert resume_mod._fault_counts == {"ckpt_write": 6, "step_saved": 2, "weights": 6}
    assert _checkpoint_names(out) == CHECKPOINTS
    _assert_same_outputs(want, out)


def test_killed_while_a_write_is_in_flight_resumes_bitwise(run_cfg, sync_out):
    out = run_cfg.parent / "killed"
    chain = [
        # mid-step checkpoint 2 held (files written, no manifest), killed after the next step
        ("ckpt_write:2:HOLD,train_step:3", ["ckpt-00000001"]),
        # step-1/ written, its checkpoint held; killed as step 2 starts
        ("step_saved:1:HOLD,step_start:2", CHECKPOINTS[:2]),
        # killed by the writer thread itself while writing checkpoint 5, training running
        ("ckpt_write:3", CHECKPOINTS[:4]),
    ]
    for i, (fault, left) in enumerate(chain):
        proc = _cli(run_cfg, out, fault=fault, resume=i > 0)
        assert proc.returncode == KILLED, (fault, proc.stderr[-3000:])
        assert _checkpoint_names(out) == left, fault
    assert (out / "step-1").is_dir() and not (out / "step-2").exists()
    proc = _cli(run_cfg, out, fault=None, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saving in the background (training blocked" in proc.stdout
    # checkpoints, step folders and metrics as the uninterrupted synchronous run's
    for rel in ("checkpoints", "step-1", "step-2", "metrics.jsonl"):
        _assert_same_outputs(sync_out, out, only=rel, same_process=False)


@pytest.mark.parametrize(("failing", "left"), [(2, CHECKPOINTS[:1]), (6, CHECKPOINTS[:5])])
def test_failed_background_write_exits_74_and_keeps_the_previous_checkpoint(
    run_cfg, sync_out, monkeypatch, capsys, failing, left
):
    """The failure of manifest 2 surfaces at the next save (nothing after it is written); the
    failure of the last one (end of step 2) at the run's end."""
    out = run_cfg.parent / f"fail{failing}"
    real_write = resume_mod.atomic_write_json
    calls = []

    def full_disk(path, obj):
        calls.append(path)
        if len(calls) == failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, obj)

    monkeypatch.setattr(resume_mod, "atomic_write_json", full_disk)
    args = ["train", "--config", str(run_cfg), "--no-progress", "--set", f"output_dir={out}"]
    args += ["--set", "train.async_save=true"]
    assert main(args) == EXIT_WRITE
    err = capsys.readouterr().err
    assert f"writing checkpoint {out / 'checkpoints' / CHECKPOINTS[failing - 1]} failed" in err
    assert f"No space left on device); the previous checkpoint {left[-1]} is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == left  # no temporary left
    assert _checkpoint_names(out) == left
    monkeypatch.setattr(resume_mod, "atomic_write_json", real_write)
    _run(run_cfg, out, "train.async_save=true", resume=True)
    _assert_same_outputs(sync_out, out, only="step-2")


def test_graceful_stop_waits_for_the_write_in_flight_and_raises_its_error(run_cfg, monkeypatch):
    """SIGTERM inside sDPO step 2 (no save_every): the stop's checkpoint is held in flight as
    the run stops; the stop waits for it, and a failure of that write replaces the stop."""
    monkeypatch.setenv("SDPO_FAULT_AT", "train_step:4:TERM,ckpt_write:2:HOLD")
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    ok, failing = run_cfg.parent / "stop-ok", run_cfg.parent / "stop-failing"
    with pytest.raises(TrainingStopped) as stopped:
        _run(run_cfg, ok, "train.async_save=true", "train.save_every=0")
    assert stopped.value.checkpoint == ok / "checkpoints" / CHECKPOINTS[3]
    assert _checkpoint_names(ok) == [CHECKPOINTS[2], CHECKPOINTS[3]]  # end of step 1, the stop

    real_write = resume_mod.atomic_write_json

    def full_disk(path, obj):
        if "ckpt-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, obj)

    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setattr(resume_mod, "atomic_write_json", full_disk)
    with pytest.raises(CheckpointWriteError, match="ckpt-00000003 is intact") as failed:
        _run(run_cfg, failing, "train.async_save=true", "train.save_every=0")
    assert isinstance(failed.value.__context__, TrainingStopped)
    assert _checkpoint_names(failing) == [CHECKPOINTS[2]]


def _two_runs(cfg: Path, root: Path) -> list[str]:
    """A synchronous and an async run of ``cfg``; returns the key of each host copy the async
    run took (``HostSnapshot.copy``), in this rank (a rank process: the spy is never undone)."""
    copied: list[str] = []
    copy = HostSnapshot.copy

    def counted(self, obj, *, key):
        copied.append(key)
        return copy(self, obj, key=key)

    for name, mode in (("sync", "false"), ("async", "true")):
        if mode == "true":
            HostSnapshot.copy = counted
        config = load_config(cfg, [f"output_dir={root / name}", f"train.async_save={mode}"])
        run_training(config, progress=False)
    return copied


def test_sharded_two_rank_async_run_writes_what_the_synchronous_one_writes(run_cfg, tmp_path):
    """FSDP on two gloo ranks: weights and the kept optimizer gathered onto rank 0 at the save
    point (collectives), written in the background there. The gathered weights are a fresh host
    copy already: the write reads them as they are, with no second copy of the model."""
    cfg = tmp_path / "fsdp.toml"
    cfg.write_text(run_cfg.read_text().replace("[train]\n", "[train]\nfsdp = true\n"))
    copied = _spawn(tmp_path, _two_runs, cfg, tmp_path)
    assert "trainer" in copied[0] and "weights" not in copied[0], copied[0]
    assert copied[1] == []  # rank 1 writes nothing
    assert _checkpoint_names(tmp_path / "async") == CHECKPOINTS
    for rel in ("checkpoints", "step-1", "step-2", "metrics.jsonl"):
        _assert_same_outputs(tmp_path / "sync", tmp_path / "async", only=rel)
