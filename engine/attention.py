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
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_BACKENDS = ("auto", "flash", "varlen", "sdpa")

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


@functools.cache
def _torch_varlen_attn() -> tuple[Callable, frozenset[str]] | None:
    """``varlen_attn`` and the names of its keyword parameters, or None before PyTorch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def available_attention_backends(device: torch.device | str) -> list[str]:
    """The concrete backends usable on ``device`` in this environment, fastest first."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _flash_attn_varlen_func() is not None:
            found.append("flash")
        if _torch_varlen_attn() is not None:
            found.append("varlen")
    found.append("sdpa")
    return found


def resolve_attention_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> str:
    """Turn ``backend`` ("auto" or a concrete name) into the concrete backend to run.

    "auto" picks flash-attn, then ``varlen_attn``, then per-sequence SDPA; the flash kernels are
    skipped for dtypes they do not support (float32 on CUDA runs SDPA). Naming a concrete
    backend that cannot run here is an error that says why."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    device = torch.device(device)
    usable = available_attention_backends(device)
    if backend == "auto":
        if dtype is not None and dtype not in _FLASH_DTYPES:
            return "sdpa"
        return usable[0]
    if backend not in usable:
        why = {
            "flash": "it needs a CUDA device and the flash-attn package (pip install flash-attn)",
            "varlen": "it needs a CUDA device and PyTorch >= 2.10",
        }[backend]
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
) -> Tensor:
    """Causal attention within each packed sequence: q (N, Hq, D), k/v (N, Hkv, D) -> (N, Hq, D).

    ``cu_seqlens`` (S+1,) int32 holds the sequence boundaries (0 first, N last); ``max_seqlen``
    is the longest sequence. ``scale`` defaults to 1/sqrt(D)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention expects (tokens, heads, head_dim) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    name = resolve_attention_backend(backend, q.device, q.dtype)
    if name == "flash":
        return _flash(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)
    if name == "varlen":
        return _torch_varlen(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)
    return _sdpa_per_sequence(q, k, v, cu_seqlens=cu_seqlens, scale=scale)


def _flash(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int, scale: float | None
) -> Tensor:
    flash_attn_varlen_func = _flash_attn_varlen_func()
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    # GQA is native: flash-attn maps query head h to key/value head h // (Hq // Hkv).
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=True
    )  # (N, Hq, D)


def _torch_varlen(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int, scale: float | None
) -> Tensor:
    varlen_attn, params = _torch_varlen_attn()
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    kwargs: dict = {"scale": scale}
    # The causal switch changed between releases: window_size=(-1, 0) (newer) or is_causal.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    # Releases without the flag (2.10, 2.11) take fewer key/value heads natively (checked on an
    # H100 with torch 2.11: 8 KV heads for 32 query heads), so k/v are never expanded here.
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)  # (N, Hq, D)


def _sdpa_per_sequence(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, scale: float | None
) -> Tensor:
    bounds = cu_seqlens.tolist()  # one host sync per call
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the token count {q.shape[0]}, "
            f"got {bounds[:3]}...{bounds[-3:]}"
        )
    groups = q.shape[1] // k.shape[1]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1)  # (Hkv, L, D)
        vs = v[start:end].transpose(0, 1)  # (Hkv, L, D)
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=0)  # (Hq, L, D)
            vs = vs.repeat_interleave(groups, dim=0)  # (Hq, L, D)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outputs.append(out.transpose(0, 1))  # (L, Hq, D)
    if not outputs:
        return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return torch.cat(outputs, dim=0)  # (N, Hq, D)
