"""Data parallelism with real ``torch.distributed`` (gloo, two CPU processes spawned here): one
optimizer step, the scoring pass and a whole two-step sDPO run under two ranks give what one
process gives, and the shard rules divide work exactly once and evenly."""

from __future__ import annotations

import os
import socket
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sdpo.engine import distributed
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps
from sdpo.losses import LossConfig, dpo_loss
from tests.conftest import write_pairs

WORLD = 2
LR = 1e-2
# (name, train settings): several micro-batches per step (dealt out whole), one micro-batch
# (its pairs dealt out), and a step of one pair (one rank has nothing to do)
TRAIN_CASES = [
    ("micro_batches", {"pairs_per_step": 9, "max_tokens_per_batch": 60}),
    ("split_pairs", {"pairs_per_step": 7, "max_tokens_per_batch": 4096}),
    ("one_pair", {"pairs_per_step": 1, "max_tokens_per_batch": 4096}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: Path, task, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        assert distributed.init_from_env()
        result = task(*args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        distributed.shutdown()


def _spawn(tmp_path: Path, task, *args) -> list:
    """Run ``task(*args)`` in WORLD processes of one gloo group; their results in rank order."""
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    try:
        mp.spawn(_worker, args=(WORLD, _free_port(), out, task, args), nprocs=WORLD, join=True)
    except Exception as e:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{errors}") from e
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _pairs(model_dir: Path, data: Path):
    rows = read_preference_file(str(data), source="s")
    pairs, _ = tokenize_pairs(
        rows, PairTokenizer.from_dir(model_dir), max_length=32, max_prompt_length=16
    )
    return pairs


def _step_and_scores(model_dir: Path, data: Path) -> dict:
    """One optimizer step per case from the same initial weights, and a scoring pass; runs the
    same way in one process and in every rank."""
    pairs = _pairs(model_dir, data)
    model = load_pretrained(model_dir)
    # the reference table is the single-process one everywhere, so only the step differs
    ref = score_pairs(model, pairs, max_tokens_per_batch=4096, impl="torch", data_parallel=False)
    scores = score_pairs(model, pairs, max_tokens_per_batch=80, impl="torch")
    steps = {}
    for name, settings in TRAIN_CASES:
        model = load_pretrained(model_dir)
        config = TrainConfig(learning_rate=LR, seed=3, **settings)
        trainer = DPOTrainer(
            model,
            config=config,
            loss_fn=partial(dpo_loss, config=LossConfig(beta=0.1)),
            kernels_impl="torch",
            progress=False,
        )
        plan = plan_steps(pairs, config, epoch=0)
        # the ref table was scored before training: perturb it so rewards are not all zero
        shifted = type(ref)(
            pair_indices=ref.pair_indices,
            chosen_logps=ref.chosen_logps - 0.3 * torch.arange(len(pairs)) % 1.1,
            rejected_logps=ref.rejected_logps + 0.2,
            chosen_tokens=ref.chosen_tokens,
            rejected_tokens=ref.rejected_tokens,
        )
        metrics = trainer.train_step(pairs, plan[0], shifted)
        steps[name] = {
            "metrics": {k: float(v) for k, v in metrics.items()},
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "plan": plan[0],
        }
    initial = load_pretrained(model_dir).state_dict()
    return {"scores": scores, "steps": steps, "initial": initial}


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_step")
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    model_dir = write_tiny_model(tmp / "model", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp / "d.jsonl", n=23, seed=11)
    single = _step_and_scores(model_dir, data)
    ranks = _spawn(tmp, _step_and_scores, model_dir, data)
    return single, ranks, _pairs(model_dir, data)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    scale = a.abs().max().item() + 1e-12
    return (a - b).abs().max().item() <= rel * scale + 1e-7


@pytest.mark.parametrize("case", [name for name, _ in TRAIN_CASES])
def test_one_step_on_two_ranks_equals_one_process(step_results, case):
    single, ranks, _ = step_results
    want = single["steps"][case]
    plan = want["plan"]
    if case == "micro_batches":
        assert len(plan) >= 3  # dealt out whole, unevenly
    elif case == "split_pairs":
        assert len(plan) == 1 and len(plan[0]) == 7
    for r, got in enumerate(ranks):
        got = got["steps"][case]
        assert got["plan"] == plan  # every rank builds the same plan
        for k, v in want["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (r, k)
        # the summed gradient is the single-process one to fp32 rounding ...
        for name, g in want["grads"].items():
            assert _close(g, got["grads"][name]), (r, name)
        # ... and so are the weights, up to Adam's first update lr * g / (|g| + eps), which
        # turns the rounding of an entry with |g| near eps into up to a thousandth of lr
        for name, w in want["weights"].items():
            assert (w - got["weights"][name]).abs().max().item() <= 1e-3 * LR, (r, name)
    # the ranks hold bitwise the same weights after the step
    for name, w in ranks[0]["steps"][case]["weights"].items():
        assert torch.equal(w, ranks[1]["steps"][case]["weights"][name]), name
    # the step moved the weights, so the comparison above is not vacuous
    before = single["initial"]
    assert all(not torch.equal(before[k], w) for k, w in want["weights"].items())


def test_sharded_scoring_equals_one_process(step_results):
    single, ranks, _ = step_results
    want = single["scores"]
    for got in ranks:
        got = got["scores"]
        assert torch.equal(got.pair_indices, want.pair_indices)
        assert torch.equal(got.chosen_tokens, want.chosen_tokens)
        assert torch.allclose(got.chosen_logps, want.chosen_logps, rtol=1e-6, atol=1e-5)
        assert torch.allclose(got.rejected_logps, want.rejected_logps, rtol=1e-6, atol=1e-5)
    assert torch.equal(ranks[0]["scores"].chosen_logps, ranks[1]["scores"].chosen_logps)
