"""Experiment trackers (``[log] report_to``): TensorBoard event files and an offline W&B run
hold exactly what ``metrics.jsonl`` holds, step by step, plus the step reports; a killed and
resumed run shows every step once in TensorBoard and continues the same W&B run."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from sdpo.config import ConfigError, config_from_dict
from sdpo.report import read_metrics
from sdpo.runner import RunInputError, StepwiseRunner, run_training
from sdpo.tracking import TRACKING_STATE, scalars
from tests.cli_processes import run_sdpo
from tests.conftest import two_source_config, write_two_source_run

tensorboard = pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import (  # noqa: E402
    EventFileLoader,
)


def _setup(root: Path, report_to: list[str]) -> Path:
    return write_two_source_run(
        root,
        data="eval_fraction = 0.2",
        train="max_tokens_per_batch = 128\nsave_every = 2",
        tail=f"[log]\nreport_to = {json.dumps(report_to)}",
    )


def _train(cfg: Path, *extra: str, fault: str | None = None, env: dict | None = None):
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    run_env.pop("SDPO_FAULT_AT", None)
    if fault is not None:
        run_env["SDPO_FAULT_AT"] = fault
    return run_sdpo(
        ["train", "--config", str(cfg), "--no-progress", *extra], env=run_env, timeout=300
    )


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows it (purged events dropped)."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _raw_event_steps(folder: Path, tag: str) -> list[int]:
    """The steps of every event written for ``tag``, purged or not, in file order."""
    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == tag for v in event.summary.value):
                steps.append(event.step)
    return steps


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from metrics.jsonl and the step reports."""
    want: dict[str, dict[int, float]] = {}
    base = 0  # run steps before this sDPO step: training records count from 1 in each
    for record in read_metrics(out / "metrics.jsonl"):
        if "eval/loss" in record:  # logged at the run step that ends an sDPO step
            at = base = record["step"]
        else:
            at = base + record["step"]
            want.setdefault("step_in_sdpo_step", {})[at] = record["step"]
        assert record["run_step"] == at  # every record names its run step
        for key, value in scalars(record).items():
            if key != "run_step":  # the trackers' x-axis
                want.setdefault(key, {})[at] = value
    steps = json.loads((out / "sdpo_report.json").read_text())["steps"]
    ends = sorted({r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r})
    assert len(ends) == len(steps) == 2
    for report, end in zip(steps, ends):
        for key in ("gamma_ref_chunk", "reward_accuracy_before", "reward_accuracy_after"):
            want.setdefault(f"sdpo/{key}", {})[end] = report[key]
    return want


def _assert_same(got: dict, want: dict, *, skip: tuple[str, ...] = ()) -> None:
    for tag, by_step in want.items():
        if tag in skip:
            continue
        assert tag in got, f"{tag} missing from the tracker"
        assert sorted(got[tag]) == sorted(by_step), tag
        for step, value in by_step.items():  # trackers keep float32
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)


def test_tensorboard_holds_the_metrics_and_a_resumed_run_shows_each_step_once(tmp_path):
    cfg = _setup(tmp_path, ["tensorboard"])
    whole = tmp_path / "whole"
    proc = _train(cfg, "--set", f"output_dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _expected(whole)
    assert {"loss", "rewards/accuracies", "eval/loss", "lr", "sdpo_step"} <= set(want)
    _assert_same(_tensorboard_scalars(whole / "tensorboard"), want)

    # killed after logging step 3 (the checkpoint holds step 2), then resumed
    cut = tmp_path / "cut"
    proc = _train(cfg, "--set", f"output_dir={cut}", fault="train_step:3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert 3 in _raw_event_steps(cut / "tensorboard", "loss")  # step 3 reached the file
    proc = _train(cfg, "--set", f"output_dir={cut}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # step 3 was written twice; TensorBoard shows it once, with the resumed run's value
    assert _raw_event_steps(cut / "tensorboard", "loss").count(3) == 2
    got = _tensorboard_scalars(cut / "tensorboard")
    _assert_same(got, _expected(cut))
    # resume is exact: the same curves as the uninterrupted run (timing aside)
    _assert_same(got, want, skip=("tokens_per_s",))

    # --overwrite starts over: the old events are gone
    proc = _train(cfg, "--set", f"output_dir={cut}", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _raw_event_steps(cut / "tensorboard", "loss").count(3) == 1


def test_step_in_sdpo_step_restarts_with_each_sdpo_step_with_a_kept_optimizer(
    tmp_path, tiny_model_dir
):
    # sdpo.reset_optimizer = false: the records' own step counts on across the sDPO steps
    cfg = config_from_dict(
        two_source_config(
            tmp_path,
            tiny_model_dir,
            sdpo={"reset_optimizer": False},
            log={"report_to": ["tensorboard"]},
        )
    )
    run_training(cfg, progress=False)
    out = Path(cfg.output_dir)
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["sdpo_step"], r["step"], r["run_step"]) for r in records] == [
        (1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 4, 4), (2, 5, 5), (2, 6, 6)
    ]  # fmt: skip
    got = _tensorboard_scalars(out / "tensorboard")
    assert got["step_in_sdpo_step"] == {1: 1, 2: 2, 3: 3, 4: 1, 5: 2, 6: 3}
    assert got["sdpo_step"] == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}


# -- W&B, offline: its own transaction log, read back record by record --------------------------
_BLOCK = 32 * 1024
_HEADER = 7  # crc32 (4), length (2), record type (1)


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte file header, then records in
    32 KiB blocks (full / first / middle / last fragments)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(out: Path) -> tuple[dict[str, dict[int, float]], set[str]]:
    """{key: {step: value}} over every offline run folder of ``out``, and the run ids seen."""
    got: dict[str, dict[int, float]] = {}
    ids = set()
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            if kind != "history":
                continue
            items = {
                (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                for item in record.history.item
            }
            step = int(record.history.step.num) if record.history.HasField("step") else None
            step = items.pop("_step", step)
            for key, value in items.items():
                if not key.startswith("_"):
                    got.setdefault(key, {})[int(step)] = value
    return got, ids


def test_wandb_offline_run_holds_the_metrics_and_resume_continues_it(tmp_path):
    pytest.importorskip("wandb")
    cfg = _setup(tmp_path, ["wandb"])
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    proc = _train(cfg, "--set", f"output_dir={out}", "--set", "log.run_name=r1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((out / TRACKING_STATE).read_text())["wandb_run_id"]
    got, ids = _wandb_history(out)
    assert ids == {run_id}
    _assert_same(got, _expected(out))

    # a resume continues the same W&B run (log.* settings may change on resume)
    proc = _train(
        cfg, "--set", f"output_dir={out}", "--set", "log.run_name=r2", "--resume", env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / TRACKING_STATE).read_text())["wandb_run_id"] == run_id
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2
    assert _wandb_history(out)[1] == {run_id}


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(tmp_path / "model")},
            "data": {"path": str(tmp_path / "d.jsonl")},
            "log": {"report_to": ["wandb", "tensorboard"]},
        }
    )
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(RunInputError, match=r"not installed: wandb \(pip install wandb\)"):
        StepwiseRunner(cfg, progress=False).check_output_dir()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "log, message",
    [
        ({"report_to": ["tb"]}, "log.report_to entry = 'tb' is not an option"),
        ({"report_to": ["wandb", "wandb"]}, "names a tracker twice"),
        ({"project": ""}, "log.project is empty"),
        ({"report_to": "wandb"}, "got str 'wandb': write a list, report_to = \\[.wandb.\\]"),
        ({"report_to": "none"}, r"'tensorboard' and/or 'wandb'; none is \[\] \(the default\)"),
        ({"report_to": "all"}, "all is each of them by name"),
    ],
)
def test_bad_log_settings_are_refused(tmp_path, log, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(
            {
                "output_dir": "o",
                "model": {"path": "m"},
                "data": {"path": "d.jsonl"},
                "log": log,
            }
        )


def test_a_tracker_that_cannot_start_leaves_the_old_run_s_outputs_under_overwrite(tmp_path):
    """W&B without a login (online mode, no key, no terminal to ask on) cannot start: the run
    exits 2 with a message naming the tracker and the ways out, before --overwrite clears
    anything, and writes no tracker file (a leftover tracking.json would count as a run)."""
    pytest.importorskip("wandb")
    cfg = _setup(tmp_path, ["tensorboard", "wandb"])
    out = tmp_path / "out"
    (out / "step-1").mkdir(parents=True)
    (out / "step-1" / "model.safetensors").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    env.update(WANDB_MODE="online", WANDB_SILENT="true")
    proc = _train(cfg, "--set", f"output_dir={out}", "--overwrite", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the wandb tracker could not start" in proc.stderr
    assert "WANDB_MODE=offline" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_tensorboard_dir_holding_another_run_s_events_is_refused_to_a_fresh_run(tmp_path):
    from sdpo.tracking import TrackerStartError, open_trackers

    shared = tmp_path / "tb"

    def start(out: str, resume_step: int | None = None):
        return open_trackers(
            ["tensorboard"],
            output_dir=tmp_path / out,
            project="p",
            run_name=None,
            tensorboard_dir=str(shared),
            resume_step=resume_step,
            config={},
        )

    first = start("a")
    first.log({"loss": 0.5, "step": 1})
    first.close()
    # a fresh run "b" would purge "a"'s events from TensorBoard's view
    with pytest.raises(TrackerStartError, match=r"holds the TensorBoard events of the run in .*a;"):
        start("b")
    start("a").close()  # "a" again (--overwrite) and "b" resuming go on
    start("b", resume_step=3).close()
    loaded = event_accumulator.EventAccumulator(str(shared))
    loaded.Reload()
    assert [(e.step, e.value) for e in loaded.Scalars("loss")] == [(1, 0.5)]
    # events no sdpo run claims are refused too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "events.out.tfevents.1.host.0.0").write_bytes(b"")
    shared = tmp_path / "other"
    with pytest.raises(TrackerStartError, match="holds the TensorBoard events of another run"):
        start("a")


def test_a_wandb_run_that_cannot_start_leaves_no_output_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from sdpo.tracking import TrackerStartError, open_trackers

    def refused(**kwargs):  # as wandb.init fails without a login
        raise wandb.errors.UsageError("No API key configured")

    monkeypatch.setattr(wandb, "init", refused)
    with pytest.raises(TrackerStartError, match="the wandb tracker could not start"):
        open_trackers(
            ["wandb"],
            output_dir=tmp_path / "out",
            project="p",
            run_name=None,
            tensorboard_dir=None,
            resume_step=None,
            config={},
        )
    assert not (tmp_path / "out").exists()  # the message says nothing was written


def test_a_tensorboard_dir_that_cannot_be_a_folder_is_refused_before_anything_is_written(
    tmp_path,
):
    from sdpo.tracking import TrackerStartError, open_trackers

    (tmp_path / "afile").write_text("")
    for where in ("afile", "afile/sub"):
        with pytest.raises(TrackerStartError, match=r"afile is not a folder, so .* cannot be made"):
            open_trackers(
                ["tensorboard"],
                output_dir=tmp_path / "out",
                project="p",
                run_name=None,
                tensorboard_dir=str(tmp_path / where),
                resume_step=None,
                config={},
            )
