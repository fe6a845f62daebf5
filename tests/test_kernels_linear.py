"""sequence_logprobs and linear_pair_loss (hidden + lm_head weight) vs float64 truth.

Triton runs under the interpreter in float32 (it mishandles bf16 dot), with a small vocabulary
for speed; the PyTorch path also gets a V=50,257 case and a bf16 case. Tolerance rule: error
vs float64 truth no worse than plain PyTorch in the same dtype plus a small margin.
"""

import math
import os

# The interpreter mode of Triton is fixed when triton.language is first imported: without a
# GPU the Triton kernels run interpreted; with one (the GPU-marked tests) they run compiled.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils._python_dispatch  # noqa: E402
import torch.utils._pytree  # noqa: E402

from sdpo.kernels import linear_pair_loss, sequence_logprobs  # noqa: E402
from sdpo.kernels.linear_logprobs import (  # noqa: E402
    LinearPairLoss,
    _plan_pairs,
    _split_ranges,
    default_chunk_tokens,
)
from sdpo.kernels.logprobs import IGNORE_INDEX  # noqa: E402
from tests.conftest import assert_no_worse, packed_labels  # noqa: E402

IMPLS = ["torch", "triton"]
BETA = 0.1


def _batch(
    seed: int,
    *,
    vocab: int = 1031,
    hidden: int = 67,
    dtype=torch.float32,
    device="cpu",
    lengths=(30, 19, 12, 9, 33, 28),
    prompts=(10, 10, 4, 7, 20, 20),
):
    """By default 131 tokens over 3 pairs (6 sequences); sequence 3 has one completion token."""
    gen = torch.Generator().manual_seed(seed)
    labels, seq_ids = packed_labels(lengths=lengths, prompts=prompts, vocab=vocab, gen=gen)
    assert int((labels[seq_ids == 3] != IGNORE_INDEX).sum()) == 1
    h64 = torch.randn(labels.shape[0], hidden, generator=gen, dtype=torch.float64)
    w64 = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (2.0 / hidden**0.5)
    ref = torch.randn(len(lengths), generator=gen, dtype=torch.float64) * 5 - 40
    to = dict(device=device)
    return dict(
        h64=h64.to(**to),
        w64=w64.to(**to),
        h=h64.to(dtype).to(**to),
        w=w64.to(dtype).to(**to),
        labels=labels.to(**to),
        seq_ids=seq_ids.to(**to),
        num_seqs=len(lengths),
        ref=ref.to(**to),
    )


def _naive_seq_logps(h, w, labels, seq_ids, num_seqs):
    """Plain PyTorch: full logits in the inputs' dtype, upcast to fp32 (or float64 for truth)."""
    logits = h @ w.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    logp = torch.where(labels != IGNORE_INDEX, logp, 0.0)
    return torch.zeros(num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, seq_ids, logp)


def _dpo_pair_loss(ref: torch.Tensor):
    ref_chosen, ref_rejected = ref[0::2], ref[1::2]

    def pair_loss(chosen, rejected, pairs: slice):
        margin = (chosen - ref_chosen[pairs].to(chosen.dtype)) - (
            rejected - ref_rejected[pairs].to(rejected.dtype)
        )
        return -F.logsigmoid(BETA * margin).sum()

    return pair_loss


def _grads(fn, h, w):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(h, w)
    out.backward()
    return out.detach(), h.grad, w.grad


def _check_sequence_logprobs(b, *, impl, chunk_tokens, rel_margin, factor=1.0):
    coeff = torch.linspace(-1.0, 2.0, b["num_seqs"], dtype=torch.float64, device=b["h"].device)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])

    def ours(h, w):
        seq = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=chunk_tokens)
        assert seq.dtype == torch.float32 and seq.shape == (b["num_seqs"],)
        return (seq * coeff.float()).sum()

    def naive(h, w):
        return (
            _naive_seq_logps(h, w, *args)
            * coeff.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
        ).sum()

    got = _grads(ours, b["h"], b["w"])
    truth = _grads(naive, b["h64"], b["w64"])
    base = _grads(naive, b["h"], b["w"])
    for name, o, t, r in zip(("value", "grad_hidden", "grad_weight"), got, truth, base):
        assert_no_worse(name, o, r, t, rel_margin=rel_margin, factor=factor)
    seq = sequence_logprobs(b["h"], b["w"], *args, impl=impl, chunk_tokens=chunk_tokens)
    assert_no_worse(
        "seq_logps",
        seq,
        _naive_seq_logps(b["h"], b["w"], *args),
        _naive_seq_logps(b["h64"], b["w64"], *args),
        rel_margin=rel_margin,
        factor=factor,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_and_grads_match_float64_truth_over_ragged_chunks(impl):
    # chunk of 48 tokens: 131 = 2 full chunks + a tail of 35, chunks cut through sequences
    _check_sequence_logprobs(_batch(seed=31), impl=impl, chunk_tokens=48, rel_margin=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_labels_give_the_contiguous_results(impl):
    """A labels column of a wider tensor: values and gradients as with contiguous labels."""
    b = _batch(seed=37)
    args = (b["seq_ids"], b["num_seqs"])
    strided = torch.stack([b["labels"], torch.full_like(b["labels"], 3)], dim=1)[:, 0]
    assert strided.stride() == (2,)
    results = []
    for labels in (b["labels"], strided):
        h = b["h"].clone().requires_grad_(True)
        w = b["w"].clone().requires_grad_(True)
        seq = sequence_logprobs(h, w, labels, *args, impl=impl, chunk_tokens=48)
        (seq * torch.arange(1.0, b["num_seqs"] + 1)).sum().backward()
        results.append((seq, h.grad, w.grad))
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_sequence_logprobs_torch_matches_float64_truth_at_gpt2_vocab():
    _check_sequence_logprobs(
        _batch(seed=32, vocab=50_257, hidden=24), impl="torch", chunk_tokens=64, rel_margin=2e-6
    )


def test_sequence_logprobs_bf16_torch_is_no_worse_than_plain_bf16_pytorch():
    b = _batch(seed=33, dtype=torch.bfloat16)
    _check_sequence_logprobs(b, impl="torch", chunk_tokens=40, rel_margin=2e-3, factor=1.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_pass_without_grad_equals_the_training_forward(impl):
    b = _batch(seed=34)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    h = b["h"].clone().requires_grad_(True)
    w = b["w"].clone().requires_grad_(True)
    train = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=48)
    assert train.requires_grad
    with torch.no_grad():
        ref = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=48)
        _, pair_ref = linear_pair_loss(
            h, w, *args, pair_loss=_dpo_pair_loss(b["ref"]), impl=impl, chunk_tokens=48
        )
    assert not ref.requires_grad
    assert torch.equal(ref, train.detach())
    # Pair chunks cut the stream elsewhere; the rows are the same, so the numbers agree.
    torch.testing.assert_close(pair_ref, ref, rtol=1e-6, atol=1e-5)
    # With the reference values equal to the policy's own, DPO rewards start at 0.
    _, seq_logps = linear_pair_loss(
        h, w, *args, pair_loss=_dpo_pair_loss(ref), impl=impl, chunk_tokens=48
    )
    rewards = BETA * (seq_logps - ref)
    assert torch.all(rewards.abs() < 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_pair_loss_gradients_equal_autograd_through_sequence_logprobs(impl):
    b = _batch(seed=35)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])

    def fused(h, w):
        # ~40 tokens per chunk: chunks of 1-2 pairs, and the 61-token pair gets its own.
        loss, seq_logps = linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl=impl, chunk_tokens=40
        )
        assert not seq_logps.requires_grad
        return loss

    def through_sequence_logprobs(h, w):
        seq = sequence_logprobs(h, w, *args, impl=impl, chunk_tokens=48)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    def truth_fn(h, w):
        seq = _naive_seq_logps(h, w, *args)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    got = _grads(fused, b["h"], b["w"])
    composed = _grads(through_sequence_logprobs, b["h"], b["w"])
    truth = _grads(truth_fn, b["h64"], b["w64"])
    base = _grads(truth_fn, b["h"], b["w"])
    for name, g, c, t, r in zip(("loss", "grad_hidden", "grad_weight"), got, composed, truth, base):
        torch.testing.assert_close(g, c, rtol=1e-5, atol=1e-6 * t.abs().max().item(), msg=name)
        assert_no_worse(name, g, r, t, rel_margin=2e-6)


def test_linear_pair_loss_scales_its_stored_gradients_by_the_upstream_gradient():
    b = _batch(seed=36)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])
    _, h1, w1 = _grads(
        lambda h, w: linear_pair_loss(h, w, *args, pair_loss=pair_loss, impl="torch")[0],
        b["h"],
        b["w"],
    )
    _, h3, w3 = _grads(
        lambda h, w: -3.0 * linear_pair_loss(h, w, *args, pair_loss=pair_loss, impl="torch")[0],
        b["h"],
        b["w"],
    )
    torch.testing.assert_close(h3, -3.0 * h1)
    torch.testing.assert_close(w3, -3.0 * w1)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pair_of_identical_completions_has_zero_margin_and_cancelling_gradients(impl):
    """Chosen and rejected the same tokens on the same hidden states (data.identical_pairs =
    "warn" keeps such a pair): the two sums are the same bits, so the margin is exactly 0 and
    the loss log 2; the two copies' hidden-state gradients cancel exactly and the head's
    gradient is 0 up to fp32 rounding (float64's is 0 up to its own)."""
    from sdpo.losses import LossConfig, make_pair_loss

    gen = torch.Generator().manual_seed(71)
    vocab = 53
    labels = torch.randint(0, vocab, (9,), generator=gen)
    labels[:3], labels[-1] = IGNORE_INDEX, IGNORE_INDEX
    labels = torch.cat([labels, labels])
    seq_ids = torch.arange(2).repeat_interleave(9)
    h = torch.randn(9, 16, generator=gen).repeat(2, 1).requires_grad_(True)
    w = torch.randn(vocab, 16, generator=gen).requires_grad_(True)
    ref = torch.tensor([-21.0])
    pair_loss = make_pair_loss(LossConfig(beta=BETA), ref_chosen=ref, ref_rejected=ref)
    loss, seq = linear_pair_loss(h, w, labels, seq_ids, 2, pair_loss=pair_loss, impl=impl)
    loss.backward()
    assert seq[0].item() == seq[1].item()
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-7)
    assert torch.equal(h.grad[:9], -h.grad[9:]) and h.grad.abs().max() > 0.01
    assert w.grad.abs().max().item() < 1e-7


def test_grad_weight_in_weight_dtype_matches_fp32_accumulation_in_fp32():
    b = _batch(seed=37)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])
    fp32 = _grads(
        lambda h, w: linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl="torch", chunk_tokens=40
        )[0],
        b["h"],
        b["w"],
    )
    same = _grads(
        lambda h, w: linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl="torch", chunk_tokens=40, grad_weight_dtype=None
        )[0],
        b["h"],
        b["w"],
    )
    torch.testing.assert_close(same[2], fp32[2], rtol=1e-5, atol=1e-7)


def test_torch_compile_can_call_sequence_logprobs():
    b = _batch(seed=38)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])

    def total(h, w):
        return sequence_logprobs(h, w, *args, impl="torch").sum() * 0.5

    compiled = torch.compile(total, backend="eager")
    torch.testing.assert_close(compiled(b["h"], b["w"]), total(b["h"], b["w"]))


def test_pair_loss_rejects_odd_sequence_counts_and_unpacked_streams():
    b = _batch(seed=39)
    pair_loss = _dpo_pair_loss(b["ref"])
    with pytest.raises(ValueError, match="odd"):
        linear_pair_loss(
            b["h"], b["w"], b["labels"], b["seq_ids"].clamp(max=4), 5, pair_loss=pair_loss
        )
    with pytest.raises(ValueError, match="non-decreasing"):
        linear_pair_loss(b["h"], b["w"], b["labels"], b["seq_ids"].flip(0), 6, pair_loss=pair_loss)
    with pytest.raises(ValueError, match="hidden size"):
        sequence_logprobs(b["h"][:, :-1], b["w"], b["labels"], b["seq_ids"], 6)


def test_default_chunk_rule_keeps_chunks_near_256_mib_and_at_least_1024_tokens():
    assert default_chunk_tokens(vocab_size=32_000, hidden_size=4096, dtype=torch.bfloat16) == 4096
    assert default_chunk_tokens(vocab_size=128_256, hidden_size=4096, dtype=torch.bfloat16) == 1024
    assert default_chunk_tokens(vocab_size=1_000_000, hidden_size=4096, dtype=torch.float32) == 1024


# A stream for the memory cap: pairs of 131, 21, 37 and 50 tokens. With max_chunk_tokens=37
# the 131-token pair (chosen 60 tokens, rejected 71) runs keep-the-tail with head cuts at
# 37 (inside the chosen), 74 (inside the rejected) and 94 (the tail's start); the 37-token
# pair just fits; the 50-token pair has one head sub-chunk of 13. Sequence 3 has one
# completion token.
LONG_LENGTHS = (60, 71, 12, 9, 20, 17, 24, 26)
LONG_PROMPTS = (10, 10, 4, 7, 5, 5, 8, 8)
CAP = 37


def _long_batch(seed: int, **kw):
    return _batch(seed, lengths=LONG_LENGTHS, prompts=LONG_PROMPTS, **kw)


def _host_pair_tokens(lengths) -> list[int]:
    return [a + b for a, b in zip(lengths[0::2], lengths[1::2])]


def test_plan_caps_chunks_and_splits_long_pairs_with_cuts_inside_both_sequences():
    pair_tokens = _host_pair_tokens(LONG_LENGTHS)
    assert pair_tokens == [131, 21, 37, 50]
    capped = _plan_pairs(pair_tokens, chunk_tokens=40, max_chunk_tokens=CAP)
    assert [tuple(item) for item in capped] == [
        (0, 131, 0, 1, True),
        (131, 152, 1, 2, False),
        (152, 189, 2, 3, False),
        (189, 239, 3, 4, True),
    ]
    heads, tail = _split_ranges(0, 131, CAP)
    assert heads == [(0, 37), (37, 74), (74, 94)] and tail == (94, 131)
    cuts = [stop for _, stop in heads]
    chosen_stop = LONG_LENGTHS[0]
    assert any(c < chosen_stop for c in cuts) and any(c > chosen_stop for c in cuts)
    assert _split_ranges(189, 239, CAP) == ([(189, 202)], (202, 239))
    # No cap: today's greedy chunks, a long pair held whole.
    assert [
        tuple(item)[:4] for item in _plan_pairs(pair_tokens, chunk_tokens=40, max_chunk_tokens=None)
    ] == [
        (0, 131, 0, 1),
        (131, 152, 1, 2),
        (152, 189, 2, 3),
        (189, 239, 3, 4),
    ]
    # chunk_tokens above the cap: packed chunks still stay within the cap.
    plan = _plan_pairs(pair_tokens, chunk_tokens=100, max_chunk_tokens=60)
    assert [tuple(item) for item in plan] == [
        (0, 131, 0, 1, True),
        (131, 189, 1, 3, False),
        (189, 239, 3, 4, False),
    ]


def _pair_loss_run(b, *, impl, **kw):
    """(loss, seq_logps, grad_hidden, grad_weight) of linear_pair_loss on batch b."""
    h = b["h"].detach().clone().requires_grad_(True)
    w = b["w"].detach().clone().requires_grad_(True)
    loss, seq_logps = linear_pair_loss(
        h,
        w,
        b["labels"],
        b["seq_ids"],
        b["num_seqs"],
        pair_loss=_dpo_pair_loss(b["ref"]),
        impl=impl,
        **kw,
    )
    loss.backward()
    return loss.detach(), seq_logps, h.grad, w.grad


# Triton runs interpreted here: a small hidden size and vocabulary (307: a block tail).
CAP_SHAPES = {"torch": dict(vocab=1031, hidden=67), "triton": dict(vocab=307, hidden=19)}


@pytest.mark.parametrize("impl", IMPLS)
def test_capped_long_pairs_match_float64_truth(impl):
    b = _long_batch(seed=51, **CAP_SHAPES[impl])
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])
    got = _pair_loss_run(
        b,
        impl=impl,
        chunk_tokens=40,
        max_chunk_tokens=CAP,
        pair_tokens=_host_pair_tokens(LONG_LENGTHS),
    )

    def truth_fn(h, w):
        seq = _naive_seq_logps(h, w, *args)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    truth = _grads(truth_fn, b["h64"], b["w64"])
    base = _grads(truth_fn, b["h"], b["w"])
    for name, g, t, r in zip(
        ("loss", "grad_hidden", "grad_weight"), (got[0], got[2], got[3]), truth, base
    ):
        assert_no_worse(name, g, r, t, rel_margin=2e-6)
    assert_no_worse(
        "seq_logps",
        got[1],
        _naive_seq_logps(b["h"], b["w"], *args),
        _naive_seq_logps(b["h64"], b["w64"], *args),
        rel_margin=2e-6,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_cap_gives_the_uncapped_numbers(impl):
    b = _long_batch(seed=52, **CAP_SHAPES[impl])
    capped = _pair_loss_run(b, impl=impl, chunk_tokens=40, max_chunk_tokens=CAP)
    whole = _pair_loss_run(b, impl=impl, chunk_tokens=40)
    for name, c, u in zip(("loss", "seq_logps", "grad_hidden", "grad_weight"), capped, whole):
        scale = u.abs().max().item()
        torch.testing.assert_close(c, u, rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("max_chunk_tokens", [None, CAP])
def test_host_pair_tokens_give_bitwise_the_results_of_reading_seq_ids(max_chunk_tokens):
    b = _long_batch(seed=53)
    kw = dict(impl="torch", chunk_tokens=40, max_chunk_tokens=max_chunk_tokens)
    from_ids = _pair_loss_run(b, **kw)
    from_host = _pair_loss_run(b, pair_tokens=_host_pair_tokens(LONG_LENGTHS), **kw)
    for name, a, c in zip(("loss", "seq_logps", "grad_hidden", "grad_weight"), from_ids, from_host):
        assert torch.equal(a, c), name


def test_upstream_gradient_of_one_returns_the_formed_gradients_bit_for_bit():
    b = _long_batch(seed=54)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    kw = dict(pair_loss=_dpo_pair_loss(b["ref"]), impl="torch", max_chunk_tokens=CAP)
    _, h1, w1 = _grads(lambda h, w: linear_pair_loss(h, w, *args, **kw)[0], b["h"], b["w"])
    _, h2, w2 = _grads(lambda h, w: 1.0 * linear_pair_loss(h, w, *args, **kw)[0], b["h"], b["w"])
    _, h3, w3 = _grads(lambda h, w: -3.0 * linear_pair_loss(h, w, *args, **kw)[0], b["h"], b["w"])
    assert torch.equal(h1, h2) and torch.equal(w1, w2)
    torch.testing.assert_close(h3, -3.0 * h1)
    torch.testing.assert_close(w3, -3.0 * w1)


def test_wrong_pair_tokens_raise_a_clear_error():
    b = _long_batch(seed=55)
    args = (b["h"], b["w"], b["labels"], b["seq_ids"], b["num_seqs"])
    kw = dict(pair_loss=_dpo_pair_loss(b["ref"]), impl="torch", chunk_tokens=40)
    with pytest.raises(ValueError, match="pair_tokens has 3 entries but num_seqs=8 makes 4 pairs"):
        linear_pair_loss(*args, pair_tokens=[131, 21, 87], **kw)
    with pytest.raises(ValueError, match="sum to 240 but hidden has 239 tokens"):
        linear_pair_loss(*args, pair_tokens=[131, 21, 37, 51], **kw)
    with pytest.raises(ValueError, match=r"pair_tokens\[1\] = 0: every pair holds at least one"):
        linear_pair_loss(*args, pair_tokens=[152, 0, 37, 50], **kw)
    with pytest.raises(ValueError, match=r"pair_tokens\[1\] = 22 but seq_ids give pair 1 21"):
        linear_pair_loss(*args, pair_tokens=[131, 22, 36, 50], **kw)
    with pytest.raises(ValueError, match="max_chunk_tokens must be >= 1"):
        linear_pair_loss(*args, max_chunk_tokens=0, **kw)


def test_device_side_id_check_stops_a_plan_that_disagrees_with_seq_ids():
    # On a GPU the plan is checked against seq_ids by asynchronous device asserts; on CPU
    # tensors _assert_async raises at once, so the check itself can be exercised here.
    b = _long_batch(seed=56)
    wrong = _plan_pairs([131, 22, 36, 50], chunk_tokens=40, max_chunk_tokens=None)
    with pytest.raises(RuntimeError, match="pair_tokens disagree with seq_ids at tokens"):
        LinearPairLoss.apply(
            b["h"].clone().requires_grad_(True),
            b["w"],
            b["labels"],
            b["seq_ids"],
            b["num_seqs"],
            _dpo_pair_loss(b["ref"]),
            "torch",
            wrong,
            None,
            torch.float32,
            True,
            False,
            True,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "rel_margin", "factor"), [(torch.float32, 2e-6, 1.0), (torch.bfloat16, 2e-3, 1.5)]
)
def test_triton_linear_ops_on_cuda_match_float64_truth(dtype, rel_margin, factor):
    b = _batch(seed=41, vocab=50_257, hidden=256, dtype=dtype, device="cuda")
    _check_sequence_logprobs(
        b, impl="triton", chunk_tokens=48, rel_margin=rel_margin, factor=factor
    )
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    pair_loss = _dpo_pair_loss(b["ref"])

    def truth_fn(h, w):
        seq = _naive_seq_logps(h, w, *args)
        return pair_loss(seq[0::2], seq[1::2], slice(None))

    got = _grads(
        lambda h, w: linear_pair_loss(
            h, w, *args, pair_loss=pair_loss, impl="triton", chunk_tokens=40
        )[0],
        b["h"],
        b["w"],
    )
    truth = _grads(truth_fn, b["h64"], b["w64"])
    base = _grads(truth_fn, b["h"], b["w"])
    for name, g, t, r in zip(("loss", "grad_hidden", "grad_weight"), got, truth, base):
        assert_no_worse(name, g, r, t, rel_margin=rel_margin, factor=factor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_pass_on_cuda_holds_one_chunk_of_logits_at_most(cuda_blas_warm):
    # cuBLAS's workspaces exist before the measurement (the fixture): the first chunk's
    # matmul would otherwise allocate them inside it when this test runs first
    n, hidden, vocab, chunk = 4096, 512, 32_000, 1024
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, vocab, (n,), device="cuda")
    seq_ids = torch.arange(n, device="cuda") // 512
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        sequence_logprobs(h, w, labels, seq_ids, 8, impl="triton", chunk_tokens=chunk)
    extra = torch.cuda.max_memory_allocated() - base
    one_chunk = chunk * vocab * 2
    assert extra <= one_chunk + 16 * n * 4 + 2**20, (
        f"reference pass held {extra} bytes, one chunk is {one_chunk}"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pair_loss_with_host_pair_tokens_makes_no_host_sync_on_cuda(dtype):
    b = _long_batch(seed=57, vocab=50_257, hidden=256, dtype=dtype, device="cuda")
    pair_tokens = _host_pair_tokens(LONG_LENGTHS)
    for cap in (None, CAP):
        kw = dict(impl="triton", chunk_tokens=40, max_chunk_tokens=cap, pair_tokens=pair_tokens)
        _pair_loss_run(b, **kw)  # warm-up: Triton compiles, cuBLAS handles, the addmm probe
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _pair_loss_run(b, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_cap_bounds_the_logits_of_a_long_pair_on_cuda():
    n, hidden, vocab, cap = 4096, 256, 32_000, 1024
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_(
        True
    )
    labels = torch.randint(0, vocab, (n,), device="cuda")
    seq_ids = (torch.arange(n, device="cuda") >= 1500).long()  # one pair of 4096 tokens
    ref = torch.tensor([-40.0, -45.0], device="cuda")

    def step(max_chunk_tokens):
        h.grad = w.grad = None
        loss, _ = linear_pair_loss(
            h,
            w,
            labels,
            seq_ids,
            2,
            pair_loss=_dpo_pair_loss(ref),
            impl="triton",
            chunk_tokens=n,
            max_chunk_tokens=max_chunk_tokens,
            pair_tokens=[n],
        )
        loss.backward()
        torch.cuda.synchronize()

    def peak(max_chunk_tokens):
        step(max_chunk_tokens)  # warm-up: kernels compiled, allocator settled
        h.grad = w.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(max_chunk_tokens)
        return torch.cuda.max_memory_allocated() - base

    capped, whole = peak(cap), peak(None)
    # beyond one capped chunk of logits: dW in fp32 and its bf16 copy, dH, small vectors
    allowed = cap * vocab * 2 + vocab * hidden * 6 + n * hidden * 2 * 2 + 64 * n * 4 + 2**22
    assert capped <= allowed, f"capped pass held {capped} bytes, allowed {allowed}"
    assert whole - capped >= (n - cap) * vocab * 2 * 0.9, (capped, whole)


# -- no tensor of the whole batch's logits, on a CPU ------------------------------------------


def _run_inside(mode, func, args, kwargs):
    """Run ``func``; sdpo's own custom ops with ``mode`` on again, so that the ops inside them
    are seen too (a mode is off while it handles an op)."""
    if func._schema.name.startswith("sdpo::"):
        with mode:  # its implementation, below the dispatch key that calls the mode
            key = torch._C.DispatchKey.CompositeExplicitAutograd
            return func._op_dk(key, *args, **(kwargs or {}))
    return func(*args, **(kwargs or {}))


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor (in bytes) any op makes while the mode is on, with the op's name."""

    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _run_inside(self, func, args, kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None:
                size = t.numel() * t.element_size()
                if size > self.largest[0]:
                    self.largest = (size, func._schema.name)
        return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", ["linear_pair_loss", "sequence_logprobs", "reference pass"])
def test_no_op_makes_a_tensor_larger_than_one_chunk_of_logits(impl, head):
    """The memory rule of the log-prob heads, checked on a CPU through every op's output: at
    V = 50,257 and 131 tokens in chunks of 32 (pairs of at most 61 tokens), the largest tensor
    made in the forward and the backward is one chunk's logits (at most a pair's rows) or the
    weight's gradient, never the batch's logits (131 x V) nor an fp32 copy of them."""
    b = _batch(7, vocab=50_257, hidden=24)
    vocab, hidden = b["w"].shape
    n = b["h"].shape[0]
    longest_pair = 61  # pair 2: 33 + 28 tokens
    bound = max(longest_pair * vocab, vocab * hidden) * 4
    h = b["h"].clone().requires_grad_(head != "reference pass")
    w = b["w"].clone().requires_grad_(head != "reference pass")
    args = (h, w, b["labels"], b["seq_ids"], b["num_seqs"])
    watch = _LargestTensor()
    with watch, torch.set_grad_enabled(head != "reference pass"):
        if head == "linear_pair_loss":
            loss, _ = linear_pair_loss(
                *args, pair_loss=_dpo_pair_loss(b["ref"]), impl=impl, chunk_tokens=32
            )
        else:
            loss = sequence_logprobs(*args, impl=impl, chunk_tokens=32).sum()
        if loss.requires_grad:
            loss.backward()
    size, op = watch.largest
    assert size <= bound, (op, size, bound)
    assert size < n * vocab * 4 / 2, (op, size)  # far from the whole batch's logits


class _MatmulFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2·m·n·k for every matrix product an op computes (mm, addmm, in place or not)."""

    OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul"}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.OPS:
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif "mm" in name or "matmul" in name or "bmm" in name:
            raise AssertionError(f"a matrix product this count does not know: {name}")
        return _run_inside(self, func, args, kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_matmul_work_of_each_head_is_its_floor(impl):
    """Counted on a CPU through every matmul op, forward and backward: the fused training head
    does the 6·N·H·V of one logits matmul and its two gradients (nothing recomputed); capped at B
    tokens, a pair of L > B tokens adds 2·(L − B)·H·V; the plain head recomputes its chunks'
    logits in the backward (8·N·H·V); the reference pass is 2·N·H·V."""
    b = _batch(8, vocab=1031, hidden=67)
    vocab, hidden = b["w"].shape
    n = b["h"].shape[0]
    pairs = [30 + 19, 12 + 9, 33 + 28]
    unit = n * hidden * vocab

    def flops(fn, *, grad=True):
        h = b["h"].clone().requires_grad_(grad)
        w = b["w"].clone().requires_grad_(grad)
        args = (h, w, b["labels"], b["seq_ids"], b["num_seqs"])
        with _MatmulFlops() as counter, torch.set_grad_enabled(grad):
            out = fn(*args)
            if grad:
                out.backward()
        return counter.flops

    def fused(cap):
        def run(*args):
            loss, _ = linear_pair_loss(
                *args,
                pair_loss=_dpo_pair_loss(b["ref"]),
                impl=impl,
                chunk_tokens=40,
                max_chunk_tokens=cap,
            )
            return loss

        return run

    assert flops(fused(None)) == 6 * unit
    cap = 25
    extra = sum(2 * (length - cap) * hidden * vocab for length in pairs if length > cap)
    assert flops(fused(cap)) == 6 * unit + extra
    plain = flops(lambda *a: sequence_logprobs(*a, impl=impl, chunk_tokens=40).sum())
    assert plain == 8 * unit
    reference = flops(lambda *a: sequence_logprobs(*a, impl=impl, chunk_tokens=40), grad=False)
    assert reference == 2 * unit


# ----------------------------------------------------------------------------------------
# Embedding conventions: aligned labels, batched and strided inputs, tied and biased heads
# ----------------------------------------------------------------------------------------


def _aligned_batch(seed: int, *, b: int = 3, t: int = 17, hidden: int = 23, vocab: int = 211):
    """A padded (B, T) batch as a Hugging Face model sees it: labels aligned with input_ids
    (-100 on the prompt and the padding), hidden states a strided slice of a wider buffer."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(b, t + 2, hidden + 5, generator=gen, dtype=torch.float64)
    w64 = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (2.0 / hidden**0.5)
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    for row, (prompt, pad) in enumerate([(4, 0), (6, 5), (1, 9)][:b]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, t - pad :] = IGNORE_INDEX
    return buf, w64, labels


def _aligned_truth(h64, w64, labels):
    """float64 per-row sums the way a causal LM's loss shifts: logits[:, :-1] vs labels[:, 1:]."""
    logits = (h64 @ w64.t())[:, :-1]
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return torch.where(target != IGNORE_INDEX, logp, 0.0).sum(-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_labels_turns_aligned_labels_into_the_next_token_convention(impl):
    from sdpo.kernels import logprobs_from_logits, shift_labels

    buf64, w64, labels = _aligned_batch(seed=91)
    b, t = labels.shape
    h = buf64.float()[:, 1 : t + 1, 2:-3]  # (B, T, H), strided as hidden_states[-1] slices are
    w = w64.float().t().contiguous().t()  # (V, H) with column-major strides
    truth = _aligned_truth(buf64[:, 1 : t + 1, 2:-3], w64, labels)
    seq_ids = torch.arange(b).repeat_interleave(t)
    shifted = shift_labels(labels)
    assert shifted.shape == labels.shape and shifted.dtype == labels.dtype
    got = sequence_logprobs(
        h.reshape(-1, h.shape[-1]), w, shifted.reshape(-1), seq_ids, b, impl=impl
    )
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    # full logits, flattened without a [:, :-1] slice
    logits = (h @ w.t()).view(-1, w.shape[0])
    got_logits, _ = logprobs_from_logits(logits, shifted.view(-1), seq_ids, b, impl=impl)
    torch.testing.assert_close(got_logits.double(), truth, rtol=1e-5, atol=1e-5)
    # the same sequences packed without padding: boundaries come from seq_ids
    keep = (torch.arange(t) < torch.tensor([[t], [t - 5], [t - 9]])).reshape(-1)
    packed_ids = seq_ids[keep]
    packed = shift_labels(labels.reshape(-1)[keep], packed_ids)
    got_packed = sequence_logprobs(
        h.reshape(-1, h.shape[-1])[keep], w, packed, packed_ids, b, impl=impl
    )
    torch.testing.assert_close(got_packed.double(), truth, rtol=1e-5, atol=1e-5)
    # a row of one token has nothing to predict, and an empty batch stays empty
    assert shift_labels(labels[:, :1]).eq(IGNORE_INDEX).all()
    assert shift_labels(labels[:, :0]).shape == (b, 0)


def test_tied_embedding_and_strided_hidden_get_the_float64_gradients():
    """The lm_head weight shared with the input embedding: its gradient accumulates the head's
    and the embedding's; hidden states are a strided view whose buffer gets its slice's."""
    buf64, w64, labels = _aligned_batch(seed=92)
    from sdpo.kernels import shift_labels

    b, t = labels.shape
    seq_ids = torch.arange(b).repeat_interleave(t)
    flat = shift_labels(labels).reshape(-1)
    ids = labels.clamp(min=0).reshape(-1)

    def run(buf, w, op):
        buf = buf.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        h = buf[:, 1 : t + 1, 2:-3].reshape(-1, w.shape[1]) + F.embedding(ids, w)
        op(h, w).sum().backward()
        return buf.grad, w.grad

    got = run(buf64.float(), w64.float(), lambda h, w: sequence_logprobs(h, w, flat, seq_ids, b))
    truth = run(buf64, w64, lambda h, w: _naive_seq_logps(h, w, flat, seq_ids, b))
    for name, g, ref in zip(("hidden buffer", "tied weight"), got, truth):
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_logit_offset_shared_by_every_token_leaves_the_gradients_exact(impl):
    """A component shared by every row of W (a common offset of the logits, here 1e3 through
    one hidden column of ones) cancels out of the exact gradients: dH's column is
    sum_v (onehot - p_v) * 1e3 = 0. Both heads form each row's softmax from x - max and log s,
    so that the probabilities sum to 1 to fp32 rounding; from exp(x - lse) with the rounded lse
    they are all off by one factor, and that column picks up 1e3 times its error (0.06 in
    float32, against plain PyTorch's 3e-4), and every other one its share."""
    gen = torch.Generator().manual_seed(95)
    n, vocab, hidden = 16, 37, 8
    h = torch.cat([torch.randn(n, hidden, generator=gen), torch.ones(n, 1)], 1)
    w = torch.cat([torch.randn(vocab, hidden, generator=gen) * 2, torch.full((vocab, 1), 1e3)], 1)
    labels = (h @ w.t()).argmax(dim=1)  # confident rows, labelled at or near their max
    labels[::3] = torch.randint(0, vocab, (6,), generator=gen)
    labels[4] = IGNORE_INDEX
    seq_ids = torch.arange(n) // 4
    coeff = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    args = (labels, seq_ids, 4)

    def weighted_sum(seq):
        return (seq * coeff.to(seq.dtype)).sum()

    def pair_loss(chosen, rejected, pairs):
        c = coeff.float()
        return (chosen * c[0::2][pairs]).sum() + (rejected * c[1::2][pairs]).sum()

    def fused(h, w):
        return linear_pair_loss(h, w, *args, pair_loss=pair_loss, impl=impl, chunk_tokens=8)[0]

    truth = _grads(lambda h, w: weighted_sum(_naive_seq_logps(h, w, *args)), h.double(), w.double())
    base = _grads(lambda h, w: weighted_sum(_naive_seq_logps(h, w, *args)), h, w)
    plain = _grads(lambda h, w: weighted_sum(sequence_logprobs(h, w, *args, impl=impl)), h, w)
    for head, got in (("sequence_logprobs", plain), ("linear_pair_loss", _grads(fused, h, w))):
        for name, o, t, r in zip(("value", "grad_hidden", "grad_weight"), got, truth, base):
            assert_no_worse(f"{head} {name}", o, r, t, rel_margin=1e-7, factor=2.0)


def test_a_bias_and_a_temperature_fold_into_hidden_and_weight_as_documented():
    b = _batch(seed=93, vocab=211, hidden=19)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    gen = torch.Generator().manual_seed(93)
    bias64 = torch.randn(211, generator=gen, dtype=torch.float64)
    tau = 0.7
    logits64 = (b["h64"] @ b["w64"].t() + bias64) / tau
    ones = torch.ones(b["h"].shape[0], 1)
    h = torch.cat([b["h"], ones], 1) / tau
    w = torch.cat([b["w"], bias64.float()[:, None]], 1)
    got = sequence_logprobs(h, w, *args)
    truth = _naive_seq_logps(logits64, torch.eye(211, dtype=torch.float64), *args)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-4)


def test_second_order_gradients_raise_instead_of_being_silently_zero():
    b = _batch(seed=94, vocab=211, hidden=19)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    h = b["h"].clone().requires_grad_(True)
    loss, _ = linear_pair_loss(h, b["w"], *args, pair_loss=_dpo_pair_loss(b["ref"]), impl="torch")
    with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
        torch.autograd.grad(loss, h, create_graph=True)
    seq = sequence_logprobs(h, b["w"], *args, impl="torch")
    (g,) = torch.autograd.grad(seq.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.square().sum().backward()


def test_batched_labels_and_hidden_say_how_to_flatten():
    from sdpo.kernels import logprobs_from_logits

    h, w = torch.randn(2, 5, 7), torch.randn(11, 7)
    labels, seq_ids = torch.zeros(2, 5, dtype=torch.int64), torch.arange(2).repeat_interleave(5)
    with pytest.raises(ValueError, match=r"\(B\*T, H\) first"):
        sequence_logprobs(h, w, labels, seq_ids, 2)
    for call in (
        lambda: sequence_logprobs(h.reshape(-1, 7), w, labels, seq_ids, 2),
        lambda: logprobs_from_logits(h.reshape(-1, 7) @ w.t(), labels, seq_ids, 2),
    ):
        with pytest.raises(ValueError, match=r"reshape\(-1\)"):
            call()
    with pytest.raises(ValueError, match=r"reshape\(-1, V\)"):
        logprobs_from_logits(h @ w.t(), labels.reshape(-1), seq_ids, 2)


def test_vmap_over_sequence_logprobs_runs_each_entry():
    b = _batch(seed=95, vocab=211, hidden=19)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    hs = torch.stack([b["h"], 0.5 * b["h"]])
    got = torch.func.vmap(lambda h: sequence_logprobs(h, b["w"], *args, impl="torch"))(hs)
    for k, scale in enumerate((1.0, 0.5)):
        truth = _naive_seq_logps(scale * b["h64"], b["w64"], *args)
        torch.testing.assert_close(got[k].double(), truth, rtol=1e-5, atol=1e-5)


def test_autocast_leaves_the_head_in_the_dtype_of_the_tensors_given():
    """As documented: autocast does not reach inside the ops (fp32 in, fp32 head), and an
    explicit bf16 cast of the weight is what makes a bf16 head; its gradient reaches the fp32
    weight."""
    b = _batch(seed=96, vocab=211, hidden=19)
    args = (b["labels"], b["seq_ids"], b["num_seqs"])
    w = b["w"].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sequence_logprobs(b["h"], w, *args, impl="torch")
    assert torch.equal(under, sequence_logprobs(b["h"], w, *args, impl="torch"))
    cast = sequence_logprobs(b["h"].bfloat16(), w.to(torch.bfloat16), *args, impl="torch")
    base = _naive_seq_logps(b["h"].bfloat16(), b["w"].bfloat16(), *args)
    truth = _naive_seq_logps(b["h64"], b["w64"], *args)
    assert_no_worse("bf16 head", cast, base, truth, rel_margin=2e-6)
    cast.sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0
