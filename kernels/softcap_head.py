"""The log-prob head of models whose logits are soft-capped: ``c * tanh((hidden @ W.T) / c)``.

Gemma 2 caps its logits (``config.final_logit_softcapping``, c = 30), which the other ops of
this package cannot express: they stream ``hidden @ W.T`` straight into the log-softmax. This
module is their plain-PyTorch counterpart for such models, kept apart so that the hot path's
kernels and custom ops stay as they are. It is simple on purpose and its speed is not measured
on a GPU.

``softcap_sequence_logprobs`` takes the arguments of ``sequence_logprobs`` (less ``impl``) and
the cap. Like it, it chunks over tokens, so that no (N, V) logits tensor exists: the forward
holds one chunk of fp32 logits at a time and keeps only its inputs; the backward recomputes
each chunk's capped logits and forms its gradient from them (an ``autograd.Function``), with the
weight's gradient accumulated in fp32. Per chunk of T rows and vocabulary V it costs 2·T·H·V
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
    _check_linear_inputs,
    _compute_dtype,
    default_chunk_tokens,
)
from .logprobs import (
    IGNORE_INDEX,
    _row_stats,
    check_token_weights,
    sum_per_sequence,
    weighted,
)


def _capped_logits(h: torch.Tensor, w: torch.Tensor, cap: float, dtype: torch.dtype):
    """(T, V) fp32 ``tanh((h @ w.T) / cap) * cap``, the matmul in ``dtype`` (w's already)."""
    z = (h.to(dtype) @ w.T).float()
    return z.div_(cap).tanh_().mul_(cap)


class _SoftcapLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, labels, seq_ids, num_seqs, cap, chunk, token_weights, lsq, with_stats
    ):
        dtype = _compute_dtype(hidden, weight)
        n = hidden.shape[0]
        token_logps = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        aligned = torch.zeros_like(token_logps) if lsq else None
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
        ctx.save_for_backward(hidden, weight, labels, seq_ids, token_weights)
        ctx.cap, ctx.chunk, ctx.dtype = cap, chunk, dtype
        out = None if aligned is None else sum_per_sequence(aligned, seq_ids, num_seqs)
        ctx.mark_non_differentiable(*(t for t in (out, stats) if t is not None))
        return seq, out, stats

    @staticmethod
    def backward(ctx, grad_seq, _grad_aligned, _grad_stats):
        if torch.is_grad_enabled():  # create_graph=True: its gradient would be silently zero
            raise RuntimeError(
                "softcap_sequence_logprobs has first-order gradients only; backward with "
                "create_graph=True is not supported"
            )
        hidden, weight, labels, seq_ids, token_weights = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if grad_seq is None or not (need_h or need_w):
            return (None,) * 10
        # autocast off as in the forward: a backward() called inside an autocast block would
        # otherwise run the recompute and the gradient matmuls in its dtype
        with torch.autocast(hidden.device.type, enabled=False):
            return _softcap_backward(ctx, grad_seq, hidden, weight, labels, seq_ids, token_weights)


def _softcap_backward(ctx, grad_seq, hidden, weight, labels, seq_ids, token_weights):
    """_SoftcapLogprobs' gradients (hidden, weight, then None for the other inputs)."""
    need_h, need_w = ctx.needs_input_grad[:2]
    cap, chunk, dtype = ctx.cap, ctx.chunk, ctx.dtype
    # each scored token's share of its sequence's gradient, times its weight
    g_tok = weighted(grad_seq.float()[seq_ids], token_weights)
    g_tok = torch.where(labels != IGNORE_INDEX, g_tok, 0.0)  # (N,)
    grad_h = torch.empty_like(hidden) if need_h else None
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
    return (
        grad_h,
        grad_w.to(weight.dtype) if need_w else None,
        *(None,) * 8,
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
    _check_linear_inputs(hidden, weight, labels, seq_ids, num_seqs)
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
    with torch.autocast(hidden.device.type, enabled=False):  # as the kernels: their own dtype
        seq, aligned, stats = _SoftcapLogprobs.apply(
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
    if not (return_aligned or return_stats):
        return seq
    return (seq, *((aligned,) if return_aligned else ()), *((stats,) if return_stats else ()))


__all__ = ["softcap_sequence_logprobs"]
