"""Per-sequence log-probs with the lm_head split by vocabulary rows across ranks ("loss parallel").

Tensor-parallel stacks keep on each rank of a process group only rows [v0, v1) of the (V, H)
lm_head weight (a ColwiseParallel head, a DTensor sharded ``Shard(0)``). ``sequence_logprobs``
needs the whole weight; gathering it (or the logits) would undo the sharding. This module owns
``vocab_parallel_sequence_logprobs``: the same numbers from each rank's shard and the group, with
no rank holding more than one chunk of its own shard's logits, ``chunk · (v1 - v0)`` elements.

Forward, on every rank, chunked over tokens as ``sequence_logprobs``: a chunk's logits
(n, V_r) = h @ W_r^T go through ``rows_forward`` with the labels the shard owns (as shard
columns; -100 elsewhere), which gives each row's logsumexp over the shard in its parts
(m_r, log s_r); the label's logit is picked from the chunk where the shard owns it (0 elsewhere).
After the chunks, two all_reduces of per-token values. A MAX (float64, 3·N + 4·W numbers for W
ranks): M = max_r m_r, each token's label and its negation, and in each rank's own slot its
[v0, v1), its flag of refused inputs and whether it wants hidden's gradient. From them every
rank refuses alike, before the second: inputs one rank refused (any check of the call's
arguments runs before the first collective; a rank whose check fails joins the collectives up
to this one with its flag set, then raises its own error, and the others name it), hidden's
gradient wanted on some ranks only (the backward's all_reduce would wait on the others),
shards that do not cover [0, V) once (a ``vocab_start`` that overlaps another shard or leaves
a gap, whether or not a label falls there), a label that differs between ranks (each rank
passing its own part of the batch), and a label outside [0, V). Then a SUM (fp32, 2·N
numbers) of s_r · exp(m_r - M) and of the picked label logits (one rank's value, zeros
elsewhere: exact). A token's log-prob is then ``(x_label - M) - log S``, formed as the
one-rank kernels form it (exact near the max however large the logits), and every rank
returns the same per-sequence sums.

Backward: each rank recomputes its chunks' logits and forms ``g · (onehot_owned - p)`` in place,
p from the whole row's (M, log S): the one-rank backward op ``sdpo::sequence_logprobs_bwd``
with the shard's labels, a label another shard owns being passed as V_r ("scored, no column
here", see ``rows_backward``). The weight shard's gradient is local. The hidden-state gradient
of each rank covers its shard's columns only; it is all-reduced (summed) over the group inside
the op, in hidden's dtype, so every rank gets the whole gradient (what a DTensor's
``to_local()`` of a replicated tensor takes back by default: no second reduction).

Collectives per call: an all_gather of the shard sizes and token counts unless ``vocab_start``
is given (and one host read of them), the two all_reduces of the forward, and one of (N, H) in
the backward when hidden requires grad. Every rank of the group must make the same calls with
the same tokens and the same requires_grad flags, and take the same loss of the returned sums,
as in tensor parallelism, where every rank of the group holds the whole batch. Of the tokens,
the labels are compared (above); hidden, seq_ids and token_weights are not, past the checks each
rank makes of its own. Whether ``vocab_start`` is given must agree between the ranks for their
collectives to match, and so must the token count N: compared in the all_gather when
``vocab_start`` is None, not otherwise (all_reduces of different sizes: gloo aborts the
process).
"""

from __future__ import annotations

if not __name__.startswith("sdpo.kernels."):  # see kernels/__init__.py
    raise ImportError(
        f"{__name__} is sdpo's kernel module {__name__.rpartition('.')[2]!r}, importable only as "
        "sdpo.kernels.*: under a second name it would register the sdpo:: custom ops again"
    )

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch import compiler_disabled, resolve_impl
from .linear_logprobs import (
    _check_linear_shapes,
    _chunk_logits,
    _compute_dtype,
    default_chunk_tokens,
)
from .logprobs import (
    FLOAT32_LOWEST,
    IGNORE_INDEX,
    _require,
    check_seq_ids_in_range,
    check_token_weights,
    rows_forward,
    sum_per_sequence,
    weighted,
)


@dataclass(frozen=True, kw_only=True)
class _VocabShard:
    """This rank's rows [start, stop) of the vocabulary, the group, and how the op runs."""

    group: dist.ProcessGroup
    start: int
    stop: int
    hidden_grad: bool  # whether the backward all_reduces hidden's gradient: alike on every rank
    impl: str
    chunk_tokens: int
    grad_weight_dtype: torch.dtype


def _check_group(group: object) -> dist.ProcessGroup:
    """The group the op runs over: ``group``, or the default group (WORLD) for None, as
    torch.distributed's collectives read None. Refused here, on this process alone: no
    torch.distributed, and a process that is not a member (it takes part in none of the
    group's collectives, so no member waits for it)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel_sequence_logprobs needs torch.distributed: call "
            "torch.distributed.init_process_group first (every rank of vocab_group)"
        )
    if group is None:
        group = dist.group.WORLD
    # new_group gives a process it leaves out this int, not a ProcessGroup
    left_out = isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER
    if not (left_out or isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"vocab_group must be a torch.distributed ProcessGroup (or None: the default "
            f"group), got {type(group).__name__}: pass the tensor-parallel group the lm_head "
            "weight is split over"
        )
    if left_out or dist.get_rank(group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of vocab_group; "
            "call the op on the ranks of the group that holds the lm_head's shards"
        )
    return group


def _check_local(**tensors: torch.Tensor) -> None:
    """No DTensor: a ``Shard(0)`` weight's shape is the whole vocabulary's, not this rank's rows.
    (No DTensor exists unless its module was imported, so this imports nothing.)"""
    module = sys.modules.get("torch.distributed.tensor")
    for name, t in tensors.items():
        if module is not None and isinstance(t, module.DTensor):
            raise TypeError(
                f"{name} is a DTensor ({t.placements}); pass this rank's local tensor, "
                f"{name}.to_local() (for the weight: its rows of the vocabulary)"
            )


def _check_tensors(**tensors: object) -> None:
    """Each input a tensor (``token_weights`` may be None): a list or a NumPy array would fail
    deep inside a check with no name."""
    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) or (t is None and name == "token_weights")):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}: convert it with "
                "torch.as_tensor (on the device of the others)"
            )


def _check_options(chunk_tokens: object, grad_weight_dtype: object) -> None:
    """Options read only later, in the chunk loop or the backward: a bad one on one rank
    failed there alone, after the collectives had begun."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int):
        raise TypeError(
            f"chunk_tokens must be an int, got {type(chunk_tokens).__name__} {chunk_tokens!r}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if grad_weight_dtype is not None and not (
        isinstance(grad_weight_dtype, torch.dtype) and grad_weight_dtype.is_floating_point
    ):
        raise TypeError(
            f"grad_weight_dtype must be a floating torch.dtype or None, got "
            f"{type(grad_weight_dtype).__name__} {grad_weight_dtype!r} (torch.float32, "
            "torch.bfloat16, or None for the compute dtype)"
        )


def _check_vocab_start(vocab_start: object) -> None:
    if vocab_start is not None and (
        isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
    ):
        raise ValueError(
            f"vocab_start must be an int >= 0 (the global id of this rank's first lm_head "
            f"row), got {vocab_start!r}"
        )


def _shard_start(
    rows: int,
    num_tokens: int,
    group: dist.ProcessGroup,
    vocab_start: int | None,
    device: torch.device,
) -> int:
    """v0, the global id of this shard's first row: ``vocab_start`` when given (then nothing is
    exchanged), else found from the shard sizes (``rows`` here), the shards lying in the group's
    rank order: rank r's rows follow those of ranks 0 .. r-1 (as ``Shard(0)``). Either way the
    forward's first all_reduce checks that the shards cover the vocabulary once. The exchange
    also carries each rank's token count N: ranks whose counts differ all refuse here, before
    the all_reduces, whose sizes (N numbers a token) would not match."""
    if vocab_start is not None:
        return vocab_start
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([rows, num_tokens], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    sizes, tokens = torch.stack(gathered).t().tolist()  # (W,) each
    if len(set(tokens)) > 1:
        raise ValueError(
            f"the ranks of vocab_group pass batches of different token counts N (rank: N "
            f"{dict(enumerate(tokens))}; {num_tokens} on this process, rank {rank}): each rank "
            "must pass the whole batch, the same tokens, as in tensor parallelism, not its own "
            "part of it"
        )
    return sum(sizes[:rank])


def _shard_labels(labels: torch.Tensor, start: int, rows: int) -> tuple[torch.Tensor, ...]:
    """(forward labels, backward labels) of a shard holding global ids [start, start + rows).
    Forward: the shard column where the shard owns the label, -100 elsewhere (rows_forward reads
    the label's column). Backward: the same, but ``rows`` (past the last column) on a scored
    token another shard owns: its row is scored with no one-hot term here."""
    owned = (labels >= start) & (labels < start + rows)
    forward = torch.where(owned, labels - start, IGNORE_INDEX)
    backward = torch.where(owned | (labels == IGNORE_INDEX), forward, rows)
    return forward, backward


def _shard_rows(
    hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, shard: _VocabShard
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_parts (N, 2), label logits (N,)) over this shard, fp32: each row's (m_r, log s_r),
    and its label's logit where the shard owns the label (``labels`` in shard columns, -100
    elsewhere), 0 elsewhere. One chunk of (chunk_tokens, V_r) logits alive at a time."""
    n = hidden.shape[0]
    dtype = _compute_dtype(hidden, weight_shard)
    w_t = weight_shard.to(dtype).t()
    parts = torch.empty(n, 2, dtype=torch.float32, device=hidden.device)
    picked = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if w_t.shape[1] == 0:  # an empty shard: the max of no logits, a sum of 0, no label owned
        parts[:, 0], parts[:, 1] = FLOAT32_LOWEST, -float("inf")
        return parts, picked
    chunk = shard.chunk_tokens
    buf = torch.empty(min(chunk, n), w_t.shape[1], dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        logits = _chunk_logits(buf, hidden[start:stop].to(dtype), w_t)  # (n_c, V_r)
        lab = labels[start:stop]
        parts[start:stop] = rows_forward(logits, lab, impl=shard.impl)[1]
        x = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1).float()  # (n_c,)
        picked[start:stop] = torch.where(lab != IGNORE_INDEX, x, 0.0)
    return parts, picked


def _combine(
    parts: torch.Tensor,
    picked: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    shard: _VocabShard,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logps (N,), lse_parts (N, 2)) of the whole vocabulary, fp32, the same on every
    rank, from each rank's shard values: two all_reduces. Every refusal here reads values the
    first one made the same on every rank, so that all ranks refuse together (none is left
    waiting in the second)."""
    n = labels.shape[0]
    world, rank = dist.get_world_size(shard.group), dist.get_rank(shard.group)
    # One MAX, in float64 (exact for every fp32 max and token id): the row's max M (N,), each
    # token's label and its negation (max == -max(-label): every rank passed that label), and
    # in each rank's own slot (-inf elsewhere) its [start, stop), its refusal flag (0 here, 1
    # from a rank that refused its inputs, ``_refuse_together``) and whether hidden's gradient
    # is wanted (the backward's all_reduce): (W,) x 4
    slots = torch.full((4, world), -float("inf"), dtype=torch.float64, device=labels.device)
    slots[0, rank], slots[1, rank] = shard.start, shard.stop
    slots[3, rank] = float(shard.hidden_grad)
    # on CUDA the seq_ids range check of this rank (no host sync; on CPU it raised before)
    slots[2, rank] = ((seq_ids < 0) | (seq_ids >= num_seqs)).any()
    lab = labels.to(torch.float64)
    maxed = torch.cat([parts[:, 0].to(torch.float64), lab, -lab, slots.flatten()])
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=shard.group)
    m, top, neg_bottom = maxed[: 3 * n].view(3, n)  # (N,) each
    m = m.float()
    starts, stops, refused, hidden_grad = maxed[3 * n :].view(4, world)
    _require(refused <= 0, refused, _told_of_refusal)  # before reading that rank's values
    _require(
        hidden_grad == hidden_grad[rank],
        hidden_grad,
        lambda r, wanted: (
            f"hidden {'requires' if not wanted else 'does not require'} grad on this process "
            f"(rank {rank} of vocab_group) but {'does' if wanted else 'does not'} on rank {r}: "
            "the backward sums hidden's gradient over the group, so every rank must pass "
            "hidden alike (requires_grad, and torch.no_grad or not)"
        ),
    )
    vocab = _check_tiling(starts, stops)  # V: the shards cover [0, V)
    _require(
        top == -neg_bottom,
        labels,
        lambda i, label: (
            f"labels[{i}] = {label} on this process (rank {rank} of vocab_group) is not the "
            "label every rank passed there: each rank must pass the same labels (and the same "
            "hidden states, seq_ids and token_weights), the whole batch as in tensor "
            "parallelism, not its own part of it"
        ),
    )
    _require(
        ((labels >= 0) & (labels < vocab)) | (labels == IGNORE_INDEX),
        labels,
        lambda i, label: (
            f"labels[{i}] = {label} is outside the vocabulary [0, {int(vocab)}) the ranks' "
            "shards cover, and is not -100; check that the tokenizer and the model's vocab_size "
            "match"
        ),
    )
    # s_r exp(m_r - M) = exp((m_r - M) + log s_r): 0 for a shard of -inf logits (log s_r -inf)
    # and for an empty one. The picked label logits: one rank's value, zeros elsewhere (exact)
    sums = torch.stack([torch.exp((parts[:, 0] - m) + parts[:, 1]), picked], 1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=shard.group)  # (N, 2)
    scale, x_label = sums.unbind(1)
    log_s = torch.log(scale)
    token_logps = torch.where(labels != IGNORE_INDEX, (x_label - m) - log_s, 0.0)
    return token_logps, torch.stack([m, log_s], 1)


def _told_of_refusal(rank: int, _: int) -> str:
    return (
        f"rank {rank} of vocab_group refused its inputs to vocab_parallel_sequence_logprobs "
        "(the error raised there says which and why); every rank of the group refuses the call "
        "with it, so that none is left waiting in a collective"
    )


def _refuse_together(
    error: Exception, num_tokens: int, group: dist.ProcessGroup, device: torch.device
) -> None:
    """Raise ``error``, found on this rank alone, once the other ranks know of it: this rank's
    part of the forward's first all_reduce (see ``_combine``), its flag set and -inf (MAX's
    identity) elsewhere, so that every rank refuses at that point and none waits in the second.
    ``num_tokens`` must be the other ranks' N for the all_reduce to match theirs."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    maxed = torch.full((3 * num_tokens + 4 * world,), -float("inf"), dtype=torch.float64)
    maxed[3 * num_tokens + 2 * world + rank] = 1.0
    dist.all_reduce(maxed.to(device), op=dist.ReduceOp.MAX, group=group)
    raise error


def _check_tiling(starts: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """V (0-d), where the ranks' rows [starts[r], stops[r]) cover [0, V) once, in any order:
    sorted, each starts where the one before it stops, the first at 0. An empty shard holds no
    id wherever its start lies: it is taken as [0, 0), sorted before a shard that starts at 0.
    Refused as ``_require`` refuses (on CUDA a device-side assert, no host sync)."""
    empty = starts == stops
    v0, v1 = torch.where(empty, 0.0, starts), torch.where(empty, 0.0, stops)
    by_stop = torch.sort(v1, stable=True).indices
    order = by_stop[torch.sort(v0[by_stop], stable=True).indices]
    a, b = v0[order], v1[order]
    ok = torch.cat([a[:1] == 0, a[1:] == b[:-1]])

    def gap_or_overlap(i: int, start: int) -> str:
        held = ", ".join(
            f"rank {r}: [{int(lo)}, {int(hi)})" for r, (lo, hi) in enumerate(zip(starts, stops))
        )
        below = int(b[i - 1]) if i else 0
        where = (
            f"ids [{below}, {start}) are in no shard"
            if start > below
            else f"ids [{start}, {below}) are in two shards"
        )
        return (
            f"the ranks' rows of the vocabulary do not cover [0, V) once ({held}): {where}. "
            "Each rank's vocab_start must be the id of its first lm_head row (for shards in rank "
            "order, the sum of the shard sizes of the ranks before it); vocab_start=None finds "
            "it from the shard sizes"
        )

    _require(ok, a, gap_or_overlap)
    return v1.max()


class VocabParallelSequenceLogprobs(torch.autograd.Function):
    """(hidden, weight_shard) -> seq_logps (S,) fp32 over the whole vocabulary; a backward that
    recomputes each chunk of the shard's logits and sums the hidden-state gradient over the
    group (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight_shard, labels, seq_ids, num_seqs, token_weights, shard):
        fwd_labels, bwd_labels = _shard_labels(labels, shard.start, weight_shard.shape[0])
        parts, picked = _shard_rows(hidden, weight_shard, fwd_labels, shard)
        token_logps, lse_parts = _combine(parts, picked, labels, seq_ids, num_seqs, shard)
        ctx.shard = shard
        ctx.save_for_backward(hidden, weight_shard, bwd_labels, seq_ids, lse_parts, token_weights)
        return sum_per_sequence(weighted(token_logps, token_weights), seq_ids, num_seqs)

    @staticmethod
    def backward(ctx, grad_seq):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "vocab_parallel_sequence_logprobs has first-order gradients only; backward "
                "with create_graph=True is not supported"
            )
        hidden, weight_shard, labels, seq_ids, lse_parts, token_weights = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 7
        shard = ctx.shard
        if weight_shard.shape[0] == 0:  # no columns here: nothing to add to the group's sum
            grads = [torch.zeros_like(hidden)] * need_h + [torch.zeros_like(weight_shard)] * need_w
        else:
            grads = torch.ops.sdpo.sequence_logprobs_bwd(
                grad_seq,
                hidden,
                weight_shard,
                labels,
                seq_ids,
                lse_parts,
                shard.impl,
                shard.chunk_tokens,
                shard.grad_weight_dtype,
                need_h,
                need_w,
                token_weights,
            )
        grad_h = grads[0] if need_h else None
        if grad_h is not None:  # this shard's columns' part: summed into the whole gradient
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=shard.group)
        grad_w = grads[-1] if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def _token_count(labels: object, hidden: object) -> int:
    """N as the ranks whose inputs pass the checks take it (labels (N,), hidden (N, H)), read
    from inputs that may not: the labels' length, else hidden's rows, else 0."""
    for t in (labels, hidden):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    return 0


@compiler_disabled
def vocab_parallel_sequence_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    vocab_group: dist.ProcessGroup | None,
    vocab_start: int | None = None,
    impl: str = "auto",
    chunk_tokens: int | None = None,
    grad_weight_dtype: torch.dtype | None = torch.float32,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(S,) fp32 summed log-probs of ``labels`` per packed sequence, the lm_head weight split
    by vocabulary rows over ``vocab_group``: :func:`~sdpo.kernels.sequence_logprobs`' numbers
    from this rank's rows alone.

    ``weight_shard`` (V_r, H): this rank's rows [v0, v0 + V_r) of the (V, H) lm_head weight
    (``weight.to_local()`` of a DTensor sharded ``Shard(0)``); shards may be uneven, or
    empty. ``vocab_start``: v0, given; ``None``: the shards lie in the group's rank order,
    v0 the sum of the lower ranks' sizes (found by one all_gather and a host read per call;
    give it to skip them). hidden (N, H), labels (N,) in global token ids (-100 = not scored),
    seq_ids, num_seqs and token_weights as in ``sequence_logprobs``, the same on every rank
    of the group, as are the calls and which of hidden and weight_shard require grad.
    ``vocab_group``: the process group the weight is split over; None is the default group
    (WORLD), as for torch.distributed's collectives. Refused on every rank alike: arguments
    that fail a check on any rank (a ``seq_ids`` entry outside [0, num_seqs) on one rank: that
    rank raises the check's error, the others name the rank), shards that do not cover [0, V)
    once (however ``vocab_start`` was found), hidden requiring grad on some ranks only, labels
    that differ between ranks, and a label outside [0, V) (not -100). On CUDA the refusals
    read from the first all_reduce are device-side asserts (no host sync): a rank raises its
    own argument's error as on the CPU, the others (and every rank, for a ``seq_ids`` entry out
    of range) stop at the assert, after which the process's CUDA context is unusable.

    Returns the same sums on every rank. Differentiable w.r.t. hidden and weight_shard (first
    order): weight_shard's gradient is its own rows' (accumulated in ``grad_weight_dtype``, as
    ``sequence_logprobs``); hidden's is the whole gradient, already summed over the group
    (one all_reduce in hidden's dtype), so a caller reduces it no further. The loss taken of
    the sums must be the same on every rank. No rank forms more than ``chunk_tokens`` rows of
    its shard's logits at a time (default: ``default_chunk_tokens`` for V_r).
    WPO's aligned sums and the token metrics are not formed here. Not a ``torch.library``
    op (it runs collectives): ``torch.compile`` breaks the graph around it.
    """
    group = _check_group(vocab_group)
    # Every check of the inputs runs here, before any collective, and a failure is raised on
    # every rank together (``_refuse_together``): a check fails on one rank alone whenever the
    # ranks' inputs differ, and raising there alone would leave the others in the all_reduce
    try:
        _check_tensors(
            hidden=hidden,
            weight_shard=weight_shard,
            labels=labels,
            seq_ids=seq_ids,
            token_weights=token_weights,
        )
        _check_local(hidden=hidden, weight_shard=weight_shard)
        _check_linear_shapes(hidden, weight_shard, labels, seq_ids, num_seqs)
        check_token_weights(token_weights, hidden.shape[0], device=hidden.device)
        _check_vocab_start(vocab_start)
        impl = resolve_impl(impl, hidden.device)
        dtype = _compute_dtype(hidden, weight_shard)
        if chunk_tokens is None:
            chunk_tokens = default_chunk_tokens(
                vocab_size=max(1, weight_shard.shape[0]),
                hidden_size=weight_shard.shape[1],
                dtype=dtype,
            )
        _check_options(chunk_tokens, grad_weight_dtype)
        if seq_ids.device.type == "cpu":  # on CUDA: folded into the first all_reduce
            check_seq_ids_in_range(seq_ids, num_seqs)
    except Exception as error:  # any check's failure, whatever it raised: none is raised alone
        # this rank's part of the collectives the others make: the shard sizes' all_gather
        # (as an empty shard) where they make it, then the first all_reduce, flagged
        device = next(
            (t.device for t in (hidden, weight_shard, labels) if isinstance(t, torch.Tensor)),
            torch.device("cpu"),
        )
        num_tokens = _token_count(labels, hidden)
        try:
            _shard_start(0, num_tokens, group, None if vocab_start is None else 0, device)
        except ValueError:  # the token counts differ: every rank refuses there, none goes on
            raise error from None
        _refuse_together(error, num_tokens, group, device)
    start = _shard_start(weight_shard.shape[0], hidden.shape[0], group, vocab_start, hidden.device)
    shard = _VocabShard(
        group=group,
        start=start,
        stop=start + weight_shard.shape[0],
        hidden_grad=torch.is_grad_enabled() and hidden.requires_grad,
        impl=impl,
        chunk_tokens=chunk_tokens,
        grad_weight_dtype=grad_weight_dtype or dtype,
    )
    return VocabParallelSequenceLogprobs.apply(
        hidden, weight_shard, labels, seq_ids, num_seqs, token_weights, shard
    )


__all__ = ["VocabParallelSequenceLogprobs", "vocab_parallel_sequence_logprobs"]
