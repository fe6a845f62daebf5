"""Ahead-of-time compile of every sdpo Triton kernel for a GPU target, on a machine without one.

Why it exists: the kernel tests run under the Triton interpreter, which never compiles, so a
kernel that does not lower for a real GPU, or a tile config that spills registers or needs more
shared memory than the chip has, passes every CPU test. Triton can compile for a named target
(sm_90: H100/H200, sm_80: A100) without a driver; this tool does that for each variant the
launchers really launch and reports, per variant, the registers per thread, spill stores/loads,
the shared memory the kernel asks for against the target's limit, and whether it compiled.

    python benchmarks/kernel_resources.py                       # sm_90 and sm_80, every variant
    python benchmarks/kernel_resources.py --targets sm_90 --json out.json
    python benchmarks/kernel_resources.py --smoke               # the subset tests compile

Variants (``variants()``): the row kernels of ``kernels/logprobs.py`` (forward, with and
without WPO's ``WITH_LSQ`` and the trainer's token metrics, ``WITH_STATS``, and backward written in place over the logits, as every caller
passes it) for logits in bf16, fp16 and fp32 at V = 32,000, 50,257 (a vocabulary tail) and
128,256; the fused head of
``kernels/fused_head.py`` for every config of its autotuner, ``EVEN_K`` true (H = 4,096) and
false (H = 4,048), hidden/weight in bf16, fp16 and fp32 (fp32 twice: the ``DOT_PRECISION``
the launcher picks under torch's default float32 matmul precision, "ieee", and under "high",
"tf32"), N = 16,384 tokens and V = 128,256.

Nothing here copies a kernel signature. Each variant calls the real launcher
(``rows_forward``, ``rows_backward``, ``fused_head._partials``) on meta tensors, with the
launchers' ``launch`` swapped for a recorder that keeps the kernel, its arguments and its
keyword arguments instead of launching; the fused head's recorded autotuner (the one the
launcher picks for the dtype: ``CONFIGS``, or ``FP32_CONFIGS`` for fp32) supplies its own
configs (``Config.all_kwargs()``, as the autotuner passes them). The recorded call is then
handed to Triton's own ``JITFunction.warmup`` under a stand-in driver that names the target,
so Triton specialises the arguments (dtypes, 16-divisibility of integers, ints equal to 1)
as at a real launch, and compiles to a cubin without loading it. Meta tensors have address 0,
so every pointer counts as 16-byte aligned, as a fresh allocation is. V only reaches the row
kernels as a runtime integer, so V = 32,000 and 128,256 compile alike (both divisible by 16).

Numbers: shared memory is Triton's ``metadata.shared`` (dynamic shared memory, what a launch
requests; the limits are 227 KiB usable per block on sm_90 and 163 KiB on sm_80, and a launch
above them fails with OutOfResources). Registers and spills come from Triton's own ``ptxas
-v`` run (its ptxas, its flags), whose log ``TRITON_DUMP_PTXAS_LOG=1`` has Triton print; each
compile uses an empty Triton cache so that ptxas always runs. A variant that fails to compile
is reported with the end of the compiler's message, never dropped. Exit code: 0, or 1 when a
variant fails to compile or exceeds shared memory, or 2 when this Triton cannot compile for
NVIDIA at all (no NVIDIA backend or no ptxas; the JSON says why in ``unavailable``).

The process must not interpret Triton: this script sets ``TRITON_INTERPRET=0`` before anything
imports Triton, so run it as a script (the tests run it in a subprocess).
"""

from __future__ import annotations

import os

# Before torch, triton or sdpo.kernels are imported: compile, never interpret; and have
# Triton print the log of its own ptxas run (registers, spills), with its own flags.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

KIB = 1024
# Usable dynamic shared memory per thread block (CUDA C programming guide, compute
# capabilities table): 227 KiB on sm_90, 163 KiB on sm_80.
TARGETS = {
    "sm_90": dict(arch=90, shared_limit=227 * KIB),
    "sm_80": dict(arch=80, shared_limit=163 * KIB),
}
ROW_VOCABS = (32_000, 50_257, 128_256)
ROW_TOKENS = 4_096  # a chunk of rows; the launch grid, not the kernel, depends on it
HEAD_TOKENS = 16_384
HEAD_VOCAB = 128_256
HEAD_HIDDEN = {True: 4_096, False: 4_048}  # EVEN_K -> H (4,048: 16 · 253, no multiple of 32)
SM90_SMS = 132  # H100 SXM; only the splits argument's value depends on it
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the @triton.jit function and what the launcher passed."""

    fn: triton.runtime.JITFunction
    grid: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class Variant:
    """A kernel in one launch configuration; ``record`` runs the real launcher to get it."""

    kernel: str
    name: str
    record: Callable[[], Launch]


@dataclasses.dataclass
class Resources:
    """What compiling one variant for one target gave (``error`` None when it compiled)."""

    kernel: str
    variant: str
    target: str
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    shared: int | None = None  # bytes of dynamic shared memory per block
    shared_limit: int = 0
    cubin_bytes: int = 0
    seconds: float = 0.0  # compile wall time
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared is not None and self.shared <= self.shared_limit


# ----------------------------------------------------------------------------------------
# Recording the launchers' calls
# ----------------------------------------------------------------------------------------


def _kernel_modules():
    """(logprobs, triton_rows, fused_head), checked to hold compiled, not interpreted, kernels."""
    from sdpo.kernels import fused_head, logprobs, triton_rows

    if not isinstance(triton_rows.logprobs_fwd_kernel, triton.runtime.JITFunction) or (
        type(triton_rows.logprobs_fwd_kernel).__name__ == "InterpretedFunction"
    ):
        raise RuntimeError(
            "Triton was imported in interpreter mode (TRITON_INTERPRET=1) before this tool "
            "could turn it off; run benchmarks/kernel_resources.py as a script in its own "
            "process (tests do so in a subprocess)"
        )
    return logprobs, triton_rows, fused_head


@contextlib.contextmanager
def _recorded_launches() -> Iterator[list[Launch]]:
    """Swap the launchers' ``launch`` for a recorder; yields the list the launches go to."""
    _, triton_rows, fused_head = _kernel_modules()
    launches: list[Launch] = []

    class _Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append(Launch(self.fn, grid, args, kwargs))

            return record

    def record_launch(kernel, device):
        return _Recorder(kernel)

    saved = (triton_rows.launch, fused_head.launch)
    triton_rows.launch = fused_head.launch = record_launch
    try:
        yield launches
    finally:
        triton_rows.launch, fused_head.launch = saved


def _one_launch(call: Callable[[], object]) -> Launch:
    with _recorded_launches() as launches:
        call()
    if len(launches) != 1:
        raise RuntimeError(
            f"expected the launcher to launch one kernel, it launched {len(launches)}"
        )
    return launches[0]


@contextlib.contextmanager
def _float32_matmul_precision(precision: str) -> Iterator[None]:
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _record_rows(direction: str, dtype: torch.dtype, vocab: int) -> Launch:
    """``direction``: "fwd", "fwd+lsq" (the forward with WPO's log sum p^2), "fwd+stats" (with
    the trainer's token metrics), "fwd+lsq+stats" (both: the trainer's forward under WPO) or
    "bwd"."""
    logprobs, _, _ = _kernel_modules()
    logits = _meta(ROW_TOKENS, vocab, dtype=dtype)
    labels = _meta(ROW_TOKENS, dtype=torch.int64)
    if direction.startswith("fwd"):
        with_lsq, with_stats = "+lsq" in direction, "+stats" in direction
        return _one_launch(
            lambda: logprobs.rows_forward(
                logits, labels, impl="triton", with_lsq=with_lsq, with_stats=with_stats
            )
        )
    lse_parts = _meta(ROW_TOKENS, 2, dtype=torch.float32)
    grad_token = _meta(ROW_TOKENS, dtype=torch.float32)
    # Every caller forms the gradient in place over the logits (or in a tensor like them).
    return _one_launch(
        lambda: logprobs.rows_backward(
            logits, labels, lse_parts, grad_token, impl="triton", out=logits
        )
    )


def _record_tuned_head(dtype: torch.dtype, matmul_precision: str, even_k: bool) -> Launch:
    """The fused head's autotuned launch for ``dtype`` (its ``fn`` is the autotuner the
    launcher picked for that dtype, holding the configs it would try)."""
    _, _, fused_head = _kernel_modules()
    h = HEAD_HIDDEN[even_k]
    hidden = _meta(HEAD_TOKENS, h, dtype=dtype)
    weight = _meta(HEAD_VOCAB, h, dtype=dtype)
    labels = _meta(HEAD_TOKENS, dtype=torch.int64)
    splits = fused_head.num_splits(num_tokens=HEAD_TOKENS, vocab_size=HEAD_VOCAB, sm_count=SM90_SMS)
    with _float32_matmul_precision(matmul_precision):
        return _one_launch(
            lambda: fused_head._partials(hidden, weight, labels, splits=splits, tiles=None)
        )


def _record_head(dtype: torch.dtype, matmul_precision: str, even_k: bool, config_index: int):
    tuned = _record_tuned_head(dtype, matmul_precision, even_k)
    # The autotuner launches its wrapped kernel with each config's keyword arguments added.
    config = tuned.fn.configs[config_index]
    return Launch(tuned.fn.fn, tuned.grid, tuned.args, {**tuned.kwargs, **config.all_kwargs()})


def _config_name(config: triton.Config) -> str:
    kw = config.kwargs
    return (
        f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
    )


def _tile_shape(config: triton.Config) -> tuple[int, int, int]:
    return tuple(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


@functools.cache
def variants(smoke: bool = False) -> tuple[Variant, ...]:
    """Every launch variant (see the module docstring); ``smoke``: the subset the tests compile.

    The smoke subset: both row kernels for bf16 logits at V = 50,257 (a vocabulary tail), and
    the fused head with EVEN_K for the first config of each distinct tile shape in the
    autotuner's list, in bf16 and in fp32 with DOT_PRECISION "tf32", plus fp32 "ieee" (the
    default under torch's float32 matmul precision) for the smallest tile.
    """
    _, triton_rows, fused_head = _kernel_modules()
    out: list[Variant] = []
    row_dtypes = (torch.bfloat16,) if smoke else tuple(DTYPE_NAMES)
    row_vocabs = (50_257,) if smoke else ROW_VOCABS
    for direction, fn in (
        ("fwd", triton_rows.logprobs_fwd_kernel),
        ("fwd+lsq", triton_rows.logprobs_fwd_kernel),
        ("fwd+stats", triton_rows.logprobs_fwd_kernel),
        ("fwd+lsq+stats", triton_rows.logprobs_fwd_kernel),
        ("bwd", triton_rows.logprobs_bwd_kernel),
    ):
        for dtype in row_dtypes:
            for vocab in row_vocabs:
                record = functools.partial(_record_rows, direction, dtype, vocab)
                kw = record().kwargs
                name = (
                    f"{DTYPE_NAMES[dtype]} V={vocab:,} BLOCK_V={kw['BLOCK_V']} w{kw['num_warps']}"
                )
                if kw.get("WITH_LSQ"):
                    name += " WITH_LSQ"
                if kw.get("WITH_STATS"):
                    name += " WITH_STATS"
                out.append(Variant(fn.__name__, name, record))

    # the launcher's config list per dtype, recorded once
    head_configs = {
        dtype: list(_record_tuned_head(dtype, "highest", True).fn.configs) for dtype in DTYPE_NAMES
    }
    configs_of = head_configs.__getitem__

    if smoke:

        def one_per_shape(dtype: torch.dtype) -> list[int]:
            first_of_shape: dict[tuple[int, int, int], int] = {}
            for i, config in enumerate(configs_of(dtype)):
                first_of_shape.setdefault(_tile_shape(config), i)
            return sorted(first_of_shape.values())

        fp32 = configs_of(torch.float32)
        smallest = min(range(len(fp32)), key=lambda i: math.prod(_tile_shape(fp32[i])))
        # fp32 under "ieee" is the slowest to compile: one config.
        plan = [
            (torch.bfloat16, "highest", True, one_per_shape(torch.bfloat16)),
            (torch.float32, "high", True, one_per_shape(torch.float32)),
            (torch.float32, "highest", True, [smallest]),
        ]
    else:
        plan = [
            (dtype, precision, even_k, list(range(len(configs_of(dtype)))))
            for dtype, precision in [
                (torch.bfloat16, "highest"),
                (torch.float16, "highest"),
                (torch.float32, "highest"),
                (torch.float32, "high"),
            ]
            for even_k in (True, False)
        ]
    kernel_name = fused_head._fused_head_kernel.__name__
    for dtype, matmul_precision, even_k, config_indices in plan:
        configs = configs_of(dtype)
        for i in config_indices:
            record = functools.partial(_record_head, dtype, matmul_precision, even_k, i)
            kw = record().kwargs
            assert kw["EVEN_K"] == even_k, "the variant's H does not give the EVEN_K it names"
            dtype_name = DTYPE_NAMES[dtype]
            if dtype == torch.float32:
                dtype_name += f"/{kw['DOT_PRECISION']}"
            name = f"{dtype_name} {_config_name(configs[i])} EVEN_K={int(even_k)}"
            out.append(Variant(kernel_name, name, record))
    return tuple(out)


# ----------------------------------------------------------------------------------------
# Compiling and measuring
# ----------------------------------------------------------------------------------------


class _TargetDriver:
    """Stands in for the CUDA driver during ``warmup``: names the target, loads nothing."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def toolchain_missing() -> str | None:
    """Why this Triton cannot compile for NVIDIA targets here, or None when it can."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"Triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    bundled = Path(sys.modules[backends["nvidia"].compiler.__module__].__file__).parent / "bin"
    if not any(bundled.glob("ptxas*")) and shutil.which("ptxas") is None:
        return f"Triton {triton.__version__}'s NVIDIA backend has no ptxas ({bundled}, PATH)"
    return None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(log: str) -> tuple[int | None, int | None, int | None]:
    """(registers, spill store bytes, spill load bytes) from Triton's ``ptxas -v`` log."""
    regs, spills = _PTXAS_REGS.search(log), _PTXAS_SPILLS.search(log)
    registers = int(regs.group(1)) if regs else None
    if spills is None:
        return registers, None, None
    return registers, int(spills.group(1)), int(spills.group(2))


@contextlib.contextmanager
def _fresh_triton_cache() -> Iterator[None]:
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="sdpo-kernel-resources-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if saved is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def compile_variant(variant: Variant, target_name: str) -> Resources:
    """Compile one variant for one target (``TARGETS`` key); errors are reported, not raised."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    spec = TARGETS[target_name]
    result = Resources(variant.kernel, variant.name, target_name, shared_limit=spec["shared_limit"])
    launch = variant.record()
    start = time.perf_counter()
    previous = getattr(driver, "_active", None)  # None until something asked for the driver
    driver.set_active(_TargetDriver(GPUTarget("cuda", spec["arch"], 32)))
    try:
        log = io.StringIO()
        # An empty cache, so that ptxas really runs (variants that specialise alike, such as
        # V = 32,000 and 128,256, would otherwise hit the first one's cubin and log nothing);
        # TRITON_DUMP_PTXAS_LOG makes Triton print ptxas -v's log.
        with _fresh_triton_cache(), contextlib.redirect_stdout(log):
            compiled = launch.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        result.cubin_bytes = len(compiled.asm["cubin"])
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spill_stores, result.spill_loads = _ptxas_usage(log.getvalue())
    except Exception as exc:  # a compile error is a result
        # Triton's messages quote the source first and end with the reason: keep the end.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        result.error = f"{type(exc).__name__}: {' | '.join(lines[-4:])}"[:1500]
    finally:
        # A fresh binder per variant: warmup caches by device, and the device id is always 0.
        launch.fn.device_caches.clear()
        driver.set_active(previous)
        result.seconds = round(time.perf_counter() - start, 2)
    return result


def _compile_indexed(smoke: bool, index: int, target_name: str) -> Resources:
    return compile_variant(variants(smoke)[index], target_name)


def report(*, targets: list[str], smoke: bool = False, jobs: int = 1) -> list[Resources]:
    """Compile every variant for every target (in ``jobs`` processes); rows in variant order."""
    tasks = [(smoke, i, t) for t in targets for i in range(len(variants(smoke)))]
    if jobs <= 1:
        return [_compile_indexed(*task) for task in tasks]
    # spawn: each worker imports afresh, with this module's environment settings.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_compile_indexed, *zip(*tasks)))


def status(row: Resources) -> str:
    if row.error is not None:
        return "COMPILE ERROR"
    if not row.fits:
        return "SHARED MEMORY OVER LIMIT"
    if row.registers is None:
        return "ok, no ptxas log"
    if row.spill_stores or row.spill_loads:
        return "ok, spills"
    return "ok"


def format_table(rows: list[Resources]) -> str:
    header = ("kernel", "variant", "target", "regs", "spill st/ld B", "smem KiB / limit", "status")
    lines = []
    for r in rows:
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        shared = "-" if r.shared is None else f"{r.shared / KIB:.1f}".removesuffix(".0")
        lines.append(
            (
                r.kernel,
                r.variant,
                r.target,
                "-" if r.registers is None else str(r.registers),
                spills,
                f"{shared} / {r.shared_limit // KIB}",
                status(r),
            )
        )
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(x.ljust(w) for x, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    for r in rows:
        if r.error is not None:
            out.append(f"\n{r.kernel} [{r.variant}] on {r.target}: {r.error}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["sm_90", "sm_80"])
    parser.add_argument("--smoke", action="store_true", help="only the subset the tests compile")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)

    missing = toolchain_missing()
    rows = [] if missing else report(targets=args.targets, smoke=args.smoke, jobs=args.jobs)
    if args.json is not None:
        payload = dict(
            triton=triton.__version__,
            unavailable=missing,
            rows=[dataclasses.asdict(r) | {"status": status(r)} for r in rows],
        )
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if missing:
        print(f"cannot compile ahead of time: {missing}", file=sys.stderr)
        return 2
    print(f"Triton {triton.__version__}, {len(rows)} compiles")
    print(format_table(rows))
    bad = [r for r in rows if not r.fits]
    if bad:
        print(f"\n{len(bad)} variant(s) failed to compile or exceed shared memory", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
