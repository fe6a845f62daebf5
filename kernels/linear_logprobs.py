"""lm_head matmul fused with the log-prob core, chunked over tokens.

Owns the two ops that take final hidden states and the lm_head weight instead of logits,
so that no full (N, V) logits tensor ever exists:

- ``sequence_logprobs``: per-sequence summed log-probs, general backward (strategy a):
  the forward keeps only each row's logsumexp; the backward recomputes each chunk's
  logits and forms the gradient in place in the chunk buffer. Costs 8·N·H·V FLOP for
  forward + backward. Under ``torch.no_grad`` it is the reference (scoring) pass: one
  chunk of logits alive at a time, nothing saved, same numbers as the training forward.
- ``linear_pair_loss``: for losses separable by preference pair (DPO with cached
  reference values is), strategy (b): each chunk holds whole pairs (sequences 2p, 2p+1),
  and while its logits are in hand the pair loss's gradient w.r.t. the chunk's
  log-probs is taken with autograd on the tiny per-pair tensors, the logits gradient is
  formed in place, and dH, dW are accumulated at once. Forward + backward costs
  6·N·H·V FLOP (3 matmuls); the autograd backward only scales the stored gradients.

Both run the chunk matmuls with cuBLAS through torch and the row core of logprobs.py
(Triton kernels or the PyTorch reference) on the chunk's logits. ``sequence_logprobs`` is
registered as ``torch.library`` custom ops (``sdpo::sequence_logprobs_fwd`` / ``_bwd``, with
fake implementations and an autograd formula), so ``torch.compile`` traces it without a
graph break; ``linear_pair_loss`` takes a Python callable, which a custom op cannot, and
stays an ``autograd.Function`` that the compiler skips.

Chunk rule (``default_chunk_tokens``): a chunk of logits is ``chunk · V`` elements of
the compute dtype; it is sized to about 256 MiB, but never below 1024 tokens, because
the per-chunk dW update (a GEMM with K = chunk tokens that reads and writes the V×H
fp32 accumulator) has arithmetic intensity ≈ chunk/4 FLOP/byte and must stay above an
H100's ≈ 250 FLOP/byte ridge to remain compute-bound. H cancels out of both ratios (the
chunk GEMMs and the accumulator traffic both scale with H), so the rule uses V and the
element size only. NOT YET MEASURED on a GPU: benchmarks/throughput.py is where it gets
checked (bf16: V=32,000 -> 4096 tokens, V=128,256 -> 1024 tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dispatch import resolve_impl
from .logprobs import (
    IGNORE_INDEX,
    check_labels_in_vocab,
    check_packed_shapes,
    rows_backward,
    rows_forward,
    sum_per_sequence,
)

CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_TOKENS = 1024
MAX_CHUNK_TOKENS = 16384
CHUNK_ALIGN = 128

PairLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def default_chunk_tokens(*, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: ~256 MiB of logits, at least 1024 tokens (see the module docstring)."""
    del hidden_size  # cancels out of the rule; kept in the signature so callers pass it
    tokens = CHUNK_BYTES // (vocab_size * dtype.itemsize)
    tokens = max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, tokens))
    return max(CHUNK_ALIGN, tokens // CHUNK_ALIGN * CHUNK_ALIGN)


def _check_linear_shapes(hidden, weight, labels, seq_ids) -> None:
    """Static shape/dtype checks (torch.compile traces them)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)} (flatten a (B, T, H) batch to (B*T, H) first)"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is "
            f"{tuple(weight.shape)}; the lm_head weight must be (vocab, hidden)"
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(
            f"hidden and weight must be float tensors, got {hidden.dtype}, {weight.dtype}"
        )
    check_packed_shapes(labels, seq_ids, hidden.shape[0])


def _check_linear_inputs(hidden, weight, labels, seq_ids) -> None:
    """The static checks and the label range check (eager callers)."""
    _check_linear_shapes(hidden, weight, labels, seq_ids)
    check_labels_in_vocab(labels, vocab_size=weight.shape[0])


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulate_grad_weight(acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, H) += grad_logits (n, V)^T @ h (n, H), accumulating into acc's dtype."""
    if acc.dtype == grad_logits.dtype:
        acc.addmm_(grad_logits.t(), h)
        return
    if acc.is_cuda and _mixed_addmm_ok(acc.device):
        # cuBLAS with bf16 inputs and an fp32 C: no (V, H) temporary, fp32 accumulation.
        torch.addmm(acc, grad_logits.t(), h, out_dtype=acc.dtype, out=acc)
        return
    acc.add_(torch.mm(grad_logits.t(), h))


_MIXED_ADDMM: dict[torch.device, bool] = {}


def _mixed_addmm_ok(device: torch.device) -> bool:
    """Whether torch.addmm(..., out_dtype=float32) with bf16 inputs works here (torch >= 2.8)."""
    if device not in _MIXED_ADDMM:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
            c = torch.ones(16, 16, dtype=torch.float32, device=device)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _MIXED_ADDMM[device] = bool(torch.all(c == 17.0).item())
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM[device] = False
    return _MIXED_ADDMM[device]


def _chunk_logits(buf: torch.Tensor, h: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """logits (n, V) = h (n, H) @ W^T, written into the front rows of the reusable buffer."""
    out = buf[: h.shape[0]]
    torch.mm(h, w_t, out=out)
    return out


# ----------------------------------------------------------------------------------------
# Strategy (a): per-sequence log-probs with a recomputing backward, as torch.library custom
# ops so that torch.compile traces them without a graph break
# ----------------------------------------------------------------------------------------
# The forward op returns the per-row lse beside the sums only so that autograd can save
# it; the public function drops it. Under torch.no_grad the op runs without setup_context:
# one chunk of logits alive at a time, nothing saved. ``grad_weight_dtype`` travels as a
# forward argument because setup_context reads it there.


@torch.library.custom_op("sdpo::sequence_logprobs_fwd", mutates_args=())
def _sequence_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    impl: str,
    chunk_tokens: int,
    grad_weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_logps (S,), lse (N,)), both fp32."""
    del grad_weight_dtype  # read by setup_context only
    check_labels_in_vocab(labels, vocab_size=weight.shape[0])
    n = hidden.shape[0]
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    w_t = w.t()
    token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    buf = torch.empty(min(chunk_tokens, n), w.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        stop = min(n, start + chunk_tokens)
        logits = _chunk_logits(buf, hidden[start:stop].to(dtype), w_t)  # (n_c, V)
        logp_c, lse_c = rows_forward(logits, labels[start:stop], impl=impl)
        token_logps[start:stop] = logp_c
        lse[start:stop] = lse_c
    del buf
    return sum_per_sequence(token_logps, seq_ids, num_seqs), lse


@_sequence_logprobs_fwd.register_fake
def _sequence_logprobs_fwd_fake(
    hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, grad_weight_dtype
):
    return (
        hidden.new_empty(num_seqs, dtype=torch.float32),
        hidden.new_empty(hidden.shape[0], dtype=torch.float32),
    )


@torch.library.custom_op("sdpo::sequence_logprobs_bwd", mutates_args=())
def _sequence_logprobs_bwd(
    grad_seq: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    lse: torch.Tensor,
    impl: str,
    chunk_tokens: int,
    grad_weight_dtype: torch.dtype,
    need_hidden: bool,
    need_weight: bool,
) -> list[torch.Tensor]:
    """[grad_hidden if need_hidden, grad_weight if need_weight], in hidden's/weight's dtypes.

    A list because a custom op cannot return an optional tensor, and a gradient nobody
    asked for is not computed (its matmul would cost 2·N·H·V FLOP).
    """
    n = hidden.shape[0]
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    grad_token = grad_seq.float()[seq_ids]  # (N,) fp32; the kernel zeroes label == -100
    grad_h = (
        torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device) if need_hidden else None
    )
    grad_w = torch.zeros(w.shape, dtype=grad_weight_dtype, device=w.device) if need_weight else None
    buf = torch.empty(min(chunk_tokens, n), w.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        stop = min(n, start + chunk_tokens)
        h = hidden[start:stop].to(dtype)
        logits = _chunk_logits(buf, h, w.t())
        grad_logits = rows_backward(
            logits,
            labels[start:stop],
            lse[start:stop],
            grad_token[start:stop],
            impl=impl,
            out=logits,
        )
        if grad_h is not None:
            torch.mm(grad_logits, w, out=grad_h[start:stop])
        if grad_w is not None:
            _accumulate_grad_weight(grad_w, grad_logits, h)
    grads = []
    if grad_h is not None:
        grads.append(grad_h.to(hidden.dtype))
    if grad_w is not None:
        grads.append(grad_w.to(weight.dtype))
    return grads


@_sequence_logprobs_bwd.register_fake
def _sequence_logprobs_bwd_fake(
    grad_seq,
    hidden,
    weight,
    labels,
    seq_ids,
    lse,
    impl,
    chunk_tokens,
    grad_weight_dtype,
    need_hidden,
    need_weight,
):
    grads = []
    if need_hidden:
        grads.append(torch.empty_like(hidden, memory_format=torch.contiguous_format))
    if need_weight:
        grads.append(torch.empty_like(weight, memory_format=torch.contiguous_format))
    return grads


def _sequence_logprobs_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, grad_weight_dtype = inputs
    ctx.num_seqs = num_seqs
    ctx.impl = impl
    ctx.chunk_tokens = chunk_tokens
    ctx.grad_weight_dtype = grad_weight_dtype
    ctx.save_for_backward(hidden, weight, labels, seq_ids, output[1])


def _sequence_logprobs_backward(ctx, grad_seq, grad_lse):
    del grad_lse  # lse is internal: the public function never returns it
    hidden, weight, labels, seq_ids, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return (None,) * 8
    if grad_seq is None:
        grad_seq = lse.new_zeros(ctx.num_seqs)
    grads = torch.ops.sdpo.sequence_logprobs_bwd(
        grad_seq,
        hidden,
        weight,
        labels,
        seq_ids,
        lse,
        ctx.impl,
        ctx.chunk_tokens,
        ctx.grad_weight_dtype,
        need_h,
        need_w,
    )
    grad_h = grads[0] if need_h else None
    grad_w = grads[-1] if need_w else None
    return grad_h, grad_w, None, None, None, None, None, None


torch.library.register_autograd(
    "sdpo::sequence_logprobs_fwd",
    _sequence_logprobs_backward,
    setup_context=_sequence_logprobs_setup_context,
)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    impl: str = "auto",
    chunk_tokens: int | None = None,
    grad_weight_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """(S,) fp32 summed log-probs of ``labels`` per packed sequence, from hidden states.

    hidden (N, H) and weight (V, H) of any float dtype (computed in their promoted dtype),
    labels (N,) int64 with -100 for tokens not scored, seq_ids (N,) int64 in [0, num_seqs).
    Differentiable w.r.t. hidden and weight; the gradient of W accumulates over chunks in
    ``grad_weight_dtype`` (fp32 by default; ``None`` = W's dtype, which halves its memory).
    Under ``torch.no_grad`` this is the reference pass: one chunk of logits at a time.
    Runs as the custom ops ``sdpo::sequence_logprobs_fwd`` / ``_bwd``, so ``torch.compile``
    traces it without a graph break.
    """
    _check_linear_shapes(hidden, weight, labels, seq_ids)
    impl = resolve_impl(impl, hidden.device)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(
            vocab_size=weight.shape[0],
            hidden_size=weight.shape[1],
            dtype=_compute_dtype(hidden, weight),
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    # None -> the compute dtype, resolved here: the ops take a plain dtype argument.
    accum_dtype = grad_weight_dtype or _compute_dtype(hidden, weight)
    seq_logps, _ = _sequence_logprobs_fwd(
        hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, accum_dtype
    )
    return seq_logps


# ----------------------------------------------------------------------------------------
# Strategy (b): a pair-separable loss with gradients formed in the forward
# ----------------------------------------------------------------------------------------


def _pair_chunks(
    seq_ids: torch.Tensor, num_seqs: int, chunk_tokens: int
) -> list[tuple[int, int, int, int]]:
    """Greedy chunks of whole pairs: [(token_start, token_stop, pair_start, pair_stop), ...].

    A pair longer than chunk_tokens gets a chunk of its own (its logits are held whole).
    """
    if num_seqs % 2:
        raise ValueError(
            f"linear_pair_loss needs whole pairs: num_seqs={num_seqs} is odd (sequence 2p is "
            "the chosen and 2p+1 the rejected completion of pair p)"
        )
    n = seq_ids.shape[0]
    counts = torch.bincount(seq_ids, minlength=num_seqs)
    ordered = bool((seq_ids[1:] >= seq_ids[:-1]).all()) if n > 1 else True
    if not ordered or counts.shape[0] != num_seqs:
        raise ValueError(
            "linear_pair_loss needs a packed stream: seq_ids must be non-decreasing and "
            f"< num_seqs={num_seqs} (sequences back to back, as engine.packing.pack_pairs builds)"
        )
    pair_tokens = counts.view(-1, 2).sum(1).tolist()
    chunks = []
    tok = 0
    p0, t0, size = 0, 0, 0
    for p, count in enumerate(pair_tokens):
        if size and size + count > chunk_tokens:
            chunks.append((t0, tok, p0, p))
            p0, t0, size = p, tok, 0
        size += count
        tok += count
    if size or not chunks:
        chunks.append((t0, tok, p0, len(pair_tokens)))
    return chunks


class LinearPairLoss(torch.autograd.Function):
    """(hidden, weight) -> (loss, seq_logps); dH and dW are formed in the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        seq_ids,
        num_seqs,
        pair_loss,
        impl,
        chunk_tokens,
        accum_dtype,
        need_h,
        need_w,
    ):
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        w_t = w.t()
        device = hidden.device
        chunks = _pair_chunks(seq_ids, num_seqs, chunk_tokens)
        largest = max(stop - start for start, stop, _, _ in chunks)
        buf = torch.empty(largest, w.shape[0], dtype=dtype, device=device)
        seq_logps = torch.zeros(num_seqs, dtype=torch.float32, device=device)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=accum_dtype or dtype, device=device) if need_w else None
        loss = None
        for t0, t1, p0, p1 in chunks:
            h = hidden[t0:t1].to(dtype)
            logits = _chunk_logits(buf, h, w_t)  # (n_c, V)
            labels_c = labels[t0:t1]
            local_ids = seq_ids[t0:t1] - 2 * p0
            token_logps, lse = rows_forward(logits, labels_c, impl=impl)
            seq_c = sum_per_sequence(token_logps, local_ids, 2 * (p1 - p0))  # (2k,)
            seq_logps[2 * p0 : 2 * p1] = seq_c
            with torch.enable_grad():
                chosen = seq_c[0::2].detach().requires_grad_(need_h or need_w)
                rejected = seq_c[1::2].detach().requires_grad_(need_h or need_w)
                chunk_loss = pair_loss(chosen, rejected, slice(p0, p1))
                if chunk_loss.dim() != 0:
                    raise ValueError(
                        "pair_loss must return a scalar (the sum of its pairs' loss terms), got "
                        f"shape {tuple(chunk_loss.shape)}"
                    )
                if need_h or need_w:
                    d_chosen, d_rejected = torch.autograd.grad(
                        chunk_loss, (chosen, rejected), allow_unused=True
                    )
            loss = chunk_loss.detach() if loss is None else loss + chunk_loss.detach()
            if not (need_h or need_w):
                continue
            d_seq = torch.zeros(2 * (p1 - p0), dtype=torch.float32, device=device)
            if d_chosen is not None:
                d_seq[0::2] = d_chosen.float()
            if d_rejected is not None:
                d_seq[1::2] = d_rejected.float()
            grad_logits = rows_backward(
                logits, labels_c, lse, d_seq[local_ids], impl=impl, out=logits
            )
            if need_h:
                torch.mm(grad_logits, w, out=grad_h[t0:t1])
            if need_w:
                _accumulate_grad_weight(grad_w, grad_logits, h)
        del buf
        ctx.grad_h = grad_h.to(hidden.dtype) if need_h else None
        ctx.grad_w = grad_w.to(weight.dtype) if need_w else None
        ctx.mark_non_differentiable(seq_logps)
        return loss.float(), seq_logps

    @staticmethod
    def backward(ctx, grad_loss, grad_seq_logps):
        del grad_seq_logps  # seq_logps are returned detached
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None  # free them as soon as autograd takes them
        if (
            grad_h is None
            and grad_w is None
            and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ):
            raise RuntimeError(
                "linear_pair_loss supports a single backward (no retain_graph reuse)"
            )
        # The common case is loss.backward() with grad 1: skip the (V, H) rescale.
        if grad_loss.item() != 1.0:
            grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


@torch.compiler.disable
def linear_pair_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    pair_loss: PairLoss,
    impl: str = "auto",
    chunk_tokens: int | None = None,
    grad_weight_dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-separable loss over packed preference pairs, gradients formed chunk by chunk.

    Sequence 2p is the chosen and 2p+1 the rejected completion of pair p, back to back in
    the token stream. ``pair_loss(chosen_logps (k,), rejected_logps (k,), pairs: slice)``
    returns the scalar sum of the loss terms of pairs ``pairs`` (differentiable in its two
    inputs). Returns ``(loss, seq_logps (S,) fp32 detached)`` where loss is the sum over
    chunks. Chunks hold whole pairs, about ``chunk_tokens`` tokens each (a longer pair gets
    a chunk of its own). ``grad_weight_dtype`` as in :func:`sequence_logprobs`.

    Unlike the other ops this one stays an ``autograd.Function`` behind
    ``torch.compiler.disable`` (``torch.compile`` graph-breaks around it): it takes a
    Python callable, ``pair_loss``, and a ``torch.library`` custom op can only take tensors
    and plain values.
    """
    _check_linear_inputs(hidden, weight, labels, seq_ids)
    impl = resolve_impl(impl, hidden.device)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(
            vocab_size=weight.shape[0],
            hidden_size=weight.shape[1],
            dtype=_compute_dtype(hidden, weight),
        )
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    return LinearPairLoss.apply(
        hidden,
        weight,
        labels,
        seq_ids,
        num_seqs,
        pair_loss,
        impl,
        chunk_tokens,
        grad_weight_dtype,
        need_h,
        need_w,
    )


__all__ = [
    "IGNORE_INDEX",
    "LinearPairLoss",
    "default_chunk_tokens",
    "linear_pair_loss",
    "sequence_logprobs",
]
