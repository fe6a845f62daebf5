"""Fused log-softmax + label gather + per-sequence sum over a logits tensor.

Owns the row-wise core that every log-prob path in sdpo runs: for each row of logits,
a streaming logsumexp over vocabulary blocks in fp32, the label's logit, the token's
log-prob ``(x[label] - m) - log s`` and the row's logsumexp ``m + log s`` in its two parts
(``lse_parts``, (N, 2): the max ``m`` and ``log s``); and the backward
``grad = g * (onehot(label) - softmax(x))`` rebuilt from the saved parts as
``exp((x - m) - log s)``. The parts are kept apart because their fp32 sum rounds at
``|m| 2^-24``: a softmax formed from it would scale every probability of a row by that one
error, and the row's gradient would no longer sum to 0 (30 times the error of plain fp32
PyTorch's gradient at logits near 30, 5,000 times at 1e4). Neither
direction ever holds an fp32 copy of the whole logits tensor: the Triton kernels read
the rows block by block, the PyTorch reference upcasts a bounded block of rows at a
time. ``linear_logprobs`` reuses the same row ops on its chunks of logits. For WPO
(``loss.use_weighting``) the forward can also give each row's ``log sum_v p_v^2``, from a
second running sum of ``exp(2 (x - m))`` in the same pass (``rows_forward(with_lsq=True)``).
For the trainer's token metrics it can also give each row's entropy, mean logit and top-1 flag
from the same pass (``rows_forward(with_stats=True)``; see the package docstring).

``logprobs_from_logits`` is registered as ``torch.library`` custom ops
(``sdpo::logprobs_fwd``, ``sdpo::logprobs_bwd`` and its in-place twin), with fake
implementations for tracing and an autograd formula, so ``torch.compile`` traces it whole;
the implementation ("triton" | "torch") is a plain string argument of the ops, chosen once
by ``resolve_impl`` in the public function.

Packed-batch convention (engine/packing.py): ``labels`` are already shifted, ``-100``
marks a token that is not scored (its log-prob is 0 and it gets zero gradient), and
``seq_ids[i]`` names the sequence of token ``i``.
"""

from __future__ import annotations

if not __name__.startswith("sdpo.kernels."):  # see kernels/__init__.py
    raise ImportError(
        f"{__name__} is sdpo's kernel module {__name__.rpartition('.')[2]!r}, importable only as "
        "sdpo.kernels.*: under a second name it would register the sdpo:: custom ops again"
    )

import torch

from .dispatch import resolve_impl

IGNORE_INDEX = -100
# The lowest finite float32: the start of the kernels' running max, and the floor of the
# PyTorch rows' (a row of -inf logits has that max, so x - max stays -inf, not NaN).
FLOAT32_LOWEST = torch.finfo(torch.float32).min
# The per-token statistics ``rows_forward(with_stats=True)`` forms, in their column order; the
# per-sequence sums the ops return (``with_stats`` / ``return_stats``) keep the same order.
STAT_NAMES = ("entropy", "mean_logit", "top1")

# Triton launch constants. NOT YET MEASURED on a GPU: chosen from first principles for
# an H100 (a row of bf16 logits streamed in 4096-wide blocks is 8 KiB per load, 16
# elements per thread with 8 warps, so loads vectorise to 16-byte transactions).
# benchmarks/throughput.py is where they get tuned.
BLOCK_V = 4096
NUM_WARPS = 8
# Under the CPU interpreter the cost is per block operation, not per element: wider blocks.
INTERPRETER_BLOCK_V = 16384

# The PyTorch reference upcasts at most this many logits per block of rows to fp32
# (64 Mi elements = 256 MiB), so it never holds an fp32 copy of the whole tensor.
TORCH_BLOCK_ELEMENTS = 64 * 2**20


def _triton_rows():
    """The Triton kernels module, imported on first use (see triton_rows.py for why)."""
    from . import triton_rows

    return triton_rows


def _block_v(vocab: int, device: torch.device) -> int:
    block = INTERPRETER_BLOCK_V if device.type == "cpu" else BLOCK_V
    return min(block, 1 << max(0, (vocab - 1).bit_length()))


def shift_labels(labels: torch.Tensor, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels, in the convention of every op here, from labels aligned with the inputs.

    Hugging Face causal LMs (and TRL) take ``labels`` aligned with ``input_ids``: ``labels[t]``
    is token t itself (-100 where not scored) and the loss shifts them. sdpo's ops take them
    already shifted: ``labels[i]`` is the token that hidden state (logits row) ``i`` predicts,
    the aligned label of position ``i + 1``. This returns that, same shape and dtype:
    ``labels[..., 1:]`` with -100 appended along the last dimension, so a (B, T) batch stays
    (B, T) (flatten both with ``.reshape(-1)``) and each row's last position is not scored.
    The hidden states or logits then need no ``[:, :-1]`` slice (a copy once flattened):
    ``logits.view(-1, V)`` pairs with ``shift_labels(labels).view(-1)``.

    ``seq_ids`` (N,), for a 1-D packed stream of several sequences: the last position of each
    sequence (where the next token belongs to another sequence) also gets -100.
    """
    if labels.dim() == 0:
        raise ValueError("labels must have at least one dimension (the token positions)")
    tail = labels.new_full((*labels.shape[:-1], min(1, labels.shape[-1])), IGNORE_INDEX)
    shifted = torch.cat([labels[..., 1:], tail], dim=-1)
    if seq_ids is None:
        return shifted
    if labels.dim() != 1 or seq_ids.shape != labels.shape:
        raise ValueError(
            f"seq_ids are for a 1-D packed stream: labels {tuple(labels.shape)} and seq_ids "
            f"{tuple(seq_ids.shape)} must both be (N,)"
        )
    same = torch.cat(
        [seq_ids[1:] == seq_ids[:-1], seq_ids.new_zeros(min(1, seq_ids.shape[0]), dtype=torch.bool)]
    )
    return torch.where(same, shifted, IGNORE_INDEX)


def _flatten_hint(t: torch.Tensor) -> str:
    """The fix for a batched (B, T) index tensor given where the ops take one per token."""
    if t.dim() < 2:
        return ""
    return (
        "; the ops take a flat token stream: flatten a (B, T) batch with .reshape(-1) (and its "
        "hidden states or logits to (B*T, H) / (B*T, V))"
    )


def _check_rows(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be (N, V), got shape {tuple(logits.shape)}"
            + ("; flatten a (B, T, V) batch with .reshape(-1, V)" if logits.dim() == 3 else "")
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels must be (N,) = ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}" + _flatten_hint(labels)
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")


def _row_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------
# Row ops: the shared core (forward: token log-prob + lse parts; backward: logits gradient).
# ----------------------------------------------------------------------------------------


def rows_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    impl: str,
    with_lsq: bool = False,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(token_logp, lse_parts)`` in fp32 for logits (N, V); token_logp is 0 where
    label == -100, and ``lse_parts`` (N, 2) holds each row's max ``m`` and ``log s`` (its
    logsumexp is their sum), what :func:`rows_backward` takes.

    ``with_lsq`` (WPO, ``loss.use_weighting``): a third output ``lsq`` (N,) fp32, the log of
    the sum of the squared probabilities ``log sum_v softmax(x)_v^2`` of every row (masked or
    not), accumulated in the same pass as the logsumexp; off, the pass is the one without it.
    ``with_stats`` (the trainer's token metrics): one more output last, ``stats`` (N, 3) fp32,
    each row's entropy ``-sum_v p_v log p_v``, mean logit ``sum_v x_v / V`` and top-1 flag
    (1.0 where ``argmax(x) == label``, the first maximum winning a tie as in ``torch.argmax``),
    from the same pass; all three are 0 on rows whose label is -100 (see :data:`STAT_NAMES`).
    ``impl`` must already be resolved ("triton" or "torch").
    """
    n, vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse_parts = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    lsq = torch.empty(n, dtype=torch.float32, device=logits.device) if with_lsq else None
    # (N, 3) as the transpose of (3, N): each statistic's column is contiguous for the kernel
    stats = torch.empty(
        len(STAT_NAMES) if with_stats else 0, n, dtype=torch.float32, device=logits.device
    ).t()
    outs = (logp, lse_parts, *((lsq,) if with_lsq else ()), *((stats,) if with_stats else ()))
    if n == 0:
        return outs
    if impl == "triton":
        logits = _row_contiguous(logits)
        rows_mod = _triton_rows()
        kernel = rows_mod.launch(rows_mod.logprobs_fwd_kernel, logits.device)
        with rows_mod.on_device(logits.device):
            kernel[(n,)](
                logits,
                logits.stride(0),
                labels.contiguous(),  # the kernel reads label i at offset i
                logp,
                lse_parts,
                lsq if with_lsq else logp,  # not written when off
                # the (N, 3) stats' columns, each contiguous (not written when off)
                *(stats.unbind(1) if with_stats else (logp,) * len(STAT_NAMES)),
                vocab,
                BLOCK_V=_block_v(vocab, logits.device),
                IGNORE=IGNORE_INDEX,
                WITH_LSQ=with_lsq,
                WITH_STATS=with_stats,
                num_warps=NUM_WARPS,
            )
        return outs
    rows = max(1, TORCH_BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, rows):
        block = logits[start : start + rows].float()  # (rows, V) fp32, bounded
        block_labels = labels[start : start + rows]
        valid = block_labels != IGNORE_INDEX
        picked = block.gather(1, block_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        if with_stats:  # what reads the logits themselves, before they are shifted
            mean, top1 = block.mean(dim=-1), block.argmax(dim=-1) == block_labels
        m, d, e, s = _shifted(block)
        del block  # the upcast copy of 16-bit logits is not needed past d
        log_s = torch.log(s)
        lse_parts[start : start + rows, 0] = m
        lse_parts[start : start + rows, 1] = log_s
        # (x_label - m) - log s, as the kernel: exact near the max however large m is
        logp[start : start + rows] = torch.where(valid, (picked - m) - log_s, 0.0)
        if with_lsq:  # log sum_v p_v^2 = log sum_v exp(2 (x_v - m)) - 2 log s
            lsq[start : start + rows] = torch.logsumexp(2.0 * d, dim=-1) - 2.0 * log_s
        if with_stats:
            block_stats = torch.stack([_entropy(d, e, s), mean, top1.float()], dim=1)
            stats[start : start + rows] = torch.where(valid.unsqueeze(1), block_stats, 0.0)
    return outs


def _shifted(block: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The PyTorch rows' shared start from fp32 logits (rows, V), as the Triton kernel forms
    it: each row's max ``m`` (rows,) (the lowest finite float on a row of -inf logits, so that
    ``d`` is -inf there, not NaN), ``d = x - m``, ``e = exp(d)`` (both (rows, V)) and
    ``s = sum_v e`` (rows,). Every value is then formed from ``d``, exact however large the
    logits are (``lse = m + log s`` alone rounds at ``|m| 2^-24``)."""
    m = block.amax(dim=-1).clamp_(min=FLOAT32_LOWEST)
    d = block - m.unsqueeze(1)
    e = torch.exp(d)
    return m, d, e, e.sum(dim=-1)


def _entropy(d: torch.Tensor, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(rows,) fp32 entropy ``log s - sum_v e_v d_v / s`` from :func:`_shifted` (overwrites
    ``d`` and ``e``): the kernel's running sum t. Where ``e`` is 0 (a logit of -inf, or one whose
    ``d`` overflowed to -inf) the term is 0, not 0 * -inf = NaN: a token of zero probability
    adds nothing."""
    t = e.mul_(d.clamp_(min=FLOAT32_LOWEST)).sum(dim=-1)
    return torch.log(s) - t / s


def _row_stats(block: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows, 3) fp32 entropy, mean logit and top-1 flag of fp32 logits (the PyTorch twin of
    the Triton kernel's WITH_STATS), 0 where the label is -100."""
    valid = labels != IGNORE_INDEX
    _, d, e, s = _shifted(block)
    top1 = block.argmax(dim=-1) == labels  # the first maximum, as the kernel
    stats = torch.stack([_entropy(d, e, s), block.mean(dim=-1), top1.float()], dim=1)
    return torch.where(valid.unsqueeze(1), stats, 0.0)


def rows_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse_parts: torch.Tensor,
    grad_token: torch.Tensor,
    *,
    impl: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``grad_token * (onehot(labels) - softmax(logits))`` into ``out`` and return it.

    ``lse_parts`` (N, 2) fp32 as :func:`rows_forward` gives it: each probability is
    ``exp((x - m) - log s)``, exact near the max however large the logits.

    ``out`` defaults to a new tensor shaped and typed like ``logits``; passing ``out=logits``
    forms the gradient in place. Rows whose label is -100 get zeros. A label >= V is scored
    with no column of its own here, ``-grad_token * softmax(logits)``: the row's label lies in
    another shard of a vocabulary split across ranks (``vocab_parallel``, whose ``lse_parts``
    are the whole row's). ``impl`` must already be resolved ("triton" or "torch").
    """
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    n, vocab = logits.shape
    if n == 0:
        return out
    grad_token = grad_token.to(torch.float32)
    if impl == "triton":
        if out.stride(-1) != 1 or logits.stride(-1) != 1:
            raise ValueError("rows_backward(impl='triton') needs unit stride along the vocabulary")
        rows_mod = _triton_rows()
        kernel = rows_mod.launch(rows_mod.logprobs_bwd_kernel, logits.device)
        with rows_mod.on_device(logits.device):
            kernel[(n,)](
                logits,
                logits.stride(0),
                out,
                out.stride(0),
                labels.contiguous(),  # read at offset i, as lse_parts and grad_token are
                lse_parts.contiguous(),
                grad_token.contiguous(),
                vocab,
                BLOCK_V=_block_v(vocab, logits.device),
                IGNORE=IGNORE_INDEX,
                num_warps=NUM_WARPS,
            )
        return out
    rows = max(1, TORCH_BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block_labels = labels[start:stop]
        valid = block_labels != IGNORE_INDEX
        g = torch.where(valid, grad_token[start:stop], 0.0).unsqueeze(1)  # (rows, 1)
        # m = +inf (log s = 0) on unscored rows: their probs are 0, not NaN, even when all
        # their logits are -inf (log s -inf), so g = 0 gives them a zero gradient
        parts = lse_parts[start:stop]
        m = torch.where(valid, parts[:, 0], float("inf")).unsqueeze(1)  # (rows, 1)
        log_s = torch.where(valid, parts[:, 1], 0.0).unsqueeze(1)  # (rows, 1)
        probs = torch.exp((logits[start:stop].float() - m).sub_(log_s))
        grad = -g * probs
        # a label >= V is another vocabulary shard's column (vocab_parallel): no one-hot term
        onehot_g = torch.where((block_labels < vocab).unsqueeze(1), g, 0.0)
        grad.scatter_add_(1, block_labels.clamp(0, vocab - 1).unsqueeze(1), onehot_g)
        out[start:stop] = grad.to(out.dtype)
    return out


def sum_per_sequence(
    token_values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
) -> torch.Tensor:
    """(S,) fp32 sums of per-token values over the packed sequences named by ``seq_ids``."""
    out = torch.zeros(num_seqs, dtype=torch.float32, device=token_values.device)
    return out.index_add_(0, seq_ids, token_values.to(torch.float32))


def weighted(token_values: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """``token_values * token_weights`` (both (N,) fp32), or the values as they are for None.

    Per-token weights scale what each token contributes to its sequence's sum, and its
    gradient by the same factor: LD-DPO's length desensitization (``engine/packing.py``,
    ``length_desensitized_weights``) weights a completion's tokens past the pair's shorter
    length by ``ld_alpha``. A weight of 1 is exact in fp32, so all-ones weights give the
    unweighted sums bit for bit."""
    return token_values if token_weights is None else token_values * token_weights


def aligned_logps(
    token_logps: torch.Tensor, lsq: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(N,) fp32 ``token_logp - lsq`` of the scored tokens, 0 where the label is -100.

    WPO's per-token term (``loss.use_weighting``, sdpo/losses.py): the label's log-prob
    against the log of the sum of squared probabilities of its row. Summed per sequence (with
    :func:`sum_per_sequence`, never with LD-DPO's token weights) and divided by the
    completion's length it is the log of the sequence's weight."""
    return torch.where(labels != IGNORE_INDEX, token_logps - lsq, 0.0)


def check_token_weights(
    token_weights: torch.Tensor | None, num_tokens: int, *, device: torch.device
) -> None:
    """Static checks of optional per-token weights: (N,) fp32 on the tokens' device."""
    if token_weights is None:
        return
    if token_weights.shape != (num_tokens,):
        raise ValueError(
            f"token_weights must be ({num_tokens},) (one per token), got "
            f"{tuple(token_weights.shape)}"
        )
    if token_weights.dtype != torch.float32:
        raise TypeError(f"token_weights must be float32, got {token_weights.dtype}")
    if token_weights.device != device:
        raise ValueError(
            f"token_weights are on {token_weights.device} but the tokens on {device}: move "
            "them to the same device"
        )


def check_head_shapes(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """hidden (N, H) and the lm_head weight (V, H): ranks and the shared hidden size."""
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


def check_packed_shapes(
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_tokens: int,
    *,
    num_seqs: int | None = None,
    device: torch.device | None = None,
) -> None:
    """Shape/dtype/device checks of ``labels`` and ``seq_ids`` (and of ``num_seqs``): static,
    so torch.compile traces them."""
    for name, t in (("labels", labels), ("seq_ids", seq_ids)):
        if t.shape != (num_tokens,):
            raise ValueError(
                f"{name} must be ({num_tokens},) (one per token), got {tuple(t.shape)}"
                + _flatten_hint(t)
            )
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 (or int32), got {t.dtype}")
        if device is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but the values are on {device}: move it there"
            )
    if num_seqs is not None:
        if isinstance(num_seqs, bool) or not isinstance(num_seqs, int | torch.SymInt):
            raise TypeError(f"num_seqs must be an int, got {type(num_seqs).__name__} {num_seqs!r}")
        if num_seqs < 0:
            raise ValueError(f"num_seqs must be >= 0, got {num_seqs}")
        if num_seqs == 0 and num_tokens > 0:
            raise ValueError(
                f"num_seqs is 0 but there are {num_tokens} tokens: give each a sequence"
            )


def check_seq_ids_in_range(seq_ids: torch.Tensor, num_seqs: int) -> None:
    """Range check of ``seq_ids`` against ``num_seqs``, as :func:`check_labels_in_vocab`: on
    CPU a clear error, on CUDA a device-side assert (no host sync)."""
    if seq_ids.numel() == 0:
        return
    _require(
        (seq_ids >= 0) & (seq_ids < num_seqs),
        seq_ids,
        lambda i, v: (
            f"seq_ids[{i}] = {v} is outside [0, num_seqs = {num_seqs}): each token's sequence "
            "index must be below the number of sequences"
        ),
    )


def _require(ok: torch.Tensor, values: torch.Tensor, message) -> None:
    """``ok`` everywhere: on CPU a ValueError naming the first failing index and value
    (``message(index, value)``), on CUDA a device-side assert (no host sync)."""
    if values.device.type == "cpu":
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0, 0])
            raise ValueError(message(bad, int(values[bad])))
    else:
        torch._assert_async(ok.all())


def check_labels_in_vocab(labels: torch.Tensor, *, vocab_size: int) -> None:
    """Range check of the labels; no host sync on CUDA.

    A label outside [0, V) (other than -100) would make the kernels read outside the row,
    so on CPU it raises; on CUDA it trips a device-side assert instead of a silent misread.
    It reads the labels' values, so the custom ops run it inside their real kernels (a
    traced graph sees no data-dependent branch).
    """
    if labels.numel() == 0:
        return
    _require(
        ((labels >= 0) & (labels < vocab_size)) | (labels == IGNORE_INDEX),
        labels,
        lambda i, v: (
            f"labels[{i}] = {v} is outside the vocabulary [0, {vocab_size}) and is not -100; "
            "check that the tokenizer and the model's vocab_size match"
        ),
    )


def check_packed_inputs(
    labels: torch.Tensor, seq_ids: torch.Tensor, num_tokens: int, *, vocab_size: int
) -> None:
    """:func:`check_packed_shapes` and :func:`check_labels_in_vocab` together (eager callers)."""
    check_packed_shapes(labels, seq_ids, num_tokens)
    check_labels_in_vocab(labels, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------------
# The op over logits: torch.library custom ops, so torch.compile traces them whole
# ----------------------------------------------------------------------------------------
# The forward op returns the per-row lse_parts as a third output only so that autograd can
# save them; the public function drops them. Under torch.no_grad the op runs without
# setup_context and nothing is saved. ``inplace_backward`` travels as a forward argument
# because that is where setup_context can read it; the forward itself ignores it.


@torch.library.custom_op("sdpo::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    impl: str,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq_logps (S,), token_logps (N,), lse_parts (N, 2)), all fp32."""
    del inplace_backward  # read by setup_context only
    check_labels_in_vocab(labels, vocab_size=logits.shape[1])
    check_seq_ids_in_range(seq_ids, num_seqs)
    token_logps, lse_parts = rows_forward(logits, labels, impl=impl)
    return sum_per_sequence(token_logps, seq_ids, num_seqs), token_logps, lse_parts


@_logprobs_fwd.register_fake
def _logprobs_fwd_fake(logits, labels, seq_ids, num_seqs, impl, inplace_backward):
    n = logits.shape[0]
    return (
        logits.new_empty(num_seqs, dtype=torch.float32),
        logits.new_empty(n, dtype=torch.float32),
        logits.new_empty(n, 2, dtype=torch.float32),
    )


def _token_grads(
    grad_seq: torch.Tensor, grad_token: torch.Tensor, seq_ids: torch.Tensor
) -> torch.Tensor:
    """(N,) fp32 gradient of each token's log-prob: its own plus its sequence's."""
    return grad_token.float() + grad_seq.float()[seq_ids]


@torch.library.custom_op("sdpo::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    grad_seq: torch.Tensor,
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    lse_parts: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    """Gradient w.r.t. logits, in a new tensor shaped and typed like them."""
    g = _token_grads(grad_seq, grad_token, seq_ids)
    return rows_backward(logits, labels, lse_parts, g, impl=impl)


@_logprobs_bwd.register_fake
def _logprobs_bwd_fake(grad_seq, grad_token, logits, labels, seq_ids, lse_parts, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("sdpo::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    grad_seq: torch.Tensor,
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    lse_parts: torch.Tensor,
    impl: str,
) -> None:
    """The same gradient, written over ``logits`` (a custom op may not return an alias)."""
    g = _token_grads(grad_seq, grad_token, seq_ids)
    rows_backward(logits, labels, lse_parts, g, impl=impl, out=logits)


@_logprobs_bwd_inplace.register_fake
def _logprobs_bwd_inplace_fake(grad_seq, grad_token, logits, labels, seq_ids, lse_parts, impl):
    return None


def _logprobs_setup_context(ctx, inputs, output) -> None:
    logits, labels, seq_ids, num_seqs, impl, inplace_backward = inputs
    ctx.num_seqs = num_seqs
    ctx.impl = impl
    ctx.inplace_backward = inplace_backward
    ctx.save_for_backward(logits, labels, seq_ids, output[2])


def _logprobs_backward(ctx, grad_seq, grad_token, grad_lse_parts):
    del grad_lse_parts  # internal: the public function never returns them
    logits, labels, seq_ids, lse_parts = ctx.saved_tensors
    if grad_seq is None:
        grad_seq = lse_parts.new_zeros(ctx.num_seqs)
    if grad_token is None:
        grad_token = lse_parts.new_zeros(lse_parts.shape[0])
    if ctx.inplace_backward:
        torch.ops.sdpo.logprobs_bwd_inplace(
            grad_seq, grad_token, logits, labels, seq_ids, lse_parts, ctx.impl
        )
        grad_logits = logits
    else:
        grad_logits = torch.ops.sdpo.logprobs_bwd(
            grad_seq, grad_token, logits, labels, seq_ids, lse_parts, ctx.impl
        )
    return grad_logits, None, None, None, None, None


torch.library.register_autograd(
    "sdpo::logprobs_fwd", _logprobs_backward, setup_context=_logprobs_setup_context
)


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence and per-token log-probs of ``labels`` under ``logits``.

    logits (N, V) bf16/fp16/fp32 (any row stride; a view without unit stride along V is
    copied once); labels (N,) int64 or int32, ``labels[i]`` the token that row ``i`` predicts
    (already shifted, see :func:`shift_labels`; -100 = not scored); seq_ids (N,) int64 or
    int32 in [0, num_seqs), the sequence of each row. Returns ``(seq_logps (S,) fp32,
    token_logps (N,) fp32)``: ``token_logps[i] = log_softmax(logits[i])[labels[i]]``, 0 where
    the label is -100, and ``seq_logps[s]`` the sum of those of sequence s (0 for a sequence
    with no scored row). Differentiable w.r.t. logits (first order); with
    ``inplace_backward=True`` the gradient is written into ``logits`` itself (the caller must
    not use them afterwards; logits whose rows share memory, an expanded row, get it in a new
    tensor).
    Runs as the custom ops ``sdpo::logprobs_fwd`` / ``sdpo::logprobs_bwd`` (``_inplace``), so
    ``torch.compile`` traces it without a graph break.
    """
    _check_rows(logits, labels)
    check_packed_shapes(labels, seq_ids, logits.shape[0], num_seqs=num_seqs, device=logits.device)
    impl = resolve_impl(impl, logits.device)
    # unit stride along the vocabulary, as the backward kernel needs it (a transposed view is
    # copied here once, not in the forward alone)
    logits = _row_contiguous(logits)
    # rows that share memory (an expanded row, stride 0) cannot take their gradients in place:
    # each row's would be written over the others'. They get a new tensor, as without the flag.
    n, vocab = logits.shape
    inplace_backward = inplace_backward and (n < 2 or logits.stride(0) >= vocab)
    seq_logps, token_logps, _ = _logprobs_fwd(
        logits, labels, seq_ids, num_seqs, impl, inplace_backward
    )
    return seq_logps, token_logps
