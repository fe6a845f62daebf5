"""``softcap_sequence_logprobs``: per-sequence sums, WPO's aligned sums and the gradients of
hidden and weight under soft-capped logits, against float64 PyTorch on the full logits; on CUDA
(GPU-marked) in bf16 and fp32 at a 50,257-token vocabulary, by the dtype-aware rule."""

from __future__ import annotations

import pytest
import torch

from sdpo.kernels import softcap_sequence_logprobs

CAP = 3.0


def _inputs(seed: int = 0, *, n: int = 131, vocab: int = 257, hidden: int = 24):
    """131 tokens over 3 sequences, a third of them unscored; logits of std ~4, so the cap
    of 3 bends most of them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.8
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 50, 41]))
    weights = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.25)
    return h, w, labels, seq_ids, weights


def _reference(h, w, labels, seq_ids, weights=None):
    """float64 sums and WPO sums from the whole (N, V) capped logits."""
    y = torch.tanh((h.double() @ w.double().T) / CAP) * CAP
    logp = y.log_softmax(-1)
    scored = labels != -100
    tok = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * scored
    lsq = torch.logsumexp(2 * logp, -1)
    if weights is not None:
        tok = tok * weights.double()
    seq = torch.zeros(3, dtype=torch.float64).index_add(0, seq_ids, tok)
    aligned = torch.zeros(3, dtype=torch.float64).index_add(
        0, seq_ids, (logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] - lsq) * scored
    )
    return seq, aligned


def test_softcap_sums_and_gradients_match_float64_over_odd_chunks():
    h, w, labels, seq_ids, weights = _inputs()
    # the cap matters here: the uncapped log-probs are far from the capped ones
    plain = (h @ w.T).log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    capped = (torch.tanh(h @ w.T / CAP) * CAP).log_softmax(-1)
    assert (plain - capped.gather(1, labels.clamp(min=0)[:, None])[:, 0]).abs().max() > 1.0

    h.requires_grad_(True)
    w.requires_grad_(True)
    seq, aligned = softcap_sequence_logprobs(
        h, w, labels, seq_ids, 3, softcap=CAP, chunk_tokens=32, return_aligned=True
    )
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref_seq, ref_aligned = _reference(h64, w64, labels, seq_ids)
    assert seq.dtype == torch.float32 and not aligned.requires_grad
    torch.testing.assert_close(seq.double(), ref_seq.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(aligned.double(), ref_aligned.detach(), rtol=1e-5, atol=1e-4)

    upstream = torch.tensor([0.7, -1.3, 2.1])
    (seq * upstream).sum().backward()
    (ref_seq * upstream.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_softcap_token_weights_scale_sums_and_gradients_and_a_frozen_weight_gets_none():
    h, w, labels, seq_ids, weights = _inputs(seed=1)
    h.requires_grad_(True)
    seq = softcap_sequence_logprobs(
        h, w, labels, seq_ids, 3, softcap=CAP, chunk_tokens=50, token_weights=weights
    )
    h64 = h.detach().double().requires_grad_(True)
    ref, _ = _reference(h64, w, labels, seq_ids, weights)
    torch.testing.assert_close(seq.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    seq.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    assert w.grad is None
    # the no-grad pass (reference values, scoring) gives the training forward's numbers
    with torch.no_grad():
        again = softcap_sequence_logprobs(
            h, w, labels, seq_ids, 3, softcap=CAP, chunk_tokens=50, token_weights=weights
        )
    assert torch.equal(again, seq.detach())


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf")])
def test_softcap_refuses_a_cap_that_is_not_a_positive_number(cap):
    h, w, labels, seq_ids, _ = _inputs(n=131)
    with pytest.raises(ValueError, match="softcap must be"):
        softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=cap)


def test_softcap_head_keeps_its_dtype_under_autocast_and_is_first_order_only():
    # as the kernels' ops: autocast does not reach inside (an fp32 head stays fp32), and a
    # second backward raises instead of giving a wrong or partial result
    h, w, labels, seq_ids, _ = _inputs(seed=2)
    plain = softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=CAP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=CAP)
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    h = h.requires_grad_()
    seq = softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=CAP)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(seq.sum(), h, create_graph=True)


def test_softcap_gradients_are_the_same_with_backward_called_inside_autocast():
    """An embedder's loss.backward() inside its autocast block: the backward recomputes the
    capped logits in the head's own dtype as the forward did, so the gradients are those of
    a backward outside it, bit for bit (they were bf16 matmuls, 1e-2 off)."""
    h, w, labels, seq_ids, _ = _inputs(seed=3, n=40, vocab=64)
    seq_ids = seq_ids[:40].clamp(max=0)

    def grads():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        softcap_sequence_logprobs(hh, ww, labels, seq_ids, 1, softcap=CAP).sum().backward()
        return hh.grad, ww.grad

    plain = grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = grads()
    for a, b in zip(under, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("head", ["softcap", "linear"])
def test_bf16_weight_gradient_is_summed_over_chunks_in_fp32_and_rounded_once(head):
    """bf16 hidden and weight, 1,024 tokens in 16 chunks of 64: the weight's gradient is each
    chunk's product summed unrounded in fp32 and rounded to bf16 once, within half a bf16 ulp
    of float64 truth (a bf16 partial per chunk, rounded 16 times, is several ulps off). Zero
    weights make every logit gradient exact in bf16 (onehot - 1/V, V a power of two; the
    slope of the cap is 1 at 0), so the accumulation is the only rounding before the last."""
    from sdpo.kernels import sequence_logprobs

    n, vocab, hidden = 1024, 256, 32
    g = torch.Generator().manual_seed(11)
    h = torch.randn(n, hidden, generator=g).bfloat16()
    w = torch.zeros(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 400, 324]))
    coeff = torch.tensor([1.0, -0.5, 2.0])
    if head == "softcap":
        seq = softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=CAP, chunk_tokens=64)
    else:
        seq = sequence_logprobs(h, w, labels, seq_ids, 3, impl="torch", chunk_tokens=64)
    (seq * coeff).sum().backward()
    assert w.grad.dtype == torch.bfloat16
    scored = labels != -100
    onehot = torch.zeros(n, vocab, dtype=torch.float64)
    onehot[scored, labels[scored]] = 1.0
    dz = (onehot - scored[:, None].double() / vocab) * coeff.double()[seq_ids, None]
    truth = dz.T @ h.double()  # (V, H), exact products summed in float64
    _, exponent = torch.frexp(truth)
    half_ulp = torch.ldexp(torch.full_like(truth, 0.5), exponent - 8)
    bound = half_ulp + 1e-6 * truth.abs().max()  # the last rounding, fp32's sums
    excess = ((w.grad.double() - truth).abs() / bound).max().item()
    assert excess <= 1.0, f"dW off by {excess:.1f} times its bound"


# -- on CUDA: bf16 and fp32 against float64, at a GPT-2 vocabulary --------------------------


def _capped_seq_logps(h, w, labels, seq_ids, cap: float | None):
    """Plain PyTorch on the whole (N, V) logits: the matmul in the inputs' dtype, then the cap
    (None: none) and the log-softmax in fp32 (float64 for float64 inputs); per-sequence sums
    (3)."""
    z = h @ w.T
    z = z if z.dtype == torch.float64 else z.float()
    logp = (z if cap is None else torch.tanh(z / cap) * cap).log_softmax(-1)
    tok = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    tok = torch.where(labels != -100, tok, 0.0)
    return torch.zeros(3, dtype=tok.dtype, device=tok.device).index_add(0, seq_ids, tok)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "rel_margin", "factor"), [(torch.float32, 2e-6, 1.0), (torch.bfloat16, 2e-3, 1.5)]
)
def test_softcap_head_on_cuda_is_no_worse_than_plain_pytorch_against_float64(
    dtype, rel_margin, factor
):
    """131 tokens over 3 sequences, H = 64, V = 50,257 (not a power of two) in chunks of 48
    tokens (two whole chunks and a tail of 35, cut through sequences): the per-sequence sums
    and the gradients of hidden and weight, each no further from float64 truth (on the same
    rounded inputs) than plain PyTorch on the whole logits in the same dtype, plus a margin;
    the no-grad pass gives the training forward's sums bitwise."""
    from tests.conftest import assert_no_worse

    cap = 30.0  # Gemma 2's; logits of std ~40 (weights scaled so), which the cap bends
    h, w, labels, seq_ids, _ = _inputs(seed=3, n=131, vocab=50_257, hidden=64)
    w = w * (40.0 / (0.8 * 64**0.5))
    h, w = h.to("cuda", dtype), w.to("cuda", dtype)
    labels, seq_ids = labels.cuda(), seq_ids.cuda()
    coeff = torch.tensor([0.7, -1.3, 2.1], device="cuda", dtype=torch.float64)

    def ours(h, w):
        seq = softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=cap, chunk_tokens=48)
        assert seq.dtype == torch.float32 and seq.device.type == "cuda"
        return seq

    def plain(h, w):
        return _capped_seq_logps(h, w, labels, seq_ids, cap)

    def value_and_grads(fn, h, w):
        h = h.detach().clone().requires_grad_(True)
        w = w.detach().clone().requires_grad_(True)
        seq = fn(h, w)
        (seq * coeff.to(seq.dtype)).sum().backward()
        assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
        return seq.detach(), h.grad, w.grad

    got = value_and_grads(ours, h, w)
    base = value_and_grads(plain, h, w)
    truth = value_and_grads(plain, h.double(), w.double())
    # the cap matters: the uncapped sums are far from the capped ones
    uncapped = _capped_seq_logps(h.double(), w.double(), labels, seq_ids, None)
    assert (uncapped - truth[0]).abs().max() > 1.0
    for name, o, b, t in zip(("seq_logps", "grad_hidden", "grad_weight"), got, base, truth):
        assert_no_worse(name, o, b, t, rel_margin=rel_margin, factor=factor)
    with torch.no_grad():
        again = ours(h, w)
    assert torch.equal(again, got[0])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_cap_far_above_the_logits_gives_the_uncapped_ops_numbers(impl):
    # two independent implementations: with c = 1e6, c·tanh(z/c) differs from z by z³/(3c²)
    # (under 1e-9 here), so the capped head must give sequence_logprobs' sums, WPO's aligned
    # sums and gradients, token weights included, to float32 rounding
    from sdpo.kernels import sequence_logprobs

    h, w, labels, seq_ids, weights = _inputs(seed=3, vocab=211)
    outs = []
    for capped in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if capped:
            seq, aligned = softcap_sequence_logprobs(
                hh, ww, labels, seq_ids, 3, softcap=1e6, token_weights=weights, return_aligned=True
            )
        else:
            seq, aligned = sequence_logprobs(
                hh, ww, labels, seq_ids, 3, impl=impl, token_weights=weights, return_aligned=True
            )
        (seq * torch.tensor([0.7, -1.3, 2.1])).sum().backward()
        outs.append((seq.detach(), aligned, hh.grad, ww.grad))
    for ours, theirs in zip(*outs, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- torch.compile: the custom ops trace whole --------------------------------------------


def _compiled_and_eager(objective, h, w):
    """(value, grad_h, grad_w) of ``objective`` compiled with fullgraph (any graph break fails)
    and eager."""
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, objective):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(hh, ww)
        out[0].backward()
        results.append((out[0].detach(), *out[1:], hh.grad, ww.grad))
    return results


def test_compiled_softcap_head_has_no_graph_break_and_matches_eager_and_float64():
    """fullgraph=True over odd sizes (37 tokens, vocabulary 61, hidden 13, chunks of 10 that
    cut through sequences), with token weights, WPO's sums and the token metrics: the compiled
    values and gradients are eager's bit for bit and float64 truth's to fp32 rounding."""
    h, w, labels, seq_ids, weights = _inputs(seed=4, n=131, vocab=61, hidden=13)
    h, labels, weights = h[:37], labels[:37], weights[:37]
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 19, 7]))
    coeff = torch.tensor([0.7, -1.3, 2.1])

    def objective(h, w):
        seq, aligned, stats = softcap_sequence_logprobs(
            h, w, labels, seq_ids, 3, softcap=CAP, chunk_tokens=10, token_weights=weights,
            return_aligned=True, return_stats=True,
        )  # fmt: skip
        return (seq * coeff).sum(), seq.detach(), aligned, stats

    got, eager = _compiled_and_eager(objective, h, w)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref_seq, ref_aligned = _reference(h64, w64, labels, seq_ids, weights)
    (ref_seq * coeff.double()).sum().backward()
    _, seq, aligned, stats, grad_h, grad_w = got
    assert stats.shape == (3, 3) and not aligned.requires_grad
    torch.testing.assert_close(seq.double(), ref_seq.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aligned.double(), ref_aligned.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_h.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_compiled_softcap_head_still_names_bad_labels():
    h, w, labels, seq_ids, _ = _inputs(seed=6, n=131, vocab=61, hidden=5)
    labels = labels.clone()
    labels[7] = 61

    def scores(h, w):
        return softcap_sequence_logprobs(h, w, labels, seq_ids, 3, softcap=CAP)

    compiled = torch.compile(scores, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels\[7\] = 61 is outside the vocabulary"):
        compiled(h, w)


def test_opcheck_softcap_ops():
    """Schema, autograd registration and fake implementations of the two ``sdpo::`` ops."""
    h, w, labels, seq_ids, weights = _inputs(seed=7, n=29, vocab=31, hidden=6)
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([10, 12, 7]))
    h, w = h.requires_grad_(), w.requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    fwd = torch.ops.sdpo.softcap_sequence_logprobs_fwd
    for extra in ((None, False, False), (weights, True, True)):
        torch.library.opcheck(fwd, (h, w, labels, seq_ids, 3, CAP, 8, *extra), test_utils=utils)
    grad_seq = torch.tensor([0.5, -1.0, 2.0])
    for need in ((True, True), (True, False), (False, True)):
        args = (grad_seq, h.detach(), w.detach(), labels, seq_ids, CAP, 8, *need, weights)
        torch.library.opcheck(torch.ops.sdpo.softcap_sequence_logprobs_bwd, args, test_utils=utils)
