"""The log-prob head of models whose logits are soft-capped: ``c * tanh((hidden @ W.T) / c)``.

Gemma 2 caps its logits (``config.final_logit_softcapping``, c = 30), which the other ops of
this package cannot express: they stream ``hidden @ W.T`` straight into the log-softmax. This
module is their plain-PyTorch counterpart for such models, kept apart so that the hot path's
kernels and custom ops stay as they are. It is simple on purpose and its speed is not measured
on a GPU.

``softcap_sequence_logprobs`` takes the arguments of ``sequence_logprobs`` (less ``impl``) and
the cap. Like it, it chunks over tokens, so that no (N, V) logits tensor exists: the forward
holds one chunk of fp32 logits at a time and keeps only its inputs; the backward recomputes
each chunk's capped logits and forms its gradient from them, with the weight's gradient
accumulated in fp32. Forward and backward are ``torch.library`` custom ops
(``sdpo::softcap_sequence_logprobs_fwd`` / ``_bwd``, with fake implementations and an autograd
formula, as ``sequence_logprobs``' ops), so ``torch.compile(fullgraph=True)`` traces a caller
without a graph break. Per chunk of T rows and vocabulary V it costs 2·T·H·V
FLOP in the forward and 6·T·H·V in the backward (the recompute and the two gradient matmuls),
the chunked kernels' 8·N·H·V in total, plus the elementwise tanh on every logit.

The numbers: z = hidden @ W.T in the promoted dtype of hidden and weight (autocast is off inside,
as it does not reach the other ops' kernels), then in fp32
y = tanh(z / c) * c (the order transformers applies it), token_logp = y[label] - logsumexp(y),
0 where the label is -100, summed per sequence with ``token_weights`` (LD-DPO) as in
``sequence_logprobs``. ``return_aligned`` (WPO) also gives each sequence's detached sum of
``token_logp - log sum_v p_v^2``. The gradient of a logit is
``g_token * (onehot - softmax(y)) * (1 - (y / c)^2)``.
"""

from __future__ import annotations

if not __name__.startswith("sdpo.kernels."):  # see kernels/__init__.py
    raise ImportError(
        f"{__name__} is sdpo's kernel module {__name__.rpartition('.')[2]!r}, importable only as "
        "sdpo.kernels.*"
    )

import math

import torch

from .linear_logprobs import (
    _accumulate_grad_weight,
    _check_linear_shapes,
    _compute_dtype,
    _fake_head_grads,
    default_chunk_tokens,
)
from .logprobs import (
    IGNORE_INDEX,
    _row_stats,
    check_labels_in_vocab,
    check_seq_ids_in_range,
    check_token_weights,
    sum_per_sequence,
    weighted,
)


def _capped_logits(h: torch.Tensor, w: torch.Tensor, cap: float, dtype: torch.dtype):
    """(T, V) fp32 ``tanh((h @ w.T) / cap) * cap``, the matmul in ``dtype`` (w's already)."""
    z = (h.to(dtype) @ w.T).float()
    return z.div_(cap).tanh_().mul_(cap)


# The forward and backward are ``torch.library`` custom ops (namespace ``sdpo``, as the
# kernels' ops in linear_logprobs.py), so that ``torch.compile(fullgraph=True)`` traces a caller
# whole. The forward always returns three tensors: a custom op has no optional outputs, so
# WPO's sums are (0,) and the statistics (0, 3) when not asked for. Autocast is turned off
# inside both ops' bodies: autocast passes custom ops through untouched but would reach the
# matmuls inside them, so without this the head would run in autocast's dtype, and a
# backward() called inside an autocast block would recompute in it.


@torch.library.custom_op("sdpo::softcap_sequence_logprobs_fwd", mutates_args=())
def _softcap_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    cap: float,
    chunk_tokens: int,
    token_weights: torch.Tensor | None,
    with_aligned: bool,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq_logps (S,), aligned (S,) or (0,), stats (S, 3) or (0, 3)), all fp32."""
    # the label and sequence-index checks read values, so they run here, not in the traced
    # wrapper (as in sequence_logprobs' ops)
    check_labels_in_vocab(labels, vocab_size=weight.shape[0])
    check_seq_ids_in_range(seq_ids, num_seqs)
    with torch.autocast(hidden.device.type, enabled=False):
        return _softcap_forward(
            hidden,
            weight,
            labels,
            seq_ids,
            num_seqs,
            cap,
            chunk_tokens,
            token_weights,
            with_aligned,
            with_stats,
        )


def _softcap_forward(
    hidden, weight, labels, seq_ids, num_seqs, cap, chunk, token_weights, lsq, with_stats
):
    """The forward op's numbers, one chunk of ``chunk`` rows of capped logits at a time."""
    dtype = _compute_dtype(hidden, weight)
    n = hidden.shape[0]
    token_logps = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    aligned = torch.zeros(n if lsq else 0, dtype=torch.float32, device=hidden.device)
    stats = torch.zeros(num_seqs if with_stats else 0, 3, device=hidden.device)
    w = weight.to(dtype)
    for t0 in range(0, n, chunk):
        t1 = min(n, t0 + chunk)
        y = _capped_logits(hidden[t0:t1], w, cap, dtype)  # (T, V)
        lab = labels[t0:t1]
        scored = lab != IGNORE_INDEX
        lse = torch.logsumexp(y, dim=-1)  # (T,)
        tok = y.gather(1, lab.clamp(min=0).long()[:, None])[:, 0] - lse
        token_logps[t0:t1] = torch.where(scored, tok, 0.0)
        if with_stats:  # of the capped logits, before y is overwritten below
            stats.index_add_(0, seq_ids[t0:t1], _row_stats(y, lab))
        if lsq:  # log sum_v p_v^2 = logsumexp(2 (y - lse))
            sq = torch.logsumexp(y.sub_(lse[:, None]).mul_(2.0), dim=-1)
            aligned[t0:t1] = torch.where(scored, tok - sq, 0.0)
        del y
    seq = sum_per_sequence(weighted(token_logps, token_weights), seq_ids, num_seqs)
    if lsq:
        aligned = sum_per_sequence(aligned, seq_ids, num_seqs)
    return seq, aligned, stats


@_softcap_fwd.register_fake
def _softcap_fwd_fake(
    hidden, weight, labels, seq_ids, num_seqs, cap, chunk_tokens, token_weights, lsq, stats
):
    seq = hidden.new_empty(num_seqs, dtype=torch.float32)
    aligned = hidden.new_empty(num_seqs if lsq else 0, dtype=torch.float32)
    return seq, aligned, hidden.new_empty(num_seqs if stats else 0, 3, dtype=torch.float32)


@torch.library.custom_op("sdpo::softcap_sequence_logprobs_bwd", mutates_args=())
def _softcap_bwd(
    grad_seq: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    cap: float,
    chunk_tokens: int,
    need_hidden: bool,
    need_weight: bool,
    token_weights: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[grad_hidden if need_hidden, grad_weight if need_weight], in hidden's/weight's dtypes
    (a list, as sequence_logprobs' backward op: a gradient nobody asked for is not formed)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _softcap_backward(
            grad_seq,
            hidden,
            weight,
            labels,
            seq_ids,
            cap,
            chunk_tokens,
            need_hidden,
            need_weight,
            token_weights,
        )


def _softcap_backward(
    grad_seq, hidden, weight, labels, seq_ids, cap, chunk, need_h, need_w, token_weights
):
    """The backward op's gradients, recomputing each chunk's capped logits."""
    dtype = _compute_dtype(hidden, weight)
    # each scored token's share of its sequence's gradient, times its weight
    g_tok = weighted(grad_seq.float()[seq_ids], token_weights)
    g_tok = torch.where(labels != IGNORE_INDEX, g_tok, 0.0)  # (N,)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    # dW summed over the chunks in fp32 (or the compute dtype, if wider), each chunk's
    # product added unrounded as in the other heads
    acc = torch.promote_types(torch.float32, dtype)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    w = weight.to(dtype)
    for t0 in range(0, hidden.shape[0], chunk):
        t1 = min(hidden.shape[0], t0 + chunk)
        h = hidden[t0:t1].to(dtype)
        y = _capped_logits(h, w, cap, dtype)  # (T, V)
        g = g_tok[t0:t1, None]
        # d(token_logp)/dy = onehot - softmax(y); dy/dz = 1 - (y / c)^2, formed in y's
        # buffer: two (T, V) fp32 tensors at a time
        grad = torch.softmax(y, dim=-1).mul_(-g)
        lab = labels[t0:t1].clamp(min=0).long()[:, None]
        grad.scatter_add_(1, lab, g)
        slope = y.div_(cap).square_().neg_().add_(1.0)
        grad = grad.mul_(slope).to(dtype)  # (T, V): d loss / d z
        del y, slope
        if need_h:
            grad_h[t0:t1] = (grad @ w).to(hidden.dtype)
        if need_w:
            _accumulate_grad_weight(grad_w, grad, h)
    return [
        g for g in (grad_h, None if grad_w is None else grad_w.to(weight.dtype)) if g is not None
    ]


@_softcap_bwd.register_fake
def _softcap_bwd_fake(
    grad_seq, hidden, weight, labels, seq_ids, cap, chunk, need_h, need_w, token_weights=None
):
    return _fake_head_grads(hidden, weight, need_h, need_w)


def _softcap_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, seq_ids, _, cap, chunk_tokens, token_weights, _, _ = inputs
    ctx.cap, ctx.chunk_tokens = cap, chunk_tokens
    ctx.weighted = token_weights is not None
    ctx.save_for_backward(
        hidden, weight, labels, seq_ids, *(() if token_weights is None else (token_weights,))
    )


def _softcap_grads(ctx, grad_seq, _grad_aligned, _grad_stats):
    del _grad_aligned, _grad_stats  # WPO's sums and the token metrics are constants
    if torch.is_grad_enabled():  # create_graph=True: its gradient would be silently zero
        raise RuntimeError(
            "softcap_sequence_logprobs has first-order gradients only; backward with "
            "create_graph=True is not supported"
        )
    hidden, weight, labels, seq_ids, *rest = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    if grad_seq is None or not (need_h or need_w):
        return (None,) * 10
    grads = torch.ops.sdpo.softcap_sequence_logprobs_bwd(
        grad_seq,
        hidden,
        weight,
        labels,
        seq_ids,
        ctx.cap,
        ctx.chunk_tokens,
        need_h,
        need_w,
        rest[0] if ctx.weighted else None,
    )
    return (grads[0] if need_h else None, grads[-1] if need_w else None, *(None,) * 8)


torch.library.register_autograd(
    "sdpo::softcap_sequence_logprobs_fwd", _softcap_grads, setup_context=_softcap_setup_context
)


def softcap_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    softcap: float,
    chunk_tokens: int | None = None,
    token_weights: torch.Tensor | None = None,
    return_aligned: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(S,) fp32 summed log-probs of ``labels`` per packed sequence under soft-capped logits
    ``tanh((hidden @ weight.T) / softcap) * softcap``; every other argument and the outputs as
    in :func:`~sdpo.kernels.sequence_logprobs` (``return_aligned``: ``(seq_logps, aligned)``;
    ``return_stats``: the token metrics' (S, 3) sums last, of the capped logits).
    ``chunk_tokens`` rows of fp32 logits are held at a time (default: ``default_chunk_tokens``
    for fp32 logits). Differentiable w.r.t. hidden and weight, first order; see the module
    docstring."""
    _check_linear_shapes(hidden, weight, labels, seq_ids, num_seqs)
    check_token_weights(token_weights, hidden.shape[0], device=hidden.device)
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(
            vocab_size=weight.shape[0], hidden_size=weight.shape[1], dtype=torch.float32
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    seq, aligned, stats = _softcap_fwd(
        hidden,
        weight,
        labels,
        seq_ids,
        num_seqs,
        softcap,
        chunk_tokens,
        token_weights,
        return_aligned,
        return_stats,
    )
    aligned, stats = aligned.detach(), stats.detach()
    if not (return_aligned or return_stats):
        return seq
    return (seq, *((aligned,) if return_aligned else ()), *((stats,) if return_stats else ()))


__all__ = ["softcap_sequence_logprobs"]
