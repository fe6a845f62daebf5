"""Sharded data parallelism (``train.fsdp``, FSDP2) with real ``torch.distributed`` (gloo, two
CPU processes): one optimizer step (untied and tied embeddings, uneven work per rank), the
scoring pass and a two-step sDPO run give what one process gives."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.config import config_from_dict
from sdpo.engine import sharding
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.scoring import score_pairs
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps
from sdpo.losses import LossConfig, dpo_loss
from sdpo.runner import run_training
from tests.test_distributed import _close, _pairs, _run_config, _spawn

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


def _train(config: dict, resume: bool = False):
    try:
        result = run_training(config_from_dict(config), progress=False, resume=resume)
    except Exception as e:
        return type(e).__name__, str(e)
    return result.scoring_calls


def test_two_step_sdpo_run_sharded_writes_what_one_process_writes(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    config = _run_config(tmp_path, tiny_model_dir, one)
    calls_one = _train(config)
    sharded = {**_run_config(tmp_path, tiny_model_dir, two)}
    sharded["train"] = {**sharded["train"], "fsdp": True}
    assert _spawn(tmp_path, _train, sharded) == [calls_one] * 2
    for t in (1, 2):  # the gathered weights, written by rank 0 as a Hugging Face folder
        a = load_file(str(one / f"step-{t}" / "model.safetensors"))
        b = load_file(str(two / f"step-{t}" / "model.safetensors"))
        assert a.keys() == b.keys()
        for name, w in a.items():
            assert (w - b[name]).abs().max().item() <= 1e-5, (t, name)
    # mid-step checkpoints hold the gathered weights too
    mid = sorted((two / "checkpoints").iterdir())[0]
    assert load_file(str(mid / "model" / "model.safetensors")).keys() == a.keys()
    # ... and no optimizer state: the model was sharded (a plain run saves its optimizer)
    assert torch.load(mid / "trainer_state.pt", weights_only=True)["optimizer"] is None
    plain = sorted((one / "checkpoints").iterdir())[0] / "trainer_state.pt"
    assert torch.load(plain, weights_only=True)["optimizer"] is not None
    # the caches of the sharded run equal one process's (the fingerprint of the gathered model
    # is the unsharded one's, so the keys agree)
    for name in ("initial", "step-2"):
        x = load_file(str(one / "cache" / f"{name}.safetensors"))
        y = load_file(str(two / "cache" / f"{name}.safetensors"))
        for k, v in x.items():
            if v.is_floating_point():
                assert torch.allclose(v, y[k], rtol=1e-6, atol=1e-5), (name, k)
    assert (one / "metrics.jsonl").read_text().count("\n") == (
        two / "metrics.jsonl"
    ).read_text().count("\n")

    # resuming a sharded run is refused on every rank, before anything is touched
    errors = _spawn(tmp_path, _train, sharded, True)
    assert errors[0] == errors[1] and errors[0][0] == "OutputDirError"
    assert "train.fsdp" in errors[0][1]


def test_fsdp_in_one_process_is_the_plain_run(tiny_model_dir, tmp_path):
    """No process group: train.fsdp changes nothing (a world of one has nothing to shard)."""
    assert not sharding.wanted(True)
    with pytest.raises(RuntimeError, match="more than one rank"):
        sharding.shard_model(load_pretrained(tiny_model_dir), precision="fp32")
    with pytest.raises(ValueError, match="fsdp must be true or false"):
        TrainConfig(fsdp="yes")
