"""Sharded data parallelism (``train.fsdp = true``): parameters, gradients and optimizer states
split over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``), so each GPU holds about
1/N of them.

Wrapping (``shard_model``): every decoder layer is one FSDP unit (its parameters are gathered
for its forward and for its backward, then freed), and the root (embeddings, final norm,
lm_head) is one more that is *not* resharded after the forward: the loss head reads
``model.lm_head_weight`` after the forward (``engine/trainer.py``, ``engine/scoring.py``) and
finds the gathered parameter there; the gradient its ``autograd.Function`` writes is
reduce-scattered by FSDP's end-of-backward callback with the root's other gradients.

Compiled layers (``model.compile``, ``engine/compile.py``): ``compile_decoder_layers`` runs
first, then ``shard_model``; Dynamo compiles each layer's ``forward`` and FSDP's gather and
reshard hooks run eagerly around it, so sharding changes neither the graphs nor the parameter
names.

Reduction: the trainer divides the loss by the step's *global* pair count, so the gradient is
the SUM over ranks (not FSDP's default mean): ``set_gradient_divide_factor(1)`` with
``set_force_sum_reduction_for_comms`` (plain SUM collectives, which gloo and NCCL both have).
Every micro-batch's backward reduce-scatters its gradients (no ``no_sync`` accumulation: that
would keep full-size gradients, the memory FSDP is there to save), so every rank must run the
same number of forward/backward passes: the trainer and the scoring pass give a rank with less
work zero-weighted filler passes (see ``DPOTrainer.train_step`` and ``score_pairs``).

Precision (``engine/precision.py``): ``fp32`` and ``bf16`` shard the parameters in their dtype
and compute in it; ``bf16-mixed`` keeps fp32 sharded master parameters (and fp32 optimizer
states) and gathers them in bf16 (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``), gradients reduced in fp32.

Checkpoints: ``full_state_dict`` gathers the whole state dict onto rank 0's CPU (a collective),
which then writes the usual Hugging Face folder. Loading never builds the whole model on a rank
(``load_pretrained(..., shard=...)``, ``engine/checkpoint.py``): the ``CausalLM`` is built on the
meta device, sharded there (``shard_model(..., device=...)``: ``fully_shard`` works on meta
modules), ``to_empty`` allocates the local shards only (FSDP2 re-pads them), and each is filled
with its rows of every tensor, read from the safetensors files as that slice alone.
``local_region`` says which rows: the DTensor's own placements give them
(``compute_local_shape_and_global_offset``, checked against its local shape), so FSDP2's uneven
``torch.chunk`` split is matched exactly. The optimizer state is gathered the same way
(``full_optimizer_state_dict``) and stored in the plain ``optimizer.state_dict()`` form, so a
sharded run's checkpoint is a plain run's: ``--resume`` continues it sharded (rank 0's copy is
broadcast and every rank keeps its shard, ``load_full_optimizer_state_dict``), or in one process.

LoRA (``engine/lora.py``): the adapter is attached after sharding and is not FSDP's: the base
stays sharded and frozen (units with no trainable parameter gather and reshard, and
reduce-scatter nothing), the adapter is whole on every rank, its gradients all-reduced by the
trainer, and the merge adds each rank's rows of the update to its own shard.

In a world of one (no torchrun, or one process) ``train.fsdp`` changes nothing: there is no one
to share with, and the plain model is trained (``wanted``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdpo.engine import distributed


def wanted(fsdp: bool) -> bool:
    """Whether ``train.fsdp`` takes effect here: asked for, under a group of several ranks."""
    return bool(fsdp) and distributed.active()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``shard_model``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def mixed_precision_policy(precision: str) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # parameters gathered and reduced in their own dtype


def shard_model(
    model: torch.nn.Module, *, precision: str, device: torch.device | str | None = None
) -> torch.nn.Module:
    """Shard a ``CausalLM`` over the process group in place (module docstring); returns it.

    ``precision`` is a resolved policy (``fp32``, ``bf16`` or ``bf16-mixed``); the model's
    parameters must already be in its dtype (``parameter_dtype``). ``device``: the rank's
    device, where the shards will live; by default the parameters' own. A model on the meta
    device (``load_pretrained(..., shard=...)``) needs it: it stays on meta, sharded, until
    ``to_empty`` materialises the local shards."""
    if not distributed.active():
        raise RuntimeError(
            "shard_model needs a process group of more than one rank (torchrun "
            "--nproc_per_node=N with N > 1)"
        )
    if is_sharded(model):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "meta":
        raise ValueError(
            "shard_model of a model on the meta device needs device= (the rank's device, "
            "where its shards will be materialised)"
        )
    mesh = init_device_mesh(device.type, (distributed.world(),))
    policy = mixed_precision_policy(precision)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered root parameters (after a no-grad pass; a backward reshards itself)."""
    if is_sharded(model):
        model.reshard()


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded model's parameter, or its gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_region(t: Tensor) -> tuple[slice, ...]:
    """Where this rank's part of ``t`` lies in its global value, one slice per dimension: for a
    DTensor (a sharded parameter) its local shard as its own mesh and placements place it
    (FSDP2's dim-0 split: ``torch.chunk`` sizes, so the last ranks may hold fewer rows or
    none); all of ``t`` for a plain tensor. ``t.to_local()`` is exactly that region."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch 2.4 kept DTensor under torch.distributed._tensor
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = tuple(t.to_local().shape)
    if tuple(shape) != local:
        raise RuntimeError(
            f"a DTensor of global shape {tuple(t.shape)} placed as {t.placements} holds a "
            f"local shard of shape {local}, but its placements give {tuple(shape)}; this torch "
            "version splits tensors differently from what sdpo expects: load the model whole "
            "(train.fsdp = false) and report the torch version"
        )
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's global value (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole state dict on rank 0's CPU ({} on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """A sharded model's whole optimizer state on rank 0's CPU ({} on the other ranks), in the
    plain ``optimizer.state_dict()`` form (parameters numbered in ``param_groups`` order), so a
    checkpoint of a sharded run is one of a plain run; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return {}
    number: dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        ids = []
        for name in group["params"]:
            number.setdefault(name, len(number))
            ids.append(number[name])
        groups.append({**group, "params": ids})
    state = {number[name]: s for name, s in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a whole optimizer state (``optimizer.state_dict()`` form: a plain run's, or
    ``full_optimizer_state_dict``'s) into a sharded model's optimizer: rank 0's copy is
    broadcast and every rank keeps its shard; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = {id(p): name for name, p in model.named_parameters()}
    current = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(current) or len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the saved optimizer state has {len(saved)} parameters in "
            f"{len(state['param_groups'])} groups; this optimizer has {len(current)} in "
            f"{len(optimizer.param_groups)}"
        )
    name_of = {i: names[id(p)] for i, p in zip(saved, current, strict=True)}
    by_name = {
        "state": {name_of[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
