"""Packed causal attention: every backend against a float64 dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo.engine import attention
from sdpo.engine.attention import (
    available_attention_backends,
    resolve_attention_backend,
    varlen_attention,
)

LENGTHS = [7, 1, 13, 4, 10]  # odd sizes, one single-token sequence


def _packed_inputs(lengths, *, hq, hkv, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (
        torch.randn(n, h, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for h in (hq, hkv, hkv)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu.to(device)


def _dense_reference(q, k, v, cu, window=None):
    """float64 softmax attention over the whole stream with a block-diagonal causal mask; with
    ``window``, query i sees keys i - window < j <= i (transformers' sliding window)."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    n, hq, d = q.shape
    groups = hq // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (N, Hq, D)
    v = v.repeat_interleave(groups, dim=1)  # (N, Hq, D)
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long().cpu())
    idx = torch.arange(n)
    allowed = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])  # (N, N)
    if window is not None:
        allowed &= idx[None, :] > idx[:, None] - window
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)  # (Hq, N, N)
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)  # (N, Hq, D)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 3), (4, 1)])
def test_sdpa_backend_matches_float64_dense_reference(hq, hkv):
    q, k, v, cu = _packed_inputs(LENGTHS, hq=hq, hkv=hkv, d=10, dtype=torch.float32, seed=hq)
    out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend="sdpa")
    ref = _dense_reference(q, k, v, cu)
    assert out.shape == (sum(LENGTHS), hq, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


def test_sdpa_backend_gradients_match_float64_reference():
    q, k, v, cu = _packed_inputs(LENGTHS, hq=6, hkv=2, d=8, dtype=torch.float64, seed=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    weight = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend="sdpa")
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref = _dense_reference(q, k, v, cu)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("window", [1, 5])
def test_sdpa_backend_with_a_window_matches_the_float64_band_forward_and_backward(window):
    """A window shorter than some sequences (13, 10, 7) and longer than others: each query sees
    itself and the window - 1 keys before it, as transformers masks a sliding window."""
    q, k, v, cu = _packed_inputs(LENGTHS, hq=6, hkv=2, d=8, dtype=torch.float64, seed=window)
    for t in (q, k, v):
        t.requires_grad_(True)
    weight = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = varlen_attention(
        q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend="sdpa", window=window
    )
    ref = _dense_reference(q, k, v, cu, window=window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert (out - _dense_reference(q, k, v, cu)).abs().max() > 0.1  # the window masks keys
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)
    wide = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=13, backend="sdpa", window=13)
    torch.testing.assert_close(wide, _dense_reference(q, k, v, cu), atol=1e-12, rtol=1e-12)


def _key_layout_inputs(lengths, extras, *, h, d, seed):
    """float64 q (N, H, D) and k/v (K, H, D) with separate layouts: query sequence i has
    ``lengths[i]`` rows, key sequence i ``lengths[i] + extras[i]`` (a shared prompt's keys)."""
    g = torch.Generator().manual_seed(seed)
    keys = [n + e for n, e in zip(lengths, extras, strict=True)]
    q = torch.randn(sum(lengths), h, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(keys), h, d, generator=g, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = (
        torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
        for n in (lengths, keys)
    )
    return q, k, v, cu_q, cu_k


def _bottom_right_reference(q, k, v, cu_q, cu_k, window=None):
    """float64 attention of each query sequence over its own key sequence, query i seeing keys
    j <= i + extra (extra = Lk - Lq) and, with ``window``, only j > i + extra - window."""
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        lq, lk = qs.shape[0], ks.shape[0]
        row, col = torch.arange(lq)[:, None] + (lk - lq), torch.arange(lk)[None, :]
        allowed = col <= row
        if window is not None:
            allowed &= col > row - window
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / math.sqrt(q.shape[2])  # (H, Lq, Lk)
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs))  # (Lq, H, D)
    return torch.cat(outs)


@pytest.mark.parametrize(("window", "block"), [(None, 3), (5, 3), (1, 4), (5, 1024)])
def test_sdpa_query_blocks_match_the_float64_bottom_right_band_forward_and_backward(
    monkeypatch, window, block
):
    """The masked fallback in blocks of queries (ragged: 13 queries in blocks of 3 or 4) over a
    key layout with more keys than queries (0 to 5 more), with and without a window: each query
    sees its bottom-right causal keys, the last ``window`` of them, forward and backward."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    q, k, v, cu_q, cu_k = _key_layout_inputs(LENGTHS, [3, 0, 5, 2, 0], h=3, d=8, seed=11)
    for t in (q, k, v):
        t.requires_grad_(True)
    weight = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = varlen_attention(
        q,
        k,
        v,
        cu_seqlens=cu_q,
        max_seqlen=max(LENGTHS),
        cu_seqlens_k=cu_k,
        max_seqlen_k=18,
        backend="sdpa",
        window=window,
    )
    ref = _bottom_right_reference(q, k, v, cu_q, cu_k, window=window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)


class _LargestStorage(TorchDispatchMode):
    """The bytes of the largest storage any op returns while active (a view counts its base)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize(
    ("window", "extra"),
    [(None, 0), (97, 0), (None, 41), (97, 41)],
    ids=["causal", "window", "keys", "both"],
)
def test_sdpa_fallback_holds_no_tensor_quadratic_in_a_long_sequence(monkeypatch, window, extra):
    """One 1531-token sequence (and 41 more keys than queries): no tensor of the forward or the
    backward holds half a byte per (query, key) pair. A (Lq, Lk) mask is a byte per pair, and
    SDPA's math kernel, which 3-D inputs run, holds H x Lq x Lk float scores."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 128)
    lq = 1531
    q, k, v, cu_q, cu_k = _key_layout_inputs([lq], [extra], h=2, d=8, seed=5)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    with _LargestStorage() as largest:
        out = varlen_attention(
            q,
            k,
            v,
            cu_seqlens=cu_q,
            max_seqlen=lq,
            cu_seqlens_k=cu_k if extra else None,
            max_seqlen_k=lq + extra if extra else None,
            backend="sdpa",
            window=window,
        )
        out.sum().backward()
    pairs = lq * (lq + extra)
    assert largest.nbytes < pairs / 2, (largest.nbytes, pairs)


def test_a_kernel_that_cannot_apply_a_window_is_skipped_by_auto_and_refused_by_name(monkeypatch):
    """flash-attn before 2.3 has no window_size: "auto" runs windowed attention elsewhere, a
    named "flash" is refused saying what it needs, and unwindowed attention still uses it."""

    def flash_2_2(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False
    ):
        raise AssertionError("not called")

    monkeypatch.setattr(attention, "_flash_attn_varlen_func", lambda: flash_2_2)
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: None)
    attention._flash_attn_takes_window.cache_clear()
    try:
        assert resolve_attention_backend("auto", "cuda", torch.bfloat16) == "flash"
        assert resolve_attention_backend("flash", "cuda", torch.bfloat16) == "flash"
        assert resolve_attention_backend("auto", "cuda", sliding_window=True) == "sdpa"
        with pytest.raises(ValueError, match="'flash' cannot apply a sliding window.*>= 2.3"):
            resolve_attention_backend("flash", "cuda", torch.bfloat16, sliding_window=True)
        assert available_attention_backends("cuda", sliding_window=True) == ["sdpa"]
    finally:
        attention._flash_attn_takes_window.cache_clear()


def test_bfloat16_sdpa_error_is_within_bfloat16_rounding_of_float64_truth():
    q, k, v, cu = _packed_inputs(LENGTHS, hq=4, hkv=2, d=16, dtype=torch.bfloat16, seed=5)
    out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend="auto")
    ref = _dense_reference(q, k, v, cu)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max().item() < 3e-2


def test_auto_backend_on_cpu_is_sdpa_and_unknown_backend_is_rejected():
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert available_attention_backends("cpu") == ["sdpa"]
    with pytest.raises(ValueError, match="unknown attention backend 'flsh'.*flash"):
        resolve_attention_backend("flsh", "cpu")
    with pytest.raises(ValueError, match="'flash' is not available on cpu.*CUDA"):
        resolve_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match="'varlen' is not available on cpu.*CUDA"):
        resolve_attention_backend("varlen", "cpu")


def test_cu_seqlens_not_covering_the_stream_is_rejected():
    q, k, v, cu = _packed_inputs([5, 6], hq=2, hkv=1, d=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="end at the token count 11"):
        varlen_attention(q, k, v, cu_seqlens=cu[:-1], max_seqlen=6, backend="sdpa")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        varlen_attention(q, k[:, :1].expand(-1, 3, -1), v, cu_seqlens=cu, max_seqlen=6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hq,hkv,window", [(8, 2, None), (4, 4, None), (8, 2, 37), (4, 4, 2)])
def test_every_cuda_backend_matches_float32_sdpa_in_bfloat16(hq, hkv, window):
    """With a window, flash-attn's and varlen_attn's window_size (window - 1, 0) is the band
    transformers masks (sequences of 129 and 64 tokens longer than 37, 5 and 1 shorter; a
    window of 2, where a key too many or too few would double or halve each query's keys)."""
    lengths = [37, 1, 129, 64, 5]
    q, k, v, cu = _packed_inputs(lengths, hq=hq, hkv=hkv, d=64, dtype=torch.float32, device="cuda")
    weight = torch.randn_like(q)
    ref = _dense_reference(q, k, v, cu, window=window)
    ref_grads = None
    for backend in available_attention_backends("cuda", sliding_window=window is not None):
        qb, kb, vb = (t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v))
        out = varlen_attention(
            qb, kb, vb, cu_seqlens=cu, max_seqlen=max(lengths), backend=backend, window=window
        )
        assert out.shape == q.shape and out.dtype == torch.bfloat16, backend
        err = (out.double() - ref).abs().max().item()
        assert err < 3e-2, f"{backend}: max abs error {err} vs float64"
        grads = torch.autograd.grad((out.float() * weight).sum(), (qb, kb, vb))
        if ref_grads is None:
            q32, k32, v32 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            out32 = varlen_attention(
                q32, k32, v32, cu_seqlens=cu, max_seqlen=max(lengths), backend="sdpa", window=window
            )
            ref_grads = torch.autograd.grad((out32 * weight).sum(), (q32, k32, v32))
        for name, g, r in zip("qkv", grads, ref_grads):
            scale = r.abs().max().item()
            gerr = (g.float() - r).abs().max().item()
            assert gerr < 3e-2 * max(scale, 1.0), f"{backend}: d{name} error {gerr}"
