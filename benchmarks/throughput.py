"""Throughput benchmarks for sdpo: where every performance claim in benchmarks/RESULTS.md comes from.

Each section is a subcommand that measures its own baselines and the bf16 matmul ceiling in
the same run (numbers from different runs or cards are not compared), then prints a table
and, with ``--json PATH``, writes the same rows as JSON.

    python benchmarks/throughput.py kernels [--json out.json]   # the log-prob head, H100 shapes
    python benchmarks/throughput.py kernels --smoke             # tiny shapes on CPU (CI)

``kernels``: lm_head matmul + log-softmax + label gather + per-sequence sum + a DPO sigmoid
loss against fixed reference values, forward and backward, for N=16,384 tokens (8 sequences
of 2,048 = 4 pairs), H=4,096, V in {32,000, 128,256}, bf16. Variants: PyTorch eager (fp32
logits), torch.compile of the same, sdpo's ``sequence_logprobs`` (recomputing backward) and
``linear_pair_loss`` (gradients formed in the forward; fp32 and bf16 accumulation of dW), and
Liger-Kernel's LigerFusedLinearDPOLoss when importable. Also the no-grad reference pass.
The floor is the matmul work (6·N·H·V FLOP with grad, 2·N·H·V without) at the measured
bf16 matmul rate; "extra peak" is the peak allocated memory above the inputs, gradient
buffers included.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdpo.engine.files import atomic_write_json
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


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 on CPU)."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_above(device: torch.device, base: int) -> float | None:
    """GB of peak allocated memory above ``base`` (None on CPU, where it is not tracked)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def print_table(rows: list[dict], columns: list[str], *, file=sys.stdout) -> None:
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
    p: HeadProblem, *, impl: str, smoke: bool
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

    def pair_variant(grad_weight_dtype):
        def run():
            loss, _ = linear_pair_loss(
                h,
                w,
                p.labels,
                p.seq_ids,
                p.num_seqs,
                pair_loss=pair_loss,
                impl=impl,
                grad_weight_dtype=grad_weight_dtype,
            )
            return loss

        return run

    variants[f"sdpo sequence_logprobs ({impl})"] = seq_variant
    variants[f"sdpo linear_pair_loss ({impl}, dW fp32)"] = pair_variant(torch.float32)
    variants[f"sdpo linear_pair_loss ({impl}, dW in weight dtype)"] = pair_variant(None)
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


def measure_reference_pass(p: HeadProblem, *, impl: str, timer: Timer) -> list[dict]:
    rows = []

    def ours():
        sequence_logprobs(p.hidden, p.weight, p.labels, p.seq_ids, p.num_seqs, impl=impl)

    def eager():
        logits = (p.hidden @ p.weight.t()).float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, p.labels.clamp(min=0).unsqueeze(1))
        torch.zeros(p.num_seqs, device=logp.device).index_add(0, p.seq_ids, logp.squeeze(1))

    for name, fn in (
        (f"reference pass: sdpo sequence_logprobs ({impl})", ours),
        ("reference pass: torch eager", eager),
    ):
        with torch.no_grad():

            def run(mark, fn=fn):
                mark()
                fn()
                mark()

            try:
                (ms,) = timer.phases(run)
                base = reset_peak(timer.device)
                fn()
                rows.append(
                    {
                        "variant": name,
                        "fwd_ms": ms,
                        "total_ms": ms,
                        "extra_peak_gb": peak_above(timer.device, base),
                    }
                )
            except torch.OutOfMemoryError as exc:
                rows.append(
                    {"variant": name, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                )
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
    for shape in shapes:
        p = make_head_problem(dtype=dtype, device=device, **shape)
        n, h, v = p.hidden.shape[0], p.hidden.shape[1], p.weight.shape[0]
        floor_ms = p.flops_floor / (tflops * 1e12) * 1e3
        grad_floor_gb = (v * h + n * h) * p.hidden.element_size() / 1e9
        rows = [
            {
                "variant": "floor (6NHV at matmul rate)",
                "total_ms": floor_ms,
                "extra_peak_gb": grad_floor_gb,
            }
        ]
        for name, fn in head_variants(p, impl=impl, smoke=args.smoke).items():
            if isinstance(fn, str):
                rows.append({"variant": name, "error": fn})
                continue
            try:
                rows.append({"variant": name, **measure_head(fn, p, timer=timer)})
            except Exception as exc:  # one failing variant (OOM, API drift) must not end the run
                rows.append(
                    {
                        "variant": name,
                        "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}",
                    }
                )
            print(f"  V={v} {name}: {rows[-1]}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            if "total_ms" in row:
                row["x_floor"] = row["total_ms"] / floor_ms
        ref_floor = floor_ms / 3
        ref_rows = [
            {"variant": "reference floor (2NHV)", "total_ms": ref_floor, "extra_peak_gb": 0.0}
        ]
        ref_rows += measure_reference_pass(p, impl=impl, timer=timer)
        for row in ref_rows:
            if "total_ms" in row:
                row["x_floor"] = row["total_ms"] / ref_floor
        rows.extend(ref_rows)
        for row in rows:
            row.update(vocab=v, tokens=n, hidden=h)
        print(f"\nN={n} H={h} V={v} {dtype} impl={impl}")
        print_table(
            rows, ["variant", "fwd_ms", "bwd_ms", "total_ms", "x_floor", "extra_peak_gb", "error"]
        )
        print(flush=True)
        results.extend(rows)
        if args.json:  # after every shape, so a run cut short still leaves its rows
            atomic_write_json(args.json, {**header, "results": results, "complete": False})
        del p
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**header, "results": results, "complete": True}


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"kernels": kernels_section}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="section", required=True)
    k = sub.add_parser("kernels", help="the log-prob head: eager, compile, sdpo kernels, Liger")
    k.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, a few iterations (CI)")
    k.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    k.add_argument(
        "--impl", default="auto", choices=["auto", "triton", "torch"], help="sdpo kernels impl"
    )
    k.add_argument(
        "--vocab", type=int, nargs="+", default=[32_000, 128_256], help="vocabulary sizes"
    )
    k.add_argument("--warmup", type=int, default=2, help="untimed runs per variant")
    k.add_argument("--iters", type=int, default=5, help="timed runs per variant (median reported)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    payload = SECTIONS[args.section](args)
    if args.json:
        atomic_write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
