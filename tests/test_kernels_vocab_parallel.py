"""vocab_parallel_sequence_logprobs: the lm_head split by vocabulary rows over two gloo ranks
gives the per-sequence log-probs and the gradients of hidden and of each weight shard that
float64 truth from the whole weight gives, and a DPO step built from sdpo's public pieces on that
split head (reference values through a real cache file, the loss from sdpo.losses) gives what
the same step in one process gives (one launch of ranks runs every case).

Tolerance rule as the one-rank kernel tests: error vs float64 truth no worse than plain fp32
PyTorch over the whole vocabulary plus a small margin."""

from __future__ import annotations

import contextlib
import os
import re
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from sdpo.cache import CacheKey, RefLogprobCache, RefValues  # noqa: E402
from sdpo.kernels import sequence_logprobs, vocab_parallel_sequence_logprobs  # noqa: E402
from sdpo.kernels.logprobs import IGNORE_INDEX, rows_backward, rows_forward  # noqa: E402
from sdpo.kernels.vocab_parallel import _check_tiling, _combine, _VocabShard  # noqa: E402
from sdpo.losses import LossConfig, dpo_loss  # noqa: E402
from tests.conftest import assert_no_worse  # noqa: E402
from tests.test_distributed import WORLD, _spawn  # noqa: E402
from tests.test_kernels_linear import _batch, _LargestTensor, _naive_seq_logps  # noqa: E402

# name -> the batch (131 tokens over 6 packed sequences, one with a single completion token),
# where rank 0's rows end (rank 1 holds the rest), how each rank learns its first row, the impl
# and the tokens per chunk (48: two chunks and a ragged tail, cut through sequences)
CASES = {
    "uneven_torch": dict(seed=41, vocab=1001, hidden=67, cut=600, impl="torch", chunk=48),
    "uneven_triton": dict(seed=41, vocab=1001, hidden=67, cut=600, impl="triton", chunk=48),
    # torch's Shard(0) split of GPT-2's vocabulary over two ranks: 25,129 and 25,128 rows;
    # the largest tensor each rank makes is watched
    "gpt2_vocab": dict(
        seed=42, vocab=50_257, hidden=24, cut=25_129, impl="torch", chunk=64, watch=True
    ),
    "given_start_weighted": dict(
        seed=43, vocab=1001, hidden=67, cut=377, impl="torch", chunk=48, given=True, weights=True
    ),
    "empty_shard": dict(seed=44, vocab=1001, hidden=67, cut=1001, impl="torch", chunk=48),
    # as the one-rank bf16 test: the hidden-state gradient's sum over the ranks rounds once more
    "bf16": dict(
        seed=45,
        vocab=1001,
        hidden=67,
        cut=600,
        impl="torch",
        chunk=40,
        dtype=torch.bfloat16,
        tol={"rel_margin": 2e-3, "factor": 1.5},
    ),
}
# assert_no_worse's margins in fp32 (test_kernels_linear.py's)
FP32_TOL = {"rel_margin": 2e-6}


def _coeff(num_seqs: int) -> torch.Tensor:
    """The loss's per-sequence weights, so that every sequence's gradient differs."""
    return torch.linspace(-1.0, 2.0, num_seqs, dtype=torch.float64)


def _dims(case: dict) -> dict:
    return {
        "vocab": case["vocab"],
        "hidden": case["hidden"],
        "dtype": case.get("dtype", torch.float32),
    }


def _token_weights(case: dict, n: int) -> torch.Tensor | None:
    if not case.get("weights"):
        return None
    return torch.rand(n, generator=torch.Generator().manual_seed(case["seed"])) + 0.5


def _shard_run(case: dict, b: dict, *, hidden_grad: bool = True) -> dict:
    """This rank's call: its rows of the weight, the loss (seq * coeff).sum() backward."""
    rank = dist.get_rank()
    v0, v1 = (0, case["cut"]) if rank == 0 else (case["cut"], case["vocab"])
    h = b["h"].clone().requires_grad_(hidden_grad)
    w = b["w"][v0:v1].clone().requires_grad_(True)
    watch = _LargestTensor()
    with watch if case.get("watch") else contextlib.nullcontext():
        seq = _call(case, b, h, w, v0)
        if seq.requires_grad:
            (seq * _coeff(b["num_seqs"]).float()).sum().backward()
    return {
        "seq": seq.detach(),
        "grad_h": h.grad,
        "grad_w": w.grad,
        "rows": (v0, v1),
        "largest": watch.largest,
    }


def _call(case: dict, b: dict, h: torch.Tensor, w: torch.Tensor, v0: int) -> torch.Tensor:
    return vocab_parallel_sequence_logprobs(
        h,
        w,
        b["labels"],
        b["seq_ids"],
        b["num_seqs"],
        vocab_group=dist.group.WORLD,
        vocab_start=v0 if case.get("given") else None,
        impl=case["impl"],
        chunk_tokens=case["chunk"],
        token_weights=_token_weights(case, b["labels"].shape[0]),
    )


def _error(call) -> str:
    try:
        call()
    except (ValueError, TypeError) as e:
        return str(e)
    return "no error"


def _rank_checks(cache_path: Path) -> dict:
    """Every case on this rank, the DPO step, and the no-grad pass, a frozen hidden and the
    refusals."""
    out = {
        name: _shard_run(case, _batch(case["seed"], **_dims(case))) for name, case in CASES.items()
    }
    out["dpo_step"] = _dpo_step(cache_path)
    case = CASES["uneven_torch"]
    b = _batch(case["seed"], **_dims(case))
    with torch.no_grad():
        out["no_grad"] = _shard_run(case, b)["seq"]
    out["frozen_hidden"] = _shard_run(case, b, hidden_grad=False)
    rank = dist.get_rank()
    w = b["w"][:600] if rank == 0 else b["w"][600:]
    args = (b["seq_ids"], b["num_seqs"])
    beyond = b["labels"].clone()
    beyond[int((b["labels"] != IGNORE_INDEX).nonzero()[3, 0])] = 1001  # V: past the last row
    out["label_beyond_vocab"] = _error(
        lambda: vocab_parallel_sequence_logprobs(
            b["h"], w, beyond, *args, vocab_group=dist.group.WORLD, impl="torch"
        )
    )
    # both ranks say they start at 0: labels below 401 are in two shards, from 600 in none
    out["overlapping_starts"] = _error(
        lambda: vocab_parallel_sequence_logprobs(
            b["h"], w, b["labels"], *args, vocab_group=dist.group.WORLD, vocab_start=0
        )
    )
    # rank 1 starts its rows one early, [599, 1000): the shards overlap at 599 and leave 1000
    # to no one, and no scored label lies at either (none is in two shards or in none)
    off_by_one = b["labels"].masked_fill((b["labels"] == 599) | (b["labels"] == 1000), -100)
    out["off_by_one_start"] = _error(
        lambda: vocab_parallel_sequence_logprobs(
            b["h"], w, off_by_one, *args, vocab_group=dist.group.WORLD, vocab_start=(0, 599)[rank]
        )
    )
    # each rank passes its own part of the batch (data-parallel style): rank 1's scored tokens
    # are rank 0's prompt tokens, and the other way round
    split = b["labels"].clone()
    half = split.shape[0] // 2
    if rank == 0:
        split[half:] = IGNORE_INDEX
    else:
        split[:half] = IGNORE_INDEX
    out["labels_differ"] = _error(
        lambda: vocab_parallel_sequence_logprobs(
            b["h"], w, split, *args, vocab_group=dist.group.WORLD
        )
    )
    # a group of rank 0 alone: rank 1 is no member, and new_group gives it no ProcessGroup
    alone = dist.new_group([0])
    if rank == 1:
        out["not_a_member"] = _error(
            lambda: vocab_parallel_sequence_logprobs(
                b["h"], w, b["labels"], *args, vocab_group=alone
            )
        )
    # vocab_group=None: the default group, as torch.distributed's collectives read it
    out["group_none"] = vocab_parallel_sequence_logprobs(
        b["h"], w, b["labels"], *args, vocab_group=None, impl="torch", chunk_tokens=48
    )
    _refused_on_one_rank(b, w, out)
    mesh = init_device_mesh("cpu", (WORLD,))
    whole = distribute_tensor(b["w"], mesh, [Shard(0)])
    out["dtensor"] = _error(
        lambda: vocab_parallel_sequence_logprobs(
            b["h"], whole, b["labels"], *args, vocab_group=dist.group.WORLD
        )
    )
    return out


# a collective that waits longer than this on a group made for refusals is a hang: the other
# rank raised alone (the ranks reach each call within a second of each other on two shared
# cores; the eight cases' hangs together stay within the launch's RANKS_TIMEOUT_S)
REFUSAL_TIMEOUT_S = 30


def _error_or_hang(call) -> str | torch.Tensor:
    """The error ``call`` raises, else what it returns."""
    try:
        return call()
    except (ValueError, TypeError) as e:
        return str(e)
    except RuntimeError as e:  # gloo's timeout: this rank waited for one that had raised
        return f"hang: {e}"


def _refused_on_one_rank(b: dict, w: torch.Tensor, out: dict) -> None:
    """Inputs that fail a check on one rank only: both ranks must raise, neither wait. Each
    case has its own group (with a timeout, so that a hang fails the test) and ends with a good
    call on that group, which gives the training numbers only if no collective was left over."""
    rank = dist.get_rank()
    n, s = b["labels"].shape[0], b["num_seqs"]
    seq_ids = b["seq_ids"].clone()
    if rank == 1:
        seq_ids[7] = s  # one past the last sequence, on rank 1 alone
    changes = {
        "seq_id_past_num_seqs": dict(seq_ids=seq_ids),
        # rank 0 drops its last weight, and says where its rows start: no all_gather first
        "token_weights_shape": dict(
            token_weights=torch.ones(n - 1 if rank == 0 else n), vocab_start=(0, 600)[rank]
        ),
        "chunk_tokens_zero": dict(chunk_tokens=(48, 0)[rank]),
        # passed the ">= 1" check, then failed on rank 1 alone in its forward's chunk loop
        "chunk_tokens_not_an_int": dict(chunk_tokens=(48, 2.5)[rank]),
        # a list where a tensor goes: an AttributeError in the checks, raised on rank 1 alone
        "token_weights_a_list": dict(token_weights=(None, [1.0] * n)[rank]),
        # not a dtype: rank 1's backward failed before its all_reduce of hidden's gradient
        "grad_weight_dtype_a_name": dict(grad_weight_dtype=(torch.float32, "float32")[rank]),
        # hidden requires grad on rank 0 alone (the weight on both): rank 0's backward would
        # sum hidden's gradient over the group, rank 1's would not
        "hidden_grad_on_rank_0": dict(hidden=b["h"].clone().requires_grad_(rank == 0)),
        # rank 1 leaves out the last token: the all_reduces' sizes would differ
        "tokens_differ": dict(
            hidden=b["h"][: n - rank],
            labels=b["labels"][: n - rank],
            seq_ids=b["seq_ids"][: n - rank],
        ),
    }
    groups = {
        name: dist.new_group(timeout=timedelta(seconds=REFUSAL_TIMEOUT_S)) for name in changes
    }

    def step(group: dist.ProcessGroup, **change) -> torch.Tensor:
        given = {key: b[key] for key in ("labels", "seq_ids")} | {"hidden": b["h"]}
        given |= {"impl": "torch", "chunk_tokens": 48} | change
        hidden, labels, ids = (given.pop(key) for key in ("hidden", "labels", "seq_ids"))
        weight = w.clone().requires_grad_(True)
        seq = vocab_parallel_sequence_logprobs(
            hidden, weight, labels, ids, s, vocab_group=group, **given
        )
        seq.sum().backward()
        return seq.detach()

    for name, change in changes.items():
        out[f"{name}_error"] = _error_or_hang(lambda: step(groups[name], **change))  # noqa: B023
        out[f"{name}_after"] = _error_or_hang(lambda: step(groups[name]))  # noqa: B023


# The DPO walk-through: a training step of a policy whose lm_head is split over the ranks, from
# sdpo's public pieces. 3 pairs (rows 2p / 2p+1 of the batch's 6 sequences: chosen, rejected),
# rank 0 holding rows [0, 600) of 1001; the reference model's values scored by the same op,
# written by rank 0 to a reference cache and read back by every rank, the cache in pair-index
# order and the batch in its own; each loss computed on every rank, as tensor parallelism does
DPO = dict(seed=46, vocab=1001, hidden=67, cut=600)
PAIR_INDICES = [12, 3, 7]  # the batch's pairs, by their TokenizedPair.index
DPO_LOSSES = {
    "sigmoid": LossConfig(beta=0.1),
    "ipo": LossConfig(loss_type="ipo", beta=0.1),  # token-averaged: the cache's token counts
    "sigmoid_bco_rpo": LossConfig(
        loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], rpo_alpha=0.5, beta=0.1
    ),
}
DPO_KEY = CacheKey(
    model_fingerprint="reference",
    data_fingerprint="three pairs",
    tokenizer_fingerprint="ids",
    max_length=64,
    max_prompt_length=None,
    truncation="keep_end",
    dtype_policy="fp32",
    kernels_impl="torch",
)


def _reference_weight(b: dict) -> torch.Tensor:
    """(V, H) float64: the policy's lm_head before its training, a small step away from it."""
    gen = torch.Generator().manual_seed(7)
    return b["w64"] + 0.1 * torch.randn(b["w64"].shape, generator=gen, dtype=torch.float64)


def _completion_tokens(b: dict) -> torch.Tensor:
    """(S,) int64: each sequence's scored labels."""
    scored = (b["labels"] != IGNORE_INDEX).long()
    return torch.zeros(b["num_seqs"], dtype=torch.int64).index_add(0, b["seq_ids"], scored)


def _dpo_step(cache_path: Path) -> dict:
    """On this rank: the reference pass (no grad) and the cache, then for each loss one step's
    loss, rewards and the gradients of hidden and of this rank's rows."""
    b = _batch(DPO["seed"], vocab=DPO["vocab"], hidden=DPO["hidden"])
    rank = dist.get_rank()
    v0, v1 = (0, DPO["cut"]) if rank == 0 else (DPO["cut"], DPO["vocab"])
    batch = (b["labels"], b["seq_ids"], b["num_seqs"])
    with torch.no_grad():
        w_ref = _reference_weight(b).float()[v0:v1]
        ref = vocab_parallel_sequence_logprobs(b["h"], w_ref, *batch, vocab_group=None)
    if rank == 0:
        tokens = _completion_tokens(b)
        order = torch.argsort(torch.tensor(PAIR_INDICES))  # the cache by pair index
        values = RefValues(
            pair_indices=torch.tensor(PAIR_INDICES)[order],
            chosen_logps=ref[0::2][order],
            rejected_logps=ref[1::2][order],
            chosen_tokens=tokens[0::2][order],
            rejected_tokens=tokens[1::2][order],
        )
        RefLogprobCache(cache_path).save(values, DPO_KEY)
    dist.barrier()  # the file is whole before any rank reads it
    cached, why = RefLogprobCache(cache_path).load(DPO_KEY)
    assert cached is not None, why
    cached = cached.subset(PAIR_INDICES)  # the batch's pairs, in its order
    out = {"rows": (v0, v1)}
    for name, config in DPO_LOSSES.items():
        h = b["h"].clone().requires_grad_(True)
        w = b["w"][v0:v1].clone().requires_grad_(True)
        logps = vocab_parallel_sequence_logprobs(h, w, *batch, vocab_group=None)  # (6,)
        step = dpo_loss(
            logps[0::2],
            logps[1::2],
            cached.chosen_logps,
            cached.rejected_logps,
            config=config,
            chosen_tokens=cached.chosen_tokens,
            rejected_tokens=cached.rejected_tokens,
        )
        loss = step.losses.mean()
        loss.backward()
        out[name] = {
            "loss": loss.detach(),
            "chosen_rewards": step.chosen_rewards,
            "rejected_rewards": step.rejected_rewards,
            "grad_h": h.grad,
            "grad_w": w.grad,
        }
    return out


def _dpo_step_whole(b: dict, config: LossConfig, *, exact: bool) -> dict:
    """The same step in one process on the whole weight: ``sequence_logprobs`` (fp32), or, for
    ``exact``, plain PyTorch in float64 (the truth)."""
    dtype = torch.float64 if exact else torch.float32
    batch = (b["labels"], b["seq_ids"], b["num_seqs"])
    logps_of = _naive_seq_logps if exact else sequence_logprobs
    h = b["h64" if exact else "h"].clone().requires_grad_(True)
    w = b["w64" if exact else "w"].clone().requires_grad_(True)
    with torch.no_grad():
        ref = logps_of(h, _reference_weight(b).to(dtype), *batch)
    tokens = _completion_tokens(b)
    logps = logps_of(h, w, *batch)
    step = dpo_loss(
        logps[0::2],
        logps[1::2],
        ref[0::2],
        ref[1::2],
        config=config,
        chosen_tokens=tokens[0::2],
        rejected_tokens=tokens[1::2],
    )
    loss = step.losses.mean()
    loss.backward()
    return {
        "loss": loss.detach(),
        "chosen_rewards": step.chosen_rewards,
        "rejected_rewards": step.rejected_rewards,
        "grad_h": h.grad,
        "grad_w": w.grad,
    }


def _truth(b: dict, case: dict, *, exact: bool) -> tuple[torch.Tensor, ...]:
    """(seq_logps, grad_hidden, grad_weight) of (seq * coeff).sum() over the whole vocabulary:
    plain PyTorch in float64 (``exact``, the truth) or in the batch's dtype, the logits upcast
    to fp32 for the log-softmax (the baseline)."""
    h = (b["h64"] if exact else b["h"]).clone().requires_grad_(True)
    w = (b["w64"] if exact else b["w"]).clone().requires_grad_(True)
    dtype = torch.float64 if exact else torch.float32
    labels = b["labels"]
    logits = (h @ w.t()).to(dtype)
    logp = torch.log_softmax(logits, dim=-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    logp = torch.where(labels != IGNORE_INDEX, logp, 0.0)
    weights = _token_weights(case, labels.shape[0])
    if weights is not None:
        logp = logp * weights.to(dtype)
    seq = torch.zeros(b["num_seqs"], dtype=dtype).index_add(0, b["seq_ids"], logp)
    (seq * _coeff(b["num_seqs"]).to(dtype)).sum().backward()
    return seq.detach(), h.grad, w.grad


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    return _spawn(tmp, _rank_checks, tmp / "ref_logps.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_log_probs_and_gradients_match_float64_truth_from_the_whole_weight(
    rank_results, name
):
    case = CASES[name]
    b = _batch(case["seed"], **_dims(case))
    truth, base = _truth(b, case, exact=True), _truth(b, case, exact=False)
    first, second = rank_results[0][name], rank_results[1][name]
    assert [first["rows"], second["rows"]] == [(0, case["cut"]), (case["cut"], case["vocab"])]
    # every rank returns the same sums and the same (whole) hidden-state gradient
    torch.testing.assert_close(first["seq"], second["seq"], rtol=0, atol=0)
    torch.testing.assert_close(first["grad_h"], second["grad_h"], rtol=0, atol=0)
    assert first["seq"].dtype == torch.float32 and first["seq"].shape == (b["num_seqs"],)
    assert first["grad_h"].dtype == first["grad_w"].dtype == b["h"].dtype
    grad_w = torch.cat([first["grad_w"], second["grad_w"]])  # each rank's rows, in order
    got = (first["seq"], first["grad_h"], grad_w)
    for label, o, t, r in zip(("seq_logps", "grad_hidden", "grad_weight"), got, truth, base):
        assert_no_worse(f"{name} {label}", o, r, t, **case.get("tol", FP32_TOL))


def test_no_rank_makes_a_tensor_larger_than_one_chunk_of_its_own_shard_s_logits(rank_results):
    """At V = 50,257 in chunks of 64 of 131 tokens, forward and backward: the largest tensor a
    rank makes is one chunk of its shard's fp32 logits (64 x V_r), not the batch's rows of the
    shard (131 x V_r), nor a chunk of the whole vocabulary's (64 x V)."""
    case = CASES["gpt2_vocab"]
    for rank in range(WORLD):
        v0, v1 = rank_results[rank]["gpt2_vocab"]["rows"]
        size, op = rank_results[rank]["gpt2_vocab"]["largest"]
        assert 0 < size <= case["chunk"] * (v1 - v0) * 4, (rank, op, size)


def test_the_no_grad_pass_and_a_frozen_hidden_give_the_training_numbers(rank_results):
    for rank in range(WORLD):
        full, frozen = rank_results[rank]["uneven_torch"], rank_results[rank]["frozen_hidden"]
        torch.testing.assert_close(rank_results[rank]["no_grad"], full["seq"], rtol=0, atol=0)
        assert frozen["grad_h"] is None
        torch.testing.assert_close(frozen["grad_w"], full["grad_w"], rtol=0, atol=0)


def test_a_label_no_shard_holds_and_a_dtensor_weight_are_refused_on_every_rank(rank_results):
    for rank in range(WORLD):
        beyond = rank_results[rank]["label_beyond_vocab"]
        assert "= 1001 is outside the vocabulary [0, 1001)" in beyond, beyond
        overlap = rank_results[rank]["overlapping_starts"]
        assert "[0, 600)" in overlap and "[0, 401)" in overlap and "vocab_start" in overlap, overlap
        assert "ids [0, 401) are in two shards" in overlap, overlap
        dtensor = rank_results[rank]["dtensor"]
        assert "weight_shard is a DTensor" in dtensor and "to_local()" in dtensor, dtensor


def test_shards_that_do_not_cover_the_vocabulary_once_are_refused_with_no_label_in_the_overlap(
    rank_results,
):
    """A vocab_start one row early on rank 1 (rows [599, 1000) for [600, 1001)), no scored label
    at 599 or 1000: every label has one owner, yet each of rank 1's columns would be read as the
    id before its own."""
    for rank in range(WORLD):
        error = rank_results[rank]["off_by_one_start"]
        assert "[0, 600)" in error and "[599, 1000)" in error and "vocab_start" in error, error
        assert "ids [599, 600) are in two shards" in error, error


@pytest.mark.parametrize(
    ("shards", "error"),
    [
        ([(0, 600), (600, 1001)], None),
        ([(600, 1001), (0, 600)], None),  # given vocab_start, in any rank order
        ([(0, 250), (250, 250), (250, 503)], None),
        ([(0, 1001), (0, 0)], None),  # an empty shard after one that starts where it lies
        ([(0, 1001), (500, 500), (5000, 5000)], None),  # an empty shard's start holds no id
        ([(0, 600), (599, 1000)], "ids [599, 600) are in two shards"),
        ([(0, 600), (601, 1001)], "ids [600, 601) are in no shard"),
        ([(1, 600), (600, 1001)], "ids [0, 1) are in no shard"),
        ([(0, 600), (0, 401)], "ids [0, 401) are in two shards"),
    ],
)
def test_the_shards_must_cover_the_vocabulary_once_in_any_order(shards, error):
    starts, stops = torch.tensor(shards, dtype=torch.float64).unbind(1)
    if error is None:
        assert _check_tiling(starts, stops) == max(stop for start, stop in shards if stop > start)
        return
    with pytest.raises(ValueError, match=re.escape(error)):
        _check_tiling(starts, stops)


def test_labels_that_differ_between_the_ranks_are_refused_on_every_rank(rank_results):
    """Each rank passing its own half of the batch (the other half -100) would give each rank
    its own sums and a hidden-state gradient summed over different tokens."""
    for rank in range(WORLD):
        error = rank_results[rank]["labels_differ"]
        assert "same labels" in error and "labels[" in error, error


def test_a_process_outside_the_group_is_told_it_is_not_a_member(rank_results):
    error = rank_results[1]["not_a_member"]
    assert "not a member of vocab_group" in error, error


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_label_past_the_row_is_scored_with_no_column_of_its_own(impl):
    """rows_backward with a label >= V (one another vocabulary shard owns): -g * softmax."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 37, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 36, 37, 40, IGNORE_INDEX, 5, 37])
    g = torch.randn(7, generator=gen, dtype=torch.float64)
    _, parts = rows_forward(logits.float(), labels.clamp(max=36), impl=impl)
    got = rows_backward(logits.float(), labels, parts, g.float(), impl=impl)
    p = torch.softmax(logits, dim=-1)
    owned = torch.nn.functional.one_hot(labels.clamp(0, 36), 37) * (labels < 37)[:, None]
    truth = g[:, None] * (owned - p) * (labels != IGNORE_INDEX)[:, None]
    torch.testing.assert_close(got.double(), truth, rtol=0, atol=1e-6)


def test_vocab_group_none_is_the_default_group(rank_results):
    for rank in range(WORLD):
        got, world = rank_results[rank]["group_none"], rank_results[rank]["uneven_torch"]["seq"]
        torch.testing.assert_close(got, world, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "bad_rank", "error"),
    [
        ("seq_id_past_num_seqs", 1, "seq_ids[7] = 6 is outside [0, num_seqs = 6)"),
        ("token_weights_shape", 0, "token_weights must be (131,)"),
        ("chunk_tokens_zero", 1, "chunk_tokens must be >= 1, got 0"),
        ("chunk_tokens_not_an_int", 1, "chunk_tokens must be an int, got float 2.5"),
        ("token_weights_a_list", 1, "token_weights must be a torch.Tensor, got list"),
        (
            "grad_weight_dtype_a_name",
            1,
            "grad_weight_dtype must be a floating torch.dtype or None, got str 'float32'",
        ),
    ],
)
def test_an_input_refused_on_one_rank_is_refused_on_every_rank_with_none_left_waiting(
    rank_results, name, bad_rank, error
):
    """The bad rank says what is wrong; the other says which rank refused; neither waits for
    the group's timeout, and the group's next call gives the training numbers."""
    bad, other = rank_results[bad_rank], rank_results[1 - bad_rank]
    assert isinstance(bad[f"{name}_error"], str), "no error"
    assert error in bad[f"{name}_error"], bad[f"{name}_error"]
    told = f"rank {bad_rank} of vocab_group refused its inputs"
    assert isinstance(other[f"{name}_error"], str), "no error"
    assert told in other[f"{name}_error"], other[f"{name}_error"]
    for rank in range(WORLD):
        after = rank_results[rank][f"{name}_after"]
        assert isinstance(after, torch.Tensor), after
        torch.testing.assert_close(after, rank_results[rank]["uneven_torch"]["seq"])


def test_hidden_requiring_grad_on_some_ranks_only_is_refused_on_every_rank(rank_results):
    """Otherwise one rank's backward would wait for the others in the all_reduce of hidden's
    gradient, which theirs never make."""
    errors = [rank_results[rank]["hidden_grad_on_rank_0_error"] for rank in range(WORLD)]
    assert all(isinstance(e, str) for e in errors), errors
    assert (
        "requires grad on this process (rank 0 of vocab_group) but does not on rank 1"
        in (errors[0])
    ), errors[0]
    assert (
        "does not require grad on this process (rank 1 of vocab_group) but does on rank 0"
        in (errors[1])
    ), errors[1]
    for rank in range(WORLD):
        after = rank_results[rank]["hidden_grad_on_rank_0_after"]
        assert isinstance(after, torch.Tensor), after
        torch.testing.assert_close(after, rank_results[rank]["uneven_torch"]["seq"])


def test_batches_of_different_token_counts_are_refused_on_every_rank(rank_results):
    """Rank 1 passes one token fewer: the ranks' all_reduces would differ in size (gloo aborts
    the process). The shard sizes' all_gather carries each rank's count."""
    for rank in range(WORLD):
        error = rank_results[rank]["tokens_differ_error"]
        assert isinstance(error, str), error
        assert "different token counts N (rank: N {0: 131, 1: 130}" in error, error
        after = rank_results[rank]["tokens_differ_after"]
        assert isinstance(after, torch.Tensor), after
        torch.testing.assert_close(after, rank_results[rank]["uneven_torch"]["seq"])


def test_a_seq_id_out_of_range_is_the_rank_s_flag_in_the_first_all_reduce():
    """On CUDA the seq_ids range check is not read on the host (no sync): it is the rank's flag
    in the forward's first all_reduce, which every rank reads. Shown on a one-rank group, on
    CPU, where the flag refuses as a device-side assert would on CUDA."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard = _VocabShard(
            group=dist.group.WORLD,
            start=0,
            stop=5,
            hidden_grad=False,
            impl="torch",
            chunk_tokens=4,
            grad_weight_dtype=torch.float32,
        )
        parts = torch.tensor([[1.0, 0.5], [2.0, 0.25], [0.5, 1.0]])  # (m, log s) of 3 tokens
        labels, picked = torch.tensor([0, 4, 2]), torch.tensor([0.5, 2.0, -1.0])
        logps, _ = _combine(parts, picked, labels, torch.tensor([0, 1, 1]), 2, shard)
        torch.testing.assert_close(logps, (picked - parts[:, 0]) - parts[:, 1])
        with pytest.raises(ValueError, match="rank 0 of vocab_group refused its inputs"):
            _combine(parts, picked, labels, torch.tensor([0, 1, 2]), 2, shard)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", list(DPO_LOSSES))
def test_a_dpo_step_on_a_split_head_with_cached_reference_values_matches_one_process(
    rank_results, loss
):
    """Loss, rewards and the gradients of hidden and of each rank's rows against float64 truth
    from the whole weight, no worse than the same step in one process with sequence_logprobs."""
    b = _batch(DPO["seed"], vocab=DPO["vocab"], hidden=DPO["hidden"])
    truth = _dpo_step_whole(b, DPO_LOSSES[loss], exact=True)
    base = _dpo_step_whole(b, DPO_LOSSES[loss], exact=False)
    first, second = (rank_results[r]["dpo_step"] for r in range(WORLD))
    for key in ("loss", "chosen_rewards", "rejected_rewards", "grad_h"):
        torch.testing.assert_close(first[loss][key], second[loss][key], rtol=0, atol=0)
        assert_no_worse(f"{loss} {key}", first[loss][key], base[key], truth[key], **FP32_TOL)
    for rank, got in enumerate((first, second)):
        v0, v1 = got["rows"]
        assert (v0, v1) == ((0, DPO["cut"]), (DPO["cut"], DPO["vocab"]))[rank]
        rows = slice(v0, v1)
        assert_no_worse(
            f"{loss} grad_w rank {rank}",
            got[loss]["grad_w"],
            base["grad_w"][rows],
            truth["grad_w"][rows],
            **FP32_TOL,
        )
