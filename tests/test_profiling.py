"""``[profile]``: torch.profiler over chosen optimizer steps of a real run. The traced steps are
the ones asked for (also after a resume inside the window, and on every rank of a data-parallel
run), the trace holds the model's ops inside each step's range, the summary names ops of that
trace, tracing changes no weight, and a window the pass never reaches or leaves early writes
nothing. ``memory_on_oom``: off CUDA a note; on CUDA (GPU-marked) the allocator's history is
written when the run runs out of memory."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.config import ConfigError, config_from_dict
from sdpo.engine.profiling import STEP_RANGE, StepProfiler
from sdpo.runner import RESUME_SAFE_KEYS, run_training
from tests.conftest import two_source_config


def _config(tmp_path: Path, model_dir: Path, out: str, **profile) -> dict:
    d = two_source_config(tmp_path, model_dir, out=out, train={"log_every": 1, "save_every": 1})
    if profile:
        d["profile"] = profile
    return d


def _trace(path: Path) -> list[dict]:
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def _step_ranges(events: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in events if e.get("name", "").startswith(STEP_RANGE)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two-step run untraced and traced (sDPO step 2, its optimizer steps 2 and 3 of 3:
    a window of steps 2-5, cut at the pass's last step)."""
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    tmp = tmp_path_factory.mktemp("profile")
    model_dir = write_tiny_model(tmp / "model", words=WORDS, hidden_size=32, seed=1)
    plain = _config(tmp, model_dir, "plain")
    traced = _config(tmp, model_dir, "traced", steps=4, start_step=2, sdpo_step=2)
    run_training(config_from_dict(plain), progress=False)
    run_training(config_from_dict(traced), progress=False)
    return tmp, model_dir, Path(plain["output_dir"]), Path(traced["output_dir"])


def test_the_window_traces_the_steps_asked_for_and_changes_no_weight(runs):
    _, _, plain, traced = runs
    folder = traced / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        "sdpo-step-2.rank0.summary.json",
        "sdpo-step-2.rank0.trace.json.gz",
    ]
    events = _trace(folder / "sdpo-step-2.rank0.trace.json.gz")
    ranges = _step_ranges(events)
    assert sorted(ranges) == [f"{STEP_RANGE}2", f"{STEP_RANGE}3"]
    # each step's range holds the model's forward and backward matmuls and the optimizer's update
    for r in ranges.values():
        inside = {
            e["name"]
            for e in events
            if e.get("ph") == "X"
            and r["ts"] <= e["ts"]
            and e["ts"] + e["dur"] <= r["ts"] + r["dur"]
        }
        assert {"aten::mm", "aten::bmm"} & inside or "aten::linear" in inside, sorted(inside)[:20]
        assert any("backward" in n.lower() for n in inside), sorted(inside)[:20]
        assert any("adamw" in n.lower() or "optimizer" in n.lower() for n in inside)
    summary = json.loads((folder / "sdpo-step-2.rank0.summary.json").read_text())
    assert summary["traced_steps"] == [2, 3] and summary["steps"] == 2
    assert summary["device"] == "cpu" and summary["device_busy_fraction"] is None
    # the wall time covers both step ranges; the host table names ops of the trace
    assert summary["wall_ms_per_step"] * 2 >= sum(r["dur"] for r in ranges.values()) / 1e3
    ops = {e["name"][:100] for e in events if e.get("ph") == "X"}
    assert summary["host_ops"] and all(row["name"] in ops for row in summary["host_ops"])
    assert not any(row["name"].startswith(STEP_RANGE) for row in summary["host_ops"])
    # tracing changes no weight and no logged number (apart from the timing)
    for t in (1, 2):
        a = load_file(str(plain / f"step-{t}" / "model.safetensors"))
        b = load_file(str(traced / f"step-{t}" / "model.safetensors"))
        for name, w in a.items():
            assert torch.equal(w, b[name]), (t, name)

    def metrics(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert metrics(plain) == metrics(traced)
    assert not (plain / "profile").exists()


def test_a_resume_inside_the_window_traces_the_rest_of_it(runs):
    tmp, model_dir, _, traced = runs
    again = tmp / "again"
    shutil.copytree(traced, again)
    config = _config(tmp, model_dir, "again", steps=2, start_step=2, sdpo_step=2)
    checkpoints = sorted((again / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))
    # run steps 1-3 are sDPO step 1, 4-6 step 2: keep ckpt-5 (sDPO step 2, its step 2 done)
    for ckpt in checkpoints:
        if int(ckpt.name[5:]) > 5:
            shutil.rmtree(ckpt)
    shutil.rmtree(again / "step-2")
    shutil.rmtree(again / "profile")
    run_training(config_from_dict(config), progress=False, resume=True)
    summary = json.loads((again / "profile" / "sdpo-step-2.rank0.summary.json").read_text())
    assert summary["traced_steps"] == [3]
    ranges = _step_ranges(_trace(again / "profile" / "sdpo-step-2.rank0.trace.json.gz"))
    assert sorted(ranges) == [f"{STEP_RANGE}3"]


def test_a_window_past_the_pass_or_left_early_writes_nothing(tmp_path, capsys):
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def step():
        model(x).square().sum().backward()

    late = StepProfiler(out_dir=tmp_path / "late", name="n", first=5, steps=2, device="cpu")
    for n in (1, 2, 3):
        late.step_begin(n)
        step()
        late.step_end(n)
    late.close()
    assert not (tmp_path / "late").exists() and late.traced == []

    early = StepProfiler(out_dir=tmp_path / "early", name="n", first=2, steps=3, device="cpu")
    for n in (1, 2, 3):
        early.step_begin(n)
        step()
        if n < 3:
            early.step_end(n)
    assert early.active and torch.autograd.profiler._is_profiler_enabled
    early.close()  # as fit() does when an error or a stop leaves the window at step 3
    assert not early.active and not torch.autograd.profiler._is_profiler_enabled
    assert not (tmp_path / "early").exists()

    done = StepProfiler(out_dir=tmp_path / "done", name="n", first=1, steps=1, device="cpu")
    done.step_begin(1)
    step()
    done.step_end(1)
    done.step_begin(1)  # a second pass over the same steps (another epoch) is not traced again
    assert not done.active
    assert [p.name for p in sorted((tmp_path / "done").iterdir())] == [
        "n.rank0.summary.json",
        "n.rank0.trace.json.gz",
    ]
    assert "optimizer steps 1-1 traced" in capsys.readouterr().out


def test_with_stack_puts_python_frames_in_the_trace_but_not_in_the_host_ops(tmp_path):
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    prof = StepProfiler(out_dir=tmp_path, name="n", first=1, steps=1, device="cpu", with_stack=True)
    prof.step_begin(1)
    model(x).square().sum().backward()
    prof.step_end(1)
    events = _trace(tmp_path / "n.rank0.trace.json.gz")
    frames = {e["name"][:100] for e in events if e.get("cat") == "python_function"}
    assert frames  # the stacks asked for are in the trace
    summary = json.loads((tmp_path / "n.rank0.summary.json").read_text())
    if "error" in summary:  # torch's profiler at times fails to read the events of Python frames
        assert summary["error"].startswith("torch.profiler could not read its events")
        return
    names = [row["name"] for row in summary["host_ops"]]
    assert any(n.startswith("aten::") for n in names), names
    assert not set(names) & frames, names
    assert all(row["ms_per_step"] >= 0 for row in summary["host_ops"])


def test_the_window_past_a_step_s_optimizer_steps_is_reported(tiny_model_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_model_dir, "run", steps=1, start_step=9, sdpo_step=1)
    config["sdpo"]["steps"] = 1
    config["data"]["sources"] = config["data"]["sources"][:1]
    run_training(config_from_dict(config), progress=False)
    out = capsys.readouterr().out
    assert "this pass has 3 optimizer steps, so the window from step 9" in out
    assert not (Path(config["output_dir"]) / "profile").exists()


def test_profile_config_is_checked_and_free_to_change_on_resume(tiny_model_dir, tmp_path):
    base = two_source_config(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="profile.sdpo_step = 3 but the run has sdpo.steps = 2"):
        config_from_dict({**base, "profile": {"steps": 1, "sdpo_step": 3}})
    with pytest.raises(ConfigError, match="profile.start_step"):
        config_from_dict({**base, "profile": {"steps": 1, "start_step": 0}})
    with pytest.raises(ConfigError, match="profile.steps"):
        config_from_dict({**base, "profile": {"steps": -1}})
    fields = config_from_dict(base).profile.__dataclass_fields__
    assert {f"profile.{k}" for k in fields} <= RESUME_SAFE_KEYS


@pytest.mark.gpu
def test_on_cuda_the_window_records_kernels_and_the_allocator_history(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import pickle

    model = torch.nn.Linear(256, 256, device="cuda")
    x = torch.randn(64, 256, device="cuda")
    prof = StepProfiler(
        out_dir=tmp_path, name="n", first=1, steps=2, device=torch.device("cuda"), memory=True
    )
    for n in (1, 2):
        prof.step_begin(n)
        model(x).square().sum().backward()
        prof.step_end(n)
    summary = json.loads((tmp_path / "n.rank0.summary.json").read_text())
    assert summary["device_kernels"] and 0 < summary["device_busy_fraction"] <= 1.0
    snapshot = pickle.loads((tmp_path / "n.rank0.memory.pickle").read_bytes())
    assert snapshot["segments"] and any(snapshot["device_traces"])


def _run_out_of_memory(tmp_path: Path, model_dir: Path, monkeypatch, **sections) -> str:
    """A run whose 2nd optimizer step raises CUDA's out-of-memory error (the fault hook); the
    message it stops with."""
    from sdpo.engine import resume
    from sdpo.runner import OutOfMemoryStop

    config = _config(tmp_path, model_dir, "oom", memory_on_oom=True)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    monkeypatch.setenv(resume.FAULT_ENV, "train_step:2:OOM")
    monkeypatch.setattr(resume, "_fault_counts", {})
    with pytest.raises(OutOfMemoryStop) as stop:
        run_training(config_from_dict(config), progress=False)
    return str(stop.value)


def test_memory_on_oom_off_cuda_says_there_is_nothing_to_record(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    message = _run_out_of_memory(tmp_path, tiny_model_dir, monkeypatch)
    assert "ran out of memory while training sDPO step 1" in message
    assert "allocator's history" not in message
    assert "profile.memory_on_oom records the CUDA allocator: nothing to record on cpu" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "oom" / "profile").exists()


@pytest.mark.gpu
def test_on_cuda_out_of_memory_writes_the_allocator_history_of_the_run(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import pickle

    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    model_dir = write_tiny_model(tmp_path / "m", words=WORDS, hidden_size=256, seed=1)
    message = _run_out_of_memory(tmp_path, model_dir, monkeypatch, kernels={"impl": "auto"})
    path = tmp_path / "oom" / "profile" / "oom.rank0.memory.pickle"
    assert f"in {path}: open it at pytorch.org/memory_viz" in message
    snapshot = pickle.loads(path.read_bytes())
    # the history reaches back to the model's load and holds the training step's allocations
    assert snapshot["segments"] and any(snapshot["device_traces"])
    frames = {
        frame["filename"]
        for trace in snapshot["device_traces"]
        for event in trace
        for frame in event.get("frames", [])
    }
    assert any(name.endswith("trainer.py") for name in frames), sorted(frames)[:20]


def _traced_steps(config: dict) -> list[int]:
    """One rank's run; the steps its own summary lists."""
    from sdpo.engine import distributed

    run_training(config_from_dict(config), progress=False)
    name = f"sdpo-step-1.rank{distributed.rank()}.summary.json"
    return json.loads((Path(config["output_dir"]) / "profile" / name).read_text())["traced_steps"]


def test_under_data_parallel_every_rank_writes_its_own_trace(tiny_model_dir, tmp_path):
    from tests.test_distributed import _spawn

    config = _config(tmp_path, tiny_model_dir, "dp", steps=2, start_step=1, sdpo_step=1)
    config["train"]["save_every"] = 0
    assert _spawn(tmp_path, _traced_steps, config) == [[1, 2], [1, 2]]
    names = sorted(p.name for p in (tmp_path / "dp" / "profile").iterdir())
    assert names == [
        f"sdpo-step-1.rank{r}.{kind}" for r in (0, 1) for kind in ("summary.json", "trace.json.gz")
    ]
    for r in (0, 1):  # each rank's trace holds its own share of the steps
        ranges = _step_ranges(_trace(tmp_path / "dp" / "profile" / names[2 * r + 1]))
        assert sorted(ranges) == [f"{STEP_RANGE}1", f"{STEP_RANGE}2"]
