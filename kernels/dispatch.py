"""The one place that decides which implementation of a fused log-prob op runs.

Every op in sdpo.kernels takes ``impl="auto" | "triton" | "torch"`` (all but the fused no-grad
head, ``fused_head``, which is a Triton kernel only) and asks
:func:`resolve_impl` what that means for the tensors at hand, so the engine, the
benchmarks and the tests agree on the rule: Triton on CUDA when Triton imports, the
pure-PyTorch reference everywhere else. ``"triton"`` on a CPU tensor runs the kernels
under the Triton interpreter (slow; used by the tests).

Also here, as the other switch between two ways of running an op: :func:`compiler_disabled`,
which keeps a function out of ``torch.compile`` graphs without importing the compiler early.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

IMPLS = ("auto", "triton", "torch")


# Decided once at import, without importing Triton (which fixes its interpreter mode): a plain
# module constant, so torch.compile traces resolve_impl without a cached-function warning.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed on this machine."""
    return _TRITON_INSTALLED


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Map ``impl`` ("auto" | "triton" | "torch") to the implementation that runs on ``device``.

    "auto" -> "triton" on a CUDA device when Triton imports, else "torch".
    """
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(
                "kernels impl='triton' was requested but `import triton` fails on this "
                'machine; install triton (Linux) or set kernels.impl = "torch" (or "auto").'
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"kernels impl='triton' runs on CUDA (or the CPU interpreter), not on "
                f'{device.type!r} tensors; set kernels.impl = "torch" or "auto".'
            )
        return "triton"
    raise ValueError(
        f"unknown kernels impl {impl!r}; expected one of {', '.join(IMPLS)} "
        '(set kernels.impl = "auto" to pick Triton on CUDA and PyTorch elsewhere).'
    )


# The wrappers made by compiler_disabled that have not built their disabled function yet.
_UNBUILT: list[Callable[[], None]] = []


def compiler_disabled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, built on the first call or by
    :func:`build_compiler_disabled`: the decorator imports ``torch._dynamo`` (and with it
    Triton), about two seconds at import time that a process which never trains would pay for
    nothing. The wrapper carries dynamo's own mark, so a compiled caller graph-breaks around it
    instead of tracing into it. For code the compiler must run eagerly: ``linear_pair_loss`` (it
    takes a Python callable) and the engine's per-sequence attention loop."""
    disabled: list[Callable] = []

    def build() -> None:
        if not disabled:
            disabled.append(torch.compiler.disable(fn))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not disabled:
            build()
        return disabled[0](*args, **kwargs)

    wrapper._torchdynamo_disable = True  # what torch.compiler.disable sets
    _UNBUILT.append(build)
    return wrapper


def build_compiler_disabled() -> None:
    """Build every :func:`compiler_disabled` function now. Code that compiles calls it first,
    so that no wrapper builds inside a compiled caller: dynamo runs the wrapper's own frame
    after the graph break, and PyTorch 2.11's cannot trace the build there (it breaks the graph
    once more, at ``list.append``)."""
    while _UNBUILT:
        _UNBUILT.pop()()
