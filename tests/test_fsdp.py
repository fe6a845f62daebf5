"""Sharded data parallelism (``train.fsdp``, FSDP2) with real ``torch.distributed`` (gloo, two
CPU processes): one optimizer step (untied and tied embeddings, uneven work per rank), the
scoring pass and a two-step sDPO run give what one process gives."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from sdpo.engine import sharding
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.scoring import score_pairs
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps
from sdpo.losses import LossConfig, dpo_loss
from tests.test_distributed import _close, _pairs, _spawn

LR = 1e-2
# several micro-batches per step (3 on one rank, 2 on the other: a filler pass) and a step of
# one pair (one rank runs a filler pass only)
CASES = [
    ("micro_batches", {"pairs_per_step": 9, "max_tokens_per_batch": 60}),
    ("one_pair", {"pairs_per_step": 1, "max_tokens_per_batch": 4096}),
]


def _shifted(ref, n):
    return type(ref)(
        pair_indices=ref.pair_indices,
        chosen_logps=ref.chosen_logps - 0.3 * torch.arange(n) % 1.1,
        rejected_logps=ref.rejected_logps + 0.2,
        chosen_tokens=ref.chosen_tokens,
        rejected_tokens=ref.rejected_tokens,
    )


def _step_and_scores(model_dir: Path, data: Path, fsdp: bool) -> dict:
    """One optimizer step per case and a scoring pass, in one process or on every rank."""
    pairs = _pairs(model_dir, data)
    model = load_pretrained(model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    if fsdp:
        model = sharding.shard_model(model, precision="fp32")
    scores = score_pairs(model, pairs, max_tokens_per_batch=80, impl="torch")
    steps = {}
    for name, settings in CASES:
        model = load_pretrained(model_dir)
        if fsdp:
            model = sharding.shard_model(model, precision="fp32")
            assert sharding.is_sharded(model)
        config = TrainConfig(learning_rate=LR, seed=3, fsdp=fsdp, **settings)
        trainer = DPOTrainer(
            model,
            config=config,
            loss_fn=partial(dpo_loss, config=LossConfig(beta=0.1)),
            kernels_impl="torch",
            progress=False,
        )
        plan = plan_steps(pairs, config, epoch=0)
        metrics = trainer.train_step(pairs, plan[0], _shifted(ref, len(pairs)))
        grads = {k: sharding.full_tensor(p.grad).clone() for k, p in model.named_parameters()}
        weights = sharding.full_state_dict(model) if fsdp else model.state_dict()
        steps[name] = {
            "metrics": {k: float(v) for k, v in metrics.items()},
            "weights": {k: v.detach().clone() for k, v in weights.items()},
            "grads": grads,
            "plan": plan[0],
        }
    return {"scores": scores, "steps": steps}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def step_results(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_step")
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS, write_pairs

    model_dir = write_tiny_model(
        tmp / "model", words=WORDS, hidden_size=32, seed=1, tie_word_embeddings=request.param
    )
    data = write_pairs(tmp / "d.jsonl", n=23, seed=11)
    single = _step_and_scores(model_dir, data, False)
    ranks = _spawn(tmp, _step_and_scores, model_dir, data, True)
    return single, ranks


@pytest.mark.parametrize("case", [name for name, _ in CASES])
def test_one_sharded_step_equals_one_process(step_results, case):
    single, ranks = step_results
    want = single["steps"][case]
    if case == "micro_batches":
        assert len(want["plan"]) == 3  # 2 + 1 over the ranks: one filler pass
    for r, got in enumerate(ranks):
        got = got["steps"][case]
        assert got["plan"] == want["plan"]
        for k, v in want["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (r, k)
        # the reduce-scattered gradient is the single-process sum (not the mean over ranks),
        # lm_head (or the tied embedding) included
        assert want["grads"].keys() == got["grads"].keys()
        for name, g in want["grads"].items():
            assert _close(g, got["grads"][name]), (r, name)
    # rank 0 gathers the whole state dict; every weight within Adam's rounding of one process
    gathered = ranks[0]["steps"][case]["weights"]
    assert gathered.keys() == want["weights"].keys()
    assert ranks[1]["steps"][case]["weights"] == {}
    for name, w in want["weights"].items():
        assert (w - gathered[name]).abs().max().item() <= 1e-3 * LR, name


def test_sharded_scoring_equals_one_process(step_results):
    single, ranks = step_results
    want = single["scores"]
    for got in ranks:
        got = got["scores"]
        assert torch.equal(got.pair_indices, want.pair_indices)
        assert torch.allclose(got.chosen_logps, want.chosen_logps, rtol=1e-6, atol=1e-5)
        assert torch.allclose(got.rejected_logps, want.rejected_logps, rtol=1e-6, atol=1e-5)
