"""The run configuration: one TOML file, small validated dataclass sections, ``--set`` overrides.

A run is described by ``RunConfig`` (sections ``[model]``, ``[data]``, ``[train]``, ``[loss]``,
``[kernels]``, ``[sdpo]``, ``[lora]``, ``[log]``, ``[profile]`` and a top-level ``output_dir``).
This module owns reading it
(``load_config``), checking it (every section validates itself in ``__post_init__``; unknown keys
and wrong types are errors that name the key, the closest valid key and where the value came
from), overriding it from the command line (``--set train.learning_rate=1e-6``: the value is read
as a TOML literal, else taken as a plain string; ``none`` clears an optional key; setting
``data.sources`` replaces a file's ``data.path`` and the other way round) and writing the
resolved config next to the run (``write_resolved_config``, a small TOML emitter so no writer
dependency is needed). Relative paths in a TOML file resolve against that file's folder; relative
paths given with ``--set`` resolve against the working directory. Defaults follow the sDPO paper
(which follows Zephyr): lr 5e-7, beta 0.1, linear schedule, 10% warm-up.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sdpo.engine.data import IDENTICAL_POLICIES
from sdpo.engine.files import atomic_write_text
from sdpo.engine.hub import is_hub_model_id
from sdpo.engine.lora import ALL_LINEAR, LORA_TARGETS
from sdpo.engine.trainer import TrainConfig
from sdpo.losses import LossConfig


class ConfigError(ValueError):
    """A bad run configuration: the message names the key, what was wrong and the fix."""


# Metadata marking path-valued fields: "local" paths always resolve against the config's folder;
# "data" paths resolve only when they look like a local file (else they are dataset hub names);
# "model" paths resolve unless they are shaped like a hub model id and no such folder exists.
_LOCAL = {"path": "local"}
_DATA = {"path": "data"}
_MODEL = {"path": "model"}
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".zst", ".arrow")


def _check_revision(key: str, model: str | None, name: str, revision: str | None) -> None:
    """A revision (the key ``name``) goes with a hub model id (the key ``key``) only."""
    if revision is not None and not (model and is_hub_model_id(model)):
        raise ConfigError(
            f"{name} = {revision!r} applies to a hub model id (namespace/name) and {key} is "
            f"{model!r}, {'a local folder' if model else 'not set'}: remove {name}, or set "
            f"{key} to the hub model's id"
        )


def _one_of(key: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(
            f"{key} = {value!r} is not an option: use one of {', '.join(map(repr, options))}"
        )


def _at_least(key: str, value: float | None, low: float, *, strict: bool = False) -> None:
    if value is None:
        return
    bad = not math.isfinite(value) or (value <= low if strict else value < low)
    if bad:
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}")


@dataclass(kw_only=True)
class ModelSection:
    """``[model]``: the initial (SFT) model, a Hugging Face style folder or a hub model id."""

    path: str | None = field(default=None, metadata=_MODEL)
    revision: str | None = None  # a hub model's branch, tag or commit (TRL's model_revision)
    # the code that runs the model: "sdpo" (its own packed decoder: llama, mistral, qwen2,
    # qwen3), "transformers" (AutoModelForCausalLM, padded per sequence: any causal LM) or
    # "auto" (sdpo's decoder for its model types, transformers for the others)
    implementation: str = "auto"
    attn_backend: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1  # with gradient_checkpointing: recompute every k-th layer
    compile: bool = False
    # with compile: the share (0-1) of a layer's intermediate values its backward keeps; the
    # compiler recomputes the rest, cheapest per byte first (engine/compile.py). None: torch's
    activation_memory_budget: float | None = None

    def __post_init__(self) -> None:
        _one_of("model.implementation", self.implementation, ("auto", "sdpo", "transformers"))
        _one_of("model.attn_backend", self.attn_backend, ("auto", "flash", "varlen", "sdpa"))
        _at_least("model.checkpoint_every", self.checkpoint_every, 1)
        _check_revision("model.path", self.path, "model.revision", self.revision)
        budget = self.activation_memory_budget
        if budget is not None:
            if not 0.0 <= budget <= 1.0:
                raise ConfigError(
                    f"model.activation_memory_budget must be in [0, 1], got {budget!r}"
                )
            if not self.compile:
                raise ConfigError(
                    "model.activation_memory_budget needs model.compile = true (the compiler "
                    "decides what to recompute); use model.gradient_checkpointing without it"
                )


def transformers_conflicts(cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` that need sdpo's own decoder, each as ``"key = value"``: a model
    run with transformers (``model.implementation``) cannot honour them. The runner refuses
    them once it knows which code runs the model (``"auto"`` decides by the model type).
    ``model.checkpoint_every`` is one only with ``model.gradient_checkpointing`` on (transformers
    recomputes every layer); with it off the key does nothing on either path, which the runner
    says in a warning (a saved config may hold it and must still resume)."""
    m, t = cfg.model, cfg.train
    found = []
    if m.attn_backend != "auto":
        found.append(f"model.attn_backend = {m.attn_backend!r}")
    if m.checkpoint_every != 1 and m.gradient_checkpointing:
        found.append(
            f"model.checkpoint_every = {m.checkpoint_every} with model.gradient_checkpointing "
            "(transformers' checkpointing recomputes every layer)"
        )
    if m.compile:
        found.append("model.compile = true")
    if m.activation_memory_budget is not None:
        found.append(f"model.activation_memory_budget = {m.activation_memory_budget}")
    if t.fsdp:
        found.append("train.fsdp = true")
    if t.share_prompt:
        found.append("train.share_prompt = true")
    return found


@dataclass(kw_only=True)
class ColumnMap:
    """A source's ``columns = { prompt = "question", system = "system" }``: the data set's
    column for each field whose name differs (None: the field's own name; ``tools`` and
    ``chat_template_kwargs`` are the optional template inputs of ``sdpo.engine.data``), and an
    optional column of system prompts (each prompt then becomes a conversation: the system
    message, when the row's is not empty, then the user's)."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    system: str | None = None
    tools: str | None = None
    chat_template_kwargs: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass(kw_only=True)
class DataSource:
    """One preference data set (``[[data.sources]]``); sDPO partitions by source."""

    name: str = ""  # default: the file (or hub data set) name without suffix
    path: str = field(metadata=_DATA)  # jsonl/json/parquet/csv file, or a hub data set name
    split: str = "train"
    # a hub data set's subset (datasets' config name), or of a data set folder holding several
    subset: str | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.sources: a source has an empty path")
        if self.subset is not None and not self.subset.strip():
            raise ConfigError(
                f"data.sources: source {self.path!r} has an empty subset; leave it out or name one"
            )
        if not self.name:
            self.name = _source_name(self.path)


def _source_name(path: str) -> str:
    name = Path(path.rstrip("/")).name
    while name.endswith(_DATA_SUFFIXES):
        name = name[: name.rindex(".")]
    return name or path


def default_max_prompt_length(max_length: int) -> int:
    """``data.max_prompt_length`` when unset: half of ``max_length`` (512 of TRL's 1024)."""
    return max(1, max_length // 2)


@dataclass(kw_only=True)
class DataSection:
    """``[data]``: preference sources, lengths and tokenization policies."""

    sources: list[DataSource] = field(default_factory=list)
    # held-out preference data: scored after every sDPO step (eval/* metrics), never trained on
    eval_sources: list[DataSource] = field(default_factory=list)
    # or: this share of the training pairs, drawn with train.seed, held out the same way
    eval_fraction: float = 0.0
    path: str | None = field(default=None, metadata=_DATA)  # shorthand for one source
    max_length: int = 1024  # tokens per sequence (prompt + completion), as TRL's max_length
    max_prompt_length: int | None = None  # None: half of max_length (512 of the default 1024)
    truncation: str = "keep_end"  # over-long prompts keep their end; completions lose their end
    # chosen == rejected: "warn" (keep, with a count), "drop", "error"
    identical_pairs: str = "warn"

    def __post_init__(self) -> None:
        if self.path is not None:
            if self.sources:
                raise ConfigError(
                    "data.path and data.sources are both set: use data.path for one source or "
                    "[[data.sources]] tables for several, not both"
                )
            self.sources = [DataSource(path=self.path)]
            self.path = None  # normalised: the source list is the one truth
        names = [s.name for s in self.sources]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(
                    f"data.sources: two sources are named {name!r}; give each a distinct "
                    "`name` (sDPO orders and reports the data by source name)"
                )
        _at_least("data.max_length", self.max_length, 1)
        if self.max_prompt_length is None:  # resolved: the saved config holds the number
            self.max_prompt_length = default_max_prompt_length(self.max_length)
        _at_least("data.max_prompt_length", self.max_prompt_length, 1)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"data.max_length ({self.max_length}) to leave room for the completion"
            )
        _one_of("data.truncation", self.truncation, ("keep_end", "keep_start"))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(
                f"data.eval_fraction must be >= 0 and < 1 (the share of pairs held out for "
                f"evaluation), got {self.eval_fraction!r}"
            )
        if self.eval_fraction and self.eval_sources:
            raise ConfigError(
                "data.eval_fraction and data.eval_sources are both set: hold out either a share "
                "of the training data or separate files, not both"
            )
        _one_of("data.identical_pairs", self.identical_pairs, IDENTICAL_POLICIES)


# ``[train]``: the training loop's own settings class (one definition, validated there).
TrainSection = TrainConfig


@dataclass(kw_only=True)
class KernelsSection:
    """``[kernels]``: which log-prob implementation runs and its token chunk size."""

    impl: str = "auto"  # "auto": triton on CUDA, torch elsewhere
    chunk_tokens: int | None = None  # None: the kernel's own default
    # Training: a pair longer than this many tokens is split, so that at most this many rows
    # of logits exist at once, at the cost of recomputing all but its last chunk (see
    # sdpo.kernels.linear_pair_loss). None: a pair's logits are held whole.
    max_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        _one_of("kernels.impl", self.impl, ("auto", "triton", "torch"))
        _at_least("kernels.chunk_tokens", self.chunk_tokens, 1)
        _at_least("kernels.max_chunk_tokens", self.max_chunk_tokens, 1)


PARTITIONS = ("easy_to_hard", "easy_to_hard_pairs", "random", "given")


@dataclass(kw_only=True)
class SDPOSection:
    """``[sdpo]``: the stepwise schedule. ``steps = 1`` is plain DPO over all data."""

    steps: int = 1
    partition: str = "easy_to_hard"
    reference: str | None = field(default=None, metadata=_MODEL)  # fixed reference checkpoint
    reference_revision: str | None = None  # a hub reference's branch, tag or commit
    reset_optimizer: bool = True  # fresh optimizer state and LR schedule per step
    beta: list[float] = field(default_factory=list)  # per-step loss.beta; empty: the same
    learning_rate: list[float] = field(default_factory=list)  # per-step train.learning_rate
    score_tokens_per_batch: int | None = None  # no-grad scoring batches; None: 4x training
    cache_dir: str | None = field(default=None, metadata=_LOCAL)  # None: inside output_dir
    # Extra no-grad passes for the report only: gamma_ref of each step's reference on the next
    # chunk (free for step 1) and reward accuracy on the chunk after training. false skips them.
    report_scoring: bool = True

    def __post_init__(self) -> None:
        _at_least("sdpo.steps", self.steps, 1)
        _one_of("sdpo.partition", self.partition, PARTITIONS)
        _check_revision(
            "sdpo.reference", self.reference, "sdpo.reference_revision", self.reference_revision
        )
        for key in ("beta", "learning_rate"):
            values = getattr(self, key)
            if values and len(values) != self.steps:
                raise ConfigError(
                    f"sdpo.{key} has {len(values)} values but sdpo.steps = {self.steps}: give "
                    f"one value per step, or leave it empty to use the same value for every step"
                )
            for v in values:
                _at_least(f"sdpo.{key}", v, 0.0, strict=True)
        _at_least("sdpo.score_tokens_per_batch", self.score_tokens_per_batch, 1)


TRACKERS = ("tensorboard", "wandb")


@dataclass(kw_only=True)
class LogSection:
    """``[log]``: experiment trackers fed with every record of ``metrics.jsonl`` (as TRL's
    ``report_to``), from rank 0. ``metrics.jsonl`` is always written."""

    report_to: list[str] = field(default_factory=list)  # "tensorboard" and/or "wandb"
    project: str = "sdpo"  # the W&B project
    run_name: str | None = None  # None: the output folder's name
    # TensorBoard event files; None: OUTPUT_DIR/tensorboard
    tensorboard_dir: str | None = field(default=None, metadata=_LOCAL)
    # TRL's token metrics (entropy, logits/chosen, logits/rejected, mean_token_accuracy) in
    # the training and eval records; false: the log-prob head runs without their reductions
    token_metrics: bool = True

    def __post_init__(self) -> None:
        self.report_to = list(self.report_to)
        for name in self.report_to:
            _one_of("log.report_to entry", name, TRACKERS)
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError(f"log.report_to names a tracker twice: {self.report_to}")
        if not self.project:
            raise ConfigError('log.project is empty: give a W&B project name, e.g. "sdpo"')


@dataclass(kw_only=True)
class LoRASection:
    """``[lora]``: train a low-rank adapter per sDPO step instead of every weight
    (``sdpo.engine.lora``). ``rank = 0``: off (full fine-tuning). Each step's adapter starts
    fresh on M_{t-1} and is merged into M_t at the end of the step. Goes with data parallel
    and with ``train.fsdp`` (the base sharded, the adapter whole on every rank)."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank): use_rslora)
    dropout: float = 0.0  # on the adapter's input, in training only
    # or "all-linear" (PEFT's name for every linear layer but lm_head): all seven
    targets: str | list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    use_rslora: bool = False  # rank-stabilized LoRA (PEFT's use_rslora): scale alpha / sqrt(rank)

    def __post_init__(self) -> None:
        if self.targets in (ALL_LINEAR, [ALL_LINEAR]):
            self.targets = list(LORA_TARGETS)
        elif isinstance(self.targets, str):
            self.targets = [self.targets]  # one module name
        _at_least("lora.rank", self.rank, 0)
        _at_least("lora.alpha", self.alpha, 0.0, strict=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be >= 0 and < 1, got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            what = f"names unknown module(s) {unknown}" if unknown else "is empty"
            raise ConfigError(
                f"lora.targets {what}: valid targets are {', '.join(LORA_TARGETS)}, or "
                f"{ALL_LINEAR!r} for all of them"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets {self.targets} names a module twice")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(kw_only=True)
class ProfileSection:
    """``[profile]``: torch.profiler over ``steps`` optimizer steps of one sDPO step's training,
    from its optimizer step ``start_step`` (counted from 1 within that sDPO step; past the first
    steps, which compile and warm up). Every rank writes its Chrome trace and a summary (device
    busy share, top kernels and host ops) to ``OUTPUT_DIR/profile/`` (``sdpo.engine.profiling``).
    ``steps = 0``: off."""

    steps: int = 0
    start_step: int = 3
    sdpo_step: int = 1  # the sDPO step whose training is traced
    # CUDA: the caching allocator's history over the window, as a snapshot for PyTorch's
    # memory viewer (every allocation with its stack)
    memory: bool = False
    with_stack: bool = False  # Python stacks in the trace (bigger files, more overhead)
    # CUDA: record the allocator's history for the whole run and, if the GPU runs out of
    # memory, write it to OUTPUT_DIR/profile/oom.rank<r>.memory.pickle (a small cost per
    # allocation; works with steps = 0)
    memory_on_oom: bool = False

    def __post_init__(self) -> None:
        _at_least("profile.steps", self.steps, 0)
        _at_least("profile.start_step", self.start_step, 1)
        _at_least("profile.sdpo_step", self.sdpo_step, 1)


@dataclass(kw_only=True)
class RunConfig:
    """A whole run. ``output_dir`` receives ``step-<t>/`` checkpoints, metrics and caches."""

    output_dir: str = field(metadata=_LOCAL)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossConfig = field(default_factory=LossConfig)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    sdpo: SDPOSection = field(default_factory=SDPOSection)
    lora: LoRASection = field(default_factory=LoRASection)
    log: LogSection = field(default_factory=LogSection)
    profile: ProfileSection = field(default_factory=ProfileSection)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError('output_dir is empty: set output_dir = "DIR" at the top level')
        if not self.model.path:
            raise ConfigError(
                'model.path is missing: add [model] path = "DIR" (a Hugging Face style folder) '
                "or pass --set model.path=DIR"
            )
        if not self.data.sources:
            raise ConfigError(
                'no preference data: add [data] path = "FILE.jsonl" or [[data.sources]] tables '
                "with name and path"
            )
        if self.train.eval_every and not (self.data.eval_sources or self.data.eval_fraction):
            raise ConfigError(
                f"train.eval_every = {self.train.eval_every} but there are no held-out pairs: "
                "set data.eval_fraction (e.g. 0.05) or data.eval_sources, or set "
                "train.eval_every = 0"
            )
        pair_tokens = 2 * self.data.max_length
        if self.train.max_tokens_per_batch < pair_tokens:
            raise ConfigError(
                f"train.max_tokens_per_batch ({self.train.max_tokens_per_batch}) is below "
                f"2 x data.max_length ({pair_tokens}): a pair's two sequences might not fit in "
                "one batch; raise max_tokens_per_batch or lower max_length"
            )
        if self.lora.enabled and not self.sdpo.reset_optimizer:
            raise ConfigError(
                "sdpo.reset_optimizer = false does not go with LoRA (lora.rank > 0): every "
                "sDPO step trains a new adapter, merged at the end of the step, so there is no "
                "optimizer state to keep; set sdpo.reset_optimizer = true or lora.rank = 0"
            )
        if self.profile.steps and self.profile.sdpo_step > self.sdpo.steps:
            raise ConfigError(
                f"profile.sdpo_step = {self.profile.sdpo_step} but the run has sdpo.steps = "
                f"{self.sdpo.steps}: name one of its steps (1 to {self.sdpo.steps})"
            )
        n_sources = len(self.data.sources)
        per_source = self.sdpo.partition in ("easy_to_hard", "given")
        if self.sdpo.steps > 1 and per_source and n_sources != self.sdpo.steps:
            raise ConfigError(
                f"sdpo.partition = {self.sdpo.partition!r} makes one chunk per data source, "
                f"but there are {n_sources} source(s) and sdpo.steps = {self.sdpo.steps}: "
                f"set steps = {n_sources}, or use partition = 'easy_to_hard_pairs' or "
                "'random' to cut the pooled pairs into equal chunks"
            )


# ---------------------------------------------------------------------------------------------
# dict -> dataclasses, with key and type checks


@dataclass(kw_only=True)
class _Origins:
    """Where each value came from, to resolve relative paths and to name it in errors."""

    source: str  # "/path/run.toml" or "the config dict"
    base: Path  # folder that relative paths in the source resolve against
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> raw --set text

    def override_of(self, key: str) -> str | None:
        """The --set key that supplied ``key`` (itself or a parent table), if any."""
        parts = key.replace("[", ".").split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.overrides:
                return prefix
        return None

    def where(self, key: str) -> str:
        set_key = self.override_of(key)
        if set_key is not None:
            return f"from --set {set_key}={self.overrides[set_key]}"
        inside = [k for k in self.overrides if not key or k.startswith(key + ".")]
        if inside:
            sets = ", ".join(f"--set {k}={self.overrides[k]}" for k in inside)
            return f"in {self.source} after {sets}"
        return f"in {self.source}"

    def base_dir(self, key: str) -> Path:
        return Path.cwd() if self.override_of(key) is not None else self.base


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], f"{full}."))
    return keys


# TRL DPOConfig / script option names a TRL user may write, with what they are here.
_TRL_NAMES = {
    "model_name_or_path": "it is 'model.path' here (a folder or a hub model id)",
    "model_revision": "it is 'model.revision' here",
    "ref_model": "it is 'sdpo.reference' here (a folder or a hub model id)",
    "per_device_train_batch_size": (
        "sdpo sets the pairs of an optimizer step, 'train.pairs_per_step' (or "
        "'train.tokens_per_step'), and packs them into micro-batches of at most "
        "'train.max_tokens_per_batch' tokens"
    ),
    "gradient_accumulation_steps": (
        "the micro-batches of a step follow from 'train.pairs_per_step' and "
        "'train.max_tokens_per_batch'"
    ),
    "num_train_epochs": "it is 'train.epochs' here (per sDPO step)",
    "lr_scheduler_type": "it is 'train.schedule' here",
    "eval_steps": "it is 'train.eval_every' here",
    "logging_steps": "it is 'train.log_every' here",
    "save_steps": "it is 'train.save_every' here",
    "save_total_limit": "it is 'train.keep_checkpoints' here",
    "bf16": "it is 'train.precision' here ('bf16', 'bf16-mixed' or 'fp32')",
    "max_completion_length": (
        "sdpo cuts with 'data.max_length' and 'data.max_prompt_length' (see 'data.truncation')"
    ),
    "truncation_mode": (
        "it is 'data.truncation' here, with 'data.max_prompt_length' (TRL 1.16's 'keep_start' "
        "is truncation = 'keep_start' with max_prompt_length = max_length - 1)"
    ),
    "precompute_ref_log_probs": "sdpo always precomputes them (the reference cache)",
    "padding_free": "sdpo always packs without padding",
    "max_steps": (
        "sdpo has no step cap: a run is 'train.epochs' passes over each sDPO step's pairs (fewer "
        "steps: fewer pairs, or larger 'train.pairs_per_step')"
    ),
    "torch_dtype": "it is 'train.precision' here ('bf16', 'bf16-mixed' or 'fp32')",
    "dtype": "it is 'train.precision' here ('bf16', 'bf16-mixed' or 'fp32')",
    "fp16": "fp16 is not offered: use 'train.precision' = 'bf16' or 'bf16-mixed'",
    "optim": "sdpo's optimizer is AdamW (fused on CUDA); see 'train.adam_betas', 'train.adam_eps'",
    "use_liger_kernel": "sdpo's own fused log-prob kernels are always used ('kernels.impl')",
    "torch_compile": "'model.compile' = true compiles each decoder layer (regional torch.compile)",
    "attn_implementation": (
        "'model.attn_backend' picks the attention of sdpo's decoder; a model transformers runs "
        "uses SDPA where it has it, else eager ('model.implementation')"
    ),
    "gradient_checkpointing_kwargs": (
        "sdpo's recomputation is non-reentrant; 'model.checkpoint_every' = k recomputes every "
        "k-th layer only"
    ),
    "activation_checkpointing": "it is 'model.gradient_checkpointing' here",
    "load_in_4bit": (
        "quantized weights are not offered: the model is loaded as 'train.precision' says "
        "('bf16': bf16 weights, half of fp32's memory, also as a LoRA base)"
    ),
    "load_in_8bit": (
        "quantized weights are not offered: the model is loaded as 'train.precision' says "
        "('bf16': bf16 weights, half of fp32's memory, also as a LoRA base)"
    ),
    "trust_remote_code": (
        "no code from a model folder is run: sdpo's decoder or transformers' own classes run "
        "the model ('model.implementation')"
    ),
    "use_cpu": "a run uses the GPU when there is one: hide it with CUDA_VISIBLE_DEVICES=''",
    "env": "set these environment variables in the shell that starts sdpo",
    "do_eval": (
        "held-out pairs are scored whenever 'data.eval_sources' or 'data.eval_fraction' gives "
        "them (transformers sets do_eval from eval_strategy)"
    ),
    "activation_checkpointing_kwargs": (
        "sdpo's recomputation is non-reentrant; 'model.checkpoint_every' = k recomputes every "
        "k-th layer only"
    ),
    "per_device_eval_batch_size": (
        "held-out pairs are scored in batches of 'sdpo.score_tokens_per_batch' tokens"
    ),
    "use_peft": "set 'lora.rank' > 0 to train a LoRA adapter",
    "r": "it is 'lora.rank' here",
    "lora_r": "it is 'lora.rank' here",
    "lora_alpha": "it is 'lora.alpha' here",
    "lora_dropout": "it is 'lora.dropout' here",
    "lora_target_modules": "it is 'lora.targets' here",
    "target_modules": "it is 'lora.targets' here",
    "eval_strategy": (
        "held-out pairs are scored after each sDPO step, and every 'train.eval_every' "
        "optimizer steps when set"
    ),
    "save_strategy": (
        "checkpoints are written every 'train.save_every' optimizer steps and at the end of "
        "each sDPO step"
    ),
    "logging_strategy": "a record is logged every 'train.log_every' optimizer steps",
    "resume_from_checkpoint": (
        "run 'sdpo train --config FILE --resume': it continues from the newest complete "
        "checkpoint in output_dir"
    ),
    "deepspeed": "sdpo shards the model with FSDP2 under torchrun: set 'train.fsdp' = true",
    "disable_dropout": (
        "sdpo's model has no dropout (as TRL's disable_dropout = true); LoRA's is 'lora.dropout'"
    ),
    "dataset_name": "list the data files, folders or hub data set names in 'data.sources'",
    "push_to_hub": "sdpo uploads nothing: each step-<t>/ is a Hugging Face model folder to upload",
    "sync_ref_model": (
        "TR-DPO is not offered: sdpo precomputes the reference values, which TRL refuses with "
        "sync_ref_model too; sDPO's steps renew the reference once per chunk"
    ),
}


def _unknown_key(
    key: str, prefix: str, valid: list[str], origins: _Origins, *, table: bool
) -> ConfigError:
    """``table``: the unknown name holds a table (a ``[section]`` at the top level)."""
    full = f"{prefix}{key}"
    kind = "section" if not prefix and table else "key"
    if key in _TRL_NAMES:
        owner = "PEFT's" if key in ("r", "target_modules") else "TRL's"  # LoraConfig's names
        return ConfigError(
            f"unknown {kind} '{full}' ({origins.where(full)}): {owner} option '{key}'? "
            f"{_TRL_NAMES[key]}"
        )
    # a key that exists in another section ([train] beta -> loss.beta; a flat TRL-style
    # learning_rate at the top level -> train.learning_rate), else a near spelling here, else a
    # near spelling anywhere, else the list of what is valid here
    all_keys = _all_keys(RunConfig)
    sections = {k.rsplit(".", 1)[0] for k in all_keys if "." in k}
    by_leaf: dict[str, str] = {}
    for k in all_keys:
        if (prefix or not table) and k not in sections:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    close_leaf = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.6)
    if key in by_leaf:
        hint = f"did you mean '{by_leaf[key]}'?"
    elif close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    elif close_leaf:
        hint = f"did you mean '{by_leaf[close_leaf[0]]}'?"
    else:
        hint = "valid keys here: " + ", ".join(f"'{prefix}{v}'" for v in valid)
    if prefix and "." not in hint.split("'")[1]:
        hint += " (top-level keys go before the first [section] header)"
    return ConfigError(f"unknown {kind} '{full}' ({origins.where(full)}): {hint}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "table"
    return tp.__name__


def _resolve_path(value: str, kind: str, base: Path) -> str:
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = base / expanded
    if kind == "model":
        looks_local = candidate.exists() or not is_hub_model_id(value)
    else:
        looks_local = (
            kind == "local"
            or value.startswith((".", "~"))
            or value.endswith(_DATA_SUFFIXES)
            or candidate.exists()
        )
    return os.path.normpath(candidate) if looks_local else value  # else: a hub name


def _convert(
    value: Any, tp: Any, *, key: str, meta: Any, origins: _Origins, shown: Any = None
) -> Any:
    """``value`` checked against the field type ``tp`` (``shown``: the type to name in errors)."""
    shown = tp if shown is None else shown
    origin = typing.get_origin(tp)
    raw = origins.overrides.get(key)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (raw is not None and raw.strip().lower() in ("none", "null")):
            return None
        if len(args) > 1:  # e.g. str | list[str]: a list takes the list member, else the other
            lists = [a for a in args if typing.get_origin(a) is list]
            others = [a for a in args if typing.get_origin(a) is not list]
            pick = lists if isinstance(value, list) else others
            if len(pick) != 1:
                raise _type_error(key, shown, value, origins)
            args = pick
        (inner,) = args
        return _convert(value, inner, key=key, meta=meta, origins=origins, shown=tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", origins=origins)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, shown, value, origins)
        (item_tp,) = typing.get_args(tp)
        return [
            _convert(v, item_tp, key=f"{key}[{i}]", meta=meta, origins=origins)
            for i, v in enumerate(value)
        ]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if not isinstance(value, str) and raw is not None and not isinstance(value, (list, dict)):
            value = raw  # --set model.path=123 means the text "123"
        if isinstance(value, str):
            kind = meta.get("path") if meta else None
            return _resolve_path(value, kind, origins.base_dir(key)) if kind else value
    else:  # pragma: no cover - a field type this reader does not know is a bug here
        raise TypeError(f"config field {key} has unsupported type {tp!r}")
    raise _type_error(key, shown, value, origins)


# the per-step lists of [sdpo] and the key that holds one value for every step
_PER_STEP = {"sdpo.beta": "loss.beta", "sdpo.learning_rate": "train.learning_rate"}


def _type_error(key: str, tp: Any, value: Any, origins: _Origins) -> ConfigError:
    got = type(value).__name__ if not isinstance(value, dict) else "table"
    hint = ""
    if key in _PER_STEP and isinstance(value, (int, float)) and not isinstance(value, bool):
        # `beta = 0.1` written at the end of a file lands in its last table, often [sdpo]
        hint = (
            f": one value per sDPO step (e.g. [{value!r}, {value!r}]); one value for every step "
            f"is {_PER_STEP[key]}"
        )
        if origins.override_of(key) is None and origins.source != "the config dict":
            hint += " (a key written anywhere below the [sdpo] header belongs to [sdpo])"
    if key == "log.report_to" and isinstance(value, str):
        # TRL's report_to takes one name, "all" or "none"
        named = [t for t in TRACKERS if t == value.strip().lower()]
        hint = (
            f': write a list, report_to = ["{named[0]}"]'
            if named
            else f": write a list of {' and/or '.join(map(repr, TRACKERS))}"
            + ("; none is [] (the default)" if value.strip().lower() in ("none", "") else "")
            + ("; all is each of them by name" if value.strip().lower() == "all" else "")
        )
    return ConfigError(
        f"{key} ({origins.where(key)}) must be {_type_name(tp)}, got {got} {value!r}{hint}"
    )


def _build(cls: type, data: Any, *, prefix: str, origins: _Origins) -> Any:
    key = prefix.rstrip(".")
    if not isinstance(data, dict):
        what = f"[{key}]" if key else "the top level"
        hint = ""
        if cls is DataSource and isinstance(data, str):  # sources = ["a.jsonl", ...]
            quoted = '"' + data.replace("\\", "\\\\").replace('"', '\\"') + '"'
            hint = (
                f"; write each source as a table, {{ path = {quoted} }} (name, optional, "
                "defaults to the file's name)"
            )
            if key.startswith("data.sources"):
                hint += ", or one source alone as data.path"
        raise ConfigError(
            f"{what} ({origins.where(key)}) must be a table of keys, got "
            f"{type(data).__name__} {data!r}{hint}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(name, prefix, list(fields), origins, table=isinstance(value, dict))
        kwargs[name] = _convert(
            value, hints[name], key=f"{prefix}{name}", meta=fields[name].metadata, origins=origins
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{prefix}{missing[0]} is required ({origins.where(key)}): add "
            f"{missing[0]} = ... {'under [' + key + ']' if key else 'at the top level'}"
        )
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{e} ({origins.where(key)})") from None
    except ValueError as e:  # sections defined elsewhere (LossConfig) raise plain ValueError
        raise ConfigError(f"{key}.{e} ({origins.where(key)})") from None


# ---------------------------------------------------------------------------------------------
# public API


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", value)``; the value is a TOML literal when it parses as one
    (numbers, booleans, quoted strings, ``[lists]``, ``{inline tables}``), else the plain text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {text!r} is not of the form section.key=value (e.g. --set train.epochs=2)"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _apply_override(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"--set {key}: {where} is not a table ({type(child).__name__}); set {where} as a "
                'whole, e.g. --set \'data.sources=[{name="a", path="a.jsonl"}]\''
            )
        node = child
    node[parts[-1]] = value


def config_from_dict(
    d: dict[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Build and validate a ``RunConfig`` from a plain dict (a parsed TOML document).

    Relative paths resolve against ``base_dir`` (default: the working directory); values from
    ``overrides`` (``"a.b=c"`` strings) replace the dict's and resolve against the working
    directory."""
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return _from_dict(d, origins=_Origins(source="the config dict", base=base), overrides=overrides)


def _from_dict(d: dict[str, Any], *, origins: _Origins, overrides: Sequence[str]) -> RunConfig:
    d = copy.deepcopy(d)
    for text in overrides:
        key, value = parse_override(text)
        # data.path and data.sources are two spellings of one thing: setting one replaces both
        twin = {"data.path": "sources", "data.sources": "path"}.get(key)
        if twin is not None and isinstance(d.get("data"), dict):
            d["data"].pop(twin, None)
        _apply_override(d, key, value)
        origins.overrides[key] = text.partition("=")[2].strip()
    return _build(RunConfig, d, prefix="", origins=origins)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config TOML file, apply ``--set`` overrides and validate everything."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: give the run's TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        if isinstance(e, UnicodeDecodeError):
            raise ConfigError(f"{path} is not text: give the run's TOML file") from None
        hint = ""
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            hint = (
                "; sdpo's config is TOML: a TRL DPO config file (YAML or JSON) converts with "
                f"`sdpo config --from-trl {path} --out run.toml`"
            )
        raise ConfigError(f"{path} is not valid TOML: {e}{hint}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    origins = _Origins(source=str(path), base=path.parent)
    return _from_dict(d, origins=origins, overrides=overrides)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as nested plain dicts and lists (None kept for unset optional keys)."""
    return dataclasses.asdict(cfg)


def write_resolved_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every key, defaults included) as TOML, atomically.
    ``load_config`` of the written file gives back an equal ``RunConfig``."""
    header = "# sdpo run configuration, fully resolved (defaults included)\n"
    atomic_write_text(path, header + toml_dumps(config_to_dict(cfg)))


def step_settings(cfg: RunConfig, t: int) -> tuple[float, float]:
    """(beta, learning_rate) of sDPO step ``t`` (1-based), after the per-step overrides."""
    if not 1 <= t <= cfg.sdpo.steps:
        raise ValueError(f"sDPO step {t} is out of range 1..{cfg.sdpo.steps}")
    beta = cfg.sdpo.beta[t - 1] if cfg.sdpo.beta else cfg.loss.beta
    lr = cfg.sdpo.learning_rate[t - 1] if cfg.sdpo.learning_rate else cfg.train.learning_rate
    return beta, lr


# ---------------------------------------------------------------------------------------------
# a minimal TOML writer for the config's value types (tables, arrays of tables, scalars, lists)

_BARE_KEY_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY_CHARS else _toml_str(key)


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        items = (f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def toml_dumps(d: dict[str, Any]) -> str:
    """TOML text for a dict of tables, arrays of tables and scalars. ``None`` values are left
    out (TOML has no null: an absent key reads back as the field's default, which for every
    optional config key is None)."""
    lines: list[str] = []
    _emit_table(d, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(d: dict[str, Any], path: list[str], lines: list[str]) -> None:
    subtables = []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict) or _is_table_list(v):
            subtables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in subtables:
        sub = [*path, k]
        name = ".".join(_toml_key(p) for p in sub)
        if isinstance(v, dict):
            lines.extend(["", f"[{name}]"])
            _emit_table(v, sub, lines)
        else:
            for item in v:
                lines.extend(["", f"[[{name}]]"])
                _emit_table(item, sub, lines)
