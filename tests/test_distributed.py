"""Data parallelism with real ``torch.distributed`` (gloo, two CPU processes spawned here): one
optimizer step, the scoring pass and a whole two-step sDPO run under two ranks give what one
process gives, and the shard rules divide work exactly once and evenly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import sdpo.engine.token_cache as token_cache_mod
import sdpo.runner as runner_mod
from sdpo.cli import EXIT_INPUT
from sdpo.config import config_from_dict, write_resolved_config
from sdpo.engine import distributed
from sdpo.engine.checkpoint import load_pretrained
from sdpo.engine.data import read_preference_file
from sdpo.engine.scoring import score_pairs
from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
from sdpo.engine.trainer import TrainConfig, plan_steps, shard_micro_batches
from sdpo.runner import run_training
from tests.conftest import dpo_trainer, torchrun_env, write_pairs

WORLD = 2
LR = 1e-2
# a launch of ranks that has not ended after this long hangs (the slowest takes about 40 s on
# two shared cores), rather than wait for gloo's own timeout of 30 minutes
RANKS_TIMEOUT_S = 300
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


def _worker(rank: int, world: int, port: int, out: Path, task, args, env: dict, cwd: str) -> None:
    # a forkserver child starts from the server's environment and folder: take the test's
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
        distributed.shutdown()
        raise
    distributed.shutdown(wait=True)


# Imported once by the forkserver, then shared by every rank forked from it: a fresh interpreter
# per rank (the "spawn" method) spent seconds importing torch and the engine for every launch.
# (datasets and matplotlib's figure and Agg canvas: what a run reads its data and draws its plot
# with, about 2 s of imports in every launch of ranks that runs sdpo)
_PRELOAD = [
    "tests.test_distributed",
    "sdpo.engine.sharding",
    "torch._dynamo",
    "datasets",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
]


def preload_in_ranks(*modules: str) -> None:
    """Have the forkserver import ``modules`` too, for a test module whose ranks need more than
    ``_PRELOAD`` (transformers' modeling code: about a second of imports in every rank). Call it
    when that module is imported, at collection: the forkserver starts with the first launch of
    ranks and keeps the imports it started with."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _start(tmp_path: Path, task, *args) -> Callable[[], list]:
    """Start ``task(*args)`` in WORLD processes of one gloo group; returns the function that
    waits for them and gives their results in rank order.

    The ranks are forked from one forkserver process (started on the first call, single-threaded,
    with torch and the engine imported but nothing initialised), each a new process that joins
    a new process group; ``task`` and its module are loaded by reference as under "spawn"."""
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    mp.set_forkserver_preload(_PRELOAD)
    env, cwd = dict(os.environ), os.getcwd()
    context = mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), out, task, args, env, cwd),
        nprocs=WORLD,
        join=False,
        start_method="forkserver",
    )

    deadline = time.monotonic() + RANKS_TIMEOUT_S

    def results() -> list:
        try:
            finished = context.join(timeout=1.0)
            while not finished and time.monotonic() < deadline:
                finished = context.join(timeout=1.0)
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
            raise AssertionError(f"a rank failed:\n{errors}") from e
        if not finished:  # a rank waits in a collective that another never issued
            for process in context.processes:
                process.kill()
            raise AssertionError(
                f"the ranks did not finish within {RANKS_TIMEOUT_S} s: a hang (every rank must "
                "issue the same collectives in the same order)"
            )
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    return results


def _spawn(tmp_path: Path, task, *args) -> list:
    """Run ``task(*args)`` in WORLD processes of one gloo group; their results in rank order."""
    return _start(tmp_path, task, *args)()


def _alongside(here: Callable[[], object], tmp_path: Path, task, *args) -> tuple[object, list]:
    """``(here(), _spawn(tmp_path, task, *args))`` with ``here`` run in this process (on one
    thread, as each rank) while the ranks run: a one-process reference computed alongside."""
    results = _start(tmp_path, task, *args)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        value = here()
    finally:
        torch.set_num_threads(before)
        ranks = results()  # never leave the ranks behind, even when ``here`` failed
    return value, ranks


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
    scores = score_pairs(model, pairs, max_tokens_per_batch=80, impl="torch", return_aligned=True)
    # the ref table was scored before training: perturb it so rewards are not all zero
    shifted = type(ref)(
        pair_indices=ref.pair_indices,
        chosen_logps=ref.chosen_logps - 0.3 * torch.arange(len(pairs)) % 1.1,
        rejected_logps=ref.rejected_logps + 0.2,
        chosen_tokens=ref.chosen_tokens,
        rejected_tokens=ref.rejected_tokens,
    )
    steps = {}
    for name, settings in TRAIN_CASES:
        # default: the gradient all-reduce overlaps the last backward, here in buckets of 2 KiB
        # (many buckets even for the tiny model), with recomputed layers in one variant;
        # then the same step with one all-reduce after the backward
        for variant, overlap, recompute in (
            ("", True, False),
            ("/recompute", True, True),
            ("/after_backward", False, False),
        ):
            if variant and distributed.world() == 1:
                continue
            model = load_pretrained(model_dir)
            model.gradient_checkpointing = recompute
            config = TrainConfig(learning_rate=LR, seed=3, overlap_grad_reduce=overlap, **settings)
            trainer = dpo_trainer(model, config)
            buckets = started = 0
            events: list[str] = []  # gradients accumulated and buckets started, in order
            if trainer.grad_reducer is not None:
                reducer = trainer.grad_reducer = distributed.GradReducer(
                    model.parameters(), bucket_bytes=2048
                )
                buckets = len(reducer.buckets)
                start = reducer._start
                reducer._start = lambda i, start=start, ev=events: (ev.append("start"), start(i))
                for p in model.parameters():
                    p.register_post_accumulate_grad_hook(lambda p, ev=events: ev.append("grad"))
            plan = plan_steps(pairs, config, epoch=0)
            metrics = trainer.train_step(pairs, plan[0], shifted)
            if trainer.grad_reducer is not None:
                started = trainer.grad_reducer.started_in_backward
            # gradients accumulated after the first bucket's all-reduce had started
            after_first = (
                len(events) - events.index("start") - events.count("start") if events else 0
            )
            steps[name + variant] = {
                "metrics": {k: float(v) for k, v in metrics.items()},
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                "plan": plan[0],
                "buckets": buckets,
                "started_in_backward": started,
                "grads_after_first_start": after_first,
            }
    # a parameter no forward uses (an expert of a mixture no token was routed to, on any rank):
    # no gradient in one process, so AdamW leaves it alone, weight decay on; so on two ranks
    unrouted = {}
    for overlap in (True, False):
        model = load_pretrained(model_dir)
        model.unrouted = torch.nn.Parameter(torch.ones(4, 4))
        config = TrainConfig(
            learning_rate=LR, seed=3, pairs_per_step=9, max_tokens_per_batch=60,
            weight_decay=0.1, overlap_grad_reduce=overlap,
        )  # fmt: skip
        trainer = dpo_trainer(model, config)
        head = model.lm_head_weight.detach().clone()
        trainer.train_step(pairs, plan_steps(pairs, config, epoch=0)[0], shifted)
        unrouted[overlap] = {
            "grad": model.unrouted.grad,
            "weight": model.unrouted.detach().clone(),
            "state": len(trainer.optimizer.state[model.unrouted]),
            "moved": not torch.equal(model.lm_head_weight, head),
        }
    initial = load_pretrained(model_dir).state_dict()
    return {"scores": scores, "steps": steps, "initial": initial, "unrouted": unrouted}


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_step")
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    model_dir = write_tiny_model(tmp / "model", words=WORDS, hidden_size=32, seed=1)
    data = write_pairs(tmp / "d.jsonl", n=23, seed=11)
    single, ranks = _alongside(
        lambda: _step_and_scores(model_dir, data), tmp, _step_and_scores, model_dir, data
    )
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


@pytest.mark.parametrize("case", [name for name, _ in TRAIN_CASES])
def test_overlapped_gradient_reduction_equals_one_all_reduce_after_the_backward(step_results, case):
    _, ranks, _ = step_results
    ran_backward = []
    for r, got in enumerate(ranks):
        overlapped, plain = got["steps"][case], got["steps"][case + "/after_backward"]
        # elementwise sums of two ranks: the same bits whatever the bucketing
        for name, g in plain["grads"].items():
            assert torch.equal(g, overlapped["grads"][name]), (r, name)
            assert torch.equal(g, got["steps"][case + "/recompute"]["grads"][name]), (r, name)
        for name, w in plain["weights"].items():
            assert torch.equal(w, overlapped["weights"][name]), (r, name)
        assert plain["metrics"] == overlapped["metrics"]
        # the reduction really was bucketed and ran during the backward: on a rank that ran a
        # backward every bucket started from a gradient hook, the first while most gradients
        # of the last micro-batch were still to come; on a rank without micro-batches none
        assert overlapped["buckets"] >= 10
        assert plain["buckets"] == 0
        n_params = len(plain["grads"])
        for variant in ("", "/recompute"):
            step = got["steps"][case + variant]
            started = step["started_in_backward"]
            assert started in (0, overlapped["buckets"]), (r, started)
            if started:
                assert step["grads_after_first_start"] >= n_params // 2, (r, variant)
            ran_backward.append(started > 0)
    if case == "one_pair":
        assert sorted(ran_backward) == [False, False, True, True]
    else:
        assert all(ran_backward)


def test_a_parameter_no_rank_gave_a_gradient_is_left_alone_as_in_one_process(step_results):
    """An expert no token was routed to on any rank: one process has no gradient for it and
    AdamW skips it (no weight decay, no state); two ranks, overlapped or not, leave it so too
    instead of stepping on summed zeros."""
    single, ranks, _ = step_results
    for process in (single, *ranks):
        for overlap in (True, False):
            got = process["unrouted"][overlap]
            assert got["moved"]  # the step ran
            assert got["grad"] is None and got["state"] == 0, overlap
            assert torch.equal(got["weight"], torch.ones(4, 4)), overlap


def _tied_overlap_step(model_dir: Path, data: Path) -> dict:
    """One step with a tied embedding (one weight used by the lookup and the head) under the
    overlapped reduction in small buckets, and the same step reduced after the backward."""
    pairs = _pairs(model_dir, data)
    ref = score_pairs(load_pretrained(model_dir), pairs, max_tokens_per_batch=4096, impl="torch")
    out = {}
    for overlap in (True, False):
        model = load_pretrained(model_dir)
        assert model.config.tie_word_embeddings
        config = TrainConfig(
            learning_rate=LR, seed=3, pairs_per_step=9, max_tokens_per_batch=60,
            overlap_grad_reduce=overlap,
        )  # fmt: skip
        trainer = dpo_trainer(model, config)
        if overlap:
            trainer.grad_reducer = distributed.GradReducer(model.parameters(), bucket_bytes=2048)
        trainer.train_step(pairs, plan_steps(pairs, config, epoch=0)[0], ref)
        out[overlap] = {
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "started": trainer.grad_reducer.started_in_backward if overlap else 0,
            "buckets": len(trainer.grad_reducer.buckets) if overlap else 0,
        }
    return out


def test_overlapped_reduction_of_a_tied_embedding_equals_the_plain_one(tmp_path):
    from sdpo.engine.tiny import write_tiny_model
    from tests.conftest import WORDS

    model_dir = write_tiny_model(
        tmp_path / "model", words=WORDS, hidden_size=32, seed=2, tie_word_embeddings=True
    )
    data = write_pairs(tmp_path / "d.jsonl", n=17, seed=12)
    for got in _spawn(tmp_path, _tied_overlap_step, model_dir, data):
        assert got[True]["buckets"] >= 10 and got[True]["started"] == got[True]["buckets"]
        for name, g in got[False]["grads"].items():
            assert torch.equal(g, got[True]["grads"][name]), name


class _CollectiveLog:
    """Stands in for ``torch.distributed`` under ``GradReducer``: each all-reduce it is asked
    for is logged with the values it would sum (which parameters' gradients), each wait too."""

    class ReduceOp:
        SUM = "sum"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | list[float]]] = []

    def all_reduce(self, tensor, op, async_op=False):
        assert async_op and op == "sum"
        self.calls.append(("start", tensor.tolist()))
        index = len(self.calls) - 1
        log = self.calls

        class Work:
            def wait(self) -> None:
                log.append(("wait", index))

        return Work()


def test_gradient_buckets_start_in_one_order_whatever_order_the_backward_gives(monkeypatch):
    """Every rank must issue the same collectives in the same order (NCCL hangs otherwise),
    though a rank's backward may finish its gradients in another order: a bucket starts only
    when it and every bucket before it are complete, and ``finish`` waits for each started
    reduction before the optimizer may read the gradients. A rank that ran no backward starts
    the same buckets, in the same order, with zeros."""
    fake = _CollectiveLog()
    monkeypatch.setattr(distributed, "_dist", lambda: fake)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(6)]  # 8 bytes each
    # two per bucket, last parameters first (the order a backward finishes them): p5 p4, p3 p2,
    # p1 p0
    reducer = distributed.GradReducer(params, bucket_bytes=16)
    position = {id(p): i for i, p in enumerate(params)}
    bucket_of = {id(p): b for b, ps in enumerate(reducer.buckets) for p in ps}
    assert [[position[id(p)] for p in b] for b in reducer.buckets] == [[5, 4], [3, 2], [1, 0]]
    reducer.begin()
    for i in (1, 5, 0, 4, 3, 2):  # this rank's backward: bucket 2 completes first
        params[i].grad = torch.full((2,), float(i))
        reducer._on_grad(bucket_of[id(params[i])], params[i])  # its post-accumulate hook
        if i == 4:  # bucket 0 complete: it starts; bucket 1 is not, so bucket 2 waits
            assert [c for c, _ in fake.calls] == ["start"]
    reducer.finish()
    starts = [v for c, v in fake.calls if c == "start"]
    assert starts == [[5, 5, 4, 4], [3, 3, 2, 2], [1, 1, 0, 0]]
    assert [c for c, _ in fake.calls] == ["start"] * 3 + ["wait"] * 3
    assert reducer.started_in_backward == 3
    fake.calls.clear()
    for p in params:
        p.grad = None
    reducer.finish()  # a rank without micro-batches: never armed
    assert [v for c, v in fake.calls if c == "start"] == [[0.0] * 4] * 3
    assert [c for c, _ in fake.calls] == ["start"] * 3 + ["wait"] * 3


# (fused AdamW, case): where each rank is asked for a stop, rank -> (before or after its
# all-reduce, in which optimizer step)
STOP_CASES = {
    (fused, case): asks
    for fused in (False, True)
    for case, asks in (
        ("before", {1: ("before", 3)}),
        ("after", {1: ("after", 3)}),
        ("rank 0 after rank 1", {1: ("before", 3), 0: ("after", 3)}),
        ("rank 0 a step after rank 1", {1: ("before", 3), 0: ("before", 4)}),
    )
    # without fused AdamW the stop agreed in step 3 follows step 3: rank 0 never reaches step 4
    if fused or case != "rank 0 a step after rank 1"
}


def _stop_asked_on_some_ranks(model_dir: Path, data: Path) -> dict:
    """A graceful stop asked for on rank 1 in optimizer step 3, before its reduction and after
    it, and on rank 0 after rank 1, with the foreach optimizer (the flag read in each step) and
    fused AdamW (a step's values read after the next is queued); what each rank would say when
    asked. Then a step of two micro-batches, one for each rank, the second holding a token id
    outside the vocabulary, given to train_step directly: what each rank raises."""
    from sdpo.engine.trainer import TrainingStopped, build_optimizer
    from sdpo.runner import stop_received_message

    pairs = _pairs(model_dir, data)
    ref = score_pairs(load_pretrained(model_dir), pairs, max_tokens_per_batch=4096, impl="torch")
    out = {}
    for (fused, case), asks in STOP_CASES.items():
        model = load_pretrained(model_dir)
        config = TrainConfig(learning_rate=LR, pairs_per_step=3, max_tokens_per_batch=60)
        trainer = dpo_trainer(model, config)
        trainer.optimizer = build_optimizer(model, config, fused=fused)
        asked: list[str] = []  # what this rank says when asked
        trainer.stop_requested = lambda asked=asked: bool(asked)
        mine = asks.get(distributed.rank())

        def ask(when: str, trainer=trainer, asked=asked, mine=mine) -> None:
            if mine == (when, trainer.step_begun) and not asked:
                asked.append(stop_received_message("SIGTERM", phase="", trainer=trainer))

        def train_step(*args, step=trainer.train_step, ask=ask):
            ask("before")  # the reduction reads the flag inside the step
            metrics = step(*args)
            ask("after")
            return metrics

        trainer.train_step = train_step
        saved = []
        trainer.save_checkpoint = lambda t, saved=saved: saved.append(t.global_step)
        try:
            trainer.fit(pairs, ref)
            stopped = None
        except TrainingStopped as e:
            stopped = e.global_step
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        out[fused, case] = {
            "stopped": stopped,
            "saved": saved,
            "weights": flat,
            "said": asked[0] if asked else None,
        }
    vocab = model.lm_head_weight.shape[0]
    broken = [*pairs[:3], replace(pairs[3], chosen_ids=[vocab, *pairs[3].chosen_ids[1:]])]
    try:
        type(trainer).train_step(trainer, broken, [[0, 1], [2, 3]], ref)  # not the spy
        out["bad id"] = None
    except ValueError as e:
        out["bad id"] = str(e)
    return out


def test_a_stop_asked_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, tiny_model_dir):
    """The ranks agree on a stop in a step's all-reduce: asked inside step 3 before its own,
    they stop after step 3; after it, in step 4's. With fused AdamW a step's values are read
    once the next step is queued: a step later each. The rank asked says which step, rank 0
    too when rank 1 was asked first and its stop was agreed in an all-reduce rank 0 has done.
    A bad token id in one rank's share of a step is refused by every rank before any
    all-reduce (none waits for the other)."""
    data = write_pairs(tmp_path / "d.jsonl", n=17, seed=13)
    ranks = _spawn(tmp_path, _stop_asked_on_some_ranks, tiny_model_dir, data)
    expected = {  # the step each case stops after
        (False, "before"): 3,
        (False, "after"): 4,
        (False, "rank 0 after rank 1"): 3,
        (True, "before"): 4,
        (True, "after"): 5,
        (True, "rank 0 after rank 1"): 4,
        (True, "rank 0 a step after rank 1"): 4,
    }
    assert expected.keys() == STOP_CASES.keys()
    for case, step in expected.items():
        assert [r[case]["stopped"] for r in ranks] == [step, step], case
        assert [r[case]["saved"] for r in ranks] == [[step], [step]], case
        assert torch.equal(ranks[0][case]["weights"], ranks[1][case]["weights"]), case
        for rank, (_, asked_in) in STOP_CASES[case].items():
            said = ranks[rank][case]["said"]
            if step == asked_in:
                assert "SIGTERM received: finishing the current optimizer step" in said, case
            else:
                assert f"training stops after optimizer step {step}, not the one under way" in said
                assert f"({asked_in}) (data parallel: the ranks agree on a stop in" in said
    said = [r["bad id"] for r in ranks]
    assert said[0] == said[1] and "chosen_ids[0] holds token id" in said[0]


def test_sharded_scoring_equals_one_process(step_results):
    single, ranks, _ = step_results
    want = single["scores"]
    for got in ranks:
        got = got["scores"]
        assert torch.equal(got.pair_indices, want.pair_indices)
        assert torch.equal(got.chosen_tokens, want.chosen_tokens)
        assert torch.allclose(got.chosen_logps, want.chosen_logps, rtol=1e-6, atol=1e-5)
        assert torch.allclose(got.rejected_logps, want.rejected_logps, rtol=1e-6, atol=1e-5)
        for field in ("chosen_aligned", "rejected_aligned"):  # WPO's sums, gathered alike
            assert torch.allclose(getattr(got, field), getattr(want, field), rtol=1e-6, atol=1e-5)
    assert torch.equal(ranks[0]["scores"].chosen_logps, ranks[1]["scores"].chosen_logps)


def test_shard_rules_cover_every_item_once_and_balance_tokens(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", n=31, seed=12))
    for settings in (
        {"pairs_per_step": 11, "max_tokens_per_batch": 50},
        {"pairs_per_step": 5, "max_tokens_per_batch": 4096},
    ):
        plan = plan_steps(pairs, TrainConfig(**settings), epoch=0)
        for step in plan:
            for world in (2, 3, 8):
                shares = [
                    shard_micro_batches(
                        pairs,
                        step,
                        world_size=world,
                        rank=r,
                        max_tokens=settings["max_tokens_per_batch"],
                    )
                    for r in range(world)
                ]
                flat = sorted(i for share in shares for batch in share for i in batch)
                assert flat == sorted(i for batch in step for i in batch)
                for share in shares:
                    for batch in share:
                        assert (
                            sum(pairs[i].num_tokens for i in batch)
                            <= settings["max_tokens_per_batch"]
                        )
                tokens = [sum(pairs[i].num_tokens for b in s for i in b) for s in shares]
                biggest = max(sum(pairs[i].num_tokens for i in b) for b in step)
                if len(step) < world:  # pairs dealt out: off by at most one pair
                    biggest = max(pairs[i].num_tokens for b in step for i in b)
                assert max(tokens) - min(tokens) <= biggest
                # a loss over each micro-batch's tokens (a router's): the plan's micro-batches,
                # each whole on one rank, also when there are fewer than ranks
                whole = [
                    shard_micro_batches(
                        pairs,
                        step,
                        world_size=world,
                        rank=r,
                        max_tokens=settings["max_tokens_per_batch"],
                        whole_micro_batches=True,
                    )
                    for r in range(world)
                ]
                assert sorted(b for share in whole for b in share) == sorted(step)
    sizes = [pairs[i].num_tokens for i in range(len(pairs))]
    for world in (1, 2, 3, 40):
        bounds = distributed.contiguous_bounds(sizes, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def _run_config(tmp_path: Path, model_dir: Path, out: Path) -> dict:
    far = write_pairs(tmp_path / "far.jsonl", n=12, seed=1, kind="far")
    near = write_pairs(tmp_path / "near.jsonl", n=9, seed=2, kind="near")
    return {
        "output_dir": str(out),
        "model": {"path": str(model_dir)},
        "data": {
            "sources": [{"name": "far", "path": str(far)}, {"name": "near", "path": str(near)}],
            "max_length": 32,
            "max_prompt_length": 16,
            "eval_fraction": 0.15,
        },
        "train": {
            "learning_rate": 3e-3,
            "pairs_per_step": 4,
            "max_tokens_per_batch": 64,
            "save_every": 1,
            # Adam's update lr * g / (|g| + eps) magnifies the rounding of entries with |g| near
            # eps; a larger eps keeps one process and two ranks within a tight tolerance
            "adam_eps": 1e-3,
        },
        "kernels": {"impl": "torch"},
        "sdpo": {"steps": 2, "partition": "easy_to_hard", "report_scoring": True},
    }


def _train(config: dict, resume: bool = False) -> int:
    return run_training(config_from_dict(config), progress=False, resume=resume).scoring_calls


@contextlib.contextmanager
def _watched_inputs() -> Iterator[dict]:
    """Counts this process's calls that read and tokenize data (``tokenize_calls``) and keeps
    what ``load_inputs`` gave: the pairs, held-out pairs and places, or its error's text."""
    seen: dict = {"tokenize_calls": 0, "pack_calls": 0}
    tokenize, load_inputs = runner_mod._read_and_tokenize, runner_mod.StepwiseRunner.load_inputs
    pack = token_cache_mod.pack_pairs

    def counted(*args, **kwargs):
        seen["tokenize_calls"] += 1
        return tokenize(*args, **kwargs)

    def counted_pack(*args, **kwargs):
        seen["pack_calls"] += 1
        return pack(*args, **kwargs)

    def kept(self):
        try:
            tokenizer, pairs = load_inputs(self)
        except Exception as e:
            seen["error"] = f"{type(e).__name__}: {e}"
            raise
        seen.update(pairs=pairs, eval_pairs=self.eval_pairs, places=dict(self._rows_of_pairs))
        return tokenizer, pairs

    runner_mod._read_and_tokenize = counted
    runner_mod.StepwiseRunner.load_inputs = kept
    runner_mod.pack_pairs = token_cache_mod.pack_pairs = counted_pack
    try:
        yield seen
    finally:
        runner_mod._read_and_tokenize = tokenize
        runner_mod.StepwiseRunner.load_inputs = load_inputs
        runner_mod.pack_pairs = token_cache_mod.pack_pairs = pack


def _train_watched(config: dict, resume: bool = False) -> tuple[int, dict]:
    with _watched_inputs() as seen:
        return _train(config, resume), seen


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s",)} for line in lines
    ]


def test_two_step_sdpo_run_on_two_ranks_writes_what_one_process_writes(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    config_one = _run_config(tmp_path, tiny_model_dir, one)
    config_two = _run_config(tmp_path, tiny_model_dir, two)
    (calls_one, seen_one), ranks = _alongside(
        lambda: _train_watched(config_one), tmp_path, _train_watched, config_two
    )
    assert [calls for calls, _ in ranks] == [calls_one] * WORLD  # every rank scored every pass
    # rank 0 alone read and tokenized the data; every rank has one process's pairs, in order
    assert [seen["tokenize_calls"] for _, seen in ranks] == [1, 0]
    _assert_same_inputs(seen_one, [seen for _, seen in ranks])

    def listing(out: Path) -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    assert listing(two) == listing(one)  # the same files, written once, no leftovers
    # the token cache: rank 0 packed the pairs once, for the other ranks and its cache file,
    # which is the file one process writes
    token_caches = sorted(p.name for p in (one / "cache").glob("tokens-*.safetensors"))
    assert len(token_caches) == seen_one["pack_calls"] == 1
    assert [seen["pack_calls"] for _, seen in ranks] == [1, 0]
    for name in token_caches:
        assert _safetensors_parts(two / "cache" / name) == _safetensors_parts(one / "cache" / name)
    for t in (1, 2):
        a, b = _weights(one / f"step-{t}"), _weights(two / f"step-{t}")
        for name, w in a.items():
            assert (w - b[name]).abs().max().item() <= 1e-5, (t, name)
    metrics_one, metrics_two = _metrics(one), _metrics(two)
    assert len(metrics_two) == len(metrics_one)
    for m1, m2 in zip(metrics_one, metrics_two, strict=True):
        assert m1.keys() == m2.keys()
        for k, v in m1.items():
            assert m2[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for name in ("initial", "eval-initial", "step-2"):
        a = load_file(str(one / "cache" / f"{name}.safetensors"))
        b = load_file(str(two / "cache" / f"{name}.safetensors"))
        for k, v in a.items():
            if v.is_floating_point():
                assert torch.allclose(v, b[k], rtol=1e-6, atol=1e-5), (name, k)
            else:
                assert torch.equal(v, b[k]), (name, k)

    # resume on two ranks from the mid-step checkpoint of step 2: the same bits as before
    final = _weights(two / "step-2")
    lines = (two / "metrics.jsonl").read_text().splitlines()
    newest = sorted((two / "checkpoints").iterdir())[-1]
    shutil.rmtree(newest)  # the end-of-step checkpoint; the one before is inside step 2
    shutil.rmtree(two / "step-2")
    left = sorted((two / "checkpoints").iterdir())[-1]
    assert not json.loads((left / "progress.json").read_text())["step_finished"]
    assert json.loads((left / "progress.json").read_text())["sdpo_step"] == 2
    ranks = _spawn(tmp_path, _train_watched, _run_config(tmp_path, tiny_model_dir, two), True)
    assert [seen["tokenize_calls"] for _, seen in ranks] == [0, 0]  # rank 0 read the token cache
    _assert_same_inputs(seen_one, [seen for _, seen in ranks])
    for name, w in final.items():
        assert torch.equal(w, _weights(two / "step-2")[name]), name
    again = (two / "metrics.jsonl").read_text().splitlines()
    assert [_strip(x) for x in again] == [_strip(x) for x in lines]


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (the tensors' dtypes, shapes and offsets, and the metadata)
    and its data bytes: the file up to the order of the metadata keys, which safetensors writes
    in no fixed order."""
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _assert_same_inputs(one: dict, ranks: list[dict]) -> None:
    """Every rank's pairs (ids, order, indices, sources, flags) and held-out pairs are the
    one-process ones, and its places are those of its pairs."""
    assert one["pairs"] and one["eval_pairs"]
    for seen in ranks:
        assert seen["pairs"] == one["pairs"]
        assert seen["eval_pairs"] == one["eval_pairs"]
        all_pairs = [*one["pairs"], *one["eval_pairs"]]
        assert seen["places"] == {p.index: one["places"][p.index] for p in all_pairs}


def _strip(line: str) -> dict:
    d = json.loads(line)
    d.pop("tokens_per_s", None)
    return d


def _train_cli(config_file: Path) -> tuple[int, str, dict]:
    """``sdpo train --config config_file`` in this rank: its exit code, what it printed on
    stderr, and what ``_watched_inputs`` saw."""
    from sdpo.cli import main

    err = io.StringIO()
    with _watched_inputs() as seen, contextlib.redirect_stderr(err):
        code = main(["train", "--config", str(config_file), "--no-progress"])
    return code, err.getvalue(), seen


def test_bad_input_fails_on_every_rank_before_anything_is_written(tiny_model_dir, tmp_path):
    config = _run_config(tmp_path, tiny_model_dir, tmp_path / "out")
    held_out = write_pairs(tmp_path / "held_out.jsonl", n=6, seed=5)
    del config["data"]["eval_fraction"]
    config["data"]["eval_sources"] = [{"name": "held_out", "path": str(held_out)}]
    rows = held_out.read_text().splitlines()
    rows[4] = json.dumps({"prompt": "w1", "chosen": 3, "rejected": "w2"})
    held_out.write_text("\n".join(rows) + "\n")
    config_file = tmp_path / "run.toml"
    write_resolved_config(config_from_dict(config), config_file)
    ranks = _spawn(tmp_path, _train_cli, config_file)
    # rank 0 alone read and tokenized (the training data, then the bad held-out file); its error
    # is raised on every rank, which exits 2; rank 0 prints it
    assert [code for code, _, _ in ranks] == [EXIT_INPUT] * WORLD
    assert [seen["tokenize_calls"] for _, _, seen in ranks] == [2, 0]
    errors = [seen["error"] for _, _, seen in ranks]
    assert errors[0].startswith("RunInputError: ") and "held_out.jsonl, line 5" in errors[0]
    assert errors[1] == errors[0]
    assert "input error (nothing was written)" in ranks[0][1] and "line 5" in ranks[0][1]
    assert ranks[1][1] == ""
    assert not (tmp_path / "out").exists()


def _score_cli(args: list[str]) -> int:
    from sdpo.cli import main

    return main(args)


def _score_cli_twice(bad: list[str], good: list[str]) -> tuple[int, str, int, int]:
    """``sdpo score`` on bad data, then on good data, in this rank: the first's exit code and
    stderr, the second's exit code, and how many times this rank tokenized data in it."""
    import sdpo.engine.tokenize as tokenize_mod

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bad_code = _score_cli(bad)
    calls, tokenize = [0], tokenize_mod.tokenize_pairs

    def counted(*args, **kwargs):
        calls[0] += 1
        return tokenize(*args, **kwargs)

    tokenize_mod.tokenize_pairs = counted
    try:
        return bad_code, err.getvalue(), _score_cli(good), calls[0]
    finally:
        tokenize_mod.tokenize_pairs = tokenize


def test_sdpo_score_on_two_ranks_writes_what_one_process_writes(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=11, seed=8)
    bad_data = tmp_path / "bad.jsonl"
    rows = data.read_text().splitlines()
    rows[6] = json.dumps({"prompt": "w1", "chosen": 3, "rejected": "w2"})
    bad_data.write_text("\n".join(rows) + "\n")
    one, two, bad = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "bad-out.jsonl"
    base = ["score", "--model", str(tiny_model_dir), "--impl", "torch"]
    code_one, ranks = _alongside(
        lambda: _score_cli([*base, "--data", str(data), "--out", str(one)]),
        tmp_path,
        _score_cli_twice,
        [*base, "--data", str(bad_data), "--out", str(bad)],
        [*base, "--data", str(data), "--out", str(two)],
    )
    assert code_one == 0
    # bad data: rank 0's error on every rank, which exits 2; rank 0 prints it; nothing written
    assert [r[0] for r in ranks] == [EXIT_INPUT] * WORLD
    assert "sdpo: input error:" in ranks[0][1] and "line 7" in ranks[0][1]
    assert ranks[1][1] == ""
    assert not bad.exists()
    # rank 0 alone read and tokenized the data
    assert [r[2:] for r in ranks] == [(0, 1), (0, 0)]
    assert_same_score_rows(one, two)
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.jsonl"]  # written once


def assert_same_score_rows(one: Path, two: Path) -> None:
    """Two ``sdpo score --out`` files hold the same pairs, values to float rounding."""
    rows_one = [json.loads(x) for x in one.read_text().splitlines()]
    rows_two = [json.loads(x) for x in two.read_text().splitlines()]
    assert [r["index"] for r in rows_two] == [r["index"] for r in rows_one]
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("logp_chosen", "logp_rejected", "gamma"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)
        assert a["chosen_tokens"] == b["chosen_tokens"]


_LEAVE_GROUP = """
import json, os, sys
from pathlib import Path
from sdpo.engine import distributed
assert distributed.init_from_env(backend="gloo")
import torch
import torch._dynamo  # noqa: F401  (what a model's first init or compile imports, group up)
torch.distributed.all_reduce(torch.ones(3))
distributed.shutdown(wait=True)
threads = [(Path("/proc/self/task") / t / "comm").read_text().strip()
           for t in os.listdir("/proc/self/task")]
Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(threads))
# the program's end: Python's exit steps run and buffered output is kept
import atexit
atexit.register(lambda: Path(sys.argv[1], f"rank{os.environ['RANK']}.atexit").touch())
print(f"rank {os.environ['RANK']} done", end="")  # no newline: still in the buffer
distributed.exit_process(0)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_leaving_the_group_ends_the_backend_threads_and_the_program_exits_cleanly(tmp_path):
    # torch._dynamo imports torch.distributed.nn, whose default arguments would pin a group
    # that is already up; its gloo threads would then live on into the interpreter's
    # finalization, where a late tensor release aborts a rank whose work is done
    script = tmp_path / "leave.py"
    script.write_text(_LEAVE_GROUP)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run = subprocess.run(
        [*command, f"--nproc_per_node={WORLD}", str(script), str(tmp_path)],
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=300,  # a safety net against a hang, not a timing assertion
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in range(WORLD):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], (rank, threads)
        assert (tmp_path / f"rank{rank}.atexit").is_file()
        assert f"rank {rank} done" in run.stdout


@pytest.mark.parametrize(
    ("local_rank", "in_group", "current", "count", "expected"),
    [
        ("1", True, 0, 4, 1),  # torchrun: LOCAL_RANK, which init_from_env made current
        (None, True, 3, 4, 3),  # a group formed by hand after torch.cuda.set_device(3)
        (None, False, 2, 4, 2),  # no group: the current device
        ("1", False, 2, 4, 2),  # LOCAL_RANK without a group: the current device, as before
        ("3", True, 0, 1, 0),  # each process sees its own GPU only (CUDA_VISIBLE_DEVICES)
    ],
)
def test_cuda_index_is_local_rank_in_a_group_else_the_current_device(
    local_rank, in_group, current, count, expected
):
    got = distributed.cuda_index(
        local_rank=local_rank, in_group=in_group, current=current, count=count
    )
    assert got == expected


@pytest.mark.parametrize("value", ["gpu1", "-1"])
def test_a_local_rank_that_is_not_an_index_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=f"LOCAL_RANK is {value}|LOCAL_RANK is '{value}'"):
        distributed.cuda_index(local_rank=value, in_group=True, current=0, count=2)


def test_a_local_rank_past_several_visible_gpus_is_refused():
    """More ranks than GPUs on a node: a fallback to the current device would put two ranks on
    one GPU, so it is refused (one visible GPU per process is the case that falls back)."""
    with pytest.raises(ValueError, match="LOCAL_RANK is 5 but only 4 CUDA devices"):
        distributed.cuda_index(local_rank="5", in_group=True, current=0, count=4)


def test_device_of_a_group_formed_by_hand_is_the_current_cuda_device(monkeypatch):
    """A launcher that calls ``torch.cuda.set_device(k)`` and ``init_process_group`` itself,
    without torchrun's LOCAL_RANK, gets ``cuda:k`` (it got cuda:0, another rank's GPU). A real
    one-rank gloo group; this machine has no GPU, so the three CUDA queries device() reads are
    stood in for (and only those: nothing is placed on the device)."""
    import torch.distributed as dist

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with monkeypatch.context() as cuda:  # the stand-ins, for device()'s calls alone
            cuda.setattr(torch.cuda, "is_available", lambda: True)
            cuda.setattr(torch.cuda, "device_count", lambda: 4)
            cuda.setattr(torch.cuda, "current_device", lambda: 2)
            assert distributed.device() == torch.device("cuda", 2)
            cuda.setenv("LOCAL_RANK", "1")  # torchrun's: it wins
            assert distributed.device() == torch.device("cuda", 1)
    finally:
        dist.destroy_process_group()
