"""Throughput benchmarks for sdpo: where every performance claim in benchmarks/RESULTS.md comes from.

Each section is a subcommand that measures its own baselines and the bf16 matmul ceiling in
the same run (numbers from different runs or cards are not compared), then prints a table
and, with ``--json PATH``, writes the same rows as JSON.

    python benchmarks/throughput.py kernels [--json out.json]   # the log-prob head, H100 shapes
    python benchmarks/throughput.py kernels --smoke             # tiny shapes on CPU (CI)
    python benchmarks/throughput.py step [--sdpo-run] [--compare-trl] [--json out.json]
    python benchmarks/throughput.py step --smoke                # tiny model on CPU (CI)
    torchrun --nproc-per-node N benchmarks/throughput.py step [--fsdp] [--json out.json]
    torchrun --nproc-per-node 2 benchmarks/throughput.py step --smoke   # two gloo ranks (CI)
    python benchmarks/throughput.py prep [--data DIR] [--json out.json]  # CPU work before step 1
    python benchmarks/throughput.py prep --smoke                # 30 pairs, seconds (CI)

``kernels``: lm_head matmul + log-softmax + label gather + per-sequence sum + a DPO sigmoid
loss against fixed reference values, forward and backward, for N=16,384 tokens (8 sequences
of 2,048 = 4 pairs), H=4,096, V in {32,000, 128,256}, bf16. Variants: PyTorch eager (fp32
logits), torch.compile of the same, sdpo's ``sequence_logprobs`` (recomputing backward) and
``linear_pair_loss`` (gradients formed in the forward; fp32 and bf16 accumulation of dW), and
Liger-Kernel's LigerFusedLinearDPOLoss when importable. Also the no-grad reference pass.
The floor is the matmul work (6·N·H·V FLOP with grad, 2·N·H·V without) at the measured
bf16 matmul rate; "extra peak" is the peak allocated memory above the inputs, gradient
buffers included.

``step``: whole DPO training steps (packing, forward, fused loss, backward, clipping, AdamW)
of a random-init model of a preset shape (``llama-1b-32k``: Llama-3.2-1B shapes with a 32k
vocabulary, the anchor's 1.10 B; ``mistral-7b-8l``: Mistral-7B layers, 8 of them; ``tiny``)
on synthetic pairs of the anchor's lengths (prompt 128, completions uniform in 448-896),
4 pairs per optimizer step. It reports steady-state real tokens/s (2·prompt + chosen +
rejected; warm-up and compilation excluded; no syncs inside the timed loop), MFU against the
bf16 matmul ceiling measured in the same run (FLOPs as in ``model_flops``), peak GPU memory,
the scoring (reference) pass's tokens/s and a phase breakdown from a separate instrumented
loop. ``--sdpo-run`` times a whole 2-step sDPO run (score chunk 1, train, score chunk 2,
train) against its training alone; ``--compare-trl`` runs TRL's DPOTrainer
(``precompute_ref_log_probs=True``) on the same weights and pairs in the same process
afterwards and prints the tokens/s and peak-memory ratios.

``prep``: the CPU work ``sdpo train`` does before its first step, on synthetic data of the
sDPO paper's shape (12,859 OpenOrca-like plain pairs and 60,829 UltraFeedback-like chat pairs,
prompts of ~100-200 words, answers of ~150-280, log-normal; a 32k BPE tokenizer with byte
fallback and a Metaspace pre-tokenizer trained on the same synthetic text, named LlamaTokenizer
as Llama 2's and SOLAR's folders are, with SOLAR's chat template): a fresh interpreter's
``import sdpo.runner``, reading and validating each source, rendering the chat template,
``tokenize_pairs``, partition and batch plans, then ``load_pairs`` as the runner calls it with
the token cache cold and warm. It prints a sha256 of the token ids, so two versions of the code
can be checked to give the same ids.

``step`` under torchrun (``WORLD_SIZE`` > 1; ``kernels`` runs in one process only): every rank
joins the group (``distributed.init_from_env``: NCCL on ``cuda:LOCAL_RANK``, gloo with
``--smoke``), builds the same model and pairs, and trains as ``sdpo train`` does under torchrun:
data parallel (gradient all-reduce overlapped with the backward; ``--no-overlap-grad-reduce``:
one all-reduce after it) or, with ``--fsdp``, sharded (FSDP2, ``train.fsdp``). The trainer
shares each optimizer step's micro-batches (or, with fewer micro-batches than ranks, its pairs)
out over the ranks, so ``--pairs-per-step`` is the global step size (default 4 per GPU: 4·N).
The scoring pass shares the pairs the same way. Each timed window starts and ends with a device
sync and a barrier, so its length is the slowest rank's; the rows give global real tokens/s,
tokens/s per GPU, MFU per GPU (an equal 1/N of the FLOPs over that window against the matmul
ceiling measured on each GPU in the same run: median as ``mfu``, ``mfu_min``) and peak memory
(max over ranks as ``peak_gb``, ``peak_gb_min``), with each rank's own values (seconds, its
share of the tokens, ceiling, MFU, peak, losses) under ``ranks``; the header names
``world_size``, ``backend`` and ``mode`` (``single``, ``dp`` or ``fsdp``). Rank 0 alone prints
and writes the JSON. ``--sdpo-run`` runs on every rank (scoring and training shared as in
``sdpo train``); ``--compare-trl`` is refused (TRL is measured in one process). A rank that
fails raises (it never skips a collective its peers wait in), says so on stderr, and torchrun
ends the others.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdpo.engine import distributed, sharding
from sdpo.engine.files import atomic_write_json
from sdpo.engine.profiling import profile_summary
from sdpo.kernels import linear_pair_loss, resolve_impl, sequence_logprobs

IGNORE_INDEX = -100
BETA = 0.1

# ----------------------------------------------------------------------------------------
# Shared measurement helpers (used by every section)
# ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on a CPU."""

    device: torch.device
    warmup: int = 2
    iters: int = 5

    def phases(self, run: Callable[[Callable[[], None]], None]) -> list[float]:
        """Median ms per phase; ``run(mark)`` calls ``mark()`` at each phase boundary."""
        samples: list[list[float]] = []
        for i in range(self.warmup + self.iters):
            marks: list = []
            if self.device.type == "cuda":

                def mark(marks=marks):
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    marks.append(event)

                run(mark)
                torch.cuda.synchronize()
                times = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
            else:

                def mark(marks=marks):
                    marks.append(time.perf_counter())

                run(mark)
                times = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
            if i >= self.warmup:
                samples.append(times)
        return [statistics.median(col) for col in zip(*samples)]


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, *, size: int, timer: Timer
) -> float:
    """Achieved TFLOP/s of a size³ matmul in ``dtype``: the ceiling the floors are measured at."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run(mark):
        mark()
        torch.mm(a, b)
        mark()

    (ms,) = timer.phases(run)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def release_memory(device: torch.device) -> None:
    """Free what earlier measurements left on the GPU (reference cycles collected, the cache
    emptied). Nothing on the CPU: there memory is not measured, and a full collection there
    takes a tenth of a second or more in a large process, per call, for nothing."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    release_memory(device)
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_above(device: torch.device, base: int) -> float | None:
    """GB of peak allocated memory above ``base`` (None on CPU, where it is not tracked)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def say(*values, **kwargs) -> None:
    """``print`` on rank 0 only (under torchrun every rank runs the same code; a plain run is a
    world of one, its rank 0)."""
    if distributed.is_main():
        print(*values, **kwargs)


def print_table(rows: list[dict], columns: list[str], *, file=sys.stdout) -> None:
    """Rows as a text table (on rank 0 only)."""
    if not distributed.is_main():
        return

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("-+-".join("-" * w for w in widths), file=file)
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def run_header(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }


# ----------------------------------------------------------------------------------------
# Section: kernels (the log-prob head)
# ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class HeadProblem:
    """Inputs of one log-prob head measurement: a packed batch of whole pairs."""

    hidden: torch.Tensor  # (N, H) leaf, requires grad
    weight: torch.Tensor  # (V, H) leaf, requires grad
    labels: torch.Tensor  # (N,) -100 on prompt tokens and each sequence's last token
    seq_ids: torch.Tensor  # (N,)
    ref: torch.Tensor  # (S,) fixed reference log-probs
    num_seqs: int
    seq_len: int

    @property
    def flops_floor(self) -> int:
        n, h = self.hidden.shape
        return 6 * n * h * self.weight.shape[0]


def make_head_problem(
    *, num_seqs: int, seq_len: int, hidden: int, vocab: int, dtype, device, seed: int = 0
) -> HeadProblem:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = num_seqs * seq_len
    labels = torch.randint(0, vocab, (num_seqs, seq_len), generator=gen)
    labels[:, : seq_len // 4] = IGNORE_INDEX  # prompt
    labels[:, -1] = IGNORE_INDEX
    h = (torch.randn(n, hidden, generator=gen)).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device=device, dtype=dtype)
    return HeadProblem(
        hidden=h.requires_grad_(True),
        weight=w.requires_grad_(True),
        labels=labels.reshape(-1).to(device),
        seq_ids=torch.arange(num_seqs).repeat_interleave(seq_len).to(device),
        ref=(torch.randn(num_seqs, generator=gen) * 5 - 3.0 * seq_len).to(device),
        num_seqs=num_seqs,
        seq_len=seq_len,
    )


def dpo_sigmoid(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(BETA * margin).sum()


def eager_head_loss(p: HeadProblem, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch head: fp32 logits, log_softmax, gather, per-sequence sum."""
    logits = (h @ w.t()).float()  # (N, V) fp32
    logp = (
        torch.log_softmax(logits, dim=-1).gather(1, p.labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    )
    logp = torch.where(p.labels != IGNORE_INDEX, logp, 0.0)
    seq = torch.zeros(p.num_seqs, device=logp.device).index_add(0, p.seq_ids, logp)
    return dpo_sigmoid(seq[0::2], seq[1::2], p.ref[0::2], p.ref[1::2])


def head_variants(
    p: HeadProblem, *, impl: str, smoke: bool, chunk_sweep: Sequence[int] = ()
) -> dict[str, Callable[[], torch.Tensor] | str]:
    """name -> zero-arg loss function, or a string saying why the variant is skipped."""
    variants: dict[str, Callable[[], torch.Tensor] | str] = {}
    h, w = p.hidden, p.weight
    variants["torch eager"] = lambda: eager_head_loss(p, h, w)
    if smoke:
        variants["torch.compile"] = "skipped in --smoke (compile time)"
    else:
        compiled = torch.compile(eager_head_loss, dynamic=False)
        variants["torch.compile"] = lambda: compiled(p, h, w)

    def seq_variant():
        seq = sequence_logprobs(h, w, p.labels, p.seq_ids, p.num_seqs, impl=impl)
        return dpo_sigmoid(seq[0::2], seq[1::2], p.ref[0::2], p.ref[1::2])

    def pair_loss(chosen, rejected, pairs: slice):
        return dpo_sigmoid(chosen, rejected, p.ref[0::2][pairs], p.ref[1::2][pairs])

    # the host-side plan the trainer passes (no device sync): tokens of each pair
    pair_tokens = [2 * p.seq_len] * (p.num_seqs // 2)

    def pair_variant(grad_weight_dtype, max_chunk_tokens=None, chunk_tokens=None, stats=False):
        def run():
            loss, *_ = linear_pair_loss(
                h,
                w,
                p.labels,
                p.seq_ids,
                p.num_seqs,
                pair_loss=pair_loss,
                impl=impl,
                grad_weight_dtype=grad_weight_dtype,
                pair_tokens=pair_tokens,
                max_chunk_tokens=max_chunk_tokens,
                chunk_tokens=chunk_tokens,
                with_stats=stats,
            )
            return loss

        return run

    variants[f"sdpo sequence_logprobs ({impl})"] = seq_variant
    variants[f"sdpo linear_pair_loss ({impl}, dW fp32)"] = pair_variant(torch.float32)
    # as the trainer runs it: with the token metrics (entropy, mean logit, top-1) from the same
    # pass; the difference to the row above is their cost
    variants[f"sdpo linear_pair_loss ({impl}, dW fp32, token metrics)"] = pair_variant(
        torch.float32, stats=True
    )
    variants[f"sdpo linear_pair_loss ({impl}, dW in weight dtype)"] = pair_variant(None)
    # pairs split into chunks of at most a quarter pair: less memory, 2·(L−B)·H·V more FLOP
    cap = max(1, p.seq_len // 2)
    variants[f"sdpo linear_pair_loss ({impl}, dW fp32, max_chunk_tokens={cap})"] = pair_variant(
        torch.float32, cap
    )
    # the chunk rule's measurement: the same loss with other chunk sizes (whole pairs each)
    for tokens in chunk_sweep:
        variants[f"sdpo linear_pair_loss ({impl}, dW fp32, chunk_tokens={tokens})"] = pair_variant(
            torch.float32, chunk_tokens=tokens
        )
    variants["liger LigerFusedLinearDPOLoss"] = liger_variant(p, smoke=smoke)
    return variants


def liger_variant(p: HeadProblem, *, smoke: bool) -> Callable[[], torch.Tensor] | str:
    """Liger's chunked DPO loss (reference-free: same work as with precomputed references)."""
    if smoke:
        return "skipped in --smoke"
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as exc:
        return f"not importable ({exc.__class__.__name__})"
    try:
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, ignore_index=IGNORE_INDEX)
    except TypeError as exc:
        return f"constructor changed: {exc}"
    s, t, hid = p.num_seqs, p.seq_len, p.hidden.shape[1]
    # Liger wants (2B, T, H) with the B chosen rows first: a leaf of its own in that layout.
    order = torch.cat([torch.arange(0, s, 2), torch.arange(1, s, 2)]).to(p.labels.device)
    x = p.hidden.detach().view(s, t, hid)[order].contiguous().requires_grad_(True)
    target = p.labels.view(s, t)[order].contiguous()
    w = p.weight

    def run():
        out = loss_fn(w, x, target)
        return out[0] if isinstance(out, tuple) else out

    run.extra_leaves = (x,)  # type: ignore[attr-defined]
    return run


def measure_head(fn: Callable[[], torch.Tensor], p: HeadProblem, *, timer: Timer) -> dict:
    leaves = (p.hidden, p.weight, *getattr(fn, "extra_leaves", ()))

    def clear():
        for leaf in leaves:
            leaf.grad = None

    def run(mark):
        clear()
        mark()
        loss = fn()
        mark()
        loss.backward()
        mark()

    fwd, bwd = timer.phases(run)
    clear()
    base = reset_peak(timer.device)
    fn().backward()
    extra = peak_above(timer.device, base)
    clear()
    return {"fwd_ms": fwd, "bwd_ms": bwd, "total_ms": fwd + bwd, "extra_peak_gb": extra}


def error_text(exc: BaseException) -> str:
    """One line for a variant's ``error`` cell: the exception's class and first line."""
    lines = str(exc).splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:200] if lines else ''}"


def measure_reference_pass(p: HeadProblem, *, impl: str, timer: Timer) -> list[dict]:
    rows = []

    def ours():
        sequence_logprobs(p.hidden, p.weight, p.labels, p.seq_ids, p.num_seqs, impl=impl)

    def fused():
        from sdpo.kernels.fused_head import fused_sequence_logprobs

        fused_sequence_logprobs(p.hidden, p.weight, p.labels, p.seq_ids, p.num_seqs)

    def eager():
        logits = (p.hidden @ p.weight.t()).float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, p.labels.clamp(min=0).unsqueeze(1))
        torch.zeros(p.num_seqs, device=logp.device).index_add(0, p.seq_ids, logp.squeeze(1))

    passes = [(f"reference pass: sdpo sequence_logprobs ({impl})", ours)]
    if impl == "triton":  # one Triton kernel: lm_head tiles + online logsumexp + label gather
        passes.append(("reference pass: sdpo fused_head (triton)", fused))
    passes.append(("reference pass: torch eager", eager))
    for name, fn in passes:
        with torch.no_grad():

            def run(mark, fn=fn):
                mark()
                fn()
                mark()

            try:
                (ms,) = timer.phases(run)
                base = reset_peak(timer.device)
                fn()
                row = {
                    "variant": name,
                    "fwd_ms": ms,
                    "total_ms": ms,
                    "extra_peak_gb": peak_above(timer.device, base),
                }
                if fn is fused and timer.device.type == "cuda":
                    from sdpo.kernels import fused_head

                    best = getattr(fused_head._fused_head_tuned, "best_config", None)
                    row["config"] = str(best) if best is not None else None
                rows.append(row)
            except Exception as exc:  # as for the head variants: OOM, API drift, a compile error
                rows.append({"variant": name, "error": error_text(exc)})
    return rows


def kernels_section(args: argparse.Namespace) -> dict:
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [dict(num_seqs=8, seq_len=12, hidden=32, vocab=v) for v in (97, 1031)]
        timer = Timer(device=device, warmup=1, iters=2)
        matmul_size = 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "throughput.py kernels needs a CUDA device; use --smoke for the CPU check"
            )
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [dict(num_seqs=8, seq_len=2048, hidden=4096, vocab=v) for v in args.vocab]
        timer = Timer(device=device, warmup=args.warmup, iters=args.iters)
        matmul_size = 8192
    impl = resolve_impl(args.impl, device)
    tflops = measure_matmul_tflops(device, dtype, size=matmul_size, timer=timer)
    print(f"matmul ceiling: {tflops:.1f} TFLOP/s ({matmul_size}^3, {dtype})", flush=True)
    header = {
        "section": "kernels",
        **run_header(device),
        "dtype": str(dtype),
        "matmul_tflops": tflops,
        "smoke": args.smoke,
    }
    results = []

    def save_partial(rows: list[dict]) -> None:
        """The rows so far, so that a run cut short (a timeout, a crash) still leaves them."""
        if args.json:
            payload = {**header, "results": results + rows, "complete": False}
            atomic_write_json(args.json, payload)

    for shape in shapes:
        p = make_head_problem(dtype=dtype, device=device, **shape)
        n, h, v = p.hidden.shape[0], p.hidden.shape[1], p.weight.shape[0]
        floor_ms = p.flops_floor / (tflops * 1e12) * 1e3
        ref_floor = floor_ms / 3
        grad_floor_gb = (v * h + n * h) * p.hidden.element_size() / 1e9
        rows: list[dict] = []

        def add(row: dict, floor: float) -> None:
            if "total_ms" in row:
                row["x_floor"] = row["total_ms"] / floor
            rows.append({**row, "vocab": v, "tokens": n, "hidden": h})  # noqa: B023 (this shape's)

        add(
            {
                "variant": "floor (6NHV at matmul rate)",
                "total_ms": floor_ms,
                "extra_peak_gb": grad_floor_gb,
            },
            floor_ms,
        )
        variants = head_variants(p, impl=impl, smoke=args.smoke, chunk_sweep=args.chunk_tokens)
        for name, fn in variants.items():
            if isinstance(fn, str):
                add({"variant": name, "error": fn}, floor_ms)
                continue
            try:
                add({"variant": name, **measure_head(fn, p, timer=timer)}, floor_ms)
            except Exception as exc:  # one failing variant (OOM, API drift) must not end the run
                add({"variant": name, "error": error_text(exc)}, floor_ms)
            save_partial(rows)
            print(f"  V={v} {name}: {rows[-1]}", flush=True)
            release_memory(device)
        add(
            {"variant": "reference floor (2NHV)", "total_ms": ref_floor, "extra_peak_gb": 0.0},
            ref_floor,
        )
        for row in measure_reference_pass(p, impl=impl, timer=timer):
            add(row, ref_floor)
        print(f"\nN={n} H={h} V={v} {dtype} impl={impl}")
        print_table(
            rows, ["variant", "fwd_ms", "bwd_ms", "total_ms", "x_floor", "extra_peak_gb", "error"]
        )
        print(flush=True)
        results.extend(rows)
        save_partial([])
        del p
        release_memory(device)
    return {**header, "results": results, "complete": True}


# ----------------------------------------------------------------------------------------
# Section: step (a whole DPO training step, end to end)
# ----------------------------------------------------------------------------------------

# Model shapes (random init, no downloads). Llama-3.2-1B ties its embeddings, which with a 32k
# vocabulary gives 1.04 B parameters; the anchor run's 1.10 B is the same shape untied, so the
# preset is untied (``--tie-embeddings`` switches). Mistral-7B at 8 of its 32 layers keeps the
# per-layer shapes while full fine-tuning (weights, grads, AdamW states) fits one 80 GB card.
STEP_PRESETS: dict[str, dict] = {
    "llama-1b-32k": {
        "model_type": "llama",
        "vocab_size": 32_000,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500_000.0,
        "max_position_embeddings": 131_072,
        "tie_word_embeddings": False,
    },
    "mistral-7b-8l": {
        "model_type": "mistral",
        "vocab_size": 32_000,
        "hidden_size": 4096,
        "intermediate_size": 14_336,
        "num_hidden_layers": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 32_768,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}

# Token ids of the synthetic pairs follow engine.tiny.build_tokenizer's vocabulary (the one the
# TRL comparison tokenizes with): <bos> = 1, <eos> = 2, and plain words from id 8 on.
BOS_ID, EOS_ID, FIRST_WORD_ID = 1, 2, 8

# Defaults of the anchor workload, and of --smoke (CPU, seconds).
ANCHOR_LENGTHS = {"prompt_len": 128, "completion_min": 448, "completion_max": 896}
SMOKE_LENGTHS = {"prompt_len": 8, "completion_min": 5, "completion_max": 13}


def step_model_config(args: argparse.Namespace):
    from sdpo.engine.model import ModelConfig

    d = dict(STEP_PRESETS[args.preset])
    if args.layers is not None:
        d["num_hidden_layers"] = args.layers
    if args.tie_embeddings is not None:
        d["tie_word_embeddings"] = args.tie_embeddings == "yes"
    return ModelConfig.from_hf_dict(d)


def synthetic_pairs(
    count: int,
    *,
    vocab_size: int,
    prompt_len: int,
    completion_min: int,
    completion_max: int,
    seed: int,
    first_index: int = 0,
) -> list:
    """``count`` pairs of random word ids: a <bos>-led prompt of ``prompt_len`` tokens and two
    completions of uniform length in [completion_min, completion_max], <eos> included."""
    from sdpo.engine.packing import TokenizedPair

    if vocab_size <= FIRST_WORD_ID:
        raise ValueError(
            f"vocab_size must exceed {FIRST_WORD_ID} (the special ids), got {vocab_size}"
        )
    gen = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(FIRST_WORD_ID, vocab_size, (n,), generator=gen).tolist()

    def completion() -> list[int]:
        n = int(torch.randint(completion_min, completion_max + 1, (1,), generator=gen))
        return words(n - 1) + [EOS_ID]

    return [
        TokenizedPair(
            index=first_index + i,
            prompt_ids=[BOS_ID, *words(prompt_len - 1)],
            chosen_ids=completion(),
            rejected_ids=completion(),
            source="synthetic",
        )
        for i in range(count)
    ]


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: every projection plus the lm_head (the
    embedding lookup is not a matmul; with tied embeddings the shared matrix counts once)."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return config.num_hidden_layers * per_layer + config.vocab_size * h


def attention_square(length: int, window: int | None) -> int:
    """The query-key pairs ``model_flops`` counts for one sequence of ``length`` tokens in one
    layer: the full ``length``² square without a window (the convention's: no causal halving),
    and with one the band of that square within ``window`` of the diagonal, ``|i - j| <
    window``, which is the pairs the causal window attends to (query i sees keys
    ``i - window < j <= i``: min(i + 1, window) of them) mirrored the same way: twice their
    number less the diagonal. A window of ``length`` or more is the full square."""
    if window is None or window >= length:
        return length * length
    attended = window * (window + 1) // 2 + (length - window) * window
    return 2 * attended - length


def model_flops(pairs: list, config, *, training: bool, lora: bool = False) -> float:
    """FLOPs of one pass over ``pairs``, by the common convention (PaLM appendix B, nanoGPT):
    2·P per token forward (6·P with backward), P = ``matmul_params``, plus attention scores
    and values 4·L·A·s per token forward (12·L·A·s with backward) for a token in a sequence of
    length s, A = heads·head_dim, the full s×s square counted (no causal halving). A layer
    with a sliding window w (``config.layer_window``) counts the band of that square within w
    of the diagonal instead (``attention_square``), so a windowed model's MFU is not credited
    with keys its queries never see; every other layer, and every layer of a model without a
    window, counts the square as before. A pair counts its prompt once per completion (the
    unshared layout's work, also under ``--share-prompt``).
    ``lora``: the frozen weights get no gradient, so a training pass is 4·P per token (forward
    and input gradients; the adapter's own rank-r matmuls are not counted), attention as above."""
    factor = 3 if training else 1
    matmul_factor = 2 if training and lora else factor
    width = config.num_attention_heads * config.head_dim
    p = matmul_params(config)
    windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    tokens = 0
    square = 0
    for pair in pairs:
        for completion in (pair.chosen_ids, pair.rejected_ids):
            s = len(pair.prompt_ids) + len(completion)
            tokens += s
            square += sum(attention_square(s, w) for w in windows)
    return matmul_factor * 2 * p * tokens + factor * 4 * width * square


def real_tokens(pairs: list) -> int:
    """2·prompt + chosen + rejected per pair: the tokens the model really runs (no padding)."""
    return sum(p.num_tokens for p in pairs)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def sync_ranks(device: torch.device) -> None:
    """Wait for this rank's queued device work, then for every rank (a barrier under torchrun,
    a collective): a window between two calls lasts until the slowest rank is done, so its
    length is the slowest rank's time on every rank."""
    synchronize(device)
    distributed.barrier()
    synchronize(device)


def across_ranks(per_rank: list[dict], *, tokens: int, flops: float) -> dict:
    """One timed window over all ranks (``per_rank``: each rank's ``seconds``, ``peak_gb`` and
    ``matmul_tflops``, in rank order). Global tokens/s use the slowest rank's seconds; MFU per
    GPU is an equal share of the window's FLOPs (``flops / world``) over that time, against the
    matmul ceiling measured on that GPU in this run (min and median over ranks); peak memory
    is reported as the max and min over ranks. A world of one gives the single-GPU numbers."""
    world = len(per_rank)
    seconds = max(r["seconds"] for r in per_rank)
    for r in per_rank:
        r["mfu"] = flops / world / seconds / (r["matmul_tflops"] * 1e12)
    mfus = [r["mfu"] for r in per_rank]
    peaks = [r["peak_gb"] for r in per_rank if r["peak_gb"] is not None]
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / world,
        "mfu": statistics.median(mfus),
        "mfu_min": min(mfus),
        "peak_gb": max(peaks) if peaks else None,
        "peak_gb_min": min(peaks) if peaks else None,
        "ranks": per_rank,
    }


class PhaseRecorder:
    """Phase boundaries of training steps, recorded by hooks (CUDA events or perf_counter).

    Used only in the instrumented loop: events cost nothing on the host but reading them
    needs a sync, which the main timed loop must not have. Per micro-batch it marks the
    decoder forward (model pre/post hooks), the head (decoder output to dL/dhidden: the loss
    and, on the fused path, the lm_head gradients formed in the forward), the decoder backward
    (to the embedding gradient's accumulation, the last of the backward; with LoRA the first
    adapter matrix's) and per step the
    optimizer (grad clipping + AdamW, to the optimizer's step post-hook).

    Under torchrun each rank records its own steps. Data parallel: the optimizer phase also
    holds the wait for the gradient buckets still in flight after the backward (and, without
    overlap, the whole all-reduce). Sharded (FSDP2 runs the hook once it has written the
    reduce-scattered gradient): the decoder backward holds the layers' gathers and
    reduce-scatters up to the root's, which is the last."""

    PHASES = ("decoder_fwd_ms", "head_ms", "decoder_bwd_ms", "optimizer_ms", "other_ms")
    SPANS = {  # end mark: (start mark, phase)
        "fwd_end": ("fwd_start", "decoder_fwd_ms"),
        "bwd_start": ("fwd_end", "head_ms"),
        "bwd_end": ("bwd_start", "decoder_bwd_ms"),
        "opt_end": ("bwd_end", "optimizer_ms"),
    }

    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device) -> None:
        self.device = device
        self.marks: list[tuple[str, object]] = []
        # the end of the backward: the first trainable parameter's gradient (the embedding;
        # with LoRA the first layer's first adapter matrix, one of the last few gradients)
        first = next(p for p in model.parameters() if p.requires_grad)
        self.handles = [
            model.register_forward_pre_hook(self._forward_start),
            model.register_forward_hook(self._forward_end),
            first.register_post_accumulate_grad_hook(lambda _p: self.mark("bwd_end")),
            optimizer.register_step_post_hook(lambda _o, _a, _k: self.mark("opt_end")),
        ]

    def mark(self, label: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def _forward_start(self, module, args) -> None:
        if torch.is_grad_enabled():
            self.mark("fwd_start")

    def _forward_end(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        self.mark("fwd_end")
        if output.requires_grad:
            output.register_hook(self._backward_start)

    def _backward_start(self, grad) -> None:
        self.mark("bwd_start")

    def _ms(self, a, b) -> float:
        if self.device.type == "cuda":
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def step_phases(self) -> dict[str, float]:
        """ms per phase of the step marked since the last call (call after a sync)."""
        marks, self.marks = self.marks, []
        out = dict.fromkeys(self.PHASES, 0.0)
        last: dict[str, object] = {}
        # a phase runs from the last mark of its start label (none on a rank that got no
        # micro-batch in the step: its time stays in other_ms)
        for label, value in marks:
            if label in self.SPANS and self.SPANS[label][0] in last:
                begin, phase = self.SPANS[label]
                out[phase] += self._ms(last[begin], value)
            last[label] = value
        out["step_ms"] = self._ms(last["step_start"], last["opt_end"])
        out["other_ms"] = out["step_ms"] - sum(out[k] for k in self.PHASES[:-1])
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure_scoring(
    model,
    pairs: list,
    *,
    precision: str,
    max_tokens: int,
    impl: str,
    device: torch.device,
    share_prompt: bool = False,
):
    """(PairLogps, seconds): the no-grad reference pass over ``pairs``, after a warm-up batch
    (which also compiles the no-grad graph of the layers). Under torchrun every rank scores its
    shard (``score_pairs``) and the seconds are the slowest rank's (``sync_ranks``)."""
    from sdpo.engine.scoring import score_pairs

    kwargs = {
        "max_tokens_per_batch": max_tokens,
        "impl": impl,
        "precision": precision,
        "share_prompt": share_prompt,
    }
    # the warm-up gives every rank pairs of its own to score (and to compile for)
    score_pairs(model, pairs[: max(distributed.world(), len(pairs) // 8)], **kwargs)
    sync_ranks(device)
    start = time.perf_counter()
    ref = score_pairs(model, pairs, **kwargs)
    sync_ranks(device)
    return ref, time.perf_counter() - start


def measure_sdpo_run(
    model,
    *,
    chunks: list[list],
    train_config,
    loss_fn,
    score_tokens: int,
    impl: str,
    device: torch.device,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    token_metrics: bool = True,
) -> dict:
    """A whole stepwise run in process: for each chunk, score it with the current model (the
    reference values of that step), then train on it with a fresh trainer (``fit``); with
    ``lora_rank`` a fresh adapter per chunk, merged after its training (as the runner does).
    Under torchrun every rank runs it (scoring and training shared as in ``sdpo train``) and
    each time is the slowest rank's (``sync_ranks``).

    ``ratio_total_over_train`` counts the reference passes only (each chunk scored once, by the
    model it trains from). ``sdpo train`` scores more, and those passes are timed too, outside
    that ratio: for an easy-to-hard partition or with report scoring the initial model scores
    every pair, so the later chunks are scored by it as well (``initial_extra_s``; a random or
    given partition without report scoring skips it, and pays ``ratio_total_over_train``); with
    ``sdpo.report_scoring`` (its default) each step scores its chunk again after training
    (``report_s``). The ratios
    ``ratio_runner_no_report`` and ``ratio_runner_default`` add them: what a 2-step run of
    ``sdpo train`` pays, apart from loading and checkpoints."""
    from sdpo.engine.lora import attach_lora, merge_lora
    from sdpo.engine.scoring import score_pairs
    from sdpo.engine.trainer import DPOTrainer

    def timed_score(pairs):
        sync_ranks(device)
        start = time.perf_counter()
        logps = score_pairs(
            model,
            pairs,
            max_tokens_per_batch=score_tokens,
            impl=impl,
            precision=train_config.precision,
            share_prompt=train_config.share_prompt,
        )
        sync_ranks(device)
        return logps, time.perf_counter() - start

    score_s, train_s, report_s = [], [], []
    initial_extra_s = 0.0
    for t, chunk in enumerate(chunks):
        ref, seconds = timed_score(chunk)
        score_s.append(seconds)
        if t == 0:  # the initial model's pass over the later chunks (partition, report)
            for later in chunks[1:]:
                initial_extra_s += timed_score(later)[1]
        sync_ranks(device)
        t1 = time.perf_counter()
        if lora_rank:
            attach_lora(model, rank=lora_rank, alpha=lora_alpha, seed=len(train_s))
        trainer = DPOTrainer(
            model,
            config=train_config,
            loss_fn=loss_fn,
            kernels_impl=impl,
            progress=False,
            token_metrics=token_metrics,
        )
        result = trainer.fit(chunk, ref)
        if lora_rank:
            merge_lora(model)
        sync_ranks(device)
        train_s.append(time.perf_counter() - t1)
        del trainer
        if not math.isfinite(result.last_metrics.get("loss", float("nan"))):
            raise FloatingPointError(f"sDPO run: non-finite loss {result.last_metrics}")
        report_s.append(timed_score(chunk)[1])  # reward accuracy after the step
    total, train = sum(score_s) + sum(train_s), sum(train_s)
    no_report = total + initial_extra_s
    return {
        "sdpo_steps": len(chunks),
        "score_s": score_s,
        "train_s": train_s,
        "total_s": total,
        "ratio_total_over_train": total / train,
        "initial_extra_s": initial_extra_s,
        "report_s": report_s,
        "ratio_runner_no_report": no_report / train,
        "ratio_runner_default": (no_report + sum(report_s)) / train,
    }


def build_word_tokenizer(out_dir: str, vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids (engine.tiny's builder): id i >= 8 is
    the word ``w<i>``, so a text of those words tokenizes back to the same ids."""
    import transformers

    from sdpo.engine.tiny import SPECIAL_TOKENS, TEMPLATE_WORDS, build_tokenizer

    if len(SPECIAL_TOKENS) + len(TEMPLATE_WORDS) != FIRST_WORD_ID:
        raise RuntimeError("engine.tiny's reserved ids changed; update FIRST_WORD_ID")
    build_tokenizer(out_dir, words=[f"w{i}" for i in range(FIRST_WORD_ID, vocab_size)])
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"word tokenizer has {len(tokenizer)} ids, wanted {vocab_size}")
    return tokenizer


def pairs_as_text(pairs: list, tokenizer) -> dict[str, list[str]]:
    """The pairs as prompt/chosen/rejected texts that ``tokenizer`` maps back to the same ids
    (checked on the first pair, including how the tokenizer handles <bos>)."""
    adds_bos = tokenizer("w8")["input_ids"][:1] == [BOS_ID]

    def text(ids: list[int]) -> str:
        parts = []
        for i in ids:
            parts.append(tokenizer.convert_ids_to_tokens(i) if i < FIRST_WORD_ID else f"w{i}")
        return " ".join(parts)

    def completion(ids: list[int]) -> str:
        # <eos> glued to the last word: TRL appends the EOS token text the same way.
        body = " ".join(f"w{i}" for i in ids[:-1])
        return (" " + body if body else "") + tokenizer.eos_token

    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for pair in pairs:
        prompt_ids = pair.prompt_ids[1:] if adds_bos else pair.prompt_ids
        rows["prompt"].append(text(prompt_ids))
        rows["chosen"].append(completion(pair.chosen_ids))
        rows["rejected"].append(completion(pair.rejected_ids))
    first = pairs[0]
    got_prompt = tokenizer(rows["prompt"][0])["input_ids"]
    got_full = tokenizer(rows["prompt"][0] + rows["chosen"][0])["input_ids"]
    if got_prompt != first.prompt_ids or got_full != first.prompt_ids + first.chosen_ids:
        raise RuntimeError(
            "the word tokenizer does not reproduce the synthetic token ids "
            f"(prompt {got_prompt[:5]}... vs {first.prompt_ids[:5]}...)"
        )
    if tokenizer.eos_token_id != EOS_ID:
        raise RuntimeError(f"tokenizer eos id {tokenizer.eos_token_id} != {EOS_ID}")
    return rows


def hf_model_from_state(config, state: dict, *, dtype: torch.dtype, device: torch.device):
    """A transformers model of the same architecture holding exactly ``state``'s weights, with
    SDPA attention, parameters in ``dtype`` and the rotary tables left in fp32 (as a
    ``from_pretrained(dtype=...)`` load leaves them: a blanket ``.to(dtype)`` would round the
    rotary frequencies to ``dtype``)."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    hf_config.use_cache = False
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation="sdpa"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(
            f"state dict does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"{type(model).__name__} has parameters in {wrong}, wanted {dtype}")
    return model


# What the TRL comparison runs: ``warmup`` steps, then the ``steps`` timed batches twice (the
# first pass sees each batch's shapes for the first time, the repeat pass has seen them all),
# then ``profile`` steps under torch.profiler. Batches are drawn in order (no shuffling), so
# TRL's step k trains on exactly the pairs of sdpo's step k.
TRL_PASSES = ("first_pass", "repeat_pass")

# Environment variables that change how CUDA, the allocator or attention behave; recorded with
# the TRL row when set, since they would explain a slow baseline.
TRL_ENV_VARS = (
    "CUDA_LAUNCH_BLOCKING",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_NO_CUDA_MEMORY_CACHING",
    "TORCH_CUDNN_SDPA_DEPRIORITIZED",
    "TRITON_INTERPRET",
    "OMP_NUM_THREADS",
)


def trl_dataset_rows(pairs: list, *, pairs_per_step: int, warmup: int, steps: int, profile: int):
    """The pairs of the TRL run in the order its steps consume them (see TRL_PASSES), and the
    step windows ``{name: (first global step, last global step + 1)}``."""
    need = pairs_per_step * (warmup + steps)
    if len(pairs) < need:
        raise ValueError(f"need {need} pairs for {warmup} + {steps} steps, got {len(pairs)}")
    timed = pairs[pairs_per_step * warmup : need]
    rows = (
        pairs[:need] + timed + (timed * (profile // max(steps, 1) + 1))[: pairs_per_step * profile]
    )
    windows = {
        "first_pass": (warmup, warmup + steps),
        "repeat_pass": (warmup + steps, warmup + 2 * steps),
        "profile": (warmup + 2 * steps, warmup + 2 * steps + profile),
    }
    return rows, windows


def sdpa_backend_probe(config, *, batch: int, seq_len: int, device: torch.device) -> dict:
    """The SDPA backend torch picks (training: inputs require grad) for the two calls a
    transformers Llama makes: with a padding mask the grouped K/V heads are first repeated to
    contiguous (B, H, T, D) tensors; without one it passes ``enable_gqa`` and ``is_causal``.
    q, k, v are views of (B, T, heads, D) projections, as in the model."""
    if device.type != "cuda" or not hasattr(torch, "_fused_sdp_choice"):
        return {}
    from torch.nn.attention import SDPBackend

    h, kv_h, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def projection(heads: int) -> torch.Tensor:  # (B, T, heads, D) viewed as (B, heads, T, D)
        x = torch.randn(batch, seq_len, heads, d, device=device, dtype=torch.bfloat16)
        return x.requires_grad_().transpose(1, 2)

    q, k = projection(h), projection(kv_h)
    repeated = k.repeat_interleave(h // kv_h, dim=1).contiguous()
    mask = torch.ones(seq_len, seq_len, device=device, dtype=torch.bool).tril()
    calls = {
        "padded_batch": ((q, repeated, repeated), {"attn_mask": mask.expand(batch, 1, -1, -1)}),
        "no_padding": ((q, k, k), {"is_causal": True, "enable_gqa": True}),
    }
    out: dict = {"cudnn": torch.backends.cudnn.version()}
    for name, (tensors, kwargs) in calls.items():
        try:
            choice = torch._fused_sdp_choice(*tensors, **kwargs)
            out[name] = SDPBackend(choice).name
        except Exception as exc:  # an API change here must not lose the timings
            out[name] = f"{exc.__class__.__name__}: {str(exc)[:80]}"
    try:  # cuDNN first means a graph build per new (batch, length) shape, forward and backward
        out["priority"] = [SDPBackend(b).name for b in torch._C._get_sdp_priority_order()]
    except Exception as exc:
        out["priority"] = f"{exc.__class__.__name__}: {str(exc)[:80]}"
    return out


def profile_train_steps(step: Callable, step_args: list[tuple], *, device: torch.device) -> dict:
    """``step(*a)`` for each ``a`` in ``step_args`` under torch.profiler (host ops, and device
    kernels on CUDA), summarised by ``profile_summary``; a profiler failure is reported, not
    raised."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        synchronize(device)
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for a in step_args:
                step(*a)
            synchronize(device)
        wall_s = time.perf_counter() - start
        return profile_summary(prof, steps=len(step_args), wall_s=wall_s)
    except Exception as exc:  # a profiler API change must not lose the timings
        return {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}


def print_profile(name: str, prof: dict, *, timed_ms: float | None = None) -> None:
    """Where a profiled step's time went: wall and device-busy time per step, then the top
    device kernels and host ops. ``timed_ms``: the same step timed without the profiler (the
    device's busy time over it says how much of a real step the device works; the rest is
    host overhead the GPU waits on)."""
    if "error" in prof:
        print(f"  {name} profile failed: {prof['error']}", flush=True)
        return
    line = (
        f"\n  {name} profile ({prof['steps']} steps): {prof['wall_ms_per_step']:.1f} ms/step wall"
    )
    if prof.get("device_busy_fraction") is not None:
        busy = prof["device_busy_ms_per_step"]
        line += f", device busy {busy:.1f} ms ({prof['device_busy_fraction']:.0%})"
        if timed_ms:
            line += f", {busy / timed_ms:.0%} of the unprofiled {timed_ms:.1f} ms step"
    print(line, flush=True)
    for title, key in (("device kernels", "device_kernels"), ("host ops", "host_ops")):
        if prof.get(key):
            print(f"  {title} (self time per step):")
            print_table(prof[key], ["name", "ms_per_step", "calls_per_step"])


def trl_compare(
    *,
    config,
    init_state: dict,
    pairs: list,
    our_ref: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    """TRL's DPOTrainer on the same weights, pairs and pairs per step, in this process, set up
    as a TRL user tuning for speed would: bf16 parameters (AdamW states in the parameter dtype)
    with TRL's default bf16 autocast, SDPA attention, ``precompute_ref_log_probs=True``, no
    evaluation, logging, saving or NaN filtering of the logged loss, and gradient checkpointing
    off unless ``--trl-gradient-checkpointing`` (the anchor run's 22.8 GB is TRL without it).

    Steps draw the pairs in order, so TRL trains on exactly sdpo's batches (TRL_PASSES): after
    the warm-up the timed batches run twice. tokens/s is the repeat pass's (every batch shape
    seen before, as in a long run); the first pass is reported beside it, so a cost paid per
    new shape shows as their ratio. The precompute pass, the dataset preparation and the
    warm-up are outside the timed windows; a sync only at each window's ends (per-step times
    from CUDA events). Real tokens are the ``attention_mask`` sums of the batches each timed
    step trained on, checked equal to the pairs' 2·prompt + chosen + rejected (so truncation
    or a tokenizer mismatch fails loudly); padded tokens are reported beside them.
    ``--trl-profile-steps N`` adds N steps under torch.profiler (kernels and host ops).
    ``our_ref`` (2, P) holds our scoring pass's chosen/rejected log-probs of ``pairs``, compared
    with TRL's precomputed ones. Returns a dict with ``error`` set instead of raising when TRL
    is missing or its API differs."""
    try:
        import datasets
        import transformers
        import trl
    except ImportError as exc:
        return {"error": f"trl comparison skipped: {exc.__class__.__name__}: {exc}"}

    import os
    import tempfile

    on_cuda = device.type == "cuda"
    pps, warmup, steps = args.pairs_per_step, args.warmup_steps, args.steps
    profile_steps = args.trl_profile_steps or 0
    tmp = tempfile.TemporaryDirectory(prefix="sdpo-trl-")
    try:
        datasets.disable_progress_bars()
        rows, windows = trl_dataset_rows(
            pairs, pairs_per_step=pps, warmup=warmup, steps=steps, profile=profile_steps
        )
        tokenizer = build_word_tokenizer(tmp.name + "/tokenizer", config.vocab_size)
        dataset = datasets.Dataset.from_dict(pairs_as_text(rows, tokenizer))
        dtype = torch.bfloat16 if on_cuda else torch.float32
        model = hf_model_from_state(config, init_state, dtype=dtype, device=device)

        batches: list[tuple[int, torch.Tensor, tuple]] = []  # (step, real tokens, padded shape)

        class InOrderDPOTrainer(trl.DPOTrainer):
            """TRL's trainer drawing batches in dataset order and noting what each step got."""

            def _get_train_sampler(self, *a, **k):
                dataset = a[0] if a else k.get("train_dataset", self.train_dataset)
                return torch.utils.data.SequentialSampler(dataset)

            def training_step(self, model, inputs, *a, **k):
                # a device-side sum: no host sync inside the timed steps
                mask = inputs["attention_mask"]
                batches.append((self.state.global_step, mask.sum(), tuple(mask.shape)))
                return super().training_step(model, inputs, *a, **k)

        clock = TrlStepClock(windows=windows, device=device)

        class ClockCallback(transformers.TrainerCallback):
            def on_train_begin(self, targs, state, control, **kw):
                if on_cuda:  # the peak of training alone, not of the precompute pass
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, targs, state, control, **kw):
                clock.step_begin(state.global_step)

            def on_step_end(self, targs, state, control, **kw):
                clock.step_end(state.global_step - 1)  # counted up before this event

        options = {
            "output_dir": tmp.name + "/out",
            "per_device_train_batch_size": pps,
            "gradient_accumulation_steps": 1,
            "max_steps": warmup + 2 * steps + profile_steps,
            "learning_rate": args.lr,
            "lr_scheduler_type": "constant",
            "beta": 0.1,
            "precompute_ref_log_probs": True,
            "max_length": args.prompt_len + args.completion_max,
            "bf16": on_cuda,
            "use_cpu": not on_cuda,
            "gradient_checkpointing": bool(args.trl_gradient_checkpointing),
            "logging_strategy": "no",
            "logging_nan_inf_filter": False,  # its isnan/isinf check syncs twice per step
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "dataloader_pin_memory": on_cuda,
            "seed": args.seed,
        }
        if args.trl_pad_to_multiple_of:
            options["pad_to_multiple_of"] = args.trl_pad_to_multiple_of
        dpo_args = trl.DPOConfig(**options)
        setup_start = time.perf_counter()
        trainer = InOrderDPOTrainer(
            model=model,
            args=dpo_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ClockCallback()],
        )
        setup_s = time.perf_counter() - setup_start
        # Same weights and tokens on both sides: TRL's precomputed reference log-probs must
        # match our scoring pass up to the precision of the sums.
        n = len(pairs)
        trl_ref = torch.stack(
            [
                torch.tensor(trainer.train_dataset["ref_chosen_logps"][:n], dtype=torch.float64),
                torch.tensor(trainer.train_dataset["ref_rejected_logps"][:n], dtype=torch.float64),
            ]
        )
        ref_diff = float((trl_ref - our_ref.to(torch.float64)).abs().max())
        trainer.train()
        peak = peak_gb(device)
        clock.check_complete()

        # Tokens per step, from the batches the steps trained on, against the pairs.
        real = [0] * (warmup + 2 * steps + profile_steps)
        padded, length = [0] * len(real), [0] * len(real)
        for step, mask_sum, shape in batches:
            real[step] += int(mask_sum)
            padded[step] += shape[0] * shape[1]
            length[step] = max(length[step], shape[1])
        for step, got in enumerate(real):
            want = real_tokens(rows[step * pps : (step + 1) * pps])
            if got != want:
                raise RuntimeError(
                    f"TRL step {step} trained on {got} real tokens, its pairs hold {want} "
                    "(truncation or a tokenizer mismatch)"
                )
        passes = {}
        for name in TRL_PASSES:
            first, stop = windows[name]
            seconds = clock.window_s[name]
            tokens = sum(real[first:stop])
            passes[name] = {
                "tokens_per_s": tokens / seconds,
                "ms_per_step": seconds / steps * 1e3,
                "step_ms": [clock.step_ms(k) for k in range(first, stop)],
                "padded_len": length[first:stop],
                "tokens": tokens,
                "padded_tokens": sum(padded[first:stop]),
            }
        steady = passes["repeat_pass"]
        result = {
            "variant": f"TRL {trl.__version__} DPOTrainer (precompute_ref_log_probs)",
            "tokens_per_s": steady["tokens_per_s"],
            "ms_per_step": steady["ms_per_step"],
            "peak_gb": peak,
            "setup_s": setup_s,
            **passes,
            "first_over_repeat_ms": passes["first_pass"]["ms_per_step"] / steady["ms_per_step"],
            "tokens_timed": steady["tokens"],
            "padding_fraction": 1 - steady["tokens"] / steady["padded_tokens"],
            "gradient_checkpointing": bool(dpo_args.gradient_checkpointing),
            "optim": str(dpo_args.optim),
            "bf16_autocast": bool(dpo_args.bf16),
            "param_dtype": str(next(model.parameters()).dtype),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "pad_to_multiple_of": args.trl_pad_to_multiple_of,
            "transformers": transformers.__version__,
            "ref_logps_max_abs_diff": ref_diff,
            "env": {k: os.environ[k] for k in TRL_ENV_VARS if k in os.environ},
            **clock.allocator_report(),
        }
        if on_cuda:
            result["sdpa_backend"] = sdpa_backend_probe(
                config, batch=2 * pps, seq_len=max(steady["padded_len"]), device=device
            )
        if clock.profile is not None:
            result["profile"] = clock.profile
        print_trl_summary(result)
        del trainer, model
        return result
    except Exception as exc:  # TRL API drift must not end the benchmark
        return {
            "error": f"trl comparison failed: {exc.__class__.__name__}: {str(exc)[:300]}",
            "traceback": traceback.format_exc(limit=8),
        }
    finally:
        release_memory(device)
        tmp.cleanup()


class TrlStepClock:
    """Times the TRL run's windows (``{name: (first step, stop step)}``, see TRL_PASSES): a
    device sync and a wall-clock read at each window's ends only, per-step times from CUDA
    events (the wall clock on CPU), the caching allocator's counters over the timed windows and
    torch.profiler over the ``profile`` window. Driven by a TrainerCallback in ``trl_compare``
    (``step_begin``/``step_end`` with the index of the optimizer step)."""

    def __init__(self, *, windows: dict[str, tuple[int, int]], device: torch.device) -> None:
        self.windows = {name: w for name, w in windows.items() if w[1] > w[0]}
        self.device = device
        self.window_s: dict[str, float] = {}
        self.profile: dict | None = None
        self._start: dict[str, float] = {}
        self._marks: dict[int, list] = {}
        self._alloc: dict[str, dict] = {}
        self._profiler = None

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _synced_now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def step_begin(self, step: int) -> None:
        for name, (first, _stop) in self.windows.items():
            if step != first:
                continue
            if name == "profile":
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._profiler = torch.profiler.profile(activities=activities)
                self._profiler.start()
            elif self.device.type == "cuda":
                self._alloc.setdefault("start", torch.cuda.memory_stats())
            self._start[name] = self._synced_now()
        self._marks[step] = [self._mark()]

    def step_end(self, step: int) -> None:
        self._marks[step].append(self._mark())
        for name, (first, stop) in self.windows.items():
            if step != stop - 1:
                continue
            self.window_s[name] = self._synced_now() - self._start[name]
            if name != "profile":
                if self.device.type == "cuda":
                    self._alloc["end"] = torch.cuda.memory_stats()
                continue
            self._profiler.stop()
            try:
                self.profile = profile_summary(
                    self._profiler, steps=stop - first, wall_s=self.window_s[name]
                )
            except Exception as exc:  # a profiler API change must not lose the timings
                self.profile = {"error": f"{exc.__class__.__name__}: {exc}"}

    def check_complete(self) -> None:
        missing = sorted(set(self.windows) - set(self.window_s))
        if missing:
            raise RuntimeError(f"TRL stopped before the step windows {missing} finished")

    def step_ms(self, step: int) -> float:
        begin, end = self._marks[step]
        if self.device.type == "cuda":
            return begin.elapsed_time(end)
        return (end - begin) * 1e3

    def allocator_report(self) -> dict:
        """The CUDA caching allocator over the timed windows: retries (every cached block freed,
        then a synchronising retry) and device allocations/frees (cudaMalloc/cudaFree calls);
        either, per step, would explain a slow baseline."""
        if "start" not in self._alloc or "end" not in self._alloc:
            return {}
        start, end = self._alloc["start"], self._alloc["end"]
        keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")
        return {
            "allocator_timed": {k: end[k] - start.get(k, 0) for k in keys if k in end},
            "reserved_peak_gb": torch.cuda.max_memory_reserved() / 1e9,
        }


def print_trl_summary(row: dict) -> None:
    """The TRL run's own lines: both passes, padding, backend and, when profiled, where a step's
    time went."""
    first, repeat = row["first_pass"], row["repeat_pass"]
    print(
        f"  TRL first pass {first['tokens_per_s']:,.0f} tokens/s ({first['ms_per_step']:.1f} "
        f"ms/step), repeat pass {repeat['tokens_per_s']:,.0f} tokens/s "
        f"({repeat['ms_per_step']:.1f} ms/step); padding {row['padding_fraction']:.1%}; "
        f"checkpointing {row['gradient_checkpointing']}; attention "
        f"{row['attn_implementation']} {row.get('sdpa_backend', '')}; "
        f"allocator {row.get('allocator_timed', '-')}",
        flush=True,
    )
    print(f"  TRL step ms (first pass): {[round(x, 1) for x in first['step_ms']]}", flush=True)
    print(f"  TRL step ms (repeat):     {[round(x, 1) for x in repeat['step_ms']]}", flush=True)
    if row.get("profile"):
        print_profile("TRL", row["profile"])


def settle_step_args(args: argparse.Namespace, *, world: int) -> None:
    """Fill in the step section's defaults (the anchor workload on a GPU, tiny shapes with
    ``--smoke``; 4 pairs per GPU) and refuse argument combinations it cannot run, with
    SystemExit naming the fix. Needs no device: ``benchmarks/gpu_check.sh``'s commands are
    checked with it on a CPU (tests/test_gpu_check.py)."""
    if world > 1 and args.compare_trl:
        raise SystemExit(
            "--compare-trl runs in one process only (TRL's DPOTrainer is measured on one "
            "GPU): run it without torchrun"
        )
    if args.smoke:
        args.preset = "tiny" if args.preset is None else args.preset
        lengths = SMOKE_LENGTHS
        defaults = (("warmup_steps", 1), ("steps", 2), ("profile_steps", 1))
        args.precision = args.precision or "fp32"
        args.compile = False if args.compile is None else args.compile
    else:
        args.preset = args.preset or "llama-1b-32k"
        lengths = ANCHOR_LENGTHS
        defaults = (("warmup_steps", 4), ("steps", 8), ("profile_steps", 3))
        args.precision = args.precision or "bf16"
        if args.compile is None:  # transformers' model runs uncompiled (as in sdpo train)
            args.compile = args.implementation == "sdpo"
    for name, value in (*defaults, *lengths.items()):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pairs_per_step is None:  # 4 per GPU; an explicit value is the global step size
        args.pairs_per_step = 4 * world
    if not 1 <= args.completion_min <= args.completion_max or args.prompt_len < 1:
        raise SystemExit(
            "need --prompt-len >= 1 and 1 <= --completion-min <= --completion-max, got "
            f"{args.prompt_len}, {args.completion_min}, {args.completion_max}"
        )
    if args.steps < 1 or args.warmup_steps < 0 or args.profile_steps < 0:
        raise SystemExit("need --steps >= 1, --warmup-steps >= 0, --profile-steps >= 0")
    if args.pairs_per_step < 1:
        raise SystemExit(f"need --pairs-per-step >= 1, got {args.pairs_per_step}")
    if args.lora_rank < 0:
        raise SystemExit(f"need --lora-rank >= 0 (0: full fine-tuning), got {args.lora_rank}")
    if args.lora_rank and args.compare_trl:
        raise SystemExit("--compare-trl with --lora-rank is not implemented (TRL needs peft)")
    if args.lora_rank and args.fsdp:
        raise SystemExit(
            "--fsdp with --lora-rank is not implemented (sharded LoRA training, as in sdpo "
            "train): drop --fsdp to measure LoRA data parallel"
        )
    if args.activation_memory_budget is not None and not args.compile:
        raise SystemExit("--activation-memory-budget needs --compile (the compiler recomputes)")
    if args.implementation == "transformers":
        # what sdpo train refuses for a transformers model (sdpo.config.transformers_conflicts)
        refused = [
            flag
            for flag, on in (
                ("--compile", args.compile),
                ("--fsdp", args.fsdp),
                ("--share-prompt", args.share_prompt),
                ("--checkpoint-every", args.checkpoint_every != 1),
            )
            if on
        ]
        if refused:
            raise SystemExit(
                f"--implementation transformers cannot run {', '.join(refused)} (they need "
                "sdpo's decoder); add --no-compile and leave the others out"
            )


def step_precision(args: argparse.Namespace, device: torch.device) -> str:
    """``--precision`` resolved for the step section's ``device``, with the warning ``sdpo
    train`` gives (printed once, on rank 0) where the GPU only emulates the bf16 asked for: the
    tokens/s measured there are not those of bf16 arithmetic."""
    from sdpo.engine.precision import emulated_bf16_warning, resolve_precision

    precision = resolve_precision(args.precision, device)
    emulated = emulated_bf16_warning(precision, device, key="--precision")
    if emulated is not None:
        say(f"warning: {emulated}", flush=True)
    return precision


def step_section(args: argparse.Namespace) -> dict:
    from functools import partial

    from sdpo.engine.compile import compile_decoder_layers
    from sdpo.engine.lora import attach_lora, merge_lora
    from sdpo.engine.model import init_model
    from sdpo.engine.precision import parameter_dtype
    from sdpo.engine.trainer import DPOTrainer, TrainConfig, plan_steps, shard_micro_batches
    from sdpo.losses import LossConfig, dpo_loss

    # Under torchrun: join the group first (every rank then checks the same arguments and
    # fails the same way). --smoke runs on the CPU, so its group is gloo even beside GPUs.
    distributed.init_from_env(backend="gloo" if args.smoke else None)
    world, rank = distributed.world(), distributed.rank()
    settle_step_args(args, world=world)
    if args.smoke:
        device = torch.device("cpu")
        matmul_dtype, matmul_size = torch.float32, 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "throughput.py step needs a CUDA device; use --smoke for the CPU check"
            )
        device = distributed.device()  # cuda:LOCAL_RANK under torchrun
        matmul_dtype, matmul_size = torch.bfloat16, 8192
    sharded = sharding.wanted(args.fsdp)
    mode = "fsdp" if sharded else "dp" if world > 1 else "single"
    backend = torch.distributed.get_backend() if distributed.initialized() else None
    if world > 1:
        say(
            f"world {world} ({backend}), {mode}, {args.pairs_per_step} pairs per optimizer "
            f"step over all ranks ({args.pairs_per_step / world:g} per rank)",
            flush=True,
        )
        if args.pairs_per_step < world:
            say(
                f"note: {args.pairs_per_step} pairs per step for {world} ranks: "
                f"{world - args.pairs_per_step} rank(s) get no pair in a step",
                flush=True,
            )
    elif args.fsdp:
        say("note: --fsdp in one process shards nothing (as train.fsdp): plain model", flush=True)
    precision = step_precision(args, device)
    impl = resolve_impl(args.impl, device)
    config = step_model_config(args)
    timer = Timer(device=device, warmup=1, iters=3)
    tflops = measure_matmul_tflops(device, matmul_dtype, size=matmul_size, timer=timer)
    ceilings = distributed.all_gather_object(tflops)  # each GPU's own, measured side by side
    say(
        f"matmul ceiling: {tflops:.1f} TFLOP/s ({matmul_size}^3, {matmul_dtype})"
        + (f"; over {world} ranks {min(ceilings):.1f}-{max(ceilings):.1f}" if world > 1 else ""),
        flush=True,
    )

    n_params = None
    header = {
        "section": "step",
        **run_header(device),
        "smoke": args.smoke,
        "world_size": world,
        "backend": backend,
        "mode": mode,
        "overlap_grad_reduce": args.overlap_grad_reduce if mode == "dp" else None,
        "preset": args.preset,
        "model_config": config.architecture_dict(),
        "precision": precision,
        "implementation": args.implementation,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "loss_path": args.loss_path,
        "share_prompt": args.share_prompt,
        "use_weighting": args.use_weighting,
        "token_metrics": args.token_metrics,
        "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_every": args.checkpoint_every,
        "activation_memory_budget": args.activation_memory_budget,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha if args.lora_rank else None,
        "kernels_impl": impl,
        "pairs_per_step": args.pairs_per_step,  # global: over all ranks
        "prompt_len": args.prompt_len,
        "completion_range": [args.completion_min, args.completion_max],
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "matmul_tflops": tflops,  # rank 0's; every rank's in matmul_tflops_per_rank
        "matmul_tflops_per_rank": ceilings,
        "matmul_params": matmul_params(config),
        "flop_convention": "6*P_matmul (LoRA: 4*P_matmul) per token + 12*L*A*s per token "
        "(full square; a sliding layer: the band within its window), see model_flops; under "
        "torchrun MFU per GPU counts 1/world of the FLOPs",
    }
    if world > 1:
        header["command"] = f"torchrun --nproc-per-node {world} " + " ".join(sys.argv)
    results: list[dict] = []
    extra: dict = {}

    def save(complete: bool) -> dict:
        payload = {**header, "n_params": n_params, "results": results, **extra}
        payload["complete"] = complete
        if args.json and distributed.is_main():
            atomic_write_json(args.json, payload)
        return payload

    def rank_rows(**mine) -> list[dict]:
        """Every rank's values of one measurement, in rank order (a collective)."""
        return distributed.all_gather_object(
            {"rank": rank, "device": str(device), "matmul_tflops": tflops, **mine}
        )

    # -- model and data ------------------------------------------------------------------
    t0 = time.perf_counter()
    model = init_model(config, seed=args.seed, dtype=parameter_dtype(precision))
    n_params = sum(p.numel() for p in model.parameters())
    init_state = dict(model.state_dict()) if args.compare_trl else None  # CPU copies survive .to()
    if args.implementation == "transformers":  # the same weights, run by transformers' code
        from sdpo.engine.hf import PackedCausalLM

        hf = hf_model_from_state(
            config, model.state_dict(), dtype=parameter_dtype(precision), device=device
        )
        model = PackedCausalLM(hf)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
    else:
        model.to(device)
        model.gradient_checkpointing = args.gradient_checkpointing
        model.checkpoint_every = args.checkpoint_every
    if args.compile:
        compile_backend = args.compile_backend or (
            "inductor" if device.type == "cuda" else "aot_eager"
        )
        compile_decoder_layers(
            model,
            mode=args.compile_mode,
            backend=compile_backend,
            activation_memory_budget=args.activation_memory_budget,
        )
        header["compile_backend"] = compile_backend
    if sharded:  # as sdpo train does: compile the layers, then shard them (engine/sharding.py)
        sharding.shard_model(model, precision=precision)
    say(
        f"model {args.preset}: {n_params / 1e6:.1f} M parameters "
        f"({matmul_params(config) / 1e6:.1f} M in matmuls), {precision}, "
        f"init {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    total_steps = args.warmup_steps + args.steps
    # the same pairs on every rank; the trainer and the scoring pass share them out
    pairs = synthetic_pairs(
        args.pairs_per_step * total_steps,
        vocab_size=config.vocab_size,
        prompt_len=args.prompt_len,
        completion_min=args.completion_min,
        completion_max=args.completion_max,
        seed=args.seed,
    )
    train_config = TrainConfig(
        learning_rate=args.lr,
        pairs_per_step=args.pairs_per_step,
        max_tokens_per_batch=args.max_tokens_per_batch,
        shuffle=False,
        warmup_ratio=0.0,
        schedule="constant",
        precision=precision,
        loss_path=args.loss_path,
        share_prompt=args.share_prompt,
        fsdp=args.fsdp,
        overlap_grad_reduce=args.overlap_grad_reduce,
        log_every=10**9,
    )
    loss_fn = partial(dpo_loss, config=LossConfig(beta=0.1, use_weighting=args.use_weighting))

    # -- scoring (the reference pass) ----------------------------------------------------
    reset_peak(device)
    t0 = time.perf_counter()
    ref, score_s = measure_scoring(
        model,
        pairs,
        precision=precision,
        max_tokens=args.score_tokens,
        impl=impl,
        device=device,
        share_prompt=args.share_prompt,
    )
    warmup_s = time.perf_counter() - t0 - score_s
    start, end = distributed.contiguous_bounds([p.num_tokens for p in pairs], world)[rank]
    per_rank = rank_rows(
        seconds=score_s, tokens=real_tokens(pairs[start:end]), peak_gb=peak_gb(device)
    )
    scoring = across_ranks(
        per_rank, tokens=real_tokens(pairs), flops=model_flops(pairs, config, training=False)
    )
    results.append(
        {
            "variant": "sdpo scoring pass (no grad)",
            **scoring,
            "ms_per_step": max(r["seconds"] for r in per_rank) / total_steps * 1e3,
            "warmup_s": warmup_s,
        }
    )
    say(f"  {brief(results[-1])}", flush=True)
    save(False)

    # -- training steps: warm-up, then timed with no syncs -------------------------------
    lora = bool(args.lora_rank)
    if lora:  # as the runner does: the reference scored by the plain model, then the adapter
        adapter = attach_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, seed=args.seed)
        header["lora_params"] = sum(p.numel() for p in adapter)
        say(f"LoRA rank {args.lora_rank}: {header['lora_params'] / 1e6:.2f} M trained", flush=True)
    trainer = DPOTrainer(
        model,
        config=train_config,
        loss_fn=loss_fn,
        kernels_impl=impl,
        progress=False,
        token_metrics=args.token_metrics,
    )
    plan = plan_steps(pairs, train_config, epoch=0)
    reset_peak(device)
    sync_ranks(device)
    t0 = time.perf_counter()
    for micro_batches in plan[: args.warmup_steps]:
        trainer.train_step(pairs, micro_batches, ref)
    sync_ranks(device)
    warmup_s = time.perf_counter() - t0
    timed = plan[args.warmup_steps :]
    losses = []
    start = time.perf_counter()
    for micro_batches in timed:
        losses.append(trainer.train_step(pairs, micro_batches, ref)["loss"])
    sync_ranks(device)  # the window ends when the slowest rank is done
    train_s = time.perf_counter() - start
    timed_pairs = [pairs[i] for step in timed for batch in step for i in batch]
    loss_values = [float(v) for v in losses]  # summed over ranks: the same on every rank
    if not all(math.isfinite(v) for v in loss_values):
        raise FloatingPointError(f"non-finite training loss on rank {rank}: {loss_values}")
    mine = [
        i
        for step in timed
        for batch in shard_micro_batches(
            pairs,
            step,
            world_size=world,
            rank=rank,
            max_tokens=train_config.max_tokens_per_batch,
            whole_micro_batches=trainer.whole_micro_batches,
        )
        for i in batch
    ]
    per_rank = rank_rows(
        seconds=train_s,
        tokens=real_tokens([pairs[i] for i in mine]),
        peak_gb=peak_gb(device),
        losses=loss_values,
    )
    training = across_ranks(
        per_rank,
        tokens=real_tokens(timed_pairs),
        flops=model_flops(timed_pairs, config, training=True, lora=lora),
    )
    results.append(
        {
            "variant": "sdpo train step",
            **training,
            "ms_per_step": max(r["seconds"] for r in per_rank) / len(timed) * 1e3,
            "warmup_s": warmup_s,
            "losses": loss_values,
        }
    )
    results[0]["scoring_over_training_tokens_per_s"] = (
        results[0]["tokens_per_s"] / training["tokens_per_s"]
    )
    say(f"  {brief(results[-1])}", flush=True)
    save(False)

    # -- instrumented loop: where a step's time goes --------------------------------------
    if args.profile_steps:
        recorder = PhaseRecorder(model, trainer.optimizer, device)
        samples = []
        try:
            for k in range(args.profile_steps):
                micro_batches = plan[k % len(plan)]
                recorder.mark("step_start")
                trainer.train_step(pairs, micro_batches, ref)
                synchronize(device)
                samples.append(recorder.step_phases())
        finally:
            recorder.remove()
        phases = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        row = {"variant": "phases of one step (median, instrumented)", **phases}
        if world > 1:  # rank 0's phases above; every rank's here
            row["ranks"] = distributed.all_gather_object({"rank": rank, **phases})
        results.append(row)
        say(f"  {brief(results[-1])}", flush=True)
        save(False)

    # -- torch.profiler over a few steps: is the device kept busy, and by which kernels ------
    if args.torch_profile_steps:
        prof_row = profile_train_steps(
            trainer.train_step,
            [(pairs, plan[k % len(plan)], ref) for k in range(args.torch_profile_steps)],
            device=device,
        )
        timed_ms = results[1]["ms_per_step"]  # the "sdpo train step" row, timed unprofiled
        if prof_row.get("device_busy_ms_per_step") and "error" not in prof_row:
            prof_row["device_busy_over_timed_step"] = prof_row["device_busy_ms_per_step"] / timed_ms
        results.append({"variant": "sdpo train step under torch.profiler", **prof_row})
        print_profile("sdpo train step", prof_row, timed_ms=timed_ms)
        save(False)

    # -- a whole 2-step sDPO run against its training alone --------------------------------
    if args.sdpo_run:
        chunk_pairs = args.pairs_per_step * args.steps
        chunks = [
            synthetic_pairs(
                chunk_pairs,
                vocab_size=config.vocab_size,
                prompt_len=args.prompt_len,
                completion_min=args.completion_min,
                completion_max=args.completion_max,
                seed=args.seed + 1 + t,
                first_index=t * chunk_pairs,
            )
            for t in range(2)
        ]
        if lora:
            merge_lora(model)  # the run attaches a fresh adapter per chunk
        try:
            run = measure_sdpo_run(
                model,
                chunks=chunks,
                train_config=replace(train_config, epochs=args.sdpo_epochs),
                loss_fn=loss_fn,
                score_tokens=args.score_tokens,
                impl=impl,
                device=device,
                lora_rank=args.lora_rank,
                lora_alpha=args.lora_alpha,
                token_metrics=args.token_metrics,
            )
            all_pairs = [p for c in chunks for p in c]
            results.append(
                {
                    "variant": "sdpo 2-step run (score+train, score+train)",
                    "tokens_per_s": real_tokens(all_pairs) * args.sdpo_epochs / run["total_s"],
                    "tokens_per_s_per_gpu": real_tokens(all_pairs)
                    * args.sdpo_epochs
                    / run["total_s"]
                    / world,
                    "epochs": args.sdpo_epochs,
                    "ratio_vs_train": run["ratio_total_over_train"],
                    **{k: v for k, v in run.items() if k != "ratio_total_over_train"},
                }
            )
        except Exception as exc:
            if world > 1:
                raise  # the other ranks may be inside a collective: end the run, not this row
            results.append(
                {"variant": "sdpo 2-step run", "error": f"{exc.__class__.__name__}: {exc}"}
            )
        say(f"  {results[-1]}", flush=True)
        save(False)

    # -- TRL on the same weights and pairs ------------------------------------------------
    rows = ref.rows_for(torch.tensor([p.index for p in pairs]))
    our_ref = torch.stack([ref.chosen_logps[rows], ref.rejected_logps[rows]])  # (2, P)
    del trainer, model, ref
    if args.compare_trl:
        torch._dynamo.reset()
        reset_peak(device)
        trl_row = trl_compare(
            config=config,
            init_state=init_state,
            pairs=pairs,
            our_ref=our_ref,
            args=args,
            device=device,
        )
        del init_state
        if "error" in trl_row:
            print(f"  {trl_row['error']}", flush=True)
            if "traceback" in trl_row:
                print(trl_row["traceback"], flush=True)
            results.append({"variant": "TRL DPOTrainer (precompute_ref_log_probs)", **trl_row})
        else:
            trl_row["mfu"] = (
                trl_row["tokens_per_s"]
                * (model_flops(timed_pairs, config, training=True) / real_tokens(timed_pairs))
                / (tflops * 1e12)
            )
            results.append(trl_row)
            ours = results[1]
            extra["vs_trl"] = {
                "tokens_per_s_ratio": ours["tokens_per_s"] / trl_row["tokens_per_s"],
                "peak_memory_ratio": (
                    ours["peak_gb"] / trl_row["peak_gb"]
                    if ours["peak_gb"] and trl_row["peak_gb"]
                    else None
                ),
            }
        save(False)
        print(
            f"  { {k: v for k, v in results[-1].items() if not isinstance(v, dict | list)} }",
            flush=True,
        )

    columns = ["variant", "tokens_per_s", "ms_per_step", "mfu", "peak_gb", "warmup_s", "error"]
    if world > 1:  # mfu: the median over ranks, peak_gb: the max (min beside each)
        columns[2:2] = ["tokens_per_s_per_gpu"]
        columns[5:5] = ["mfu_min"]
        columns[7:7] = ["peak_gb_min"]
    say(
        f"\n{args.preset} ({n_params / 1e6:.1f} M params) {precision} compile={args.compile} "
        f"loss_path={args.loss_path} checkpointing={args.gradient_checkpointing}/every {args.checkpoint_every} "
        f"{args.pairs_per_step} pairs/step, prompt {args.prompt_len}, completions "
        f"{args.completion_min}-{args.completion_max}"
        + (
            f"\nworld {world} ({backend}, {mode}"
            + (f", overlap_grad_reduce={args.overlap_grad_reduce}" if mode == "dp" else "")
            + "): tokens/s over all GPUs, mfu = median over ranks (mfu_min), peak_gb = max "
            "over ranks (peak_gb_min)"
            if world > 1
            else ""
        )
    )
    print_table([r for r in results if "phases" not in r["variant"]], columns)
    for row in results:
        if "phases" in row["variant"]:
            say(
                "\nphases of one step (ms, median of the instrumented loop"
                + (", rank 0" if world > 1 else "")
                + "):"
            )
            print_table([row], ["step_ms", *PhaseRecorder.PHASES])
        if "ratio_vs_train" in row:
            say(
                f"\n2-step sDPO run / its training alone ({row['epochs']} epoch(s) per chunk): "
                f"{row['ratio_vs_train']:.3f} (target <= 1.15); as sdpo train scores "
                f"(initial model over all pairs): {row['ratio_runner_no_report']:.3f} with "
                f"sdpo.report_scoring = false, {row['ratio_runner_default']:.3f} with its default"
            )
    say(
        f"scoring tokens/s / training tokens/s: {results[0]['scoring_over_training_tokens_per_s']:.2f} (target >= 2.5)"
    )
    if "vs_trl" in extra:
        vs = extra["vs_trl"]
        mem = f"{vs['peak_memory_ratio']:.2f}" if vs["peak_memory_ratio"] else "-"
        print(
            f"ours / TRL: tokens/s x{vs['tokens_per_s_ratio']:.2f} (target >= 2.0), "
            f"peak memory x{mem} (target <= 0.6)"
        )
    say(flush=True)
    return save(True)


def brief(row: dict) -> dict:
    """A result row without its per-rank list (for the progress lines)."""
    return {k: v for k, v in row.items() if k != "ranks"}


# ----------------------------------------------------------------------------------------
# Section: prep (the CPU work before the first training step)
# ----------------------------------------------------------------------------------------

# The sDPO paper's data: OpenOrca pairs for step 1 (plain text), UltraFeedback pairs for step 2
# (chat messages, in the "full conversation" layout of the binarized hub data set).
PREP_PAPER_PAIRS = (12_859, 60_829)
PREP_SMOKE_PAIRS = (10, 20)
PREP_SOLAR_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% if message['content'] %}{{ '### System:\n' + message['content'] + '\n\n' }}{% endif %}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
    "{% endfor %}"
)


class SyntheticText:
    """English-like text: pseudo-words of 1-4 syllables drawn with Zipf frequencies, with
    punctuation, paragraphs and now and then a code block; seeded."""

    def __init__(self, *, seed: int, words: int = 30_000) -> None:
        self.rng = rng = np.random.default_rng(seed)
        onsets = ["", *"bcdfghklmnprstvw", "th", "st", "ch", "sh", "pr", "tr"]
        syllables = [c + v for c in onsets for v in ("a", "e", "i", "o", "u", "ou", "ea", "ai")]
        endings = ["", "", "", "s", "ed", "ing", "ly", "n", "t"]
        vocab: dict[str, None] = {}
        while len(vocab) < words:
            parts = rng.integers(0, len(syllables), int(rng.integers(1, 5)))
            word = "".join(syllables[i] for i in parts) + endings[int(rng.integers(len(endings)))]
            vocab[word] = None
        self.words = np.array(list(vocab), dtype=object)
        weights = 1.0 / np.arange(1, words + 1) ** 1.05
        self.cdf = np.cumsum(weights / weights.sum())
        self.seps = np.array([" "] * 10 + [", ", ". ", "? ", "\n\n", ": ", " ("], dtype=object)

    def text(self, words: int) -> str:
        rng = self.rng
        idx = np.minimum(np.searchsorted(self.cdf, rng.random(words)), len(self.words) - 1)
        body = "".join(self.words[idx] + self.seps[rng.integers(0, len(self.seps), words)])
        body = body.strip()
        if rng.random() < 0.1:
            body += f"\n```python\nx = {int(rng.integers(10**6))}\nprint(x * 2)\n```"
        return body[:1].upper() + body[1:]

    def length(self, median: int, cap: int) -> int:
        """Words: log-normal around ``median`` (sigma 0.6), in [3, cap]."""
        return int(np.clip(self.rng.lognormal(math.log(median), 0.6), 3, cap))


def make_prep_data(folder: Path, *, pairs: tuple[int, int], vocab: int, seed: int) -> None:
    """A Llama-2/SOLAR-style tokenizer folder (BPE with byte fallback and a Metaspace
    pre-tokenizer, trained on the synthetic text; LlamaTokenizer named, so sdpo builds the
    pipeline transformers does; SOLAR's chat template) in ``folder/model``, and
    ``folder/plain.jsonl`` (OpenOrca-like: system + question prompts of ~200 words, answers of
    ~150-180) and ``folder/chat.jsonl`` (UltraFeedback-like: a user turn of ~100 words, answers
    of ~220-280, each completion repeating the prompt's turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    source = SyntheticText(seed=seed)
    model = folder / "model"
    model.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
    )
    corpus = [source.text(200) for _ in range(min(20_000, max(50, vocab // 4)))]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(model / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "chat_template": PREP_SOLAR_TEMPLATE,
    }
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": vocab, "max_position_embeddings": 4096})
    )
    t = source
    with open(folder / "plain.jsonl", "w") as f:
        for _ in range(pairs[0]):
            prompt = (
                f"### System:\n{t.text(t.length(20, 60))}\n\n### User:\n"
                f"{t.text(t.length(150, 600))}\n\n### Assistant:\n"
            )
            row = {
                "prompt": prompt,
                "chosen": t.text(t.length(180, 1200)),
                "rejected": t.text(t.length(150, 1200)),
            }
            f.write(json.dumps(row) + "\n")
    with open(folder / "chat.jsonl", "w") as f:
        for _ in range(pairs[1]):
            user = [{"role": "user", "content": t.text(t.length(100, 800))}]
            row = {
                "prompt": user,
                **{
                    side: [*user, {"role": "assistant", "content": t.text(t.length(median, 1500))}]
                    for side, median in (("chosen", 280), ("rejected", 220))
                },
            }
            f.write(json.dumps(row) + "\n")


def prep_section(args: argparse.Namespace) -> dict:
    """Time the CPU work ``sdpo train`` does before its first step, stage by stage, on
    synthetic data of the paper's shape; then the whole of it as the runner does it
    (``load_pairs``), with the token cache cold (first run) and warm (second run)."""
    import hashlib
    import subprocess
    import tempfile
    import warnings

    from sdpo.config import load_config
    from sdpo.engine import token_cache
    from sdpo.engine.data import read_preference_file
    from sdpo.engine.tokenize import PairTokenizer, tokenize_pairs
    from sdpo.engine.trainer import plan_steps
    from sdpo.partition import partition_pairs
    from sdpo.runner import load_pairs

    pairs_wanted = PREP_SMOKE_PAIRS if args.smoke else tuple(args.pairs)
    vocab = 1_000 if args.smoke else args.vocab
    scratch = None
    if args.data:
        folder = Path(args.data)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="sdpo-prep-")
        folder = Path(scratch.name)
    header = {
        **run_header(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "pairs": {"plain": pairs_wanted[0], "chat": pairs_wanted[1]},
        "vocab": vocab,
        "smoke": args.smoke,
    }
    try:
        if not (folder / "chat.jsonl").is_file():
            t0 = time.perf_counter()
            make_prep_data(folder, pairs=pairs_wanted, vocab=vocab, seed=args.seed)
            say(f"made the data in {folder} in {time.perf_counter() - t0:.1f} s")
        run = folder / "run.toml"
        run.write_text(
            f'output_dir = "{folder / "out"}"\n[model]\npath = "{folder / "model"}"\n[data]\n'
            'sources = [{ name = "orca", path = "plain.jsonl" }, '
            '{ name = "ultrafeedback", path = "chat.jsonl" }]\n'
            f"max_length = {args.max_length}\nmax_prompt_length = {args.max_length // 2}\n"
            '[sdpo]\nsteps = 2\npartition = "given"\n'
        )
        cfg = load_config(run)
        d = cfg.data
        rows_out: list[dict] = []

        def timed(stage: str, fn: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            value = fn()
            rows_out.append({"stage": stage, "s": time.perf_counter() - t0})
            return value

        if not args.smoke:  # a fresh interpreter: what `sdpo train` imports before it reads
            timed(
                "import sdpo.runner (new process)",
                lambda: subprocess.run([sys.executable, "-c", "import sdpo.runner"], check=True),
            )
        tokenizer = timed("tokenizer load", lambda: PairTokenizer.from_dir(folder / "model"))
        rows: list[dict] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in d.sources:
                rows += timed(
                    f"read + validate {s.name}",
                    lambda s=s: read_preference_file(s.path, source=s.name, split=s.split),
                )
        chat_rows = [r for r in rows if not isinstance(r["prompt"], str)]

        def render() -> None:
            for r in chat_rows:
                for messages, generation in (
                    (r["prompt"], True),
                    (r["prompt"] + r["chosen"], False),
                    (r["prompt"] + r["rejected"], False),
                ):
                    tokenizer.render_chat(messages, add_generation_prompt=generation)

        timed(f"render chat template ({3 * len(chat_rows)} texts)", render)
        lengths = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length}
        pairs, stats = timed(
            "tokenize_pairs (render + encode + cut)",
            lambda: tokenize_pairs(rows, tokenizer, **lengths, vocab_size=vocab),
        )
        arrays, _ = token_cache.pack_pairs(pairs, {})
        ids_sha256 = hashlib.sha256(
            b"".join(
                arrays[f"{s}_{k}"].tobytes()
                for s in ("prompt", "chosen", "rejected")
                for k in ("ids", "offsets")
            )
        ).hexdigest()
        by_index = {p.index: p for p in pairs}

        def partition_and_plan() -> None:
            chunks = partition_pairs(
                "given",
                pairs_sources=[p.source for p in pairs],
                pair_indices=[p.index for p in pairs],
                gamma=None,
                steps=2,
                source_order=[s.name for s in d.sources],
            )
            for chunk in chunks:
                plan_steps([by_index[i] for i in chunk], cfg.train, epoch=0)

        timed("partition + plan batches", partition_and_plan)
        rows = chat_rows = pairs = by_index = []  # freed before the runner's reads
        cache = folder / "tokens-train.safetensors"
        cache.unlink(missing_ok=True)
        common = {"vocab_size": vocab, "context_length": 4096, "cache_file": cache}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = timed(
                "first run: load_pairs, cache cold (read, tokenize, write)",
                lambda: load_pairs(cfg, tokenizer, **common),
            )
            second = timed(
                "second run: load_pairs, cache warm", lambda: load_pairs(cfg, tokenizer, **common)
            )
        assert [p.chosen_ids for p in second] == [p.chosen_ids for p in first]
    finally:
        if scratch is not None:
            scratch.cleanup()
    tokens = stats.num_tokens
    say(
        f"prep: {stats.num_pairs} pairs, {tokens:,} packed tokens, {os.cpu_count()} CPUs; "
        f"token ids sha256 {ids_sha256[:16]}"
    )
    print_table(rows_out, ["stage", "s"])
    return {**header, "tokens": tokens, "ids_sha256": ids_sha256, "stages": rows_out}


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "kernels": kernels_section,
    "step": step_section,
    "prep": prep_section,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="section", required=True)
    k = sub.add_parser(
        "kernels",
        help="the log-prob head: eager, compile, sdpo kernels, Liger",
        description=(
            "The log-prob head alone (lm_head, log-softmax, label gather, per-sequence sums), "
            "forward and backward, and the reference pass's forward: eager PyTorch, "
            "torch.compile, sdpo's kernels and Liger's fused DPO loss, against the matmul "
            "floor. Needs a CUDA GPU (bf16, 8 sequences of 2048 tokens, hidden size 4096); "
            "--smoke runs tiny shapes on the CPU instead."
        ),
    )
    k.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU, a few iterations (CI); --vocab, --warmup and --iters then "
        "do not apply",
    )
    k.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    k.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="sdpo's kernels, as kernels.impl (default: auto, triton on CUDA)",
    )
    k.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[32_000, 128_256],
        help="vocabulary sizes, one row set each (default: 32000 128256)",
    )
    k.add_argument(
        "--chunk-tokens",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also time linear_pair_loss with these chunk sizes (tokens; chunks hold whole "
        "pairs), to check the default chunk rule",
    )
    k.add_argument("--warmup", type=int, default=2, help="untimed runs per variant (default: 2)")
    k.add_argument(
        "--iters",
        type=int,
        default=5,
        help="timed runs per variant, the median reported (default: 5)",
    )

    s = sub.add_parser(
        "step",
        help="a whole DPO training step: tokens/s, MFU, peak memory, phases, sDPO run, TRL",
        description=(
            "End-to-end DPO training steps on a random-init model of a preset shape with "
            "synthetic pairs. Defaults (GPU): llama-1b-32k, bf16, compiled layers, fused loss, "
            "4 pairs/step (4 per GPU under torchrun: data parallel, or sharded with --fsdp), prompt "
            "128, completions 448-896, 4 warm-up + 8 timed steps."
        ),
    )
    s.add_argument("--smoke", action="store_true", help="tiny preset on CPU in seconds (CI)")
    s.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    s.add_argument("--preset", choices=sorted(STEP_PRESETS), help="model shape (see STEP_PRESETS)")
    s.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    s.add_argument(
        "--tie-embeddings", choices=["yes", "no"], help="override the preset's embedding tying"
    )
    s.add_argument(
        "--precision",
        choices=["bf16", "bf16-mixed", "fp32", "auto"],
        help="bf16: bf16 params and AdamW states (TRL's policy; GPU default); bf16-mixed: fp32 "
        "master weights and states, bf16 autocast; fp32 (--smoke default); auto: as "
        'train.precision = "auto" (bf16-mixed on a GPU that computes in bf16, else fp32). A '
        "bf16 the GPU only emulates (compute capability before 8.0) is warned of",
    )
    s.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regional torch.compile of the decoder layers (default: on, off with --smoke)",
    )
    s.add_argument("--compile-mode", default=None, help="torch.compile mode (default: None)")
    s.add_argument(
        "--implementation",
        choices=["sdpo", "transformers"],
        default="sdpo",
        help="the code that runs the model (model.implementation): sdpo's packed decoder, or "
        "transformers' model of the same weights in PackedCausalLM (padded per sequence; "
        "uncompiled; default: sdpo)",
    )
    s.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)",
    )
    s.add_argument(
        "--loss-path",
        choices=["fused", "plain"],
        default="fused",
        help="the loss head, as train.loss_path (default: fused)",
    )
    s.add_argument(
        "--share-prompt",
        action="store_true",
        help="compute each pair's prompt once (train.share_prompt) in training and scoring; "
        "tokens/s and MFU still count the prompt twice (the work of the unshared layout), so "
        "rows compare with unshared runs and TRL",
    )
    s.add_argument(
        "--use-weighting",
        action="store_true",
        help="WPO (loss.use_weighting): the training forward also forms each completion's "
        "sum of log p - log sum p^2 (a second running sum in the row kernel); its cost",
    )
    s.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each layer in backward"
    )
    s.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="with --gradient-checkpointing: recompute every k-th layer only (selective; "
        "default: 1, every layer)",
    )
    s.add_argument(
        "--activation-memory-budget",
        type=float,
        default=None,
        help="with --compile: the share (0-1) of each layer's intermediate values its backward "
        "keeps; the compiler recomputes the rest (model.activation_memory_budget)",
    )
    s.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="sdpo's kernels, as kernels.impl (default: auto, triton on CUDA)",
    )
    s.add_argument(
        "--pairs-per-step",
        type=int,
        default=None,
        help="pairs per optimizer step over all ranks (train.pairs_per_step; default 4 per "
        "GPU: 4, or 4*N under torchrun with N processes)",
    )
    s.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and AdamW states over the ranks "
        "(train.fsdp, FSDP2); default: data parallel (a full copy per GPU)",
    )
    s.add_argument(
        "--overlap-grad-reduce",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="data parallel: start the gradient all-reduce in buckets during the backward "
        "(train.overlap_grad_reduce, default); --no-overlap-grad-reduce: one all-reduce after it",
    )
    s.add_argument(
        "--token-metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the trainer's token metrics (log.token_metrics, default); --no-token-metrics: "
        "the log-prob head without their reductions, to time the step both ways",
    )
    s.add_argument("--prompt-len", type=int, help="prompt tokens (default 128; --smoke 8)")
    s.add_argument("--completion-min", type=int, help="shortest completion (default 448)")
    s.add_argument("--completion-max", type=int, help="longest completion (default 896)")
    s.add_argument("--warmup-steps", type=int, help="untimed steps (compile) (default 4)")
    s.add_argument("--steps", type=int, help="timed optimizer steps (default 8)")
    s.add_argument(
        "--profile-steps", type=int, help="steps of the instrumented phase loop (default 3)"
    )
    s.add_argument(
        "--torch-profile-steps",
        type=int,
        default=0,
        help="after the phase loop, run this many training steps under torch.profiler and "
        "report the device's busy share of a step and its top kernels and host ops (default: 0, "
        "none)",
    )
    s.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=16_384,
        help="micro-batch token budget, as train.max_tokens_per_batch (default: 16384)",
    )
    s.add_argument(
        "--score-tokens",
        type=int,
        default=65_536,
        help="token budget of a scoring batch (default: 65536)",
    )
    s.add_argument("--lr", type=float, default=5e-7, help="learning rate (default: 5e-7)")
    s.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train a LoRA adapter of this rank on every decoder projection instead of every "
        "weight (lora.rank; default 0: full fine-tuning); MFU then counts 4*P per token",
    )
    s.add_argument(
        "--lora-alpha", type=float, default=16.0, help="LoRA alpha (lora.alpha; default: 16)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the weights and pairs (default: 0)")
    s.add_argument(
        "--sdpo-run",
        action="store_true",
        help="also time a 2-step sDPO run (score chunk, train, score chunk, train) against "
        "its training alone",
    )
    s.add_argument(
        "--sdpo-epochs",
        type=int,
        default=1,
        help="epochs over each chunk in the --sdpo-run (each chunk is scored once; default: 1)",
    )
    s.add_argument(
        "--compare-trl",
        action="store_true",
        help="also run TRL's DPOTrainer (precompute_ref_log_probs) on the same weights and "
        "pairs, when trl is importable",
    )
    s.add_argument(
        "--trl-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="gradient checkpointing in the TRL run (default: off, TRL's fastest setting when "
        "memory allows, as in the anchor run; TRL's own DPOConfig default is on)",
    )
    s.add_argument(
        "--trl-pad-to-multiple-of",
        type=int,
        default=None,
        help="TRL's pad_to_multiple_of (default: TRL's, no extra padding on CUDA)",
    )
    s.add_argument(
        "--trl-profile-steps",
        type=int,
        default=0,
        help="after the timed TRL steps, run this many more under torch.profiler and report "
        "the device kernels and host ops they spent their time on (default: 0, none)",
    )
    p = sub.add_parser(
        "prep",
        help="the CPU work before the first step: read, validate, render, tokenize, cache",
        description=(
            "Times what sdpo train does on the CPU before its first step (startup, reading and "
            "validating the data, chat templates, tokenizing, the token cache, partition and "
            "batches) on synthetic data of the sDPO paper's shape: OpenOrca-like plain pairs "
            "and UltraFeedback-like chat pairs, a 32k BPE tokenizer built as Llama 2's."
        ),
    )
    p.add_argument("--smoke", action="store_true", help="30 pairs, a 1k vocabulary (CI)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument(
        "--pairs",
        type=int,
        nargs=2,
        default=list(PREP_PAPER_PAIRS),
        metavar=("PLAIN", "CHAT"),
        help="plain and chat pairs (default: the paper's 12,859 and 60,829)",
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=32_000,
        help="tokenizer vocabulary size (default: 32000; --smoke: 1000)",
    )
    p.add_argument("--max-length", type=int, default=2048, help="data.max_length (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="make the data in DIR (kept), or reuse what an earlier run made there; default: "
        "a temporary folder",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.section != "step" and distributed.launched() and os.environ["WORLD_SIZE"] != "1":
        if os.environ["RANK"] != "0":
            raise SystemExit(1)  # rank 0 says why
        raise SystemExit(
            f"throughput.py {args.section} runs in one process: only the step section runs "
            "under torchrun"
        )
    owns_group = not distributed.initialized()  # the step section joins torchrun's group
    try:
        payload = SECTIONS[args.section](args)
    except SystemExit as exc:  # a refused argument: the same on every rank, said by rank 0
        main_rank = distributed.is_main()
        if owns_group:
            distributed.shutdown()
        if isinstance(exc.code, str) and not main_rank:
            raise SystemExit(1) from None
        raise
    except BaseException as exc:
        if distributed.active():  # say which rank failed; torchrun then ends the others
            print(
                f"[rank {distributed.rank()} of {distributed.world()}] throughput.py "
                f"{args.section} failed: {exc.__class__.__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
        if owns_group:
            distributed.shutdown()
        raise
    if args.json and distributed.is_main():
        atomic_write_json(args.json, payload)
        print(f"wrote {args.json}")
    if owns_group:
        distributed.shutdown(wait=True)  # no rank leaves while a peer still reduces
    return 0


if __name__ == "__main__":
    # a rank that has left its group exits without the interpreter's teardown (see exit_process)
    distributed.exit_process(main())
