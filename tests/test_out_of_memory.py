"""Running out of GPU memory: the run stops with exit code 4 and a message naming the phase, the
settings that bound its memory and the ways out; checkpoints stay intact, and a resume may
change those settings (the result then equals the uninterrupted run's up to float rounding).

The out-of-memory error is raised by the ``SDPO_FAULT_AT=<point>:<n>:OOM`` test hook at the place
where a GPU would raise it (a training micro-batch, a scoring batch, the model's load), in the
real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.cli import EXIT_OUT_OF_MEMORY
from sdpo.config import config_from_dict, config_to_dict
from sdpo.engine.resume import list_checkpoints, verify_checkpoint
from sdpo.runner import changed_config_keys, rounding_only_keys
from tests.cli_processes import run_sdpo
from tests.conftest import write_two_source_run


def _train(cfg: Path, out: Path, *extra: str, fault: str | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SDPO_FAULT_AT", None)
    if fault is not None:
        env["SDPO_FAULT_AT"] = fault
    return run_sdpo(
        ["train", "--config", str(cfg), "--no-progress", "--set", f"output_dir={out}", *extra],
        env=env,
        timeout=300,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "step-2" / "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    cfg = write_two_source_run(
        root, train="max_tokens_per_batch = 128\nsave_every = 2", sdpo="report_scoring = false"
    )
    whole = root / "whole"
    proc = _train(cfg, whole)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, whole


def test_out_of_memory_in_training_names_the_settings_and_a_resume_may_change_them(run, tmp_path):
    cfg, whole = run
    out = tmp_path / "out"
    # sDPO step 1: 3 optimizer steps of one micro-batch each, a checkpoint after step 2
    proc = _train(cfg, out, fault="micro_batch:3:OOM")
    assert proc.returncode == EXIT_OUT_OF_MEMORY, proc.stderr[-3000:]
    err = proc.stderr
    assert "the GPU ran out of memory while training sDPO step 1" in err
    assert "micro-batches of up to 128 tokens (train.max_tokens_per_batch)" in err
    assert "lower train.max_tokens_per_batch (now 128)" in err
    assert "model.gradient_checkpointing = true" in err
    assert "kernels.max_chunk_tokens" in err and "lora.rank" in err
    assert "ckpt-00000002, is intact" in err and "--resume --set KEY=VALUE" in err
    assert [p.name for _, p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000002"]
    assert verify_checkpoint(out / "checkpoints" / "ckpt-00000002") is None
    assert not (out / "step-1").exists()

    # the ways out are accepted on resume, with a warning; the result is the same run's
    proc = _train(
        cfg,
        out,
        "--resume",
        "--set",
        "train.max_tokens_per_batch=64",
        "--set",
        "model.gradient_checkpointing=true",
        "--set",
        "kernels.max_chunk_tokens=16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with changed compute settings" in proc.stdout + proc.stderr
    assert "train.max_tokens_per_batch (128 -> 64)" in proc.stdout + proc.stderr
    got, want = _weights(out), _weights(whole)
    assert got.keys() == want.keys()
    # other micro-batches and chunks sum the gradients in another order; Adam turns that
    # rounding into up to a few thousandths of the learning rate (3e-3) where a gradient entry
    # is near its eps (measured: 1.8e-5 at one of 3,072 entries)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=3e-5)


def test_out_of_memory_while_scoring_points_at_the_scoring_batch_size(run, tmp_path):
    cfg, _ = run
    out = tmp_path / "out"
    proc = _train(cfg, out, "--set", "sdpo.score_tokens_per_batch=200", fault="score_batch:1:OOM")
    assert proc.returncode == EXIT_OUT_OF_MEMORY, proc.stderr[-3000:]
    err = proc.stderr
    # the initial model scores chunk 1 ("far", 12 pairs): given partition, no report scoring
    assert "ran out of memory while scoring 12 pairs without gradients" in err
    assert "in batches of up to 200 tokens (sdpo.score_tokens_per_batch)" in err
    assert "lower sdpo.score_tokens_per_batch (now 200)" in err
    assert "no training checkpoint was written yet" in err


def test_out_of_memory_while_the_model_loads_points_at_its_dtype_not_the_batch_sizes(run, tmp_path):
    cfg, _ = run
    out = tmp_path / "out"
    proc = _train(cfg, out, fault="model_load:1:OOM")
    assert proc.returncode == EXIT_OUT_OF_MEMORY, proc.stderr[-3000:]
    err = proc.stderr
    assert "ran out of memory while loading the model, with no batch in memory yet" in err
    assert "tokens_per_batch" not in err  # no batch size bounds the weights
    assert "free the memory other processes hold on this GPU" in err
    # the CPU's precision "auto" is fp32: 4 bytes a parameter
    assert 'train.precision = "bf16" (now "auto", here fp32) for weights of 2 bytes' in err
    assert "train.fsdp = true under torchrun" in err and "or a smaller model" in err
    assert "no training checkpoint was written yet" in err
    # nothing that bounds the load may change on --resume: no --set offered
    assert err.rstrip().endswith("--no-progress --resume"), err[-500:]


def _config(**train) -> dict:
    cfg = config_from_dict(
        {
            "output_dir": "/o",
            "model": {"path": "/m"},
            "data": {"path": "/d.jsonl"},
            "train": {"max_tokens_per_batch": 4096, **train},
        }
    )
    return config_to_dict(cfg)


def test_the_micro_batch_size_is_a_compute_setting_only_when_the_step_size_is_set():
    fixed = _config(pairs_per_step=8)
    assert "train.max_tokens_per_batch" in rounding_only_keys(fixed)
    assert "train.max_tokens_per_batch" not in rounding_only_keys(_config())
    smaller = _config(pairs_per_step=8, max_tokens_per_batch=2048)
    assert changed_config_keys(fixed, smaller) == []
    assert changed_config_keys(fixed, smaller, rounding=True) == [
        "train.max_tokens_per_batch (4096 -> 2048)"
    ]
    # without a step size the micro-batch is the optimizer step: the result changes
    assert changed_config_keys(_config(), _config(max_tokens_per_batch=2048)) == [
        "train.max_tokens_per_batch (4096 -> 2048)"
    ]


def _sdpo_config(partition: str, report_scoring: bool) -> dict:
    cfg = config_from_dict(
        {
            "output_dir": "/o",
            "model": {"path": "/m"},
            "data": {
                "sources": [{"name": "a", "path": "/a.jsonl"}, {"name": "b", "path": "/b.jsonl"}]
            },
            "sdpo": {"steps": 2, "partition": partition, "report_scoring": report_scoring},
        }
    )
    return config_to_dict(cfg)


def test_a_source_saved_without_a_subset_resumes_and_another_subset_is_refused():
    saved, now = _sdpo_config("given", False), _sdpo_config("given", False)
    for source in saved["data"]["sources"]:
        del source["subset"]  # a checkpoint written before sources had subsets
    assert changed_config_keys(saved, now) == []
    now["data"]["sources"][0]["subset"] = "hard"
    (changed,) = changed_config_keys(saved, now)
    assert changed.startswith("data.sources (")


def test_a_source_saved_before_the_tools_columns_resumes_and_another_column_is_refused():
    """A checkpoint written before a source's columns had tools and chat_template_kwargs (their
    default None: the field's own name) holds the same sources; a column set since differs."""
    saved, now = _sdpo_config("given", False), _sdpo_config("given", False)
    for source in saved["data"]["sources"]:
        del source["columns"]["tools"], source["columns"]["chat_template_kwargs"]
    assert changed_config_keys(saved, now) == []
    now["data"]["sources"][1]["columns"]["tools"] = "functions"
    (changed,) = changed_config_keys(saved, now)
    assert changed.startswith("data.sources (") and "'tools': 'functions'" in changed


@pytest.mark.parametrize("partition", ["given", "random", "easy_to_hard", "easy_to_hard_pairs"])
def test_report_scoring_changes_the_reference_passes_batches_under_random_and_given(partition):
    # random/given without report scoring score chunk 1 alone with the initial model: turning
    # it on or off on resume rescores step 1's reference values in other batches (rounding);
    # an easy-to-hard partition scores every pair either way (no change at all)
    saved, now = _sdpo_config(partition, False), _sdpo_config(partition, True)
    assert changed_config_keys(saved, now) == []
    rounding = changed_config_keys(saved, now, rounding=True)
    if partition in ("random", "given"):
        assert rounding == ["sdpo.report_scoring (False -> True)"]
    else:
        assert rounding == []


def test_keys_a_saved_config_lacks_count_as_their_defaults():
    """A run saved by a version before a key existed resumes: the key meant its default."""
    now = _config(pairs_per_step=8)
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in now.items()}
    for section, key in (
        ("train", "overlap_grad_reduce"),
        ("train", "eval_every"),
        ("loss", "discopop_tau"),
        ("model", "compile"),
    ):
        del old[section][key]
    del old["lora"], old["log"]
    assert changed_config_keys(old, now) == []
    changed = {**now, "train": {**now["train"], "eval_every": 0, "overlap_grad_reduce": False}}
    assert changed_config_keys(old, changed) == ["train.overlap_grad_reduce (True -> False)"]
    # loss.router_aux_loss_coef changes the weights: unset before it existed, refused changed
    del old["loss"]["router_aux_loss_coef"]
    moe = {**now, "loss": {**now["loss"], "router_aux_loss_coef": 0.0}}
    assert changed_config_keys(old, moe) == ["loss.router_aux_loss_coef (None -> 0.0)"]
