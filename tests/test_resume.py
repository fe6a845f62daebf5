"""Exact resume in process: the trainer continued from any step's saved state ends bitwise equal;
a graceful stop (SIGTERM) saves and resumes to the same bits; a failing checkpoint write (disk
full) leaves the previous checkpoint intact and the run resumable; a changed config is refused
by key; non-finite losses stop the run (or are skipped and counted) without touching the
weights. The subprocess kill tests are in test_faults.py."""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdpo.engine.resume as resume_mod
import sdpo.runner as runner_mod
from sdpo.cli import EXIT_INPUT, main
from sdpo.config import config_from_dict
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.resume import (
    fault_point,
    file_entries,
    list_checkpoints,
    verify_checkpoint,
    write_checkpoint,
)
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import (
    DPOTrainer,
    NonFiniteError,
    TrainConfig,
    TrainingStopped,
    build_optimizer,
)
from sdpo.runner import CheckpointWriteError, OutputDirError, run_training
from tests.conftest import dpo_trainer, two_source_config, write_pairs


def _pairs(model_dir: Path, tmp_path: Path, n: int = 13):
    data = write_pairs(tmp_path / "d.jsonl", n=n, seed=11)
    rows = read_preference_file(str(data), source="s")
    pairs, _ = tokenize_pairs(
        rows, PairTokenizer.from_dir(model_dir), max_length=32, max_prompt_length=16
    )
    return pairs


def _trainer(model, fused: bool = False, **overrides) -> DPOTrainer:
    """``fused``: fused AdamW, as on a GPU, where ``fit`` reads a step's values after queueing
    the next one."""
    cfg = dict(
        learning_rate=3e-3, epochs=2, pairs_per_step=4, max_tokens_per_batch=64, save_every=1
    )
    cfg.update(overrides)
    trainer = dpo_trainer(model, TrainConfig(**cfg))
    if fused:
        trainer.optimizer = build_optimizer(model, trainer.config, fused=True)
    return trainer


FUSED = pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])


@FUSED
def test_trainer_resumed_from_any_step_ends_bitwise_equal(tiny_model_dir, tmp_path, fused):
    pairs = _pairs(tiny_model_dir, tmp_path)  # 13 pairs: 4 steps per epoch, the last short
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
    saved: list[tuple[dict, bytes]] = []

    def save(trainer: DPOTrainer) -> None:
        buf = io.BytesIO()
        torch.save(trainer.state_dict(), buf)
        saved.append((copy.deepcopy(trainer.model.state_dict()), buf.getvalue()))

    trainer = _trainer(model, fused)
    trainer.save_checkpoint = save
    result = trainer.fit(pairs, ref)
    assert result.optimizer_steps == 8 and len(saved) == 7  # none after the last step
    final = model.state_dict()
    for weights, state in saved:  # mid-epoch, at the epoch boundary, in the second epoch
        resumed = load_pretrained(tiny_model_dir)
        resumed.load_state_dict(weights)
        _trainer(resumed, fused).fit(pairs, ref, resume_state=torch.load(io.BytesIO(state)))
        for name, value in resumed.state_dict().items():
            assert torch.equal(value, final[name]), name


def test_a_record_holds_the_mean_of_its_log_window_and_resume_keeps_the_window(
    tiny_model_dir, tmp_path
):
    """train.log_every = 3 (TRL's logging_steps): each record is the mean of the steps since
    the last one (the gradient norm and the rate: the last step's); a run resumed from a
    checkpoint inside a window logs the same records as the uninterrupted run."""
    pairs = _pairs(tiny_model_dir, tmp_path)  # 8 steps over 2 epochs

    def records(log_every: int, out: str, resume_state=None, weights=None, save=None):
        model = load_pretrained(tiny_model_dir)
        ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
        if weights is not None:
            model.load_state_dict(weights)
        trainer = _trainer(model, log_every=log_every, save_every=5 if save else 0)
        trainer.output_dir = tmp_path / out
        trainer.save_checkpoint = save
        trainer.fit(pairs, ref, resume_state=resume_state)
        rows = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(row) for row in rows]

    every = records(1, "every")
    assert [r["epoch"] for r in every] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]  # TRL's
    saved = []

    def save(trainer: DPOTrainer) -> None:
        buf = io.BytesIO()
        torch.save(trainer.state_dict(), buf)
        saved.append((copy.deepcopy(trainer.model.state_dict()), buf.getvalue()))

    windows = records(3, "windows", save=save)
    assert [r["step"] for r in windows] == [3, 6, 8]
    for record, (first, last) in zip(windows, [(0, 3), (3, 6), (6, 8)], strict=True):
        steps = every[first:last]
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            total = 0.0
            for row in steps:
                total += row[key]
            assert record[key] == total / len(steps), key
        for key in ("grad_norm", "lr", "tokens", "epoch"):
            assert record[key] == steps[-1][key], key
    assert windows[0]["rewards/accuracies"] not in (0.0, 1.0)  # a mean of several steps

    # checkpoint after step 5, inside the window of steps 4-6
    weights, state = saved[0]
    resumed = records(3, "resumed", resume_state=torch.load(io.BytesIO(state)), weights=weights)
    assert [r["step"] for r in resumed] == [6, 8]
    for a, b in zip(resumed, windows[1:], strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
            k: v for k, v in b.items() if k != "tokens_per_s"
        }


def test_a_window_resumed_with_the_token_metrics_switched_logs_them_for_none_of_its_steps(
    tiny_model_dir, tmp_path
):
    """log.token_metrics may change on resume: the record of the window the checkpoint falls in
    has no token metrics (switched on, they would cover only its later steps; switched off, its
    saved sums are dropped), the next window's follows the new setting."""
    from sdpo.engine.trainer import TOKEN_METRICS

    pairs = _pairs(tiny_model_dir, tmp_path)  # 4 steps; a record after steps 3 and 4
    config = TrainConfig(
        learning_rate=3e-3, pairs_per_step=4, max_tokens_per_batch=64, log_every=3, save_every=2
    )
    ref = score_pairs(load_pretrained(tiny_model_dir), pairs, max_tokens_per_batch=4096)

    def records(on: bool, out: str, resume_state=None, weights=None, save=None):
        model = load_pretrained(tiny_model_dir)
        if weights is not None:
            model.load_state_dict(weights)
        trainer = dpo_trainer(model, config, output_dir=tmp_path / out, token_metrics=on)
        trainer.save_checkpoint = save
        trainer.fit(pairs, ref, resume_state=resume_state)
        rows = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(row) for row in rows]

    for on in (True, False):
        saved = []

        def save(trainer: DPOTrainer, saved=saved) -> None:
            buf = io.BytesIO()
            torch.save(trainer.state_dict(), buf)
            saved.append((copy.deepcopy(trainer.model.state_dict()), buf.getvalue()))

        records(on, f"run-{on}", save=save)
        ((weights, state),) = saved  # after step 2, inside the window of steps 1-3
        resumed = records(not on, f"resumed-{on}", torch.load(io.BytesIO(state)), weights)
        assert [r["step"] for r in resumed] == [3, 4]
        logged = [set(TOKEN_METRICS) & set(r) for r in resumed]
        assert logged == [set(), set() if on else set(TOKEN_METRICS)]


@FUSED
def test_nonfinite_step_stops_naming_the_step_and_leaves_weights_untouched(
    tiny_model_dir, tmp_path, fused
):
    """Fused: the error comes when step 3 is already queued; it must not have been applied."""
    pairs = _pairs(tiny_model_dir, tmp_path)
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
    ref.chosen_logps[pairs[5].index] = float("nan")  # a broken reference value
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer(model, fused, shuffle=False, epochs=1, save_every=0)
    with pytest.raises(NonFiniteError, match=r"optimizer step 2 .*pairs \[4, 5, 6, 7\]") as info:
        trainer.fit(pairs, ref)
    assert "skip_nonfinite_batches" in str(info.value) and info.value.pair_indices == [4, 5, 6, 7]
    # step 1 was applied, step 2 was not: one more clean step gives the same weights
    check = load_pretrained(tiny_model_dir)
    check.load_state_dict(before)
    _trainer(check, fused, shuffle=False, epochs=1, save_every=0).train_step(
        pairs, [[0, 1, 2, 3]], ref
    )
    for name, value in model.state_dict().items():
        assert torch.equal(value, check.state_dict()[name]), name


@FUSED
def test_skip_nonfinite_batches_skips_and_counts(tiny_model_dir, tmp_path, fused):
    pairs = _pairs(tiny_model_dir, tmp_path)
    model = load_pretrained(tiny_model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch")
    # a chosen reference log-prob of +inf: z = -inf and a loss of +inf (a rejected one of +inf
    # would give z = +inf and a loss of exactly 0, a finite step)
    ref.chosen_logps[pairs[9].index] = float("inf")
    trainer = _trainer(
        model, fused, shuffle=False, epochs=1, skip_nonfinite_batches=1, save_every=0
    )
    trainer.output_dir = tmp_path / "out"
    result = trainer.fit(pairs, ref)
    assert result.optimizer_steps == 4
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 4]  # step 3 (pairs 8-11) was skipped
    assert [m["skipped_batches"] for m in metrics] == [0, 0, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_skipped_last_step_still_logs_the_finite_steps_of_its_window(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, tmp_path, n=16)  # 4 steps of 4 pairs
    ref = score_pairs(load_pretrained(tiny_model_dir), pairs, max_tokens_per_batch=4096)
    ref.chosen_logps[pairs[13].index] = float("inf")  # a loss of +inf: step 4, the last, is skipped
    records = {}
    for log_every in (1, 4):
        out = tmp_path / f"log{log_every}"
        trainer = _trainer(
            load_pretrained(tiny_model_dir),
            shuffle=False,
            epochs=1,
            skip_nonfinite_batches=1,
            save_every=0,
            log_every=log_every,
        )
        trainer.output_dir = out
        result = trainer.fit(pairs, ref)
        records[log_every] = [
            json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
        ]
        assert result.last_metrics == records[log_every][-1]  # the step report's numbers
    steps = records[1]
    assert [r["step"] for r in steps] == [1, 2, 3]
    (window,) = records[4]
    assert window["step"] == 4 and window["skipped_batches"] == 1
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert window[key] == pytest.approx(sum(r[key] for r in steps) / 3, rel=1e-6), key
    assert window["grad_norm"] == steps[-1]["grad_norm"]  # the last finite step's


# -- the runner -------------------------------------------------------------------------------


def _config(tmp_path: Path, model_dir: Path, out: str = "run", **train):
    return config_from_dict(
        two_source_config(
            tmp_path,
            model_dir,
            out=out,
            far=8,
            near=7,
            train={"pairs_per_step": 3, "save_every": 1, "keep_checkpoints": 3, **train},
        )
    )


def _weights(out: Path, t: int = 2) -> dict[str, torch.Tensor]:
    return load_pretrained(out / f"step-{t}").state_dict()


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def baseline(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, out="baseline")
    run_training(cfg, progress=False)
    return _weights(Path(cfg.output_dir))


def test_sigterm_finishes_the_step_checkpoints_and_resumes_bitwise(
    tiny_model_dir, tmp_path, baseline, monkeypatch, capsys
):
    cfg = _config(tmp_path, tiny_model_dir, save_every=100)  # only the stop writes mid-step
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "train_step:4:TERM")  # inside sDPO step 2
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped):
        run_training(cfg, progress=False)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    out = Path(cfg.output_dir)
    names = [p.name for _, p in list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-00000004", "ckpt-00000003"]  # the stop, the end of sDPO step 1
    assert not (out / "step-2").exists()
    monkeypatch.delenv("SDPO_FAULT_AT")
    # resumed where train.precision = "auto" resolves otherwise (a GPU's bf16-mixed): the run
    # keeps the fp32 it started with, which its checkpoint records, and the log says so
    import sdpo.engine.precision as precision_mod

    resolve = precision_mod.resolve_precision
    for module in (runner_mod, precision_mod):
        monkeypatch.setattr(
            module,
            "resolve_precision",
            lambda p, device: "bf16-mixed" if p == "auto" else resolve(p, device),
        )
    run_training(cfg, progress=False, resume=True)
    assert 'train.precision = "auto" keeps fp32, the precision the run started with' in (
        capsys.readouterr().out
    )
    _assert_same_weights(_weights(out), baseline)


def test_a_fault_rule_names_its_signal_with_or_without_sig_and_a_bad_one_is_named(monkeypatch):
    """``<point>:<count>:SIGTERM`` sends SIGTERM as ``TERM`` does (not an AttributeError from
    the signal module), and an action that is no signal, OOM or HOLD is named."""
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    got: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        for action in ("USR1", "SIGUSR1", "sigusr1"):
            monkeypatch.setenv("SDPO_FAULT_AT", f"probe_{action}:1:{action}")
            fault_point(f"probe_{action}")
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert got == [signal.SIGUSR1] * 3
    monkeypatch.setenv("SDPO_FAULT_AT", "probe:1:TERMINATE")
    with pytest.raises(ValueError, match="SDPO_FAULT_AT: unknown action 'TERMINATE'"):
        fault_point("probe")


def test_a_resume_that_scores_the_initial_model_anew_trains_the_run_s_chunks(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """easy_to_hard_pairs cuts the pairs by the initial model's γ. A run resumed after step 1
    whose initial reference cache is gone (a cache_dir on a disk the resumed job does not see)
    scores the initial model anew, and on another GPU, world size or batch size those values
    differ in float rounding: enough, among many pairs, to move one across the cut. Here the
    two pairs at the cut trade places. The resumed run trains the chunks its checkpoint holds,
    not a recut that would train one pair twice and the other never."""
    cfg = config_from_dict(
        two_source_config(
            tmp_path,
            tiny_model_dir,
            train={"pairs_per_step": 4},
            sdpo={"partition": "easy_to_hard_pairs"},
        )
    )
    out = Path(cfg.output_dir)
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "step_start:2:TERM")  # stops before step 2 trains
    with pytest.raises(TrainingStopped):
        run_training(cfg, progress=False)
    monkeypatch.delenv("SDPO_FAULT_AT")
    planned = load_file(out / "cache" / "step-2.safetensors")["pair_indices"].tolist()
    initial = load_file(out / "cache" / "initial.safetensors")
    (out / "cache" / "initial.safetensors").unlink()
    gamma = dict(
        zip(
            initial["pair_indices"].tolist(),
            (initial["chosen_logps"] - initial["rejected_logps"]).tolist(),
            strict=True,
        )
    )
    last_of_one = min((i for i in gamma if i not in planned), key=gamma.get)
    first_of_two = max(planned, key=gamma.get)
    shift = (gamma[last_of_one] - gamma[first_of_two]) * 0.51 + 1e-6

    def scored_elsewhere(model, pairs, **kwargs):  # the initial pass alone
        values = score_pairs(model, pairs, **kwargs)
        if len(pairs) == len(gamma):
            rows = values.rows_for(torch.tensor([last_of_one, first_of_two]))
            values.chosen_logps[rows] += torch.tensor([-shift, shift])
        return values

    monkeypatch.setattr(runner_mod, "score_pairs", scored_elsewhere)
    capsys.readouterr()
    run_training(cfg, progress=False, resume=True)
    assert load_file(out / "cache" / "step-2.safetensors")["pair_indices"].tolist() == planned
    assert "keeping the partition the run trained with" in capsys.readouterr().out


def test_disk_full_while_checkpointing_keeps_the_previous_one_and_resumes(
    tiny_model_dir, tmp_path, baseline, monkeypatch
):
    cfg = _config(tmp_path, tiny_model_dir)
    out = Path(cfg.output_dir)
    real_write = resume_mod.atomic_write_json
    calls = []

    def full_disk(path, obj):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint's manifest
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, obj)

    monkeypatch.setattr(resume_mod, "atomic_write_json", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left.*ckpt-00000001 is intact"):
        run_training(cfg, progress=False)
    monkeypatch.setattr(resume_mod, "atomic_write_json", real_write)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000001"]
    assert verify_checkpoint(out / "checkpoints" / "ckpt-00000001") is None
    run_training(cfg, progress=False, resume=True)
    _assert_same_weights(_weights(out), baseline)


def test_damaged_newest_checkpoint_is_reported_and_the_one_before_used(
    tiny_model_dir, tmp_path, baseline, capsys
):
    cfg = _config(tmp_path, tiny_model_dir)
    out = Path(cfg.output_dir)
    run_training(cfg, progress=False)
    newest = list_checkpoints(out / "checkpoints")[0][1]
    state = newest / "progress.json"
    state.write_text(state.read_text().replace('"sdpo_step": 2', '"sdpo_step": 1'))
    capsys.readouterr()
    run_training(cfg, progress=False, resume=True)
    printed = capsys.readouterr().out
    assert f"skipping checkpoint {newest.name}: incomplete or damaged" in printed
    assert "progress.json does not match its checksum" in printed
    _assert_same_weights(_weights(out), baseline)


def test_resume_with_a_changed_result_key_is_refused_naming_it(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir)
    run_training(cfg, progress=False)
    changed = _config(tmp_path, tiny_model_dir, learning_rate=1e-3, log_every=2)
    with pytest.raises(OutputDirError, match=r"train\.learning_rate \(0\.003 -> 0\.001\)") as e:
        run_training(changed, progress=False, resume=True)
    assert "log_every" not in str(e.value)
    # keys that do not change the weights may differ; train.precision = "auto" ran in fp32
    # here (the checkpoint records it): fp32 given explicitly is the same run, another
    # precision is refused naming the recorded one
    same = _config(tmp_path, tiny_model_dir, log_every=2, precision="fp32")
    run_training(same, progress=False, resume=True)
    bf16 = _config(tmp_path, tiny_model_dir, precision="bf16-mixed")
    with pytest.raises(OutputDirError, match=r"train\.precision \('fp32' -> 'bf16-mixed'\)") as e:
        run_training(bf16, progress=False, resume=True)
    assert "the run trains in fp32" in str(e.value)


def test_a_resume_keeps_the_recorded_precision_and_refuses_a_device_that_cannot_run_it(
    monkeypatch,
):
    """``train.precision = "auto"`` resolves when the run starts; its checkpoint keeps that
    precision, which a resume on another kind of device keeps (saying what auto would pick
    there). A checkpoint written before the precision was kept resolves it as before."""
    from sdpo.engine.precision import precision_problem, resumed_precision

    # a GPU that computes in bf16
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "native")
    assert resumed_precision("auto", "fp32", "cuda") == (
        "fp32",
        'train.precision = "auto" keeps fp32, the precision the run started with (its '
        'checkpoint records it); a new run on this cuda would resolve "auto" to bf16-mixed',
    )
    assert resumed_precision("auto", "bf16-mixed", "cpu")[0] == "bf16-mixed"
    assert resumed_precision("auto", "fp32", "cpu") == ("fp32", None)
    assert resumed_precision("auto", None, "cuda") == ("bf16-mixed", None)  # an older checkpoint
    assert resumed_precision("auto", None, "cpu") == ("fp32", None)
    assert resumed_precision("bf16", "bf16", "cpu") == ("bf16", None)
    assert precision_problem("bf16-mixed", "cpu") is None
    monkeypatch.setattr("sdpo.engine.precision.bf16_support", lambda device: "none")
    assert precision_problem("fp32", "cuda") is None
    assert "does not compute in bf16" in precision_problem("bf16-mixed", "cuda")
    assert "does not compute in bf16" in precision_problem("bf16", "cuda")


def test_compute_settings_a_resume_changes_beyond_rounding_are_named():
    """The compute settings a resume may change (rounding_only_keys) change a run only in
    rounding, except: a mixture of experts' router loss is each micro-batch's (training) and
    each scoring batch's (eval/aux_loss), and compiled layers draw other LoRA dropout masks."""
    from sdpo.runner import beyond_rounding

    def config(**sections):
        return {"train": {"max_tokens_per_batch": 128, "pairs_per_step": 3}, **sections}

    saved, smaller = config(), config(train={"max_tokens_per_batch": 64, "pairs_per_step": 3})
    batch = ["train.max_tokens_per_batch"]
    assert beyond_rounding(saved, smaller, batch, router_loss=False, held_out=True) == []
    moe = beyond_rounding(saved, smaller, batch, router_loss=True, held_out=False)
    assert len(moe) == 1 and "each micro-batch's tokens" in moe[0]
    # held out pairs: the scoring batches (4 x the micro-batch budget) change eval/aux_loss
    moe = beyond_rounding(saved, smaller, batch, router_loss=True, held_out=True)
    assert len(moe) == 2 and "the scoring batches (512 -> 256 tokens" in moe[1]
    assert "eval/aux_loss" in moe[1]
    scoring = config(sdpo={"score_tokens_per_batch": 512})  # 4 x 128: the same batches
    assert beyond_rounding(saved, scoring, [], router_loss=True, held_out=True) == []
    scoring = config(sdpo={"score_tokens_per_batch": 256})
    key = ["sdpo.score_tokens_per_batch"]
    assert beyond_rounding(saved, scoring, key, router_loss=False, held_out=True) == []
    assert (
        "eval/aux_loss" in beyond_rounding(saved, scoring, key, router_loss=True, held_out=True)[0]
    )
    compiled = ["model.compile"]
    for lora, masks in (({"rank": 4, "dropout": 0.1}, True), ({"rank": 4}, False), ({}, False)):
        now = config(lora=lora, model={"compile": True})
        why = beyond_rounding(config(lora=lora), now, compiled, router_loss=False, held_out=False)
        assert bool(why) == masks, lora
        if masks:
            assert "lora.dropout = 0.1: compiled layers draw other dropout masks" in why[0]


def test_resume_with_other_initial_or_reference_weights_is_refused(tiny_model_dir, tmp_path):
    """The folders named in the config hold other weights than when the run started (a
    re-download, an overwritten checkpoint): refused by role, the run resumable once restored."""
    import shutil

    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    other = write_tiny_model(tmp_path / "other", words=WORDS, hidden_size=32, seed=5)
    for role, key in (("initial", "model.path"), ("reference", "sdpo.reference")):
        m0 = tmp_path / role / "m0"
        shutil.copytree(tiny_model_dir, m0)
        cfg = _config(tmp_path / role, m0)
        if role == "reference":
            ref = tmp_path / role / "ref"
            shutil.copytree(other, ref)
            cfg.sdpo.reference, cfg.sdpo.partition = str(ref), "given"
        run_training(cfg, progress=False)
        swapped = m0 if role == "initial" else ref
        kept = (swapped / "model.safetensors").read_bytes()
        source = other if role == "initial" else tiny_model_dir
        shutil.copy(source / "model.safetensors", swapped / "model.safetensors")
        with pytest.raises(OutputDirError, match=rf"{key} \(.*\) holds other weights"):
            run_training(cfg, progress=False, resume=True)
        (swapped / "model.safetensors").write_bytes(kept)
        run_training(cfg, progress=False, resume=True)


def test_a_refused_resume_tells_other_weights_from_another_configuration(tiny_model_dir, tmp_path):
    """A resume refused for a fingerprint other than the run's says what differs: the
    configuration alone (a config.json whose rotary base changed, the same tensors), naming
    the field; the weights, and the configuration too; and, for a run whose checkpoint holds
    only the fingerprint of both (an earlier release's), that either may differ."""
    import shutil

    from sdpo.engine.resume import MANIFEST_NAME
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    m0 = tmp_path / "m0"
    shutil.copytree(tiny_model_dir, m0)
    cfg = _config(tmp_path, m0)
    run_training(cfg, progress=False)
    config_file = m0 / "config.json"
    kept_config, kept_weights = config_file.read_text(), (m0 / "model.safetensors").read_bytes()
    config_file.write_text(json.dumps({**json.loads(kept_config), "rope_theta": 500.0}))
    with pytest.raises(OutputDirError) as e:
        run_training(cfg, progress=False, resume=True)
    assert (
        f"model.path ({m0}) holds the weights the run started from, but the model's "
        "configuration differs in rope_theta (now 500.0, then 10000.0) (fingerprint "
    ) in str(e.value)
    assert "Restore the model as it was (its config.json;" in str(e.value)
    other = write_tiny_model(tmp_path / "other", words=WORDS, hidden_size=32, seed=5)
    shutil.copy(other / "model.safetensors", m0 / "model.safetensors")
    with pytest.raises(
        OutputDirError,
        match=r"holds other weights than when the run started, "
        r"and the model's configuration differs in rope_theta \(now 500.0",
    ):
        run_training(cfg, progress=False, resume=True)
    config_file.write_text(kept_config)
    with pytest.raises(
        OutputDirError,
        match=r"holds other weights than when the run started "
        r"\(fingerprint .*Restore those weights",
    ):
        run_training(cfg, progress=False, resume=True)

    # a checkpoint of the releases that recorded one fingerprint of weights and config
    (_, newest), *_ = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    progress = json.loads((newest / "progress.json").read_text())
    del progress["model_architectures"]
    (newest / "progress.json").write_text(json.dumps(progress))
    manifest = json.loads((newest / MANIFEST_NAME).read_text())
    manifest["files"].update(file_entries([newest / "progress.json"], base=newest))
    (newest / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(
        OutputDirError,
        match=r"holds other weights than when the run started, or the same weights with "
        r"another configuration of the model \(the run's checkpoint keeps one fingerprint of "
        r"both: \w{12}, the run's \w{12}\), .*Restore those weights and that configuration",
    ):
        run_training(cfg, progress=False, resume=True)
    (m0 / "model.safetensors").write_bytes(kept_weights)
    run_training(cfg, progress=False, resume=True)


def test_a_qwen_run_an_earlier_release_fingerprinted_by_one_window_resumes(
    tmp_path, monkeypatch, capsys
):
    """Releases before sliding layers were part of a model's fingerprint hashed a Qwen whose
    later layers slide by its window alone, running it without a window on sequences within it
    (as sliding ones do now). Such a run, stopped inside sDPO step 2 with LoRA, resumes: its
    recorded initial and LoRA base fingerprints are accepted as those of the same weights, its
    reference caches reused; it was refused as holding other weights, which it does not."""
    from sdpo.engine.model import ModelConfig
    from tests.conftest import write_partly_sliding_qwen

    m0 = write_partly_sliding_qwen(tmp_path / "m0")
    d = two_source_config(tmp_path, m0, far=8, near=7, lora={"rank": 4})
    d["train"].update(pairs_per_step=3, save_every=100)
    cfg = config_from_dict(d)
    now = ModelConfig.architecture_dict

    def earlier_recipe(config: ModelConfig) -> dict:
        return {k: v for k, v in now(config).items() if k != "sliding_layers"}

    monkeypatch.setattr(ModelConfig, "architecture_dict", earlier_recipe)
    monkeypatch.setattr(resume_mod, "_fault_counts", {})
    monkeypatch.setenv("SDPO_FAULT_AT", "train_step:4:TERM")  # inside sDPO step 2
    with pytest.raises(TrainingStopped):
        run_training(cfg, progress=False)
    monkeypatch.setattr(ModelConfig, "architecture_dict", now)
    monkeypatch.delenv("SDPO_FAULT_AT")
    capsys.readouterr()
    run_training(cfg, progress=False, resume=True)
    log = capsys.readouterr().out
    assert "the run recorded these weights under the fingerprint an earlier release" in log
    assert "reference cache step-2.safetensors: reused (written under the fingerprint" in log
    assert "recomputing" not in log
    assert (Path(cfg.output_dir) / "step-2" / "model.safetensors").is_file()


def test_resume_on_other_training_pairs_is_refused(tiny_model_dir, tmp_path):
    """The checkpoint keeps the token ids' fingerprint: a data file edited since the run
    started is refused on resume (nothing trained on other pairs); restored, it resumes. A
    checkpoint without the fingerprint (an older release's) is refused, naming why."""
    cfg = _config(tmp_path, tiny_model_dir)
    run_training(cfg, progress=False)
    near = Path(cfg.data.sources[1].path)
    original = near.read_text()
    rows = original.splitlines()
    row = json.loads(rows[0])
    row["chosen"] = row["chosen"] + " mat"
    near.write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputDirError, match="token ids differ from those ckpt-") as e:
        run_training(cfg, progress=False, resume=True)
    cache = out / "cache" / "tokens-train.safetensors"
    assert str(e.value).endswith(
        f"(since {cache} was written: data source near ({near}) changed), so the resumed steps "
        "would train on other pairs. Restore the inputs the run started with, or start a new "
        "run (another output_dir, or --overwrite)"
    )
    # refused: nothing written, not even the token cache of the edited data
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    near.write_text(original)
    # the same inputs, which another sdpo tokenizes otherwise (its tokenizing code, the token
    # cache's key says, and ids one token shorter): the cause and the sdpo to resume with
    key, tokenize = runner_mod.token_cache_key, runner_mod.tokenize_pairs

    def shorter(*args, **kwargs):
        pairs, stats = tokenize(*args, **kwargs)
        return [dataclasses.replace(p, chosen_ids=p.chosen_ids[1:]) for p in pairs], stats

    with pytest.MonkeyPatch.context() as other_sdpo:
        other_sdpo.setattr(runner_mod, "tokenize_pairs", shorter)
        other_sdpo.setattr(
            runner_mod, "token_cache_key", lambda *a, **k: {**key(*a, **k), "code": "0"}
        )
        with pytest.raises(OutputDirError) as e:
            run_training(cfg, progress=False, resume=True)
    assert str(e.value).endswith(
        f"(since {cache} was written: the tokenizing code changed), so the resumed steps would "
        "train on other pairs. The inputs are the same, and this sdpo tokenizes them otherwise: "
        "resume with the sdpo that started the run, or start a new run (another output_dir, or "
        "--overwrite)"
    )
    run_training(cfg, progress=False, resume=True)

    # a checkpoint of the releases before checkpoints kept the fingerprint (and the weights',
    # and the chunks) resumed unchecked, though sdpo tokenizes some text otherwise since (a BOS
    # in front of plain prompts, then not): refused, saying why and what to do
    from sdpo.engine.resume import MANIFEST_NAME

    (_, newest), *_ = list_checkpoints(out / "checkpoints")
    progress = json.loads((newest / "progress.json").read_text())
    for key in ("data_fingerprint", "model_fingerprints", "chunks", "precision"):
        del progress[key]  # as those releases wrote it
    (newest / "progress.json").write_text(json.dumps(progress))
    manifest = json.loads((newest / MANIFEST_NAME).read_text())
    manifest["files"].update(file_entries([newest / "progress.json"], base=newest))
    (newest / MANIFEST_NAME).write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputDirError) as e:
        run_training(cfg, progress=False, resume=True)
    assert str(e.value) == (
        f"cannot resume the run in {out}: {newest.name} was written by an sdpo from before "
        "checkpoints recorded the training pairs' token ids and the weights the run started "
        "from, and sdpo has tokenized some text otherwise since, so the steps still to run "
        "could train on other token ids than the run's first steps without a word. Finish the "
        "run with the sdpo that started it, or start a new run (another output_dir, or "
        "--overwrite)"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_resume_flags(tiny_model_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "p.jsonl", n=6, seed=3)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'output_dir = "out"\n[model]\npath = "{tiny_model_dir}"\n[data]\npath = "{data}"\n'
        "max_length = 32\nmax_prompt_length = 16\n[train]\npairs_per_step = 3\n"
        'max_tokens_per_batch = 128\n[kernels]\nimpl = "torch"\n'
    )
    base = ["train", "--config", str(toml), "--no-progress"]
    assert main([*base, "--resume"]) == 0  # nothing to resume: starts from the beginning
    assert (tmp_path / "out" / "step-1").is_dir()
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0  # a finished run: said, and its report again
    said = capsys.readouterr().out
    assert f"the run in {tmp_path / 'out'} is complete (its last sDPO step, 1, is done)" in said
    assert "reward acc" in said.lower()
    assert main(base) == EXIT_INPUT
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--resume", "--overwrite"]) == EXIT_INPUT
    assert "exclude each other" in capsys.readouterr().err


def test_checkpoint_manifest_names_the_one_damaged_file_among_many(tmp_path):
    """Files are hashed in parallel: each digest must still land on its own file."""
    rng = random.Random(5)
    blobs = {f"model/shard-{i}.bin": rng.randbytes(rng.randint(1, 300_000)) for i in range(9)}
    outside = tmp_path / "run" / "step-1" / "weights.bin"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(rng.randbytes(1000))
    external = file_entries([outside], base=tmp_path / "run")

    def contents(tmp: Path) -> None:
        for name, data in blobs.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_bytes(data)

    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000001"
    write_checkpoint(ckpt, write_contents=contents, external=external)
    assert verify_checkpoint(ckpt) is None
    for name in ("model/shard-0.bin", "model/shard-4.bin", "model/shard-8.bin"):
        data = bytearray(blobs[name])
        data[len(data) // 2] ^= 1  # same size, one bit flipped
        (ckpt / name).write_bytes(bytes(data))
        assert verify_checkpoint(ckpt) == f"{name} does not match its checksum"
        (ckpt / name).write_bytes(blobs[name])
        assert verify_checkpoint(ckpt) is None
    outside.write_bytes(b"x" * 1000)
    assert verify_checkpoint(ckpt) == "step-1/weights.bin does not match its checksum"
    outside.unlink()
    assert verify_checkpoint(ckpt) == "step-1/weights.bin is missing"


def test_other_weights_of_a_run_an_earlier_recipe_fingerprinted_name_no_config_field(
    tmp_path, monkeypatch
):
    """A run whose checkpoint records the configuration as an earlier release described it (a
    Qwen's window without its sliding layers) and whose weights are replaced since: the
    refusal says other weights, and names no configuration field (the config is the same, only
    described otherwise), nor tells to restore the config.json."""
    from safetensors.torch import save_file

    from sdpo.engine.model import ModelConfig
    from tests.conftest import write_partly_sliding_qwen

    m0 = write_partly_sliding_qwen(tmp_path / "m0")
    cfg = config_from_dict(two_source_config(tmp_path, m0, far=4, near=4))
    now = ModelConfig.architecture_dict

    def earlier_recipe(config: ModelConfig) -> dict:
        return {k: v for k, v in now(config).items() if k != "sliding_layers"}

    monkeypatch.setattr(ModelConfig, "architecture_dict", earlier_recipe)
    run_training(cfg, progress=False)
    monkeypatch.setattr(ModelConfig, "architecture_dict", now)
    weights = load_file(str(m0 / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(m0 / "model.safetensors"))
    with pytest.raises(OutputDirError) as e:
        run_training(cfg, progress=False, resume=True)
    assert f"model.path ({m0}) holds other weights than when the run started (fingerprint" in str(
        e.value
    )
    assert "configuration" not in str(e.value)
    assert "Restore those weights (a hub model" in str(e.value)
