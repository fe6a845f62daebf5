"""Hugging Face checkpoint folders: load, save, and fingerprint.

A checkpoint is a folder with ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` listed in ``model.safetensors.index.json``; exactly what
``transformers`` writes and reads, so the engine's outputs load with
``AutoModelForCausalLM.from_pretrained`` and give the same logits. Saving goes through
``atomic_directory``: a crash never leaves a half-written checkpoint under the real name.

Sharded loading (``load_pretrained(..., shard=...)``, what ``train.fsdp`` uses): the model is
built and sharded on the meta device, only each rank's shards are allocated, and each reads its
own rows of every tensor from the files (``get_slice(name)[rows]``), so a model larger than one
device loads; the same checks of names and shapes run first (``_checked_layout``). The model
holds no buffer to recompute after ``to_empty``: its rotary tables are computed in each forward.

Fingerprints key the reference log-prob caches: ``model_fingerprint`` hashes the weights in
memory, ``checkpoint_fingerprint`` the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdpo.engine.files import atomic_directory
from sdpo.engine.model import (
    SUPPORTED_MODEL_TYPES,
    CausalLM,
    ConfigError,
    ModelConfig,
    UnsupportedConfig,
)
from sdpo.engine.precision import parameter_dtype

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Tensors some checkpoints carry that this model does not need: old Llama checkpoints stored the
# rotary inverse frequencies (recomputed from the config here).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Bytes hashed per piece, to keep the host copy of a GPU tensor small.
_HASH_PIECE_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file") from e


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint folder."""
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist or is not a folder")
    if not config_path.is_file():
        if (folder / "adapter_config.json").is_file():
            raise CheckpointError(_adapter_folder_message(folder))
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}; a model folder needs {CONFIG_NAME} and "
            f"{SINGLE_WEIGHTS_NAME} (or {INDEX_NAME} with its shards), as written by "
            "transformers' save_pretrained"
        )
    try:
        return ModelConfig.from_hf_dict(_read_json(config_path))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_path}: {e}") from e


def _adapter_folder_message(folder: Path) -> str:
    """What to do with a PEFT adapter folder given where a model folder goes: sdpo's own
    ``step-<t>/adapter/`` sits inside the model it was merged into; any other is merged onto
    its base first."""
    head = (
        f"{folder} holds a PEFT adapter (adapter_config.json), not a model; sdpo reads whole models"
    )
    parent = folder.resolve().parent
    if (parent / CONFIG_NAME).is_file() and (
        (parent / SINGLE_WEIGHTS_NAME).is_file() or (parent / INDEX_NAME).is_file()
    ):
        return f"{head}: the model with this adapter merged in is {parent}; give that folder"
    try:
        base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    except CheckpointError:
        base = None
    on = f"its base model ({base})" if isinstance(base, str) and base else "its base model"
    return (
        f"{head}: merge it onto {on} with PEFT (PeftModel.from_pretrained(base, adapter)"
        ".merge_and_unload(), then save_pretrained(DIR) and the base's tokenizer files into DIR) "
        "and give DIR"
    )


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: safetensors file} for a checkpoint folder (single file or sharded)."""
    folder = Path(path)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index_path}: no 'weight_map' dict naming each tensor's shard file"
            )
        files = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(
                    f"shard file {shard_path} listed in {index_path} is missing; "
                    "copy the complete checkpoint folder again"
                )
            files[shard] = shard_path
        return {name: files[shard] for name, shard in weight_map.items()}
    single = folder / SINGLE_WEIGHTS_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (
        f" (found {others[:3]}: convert them to safetensors, e.g. load with transformers and "
        "save_pretrained(..., safe_serialization=True))"
        if others
        else ""
    )
    raise CheckpointError(
        f"{folder} has neither {SINGLE_WEIGHTS_NAME} nor {INDEX_NAME}{hint}; "
        "only safetensors checkpoints are supported"
    )


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    shard: Callable[[CausalLM], object] | None = None,
) -> CausalLM:
    """Load a HF checkpoint folder into a :class:`CausalLM` in ``dtype`` on ``device``.

    Every tensor name and shape is checked against the config before any weight is read; with
    tied embeddings a stored ``lm_head.weight`` is ignored (HF usually does not store it).

    ``shard``: load a model too large for one device, sharded. ``shard(model)`` gets the model
    on the meta device, already in ``dtype``, and shards it in place (``sharding.shard_model``,
    after ``compile_decoder_layers`` if wanted); then only the local shards are materialised on
    ``device`` and each is filled with its own rows of every tensor, read from the files as
    that slice alone (``safe_open(...).get_slice(name)[rows]``), so no rank ever holds a whole
    tensor of the model. The result is bitwise the model ``load_pretrained`` + ``shard_model``
    give."""
    if not dtype.is_floating_point:
        raise ValueError(f"load_pretrained needs a floating-point dtype, got {dtype}")
    folder = Path(path)
    config, files, by_file, expected = _checked_layout(folder)
    with torch.device("meta"):
        model = CausalLM(config)
    device = torch.device(device)
    if shard is not None:
        return _load_local_shards(model.to(dtype), by_file, expected, shard=shard, device=device)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        # safetensors reads straight onto the target device; the cast happens there.
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                if name in expected:
                    state[name] = f.get_tensor(name).to(dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _load_local_shards(
    model: CausalLM,
    by_file: dict[Path, list[str]],
    expected: dict[str, tuple[int, ...]],
    *,
    shard: Callable[[CausalLM], object],
    device: torch.device,
) -> CausalLM:
    """``load_pretrained(..., shard=...)``: shard on meta, materialise the local shards on
    ``device``, read each one's rows."""
    from sdpo.engine.sharding import is_dtensor, local_region

    shard(model)
    # The model computes its rotary tables in every forward (``rope_inverse_frequencies``), so
    # every buffer it holds, if any, comes from the checkpoint; one that does not would be left
    # as uninitialised memory by to_empty: refuse it rather than train on garbage.
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    if tensors.keys() != expected.keys():
        unknown = sorted(tensors.keys() - expected.keys())
        lost = sorted(expected.keys() - tensors.keys())
        raise RuntimeError(
            f"the sharded model's tensors are not the checkpoint's: {_few(unknown)} are not "
            f"in the checkpoint (nothing would fill them), {_few(lost)} are gone after "
            "sharding; load_pretrained(shard=...) expects shard() to wrap the model, not to "
            "add or rename tensors"
        )
    model.to_empty(device=device)  # the local shards only (FSDP2 re-pads them)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in names:
                    if name not in expected:
                        continue
                    target = tensors[name]
                    # no grad: a DTensor's to_local() is its local shard itself, no copy
                    local = target.to_local() if is_dtensor(target) else target
                    if local.numel() == 0:  # a rank past the last row of a short tensor
                        continue
                    rows = f.get_slice(name)[local_region(target)]
                    local.copy_(rows.to(dtype=local.dtype))
    return model


def check_pretrained(path: str | os.PathLike) -> ModelConfig:
    """Check a HF checkpoint folder without reading any weight: config, index, shard files,
    tensor names and every stored shape against the config. Returns its ``ModelConfig``; raises
    ``CheckpointError`` naming the file or tensor. Cheap (headers only), so a run can check its
    model before it touches its output folder."""
    return _checked_layout(Path(path))[0]


def _checked_layout(
    folder: Path,
) -> tuple[ModelConfig, dict[str, Path], dict[Path, list[str]], dict[str, tuple[int, ...]]]:
    config = read_model_config(folder)
    files = weight_files(folder)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    unexpected = [
        name
        for name in files
        if name not in expected
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    missing = [name for name in expected if name not in files]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_few(unexpected)}")
        raise CheckpointError(
            f"weights in {folder} do not match its {CONFIG_NAME} "
            f"(model_type {config.model_type!r}, {config.num_hidden_layers} layers, "
            f"tie_word_embeddings={config.tie_word_embeddings}, "
            f"attention_bias={config.attention_bias}): {'; '.join(parts)}. Check that "
            "config.json belongs to these weights"
        )

    # Check every stored shape against the config (headers only) before reading any weight.
    stored: dict[str, tuple[int, ...]] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(
                        f"tensor {name!r} is listed for {file.name} in {INDEX_NAME} but is not "
                        "in that file; the index and the shards are out of step"
                    )
                stored[name] = tuple(f.get_slice(name).get_shape())
    for name, shape in expected.items():
        if stored[name] != shape:
            raise CheckpointError(
                f"tensor {name!r} in {files[name]} has shape {stored[name]}, but {CONFIG_NAME} "
                f"implies {shape}; check that config.json belongs to these weights"
            )
    return config, files, by_file, expected


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


# model.implementation: which code runs a model folder
IMPLEMENTATIONS = ("auto", "sdpo", "transformers")


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know of a model folder before loading it: the code that will run it
    (``"sdpo"``: sdpo's own decoder; ``"transformers"``: ``AutoModelForCausalLM`` wrapped in
    ``PackedCausalLM``), its model type, vocabulary size and context length (None: the config
    names none), and for transformers what sdpo's decoder does not implement in it (None when
    ``model.implementation = "transformers"`` chose it for a config sdpo's decoder runs)."""

    implementation: str
    model_type: str
    vocab_size: int
    max_position_embeddings: int | None
    unsupported: str | None = None
    # Gemma 2's final_logit_softcapping (transformers only): its log-probs come from the
    # PyTorch head for capped logits (``engine/hf.py``, ``logit_softcap``)
    logit_softcap: float | None = None
    # sdpo's decoder: the window of a Mistral/Qwen config's sliding layers (None where no
    # layer slides), which a named attention backend may lack (the runner checks it); None
    # for transformers, whose attention is its own
    sliding_window: int | None = None
    # a mixture of experts' router load-balancing loss coefficient as the run will train with
    # it (``sdpo.engine.hf.router_loss``); 0.0: a dense model, or that loss off
    router_aux_loss_coef: float = 0.0


def sdpo_unsupported(config: dict) -> str | None:
    """What of a ``config.json`` dict sdpo's own decoder does not implement (another model
    type, activation, rotary scaling), or None. A config with another problem is None here:
    ``check_pretrained`` names that problem."""
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (
            f"model_type {model_type!r} is not one sdpo's own decoder implements "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        ModelConfig.from_hf_dict(config)
    except UnsupportedConfig as e:
        return str(e)
    except ConfigError:
        return None
    return None


def resolve_implementation(path: str | os.PathLike, implementation: str = "auto") -> str:
    """``"sdpo"`` or ``"transformers"``: the code that runs the folder's model under
    ``model.implementation`` (``"auto"``: sdpo's decoder for the configs it implements,
    transformers for the others: another model type, activation or rotary scaling). ``"sdpo"``
    with a config sdpo's decoder does not implement is a ``CheckpointError``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown model implementation {implementation!r}; choose one of "
            f"{', '.join(IMPLEMENTATIONS)}"
        )
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if implementation == "transformers":
        return implementation
    if not config_path.is_file():
        return "sdpo"  # read_model_config names the missing file
    unsupported = sdpo_unsupported(_read_json(config_path))
    if unsupported is None:
        return "sdpo"
    if implementation == "sdpo":
        raise CheckpointError(
            f"{config_path}: {unsupported}; set model.implementation = "
            '"auto" or "transformers" to run it with transformers (AutoModelForCausalLM)'
        )
    return "transformers"


def check_model(
    path: str | os.PathLike,
    implementation: str = "auto",
    *,
    router_aux_loss_coef: float | None = None,
    router_key: str = "router_aux_loss_coef",
) -> ModelInfo:
    """Check a model folder for ``implementation`` (``IMPLEMENTATIONS``) without reading a
    weight: for sdpo's decoder ``check_pretrained``; for transformers the config (its class
    known to ``AutoModelForCausalLM``) and every stored tensor's name and shape against a
    model built from it on the meta device. ``router_aux_loss_coef``: the coefficient the
    model's router loss will be trained with instead of its config's (``sdpo.engine.hf.
    router_loss``); one other than 0 for a model without a router loss is refused, naming
    ``router_key``. Raises ``CheckpointError`` naming the file."""
    impl = resolve_implementation(path, implementation)
    if impl == "sdpo":
        config = check_pretrained(path)
        if router_aux_loss_coef:  # sdpo's decoder runs dense models only
            from sdpo.engine.hf import no_router_loss

            e = no_router_loss(
                router_key,
                router_aux_loss_coef,
                f"this {config.model_type} model",
                "sdpo's own decoder runs dense models only",
            )
            raise CheckpointError(f"{Path(path) / CONFIG_NAME}: {e}")
        return ModelInfo(
            implementation=impl,
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=config.sliding_window,
        )
    return _check_hf_layout(Path(path), router_aux_loss_coef, router_key)


def _check_hf_layout(folder: Path, coef: float | None, key: str) -> ModelInfo:
    try:
        import transformers
    except ImportError as e:  # not among sdpo's own requirements
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: this model runs with transformers' code (a model type or "
            "config sdpo's own decoder does not implement, or model.implementation = "
            '"transformers"), and transformers is not installed: install it '
            "(pip install transformers)"
        ) from e

    from sdpo.engine.hf import check_head, logit_softcap, router_loss

    if not (folder / CONFIG_NAME).is_file():
        read_model_config(folder)  # raises, naming the missing file
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        check_head(model)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: transformers cannot build a causal LM from it ({e})"
        ) from e
    try:
        router_coef = router_loss(model, coef, key=key)[0]
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from e
    files = weight_files(folder)
    # every tensor name with the names it shares a parameter with (a tied lm_head)
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # the model names the stored tensors fill once transformers has renamed and converted them
    # on loading (experts stored one by one, fused in memory)
    filled, gaps = _names_as_loaded(model, files, shapes)
    if gaps:
        fused = sorted({target for target, _ in gaps})
        raise CheckpointError(
            f"weights in {folder} lack {_few([name for _, name in gaps])}, while the tensors "
            f"stacked with them into {_few(fused)} (model_type {config.model_type!r}) are "
            "stored: transformers cannot build those tensors from part of their pieces. The "
            "folder is incomplete (a file left out when it was copied or downloaded?); restore "
            "the missing tensors"
        )
    missing = [names[0] for names in groups.values() if not any(n in filled for n in names)]
    if missing:
        raise CheckpointError(
            f"weights in {folder} do not match its {CONFIG_NAME} (model_type "
            f"{config.model_type!r}): missing tensors {_few(missing)}. Check that config.json "
            "belongs to these weights"
        )
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for name in (n for n, where in files.items() if where == file):
                if name in shapes and tuple(f.get_slice(name).get_shape()) != shapes[name]:
                    raise CheckpointError(
                        f"tensor {name!r} in {file} has shape "
                        f"{tuple(f.get_slice(name).get_shape())}, but {CONFIG_NAME} implies "
                        f"{shapes[name]}; check that config.json belongs to these weights"
                    )
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else {}
    vocab = getattr(config, "vocab_size", None) or model.get_input_embeddings().weight.shape[0]
    # a multimodal model (Gemma 3's ForConditionalGeneration) keeps it in its text config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        text, "max_position_embeddings", None
    )
    return ModelInfo(
        implementation="transformers",
        model_type=str(config.model_type),
        vocab_size=int(vocab),
        max_position_embeddings=int(context) if context else None,
        unsupported=sdpo_unsupported(_read_json(folder / CONFIG_NAME)),
        logit_softcap=logit_softcap(config),
        router_aux_loss_coef=router_coef,
    )


def _names_as_loaded(
    model: torch.nn.Module, stored: Iterable[str], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[set[str], list[tuple[str, str]]]:
    """The names of ``model`` that the ``stored`` tensor names fill when transformers loads
    them, and the gaps in what it stacks: its conversion mapping for the model type renames
    them, and a conversion that builds one tensor of several (a fused gate and up projection)
    fills it only when a name of each of its sources is stored. A conversion that stacks a list
    (``mlp.experts.*.up_proj.weight``, one per expert) needs every index, 0 to the stacked
    dimension of the model's tensor, of each source: an absent one is a gap, given as the model
    tensor and the stored name it lacks. Without that mapping (an older transformers), the
    stored names as they are and no gaps."""
    stored = list(stored)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        mapping = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):
        return set(stored), []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    filled: set[str] = set()
    sources: dict[str, set[str]] = {}  # a converted name: the source patterns stored for it
    needed: dict[str, set[str]] = {}
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    # a stacked name: per source pattern, the stored name of each index
    stacked: dict[str, dict[str, dict[int, str]]] = {}
    stack_dim: dict[str, int] = {}
    for name in stored:
        if name in shapes:  # as transformers does, a name the model has is taken as it is
            filled.add(name)
            continue
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, shapes)
        if pattern is None or pattern not in by_pattern:
            filled.add(renamed)
            continue
        converter = by_pattern[pattern]
        sources.setdefault(renamed, set()).add(pattern)
        needed[renamed] = set(converter.source_patterns)
        merge = next((op for op in converter.operations if isinstance(op, MergeModulelist)), None)
        index = _list_index(name, pattern)
        if merge is not None and index is not None:
            stacked.setdefault(renamed, {}).setdefault(pattern, {})[index[0]] = name
            stack_dim[renamed] = merge.dim
    filled.update(name for name, got in sources.items() if got >= needed[name])
    gaps = []
    for target, per_pattern in stacked.items():
        if target not in filled:
            continue  # a whole source absent: the target itself is reported missing
        shape, dim = shapes.get(target), stack_dim[target]
        indices = set().union(*per_pattern.values())
        count = shape[dim] if shape is not None and dim < len(shape) else max(indices) + 1
        for pattern in sorted(per_pattern):
            names = per_pattern[pattern]
            example = next(iter(names.values()))
            start, end = _list_index(example, pattern)[1:]
            gaps += [
                (target, example[:start] + str(i) + example[end:])
                for i in range(count)
                if i not in names
            ]
    return filled, gaps


def _list_index(name: str, pattern: str) -> tuple[int, int, int] | None:
    """The list index that the ``*`` of a conversion's source ``pattern``
    (``mlp.experts.*.up_proj.weight``) stands for in the stored ``name``, with where its digits
    start and end in ``name``; None when the pattern has no ``*`` or it stands for no number."""
    if pattern.count("*") != 1:
        return None
    head, tail = (re.escape(part) for part in pattern.split("*"))
    found = re.search(rf"{head}(\d+){tail}$", name)
    return None if found is None else (int(found.group(1)), found.start(1), found.end(1))


def load_model(
    path: str | os.PathLike,
    *,
    implementation: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The model of checkpoint folder ``path`` under ``implementation`` (``IMPLEMENTATIONS``):
    sdpo's ``CausalLM`` (``load_pretrained``) or a ``PackedCausalLM`` around
    ``AutoModelForCausalLM`` (``sdpo.engine.hf.load_hf_pretrained``); both speak the packed
    protocol."""
    if resolve_implementation(path, implementation) == "sdpo":
        return load_pretrained(path, dtype=dtype, device=device)
    from sdpo.engine.hf import load_hf_pretrained

    try:
        return load_hf_pretrained(path, dtype=dtype, device=device)
    except (ValueError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from e


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pretrained_config(model: torch.nn.Module, *, precision: str | None = None) -> dict:
    """The ``config.json`` contents ``save_pretrained`` writes for ``model`` (its dtype
    included); a wrapped Hugging Face model's is its own config's (``hf_config_dict``).

    ``precision``: the run's resolved precision, whose parameter dtype (``parameter_dtype``)
    the weights are kept and written in, and so the dtype the config names. By default the
    embedding's dtype, which is not the weights' where a sharded model's forward has left its
    parameters gathered in their compute dtype (bf16 under ``bf16-mixed``, after a no-grad
    pass, until ``sharding.reshard``)."""
    dtype = None if precision is None else parameter_dtype(precision)
    if hasattr(model, "hf_model"):
        from sdpo.engine.hf import hf_config_dict

        return hf_config_dict(model, dtype=dtype)
    dtype = dtype or model.model.embed_tokens.weight.dtype
    config = model.config.to_hf_dict()
    config["dtype"] = _dtype_name(dtype)  # transformers >= 5
    config["torch_dtype"] = _dtype_name(dtype)  # transformers 4.x
    return config


def save_pretrained(
    model: CausalLM | None,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: Iterable[str | os.PathLike] = (),
    state: dict[str, torch.Tensor] | None = None,
    write_extra: Callable[[Path], None] | None = None,
    config: dict | None = None,
) -> None:
    """Write ``model`` as a HF checkpoint folder at ``path``, atomically.

    One ``model.safetensors`` when the weights fit in ``max_shard_bytes``, else shards plus
    ``model.safetensors.index.json``. Tied embeddings are stored once (as HF does).
    ``extra_files`` (e.g. tokenizer.json, tokenizer_config.json; a folder such as
    additional_chat_templates/ is copied whole) are copied into the folder inside the same
    atomic step. An existing folder at ``path`` is replaced only on success.
    ``state``: the weights to write instead of ``model.state_dict()`` (a sharded model's
    gathered state dict, ``engine/sharding.py``). ``write_extra(tmp)`` adds more to the
    temporary folder inside the same atomic step (a LoRA step's ``adapter/``). ``config``: the
    ``config.json`` contents (``pretrained_config``) instead of ``model``'s; with ``state`` and
    ``config`` the model is not read at all (``model=None``: a background write of a host
    snapshot, ``sdpo.engine.async_save``)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if model is None and (state is None or config is None):
        raise ValueError("save_pretrained without a model needs both state and config")
    if state is None:
        state = model_state_dict(model)
    state = {name: t.detach() for name, t in state.items()}
    shards = _plan_shards(state, max_shard_bytes=max_shard_bytes)
    if config is None:
        config = pretrained_config(model)
    extra = [Path(p) for p in extra_files]
    for p in extra:
        if not p.exists():
            raise FileNotFoundError(f"extra file {p} to copy into the checkpoint does not exist")

    with atomic_directory(path) as tmp:
        weight_map = {}
        for i, names in enumerate(shards):
            file_name = (
                SINGLE_WEIGHTS_NAME
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            # Copy one shard at a time to the host, contiguous (safetensors needs it).
            tensors = {name: state[name].to("cpu").contiguous() for name in names}
            save_file(tensors, str(tmp / file_name), metadata={"format": "pt"})
            del tensors
            weight_map.update(dict.fromkeys(names, file_name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for p in extra:
            if p.is_dir():
                shutil.copytree(p, tmp / p.name, copy_function=shutil.copyfile)
            else:
                shutil.copyfile(p, tmp / p.name)
        if write_extra is not None:
            write_extra(tmp)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint of ``model`` holds: its state dict, or a wrapped Hugging Face
    model's own (``hf_state_dict``: its names, a tied lm_head once)."""
    if hasattr(model, "hf_model"):
        from sdpo.engine.hf import hf_state_dict

        return hf_state_dict(model)
    return model.state_dict()


def _plan_shards(state: dict[str, torch.Tensor], *, max_shard_bytes: int) -> list[list[str]]:
    """Greedy in parameter order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def model_fingerprint(
    model: torch.nn.Module, *, state: dict[str, torch.Tensor] | None = None
) -> str:
    """sha256 over the architecture and every parameter's name, dtype, shape and bytes.

    Two models fingerprint equal exactly when they compute the same function in the same
    dtype; a model cast to another dtype fingerprints differently. GPU tensors are hashed in
    64 MiB pieces copied to the host, so memory stays flat (about 1-2 s for a 1B model).
    ``state``: the weights to hash instead of ``model.state_dict()`` (a sharded model's gathered
    state dict, which fingerprints as the unsharded model does). The architecture is
    ``architecture_text(model)``."""
    return _hash_weights(model, [architecture_text(model)], state)[0]


def architecture_text(model: torch.nn.Module) -> str:
    """The text of the model's architecture that ``model_fingerprint`` hashes before the
    weights: sdpo's decoder's ``architecture_dict`` as JSON, a wrapped Hugging Face model's
    ``fingerprint_config()``, "" for another module. A run records it beside the fingerprint,
    so that a resume refused for other weights can tell the tensors from the configuration
    (``fingerprint_with``) and name the fields that differ (``architecture_differences``)."""
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return json.dumps(config.architecture_dict(), sort_keys=True)
    if hasattr(model, "fingerprint_config"):  # a wrapped Hugging Face model
        return model.fingerprint_config()
    return ""


def fingerprint_with(
    model: torch.nn.Module, architecture: str, *, state: dict[str, torch.Tensor] | None = None
) -> str:
    """``model_fingerprint`` of the model's weights under another architecture text (one a run
    recorded): equal to the run's fingerprint exactly when the weights are the run's."""
    return _hash_weights(model, [architecture], state)[0]


def earlier_model_fingerprints(
    model: torch.nn.Module, *, state: dict[str, torch.Tensor] | None = None
) -> list[str]:
    """The fingerprints earlier releases gave the same weights where they described the same
    model otherwise (``ModelConfig.earlier_architecture_dicts``: a Qwen's sliding window; a
    wrapped Hugging Face model's ``earlier_fingerprint_configs``: the config as transformers
    serialises it), for a run or cache they recorded; [] without such a description, hashing
    nothing. ``state`` as for ``model_fingerprint``."""
    texts = earlier_architecture_texts(model)
    return _hash_weights(model, texts, state) if texts else []


def earlier_architecture_texts(model: torch.nn.Module) -> list[str]:
    """The architecture texts of ``earlier_model_fingerprints`` (none hashed)."""
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return [json.dumps(d, sort_keys=True) for d in config.earlier_architecture_dicts()]
    if hasattr(model, "earlier_fingerprint_configs"):
        return list(model.earlier_fingerprint_configs())
    return []


def architecture_differences(before: str, now: str) -> list[str]:
    """The fields in which two architecture texts (``architecture_text``) differ, each as
    "name (now X, then Y)", a field one lacks as absent, a long value cut short; [] where
    either is not a JSON object (a module without a description). A wrapped Hugging Face
    model's config keys are named as they are, its class as ``transformers``, a key of a dict
    inside (a multimodal model's ``text_config``) after the dict's name and a dot."""
    try:
        old, new = json.loads(before), json.loads(now)
    except ValueError:
        return []
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        if not prefix and isinstance(d.get("config"), dict) and "transformers" in d:
            return {"transformers": d["transformers"], **flat(d["config"])}
        out: dict[str, Any] = {}
        for key, value in d.items():
            if isinstance(value, dict) and value:  # a sub-config, a rotary dict: by its keys
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    def show(d: dict[str, Any], key: str) -> str:
        if key not in d:
            return "absent"
        text = json.dumps(d[key], sort_keys=True)
        return text if len(text) <= 60 else f"{text[:57]}..."  # a layer list, cut short

    old, new = flat(old), flat(new)
    return [
        f"{key} (now {show(new, key)}, then {show(old, key)})"
        for key in sorted(set(old) | set(new))
        if key not in old or key not in new or old[key] != new[key]
    ]


def _hash_weights(
    model: torch.nn.Module, architectures: list[str], state: dict[str, torch.Tensor] | None
) -> list[str]:
    """One sha256 per architecture text: the text, then the weights, read once for all."""
    hashes = [hashlib.sha256(text.encode()) for text in architectures]
    for name, t in (model_state_dict(model) if state is None else state).items():
        header = f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode()
        for h in hashes:
            h.update(header)
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # raw bytes, any dtype
        for start in range(0, flat.numel(), _HASH_PIECE_BYTES):
            piece = flat[start : start + _HASH_PIECE_BYTES].cpu().numpy().tobytes()
            for h in hashes:
                h.update(piece)
    return [h.hexdigest() for h in hashes]


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint folder's config.json and the full content of its weight files.

    The content is hashed, not just the safetensors headers and file sizes: a model after a
    DPO step has the same names, shapes and sizes as before it, so anything short of the bytes
    would give the trained and the untrained checkpoint the same key. Hashing runs at disk
    speed (a few seconds per GB); cache the result if a caller needs it repeatedly."""
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; it is not a checkpoint folder")
    h = hashlib.sha256()
    h.update(config_path.read_bytes())
    for file in sorted(set(weight_files(folder).values())):
        h.update(f"\n{file.name}\n".encode())
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_PIECE_BYTES):
                h.update(chunk)
    return h.hexdigest()
