"""Data parallelism on the transformers path (two gloo processes on CPU): random-init
transformers models in ``PackedCausalLM`` trained two optimizer steps on two ranks end with the
same weights on both and with the losses, gradients and weights of one process running the same
global batches; a two-step sDPO run on two ranks writes what one process writes; ``train.fsdp``,
which needs sdpo's decoder, is refused on every rank before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdpo.cli import EXIT_INPUT
from sdpo.config import config_from_dict, write_resolved_config
from sdpo.engine import distributed
from sdpo.engine.checkpoint import load_model
from sdpo.engine.scoring import score_pairs
from sdpo.engine.trainer import TrainConfig, plan_steps
from tests.conftest import dpo_trainer, two_source_config, write_hf_model, write_pairs
from tests.test_distributed import (
    _alongside,
    _metrics,
    _pairs,
    _run_config,
    _train_cli,
    _train_watched,
    _weights,
    preload_in_ranks,
)

pytest.importorskip("transformers")
# this module and transformers' modeling code are imported once, by the forkserver the ranks
# are forked from, not in each rank
preload_in_ranks(
    "tests.test_hf_distributed",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "sdpo.engine.hf",
)

LR = 1e-2
STEPS = 2


def _hf_steps(model_dir: Path, data: Path) -> dict:
    """Two optimizer steps of the transformers-run model, several uneven micro-batches each,
    with the gradient all-reduce overlapped with the last backward (in buckets of 4 KiB, many
    for this model) and with one all-reduce after the backward; runs the same way in one
    process and in every rank."""
    pairs = _pairs(model_dir, data)
    out = {"world": distributed.world()}
    for overlap in (True, False):
        model = load_model(model_dir, implementation="transformers")
        if overlap:
            ref = score_pairs(
                model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False
            )
            # rewards off zero from the first step: the pairs' loss gradients differ
            ref = type(ref)(
                pair_indices=ref.pair_indices,
                chosen_logps=ref.chosen_logps - 0.3 * (torch.arange(len(pairs)) % 3),
                rejected_logps=ref.rejected_logps + 0.2,
                chosen_tokens=ref.chosen_tokens,
                rejected_tokens=ref.rejected_tokens,
            )
        config = TrainConfig(
            learning_rate=LR,
            seed=3,
            pairs_per_step=9,
            max_tokens_per_batch=60,
            overlap_grad_reduce=overlap,
        )
        trainer = dpo_trainer(model, config)
        if trainer.grad_reducer is not None and overlap:
            trainer.grad_reducer = distributed.GradReducer(model.parameters(), bucket_bytes=4096)
        plan = plan_steps(pairs, config, epoch=0)[:STEPS]
        hf = model.hf_model
        losses, grads, weights = [], [], []
        for step in plan:
            losses.append(float(trainer.train_step(pairs, step, ref)["loss"]))
            grads.append({n: p.grad.clone() for n, p in hf.named_parameters()})
            weights.append({n: w.detach().clone() for n, w in hf.state_dict().items()})
        reducer = trainer.grad_reducer
        out[overlap] = {
            "plan": plan,
            "losses": losses,
            "grads": grads,
            "weights": weights,
            "buckets": 0 if reducer is None else len(reducer.buckets),
            "in_backward": 0 if reducer is None else reducer.started_in_backward,
        }
    return out


def _all_steps(model_dirs: list[Path], data: Path) -> list[dict]:
    return [_hf_steps(model_dir, data) for model_dir in model_dirs]


def _one_process(model_dirs: list[Path], data: Path, run: dict) -> list[dict]:
    steps = _all_steps(model_dirs, data)
    _train_watched(run)
    return steps


def _in_ranks(config_file: Path, model_dirs: list[Path], data: Path, run: dict) -> dict:
    """In every rank: ``_hf_steps`` of each model, a two-step sDPO run, then ``sdpo train``
    of ``config_file`` (refused; the command leaves the process group as it ends)."""
    out = {"models": _all_steps(model_dirs, data), "run": _train_watched(run)[1]["tokenize_calls"]}
    code, err, seen = _train_cli(config_file)
    return {"refused": (code, err, seen["tokenize_calls"]), **out}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / (a.abs().max().item() + 1e-30)


def test_transformers_models_on_two_ranks_train_as_one_process(tmp_path):
    """An untied Llama, and a Qwen2 (q/k/v biases) whose lm_head is its embedding: two
    optimizer steps each, and a whole two-step sDPO run of the Qwen2."""
    model_dirs = [
        write_hf_model(tmp_path / "llama", "LlamaConfig", seed=2),
        write_hf_model(tmp_path / "qwen2", "Qwen2Config", seed=3, tie_word_embeddings=True),
    ]
    data = write_pairs(tmp_path / "d.jsonl", n=23, seed=11)
    (tmp_path / "fsdp").mkdir()
    sharded = two_source_config(
        tmp_path / "fsdp",
        model_dirs[0],
        model={"implementation": "transformers"},
        train={"fsdp": True},
    )
    config_file = tmp_path / "fsdp.toml"
    write_resolved_config(config_from_dict(sharded), config_file)
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [_run_config(tmp_path, model_dirs[1], out) for out in (one, two)]
    for run in runs:
        run["model"]["implementation"] = "transformers"
    singles, ranks = _alongside(
        lambda: _one_process(model_dirs, data, runs[0]),
        tmp_path,
        _in_ranks,
        config_file,
        model_dirs,
        data,
        runs[1],
    )
    assert [r["run"] for r in ranks] == [1, 0]  # rank 0 alone read and tokenized the data
    _check_run(one, two)
    # train.fsdp: every rank exits with the input error before reading any data; rank 0 says
    # why and what to do
    assert [r["refused"][0] for r in ranks] == [EXIT_INPUT] * 2
    assert [r["refused"][2] for r in ranks] == [0, 0]
    said = ranks[0]["refused"][1]
    assert 'implementation = "transformers"' in said and "sdpo's own decoder" in said
    assert "train.fsdp = true; remove" in said and ranks[1]["refused"][1] == ""
    assert not Path(sharded["output_dir"]).exists()

    for m, (model_dir, single) in enumerate(zip(model_dirs, singles, strict=True)):
        _check_model(single, [r["models"][m] for r in ranks], model_dir)


def _check_run(one: Path, two: Path) -> None:
    """A two-step sDPO run (``adam_eps`` 1e-3) on two ranks wrote the files one process wrote,
    step folders of weights equal to 4e-9 and metrics to fp32 rounding."""

    def listing(out: Path) -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    assert listing(two) == listing(one)
    for t in (1, 2):
        a, b = _weights(one / f"step-{t}"), _weights(two / f"step-{t}")
        assert a.keys() == b.keys() and "lm_head.weight" not in a  # the tie kept
        for name, w in a.items():
            assert (w - b[name]).abs().max().item() <= 2e-8, (t, name)
    metrics_one, metrics_two = _metrics(one), _metrics(two)
    assert len(metrics_two) == len(metrics_one)
    for m1, m2 in zip(metrics_one, metrics_two, strict=True):
        assert m1.keys() == m2.keys()
        for k, v in m1.items():
            assert m2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def _check_model(single: dict, ranks: list[dict], model_dir: Path) -> None:
    assert single["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    initial = load_model(model_dir, implementation="transformers").hf_model.state_dict()
    for overlap in (True, False):
        want = single[overlap]
        assert len(want["plan"][0]) >= 3  # several micro-batches per step, dealt out whole
        for r, got in enumerate(ranks):
            got = got[overlap]
            assert got["plan"] == want["plan"], r
            if overlap:  # the reduction started inside the last backward, in many buckets
                assert got["buckets"] > 4 and got["in_backward"] > 0, r
            for t in range(STEPS):
                where = (model_dir.name, overlap, r, t)
                # the ranks sum the micro-batches' terms in another order than one process:
                # the losses agree to fp32 rounding (equal, or one unit in the last place) ...
                assert got["losses"][t] == pytest.approx(want["losses"][t], rel=1e-6), where
                # ... and so do the summed gradients: the first step's to 1.1e-7 of each
                # tensor's largest entry, the second's (at weights already apart) to 1.3e-6
                for name, g in want["grads"][t].items():
                    assert _rel(g, got["grads"][t][name]) <= (1e-6, 1e-5)[t], (*where, name)
                # the weights to 1.5e-4 of the learning rate (Qwen2's second step; 1.4e-5
                # for the Llama): Adam's update lr * g / (|g| + eps) turns the rounding of an
                # entry with |g| near eps into a share of lr
                for name, w in want["weights"][t].items():
                    diff = (w - got["weights"][t][name]).abs().max().item()
                    assert diff <= 5e-4 * LR, (*where, name, diff)
        # the ranks hold bitwise the same weights after every step
        for t in range(STEPS):
            for name, w in ranks[0][overlap]["weights"][t].items():
                assert torch.equal(w, ranks[1][overlap]["weights"][t][name]), (overlap, t, name)
        # the steps moved the weights, so the comparisons are not vacuous
        last = want["weights"][-1]
        assert sum(not torch.equal(w, initial[n]) for n, w in last.items()) == len(initial)
