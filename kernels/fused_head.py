"""The reference (scoring) pass with the lm_head matmul fused into the logsumexp: no logits.

Why it exists: the chunked reference pass of linear_logprobs.py writes each chunk's logits
with cuBLAS and reads them back with a row kernel; benchmarks/RESULTS.md measured it at
1.155x (V=32,000) / 1.192x (V=128,256) of the 2·N·H·V matmul floor on an H100
(N=16,384, H=4,096, bf16), against a 1.10x target. Here,
as in Cut Cross-Entropy, the logits live only in registers: each tile of ``hidden @ W^T``
is reduced into a running logsumexp the moment its K-loop ends.

What it owns: ``fused_token_logprobs`` (per-token log-prob and lse) and
``fused_sequence_logprobs`` (per-sequence sums), forward only (no-grad). Training uses
``sequence_logprobs`` / ``linear_pair_loss``; this is for the reference cache, whose numbers
must agree with the training forward on the same weights (tests check it against float64
truth and against ``sequence_logprobs``). Triton is imported at module top: import this
module only where Triton is installed (on a CPU-only torch build, ``sdpo.kernels`` sets
``TRITON_INTERPRET=1`` first, and the kernel then runs interpreted, slowly, for tests).

Design:

1. ``_fused_head_kernel``: a 1-D grid of ``cdiv(N, BLOCK_M) · SPLITS`` programs; program
   ``pid`` is the pair (m, s) = (pid // SPLITS, pid % SPLITS): BLOCK_M token rows and the
   s-th contiguous slice of the vocabulary's BLOCK_N tiles (tiles ``[s·T/S, (s+1)·T/S)``,
   T = cdiv(V, BLOCK_N), so slices differ by at most one tile and none is empty). For each
   tile it runs a K-loop over H in BLOCK_K steps, ``tl.dot`` of the (BLOCK_M, BLOCK_K)
   hidden block with the transposed (BLOCK_N, BLOCK_K) weight block, fp32 accumulator; then
   an online-softmax update in fp32 (running max ``m`` of the logits ``x = acc`` and running
   ``sum exp2((x - m)·log2(e))`` per row: the max is subtracted in natural units, exactly near
   the max, so large logits get no rounding bias), and the label's logit where the row's label
   falls in the tile. It writes per-(split, row) partial max and sum, and the label logit from
   the one split whose slice holds the label (so no race and no (S, N) array for it).
2. ``_combine``: torch ops on the (S, N) partials: ``lse = M + log Σ_s sum_s ·
   e^(m_s - M)``, ``token_logp = label_logit - lse`` (0 where label == -100).

Tails: a vocabulary tile past V reads clamped (valid) weight rows and adds a -inf bias to
those columns, so they vanish from max and sum; token rows past N read clamped rows and are
not stored; an H that is not a multiple of BLOCK_K masks the last K step (``EVEN_K`` skips
the mask when it divides).

Why the split-fastest order (s varies fastest with pid): the programs resident at one time
(about one per SM) then cover few row blocks and every split. Each program re-reads its
BLOCK_M × H hidden block once per vocabulary tile (the GEMM reuse pattern); with
N=16,384, BLOCK_M=128 and 17 splits, the ~132 resident programs hold ~8 hidden blocks
(~8 MiB bf16), which stay in the 50 MiB L2 and are read from HBM about once, and the ~8
programs of one split read the same weight tile at about the same time. The other order
(rows fastest) would put all 128 hidden blocks (128 MiB) in flight and make the hidden
re-reads HBM traffic.

Splits (``num_splits``): cdiv(16 · SMs, cdiv(N, 128)) slices, i.e. ~16 waves of programs at
BLOCK_M=128, capped so that every slice holds at least one tile of the widest config. The
count trades two costs: the last wave's ragged end idles about half a program per SM, a
fraction ≈ 1/(2 · waves) of the run (3% at 16 waves, 6% at 8), while each split's weight
slice is read from HBM once per group of resident row blocks, ≈ N·S/(128·SMs) times in all
(16 times at 17 splits: 4.2 GB for V=32,000, ~0.7 TB/s over the run, well under HBM
bandwidth). It does not depend on the tuned config, so the partial buffers have one shape
and autotuning's repeated launches overwrite them whole. ``splits=`` overrides it (the
benchmark can sweep it).

Expected on an H100 (NOT YET MEASURED; the GPU timing is owed): the matmul dominates
(2·N·H·V FLOP); the per-tile epilogue (a bias add, a row max, a subtraction, a multiply, exp2
and a row sum per logit,
plus the label compare/select) is ~2-4K cycles against a ~65K-cycle K-loop for a 128×256
tile at H=4,096, so the kernel should land near Triton's own GEMM efficiency on these
shapes. Whether that is within 1.10x of cuBLAS is the open question: a pointer-based
Triton GEMM on Hopper may fall short of cuBLAS by itself, which is why the 128×256×64
configs (the usual best Hopper GEMM tile) are in the autotune list; if it falls short,
TMA tensor descriptors for the two operand loads are the next step. Memory: the (S, N) fp32 partials (2 · 17 · 16,384 · 4 B ≈ 2.2 MB) and
three (N,) vectors; nothing of size V·N.

Checked without a GPU (Triton 3.9 compiling for sm_90, bf16, H a multiple of 64): every
config lowers the dot to asynchronous wgmma fed by a cp.async pipeline of 16-byte loads,
with no register spills (128×256 at 8 warps uses 255 registers), also with an H that is not a
multiple of BLOCK_K (masked loads, still pipelined). With an H that is not a multiple of 16
elements the rows are unaligned: the loads are not pipelined and every config spills; correct
but slower, and no common model has such an H. ``benchmarks/kernel_resources.py`` compiles every
config × EVEN_K × dtype this way and reports registers, spills and shared memory (numbers in
benchmarks/RESULTS.md): bf16/fp16 all fit sm_90. fp32 has its own configs (``FP32_CONFIGS``,
BLOCK_K = 32), because at BLOCK_K = 64 most tiles exceed shared memory or spill under "ieee".

fp32 inputs use ``input_precision="ieee"`` unless ``torch.get_float32_matmul_precision()``
allows TF32, so the numbers follow the same setting as torch's fp32 matmul in the chunked
pass.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dispatch import compiler_disabled
from .logprobs import (
    IGNORE_INDEX,
    _flatten_hint,
    check_head_shapes,
    check_labels_in_vocab,
    check_packed_shapes,
    check_seq_ids_in_range,
    sum_per_sequence,
)
from .triton_rows import FLOAT32_LOWEST, launch, on_device

LOG2E = tl.constexpr(1.4426950408889634)  # a global a @triton.jit kernel may read


# Hopper-friendly tiles (NOT YET MEASURED: chosen from first principles, the autotuner picks
# per (V, H, dtypes) on the first call). 128×256×64 with 8 warps is the classic H100 GEMM
# tile (highest arithmetic intensity per smem byte); 128×128 and 64×256 trade intensity for
# registers left to the epilogue; 3-4 stages of (BLOCK_M + BLOCK_N) × 64 bf16 fit the
# 227 KiB of shared memory (128×256, 4 stages = 192 KiB is the largest; configs that do not
# fit are discarded by the autotuner).
def _tile_configs(block_k: int, tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) at one BLOCK_K."""
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k}, num_warps=w, num_stages=st
        )
        for bm, bn, w, st in tiles
    ]


CONFIG_BLOCK_K = 64
CONFIGS = _tile_configs(
    CONFIG_BLOCK_K,
    [
        (128, 256, 8, 3),
        (128, 256, 8, 4),
        (128, 128, 8, 4),
        (128, 128, 4, 4),
        (64, 256, 8, 4),
        (128, 64, 4, 4),
        (64, 128, 4, 3),
    ],
)

# fp32 operands take twice the shared memory per pipeline stage and, under "ieee" (FMA, no
# tensor cores), more registers: with BLOCK_K = 64 five of the seven configs above exceed
# sm_90's 227 KiB under tf32 and three collapse to 32 registers with ~38 KB of spills per
# thread under ieee (benchmarks/kernel_resources.py). Their own list, at BLOCK_K = 32, all fit
# (48-96 KiB) and none spills under either precision (Triton 3.9, sm_90, ahead of time).
FP32_CONFIG_BLOCK_K = 32
FP32_CONFIGS = _tile_configs(
    FP32_CONFIG_BLOCK_K,
    [(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 8, 4), (64, 128, 4, 3), (64, 64, 4, 4)],
)

# Under the CPU interpreter the cost is per block operation, not per element, and there is
# nothing to tune: one config with wide vocabulary tiles, and BLOCK_K = 16 so that small
# test hidden sizes (e.g. 24) exercise the K tail.
INTERPRETER_TILES = {"BLOCK_M": 128, "BLOCK_N": 4096, "BLOCK_K": 16}
INTERPRETER_SPLITS = 3

# Splits rule constants (see the module docstring). A slice holds at least one tile of the
# widest config, so no config ever sees an empty slice.
SPLIT_REF_BLOCK_M = 128
SPLIT_TARGET_WAVES = 16
MAX_CONFIG_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS + FP32_CONFIGS)


@triton.jit
def _fused_head_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    part_max_ptr,
    part_sum_ptr,
    label_logit_ptr,
    N,
    V,
    H,
    SPLITS,
    stride_hn,
    stride_wv,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IGNORE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // SPLITS  # split fastest: resident programs share few hidden blocks
    # int64: split s's partials start at s·N, past 2^31 at N·SPLITS > 2^31 (e.g. 32k tokens
    # under a pinned splits of 65,536), and s·T, T the tile count, can pass it too
    pid_s = (pid % SPLITS).to(tl.int64)
    num_tiles = tl.cdiv(V, BLOCK_N)
    tile_lo = (pid_s * num_tiles // SPLITS).to(tl.int32)
    tile_hi = ((pid_s + 1) * num_tiles // SPLITS).to(tl.int32)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # Rows past N read row (r % N), a valid row; their results are never stored.
    h_rows = (rows % N).to(tl.int64)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=IGNORE).to(tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # Running max in natural units, sums of base-2 exponentials. A finite start keeps
    # exp2((m - m_new) * log2(e)) defined on the first tile; the lowest finite float, so that
    # a row whose logits all lie below some bound (such as -1e30) still gets its own max and a
    # sum of at least 1, not a sum of 0 and an lse of -inf.
    m_i = tl.full((BLOCK_M,), FLOAT32_LOWEST, tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    label_logit = tl.zeros((BLOCK_M,), tl.float32)

    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_N + offs_n
        # Columns past V read row (c % V) of W and get a -inf bias below.
        w_rows = (cols % V).to(tl.int64)
        h_ptrs = h_ptr + h_rows[:, None] * stride_hn + offs_k[None, :]
        w_ptrs = w_ptr + w_rows[:, None] * stride_wv + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            if EVEN_K:
                h_blk = tl.load(h_ptrs)
                w_blk = tl.load(w_ptrs)
            else:
                k_ok = offs_k < H - k * BLOCK_K
                h_blk = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
                w_blk = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(h_blk, tl.trans(w_blk), acc, input_precision=DOT_PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        # The label first, so that acc is dead once x exists (registers: a 128×256 fp32
        # accumulator is already 128 per thread at 8 warps).
        hit = cols[None, :] == labels[:, None]
        label_logit += tl.sum(tl.where(hit, acc, 0.0), axis=1)
        bias = tl.where(cols < V, 0.0, -float("inf"))
        x = acc + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        # Subtract the max in natural units, then scale to base 2: x - m is exact near the
        # max, where a max of x·log2(e) would be rounded at |x|·2^-24 and bias every lse.
        p = tl.exp2((x - m_new[:, None]) * LOG2E)
        s_i = s_i * tl.exp2((m_i - m_new) * LOG2E) + tl.sum(p, axis=1)
        m_i = m_new

    tl.store(part_max_ptr + pid_s * N + rows, m_i, mask=row_ok)
    tl.store(part_sum_ptr + pid_s * N + rows, s_i, mask=row_ok)
    # Exactly one split's slice holds each valid label: only that program writes it.
    slice_lo = tile_lo * BLOCK_N
    slice_hi = tile_hi * BLOCK_N
    mine = row_ok & (labels >= slice_lo) & (labels < slice_hi)
    tl.store(label_logit_ptr + rows, label_logit, mask=mine)


_fused_head_tuned = triton.autotune(configs=CONFIGS, key=["V", "H"])(_fused_head_kernel)
_fused_head_tuned_fp32 = triton.autotune(configs=FP32_CONFIGS, key=["V", "H"])(_fused_head_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(*, num_tokens: int, vocab_size: int, sm_count: int) -> int:
    """Vocabulary slices per row block: ~16 waves of programs at BLOCK_M=128, >= 1 tile each."""
    row_blocks = triton.cdiv(num_tokens, SPLIT_REF_BLOCK_M)
    want = triton.cdiv(SPLIT_TARGET_WAVES * sm_count, row_blocks)
    return max(1, min(want, triton.cdiv(vocab_size, MAX_CONFIG_BLOCK_N)))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    check_head_shapes(hidden, weight)
    supported = (torch.float32, torch.bfloat16, torch.float16)
    if hidden.dtype not in supported or weight.dtype not in supported:
        raise TypeError(
            f"hidden and weight must be float32, bfloat16 or float16, got {hidden.dtype} and "
            f"{weight.dtype}"
        )
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, "
            f"{weight.device}, {labels.device}"
        )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise RuntimeError(
            "fused_head is the no-grad reference pass and has no backward; call it under "
            "torch.no_grad() (or on detached tensors), or use sdpo.kernels.sequence_logprobs "
            "/ linear_pair_loss for a differentiable pass"
        )


def _partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    splits: int,
    tiles: dict[str, int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel: (S, N) partial max and sum, and (N,) label logits.

    ``tiles`` None: autotuned over CONFIGS (FP32_CONFIGS for fp32 inputs); a dict of
    BLOCK_M/BLOCK_N/BLOCK_K runs exactly that.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    part_max = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    label_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    # labels are read at offset i: a strided view (e.g. a column of a wider tensor) is copied
    args = (hidden, weight, labels.contiguous(), part_max, part_sum, label_logit, n, v, h, splits)
    args += (hidden.stride(0), weight.stride(0))
    consts = dict(DOT_PRECISION=_dot_precision(hidden.dtype), IGNORE=IGNORE_INDEX)
    if tiles is None:
        fp32 = hidden.dtype == torch.float32
        tuned = _fused_head_tuned_fp32 if fp32 else _fused_head_tuned
        block_k = FP32_CONFIG_BLOCK_K if fp32 else CONFIG_BLOCK_K
        kernel = launch(tuned, hidden.device)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]) * splits,)

        # the autotuner's timing runs (and its cache-flush buffer) are under the guard too
        with on_device(hidden.device):
            kernel[grid](*args, EVEN_K=h % block_k == 0, **consts)
    else:
        kernel = launch(_fused_head_kernel, hidden.device)
        grid = (triton.cdiv(n, tiles["BLOCK_M"]) * splits,)
        with on_device(hidden.device):
            kernel[grid](*args, EVEN_K=h % tiles["BLOCK_K"] == 0, **consts, **tiles)
    return part_max, part_sum, label_logit


def _combine(
    part_max: torch.Tensor, part_sum: torch.Tensor, label_logit: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logp, lse) from the per-split partials (natural units)."""
    top = part_max.amax(dim=0)  # (N,)
    log_total = torch.log((part_sum * torch.exp(part_max - top)).sum(dim=0))  # (N,)
    # (label - top) - log total: exact near the max however large it is, where top + log total
    # alone rounds at |top| 2^-24 (as the row kernels form it)
    token_logp = torch.where(labels != IGNORE_INDEX, (label_logit - top) - log_total, 0.0)
    return token_logp, top + log_total


def _check_tiles(tiles: dict[str, int]) -> None:
    if set(tiles) != {"BLOCK_M", "BLOCK_N", "BLOCK_K"}:
        raise ValueError(f"tiles must name BLOCK_M, BLOCK_N and BLOCK_K exactly, got {tiles}")
    for name, size in tiles.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"tiles[{name!r}] = {size}: tl.dot needs a power of two >= 16")


@compiler_disabled
def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tiles: dict[str, int] | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(token_logps (N,), lse (N,))`` in fp32 of ``hidden @ weight.T``, no logits.

    hidden (N, H) and weight (V, H) in float32, bfloat16 or float16, any row strides
    (computed in their promoted dtype, fp32 accumulation); labels (N,) int64 or int32,
    ``labels[i]`` the token that ``hidden[i]`` predicts, -100 for tokens not scored (their
    log-prob is 0; their lse is still computed). ``token_logps[i] = logits[i, labels[i]] -
    lse[i]`` with ``lse[i] = logsumexp(logits[i])``. No-grad only. On CUDA the kernel is
    autotuned per (V, H, dtypes) on its first call; ``tiles`` ({"BLOCK_M", "BLOCK_N",
    "BLOCK_K"}) pins the tile sizes instead, and ``splits`` the number of vocabulary slices
    (default: :func:`num_splits` on CUDA, ``INTERPRETER_SPLITS`` on CPU; capped at the
    number of vocabulary tiles so that no slice is empty).

    Not a custom op: ``torch.compile`` graph-breaks around it (the label range check reads
    values, and under the CPU interpreter the kernel cannot be traced at all), so a compiled
    caller runs it eagerly; with ``fullgraph=True`` that break is an error.
    """
    _check_inputs(hidden, weight, labels)
    if labels.shape != (hidden.shape[0],):
        raise ValueError(
            f"labels must be ({hidden.shape[0]},) (one per token), got {tuple(labels.shape)}"
            + _flatten_hint(labels)
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    check_labels_in_vocab(labels, vocab_size=weight.shape[0])
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if tiles is None and hidden.device.type == "cpu":
        tiles = INTERPRETER_TILES
    if tiles is not None:
        _check_tiles(tiles)
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    # Last dimension contiguous (the kernel steps K by 1); rows may be strided.
    hidden = hidden.to(dtype)
    weight = weight.to(dtype)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    if splits is None:
        if hidden.device.type == "cuda":
            # the tensors' GPU, which need not be the current one (a tensor's device has an index)
            sms = _sm_count(hidden.device.index)
            splits = num_splits(num_tokens=n, vocab_size=v, sm_count=sms)
        else:
            splits = INTERPRETER_SPLITS
    widest = tiles["BLOCK_N"] if tiles is not None else MAX_CONFIG_BLOCK_N
    splits = min(splits, triton.cdiv(v, widest))  # no empty slice under any config
    with torch.no_grad():
        part_max, part_sum, label_logit = _partials(
            hidden, weight, labels, splits=splits, tiles=tiles
        )
        return _combine(part_max, part_sum, label_logit, labels)


@compiler_disabled
def fused_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
) -> torch.Tensor:
    """(S,) fp32 summed log-probs of ``labels`` per packed sequence; the fused reference pass.

    Same contract as ``sequence_logprobs`` under ``torch.no_grad`` (labels already shifted,
    -100 = not scored, ``seq_ids[i]`` in [0, num_seqs) names token i's sequence), computed
    without writing any logits to memory, for float32, bfloat16 and float16 inputs. No-grad
    only; a compiled caller graph-breaks around it, as around :func:`fused_token_logprobs`.
    """
    _check_inputs(hidden, weight, labels)
    check_packed_shapes(labels, seq_ids, hidden.shape[0], num_seqs=num_seqs, device=hidden.device)
    check_seq_ids_in_range(seq_ids, num_seqs)
    token_logp, _ = fused_token_logprobs(hidden, weight, labels)
    return sum_per_sequence(token_logp, seq_ids, num_seqs)
