"""Triton kernels for the row-wise log-prob core, imported on first use by logprobs.py.

Kept apart so that ``import sdpo.kernels`` works where Triton is not installed. The
kernels: one program per row of logits, streaming over vocabulary blocks in fp32.

Also the two things every Triton launch in sdpo.kernels goes through: :func:`launch` (the
kernel, or a clear error where it cannot run) and :func:`on_device`, the device guard that each
``kernel[grid](...)`` runs under. Triton launches on the *current* CUDA device and that
device's current stream, whatever device the pointer arguments live on; a model on ``cuda:1``
in a process whose current device is ``cuda:0`` (an embedder's) would have its kernels run on
the wrong GPU, out of order with the stream that produced their inputs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# the lowest finite float32, the running max's start (a global a @triton.jit kernel may read)
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def logprobs_fwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    logp_ptr,
    lse_parts_ptr,
    lsq_ptr,
    entropy_ptr,
    mean_ptr,
    top1_ptr,
    V,
    BLOCK_V: tl.constexpr,
    IGNORE: tl.constexpr,
    WITH_LSQ: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    # One program per row: streaming (online) logsumexp over vocabulary blocks. The row's
    # logsumexp is stored in its two parts, the max m and log(s) (lse_parts_ptr: (N, 2)), not
    # as their fp32 sum, which rounds at |m| 2^-24: the backward forms each probability as
    # exp((x - m) - log(s)), exact near the max as the log-prob here.
    # WITH_LSQ (WPO): also log sum_v p_v^2 = log(s2) - 2 log(s), s2 the running sum of
    # exp(2 (x - m)), rescaled by exp(2 (m_old - m_new)) like s. Off, it is compiled out.
    # WITH_STATS (the trainer's token metrics): from the same exp(x - m) as s, the running
    # t = sum_v exp(x - m) (x - m), so that the entropy is log(s) - t / s (both terms of the
    # size of log V, not of the logits: no cancellation); when the max moves to m_new, t
    # becomes alpha (t + (m - m_new) s), alpha = exp(m - m_new), before the block adds its
    # terms. Also the plain sum of x (the mean logit) and the maximum over the columns before
    # the label, so that the label is the top-1 as torch.argmax picks it (the first maximum,
    # as TRL counts it). Off, all of it is compiled out.
    # Edge values: the running max starts at the lowest finite float, not at a bound such as
    # -1e30 that a row's logits may all lie below (its s would underflow to 0 and its lse to
    # -inf); the label's log-prob is (x_label - m) - log(s), exact where x_label is near m
    # however large m is (m + log(s) rounds at |m| 2^-24 first); a logit of -inf (or an x - m
    # that overflows to it) has e = 0 and adds nothing to t, not 0 * -inf; and t's rescale caps
    # m - m_new where alpha is 0 anyway, so that a jump of the max by more than the float range
    # cannot turn alpha (m - m_new) s into 0 * -inf.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    # A finite start keeps exp(m - m_new) defined when a whole block is -inf.
    m = tl.full((), FLOAT32_LOWEST, tl.float32)
    s = tl.zeros((), tl.float32)
    if WITH_LSQ:
        s2 = tl.zeros((), tl.float32)
    if WITH_STATS:
        t = tl.zeros((), tl.float32)
        x_sum = tl.zeros((), tl.float32)
        max_before = tl.full((), -float("inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        m_new = tl.maximum(m, block_max)
        alpha = tl.exp(m - m_new)
        if WITH_STATS:
            # what reads x itself first, so that x is dead once d = x - m_new is formed. Only
            # the label's own block needs a masked maximum; one wholly before it has its
            # block_max already, one after it adds nothing
            if start + BLOCK_V <= label:
                max_before = tl.maximum(max_before, block_max)
            elif start < label:
                before = tl.where(cols < label, x, -float("inf"))
                max_before = tl.maximum(max_before, tl.max(before, axis=0))
            x_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        d = x - m_new
        e = tl.exp(d)
        if WITH_LSQ:  # ahead of t, so that t's capped d is the last use of d (sm_90: 64 r, not 71)
            s2 = s2 * tl.exp(2.0 * (m - m_new)) + tl.sum(tl.exp(2.0 * d), axis=0)
        if WITH_STATS:
            # before s moves on; where e = 0 (the tail's -inf padding, a -inf logit) d may be
            # -inf: capped, so that the term is 0, not NaN
            dm = tl.maximum(m - m_new, -1.0e30)
            t = alpha * (t + dm * s) + tl.sum(e * tl.maximum(d, FLOAT32_LOWEST), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    if WITH_LSQ:
        tl.store(lsq_ptr + row, tl.log(s2) - 2.0 * log_s)
    valid = label != IGNORE
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32)
    logp = tl.where(valid, (x_label - m) - log_s, 0.0)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_parts_ptr + 2 * row, m)
    tl.store(lse_parts_ptr + 2 * row + 1, log_s)
    if WITH_STATS:
        top1 = valid & (x_label >= m) & (x_label > max_before)
        tl.store(entropy_ptr + row, tl.where(valid, log_s - t / s, 0.0))
        tl.store(mean_ptr + row, tl.where(valid, x_sum / V, 0.0))
        tl.store(top1_ptr + row, tl.where(top1, 1.0, 0.0))


@triton.jit
def logprobs_bwd_kernel(
    logits_ptr,
    stride_in,
    grad_ptr,
    stride_out,
    labels_ptr,
    lse_parts_ptr,
    grad_token_ptr,
    V,
    BLOCK_V: tl.constexpr,
    IGNORE: tl.constexpr,
):
    # grad[row, v] = g * (onehot(label)[v] - exp((x[v] - m) - log s)); g = 0 for ignored
    # rows. m and log s are the forward's (lse_parts_ptr, (N, 2)): x - m is exact near the max,
    # where x - lse with lse = m + log s rounded to fp32 would scale every probability of the
    # row by one error of |m| 2^-24 (a gradient row that no longer sums to 0).
    # grad_ptr may equal logits_ptr (in place): each block is read before it is written.
    # A label >= V matches no column: the row is scored with no one-hot term, as a row whose
    # label lies in another rank's shard of the vocabulary (vocab_parallel.py) needs.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != IGNORE
    g = tl.where(valid, tl.load(grad_token_ptr + row), 0.0)
    # Rows with g == 0 (prompt tokens) skip the loads: with load_limit = 0 every load is
    # masked off, x = -inf, and m = +inf (log s = 0) makes p = 0 even where the row's own
    # log s is -inf (logits all -inf), so the row is written as zeros without being read.
    m = tl.where(g != 0.0, tl.load(lse_parts_ptr + 2 * row), float("inf"))
    log_s = tl.where(g != 0.0, tl.load(lse_parts_ptr + 2 * row + 1), 0.0)
    in_ptr = logits_ptr + row * stride_in
    out_ptr = grad_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_V)
    load_limit = tl.where(g != 0.0, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(in_ptr + cols, mask=cols < load_limit, other=-float("inf")).to(tl.float32)
        p = tl.exp((x - m) - log_s)
        onehot = tl.where(cols == label, 1.0, 0.0)
        grad = g * (onehot - p)
        tl.store(out_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def launch(kernel, device: torch.device):
    """``kernel`` ready to launch on ``device``; a clear error where Triton cannot run it."""
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        # Triton fixes interpreter mode when triton.language is first imported; the
        # standard library (tl.zeros, tl.max, ...) must have been built interpreted too.
        if not (
            isinstance(kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)
        ):
            raise RuntimeError(
                "impl='triton' on CPU tensors needs the Triton interpreter, but Triton was "
                "imported without TRITON_INTERPRET=1 (something imported Triton before "
                "sdpo.kernels could set it); set TRITON_INTERPRET=1 in the environment "
                "before starting Python, or use impl='torch' on CPU."
            )
    return kernel


# contextlib.nullcontext keeps no state: one instance serves every CPU launch
_NO_GUARD = contextlib.nullcontext()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The guard a Triton launch on tensors of ``device`` runs under: ``torch.cuda.device``
    for a CUDA device, so that Triton's current device and current stream are the tensors'
    (the stream torch's own ops on them use), and nothing for the CPU interpreter. A device
    switch only where the current one differs; no synchronisation."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_GUARD
