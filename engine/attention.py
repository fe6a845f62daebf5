"""Causal attention over a padding-free packed token stream.

Sequences are packed back to back into one flat stream and delimited by ``cu_seqlens``; each
token attends only to earlier tokens of its own sequence. Three backends compute the same thing,
chosen at run time by :func:`resolve_attention_backend` (the one place the choice is made):

- ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (flash-attn installed, CUDA, fp16/bf16);
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch >= 2.10, CUDA, fp16/bf16);
- ``"sdpa"``: ``scaled_dot_product_attention`` run sequence by sequence (any device and dtype;
  the CPU and test path).

All take ``q`` of shape (N, Hq, D) and ``k``/``v`` of shape (N, Hkv, D) with Hq a multiple of
Hkv (grouped-query attention) and return (N, Hq, D).

Sliding window (``window``, Mistral's and Qwen's ``sliding_window``): a query sees at most
``window`` keys, itself and the ``window - 1`` before it, as transformers 5 masks them (key j is
seen by query i when ``i - window < j <= i``). The flash kernels take it as
``window_size=(window - 1, 0)`` (flash-attn >= 2.3; ``varlen_attn`` where its signature has
``window_size``), the number of keys left of the query's own, which is what transformers hands
flash-attn too; the SDPA fallback masks a band of the causal triangle, in blocks of queries
(``QUERY_BLOCK``) that each see only the keys within their reach. A backend that cannot
apply a window is skipped by "auto" and refused by name (:func:`resolve_attention_backend`).

Shared-prompt layout (opt-in, see ``engine/packing.py``): a pair's prompt is computed once and
attended to by both completions. Queries and keys then have separate layouts: query sequence i
is rows ``cu_seqlens[i]:cu_seqlens[i+1]`` of ``q``, key sequence i is rows
``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of ``k``/``v`` (gathered by the caller; a prompt's rows
appear in two key sequences), and a sequence may have more keys (Lk) than queries (Lq). The
causal mask is then aligned bottom-right: query j sees keys 0 .. j + Lk - Lq, so the rejected
completion's queries see the whole prompt and their own earlier tokens. flash-attn (>= 2.1) and
``varlen_attn`` (the same flash kernels inside PyTorch: ``mha_varlen_fwd`` turns ``is_causal``
into a right window of 0 measured from the bottom-right corner, and drops the causal flag when
every query sequence has one token, which only bottom-right alignment makes exact) have this
alignment natively; the SDPA fallback builds the mask explicitly, because SDPA's ``is_causal``
is aligned top-left when the lengths differ.

The SDPA fallback passes 4-D (1, H, L, D) tensors: SDPA's fused kernels (flash on CPU, flash or
memory-efficient on CUDA) take nothing else, and 3-D inputs run its math kernel, which holds H x
Lq x Lk float scores (3.1 GiB of peak memory for forward and backward of one 8k-token sequence
of 4 heads on CPU, where the fused kernel holds 25 MiB: ``benchmarks/attention_memory.py``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.kernels.dispatch import compiler_disabled

ATTENTION_BACKENDS = ("auto", "flash", "varlen", "sdpa")
# what each CUDA-only backend needs, as error messages say it
BACKEND_NEEDS = {
    "flash": "a CUDA device and the flash-attn package",
    "varlen": "a CUDA device and PyTorch >= 2.10",
}
# what each of them needs to apply a sliding window
WINDOW_NEEDS = {
    "flash": "flash-attn >= 2.3 (its window_size)",
    "varlen": "a PyTorch whose torch.nn.attention.varlen.varlen_attn takes window_size",
}

# Queries per SDPA call of the fallback where a mask is needed (a window, or more keys than
# queries): the masks it builds are QUERY_BLOCK rows, not one row per query of the sequence.
# 1024 keeps them at 5 MiB per 1024 keys seen in fp32 (the bool mask and SDPA's float form of
# it), in calls few enough that their overhead is small beside each block's attention
# (benchmarks/attention_memory.py, 8k tokens, window 1024, forward and backward on 2 shared CPU
# cores: 0.3-1.9 s and 100 MiB, against 2.0-2.4 s and 329 MiB for one call over the sequence;
# blocks of 256 took 78 MiB and 3.6 s).
QUERY_BLOCK = 1024

# flash-attn and varlen_attn are flash kernels: half-precision inputs only.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_varlen_func() -> Callable | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # installed but built for another torch/CUDA: treat as absent
        return None
    return flash_attn_varlen_func


@dataclass(frozen=True)
class SharedPrefix:
    """The key layout of a shared-prompt batch (built by ``engine.packing.pack_pairs_shared``).

    ``kv_index`` (K,) int64 gathers rows of the token stream into the key layout (each
    prompt's rows twice); ``cu_seqlens_k`` (S+1,) int32 delimits the S key sequences in it;
    ``max_seqlen_k`` is the longest key sequence."""

    cu_seqlens_k: Tensor  # (S+1,) int32
    max_seqlen_k: int
    kv_index: Tensor  # (K,) int64


@functools.cache
def _flash_attn_takes_window() -> bool:
    """flash-attn's varlen function takes ``window_size`` from version 2.3 on."""
    func = _flash_attn_varlen_func()
    return func is not None and "window_size" in inspect.signature(func).parameters


@functools.cache
def _flash_attn_aligns_bottom_right() -> bool:
    """flash-attn aligns its causal mask bottom-right when Lq != Lk from version 2.1 on (before
    it was top-left); the shared-prompt layout relies on it."""
    try:
        version = importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (
        int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2]
    )
    return (major, minor) >= (2, 1)


@functools.cache
def _torch_varlen_attn() -> tuple[Callable, frozenset[str]] | None:
    """``varlen_attn`` and the names of its keyword parameters, or None before PyTorch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def available_attention_backends(
    device: torch.device | str, *, sliding_window: bool = False
) -> list[str]:
    """The concrete backends usable on ``device`` in this environment, fastest first; with
    ``sliding_window``, those of them that can apply a window."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _flash_attn_varlen_func() is not None and (
            not sliding_window or _flash_attn_takes_window()
        ):
            found.append("flash")
        varlen = _torch_varlen_attn()
        if varlen is not None and (not sliding_window or "window_size" in varlen[1]):
            found.append("varlen")
    found.append("sdpa")
    return found


def resolve_attention_backend(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    sliding_window: bool = False,
) -> str:
    """Turn ``backend`` ("auto" or a concrete name) into the concrete backend to run.

    "auto" picks flash-attn, then ``varlen_attn``, then per-sequence SDPA; the flash kernels are
    skipped for dtypes they do not support (float32 on CUDA runs SDPA), and with
    ``sliding_window`` (a window that masks some key) where their version takes no window.
    Naming a concrete backend that cannot run here is an error that says why."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    device = torch.device(device)
    usable = available_attention_backends(device, sliding_window=sliding_window)
    if backend == "auto":
        if dtype is not None and dtype not in _FLASH_DTYPES:
            return "sdpa"
        return usable[0]
    if backend not in usable:
        if backend in available_attention_backends(device):
            raise ValueError(
                f"attention backend {backend!r} cannot apply a sliding window: it needs "
                f"{WINDOW_NEEDS[backend]}; upgrade it, or use backend='auto' or one of {usable}"
            )
        why = f"it needs {BACKEND_NEEDS[backend]}"
        if backend == "flash":
            why += " (pip install flash-attn)"
        raise ValueError(
            f"attention backend {backend!r} is not available on {device}: {why}; "
            f"use backend='auto' or one of {usable}"
        )
    if backend != "sdpa" and dtype is not None and dtype not in _FLASH_DTYPES:
        raise ValueError(
            f"attention backend {backend!r} supports float16/bfloat16 inputs, got {dtype}; "
            "cast the model to bfloat16 or use backend='sdpa'"
        )
    return backend


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor,
    max_seqlen: int,
    backend: str = "auto",
    scale: float | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    window: int | None = None,
) -> Tensor:
    """Causal attention within each packed sequence: q (N, Hq, D), k/v (N, Hkv, D) -> (N, Hq, D).

    ``cu_seqlens`` (S+1,) int32 holds the sequence boundaries (0 first, N last); ``max_seqlen``
    is the longest sequence. ``scale`` defaults to 1/sqrt(D). ``window``: each query sees at
    most this many keys, its own and those just before it (see the module docstring); None:
    every earlier key of its sequence.

    With ``cu_seqlens_k`` (S+1,) and ``max_seqlen_k``, k/v (K, Hkv, D) have their own layout:
    key sequence i is rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``, with at least as many keys as
    sequence i has queries, and the causal mask is aligned bottom-right (see the module
    docstring). ``cu_seqlens`` then delimits the queries only."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention expects (tokens, heads, head_dim) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"window must be a positive number of keys or None, got {window!r}")
    if cu_seqlens_k is None:  # the ordinary layout: keys are the queries' rows
        cu_k, max_k = cu_seqlens, max_seqlen
    else:
        if max_seqlen_k is None or cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(
                "a separate key layout needs cu_seqlens_k with one boundary per query boundary "
                f"({tuple(cu_seqlens.shape)}, got {tuple(cu_seqlens_k.shape)}) and max_seqlen_k "
                f"(got {max_seqlen_k})"
            )
        cu_k, max_k = cu_seqlens_k, max_seqlen_k
    if (
        window is not None
        and backend in BACKEND_NEEDS
        and backend not in available_attention_backends(q.device, sliding_window=True)
        and max_k <= window
    ):
        # a kernel named without windows runs a batch that no window reaches (compared only
        # here: a comparison with the symbolic max_k would specialise compiled layers on it)
        window = None
    name = resolve_attention_backend(backend, q.device, q.dtype, sliding_window=window is not None)
    if cu_seqlens_k is not None and name == "flash" and not _flash_attn_aligns_bottom_right():
        raise ValueError(
            "the installed flash-attn aligns its causal mask top-left when a sequence has "
            "more keys than queries (before 2.1); the shared-prompt layout needs "
            "flash-attn >= 2.1: upgrade it, or use backend 'varlen' or 'sdpa'"
        )
    if name in ("flash", "varlen"):
        run = _flash if name == "flash" else _torch_varlen
        return run(
            q,
            k,
            v,
            cu_q=cu_seqlens,
            cu_k=cu_k,
            max_q=max_seqlen,
            max_k=max_k,
            scale=scale,
            window=window,
        )
    # Inside a compiled layer the per-sequence loop (a host sync, then one SDPA call per
    # sequence) runs eagerly: traced, it would break the graph at the sync and specialise the
    # rest on the sequence count, one recompile per new count until Dynamo's limit.
    run = _sdpa_per_sequence_eager if torch.compiler.is_compiling() else _sdpa_per_sequence
    return run(
        q, k, v, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k, scale=scale, window=window
    )


def _int32_bounds(cu_q: Tensor, cu_k: Tensor, *, device: torch.device) -> tuple[Tensor, Tensor]:
    """Query and key boundaries as int32 on ``device`` (one tensor when they are the same)."""
    same = cu_k is cu_q
    cu_q = cu_q.to(device=device, dtype=torch.int32)
    return cu_q, cu_q if same else cu_k.to(device=device, dtype=torch.int32)


def _flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    window: int | None,
) -> Tensor:
    flash_attn_varlen_func = _flash_attn_varlen_func()
    cu_q, cu_k = _int32_bounds(cu_q, cu_k, device=q.device)
    # window_size counts the keys left of the query's own (bottom-right aligned, as the causal
    # mask); given only with a window, so that flash-attn < 2.3 runs unwindowed layers
    kwargs = {} if window is None else {"window_size": (window - 1, 0)}
    # GQA is native: flash-attn maps query head h to key/value head h // (Hq // Hkv).
    return flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=True, **kwargs
    )  # (N, Hq, D)


def _torch_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    window: int | None,
) -> Tensor:
    varlen_attn, params = _torch_varlen_attn()
    cu_q, cu_k = _int32_bounds(cu_q, cu_k, device=q.device)
    kwargs: dict = {"scale": scale}
    # The causal switch changed between releases: window_size=(-1, 0) (newer) or is_causal.
    # A sliding window is (window - 1, 0): the flash kernel's keys left of the query's own
    # (resolve_attention_backend has refused a release without window_size).
    if "window_size" in params:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    # Releases without the flag (2.10, 2.11) take fewer key/value heads natively (checked on an
    # H100 with torch 2.11: 8 KV heads for 32 query heads), so k/v are never expanded here.
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)  # (N, Hq, D)


def _sdpa_per_sequence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor,
    scale: float | None,
    cu_seqlens_k: Tensor | None = None,
    window: int | None = None,
) -> Tensor:
    bounds = cu_seqlens.tolist()  # one host sync per call
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the token count {q.shape[0]}, "
            f"got {bounds[:3]}...{bounds[-3:]}"
        )
    key_bounds = bounds
    if cu_seqlens_k is not None:
        key_bounds = cu_seqlens_k.tolist()  # a second host sync (shared-prompt layout only)
        if key_bounds[0] != 0 or key_bounds[-1] != k.shape[0]:
            raise ValueError(
                f"cu_seqlens_k must start at 0 and end at the key count {k.shape[0]}, "
                f"got {key_bounds[:3]}...{key_bounds[-3:]}"
            )
    groups = q.shape[1] // k.shape[1]
    outputs = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        k_start, k_end = key_bounds[i], key_bounds[i + 1]
        extra = (k_end - k_start) - (end - start)  # keys before the first query's own key
        if extra < 0:
            raise ValueError(
                f"sequence {i} has {end - start} queries but only {k_end - k_start} keys; "
                "a key layout needs at least as many keys as queries per sequence"
            )
        # 4-D (batch 1): SDPA's fused kernels (flash on CPU; flash or memory-efficient on CUDA)
        # take only 4-D inputs, and a 3-D call runs the math one, with Hq x Lq x Lk scores
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        ks = k[k_start:k_end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Lk, D)
        vs = v[k_start:k_end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Lk, D)
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=1)  # (1, Hq, Lk, D)
            vs = vs.repeat_interleave(groups, dim=1)  # (1, Hq, Lk, D)
        windowed = window is not None and k_end - k_start > window
        if extra == 0 and not windowed:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            out = _masked_by_query_blocks(qs, ks, vs, extra=extra, window=window, scale=scale)
        outputs.append(out[0].transpose(0, 1))  # (Lq, Hq, D)
    if not outputs:
        return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return torch.cat(outputs, dim=0)  # (N, Hq, D)


def _masked_by_query_blocks(
    qs: Tensor, ks: Tensor, vs: Tensor, *, extra: int, window: int | None, scale: float | None
) -> Tensor:
    """SDPA of one sequence under the bottom-right causal mask (query i sees keys 0 .. i +
    ``extra``; SDPA's ``is_causal`` is aligned top-left when Lq != Lk) and, with ``window``,
    only the last ``window`` of them (keys i + extra - window + 1 .. i + extra): qs (1, H, Lq,
    D), ks/vs (1, H, Lk, D) -> (1, H, Lq, D).

    Run QUERY_BLOCK queries at a time, each against the keys its block sees: the boolean mask
    and the additive mask in the inputs' dtype that SDPA makes of it (and keeps for the
    backward) are (block, keys seen), at most QUERY_BLOCK x Lk, and QUERY_BLOCK x (QUERY_BLOCK +
    window - 1) with a window, where one (Lq, Lk) mask was 5 bytes per pair in fp32 (1.3 GiB for
    a 16k-token sequence). With a window the kept masks add up to Lq x (QUERY_BLOCK + window -
    1), and keys out of a block's reach are not computed at all; without one (more keys than
    queries) they add up to the lower triangle, Lq x (Lk - Lq / 2), about half the square."""
    lq = qs.shape[2]
    blocks = []
    for r0 in range(0, lq, QUERY_BLOCK):
        r1 = min(lq, r0 + QUERY_BLOCK)
        k0 = 0 if window is None else max(0, r0 + extra - window + 1)  # first key the block sees
        k1 = r1 + extra  # one past its last
        # local query i (query r0 + i) sees local keys up to i + r0 + extra - k0, and with a
        # window from i + r0 + extra - window + 1 - k0 on
        allowed = torch.ones(r1 - r0, k1 - k0, dtype=torch.bool, device=qs.device).tril(
            diagonal=r0 + extra - k0
        )  # (block, keys seen)
        if window is not None:
            allowed = allowed.triu(diagonal=r0 + extra - window + 1 - k0)
        blocks.append(
            F.scaled_dot_product_attention(
                qs[:, :, r0:r1], ks[:, :, k0:k1], vs[:, :, k0:k1], attn_mask=allowed, scale=scale
            )
        )  # (1, H, block, D)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


# ``_sdpa_per_sequence`` behind dynamo's disable mark: a compiled caller graph-breaks once around
# it (the wrapper imports ``torch._dynamo`` on its first call, which only a compiled run makes).
_sdpa_per_sequence_eager = compiler_disabled(_sdpa_per_sequence)
