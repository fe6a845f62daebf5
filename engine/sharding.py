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
A model the caller sharded with its own ``fully_shard`` (the embedding API) is set so for each
step's passes alone (``summed_gradients``) and keeps its own setting otherwise.
Every micro-batch's backward reduce-scatters its gradients (no ``no_sync`` accumulation: that
would keep full-size gradients, the memory FSDP is there to save), so every rank must run the
same number of forward/backward passes: the trainer and the scoring pass give a rank with less
work zero-weighted filler passes (see ``DPOTrainer.train_step`` and ``score_pairs``).

Precision (``engine/precision.py``): ``fp32`` and ``bf16`` shard the parameters in their dtype
and compute in it; ``bf16-mixed`` keeps fp32 sharded master parameters (and fp32 optimizer
states) and gathers them in bf16 (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``), gradients reduced in fp32. A model the caller sharded computes in the
dtype its own ``MixedPrecisionPolicy`` gathers in: ``auto`` takes it, and an explicit precision
it contradicts is refused (``model_precision``).

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

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sdpo.engine import distributed
from sdpo.engine.precision import parameter_dtype, resolve_precision


def wanted(fsdp: bool) -> bool:
    """Whether ``train.fsdp`` takes effect here: asked for, under a group of several ranks."""
    return bool(fsdp) and distributed.active()


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 modules (``fully_shard``) in ``model``, itself included, outermost first; for a
    ``PackedCausalLM``, those of the Hugging Face model it wraps too (kept out of its module
    tree), whose root holds the embeddings and lm_head, where the caller sharded that model
    and not the wrapper."""
    from torch.distributed.fsdp import FSDPModule

    trees = [model]
    wrapped = getattr(model, "hf_model", None)
    if isinstance(wrapped, torch.nn.Module) and wrapped is not model:
        trees.append(wrapped)
    found: dict[int, torch.nn.Module] = {}
    for tree in trees:
        for m in tree.modules():
            if isinstance(m, FSDPModule):
                found.setdefault(id(m), m)
    return list(found.values())


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 modules: ``shard_model``'s, or a caller's ``fully_shard``
    of the root, of its layers alone, or of a model it wraps (sharded parameters gather in
    collectives, so every rank must run as many passes)."""
    return bool(fsdp_modules(model))


def check_trainable_sharded(model: torch.nn.Module, who: str) -> None:
    """A sharded model trains its sharded parameters (DTensors) or, on a frozen sharded base,
    whole ones alone (a LoRA adapter, summed over ranks by the trainer), never both: the
    gradient norm, clipping and the optimizer's multi-tensor update take one kind or the
    other. A caller that sharded the decoder layers and not the root (embeddings, final norm,
    lm_head whole on every rank) is refused before any work, naming the missing call, and so
    is one whose trainable parameters are sharded over a device mesh of fewer ranks than the
    default group's: sdpo deals each rank its own pairs, and FSDP adds the gradients over the
    mesh alone, so the ranks outside it would never add theirs (a mesh of every rank, or a 2-D
    one of every rank for hybrid sharding, trains)."""
    ranks = distributed.world()
    meshes = sorted(
        {p.device_mesh.size() for p in model.parameters() if p.requires_grad and is_dtensor(p)}
    )
    if any(size != ranks for size in meshes):
        size = next(size for size in meshes if size != ranks)
        raise ValueError(
            f"{who}: the model's trainable parameters are sharded with FSDP2 (fully_shard) over "
            f"a device mesh of {size} rank(s), and sdpo deals the pairs over all {ranks} ranks "
            "of the default group, whose gradients FSDP would add over that mesh alone: shard "
            f"it over a mesh of all {ranks} ranks (init_device_mesh(device_type, ({ranks},)), or "
            "a 2-D mesh of all of them for hybrid sharding), every rank calling with its replica"
        )
    kinds = {is_dtensor(p) for p in model.parameters() if p.requires_grad}
    if len(kinds) < 2:
        return
    whole = [n for n, p in model.named_parameters() if p.requires_grad and not is_dtensor(p)]
    raise ValueError(
        f"{who}: the model trains parameters sharded with FSDP2 (fully_shard) beside whole "
        f"ones ({', '.join(whole[:3])}{' ...' if len(whole) > 3 else ''}): shard the root "
        "too, fully_shard(model) after its layers, so that every trainable parameter is sharded"
    )


def gathered_head_weight(model: torch.nn.Module) -> Tensor:
    """``model.lm_head_weight`` as the log-prob head reads it, after the forward: whole. Under
    FSDP2 the module that holds it must gather it in the forward and keep it after
    (``shard_model``'s root does, and so does a root ``fully_shard`` with its default
    ``reshard_after_forward``); a root sharded with ``reshard_after_forward=True`` has freed it
    again, and a unit of the lm_head alone never ran its forward: the head would meet this
    rank's shard. Refused at the first forward, before any update, naming the setting."""
    weight = model.lm_head_weight
    if is_dtensor(weight):
        raise RuntimeError(
            "the lm_head weight is still sharded when the log-prob head reads it, after the "
            "forward (a DTensor): shard it with the root, fully_shard(model, "
            "reshard_after_forward=False) after the layers (a root's default, None, keeps it "
            "gathered too), not with reshard_after_forward=True nor in a unit of its own, "
            "whose forward sdpo never calls"
        )
    return weight


def param_groups(module: torch.nn.Module) -> list[Any]:
    """The FSDP2 parameter groups of a ``fully_shard`` module: torch 2.12 and newer keep a
    list of them (``_fsdp_param_groups``, one per mesh), earlier releases (2.11 among them)
    one group or None (``_fsdp_param_group``)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


@contextlib.contextmanager
def summed_gradients(model: torch.nn.Module) -> Iterator[None]:
    """FSDP's gradient reduction set to a plain SUM over ranks for the block (the trainer
    divides the loss by the step's global pair count: see Reduction in the module docstring),
    and each module's own setting given back after it. ``shard_model`` sets the SUM for good;
    a model the caller sharded with ``fully_shard`` averages by default, which gave gradients
    (and their clipping norm) 1/N of one process's. FSDP has setters for both settings but no
    getters: the previous values are read from its parameter groups."""
    saved = []
    for module in fsdp_modules(model):
        groups = param_groups(module)
        saved.append(
            (module, [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups])
        )
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    try:
        yield
    finally:
        for module, values in saved:
            groups = param_groups(module)
            for group, (factor, force_sum) in zip(groups, values, strict=True):
                group.gradient_divide_factor = factor
                group.force_sum_reduction_for_comms = force_sum


def _policy_dtypes(
    model: torch.nn.Module,
) -> list[tuple[str, bool, torch.dtype, torch.dtype, torch.dtype]]:
    """Each FSDP2 parameter of ``model``: (its module's name, whether it trains, its sharded
    dtype, the dtype FSDP gathers it in for the forward and backward, the dtype it reduces
    its gradient in), as FSDP reads its ``MixedPrecisionPolicy``: ``param_dtype`` None is the
    sharded dtype, ``reduce_dtype`` None is the gathered one."""
    found = []
    for where, group in _named_param_groups(model):
        policy = group.mp_policy  # FSDP sets each parameter's dtypes from it lazily
        for p in group.fsdp_params:
            orig = p.sharded_param.dtype
            gathered = policy.param_dtype if orig.is_floating_point else None
            gathered = gathered or orig
            reduced = policy.reduce_dtype or gathered
            found.append((where, p.sharded_param.requires_grad, orig, gathered, reduced))
    return found


def _policy_outputs(model: torch.nn.Module) -> list[tuple[str, torch.dtype | None]]:
    """Each FSDP2 module of ``model`` that holds parameters: (its name, the dtype its
    ``MixedPrecisionPolicy`` casts its forward's floating outputs to: ``output_dtype``, None for
    none)."""
    return [(where, group.mp_policy.output_dtype) for where, group in _named_param_groups(model)]


def _named_param_groups(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """Each FSDP2 parameter group of ``model``: (its module's name, "the root" for the root;
    the group)."""
    names = _module_names(model)
    for module in fsdp_modules(model):
        where = names.get(id(module)) or "the root"
        for group in param_groups(module):
            yield where, group


def _module_names(model: torch.nn.Module) -> dict[int, str]:
    """Each module of ``model`` (and of the Hugging Face model a ``PackedCausalLM`` wraps) by id:
    its name in the tree ("" for the root)."""
    names = {id(m): n for n, m in model.named_modules()}
    wrapped = getattr(model, "hf_model", None)
    if isinstance(wrapped, torch.nn.Module):
        for n, m in wrapped.named_modules():
            names.setdefault(id(m), n)
    return names


def policy_precision(model: torch.nn.Module) -> str | None:
    """The precision a model sharded with FSDP2 by its caller trains in as its sharding says:
    ``bf16`` for bf16 shards, ``bf16-mixed`` for fp32 shards gathered in bf16
    (``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``); None where it says nothing (not
    sharded, or fp32 shards gathered in fp32: ``auto`` resolves by the device, as for a plain
    model). ``train.precision = "auto"`` takes it (``model_precision``)."""
    dtypes = _policy_dtypes(model)
    if any(orig == torch.bfloat16 for _, _, orig, _, _ in dtypes):
        return "bf16"
    if any(gathered == torch.bfloat16 for _, _, _, gathered, _ in dtypes):
        return "bf16-mixed"
    return None


def model_precision(
    precision: str,
    model: torch.nn.Module,
    device: torch.device | str,
    *,
    who: str,
    training: bool = True,
) -> str:
    """The resolved precision ``model`` trains in (``training``) or is scored in:
    ``resolve_precision``'s, where ``auto`` on a model its caller sharded is the one its
    sharding says (``policy_precision``); an explicit one its ``MixedPrecisionPolicy``
    contradicts is refused (``check_policy_precision``)."""
    implied = policy_precision(model) if precision == "auto" else None
    resolved = implied or resolve_precision(precision, device)
    # a refusal names the caller's "auto" beside what it resolved to
    how = ", as the sharding says" if implied else ", as on this device"
    named = f"'auto' (here {resolved!r}{how})" if precision == "auto" else None
    check_policy_precision(model, resolved, who=who, training=training, named=named)
    return resolved


# the dtype each precision computes in, and the least precise dtype it reduces gradients in
_COMPUTE = {
    "fp32": (torch.float32,),
    "bf16": (torch.bfloat16,),
    "bf16-mixed": (torch.bfloat16, torch.float32),
}
_REDUCE = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}


def check_policy_precision(
    model: torch.nn.Module,
    precision: str,
    *,
    who: str,
    training: bool = True,
    named: str | None = None,
) -> None:
    """A model its caller sharded with FSDP2 computes in the dtype its ``MixedPrecisionPolicy``
    gathers the parameters in, whatever the trainer's precision says: fp32 shards gathered in
    bf16 under ``fp32`` computed in bf16 while the trainer reported fp32, and a policy that
    reduces the gradients in bf16 (``param_dtype=torch.bfloat16`` without ``reduce_dtype``)
    summed the ranks' gradients in bf16 under ``bf16-mixed``, which reduces them in fp32.
    Refused before any work, naming the policy's setting and the precision that matches it.
    So is an ``output_dtype`` below the precision's (bf16 under ``fp32``): FSDP casts the
    module's outputs to it, and the next module and the head read them rounded while the
    trainer reported fp32. The dtype the precision computes in is kept, and so are fp32
    outputs: the root's change no value the head reads, and a layer's under ``bf16`` fails at
    the next layer's first matmul, on its dtypes (torch's error), rounding nothing.
    ``bf16-mixed`` over fp32 shards gathered in fp32 trains (its autocast computes in bf16);
    parameters sharded in another dtype than ``precision``'s are ``cast_for_precision``'s to
    refuse. Without ``training`` (a scoring pass: no gradient) the reduction is not read.
    ``named``: the precision as the refusal names it (the caller's ``auto`` and what it took),
    ``precision`` by default."""
    named = named or repr(precision)
    for where, output in _policy_outputs(model):
        if output not in (None, torch.float32, *_COMPUTE[precision]):
            raise ValueError(
                f"{who}: precision {named} computes in {_COMPUTE[precision][0]}, and the "
                f"model's FSDP2 MixedPrecisionPolicy (fully_shard(..., mp_policy=...)) of "
                f"{where!r} casts its forward's outputs to {output} (output_dtype), rounding "
                "the activations the next module and the log-prob head read: shard it with "
                "output_dtype=None"
            )
    stored = parameter_dtype(precision)
    for where, trains, orig, gathered, reduced in _policy_dtypes(model):
        if orig != stored:
            continue
        if gathered not in _COMPUTE[precision]:
            matching = {
                (torch.float32, torch.bfloat16): "'bf16-mixed' (fp32 shards, bf16 compute; "
                "with reduce_dtype=torch.float32 in the policy) or 'auto', which takes the "
                "policy's",
            }.get((orig, gathered))
            raise ValueError(
                f"{who}: precision {named} computes in {_COMPUTE[precision][0]}, and the "
                f"model's FSDP2 MixedPrecisionPolicy (fully_shard(..., mp_policy=...)) of "
                f"{where!r} gathers its {orig} parameters in {gathered} for the forward and "
                f"backward, so the {'training' if training else 'scoring'} would run in that "
                "dtype: "
                + (
                    f"{'train' if training else 'score'} it with precision {matching}, or "
                    if matching
                    else ""
                )
                + f"shard it with param_dtype=None (or {_COMPUTE[precision][0]})"
            )
        if training and trains and reduced.itemsize < _REDUCE[precision].itemsize:
            raise ValueError(
                f"{who}: precision {named} sums the gradients over ranks in "
                f"{_REDUCE[precision]}, and the model's FSDP2 MixedPrecisionPolicy of {where!r} "
                f"reduces them in {reduced} (FSDP reduces in param_dtype where reduce_dtype is "
                f"None): set reduce_dtype={_REDUCE[precision]} in its MixedPrecisionPolicy"
            )


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
    """Free the gathered parameters (after a no-grad pass; a backward reshards itself): the
    root's, kept after the forward, and any other module's a caller kept."""
    for module in fsdp_modules(model):
        module.reshard()


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
    checkpoint of a sharded run is one of a plain run; a collective. It is the state of this
    moment, every tensor a copy: the gather returns AdamW's step counts (0-dim tensors, whole
    on every rank) as they are, the optimizer's own, which its next step increments in place;
    a state kept while training went on (an in-memory snapshot, a checkpoint written later)
    resumed with the later count beside the earlier moments, and its bias correction was off."""
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
    live = {
        t.untyped_storage().data_ptr()
        for values in optimizer.state.values()
        for t in values.values()
        if isinstance(t, Tensor) and not is_dtensor(t)
    }

    def own(value: Any) -> Any:
        if isinstance(value, Tensor) and value.untyped_storage().data_ptr() in live:
            return value.clone()
        return value

    state = {
        number[name]: {k: own(v) for k, v in s.items()} for name, s in by_name["state"].items()
    }
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a whole optimizer state (``optimizer.state_dict()`` form: a plain run's, or
    ``full_optimizer_state_dict``'s) into a sharded model's optimizer: rank 0's copy is
    broadcast and every rank keeps its shard; a collective. The other ranks' ``state`` is not
    read: each may pass what ``full_optimizer_state_dict`` gave it ({}), as a caller that saves
    ``DPOTrainer.state_dict()`` on every rank and loads each rank's own does. Rank 0's state is
    checked there and its verdict sent to every rank, so a state that does not fit this
    optimizer is refused by all of them, none left waiting in the broadcast."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    by_name: dict[str, Any] = {}
    problem = None
    if distributed.is_main():
        problem = _optimizer_state_problem(optimizer, state)
        if problem is None:
            names = {id(p): name for name, p in model.named_parameters()}
            current = [p for group in optimizer.param_groups for p in group["params"]]
            saved = [i for group in state["param_groups"] for i in group["params"]]
            name_of = {i: names[id(p)] for i, p in zip(saved, current, strict=True)}
            by_name = {
                "state": {name_of[i]: s for i, s in state["state"].items()},
                "param_groups": [
                    {**g, "params": [name_of[i] for i in g["params"]]}
                    for g in state["param_groups"]
                ],
            }
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise ValueError(problem)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _optimizer_state_problem(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> str | None:
    """Why a whole optimizer state cannot be loaded into ``optimizer`` (None: it can)."""
    if not state:
        return (
            "this training state has no optimizer state to restore (rank 0's: a sharded run "
            "gathers it there; or it was written by an older sharded run, train.fsdp = true, "
            "which kept none): load rank 0's state on rank 0, or start that run again"
        )
    current = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(current) or len(state["param_groups"]) != len(optimizer.param_groups):
        return (
            f"the saved optimizer state has {len(saved)} parameters in "
            f"{len(state['param_groups'])} groups; this optimizer has {len(current)} in "
            f"{len(optimizer.param_groups)}"
        )
    return None
