"""LoRA under data parallelism (two gloo processes on CPU): only the adapter's gradients are
reduced, and two optimizer steps on two ranks give the single process's adapter, with the frozen
weights untouched on every rank."""

from __future__ import annotations

from pathlib import Path

import torch

from sdpo.engine import distributed
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.lora import adapter_parameters, attach_lora, lora_state_dict
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tiny import write_tiny_model
from sdpo.engine.trainer import TrainConfig, plan_steps
from tests.conftest import WORDS, dpo_trainer, write_pairs
from tests.test_distributed import _pairs, _spawn

LR = 1e-2


def _two_lora_steps(model_dir: Path, data: Path) -> dict:
    """Two optimizer steps of a rank-3 adapter (the first moves B off zero, so the second
    gives A a gradient too); runs the same way in one process and in every rank."""
    pairs = _pairs(model_dir, data)
    model = load_pretrained(model_dir)
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    params = attach_lora(model, rank=3, alpha=6.0, seed=4)
    config = TrainConfig(learning_rate=LR, seed=3, pairs_per_step=9, max_tokens_per_batch=60)
    trainer = dpo_trainer(model, config)
    reduced = [] if trainer.grad_reducer is None else trainer.grad_reducer.buckets
    plan = plan_steps(pairs, config, epoch=0)
    for step in plan[:2]:
        trainer.train_step(pairs, step, ref)
    return {
        "adapter": lora_state_dict(model),
        "grads": [p.grad.clone() for p in params],
        "frozen": {
            n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
        },
        "reduced": {id(p) for bucket in reduced for p in bucket} == {id(p) for p in params},
        "world": distributed.world(),
        "adapter_count": len(adapter_parameters(model)),
    }


def test_two_lora_steps_on_two_ranks_equal_one_process(tmp_path):
    model_dir = write_tiny_model(tmp_path / "model", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp_path / "d.jsonl", n=23, seed=11)
    single = _two_lora_steps(model_dir, data)
    ranks = _spawn(tmp_path, _two_lora_steps, model_dir, data)
    initial = load_pretrained(model_dir).state_dict()
    for r, got in enumerate(ranks):
        assert got["world"] == 2 and got["reduced"], r  # the reducer holds the adapter only
        for name, w in single["adapter"].items():
            scale = w.abs().max().item()
            assert (w - got["adapter"][name]).abs().max().item() <= 1e-3 * LR + 1e-6 * scale
        for g, h in zip(single["grads"], got["grads"], strict=True):
            assert (g - h).abs().max().item() <= 1e-5 * (g.abs().max().item() + 1e-12), r
        for name, w in got["frozen"].items():
            assert torch.equal(w, initial[name]), (r, name)
    for name, w in ranks[0]["adapter"].items():
        assert torch.equal(w, ranks[1]["adapter"][name]), name
    # the steps moved both A and B, so the comparison is not vacuous
    moved = [name for name, w in single["adapter"].items() if w.abs().sum() > 0]
    assert any(n.endswith("lora_B") for n in moved)
    assert all(g.abs().sum() > 0 for g in single["grads"])
