"""torch.compile traces sequence_logprobs and logprobs_from_logits whole (custom ops, no break).

Each compiled function runs with ``fullgraph=True``, so any graph break fails the test; it
must give the eager values and gradients bit for bit (the same kernels run in both), and
those must match float64 truth. ``torch.library.opcheck`` checks the registered ``sdpo::``
ops: schema (declared mutations), autograd registration and fake (meta) implementations.
On CPU the compiled path runs impl "torch" (and once "triton" under the interpreter); the
GPU-marked test compiles impl "triton" with inductor.
"""

import os

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sdpo.kernels import logprobs_from_logits, sequence_logprobs  # noqa: E402
from sdpo.kernels.logprobs import IGNORE_INDEX  # noqa: E402

N, S, V, H = 131, 3, 1031, 67
# All four opcheck tests run (test_aot_dispatch_dynamic too: about a second per op here).
OPCHECK_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def _batch(seed: int, *, device: str = "cpu", dtype=torch.float32):
    """131 tokens over 3 packed sequences (lengths 60, 69, 2) with masked prompt and end
    tokens; sequence 2 has exactly one scored token."""
    gen = torch.Generator().manual_seed(seed)
    lengths, prompts = [60, 69, 2], [21, 30, 1]
    labels, seq_ids = [], []
    for s, (length, prompt) in enumerate(zip(lengths, prompts)):
        lab = torch.randint(0, V, (length,), generator=gen)
        lab[:prompt] = IGNORE_INDEX
        if length > 2:
            lab[-1] = IGNORE_INDEX
        labels.append(lab)
        seq_ids.append(torch.full((length,), s, dtype=torch.int64))
    labels, seq_ids = torch.cat(labels), torch.cat(seq_ids)
    assert labels.shape == (N,) and int((labels[seq_ids == 2] != IGNORE_INDEX).sum()) == 1
    h64 = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w64 = torch.randn(V, H, generator=gen, dtype=torch.float64) * (2.0 / H**0.5)
    seq_weights = torch.randn(S, generator=gen, dtype=torch.float64)
    tok_weights = torch.randn(N, generator=gen, dtype=torch.float64)
    return dict(
        h64=h64.to(device),
        w64=w64.to(device),
        h=h64.to(device, dtype),
        w=w64.to(device, dtype),
        labels=labels.to(device),
        seq_ids=seq_ids.to(device),
        seq_weights=seq_weights.to(device),
        tok_weights=tok_weights.to(device),
    )


def _truth_token_logps(logits64: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits64, dim=-1).gather(1, labels.clamp(min=0).unsqueeze(1))
    return torch.where(labels != IGNORE_INDEX, logp.squeeze(1), 0.0)


def _per_seq(token_values: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    zeros = torch.zeros(S, dtype=token_values.dtype, device=token_values.device)
    return zeros.index_add(0, seq_ids, token_values)


def _value_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward()
    return (out.detach(), *(x.grad for x in leaves))


def _assert_same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _assert_near_truth(got, truth, *, rtol=2e-5):
    for g, t in zip(got, truth):
        scale = t.abs().max().item()
        err = (g.double() - t).abs().max().item()
        assert err <= rtol * scale + 1e-6, f"error {err:.3e} vs float64 truth (scale {scale:.3e})"


# ----------------------------------------------------------------------------------------
# sequence_logprobs
# ----------------------------------------------------------------------------------------


def _sequence_objective(b, *, impl: str, chunk_tokens: int | None):
    def objective(h, w):
        seq = sequence_logprobs(
            h, w, b["labels"], b["seq_ids"], S, impl=impl, chunk_tokens=chunk_tokens
        )
        return (seq * b["seq_weights"].to(seq.dtype)).sum()

    return objective


def _sequence_truth(b):
    def objective(h, w):
        seq = _per_seq(_truth_token_logps(h @ w.t(), b["labels"]), b["seq_ids"])
        return (seq * b["seq_weights"]).sum()

    return _value_and_grads(objective, b["h64"], b["w64"])


@pytest.mark.parametrize("chunk_tokens", [48, None])
def test_compiled_sequence_logprobs_has_no_graph_break_and_matches_eager_and_float64(
    chunk_tokens,
):
    b = _batch(seed=51)
    objective = _sequence_objective(b, impl="torch", chunk_tokens=chunk_tokens)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    got = _value_and_grads(compiled, b["h"], b["w"])
    _assert_same(got, _value_and_grads(objective, b["h"], b["w"]))
    _assert_near_truth(got, _sequence_truth(b))


def test_compiled_sequence_logprobs_triton_impl_under_the_interpreter_matches_eager():
    b = _batch(seed=52)
    objective = _sequence_objective(b, impl="triton", chunk_tokens=64)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    got = _value_and_grads(compiled, b["h"], b["w"])
    _assert_same(got, _value_and_grads(objective, b["h"], b["w"]))
    _assert_near_truth(got, _sequence_truth(b))


def test_compiled_sequence_logprobs_gives_the_hidden_grad_when_the_weight_is_frozen():
    b = _batch(seed=53)
    objective = _sequence_objective(b, impl="torch", chunk_tokens=40)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    h = b["h"].clone().requires_grad_(True)
    w = b["w"].clone()
    compiled(h, w).backward()
    assert w.grad is None
    _assert_near_truth([h.grad], [_sequence_truth(b)[1]])


def test_compiled_reference_pass_under_no_grad_equals_the_training_forward():
    b = _batch(seed=54)

    def scores(h, w):
        return sequence_logprobs(h, w, b["labels"], b["seq_ids"], S, impl="torch", chunk_tokens=32)

    compiled = torch.compile(scores, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ref = compiled(b["h"], b["w"])
    train = scores(b["h"].clone().requires_grad_(True), b["w"].clone().requires_grad_(True))
    torch.testing.assert_close(ref, train.detach(), rtol=0, atol=0)


def test_compiled_sequence_logprobs_follows_a_new_token_count_with_dynamic_shapes():
    b = _batch(seed=55)
    objective = _sequence_objective(b, impl="torch", chunk_tokens=48)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager", dynamic=True)
    _assert_same(
        _value_and_grads(compiled, b["h"], b["w"]), _value_and_grads(objective, b["h"], b["w"])
    )
    # Drop the last sequence: 129 tokens, 2 sequences' worth of seq_ids (S stays 3).
    short = {k: (v[:129] if k in ("h", "labels", "seq_ids") else v) for k, v in b.items()}
    objective = _sequence_objective(short, impl="torch", chunk_tokens=48)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager", dynamic=True)
    _assert_same(
        _value_and_grads(compiled, short["h"], short["w"]),
        _value_and_grads(objective, short["h"], short["w"]),
    )


@pytest.mark.parametrize("return_aligned", [False, True])
def test_compiled_sequence_logprobs_with_token_metrics_has_no_graph_break_and_matches_eager(
    return_aligned,
):
    """The trainer's token metrics (op ``sdpo::sequence_logprobs_stats_fwd``) compile whole:
    the same sums, statistics and gradients as eager, bit for bit, with WPO's sums or without."""
    b = _batch(seed=57)

    def run(fn):
        h = b["h"].clone().requires_grad_(True)
        w = b["w"].clone().requires_grad_(True)
        loss, *detached = fn(h, w)
        loss.backward()
        return (loss.detach(), *detached, h.grad, w.grad)

    def objective(h, w):
        seq, *rest = sequence_logprobs(
            h,
            w,
            b["labels"],
            b["seq_ids"],
            S,
            impl="torch",
            chunk_tokens=48,
            token_weights=b["tok_weights"].float(),
            return_aligned=return_aligned,
            return_stats=True,
        )
        return ((seq * b["seq_weights"].float()).sum(), *rest)

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    got, want = run(compiled), run(objective)
    assert len(got) == 4 + return_aligned and got[-3].shape == (S, 3)
    _assert_same(got, want)


def test_compiled_sequence_logprobs_still_names_bad_labels():
    b = _batch(seed=56)
    labels = b["labels"].clone()
    labels[5] = V + 3

    def scores(h, w):
        return sequence_logprobs(h, w, labels, b["seq_ids"], S, impl="torch")

    compiled = torch.compile(scores, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels\[5\] = 1034 is outside the vocabulary"):
        compiled(b["h"], b["w"])


# ----------------------------------------------------------------------------------------
# logprobs_from_logits
# ----------------------------------------------------------------------------------------


def _logits_objective(b, *, impl: str, inplace_backward: bool = False):
    def objective(logits):
        x = logits * 1.0  # a non-leaf the in-place backward may overwrite
        seq, tok = logprobs_from_logits(
            x, b["labels"], b["seq_ids"], S, impl=impl, inplace_backward=inplace_backward
        )
        return (seq * b["seq_weights"].to(seq.dtype)).sum() + (
            tok.square() * b["tok_weights"].to(tok.dtype)
        ).sum()

    return objective


def _logits_truth(b, logits64):
    def objective(x):
        tok = _truth_token_logps(x, b["labels"])
        seq = _per_seq(tok, b["seq_ids"])
        return (seq * b["seq_weights"]).sum() + (tok.square() * b["tok_weights"]).sum()

    return _value_and_grads(objective, logits64)


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_compiled_logprobs_from_logits_has_no_graph_break_and_matches_eager_and_float64(
    inplace_backward,
):
    b = _batch(seed=61)
    logits64 = b["h64"] @ b["w64"].t()
    logits = logits64.float()
    objective = _logits_objective(b, impl="torch", inplace_backward=inplace_backward)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    got = _value_and_grads(compiled, logits)
    _assert_same(got, _value_and_grads(objective, logits))
    _assert_near_truth(got, _logits_truth(b, logits64))


# ----------------------------------------------------------------------------------------
# opcheck of the registered ops
# ----------------------------------------------------------------------------------------


def test_opcheck_sequence_logprobs_ops():
    b = _batch(seed=71)
    h = b["h"].clone().requires_grad_(True)
    w = b["w"].clone().requires_grad_(True)
    labels, seq_ids = b["labels"], b["seq_ids"]
    for dtype in (torch.float32, torch.float64):
        args = (h, w, labels, seq_ids, S, "torch", 48, dtype)
        torch.library.opcheck(torch.ops.sdpo.sequence_logprobs_fwd, args, test_utils=OPCHECK_UTILS)
        # WPO's twin (a third, non-differentiable output; the same backward)
        torch.library.opcheck(
            torch.ops.sdpo.sequence_logprobs_aligned_fwd, args, test_utils=OPCHECK_UTILS
        )
    # the token metrics' twin: (S, 3) statistics last, without WPO's sums (an empty third
    # output) and with them and token weights
    for extra in ((None, False), (b["tok_weights"].float(), True)):
        torch.library.opcheck(
            torch.ops.sdpo.sequence_logprobs_stats_fwd, (*args, *extra), test_utils=OPCHECK_UTILS
        )
    with torch.no_grad():
        _, lse = torch.ops.sdpo.sequence_logprobs_fwd(*args)
    grad_seq = b["seq_weights"].float()
    for need_h, need_w in ((True, True), (True, False), (False, True)):
        args = (grad_seq, b["h"], b["w"], labels, seq_ids, lse, "torch", 48, torch.float32)
        torch.library.opcheck(
            torch.ops.sdpo.sequence_logprobs_bwd,
            (*args, need_h, need_w),
            test_utils=OPCHECK_UTILS,
        )


def test_opcheck_logprobs_from_logits_ops():
    b = _batch(seed=72)
    logits = (b["h"] @ b["w"].t()).requires_grad_(True)
    labels, seq_ids = b["labels"], b["seq_ids"]
    for inplace in (False, True):
        torch.library.opcheck(
            torch.ops.sdpo.logprobs_fwd,
            (logits, labels, seq_ids, S, "torch", inplace),
            test_utils=OPCHECK_UTILS,
        )
    with torch.no_grad():
        _, _, lse = torch.ops.sdpo.logprobs_fwd(logits, labels, seq_ids, S, "torch", False)
    grads = (b["seq_weights"].float(), b["tok_weights"].float())
    bwd_args = (*grads, logits.detach(), labels, seq_ids, lse, "torch")
    torch.library.opcheck(torch.ops.sdpo.logprobs_bwd, bwd_args, test_utils=OPCHECK_UTILS)
    inplace_args = (*grads, logits.detach().clone(), labels, seq_ids, lse, "torch")
    torch.library.opcheck(
        torch.ops.sdpo.logprobs_bwd_inplace, inplace_args, test_utils=OPCHECK_UTILS
    )


# ----------------------------------------------------------------------------------------
# GPU: the Triton impl compiled with inductor
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_compiled_triton_ops_on_cuda_match_eager_and_float64():
    b = _batch(seed=81, device="cuda")
    objective = _sequence_objective(b, impl="triton", chunk_tokens=48)
    compiled = torch.compile(objective, fullgraph=True, backend="inductor")
    got = _value_and_grads(compiled, b["h"], b["w"])
    eager = _value_and_grads(objective, b["h"], b["w"])
    for g, e in zip(got, eager):  # inductor may reorder the small ops around the kernels
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    _assert_near_truth(got, _sequence_truth(b), rtol=1e-4)

    logits64 = b["h64"] @ b["w64"].t()
    for inplace in (False, True):
        objective = _logits_objective(b, impl="triton", inplace_backward=inplace)
        compiled = torch.compile(objective, fullgraph=True, backend="inductor")
        got = _value_and_grads(compiled, logits64.float())
        eager = _value_and_grads(objective, logits64.float())
        for g, e in zip(got, eager):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        _assert_near_truth(got, _logits_truth(b, logits64), rtol=1e-4)


def test_compiled_caller_graph_breaks_around_linear_pair_loss_and_matches_eager():
    """``linear_pair_loss`` takes a Python callable, so it stays outside compiled graphs: a
    compiled caller breaks its graph there (dynamo's disable mark, set without importing dynamo
    at import time) and gives the eager values and gradients."""
    import torch._dynamo

    from sdpo.kernels import linear_pair_loss

    b = _batch(13)
    labels, seq_ids = b["labels"], b["seq_ids"]
    seq_ids = torch.where(seq_ids == 2, 1, seq_ids)  # 2 sequences: one pair
    ref = torch.tensor([-3.0, -4.0], dtype=torch.float64)

    def pair_loss(chosen, rejected, sl):
        return -torch.nn.functional.logsigmoid(
            0.1 * ((chosen - ref[0]) - (rejected - ref[1]))
        ).sum()

    def step(h, w):
        loss, logps = linear_pair_loss(
            h * 1.5, w, labels, seq_ids, 2, pair_loss=pair_loss, impl="torch"
        )
        return loss * 2.0, logps

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        h = b["h"].clone().requires_grad_()
        w = b["w"].clone().requires_grad_()
        loss, logps = fn(h, w)
        loss.backward()
        results.append((loss.detach(), logps, h.grad, w.grad))
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)
    explained = torch._dynamo.explain(step)(b["h"], b["w"])
    assert explained.graph_break_count >= 1
    assert any("disable" in str(r.reason).lower() for r in explained.break_reasons)
