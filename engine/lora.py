"""LoRA adapters on the decoder's linear projections, built for stepwise DPO.

Why it exists: full fine-tuning keeps a gradient and two AdamW states for every weight; a LoRA
adapter trains a rank-r update ``W + (alpha / r) * B @ A`` of chosen projections and freezes
everything else, so gradients and optimizer states shrink to the adapter's size. sDPO fits it
well: each step attaches a fresh adapter to M_{t-1}, trains it, and merges it back
(``merge_lora``), so M_t is a plain model again: the next step's reference, the step
checkpoints (Hugging Face folders with unchanged tensor names) and every scoring path stay as
they are for full fine-tuning.

What this module owns (torch only): ``LoRALinear``, the wrapper that replaces a targeted
``nn.Linear`` in every decoder layer; ``attach_lora`` / ``merge_lora``; the adapter's state
(``lora_state_dict`` / ``load_lora_state_dict``, names as in the model:
``model.layers.0.self_attn.q_proj.lora_A``) and its PEFT form (``peft_adapter_files``:
``base_model.model.<module>.lora_A.weight`` plus an ``adapter_config.json`` dict, so PEFT loads
the adapter onto M_{t-1}).

Precision: the adapter is kept in fp32 whatever the base weights' dtype (as PEFT does by
default), so its optimizer states are fp32 too; the forward casts A and B to the activation
dtype (bf16 parameters: bf16 compute, fp32 gradients through the cast). ``DPOTrainer`` leaves
``adapter_parameters`` out of its cast to the precision's dtype.

The wrapper holds the base layer's own ``weight`` / ``bias`` Parameters under the same names,
so while attached the model's state dict is the base one plus ``*.lora_A`` / ``*.lora_B``; it
works under gradient checkpointing (the dropout mask is replayed from the saved RNG state) and
inside regionally compiled decoder layers (``engine/compile.py``).

Sharded models (``train.fsdp``, ``engine/sharding.py``): the adapter is attached after the base
is sharded and stays out of FSDP: A and B are plain tensors, whole on every rank (an adapter is
a fraction of a percent of the model), their gradients summed over ranks as data parallel sums
them (``DPOTrainer``). The wrapper keeps the wrapped ``nn.Linear`` (unregistered) and reads the
weight from it in the forward: FSDP2 puts a layer's gathered weight on the module it sharded,
while the wrapper's registered ``weight`` is the sharded Parameter (a DTensor) the state dict
and the checkpoints gather. The merge adds ``scale * B[rows] @ A`` to this rank's rows of W
only (``merged_linear``), with no communication.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the seven projections of a Llama-family decoder layer, and where each lives
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of a causal LM's tensor names
# PEFT's shorthand for every linear layer but the output head: here, the seven projections
ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """``y = x @ W^T + b + scale * dropout(x) @ A^T @ B^T`` with W, b frozen; ``scale`` is
    ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora`` (PEFT's definitions).

    ``lora_A`` (r, in) is drawn kaiming-uniform (bound 1/sqrt(in), as PEFT draws it) from
    ``generator`` on the CPU, so the draw does not depend on the device; ``lora_B`` (out, r)
    starts at zero, so a fresh adapter leaves the layer's outputs unchanged, bit for bit."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # the wrapped module, not registered (no second name for its Parameters): a sharded
        # layer's gather sets the whole weight on it, and merge_lora puts it back
        object.__setattr__(self, "base", base)
        self.weight = base.weight  # the same Parameter objects: names and identity kept
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        # PEFT's scaling: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (rsLoRA)
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        device = self.weight.device
        self.lora_A = nn.Parameter(a.to(device))  # (r, in) fp32
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=torch.float32, device=device)
        )  # (out, r) fp32
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # the base module's weight: ``self.weight`` itself, or under FSDP the gathered one
        y = F.linear(x, self.base.weight, self.base.bias)  # (N, out)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        update = F.linear(F.linear(self.dropout(x), a), b)  # (N, r) -> (N, out)
        return y + update * self.scale

    def merged_linear(self, rounding: Tensor | None = None) -> nn.Linear:
        """The wrapped ``nn.Linear`` with ``W += scale * B @ A`` (formed in fp32 or wider,
        rounded once to W's dtype), holding the same weight and bias Parameters. A sharded
        weight (DTensor) gets this rank's rows of the update, computed from its rows of B.
        ``rounding`` (float64, (2,)), if given, gets the squared norms of what the rounding
        dropped from the update and of the update added to it (see ``merge_lora``)."""
        base = self.base
        if base.weight is not self.weight or base.bias is not self.bias:
            raise RuntimeError(
                f"merge_lora: the wrapped layer's parameters ({self.extra_repr()}) are not the "
                "ones the adapter was attached to (a sharded layer still gathered: reshard "
                "before merging)"
            )
        with torch.no_grad():
            _add_update_(self.weight, self.lora_A, self.lora_B, scale=self.scale, rounding=rounding)
        return base

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"
        )


def _add_update_(
    weight: Tensor, a: Tensor, b: Tensor, *, scale: float, rounding: Tensor | None = None
) -> None:
    """``weight += scale * b @ a`` in place, formed in fp32 or wider and rounded once (with
    ``rounding``: the squared norms of the rounding's error and of the update are added to
    it, over the rows this rank holds). A DTensor
    weight sharded by rows (FSDP2's ``Shard(0)``, or replicated) gets its local rows only: every
    rank holds the whole adapter, so each cuts its own rows of ``b`` (no communication) and
    the full (out, in) update never exists."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        from torch.distributed.tensor import distribute_tensor

        placements = weight.placements
        if not all(p.is_replicate() or p.is_shard(dim=0) for p in placements):
            raise NotImplementedError(
                f"merging a LoRA adapter into a weight sharded as {placements}: only row "
                "sharding (Shard(0), FSDP2's default) and replication are supported"
            )
        b = distribute_tensor(
            b.detach(), weight.device_mesh, placements, src_data_rank=None
        ).to_local()  # (local out, r): this rank's rows, as the weight's own
        weight = weight.to_local()  # the local shard itself (no grad mode: no copy)
        if b.shape[0] != weight.shape[0]:
            raise RuntimeError(
                f"LoRA merge: {b.shape[0]} rows of B on this rank, {weight.shape[0]} of the "
                "weight's shard"
            )
    delta = (b.to(compute) @ a.to(compute)) * scale  # (out or local out, in)
    before = weight.to(compute)  # W itself when W is fp32 or wider
    rounded = (before + delta).to(weight.dtype)
    if rounding is not None:
        dropped = (rounded.to(compute) - before) - delta  # the first difference is exact
        rounding += torch.stack(
            [torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in (dropped, delta)]
        )
    weight.copy_(rounded)


def _layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.model.layers
    except AttributeError as exc:
        raise TypeError(
            f"LoRA expects decoder layers at model.model.layers (sdpo's CausalLM, or a "
            f"PackedCausalLM of a Llama-like Hugging Face model); "
            f"{type(model).__name__} has none"
        ) from exc


def check_targets(targets: str | Iterable[str]) -> list[str]:
    """``targets`` as a list, or a ValueError naming the unknown ones and the valid names.
    ``"all-linear"`` (alone, or as a one-item list, as PEFT's ``target_modules`` takes it) is
    every projection, ``LORA_TARGETS``."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets == [ALL_LINEAR]:
        return list(LORA_TARGETS)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        what = f"unknown LoRA target(s) {unknown}" if unknown else "no LoRA targets"
        raise ValueError(
            f"{what}: valid targets are {', '.join(LORA_TARGETS)}, or {ALL_LINEAR!r} for all"
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets {targets} name a module twice")
    return targets


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(qualified name, wrapper) of every attached adapter, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters (A then B of each wrapper, in module order)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def attach_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: str | Iterable[str] = LORA_TARGETS,
    use_rslora: bool = False,
    seed: int,
) -> list[nn.Parameter]:
    """Wrap the ``targets`` projections of every decoder layer in a fresh ``LoRALinear`` and
    freeze every other parameter (embeddings, norms, lm_head, the wrapped weights). Returns the
    adapter's parameters (the only ones with ``requires_grad``). The A matrices are drawn from
    one generator seeded with ``seed``, layer by layer in ``targets``' order. ``merge_lora``
    restores the ``requires_grad`` flags found here."""
    targets = check_targets(targets)
    if lora_modules(model):
        raise RuntimeError("attach_lora: the model already holds LoRA adapters; merge them first")
    model._lora_frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for layer in _layers(model):
        for name in targets:
            parent = getattr(layer, _PARENT[name])
            base = getattr(parent, name)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"LoRA target {name} is a {type(base).__name__}, not nn.Linear")
            wrapper = LoRALinear(
                base,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                use_rslora=use_rslora,
                generator=generator,
            )
            setattr(parent, name, wrapper)
    return adapter_parameters(model)


def merge_lora(model: nn.Module) -> Tensor:
    """Fold every adapter into its base weight (``W += scale * B @ A``, in fp32, rounded once)
    and put the plain ``nn.Linear`` back: tensor names, state dict and checkpoints are the
    base model's again. The ``requires_grad`` flags from before ``attach_lora`` come back.

    Returns (float64, on the CPU) the squared norms of the part of the update that rounding
    to W's dtype dropped and of the whole update, summed over the merged weights (a sharded
    model's: over this rank's rows; ``merge_rounding_loss`` forms the share). fp32 weights
    keep the update to float rounding; bf16 weights (``train.precision = "bf16"``) drop every
    entry of it smaller than half a bf16 step of the weight (2^-9 to 2^-8 of its size), which at
    sDPO's learning rates can be most of a step's update."""
    modules = lora_modules(model)
    device = modules[0][1].weight.device if modules else torch.device("cpu")
    rounding = torch.zeros(2, dtype=torch.float64, device=device)
    for qualified, module in modules:
        parent_name, _, name = qualified.rpartition(".")
        setattr(model.get_submodule(parent_name), name, module.merged_linear(rounding))
    for p, flag in getattr(model, "_lora_frozen", []):
        p.requires_grad_(flag)
    model._lora_frozen = []
    return rounding.cpu()


def merge_rounding_loss(rounding: Tensor) -> float:
    """The share of a merged update's norm that rounding dropped, ``|dropped| / |update|``
    (0 for an all-zero update), from ``merge_lora``'s squared norms."""
    dropped, update = rounding.tolist()
    return math.sqrt(dropped / update) if update > 0 else 0.0


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors (detached copies, fp32) by their names in the model
    (``model.layers.0.self_attn.q_proj.lora_A``)."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{name}.lora_A"] = module.lora_A.detach().clone()
        out[f"{name}.lora_B"] = module.lora_B.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from ``lora_state_dict``) into the attached adapters, in place (the
    Parameter objects, and so an optimizer's references to them, are kept). Every name and
    shape must match."""
    expected = {}
    for name, module in lora_modules(model):
        expected[f"{name}.lora_A"] = module.lora_A
        expected[f"{name}.lora_B"] = module.lora_B
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match the attached adapters: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]} (were rank and targets the same?)"
        )
    for name, param in expected.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(
                f"LoRA tensor {name} has shape {tuple(state[name].shape)}, the adapter "
                f"{tuple(param.shape)} (was lora.rank the same?)"
            )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(state[name])


def peft_adapter_files(
    state: dict[str, Tensor],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str | Iterable[str],
    base_model: str,
    revision: str | None = None,
    use_rslora: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, adapter_config dict) of PEFT's LoRA layout for ``state`` (``lora_state_dict``):
    ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r),
    to be written as ``adapter_model.safetensors`` and ``adapter_config.json``.
    ``base_model``: the base model's folder or hub id (``base_model_name_or_path``);
    ``revision``: a hub base model's commit (branch or tag), which PEFT's
    ``AutoPeftModelForCausalLM`` loads the base at (None: its default branch)."""
    tensors = {f"{PEFT_PREFIX}{name}.weight": t.contiguous() for name, t in state.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(check_targets(targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": use_rslora,
        "use_dora": False,
        "revision": revision,
    }
    return tensors, config
