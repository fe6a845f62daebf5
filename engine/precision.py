"""Precision policies: which dtype parameters, optimizer states and matmuls use.

- ``fp32``: float32 parameters and states, no autocast (the CPU default; bitwise reproducible).
- ``bf16``: bfloat16 parameters and optimizer states, no autocast (what TRL does with a model
  loaded in bf16; leanest, but small updates can round away at low learning rates).
- ``bf16-mixed``: float32 master parameters and states, bf16 autocast for the forward (the CUDA
  default: safe at sDPO's typical learning rate of 5e-7).
``auto`` picks ``bf16-mixed`` on a GPU that computes in bf16 (compute capability 8.0 or later)
and ``fp32`` elsewhere, an older GPU included (it emulates bf16, slower than fp32; an explicit
``bf16`` or ``bf16-mixed`` runs there all the same, with a warning: ``emulated_bf16_warning``); a
resumed run keeps the precision its checkpoint records (``resumed_precision``), so ``auto`` is
decided when the run starts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

PRECISIONS = ("auto", "fp32", "bf16", "bf16-mixed")


def bf16_support(device: torch.device | str) -> str:
    """How the CUDA ``device`` runs bf16: ``"native"`` (compute capability 8.0 or later; any
    ROCm GPU), ``"emulated"`` (an older GPU: slower than fp32) or ``"none"``. Asked of the
    device the model is on, not of the current device, which is what
    ``torch.cuda.is_bf16_supported()`` answers for (a model on ``cuda:1`` while ``cuda:0`` is
    current took cuda:0's answer)."""
    device = torch.device(device)
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return "native"
    try:
        torch.empty(1, dtype=torch.bfloat16, device=device)
    except (RuntimeError, AssertionError):  # torch's error where a bf16 tensor cannot be
        return "none"  # made there (AssertionError: a torch built without CUDA)
    return "emulated"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)} "
            "(train.precision in the config)"
        )
    if precision != "auto":
        return precision
    if torch.device(device).type != "cuda":
        return "fp32"
    # emulated bf16 (a GPU before compute capability 8.0) is slower than fp32
    return "bf16-mixed" if bf16_support(device) == "native" else "fp32"


def resumed_precision(
    precision: str, recorded: str | None, device: torch.device | str
) -> tuple[str, str | None]:
    """The precision a resumed run trains in, and a note for the log (None: nothing to say).
    ``precision``: the config's ``train.precision``; ``recorded``: the resolved one the
    checkpoint keeps (None: written before it was kept, so resolved here as before). ``auto``
    is the precision resolved when the run started, which another kind of device would
    resolve otherwise (a run started on a CPU, resumed on a GPU); an explicit value is itself
    (one other than ``recorded`` is a changed config key, which the caller refuses)."""
    if recorded is None or precision != "auto":
        return resolve_precision(precision, device), None
    resolve_precision(recorded, device)  # a known name, or the ValueError naming them
    today = resolve_precision("auto", device)
    if today == recorded:
        return recorded, None
    return recorded, (
        f'train.precision = "auto" keeps {recorded}, the precision the run started with (its '
        f"checkpoint records it); a new run on this {torch.device(device).type} would resolve "
        f'"auto" to {today}'
    )


def precision_problem(precision: str, device: torch.device | str) -> str | None:
    """Why ``device`` cannot run the resolved ``precision`` (None: it can): bf16 weights or
    bf16 autocast need a GPU that computes in bf16. A CPU runs every precision."""
    device = torch.device(device)
    if precision == "fp32" or device.type != "cuda":
        return None
    if bf16_support(device) != "none":
        return None
    return f"this GPU ({device}) does not compute in bf16"


def emulated_bf16_warning(
    precision: str, device: torch.device | str, *, key: str = "train.precision"
) -> str | None:
    """A warning for a run in bf16 (``bf16`` or ``bf16-mixed``, the resolved ``precision``) on
    a GPU that only emulates bf16 (compute capability before 8.0): it runs, slower than fp32,
    which ``auto`` resolves to there. None where there is nothing to say (fp32, a CPU, a GPU
    that computes in bf16). ``key``: the setting to name, ``train.precision`` or an option
    such as ``--precision``."""
    device = torch.device(device)
    if precision not in ("bf16", "bf16-mixed") or device.type != "cuda":
        return None
    if bf16_support(device) == "native":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if key.startswith("--"):
        chosen, fp32, auto = f"{key} {precision}", f"{key} fp32", f"{key} auto"
    else:
        chosen, fp32, auto = f'{key} = "{precision}"', f'{key} = "fp32"', '"auto"'
    return (
        f"{chosen} on this GPU (compute capability {major}.{minor}; bf16 arithmetic needs 8.0 "
        "or later) runs emulated bf16, slower than fp32; a run with "
        f"{fp32} or {auto} (fp32 on this GPU) avoids it"
    )


def parameter_dtype(precision: str) -> torch.dtype:
    """Dtype the trained parameters (and so the optimizer states) are kept in."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast_context(
    precision: str, device: torch.device | str
) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16-mixed``; a no-op otherwise."""
    device = torch.device(device)
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def head_inputs(hidden: Tensor, weight: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """The log-prob head's inputs under ``precision``, the same in the training forward and in
    every scoring pass (so a step's first rewards are 0: the reference values are the policy's
    own numbers): ``bf16-mixed`` rounds the hidden states and the (fp32 master) lm_head weight to
    bf16, as autocast rounds a matmul's inputs; otherwise the hidden states take the weight's
    dtype."""
    if precision == "bf16-mixed":
        return hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return hidden, weight
