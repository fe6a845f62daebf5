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
  6·N·H·V FLOP (3 matmuls); the autograd backward only scales the stored gradients, on
  the device (an in-place multiply by the 0-dim upstream gradient, exact when it is 1;
  fused with the cast when dW accumulates in fp32 for a bf16 W).

Host syncs of ``linear_pair_loss``: the chunk plan needs each pair's token count on the
host. Given ``pair_tokens`` (the trainer reads them off the host copy of ``cu_seqlens``),
the plan is built there and neither direction reads the device; on a GPU the counts are
checked against ``seq_ids`` by asynchronous device asserts. Without them the counts are
read from ``seq_ids``: one sync per call.

Long pairs (``max_chunk_tokens``, B): chunks hold whole pairs, so without a cap a pair
of L tokens holds L·V logits at once (1.05 GB of bf16 for L = 4,096 at V = 128,256).
With a cap, pairs of at most B tokens are packed greedily into chunks of at most
min(chunk_tokens, B) tokens, and a pair with L > B runs "keep the tail": the forward of
its first L − B tokens, in sub-chunks of at most B, keeps only each row's (token
log-prob, lse parts); the last B tokens' logits stay in the buffer; with the pair's two sums
known, its loss gradient is taken, the tail's logits gradient is formed in place and
accumulated into dH, dW; then each head sub-chunk's logits are recomputed and turned into
their gradient with the saved lse parts. Such a pair costs 6·L·H·V + 2·(L − B)·H·V FLOP (the
head's logits twice); the peak logits memory is B·V elements.

Per-token weights (``token_weights``, optional, (N,) fp32): both ops can sum
``weight * token log-prob`` per sequence instead, and then scale each token's gradient by its
weight (``g_token = d_seq[seq] * w_token``), with no other change to the chunking or the row
kernels. LD-DPO uses it (``engine/packing.py``: ``length_desensitized_weights``); weights of 1
give the unweighted numbers bit for bit.

WPO (``loss.use_weighting``, sdpo/losses.py): with ``return_aligned`` / ``with_aligned`` the
forward also takes each row's ``lsq = log sum_v p_v^2`` from the same streaming pass
(``rows_forward(with_lsq=True)``) and sums ``token_logp - lsq`` over each sequence's scored
tokens, unweighted by ``token_weights``; the sums are returned detached (``linear_pair_loss``
hands each chunk's to ``pair_loss`` as keywords), and the backward is unchanged. Off, no ``lsq``
is formed and every number is as without the option.

Token metrics (``with_stats`` / ``return_stats``, the trainer's ``entropy``, ``logits/*`` and
``mean_token_accuracy``): the forward's row pass also forms each row's entropy, mean logit and
top-1 flag (``rows_forward(with_stats=True)``) and sums them per sequence, ``(S, 3)`` fp32;
``linear_pair_loss`` adds each chunk's rows as it reduces them (a split pair's head sub-chunks
once: their recompute in the gradient pass adds nothing), ``sequence_logprobs`` runs the op
``sdpo::sequence_logprobs_stats_fwd``. Off, the kernels run without these reductions.

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
element size only. NOT YET MEASURED on a GPU (bf16: V=32,000 -> 4096 tokens, V=128,256 ->
1024 tokens): ``benchmarks/throughput.py kernels --chunk-tokens 2048 8192 16384`` times the
same loss at other chunk sizes beside the default.
"""

from __future__ import annotations

if not __name__.startswith("sdpo.kernels."):  # see kernels/__init__.py
    raise ImportError(
        f"{__name__} is sdpo's kernel module {__name__.rpartition('.')[2]!r}, importable only as "
        "sdpo.kernels.*: under a second name it would register the sdpo:: custom ops again"
    )

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .dispatch import compiler_disabled, resolve_impl
from .logprobs import (
    IGNORE_INDEX,
    aligned_logps,
    check_head_shapes,
    check_labels_in_vocab,
    check_packed_shapes,
    check_seq_ids_in_range,
    check_token_weights,
    rows_backward,
    rows_forward,
    sum_per_sequence,
    weighted,
)

CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_TOKENS = 1024
MAX_CHUNK_TOKENS = 16384
CHUNK_ALIGN = 128
# the most that a block of logit gradients cast to fp32 takes in _accumulate_grad_weight
_UPCAST_BYTES = 64 * 2**20

PairLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def default_chunk_tokens(*, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: ~256 MiB of logits, at least 1024 tokens (see the module docstring)."""
    del hidden_size  # cancels out of the rule; kept in the signature so callers pass it
    tokens = CHUNK_BYTES // (vocab_size * dtype.itemsize)
    tokens = max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, tokens))
    return max(CHUNK_ALIGN, tokens // CHUNK_ALIGN * CHUNK_ALIGN)


def _check_linear_shapes(hidden, weight, labels, seq_ids, num_seqs) -> None:
    """Static shape/dtype/device checks (torch.compile traces them)."""
    check_head_shapes(hidden, weight)
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(
            f"hidden and weight must be float tensors, got {hidden.dtype}, {weight.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    check_packed_shapes(labels, seq_ids, hidden.shape[0], num_seqs=num_seqs, device=hidden.device)


def _check_linear_inputs(hidden, weight, labels, seq_ids, num_seqs) -> None:
    """The static checks and the label and sequence-index range checks (eager callers)."""
    _check_linear_shapes(hidden, weight, labels, seq_ids, num_seqs)
    check_labels_in_vocab(labels, vocab_size=weight.shape[0])
    check_seq_ids_in_range(seq_ids, num_seqs)


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
    # No mixed-dtype GEMM (a CPU, an older torch): the operands are cast to acc's dtype, a
    # block of vocabulary rows at a time, so that each chunk's product is added unrounded and
    # each block of cast gradients stays within _UPCAST_BYTES (a (V, H) product in the narrow
    # dtype would round every chunk's partial sum before it is accumulated).
    n = grad_logits.shape[0]
    hi = h.to(acc.dtype)
    rows = max(1, _UPCAST_BYTES // max(1, n * acc.element_size()))
    for v0 in range(0, acc.shape[0], rows):
        g = grad_logits[:, v0 : v0 + rows].t().to(acc.dtype)
        acc[v0 : v0 + rows].addmm_(g, hi)


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
# The forward op returns each row's lse parts (its max m and log s, see
# logprobs.rows_forward) beside the sums only so that autograd can save them; the public
# function drops them. Under torch.no_grad the op runs without setup_context: one chunk of
# logits alive at a time, nothing saved. ``grad_weight_dtype`` travels as a
# forward argument because setup_context reads it there.


def _sequence_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    impl: str,
    chunk_tokens: int,
    token_weights: torch.Tensor | None,
    with_aligned: bool,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(seq_logps (S,), lse_parts (N, 2)) fp32, and with ``with_aligned`` WPO's per-sequence
    sums of ``token_logp - lsq`` (S,) fp32 (unweighted by ``token_weights``). ``with_stats``:
    always (seq_logps, lse_parts, aligned, stats (S, 3)), aligned empty (0,) without
    ``with_aligned``."""
    check_labels_in_vocab(labels, vocab_size=weight.shape[0])
    check_seq_ids_in_range(seq_ids, num_seqs)
    n = hidden.shape[0]
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    w_t = w.t()
    token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse_parts = torch.empty(n, 2, dtype=torch.float32, device=hidden.device)
    lsq = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_aligned else None
    stats = torch.zeros(
        num_seqs if with_stats else 0, 3, dtype=torch.float32, device=lse_parts.device
    )
    buf = torch.empty(min(chunk_tokens, n), w.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        stop = min(n, start + chunk_tokens)
        logits = _chunk_logits(buf, hidden[start:stop].to(dtype), w_t)  # (n_c, V)
        rows = rows_forward(
            logits, labels[start:stop], impl=impl, with_lsq=with_aligned, with_stats=with_stats
        )
        token_logps[start:stop] = rows[0]
        lse_parts[start:stop] = rows[1]
        if with_aligned:
            lsq[start:stop] = rows[2]
        if with_stats:
            stats.index_add_(0, seq_ids[start:stop], rows[-1])
    del buf
    seq_logps = sum_per_sequence(weighted(token_logps, token_weights), seq_ids, num_seqs)
    aligned = (
        sum_per_sequence(aligned_logps(token_logps, lsq, labels), seq_ids, num_seqs)
        if with_aligned
        else None
    )
    if with_stats:
        return seq_logps, lse_parts, aligned if with_aligned else lse_parts.new_zeros(0), stats
    if not with_aligned:
        return seq_logps, lse_parts
    return seq_logps, lse_parts, aligned


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
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_logps (S,), lse_parts (N, 2)), both fp32."""
    del grad_weight_dtype  # read by setup_context only
    args = (hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, token_weights)
    return _sequence_forward(*args, with_aligned=False)


@torch.library.custom_op("sdpo::sequence_logprobs_aligned_fwd", mutates_args=())
def _sequence_logprobs_aligned_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    impl: str,
    chunk_tokens: int,
    grad_weight_dtype: torch.dtype,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same (seq_logps (S,), lse_parts (N, 2)) and WPO's sums of ``token_logp - lsq``
    (S,), all fp32; the third output is not differentiable (its gradient is ignored)."""
    del grad_weight_dtype  # read by setup_context only
    args = (hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, token_weights)
    return _sequence_forward(*args, with_aligned=True)


@torch.library.custom_op("sdpo::sequence_logprobs_stats_fwd", mutates_args=())
def _sequence_logprobs_stats_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    impl: str,
    chunk_tokens: int,
    grad_weight_dtype: torch.dtype,
    token_weights: torch.Tensor | None = None,
    with_aligned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq_logps (S,), lse_parts (N, 2), aligned (S,) with ``with_aligned`` else (0,),
    stats (S, 3)), all fp32: the forward with the token metrics' per-sequence sums
    (``STAT_NAMES``); the last two outputs are not differentiable (their gradients are
    ignored)."""
    del grad_weight_dtype  # read by setup_context only
    args = (hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, token_weights)
    return _sequence_forward(*args, with_aligned=with_aligned, with_stats=True)


@_sequence_logprobs_stats_fwd.register_fake
def _sequence_logprobs_stats_fwd_fake(
    hidden, weight, labels, seq_ids, num_seqs, *rest, with_aligned=False, **kw
):
    if len(rest) > 4:  # with_aligned passed by position
        with_aligned = rest[4]
    sums, lse_parts = _forward_fake(hidden, num_seqs, with_aligned=False)
    aligned = sums.clone() if with_aligned else sums.new_empty(0)
    return sums, lse_parts, aligned, hidden.new_empty(num_seqs, 3, dtype=torch.float32)


def _forward_fake(hidden: torch.Tensor, num_seqs: int, *, with_aligned: bool) -> tuple:
    """The forward ops' output shapes: (S,) sums, (N, 2) lse_parts and, with WPO, the (S,)
    sums."""
    sums = hidden.new_empty(num_seqs, dtype=torch.float32)
    lse_parts = hidden.new_empty(hidden.shape[0], 2, dtype=torch.float32)
    return (sums, lse_parts, sums.clone()) if with_aligned else (sums, lse_parts)


@_sequence_logprobs_fwd.register_fake
def _sequence_logprobs_fwd_fake(hidden, weight, labels, seq_ids, num_seqs, *rest, **kw):
    return _forward_fake(hidden, num_seqs, with_aligned=False)


@_sequence_logprobs_aligned_fwd.register_fake
def _sequence_logprobs_aligned_fwd_fake(hidden, weight, labels, seq_ids, num_seqs, *rest, **kw):
    return _forward_fake(hidden, num_seqs, with_aligned=True)


@torch.library.custom_op("sdpo::sequence_logprobs_bwd", mutates_args=())
def _sequence_logprobs_bwd(
    grad_seq: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    lse_parts: torch.Tensor,
    impl: str,
    chunk_tokens: int,
    grad_weight_dtype: torch.dtype,
    need_hidden: bool,
    need_weight: bool,
    token_weights: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[grad_hidden if need_hidden, grad_weight if need_weight], in hidden's/weight's dtypes.

    A list because a custom op cannot return an optional tensor, and a gradient nobody
    asked for is not computed (its matmul would cost 2·N·H·V FLOP).
    """
    n = hidden.shape[0]
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    # (N,) fp32, times each token's weight; the kernel zeroes label == -100
    grad_token = weighted(grad_seq.float()[seq_ids], token_weights)
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
            lse_parts[start:stop],
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
    lse_parts,
    impl,
    chunk_tokens,
    grad_weight_dtype,
    need_hidden,
    need_weight,
    token_weights=None,
):
    return _fake_head_grads(hidden, weight, need_hidden, need_weight)


def _fake_head_grads(hidden, weight, need_hidden: bool, need_weight: bool) -> list:
    """A head backward op's fake outputs: [grad_hidden if need_hidden, grad_weight if
    need_weight], contiguous, in hidden's and weight's shapes and dtypes."""
    grads = []
    if need_hidden:
        grads.append(torch.empty_like(hidden, memory_format=torch.contiguous_format))
    if need_weight:
        grads.append(torch.empty_like(weight, memory_format=torch.contiguous_format))
    return grads


def _sequence_logprobs_setup_context(ctx, inputs, output) -> None:
    (hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, grad_weight_dtype, w_tok) = (
        inputs
    )
    ctx.num_seqs = num_seqs
    ctx.impl = impl
    ctx.chunk_tokens = chunk_tokens
    ctx.grad_weight_dtype = grad_weight_dtype
    ctx.weighted = w_tok is not None
    saved = (hidden, weight, labels, seq_ids, output[1])
    ctx.save_for_backward(*saved, *((w_tok,) if w_tok is not None else ()))


def _sequence_logprobs_backward(ctx, grad_seq, grad_lse_parts, *grad_aligned):
    # lse_parts are internal; WPO's sums are constants of the loss
    del grad_lse_parts, grad_aligned
    hidden, weight, labels, seq_ids, lse_parts, *rest = ctx.saved_tensors
    token_weights = rest[0] if ctx.weighted else None
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return (None,) * 9
    if grad_seq is None:
        grad_seq = lse_parts.new_zeros(ctx.num_seqs)
    grads = torch.ops.sdpo.sequence_logprobs_bwd(
        grad_seq,
        hidden,
        weight,
        labels,
        seq_ids,
        lse_parts,
        ctx.impl,
        ctx.chunk_tokens,
        ctx.grad_weight_dtype,
        need_h,
        need_w,
        token_weights,
    )
    grad_h = grads[0] if need_h else None
    grad_w = grads[-1] if need_w else None
    return grad_h, grad_w, None, None, None, None, None, None, None


torch.library.register_autograd(
    "sdpo::sequence_logprobs_fwd",
    _sequence_logprobs_backward,
    setup_context=_sequence_logprobs_setup_context,
)
torch.library.register_autograd(
    "sdpo::sequence_logprobs_aligned_fwd",
    _sequence_logprobs_backward,
    setup_context=_sequence_logprobs_setup_context,
)


def _stats_setup_context(ctx, inputs, output) -> None:
    _sequence_logprobs_setup_context(ctx, inputs[:9], output)


def _stats_backward(ctx, grad_seq, grad_lse_parts, grad_aligned, grad_stats):
    del grad_stats  # the token metrics are constants
    return (*_sequence_logprobs_backward(ctx, grad_seq, grad_lse_parts, grad_aligned), None)


torch.library.register_autograd(
    "sdpo::sequence_logprobs_stats_fwd", _stats_backward, setup_context=_stats_setup_context
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
    token_weights: torch.Tensor | None = None,
    return_aligned: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(S,) fp32 summed log-probs of ``labels`` per packed sequence, from hidden states.

    hidden (N, H) and weight (V, H) of any float dtype and any strides (the matmul
    ``hidden @ weight.T``, no bias, in their promoted dtype; the log-softmax and the sums in
    fp32, float64 inputs included, so the outputs are fp32). labels (N,) int64 or int32:
    ``labels[i]`` is the token that ``hidden[i]`` predicts (already shifted, see
    :func:`~sdpo.kernels.shift_labels`), -100 for tokens not scored; seq_ids (N,) int64 or
    int32 in [0, num_seqs), the sequence of each token (``torch.arange(B).repeat_interleave(T)``
    for a flattened (B, T) batch). ``seq_logps[s]`` is the sum over sequence s's scored tokens
    of ``log_softmax(hidden[i] @ weight.T)[labels[i]]`` (0 if it has none).
    Differentiable w.r.t. hidden and weight (first order; a frozen one gets no gradient and
    costs no matmul); the gradient of W accumulates over chunks in
    ``grad_weight_dtype`` (fp32 by default; ``None`` = the compute dtype, the promoted dtype of
    hidden and weight, which for a bf16 pair halves its memory); the gradients are returned in
    hidden's and weight's own dtypes.
    Under ``torch.no_grad`` this is the reference pass: one chunk of logits at a time.
    ``token_weights`` (N,) fp32: each token's log-prob enters its sequence's sum times its
    weight, and its gradient likewise (LD-DPO, see :func:`weighted`); None: all 1.
    ``return_aligned`` (WPO, ``loss.use_weighting``): returns ``(seq_logps, aligned)``, where
    ``aligned`` (S,) fp32, detached, holds each sequence's sum over its scored tokens of
    ``token_logp - log sum_v p_v^2``, from the same pass (op ``sdpo::sequence_logprobs_aligned_fwd``);
    token_weights do not apply to it. The gradient is that of ``seq_logps`` alone.
    ``return_stats`` (the trainer's token metrics): one more output last, ``stats`` (S, 3)
    fp32, detached: each sequence's sums over its scored tokens of the entropy, the mean logit
    and the top-1 flag (``STAT_NAMES``), from the same pass (op
    ``sdpo::sequence_logprobs_stats_fwd``); token_weights do not apply to them.
    Runs as the custom ops ``sdpo::sequence_logprobs_fwd`` / ``_bwd``, so ``torch.compile``
    traces it without a graph break. For a weight split by vocabulary rows across ranks, see
    :func:`~sdpo.kernels.vocab_parallel_sequence_logprobs`.
    """
    _check_linear_shapes(hidden, weight, labels, seq_ids, num_seqs)
    check_token_weights(token_weights, hidden.shape[0], device=hidden.device)
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
    args = (hidden, weight, labels, seq_ids, num_seqs, impl, chunk_tokens, accum_dtype)
    if return_stats:
        seq_logps, _, aligned, stats = _sequence_logprobs_stats_fwd(
            *args, token_weights, return_aligned
        )
        if return_aligned:
            return seq_logps, aligned.detach(), stats.detach()
        return seq_logps, stats.detach()
    if return_aligned:
        seq_logps, _, aligned = _sequence_logprobs_aligned_fwd(*args, token_weights)
        return seq_logps, aligned.detach()
    seq_logps, _ = _sequence_logprobs_fwd(*args, token_weights)
    return seq_logps


# ----------------------------------------------------------------------------------------
# Strategy (b): a pair-separable loss with gradients formed in the forward
# ----------------------------------------------------------------------------------------


class _PlanItem(NamedTuple):
    """One step of the pair pass: tokens [t0, t1), which hold the whole pairs [p0, p1).

    ``split``: a single pair longer than ``max_chunk_tokens``, run by keep-the-tail.
    """

    t0: int
    t1: int
    p0: int
    p1: int
    split: bool = False


def _check_whole_pairs(num_seqs: int) -> None:
    if num_seqs % 2:
        raise ValueError(
            f"linear_pair_loss needs whole pairs: num_seqs={num_seqs} is odd (sequence 2p is "
            "the chosen and 2p+1 the rejected completion of pair p)"
        )


def _check_pair_loss_size(pair_loss: PairLoss, num_seqs: int) -> None:
    """A ``pair_loss`` that carries its batch's pair count (``num_pairs``, as
    ``sdpo.losses.make_pair_loss`` sets it) must be this batch's: its values are sliced by the
    pairs' positions, so values of more pairs (a data set's whole reference column, say) would
    be read against the wrong pairs, silently."""
    expected = getattr(pair_loss, "num_pairs", None)
    if expected is not None and expected != num_seqs // 2:
        raise ValueError(
            f"pair_loss holds per-pair values (reference log-probs, token counts) of {expected} "
            f"pairs but this batch has {num_seqs // 2} (num_seqs = {num_seqs}): build it from "
            "the values of this batch's pairs, in their order"
        )


def _pair_tokens_from_seq_ids(seq_ids: torch.Tensor, num_seqs: int) -> list[int]:
    """Tokens per pair, read from ``seq_ids``: one host sync (a single ``.tolist()``)."""
    n = seq_ids.shape[0]
    if n == 0:
        return [0] * (num_seqs // 2)
    # In a packed stream pair p spans [first token of seq >= 2p, first token of seq >= 2p + 2).
    marks = torch.arange(0, num_seqs + 1, 2, dtype=seq_ids.dtype, device=seq_ids.device)
    starts = torch.searchsorted(seq_ids, marks)  # (P + 1,) int64
    packed = (seq_ids[1:] >= seq_ids[:-1]).all() & (seq_ids[0] >= 0) & (seq_ids[-1] < num_seqs)
    *starts, ok = torch.cat([starts, packed.reshape(1).to(starts.dtype)]).tolist()
    if not ok:
        raise ValueError(
            "linear_pair_loss needs a packed stream: seq_ids must be non-decreasing and "
            f"in [0, num_seqs={num_seqs}) (sequences back to back, as engine.packing.pack_pairs "
            "builds)"
        )
    return [stop - start for start, stop in zip(starts[:-1], starts[1:])]


def _check_pair_tokens(pair_tokens: Sequence[int], *, num_seqs: int, num_tokens: int) -> list[int]:
    """The caller's host-side tokens per pair, validated on the host (no device read)."""
    if isinstance(pair_tokens, torch.Tensor) and pair_tokens.device.type != "cpu":
        raise TypeError(
            "pair_tokens must live on the host (a list of ints or a CPU tensor), got a tensor on "
            f"{pair_tokens.device}; reading it would be the host sync it exists to avoid"
        )
    counts = [int(c) for c in pair_tokens]
    if len(counts) != num_seqs // 2:
        raise ValueError(
            f"pair_tokens has {len(counts)} entries but num_seqs={num_seqs} makes "
            f"{num_seqs // 2} pairs; pass one count (chosen + rejected tokens) per pair"
        )
    bad = next((p for p, c in enumerate(counts) if c <= 0), None)
    if bad is not None:
        raise ValueError(
            f"pair_tokens[{bad}] = {counts[bad]}: every pair holds at least one token (its "
            "chosen plus rejected token count, e.g. cu_seqlens[2p + 2] - cu_seqlens[2p])"
        )
    if sum(counts) != num_tokens:
        raise ValueError(
            f"pair_tokens sum to {sum(counts)} but hidden has {num_tokens} tokens; pass the "
            "token counts of the pairs of this packed batch, in stream order"
        )
    return counts


def _check_pair_tokens_on_cpu(counts: list[int], seq_ids: torch.Tensor, num_seqs: int) -> None:
    """``pair_tokens`` against CPU ``seq_ids``, in full (on a GPU this would be a host sync;
    there the chunks' boundaries are asserted on the device instead)."""
    derived = _pair_tokens_from_seq_ids(seq_ids, num_seqs)
    bad = next((p for p, (a, b) in enumerate(zip(counts, derived)) if a != b), None)
    if bad is not None:
        raise ValueError(
            f"pair_tokens[{bad}] = {counts[bad]} but seq_ids give pair {bad} "
            f"{derived[bad]} tokens; pass each pair's chosen + rejected token count "
            "in stream order (e.g. from the batch's cu_seqlens)"
        )


def _plan_pairs(
    pair_tokens: Sequence[int], *, chunk_tokens: int, max_chunk_tokens: int | None
) -> list[_PlanItem]:
    """Greedy chunks of whole pairs, in stream order.

    Pairs are packed into chunks of at most ``chunk_tokens`` tokens (capped by
    ``max_chunk_tokens`` too); a pair longer than ``chunk_tokens`` gets a chunk of its own,
    held whole, unless it is longer than ``max_chunk_tokens``: then it is a ``split`` item.
    """
    limit = chunk_tokens if max_chunk_tokens is None else min(chunk_tokens, max_chunk_tokens)
    plan: list[_PlanItem] = []
    tok = p0 = t0 = size = 0
    for p, count in enumerate(pair_tokens):
        if max_chunk_tokens is not None and count > max_chunk_tokens:
            if p > p0:
                plan.append(_PlanItem(t0, tok, p0, p))
            plan.append(_PlanItem(tok, tok + count, p, p + 1, split=True))
            tok += count
            p0, t0, size = p + 1, tok, 0
            continue
        if size and size + count > limit:
            plan.append(_PlanItem(t0, tok, p0, p))
            p0, t0, size = p, tok, 0
        size += count
        tok += count
    if p0 < len(pair_tokens) or not plan:
        plan.append(_PlanItem(t0, tok, p0, len(pair_tokens)))
    return plan


def _split_ranges(t0: int, t1: int, cap: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Keep-the-tail ranges of a split pair: (head sub-chunks of <= cap tokens, tail of cap)."""
    tail = t1 - cap
    return [(s, min(tail, s + cap)) for s in range(t0, tail, cap)], (tail, t1)


class _PairPass:
    """One forward of :class:`LinearPairLoss`: the chunk buffer and the gradient accumulators."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        seq_ids: torch.Tensor,
        *,
        num_seqs: int,
        pair_loss: PairLoss,
        impl: str,
        buffer_rows: int,
        accum_dtype: torch.dtype | None,
        need_h: bool,
        need_w: bool,
        check_ids: bool,
        token_weights: torch.Tensor | None,
        with_aligned: bool = False,
        with_raw: bool = False,
        with_stats: bool = False,
    ) -> None:
        dtype = _compute_dtype(hidden, weight)
        device = hidden.device
        self.hidden, self.labels, self.seq_ids = hidden, labels, seq_ids
        self.token_weights = token_weights
        # WPO: each sequence's sum of token_logp - lsq, handed to pair_loss with the sums
        self.with_aligned = with_aligned
        self.aligned = torch.zeros(
            num_seqs if with_aligned else 0, dtype=torch.float32, device=device
        )
        # each sequence's unweighted sum, handed to pair_loss (differentiable) beside the
        # token_weights-weighted one
        self.with_raw = with_raw
        self.raw = torch.zeros(num_seqs if with_raw else 0, dtype=torch.float32, device=device)
        # the token metrics' per-sequence sums (S, 3), from the same pass (STAT_NAMES)
        self.with_stats = with_stats
        self.stats = torch.zeros(
            num_seqs if with_stats else 0, 3, dtype=torch.float32, device=device
        )
        self.dtype, self.impl, self.pair_loss = dtype, impl, pair_loss
        self.w = weight.to(dtype)
        self.buf = torch.empty(buffer_rows, self.w.shape[0], dtype=dtype, device=device)
        self.seq_logps = torch.zeros(num_seqs, dtype=torch.float32, device=device)
        self.need_grad = need_h or need_w
        self.grad_h = torch.empty(hidden.shape, dtype=dtype, device=device) if need_h else None
        self.grad_w = (
            torch.zeros(self.w.shape, dtype=accum_dtype or dtype, device=device) if need_w else None
        )
        self.loss: torch.Tensor | None = None
        # pair_tokens given on a GPU: each item's ids are checked on the device before use.
        self.check_ids = check_ids
        self.ordered = (seq_ids[1:] >= seq_ids[:-1]).all() if check_ids else None

    def _logits(self, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (n, H), logits (n, V)) of tokens [t0, t1), the logits in the buffer."""
        h = self.hidden[t0:t1].to(self.dtype)
        return h, _chunk_logits(self.buf, h, self.w.t())

    def _local_ids(self, t0: int, t1: int, p0: int, p1: int) -> torch.Tensor:
        """Sequence ids of tokens [t0, t1) relative to pair p0 (in [0, 2 (p1 - p0)))."""
        ids = self.seq_ids[t0:t1]
        if self.check_ids and t1 > t0:
            # First and last token's pair; with ids non-decreasing they bound every token
            # between. Asserted before the ids index anything, asynchronously (no host sync).
            ends = ids[:: max(1, t1 - t0 - 1)].div(2, rounding_mode="floor")
            torch._assert_async(
                self.ordered & (ends[0] == p0) & (ends[-1] == p1 - 1),
                f"linear_pair_loss: pair_tokens disagree with seq_ids at tokens [{t0}, {t1}) "
                f"(pairs [{p0}, {p1})); pass each pair's chosen + rejected token count in "
                "stream order, e.g. from the batch's cu_seqlens",
            )
        return ids - 2 * p0

    def _weights(self, t0: int, t1: int) -> torch.Tensor | None:
        """The token weights of tokens [t0, t1) (None: all 1)."""
        return None if self.token_weights is None else self.token_weights[t0:t1]

    def _rows(self, logits: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, ...]:
        """rows_forward of tokens [t0, t1): (token_logp, lse_parts[, lsq with WPO]); with the
        token metrics on, their (n, 3) rows are added into ``self.stats`` by sequence here."""
        rows = rows_forward(
            logits,
            self.labels[t0:t1],
            impl=self.impl,
            with_lsq=self.with_aligned,
            with_stats=self.with_stats,
        )
        if not self.with_stats:
            return rows
        self.stats.index_add_(0, self.seq_ids[t0:t1], rows[-1])
        return rows[:-1]

    def _aligned(
        self,
        token_logps: torch.Tensor,
        lsq: torch.Tensor | None,
        t0: int,
        t1: int,
        local_ids: torch.Tensor,
        num_seqs: int,
    ) -> torch.Tensor | None:
        """WPO's sums (num_seqs,) of ``token_logp - lsq`` over the scored tokens of [t0, t1),
        by local sequence id; None when off (``lsq`` is None)."""
        if lsq is None:
            return None
        terms = aligned_logps(token_logps, lsq, self.labels[t0:t1])
        return sum_per_sequence(terms, local_ids, num_seqs)

    def _pair_grad(
        self,
        seq_c: torch.Tensor,
        p0: int,
        p1: int,
        aligned: torch.Tensor | None = None,
        raw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Adds pairs [p0, p1)'s loss; returns its gradients (2k,) fp32 w.r.t. seq_c and, with
        ``raw`` (the unweighted sums), w.r.t. raw, if needed."""
        extra = {}
        if aligned is not None:
            self.aligned[2 * p0 : 2 * p1] = aligned
            extra = {"chosen_aligned": aligned[0::2], "rejected_aligned": aligned[1::2]}
        sums = [seq_c]
        if raw is not None:
            self.raw[2 * p0 : 2 * p1] = raw
            sums.append(raw)
        with torch.enable_grad():
            inputs = []  # chosen, rejected of each sum
            for t in sums:
                inputs += [t[0::2].detach().requires_grad_(self.need_grad)]
                inputs += [t[1::2].detach().requires_grad_(self.need_grad)]
            if raw is not None:
                extra |= {"chosen_raw": inputs[2], "rejected_raw": inputs[3]}
            chunk_loss = self.pair_loss(inputs[0], inputs[1], slice(p0, p1), **extra)
            if chunk_loss.dim() != 0:
                raise ValueError(
                    "pair_loss must return a scalar (the sum of its pairs' loss terms), got "
                    f"shape {tuple(chunk_loss.shape)}"
                )
            if self.need_grad:
                grads = torch.autograd.grad(chunk_loss, inputs, allow_unused=True)
        self.loss = chunk_loss.detach() if self.loss is None else self.loss + chunk_loss.detach()
        if not self.need_grad:
            return None
        out = []
        for k in range(len(sums)):
            d = torch.zeros(seq_c.shape[0], dtype=torch.float32, device=seq_c.device)
            for side in range(2):
                if grads[2 * k + side] is not None:
                    d[side::2] = grads[2 * k + side].float()
            out.append(d)
        return out[0], (out[1] if raw is not None else None)

    def _grad_token(
        self,
        grads: tuple[torch.Tensor, torch.Tensor | None],
        local_ids: torch.Tensor,
        w_tok: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each token's gradient coefficient: its sequence's gradient times its weight, plus
        the gradient of its sequence's unweighted sum when that enters the loss."""
        d_seq, d_raw = grads
        grad_token = weighted(d_seq[local_ids], w_tok)
        return grad_token if d_raw is None else grad_token + d_raw[local_ids]

    def _raw(
        self, token_logps: torch.Tensor, local_ids: torch.Tensor, num_seqs: int
    ) -> torch.Tensor | None:
        """The unweighted sums (num_seqs,) by local sequence id; None when off."""
        return sum_per_sequence(token_logps, local_ids, num_seqs) if self.with_raw else None

    def _backprop(
        self,
        logits: torch.Tensor,
        h: torch.Tensor,
        t0: int,
        t1: int,
        lse_parts: torch.Tensor,
        grad_token: torch.Tensor,
    ) -> None:
        """The logits gradient of tokens [t0, t1), in place in the buffer, into dH and dW."""
        grad_logits = rows_backward(
            logits, self.labels[t0:t1], lse_parts, grad_token, impl=self.impl, out=logits
        )
        if self.grad_h is not None:
            torch.mm(grad_logits, self.w, out=self.grad_h[t0:t1])
        if self.grad_w is not None:
            _accumulate_grad_weight(self.grad_w, grad_logits, h)

    def packed(self, item: _PlanItem) -> None:
        """A chunk of whole pairs: logits once, gradient in place (6·n·H·V FLOP)."""
        t0, t1, p0, p1 = item.t0, item.t1, item.p0, item.p1
        h, logits = self._logits(t0, t1)  # (n, V)
        local_ids = self._local_ids(t0, t1, p0, p1)
        token_logps, lse_parts, *extra = self._rows(logits, t0, t1)
        lsq = extra[0] if extra else None
        w_tok = self._weights(t0, t1)
        seq_c = sum_per_sequence(weighted(token_logps, w_tok), local_ids, 2 * (p1 - p0))  # (2k,)
        self.seq_logps[2 * p0 : 2 * p1] = seq_c
        aligned = self._aligned(token_logps, lsq, t0, t1, local_ids, 2 * (p1 - p0))
        raw = self._raw(token_logps, local_ids, 2 * (p1 - p0))
        grads = self._pair_grad(seq_c, p0, p1, aligned, raw)
        if grads is not None:
            self._backprop(logits, h, t0, t1, lse_parts, self._grad_token(grads, local_ids, w_tok))

    def split(self, item: _PlanItem, cap: int) -> None:
        """One pair over ``cap`` tokens, keep-the-tail (6·L·H·V + 2·(L - cap)·H·V FLOP).

        The head's logits are formed, reduced to (token log-prob, lse parts) and dropped; the
        tail's stay in the buffer. Once the pair's loss gradient is known, the tail's logits
        gradient is formed in place, then each head sub-chunk's logits are recomputed and
        turned into their gradient with the saved lse parts.
        """
        t0, t1, p = item.t0, item.t1, item.p0
        heads, (tail0, _) = _split_ranges(t0, t1, cap)
        local_ids = self._local_ids(t0, t1, p, p + 1)  # (L,) in {0, 1}
        device = self.buf.device
        token_logps = torch.empty(t1 - t0, dtype=torch.float32, device=device)
        head_lse_parts = torch.empty(tail0 - t0, 2, dtype=torch.float32, device=device)
        lsq = (
            torch.empty(t1 - t0, dtype=torch.float32, device=device) if self.with_aligned else None
        )
        for s0, s1 in heads:
            _, logits = self._logits(s0, s1)
            logp_c, parts_c, *lsq_c = self._rows(logits, s0, s1)
            token_logps[s0 - t0 : s1 - t0] = logp_c
            head_lse_parts[s0 - t0 : s1 - t0] = parts_c
            if lsq is not None:
                lsq[s0 - t0 : s1 - t0] = lsq_c[0]
        h_tail, logits = self._logits(tail0, t1)  # kept: the buffer's rows [0, cap)
        logp_c, tail_lse_parts, *lsq_c = self._rows(logits, tail0, t1)
        token_logps[tail0 - t0 :] = logp_c
        if lsq is not None:
            lsq[tail0 - t0 :] = lsq_c[0]
        w_tok = self._weights(t0, t1)
        seq_c = sum_per_sequence(weighted(token_logps, w_tok), local_ids, 2)
        self.seq_logps[2 * p : 2 * p + 2] = seq_c
        aligned = self._aligned(token_logps, lsq, t0, t1, local_ids, 2)
        grads = self._pair_grad(seq_c, p, p + 1, aligned, self._raw(token_logps, local_ids, 2))
        if grads is None:
            return
        grad_token = self._grad_token(grads, local_ids, w_tok)  # (L,)
        self._backprop(logits, h_tail, tail0, t1, tail_lse_parts, grad_token[tail0 - t0 :])
        for s0, s1 in heads:
            h, logits = self._logits(s0, s1)
            self._backprop(
                logits, h, s0, s1, head_lse_parts[s0 - t0 : s1 - t0], grad_token[s0 - t0 : s1 - t0]
            )


def _scaled(
    grad: torch.Tensor | None, grad_loss: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """``grad * grad_loss`` in ``dtype`` with no host read of ``grad_loss``.

    In place when ``grad`` already has ``dtype`` (an fp32 or bf16 product by 1.0 is exact,
    so ``loss.backward()`` returns the formed gradients bit for bit); otherwise one pass
    that multiplies in ``grad``'s (accumulation) dtype and rounds once into ``dtype``,
    which for ``grad_loss == 1`` is exactly ``grad.to(dtype)``.
    """
    if grad is None:
        return None
    if grad.dtype == dtype:
        return grad.mul_(grad_loss)
    return torch.mul(grad, grad_loss, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


class LinearPairLoss(torch.autograd.Function):
    """(hidden, weight) -> (loss, seq_logps); dH and dW are formed in the forward.

    ``plan`` comes from :func:`_plan_pairs`; the backward only scales the stored gradients
    by the upstream gradient, on the device.
    """

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
        plan,
        max_chunk_tokens,
        accum_dtype,
        need_h,
        need_w,
        check_ids,
        token_weights=None,
        with_aligned=False,
        with_raw=False,
        with_stats=False,
    ):
        rows = max(max_chunk_tokens if item.split else item.t1 - item.t0 for item in plan)
        run = _PairPass(
            hidden,
            weight,
            labels,
            seq_ids,
            num_seqs=num_seqs,
            pair_loss=pair_loss,
            impl=impl,
            buffer_rows=rows,
            accum_dtype=accum_dtype,
            need_h=need_h,
            need_w=need_w,
            check_ids=check_ids,
            token_weights=token_weights,
            with_aligned=with_aligned,
            with_raw=with_raw,
            with_stats=with_stats,
        )
        for item in plan:
            if item.split:
                run.split(item, max_chunk_tokens)
            else:
                run.packed(item)
        # Kept in their compute / accumulation dtypes: the backward casts while it scales.
        ctx.grad_h, ctx.grad_w = run.grad_h, run.grad_w
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(run.seq_logps, run.aligned, run.raw, run.stats)
        return run.loss.float(), run.seq_logps, run.aligned, run.raw, run.stats

    @staticmethod
    def backward(ctx, grad_loss, grad_seq_logps, grad_aligned, grad_raw, grad_stats):
        del grad_seq_logps, grad_aligned, grad_raw, grad_stats  # returned detached
        if torch.is_grad_enabled():
            # create_graph=True: the stored gradients are constants to autograd, so their own
            # gradient (a gradient penalty, a Hessian product) would be silently zero.
            raise RuntimeError(
                "linear_pair_loss has first-order gradients only (they are formed in the "
                "forward); backward with create_graph=True is not supported"
            )
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
        h_dtype, w_dtype = ctx.dtypes
        return (
            _scaled(grad_h, grad_loss, h_dtype),
            _scaled(grad_w, grad_loss, w_dtype),
            *(None,) * 15,
        )


@compiler_disabled
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
    pair_tokens: Sequence[int] | None = None,
    max_chunk_tokens: int | None = None,
    token_weights: torch.Tensor | None = None,
    with_aligned: bool = False,
    with_raw: bool = False,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Pair-separable loss over packed preference pairs, gradients formed chunk by chunk.

    hidden, weight, labels, seq_ids and num_seqs as in :func:`sequence_logprobs` (labels
    already shifted, -100 = not scored); seq_ids must be non-decreasing (a packed stream, or a
    flattened (B, T) batch). Sequence 2p is the chosen and 2p+1 the rejected completion of
    pair p, back to back in the token stream. ``pair_loss(chosen_logps (k,), rejected_logps
    (k,), pairs: slice)`` returns the scalar sum of the loss terms of pairs ``pairs``
    (differentiable in its two inputs, fp32); one with a ``num_pairs`` attribute (as
    ``sdpo.losses.make_pair_loss`` gives it) must have num_seqs / 2 of them. Returns
    ``(loss, seq_logps (S,) fp32 detached)`` where loss is the 0-dim fp32 sum over chunks. Chunks hold whole pairs, about
    ``chunk_tokens`` tokens each (a longer pair gets a chunk of its own).
    ``grad_weight_dtype`` as in :func:`sequence_logprobs`. The gradients are formed in the
    forward, for whichever of hidden and weight requires grad when grad mode is on; one
    first-order backward (``retain_graph`` reuse and ``create_graph`` raise).

    ``pair_tokens``: the host-side token count of each pair (chosen + rejected, in stream
    order; ``cu_seqlens[2p + 2] - cu_seqlens[2p]``). Given, the chunk plan is built on the
    host and the call makes no host-device sync (nor does its backward); it must agree with
    ``seq_ids``, which is checked in full on CPU tensors and, on a GPU, by an asynchronous
    device assert over the chunk boundaries. ``None``: the counts are read from ``seq_ids``,
    one host sync.

    ``max_chunk_tokens``: a cap on the logits held at once (``max_chunk_tokens · V``
    elements). Chunks of whole pairs stay within it, and a pair longer than the cap is run
    by keep-the-tail (see the module docstring): it costs 6·L·H·V + 2·(L - cap)·H·V FLOP
    instead of 6·L·H·V. ``None``: no cap (a long pair's logits are held whole).

    ``token_weights`` (N,) fp32: per-token weights of the sums and of the token gradients,
    as in :func:`sequence_logprobs` (LD-DPO); ``seq_logps`` are then the weighted sums.

    ``with_aligned`` (WPO, ``loss.use_weighting``): the forward also forms, in the same pass
    over each chunk's logits, every sequence's sum over its scored tokens of ``token_logp -
    log sum_v p_v^2`` (not weighted by token_weights), and ``pair_loss`` is called with them
    as two more keyword arguments, detached: ``pair_loss(chosen, rejected, pairs,
    chosen_aligned=(k,), rejected_aligned=(k,))``. The call then returns ``(loss, seq_logps,
    aligned (S,))``. Off, ``pair_loss`` is called with three arguments, as always.

    ``with_raw`` (LD-DPO with a chosen NLL term): ``pair_loss`` also gets each sequence's
    unweighted sum as ``chosen_raw`` / ``rejected_raw`` (k,), differentiable like the weighted
    ones; each token's gradient is then its sequence's weighted-sum gradient times its weight
    plus its sequence's raw-sum gradient. The call returns ``raw (S,)`` after the others.

    ``with_stats`` (the trainer's token metrics): the forward also sums, per sequence and over
    its scored tokens, each token's entropy, mean logit and top-1 flag
    (``rows_forward(with_stats=True)``, in the same pass over each chunk's logits; never
    weighted by token_weights); the call returns them last, ``stats (S, 3)`` fp32 detached
    (columns ``STAT_NAMES``). A split pair's head sub-chunks count once (their recompute in
    the backward does not add). Off, the kernels run without these reductions.

    Unlike the other ops this one stays an ``autograd.Function`` behind
    ``torch.compiler.disable`` (``torch.compile`` graph-breaks around it): it takes a
    Python callable, ``pair_loss``, and a ``torch.library`` custom op can only take tensors
    and plain values.
    """
    _check_linear_inputs(hidden, weight, labels, seq_ids, num_seqs)
    check_token_weights(token_weights, hidden.shape[0], device=hidden.device)
    _check_whole_pairs(num_seqs)
    _check_pair_loss_size(pair_loss, num_seqs)
    impl = resolve_impl(impl, hidden.device)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(
            vocab_size=weight.shape[0],
            hidden_size=weight.shape[1],
            dtype=_compute_dtype(hidden, weight),
        )
    for name, value in (("chunk_tokens", chunk_tokens), ("max_chunk_tokens", max_chunk_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    check_ids = False
    if pair_tokens is None:
        counts = _pair_tokens_from_seq_ids(seq_ids, num_seqs)
    else:
        counts = _check_pair_tokens(pair_tokens, num_seqs=num_seqs, num_tokens=hidden.shape[0])
        if seq_ids.device.type == "cpu":  # reading CPU tensors costs no sync: check in full
            _check_pair_tokens_on_cpu(counts, seq_ids, num_seqs)
        else:
            check_ids = True
    plan = _plan_pairs(counts, chunk_tokens=chunk_tokens, max_chunk_tokens=max_chunk_tokens)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    outs = LinearPairLoss.apply(
        hidden,
        weight,
        labels,
        seq_ids,
        num_seqs,
        pair_loss,
        impl,
        plan,
        max_chunk_tokens,
        grad_weight_dtype,
        need_h,
        need_w,
        check_ids,
        token_weights,
        with_aligned,
        with_raw,
        with_stats,
    )
    loss, seq_logps, aligned, raw, stats = outs
    return (
        loss,
        seq_logps,
        *((aligned,) if with_aligned else ()),
        *((raw,) if with_raw else ()),
        *((stats,) if with_stats else ()),
    )


__all__ = [
    "IGNORE_INDEX",
    "LinearPairLoss",
    "default_chunk_tokens",
    "linear_pair_loss",
    "sequence_logprobs",
]
